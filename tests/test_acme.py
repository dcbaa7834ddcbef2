"""The embedded ACME client against real Pebble: HTTP-01 issuance, hardening, failures."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from edged.acme.client import AcmeSession
from edged.acme.issue import OrderRequest, issue
from edged.acme.solvers import Http01Solver, Solver
from edged.config import AcmeSettings, Site, parse_config
from edged.errors import AcmeError
from edged.http01 import ChallengeBoard, Http01App
from edged.renewer import UploadKept, obtain
from edged.store.base import PemPair, Store, StoredCert
from edged.store.files import FileStore
from edged.store.redis import RedisStore
from tests.https_front import HttpsFront
from tests.pebble import Pebble, start_pebble
from tests.pki import fullchain, make_ca, make_leaf

SITES = """
[listen]
https = ["127.0.0.1:8443"]
[[site]]
names = ["a.test", "www.a.test"]
backend = "127.0.0.1:9"
[[site]]
names = ["b.test"]
backend = "127.0.0.1:9"
http = "forward"
"""


@asynccontextmanager
async def http01(board: ChallengeBoard, port: int) -> AsyncIterator[Http01App]:
    config = parse_config(SITES, Path("/etc/edged/edged.toml"))
    app = Http01App(board, lambda: config)
    runner = web.AppRunner(app.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield app
    finally:
        await runner.cleanup()


def settings(pebble: Pebble, **kw: object) -> AcmeSettings:
    return AcmeSettings(
        directory=pebble.directory,
        ca_bundle=pebble.listener_ca,
        email="ops@a.test",
        **kw,  # type: ignore[arg-type]
    )


def verify_chain(pebble: Pebble, tmp_path: Path, fullchain: bytes) -> None:
    """openssl verifies the served chain up to Pebble's root."""
    root = tmp_path / "root.pem"
    root.write_bytes(pebble.root_pem())
    chain = tmp_path / "chain.pem"
    chain.write_bytes(fullchain)
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", str(root), "-untrusted", str(chain), str(chain)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


async def test_issue_http01_dual_key(pebble: Pebble, tmp_path: Path) -> None:
    board = ChallengeBoard()
    store = FileStore(tmp_path / "store")
    session = AcmeSession(settings(pebble), store)
    request = OrderRequest("a.test", ("a.test", "www.a.test"), ("ecdsa-p256", "rsa-2048"))
    async with http01(board, pebble.http_port) as app:
        issued = await asyncio.to_thread(issue, session, request, lambda: Http01Solver(board))
    assert issued.cert.key_types == ("ecdsa-p256", "rsa-2048")
    assert issued.cert.names == ("a.test", "www.a.test")
    assert app.answered >= 2  # Pebble really fetched the tokens over HTTP
    assert len(board) == 0  # tokens vanish when the order ends
    for pair in issued.cert.pairs:
        verify_chain(pebble, tmp_path, pair.fullchain)
    # The account is stored once (key 0600) and reused by the next session.
    account_dir = next((tmp_path / "store" / "accounts").iterdir())
    assert (account_dir / "key.pem").stat().st_mode & 0o777 == 0o600
    again = AcmeSession(settings(pebble), store)
    await asyncio.to_thread(again.open)
    assert again.net is not None and again.net.account is not None
    assert session.net is not None and session.net.account is not None
    assert again.net.account.uri == session.net.account.uri


async def test_nonce_rejection_30_percent_issues_20_of_20(tmp_path: Path) -> None:
    p = start_pebble(tmp_path / "pebble", nonce_reject=30)
    try:
        board = ChallengeBoard()
        session = AcmeSession(settings(p), FileStore(tmp_path / "store"))
        ok = 0
        async with http01(board, p.http_port):
            for i in range(20):
                request = OrderRequest(f"n{i}.a.test", (f"n{i}.a.test",))
                await asyncio.to_thread(issue, session, request, lambda: Http01Solver(board))
                ok += 1
        assert ok == 20
        assert session.net is not None and session.net.nonce_rejections > 5
    finally:
        p.stop()


