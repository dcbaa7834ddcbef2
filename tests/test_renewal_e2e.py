"""Renewal end to end against real Pebble: renewals under handshake load, kill -9 in the middle
of an order, and an expired certificate that stays served when there is no replacement."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import socket
import ssl
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from edged.certs import parse_bundle
from edged.config import load_config
from edged.renewal import INTERRUPTED, CertStatus, ari_cert_id
from edged.sources import load_site_certs
from edged.store.base import PemPair, StoredCert
from edged.store.files import FileStore
from tests.conftest import (
    Edged,
    free_port,
    peer_cn,
    run_backend,
    run_cmd,
    run_edged,
    s_client,
)
from tests.pebble import Pebble
from tests.pki import Issued, fullchain, make_ca, make_intermediate, make_leaf
from tests.test_daemon_acme import write_config

NAME = "shop.test"
NAMES = [NAME, "www.shop.test"]
EDGED = str(Path(sys.executable).with_name("edged"))
ORDER = "POST /order-plz"  # one line in Pebble's log per new order


def acme_table(directory: str, ca_bundle: Path, extra: str = "") -> str:
    return textwrap.dedent(f"""
        [acme]
        directory = "{directory}"
        ca_bundle = "{ca_bundle}"
        email = "ops@shop.test"
        key_types = ["ecdsa-p256"]
    """) + textwrap.dedent(extra)


def site_table(backend: str) -> str:
    return f'[[site]]\nnames = {json.dumps(NAMES)}\nbackend = "{backend}"\n'


async def wait_for(predicate: object, limit: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + limit
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {limit}s")
        await asyncio.sleep(0.02)


def store_cert(store: FileStore, leaf: Issued, chain: tuple[Issued, ...], source: str) -> None:
    pair = PemPair("ecdsa-p256", fullchain(leaf, *chain), leaf.key_pem)
    store.save(StoredCert(NAME, tuple(NAMES), (pair,), source, time.time()))


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


class Handshaker(threading.Thread):
    """Full TLS handshakes (a new session each time: no resumption) as fast as it can, each
    verified against `cafiles` for a random name of the site. Connection refusals before the
    first success (edged still starting) are not failures."""

    def __init__(self, port: int, cafiles: list[Path], stop: threading.Event, seed: int) -> None:
        super().__init__(daemon=True)
        self.port, self.stop, self.rng = port, stop, random.Random(seed)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, checks the hostname
        for cafile in cafiles:
            self.ctx.load_verify_locations(cafile=str(cafile))
        self.ok = 0
        self.failures: list[str] = []
        self.seen: dict[str, int] = {}  # leaf fingerprint → handshakes that got it

    def run(self) -> None:
        while not self.stop.is_set():
            name = self.rng.choice(NAMES)
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
                    self.ctx.wrap_socket(raw, server_hostname=name) as tls,
                ):
                    der = tls.getpeercert(binary_form=True)
                    assert der is not None
                    fp = fingerprint(der)
                    self.seen[fp] = self.seen.get(fp, 0) + 1
                    self.ok += 1
            except ConnectionRefusedError:
                if self.ok:
                    self.failures.append(f"{name}: connection refused")
                time.sleep(0.002)
            except (OSError, ssl.SSLError) as exc:
                self.failures.append(f"{name}: {exc!r}")


async def stop_clients(stop: threading.Event, clients: list[Handshaker]) -> None:
    stop.set()
    for client in clients:
        await asyncio.to_thread(client.join, 10)
        assert not client.is_alive()


# --- 1. renewals under load ---------------------------------------------------------------------


async def test_due_cert_renewed_by_loop_then_five_forced_renewals_under_load(
    pebble: Pebble, tmp_path: Path
) -> None:
    """A stored certificate that is due is renewed by the loop on its own (no force); then five
    forced renewals in a row. Handshakes run all along: none fails, each gets a certificate
    that verifies (the old private-CA one or one from Pebble), and every certificate served
    was seen by the clients."""
    ca = make_ca("Old CA")
    inter = make_intermediate(ca, "Old Intermediate")
    now = datetime.now(UTC)
    # 40 days of lifetime, 10 left: renew_before_days = 30 makes it due at once.
    old = make_leaf(
        inter, NAMES, not_before=now - timedelta(days=30), not_after=now + timedelta(days=10)
    )
    store_cert(FileStore(tmp_path / "store"), old, (inter,), "acme")
    old_fp = fingerprint(old.cert.public_bytes(Encoding.DER))
    (tmp_path / "old-ca.pem").write_bytes(ca.cert_pem)
    (tmp_path / "pebble-root.pem").write_bytes(pebble.root_pem())
    cafiles = [tmp_path / "old-ca.pem", tmp_path / "pebble-root.pem"]
    port = free_port()
    stop = threading.Event()
    clients = [Handshaker(port, cafiles, stop, seed) for seed in range(2)]
    for client in clients:
        client.start()
    served: list[str] = []
    try:
        async with run_backend() as backend:
            body = acme_table(pebble.directory, pebble.listener_ca) + site_table(backend.address)
            async with run_edged(tmp_path, body, port=port, http=(pebble.http_port,)) as edged:
                daemon, renewer = edged.daemon, edged.daemon.renewer

                def serving_fp() -> str:
                    bundle = daemon.serving(NAME)
                    assert bundle is not None
                    return bundle.fingerprint

                def seen(fp: str) -> bool:
                    return any(c.seen.get(fp) for c in clients)

                served.append(old_fp)
                # The natural path: the renewal loop finds the stored certificate due.
                await wait_for(lambda: serving_fp() != old_fp, what="the due renewal")
                assert daemon.counters.renewal_attempts[NAME, "success"] == 1
                served.append(serving_fp())
                await wait_for(lambda: seen(served[-1]), what="the renewed cert at a client")
                for n in range(2, 7):
                    renewer.force(NAME)
                    await wait_for(lambda: serving_fp() != served[-1], what=f"renewal {n}")
                    served.append(serving_fp())
                    await wait_for(lambda: seen(served[-1]), what=f"renewal {n} at a client")
                    assert daemon.counters.renewal_attempts[NAME, "success"] == n
                assert renewer.states[NAME].status is CertStatus.ACTIVE
                assert daemon.counters.renewal_attempts[NAME, "failure"] == 0
                await stop_clients(stop, clients)  # before edged stops listening
    finally:
        await stop_clients(stop, clients)
    failures = [f for c in clients for f in c.failures]
    total = sum(c.ok for c in clients)
    seen_fps = {fp for c in clients for fp in c.seen}
    print(f"handshakes={total} failures={len(failures)} certs={len(served)}")
    assert failures == [], failures[:10]
    assert len(set(served)) == 7  # the old one, the loop's renewal, five forced ones
    assert seen_fps <= set(served)  # every handshake got one of the served certificates
    assert set(served[1:]) <= seen_fps  # each renewal was seen (awaited above)
    assert total > 50, total


@contextlib.asynccontextmanager
async def issued_once(
    pebble: Pebble, tmp_path: Path, edged_extra: str = ""
) -> AsyncIterator[Edged]:
    """edged ordering NAME from Pebble, once its first certificate is issued and served."""
    async with run_backend() as backend:
        body = acme_table(pebble.directory, pebble.listener_ca) + site_table(backend.address)
        async with run_edged(
            tmp_path, body, http=(pebble.http_port,), edged_extra=edged_extra
        ) as edged:
            attempts = edged.daemon.counters.renewal_attempts
            await wait_for(lambda: attempts[NAME, "success"] == 1, what="the first issuance")
            yield edged


async def test_force_while_an_attempt_finishes_is_not_lost(pebble: Pebble, tmp_path: Path) -> None:
    """`edged renew` arriving while an attempt is between serving its certificate and
    recording its result starts another attempt after it (it used to be overwritten)."""
    async with issued_once(pebble, tmp_path) as edged:
        daemon, renewer = edged.daemon, edged.daemon.renewer
        successes = daemon.counters.renewal_attempts
        installed = renewer.on_installed
        forced: list[bool] = []

        async def install_then_force(name: str) -> object:
            result = await installed(name)
            if not forced:  # the operator's request lands in the attempt's last step
                forced.append(name in renewer._running)
                renewer.force(name)
            return result

        renewer.on_installed = install_then_force
        renewer.force(NAME)
        await wait_for(lambda: successes[NAME, "success"] == 3, what="the follow-up attempt")
        assert forced == [True]
        await wait_for(lambda: not renewer.states[NAME].in_flight, what="the attempt's end")
        assert renewer.states[NAME].status is CertStatus.ACTIVE
        assert successes[NAME, "success"] == 3 and successes[NAME, "failure"] == 0
        assert pebble.count(ORDER) == 3


async def test_force_while_an_attempt_waits_for_its_turn_orders_once(
    pebble: Pebble, tmp_path: Path
) -> None:
    """Five new names are due at once and four orders run at a time: the fifth waits for its
    turn. `edged renew` for it then was taken for a force during an attempt, so a second
    order followed the one it was waiting for. Its one attempt is the forced one."""
    names = [f"s{i}.shop.test" for i in range(5)]
    async with run_backend() as backend:
        sites = "".join(
            f'[[site]]\nnames = ["{name}"]\nbackend = "{backend.address}"\n' for name in names
        )
        body = acme_table(pebble.directory, pebble.listener_ca, "preflight = false\n") + sites
        async with run_edged(tmp_path, body, http=(pebble.http_port,)) as edged:
            renewer = edged.daemon.renewer
            attempts = edged.daemon.counters.renewal_attempts

            def waiting() -> list[str]:  # picked by the loop, not begun
                return [
                    n
                    for n in renewer._running
                    if n in renewer.states and not renewer.states[n].in_flight
                ]

            await wait_for(lambda: waiting(), limit=10, what="a name waiting for its turn")
            (name,) = waiting()
            renewer.force(name)
            await wait_for(
                lambda: all(attempts[n, "success"] >= 1 for n in names), what="every name issued"
            )
            await asyncio.sleep(2)  # time for a second order, had one followed
            assert attempts[name, "success"] == 1 and attempts[name, "failure"] == 0
            assert pebble.count(ORDER) == 5


async def test_an_unexpected_error_in_an_attempt_is_a_failed_attempt(
    pebble: Pebble, tmp_path: Path
) -> None:
    """An exception that is no EdgedError (a bug, input nothing foresaw) ends the attempt as a
    failure: counted, retried on the schedule, not left in flight (it used to stay in flight
    forever: never retried, `edged renew` could not unstick it)."""
    async with issued_once(pebble, tmp_path) as edged:
        daemon, renewer = edged.daemon, edged.daemon.renewer
        attempts = daemon.counters.renewal_attempts
        installed = renewer.on_installed

        async def broken(name: str) -> object:
            raise RuntimeError("a bug in installing")

        renewer.on_installed = broken
        renewer.force(NAME)
        await wait_for(lambda: attempts[NAME, "failure"] == 1, what="the failed attempt")
        state = renewer.states[NAME]
        assert not state.in_flight and state.attempts == 1
        assert "RuntimeError: a bug in installing" in str(state.last_error)
        assert state.next_try is not None
        assert state.next_try - datetime.now(UTC) > timedelta(minutes=14)  # retry_interval
        # Saved right after it is counted (in a thread): the file shows it once that is done.
        await wait_for(
            lambda: (read_state(tmp_path / "store") or {}).get("attempts") == 1,
            what="the failed attempt saved",
        )
        saved = read_state(tmp_path / "store")
        assert saved is not None and saved["in_flight"] is False
        # Not stuck: a forced retry runs and succeeds.
        renewer.on_installed = installed
        renewer.force(NAME)
        await wait_for(lambda: attempts[NAME, "success"] == 2, what="the forced retry")
        await wait_for(lambda: not renewer.states[NAME].in_flight, what="the attempt's end")
        assert renewer.states[NAME].status is CertStatus.ACTIVE


async def test_a_certificate_the_daemon_does_not_serve_is_a_failed_attempt(
    pebble: Pebble, tmp_path: Path
) -> None:
    """The attempt counts as done only when the new certificate serves: when the daemon's
    reload refuses it (here: installs nothing), the attempt failed and the old one serves.
    The store is not watched here: the watcher would read the new certificate the renewer
    saved and serve it, past the refusal this test stands in for (a real refusal refuses it
    on that path too)."""
    async with issued_once(pebble, tmp_path, edged_extra="watch = false") as edged:
        daemon, renewer = edged.daemon, edged.daemon.renewer
        attempts = daemon.counters.renewal_attempts
        old = daemon.serving(NAME)
        assert old is not None

        async def refused(name: str) -> bool:
            return False  # what Daemon.reload answers when it keeps the old certificate

        renewer.on_installed = refused
        renewer.force(NAME)
        await wait_for(lambda: attempts[NAME, "failure"] == 1, what="the failed attempt")
        state = renewer.states[NAME]
        assert attempts[NAME, "success"] == 1
        assert state.status is CertStatus.PROCESSING and state.attempts == 1
        assert "refused to serve it" in str(state.last_error)
        assert renewer.fallback_active(NAME)
        served = daemon.serving(NAME)
        assert served is not None and served.fingerprint == old.fingerprint


async def test_a_site_renamed_while_its_order_runs_drops_the_result_cleanly(
    pebble: Pebble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload that renames a site (another first name) or removes it while its order runs
    ends that name's renewal state; the attempt then recorded its result into the state that
    was gone: a KeyError, logged as a crashed attempt with a traceback, and the name's state
    file left in flight (a site named so again later counted that as an interrupted attempt).
    Now the result is saved, not in flight, and dropped from the renewal loop's states."""
    async with issued_once(pebble, tmp_path, edged_extra="watch = false") as edged:
        daemon, renewer = edged.daemon, edged.daemon.renewer
        installed = renewer.on_installed
        renamed: list[bool] = []

        async def rename_then_install(name: str) -> object:
            if not renamed:  # the reload lands while the order's certificate is installed
                text = edged.config_path.read_text()
                flipped = json.dumps(list(reversed(NAMES)))
                edged.config_path.write_text(text.replace(json.dumps(NAMES), flipped))
                renamed.append(await daemon.reload("signal"))
            return await installed(name)

        renewer.on_installed = rename_then_install
        renewer.force(NAME)
        await wait_for(lambda: renamed and NAME not in renewer._running, what="the attempt's end")
        assert renamed == [True]
        assert NAME not in renewer.states and "www.shop.test" in renewer.states
        crashed = [r for r in caplog.records if "crashed" in r.getMessage() or r.exc_info]
        assert crashed == []
        saved = read_state(tmp_path / "store")
        assert saved is not None and saved["in_flight"] is False


