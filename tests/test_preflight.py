"""Preflight (`edged check --preflight`) against a real BIND9, real Pebble and real listeners."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import ssl
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from edged.config import Config, parse_config
from edged.http01 import ChallengeBoard, Http01App
from edged.preflight import PreflightResult, any_failed, is_local_address, run_preflight
from edged.store.files import FileStore
from edged.store.redis import RedisStore
from tests.bind import Bind, bind_fixture
from tests.conftest import free_port, run_cmd
from tests.pebble import Pebble, start_pebble
from tests.pki import make_ca, make_leaf, write_pair
from tests.redis_server import RedisServer

EDGED = str(Path(sys.executable).with_name("edged"))
CA = "pebble.letsencrypt.org"

bind = bind_fixture(
    {
        "test": "",  # every lookup under .test ends at this server
        "pf.test": """
            www A 127.0.0.1
            www2 A 127.0.0.1
            lo2 A 127.0.0.2
            away A 198.51.100.7
            blocked CAA 0 issue "other.ca"
            wild CAA 0 issue "other.ca"
            wild CAA 0 issuewild "other.ca"
            dnsonly CAA 0 issue "pebble.letsencrypt.org; validationmethods=dns-01"
            acct CAA 0 issue "pebble.letsencrypt.org; accounturi=https://ca.test/acct/1"
        """,
        "locked.test": "",
    },
    read_only=("locked.test",),
)


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    p = start_pebble(tmp_path_factory.mktemp("pebble"))
    try:
        yield p
    finally:
        p.stop()


def config_text(
    bind: Bind,
    names: list[str],
    *,
    challenge: str = "http-01",
    http_port: int = 0,
    directory: str = "https://127.0.0.1:1/dir",
    ca_bundle: str = "",
    secret_file: Path | None = None,
) -> str:
    names_toml = ", ".join(f'"{n}"' for n in names)
    http = f'["127.0.0.1:{http_port}"]' if http_port else "[]"
    return textwrap.dedent(f"""
        [edged]
        store = "store"
        [listen]
        https = ["127.0.0.1:{free_port()}"]
        http = {http}
        metrics = ""
        admin = ""
        [acme]
        directory = "{directory}"
        ca_bundle = "{ca_bundle}"
        email = "ops@pf.test"
        challenge = "{challenge}"
        [acme.dns]
        server = "127.0.0.1:{bind.port}"
        tsig_key_name = "{bind.key_name}"
        tsig_secret_file = "{secret_file or bind.secret_file}"
        resolver = "127.0.0.1:{bind.port}"
        nameserver_port = {bind.port}
        propagation_timeout = "2s"
        [[site]]
        names = [{names_toml}]
        backend = "127.0.0.1:9"
    """)


def make_config(bind: Bind, names: list[str], **kw: object) -> Config:
    return parse_config(config_text(bind, names, **kw), Path("/etc/edged/edged.toml"))  # type: ignore[arg-type]


def by_check(results: list[PreflightResult], check: str) -> dict[str, PreflightResult]:
    return {r.name: r for r in results if r.check == check}


@asynccontextmanager
async def serve(app: web.Application, port: int) -> AsyncIterator[None]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


# --- CAA -----------------------------------------------------------------------------------


async def test_caa_record_that_blocks_is_named(bind: Bind) -> None:
    config = make_config(bind, ["pf.test", "blocked.pf.test", "*.wild.pf.test"], challenge="dns-01")
    results = await run_preflight(config, ca_domains=[CA], query_timeout=2.0)
    caa = by_check(results, "caa")
    assert caa["pf.test"].ok
    assert caa["pf.test"].line() == "pf.test: caa: ok: no CAA records: any CA may issue"
    blocked = caa["blocked.pf.test"]
    assert not blocked.ok
    assert blocked.line().startswith(
        f"blocked.pf.test: caa: FAIL: CAA at blocked.pf.test forbids issuance by {CA}: "
        '0 issue "other.ca"'
    )
    assert f'add `blocked.pf.test. CAA 0 issue "{CA}"`' in blocked.message
    wild = caa["*.wild.pf.test"]
    assert not wild.ok and '0 issuewild "other.ca"' in wild.message and "issuewild" in wild.message
    assert any_failed(results)
    # The CA named in the record is allowed.
    allowed = await run_preflight(config, ca_domains=["other.ca"], query_timeout=2.0)
    assert all(r.ok for r in allowed if r.check == "caa")


async def test_caa_validationmethods_is_checked_against_the_challenge(bind: Bind) -> None:
    """A record naming the CA but limiting it to dns-01 (RFC 8657): ok for dns-01, a FAIL
    naming the fix under http-01, as the CA would refuse the order."""
    names = ["dnsonly.pf.test"]
    dns01 = make_config(bind, names, challenge="dns-01")
    results = await run_preflight(dns01, ca_domains=[CA], query_timeout=2.0)
    assert by_check(results, "caa")["dnsonly.pf.test"].ok
    http01 = make_config(bind, names, challenge="http-01", http_port=free_port())
    results = await run_preflight(http01, ca_domains=[CA], query_timeout=2.0)
    found = by_check(results, "caa")["dnsonly.pf.test"]
    assert not found.ok
    assert "limits validation to dns-01, not http-01" in found.message, found.message


async def test_directory_without_caa_identities_is_skipped(bind: Bind, pebble: Pebble) -> None:
    config = make_config(
        bind,
        ["blocked.pf.test"],
        challenge="dns-01",
        directory=pebble.directory,
        ca_bundle=str(pebble.listener_ca),
    )
    results = await run_preflight(config, query_timeout=2.0)
    caa = [r for r in results if r.check == "caa"]
    assert len(caa) == 1
    assert caa[0].ok and caa[0].skipped
    assert caa[0].name == pebble.directory
    assert "lists no meta.caaIdentities" in caa[0].line()
    assert caa[0].line().startswith(f"{pebble.directory}: caa: ok: skipped, ")


async def test_caa_identities_read_from_the_directory(bind: Bind) -> None:
    async def directory(_request: web.Request) -> web.Response:
        return web.json_response({"newOrder": "x", "meta": {"caaIdentities": ["Other.CA"]}})

    app = web.Application()
    app.router.add_get("/dir", directory)
    port = free_port()
    config = make_config(bind, ["blocked.pf.test"], challenge="dns-01")
    assert config.acme is not None
    # The config parser insists on https; the stub is plain HTTP.
    acme = dataclasses.replace(config.acme, directory=f"http://127.0.0.1:{port}/dir")
    config = dataclasses.replace(config, acme=acme)
    async with serve(app, port):
        results = await run_preflight(config, query_timeout=2.0)
    caa = by_check(results, "caa")["blocked.pf.test"]
    assert caa.ok and "allows other.ca" in caa.message
    # An unreachable directory is a failure that names it.
    down = await run_preflight(config, query_timeout=2.0)
    failed = [r for r in down if r.check == "caa"]
    assert len(failed) == 1 and not failed[0].ok
    assert "cannot fetch the ACME directory" in failed[0].message
    assert "acme.directory" in failed[0].message


# --- HTTP-01 -------------------------------------------------------------------------------


async def test_http01_self_check_ok(bind: Bind) -> None:
    port = free_port()
    config = make_config(bind, ["www.pf.test", "www2.pf.test"], http_port=port)
    results = await run_preflight(config, ca_domains=[CA], query_timeout=2.0)
    assert not any_failed(results), [r.line() for r in results]
    points = by_check(results, "points-here")
    assert points["www.pf.test"].line() == (
        "www.pf.test: points-here: ok: resolves to 127.0.0.1 (this host)"
    )
    http = by_check(results, "http-01")
    assert set(http) == {"www.pf.test", "www2.pf.test"}
    assert f"a probe token served on port {port} came back via 127.0.0.1" in (
        http["www.pf.test"].message
    )
    assert "port 80 must be forwarded" in http["www.pf.test"].message
    # The listeners were the preflight's own and are gone again.
    async with serve(web.Application(), port):
        pass


async def test_http01_name_pointing_elsewhere(bind: Bind) -> None:
    config = make_config(bind, ["away.pf.test", "nx.pf.test", "*.pf.test"], http_port=free_port())
    assert not is_local_address("198.51.100.7")
    results = await run_preflight(config, ca_domains=[CA], query_timeout=0.5)
    points = by_check(results, "points-here")
    away = points["away.pf.test"]
    assert not away.ok
    assert (
        "resolves to 198.51.100.7, but 198.51.100.7 is not an address of this host" in away.message
    )
    assert "point the name's A/AAAA records here" in away.message
    away_http = by_check(results, "http-01")["away.pf.test"]
    assert not away_http.ok
    assert "via 198.51.100.7" in away_http.message
    nx = points["nx.pf.test"]
    assert not nx.ok and "does not exist in DNS (NXDOMAIN" in nx.message
    wild = by_check(results, "http-01")["*.pf.test"]
    assert not wild.ok and wild.message.startswith("wildcards need dns-01")


async def test_http01_listener_not_on_the_resolved_address(bind: Bind) -> None:
    """lo2 resolves to 127.0.0.2 (this host), but listen.http is only on 127.0.0.1."""
    config = make_config(bind, ["lo2.pf.test"], http_port=free_port())
    results = await run_preflight(config, ca_domains=[CA], query_timeout=2.0)
    assert by_check(results, "points-here")["lo2.pf.test"].ok
    http = by_check(results, "http-01")["lo2.pf.test"]
    assert not http.ok
    assert "via 127.0.0.2: cannot connect (Connection refused): nothing listens there" in (
        http.message
    )
    assert "[listen].http" in http.message


async def test_http01_port_busy_with_edged_or_another_server(bind: Bind) -> None:
    port = free_port()
    config = make_config(bind, ["www.pf.test"], http_port=port)
    daemon_board = ChallengeBoard()
    async with serve(Http01App(daemon_board, lambda: config).app, port):
        results = await run_preflight(config, ca_domains=[CA], query_timeout=2.0)
        http = by_check(results, "http-01")["www.pf.test"]
        assert http.ok, http.line()
        assert f"reached a server on port {port}" in http.message
        assert "answers like edged" in http.message
        assert "round trip itself was not tested" in http.message
        # The daemon passes its own board: the full round trip through its listeners.
        results = await run_preflight(
            config, ca_domains=[CA], board=daemon_board, query_timeout=2.0
        )
        http = by_check(results, "http-01")["www.pf.test"]
        assert http.ok and "a probe token served on port" in http.message
        assert len(daemon_board) == 0  # the probe token is withdrawn

    async def other(_request: web.Request) -> web.Response:
        return web.Response(text="hello from nginx")

    app = web.Application()
    app.router.add_get("/{tail:.*}", other)
    async with serve(app, port):
        results = await run_preflight(config, ca_domains=[CA], query_timeout=2.0)
    http = by_check(results, "http-01")["www.pf.test"]
    assert not http.ok
    assert f"port {port} is held by a server that is not edged" in http.message
    assert "HTTP 200 'hello from nginx'" in http.message


async def test_http01_probe_never_blocks_the_loop_on_a_hung_redis(
    bind: Bind, redis_server: RedisServer, tmp_path: Path
) -> None:
    """In a fleet the daemon's board shares tokens through Redis. A Redis that does not answer
    (here: stopped with SIGSTOP) must not stall the event loop (TLS, admin, watchdog) while the
    probe token is put and withdrawn; the probe through this host's listener still runs."""
    port = free_port()
    config = make_config(bind, ["www.pf.test"], http_port=port)
    daemon_board = ChallengeBoard()
    daemon_board.shared = RedisStore(redis_server.url, FileStore(tmp_path / "local"), prefix="pf")
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async with serve(Http01App(daemon_board, lambda: config).app, port):
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            async with asyncio.TaskGroup() as tg:
                ticking = tg.create_task(ticker())
                started = time.monotonic()
                results = await run_preflight(
                    config, ca_domains=[CA], board=daemon_board, query_timeout=2.0
                )
                took = time.monotonic() - started
                ticking.cancel()
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert took >= 2.0  # Redis was waited for (its 2 s timeout) ...
    assert max(gaps) < 1.0, max(gaps)  # ... but never on the loop
    http = by_check(results, "http-01")["www.pf.test"]
    assert http.ok and "a probe token served on port" in http.message, http.line()
    assert len(daemon_board) == 0