class WrongTokenBoard(ChallengeBoard):
    """Serves a wrong key authorization: the CA must reject the challenge."""

    def lookup(self, token: str, host: str) -> str | None:
        found = super().lookup(token, host)
        return None if found is None else found + "x"


async def test_invalid_challenge_gives_problem_detail(pebble: Pebble, tmp_path: Path) -> None:
    board = WrongTokenBoard()
    store = FileStore(tmp_path / "store")
    session = AcmeSession(settings(pebble), store)
    async with http01(board, pebble.http_port):
        with pytest.raises(AcmeError) as info:
            await asyncio.to_thread(
                issue, session, OrderRequest("a.test", ("a.test",)), lambda: Http01Solver(board)
            )
    err = info.value
    assert err.name == "a.test"
    assert "could not validate a.test over http-01" in err.message
    assert err.problem.get("type") == "urn:ietf:params:acme:error:unauthorized"
    assert "key authorization" in str(err.problem.get("detail")).lower()
    assert len(board) == 0
    assert store.names() == []  # nothing half-written


async def test_ca_unreachable(tmp_path: Path) -> None:
    from tests.ports import free_port

    session = AcmeSession(
        AcmeSettings(directory=f"https://127.0.0.1:{free_port()}/dir"), FileStore(tmp_path)
    )
    with pytest.raises(AcmeError) as info:
        await asyncio.to_thread(
            issue,
            session,
            OrderRequest("a.test", ("a.test",)),
            lambda: Http01Solver(ChallengeBoard()),
        )
    assert "cannot reach the ACME server" in str(info.value)
    assert "acme.directory" in str(info.value)


async def test_ca_error_rejected_identifier(pebble: Pebble, tmp_path: Path) -> None:
    """The CA refuses an identifier: the problem document comes through typed."""
    session = AcmeSession(settings(pebble), FileStore(tmp_path / "store"))
    with pytest.raises(AcmeError) as info:
        await asyncio.to_thread(
            issue, session, OrderRequest("x", ("nodot",)), lambda: Http01Solver(ChallengeBoard())
        )
    assert str(info.value.problem.get("type")).startswith("urn:ietf:params:acme:error:")
    assert info.value.name == "x"


async def test_untrusted_ca_certificate(pebble: Pebble, tmp_path: Path) -> None:
    session = AcmeSession(AcmeSettings(directory=pebble.directory), FileStore(tmp_path))
    with pytest.raises(AcmeError) as info:
        await asyncio.to_thread(session.open)
    assert "acme.ca_bundle" in str(info.value)


async def test_http01_host_check_and_unknown_token(tmp_path: Path) -> None:
    from tests.ports import free_port

    board = ChallengeBoard()
    board.add("tok_1", "tok_1.thumb", ["a.test"])
    port = free_port()
    async with http01(board, port), aiohttp.ClientSession() as client:
        base = f"http://127.0.0.1:{port}/.well-known/acme-challenge/"

        async def get(path: str, host: str) -> tuple[int, str, str]:
            async with client.get(base + path, headers={"Host": host}, allow_redirects=False) as r:
                return r.status, await r.text(), r.headers.get("Content-Type", "")

        assert await get("tok_1", "a.test") == (200, "tok_1.thumb", "text/plain; charset=utf-8")
        assert (await get("tok_1", "A.TEST:80"))[0] == 200  # case and port ignored
        assert (await get("tok_1", "www.a.test"))[0] == 404  # another name of the same site
        assert (await get("tok_1", "b.test"))[0] == 404
        assert (await get("nope", "a.test"))[0] == 404
        assert (await get("..%2f..%2fetc%2fpasswd", "a.test"))[0] == 404
        async with client.get(
            f"http://127.0.0.1:{port}/x?y=1", headers={"Host": "www.a.test"}, allow_redirects=False
        ) as r:
            assert r.status == 301
            assert r.headers["Location"] == "https://www.a.test:8443/x?y=1"
        async with client.get(
            f"http://127.0.0.1:{port}/x", headers={"Host": "evil.test"}, allow_redirects=False
        ) as r:
            assert r.status == 404  # never redirect for a name we do not serve
        board.remove("tok_1")
        assert (await get("tok_1", "a.test"))[0] == 404


