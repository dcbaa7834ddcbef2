"""Backend faults with the real daemon: the client connection is closed cleanly (no hang), the
fault is counted in backend_errors, and another site on the same port keeps working meanwhile.

tests/test_data_path.py already covers a refused backend and a reset mid-stream on their own
(counted, close_notify vs abort) and the idle timeout; this file adds the connect timeout
(a backend whose accept queue is full), a unix-socket backend that is missing or dead, and,
for every fault, a second site served on the same port while the fault is in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import BackendConn, free_port, run_backend, run_edged
from tests.test_data_path import TlsClient, reset_mid_stream

BAD = "one.example.test"
GOOD = "two.example.test"


def two_sites(pki: dict[str, Path], bad_backend: str, good_backend: str) -> str:
    return f"""
[[site]]
names = ["{BAD}"]
backend = "{bad_backend}"
cert_file = "{pki["one_cert"]}"
key_file = "{pki["one_key"]}"

[[site]]
names = ["{GOOD}"]
backend = "{good_backend}"
cert_file = "{pki["two_cert"]}"
key_file = "{pki["two_key"]}"
"""


@contextlib.contextmanager
def full_accept_queue() -> Iterator[str]:
    """A listener that never accepts and whose queue is full: a connect gets no SYN-ACK."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        probe = socket.socket()
        probe.settimeout(0.5)
        try:
            probe.connect(("127.0.0.1", port))
        except TimeoutError:
            pass
        else:
            pytest.skip("this kernel accepts connections past a full listen queue")
        finally:
            probe.close()
        yield f"127.0.0.1:{port}"
    finally:
        for filler in fillers:
            filler.close()
        server.close()


async def silent(reader: asyncio.StreamReader, _w: asyncio.StreamWriter, conn: BackendConn) -> None:
    conn.data += await reader.read()  # accepts, reads, never answers


@contextlib.asynccontextmanager
async def bad_backend(kind: str, tmp_path: Path) -> AsyncIterator[str]:
    if kind == "refused":
        yield f"127.0.0.1:{free_port()}"
    elif kind == "connect_timeout":
        with full_accept_queue() as address:
            yield address
    elif kind == "unix_missing":
        yield f"unix:{tmp_path / 'missing.sock'}"
    elif kind == "unix_dead":
        path = tmp_path / "dead.sock"
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))  # a socket file nobody listens on
        sock.close()
        yield f"unix:{path}"
    else:
        handler = {"silent": silent, "reset": reset_mid_stream}[kind]
        async with run_backend(handler) as backend:
            yield backend.address


def read_http_response(port: int, cafile: Path, host: str) -> bytes:
    client = TlsClient(port, cafile, sni=host)
    try:
        client.send(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        client.close_write()
        data, clean = client.read()
    finally:
        client.close()
    assert clean
    return data


# reason counted in backend_errors ("" = not counted there: an idle close), and what the client
# of the faulty site sees: ("close", data) = close_notify after `data`; ("abort", data) = the
# stream cut without close_notify, so the truncation is visible.
FAULTS = {
    "refused": ("refused", "close", b""),
    "connect_timeout": ("connect_timeout", "close", b""),
    "unix_missing": ("connect_error", "close", b""),
    "unix_dead": ("refused", "close", b""),
    "reset": ("reset", "abort", b"partial"),
    "silent": ("timeout", "close", b""),  # the backend never answered: counted
}


@pytest.mark.parametrize("kind", list(FAULTS))
async def test_backend_fault_closes_client_and_spares_other_sites(
    tmp_path: Path, pki: dict[str, Path], kind: str
) -> None:
    reason, ending, expected = FAULTS[kind]
    async with (
        run_backend(name="good") as good,
        bad_backend(kind, tmp_path) as bad_address,
        run_edged(tmp_path, two_sites(pki, bad_address, good.address)) as edged,
    ):
        text = edged.config_path.read_text().replace(
            "drain_timeout = 2", "drain_timeout = 2\nbackend_connect_timeout = 1\nidle_timeout = 1"
        )
        edged.config_path.write_text(text)
        assert await edged.daemon.reload("test")

        client = await asyncio.to_thread(TlsClient, edged.port, pki["ca"], BAD)
        try:
            await asyncio.to_thread(client.send, b"GET / HTTP/1.1\r\nHost: one\r\n\r\n")
            # Meanwhile the other site on the same port answers.
            answer = await asyncio.to_thread(read_http_response, edged.port, pki["ca"], GOOD)
            assert answer.endswith(f"backend=good host={GOOD}\n".encode())
            try:
                data, clean = await asyncio.wait_for(asyncio.to_thread(client.read), 15)
            except ConnectionResetError:
                data, clean = expected, False
        finally:
            client.close()
        assert data == expected
        assert clean == (ending == "close")
        errors = dict(edged.daemon.counters.backend_errors)
        assert errors == ({reason: 1} if reason else {}), errors
        # The daemon still serves the faulty site's neighbours, and the fault again.
        answer = await asyncio.to_thread(read_http_response, edged.port, pki["ca"], GOOD)
        assert answer.endswith(f"backend=good host={GOOD}\n".encode())


async def test_silent_backend_is_counted(tmp_path: Path, pki: dict[str, Path]) -> None:
    async with (
        run_backend(silent) as backend,
        run_edged(tmp_path, two_sites(pki, backend.address, backend.address)) as edged,
    ):
        text = edged.config_path.read_text().replace(
            "drain_timeout = 2", "drain_timeout = 2\nidle_timeout = 0.5"
        )
        edged.config_path.write_text(text)
        assert await edged.daemon.reload("test")
        client = await asyncio.to_thread(TlsClient, edged.port, pki["ca"], BAD)
        await asyncio.to_thread(client.send, b"GET / HTTP/1.1\r\n\r\n")
        data, clean = await asyncio.wait_for(asyncio.to_thread(client.read), 15)
        client.close()
        assert data == b"" and clean
        assert sum(edged.daemon.counters.backend_errors.values()) == 1


def established_to(port: int) -> int:
    """TCP connections in state ESTABLISHED whose remote port is `port` (/proc/net/tcp)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
            count += 1
    return count


async def test_a_backend_that_stops_reading_is_reset_once_the_client_is_gone(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """The client uploads to a backend that never reads; edged closes the client at the idle
    timeout. The backend connection, still holding the unsent upload, is reset after one more
    idle_timeout without progress (it stayed open for good, outside every connection limit)."""
    stop = asyncio.Event()

    async def never_reads(_r: asyncio.StreamReader, _w: asyncio.StreamWriter, _c: object) -> None:
        await stop.wait()

    def upload(port: int) -> None:
        client = TlsClient(port, pki["ca"], BAD)
        client.sock.settimeout(0.5)
        try:
            for _ in range(400):  # until the buffers are full and the send blocks
                client.send(b"x" * 16384)
        except OSError:
            pass
        finally:
            client.close()

    async with (
        run_backend(never_reads) as backend,
        run_edged(tmp_path, two_sites(pki, backend.address, backend.address)) as edged,
    ):
        text = edged.config_path.read_text()
        edged.config_path.write_text(
            text.replace("drain_timeout = 2", "drain_timeout = 2\nidle_timeout = 1")
        )
        assert await edged.daemon.reload("test")
        await asyncio.to_thread(upload, edged.port)
        assert established_to(backend.port) == 1
        for _ in range(100):  # the client's connection ends at its idle timeout, the
            if established_to(backend.port) == 0:  # backend's one idle_timeout later
                break
            await asyncio.sleep(0.1)
        stop.set()
        assert established_to(backend.port) == 0
        assert not edged.daemon.term.active