async def test_restart_spreads_overdue_active_certificates(pebble: Pebble, tmp_path: Path) -> None:
    """After a restart, ACTIVE names whose renewal is overdue are spread over 5 minutes like
    any resumed work. Observing their certificates (configure runs more than once at startup)
    used to make them all due at once again: every one started an order in the first second."""
    names = [f"s{i}.shop.test" for i in range(5)]
    ca = make_ca("Old CA")
    inter = make_intermediate(ca, "Old Intermediate")
    now = datetime.now(UTC)
    store = FileStore(tmp_path / "store")
    for name in names:
        # 40 days of lifetime, 10 left: overdue with renew_before_days = 30.
        leaf = make_leaf(
            inter, [name], not_before=now - timedelta(days=30), not_after=now + timedelta(days=10)
        )
        pair = PemPair("ecdsa-p256", fullchain(leaf, inter), leaf.key_pem)
        store.save(StoredCert(name, (name,), (pair,), "acme", time.time()))
        state = {
            "name": name,
            "status": "active",
            "last_success": (now - timedelta(days=30)).isoformat(),
            "next_try": (now - timedelta(days=1)).isoformat(),
            "replaces": ari_cert_id(leaf.cert),
        }
        store.save_state(name, state)
    async with run_backend() as backend:
        sites = "".join(
            f'[[site]]\nnames = ["{name}"]\nbackend = "{backend.address}"\n' for name in names
        )
        body = acme_table(pebble.directory, pebble.listener_ca) + sites
        started = datetime.now(UTC)
        async with run_edged(tmp_path, body, http=(pebble.http_port,)) as edged:
            renewer = edged.daemon.renewer
            await wait_for(lambda: all(n in renewer.states for n in names), what="states loaded")
            # Every configure of the startup is done by then, and work due at once has started.
            await asyncio.sleep(2.0)
            states = [renewer.states[n] for n in names]
            begun = [s.name for s in states if s.last_attempt is not None]
            # A spread start falls in the first 2 s for 1/150 of the names.
            assert len(begun) <= 1, f"orders started at once: {begun}"
            waiting = [s.next_try for s in states if s.last_attempt is None]
            assert all(t is not None for t in waiting)
            times = sorted(t for t in waiting if t is not None)
            assert started < times[0] and times[-1] <= started + timedelta(minutes=5, seconds=5)
            assert times[-1] - times[0] > timedelta(seconds=5), f"not spread: {times}"


