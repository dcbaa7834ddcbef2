"""TLS termination with real clients (openssl s_client, curl) and real backends on loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import (
    curl,
    edged_backlog,
    free_port,
    listen_backlogs,
    peer_cn,
    run_backend,
    run_cmd,
    run_edged,
    s_client,
)
from tests.many_certs import store_dual
from tests.pki import make_ca, make_leaf, write_pair
from tests.tls_client import MemoryTlsClient


def origin_server_context(tmp_path: Path) -> ssl.SSLContext:
    """A TLS origin for one.example.test under its own private CA (written to origin-ca.pem)."""
    origin_ca = make_ca("Origin CA")
    cert, key = write_pair(tmp_path, "origin", make_leaf(origin_ca, ["one.example.test"]), [])
    (tmp_path / "origin-ca.pem").write_bytes(origin_ca.cert_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def site(names: list[str], backend: str, pki: dict[str, Path], stem: str, extra: str = "") -> str:
    quoted = ", ".join(f'"{n}"' for n in names)
    return f"""
[[site]]
names = [{quoted}]
backend = "{backend}"
cert_file = "{pki[stem + "_cert"]}"
key_file = "{pki[stem + "_key"]}"
{extra}
"""


async def test_sni_selects_each_names_certificate(tmp_path: Path, pki: dict[str, Path]) -> None:
    async with run_backend() as backend:
        body = (
            site(["one.example.test"], backend.address, pki, "one")
            + site(["two.example.test"], backend.address, pki, "two")
            + site(["wild.example.test", "*.wild.example.test"], backend.address, pki, "wild")
        )
        async with run_edged(tmp_path, body) as edged:
            for sni, cn in [
                ("one.example.test", "one.example.test"),
                ("two.example.test", "two.example.test"),
                ("x.wild.example.test", "*.wild.example.test"),
                ("wild.example.test", "*.wild.example.test"),
            ]:
                out = await s_client(edged.port, sni)
                assert out.returncode == 0, out.stderr
                assert peer_cn(out.stderr) == cn, out.stderr
            # A wildcard covers one label only: x.y.wild... gets no certificate.
            out = await s_client(edged.port, "x.y.wild.example.test")
            assert out.returncode != 0
            assert "unrecognized name" in out.stderr
            assert edged.daemon.counters.handshakes["no_cert", "none"] == 1


async def test_unknown_and_missing_sni_refused_without_default(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    async with run_backend() as backend:
        body = site(["one.example.test"], backend.address, pki, "one")
        async with run_edged(tmp_path, body) as edged:
            out = await s_client(edged.port, "unknown.example.test")
            assert out.returncode != 0 and "unrecognized name" in out.stderr, out.stderr
            out = await s_client(edged.port, None)
            assert out.returncode != 0 and "unrecognized name" in out.stderr, out.stderr
            assert edged.daemon.counters.handshakes["no_cert", "none"] == 2


async def test_default_cert_answers_unknown_and_missing_sni(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    async with run_backend() as backend:
        body = (
            '[tls]\ndefault_cert = "fallback.example.test"\n'
            + site(["one.example.test"], backend.address, pki, "one")
            + site(["fallback.example.test"], backend.address, pki, "fallback")
        )
        async with run_edged(tmp_path, body) as edged:
            for sni in ("unknown.example.test", None):
                out = await s_client(edged.port, sni)
                assert out.returncode == 0, out.stderr
                assert peer_cn(out.stderr) == "fallback.example.test"


async def test_curl_through_edged_to_backend_per_name(tmp_path: Path, pki: dict[str, Path]) -> None:
    async with run_backend(name="b1") as b1, run_backend(name="b2") as b2:
        body = site(["one.example.test"], b1.address, pki, "one") + site(
            ["two.example.test"], b2.address, pki, "two"
        )
        async with run_edged(tmp_path, body) as edged:
            for host, expect in (("one.example.test", "b1"), ("two.example.test", "b2")):
                out = await curl(edged.port, host, pki["ca"])
                assert out.returncode == 0, out.stderr
                assert out.stdout == f"backend={expect} host={host}:{edged.port}\n"
            assert edged.daemon.counters.handshakes["ok", "TLSv1.3"] == 2


def parse_proxy_v2(data: bytes) -> tuple[dict[str, object], bytes]:
    assert data[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
    ver_cmd, fam, length = struct.unpack("!BBH", data[12:16])
    assert ver_cmd == 0x21 and fam == 0x11
    body, rest = data[16 : 16 + length], data[16 + length :]
    src, dst = body[0:4], body[4:8]
    sport, dport = struct.unpack("!HH", body[8:12])
    fields: dict[str, object] = {
        "src": ".".join(map(str, src)),
        "dst": ".".join(map(str, dst)),
        "sport": sport,
        "dport": dport,
    }
    tlvs = body[12:]
    while tlvs:
        kind, size = tlvs[0], struct.unpack("!H", tlvs[1:3])[0]
        value, tlvs = tlvs[3 : 3 + size], tlvs[3 + size :]
        if kind == 0x20:
            client, _verify = struct.unpack("!BI", value[:5])
            fields["ssl_client"] = client
            sub = value[5:]
            while sub:
                skind, ssize = sub[0], struct.unpack("!H", sub[1:3])[0]
                fields[f"ssl_{skind:#x}"] = sub[3 : 3 + ssize].decode()
                sub = sub[3 + ssize :]
        else:
            fields[f"tlv_{kind:#x}"] = value.decode()
    return fields, rest


async def test_proxy_protocol_v1_and_v2_byte_for_byte(tmp_path: Path, pki: dict[str, Path]) -> None:
    async with run_backend() as b1, run_backend() as b2:
        body = site(["one.example.test"], b1.address, pki, "one", 'proxy_protocol = "v1"')
        body += site(["two.example.test"], b2.address, pki, "two", 'proxy_protocol = "v2"')
        async with run_edged(tmp_path, body) as edged:
            for host in ("one.example.test", "two.example.test"):
                out = await curl(edged.port, host, pki["ca"], "--local-port", "41000-42000")
                assert out.returncode == 0, out.stderr
            await asyncio.sleep(0.05)
    # v1: exact line, then the request.
    raw1 = bytes(b1.conns[0].raw)
    line, _, _ = raw1.partition(b"\r\n")
    parts = line.split(b" ")
    assert parts[:4] == [b"PROXY", b"TCP4", b"127.0.0.1", b"127.0.0.1"]
    assert 41000 <= int(parts[4]) <= 42000 and int(parts[5]) == edged.port
    assert len(parts) == 6
    # v2: binary header with ALPN, authority = SNI, TLS version and cipher.
    fields, rest = parse_proxy_v2(bytes(b2.conns[0].raw))
    assert fields["src"] == "127.0.0.1" and fields["dst"] == "127.0.0.1"
    assert 41000 <= int(str(fields["sport"])) <= 42000 and fields["dport"] == edged.port
    assert fields["tlv_0x1"] == "http/1.1"
    assert fields["tlv_0x2"] == "two.example.test"
    assert fields["ssl_client"] == 1
    assert fields["ssl_0x21"] == "TLSv1.3"
    assert str(fields["ssl_0x23"]).startswith("TLS_")
    assert rest.startswith(b"GET / HTTP/1.1\r\n")  # the request follows the header


async def test_origin_tls_verifies_and_sends_sni(tmp_path: Path, pki: dict[str, Path]) -> None:
    server_ctx = origin_server_context(tmp_path)
    seen_sni: list[str | None] = []
    server_ctx.sni_callback = lambda sslobj, name, ctx: seen_sni.append(name)  # type: ignore[assignment,misc,func-returns-value]
    async with run_backend(ssl_ctx=server_ctx, name="origin") as origin:
        extra = f'origin_tls = true\norigin_ca_file = "{tmp_path / "origin-ca.pem"}"'
        body = site(["one.example.test"], origin.address, pki, "one", extra)
        # The second site trusts the system CAs only: the origin's private CA must be refused.
        body += site(["two.example.test"], origin.address, pki, "two", "origin_tls = true")
        async with run_edged(tmp_path, body) as edged:
            out = await curl(edged.port, "one.example.test", pki["ca"])
            assert out.returncode == 0, out.stderr
            assert out.stdout.startswith("backend=origin host=one.example.test")
            assert seen_sni == ["one.example.test"]
            out = await curl(edged.port, "two.example.test", pki["ca"])
            assert out.returncode != 0
            assert edged.daemon.counters.backend_errors["origin_tls"] == 1


async def test_rsa_only_client_against_ecdsa_only_name_is_counted(
    tmp_path: Path, pki: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    async with run_backend() as backend:
        body = site(["one.example.test"], backend.address, pki, "one")
        body += site(["rsa.example.test"], backend.address, pki, "rsa")
        async with run_edged(tmp_path, body) as edged:
            rsa_only = ("-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256")
            out = await s_client(edged.port, "one.example.test", *rsa_only)
            assert out.returncode != 0
            assert edged.daemon.counters.handshakes["no_shared_cipher", "none"] == 1
            assert (
                "TLS handshake failed: no_shared_cipher for SNI 'one.example.test'" in caplog.text
            )
            out = await s_client(edged.port, "rsa.example.test", *rsa_only)
            assert out.returncode == 0, out.stderr
            assert edged.daemon.counters.handshakes["ok", "TLSv1.2"] == 1


async def test_old_protocol_versions_refused(tmp_path: Path, pki: dict[str, Path]) -> None:
    async with run_backend() as backend:
        body = '[tls]\nmin_version = "1.3"\n' + site(
            ["one.example.test"], backend.address, pki, "one"
        )
        async with run_edged(tmp_path, body) as edged:
            out = await s_client(edged.port, "one.example.test", "-tls1_2")
            assert out.returncode != 0
            assert edged.daemon.counters.handshakes["unsupported_version", "none"] == 1
            out = await s_client(edged.port, "one.example.test", "-tls1_3")
            assert out.returncode == 0


async def test_handshake_timeout_and_garbage(tmp_path: Path, pki: dict[str, Path]) -> None:
    async with run_backend() as backend:
        body = "[tls]\nhandshake_timeout = 0.3\n" + site(
            ["one.example.test"], backend.address, pki, "one"
        )
        async with run_edged(tmp_path, body) as edged:
            reader, writer = await asyncio.open_connection("127.0.0.1", edged.port)
            assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by edged
            writer.close()
            assert edged.daemon.counters.handshakes["timeout", "none"] == 1
            reader, writer = await asyncio.open_connection("127.0.0.1", edged.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(reader.read(), 3)
            writer.close()
            assert edged.daemon.counters.handshakes["http_on_https", "none"] == 1
            reader, writer = await asyncio.open_connection("127.0.0.1", edged.port)
            writer.write(b"\x16\x03\x01\x00\x05garbage-after-a-record-header")
            await asyncio.wait_for(reader.read(), 3)
            writer.close()
            assert edged.daemon.counters.handshakes["protocol_error", "none"] == 1
            assert not edged.daemon.term.active  # type: ignore[union-attr]


async def test_listeners_keep_their_large_accept_queue(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """asyncio/uvloop's create_server(sock=...) listens again with a backlog of 100 unless told
    otherwise: a burst of new connections beyond it loses SYNs (1 s retransmissions)."""
    expected = await edged_backlog()
    http = free_port()
    async with run_backend() as backend:
        body = site(["one.example.test"], backend.address, pki, "one")
        async with run_edged(tmp_path, body, http=(http,)) as edged:
            assert await listen_backlogs(edged.port) == [expected]
            assert await listen_backlogs(http) == [expected]


async def test_ipv6_listener(tmp_path: Path, pki: dict[str, Path]) -> None:
    port = free_port("::1")
    async with run_backend() as backend:
        body = site(["one.example.test"], backend.address, pki, "one")
        async with run_edged(tmp_path, body, port=port) as edged:
            # run_edged binds 127.0.0.1; add [::1] through a reload of the listen list
            text = edged.config_path.read_text().replace(
                f'https = ["127.0.0.1:{port}"]', f'https = ["127.0.0.1:{port}", "[::1]:{port}"]'
            )
            edged.config_path.write_text(text)
            assert await edged.daemon.reload("test")
            out = await run_cmd(
                "curl", "-sS", "--http1.1", "--cacert", str(pki["ca"]),
                "--resolve", f"one.example.test:{port}:::1", f"https://one.example.test:{port}/",
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            assert out.stdout.startswith("backend=b1")


async def test_store_cert_ecdsa_and_rsa_served_by_key_type(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    store_dual(tmp_path / "store", make_ca("Dual CA"), "dual.example.test")
    async with run_backend() as backend:
        body = f'[[site]]\nnames = ["dual.example.test"]\nbackend = "{backend.address}"\n'
        async with run_edged(tmp_path, body) as edged:
            rsa_only = ("-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256")
            out = await s_client(edged.port, "dual.example.test", *rsa_only)
            assert out.returncode == 0, out.stderr
            assert "Signature type: RSA" in out.stderr or "RSA-PSS" in out.stderr, out.stderr
            out = await s_client(edged.port, "dual.example.test")
            assert out.returncode == 0, out.stderr
            assert "Signature type: ECDSA" in out.stderr, out.stderr
            # One context per key type, chosen from the ClientHello (tests/test_sni.py).
            assert len(edged.daemon.selector.cache) == 2  # type: ignore[union-attr]


async def test_unix_socket_backend(tmp_path: Path, pki: dict[str, Path]) -> None:
    path = tmp_path / "backend.sock"

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nunix\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(on_conn, str(path))
    try:
        body = site(["one.example.test"], f"unix:{path}", pki, "one", 'proxy_protocol = "v2"')
        async with run_edged(tmp_path, body) as edged:
            out = await curl(edged.port, "one.example.test", pki["ca"])
            assert out.returncode == 0, out.stderr
            assert out.stdout == "unix\n"
    finally:
        server.close()


async def test_sighup_reload_keeps_old_cert_when_new_file_is_bad(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    cert = tmp_path / "one.crt"
    key = tmp_path / "one.key"
    cert.write_bytes(pki["one_cert"].read_bytes())
    key.write_bytes(pki["one_key"].read_bytes())
    async with run_backend() as backend:
        body = (
            f'[[site]]\nnames = ["one.example.test"]\nbackend = "{backend.address}"\n'
            f'cert_file = "{cert}"\nkey_file = "{key}"\n'
        )
        async with run_edged(tmp_path, body) as edged:
            before = await s_client(edged.port, "one.example.test")
            assert before.returncode == 0
            key.write_bytes(pki["two_key"].read_bytes())  # wrong key for the cert
            assert not await edged.daemon.reload("signal")
            assert edged.daemon.counters.reloads["signal", "error"] == 1
            after = await s_client(edged.port, "one.example.test")
            assert after.returncode == 0 and peer_cn(after.stderr) == "one.example.test"
            # A bad config is rejected as a whole; the running one keeps serving.
            edged.config_path.write_text(edged.config_path.read_text() + "\n[bogus]\n")
            assert not await edged.daemon.reload("signal")
            assert (await s_client(edged.port, "one.example.test")).returncode == 0


async def test_origin_tls_connection_ends_when_the_client_leaves(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    server_ctx = origin_server_context(tmp_path)
    async with run_backend(ssl_ctx=server_ctx, name="origin") as origin:
        extra = f'origin_tls = true\norigin_ca_file = "{tmp_path / "origin-ca.pem"}"'
        body = site(["one.example.test"], origin.address, pki, "one", extra)
        async with run_edged(tmp_path, body) as edged:
            for _ in range(3):
                out = await curl(edged.port, "one.example.test", pki["ca"])
                assert out.returncode == 0, out.stderr
            term = edged.daemon.term
            assert term is not None
            for _ in range(50):  # TLS to the origin cannot half-close: edged closes at once
                if not term.active:
                    break
                await asyncio.sleep(0.02)
            assert not term.active


async def test_reload_error_of_any_kind_keeps_serving(tmp_path: Path, pki: dict[str, Path]) -> None:
    async with run_backend() as backend:
        body = site(["one.example.test"], backend.address, pki, "one")
        async with run_edged(tmp_path, body) as edged:
            (tmp_path / "not-a-dir").write_text("")
            text = edged.config_path.read_text().replace('store = "store"', 'store = "not-a-dir"')
            edged.config_path.write_text(text)
            assert not await edged.daemon.reload("signal")
            assert not edged.task.done()
            assert (await s_client(edged.port, "one.example.test")).returncode == 0


async def test_an_origin_cut_without_close_notify_resets_the_client(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """An origin_tls origin ends its TLS with a bare FIN (crashed mid-response, or a FIN
    injected on the path): the client must see the cut (a reset, no close_notify), counted
    as backend_errors{truncated}; an origin that ends with close_notify still ends cleanly."""
    server_ctx = origin_server_context(tmp_path)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def origin() -> None:
        for clean in (False, True):
            try:
                raw, _ = listener.accept()
            except OSError:  # the test ended early (failed) and closed the listener
                return
            with server_ctx.wrap_socket(raw, server_side=True) as tls:
                tls.recv(100)
                tls.sendall(b"HTTP/1.0 200 OK\r\n\r\nfirst half of the body")
                if clean:
                    tls.unwrap()  # close_notify, then the FIN
                else:
                    time.sleep(0.2)
                    socket.socket.shutdown(tls, socket.SHUT_WR)  # a FIN, no close_notify
                time.sleep(1)

    serving = threading.Thread(target=origin, daemon=True)
    serving.start()
    extra = f'origin_tls = true\norigin_ca_file = "{tmp_path / "origin-ca.pem"}"'
    body = site(["one.example.test"], f"127.0.0.1:{port}", pki, "one", extra)

    def fetch() -> tuple[bytes, bool]:
        client = MemoryTlsClient(port_of_edged, pki["ca"], "one.example.test")
        try:
            client.send(b"GET / HTTP/1.0\r\n\r\n")
            return client.read_all()
        finally:
            client.close()

    try:
        async with run_edged(tmp_path, body) as edged:
            port_of_edged = edged.port
            data, clean = await asyncio.to_thread(fetch)
            assert data.endswith(b"first half of the body") and not clean
            assert edged.daemon.counters.backend_errors["truncated"] == 1
            data, clean = await asyncio.to_thread(fetch)
            assert data.endswith(b"first half of the body") and clean
            assert edged.daemon.counters.backend_errors["truncated"] == 1
    finally:
        listener.close()
        serving.join(5)
