"""The relay: half-close both ways, backpressure, backend faults, limits, SIGTERM drain."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import ssl
import struct
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edged.proxy import WRITE_HIGH_WATER, BackendConnection, ClientConnection
from tests.conftest import BackendConn, free_port, run_backend, run_edged
from tests.tls_client import MemoryTlsClient

NAME = "one.example.test"


def site(pki: dict[str, Path], backend: str, extra: str = "", stem: str = "one") -> str:
    """A site for `stem`.example.test (NAME by default) with the pki's certificate of it."""
    return f"""
[[site]]
names = ["{stem}.example.test"]
backend = "{backend}"
cert_file = "{pki[stem + "_cert"]}"
key_file = "{pki[stem + "_key"]}"
{extra}
"""


class TlsClient(MemoryTlsClient):
    """The shared memory-BIO client, for NAME by default; read() → (data, got_close_notify)."""

    def __init__(self, port: int, cafile: Path, sni: str = NAME) -> None:
        super().__init__(port, cafile, sni)

    def read(self, limit: int = 1 << 30) -> tuple[bytes, bool]:
        return self.read_all(limit)


async def test_client_half_close_still_gets_the_response(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: BackendConn
    ) -> None:
        conn.data += await reader.read()  # until the client's EOF arrives as a FIN
        writer.write(b"got %d bytes" % len(conn.data))
        await writer.drain()

    async with (
        run_backend(handler) as backend,
        run_edged(tmp_path, site(pki, backend.address)) as edged,
    ):
        client = await asyncio.to_thread(TlsClient, edged.port, pki["ca"])
        await asyncio.to_thread(client.send, b"hello")
        await asyncio.to_thread(client.close_write)
        data, clean = await asyncio.to_thread(client.read)
        client.close()
        assert data == b"got 5 bytes"
        assert clean  # edged closed with close_notify after the backend finished


async def test_backend_half_close_client_can_still_send(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: BackendConn
    ) -> None:
        writer.write(b"early")
        writer.write_eof()  # backend is done sending, still listening
        conn.data += await reader.read()

    # The backend speaks first: its connection must open at the handshake, not at the
    # client's first bytes.
    first = 'backend_connect = "handshake"'
    async with (
        run_backend(handler) as backend,
        run_edged(tmp_path, site(pki, backend.address, first)) as edged,
    ):
        client = await asyncio.to_thread(TlsClient, edged.port, pki["ca"])
        data, clean = await asyncio.to_thread(client.read)
        assert (data, clean) == (b"early", True)
        await asyncio.to_thread(client.send, b"late data")
        await asyncio.to_thread(client.close_write)
        for _ in range(100):
            if backend.conns and backend.conns[0].data == b"late data":
                break
            await asyncio.sleep(0.02)
        client.close()
        assert backend.conns[0].data == b"late data"