async def test_http01_forward_to_backend(tmp_path: Path) -> None:
    """Sites with http = "forward" get plain HTTP proxied; the challenge path still wins."""
    from tests.ports import free_port

    seen: list[str] = []

    async def backend_handler(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path_qs} {request.headers['X-Forwarded-Proto']}")
        return web.Response(text="from backend")

    backend_app = web.Application()
    backend_app.router.add_route("*", "/{tail:.*}", backend_handler)
    backend_runner = web.AppRunner(backend_app)
    await backend_runner.setup()
    backend_port = free_port()
    await web.TCPSite(backend_runner, "127.0.0.1", backend_port).start()
    config = parse_config(
        SITES.replace(
            'backend = "127.0.0.1:9"\nhttp', f'backend = "127.0.0.1:{backend_port}"\nhttp'
        ),
        Path("/etc/edged/edged.toml"),
    )
    board = ChallengeBoard()
    board.add("tok2", "tok2.thumb", ["b.test"])
    app = Http01App(board, lambda: config)
    runner = web.AppRunner(app.app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(
                f"http://127.0.0.1:{port}/p?q=1", headers={"Host": "b.test"}, data=b"body"
            ) as r:
                assert r.status == 200 and await r.text() == "from backend"
            async with client.get(
                f"http://127.0.0.1:{port}/.well-known/acme-challenge/tok2",
                headers={"Host": "b.test"},
            ) as r:
                assert await r.text() == "tok2.thumb"
        assert seen == ["POST /p?q=1 http"]
    finally:
        await runner.cleanup()
        await backend_runner.cleanup()


@pytest.mark.parametrize("body", [{"key": {"kty": "EC"}}, {"key": "zz"}, None])
async def test_corrupt_stored_account_is_a_clear_error(
    pebble: Pebble, tmp_path: Path, body: object
) -> None:
    """A stored account whose body the library cannot read is an AcmeError that says how to
    fix it (it was a KeyError/DeserializationError/TypeError that crashed the attempt)."""
    store = FileStore(tmp_path / "store")
    first = AcmeSession(settings(pebble), store)
    await asyncio.to_thread(first.open)  # registers and stores the account
    first.close()
    stored = store.load_account(pebble.directory)
    assert stored is not None
    account, key_pem = stored
    store.save_account(pebble.directory, {**account, "body": body}, key_pem)
    session = AcmeSession(settings(pebble), store)
    with pytest.raises(AcmeError) as info:
        await asyncio.to_thread(session.open, "a.test")
    session.close()
    assert info.value.name == "a.test"
    assert "stored ACME account" in str(info.value) and "corrupt" in str(info.value)
    assert "delete the accounts/ folder" in str(info.value)


async def test_an_error_without_a_problem_document_names_the_status_and_keeps_retry_after(
    pebble: Pebble, tmp_path: Path
) -> None:
    """A 503 page from a proxy in front of the CA (no ACME problem JSON): the error says HTTP
    503 (it said `<Response [503]>`) and the Retry-After it sent is kept."""

    async def down(request: web.Request) -> web.Response:
        return web.Response(
            status=503, text="<html>maintenance</html>", content_type="text/html",
            headers={"Retry-After": "120"},
        )  # fmt: skip

    front = HttpsFront(tmp_path, pebble, "down")
    session = AcmeSession(
        AcmeSettings(directory=f"{front.base}/dir", ca_bundle=front.trust), FileStore(tmp_path)
    )
    async with front.serve([web.get("/dir", down)]):
        before = datetime.now(UTC)
        with pytest.raises(AcmeError) as info:
            await asyncio.to_thread(session.open, "a.test")
    message = str(info.value)
    assert "HTTP 503 Service Unavailable" in message and "Response [" not in message, message
    assert info.value.retry_after is not None
    assert timedelta(seconds=100) < info.value.retry_after - before < timedelta(seconds=140)


async def test_an_order_does_not_replace_a_certificate_uploaded_while_it_ran(
    pebble: Pebble, tmp_path: Path
) -> None:
    """The renewal loop orders only for managed sites; an `edged upload` while the order runs
    hands the site to the operator: the finished order must not overwrite the upload (it did,
    and ACME was back in charge)."""
    config = parse_config(SITES, Path("/etc/edged/edged.toml"))
    site = config.sites[0]
    store = FileStore(tmp_path / "store")
    upload = uploaded_cert(site)
    board = ChallengeBoard()

    def order_then_upload() -> Solver:
        store.save(upload)  # the operator's upload lands while the order runs
        return Http01Solver(board)

    async with http01(board, pebble.http_port):
        with pytest.raises(AcmeError, match="uploaded for the site while this order ran"):
            await asyncio.to_thread(
                obtain, settings(pebble), store, site, order_then_upload, None, "", None, True
            )
    kept = store.load(site.name)
    assert kept is not None and kept.source == "upload" and kept.pairs == upload.pairs


def uploaded_cert(site: Site) -> StoredCert:
    """An operator's upload for `site`, from a CA of their own."""
    leaf = make_leaf(make_ca("Own CA"), list(site.names), cn="uploaded")
    pair = PemPair("ecdsa-p256", fullchain(leaf), leaf.key_pem)
    return StoredCert(site.name, site.names, (pair,), "upload", time.time())


class UploadBeforeWrite:
    """An operator's upload through another writer (another fleet node on the same Redis, or
    the admin API's thread of the same daemon) that lands right before the store's next
    certificate write: after the order's last look at the entry."""

    def __init__(self, upload: StoredCert, write: Callable[[StoredCert], None]) -> None:
        self.upload: StoredCert | None = upload
        self.write = write

    def land(self) -> None:
        if self.upload is not None:
            upload, self.upload = self.upload, None
            self.write(upload)


class Racing:
    """A store whose certificate writes let `race` land its upload first."""

    race: UploadBeforeWrite

    def save(self, cert: StoredCert) -> None:
        self.race.land()
        super().save(cert)  # type: ignore[misc]

    def save_unless_upload(self, cert: StoredCert) -> StoredCert | None:
        self.race.land()
        return super().save_unless_upload(cert)  # type: ignore[misc,no-any-return]


class RacingFiles(Racing, FileStore):
    pass


class RacingRedis(Racing, RedisStore):
    pass


def racing_store(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, upload: StoredCert
) -> Store:
    """The store obtain writes to, file or Redis, with an UploadBeforeWrite."""
    if kind == "file":
        files = RacingFiles(tmp_path / "store")
        files.race = UploadBeforeWrite(upload, lambda cert: FileStore.save(files, cert))
        return files
    url = request.getfixturevalue("redis_server").url
    redis_store = RacingRedis(url, FileStore(tmp_path / "this-node"))
    other = RedisStore(url, FileStore(tmp_path / "other-node"))
    redis_store.race = UploadBeforeWrite(upload, other.save)
    return redis_store


@pytest.mark.parametrize("kind", ["file", "redis"])
async def test_an_upload_landing_right_before_the_orders_write_is_kept(
    pebble: Pebble,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The check for an upload and the write of the order's certificate were two steps (a
    load, then a save): an upload landing between them (another node's `edged upload` into
    the shared Redis, the admin API's upload in this daemon) was overwritten by the ACME
    certificate, and ACME was back in charge. Now they are one step (a Lua script; the file
    store's lock): the upload stays, and the log says so."""
    config = parse_config(SITES, Path("/etc/edged/edged.toml"))
    site = config.sites[0]
    upload = uploaded_cert(site)
    store = racing_store(kind, tmp_path, request, upload)
    board = ChallengeBoard()
    async with http01(board, pebble.http_port):
        with pytest.raises(UploadKept, match="uploaded for the site while this order ran"):
            await asyncio.to_thread(
                obtain,
                settings(pebble),
                store,
                site,
                lambda: Http01Solver(board),
                None,
                None,
                None,
                True,
            )
    kept = store.load(site.name)
    assert kept is not None and kept.source == "upload" and kept.pairs == upload.pairs
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not stored" in m and "upload" in m and site.name in m for m in lines), lines
