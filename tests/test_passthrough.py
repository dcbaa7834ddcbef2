"""TLS passthrough by SNI next to terminated sites on one port, the PROXY v2 header (authority and
JA4 TLVs) in front of both, and malformed ClientHellos closed and counted."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edged.clienthello import NeedMore, parse_client_hello
from edged.config import parse_config
from edged.errors import ConfigError
from edged.ja4 import ja4
from edged.proxy_header import V2_SIGNATURE
from edged.renewer import managed_sites
from edged.sources import load_site_certs
from tests.conftest import BackendConn, peer_cn, recv_exact, run_backend, run_edged, s_client
from tests.pki import make_ca, make_leaf, write_pair
from tests.tls_client import MemoryTlsClient

PT_NAME = "pt.example.test"
JA4_TLV = 0xE4
PT_JA4_TLV = 0xE5


@pytest.fixture(scope="module")
def origin_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The passthrough backend's own CA and certificate (edged never sees its key)."""
    d = tmp_path_factory.mktemp("origin")
    ca = make_ca("Origin Root CA")
    leaf = make_leaf(ca, [PT_NAME, "*.ptw.example.test"], cn="pt-backend")
    (d / "ca.pem").write_bytes(ca.cert_pem)
    cert, key = write_pair(d, "origin", leaf)
    return {"ca": d / "ca.pem", "cert": cert, "key": key}


# --- a TLS origin behind edged: PROXY header in clear, then TLS with its own certificate ----


@dataclass
class OriginConn:
    header: bytes = b""
    hello: bytes = b""  # the ClientHello as it arrived (peeked before the TLS handshake)
    received: bytes = b""
    done: threading.Event = field(default_factory=threading.Event)


class TlsOrigin:
    """Blocking TLS server in threads: reads the PROXY header, peeks the ClientHello, then
    answers "pong:<line>" to the first line and "bye" after the client's close_notify."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.port = self.server.getsockname()[1]
        self.conns: list[OriginConn] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn = OriginConn()
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(sock, conn), daemon=True).start()

    def _serve(self, sock: socket.socket, conn: OriginConn) -> None:
        sock.settimeout(10)
        try:
            with sock:
                head = recv_exact(sock, 16)
                if head.startswith(V2_SIGNATURE):
                    head += recv_exact(sock, struct.unpack("!H", head[14:16])[0])
                conn.header = head
                while True:
                    peeked = sock.recv(65536, socket.MSG_PEEK)
                    try:
                        hello = parse_client_hello(peeked)
                    except NeedMore:
                        time.sleep(0.005)
                        continue
                    conn.hello = peeked[: hello.size]
                    break
                with self.ctx.wrap_socket(sock, server_side=True) as tls:
                    line = b""
                    while not line.endswith(b"\n"):
                        chunk = tls.recv(4096)
                        if not chunk:
                            break
                        line += chunk
                    conn.received = line
                    tls.sendall(b"pong:" + line)
                    while chunk := tls.recv(4096):  # until the client's close_notify
                        conn.received += chunk
                    tls.sendall(b"bye")
                    with contextlib.suppress(OSError, ssl.SSLError):
                        tls.unwrap()
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.done.set()

    def close(self) -> None:
        self._stop.set()
        self.server.close()
        self._thread.join(5)


@contextlib.contextmanager
def run_origin(pki: dict[str, Path]) -> Iterator[TlsOrigin]:
    origin = TlsOrigin(pki["cert"], pki["key"])
    try:
        yield origin
    finally:
        origin.close()


# --- a blocking TLS client that keeps its ClientHello ---------------------------------------


class Client(MemoryTlsClient):
    """The shared memory-BIO client with the test's argument order; read() reads until a
    marker (or the end)."""

    def __init__(self, port: int, sni: str, cafile: Path, *, byte_by_byte: bool = False) -> None:
        super().__init__(port, cafile, sni, byte_by_byte=byte_by_byte)

    def read(self, until: bytes = b"") -> bytes:
        return self.read_until(until)


def parse_v2(header: bytes) -> tuple[int, tuple[str, int], tuple[str, int], dict[int, bytes]]:
    """(family, source, destination, TLVs) of the IPv4 PROXY v2 header `header` starts with."""
    assert header.startswith(V2_SIGNATURE)
    ver_cmd, family, length = struct.unpack("!BBH", header[12:16])
    assert ver_cmd == 0x21 and family == 0x11 and len(header) >= 16 + length
    body = header[16 : 16 + length]
    src = (socket.inet_ntoa(body[0:4]), struct.unpack("!H", body[8:10])[0])
    dst = (socket.inet_ntoa(body[4:8]), struct.unpack("!H", body[10:12])[0])
    tlvs: dict[int, bytes] = {}
    pos = 12
    while pos < len(body):
        kind, n = struct.unpack("!BH", body[pos : pos + 3])
        tlvs[kind] = body[pos + 3 : pos + 3 + n]
        pos += 3 + n
    return family, src, dst, tlvs


def sites(pki: dict[str, Path], terminated_backend: str, origin: str) -> str:
    return f"""
