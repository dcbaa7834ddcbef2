"""Hostile TLS clients against a real edged process: garbage and truncated ClientHellos, hostile
server names, slowloris, idle connections up to the limits, a client that never reads, old
protocol versions and renegotiation.

For each case: edged stays up (a normal handshake and request work afterwards), its memory and
descriptors stay bounded (read from /proc/PID of the edged process), and the case is counted in
/metrics (scraped over HTTP, as Prometheus would).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import ssl
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edged.config import parse_config
from edged.proxy import CLOSE_REASONS, client_key, close_category
from tests.conftest import BackendConn, Handler, free_port, run_backend, run_cmd
from tests.test_clienthello import _client_hello, _sni

NAME = "one.example.test"
Key = tuple[str, frozenset[tuple[str, str]]]


@dataclass
class EdgedProcess:
    proc: asyncio.subprocess.Process
    port: int
    metrics_port: int
    config: Path
    cafile: Path

    def status(self) -> dict[str, int]:
        """VmRSS and VmHWM (KiB) and the open descriptors of the edged process."""
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        return out

    async def metrics(self) -> dict[Key, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.metrics_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        text = raw.partition(b"\r\n\r\n")[2].decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith("edged_")
        }

    async def count(self, metric: str, **labels: str) -> float:
        return (await self.metrics()).get((metric, frozenset(labels.items())), 0.0)

    async def handshakes(self) -> dict[str, float]:
        """edged_tls_handshakes_total by result (summed over versions)."""
        out: dict[str, float] = {}
        for (name, labels), value in (await self.metrics()).items():
            if name == "edged_tls_handshakes_total":
                result = dict(labels)["result"]
                out[result] = out.get(result, 0.0) + value
        return out

    async def wait_for(self, metric: str, value: float, limit: float = 30, **labels: str) -> None:
        """Poll /metrics until `metric{labels}` is `value` (fails after `limit` seconds)."""

        async def check() -> object:
            got = await self.count(metric, **labels)
            return True if got == value else f"{metric}{labels} is {got}, not {value}"

        await until(check, limit)

    async def wait_handshakes(self, expected: dict[str, float], limit: float = 15) -> None:
        async def check() -> object:
            got = await self.handshakes()
            return True if got == expected else f"handshakes {got}, not {expected}"

        await until(check, limit)

    async def serves(self, source: str = "127.0.0.1") -> None:
        """A normal handshake and request through edged, from `source`."""
        answer = await asyncio.to_thread(request, self.port, self.cafile, source)
        assert answer.endswith(f"backend=b1 host={NAME}\n".encode()), answer

    async def reload(self, old: str, new: str) -> None:
        """Replace `old` by `new` in the config and send SIGHUP; wait until it is applied."""
        text = self.config.read_text()
        assert old in text

        async def reloads() -> float:  # by SIGHUP or by the watcher, whichever comes first
            samples = (await self.metrics()).items()
            return sum(v for (n, labels), v in samples if n == "edged_reloads_total")

        before = await reloads()
        self.config.write_text(text.replace(old, new))
        self.proc.send_signal(signal.SIGHUP)

        async def reloaded() -> object:
            return True if await reloads() > before else "no reload yet"

        await until(reloaded, 30)
        assert await self.count("edged_reloads_total", kind="signal", result="error") == 0
        assert await self.count("edged_reloads_total", kind="file", result="error") == 0


async def until(
    check: Callable[[], Awaitable[object]], limit: float, interval: float = 0.1
) -> None:
    """Call `check` until it returns True; it returns what is wrong otherwise (the failure)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while (result := await check()) is not True:
        if loop.time() > deadline:
            raise AssertionError(f"after {limit} s: {result}")
        await asyncio.sleep(interval)


def request(port: int, cafile: Path, source: str = "127.0.0.1") -> bytes:
    ctx = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(
            ("127.0.0.1", port), timeout=20, source_address=(source, 0)
        ) as raw,
        ctx.wrap_socket(raw, server_hostname=NAME) as tls,
    ):
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
        data = b""
        while not data.endswith(b"\n") or b"\r\n\r\n" not in data:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


