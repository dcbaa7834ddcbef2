"""Worker processes (`[edged] workers` > 1): every worker serves, certificate and config changes
reach all of them, a killed worker is replaced, /metrics sums them, TLS 1.3 tickets resume on
any worker, ticket key rotation swaps the workers without failing a handshake, SIGTERM stops
them all.

edged runs as a real process here: workers are forked by the zygote, which must be created
before an event loop exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edged.daemon import LAZY_MIN
from edged.pemshare import REPACK_MIN_BYTES
from edged.store.base import PemPair
from edged.workers import KILL_WAIT, MAX_RETIRING, READY_TIMEOUT, ZYGOTE_EXIT_WAIT
from tests.conftest import (
    Backend,
    edged_backlog,
    free_port,
    listen_backlogs,
    run_backend,
    spawn_edged,
)
from tests.many_certs import many_sites_config, write_many
from tests.pki import Issued, make_ca, make_leaf, write_pair
from tests.test_pemshare import pem_segments

NAME = "w.example.test"


@dataclass
class Running:
    proc: asyncio.subprocess.Process
    port: int
    admin: int
    metrics: int
    config: Path

    def get(self, port: int, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return str(resp.read().decode())

    def status(self) -> dict[str, object]:
        data = json.loads(self.get(self.admin, "/status"))
        assert isinstance(data, dict)
        return data

    def workers(self) -> list[dict[str, object]]:
        found = self.status()["workers"]
        assert isinstance(found, list)
        return found

    def metric(self, line_start: str) -> float:
        for line in self.get(self.metrics, "/metrics").splitlines():
            if line.startswith(line_start + " "):
                return float(line.split()[-1])
        return 0.0


async def wait_for(predicate: Callable[[], object], what: str, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = await asyncio.to_thread(predicate)
            if last:
                return
        except OSError as exc:  # not up yet
            last = exc
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@contextlib.asynccontextmanager
async def run_workers(
    tmp_path: Path,
    sites: str,
    workers: int = 2,
    tls_extra: str = "",
    drain: float = 2,
    https: list[str] | None = None,
    edged_extra: str = "",
    log: Path | None = None,
) -> AsyncIterator[Running]:
    port, admin, metrics = free_port(), free_port(), free_port()
    listen = json.dumps(https if https is not None else [f"127.0.0.1:{port}"])
    config = tmp_path / "edged.toml"
    config.write_text(
        f"""