[[site]]
names = ["one.example.test"]
backend = "{terminated_backend}"
cert_file = "{pki["one_cert"]}"
key_file = "{pki["one_key"]}"
proxy_protocol = "v2"
ja4_tlv = {JA4_TLV:#x}

[[site]]
names = ["{PT_NAME}", "*.ptw.example.test"]
mode = "passthrough"
backend = "{origin}"
proxy_protocol = "v2"
ja4_tlv = {PT_JA4_TLV:#x}
"""


async def wait_for(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 10)


async def test_passthrough_and_termination_share_one_port(
    tmp_path: Path, pki: dict[str, Path], origin_pki: dict[str, Path]
) -> None:
    with run_origin(origin_pki) as origin:
        async with (
            run_backend() as backend,
            run_edged(tmp_path, sites(pki, backend.address, origin.address)) as edged,
        ):
            # The passthrough name: the handshake completes with the ORIGIN's certificate,
            # verified against the origin's CA (edged has neither its cert nor its key).
            out = await s_client(edged.port, PT_NAME)
            assert peer_cn(out.stderr) == "pt-backend", out.stderr
            client = await asyncio.to_thread(Client, edged.port, PT_NAME, origin_pki["ca"])
            try:
                assert client.peer_cn() == "pt-backend"
                await asyncio.to_thread(client.send, b"ping\n")
                assert await asyncio.to_thread(client.read, b"pong:ping\n") == b"pong:ping\n"
                # Half-close: the client's close_notify + FIN reach the origin, whose last
                # words still come back.
                await asyncio.to_thread(client.close_write)
                assert await asyncio.to_thread(client.read) == b"bye"
            finally:
                client.close()
            conn = origin.conns[-1]
            await wait_for(conn.done)
            assert conn.received == b"ping\n"
            assert conn.hello == client.hello  # the raw bytes, untouched
            _, src, dst, tlvs = parse_v2(conn.header)
            assert src == client.local and dst == ("127.0.0.1", edged.port)
            assert tlvs[0x02] == PT_NAME.encode()  # the authority: the SNI
            assert 0x20 not in tlvs and 0x01 not in tlvs  # edged did not terminate TLS
            assert tlvs[PT_JA4_TLV] == ja4(parse_client_hello(client.hello)).encode()

            # A wildcard passthrough name, its ClientHello one byte per TCP segment.
            client = await asyncio.to_thread(
                Client, edged.port, "x.ptw.example.test", origin_pki["ca"], byte_by_byte=True
            )
            try:
                await asyncio.to_thread(client.send, b"wild\n")
                assert await asyncio.to_thread(client.read, b"\n") == b"pong:wild\n"
            finally:
                client.close()
            await wait_for(origin.conns[-1].done)
            assert origin.conns[-1].hello == client.hello
            assert parse_v2(origin.conns[-1].header)[3][0x02] == b"x.ptw.example.test"

            # The terminated name on the same port: edged's certificate, plaintext to its
            # backend with the JA4 of the very ClientHello the client sent.
            client = await asyncio.to_thread(Client, edged.port, "one.example.test", pki["ca"])
            try:
                assert client.peer_cn() == "one.example.test"
                await asyncio.to_thread(
                    client.send, b"GET / HTTP/1.1\r\nHost: one.example.test\r\n\r\n"
                )
                assert b"backend=b1" in await asyncio.to_thread(client.read, b"host=")
            finally:
                client.close()
            _, src, _, tlvs = parse_v2(bytes(backend.conns[-1].raw))
            assert src == client.local
            assert tlvs[0x02] == b"one.example.test" and 0x20 in tlvs
            assert tlvs[JA4_TLV] == ja4(parse_client_hello(client.hello)).encode()
            assert tlvs[JA4_TLV].startswith(b"t13d")

            counters = edged.daemon.counters
            assert counters.handshakes["passthrough", "none"] == 3
            assert counters.handshakes["ok", "TLSv1.3"] == 1
            assert counters.bytes_in > 0 and counters.bytes_out > 0
            term = edged.daemon.term
            assert term is not None
            for _ in range(100):  # the last close is on its way
                if not term.active:
                    break
                await asyncio.sleep(0.02)
            assert not term.active


async def test_passthrough_backend_down_and_client_gone(
    tmp_path: Path, pki: dict[str, Path], origin_pki: dict[str, Path]
) -> None:
    """A refused origin closes the client and counts a backend error."""
    async with (
        run_backend() as backend,
        run_edged(tmp_path, sites(pki, backend.address, "127.0.0.1:1")) as edged,
    ):
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await asyncio.to_thread(Client, edged.port, PT_NAME, origin_pki["ca"])
        assert edged.daemon.counters.backend_errors["refused"] == 1
        assert edged.daemon.counters.handshakes["passthrough", "none"] == 1


def _sni_hello(name: bytes, copies: int = 1) -> bytes:
    entry = b"\x00" + struct.pack("!H", len(name)) + name
    ext = (struct.pack("!HH", 0, len(entry) + 2) + struct.pack("!H", len(entry)) + entry) * copies
    body = b"\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"
    body += struct.pack("!H", len(ext)) + ext
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(msg)) + msg


async def test_malformed_client_hello_is_closed_and_counted(
    tmp_path: Path, pki: dict[str, Path], origin_pki: dict[str, Path]
) -> None:
    async def noop(r: asyncio.StreamReader, w: asyncio.StreamWriter, c: BackendConn) -> None:
        await r.read()

    with run_origin(origin_pki) as origin:
        async with (
            run_backend(noop) as backend,
            run_edged(tmp_path, sites(pki, backend.address, origin.address)) as edged,
        ):
            bad = [
                b"\x16\x03\x01\x00\x30\x02" + bytes(0x2F),  # a ServerHello
                _sni_hello(PT_NAME.encode() + b"\x00"),  # a NUL in the server name
                _sni_hello(b"\xc3\xa9." + PT_NAME.encode()),  # not ASCII
                _sni_hello(PT_NAME.encode(), copies=2),  # the same extension twice
            ]
            for data in bad:
                reader, writer = await asyncio.open_connection("127.0.0.1", edged.port)
                writer.write(data)
                assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no answer
                writer.close()
            counters = edged.daemon.counters
            assert counters.handshakes["protocol_error", "none"] == len(bad)
            assert not origin.conns and not backend.conns
            assert not edged.daemon.term.active  # type: ignore[union-attr]
            assert counters.handshakes["passthrough", "none"] == 0


def test_passthrough_config(tmp_path: Path) -> None:
    base = """
[listen]
https = ["127.0.0.1:8443"]
[[site]]
names = ["pt.example.test"]
backend = "127.0.0.1:9443"
mode = "passthrough"
"""
    config = parse_config(base, tmp_path / "edged.toml")
    site = config.sites[0]
    assert site.passthrough and site.ja4_tlv == 0
    # No "no certificate" warning, nothing for ACME to order.
    assert load_site_certs(config, None, datetime.now(UTC)).problems == ()
    acme = parse_config(base + '[acme]\nemail = "ops@example.test"\n', tmp_path / "edged.toml")
    assert managed_sites(acme, object()) == []  # type: ignore[arg-type]

    def problems(extra: str, head: str = "") -> str:
        with pytest.raises(ConfigError) as err:
            parse_config(head + base + extra, tmp_path / "edged.toml")
        return str(err.value)

    assert "does not terminate TLS" in problems('cert_file = "a.pem"\nkey_file = "a.key"\n')
    assert "site[0].origin_tls" in problems("origin_tls = true\n")
    assert "site[0].alpn" in problems('alpn = ["h2"]\n')
    assert "site[0].http" in problems('http = "forward"\n')
    assert "site[0].backend_connect" in problems('backend_connect = "handshake"\n')
    with pytest.raises(ConfigError, match="'sideways' is not one of"):
        parse_config(base.replace('"passthrough"', '"sideways"'), tmp_path / "edged.toml")
    assert "set proxy_protocol = 'v2'" in problems("ja4_tlv = 0xE4\n")
    assert "from 0xE0 to 0xEF" in problems('proxy_protocol = "v2"\nja4_tlv = 0x20\n')
    assert "passthrough site" in problems("", '[tls]\ndefault_cert = "pt.example.test"\n')


async def test_connection_log_has_mode_and_ja4(
    tmp_path: Path,
    pki: dict[str, Path],
    origin_pki: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edged.conn")
    with run_origin(origin_pki) as origin:
        async with (
            run_backend() as backend,
            run_edged(tmp_path, sites(pki, backend.address, origin.address)) as edged,
        ):
            text = edged.config_path.read_text()
            edged.config_path.write_text(
                text.replace("drain_timeout = 2", "drain_timeout = 2\nconnection_log = true")
            )
            assert await edged.daemon.reload("test")
            client = await asyncio.to_thread(Client, edged.port, PT_NAME, origin_pki["ca"])
            try:
                await asyncio.to_thread(client.send, b"log\n")
                await asyncio.to_thread(client.read, b"\n")
            finally:
                client.close()
            for _ in range(100):
                if any(r.name == "edged.conn" for r in caplog.records):
                    break
                await asyncio.sleep(0.02)
            (rec,) = [r for r in caplog.records if r.name == "edged.conn"]
            fingerprint = ja4(parse_client_hello(client.hello))
            assert rec.__dict__["mode"] == "passthrough" and rec.__dict__["ja4"] == fingerprint
            assert rec.__dict__["sni"] == PT_NAME and rec.__dict__["tls_version"] == "-"
            assert rec.getMessage().endswith(f" mode=passthrough ja4={fingerprint}")
