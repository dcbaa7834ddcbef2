"""The daemon obtains its own certificates from real Pebble, serves them, and reports failures."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web

from edged.certs import CertBundle, stored_bundle
from edged.config import parse_config
from edged.counters import Counters
from edged.operations import DaemonOperations
from edged.renewal import CertStatus, RenewalState
from edged.store.base import PemPair, StoredCert
from edged.store.files import FileStore
from tests.conftest import (
    curl,
    free_port,
    new_renewer,
    run_backend,
    run_cmd,
    run_edged,
    s_client,
    write_process_config,
)
from tests.pebble import Pebble, start_pebble
from tests.pki import fullchain, make_ca, make_leaf


def acme_body(pebble: Pebble, backend_port: int, extra: str = "", names: str = "") -> str:
    names = names or '"shop.test", "www.shop.test"'
    return f"""
        [acme]
        directory = "{pebble.directory}"
        ca_bundle = "{pebble.listener_ca}"
        email = "ops@shop.test"
        key_types = ["ecdsa-p256", "rsa-2048"]
        {extra}
        [[site]]
        names = [{names}]
        backend = "127.0.0.1:{backend_port}"
    """


async def wait_for(predicate: object, limit: float = 15) -> None:
    deadline = time.monotonic() + limit
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_daemon_issues_at_startup_and_serves(
    pebble: Pebble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root.pem"
    async with run_backend() as backend:
        body = acme_body(pebble, backend.port)
        async with run_edged(tmp_path, body, http=(pebble.http_port,)) as edged:
            # Serving starts at once (no cert yet: handshakes refused), issuance runs beside it.
            await wait_for(lambda: edged.daemon.serving("shop.test") is not None)
            root.write_bytes(pebble.root_pem())
            for host in ("shop.test", "www.shop.test"):
                out = await curl(edged.port, host, root)
                assert out.returncode == 0, out.stderr
            # Both key types served from one context: an RSA-only client gets the RSA cert.
            rsa = await s_client(edged.port, "shop.test", "-sigalgs", "RSA-PSS+SHA256")
            assert "signature type: RSA-PSS" in rsa.stderr.replace("Signature", "signature")
            state = edged.daemon.renewer.states["shop.test"]
            assert state.status is CertStatus.ACTIVE
            assert state.next_try is not None
            stored = json.loads((tmp_path / "store" / "state" / "shop.test.json").read_text())
            assert stored["status"] == "active"
            assert edged.daemon.counters.renewal_attempts["shop.test", "success"] == 1
            assert edged.daemon.counters.acme_requests.snapshot().count > 5
            assert len(edged.daemon.board) == 0
            # The preflight before the first order warned: the names do not resolve here
            # (Pebble resolves them through its own test DNS), and the order went on anyway.
            preflight = [r.getMessage() for r in caplog.records if "preflight" in r.getMessage()]
            assert any("shop.test: points-here: FAIL" in m for m in preflight), preflight


async def test_restart_reuses_stored_cert(pebble: Pebble, tmp_path: Path) -> None:
    async with run_backend() as backend:
        body = acme_body(pebble, backend.port)
        async with run_edged(tmp_path, body, http=(pebble.http_port,)) as edged:
            await wait_for(lambda: edged.daemon.serving("shop.test") is not None)
            first = edged.daemon.serving("shop.test")
        async with run_edged(tmp_path, body, http=(pebble.http_port,)) as edged:
            served = edged.daemon.serving("shop.test")
            assert served is not None and first is not None
            assert served.fingerprint == first.fingerprint  # no new order on restart
            await asyncio.sleep(0.3)
            assert edged.daemon.counters.renewal_attempts["shop.test", "success"] == 0


async def test_a_name_added_to_a_site_keeps_the_others_served_and_is_ordered_at_once(
    pebble: Pebble, tmp_path: Path
) -> None:
    """Adding a name to a site whose certificate does not cover it: the certificate keeps
    serving the names it covers (the whole site went dark before), one for all the names is
    ordered at once and replaces it; a restart in between serves it too."""
    async with run_backend() as backend:
        body = acme_body(pebble, backend.port, names='"shop.test"')
        both = body.replace('names = ["shop.test"]', 'names = ["shop.test", "www.shop.test"]')
        assert both != body
        async with run_edged(tmp_path, body, http=(pebble.http_port,)) as edged:
            await wait_for(lambda: edged.daemon.serving("shop.test") is not None)
            first = edged.daemon.serving("shop.test")
            assert first is not None and first.names == ("shop.test",)
        # Restarted with the name added, and no [acme] (nothing can order): served.
        without_acme = both[both.index("[[site]]") :]
        async with run_edged(tmp_path, without_acme) as edged:
            served = edged.daemon.serving("shop.test")
            assert served is not None and served.fingerprint == first.fingerprint
        async with run_edged(tmp_path, body, http=(pebble.http_port,)) as edged:
            text = edged.config_path.read_text()
            added = text.replace('names = ["shop.test"]', 'names = ["shop.test", "www.shop.test"]')
            assert added != text
            edged.config_path.write_text(added)
            await edged.daemon.reload("signal")
            served = edged.daemon.serving("shop.test")
            assert served is not None and served.fingerprint == first.fingerprint
            await wait_for(
                lambda: "www.shop.test" in getattr(edged.daemon.serving("shop.test"), "names", ()),
                limit=30,
            )
            assert edged.daemon.counters.renewal_attempts["shop.test", "success"] == 1
            state = edged.daemon.renewer.states["shop.test"]
            assert state.status is CertStatus.ACTIVE


async def start_webhook_receiver() -> tuple[web.AppRunner, str, list[dict[str, object]]]:
    """An HTTP server taking notify_webhook's POSTs: (its runner to clean up, the URL, the
    JSON bodies received so far)."""
    hooks: list[dict[str, object]] = []

    async def hook(request: web.Request) -> web.Response:
        hooks.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/hook", hooks


async def test_failures_retry_then_failed_webhook_then_force(
    pebble: Pebble, tmp_path: Path
) -> None:
    """CA down: attempts fail with the real error, processing → failed after max_attempts, the
    webhook hears it; CA back + force retry → active and served."""
    runner, hook_url, hooks = await start_webhook_receiver()
    pebble.stop()  # the CA is down from the start
    extra = f'retry_interval = "50ms"\nmax_attempts = 3\nnotify_webhook = "{hook_url}"'
    try:
        async with (
            run_backend() as backend,
            run_edged(
                tmp_path, acme_body(pebble, backend.port, extra), http=(pebble.http_port,)
            ) as edged,
        ):
            renewer = edged.daemon.renewer
            await wait_for(lambda: renewer.states["shop.test"].status is CertStatus.FAILED)
            state = renewer.states["shop.test"]
            assert state.attempts == 3
            assert "cannot reach the ACME server" in str(state.last_error)
            assert edged.daemon.counters.renewal_attempts["shop.test", "failure"] == 3
            await wait_for(lambda: any(h.get("event") == "failed" for h in hooks))
            failed = next(h for h in hooks if h["event"] == "failed")
            assert failed["name"] == "shop.test" and failed["attempts"] == 3
            # The CA comes back; a forced retry works at once.
            restarted = start_pebble(tmp_path / "pebble2", http_port=pebble.http_port)
            try:
                body = edged.config_path.read_text()
                edged.config_path.write_text(
                    body.replace(pebble.directory, restarted.directory).replace(
                        str(pebble.listener_ca), str(restarted.listener_ca)
                    )
                )
                await wait_for(
                    lambda: (
                        edged.daemon.config is not None
                        and edged.daemon.config.acme is not None
                        and edged.daemon.config.acme.directory == restarted.directory
                    )
                )
                renewer.force("shop.test")
                await wait_for(lambda: renewer.states["shop.test"].status is CertStatus.ACTIVE)
                await wait_for(lambda: edged.daemon.serving("shop.test") is not None)
                await wait_for(lambda: any(h.get("event") == "recovered" for h in hooks))
            finally:
                restarted.stop()
    finally:
        await runner.cleanup()


async def test_a_webhook_being_retried_does_not_hold_up_the_exit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A notice whose webhook fails is retried after 1, 4, 16 and 64 s: a SIGTERM meanwhile
    waited for every retry (the renewal loop's task group holds the webhook tasks), so edged
    took up to 85 s to exit, past systemd's stop timeout. Now the retries end with the loop,
    and the lost notice is logged."""
    hook = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens: refused at once
    body = f"""
        [acme]
        directory = "https://127.0.0.1:{free_port()}/dir"
        email = "ops@shop.test"
        max_attempts = 1
        preflight = false
        notify_webhook = "{hook}"
        [[site]]
        names = ["shop.test"]
        backend = "127.0.0.1:9"
    """

    def logged(text: str) -> bool:
        return any(text in r.getMessage() for r in caplog.records)

    async with run_edged(tmp_path, body) as edged:
        await wait_for(lambda: logged("webhook failed"))  # the first try of the "failed" notice
        started = time.monotonic()
        edged.daemon.request_stop()
        assert await asyncio.wait_for(edged.task, 30) == 0
        assert time.monotonic() - started < 5
    assert logged("webhook not sent, edged is stopping")


