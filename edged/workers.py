"""The main process's side of the worker processes (`[edged] workers` > 1).

The main process keeps everything but the TLS data path: config, store, ACME, renewal, the
admin API, /metrics and port 80. It binds the https listeners — one SO_REUSEPORT socket per
worker slot, so the kernel spreads connections evenly and a replaced worker takes over its
slot's queue — hands them to the zygote, which forks the workers, and sends each worker the
config and certificates it serves (a change sends only what changed).

A worker that dies is replaced (after a back-off when it keeps dying). Ticket key rotation
starts a new generation of workers from a new listening context, then lets the old generation
drain: no connection is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from edged.config import Address, Config
from edged.counters import Counters, merge_counters
from edged.ipc import IpcError, encode, read_message
from edged.listen import InheritedListeners, StartupError, bind_tcp
from edged.sni import Servable, ServedCert
from edged.zygote import Zygote

log = logging.getLogger("edged.workers")

ZYGOTE_EXIT_WAIT = 5.0  # seconds to wait for the zygote to exit at shutdown
READY_TIMEOUT = 30.0  # seconds a new worker has to start serving
RESTART_BACKOFF = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)  # for a slot whose workers keep dying
STABLE_AFTER = 30.0  # a worker that lived this long resets its slot's back-off


@dataclass(eq=False)  # identity: handles live in sets
class WorkerHandle:
    slot: int
    generation: int
    writer: asyncio.StreamWriter
    reader: asyncio.StreamReader
    started: float = field(default_factory=time.monotonic)
    pid: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    counters: Counters = field(default_factory=Counters)
    active: int = 0
    retiring: bool = False  # replaced (rotation) or stopping: its exit is expected

    def send(self, message: object) -> None:
        if not self.gone.is_set():
            try:
                self.writer.write(encode(message))
            except (ConnectionError, OSError):
                self.gone.set()


class WorkerPool:
    def __init__(self, zygote: Zygote, inherited: InheritedListeners, counters: Counters) -> None:
        self.zygote = zygote
        self.inherited = inherited
        self.own_counters = counters  # the main process's: worker restarts are counted there
        self.count = 0
        self.current: dict[int, WorkerHandle] = {}  # slot → the worker serving it
        self.all: set[WorkerHandle] = set()  # including retiring ones still draining
        self.retired = Counters()  # the last counters of workers that have exited
        self._generation = 0
        self._failures: dict[int, int] = {}  # slot → consecutive early deaths
        self._listeners: dict[Address, list[socket.socket]] = {}
        self._config: Config | None = None
        self._certs: dict[int, tuple[ServedCert, ...]] = {}
        self._pids: dict[int, WorkerHandle] = {}
        self._stopping = False
        self._tg: asyncio.TaskGroup | None = None
        self._lock = asyncio.Lock()  # one generation change at a time
        self._stopped = asyncio.Event()
        # Pending TLS-ALPN-01 challenges (name → key authorization, expiry), for new workers too.
        self._challenges: dict[str, tuple[str, float]] = {}
        self._seq = 0
        self._waiting: dict[int, tuple[set[WorkerHandle], asyncio.Future[None]]] = {}
        self._pending: set[int] = set()  # sites whose certificates are not read yet
        # Reads a pending site now (the daemon's load_now), for a worker that needs it.
        self.load_site: Callable[[int], Awaitable[None]] | None = None
        # Called once when the zygote is gone: no worker can be replaced or rotated any more.
        self.on_lost: Callable[[str], None] | None = None
        self._lost = False
        self._reports: asyncio.Task[None] | None = None

    # --- what the daemon calls --------------------------------------------------------------

    def addresses(self) -> list[Address]:
        return list(self._listeners)

    async def start(
        self,
        tg: asyncio.TaskGroup,
        config: Config,
        count: int,
        bundles: Mapping[int, Sequence[Servable]],
        pending: Collection[int] = (),
    ) -> None:
        """Bind, fork `count` workers and wait until each serves (StartupError if binding
        fails; a worker that does not come up is logged and retried like a dead one)."""
        self._tg = tg
        self.count = count
        self._config = config
        self._certs = _served(bundles)
        self._pending = set(pending)
        self._bind(config.listen.https)
        self._reports = tg.create_task(self._zygote_reports())
        await self._spawn_generation()

    async def publish(self, config: Config, bundles: Mapping[int, Sequence[Servable]]) -> None:
        """Send the workers what changed: the whole state after a config change, else only the
        sites whose certificates changed (nothing at all when nothing did)."""
        certs = _served(bundles)
        # After a config change, and after a full load that ended a background indexing (the
        # workers' routes of sites without a certificate are still marked pending): all of it.
        if config != self._config or self._pending:
            self._config, self._certs = config, certs
            self._pending.clear()  # a full load reads every certificate
            message: tuple[object, ...] = ("state", config, certs, True, frozenset())
        else:
            changed = {i: c for i, c in certs.items() if self._certs.get(i) != c}
            changed.update({i: () for i in self._certs if i not in certs})
            if not changed:
                return
            self._certs = certs
            message = ("state", None, changed, False, frozenset())
        for handle in self.current.values():
            handle.send(message)

    def publish_sites(self, changes: Mapping[int, Sequence[Servable]]) -> None:
        """Send the workers the new certificates of these sites (the config is unchanged)."""
        changed = _served(changes)
        self._certs.update(changed)
        self._pending.difference_update(changed)
        for handle in self.current.values():
            handle.send(("state", None, changed, False, frozenset()))

    def share_challenge(
        self, name: str, key_authorization: str | None, ttl: float
    ) -> asyncio.Future[None]:
        """Tell every worker about a TLS-ALPN-01 challenge (None: it is over); the future is
        done when each has it (so the CA, told next, finds it on whichever worker it reaches)."""
        if key_authorization is None:
            self._challenges.pop(name, None)
        else:
            self._challenges[name] = (key_authorization, time.monotonic() + ttl)
        self._seq += 1
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        handles = {h for h in self.current.values() if not h.gone.is_set()}
        for handle in handles:
            handle.send(("alpn", self._seq, name, key_authorization, ttl))
        if handles:
            self._waiting[self._seq] = (handles, done)
        else:
            done.set_result(None)
        return done

    async def _serve_load(self, handle: WorkerHandle, index: int) -> None:
        if index in self._pending and self.load_site is not None:
            await self.load_site(index)  # sends it to every worker when it was pending
        handle.send(("state", None, {index: self._certs.get(index, ())}, False, frozenset()))

    def _acked(self, handle: WorkerHandle, seq: int | None) -> None:
        """`handle` has challenge `seq` (None: it is gone, so it has none to wait for)."""
        for key in [seq] if seq is not None else list(self._waiting):
            entry = self._waiting.get(key)
            if entry is None:
                continue
            entry[0].discard(handle)
            if not entry[0]:
                del self._waiting[key]
                if not entry[1].done():
                    entry[1].set_result(None)

    async def sync_listeners(self, config: Config) -> None:
        """A changed set of https addresses: bind the new ones (StartupError leaves everything
        as it was), then a new generation of workers takes over the new set."""
        wanted = tuple(config.listen.https)
        if set(wanted) == set(self._listeners):
            return
        self._bind(wanted)
        await self.rotate(min_version=None)

    async def rotate(self, min_version: str | None) -> None:
        """New workers for every slot (with a new listening context, hence new ticket keys,
        when `min_version` is given), then the old ones drain and exit."""
        async with self._lock:
            if self._stopping:
                return
            if min_version is not None:
                try:
                    self.zygote.send(("context", min_version))
                except OSError as exc:
                    self._lose(f"cannot reach the zygote ({exc})")
                    return
            old = list(self.current.values())
            await self._spawn_generation()
            for handle in old:
                handle.retiring = True
                handle.send(("stop", False))

    async def stop(self, *, abort: bool) -> None:
        """Ask every worker to stop accepting and drain (or abort at once)."""
        self._stopping = True
        self._stopped.set()
        for handle in list(self.all):
            handle.retiring = True
            handle.send(("stop", abort))

    async def wait_stopped(self) -> None:
        while self.all:
            await asyncio.wait([asyncio.ensure_future(h.gone.wait()) for h in self.all])
            self.all = {h for h in self.all if not h.gone.is_set()}

    async def close(self) -> None:
        if self._reports is not None:
            self._reports.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reports
        for socks in self._listeners.values():
            for sock in socks:
                sock.close()
        self._listeners.clear()
        self.zygote.close()
        # It exits as soon as it reads the closed channel: reap it without blocking the event
        # loop (a waitpid in a thread could outlive the loop); after a while init may reap it.
        for _ in range(int(ZYGOTE_EXIT_WAIT / 0.02)):
            if self.zygote.reaped():
                return
            await asyncio.sleep(0.02)
        log.warning(
            "the zygote (pid %d) did not exit within %ss", self.zygote.pid, ZYGOTE_EXIT_WAIT
        )

    def counters(self) -> Counters:
        """The sum over every worker, living and exited (so totals never go down)."""
        return merge_counters([self.retired, *(h.counters for h in self.all)])

    def connections_active(self) -> int:
        return sum(h.active for h in self.all if not h.gone.is_set())

    def describe(self) -> list[dict[str, object]]:
        return [
            {
                "slot": h.slot,
                "pid": h.pid,
                "generation": h.generation,
                "ready": h.ready.is_set(),
                "retiring": h.retiring,
                "connections_active": h.active,
                "handshakes_ok": sum(n for (r, _), n in h.counters.handshakes.items() if r == "ok"),
                "uptime_seconds": round(time.monotonic() - h.started, 1),
            }
            for h in sorted(self.all, key=lambda h: (h.slot, h.generation))
        ]

    # --- inside -------------------------------------------------------------------------------

    def _bind(self, addresses: Sequence[Address]) -> None:
        fresh: dict[Address, list[socket.socket]] = {}
        try:
            for address in addresses:
                if address in self._listeners:
                    fresh[address] = self._listeners[address]
                    continue
                inherited = self.inherited.take(address)
                if inherited is not None:  # socket activation: one socket shared by all
                    fresh[address] = [inherited]
                else:
                    fresh[address] = []
                    for _ in range(self.count):
                        fresh[address].append(bind_tcp(address, reuseport=True))
        except BaseException:
            for address, socks in fresh.items():
                if address not in self._listeners:
                    for sock in socks:
                        sock.close()
            raise
        layout = [(address, len(socks)) for address, socks in fresh.items()]
        fds = [sock.fileno() for socks in fresh.values() for sock in socks]
        try:
            self.zygote.send(("listeners", layout), fds)
        except OSError as exc:
            for address, socks in fresh.items():
                if address not in self._listeners:
                    for sock in socks:
                        sock.close()
            self._lose(f"cannot reach the zygote ({exc})")
            raise StartupError(
                f"cannot hand the listeners to the worker processes: {exc}"
            ) from None
        for address, socks in self._listeners.items():
            if address not in fresh:
                for sock in socks:
                    sock.close()
                log.info("stopped listening on %s", address)
        self._listeners = fresh

    async def _spawn_generation(self) -> None:
        self._generation += 1
        spawned = [await self._spawn(slot) for slot in range(self.count)]
        handles = [h for h in spawned if h is not None]
        await asyncio.wait(
            [asyncio.ensure_future(_first(h.ready, h.gone)) for h in handles],
            timeout=READY_TIMEOUT,
        )
        for handle in handles:
            if not handle.ready.is_set():
                log.error(
                    "worker %d (pid %s) did not start serving within %ss",
                    handle.slot,
                    handle.pid or "?",
                    READY_TIMEOUT,
                )

    async def _spawn(self, slot: int) -> WorkerHandle | None:
        assert self._tg is not None and self._config is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.zygote.send(("spawn", slot, self._generation), [theirs.fileno()])
        except OSError as exc:
            ours.close()
            self._lose(f"cannot reach the zygote ({exc})")
            return None
        finally:
            theirs.close()
        ours.setblocking(False)
        # No line limit: a full state for 100k certificates is one large message.
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=2**31 - 1)
        handle = WorkerHandle(slot, self._generation, writer, reader)
        self.current[slot] = handle
        self.all.add(handle)
        handle.send(("state", self._config, self._certs, True, frozenset(self._pending)))
        now = time.monotonic()
        for name, (key_authorization, expires) in self._challenges.items():
            if expires > now:
                handle.send(("alpn", 0, name, key_authorization, expires - now))
        if self._stopping:  # stop() ran while this one was being connected
            handle.retiring = True
            handle.send(("stop", False))
        self._tg.create_task(self._converse(handle))
        return handle

    async def _converse(self, handle: WorkerHandle) -> None:
        """Read one worker's reports until it is gone."""
        try:
            while True:
                try:
                    message = await read_message(handle.reader)
                except IpcError as exc:
                    log.error("worker %d: %s", handle.slot, exc)
                    message = None
                if message is None:
                    break
                assert isinstance(message, tuple)
                if message[0] == "counters":
                    handle.counters, handle.active = message[1], message[2]
                elif message[0] == "load":  # a client asked for a site not read yet
                    assert self._tg is not None
                    self._tg.create_task(self._serve_load(handle, message[1]))
                elif message[0] == "ack":
                    self._acked(handle, message[1])
                elif message[0] == "ready":
                    handle.pid = message[1]
                    handle.ready.set()
                    log.info(
                        "worker %d (pid %d, generation %d) serving",
                        handle.slot,
                        handle.pid,
                        handle.generation,
                    )
        finally:
            handle.gone.set()
            self._acked(handle, None)
            handle.writer.close()
            self.retired = merge_counters([self.retired, handle.counters])
            handle.counters = Counters()
            handle.active = 0
            self.all.discard(handle)
        await self._after_exit(handle)

    async def _after_exit(self, handle: WorkerHandle) -> None:
        if handle.retiring or self._stopping or self.current.get(handle.slot) is not handle:
            return
        lived = time.monotonic() - handle.started
        failures = 0 if lived > STABLE_AFTER else self._failures.get(handle.slot, 0)
        delay = RESTART_BACKOFF[min(failures, len(RESTART_BACKOFF) - 1)]
        self._failures[handle.slot] = failures + 1
        self.own_counters.worker_restarts += 1
        log.error(
            "worker %d (pid %s) exited unexpectedly after %.1fs; starting a new one%s",
            handle.slot,
            handle.pid or "?",
            lived,
            f" in {delay:.0f}s" if delay else "",
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), delay)
        async with self._lock:
            if not self._stopping and self.current.get(handle.slot) is handle:
                await self._spawn(handle.slot)

    async def _zygote_reports(self) -> None:
        """Exit statuses, for the log (a worker's channel closing is what counts)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(self.zygote.sock, 65536)
            except OSError:
                data = b""
            if not data:
                self._lose("the zygote process exited")
                return
            report = pickle.loads(data)
            if report[0] == "exited":
                level = logging.INFO if self._stopping else logging.WARNING
                log.log(level, "worker process %d: %s", report[1], report[2])

    def _lose(self, why: str) -> None:
        if self._lost or self._stopping:
            return
        self._lost = True
        log.error("%s: worker processes can no longer be replaced or rotated", why)
        if self.on_lost is not None:
            self.on_lost(why)


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def _served(bundles: Mapping[int, Sequence[Servable]]) -> dict[int, tuple[ServedCert, ...]]:
    return {i: tuple(ServedCert.of(b) for b in group) for i, group in bundles.items()}