@contextlib.asynccontextmanager
async def edged_process(
    tmp_path: Path,
    pki: dict[str, Path],
    edged_keys: str = "",
    tls_keys: str = "",
    backend: Handler | None = None,
) -> AsyncIterator[EdgedProcess]:
    """`edged run` as its own process (so /proc shows its memory alone), with metrics on."""
    port, metrics_port = free_port(), free_port()
    async with run_backend(backend) as be:
        config = tmp_path / "edged.toml"
        config.write_text(
            textwrap.dedent(f"""\
                [edged]
                store = "store"
                drain_timeout = 2
                {edged_keys}
                [listen]
                https = ["127.0.0.1:{port}"]
                http = []
                metrics = "127.0.0.1:{metrics_port}"
                admin = ""
                [tls]
                {tls_keys}
                [[site]]
                names = ["{NAME}"]
                backend = "{be.address}"
                cert_file = "{pki["one_cert"]}"
                key_file = "{pki["one_key"]}"
            """)
        )
        log = (tmp_path / "edged.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("edged")), "run", "--config", str(config),
            stdin=asyncio.subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        edged = EdgedProcess(proc, port, metrics_port, config, pki["ca"])
        try:
            async with asyncio.timeout(30):
                while True:
                    assert proc.returncode is None, (tmp_path / "edged.log").read_text()
                    with contextlib.suppress(OSError):
                        await edged.metrics()
                        break
                    await asyncio.sleep(0.1)
            await edged.serves()
            start = edged.status()
            yield edged
            assert proc.returncode is None, "edged died"
            await edged.serves()  # still serving after the hostile case
            # Memory bounded: what any case left behind (the slowloris one peaks at ~20 MiB).
            assert edged.status()["VmRSS"] - start["VmRSS"] < 48 * 1024, (start, edged.status())
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.wait_for(proc.wait(), 30)
            finally:
                if proc.returncode is None:
                    proc.kill()
                log.close()
        assert code == 0, (tmp_path / "edged.log").read_text()[-3000:]


# --- ClientHellos ------------------------------------------------------------------------------


def real_hello(placeholder: str) -> bytes:
    """A real ClientHello (Python's ssl, TLS 1.2 + 1.3) whose server name is `placeholder`."""
    ctx = ssl.create_default_context()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=placeholder)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def hello_with_name(name: bytes) -> bytes:
    """A real ClientHello carrying `name` byte for byte as its server name: made with a
    placeholder name of the same length the ssl module accepts, so every length field stays
    right."""
    labels, left = [], len(name)
    while left > 63:
        labels.append("q" * 62)
        left -= 63  # the label and its dot
    placeholder = ".".join([*labels, "z" * left])
    hello = real_hello(placeholder)
    assert hello.count(placeholder.encode()) == 1
    return hello.replace(placeholder.encode(), name)