async def test_a_rollback_plans_the_renewal_of_the_certificate_it_brings_back(
    pebble: Pebble, tmp_path: Path
) -> None:
    """`edged rollback` serves the previous version, which expires earlier than the one rolled
    away from: its renewal is planned for it (here: due, so renewed at once). When the store
    change reached the daemon as a change of that name alone (the watcher's usual report, a
    fleet node's message), the renewal stayed planned for the newer certificate and the one
    served could expire first: only a full reload planned it again. The store watch is off
    here so that the name's reload is the only one (the watcher reports either)."""
    ca = make_ca("Old CA")
    inter = make_intermediate(ca, "Old Intermediate")
    now = datetime.now(UTC)
    # The previous version: 40 days of lifetime, 10 left (due with renew_before_days = 30);
    # the live one: 89 days left (not due for two months).
    previous = make_leaf(
        inter, NAMES, not_before=now - timedelta(days=30), not_after=now + timedelta(days=10)
    )
    live = make_leaf(
        inter, NAMES, not_before=now - timedelta(days=1), not_after=now + timedelta(days=89)
    )
    store = FileStore(tmp_path / "store")
    store_cert(store, previous, (inter,), "acme")
    store_cert(store, live, (inter,), "acme")  # the first one becomes previous/
    async with run_backend() as backend:
        body = acme_table(pebble.directory, pebble.listener_ca) + site_table(backend.address)
        async with run_edged(
            tmp_path, body, http=(pebble.http_port,), edged_extra="watch = false"
        ) as edged:
            daemon, renewer = edged.daemon, edged.daemon.renewer
            await wait_for(lambda: NAME in renewer.states, what="the state")
            state = renewer.states[NAME]
            assert state.next_try is not None
            assert state.next_try > now + timedelta(days=58)  # planned for the live one
            out = await run_cmd(EDGED, "rollback", NAME, "--config", str(edged.config_path))
            assert out.returncode == 0, out.stderr
            daemon.request_reload("store", {NAME})  # what the watcher asks for live/NAME
            rolled = fingerprint(previous.cert.public_bytes(Encoding.DER))
            renewed = fingerprint(live.cert.public_bytes(Encoding.DER))
            await wait_for(
                lambda: getattr(daemon.serving(NAME), "fingerprint", None) not in (None, renewed),
                what="the rolled-back certificate served",
            )
            # Now due: the previous version is past its renewal time. It is renewed at once.
            await wait_for(
                lambda: daemon.counters.renewal_attempts[NAME, "success"] == 1,
                what="the renewal of the rolled-back certificate",
            )
            served = daemon.serving(NAME)
            assert served is not None and served.fingerprint not in (rolled, renewed)
            assert pebble.count(ORDER) == 1