[edged]
store = "store"
workers = {workers}
drain_timeout = {drain}
{edged_extra}
[listen]
https = {listen}
http = []
metrics = "127.0.0.1:{metrics}"
admin = "127.0.0.1:{admin}"
[tls]
alpn = ["http/1.1"]
{tls_extra}
{sites}
"""
    )
    edged_bin = str(Path(sys.executable).with_name("edged"))
    if log is None:
        proc = await asyncio.create_subprocess_exec(edged_bin, "run", "--config", str(config))
    else:
        proc = await spawn_edged(config, log)
    running = Running(proc, port, admin, metrics, config)
    try:
        await wait_for(
            lambda: sum(1 for w in running.workers() if w["ready"]) == workers, "workers up"
        )
        yield running
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)


def client_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def fetch(
    port: int,
    ctx: ssl.SSLContext,
    name: str = NAME,
    session: ssl.SSLSession | None = None,
    host: str = "127.0.0.1",
) -> tuple[str, bool, ssl.SSLSession | None]:
    """One request through edged: (certificate CN, session reused?, the session to reuse)."""
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=name, session=session) as tls,
    ):
        body = request(tls, name, close=True)
        assert body.startswith(b"HTTP/1.1 200"), body[:100]
        cert = tls.getpeercert()
        assert cert is not None
        cn = next(v for rdn in cert["subject"] for k, v in rdn if k == "commonName")
        return str(cn), tls.session_reused, tls.session


def request(tls: ssl.SSLSocket, name: str = NAME, *, close: bool = False) -> bytes:
    """One HTTP/1.1 request on an open connection: the whole response."""
    connection = "Connection: close\r\n" if close else ""
    tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\n{connection}\r\n".encode())
    body = b""
    while b"\r\n\r\n" not in body or len(body) < _expected(body):
        chunk = tls.recv(65536)
        if not chunk:
            break
        body += chunk
    return body


def _expected(response: bytes) -> int:
    """The length of a whole response (headers + Content-Length body) once headers are in."""
    head, _, _ = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":", 1)[1])
    return len(response)


def site(backend: str, cert: Path, key: Path, name: str = NAME) -> str:
    return (
        f'[[site]]\nnames = ["{name}"]\nbackend = "{backend}"\n'
        f'cert_file = "{cert}"\nkey_file = "{key}"\n'
    )


@contextlib.asynccontextmanager
async def one_site(
    tmp_path: Path, stem: str = "v1", **options: Any
) -> AsyncIterator[tuple[Running, Issued, Path, Path, Backend]]:
    """edged with workers (`options` for run_workers) serving NAME with a "v1" certificate
    written as `stem`.crt/.key, its CA in tmp_path/ca.pem (what clients trust): (edged, the
    CA, the cert and key files, the backend)."""
    ca = make_ca("Workers CA")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    cert, key = issue(ca, tmp_path, stem, "v1")
    async with (
        run_backend() as backend,
        run_workers(tmp_path, site(backend.address, cert, key), **options) as e,
    ):
        yield e, ca, cert, key, backend


def issue(ca: Issued, tmp_path: Path, stem: str, cn: str, name: str = NAME) -> tuple[Path, Path]:
    return write_pair(tmp_path, stem, make_leaf(ca, [name], cn=cn))


async def add_site(
    e: Running, ca: Issued, tmp_path: Path, backend: Backend, ctx: ssl.SSLContext
) -> Callable[[], bool]:
    """Add a site for x.example.test (CN "other") to the config, reload it by SIGHUP and wait
    until every worker serves it; returns the check that they all do."""
    other = "x.example.test"
    o_cert, o_key = issue(ca, tmp_path, "other", "other", name=other)
    with e.config.open("a") as f:
        f.write(site(backend.address, o_cert, o_key, name=other))
    e.proc.send_signal(signal.SIGHUP)

    def all_other() -> bool:
        try:
            return all(fetch(e.port, ctx, name=other)[0] == "other" for _ in range(20))
        except ssl.SSLError:
            return False

    await wait_for(all_other, "every worker to serve the new site")
    return all_other


async def test_workers_serve_and_metrics_sum_over_them(tmp_path: Path) -> None:
    async with one_site(tmp_path) as (e, *_):
        ctx = client_context(tmp_path / "ca.pem")
        for _ in range(40):
            cn, _, _ = await asyncio.to_thread(fetch, e.port, ctx)
            assert cn == "v1"
        # Counters reach the main process once a second; both workers took connections
        # (SO_REUSEPORT spreads them by source port).
        await wait_for(
            lambda: e.metric('edged_tls_handshakes_total{result="ok",version="TLSv1.3"}') == 40,
            "/metrics to count 40 handshakes",
        )
        workers = await asyncio.to_thread(e.workers)
        assert len(workers) == 2
        assert {w["slot"] for w in workers} == {0, 1}
        assert all(int(str(w["handshakes_ok"])) > 0 for w in workers), workers
        assert sum(int(str(w["handshakes_ok"])) for w in workers) == 40
        pids = {int(str(w["pid"])) for w in workers}
        assert e.proc.pid not in pids and len(pids) == 2
        assert e.metric("edged_connections_total") == 40
        # Each worker's SO_REUSEPORT socket keeps the large accept queue.
        expected = await edged_backlog()
        assert await listen_backlogs(e.port) == [expected, expected]


async def test_cert_and_config_changes_reach_every_worker(tmp_path: Path) -> None:
    async with one_site(tmp_path, "live") as (e, ca, cert, key, backend):
        ctx = client_context(tmp_path / "ca.pem")
        # A renewed certificate (files replaced): the main process reloads and sends it on.
        new_cert, new_key = issue(ca, tmp_path, "next", "v2")
        os.replace(new_key, key)
        os.replace(new_cert, cert)

        def all_new() -> bool:
            return all(fetch(e.port, ctx)[0] == "v2" for _ in range(20))

        await wait_for(all_new, "every worker to serve v2")
        await add_site(e, ca, tmp_path, backend, ctx)  # a config change by SIGHUP
        assert await asyncio.to_thread(all_new)


async def test_killed_worker_is_replaced(tmp_path: Path) -> None:
    async with one_site(tmp_path) as (e, *_):
        ctx = client_context(tmp_path / "ca.pem")
        before = await asyncio.to_thread(e.workers)
        victim = int(str(before[0]["pid"]))
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            now = e.workers()
            pids = {int(str(w["pid"])) for w in now if w["ready"]}
            return len(pids) == 2 and victim not in pids

        await wait_for(replaced, "a new worker in place of the killed one")
        assert e.metric("edged_worker_restarts_total") == 1
        for _ in range(20):
            cn, _, _ = await asyncio.to_thread(fetch, e.port, ctx)
            assert cn == "v1"
        assert e.proc.returncode is None


async def test_a_replacement_worker_gets_the_config_changed_since_the_fork(
    tmp_path: Path,
) -> None:
    """New workers take the config from the zygote's memory while it is the one served
    (edged.ipc.FORKED_CONFIG: test_killed_worker_is_replaced serves that way); after a change
    the zygote's copy is stale, and a replacement must get the new one: it serves a site added
    by the change."""
    async with one_site(tmp_path) as (e, ca, _, _, backend):
        ctx = client_context(tmp_path / "ca.pem")
        all_other = await add_site(e, ca, tmp_path, backend, ctx)
        for victim in [int(str(w["pid"])) for w in await asyncio.to_thread(e.workers)]:
            os.kill(victim, signal.SIGKILL)

            def replaced(victim: int = victim) -> bool:
                pids = {int(str(w["pid"])) for w in e.workers() if w["ready"]}
                return len(pids) == 2 and victim not in pids

            await wait_for(replaced, "a new worker in place of the killed one")
        assert e.metric("edged_worker_restarts_total") == 2
        assert await asyncio.to_thread(all_other)  # only replacements serve now
        for _ in range(10):
            cn, _, _ = await asyncio.to_thread(fetch, e.port, ctx)
            assert cn == "v1"


async def test_tickets_resume_across_workers_and_rotation(tmp_path: Path) -> None:
    async with one_site(tmp_path) as (e, *_):
        ctx = client_context(tmp_path / "ca.pem")
        _, reused, session = await asyncio.to_thread(fetch, e.port, ctx)
        assert not reused and session is not None
        # 20 resumptions from new source ports: with two workers, all landing on the one
        # that issued the ticket has probability 2**-20; every one must resume.
        results = [
            (await asyncio.to_thread(fetch, e.port, ctx, NAME, session))[1] for _ in range(20)
        ]
        assert all(results), results

    # Rotation: a short interval, handshakes running throughout.
    async with one_site(tmp_path, tls_extra='ticket_key_rotation = "2s"') as (e, *_):
        ctx = client_context(tmp_path / "ca.pem")
        _, _, session = await asyncio.to_thread(fetch, e.port, ctx)
        first = {int(str(w["pid"])) for w in await asyncio.to_thread(e.workers)}
        stop = threading.Event()
        failures: list[str] = []
        done = [0]

        def load() -> None:
            while not stop.is_set():
                try:
                    fetch(e.port, ctx)
                    done[0] += 1
                except (OSError, AssertionError) as exc:
                    failures.append(repr(exc))

        thread = threading.Thread(target=load)
        thread.start()
        try:
            await wait_for(
                lambda: e.metric("edged_tls_ticket_key_rotations_total") >= 2,
                "two rotations",
            )
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 15)
        assert failures == [], failures[:5]
        assert done[0] > 10
        now = {int(str(w["pid"])) for w in await asyncio.to_thread(e.workers)}
        assert now.isdisjoint(first), (first, now)
        _, reused, _ = await asyncio.to_thread(fetch, e.port, ctx, NAME, session)
        assert not reused  # new keys: the old ticket no longer decrypts


async def test_second_sigterm_aborts_the_workers_drain(tmp_path: Path) -> None:
    """SIGTERM: the workers drain (up to drain_timeout, 60 s here, while a client keeps its
    connection open); a second SIGTERM makes them abort it and the whole service exits."""
    async with one_site(tmp_path, drain=60) as (e, *_):
        ctx = client_context(tmp_path / "ca.pem")
        raw = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", e.port), 10)
        held = await asyncio.to_thread(ctx.wrap_socket, raw, server_hostname=NAME)
        try:
            await wait_for(lambda: e.metric("edged_connections_active") == 1, "held connection")
            e.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.5)
            assert e.proc.returncode is None  # draining: the held connection may finish
            started = time.monotonic()
            e.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(e.proc.wait(), 15) == 0
            assert time.monotonic() - started < 10  # not the 60 s drain
        finally:
            held.close()


async def test_sigterm_stops_every_worker(tmp_path: Path) -> None:
    async with one_site(tmp_path) as (e, *_):
        pids = [int(str(w["pid"])) for w in await asyncio.to_thread(e.workers)]
        e.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(e.proc.wait(), 20) == 0
        for pid in pids:  # the workers are not our children: look them up in /proc
            assert await asyncio.to_thread(process_gone, pid), pid
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", e.port)) != 0


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler installed for `sig` (SigCgt in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


async def test_sigterm_while_starting_is_caught(tmp_path: Path) -> None:
    """A SIGTERM while edged is still starting (here: reading a large store before it
    listens, as with `preread = false`) is caught, not fatal: edged finishes starting, stops,
    exits 0 and leaves no worker behind."""
    ca = make_ca("Slow start CA")
    leaf = make_leaf(ca, ["*.slow.test"], cn="slow")
    names = [f"n{i}.slow.test" for i in range(LAZY_MIN + 2000)]
    await asyncio.to_thread(
        write_many, tmp_path / "store", names, [PemPair("ecdsa-p256", leaf.cert_pem, leaf.key_pem)]
    )
    port = free_port()
    config = tmp_path / "edged.toml"
    config.write_text(
        f'[edged]\nstore = "store"\nworkers = 2\ndrain_timeout = 2\n'
        f'[listen]\nhttps = ["127.0.0.1:{port}"]\nhttp = []\nmetrics = ""\nadmin = ""\n'
        f"[tls]\npreread = false\n" + many_sites_config(names, "127.0.0.1:9")
    )
    log = tmp_path / "edged.log"
    proc = await spawn_edged(config, log)
    try:
        await wait_for(lambda: catches(proc.pid, signal.SIGTERM), "a SIGTERM handler", 60)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0, log.read_text()[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = log.read_text()
    stopping, ready = text.find("SIGTERM: stopping"), text.find("edged ready")
    assert 0 <= stopping < ready, text[-2000:]  # caught while still starting
    assert "edged stopped" in text
    leftovers = [
        pid
        for pid in os.listdir("/proc")
        if pid.isdigit() and not process_gone(int(pid)) and str(config) in _cmdline(pid)
    ]
    assert leftovers == []


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def process_gone(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split(") ", 1)[1].startswith("Z")  # a zombie has exited
    except FileNotFoundError:
        return True


async def test_large_store_indexed_in_background_serves_every_name_on_every_worker(
    tmp_path: Path,
) -> None:
    """From LAZY_MIN store sites on, workers come up before the store is read: a name asked
    for first is fetched at once (from whichever worker the client lands on), the rest fills
    in behind."""
    ca = make_ca("Workers CA")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    leaf = make_leaf(ca, ["*.lazy.test"], cn="lazy-wildcard")
    names = [f"n{i}.lazy.test" for i in range(LAZY_MIN + 500)]
    await asyncio.to_thread(
        write_many, tmp_path / "store", names, [PemPair("ecdsa-p256", leaf.cert_pem, leaf.key_pem)]
    )
    async with (
        run_backend() as backend,
        run_workers(tmp_path, many_sites_config(names, backend.address)) as e,
    ):
        ctx = client_context(tmp_path / "ca.pem")
        rng = random.Random(5)
        for name in rng.sample(names, 20):  # at once: most are still pending
            cn, _, _ = await asyncio.to_thread(fetch, e.port, ctx, name)
            assert cn == "lazy-wildcard"
        await wait_for(
            lambda: e.metric('edged_tls_handshakes_total{result="ok",version="TLSv1.3"}') == 20,
            "the 20 handshakes counted",
        )
        assert e.metric('edged_tls_handshakes_total{result="no_cert",version="none"}') == 0


async def test_lost_zygote_stops_edged_with_status_1(tmp_path: Path) -> None:
    """Without the zygote no worker could ever be replaced: edged drains and exits 1, so the
    service manager (Restart=on-failure) starts it afresh."""
    async with one_site(tmp_path) as (e, *_):
        # The main process's only child is the zygote (the workers are the zygote's children).
        children = Path(f"/proc/{e.proc.pid}/task/{e.proc.pid}/children")
        zygote = [int(p) for p in (await asyncio.to_thread(children.read_text)).split()]
        assert len(zygote) == 1, zygote
        workers = {int(str(w["pid"])) for w in await asyncio.to_thread(e.workers)}
        assert zygote[0] not in workers
        os.kill(zygote[0], signal.SIGKILL)
        assert await asyncio.wait_for(e.proc.wait(), 20) == 1
        for pid in workers:
            assert await asyncio.to_thread(process_gone, pid), pid


async def held_connection(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """A TLS connection with one request answered, left open."""
    raw = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), 10)
    held = await asyncio.to_thread(ctx.wrap_socket, raw, server_hostname=NAME)
    assert (await asyncio.to_thread(request, held)).startswith(b"HTTP/1.1 200")
    return held


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


async def test_sigterm_refuses_new_connections_while_the_workers_drain(tmp_path: Path) -> None:
    """While the workers drain, the port refuses new connections at once (neither the main
    process nor the zygote keeps a copy of a listening socket), instead of queueing them for
    nobody until drain_timeout; the open connection is still served."""
    async with one_site(tmp_path, drain=60) as (e, *_):
        held = await held_connection(e.port, client_context(tmp_path / "ca.pem"))
        try:
            await wait_for(lambda: e.metric("edged_connections_active") == 1, "held connection")
            e.proc.send_signal(signal.SIGTERM)
            await wait_for(lambda: refused(e.port), "the port to refuse connections", 10)
            assert e.proc.returncode is None  # still draining
            assert (await asyncio.to_thread(request, held)).startswith(b"HTTP/1.1 200")
        finally:
            held.close()
        assert await asyncio.wait_for(e.proc.wait(), 15) == 0


async def test_rotation_keeps_long_lived_connections(tmp_path: Path) -> None:
    """Ticket key rotation retires the old workers without a deadline: a connection open
    across rotations, for longer than drain_timeout, keeps working; its worker exits once it
    is closed."""
    async with one_site(tmp_path, drain=1, tls_extra='ticket_key_rotation = "2s"') as (e, *_):
        held = await held_connection(e.port, client_context(tmp_path / "ca.pem"))
        try:
            await wait_for(
                lambda: e.metric("edged_tls_ticket_key_rotations_total") >= 2, "two rotations"
            )
            holding = [w for w in await asyncio.to_thread(e.workers) if w["connections_active"]]
            assert len(holding) == 1 and holding[0]["retiring"], holding
            assert (await asyncio.to_thread(request, held)).startswith(b"HTTP/1.1 200")
        finally:
            held.close()
        pid = holding[0]["pid"]
        await wait_for(
            lambda: all(w["pid"] != pid for w in e.workers()), "the retired worker to exit"
        )


async def test_max_connections_is_for_the_host_not_per_worker(tmp_path: Path) -> None:
    """Each of the 2 workers takes half of max_connections = 2: at most 2 connections are
    open at once over both (each worker allowed 2 before, so up to 4)."""
    async with one_site(tmp_path, edged_extra="max_connections = 2") as (e, *_):
        ctx = client_context(tmp_path / "ca.pem")
        held: list[ssl.SSLSocket] = []
        try:
            for _ in range(8):
                with contextlib.suppress(OSError, ssl.SSLError):
                    held.append(await held_connection(e.port, ctx))
            assert 1 <= len(held) <= 2, len(held)
            await wait_for(
                lambda: (
                    e.metric('edged_connections_refused_total{reason="max_connections"}')
                    >= 8 - len(held)
                ),
                "the refusals counted",
            )
        finally:
            for sock in held:
                sock.close()


async def test_a_worker_retired_several_rotations_ago_drains_within_drain_timeout(
    tmp_path: Path,
) -> None:
    """Retired workers drain without a deadline for MAX_RETIRING rotations; one retired
    longer ago gets drain_timeout, so a connection kept open cannot keep one more whole
    worker alive at every rotation (memory grew by a worker per rotation)."""
    rotating = 'ticket_key_rotation = "1s"'
    async with one_site(tmp_path, drain=1, tls_extra=rotating) as (e, *_):
        held = await held_connection(e.port, client_context(tmp_path / "ca.pem"))
        try:
            await wait_for(
                lambda: any(w["connections_active"] for w in e.workers()), "the held connection"
            )
            workers = await asyncio.to_thread(e.workers)
            first = next(w["pid"] for w in workers if w["connections_active"])
            await wait_for(
                lambda: e.metric("edged_tls_ticket_key_rotations_total") >= MAX_RETIRING + 3,
                "rotations",
                limit=40,
            )
            await wait_for(
                lambda: all(w["pid"] != first for w in e.workers()), "the oldest worker to exit"
            )
            assert len(await asyncio.to_thread(e.workers)) <= 2 * (MAX_RETIRING + 2)
            held.settimeout(5)
            with contextlib.suppress(OSError):  # closed: EOF, or a reset
                assert held.recv(1) == b""
        finally:
            held.close()


async def test_unready_generation_keeps_old_workers_and_wedged_worker_is_replaced(
    tmp_path: Path,
) -> None:
    """A rotation whose new workers cannot start (the zygote is frozen here) leaves the old
    generation serving: an old worker retires only once its successor serves. A worker that
    stops reporting (frozen) is killed after ALIVE_TIMEOUT; a new one that does not serve
    within READY_TIMEOUT is given up and started again."""
    async with one_site(tmp_path, tls_extra='min_version = "1.2"') as (e, *_):
        children = Path(f"/proc/{e.proc.pid}/task/{e.proc.pid}/children")
        zygote = int((await asyncio.to_thread(children.read_text)).split()[0])
        before = {w["slot"]: int(str(w["pid"])) for w in await asyncio.to_thread(e.workers)}
        wedged = before[1]
        os.kill(wedged, signal.SIGSTOP)
        os.kill(zygote, signal.SIGSTOP)
        started = time.monotonic()
        try:
            # A new version floor: the listening context changes, so the workers rotate.
            text = e.config.read_text().replace('min_version = "1.2"', 'min_version = "1.3"')
            e.config.write_text(text)
            e.proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: len(e.workers()) == 4, "the new generation spawned")
            await asyncio.sleep(max(0.0, READY_TIMEOUT + 2 - (time.monotonic() - started)))
            # Past READY_TIMEOUT: the new ones are given up, the old slot-0 worker still serves.
            old = {int(str(w["pid"])): w for w in await asyncio.to_thread(e.workers)}
            assert old[before[0]]["ready"] and not old[before[0]]["retiring"], old
        finally:
            os.kill(zygote, signal.SIGCONT)

        def settled() -> bool:
            serving = {int(str(w["pid"])) for w in e.workers() if not w["retiring"]}
            return len(serving) == 2 and serving.isdisjoint(before.values())

        await wait_for(settled, "two new workers in place of the old ones", 30)
        await wait_for(lambda: process_gone(wedged), "the wedged worker killed")
        await wait_for(lambda: process_gone(before[0]), "the old worker retired")
        assert e.metric("edged_worker_restarts_total") >= 1
        ctx = client_context(tmp_path / "ca.pem")
        for _ in range(10):
            cn, _, _ = await asyncio.to_thread(fetch, e.port, ctx)
            assert cn == "v1"


async def test_more_listeners_than_one_fd_message_carries(tmp_path: Path) -> None:
    """130 addresses x 2 workers = 260 listening sockets, more than one SCM_RIGHTS message
    carries (253): they reach the zygote in several messages, at startup and when a reload
    adds addresses."""
    ca = make_ca("Workers CA")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    cert, key = issue(ca, tmp_path, "v1", "v1")
    port = free_port()
    addresses = [f"127.0.0.{i}:{port}" for i in range(2, 132)]
    async with (
        run_backend() as backend,
        run_workers(tmp_path, site(backend.address, cert, key), https=addresses) as e,
    ):
        ctx = client_context(tmp_path / "ca.pem")
        for host in ("127.0.0.2", "127.0.0.131"):
            cn, _, _ = await asyncio.to_thread(fetch, port, ctx, NAME, None, host)
            assert cn == "v1"
        more = addresses + [f"127.0.0.{i}:{port}" for i in range(132, 142)]
        e.config.write_text(e.config.read_text().replace(json.dumps(addresses), json.dumps(more)))
        e.proc.send_signal(signal.SIGHUP)

        def served() -> bool:
            return fetch(port, ctx, NAME, None, "127.0.0.141")[0] == "v1"

        await wait_for(served, "the added address served", 30)
        assert e.proc.returncode is None


async def test_a_slot_whose_workers_keep_dying_backs_off(tmp_path: Path) -> None:
    """Replacements for a slot whose workers die young start after 0, 1, 2 s (then 5, 10,
    30); each is counted in edged_worker_restarts_total and the other slot serves meanwhile."""
    async with one_site(tmp_path) as (e, *_):
        ctx = client_context(tmp_path / "ca.pem")
        gaps = []
        for _ in range(3):
            workers = await asyncio.to_thread(e.workers)
            victim = next(int(str(w["pid"])) for w in workers if w["slot"] == 0 and w["ready"])
            os.kill(victim, signal.SIGKILL)
            started = time.monotonic()

            def replaced(victim: int = victim) -> bool:
                return any(
                    w["slot"] == 0 and w["ready"] and int(str(w["pid"])) not in (0, victim)
                    for w in e.workers()
                )

            await wait_for(replaced, "slot 0 served again")
            gaps.append(time.monotonic() - started)
        print("slot 0 served again after", [round(g, 2) for g in gaps], "s")
        assert gaps[1] >= 1.0 and gaps[2] >= 2.0, gaps
        assert gaps[0] < gaps[2] - 1.0, gaps
        assert e.metric("edged_worker_restarts_total") == 3
        for _ in range(10):
            cn, _, _ = await asyncio.to_thread(fetch, e.port, ctx)
            assert cn == "v1"


async def test_a_worker_that_hangs_at_shutdown_is_killed(tmp_path: Path) -> None:
    """A worker that does not exit when told to abort (frozen here) is SIGKILLed KILL_WAIT
    after the abort, and edged exits 0 instead of hanging until systemd's stop timeout."""
    async with one_site(tmp_path) as (e, *_):
        workers = await asyncio.to_thread(e.workers)
        frozen = int(str(workers[0]["pid"]))
        os.kill(frozen, signal.SIGSTOP)
        e.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        started = time.monotonic()
        e.proc.send_signal(signal.SIGTERM)  # abort: a drain would wait for the frozen one
        assert await asyncio.wait_for(e.proc.wait(), KILL_WAIT + 15) == 0
        assert KILL_WAIT - 1 < time.monotonic() - started < KILL_WAIT + 10
        assert await asyncio.to_thread(process_gone, frozen)


