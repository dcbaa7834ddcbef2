"""The admin API over real sockets: the aiohttp server, the sync client and the CLI commands.

`FakeOperations` stands in for the daemon (the boundary the daemon implements): a dict of
certificates, uploads validated with the real parse_bundle/check_bundle, so a bad upload is
refused with a real CertError. The server runs on its own uvloop in a thread, so the sync client
and `edged` subprocesses can talk to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web

from edged.admin import (
    MAX_BODY,
    AdminError,
    AdminStartupError,
    build_admin_app,
    read_token_file,
    start_admin_server,
)
from edged.admin_client import AdminClient, AdminRequestError, AdminUnreachable
from edged.certs import check_bundle, parse_bundle
from edged.config import Address
from edged.errors import CertError, CertReason
from tests.conftest import free_port, run_cmd, run_edged
from tests.pki import Issued, fullchain, make_ca, make_intermediate, make_leaf

EDGED = str(Path(sys.executable).with_name("edged"))
NOW = datetime.now(UTC)


class FakeOperations:
    """A realistic stand-in for the daemon's side of the boundary."""

    def __init__(self) -> None:
        day = timedelta(days=1)
        self.calls: list[tuple[object, ...]] = []
        self.certs_by_name: dict[str, dict[str, Any]] = {
            "a.test": {
                "name": "a.test",
                "names": ["a.test", "www.a.test"],
                "state": "active",
                "source": "acme",
                "not_after": NOW + 40 * day + timedelta(hours=1),
                "key_types": ["ecdsa-p256", "rsa-2048"],
                "issuer": "CN=Test Intermediate,O=Pebble",
                "attempts": 0,
                "next_try": None,
                "last_error": None,
            },
            "*.w.test": {
                "name": "*.w.test",
                "names": ["*.w.test"],
                "state": "failed",
                "source": "acme",
                "not_after": NOW + 3 * day + timedelta(hours=1),
                "key_types": ["ecdsa-p256"],
                "issuer": "CN=Test Intermediate",
                "attempts": 3,
                "next_try": NOW + timedelta(minutes=15),
                "last_error": "urn:ietf:params:acme:error:dns: DNS problem: NXDOMAIN looking up "
                "TXT for _acme-challenge.w.test - check that a DNS record exists for this domain",
            },
            "files.test": {
                "name": "files.test",
                "names": ["files.test"],
                "state": "active",
                "source": "files",
                "not_after": NOW + 300 * day,
                "key_types": ["ecdsa-p256"],
                "issuer": "CN=Corp CA",
                "attempts": 0,
                "next_try": None,
                "last_error": None,
            },
        }

    def _get(self, name: str) -> dict[str, Any]:
        if name == "boom.test":
            raise RuntimeError("-----BEGIN PRIVATE KEY----- secret internals")
        try:
            return self.certs_by_name[name]
        except KeyError:
            raise AdminError("unknown_name", f"{name}: no [[site]] has this name", 404) from None

    async def status(self) -> dict[str, object]:
        counts: dict[str, int] = {}
        for c in self.certs_by_name.values():
            counts[c["state"]] = counts.get(c["state"], 0) + 1
        return {
            "node": "edge-1",
            "version": "0.1.0",
            "uptime_seconds": 3 * 3600 + 120.5,
            "listeners": ["127.0.0.1:8443"],
            "certs": counts,
            "connections_active": 7,
        }

    async def certs(self) -> list[dict[str, object]]:
        return list(self.certs_by_name.values())

    def cert(self, name: str) -> dict[str, object]:
        return {**self._get(name), "fingerprint": "ab" * 32}

    async def renew(self, name: str) -> dict[str, object]:
        cert = self._get(name)
        if cert["source"] != "acme":
            raise AdminError("not_acme", f"{name}: its certificate is not from ACME", 409)
        self.calls.append(("renew", name))
        cert["state"] = "processing"
        return {"name": name, "message": "renewal started"}

    async def upload(self, name: str, cert_pem: bytes, key_pem: bytes) -> dict[str, object]:
        cert = self._get(name)
        if cert["source"] == "files":
            raise AdminError(
                "managed_by_files", f"{name}: served from cert_file: replace that file", 409
            )
        bundle = parse_bundle(cert_pem, key_pem, source="upload")  # CertError -> 422
        problems = check_bundle(bundle, now=datetime.now(UTC), names=cert["names"])
        if problems:
            raise AdminError.from_cert_error(problems[0])
        await asyncio.sleep(0)
        self.calls.append(("upload", name, bundle.fingerprint))
        cert.update(source="upload", not_after=bundle.not_after, issuer=bundle.issuer)
        return {"name": name, "message": f"now serving the uploaded {bundle.key_type} cert"}

    async def unmanage_upload(self, name: str) -> dict[str, object]:
        cert = self._get(name)
        if cert["source"] != "upload":
            raise AdminError("not_uploaded", f"{name}: has no uploaded certificate", 409)
        self.calls.append(("unmanage", name))
        cert["source"] = "acme"
        return {"name": name, "message": "ACME manages this name again"}

    async def revoke(self, name: str, reason: str, replace: bool) -> dict[str, object]:
        self._get(name)
        self.calls.append(("revoke", name, reason, replace))
        return {"name": name, "message": f"revoked ({reason})", "replaced": replace}

    async def reload(self) -> dict[str, object]:
        self.calls.append(("reload",))
        return {"message": "reloaded: 3 sites, 3 certificates", "ok": True}