async def send_and_wait_close(port: int, data: bytes, *, then_close: bool = False) -> bytes:
    """Send `data`, then wait (up to 30 s) for edged to close; returns what edged answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if then_close:
            writer.close()
            return b""
        answer = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(30):
                while chunk := await reader.read(65536):
                    answer += chunk
        return answer
    finally:
        writer.close()


# --- garbage, truncated and hostile ClientHellos ----------------------------------------------


async def test_garbage_and_truncated_client_hellos(tmp_path: Path, pki: dict[str, Path]) -> None:
    rng = random.Random(5)
    hello = real_hello(NAME)
    async with edged_process(tmp_path, pki, tls_keys="handshake_timeout = 1") as edged:
        before = edged.status()
        cases = [
            (b"\x17" + rng.randbytes(4000), "protocol_error"),  # not a handshake record
            (b"\x16\x03\x01\xff\xff" + rng.randbytes(300), "protocol_error"),  # record too long
            (b"\x16\x03\x01\x00\x05" + b"\x02" + bytes(4), "protocol_error"),  # a ServerHello
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "http_on_https"),
            (hello[: len(hello) // 2], "timeout"),  # cut in half, then silence
            (hello[:3], "timeout"),  # not even a record header
        ]
        for data, _ in cases:
            answer = await send_and_wait_close(edged.port, data)
            assert answer == b"", answer[:100]  # closed without an answer: nothing to parse
        # Cut in half, then the client goes away.
        await send_and_wait_close(edged.port, hello[: len(hello) // 2], then_close=True)
        expected: dict[str, float] = {"ok": 1.0, "client_closed": 1.0}
        for _, result in cases:
            expected[result] = expected.get(result, 0.0) + 1
        await edged.wait_handshakes(expected)
        await edged.wait_for("edged_connections_active", 0)
        assert edged.status()["fds"] <= before["fds"]


# The server name exactly as sent, and how edged counts it: names it cannot serve are refused
# with unrecognized_name by the sni_callback (no_cert), names that are not host names at all
# are refused before TLS starts (protocol_error).
HOSTILE_NAMES = [
    (b"../../../../etc/passwd", "no_cert"),
    (b"one.example.test/../../store", "no_cert"),
    (b"..", "no_cert"),
    (b"x" * 64 + b".example.test", "no_cert"),  # a label longer than DNS allows
    (b"a." * 126 + b"b", "no_cert"),  # 253 bytes, the longest host name
    (b"one.example.test\x00.evil", "protocol_error"),  # NUL
    (b"\xc3\xa9t\xc3\xa9.example.test", "protocol_error"),  # UTF-8, not IDNA
    (b"\xff\xfe.example.test", "protocol_error"),  # not even UTF-8
    (b"one example test", "protocol_error"),  # a space
]


async def test_hostile_server_names(tmp_path: Path, pki: dict[str, Path]) -> None:
    async with edged_process(tmp_path, pki, edged_keys="connection_log = true") as edged:
        store = tmp_path / "store"
        before = sorted(p.name for p in store.rglob("*")) if store.exists() else []
        for name, result in HOSTILE_NAMES:
            answer = await send_and_wait_close(edged.port, hello_with_name(name))
            if result == "no_cert":  # a fatal unrecognized_name alert, nothing else
                assert answer[:1] == b"\x15" and answer[-2:] == b"\x02\x70", (name, answer)
            else:  # closed without a word
                assert answer == b"", (name, answer)
        # Longer than a host name can be (edged's parser refuses these before OpenSSL).
        for size in (256, 1000, 16000):
            answer = await send_and_wait_close(edged.port, _client_hello(_sni(b"a" * size)))
            assert answer == b""
        expected = {"ok": 1.0, "no_cert": 0.0, "protocol_error": 3.0}
        for _, result in HOSTILE_NAMES:
            expected[result] += 1
        await edged.wait_handshakes(expected)
        # Nothing was created or looked up on disk for those names.
        after = sorted(p.name for p in store.rglob("*")) if store.exists() else []
        assert after == before
    # And no client-chosen name reached the log (the connection log shows only served names).
    text = (tmp_path / "edged.log").read_text(errors="replace")
    for name, _ in HOSTILE_NAMES:
        if len(name) >= 10:
            assert name.decode("latin-1") not in text
    assert "passwd" not in text and "evil" not in text


# --- many slow or idle connections ------------------------------------------------------------


async def trickle(port: int, source: str, hello: bytes, interval: float) -> bool:
    """Slowloris: one byte of a ClientHello every `interval` s until edged closes (True) or
    the whole hello is out (False)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        for i in range(len(hello)):
            writer.write(hello[i : i + 1])
            try:
                if await asyncio.wait_for(reader.read(1), interval) == b"":
                    return True
            except TimeoutError:
                continue
            except ConnectionError:
                return True
        return False
    finally:
        writer.close()


async def test_slowloris_thousands_of_slow_handshakes(tmp_path: Path, pki: dict[str, Path]) -> None:
    per_source, sources = 500, ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    hello = real_hello(NAME)
    async with edged_process(tmp_path, pki, tls_keys="handshake_timeout = 2") as edged:
        base = edged.status()
        peaks = []
        for wave in (1, 2):
            tasks = [
                asyncio.create_task(trickle(edged.port, source, hello, 1.0))
                for source in sources
                for _ in range(per_source)
            ]
            # While they trickle, edged answers a normal client at once.
            await asyncio.sleep(0.5)
            await edged.serves()
            closed = await asyncio.wait_for(asyncio.gather(*tasks), 120)
            assert all(closed)  # edged closed every one of them (handshake_timeout)
            n = per_source * len(sources)
            await edged.wait_for(
                "edged_tls_handshakes_total", wave * n, result="timeout", version="none"
            )
            await edged.wait_for("edged_connections_active", 0)
            peaks.append(edged.status())
        # Bounded: the peak cost per slow connection, and no growth from the second wave.
        per_conn = (peaks[0]["VmHWM"] - base["VmRSS"]) * 1024 / n
        assert per_conn < 64 * 1024, per_conn
        assert peaks[1]["VmRSS"] - peaks[0]["VmRSS"] < 8 * 1024, (peaks, base)
        assert peaks[1]["fds"] <= base["fds"]
        assert (
            await edged.count("edged_connections_closed_total", reason="handshake_failed") == 2 * n
        )


