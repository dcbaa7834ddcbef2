"""The main process's side of the worker processes (`[edged] workers` > 1).

The main process keeps everything but the TLS data path: config, store, ACME, renewal, the
admin API, /metrics and port 80. It binds the https listeners — one SO_REUSEPORT socket per
worker slot, so the kernel spreads connections evenly and a replaced worker takes over its
slot's queue — hands them to the zygote, which forks the workers, and sends each worker the
config and certificates it serves (a change sends only what changed, encoded once for all).
Large sets of certificates go through shared memory (edged.pemshare): each worker maps the
same pages instead of holding a copy of every PEM.

A worker that dies is replaced; one that does not start serving within READY_TIMEOUT, or stops
reporting for ALIVE_TIMEOUT, is killed and replaced (after a back-off when its slot keeps
failing). A newer
worker that is serving retires the older one of its slot: ticket key rotation starts a new
generation from a new listening context, and each old worker drains — without a deadline, so
no connection is dropped — only once its successor serves.
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
from edged.errors import EdgedError
from edged.heap import release_free_memory
from edged.ipc import FORKED_CONFIG, IpcError, encode, read_message, writable
from edged.listen import InheritedListeners, StartupError, bind_tcp
from edged.pemshare import PemShare, PemShareError, Segment, send_segment
from edged.sni import Servable, ServedCert
from edged.zygote import Zygote

log = logging.getLogger("edged.workers")

ZYGOTE_EXIT_WAIT = 5.0  # seconds to wait for the zygote to exit at shutdown
READY_TIMEOUT = 30.0  # seconds a new worker has to start serving
ALIVE_TIMEOUT = 30.0  # a serving worker reports every second: silent this long, it is wedged
KILL_WAIT = 10.0  # seconds for a stopped (aborted) or killed worker to be gone
# Retired workers per slot that drain without a deadline. Their connections outlive this many
# rotations (days at the daily default); an older one gets drain_timeout, or a connection kept
# busy would keep one more whole worker (its memory) alive at every rotation.
MAX_RETIRING = 3
RESTART_BACKOFF = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)  # for a slot whose workers keep dying
STABLE_AFTER = 30.0  # a worker that served this long resets its slot's back-off
# Seconds between looks at whether the shared certificates want a repack, after a change: each
# look reads every certificate served (~0.1 s at 100k, in a thread, but holding the interpreter's
# lock), and renewals add waste slowly. After a full reload (where a whole set can be replaced
# at once) the look comes REPACK_SOON seconds later.
REPACK_CHECK = 60.0
REPACK_SOON = 2.0


@dataclass(frozen=True)
class Outgoing:
    """A message encoded once for every worker it goes to, with the shared-memory segments
    its certificates are in (each worker gets a segment's fd ahead of the first message
    naming it)."""

    body: bytes
    segments: tuple[Segment, ...] = ()


Encoded = asyncio.Future[Outgoing | None]


@dataclass(eq=False)  # identity: handles live in sets
class WorkerHandle:
    id: int  # spawn order: a higher id is the newer worker of its slot
    slot: int
    generation: int
    writer: asyncio.StreamWriter
    reader: asyncio.StreamReader
    segment_chan: socket.socket  # SOCK_SEQPACKET: segment fds, ahead of the messages naming them
    started: float = field(default_factory=time.monotonic)
    heard: float = field(default_factory=time.monotonic)  # its last message
    ready_at: float | None = None
    pid: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    counters: Counters = field(default_factory=Counters)
    active: int = 0
    retiring: bool = False  # replaced or stopping: its exit is expected
    hurried: bool = False  # retired MAX_RETIRING generations ago: drains within drain_timeout
    killed: bool = False
    # Messages in order; each worker's are written by its own task, so one that stops reading
    # holds up nobody else (and is killed once ALIVE_TIMEOUT shows it wedged).
    outbox: asyncio.Queue[Encoded] = field(default_factory=asyncio.Queue)
    segments_sent: set[int] = field(default_factory=set)

    def send(self, message: Encoded) -> None:
        if not self.gone.is_set():
            self.outbox.put_nowait(message)


class WorkerPool:
    def __init__(
        self,
        zygote: Zygote,
        inherited: InheritedListeners,
        counters: Counters,
        forked: Config | None = None,
        interrupt: asyncio.Event | None = None,
    ) -> None:
        self.zygote = zygote
        self.inherited = inherited
        self.own_counters = counters  # the main process's: worker restarts are counted there
        self.count = 0
        self.current: dict[int, WorkerHandle] = {}  # slot → its newest worker
        self.all: set[WorkerHandle] = set()  # including retiring ones still draining
        self.retired = Counters()  # the last counters of workers that have exited
        self._generation = 0
        self._ids = 0
        self._failures: dict[int, int] = {}  # slot → consecutive early deaths
        self._listeners: dict[Address, list[socket.socket]] = {}
        self._config: Config | None = None
        # The config the zygote was forked with, while it is the one served: a new worker then
        # takes it from the zygote's memory (FORKED_CONFIG) instead of its own unpickled copy
        # (at 100k sites ~29 MiB per worker and 1.3 s before it serves). Dropped at the first
        # config change, for good.
        self._forked = forked
        self._certs: dict[int, tuple[ServedCert, ...]] = {}
        self.share = PemShare()
        self._repack_due = False  # certificates changed since the last look (REPACK_CHECK)
        self._repack_soon = asyncio.Event()  # a full reload: look after REPACK_SOON
        # The whole state, encoded once for the workers of one generation (then dropped: at
        # 100k certificates it is ~200 MB).
        self._full: Encoded | None = None
        self._by_id: dict[int, WorkerHandle] = {}  # spawned, its pid not known yet
        self._by_pid: dict[int, WorkerHandle] = {}
        self._stopping = False
        self._tg: asyncio.TaskGroup | None = None
        self._lock = asyncio.Lock()  # one generation change at a time
        self._stopped = asyncio.Event()
        # Set when edged is asked to stop (the daemon's stop request, before stop() can run: a
        # rotation holds the reload lock the shutdown takes): a generation being spawned is
        # abandoned then instead of being waited for.
        self._interrupt = interrupt if interrupt is not None else asyncio.Event()
        # Pending TLS-ALPN-01 challenges (name → key authorization, expiry), for new workers too.
        self._challenges: dict[str, tuple[str, float]] = {}
        self._seq = 0
        self._waiting: dict[int, tuple[set[WorkerHandle], asyncio.Future[None]]] = {}
        self._pending: set[int] = set()  # sites whose certificates are not read yet
        # Reads a pending site now (the daemon's load_now), for a worker that needs it.
        self.load_site: Callable[[int], Awaitable[None]] | None = None
        # The key authorization another fleet node put in the shared store for a name (the
        # daemon's TLS-ALPN-01 board), for a worker a CA reached: workers have no store.
        self.shared_challenge: Callable[[str], Awaitable[str | None]] | None = None
        # Called once when the zygote is gone: no worker can be replaced or rotated any more.
        self.on_lost: Callable[[str], None] | None = None
        self._lost = False
        self._reports: asyncio.Task[None] | None = None
        self._packing: asyncio.Task[None] | None = None

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
        fails; a worker that does not come up is killed and retried like a dead one)."""
        self._tg = tg
        self.count = count
        if config is not self._forked:  # not the object the zygote holds a copy of
            self._forked = None
        self._config = config
        self._certs = served_certs(bundles)
        self._pending = set(pending)
        self._reports = tg.create_task(self._zygote_reports())
        self._packing = tg.create_task(self._keep_packed())
        await self._bind(config.listen.https)
        await self._spawn_generation()

    def publish(self, config: Config, certs: dict[int, tuple[ServedCert, ...]]) -> None:
        """Send the workers what changed: the certificates of the sites that changed, with the
        config when it changed (nothing at all when nothing did)."""
        changed = {i: c for i, c in certs.items() if self._certs.get(i) != c}
        changed.update({i: () for i in self._certs if i not in certs})
        # After a full load that ended a background indexing, the workers' routes of sites
        # without a certificate are still marked pending: the config goes too (none pending).
        new_config = config != self._config  # ~20 ms at 100k sites: asked once
        if new_config:
            self._forked = None
        if new_config or self._pending:
            self._config, self._certs = config, certs
            self._pending.clear()  # a full load reads every certificate
            self._broadcast(config, changed)
            self._repack_soon.set()
        elif changed:
            self._certs = certs
            self._broadcast(None, changed)

    def publish_sites(self, changes: Mapping[int, Sequence[Servable]]) -> None:
        """Send the workers the new certificates of these sites (the config is unchanged)."""
        changed = served_certs(changes)
        self._certs.update(changed)
        self._pending.difference_update(changed)
        self._broadcast(None, changed)

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
        handles = set(self._serving())
        message = _now(("alpn", self._seq, name, key_authorization, ttl))
        for handle in handles:
            handle.send(message)
        if handles:
            self._waiting[self._seq] = (handles, done)
        else:
            done.set_result(None)
        return done

    async def sync_listeners(self, config: Config) -> None:
        """A changed set of https addresses: bind the new ones (StartupError leaves everything
        as it was), then a new generation of workers takes over the new set."""
        wanted = tuple(config.listen.https)
        if set(wanted) == set(self._listeners):
            return
        await self._bind(wanted)
        await self.rotate(min_version=None)

    async def rotate(self, min_version: str | None) -> None:
        """New workers for every slot (with a new listening context, hence new ticket keys,
        when `min_version` is given); each old one drains and exits once its successor
        serves (until then it serves on, and a successor that fails is retried)."""
        async with self._lock:
            if self._stopping or self._lost or self._interrupt.is_set():
                return
            if min_version is not None:
                try:
                    await self.zygote.send(("context", min_version))
                except OSError as exc:
                    self._lose(f"cannot reach the zygote ({exc})")
                    return
            await self._spawn_generation()

    async def stop(self, *, abort: bool) -> None:
        """Stop accepting (the ports refuse new connections from now on) and let every worker
        drain for up to drain_timeout (abort: none at all)."""
        first = not self._stopping
        self._stopping = True
        self._stopped.set()
        grace = 0.0 if abort or self._config is None else self._config.edged.drain_timeout
        message = _now(("stop", grace))
        for handle in list(self.all):
            handle.retiring = True
            handle.send(message)
        if first:
            await self._release_listeners()

    async def wait_stopped(self, limit: float | None = None) -> bool:
        """Wait until every worker has exited (True), or `limit` seconds (False)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                while self.all:
                    await _first(*(h.gone for h in self.all))
                    self.all = {h for h in self.all if not h.gone.is_set()}
                return True
        return False

    async def kill_all(self) -> None:
        """SIGKILL every worker still there (a shutdown's last resort)."""
        for handle in list(self.all):
            await self._kill(handle, "still running after the shutdown")

    async def close(self) -> None:
        for task in (self._reports, self._packing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._close_listeners()
        self.zygote.close()
        # It exits as soon as it reads the closed channel: reap it without blocking the event
        # loop (a waitpid in a thread could outlive the loop); after a while init may reap it.
        for _ in range(int(ZYGOTE_EXIT_WAIT / 0.02)):
            if self.zygote.reaped():
                return
            await asyncio.sleep(0.02)
        # Stuck: it must not outlive edged, holding the https ports or forking workers.
        log.warning(
            "the zygote (pid %d) did not exit within %ss: killing it",
            self.zygote.pid,
            ZYGOTE_EXIT_WAIT,
        )
        self.zygote.kill()
        for _ in range(int(KILL_WAIT / 0.02)):
            if self.zygote.reaped():
                return
            await asyncio.sleep(0.02)
        log.error("the zygote (pid %d) did not exit when killed", self.zygote.pid)

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
            for h in sorted(self.all, key=lambda h: (h.slot, h.id))
        ]

    # --- inside -------------------------------------------------------------------------------

    def _serving(self) -> list[WorkerHandle]:
        """The workers that serve new connections or will: every change goes to them (an old
        worker whose successor is not up yet still serves)."""
        return [h for h in self.all if not h.retiring and not h.gone.is_set()]

    def _broadcast(self, config: Config | None, certs: dict[int, tuple[ServedCert, ...]]) -> None:
        """Encode a state message once (with a config, or with enough sites that it may write a
        shared segment: in a thread) and queue it for every serving worker, in call order. It
        invalidates the cached full state."""
        self._full = None
        large = config is not None or len(certs) >= self.share.pack_min
        encoded = self._state(config, certs, large=large)
        for handle in self._serving():
            handle.send(encoded)

    def _state(
        self,
        config: object,
        certs: dict[int, tuple[ServedCert, ...]],
        *,
        full: bool = False,
        pending: frozenset[int] = frozenset(),
        large: bool = True,
    ) -> Encoded:
        """A ("state", ...) message, its certificates in shared memory where they are (or,
        many of them, will be), encoded in a thread when `large`, else at once."""
        self._repack_due = True
        if large:
            assert self._tg is not None
            return self._tg.create_task(self._encoded_state(config, certs, full, pending))
        done: Encoded = asyncio.get_running_loop().create_future()
        done.set_result(self._encode_state(config, certs, full, pending))
        return done

    def _encode_state(
        self,
        config: object,
        certs: dict[int, tuple[ServedCert, ...]],
        full: bool,
        pending: frozenset[int],
    ) -> Outgoing:
        converted = self.share.convert(certs)
        body = encode(("state", config, converted.certs, full, pending))
        return Outgoing(body, converted.segments)

    async def _encoded_state(
        self,
        config: object,
        certs: dict[int, tuple[ServedCert, ...]],
        full: bool,
        pending: frozenset[int],
    ) -> Outgoing | None:
        """A large state message, encoded in a thread; None if it cannot be (larger than
        edged's IPC allows, out of memory, no memfd for its segment), which is logged. Never
        raises: it runs in the daemon's task group."""
        try:
            return await asyncio.to_thread(self._encode_state, config, certs, full, pending)
        except Exception as exc:
            log.error("cannot send the workers a state: %r", exc)
            return None

    async def _keep_packed(self) -> None:
        """After a change, every REPACK_CHECK seconds (REPACK_SOON after a full reload): whether
        the certificates held privately by the workers (sent inline) and the segments no longer
        served call for a repack."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REPACK_CHECK):
                    await self._repack_soon.wait()
                    await asyncio.sleep(REPACK_SOON)  # a burst of reloads settles first
            self._repack_soon.clear()
            # While the store is read in the background its batches are packed as they come:
            # nothing to gain, and each look would slow the read.
            if not self._repack_due or self._pending or self._stopping or self._lost:
                continue
            self._repack_due = False
            served = dict(self._certs)
            try:
                if await asyncio.to_thread(self.share.wants_repack, served):
                    await self._repack()
            except Exception:  # MemoryError, a bug: the workers keep what they have
                log.exception("cannot repack the certificates shared with the workers")

    async def _repack(self) -> None:
        """Write every certificate served into one new segment and point the workers at it;
        the older segments are forgotten (each worker unmaps one once nothing of it refers to
        it). The switch happens on the event loop between two messages: everything queued
        after it names only the new segments, everything before it is read before the
        workers forget the old ones."""
        try:
            repack = await asyncio.to_thread(self.share.prepare_repack, dict(self._certs))
        except PemShareError as exc:
            log.error("cannot repack the certificates shared with the workers: %s", exc)
            return
        retired = self.share.install(repack)
        # Every site, to the serving workers (the cached full state, which may name the
        # retired segments, is dropped with it); what changed while the segment was written
        # goes inline.
        certs = dict(self._certs)
        self._broadcast(None, certs)
        forget = _now(("forget", retired))
        for handle in self.all:
            handle.send(forget)
            handle.segments_sent.difference_update(retired)
        self._repack_due = False
        size = repack.segment.size if repack.segment is not None else 0
        log.info(
            "certificates shared with the workers repacked: %d sites, %.1f MiB in one segment, "
            "%d older segments retired",
            len(certs),
            size / 2**20,
            len(retired),
        )

    async def _bind(self, addresses: Sequence[Address]) -> None:
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
            self._close_new(fresh)
            raise
        layout = [(address, len(socks)) for address, socks in fresh.items()]
        fds = [sock.fileno() for socks in fresh.values() for sock in socks]
        try:
            await self.zygote.send_listeners(layout, fds)
        except OSError as exc:
            self._close_new(fresh)
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

    def _close_new(self, fresh: Mapping[Address, list[socket.socket]]) -> None:
        for address, socks in fresh.items():
            if address not in self._listeners:
                for sock in socks:
                    sock.close()

    async def _release_listeners(self) -> None:
        """Close the main process's and the zygote's copies of the listening sockets: once
        the workers close theirs, the kernel refuses new connections instead of queueing them
        for nobody."""
        self._close_listeners()
        # Gone, its copies went with it; stuck, it must not hold up the shutdown.
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(KILL_WAIT):
                await self.zygote.send_listeners([], [])

    def _close_listeners(self) -> None:
        for socks in self._listeners.values():
            for sock in socks:
                sock.close()
        self._listeners.clear()

    async def _spawn_generation(self) -> None:
        assert self._tg is not None
        self._generation += 1
        handles = []
        for slot in range(self.count):
            handle = await self._spawn(slot)
            if handle is not None:
                handles.append(handle)
            elif not self._lost:  # no socketpair (EMFILE): try again, the old one serves on
                self._tg.create_task(self._replace(slot, self.current.get(slot)))
        self._full = None
        # Each one serves or is gone by READY_TIMEOUT (_converse kills it then), unless edged
        # is asked to stop: the shutdown waits for this, so no longer.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(READY_TIMEOUT + KILL_WAIT):
                for handle in handles:
                    await _first(handle.ready, handle.gone, self._interrupt)
        if self._interrupt.is_set():
            for handle in handles:
                if not handle.ready.is_set():
                    handle.retiring = True  # abandoned: not replaced when it is gone
                    await self._kill(handle, "abandoned: edged is stopping", logging.INFO)
        await asyncio.to_thread(release_free_memory)  # the full state, sent, is garbage now

    async def _spawn(self, slot: int) -> WorkerHandle | None:
        assert self._tg is not None and self._config is not None
        self._ids += 1
        spawn_id, generation = self._ids, self._generation  # another spawn may run meanwhile
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            log.error("cannot start worker %d: %s", slot, exc)
            return None
        try:
            segs, their_segs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            ours.close()
            theirs.close()
            log.error("cannot start worker %d: %s", slot, exc)
            return None
        try:
            ours.setblocking(False)
            segs.setblocking(False)
            # No line limit: a full state for 100k certificates is one large message.
            reader, writer = await asyncio.open_unix_connection(sock=ours, limit=2**31 - 1)
            handle = WorkerHandle(spawn_id, slot, generation, writer, reader, segs)
            self._by_id[spawn_id] = handle  # before the command: its "spawned" report finds it
            try:
                await self.zygote.send(
                    ("spawn", slot, generation, spawn_id), [theirs.fileno(), their_segs.fileno()]
                )
            except OSError as exc:
                del self._by_id[spawn_id]
                writer.close()
                segs.close()
                self._lose(f"cannot reach the zygote ({exc})")
                return None
        finally:
            theirs.close()
            their_segs.close()
        self.current[slot] = handle
        self.all.add(handle)
        if self._full is None:  # encoded once for a whole generation
            config = FORKED_CONFIG if self._forked is not None else self._config
            self._full = self._state(
                config, dict(self._certs), full=True, pending=frozenset(self._pending)
            )
        handle.send(self._full)
        # The pending TLS-ALPN-01 challenges, installed before it serves: its predecessor
        # retires once it does, and a validation may be waiting in the slot's queue.
        now = time.monotonic()
        pending = [(name, ka, expires - now) for name, (ka, expires) in self._challenges.items()]
        handle.send(_now(("challenges", [c for c in pending if c[2] > 0])))
        if self._stopping:  # stop() ran while this one was being connected
            handle.retiring = True
            handle.send(_now(("stop", 0.0)))
        self._tg.create_task(self._converse(handle))
        return handle

    async def _converse(self, handle: WorkerHandle) -> None:
        """Write one worker's messages and read its reports until it is gone; kill it when it
        does not start serving in time or stops reporting."""
        assert self._tg is not None
        writing = self._tg.create_task(self._write(handle))
        reading: asyncio.Task[object | None] | None = None
        try:
            while True:
                if reading is None:  # one read at a time, never cancelled halfway
                    reading = asyncio.ensure_future(read_message(handle.reader))
                done, _ = await asyncio.wait({reading}, timeout=self._patience(handle))
                if not done:
                    await self._unresponsive(handle)
                    continue
                try:
                    message = reading.result()
                except IpcError as exc:
                    log.error("worker %d: %s", handle.slot, exc)
                    message = None
                reading = None
                if message is None:
                    break
                handle.heard = time.monotonic()
                self._received(handle, message)
        finally:
            if reading is not None:
                reading.cancel()
            writing.cancel()
            handle.gone.set()
            self._acked(handle, None)
            handle.writer.close()
            handle.segment_chan.close()
            self.retired = merge_counters([self.retired, handle.counters])
            handle.counters = Counters()
            handle.active = 0
            self.all.discard(handle)
            self._by_id.pop(handle.id, None)
        await self._after_exit(handle)

    def _patience(self, handle: WorkerHandle) -> float:
        """Seconds until `handle` has been silent too long."""
        if handle.killed:
            return KILL_WAIT
        if handle.ready.is_set():
            return max(0.0, handle.heard + ALIVE_TIMEOUT - time.monotonic())
        return max(0.0, handle.started + READY_TIMEOUT - time.monotonic())

    async def _unresponsive(self, handle: WorkerHandle) -> None:
        if handle.killed:  # killed, and its channel still open: give up on it
            log.error("worker %d (pid %s) did not exit when killed", handle.slot, handle.pid)
            handle.writer.close()
            return
        if handle.ready.is_set():
            why = f"sent nothing for {ALIVE_TIMEOUT:.0f}s"
        else:
            why = f"did not start serving within {READY_TIMEOUT:.0f}s"
        await self._kill(handle, why)

    async def _kill(self, handle: WorkerHandle, why: str, level: int = logging.ERROR) -> None:
        if handle.killed or handle.gone.is_set():
            return
        handle.killed = True
        log.log(level, "worker %d (pid %s) %s: killing it", handle.slot, handle.pid or "?", why)
        if not handle.pid:  # not forked as far as we know: closing its channel ends it
            handle.writer.close()
            return
        try:
            await self.zygote.send(("kill", handle.pid))
        except OSError as exc:
            self._lose(f"cannot reach the zygote ({exc})")
            handle.writer.close()

    def _received(self, handle: WorkerHandle, message: object) -> None:
        assert isinstance(message, tuple)
        if message[0] == "counters":
            handle.counters, handle.active = message[1], message[2]
        elif message[0] == "load":  # a client asked for a site not read yet
            assert self._tg is not None
            self._tg.create_task(self._serve_load(handle, message[1]))
        elif message[0] == "ack":
            self._acked(handle, message[1])
        elif message[0] == "alpn_ask":  # a CA asked a worker for a name this node did not order
            assert self._tg is not None
            self._tg.create_task(self._serve_challenge(handle, message[1], message[2]))
        elif message[0] == "ready":
            if handle.killed:  # written just before the kill landed: it is going
                return
            handle.pid = message[1]
            handle.ready_at = time.monotonic()
            handle.ready.set()
            log.info(
                "worker %d (pid %d, generation %d) serving after %.1fs",
                handle.slot,
                handle.pid,
                handle.generation,
                handle.ready_at - handle.started,
            )
            self._retire_older(handle)

    def _retire_older(self, newer: WorkerHandle) -> None:
        """`newer` serves: the older workers of its slot stop accepting and drain, without a
        deadline (a shutdown sets one), but for the MAX_RETIRING newest of them: older ones
        get drain_timeout."""
        stop = _now(("stop", None))
        older = [h for h in self.all if h.slot == newer.slot and h.id < newer.id]
        for handle in older:
            if not handle.retiring:
                handle.retiring = True
                handle.send(stop)
                self._acked(handle, None)  # nothing new reaches it: no challenge to wait for
        grace = self._config.edged.drain_timeout if self._config is not None else 0.0
        for handle in older:
            if handle.generation + MAX_RETIRING < newer.generation and not handle.hurried:
                handle.hurried = True
                log.info(
                    "worker %d (pid %s) retired %d rotations ago: its connections get %gs",
                    handle.slot,
                    handle.pid or "?",
                    MAX_RETIRING,
                    grace,
                )
                handle.send(_now(("stop", grace)))

    async def _write(self, handle: WorkerHandle) -> None:
        while True:
            message = await asyncio.shield(await handle.outbox.get())
            if message is None:  # could not be encoded (logged): the worker goes without it
                continue
            if handle.writer.is_closing():
                return
            try:
                for segment in message.segments:
                    if segment.id not in handle.segments_sent:
                        await _send_segment(handle.segment_chan, segment)
                        handle.segments_sent.add(segment.id)
            except OSError as exc:
                if not handle.writer.is_closing():  # alive, and it cannot get what it serves
                    await self._kill(handle, f"cannot be sent a certificate segment ({exc})")
                return
            try:
                handle.writer.write(message.body)
                await handle.writer.drain()
            except (ConnectionError, OSError):
                return  # it is gone: _converse reads the end of its channel

    async def _serve_load(self, handle: WorkerHandle, index: int) -> None:
        if index in self._pending and self.load_site is not None:
            await self.load_site(index)  # sends it to every worker when it was pending
        handle.send(self._state(None, {index: self._certs.get(index, ())}, large=False))

    async def _serve_challenge(self, handle: WorkerHandle, seq: int, name: str) -> None:
        """Answer a worker's ("alpn_ask", seq, name) with the shared store's key authorization
        for `name` (None: none, or the store could not be read, which is logged). Never
        raises: it runs in the daemon's task group."""
        found = None
        if self.shared_challenge is not None:
            try:
                found = await self.shared_challenge(name)
            except EdgedError as exc:
                log.warning("shared tls-alpn-01 lookup failed name=%s error=%s", name, exc)
            except Exception:
                log.exception("shared tls-alpn-01 lookup failed name=%s", name)
        handle.send(_now(("alpn_answer", seq, found)))

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

    async def _after_exit(self, handle: WorkerHandle) -> None:
        if handle.retiring or self._stopping or self.current.get(handle.slot) is not handle:
            return
        # Served a while before it died (or went silent): not a crash loop, no back-off.
        if handle.ready_at is not None and handle.heard - handle.ready_at > STABLE_AFTER:
            self._failures[handle.slot] = 0
        log.error(
            "worker %d (pid %s) exited unexpectedly after %.1fs; replacing it",
            handle.slot,
            handle.pid or "?",
            time.monotonic() - handle.started,
        )
        await self._replace(handle.slot, handle)

    async def _replace(self, slot: int, previous: WorkerHandle | None) -> None:
        """Start a new worker for `slot` unless a newer one than `previous` is there (or
        edged stops), after the slot's back-off: 0 s the first time, then 1, 2, 5, 10, 30 s
        while its workers keep failing."""
        while True:
            failures = self._failures.get(slot, 0)
            delay = RESTART_BACKOFF[min(failures, len(RESTART_BACKOFF) - 1)]
            self._failures[slot] = failures + 1
            if delay:
                log.warning("starting a new worker %d in %.0fs", slot, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), delay)
            async with self._lock:
                if self._stopping or self._lost or self.current.get(slot) is not previous:
                    return
                self.own_counters.worker_restarts += 1
                spawned = await self._spawn(slot)
                self._full = None
                if spawned is not None:
                    return

    async def _zygote_reports(self) -> None:
        """Which pid a worker got, spawns that failed and exit statuses (for the log: a
        worker's channel closing is what counts)."""
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
            if report[0] == "spawned":
                handle = self._by_id.pop(report[1], None)
                if handle is not None and not handle.gone.is_set():
                    handle.pid = report[2]
                    self._by_pid[handle.pid] = handle
            elif report[0] == "spawn_failed":
                log.error("cannot start a worker process: %s", report[2])
            elif report[0] == "exited":
                gone = self._by_pid.pop(report[1], None)
                expected = self._stopping or (gone is not None and gone.retiring)
                level = logging.INFO if expected else logging.WARNING
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


def _now(message: tuple[object, ...]) -> Encoded:
    """A small message without certificates, encoded at once."""
    done: Encoded = asyncio.get_running_loop().create_future()
    done.set_result(Outgoing(encode(message)))
    return done


async def _send_segment(chan: socket.socket, segment: Segment) -> None:
    """A segment's fd to a worker (OSError: it is gone)."""
    while True:
        try:
            send_segment(chan, segment)
            return
        except BlockingIOError:  # the worker has not read the ones before: wait, never block
            await writable(chan)


def served_certs(
    bundles: Mapping[int, Sequence[Servable]],
) -> dict[int, tuple[ServedCert, ...]]:
    """What the workers get of each site's certificates (~1 s for 100k sites: in a thread)."""
    return {i: tuple(ServedCert.of(b) for b in group) for i, group in bundles.items()}