async def test_a_wildcard_under_http_01_fails_at_once_without_an_order(
    pebble: Pebble, tmp_path: Path
) -> None:
    """CAs validate wildcards only over dns-01: under http-01 every attempt created an order,
    failed when the CA offered only dns-01, and was retried 5 times. Now the attempt fails
    before the CA is asked, FAILED at once, with the fix named, and `edged status` says so."""
    admin = f"127.0.0.1:{free_port()}"
    async with run_backend() as backend:
        site = f'[[site]]\nnames = ["{NAME}", "*.{NAME}"]\nbackend = "{backend.address}"\n'
        body = acme_table(pebble.directory, pebble.listener_ca) + site
        async with run_edged(tmp_path, body, http=(pebble.http_port,), admin=admin) as edged:
            renewer = edged.daemon.renewer
            attempts = edged.daemon.counters.renewal_attempts
            await wait_for(lambda: attempts[NAME, "failure"] >= 1, what="the failed attempt")
            state = renewer.states[NAME]
            assert state.status is CertStatus.FAILED and state.attempts == 1
            assert state.next_try is not None
            assert state.next_try - datetime.now(UTC) > timedelta(hours=23)  # daily
            error = str(state.last_error)
            for part in (NAME, f"*.{NAME}", 'acme.challenge = "dns-01"', "[acme.dns]", "upload"):
                assert part in error, part
            assert pebble.count(ORDER) == 0
            out = await run_cmd(EDGED, "status", "--json", "--config", str(edged.config_path))
            assert out.returncode == 0, out.stderr
            (cert,) = (c for c in json.loads(out.stdout)["certs"] if c["name"] == NAME)
            assert cert["state"] == "failed" and f"*.{NAME}" in str(cert["last_error"])
            assert "dns-01" in str(cert["last_error"])