# --- DNS-01 --------------------------------------------------------------------------------


async def test_dns01_permission_ok_and_refused(bind: Bind) -> None:
    config = make_config(bind, ["pf.test", "*.pf.test", "x.locked.test"], challenge="dns-01")
    results = await run_preflight(config, ca_domains=[CA], query_timeout=2.0)
    tsig = by_check(results, "tsig")[str(bind.secret_file)]
    assert tsig.ok and "key 'edged' (hmac-sha256)" in tsig.message
    dns01 = by_check(results, "dns-01")
    assert dns01["pf.test"].ok
    assert dns01["pf.test"].line() == (
        "pf.test: dns-01: ok: TSIG key 'edged' may add and delete TXT at "
        f"_acme-challenge.pf.test in zone pf.test on {bind.address}"
    )
    assert dns01["*.pf.test"].ok
    locked = dns01["x.locked.test"]
    assert not locked.ok
    assert "REFUSED" in locked.message and "update-policy" in locked.message
    assert "zone locked.test" in locked.message
    assert bind.txt("_acme-challenge.pf.test") == set()


async def test_dns01_unusable_key(bind: Bind, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    config = make_config(bind, ["pf.test"], challenge="dns-01", secret_file=garbage)
    results = await run_preflight(config, ca_domains=[CA], query_timeout=2.0)
    tsig = by_check(results, "tsig")[str(garbage)]
    assert not tsig.ok and "not a TSIG key" in tsig.message
    assert "dns-01" not in {r.check for r in results}


# --- CLI -----------------------------------------------------------------------------------


async def test_cli_check_preflight(bind: Bind, pebble: Pebble, tmp_path: Path) -> None:
    config = tmp_path / "edged.toml"
    common = {"directory": pebble.directory, "ca_bundle": str(pebble.listener_ca)}
    config.write_text(config_text(bind, ["pf.test", "*.pf.test"], challenge="dns-01", **common))  # type: ignore[arg-type]
    plain = await run_cmd(EDGED, "check", "--config", str(config))
    assert plain.returncode == 0, plain.stdout
    assert ": dns-01: " not in plain.stdout and ": preflight " not in plain.stdout
    out = await run_cmd(EDGED, "check", "--config", str(config), "--preflight")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert f"{pebble.directory}: caa: ok: skipped, " in out.stdout
    assert any(ln.startswith("pf.test: dns-01: ok: TSIG key 'edged'") for ln in lines), lines
    assert any(ln.startswith("*.pf.test: dns-01: ok: ") for ln in lines), lines
    assert lines[-1] == f"{config}: preflight ok: 4 checks, 0 failed"

    config.write_text(
        config_text(bind, ["pf.test", "x.locked.test"], challenge="dns-01", **common)  # type: ignore[arg-type]
    )
    out = await run_cmd(EDGED, "check", "--config", str(config), "--preflight")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "x.locked.test: dns-01: FAIL: " in out.stdout
    assert out.stdout.splitlines()[-1] == f"{config}: preflight FAILED: 4 checks, 1 failed"


async def test_cli_check_preflight_holds_accounturi_against_this_nodes_account(
    bind: Bind, tmp_path: Path
) -> None:
    """`edged check --preflight` reads this node's ACME account from the store, as the daemon
    does: a CAA record whose accounturi names another account is a FAIL (the CA refuses)."""
    ca = make_ca()
    leaf = make_leaf(ca, ["localhost"])
    cert_path, key_path = write_pair(tmp_path, "directory", leaf)
    ca_path = tmp_path / "ca.pem"
    ca_path.write_bytes(ca.cert_pem)

    async def directory(_request: web.Request) -> web.Response:
        return web.json_response({"newOrder": "x", "meta": {"caaIdentities": [CA]}})

    app = web.Application()
    app.router.add_get("/dir", directory)
    port = free_port()
    url = f"https://localhost:{port}/dir"
    config = tmp_path / "edged.toml"
    config.write_text(
        config_text(
            bind, ["acct.pf.test"], challenge="dns-01", directory=url, ca_bundle=str(ca_path)
        )
    )
    key_pem = make_leaf(None, ["unused.test"]).key_pem
    FileStore(tmp_path / "store").save_account(url, {"uri": "https://ca.test/acct/2"}, key_pem)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert_path, key_path)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "localhost", port, ssl_context=tls).start()
    try:
        out = await run_cmd(EDGED, "check", "--config", str(config), "--preflight")
        FileStore(tmp_path / "store").save_account(url, {"uri": "https://ca.test/acct/1"}, key_pem)
        ok = await run_cmd(EDGED, "check", "--config", str(config), "--preflight")
    finally:
        await runner.cleanup()
    assert out.returncode == 1, out.stdout + out.stderr
    assert "acct.pf.test: caa: FAIL: " in out.stdout, out.stdout
    assert "allows only the ACME account https://ca.test/acct/1" in out.stdout, out.stdout
    assert "this node's https://ca.test/acct/2" in out.stdout
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "acct.pf.test: caa: ok: " in ok.stdout