async def open_idle(port: int, source: str, n: int) -> list[asyncio.StreamWriter]:
    conns = []
    for _ in range(n):
        _, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        conns.append(writer)
    return conns


async def is_reset(port: int, source: str) -> bool:
    """Connect from `source` and see whether edged resets the connection before any byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(real_hello(NAME))
        try:
            data = await asyncio.wait_for(reader.read(5), 10)
        except ConnectionError:
            return True
        return data == b""
    finally:
        writer.close()


async def test_idle_connections_up_to_the_limits(tmp_path: Path, pki: dict[str, Path]) -> None:
    keys = "max_connections = 400\nmax_connections_per_ip = 150"
    async with edged_process(
        tmp_path, pki, edged_keys=keys, tls_keys="handshake_timeout = 60"
    ) as edged:
        base = edged.status()
        held = await open_idle(edged.port, "127.0.0.2", 150)
        await edged.wait_for("edged_connections_active", 150)
        # One address at its limit: the next one from it is reset, others still get in.
        assert await is_reset(edged.port, "127.0.0.2")
        await edged.wait_for("edged_connections_refused_total", 1, reason="max_connections_per_ip")
        await edged.serves("127.0.0.3")
        held += await open_idle(edged.port, "127.0.0.3", 150)
        held += await open_idle(edged.port, "127.0.0.4", 100)
        await edged.wait_for("edged_connections_active", 400)
        # The whole host at max_connections: every new connection is reset, counted.
        assert await is_reset(edged.port, "127.0.0.5")
        await edged.wait_for("edged_connections_refused_total", 1, reason="max_connections")
        # Room again once idle ones go; the per-address count went down with them.
        for writer in held[:10]:
            writer.close()
        await edged.wait_for("edged_connections_active", 390)
        await edged.serves("127.0.0.2")
        # A reload changes the limit for new connections: 140 held, 145 allowed now.
        await edged.reload("max_connections_per_ip = 150", "max_connections_per_ip = 145")
        held += await open_idle(edged.port, "127.0.0.2", 5)
        await edged.wait_for("edged_connections_active", 395)
        assert await is_reset(edged.port, "127.0.0.2")
        await edged.wait_for("edged_connections_refused_total", 2, reason="max_connections_per_ip")
        assert edged.status()["VmRSS"] - base["VmRSS"] < 400 * 64
        for writer in held:
            writer.close()
        await edged.wait_for("edged_connections_active", 0)
        refused = await edged.count("edged_connections_refused_total", reason="max_connections")
        assert refused == 1
        assert edged.status()["fds"] <= base["fds"]


# --- a client that never reads ----------------------------------------------------------------


async def firehose(r: asyncio.StreamReader, w: asyncio.StreamWriter, conn: BackendConn) -> None:
    """A backend that answers `GET /endless` with an endless body, anything else briefly."""
    head = await r.readuntil(b"\r\n\r\n")
    if not head.startswith(b"GET /endless "):
        body = f"backend=b1 host={NAME}\n".encode()
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await w.drain()
        await r.read()
        return
    chunk = b"x" * 65536
    with contextlib.suppress(ConnectionError):
        while True:
            w.write(chunk)
            await w.drain()


async def test_client_that_never_reads_is_bounded_and_reset(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    clients = 20
    async with edged_process(
        tmp_path, pki, edged_keys="idle_timeout = 2", backend=firehose
    ) as edged:
        base = edged.status()
        ctx = ssl.create_default_context(cafile=str(edged.cafile))

        def sluggard() -> ssl.SSLSocket:
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
            raw.settimeout(20)
            raw.connect(("127.0.0.1", edged.port))
            tls = ctx.wrap_socket(raw, server_hostname=NAME)
            tls.sendall(b"GET /endless HTTP/1.1\r\n\r\n")
            return tls  # and never reads

        socks = [await asyncio.to_thread(sluggard) for _ in range(clients)]
        try:
            # Backpressure: once the kernel buffers are full the backends are paused and the
            # byte count stops (a few MiB per client: what the kernel holds, not edged).
            last = -1.0

            async def stalled() -> object:
                nonlocal last
                before, last = last, await edged.count("edged_bytes_total", direction="out")
                return (
                    True if last > 0 and 0 <= last - before < 256 * 1024 else f"{before} -> {last}"
                )

            await until(stalled, 30, interval=0.5)
            assert last < clients * 6 * 1024 * 1024, last
            # What edged itself holds: about one write buffer (256 KiB) and a read per client.
            assert edged.status()["VmRSS"] - base["VmRSS"] < clients * 2048, edged.status()
            # After idle_timeout edged closes them; as they take nothing of what is left, it
            # resets them after another idle_timeout: their sockets are freed although the
            # clients still hold theirs.
            await edged.wait_for("edged_connections_active", 0)
            await edged.wait_for("edged_connections_closed_total", clients, reason="idle_timeout")
            assert edged.status()["fds"] <= base["fds"]
            await edged.serves()
        finally:
            for s in socks:
                s.close()


# --- old protocol versions and renegotiation --------------------------------------------------


async def test_old_protocol_versions_are_refused(tmp_path: Path, pki: dict[str, Path]) -> None:
    async with edged_process(tmp_path, pki) as edged:
        for flag in ("-tls1", "-tls1_1"):
            out = await run_cmd(
                "openssl", "s_client", "-connect", f"127.0.0.1:{edged.port}", "-servername",
                NAME, flag, "-cipher", "DEFAULT@SECLEVEL=0",
            )  # fmt: skip
            assert out.returncode != 0
            assert "alert protocol version" in out.stdout + out.stderr, out.stderr
        sslv3 = bytearray(_client_hello(_sni(NAME.encode()), ciphers=b"\x00\x2f"))
        sslv3[1:3] = sslv3[9:11] = b"\x03\x00"  # record and ClientHello version: SSL 3.0
        answer = await send_and_wait_close(edged.port, bytes(sslv3))
        assert answer[:1] == b"\x15" and answer[-1:] == b"\x28"  # handshake_failure alert
        sslv2 = bytes.fromhex("801f010002000600000010") + b"\x01\x00\x80" * 2 + bytes(16)
        assert await send_and_wait_close(edged.port, sslv2) == b""
        assert await edged.handshakes() == {"ok": 1.0, "unsupported_version": 4.0}


async def test_tls12_renegotiation_is_refused_and_counted(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    async with edged_process(tmp_path, pki) as edged:
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{edged.port}", "-servername", NAME,
            "-tls1_2", "-CAfile", str(edged.cafile),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        try:
            await edged.wait_for("edged_tls_handshakes_total", 1, result="ok", version="TLSv1.2")
            proc.stdin.write(b"R\n")  # s_client: renegotiate
            await proc.stdin.drain()
            await edged.wait_for(
                "edged_tls_handshakes_total", 1, result="renegotiation_refused", version="TLSv1.2"
            )
            proc.stdin.close()
            out = (await asyncio.wait_for(proc.stdout.read(), 30)).decode(errors="replace")
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        assert "RENEGOTIATING" in out
        assert "no renegotiation" in out
        # s_client gives up with a fatal alert; edged counts the connection's end.
        await edged.wait_for("edged_connections_closed_total", 1, reason="tls_error")
        assert await edged.handshakes() == {"ok": 2.0, "renegotiation_refused": 1.0}


# --- units ------------------------------------------------------------------------------------


def test_client_key() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9")
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("fe80::1%eth0") == "fe80::/64"


def test_max_connections_per_ip_config() -> None:
    src = Path("/etc/edged/edged.toml")
    base = '[[site]]\nnames = ["a.test"]\nbackend = "127.0.0.1:1"\n'
    assert parse_config(base, src).edged.max_connections_per_ip == 1000
    off = parse_config("[edged]\nmax_connections_per_ip = 0\n" + base, src)
    assert off.edged.max_connections_per_ip == 0
    with pytest.raises(Exception, match="max_connections_per_ip: must be >= 0"):
        parse_config("[edged]\nmax_connections_per_ip = -1\n" + base, src)


def test_close_reasons_are_a_bounded_set() -> None:
    assert close_category("done") == "done"
    assert close_category("handshake_timeout") == "handshake_failed"
    assert close_category("clienthello_bad_server_name") == "handshake_failed"
    assert close_category("backend_connect_timeout") == "backend_error"
    assert close_category("no_route") == "other"
    assert close_category("anything a future change adds") in CLOSE_REASONS