# --- 2. kill -9 in the middle of an order ------------------------------------------------------


def read_state(store: Path) -> dict[str, object] | None:
    path = store / "state" / f"{NAME}.json"
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    assert isinstance(data, dict)
    return data


def stored_fingerprint(store: Path) -> str | None:
    """The store holds no certificate or a whole, valid one (never a half one)."""
    stored = FileStore(store).load(NAME)
    if stored is None:
        return None
    bundles = [parse_bundle(p.fullchain, p.privkey, source=p.key_type) for p in stored.pairs]
    assert [b.key_type for b in bundles] == ["ecdsa-p256"]
    assert set(bundles[0].names) == set(NAMES)
    return bundles[0].fingerprint


def attempt_lines(log: Path) -> list[str]:
    text = log.read_text(errors="replace")
    return [line for line in text.splitlines() if f"renewal attempt name={NAME}" in line]


class Killer(threading.Thread):
    """Sends SIGKILL to `pid` the moment its attempt is in flight (a new `last_attempt` in the
    state file) and Pebble's log, read from `offset` on, shows `needle` (None: at once), plus
    `delay` seconds. Polls every millisecond, in a thread, so the kill lands within the order
    (a whole order takes ~20 ms here)."""

    def __init__(
        self, pid: int, store: Path, pebble_log: Path, needle: str | None, before: object
    ) -> None:
        super().__init__(daemon=True)
        self.pid, self.store, self.pebble_log = pid, store, pebble_log
        self.needle, self.before = needle, before
        self.offset = pebble_log.stat().st_size
        self.delay = 0.0
        self.killed = False
        self.stop = threading.Event()

    def run(self) -> None:
        seen = ""
        in_flight = False
        while not self.stop.wait(0.001):
            if not in_flight:
                state = read_state(self.store)  # replaced atomically: never half written
                in_flight = bool(
                    state and state["in_flight"] is True and state["last_attempt"] != self.before
                )
            if self.needle in STORE_MOMENTS and in_flight:
                seen = self.needle if (self.store / self.needle).exists() else ""
            elif self.needle and in_flight:
                with self.pebble_log.open("rb") as f:
                    f.seek(self.offset)
                    seen = f.read().decode(errors="replace")
            if in_flight and (self.needle is None or self.needle in seen):
                time.sleep(self.delay)
                os.kill(self.pid, signal.SIGKILL)
                self.killed = True
                return