async def test_backend_connection_opens_at_the_first_request_bytes(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """Clients that complete the handshake and leave (probes, scanners, handshake floods) cost
    the backend no connection; the first bytes of a request open it, and they reach it first
    (after the PROXY header)."""
    async with (
        run_backend() as backend,
        run_edged(tmp_path, site(pki, backend.address, 'proxy_protocol = "v1"')) as edged,
    ):
        for closing in ("close_notify", "fin"):
            client = await asyncio.to_thread(TlsClient, edged.port, pki["ca"])
            if closing == "close_notify":
                await asyncio.to_thread(client.close_write)  # close_notify, then FIN
            client.close()
        # A client that stays, sending nothing: still no backend connection.
        idle = await asyncio.to_thread(TlsClient, edged.port, pki["ca"])
        closed = edged.daemon.counters.connections_closed

        def gone() -> int:  # a close with the tickets unread is a reset: client_error
            return closed["client_closed"] + closed["client_error"]

        for _ in range(100):
            if gone() == 2:
                break
            await asyncio.sleep(0.02)
        assert gone() == 2
        assert closed["client_closed"] >= 1  # the close_notify one
        assert edged.daemon.counters.handshakes["ok", "TLSv1.3"] == 3
        assert backend.conns == []
        await asyncio.to_thread(idle.send, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await asyncio.to_thread(idle.read_until, b"backend=b1")
        idle.close()
        assert b"backend=b1" in data
        assert len(backend.conns) == 1
        raw = bytes(backend.conns[0].raw)
        assert raw.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 "), raw
        assert raw.split(b"\r\n", 1)[1] == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", raw


async def test_nagle_is_off_on_both_sides(tmp_path: Path, pki: dict[str, Path]) -> None:
    """Small TLS records and request heads go out at once (edged relies on uvloop for it)."""
    async with (
        run_backend() as backend,
        run_edged(tmp_path, site(pki, backend.address)) as edged,
    ):
        client = await asyncio.to_thread(TlsClient, edged.port, pki["ca"])
        await asyncio.to_thread(client.send, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"backend=b1" in await asyncio.to_thread(client.read_until, b"backend=b1")
        (conn,) = edged.daemon.term.active
        assert conn.transport is not None and conn.backend is not None
        assert conn.backend.transport is not None
        for transport in (conn.transport, conn.backend.transport):
            sock = transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        client.close()


async def test_server_first_backend_waits_for_the_client_by_default(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    async def greeter(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: BackendConn
    ) -> None:
        writer.write(b"220 hello\r\n")
        conn.data += await reader.read(100)
        writer.close()

    async with run_backend(greeter) as backend:
        for mode, greeted_before_sending in (("first_data", False), ("handshake", True)):
            body = site(pki, backend.address, f'backend_connect = "{mode}"')
            async with run_edged(tmp_path, body) as edged:
                client = await asyncio.to_thread(TlsClient, edged.port, pki["ca"])
                client.sock.settimeout(0.5)
                try:
                    early = await asyncio.to_thread(client.read_until, b"\r\n")
                except TimeoutError:
                    early = b""
                assert (early == b"220 hello\r\n") is greeted_before_sending, (mode, early)
                client.sock.settimeout(10)
                await asyncio.to_thread(client.send, b"EHLO x\r\n")
                if not greeted_before_sending:
                    late = await asyncio.to_thread(client.read_until, b"\r\n")
                    assert late == b"220 hello\r\n"
                for _ in range(100):
                    if backend.conns[-1].data:
                        break
                    await asyncio.sleep(0.02)
                client.close()
                assert backend.conns[-1].data == b"EHLO x\r\n"


async def test_backpressure_slow_client_bounded_memory(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    total = 96 * 1024 * 1024
    sent = 0

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: BackendConn
    ) -> None:
        nonlocal sent
        await reader.read(10)
        chunk = b"x" * 65536
        while sent < total:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
        writer.write_eof()

    async with (
        run_backend(handler) as backend,
        run_edged(tmp_path, site(pki, backend.address)) as edged,
    ):
        client = await asyncio.to_thread(TlsClient, edged.port, pki["ca"])
        await asyncio.to_thread(client.send, b"go")
        await asyncio.sleep(1.5)  # the client reads nothing meanwhile
        stalled_at = sent
        term = edged.daemon.term
        assert term is not None
        buffered = sum(c.transport.get_write_buffer_size() for c in term.active if c.transport)
        # Kernel socket buffers hold some MiB; edged itself holds about one high-water mark.
        assert stalled_at < 40 * 1024 * 1024, stalled_at
        assert buffered <= WRITE_HIGH_WATER + 512 * 1024, buffered
        data, clean = await asyncio.to_thread(client.read)
        client.close()
        assert len(data) == total and clean
        assert edged.daemon.counters.bytes_out == total


async def test_backend_refused_closes_client_and_counts(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    async with run_edged(tmp_path, site(pki, dead)) as edged:
        client = await asyncio.to_thread(TlsClient, edged.port, pki["ca"])
        await asyncio.to_thread(client.send, b"GET / HTTP/1.1\r\n\r\n")
        data, clean = await asyncio.to_thread(client.read)
        client.close()
        assert data == b"" and clean
        assert edged.daemon.counters.backend_errors["refused"] == 1


async def reset_mid_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: BackendConn
) -> None:
    """A backend that answers a little, then resets the connection (RST, SO_LINGER 0)."""
    await reader.read(10)
    writer.write(b"partial")
    await writer.drain()
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()


async def test_backend_reset_mid_stream_aborts_client(tmp_path: Path, pki: dict[str, Path]) -> None:
    async with (
        run_backend(reset_mid_stream) as backend,
        run_edged(tmp_path, site(pki, backend.address)) as edged,
    ):
        client = await asyncio.to_thread(TlsClient, edged.port, pki["ca"])
        await asyncio.to_thread(client.send, b"go")
        try:
            data, clean = await asyncio.to_thread(client.read)
        except ConnectionResetError:
            data, clean = b"partial", False
        client.close()
        assert data == b"partial" and not clean  # no close_notify: truncation is visible
        assert edged.daemon.counters.backend_errors["reset"] == 1


async def test_idle_timeout_closes(tmp_path: Path, pki: dict[str, Path]) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: BackendConn
    ) -> None:
        conn.data += await reader.read()  # accepts and never answers

    async with (
        run_backend(handler) as backend,
        run_edged(tmp_path, site(pki, backend.address)) as edged,
    ):
        text = edged.config_path.read_text().replace("drain_timeout = 2", "idle_timeout = 0.5")
        edged.config_path.write_text(text)
        assert await edged.daemon.reload("test")
        client = await asyncio.to_thread(TlsClient, edged.port, pki["ca"])
        await asyncio.to_thread(client.send, b"hello")
        start = time.monotonic()
        data, clean = await asyncio.to_thread(client.read)
        client.close()
        assert data == b"" and clean
        assert 0.3 < time.monotonic() - start < 5


async def test_idle_timeout_enforced_by_the_handshake_timer(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """The handshake timer carries on as the idle timer when the idle deadline is later than
    it: it fires at handshake_timeout, sees the handshake done and the client silent for
    less than idle_timeout, and reschedules itself for the rest."""
    async with run_backend() as backend:
        body = site(pki, backend.address) + "[tls]\nhandshake_timeout = 0.5\n"
        async with run_edged(tmp_path, body, edged_extra="idle_timeout = 1.5") as edged:
            start = time.monotonic()
            client = await asyncio.to_thread(TlsClient, edged.port, pki["ca"])
            data, clean = await asyncio.to_thread(client.read)  # sends nothing, waits
            elapsed = time.monotonic() - start
            client.close()
            assert data == b"" and clean
            assert 1.3 < elapsed < 8, elapsed  # idle_timeout, not the handshake's 0.5 s
            assert edged.daemon.counters.connections_closed["idle_timeout"] == 1
            assert edged.daemon.counters.handshakes["ok", "TLSv1.3"] == 1


async def test_max_connections(tmp_path: Path, pki: dict[str, Path]) -> None:
    async with (
        run_backend() as backend,
        run_edged(tmp_path, site(pki, backend.address)) as edged,
    ):
        text = edged.config_path.read_text().replace("drain_timeout = 2", "max_connections = 2")
        edged.config_path.write_text(text)
        assert await edged.daemon.reload("test")
        held = [await asyncio.to_thread(TlsClient, edged.port, pki["ca"]) for _ in range(2)]
        with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
            extra = await asyncio.to_thread(TlsClient, edged.port, pki["ca"])
            extra.close()
        assert edged.daemon.counters.connections_refused["max_connections"] == 1
        for c in held:
            c.close()


def _notify_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    return sock


async def _next_notify(sock: socket.socket) -> str:
    """The next state notification (STATUS= and WATCHDOG= messages are skipped)."""
    loop = asyncio.get_running_loop()
    while True:
        data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
        if not data.startswith((b"STATUS=", b"WATCHDOG=")):
            return data.decode()


async def test_sigterm_drains_open_connections_and_notifies_systemd(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    async def slow(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: BackendConn
    ) -> None:
        await reader.read(10)
        await asyncio.sleep(1.0)
        writer.write(b"finished")
        await writer.drain()
        writer.write_eof()

    port = free_port()
    async with run_backend(slow) as backend:
        config = tmp_path / "edged.toml"
        config.write_text(
            textwrap.dedent(f"""
                [edged]
                store = "store"
                drain_timeout = 10
                [listen]
                https = ["127.0.0.1:{port}"]
                http = []
                metrics = ""
                admin = ""
            """)
            + site(pki, backend.address)
        )
        notify = _notify_socket(tmp_path)
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        edged_bin = str(Path(sys.executable).with_name("edged"))
        proc = await asyncio.create_subprocess_exec(
            edged_bin, "run", "--config", str(config), env=env, stderr=asyncio.subprocess.PIPE
        )
        try:
            assert await _next_notify(notify) == "READY=1"
            client = await asyncio.to_thread(TlsClient, port, pki["ca"])  # bound when READY
            await asyncio.to_thread(client.send, b"request")
            await asyncio.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert await _next_notify(notify) == "STOPPING=1"
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            data, clean = await asyncio.to_thread(client.read)
            client.close()
            assert (data, clean) == (b"finished", True)
            assert await asyncio.wait_for(proc.wait(), 10) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            notify.close()
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert "draining 1 connections" in log
        assert "edged stopped" in log


async def test_connections_are_freed_without_the_cyclic_gc(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """edged freezes what is alive once a state is installed (edged.heap.freeze_long_lived):
    a connection open then must not need the cyclic GC once it ends, or it would never be
    freed. With the collector off, every way a connection ends leaves none behind."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: BackendConn
    ) -> None:
        first = await reader.read(100)
        writer.write(b"answer:" + first)
        await writer.drain()
        if first.startswith(b"reset"):  # RST after the answer (SO_LINGER 0)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        elif first.startswith(b"wait"):
            await reader.read()  # until the client's EOF (the client closes first)

    refused = site(pki, f"127.0.0.1:{free_port()}", stem="two")
    async with (
        run_backend(handler) as backend,
        run_edged(tmp_path, site(pki, backend.address) + refused) as edged,
    ):
        gc.collect()
        gc.disable()
        try:

            def exchanges() -> None:
                for request in (b"done", b"wait", b"reset"):
                    client = TlsClient(edged.port, pki["ca"])
                    client.send(request)
                    with contextlib.suppress(ConnectionError):
                        client.read_until(b"answer:" + request[:1])
                    if request == b"wait":
                        client.close_write()
                        with contextlib.suppress(ConnectionError):
                            client.read()
                    client.close()
                TlsClient(edged.port, pki["ca"]).close()  # the handshake only
                client = TlsClient(edged.port, pki["ca"], sni="two.example.test")
                client.send(b"to a backend that refuses")
                with contextlib.suppress(ConnectionError):
                    client.read()
                client.close()
                with socket.create_connection(("127.0.0.1", edged.port)) as raw:
                    raw.sendall(b"GET / HTTP/1.0\r\n\r\n")  # plain HTTP: no handshake
                    raw.recv(100)

            await asyncio.to_thread(exchanges)
            closed = edged.daemon.counters.connections_closed
            for _ in range(200):
                if sum(closed.values()) == 6 and len(backend.conns) == 3:
                    break
                await asyncio.sleep(0.02)
            assert sum(closed.values()) == 6, dict(closed)
            await asyncio.sleep(0.2)  # the backend side's own connection_lost
            left = [
                type(o).__name__
                for o in gc.get_objects()
                if isinstance(o, ClientConnection | BackendConnection)
            ]
            assert left == []
        finally:
            gc.enable()