@pytest.fixture(scope="module")
def certs() -> dict[str, tuple[bytes, bytes]]:
    ca = make_ca()
    inter = make_intermediate(ca, "Test Intermediate")
    day = timedelta(days=1)

    def pair(leaf: Issued) -> tuple[bytes, bytes]:
        return fullchain(leaf, inter), leaf.key_pem

    good = make_leaf(inter, ["a.test", "www.a.test"])
    other = make_leaf(inter, ["a.test", "www.a.test"])
    expired = make_leaf(inter, ["a.test"], not_before=NOW - 30 * day, not_after=NOW - day)
    return {
        "good": pair(good),
        "mismatch": (fullchain(good, inter), other.key_pem),
        "expired": pair(expired),
        "uncovered": pair(make_leaf(inter, ["a.test"])),
    }


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # A short path: unix socket paths are limited to 107 bytes, pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="edged-admin-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def serve(
    address: Address, ops: FakeOperations | None = None, token_file: Path | None = None
) -> Iterator[FakeOperations]:
    """start_admin_server on its own uvloop in a thread; stops it (runner.cleanup) on exit."""
    ops = ops or FakeOperations()
    loop = uvloop.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            box["runner"] = loop.run_until_complete(
                start_admin_server(address, ops, token_file=token_file)
            )
        except BaseException as exc:
            box["error"] = exc
            started.set()
            loop.close()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(box["runner"].cleanup())
        loop.close()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert started.wait(10)
    if "error" in box:
        thread.join(10)
        raise box["error"]
    try:
        yield ops
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        assert not thread.is_alive()


def unix(sockdir: Path) -> Address:
    return Address(path=str(sockdir / "admin.sock"))