# Moments to kill at: as soon as the state says in_flight, when Pebble's log shows the order
# reached a step, when the store starts writing the certificate (live/ is created first) and
# when it has written it (meta.json comes last); plus a random 0-3 ms so the kill lands at
# varying points. The last moment is the latest: a kill that comes after the attempt was
# recorded ends the kill runs.
STORE_MOMENTS = ("live", f"live/{NAME}/meta.json")
KILL_AT = [None, ORDER, "POST /chalZ/", "POST /finalize-order/", "Issued certificate"]
KILL_AT += STORE_MOMENTS


async def test_kill_9_during_orders_restart_resumes_store_stays_whole(
    pebble: Pebble, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    https = free_port()
    config = write_config(
        tmp_path,
        pebble,
        pebble.http_port,
        https=https,
        body=acme_table(
            pebble.directory,
            pebble.listener_ca,
            'retry_interval = "100ms"\nmax_attempts = 20\npreflight = false\n',
        )
        + site_table("127.0.0.1:9"),
    )
    rng = random.Random(os.getpid())
    interrupted = 0
    completed = False
    last_attempt: object = None
    outcomes: list[str] = []

    async def start(run: int) -> tuple[asyncio.subprocess.Process, Path]:
        log = tmp_path / f"run{run}.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                EDGED, "run", "--config", str(config), stdout=out, stderr=out
            )
        return proc, log

    for run, needle in enumerate(KILL_AT):
        orders = pebble.count(ORDER)
        proc, log = await start(run)
        killer = Killer(proc.pid, store, pebble.workdir / "pebble.log", needle, last_attempt)
        killer.delay = rng.uniform(0, 0.003)
        killer.start()
        try:
            done = asyncio.ensure_future(proc.wait())
            await asyncio.wait({done}, timeout=20)
            assert killer.killed, f"run {run}: no attempt reached {needle!r}"
        finally:
            killer.stop.set()
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            await asyncio.to_thread(killer.join, 5)
        assert proc.returncode == -signal.SIGKILL
        fp = stored_fingerprint(store)  # nothing or a whole certificate
        outcomes.append(f"{needle or 'in_flight'}: {'whole cert' if fp else 'no cert'}")
        state = read_state(store)
        assert state is not None
        # One order per run at most: a restart does not flood the CA.
        assert pebble.count(ORDER) - orders <= 1
        # Attempts were not reset by the restarts: this is attempt number `interrupted + 1`
        # (its log line comes after the in_flight state: an early kill may precede it).
        lines = attempt_lines(log)
        assert len(lines) <= 1, lines
        assert all(line.endswith(f"attempt={interrupted + 1}") for line in lines), lines
        if not state["in_flight"]:  # the kill came after the attempt was recorded
            assert state["status"] == "active" and fp is not None
            completed = True
            break
        assert state["attempts"] == interrupted
        if interrupted:
            assert state["last_error"] == {"message": INTERRUPTED}
        interrupted += 1
        last_attempt = state["last_attempt"]

    print(f"kills inside the order: {interrupted}, after it: {int(completed)}; {outcomes}")
    assert interrupted >= 3, interrupted  # most kills land inside the order
    orders = pebble.count(ORDER)
    proc, log = await start(len(KILL_AT))
    try:
        await wait_for(
            lambda: (s := read_state(store)) is not None and s["status"] == "active",
            what="the certificate after the restart",
        )
        fp = stored_fingerprint(store)
        (tmp_path / "root.pem").write_bytes(pebble.root_pem())
        ctx = ssl.create_default_context(cafile=str(tmp_path / "root.pem"))
        served = await asyncio.to_thread(handshake_fp, https, ctx)
        assert served == fp
        state = read_state(store)
        assert state is not None and state["attempts"] == 0 and not state["in_flight"]
        lines = attempt_lines(log)
        if completed:  # nothing to resume: the certificate is served, no order
            assert lines == [] and pebble.count(ORDER) == orders, lines
        else:  # the interrupted attempt resumes: one attempt, numbered on, and one order
            assert len(lines) == 1 and lines[0].endswith(f"attempt={interrupted + 1}"), lines
            assert pebble.count(ORDER) - orders == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
    assert proc.returncode == 0


