"""A worker process: serves TLS on its share of the listening sockets, nothing else.

Forked by the zygote (edged.zygote). It gets everything it serves from the main process over
its channel — the config and the certificates, already read and validated there, as PEM bytes
or, for large sets, as references into shared memory it maps (edged.pemshare) — so a
certificate change costs a worker one dictionary update, not a re-read of the store. It
reports its counters every second. It stops (closes its listeners, drains its connections) on
"stop" or when the main process goes away; signals are the main process's to act on. A worker
retired by a rotation drains without a deadline (its connections end on their own, an idle one
after idle_timeout); a later "stop" with a grace period (shutdown) shortens that.

Messages (edged.ipc):
  main → worker: ("state", config | None, {site index: (ServedCert | PemRef, ...)}, full,
                  pending)   (a PemRef's segment fd comes first, on the segment channel)
                 (a new worker's first: FORKED_CONFIG for the config, while the one the zygote
                 was forked with is current: the worker has it in memory already)
                 ("challenges", [(name, key authorization, ttl), ...])   right after a new
                 worker's first state: the pending TLS-ALPN-01 challenges, installed before it
                 serves
                 ("alpn", seq, name, key authorization | None, ttl)   a TLS-ALPN-01 challenge
                 ("alpn_answer", seq, key authorization | None)   the shared store's, asked for
                 ("stop", grace)   seconds left to the open connections (None: no limit)
                 ("forget", [segment id, ...])   segments no later message names (a repack)
  worker → main: ("ready", pid), ("counters", Counters, active connections), ("ack", seq),
                 ("load", site index)   a client asked for a site that is still pending
                 ("alpn_ask", seq, name)   a CA asked for a name this node has no challenge
                 for: another fleet node's? (only with a redis:// store)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Iterable

from edged.config import Address, Config, Site
from edged.counters import Counters
from edged.daemon import load_origin_contexts, proxy_settings, worker_count
from edged.heap import freeze_long_lived, release_free_memory
from edged.ipc import FORKED_CONFIG, IpcError, encode, read_message
from edged.pemshare import Carried, PemShareError, Received, SegmentMaps
from edged.proxy import Terminator
from edged.sni import SniIndex, build_index
from edged.tls import ContextCache, SniSelector
from edged.tlsalpn import AlpnChallengeBoard

log = logging.getLogger("edged.worker")

LOAD_TIMEOUT = 5.0  # seconds a handshake waits for a certificate not read yet
# Seconds a validation handshake waits for the main process's answer from the shared store
# (a Redis read; the CA's validation allows ~10 s).
ASK_TIMEOUT = 5.0
REPORT_INTERVAL = 1.0  # seconds between counter reports (what /metrics lags by at most)
# Certificate changes from this many sites on are frozen once applied (edged.heap): a batch of
# the background read is; a renewal's few objects are not worth the collection a freeze does.
FREEZE_MIN = 256


# Certificates of a delta from which it is installed in a thread (a repack, a batch of the
# background read at 100k sites: ~0.1 s of work the event loop would otherwise stop for).
LARGE_DELTA = 1000


def received_certs(
    certs: dict[int, tuple[Carried, ...]], maps: SegmentMaps
) -> dict[int, tuple[Received, ...]]:
    """A message's certificates as this process serves them: references made certificates in
    the mapped segments, and inline ones holding the process's one copy of each chain (those
    of one message share theirs already, as pickle writes a shared object once; those of
    separate messages, renewals over weeks, would each hold their own). PemShareError: a
    segment named cannot be read."""
    resolved = maps.resolve(certs)
    return {i: tuple(cert.shared() for cert in group) for i, group in resolved.items()}


def run_worker(
    slot: int,
    generation: int,
    sockets: list[tuple[Address, socket.socket]],
    listen_ctx: ssl.SSLContext,
    chan: socket.socket,
    segments: socket.socket,
    forked: object = None,
) -> int:
    """The worker's main (in the forked child). `segments`: where the main process sends the
    fds of shared-memory segments. `forked`: the config the zygote was forked with (the main
    process sends FORKED_CONFIG in its place while it is current)."""
    import uvloop

    config = forked if isinstance(forked, Config) else None
    worker = Worker(slot, generation, sockets, listen_ctx, chan, segments, config)
    return uvloop.run(worker.run())


class Worker:
    def __init__(
        self,
        slot: int,
        generation: int,
        sockets: list[tuple[Address, socket.socket]],
        listen_ctx: ssl.SSLContext,
        chan: socket.socket,
        segments: socket.socket,
        forked: Config | None = None,
    ) -> None:
        self.slot = slot
        self.generation = generation
        self.sockets = sockets
        self.listen_ctx = listen_ctx
        self.chan = chan
        self.counters = Counters()
        self.config: Config | None = None
        self.forked = forked
        self.certs: dict[int, tuple[Received, ...]] = {}
        segments.setblocking(False)  # a segment is sent before the message naming it
        self.maps = SegmentMaps(segments)
        self._stop = asyncio.Event()
        self._deadline: float | None = None  # monotonic; None: drain until the last one ends
        self._regrace = asyncio.Event()  # a later "stop" brought the deadline forward
        self._loads: dict[int, asyncio.Event] = {}  # site index → its certificate arrived
        self._asks: dict[int, asyncio.Future[str | None]] = {}  # "alpn_ask" seq → its answer
        self._ask_seq = 0

    async def run(self) -> int:
        # Certificates it cannot read: it exits, and the main process starts a new worker with
        # the whole state.
        failures: list[str] = []
        try:
            return await self._run()
        except* PemShareError as group:
            failures = [str(exc) for exc in group.exceptions]
        log.error(
            "worker %d: cannot read the certificates sent: %s; exiting (a new worker takes its "
            "place)",
            self.slot,
            "; ".join(failures),
        )
        return 1

    async def _run(self) -> int:
        reader, writer = await asyncio.open_unix_connection(sock=self.chan)
        first = await read_message(reader)
        if first is None:  # abandoned before it started (edged is stopping): nothing to do
            log.info("worker %d: the main process closed its channel; exiting", self.slot)
            return 0
        if not (isinstance(first, tuple) and first[0] == "state" and first[1] is not None):
            log.error("worker %d: no state from the main process; exiting", self.slot)
            return 1
        config = first[1]
        if config == FORKED_CONFIG:
            config = self.forked
            if config is None:
                log.error("worker %d: no config from the zygote; exiting", self.slot)
                return 1
        self.forked = None  # self.config from here on: gone at the first config change
        assert isinstance(config, Config)
        # The main process decides: it gets the signals (systemd and a terminal send them to
        # every process of the service at once) and tells each worker in order. A worker that
        # acted on its own SIGTERM first would look like a crash and be replaced.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        async with asyncio.TaskGroup() as tg:
            cache = ContextCache(config.tls.context_cache_size, config.tls.min_version)
            selector = SniSelector(SniIndex([]), cache, config.tls.alpn)
            # The inherited context keeps its ticket keys; only the callback is this process's.
            self.listen_ctx.sni_callback = selector.callback
            term = Terminator(
                listen_ctx=self.listen_ctx,
                selector=selector,
                settings=proxy_settings(config, worker_count(config)),
                counters=self.counters,
                tg=tg,
                alpn_board=AlpnChallengeBoard(),
                load_pending=lambda site: self._request_load(writer, site),
            )
            assert term.alpn_board is not None
            term.alpn_board.ask = lambda name: self._ask_shared(writer, name)
            await self._apply(term, config, first[2], full=True, pending=first[4])
            failed = await self._install_challenges(reader, term.alpn_board)
            if failed is not None:
                return failed
            servers = [await term.serve(sock) for _, sock in self.sockets]
            writer.write(encode(("ready", os.getpid())))
            reports = tg.create_task(self._report_loop(writer, term))
            reading = tg.create_task(self._read_loop(reader, writer, term))
            await self._stop.wait()
            for server in servers:
                server.close()  # uvloop closes the listening fd itself (it detaches `sock`)
            await self._drain(term)
            reports.cancel()
            reading.cancel()
            # The main process may be gone (uvloop refuses a write to the closed channel).
            with contextlib.suppress(ConnectionError, OSError):
                if not writer.is_closing():
                    writer.write(encode(("counters", self.counters, 0)))
                    await writer.drain()
            writer.close()
        return 0

    async def _install_challenges(
        self, reader: asyncio.StreamReader, board: AlpnChallengeBoard
    ) -> int | None:
        """The TLS-ALPN-01 challenges pending when this worker was started (the message after
        its first state), on its board before it serves. None when done, else the exit status
        (the main process closed the channel: 0, as when abandoned before the first state)."""
        try:
            message = await read_message(reader)
        except IpcError as exc:
            log.error("worker %d: %s; exiting", self.slot, exc)
            return 1
        if message is None:
            log.info("worker %d: the main process closed its channel; exiting", self.slot)
            return 0
        if not (isinstance(message, tuple) and message[0] == "challenges"):
            log.error("worker %d: no challenges from the main process; exiting", self.slot)
            return 1
        for name, key_authorization, ttl in message[1]:
            await asyncio.to_thread(board.add, name, key_authorization, ttl, share=False)
        return None

    async def _drain(self, term: Terminator) -> None:
        """Let the open connections finish until the deadline (none: until the last one ends);
        reading goes on meanwhile, so a shutdown's or second signal's "stop" shortens it."""
        while True:
            grace = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
            drain = asyncio.ensure_future(term.drain(grace))
            regrace = asyncio.ensure_future(self._regrace.wait())
            await asyncio.wait({drain, regrace}, return_when=asyncio.FIRST_COMPLETED)
            regrace.cancel()
            if drain.done():
                drain.result()
                return
            drain.cancel()
            await asyncio.wait({drain})
            self._regrace.clear()

    def _stop_within(self, grace: float | None) -> None:
        if grace is not None:
            deadline = time.monotonic() + grace
            if self._deadline is None or deadline < self._deadline:
                self._deadline = deadline
                self._regrace.set()
        self._stop.set()

    def _stop_orphaned(self) -> None:
        """The main process is gone: drain as a shutdown would (nobody can say more)."""
        self._stop_within(self.config.edged.drain_timeout if self.config else 0.0)

    async def _read_loop(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, term: Terminator
    ) -> None:
        while True:
            try:
                message = await read_message(reader)
            except IpcError as exc:
                log.error("worker %d: %s; stopping", self.slot, exc)
                message = None
            if message is None:  # the main process is gone: finish what is open, then exit
                log.warning("worker %d: main process gone; draining and exiting", self.slot)
                self._stop_orphaned()
                return
            assert isinstance(message, tuple)
            if message[0] == "state":
                await self._apply(term, message[1], message[2], full=message[3], pending=message[4])
            elif message[0] == "alpn":  # a TLS-ALPN-01 challenge added or removed
                _, seq, name, key_authorization, ttl = message
                board = term.alpn_board
                if board is not None:
                    if key_authorization is None:
                        board.remove(name, share=False)
                    else:
                        await asyncio.to_thread(
                            board.add, name, key_authorization, ttl, share=False
                        )
                writer.write(encode(("ack", seq)))
            elif message[0] == "alpn_answer":
                future = self._asks.pop(message[1], None)
                if future is not None and not future.done():
                    future.set_result(message[2])
            elif message[0] == "stop":
                self._stop_within(message[1])
            elif message[0] == "forget":
                self.maps.forget(message[1])

    async def _apply(
        self,
        term: Terminator,
        config: Config | None,
        sent: dict[int, tuple[Carried, ...]],
        *,
        full: bool,
        pending: frozenset[int],
    ) -> None:
        """Swap in what the main process sent: the certificates that changed (`full`: all of
        them), with the new config when it changed."""
        self.maps.receive()  # here on the event loop, not in the threads below (SegmentMaps)
        selector = term.selector
        if config is None:
            assert self.config is not None
            current = self.config
            if len(sent) >= LARGE_DELTA:
                certs, index = await asyncio.to_thread(self._delta, sent, current, selector.index)
            else:  # a few (a renewal)
                certs, index = self._delta(sent, current, selector.index)
            self.certs.update(certs)
            selector.index = index
            self._loaded(certs)
            if len(certs) >= FREEZE_MIN:  # a batch of the background read, a repack
                freeze_long_lived()
            return
        old = self.config
        certs = await asyncio.to_thread(received_certs, sent, self.maps)
        self.certs = dict(certs) if full else {**self.certs, **certs}
        for i in [i for i in self.certs if i >= len(config.sites)]:  # sites removed at the end
            del self.certs[i]
        index = await asyncio.to_thread(
            build_index, config.sites, self.certs, config.tls.default_cert, pending
        )
        # The main process reported CA files that do not load; here they only go without.
        origins, _ = await asyncio.to_thread(load_origin_contexts, config)
        if old is not None and old.tls != config.tls:
            selector.cache = ContextCache(config.tls.context_cache_size, config.tls.min_version)
            selector.default_alpn = tuple(config.tls.alpn)
        selector.index = index
        term.settings = proxy_settings(config, worker_count(config))
        term.origin_contexts = origins
        self.config = config
        self._loaded([i for i in self._loads if i not in pending])
        freeze_long_lived()
        await asyncio.to_thread(release_free_memory)  # the previous index is garbage now

    def _delta(
        self, sent: dict[int, tuple[Carried, ...]], config: Config, index: SniIndex
    ) -> tuple[dict[int, tuple[Received, ...]], SniIndex]:
        """The certificates of a delta and the index with them: O(changes), an O(1) lookup of
        each site (no dict of 100k sites per renewal)."""
        certs = received_certs(sent, self.maps)
        changes = [
            (site, group) for i, group in certs.items() if (site := config.site_at(i)) is not None
        ]
        return certs, index.updated(changes)

    def _loaded(self, indices: Iterable[int]) -> None:
        """Wake the handshakes waiting for these sites: call once their index is installed
        (woken earlier, a handshake would find the site still pending)."""
        for i in list(indices):
            event = self._loads.pop(i, None)
            if event is not None:
                event.set()

    async def _request_load(self, writer: asyncio.StreamWriter, site: Site) -> None:
        """A client asked for a site whose certificate the main process has not read yet:
        ask for it and wait (bounded) until it arrives."""
        event = self._loads.get(site.index)
        if event is None:
            event = self._loads[site.index] = asyncio.Event()
            writer.write(encode(("load", site.index)))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LOAD_TIMEOUT):
                await event.wait()

    async def _ask_shared(self, writer: asyncio.StreamWriter, name: str) -> str | None:
        """The key authorization another fleet node put in the shared store for `name`,
        asked of the main process (None: none, no shared store, or no answer in time)."""
        if self.config is None or self.config.redis_url is None:
            return None  # no fleet: nobody else orders this node's names
        self._ask_seq += 1
        seq = self._ask_seq
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._asks[seq] = future
        try:
            writer.write(encode(("alpn_ask", seq, name)))
            async with asyncio.timeout(ASK_TIMEOUT):
                return await future
        except TimeoutError:
            log.warning(
                "worker %d: no answer from the main process for the tls-alpn-01 challenge of "
                "%s within %.0fs; the validation is refused",
                self.slot,
                name,
                ASK_TIMEOUT,
            )
            return None
        finally:
            self._asks.pop(seq, None)

    async def _report_loop(self, writer: asyncio.StreamWriter, term: Terminator) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            if writer.is_closing():  # the main process is gone (a write would raise)
                self._stop_orphaned()
                return
            try:
                writer.write(encode(("counters", self.counters, len(term.active))))
                await writer.drain()
            except (ConnectionError, OSError):
                self._stop_orphaned()
                return