async def test_an_attempt_a_restart_interrupted_into_failed_is_notified(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An attempt in flight when edged stopped counts as failed at the next start; when that
    uses up max_attempts the name is FAILED, which is notified like any transition to failed
    (log and webhook). It was not: no notice ever came for that name."""
    runner, hook_url, hooks = await start_webhook_receiver()
    state = {
        "name": "shop.test",
        "status": "processing",
        "attempts": 2,
        "last_attempt": "2026-01-01T00:00:00Z",
        "in_flight": True,
        "last_error": {"message": "an earlier failure"},
    }
    (tmp_path / "store" / "state").mkdir(parents=True)
    (tmp_path / "store" / "state" / "shop.test.json").write_text(json.dumps(state))
    body = f"""
        [acme]
        directory = "https://127.0.0.1:{free_port()}/dir"
        email = "ops@shop.test"
        max_attempts = 3
        notify_webhook = "{hook_url}"
        [[site]]
        names = ["shop.test"]
        backend = "127.0.0.1:9"
    """
    try:
        async with run_edged(tmp_path, body) as edged:
            renewer = edged.daemon.renewer
            await wait_for(lambda: hooks)
            state_now = renewer.states["shop.test"]
            assert state_now.status is CertStatus.FAILED and state_now.attempts == 3
            (notice,) = hooks
            assert notice["event"] == "failed" and notice["attempts"] == 3
            assert notice["error"] == {"message": "interrupted by restart"}
            assert edged.daemon.counters.renewal_attempts["shop.test", "failure"] == 1
            await asyncio.sleep(1.5)  # a reload, the next loop rounds: no second notice
            assert await edged.daemon.reload("signal")
            await asyncio.sleep(0.5)
            assert len(hooks) == 1
        assert any(
            "renewal failed name=shop.test state=failed" in r.getMessage() for r in caplog.records
        )
    finally:
        await runner.cleanup()


async def test_two_configures_at_once_resume_a_state_once(tmp_path: Path) -> None:
    """configure() runs for each full reload and, once the store has been read, for the
    renewal loop's start, which does not wait for a reload (a fleet's first resync comes
    right then). Two at once each loaded a name that was new to them and resumed it: an
    interrupted attempt counted twice (and notified twice). Now they take turns."""
    state = {
        "name": "shop.test",
        "status": "processing",
        "attempts": 1,
        "last_attempt": "2026-01-01T00:00:00Z",
        "in_flight": True,
    }
    store = FileStore(tmp_path / "store")
    store.save_state("shop.test", state)
    config = parse_config(
        f"""
        [edged]
        store = "store"
        [acme]
        directory = "https://127.0.0.1:{free_port()}/dir"
        email = "ops@shop.test"
        [[site]]
        names = ["shop.test"]
        backend = "127.0.0.1:9"
        """,
        tmp_path / "edged.toml",
    )

    counters = Counters()
    renewer = new_renewer(counters=counters)
    await asyncio.gather(renewer.configure(config, store), renewer.configure(config, store))
    assert renewer.states["shop.test"].attempts == 2
    assert counters.renewal_attempts["shop.test", "failure"] == 1
    saved = store.load_state("shop.test")
    assert saved is not None and saved["attempts"] == 2


async def test_renew_during_a_rate_limit_says_when_the_attempt_starts(tmp_path: Path) -> None:
    """`edged renew` keeps a CA's rate limit (trying earlier only fails): the attempt starts
    when it ends. The command waited 90 s for an attempt that could not start, then said
    "renewal started; `edged status` shows the result". Now it answers at once with the time."""
    limit = datetime.now(UTC) + timedelta(hours=2)
    state = {
        "name": "shop.test",
        "status": "processing",
        "attempts": 1,
        "last_attempt": (limit - timedelta(hours=3)).isoformat(),
        "next_try": limit.isoformat(),
        "not_before_retry": limit.isoformat(),
        "last_error": {"type": "urn:ietf:params:acme:error:rateLimited", "detail": "too many"},
    }
    (tmp_path / "store" / "state").mkdir(parents=True)
    (tmp_path / "store" / "state" / "shop.test.json").write_text(json.dumps(state))
    body = f"""
        [acme]
        directory = "https://127.0.0.1:{free_port()}/dir"
        email = "ops@shop.test"
        [[site]]
        names = ["shop.test"]
        backend = "127.0.0.1:9"
    """
    async with run_edged(tmp_path, body) as edged:
        renewer = edged.daemon.renewer
        await wait_for(lambda: "shop.test" in renewer.states)
        answer = await asyncio.wait_for(DaemonOperations(edged.daemon).renew("shop.test"), 10)
        assert answer["state"] == "processing"
        message = str(answer["message"])
        assert "rate limit" in message and limit.strftime("%Y-%m-%d %H:%M") in message
        forced = renewer.states["shop.test"]
        assert forced.attempts == 0 and forced.next_try == forced.not_before_retry


EDGED = str(Path(sys.executable).with_name("edged"))


def write_config(
    tmp_path: Path, pebble: Pebble, http_port: int, *, https: int = 0, body: str = ""
) -> Path:
    """Config for edged as a process; `body` defaults to the Pebble-backed shop.test site."""
    return write_process_config(
        tmp_path, body or acme_body(pebble, 9), https=https, http=(http_port,)
    )


async def test_cli_issue_one_shot(pebble: Pebble, tmp_path: Path) -> None:
    config = write_config(tmp_path, pebble, pebble.http_port)
    out = await run_cmd(EDGED, "issue", "www.shop.test", "--config", str(config), limit=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "shop.test: issued for shop.test, www.shop.test; key types ecdsa-p256, rsa-2048" in (
        out.stdout
    )
    assert (tmp_path / "store" / "live" / "shop.test" / "meta.json").exists()
    check = await run_cmd(EDGED, "check", "--config", str(config))
    assert check.returncode == 0, check.stdout


async def test_cli_issue_port_busy_points_to_renew(pebble: Pebble, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = write_config(tmp_path, pebble, busy.getsockname()[1])
        out = await run_cmd(EDGED, "issue", "shop.test", "--config", str(config))
    assert out.returncode == 1
    assert "cannot listen on 127.0.0.1" in out.stdout
    assert "edged renew NAME" in out.stdout


async def test_cli_issue_reports_ca_error(pebble: Pebble, tmp_path: Path) -> None:
    config = write_config(tmp_path, pebble, free_port())  # Pebble cannot reach this port
    out = await run_cmd(EDGED, "issue", "shop.test", "--config", str(config), limit=60)
    assert out.returncode == 1
    assert "shop.test: not issued:" in out.stdout
    assert "urn:ietf:params:acme:error:" in out.stdout or "connection" in out.stdout.lower()
    assert not (tmp_path / "store" / "live" / "shop.test").exists()


@pytest.mark.parametrize("in_thread", [False, True])
async def test_many_names_are_planned_off_the_event_loop_alike(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    in_thread: bool,
) -> None:
    """configure() plans every managed name's renewal from the certificate it serves; from
    OBSERVE_IN_THREAD names on in a thread (100k names: ~0.5 s the data path would wait
    for). Both ways plan the same: each name active, due before its certificate's renewal
    time, replacing the certificate served. Nothing is written for them: a new name's state
    records nothing a read of its absent state does not give (100k new names were minutes of
    writes at a node's first start), and the plan is made again from the certificate at each
    start."""
    import edged.renewer as renewer_module

    monkeypatch.setattr(renewer_module, "OBSERVE_IN_THREAD", 5 if in_thread else 10_000)
    names = [f"n{i}.plan.test" for i in range(12)]
    ca = make_ca("plan CA")
    served = {}
    for name in names:
        leaf = make_leaf(ca, [name], not_after=datetime.now(UTC) + timedelta(days=90))
        served[name] = stored_bundle(fullchain(leaf, ca), leaf.key_pem, "ecdsa-p256", source=name)
    config = parse_config(
        f"""
        [edged]
        store = "store"
        [acme]
        directory = "https://127.0.0.1:{free_port()}/dir"
        email = "ops@plan.test"
        """
        + "".join(f'[[site]]\nnames = ["{n}"]\nbackend = "127.0.0.1:9"\n' for n in names),
        tmp_path / "edged.toml",
    )

    renewer = new_renewer(served.get)
    store = FileStore(tmp_path / "store")
    with caplog.at_level(logging.INFO, logger="edged.renewal"):
        await renewer.configure(config, store)
    assert f"renewal planned names={len(names)} seconds=" in caplog.text
    assert all(store.load_state(name) is None for name in names)
    now = datetime.now(UTC)
    for name in names:
        state = renewer.states[name]
        assert state.status == CertStatus.ACTIVE, state
        assert state.replaces == served[name].ari_id != ""
        assert state.next_try is not None
        assert now < state.next_try < served[name].not_after - timedelta(days=20)


@pytest.mark.parametrize("in_thread", [False, True])
async def test_the_loops_look_at_many_names_is_made_off_the_event_loop_alike(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, in_thread: bool
) -> None:
    """Each wake of the renewal loop looks at every state (what is due, when to wake next,
    expiry); from OBSERVE_IN_THREAD names on in a thread (100k names: ~0.3 s at every wake).
    Both ways find the expired certificate still served, log it and send its notice once, and
    none of the others."""
    import edged.renewer as renewer_module

    monkeypatch.setattr(renewer_module, "OBSERVE_IN_THREAD", 5 if in_thread else 10_000)
    caplog.set_level(logging.WARNING, logger="edged.renewal")
    now = datetime.now(UTC)
    ca = make_ca("loop CA")
    fresh = make_leaf(ca, ["fresh.test"], not_after=now + timedelta(days=60))
    old = make_leaf(
        ca, ["old.test"], not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
    )
    bundles = {
        "fresh": stored_bundle(fullchain(fresh, ca), fresh.key_pem, "ecdsa-p256", source="f"),
        "old": stored_bundle(fullchain(old, ca), old.key_pem, "ecdsa-p256", source="o"),
    }
    names = [f"n{i}.loop.test" for i in range(12)]
    on_loop: list[bool] = []

    def serving(name: str) -> CertBundle:
        on_loop.append(threading.current_thread() is threading.main_thread())
        return bundles["old" if name == names[3] else "fresh"]

    renewer = new_renewer(serving)
    for name in names:
        failing = name == names[3]
        renewer.states[name] = RenewalState(
            name,
            CertStatus.FAILED if failing else CertStatus.ACTIVE,
            attempts=5 if failing else 0,
            last_success=now - timedelta(days=1),
            next_try=now + timedelta(days=1),
            failing_since=now - timedelta(days=1) if failing else None,
        )
    stop = asyncio.Event()
    task = asyncio.create_task(renewer.run(stop))
    try:
        await wait_for(lambda: renewer.states[names[3]].last_expiry_notice is not None)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert set(on_loop) == {not in_thread}
    messages = [r.getMessage() for r in caplog.records]
    expired = [m for m in messages if m.startswith("certificate expired and still served")]
    notices = [m for m in messages if m.startswith("certificate notice")]
    assert len(expired) == 1 and f"name={names[3]}" in expired[0], messages
    assert len(notices) == 1 and "event=expired" in notices[0], notices
    assert all(renewer.states[n].last_expiry_notice is None for n in names if n != names[3])


def test_a_plan_made_meanwhile_does_not_overwrite_a_newer_state() -> None:
    """Plans made in a thread are installed only where the state is still the one planned
    from: an attempt that ended meanwhile keeps its own record."""
    renewer = new_renewer()
    a, b = RenewalState.new("a.test"), RenewalState.new("b.test")
    renewer.states = {"a.test": a, "b.test": b}
    observed = dict(renewer.states)
    newer = replace(b, attempts=3)
    renewer.states["b.test"] = newer  # an attempt ended while the plans were made
    planned = {"a.test": replace(a, attempts=1), "b.test": replace(b, attempts=1)}
    renewer._install(observed, planned)
    assert renewer.states["a.test"].attempts == 1
    assert renewer.states["b.test"] is newer


async def test_an_upload_found_by_the_orders_write_is_served_and_ends_acme_management(
    pebble: Pebble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An upload that lands right before a renewal's write (another node's, whose message
    has not arrived; here without a store watcher): the write keeps it and the daemon reads
    it at once: it serves the upload, and the name leaves ACME management without a failed
    attempt (it was counted as one, retried every retry_interval with a new order, while the
    upload waited for a full reload to be served)."""
    from tests.test_acme import UploadBeforeWrite

    caplog.set_level(logging.INFO, "edged.renewal")
    ca = make_ca("Own CA")
    own = make_leaf(ca, ["shop.test", "www.shop.test"], cn="uploaded")
    upload = StoredCert(
        "shop.test",
        ("shop.test", "www.shop.test"),
        (PemPair("ecdsa-p256", own.cert_pem, own.key_pem),),
        "upload",
        time.time(),
    )

    class RacingFiles(FileStore):
        def save_unless_upload(self, cert: StoredCert) -> StoredCert | None:
            race.land()
            return super().save_unless_upload(cert)

    async with run_backend() as backend:
        body = acme_body(pebble, backend.port)
        async with run_edged(
            tmp_path, body, http=(pebble.http_port,), edged_extra="watch = false"
        ) as edged:
            renewer = edged.daemon.renewer
            await wait_for(lambda: renewer.states["shop.test"].status is CertStatus.ACTIVE)
            store = RacingFiles(tmp_path / "store")
            race = UploadBeforeWrite(upload, FileStore(tmp_path / "store").save)
            renewer.store = store  # the next order's write meets the upload
            renewer.force("shop.test")
            await wait_for(lambda: "shop.test" not in renewer.states)
            served = edged.daemon.serving("shop.test")
            assert served is not None and served.leaf == own.cert
            attempts = edged.daemon.counters.renewal_attempts
            assert attempts["shop.test", "failure"] == 0, renewer.states.get("shop.test")
            lines = [r.getMessage() for r in caplog.records]
            assert any("left ACME management" in m for m in lines), lines


async def test_an_upload_read_during_the_background_fill_makes_no_name_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large store is read in the background after start and the renewal loop is planned
    once it has been (a site not read yet looks like one without a certificate). An upload
    read meanwhile by a reload of its name alone (another node's, the store watcher's) must
    not plan renewals then: it did, and every ACME name not read yet was planned as having
    no certificate, due at once, and stayed so: the loop, once started, ordered them all."""
    from edged import daemon as daemon_module

    monkeypatch.setattr(daemon_module, "LAZY_MIN", 2)
    monkeypatch.setattr(daemon_module, "FILL_BATCH", 1)
    ca = make_ca("Fill CA")
    names = ["a.fill.test", "b.fill.test", "c.fill.test"]
    store = FileStore(tmp_path / "store")
    now = datetime.now(UTC)
    for name in names:
        made = make_leaf(ca, [name])
        pair = PemPair("ecdsa-p256", fullchain(made), made.key_pem)
        store.save(StoredCert(name, (name,), (pair,), "acme", time.time()))
        renewed = RenewalState(
            name,
            CertStatus.ACTIVE,
            last_success=now - timedelta(days=1),
            last_attempt=now - timedelta(days=1),
            next_try=now + timedelta(days=40),
        )
        store.save_state(name, renewed.to_json())
    upload = make_leaf(ca, [names[0]], cn="uploaded")
    upload_pair = PemPair("ecdsa-p256", fullchain(upload), upload.key_pem)

    held, release = threading.Event(), threading.Event()
    real_load = FileStore.load

    def load(self: FileStore, name: str) -> StoredCert | None:
        if name == names[1] and not release.is_set():  # the fill's read of b waits
            held.set()
            release.wait(10)
        return real_load(self, name)

    monkeypatch.setattr(FileStore, "load", load)
    sites = "".join(f'[[site]]\nnames = ["{n}"]\nbackend = "127.0.0.1:9"\n' for n in names)
    body = f"""
        [acme]
        directory = "https://127.0.0.1:{free_port()}/directory"
        email = "ops@fill.test"
        {sites}
    """
    async with run_edged(tmp_path, body, edged_extra="watch = false") as edged:
        daemon = edged.daemon
        try:
            assert await asyncio.to_thread(held.wait, 10)
            store.save(StoredCert(names[0], (names[0],), (upload_pair,), "upload", time.time()))
            assert await daemon.reload("store", {names[0]})
        finally:
            release.set()
        await asyncio.wait_for(daemon._filled.wait(), 10)
        renewer = daemon.renewer
        await wait_for(lambda: renewer._stop is daemon._stop)  # the loop runs
        assert names[0] not in renewer.states
        for name in names[1:]:
            state = renewer.states[name]
            assert state.status is CertStatus.ACTIVE, state
            assert state.next_try is not None and state.next_try > now + timedelta(days=1), state