def handshake_fp(port: int, ctx: ssl.SSLContext) -> str:
    deadline = time.monotonic() + 10
    while True:
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                ctx.wrap_socket(raw, server_hostname=NAME) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                return fingerprint(der)
        except (ConnectionRefusedError, ssl.SSLError):  # not listening / no cert yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- 3. an expired certificate with no replacement ---------------------------------------------


def expired_leaf(cn: str) -> tuple[Issued, Issued, Issued]:
    ca = make_ca("Expired CA")
    inter = make_intermediate(ca, "Expired Intermediate")
    now = datetime.now(UTC)
    leaf = make_leaf(
        inter, NAMES, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1), cn=cn
    )
    return ca, inter, leaf


async def test_expired_cert_without_replacement_is_still_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a restart the only certificate of an ACME site is expired and the CA is down:
    it is served (the client decides), the error is logged with the renewal state, the
    fallback alarm is raised once renewal fails, and `edged check` still calls it an error."""
    caplog.set_level(logging.INFO)
    ca, inter, leaf = expired_leaf("expired-shop")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    store_cert(FileStore(tmp_path / "store"), leaf, (inter,), "acme")
    down = f"https://127.0.0.1:{free_port()}/dir"  # no CA there: every renewal fails
    extra = 'retry_interval = "50ms"\nmax_attempts = 2\npreflight = false\n'
    metrics = free_port()
    async with run_backend() as backend:
        body = acme_table(down, tmp_path / "ca.pem", extra) + site_table(backend.address)
        async with run_edged(tmp_path, body, metrics=f"127.0.0.1:{metrics}") as edged:
            out = await s_client(edged.port, NAME, "-CAfile", str(tmp_path / "ca.pem"))
            assert peer_cn(out.stderr) == "expired-shop", out.stderr
            assert "certificate has expired" in out.stderr  # the client's verdict
            renewer = edged.daemon.renewer
            await wait_for(lambda: renewer.fallback_active(NAME), what="the fallback alarm")
            await wait_for(lambda: renewer.states[NAME].status is CertStatus.FAILED)
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{metrics}/metrics") as response,
            ):
                text = await response.text()
            assert f'edged_cert_fallback_active{{name="{NAME}"}} 1.0' in text
            # A reload reports the error again, now with the failing renewal; it is no
            # rejection: the reload succeeds and the certificate stays served.
            assert await edged.daemon.reload("signal")
            www = await s_client(edged.port, "www.shop.test")
            assert peer_cn(www.stderr) == "expired-shop", www.stderr
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"certificate expired and still served name={NAME}" in m for m in messages)
    # Logged at every load (the state file's watcher reloads too): first and last here.
    served = [m for m in messages if m.startswith("certificate served although expired")]
    assert len(served) >= 2, served
    assert (
        "expired since" in served[0]
        and "still served because there is no replacement" in (served[0])
    )
    assert served[0].endswith("renewal state: no attempt yet"), served[0]
    assert "renewal state: failed, 2 failed attempts, last error:" in served[-1], served[-1]
    assert all(r.levelno == logging.ERROR for r in caplog.records if "although" in r.getMessage())
    check = await run_cmd(EDGED, "check", "--config", str(tmp_path / "edged.toml"))
    assert check.returncode == 1, check.stdout
    assert "the certificate expired at" in check.stdout


async def test_expired_replacement_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An expired certificate arriving in the store while a valid one serves is refused."""
    _, inter, expired = expired_leaf("expired-shop")
    valid = make_leaf(inter, NAMES, cn="valid-shop")
    store = FileStore(tmp_path / "store")
    store_cert(store, valid, (inter,), "upload")
    async with (
        run_backend() as backend,
        run_edged(tmp_path, site_table(backend.address)) as edged,
    ):
        assert peer_cn((await s_client(edged.port, NAME)).stderr) == "valid-shop"
        store_cert(store, expired, (inter,), "upload")
        await edged.daemon.reload("store")
        assert peer_cn((await s_client(edged.port, NAME)).stderr) == "valid-shop"
    assert any("refused as a replacement" in r.getMessage() for r in caplog.records)