def call(client: AdminClient, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:  # fmt: skip
    status, hdrs, data = client.raw(method, path, body, headers)
    assert hdrs.get("Content-Type", "").startswith("application/json"), (status, hdrs, data)
    return status, hdrs, json.loads(data)


# --- routes ------------------------------------------------------------------------------------


def exercise_every_route(
    client: AdminClient, ops: FakeOperations, good: tuple[bytes, bytes]
) -> None:
    status = client.status()
    assert status["node"] == "edge-1" and status["certs"] == {"active": 2, "failed": 1}
    names = [c["name"] for c in client.certs()]
    assert names == ["a.test", "*.w.test", "files.test"]
    detail = client.cert("*.w.test")
    assert detail["attempts"] == 3 and detail["fingerprint"] == "ab" * 32
    assert datetime.fromisoformat(detail["next_try"]) > NOW  # datetimes travel as ISO 8601

    assert client.renew("*.w.test")["message"] == "renewal started"
    assert client.cert("*.w.test")["state"] == "processing"
    answer = client.upload("a.test", *good)
    assert answer["message"] == "now serving the uploaded ecdsa-p256 cert"
    assert client.cert("a.test")["source"] == "upload"
    assert client.remove_upload("a.test")["name"] == "a.test"
    assert client.cert("a.test")["source"] == "acme"
    assert client.revoke("a.test", "keyCompromise", replace=False)["replaced"] is False
    assert client.reload()["ok"] is True
    # An empty revoke body means the defaults.
    assert call(client, "POST", "/certs/a.test/revoke")[0] == 200
    kinds = [c[0] for c in ops.calls]
    assert kinds == ["renew", "upload", "unmanage", "revoke", "reload", "revoke"]
    assert ops.calls[1][:2] == ("upload", "a.test")
    assert ops.calls[3] == ("revoke", "a.test", "keyCompromise", False)
    assert ops.calls[5] == ("revoke", "a.test", "unspecified", True)


def test_every_route_over_a_unix_socket_with_mode_0600(
    sockdir: Path, certs: dict[str, tuple[bytes, bytes]]
) -> None:
    address = unix(sockdir)
    with serve(address) as ops:
        st = os.stat(address.path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        exercise_every_route(AdminClient(address), ops, certs["good"])
    assert not os.path.exists(address.path)  # removed on cleanup


def test_every_route_over_loopback_tcp(certs: dict[str, tuple[bytes, bytes]]) -> None:
    address = Address("127.0.0.1", free_port())
    with serve(address) as ops:
        exercise_every_route(AdminClient(address), ops, certs["good"])


def test_ipv6_loopback() -> None:
    address = Address("::1", free_port("::1"))
    with serve(address):
        assert AdminClient(address).status()["version"] == "0.1.0"


def test_names_are_validated_and_normalised(sockdir: Path) -> None:
    with serve(unix(sockdir)) as ops:
        client = AdminClient(unix(sockdir))
        # Wildcards URL-encoded or not, any case, trailing dot: all reach ops normalised.
        for path in ("/certs/%2A.w.test", "/certs/*.W.Test.", "/certs/%2a.w.test%2E"):
            status, _, body = call(client, "GET", path)
            assert status == 200 and body["name"] == "*.w.test", path
        for raw in ("..%2Fx", "..%2F..%2Fetc%2Fpasswd", "a%00b.test", "x_y.test", "-a.test",
                    "*.test", "a..test", "%2F", "%C3%28"):  # fmt: skip
            for method, suffix in (("GET", ""), ("PUT", ""), ("DELETE", ""),
                                   ("POST", "/renew"), ("POST", "/revoke")):  # fmt: skip
                body_bytes = b'{"cert": "x", "key": "y"}' if method == "PUT" else None
                status, _, body = call(client, method, f"/certs/{raw}{suffix}", body_bytes)
                assert status == 400 and body["error"] == "bad_name", (raw, method, body)
        assert ops.calls == []
        # `..` as whole segments: no route, or a bad name; never an operation.
        for path in ("/certs/../status", "/certs/a.test/../../x", "/certs/../../x/renew"):
            status, _, body = call(client, "GET", path)
            assert (status, body["error"]) == (404, "not_found"), path
        status, _, body = call(client, "GET", "/certs/..")
        assert (status, body["error"]) == (400, "bad_name")
        assert ops.calls == []


def test_bad_requests_get_json_errors(sockdir: Path, certs: dict[str, tuple[bytes, bytes]]) -> None:
    with serve(unix(sockdir)) as ops:
        client = AdminClient(unix(sockdir))
        status, _, body = call(client, "GET", "/certs/nope.test")
        assert (status, body["error"]) == (404, "unknown_name")
        assert body["message"] == "nope.test: no [[site]] has this name"
        status, _, body = call(client, "GET", "/nothing")
        assert (status, body["error"]) == (404, "not_found")
        status, hdrs, body = call(client, "DELETE", "/status")
        assert (status, body["error"]) == (405, "method_not_allowed")
        assert hdrs["Allow"] == "GET" and "use GET" in body["message"]
        status, hdrs, body = call(client, "GET", "/certs/a.test/renew")
        assert status == 405 and hdrs["Allow"] == "POST"
        status, hdrs, body = call(client, "POST", "/certs/a.test")
        assert status == 405 and set(hdrs["Allow"].split(",")) == {"DELETE", "GET", "PUT"}

        cert_pem = certs["good"][0]
        bad_json = [
            (b"{not json", "not valid JSON"),
            (b"\xff\xfe", "not valid JSON"),
            (b"[1, 2]", "must be a JSON object"),
            (b"", "needs a JSON object body"),
            (json.dumps({"cert": cert_pem.decode()}).encode(), "'key' must be the private key"),
            (json.dumps({"cert": 1, "key": "k"}).encode(), "'cert' must be the certificate"),
            (json.dumps({"cert": "c", "key": "k", "pass": "x"}).encode(), "unknown field 'pass'"),
        ]
        for raw, expected in bad_json:
            status, _, body = call(client, "PUT", "/certs/a.test", raw)
            assert (status, body["error"]) == (400, "bad_request"), (raw, body)
            assert expected in body["message"], (raw, body)
        for raw in (b'{"reason": "because"}', b'{"replace": "yes"}', b"[]", b"{"):
            status, _, body = call(client, "POST", "/certs/a.test/revoke", raw)
            assert (status, body["error"]) == (400, "bad_request"), (raw, body)
        status, _, body = call(client, "POST", "/certs/files.test/renew")
        assert (status, body["error"]) == (409, "not_acme")
        status, _, body = call(client, "DELETE", "/certs/a.test")
        assert (status, body["error"]) == (409, "not_uploaded")
        assert ops.calls == []


def test_bad_uploads_are_refused_with_the_cert_reason(
    sockdir: Path, certs: dict[str, tuple[bytes, bytes]]
) -> None:
    with serve(unix(sockdir)) as ops:
        client = AdminClient(unix(sockdir))
        good_cert, good_key = certs["good"]
        cases = {
            "garbage": (b"hello, no PEM here\n", good_key),
            "key_mismatch": certs["mismatch"],
            "expired": certs["expired"],
            "name_not_covered": certs["uncovered"],  # www.a.test is a site name too
            "no_key": (good_cert, good_cert),
        }
        for reason, (cert_pem, key_pem) in cases.items():
            with pytest.raises(AdminRequestError) as info:
                client.upload("a.test", cert_pem, key_pem)
            err = info.value
            assert (err.status, err.code, err.reason) == (422, "invalid_cert", reason), err
            assert err.message
            _, _, data = client.raw(
                "PUT",
                "/certs/a.test",
                json.dumps({"cert": cert_pem.decode(), "key": key_pem.decode()}).encode(),
            )
            # Never echoed: no line of the uploaded base64 comes back.
            for pem in (cert_pem, key_pem):
                for line in pem.splitlines():
                    assert line.startswith(b"-----") or line not in data, line
        with pytest.raises(AdminRequestError) as info:
            client.upload("files.test", good_cert, good_key)
        assert (info.value.status, info.value.code) == (409, "managed_by_files")
        assert ops.calls == []


def test_browser_requests_are_refused_before_the_api(
    sockdir: Path, certs: dict[str, tuple[bytes, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    """Loopback TCP without a token is allowed (warned), so what a browser on the host can
    send must not get through: a body not declared as JSON (a cross-origin page can POST
    text/plain without a preflight) is 415, a Host that is not this machine (DNS rebinding)
    421, an Origin (any web page) 403; none reaches an operation. The CLI's requests pass
    (over TCP, IPv6 and the unix socket: test_every_route_*, test_cli_*)."""
    address = Address("127.0.0.1", free_port())
    revoke = json.dumps({"reason": "keyCompromise", "replace": False}).encode()
    with serve(address) as ops:
        client = AdminClient(address)
        for content_type in ("text/plain", "application/x-www-form-urlencoded",
                             "multipart/form-data; boundary=x"):  # fmt: skip
            status, _, body = call(client, "POST", "/certs/a.test/revoke", revoke,
                                   {"Content-Type": content_type})  # fmt: skip
            assert (status, body["error"]) == (415, "unsupported_media_type"), body
            assert "'Content-Type: application/json'" in body["message"]
        upload = json.dumps({"cert": certs["good"][0].decode(), "key": ""}).encode()
        status, _, body = call(client, "PUT", "/certs/a.test", upload,
                               {"Content-Type": "text/plain"})  # fmt: skip
        assert status == 415
        for host in ("evil.example:" + str(address.port), "evil.example", "127.0.0.1.nip.io",
                     "10.0.0.1:80", "[fe80::1]:80", "localhost:x"):  # fmt: skip
            status, _, body = call(client, "POST", "/reload", None, {"Host": host})
            assert (status, body["error"]) == (421, "bad_host"), (host, body)
            assert "localhost or a loopback address" in body["message"]
        status, _, body = call(client, "POST", "/reload", None, {"Origin": "https://a.example"})
        assert (status, body["error"]) == (403, "cross_origin")
        assert ops.calls == []
        # 11 refusals of 3 kinds, logged once per kind (a page can send them at will).
        lines = [r for r in caplog.records if "refused:" in r.getMessage()]
        assert len(lines) == 3, [r.getMessage() for r in lines]
        for host in (f"localhost:{address.port}", "127.0.0.1", "LOCALHOST", "[::1]:9465"):
            assert call(client, "GET", "/status", None, {"Host": host})[0] == 200, host
        # A body-less POST and a JSON one still work (what the CLI sends).
        assert client.reload()["ok"] is True
        assert client.revoke("a.test", "keyCompromise", replace=False)["replaced"] is False
        assert [c[0] for c in ops.calls] == ["reload", "revoke"]


def test_a_huge_number_is_not_called_bad_utf8(sockdir: Path) -> None:
    """Python's int() refuses more than 4300 digits with a ValueError: that body is valid
    UTF-8 and valid JSON, and the message says what is wrong with it."""
    with serve(unix(sockdir)) as ops:
        client = AdminClient(unix(sockdir))
        raw = b'{"cert": ' + b"1" * 5000 + b', "key": "k"}'
        status, _, body = call(client, "PUT", "/certs/a.test", raw)
        assert (status, body["error"]) == (400, "bad_request")
        assert "a number with thousands of digits" in body["message"], body
        status, _, body = call(client, "PUT", "/certs/a.test", b'{"cert": "\xff"}')
        assert "not UTF-8" in body["message"], body
        assert ops.calls == []


def test_oversized_body_is_413(sockdir: Path) -> None:
    with serve(unix(sockdir)):
        client = AdminClient(unix(sockdir))
        big = json.dumps({"cert": "A" * MAX_BODY, "key": "k"}).encode()
        status, _, body = call(client, "PUT", "/certs/a.test", big)
        assert (status, body["error"]) == (413, "too_large")
        # Without a Content-Length (chunked) the limit still holds.
        conn = http.client.HTTPConnection("localhost")
        conn.sock = socket.socket(socket.AF_UNIX)
        conn.sock.connect(unix(sockdir).path)
        try:
            conn.request("PUT", "/certs/a.test", body=iter([big[:1000], big[1000:]]),
                         headers={"Content-Type": "application/json"},
                         encode_chunked=True)  # fmt: skip
            response = conn.getresponse()
            assert response.status == 413
            assert json.loads(response.read())["error"] == "too_large"
        finally:
            conn.close()
        assert client.status()["node"] == "edge-1"  # still serving


def test_unexpected_exception_is_a_generic_500_and_a_log_line(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with serve(unix(sockdir)), caplog.at_level(logging.ERROR, logger="edged.admin"):
        status, _, body = call(AdminClient(unix(sockdir)), "GET", "/certs/boom.test")
    assert (status, body["error"]) == (500, "internal")
    assert "PRIVATE KEY" not in body["message"] and "journalctl" in body["message"]
    lines = [r for r in caplog.records if r.name == "edged.admin" and r.levelno == logging.ERROR]
    assert len(lines) == 1 and lines[0].getMessage() == "admin: GET /certs/boom.test failed"


# --- token ---------------------------------------------------------------------------------------


def test_bearer_token(sockdir: Path) -> None:
    token_file = sockdir / "token"
    token_file.write_text("  s3cret-token\n")
    token_file.chmod(0o600)
    address = Address("127.0.0.1", free_port())
    with serve(address, token_file=token_file) as ops:
        for token, headers in ((None, {}), ("wrong", {}), ("s3cret-tokenX", {}),
                               (None, {"Authorization": "s3cret-token"}),
                               (None, {"Authorization": "Basic s3cret-token"})):  # fmt: skip
            client = AdminClient(address, token=token)
            # Unknown routes too: nothing is revealed without the token.
            for method, path in (("GET", "/status"), ("POST", "/reload"), ("GET", "/nope")):
                status, hdrs, body = call(client, method, path, headers=headers)
                assert (status, body["error"]) == (401, "unauthorized"), (token, headers)
                assert hdrs["WWW-Authenticate"].startswith("Bearer")
        assert ops.calls == []
        client = AdminClient(address, token="s3cret-token")
        assert client.status()["node"] == "edge-1"
        # The scheme is case-insensitive (RFC 7235).
        status, _, _ = call(
            client, "GET", "/status", headers={"Authorization": "bearer s3cret-token"}
        )
        assert status == 200
        assert client.reload()["ok"] is True


def site_with_token(sockdir: Path, pair: tuple[bytes, bytes], token: str) -> tuple[str, Path]:
    """A [[site]] for a.test serving `pair` from files in `sockdir`, and a token file holding
    `token` (mode 0600) beside it."""
    cert_file, key_file = sockdir / "a.crt", sockdir / "a.key"
    cert_file.write_bytes(pair[0])
    key_file.write_bytes(pair[1])
    token_file = sockdir / "token"
    token_file.write_text(f"{token}\n")
    token_file.chmod(0o600)
    site = (
        f'[[site]]\nnames = ["a.test"]\nbackend = "127.0.0.1:9"\n'
        f'cert_file = "{cert_file}"\nkey_file = "{key_file}"\n'
    )
    return site, token_file


async def test_a_rotated_token_is_used_after_a_reload(
    sockdir: Path, certs: dict[str, tuple[bytes, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    """listen.admin_token_file is read again at every reload (a change to the file triggers
    one): a rotated token works at once, the old one is refused; a file that cannot be used
    keeps the token before it, with the reason logged."""
    import aiohttp

    site, token_file = site_with_token(sockdir, certs["good"], "first-token")
    port = free_port()
    async with (
        run_edged(sockdir, site, admin=f"127.0.0.1:{port}") as e,
        aiohttp.ClientSession() as http,
    ):

        async def status(token: str | None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with http.get(f"http://127.0.0.1:{port}/status", headers=headers) as r:
                return r.status

        assert await status(None) == 200  # started without a token file
        text = e.config_path.read_text()
        e.config_path.write_text(text.replace("[listen]", '[listen]\nadmin_token_file = "token"'))
        assert await e.daemon.reload("signal")
        assert (await status(None), await status("first-token")) == (401, 200)

        token_file.write_text("second-token\n")
        assert await e.daemon.reload("file")
        assert await status("first-token") == 401
        assert await status("second-token") == 200

        token_file.chmod(0o644)  # readable by every user: not used
        with caplog.at_level(logging.ERROR, "edged.daemon"):
            assert await e.daemon.reload("file")
        assert "the admin API keeps its previous token" in caplog.text
        assert "chmod 600" in caplog.text
        assert await status("second-token") == 200


def test_token_file_must_not_be_world_readable(sockdir: Path) -> None:
    token_file = sockdir / "token"
    token_file.write_text("t0ken\n")
    token_file.chmod(0o644)
    with pytest.raises(AdminStartupError, match="readable by every user: chmod 600"):
        read_token_file(token_file)
    address = unix(sockdir)
    with (
        pytest.raises(AdminStartupError, match="readable by every user"),
        serve(address, token_file=token_file),
    ):
        pass
    assert not os.path.exists(address.path)  # refused before binding
    token_file.chmod(0o640)
    assert read_token_file(token_file) == "t0ken"
    token_file.write_text(" \n")
    with pytest.raises(AdminStartupError, match="is empty"):
        read_token_file(token_file)
    with pytest.raises(AdminStartupError, match="cannot read"):
        read_token_file(sockdir / "missing")


# --- serving rules -------------------------------------------------------------------------------


async def test_non_loopback_addresses_are_refused_before_binding() -> None:
    port = free_port()
    for host in ("0.0.0.0", "192.0.2.1", "::", "10.0.0.1"):
        with pytest.raises(AdminStartupError, match=r"listen.admin: .* is not a loopback address"):
            await start_admin_server(Address(host, port), FakeOperations(), token_file=None)
    # The port was never bound.
    with socket.socket() as s:
        s.bind(("0.0.0.0", port))


def test_stale_socket_is_replaced_and_a_live_one_refused(sockdir: Path) -> None:
    address = unix(sockdir)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(address.path)
    stale.close()  # the file stays; nothing listens
    assert stat.S_ISSOCK(os.stat(address.path).st_mode)
    with serve(address):
        assert AdminClient(address).status()["node"] == "edge-1"
        # A second server on the same path is refused and does not break the first.
        with pytest.raises(AdminStartupError, match="another process is listening"), serve(address):
            pass
        assert AdminClient(address).status()["node"] == "edge-1"
    # A regular file is never deleted.
    Path(address.path).write_text("not a socket")
    with pytest.raises(AdminStartupError, match="not a socket"), serve(address):
        pass
    assert Path(address.path).read_text() == "not a socket"


def test_missing_socket_directory_and_busy_port(sockdir: Path) -> None:
    with (
        pytest.raises(AdminStartupError, match="cannot listen: No such file"),
        serve(Address(path=str(sockdir / "nodir" / "a.sock"))),
    ):
        pass
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = Address("127.0.0.1", busy.getsockname()[1])
        with (
            pytest.raises(AdminStartupError, match=r"cannot listen on 127\.0\.0\.1"),
            serve(address),
        ):
            pass


async def test_build_admin_app_is_a_plain_aiohttp_app() -> None:
    # The daemon may mount it itself: it is an ordinary Application.
    app = build_admin_app(FakeOperations(), token=None)
    assert isinstance(app, web.Application)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        client = AdminClient(Address("127.0.0.1", port))
        status = await asyncio.to_thread(client.status)
        assert status["connections_active"] == 7
    finally:
        await runner.cleanup()


def test_client_unreachable(sockdir: Path) -> None:
    expected = r"unix:.*admin\.sock: no such socket: is edged running\? \(systemctl status edged\)"
    with pytest.raises(AdminUnreachable, match=expected):
        AdminClient(unix(sockdir)).status()
    with pytest.raises(AdminUnreachable, match="connection refused"):
        AdminClient(Address("127.0.0.1", free_port())).status()
    # Something accepts but never answers: a timeout, not a hang.
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(unix(sockdir).path)
        mute.listen()
        started = time.monotonic()
        with pytest.raises(AdminUnreachable, match=r"no answer within 0\.5 s"):
            AdminClient(unix(sockdir), timeout=0.5).status()
        assert time.monotonic() - started < 5


# --- CLI -----------------------------------------------------------------------------------------


def edged(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGED, *args], capture_output=True, text=True, timeout=60)


def write_config(directory: Path, admin: str) -> Path:
    config = directory / "edged.toml"
    config.write_text(
        f'[listen]\nadmin = "{admin}"\n[[site]]\nnames = ["a.test"]\nbackend = "127.0.0.1:9"\n'
    )
    return config


def test_cli_status_table_and_json(sockdir: Path) -> None:
    config = write_config(sockdir, f"unix:{sockdir}/admin.sock")
    with serve(unix(sockdir)):
        out = edged("status", "--config", str(config))
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == (
            "edged 0.1.0 on edge-1, up 3h 2m, listening on 127.0.0.1:8443, 7 connections"
        )
        assert lines[1] == "certs: 2 active, 1 failed"
        header = lines[3]
        columns = ["NAME", "STATE", "NOT_AFTER", "DAYS LEFT", "KEY TYPES", "ISSUER", "ATTEMPTS",
                   "NEXT", "LAST ERROR"]  # fmt: skip
        starts = [header.index(c) for c in columns]
        assert starts == sorted(starts)
        rows = {line.split()[0]: line for line in lines[4:]}
        assert list(rows) == ["*.w.test", "a.test", "files.test"]  # sorted by name
        row = rows["*.w.test"]
        # Columns line up under their headers and are sized to their content.
        assert row[starts[1] :].startswith("failed ")
        assert row[starts[3] :].startswith("3 ")
        assert row[starts[4] :].startswith("ecdsa-p256 ")
        assert row[starts[5] :].startswith("Test Intermediate ")
        assert row[starts[6] :].startswith("3 ")
        next_try = NOW + timedelta(minutes=15)
        assert row[starts[7] :].startswith(f"{next_try:%Y-%m-%d %H:%M} ")
        error = row[starts[8] :]
        assert error.startswith("urn:ietf:params:acme:error:dns") and error.endswith("...")
        assert len(error) == 60
        a = rows["a.test"]
        assert a[starts[3] :].startswith("40 ") and "ecdsa-p256,rsa-2048" in a
        assert a[starts[7] :].startswith("-") and a.endswith("-")
        assert max(len(line) for line in lines) < 200

        out = edged("status", "--config", str(config), "--json")
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        assert data["status"]["node"] == "edge-1" and len(data["certs"]) == 3

        out = edged("status", "*.W.test", "--config", str(config))
        assert out.returncode == 0, out.stderr
        assert "name:        *.w.test\n" in out.stdout
        assert "names:       *.w.test\n" in out.stdout and "attempts:    3\n" in out.stdout
        out = edged("status", "nope.test", "--config", str(config))
        assert out.returncode == 1
        assert out.stderr == "edged: unknown_name: nope.test: no [[site]] has this name\n"


def test_cli_commands(sockdir: Path, certs: dict[str, tuple[bytes, bytes]]) -> None:
    config = write_config(sockdir, f"unix:{sockdir}/admin.sock")
    c = str(config)
    cert_file, key_file = sockdir / "a.crt", sockdir / "a.key"
    cert_file.write_bytes(certs["good"][0])
    key_file.write_bytes(certs["good"][1])
    bad_key = sockdir / "bad.key"
    bad_key.write_bytes(certs["mismatch"][1])
    with serve(unix(sockdir)) as ops:
        out = edged("renew", "*.w.test", "--config", c)
        assert (out.returncode, out.stdout) == (0, "*.w.test: renewal started\n"), out.stderr
        out = edged("upload", "a.test", "--cert", str(cert_file), "--key", str(key_file),
                    "--config", c)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout == "a.test: now serving the uploaded ecdsa-p256 cert\n"
        out = edged("upload", "--remove", "a.test", "--config", c)
        assert (out.returncode, out.stdout) == (0, "a.test: ACME manages this name again\n")
        out = edged("revoke", "a.test", "--reason", "superseded", "--no-replace", "--config", c)
        assert (out.returncode, out.stdout) == (0, "a.test: revoked (superseded)\n")
        out = edged("revoke", "a.test", "--config", c, "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["replaced"] is True
        out = edged("reload", "--config", c)
        assert (out.returncode, out.stdout) == (0, "reloaded: 3 sites, 3 certificates\n")
        assert [call[0] for call in ops.calls] == [
            "renew", "upload", "unmanage", "revoke", "revoke", "reload"
        ]  # fmt: skip
        assert ops.calls[3] == ("revoke", "a.test", "superseded", False)

        # API errors: exit 1, `edged: <code>: <message>` on stderr.
        out = edged("upload", "a.test", "--cert", str(cert_file), "--key", str(bad_key),
                    "--config", c)  # fmt: skip
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr.startswith("edged: invalid_cert: ") and "(key_mismatch)" in out.stderr
        assert "PRIVATE KEY" not in out.stderr
        # A file that cannot be a bundle is named (the daemon's answer could not say which of
        # the two was empty), before any request.
        empty = sockdir / "empty.key"
        empty.write_bytes(b"")
        out = edged("upload", "a.test", "--cert", str(cert_file), "--key", str(empty),
                    "--config", c)  # fmt: skip
        assert (out.returncode, out.stderr) == (
            1, f"edged: invalid_cert: {empty}: the file is empty (empty)\n"
        )  # fmt: skip
        out = edged("renew", "../x", "--config", c)
        assert out.returncode == 1 and out.stderr.startswith("edged: bad_name: ")
        out = edged("renew", "files.test", "--config", c)
        assert out.returncode == 1
        assert out.stderr == "edged: not_acme: files.test: its certificate is not from ACME\n"
        # A local file problem: exit 1 before any request.
        out = edged("upload", "a.test", "--cert", str(sockdir / "nope.crt"), "--key",
                    str(key_file), "--config", c)  # fmt: skip
        assert out.returncode == 1 and "nope.crt: no such file" in out.stderr
        assert len(ops.calls) == 6

    # Usage errors: exit 2.
    for args in (["upload", "a.test"], ["upload", "a.test", "--cert", str(cert_file)],
                 ["upload", "a.test", "--remove", "--key", str(key_file)],
                 ["upload", "a.test", "--remove", "--cert", str(cert_file)],
                 ["revoke", "a.test", "--reason", "bored"], ["renew"]):  # fmt: skip
        out = edged(*args, "--config", c)
        assert out.returncode == 2, (args, out.stderr)


def test_cli_over_tcp(sockdir: Path) -> None:
    port = free_port()
    config = write_config(sockdir, f"127.0.0.1:{port}")
    with serve(Address("127.0.0.1", port)):
        out = edged("reload", "--config", str(config))
        assert (out.returncode, out.stdout) == (0, "reloaded: 3 sites, 3 certificates\n")


def test_cli_unreachable_exits_3(sockdir: Path) -> None:
    config = write_config(sockdir, f"unix:{sockdir}/admin.sock")
    for args in (["status"], ["renew", "a.test"], ["reload"], ["revoke", "a.test"],
                 ["upload", "a.test", "--remove"]):  # fmt: skip
        out = edged(*args, "--config", str(config))
        assert out.returncode == 3, (args, out.stderr)
        assert out.stderr == (
            f"edged: cannot reach the admin API at unix:{sockdir}/admin.sock: no such socket: "
            "is edged running? (systemctl status edged)\n"
        )
    port = free_port()
    out = edged("status", "--config", str(write_config(sockdir, f"127.0.0.1:{port}")))
    assert out.returncode == 3 and "127.0.0.1:" in out.stderr and "connection refused" in out.stderr
    out = edged("status", "--config", str(write_config(sockdir, "")))
    assert out.returncode == 3 and "listen.admin is '' (the admin API is off)" in out.stderr
    out = edged("status", "--config", str(sockdir / "missing.toml"))
    assert out.returncode == 1 and "no such file" in out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the CLI as another user")
def test_cli_as_a_user_who_may_not_use_the_socket_says_so(sockdir: Path) -> None:
    """The socket is mode 0600, its daemon's user's: another user's `edged status` was told
    "Permission denied: is edged running? (systemctl status edged)", which it is."""
    config = write_config(sockdir, f"unix:{sockdir}/admin.sock")
    sockdir.chmod(0o755)
    config.chmod(0o644)
    with serve(unix(sockdir)):
        out = subprocess.run(
            ["runuser", "-u", "nobody", "--", EDGED, "status", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
    assert (out.returncode, out.stderr) == (
        3,
        f"edged: cannot reach the admin API at unix:{sockdir}/admin.sock: permission denied: "
        "the socket belongs to edged's user: run this as that user or as root (sudo)\n",
    )


async def test_cli_reaches_the_daemon_through_a_config_it_cannot_load(
    sockdir: Path, certs: dict[str, tuple[bytes, bytes]]
) -> None:
    """A real daemon keeps serving while its key file is being replaced and the config has a
    typo it rejected: `edged status` and `edged reload` read only listen.admin (and its token)
    and still reach it; the daemon answers the reload itself. They used to load the whole
    config and exit 1 without asking the daemon."""
    site, _ = site_with_token(sockdir, certs["good"], "s3cret-token")
    key_file = sockdir / "a.key"
    async with run_edged(sockdir, site, admin=f"unix:{sockdir}/admin.sock") as e:
        config = str(e.config_path)
        text = e.config_path.read_text().replace("[listen]", '[listen]\nadmin_token_file = "token"')
        e.config_path.write_text(text)
        key_file.rename(sockdir / "a.key.old")  # mid-rotation
        e.config_path.write_text(text + '[tls]\nmin_versoin = "1.3"\n')  # a typo
        out = await run_cmd(EDGED, "status", "--config", config)
        assert out.returncode == 0, out.stderr
        assert "a.test" in out.stdout
        out = await run_cmd(EDGED, "reload", "--config", config)
        assert out.returncode == 1 and out.stderr.startswith("edged: reload_failed: "), out
        # What the commands do need is still checked, with the fix named.
        e.config_path.write_text(text.replace(f"unix:{sockdir}/admin.sock", "10.1.1.1:9465"))
        out = await run_cmd(EDGED, "status", "--config", config)
        assert out.returncode == 1 and "listen.admin: 10.1.1.1:9465 is not loopback" in out.stderr
        e.config_path.write_text(text.replace(f'"unix:{sockdir}/admin.sock"', "7"))
        out = await run_cmd(EDGED, "status", "--config", config)
        assert out.returncode == 1 and "listen.admin: must be an address" in out.stderr, out
        e.config_path.write_text("[listen\n")
        out = await run_cmd(EDGED, "status", "--config", config)
        assert out.returncode == 1 and "not valid TOML" in out.stderr, out


def test_admin_error_from_cert_error() -> None:
    err = AdminError.from_cert_error(CertError(CertReason.EXPIRED, "expired on X", "upload"))
    assert (err.status, err.code, err.reason) == (422, "invalid_cert", "expired")
    assert err.body() == {"error": "invalid_cert", "message": "expired on X", "reason": "expired"}