def test_workers_0_means_one_per_core_edged_may_run_on() -> None:
    """Under CPUAffinity=/AllowedCPUs= or a container's cpuset, `workers = 0` forks one worker
    per core edged may use, not per core of the host (each worker costs its whole RSS)."""
    code = (
        "from pathlib import Path; from edged.config import parse_config; "
        "from edged.daemon import worker_count; "
        "text = '[edged]\\nworkers = 0\\n[listen]\\nhttps = [\\'127.0.0.1:8443\\']\\n"
        "[[site]]\\nnames = [\\'a.test\\']\\nbackend = \\'127.0.0.1:9\\'\\n'; "
        "print(worker_count(parse_config(text, Path('/e.toml'))))"
    )
    out = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def zygote_of(e: Running) -> int:
    """The main process's only child: the zygote (the workers are its children)."""
    children = Path(f"/proc/{e.proc.pid}/task/{e.proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


async def test_sigterm_during_a_rotation_abandons_the_new_generation(tmp_path: Path) -> None:
    """A SIGTERM while a rotation waits for its new generation (which cannot start: the zygote
    is frozen here) starts the shutdown at once, not after READY_TIMEOUT + KILL_WAIT (past
    systemd's stop timeout): the new workers are abandoned. Forked later with their channel
    closed, they exit without a traceback."""
    log = tmp_path / "edged.log"
    async with one_site(tmp_path, drain=2, tls_extra='min_version = "1.2"', log=log) as (e, *_):
        zygote = await asyncio.to_thread(zygote_of, e)
        os.kill(zygote, signal.SIGSTOP)
        try:
            text = e.config.read_text().replace('min_version = "1.2"', 'min_version = "1.3"')
            e.config.write_text(text)
            e.proc.send_signal(signal.SIGHUP)  # a new version floor: the workers rotate
            await wait_for(lambda: len(e.workers()) == 4, "the new generation spawned")
            await asyncio.sleep(1.0)
            started = time.monotonic()
            e.proc.send_signal(signal.SIGTERM)

            def admin_closed() -> bool:  # the shutdown closes the admin API first
                try:
                    e.status()
                except OSError:
                    return True
                return False

            await wait_for(admin_closed, "the shutdown to start", 10)
            assert time.monotonic() - started < 5
        finally:
            os.kill(zygote, signal.SIGCONT)
        assert await asyncio.wait_for(e.proc.wait(), 30) == 0
    await wait_for(lambda: process_gone(zygote), "the zygote gone")
    text = log.read_text()
    assert "abandoned: edged is stopping: killing it" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


async def test_a_zygote_that_does_not_exit_is_killed(tmp_path: Path) -> None:
    """A zygote that does not exit when its channel closes at shutdown (frozen here) is
    SIGKILLed: it must not outlive edged, holding the https port or forking workers."""
    async with one_site(tmp_path) as (e, *_):
        zygote = await asyncio.to_thread(zygote_of, e)
        os.kill(zygote, signal.SIGSTOP)
        try:
            e.proc.send_signal(signal.SIGTERM)
            limit = ZYGOTE_EXIT_WAIT + 2 * KILL_WAIT + 10
            assert await asyncio.wait_for(e.proc.wait(), limit) == 0
            assert await asyncio.to_thread(process_gone, zygote)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(zygote, signal.SIGCONT)


def many_file_sites(ca: Issued, tmp_path: Path, names: list[str], backend: str, cn: str) -> str:
    """One [[site]] per name, each with a certificate of its own (CN `cn`) in its own files,
    named after `cn`: files of another `cn` (those being served, watched) are left alone."""
    out = []
    for i, name in enumerate(names):
        cert, key = write_pair(tmp_path, f"{cn}-{i}", make_leaf(ca, [name], cn=cn))
        out.append(site(backend, cert, key, name=name))
    return "".join(out)


async def serve_new_sites(
    e: Running, ca: Issued, tmp_path: Path, names: list[str], backend: str, cn: str
) -> None:
    """Every name gets a new certificate (CN `cn`) in new files, and the config naming them
    replaces the running one in one rename, then SIGHUP: rewriting the served files in place
    would have the file watcher reload each part as it is written."""
    sites = await asyncio.to_thread(many_file_sites, ca, tmp_path, names, backend, cn)
    staged = tmp_path / "edged.toml.new"
    staged.write_text(e.config.read_text().split("[[site]]", 1)[0] + sites)
    staged.rename(e.config)
    e.proc.send_signal(signal.SIGHUP)


async def test_workers_map_one_shared_copy_of_the_certificates_and_repack_it(
    tmp_path: Path,
) -> None:
    """The workers' certificates are one sealed memfd that every worker maps (not a copy of
    every PEM per worker). Replacing every certificate leaves the old segment dead: edged
    repacks what is served into one new segment and the workers unmap the old one."""
    ca = make_ca("Workers CA")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    # Enough distinct certificates that replacing them all leaves more than
    # REPACK_MIN_BYTES behind (~860 bytes each without the chain).
    names = [f"n{i}.share.test" for i in range(REPACK_MIN_BYTES // 800 + 200)]
    log = tmp_path / "edged.log"
    async with run_backend() as backend:
        sites = await asyncio.to_thread(many_file_sites, ca, tmp_path, names, backend.address, "v1")
        async with run_workers(tmp_path, sites, log=log) as e:
            ctx = client_context(tmp_path / "ca.pem")
            pids = [int(str(w["pid"])) for w in e.workers()]
            first = [pem_segments(pid) for pid in pids]
            assert len(first[0]) == 1 and first[0] == first[1], first
            assert e.metric("edged_worker_shared_cert_segments") == 1
            # The certificates' records, without the chain (a leaf alone here): ~860 bytes each.
            assert 700 * len(names) < e.metric("edged_worker_shared_cert_bytes") < 1000 * len(names)
            for name in random.Random(3).sample(names, 20):
                assert (await asyncio.to_thread(fetch, e.port, ctx, name))[0] == "v1"

            # (A repack of a state half v1, reloaded as files were rewritten in place, once
            # passed for the end of this test while the rest was still being reloaded.)
            await serve_new_sites(e, ca, tmp_path, names, backend.address, "v2")

            def repacked() -> bool:
                now = [pem_segments(pid) for pid in pids]
                return len(now[0]) == 1 and now[0] == now[1] and not now[0] & first[0]

            await wait_for(repacked, "the workers to map only the repacked segment", 30)
            assert "certificates shared with the workers repacked" in log.read_text()
            for name in random.Random(4).sample(names, 20):
                assert (await asyncio.to_thread(fetch, e.port, ctx, name))[0] == "v2"


async def test_a_worker_out_of_file_descriptors_still_takes_a_shared_segment(
    tmp_path: Path,
) -> None:
    """A worker at its file descriptor limit (connections held open, as under a flood) gets
    the next shared segment all the same: it keeps a spare descriptor for it, and a mapping
    holds none. It does not exit (dropping every connection it holds) and serves the new
    certificates."""
    ca = make_ca("Workers CA")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    names = [f"n{i}.fds.test" for i in range(100)]  # enough for a segment of their own
    log = tmp_path / "edged.log"
    async with run_backend() as backend:
        sites = await asyncio.to_thread(many_file_sites, ca, tmp_path, names, backend.address, "v1")
        async with run_workers(tmp_path, sites, log=log, tls_extra="handshake_timeout = 60") as e:
            pids = [int(str(w["pid"])) for w in e.workers()]
            full, other = pids
            before = pem_segments(full)
            limit = len(os.listdir(f"/proc/{full}/fd")) + 8
            _, hard = resource.prlimit(full, resource.RLIMIT_NOFILE)
            resource.prlimit(full, resource.RLIMIT_NOFILE, (limit, hard))
            held = []
            try:
                for _ in range(1000):  # spread over both workers by SO_REUSEPORT
                    held.append(socket.create_connection(("127.0.0.1", e.port), timeout=5))
                    if len(os.listdir(f"/proc/{full}/fd")) >= limit:
                        break
                assert len(os.listdir(f"/proc/{full}/fd")) >= limit

                await serve_new_sites(e, ca, tmp_path, names, backend.address, "v2")
                await wait_for(lambda: pem_segments(other) - before, "the new segment", 30)
                await asyncio.sleep(1)  # the full worker has had it by then too
                assert [int(str(w["pid"])) for w in e.workers()] == pids
                assert pem_segments(full) == pem_segments(other)
                assert "exiting" not in log.read_text()
            finally:
                for sock in held:
                    sock.close()
            ctx = client_context(tmp_path / "ca.pem")
            for name in random.Random(5).sample(names, 20):
                assert (await asyncio.to_thread(fetch, e.port, ctx, name))[0] == "v2"
            assert [int(str(w["pid"])) for w in e.workers()] == pids