def test_loader_keeps_expired_only_when_nothing_else(tmp_path: Path) -> None:
    """The loader's policy: strict by default (`edged check`, rollback); with keep_expired an
    expired store certificate is kept only when no key type of it is valid, and a cert_file
    is never kept."""
    _, inter, expired = expired_leaf("expired-shop")
    store = FileStore(tmp_path / "store")
    store_cert(store, expired, (inter,), "acme")
    (tmp_path / "old.pem").write_bytes(fullchain(expired, inter))
    (tmp_path / "old.key").write_bytes(expired.key_pem)
    (tmp_path / "edged.toml").write_text(
        '[edged]\nstore = "store"\n'
        + site_table("127.0.0.1:9")
        + '[[site]]\nnames = ["file.test"]\nbackend = "127.0.0.1:9"\n'
        'cert_file = "old.pem"\nkey_file = "old.key"\n'
    )
    config = load_config(tmp_path / "edged.toml")
    now = datetime.now(UTC)
    strict = load_site_certs(config, store, now)
    assert strict.bundles == {} and strict.expired == {}
    assert sum("expired at" in p.message for p in strict.errors) == 2
    kept = load_site_certs(config, store, now, keep_expired=True)
    assert list(kept.bundles) == [0] and list(kept.expired) == [0]
    assert "expired at" in " ".join(p.message for p in kept.errors)  # the cert_file one
    # A valid key type beside the expired one: only the valid one is served.
    rsa = make_leaf(inter, NAMES, key_type="rsa-2048", cn="rsa-shop")
    pairs = (
        PemPair("ecdsa-p256", fullchain(expired, inter), expired.key_pem),
        PemPair("rsa-2048", fullchain(rsa, inter), rsa.key_pem),
    )
    store.save(StoredCert(NAME, tuple(NAMES), pairs, "acme", time.time()))
    mixed = load_site_certs(config, store, now, keep_expired=True)
    assert [b.key_type for b in mixed.bundles[0]] == ["rsa-2048"] and mixed.expired == {}
    assert any(p.source.endswith(":ecdsa-p256") and "expired" in p.message for p in mixed.errors)


async def test_second_sigterm_cancels_an_order_in_progress(pebble: Pebble, tmp_path: Path) -> None:
    """SIGTERM lets an ACME order in progress go on; a second SIGTERM cancels it and edged
    exits at once, even with no connection left to abort (the order resumes at the next
    start). Pebble's HTTP-01 validation hangs here on a server that never answers."""
    validating = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        validating.set()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # never answers; returns when Pebble gives up
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", pebble.http_port)
    config = write_config(
        tmp_path,
        pebble,
        free_port(),  # edged's port 80 elsewhere: Pebble reaches `hang` instead
        https=free_port(),
        body=acme_table(pebble.directory, pebble.listener_ca, "preflight = false\n")
        + site_table("127.0.0.1:9"),
    )
    log = tmp_path / "edged.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            EDGED, "run", "--config", str(config), stdout=out, stderr=out
        )
    try:
        await asyncio.wait_for(validating.wait(), 30)
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(TimeoutError):  # the order may still finish: edged waits for it
            await asyncio.wait_for(asyncio.shield(proc.wait()), 1.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0, log.read_text()[-2000:]
        assert time.monotonic() - started < 5, log.read_text()[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()
        await asyncio.sleep(0.1)  # the handlers see their connections closed and end
    assert "SIGTERM again: aborting open connections" in log.read_text()
