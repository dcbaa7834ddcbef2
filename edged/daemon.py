"""The daemon: wires config, store, certificates and listeners; handles signals; drains on stop.

Everything long-running lives in one TaskGroup. Signals only set events; the main coroutine
acts on them, so a reload and a stop never race each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from edged import renewal, systemd
from edged.admin import (
    AdminStartupError,
    read_token_file,
    replace_token,
    start_admin_server,
    warn_no_token,
)
from edged.certs import CertBundle
from edged.config import Address, Config, Site, config_digest, load_config_digest
from edged.counters import Counters, merge_counters
from edged.errors import ConfigError, EdgedError, Problem, StoreError
from edged.fleet import follow_changes
from edged.heap import freeze_long_lived, release_free_memory
from edged.http01 import ChallengeBoard, Http01App, HttpListeners
from edged.inotify import InotifyError
from edged.listen import InheritedListeners, StartupError
from edged.metrics import (
    CertMetric,
    MetricsServerError,
    NameStatus,
    start_metrics_server,
)
from edged.names import name_of_store_dir
from edged.operations import DaemonOperations
from edged.proxy import ProxySettings, Terminator
from edged.reload import (
    Snapshot,
    Stamp,
    WatchSet,
    meta_paths,
    resolves_as_watched,
    snapshot_entry,
    take_snapshot,
    unchanged_entries,
    watch_changes,
    watch_set,
)
from edged.renewal import CertStatus, RenewalState
from edged.renewer import Renewer
from edged.sni import SniIndex, build_index
from edged.sources import SiteCerts, load_site_certs
from edged.store import Store, open_store
from edged.store.redis import Cursor, RedisStore
from edged.tls import ContextCache, SniSelector, build_listening_context, build_origin_context
from edged.tlsalpn import AlpnChallengeBoard
from edged.workers import KILL_WAIT, WorkerPool, served_certs
from edged.zygote import Zygote

log = logging.getLogger("edged.daemon")

CHALLENGE_SHARE_TIMEOUT = 10.0  # seconds the ACME thread waits for workers to take a challenge
STATUS_INTERVAL = 10.0  # seconds between checks whether systemd's STATUS= line changed
STATUS_IN_THREAD = 2000  # sites or states from which that check walks them in a thread
LOG_PATHS = 10  # changed paths named in the log line that reports them (the rest counted)
WATCH_RETRY = 60.0  # seconds before the file watcher is tried again after a host limit stopped it
# From this many store-backed sites on, the store is indexed in the background after the
# listeners are up (a name asked for before its turn is read at once): reading 100k store
# entries takes from seconds to a minute, depending on the disk and its cache.
LAZY_MIN = 2000
FILL_BATCH = 2000  # store sites read (and sent to the workers) per background batch


def proxy_settings(config: Config, processes: int = 1) -> ProxySettings:
    """The data path's settings for one of `processes` serving processes: each enforces an
    even share of max_connections (a host-wide limit; rounded up)."""
    return ProxySettings(
        handshake_timeout=config.tls.handshake_timeout,
        idle_timeout=config.edged.idle_timeout,
        connect_timeout=config.edged.backend_connect_timeout,
        max_connections=-(-config.edged.max_connections // max(1, processes)),
        max_connections_per_ip=config.edged.max_connections_per_ip,
        connection_log_sample=(
            config.edged.connection_log_sample if config.edged.connection_log else 0.0
        ),
        preread=config.tls.preread,
    )


@dataclass(frozen=True)
class Loaded:
    """Everything a (re)load prepares off the event loop before it is swapped in."""

    config: Config
    certs: SiteCerts
    origin_contexts: dict[int, ssl.SSLContext]
    watch: WatchSet  # the files this config depends on
    snapshot: Snapshot  # their state as this load saw it
    pending: frozenset[int] = frozenset()  # store sites left for the background fill


def load_origin_contexts(config: Config) -> tuple[dict[int, ssl.SSLContext], list[Problem]]:
    """The origin_tls client contexts by site index, and a Problem for each CA file that does
    not load (that site then goes without). Blocking (reads the CA files)."""
    origins: dict[int, ssl.SSLContext] = {}
    problems: list[Problem] = []
    for site in config.sites:
        if site.origin_tls:
            try:
                origins[site.index] = build_origin_context(site.origin_ca_file)
            except (OSError, ssl.SSLError) as exc:
                problems.append(
                    Problem(
                        str(site.origin_ca_file),
                        f"{site.key}.origin_ca_file",
                        f"cannot load CA certificates: {exc}",
                    )
                )
    return origins, problems


def store_sites(config: Config) -> list[Site]:
    """The sites whose certificates come from the store (not files, not passthrough)."""
    return [s for s in config.sites if s.stored]


@dataclass(frozen=True)
class Serving:
    """What the daemon serves now, for a full load to reuse (see prepare)."""

    config: Config
    bundles: Mapping[int, tuple[CertBundle, ...]]  # a dict the daemon replaces, never changes
    snapshot: Snapshot  # a copy: the stamps of the store entries these bundles were read from
    unclean: Collection[str]  # store names not served as last read (see unclean_names)
    uploads: Collection[str] = frozenset()  # store names whose entry, as last read, is an upload


def prepare(
    config: Config,
    config_path: Path,
    store: Store | None,
    now: datetime,
    *,
    lazy: bool = False,
    serving: Serving | None = None,
) -> Loaded:
    """Blocking: read and validate certificates and origin CAs. Runs in a thread. `lazy`:
    leave the store's certificates for the background fill (see Daemon._fill). `serving`:
    what is served now. A store entry unchanged since its served bundles were read from it
    (same meta.json stamp, read without a problem) is not read again, only checked again
    (sources.recheck_served): a full reload of 100k unchanged entries read them all (~4 s,
    and their PEM held twice meanwhile). A changed entry whose pair has the bytes of a served
    one is not parsed again (sources.validate_stored)."""
    watch = watch_set(config, config_path)
    # Before reading: a change during the read shows as new.
    snapshot = take_snapshot(watch, store=not lazy)
    # An expired store certificate is still served when it is all a site has (clients decide).
    sites = [s for s in config.sites if s.cert_file is not None] if lazy else None
    known: dict[bytes, CertBundle] = {}
    unchanged: dict[str, tuple[CertBundle, ...]] = {}
    if serving is not None:
        known = {b.leaf_pem: b for group in serving.bundles.values() for b in group}
        if not lazy and config.store_path is not None:
            unchanged = _unchanged_served(serving, config.store_path, snapshot)
    certs = load_site_certs(
        config,
        store,
        now,
        keep_expired=True,
        light=True,
        sites=sites,
        known=known,
        unchanged=unchanged,
        uploaded=serving.uploads if serving is not None else (),
    )
    origins, origin_problems = load_origin_contexts(config)
    certs = SiteCerts(
        certs.bundles, (*certs.problems, *origin_problems), certs.expired, certs.uploads
    )
    pending = frozenset(s.index for s in store_sites(config)) if lazy else frozenset()
    return Loaded(config, certs, origins, watch, snapshot, pending)


def _unchanged_served(
    serving: Serving, store_root: Path, snapshot: Snapshot
) -> dict[str, tuple[CertBundle, ...]]:
    """Store name → the bundles served from its entry, for the entries unchanged since."""
    served = {
        site.name: bundles
        for site in store_sites(serving.config)
        if (bundles := serving.bundles.get(site.index)) and site.name not in serving.unclean
    }
    same = unchanged_entries(serving.snapshot, snapshot, store_root, served)
    return {name: served[name] for name in same}


def unclean_names(
    sites: Iterable[Site], certs: SiteCerts, bundles: Mapping[int, tuple[CertBundle, ...]]
) -> set[str]:
    """The store names among `sites` whose served bundles are not simply what their entry
    held when read: a problem was found (a refused pair, an expired certificate), or an older
    certificate is kept. Their entries are read again at a full load, so that it reports what
    it finds, as every full load did."""
    faulty = {p.key for p in certs.problems}
    return {
        site.name
        for site in sites
        if site.stored
        and (
            site.key in faulty
            or site.index in certs.expired
            or bundles.get(site.index) != certs.bundles.get(site.index)
        )
    }


def _same_source(old: Site, new: Site) -> bool:
    return (old.names, old.cert_file, old.key_file) == (new.names, new.cert_file, new.key_file)


def keep_or_replace(
    site: Site,
    kept: tuple[CertBundle, ...] | None,
    new: tuple[CertBundle, ...] | None,
    expired: bool,
) -> tuple[CertBundle, ...] | None:
    """What a site serves after a load found `new` (None: nothing valid) while it served
    `kept`: the old certificate stays when the new one failed validation or is expired."""
    if not kept or new == kept:
        return new
    if new is None:
        log.warning("%s: keeping the previous certificate for %s", site.key, site.name)
        return kept
    if expired:
        log.error(
            "%s: the stored certificate for %s is expired: refused as a replacement, "
            "keeping the previous certificate",
            site.key,
            site.name,
        )
        return kept
    return new


def build_serving(
    old_config: Config | None,
    old_bundles: dict[int, tuple[CertBundle, ...]],
    config: Config,
    new_bundles: dict[int, tuple[CertBundle, ...]],
    expired: Collection[int] = (),
    pending: Collection[int] = (),
) -> tuple[dict[int, tuple[CertBundle, ...]], SniIndex]:
    """The bundles to serve and their index. A site whose new certificate failed validation
    keeps serving its old one (same names, same files). `expired`: sites whose new bundles
    are expired, loaded only because there is nothing else: a site already serving something
    keeps that (an expired certificate is never accepted as a replacement). Pure; runs in a
    thread."""
    bundles = dict(new_bundles)
    if old_config is not None:
        old_sites = {s.name: s for s in old_config.sites}
        for site in config.sites:
            old = old_sites.get(site.name)
            if old is None or not _same_source(old, site):
                continue
            chosen = keep_or_replace(
                site, old_bundles.get(old.index), bundles.get(site.index), site.index in expired
            )
            if chosen is not None:
                bundles[site.index] = chosen
    return bundles, build_index(config.sites, bundles, config.tls.default_cert, pending)


def worker_count(config: Config) -> int:
    """`[edged] workers`: 0 means one per CPU core edged may run on (its affinity: systemd's
    CPUAffinity=/AllowedCPUs=, a container's cpuset), not per core of the host."""
    return config.edged.workers or len(os.sched_getaffinity(0)) or 1


# Which kind a coalesced reload is reported as: the operator's request over edged's own.
_RELOAD_RANK = {"signal": 2, "file": 1, "store": 0}


class Daemon:
    def __init__(
        self,
        config_path: Path,
        zygote: Zygote | None = None,
        config: Config | None = None,
        config_digest: bytes | None = None,
        inherited: list[systemd.Inherited] | None = None,
    ) -> None:
        """`zygote`: run the TLS data path in worker processes forked by it (workers > 1).
        `config`: already loaded from `config_path` (by the CLI, before forking the zygote),
        from a text whose SHA-256 is `config_digest`. `inherited`: the sockets passed by
        socket activation, taken by the CLI before it forked (None: taken in run())."""
        self.config_path = config_path
        self._preloaded = config
        self._preloaded_digest = config_digest
        self._exit_code = 0
        self._filled = asyncio.Event()  # every store certificate has been read once
        self._snapshot_store = True  # the snapshot covers the store (not during a lazy start)
        self._loading: dict[int, asyncio.Task[None]] = {}  # site index → its on-demand read
        self.zygote = zygote
        self.pool: WorkerPool | None = None
        self._tg: asyncio.TaskGroup | None = None
        self.counters = Counters()
        self.ready = asyncio.Event()
        self.config: Config | None = None
        self.store: Store | None = None
        self.term: Terminator | None = None
        self.selector: SniSelector | None = None
        self.bundles: dict[int, tuple[CertBundle, ...]] = {}
        self._loaded_watch: WatchSet | None = None
        self._snapshot: Snapshot = {}
        # Store names whose served certificates are not what their entry held when last read
        # (see unclean_names): a full load reads these again even when unchanged.
        self._unclean: set[str] = set()
        # Store names whose entry held an upload when last read (see SiteCerts.uploads), for
        # the renewer to leave alone without reading every entry again (see managed_sites).
        self._uploads: set[str] = set()
        # The SHA-256 of the config text now serving (None: not known), and the files the
        # watcher reported since the last reload began (None: something else asked too): a
        # report of the config file alone that still holds that text is not reloaded again
        # (an edit followed by a SIGHUP is one reload, not two).
        self._config_digest: bytes | None = None
        self._changed: set[Path] | None = set()
        self._servers: dict[Address, asyncio.AbstractServer] = {}
        self._stop = asyncio.Event()
        self._abort = asyncio.Event()  # a second SIGTERM/SIGINT: stop draining, exit now
        self._renewing: asyncio.Task[None] | None = None  # the renewal loop, once running
        self._rotation_changed = asyncio.Event()  # a reload changed tls.ticket_key_rotation
        self._following: asyncio.Task[None] | None = None  # a Redis store's changes, followed
        # The fleet's cursor taken before the startup load: the follower's first resync then
        # reads only what changed since, not every certificate a second time.
        self._fleet_cursor: Cursor | None = None
        self._exited = asyncio.Event()  # drained: the systemd loop ends
        self._last_status = ""
        self._status_sent = 0  # STATUS= lines sent: a check in a thread sees if one came since
        self._inherited = InheritedListeners([])
        self._passed = inherited
        self._reload = asyncio.Event()
        self._reload_kind = "signal"
        self._reload_all = False
        self._reload_names: set[str] = set()
        self._watching: WatchSet | None = None
        self._watch_stop = asyncio.Event()
        self.board = ChallengeBoard()
        self.alpn_board = AlpnChallengeBoard()  # TLS-ALPN-01, answered on the https listeners
        self.http01 = Http01App(self.board, self._current_config)
        self.http = HttpListeners(self.http01)
        self.renewer = Renewer(
            board=self.board,
            alpn_board=self.alpn_board,
            counters=self.counters,
            on_installed=lambda name: self.reload("store", {name}),
            serving=self.serving,
            served=self.served,
        )
        self._metrics: web.AppRunner | None = None
        self._admin: web.AppRunner | None = None
        self._reload_lock = asyncio.Lock()
        self._stopping = False
        self.started = time.time()

    def _current_config(self) -> Config:
        assert self.config is not None
        return self.config

    # --- live state (metrics, status) -------------------------------------------------------

    def serving(self, name: str) -> CertBundle | None:
        """The certificate served for the site whose first name is `name` (first key type)."""
        found = self.served(name)
        return found[0] if found else None

    def served(self, name: str) -> tuple[CertBundle, ...]:
        """Every certificate served for the site whose first name is `name` (one per key
        type, the first key type's first)."""
        site = self.config.site_for(name) if self.config else None
        return self.bundles.get(site.index, ()) if site is not None else ()

    def store_available(self) -> bool:
        """False while a shared (Redis) store is unreachable."""
        return bool(getattr(self.store, "available", True))

    def dns01_leftovers(self) -> int:
        """DNS-01 TXT values left by interrupted orders that are not deleted yet."""
        journal = self.renewer.journal
        return journal.leftover_count() if journal is not None else 0

    def shared_certs(self) -> tuple[int, int] | None:
        """With worker processes: the segments of certificates shared with them and their
        bytes (edged.pemshare); None without."""
        if self.pool is None:
            return None
        return len(self.pool.share), self.pool.share.size()

    def connections_active(self) -> int:
        own = len(self.term.active) if self.term is not None else 0
        return own + (self.pool.connections_active() if self.pool is not None else 0)

    def total_counters(self) -> Counters:
        """This process's counters plus, with worker processes, the sum of theirs."""
        if self.pool is None:
            return self.counters
        return merge_counters([self.counters, self.pool.counters()])

    def cert_metrics(self) -> list[CertMetric]:
        return cert_metrics_of(self.config, self.bundles)

    def status_text(self) -> str:
        """The one-line summary systemd shows (`systemctl status edged`)."""
        conns = self.connections_active()
        if self._stop.is_set():
            return f"stopping: draining {conns} connections"
        return status_summary(self.config, self.bundles, self.renewer.states.values(), conns)

    async def _status_text_off_loop(self) -> str:
        """status_text, its walks over every site and state (every STATUS_INTERVAL) in a
        thread from STATUS_IN_THREAD sites on, on a copy of the states (the loop changes them)."""
        sites = len(self.config.sites) if self.config is not None else 0
        if self._stop.is_set() or max(sites, len(self.renewer.states)) < STATUS_IN_THREAD:
            return self.status_text()
        config, bundles, states = self.config, self.bundles, list(self.renewer.states.values())
        conns = self.connections_active()
        sent = self._status_sent
        text = await asyncio.to_thread(status_summary, config, bundles, states, conns)
        # A stop ("stopping: draining") or a reload sends a newer line meanwhile: this one is
        # out of date, not sent over it (the last line sent is answered: nothing changed).
        stale = self._stop.is_set() or sent != self._status_sent
        return self._last_status if stale else text

    def _send_status(self, *, only_changed: bool = False, text: str | None = None) -> None:
        text = self.status_text() if text is None else text
        if only_changed and text == self._last_status:
            return
        self._last_status = text
        self._status_sent += 1
        systemd.notify(systemd.status_line(text))

    def name_statuses(self) -> list[NameStatus]:
        return name_statuses_of(self.config, self.bundles, self.renewer.states)

    # --- control --------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def request_abort(self) -> None:
        """Stop at once: abort open connections instead of draining them, and cancel an ACME
        order in progress (it resumes at the next start)."""
        self._stop.set()
        self._abort.set()
        if self._renewing is not None:
            self._renewing.cancel()

    def _on_signal(self, name: str) -> None:
        if self._stop.is_set():
            if not self._abort.is_set():
                log.warning("%s again: aborting open connections and exiting now", name)
            self.request_abort()
        else:
            log.info("%s: stopping (send it again to exit without draining)", name)
            self.request_stop()

    def request_reload(self, kind: str = "signal", names: Collection[str] | None = None) -> None:
        """Ask for a reload; requests that arrive while one runs coalesce into one more.
        `names`: only the store certificates of these names changed (a renewal, an upload, a
        fleet change): only their sites are read again. Requests that coalesce are one reload,
        logged and counted under the operator's kind when one of them was theirs: a SIGHUP that
        meets a file change is reported as the SIGHUP, not as the change."""
        if not self._reload.is_set() or _RELOAD_RANK.get(kind, 0) >= _RELOAD_RANK.get(
            self._reload_kind, 0
        ):
            self._reload_kind = kind
        if names is None:
            self._reload_all = True
        else:
            self._reload_names.update(names)
        if kind != "file":  # merged with this, a file report can no longer be skipped
            self._changed = None
        self._reload.set()

    @property
    def index(self) -> SniIndex:
        assert self.selector is not None
        return self.selector.index

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self, *, install_signals: bool = True) -> int:
        # Socket activation: listening sockets passed by systemd (edged.socket), used for the
        # [listen] addresses they are bound to.
        passed = self._passed if self._passed is not None else systemd.listen_fds()
        self._passed = None
        self._inherited = InheritedListeners(passed)
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if install_signals else ()
        # At once, before anything else: a SIGTERM or SIGHUP while edged is still starting
        # (systemd stopping or reloading it, a large store still being read) would otherwise
        # kill it with the default action and leave its workers behind. A stop asked for now
        # takes effect when startup is done; a reload request is served after it.
        for sig in signals:
            if sig == signal.SIGHUP:
                loop.add_signal_handler(sig, self.request_reload)
            else:
                loop.add_signal_handler(sig, self._on_signal, sig.name)
        try:
            return await self._run()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            self._inherited.close()

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        digest = None
        forked = self._preloaded  # what the zygote was forked with (edged.cli)
        try:
            if self._preloaded is not None:
                config, digest = self._preloaded, self._preloaded_digest
            else:
                config, digest = await asyncio.to_thread(load_config_digest, self.config_path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("config: %s", problem)
            return 1
        self._preloaded = None
        # Background indexing reads a pending name before its handshake: needs the pre-read.
        lazy = config.tls.preread and len(store_sites(config)) >= LAZY_MIN
        try:
            store = self._open_store(config)
            self._fleet_cursor = await _cursor_of(store)
            loaded = await self._prepare(config, store, lazy=lazy)
        except (EdgedError, OSError) as exc:
            log.error("cannot start: %s", exc)
            return 1
        self._log_problems(loaded.certs.problems)

        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            if self.zygote is not None:
                self.pool = WorkerPool(
                    self.zygote, self._inherited, self.counters, forked, interrupt=self._stop
                )
                self.pool.on_lost = self._workers_lost
                self.alpn_board.on_change = self._challenge_forwarder(loop, self.pool)
            cache = ContextCache(config.tls.context_cache_size, config.tls.min_version)
            self.selector = SniSelector(SniIndex([]), cache, config.tls.alpn)
            self.term = Terminator(
                listen_ctx=build_listening_context(config.tls, self.selector),
                selector=self.selector,
                settings=proxy_settings(config),
                counters=self.counters,
                tg=tg,
                alpn_board=self.alpn_board,
                load_pending=self.load_now,
            )
            self._use_store(store, follow=False)  # followed once the listeners are up
            await self._apply(loaded)
            self._config_digest = digest
            freeze_long_lived()  # before the listeners: its one pass holds up no handshake
            try:
                await self._sync_all_listeners(config)
                self._inherited.close_unused()
                if config.listen.metrics is not None:
                    self._metrics = await start_metrics_server(
                        config.listen.metrics, MetricsView(self)
                    )
                if config.listen.admin is not None:
                    self._admin = await start_admin_server(
                        config.listen.admin,
                        DaemonOperations(self),
                        token_file=config.listen.admin_token_file,
                    )
            except (StartupError, MetricsServerError, AdminStartupError) as exc:
                log.error("%s", exc)
                self._close_listeners()
                await self._close_services()
                await self._close_pool(abort=True)
                return 1
            if not lazy:
                await self._configure_renewer(config, store)
                self._filled.set()
            try:
                log.info(
                    "edged ready: %d sites, %d names, listening on %s",
                    len(config.sites),
                    len(self.index),
                    ", ".join(str(a) for a in self.listening()),
                )
                self.ready.set()
                systemd.notify("READY=1")
                self._send_status()
                tg.create_task(self._systemd_loop())
                tg.create_task(self._watch_loop())
                rotating = tg.create_task(self._ticket_rotation_loop())
                if lazy:
                    tg.create_task(self._fill(config, store_sites(config)))
                self._renewing = tg.create_task(self._renew_when_filled())
                self._follow(store)
                try:
                    await self._serve()
                finally:
                    self._watch_stop.set()
                if self._following is not None:
                    self._following.cancel()
                rotating.cancel()
                await self._shut_down()
            finally:
                self._exited.set()
        log.info("edged stopped")
        return self._exit_code

    def _use_store(self, store: Store, *, follow: bool = True) -> None:
        """Serve from `store` (at start, or a reload that names another one): the challenge
        boards share through it when it is Redis (else through nothing), and a Redis store's
        changes are followed, by a new follower when the store is another one."""
        if store is self.store:
            return
        self.store = store
        shared = store if isinstance(store, RedisStore) else None
        self.board.shared = shared
        self.alpn_board.shared = shared
        if self._following is not None:
            self._following.cancel()
            self._following = None
        if follow:
            self._follow(store)

    def _follow(self, store: Store) -> None:
        """Follow a Redis store's published changes (another node's certificates and renewal
        states, resyncs) until stopped or replaced."""
        if not isinstance(store, RedisStore) or self._tg is None:
            return
        cursor, self._fleet_cursor = self._fleet_cursor, None  # another store starts afresh
        self._following = self._tg.create_task(
            follow_changes(
                store,
                self.request_reload,
                self._stop,
                on_state=self.renewer.note_shared_state,
                on_cert=lambda name: self.request_reload("store", {name}),
                cursor=cursor,
            )
        )

    def _workers_lost(self, why: str) -> None:
        """Without the zygote no worker can be replaced: stop (draining) and exit 1, so the
        service manager (Restart=on-failure) starts edged afresh."""
        log.error("%s: stopping with exit status 1 so that edged is restarted", why)
        self._exit_code = 1
        self.request_stop()

    async def _shut_down(self) -> None:
        """Stop accepting, then let open connections finish for up to drain_timeout; a second
        signal (request_abort) cuts every wait short and aborts what is left."""
        assert self.term is not None
        async with self._reload_lock:  # a reload in progress finishes first, none starts after
            self._stopping = True
            self._close_listeners()
            if self.pool is not None:
                await self.pool.stop(abort=False)
        await self._unless_aborted(self._close_services())
        systemd.notify("STOPPING=1")
        self._send_status()
        log.info(
            "stopping: draining %d connections (up to %ss)",
            self.connections_active(),
            self._drain(),
        )
        drain = asyncio.ensure_future(self.term.drain(self._drain()))
        finished = await self._unless_aborted(drain)
        if finished:
            aborted = drain.result()
            if aborted:
                log.warning("drain timeout: aborted %d connections", aborted)
            if self.pool is not None:  # the workers drain on their own, with the same timeout
                finished = await self._unless_aborted(self.pool.wait_stopped(self._drain()))
        if not finished:
            aborted = await self.term.drain(0)
            log.warning("second signal: aborted %d connections", aborted)
        await self._close_pool(abort=True)

    async def _close_pool(self, *, abort: bool) -> None:
        """Stop the workers (abort: without draining), wait for them (SIGKILL the ones that
        hang), close the zygote."""
        if self.pool is None:
            return
        await self.pool.stop(abort=abort)
        if not await self.pool.wait_stopped(KILL_WAIT if abort else None):
            await self.pool.kill_all()
            await self.pool.wait_stopped(KILL_WAIT)
        await self.pool.close()

    async def _unless_aborted(self, aw: Awaitable[Any]) -> bool:
        """Await `aw` unless request_abort() comes first (then cancel it); True if it ran out."""
        task = asyncio.ensure_future(aw)
        abort = asyncio.ensure_future(self._abort.wait())
        try:
            await asyncio.wait({task, abort}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abort.cancel()
        if task.done():
            task.result()
            return True
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            log.debug("cut short: %r", task.exception())
        return False

    async def _systemd_loop(self) -> None:
        """WATCHDOG=1 at half of WATCHDOG_USEC, from the event loop: when the loop is stuck the
        pings stop and systemd restarts edged. And STATUS= when the summary changed. Runs until
        the daemon has drained (the watchdog keeps running while it stops)."""
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        loop = asyncio.get_running_loop()
        watchdog = systemd.watchdog_interval()
        if watchdog is not None:
            log.info("systemd watchdog: pinging every %.1fs", watchdog)
        next_status = loop.time() + STATUS_INTERVAL
        while not self._exited.is_set():
            if watchdog is not None:
                systemd.notify("WATCHDOG=1")
            now = loop.time()
            if now >= next_status:
                self._send_status(only_changed=True, text=await self._status_text_off_loop())
                next_status = now + STATUS_INTERVAL
            wait = min(watchdog if watchdog is not None else math.inf, next_status - now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.01)):
                    await self._exited.wait()

    def _drain(self) -> float:
        return self.config.edged.drain_timeout if self.config else 0.0

    async def _serve(self) -> None:
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                reload = asyncio.ensure_future(self._reload.wait())
                await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
                if self._reload.is_set() and not self._stop.is_set():
                    self._reload.clear()
                    names = None if self._reload_all else self._reload_names
                    self._reload_all, self._reload_names = False, set()
                    changed, self._changed = self._changed, set()
                    if (
                        self._reload_kind == "file"
                        and names is None
                        and changed
                        and await asyncio.to_thread(self._loaded_already, changed)
                    ):
                        log.info("the changed files are as the last reload read them")
                    else:
                        await self.reload(self._reload_kind, names)
                reload.cancel()
        finally:
            stop.cancel()

    # --- reload ---------------------------------------------------------------------------

    async def reload(self, kind: str, names: Collection[str] | None = None) -> bool:
        """Validate the new config and certificates off the loop, then swap; on any error keep
        serving the last good state and say why. `names`: only these names' store
        certificates changed (see request_reload)."""
        async with self._reload_lock:  # the serve loop, the renewal loop and the admin API
            if self._stopping:
                return False  # never bind listeners again once shutdown closed them
            if names is not None and self.config is not None:
                return await self._reload_names_locked(kind, names)
            with self.counters.full_reload_seconds.timed():
                return await self._reload_locked(kind)

    async def _renew_when_filled(self) -> None:
        """The renewal loop, once every certificate has been read: before that, a site whose
        certificate is not read yet would look like one without a certificate."""
        await self._filled.wait()
        if self.config is not None and not self._stop.is_set():
            await self._configure_renewer(self.config, self.store)
        await self.renewer.run(self._stop)

    async def _configure_renewer(
        self, config: Config, store: Store | None, only: Collection[str] | None = None
    ) -> None:
        """The renewer takes `config` (just applied), told which sites hold an upload from
        what the loads read (no entry read again), but for sites not read yet (a background
        fill cut short by an error): those it reads, as it read every site before. `only`:
        see Renewer.configure."""
        unread: set[str] = set()
        if not self._snapshot_store:  # a lazy start's fill not done: some may be pending
            unread = {s.name for s in config.sites if s.stored and self._pending(s)}
        await self.renewer.configure(config, store, frozenset(self._uploads), unread, only)

    async def _fill(self, config: Config, sites: list[Site]) -> None:
        """Read the store's certificates in batches after the listeners are up (see LAZY_MIN),
        swapping each batch in as it is ready. Stops when a full reload took over."""
        started = time.monotonic()
        watch = self._loaded_watch
        try:
            # Before reading, as a full load does: a change during the fill shows as new.
            snapshot = await asyncio.to_thread(take_snapshot, watch) if watch else None
            for start in range(0, len(sites), FILL_BATCH):
                batch = [s for s in sites[start : start + FILL_BATCH] if self._pending(s)]
                if self.config is not config or self._stop.is_set():
                    return
                if not batch:
                    continue
                certs = await self._read_sites(config, batch)
                async with self._reload_lock:
                    if self.config is not config:
                        return
                    # A handshake's load or a names reload may have read some meanwhile, and
                    # maybe a newer version: what they applied stays, with their stamps.
                    batch = [s for s in batch if self._pending(s)]
                    certs = certs.only(batch)
                    self._log_problems(certs.problems)
                    self._apply_sites(batch, certs)
                    freeze_long_lived()  # a pass over this batch, not over the whole state
                    if snapshot is not None and config.store_path is not None:
                        # The stamps of what this batch applied alone (taken before its read).
                        paths = meta_paths(config.store_path, [s.name for s in batch]).values()
                        self._snapshot.update((p, snapshot[p]) for p in paths if p in snapshot)
            if self.config is config:
                self._snapshot_store = True
            log.info("store indexed: %d sites in %.1fs", len(sites), time.monotonic() - started)
            await asyncio.to_thread(release_free_memory)
        except Exception:  # runs in the daemon's task group: an error here must not end it
            log.exception(
                "reading the store in the background failed; the sites not read yet are read "
                "when a client asks for one, and all at the next reload"
            )
        finally:
            self._filled.set()

    def _pending_indices(self) -> set[int]:
        if self.config is None or self.selector is None:
            return set()
        return {s.index for s in self.config.sites if self._pending(s)}

    async def _load_index(self, index: int) -> None:
        site = self.config.site_at(index) if self.config is not None else None
        if site is not None:
            await self.load_now(site)

    def _pending(self, site: Site) -> bool:
        route = self.selector.index.get(site.names[0]) if self.selector is not None else None
        return route is not None and route.pending

    async def load_now(self, site: Site) -> None:
        """Read one pending site's certificate now (a client asked for it before the
        background fill got there); concurrent asks for the same site share one read."""
        task = self._loading.get(site.index)
        if task is None:
            assert self._tg is not None
            task = self._tg.create_task(self._load_one(site))
            self._loading[site.index] = task
            task.add_done_callback(lambda _: self._loading.pop(site.index, None))
        await asyncio.shield(task)

    async def _load_one(self, site: Site) -> None:
        config = self.config
        if config is None or not self._pending(site):
            return
        try:
            stamps = await asyncio.to_thread(self._entry_stamps, [site.name])  # before the read
            certs = await self._read_sites(config, [site])
        except Exception:  # a task of the daemon's group: the handshake waiting is refused
            log.exception("reading the certificate of site %s failed", site.name)
            return
        if self.config is config and self._pending(site):
            self._log_problems(certs.problems)
            self._apply_sites([site], certs)
            self._record_stamps(stamps)

    async def _read_sites(self, config: Config, sites: list[Site]) -> SiteCerts:
        """Read and check these sites' certificates (off the loop), as a full load would."""
        return await asyncio.to_thread(
            load_site_certs,
            config,
            self.store,
            datetime.now(UTC),
            keep_expired=True,
            light=True,
            sites=sites,
        )

    def _apply_sites(self, sites: list[Site], certs: SiteCerts) -> None:
        """Swap in the certificates just read for `sites` (same config): their routes in a
        copy of the index, and to the workers only what changed."""
        assert self.selector is not None
        bundles = dict(self.bundles)
        changes: dict[int, tuple[CertBundle, ...]] = {}
        for site in sites:
            chosen = keep_or_replace(
                site,
                self.bundles.get(site.index),
                certs.bundles.get(site.index),
                site.index in certs.expired,
            )
            if chosen:
                bundles[site.index] = chosen
            else:
                bundles.pop(site.index, None)
            changes[site.index] = chosen or ()
            if chosen and chosen == certs.bundles.get(site.index) and site.index in certs.expired:
                log.error("certificate served although expired: %s", certs.expired[site.index])
        self.selector.index = self.selector.index.updated(
            (site, changes[site.index]) for site in sites
        )
        self.bundles = bundles
        self._unclean.difference_update(site.name for site in sites)
        self._unclean.update(unclean_names(sites, certs, bundles))
        self._uploads.difference_update(site.name for site in sites)
        self._uploads.update(certs.uploads)
        if self.pool is not None and self.pool.current:
            self.pool.publish_sites(changes)

    async def _reload_names_locked(self, kind: str, names: Collection[str]) -> bool:
        """Read the store certificates of `names` again and swap in those sites alone: one
        renewal among 100k certificates costs one read, not 100k."""
        assert self.config is not None and self.selector is not None
        config = self.config
        sites = [
            site
            for name in sorted(set(names))
            if (site := config.site_for(name)) is not None and site.name == name
        ]
        if not sites:
            return True
        site_names = [site.name for site in sites]
        with self.counters.names_reload_seconds.timed():  # not for names no site has
            try:
                # Before reading, as a full load does: the stamps may be older than what is read
                # (then the next full load reads it again), never newer.
                stamps = await asyncio.to_thread(self._entry_stamps, site_names)
                certs = await self._read_sites(config, sites)
            except (EdgedError, OSError) as exc:
                log.error("reload rejected, keeping the running certificates: %s", exc)
                self.counters.reloads[kind, "error"] += 1
                return False
            self._log_problems(certs.problems)
            uploads = self._uploads.intersection(site_names)
            self._apply_sites(sites, certs)
            self._record_stamps(stamps)
            if self._uploads.intersection(site_names) != uploads and self._filled.is_set():
                # An upload came (another node's `edged upload`, one an order found) or was
                # handed back: the renewal loop takes the sites without one, no more, no less
                # (else it would plan, and order, renewals of an uploaded certificate). Not
                # while a background fill runs: a site not read yet would be planned as one
                # without a certificate, due at once; the loop is configured when it is done,
                # from the uploads known then.
                await self._configure_renewer(config, self.store, only=site_names)
            # A certificate that changed under a name (a rollback, another node's write) has
            # its own renewal time: the one planned may be for the certificate it replaced.
            self.renewer.observe_serving(names=site_names)
            await self.renewer.changed()
            result = "error" if certs.errors else "ok"
            self.counters.reloads[kind, result] += 1
            if result == "ok":
                self.counters.last_reload_success = time.time()
            log.info("reloaded (%s): %s", kind, ", ".join(site_names))
            return result == "ok"

    def _record_stamps(self, stamps: Mapping[str, Stamp | None]) -> None:
        for path, stamp in stamps.items():
            if stamp is None:
                self._snapshot.pop(path, None)
            else:
                self._snapshot[path] = stamp

    def _entry_stamps(self, names: list[str]) -> dict[str, Stamp | None]:
        """The snapshot entries of these names' bundles, as a full load takes them (so the
        watcher's catch-up does not see them as changed again). Blocking."""
        store = self.config.store_path if self.config is not None else None
        if store is None:
            return {}
        return {path: snapshot_entry(path) for path in meta_paths(store, names).values()}

    async def _reload_locked(self, kind: str) -> bool:
        systemd.notify("RELOADING=1")
        # The new state is built in a thread while the loop serves: no collector pass over it
        # (or the old one) meanwhile, one before it is frozen.
        gc.disable()
        try:
            return await self._reload_once(kind)
        except (EdgedError, OSError) as exc:
            # Whatever went wrong, the running state stays: a reload never takes edged down.
            log.error("reload rejected, keeping the running config: %s", exc)
            self.counters.reloads[kind, "error"] += 1
            return False
        except Exception:  # a bug, or input nothing above foresaw: still not worth an outage
            log.exception("reload failed unexpectedly, keeping the running config")
            self.counters.reloads[kind, "error"] += 1
            return False
        finally:
            freeze_long_lived()  # first: the collector must run again whatever follows
            systemd.notify("READY=1")
            self._send_status()
            await asyncio.to_thread(release_free_memory)  # one of the two states is garbage now

    async def _reload_once(self, kind: str) -> bool:
        parsed = None
        if self.config is not None and self._config_digest is not None:
            parsed = (self.config, self._config_digest)
        try:
            if kind == "resync" and parsed is not None:
                # The fleet's store changed, not the config: an edit staged in the file waits
                # for SIGHUP (edged.watch = false) or for the watcher's own reload.
                config, digest = parsed
            else:
                config, digest = await asyncio.to_thread(
                    load_config_digest, self.config_path, parsed
                )
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload rejected, keeping the running config: %s", problem)
            self.counters.reloads[kind, "error"] += 1
            return False
        store = self._open_store(config)
        loaded = await self._prepare(config, store)
        self._log_problems(loaded.certs.problems)
        try:
            await self._sync_all_listeners(config)
        except StartupError as exc:
            log.error("reload rejected, keeping the running config: %s", exc)
            self.counters.reloads[kind, "error"] += 1
            return False
        for key in ("metrics", "admin"):
            if self.config is not None and getattr(config.listen, key) != getattr(
                self.config.listen, key
            ):
                log.warning("listen.%s changed: takes effect at the next restart", key)
        await self._reread_admin_token(config)
        if self.config is not None and config.edged.allocator != self.config.edged.allocator:
            log.warning("edged.allocator changed: takes effect at the next restart")
        running = self.pool.count if self.pool is not None else 1
        if self.config is not None and worker_count(config) != running:
            log.warning("edged.workers changed: takes effect at the next restart")
        self._use_store(store)
        await self._apply(loaded)
        self._config_digest = digest
        await self._configure_renewer(config, store)
        self._refresh_watch()
        result = "error" if loaded.certs.errors else "ok"
        self.counters.reloads[kind, result] += 1
        if result == "ok":
            self.counters.last_reload_success = time.time()
        log.info("reloaded (%s): %d sites, %d names", kind, len(config.sites), len(self.index))
        return result == "ok"

    async def _apply(self, loaded: Loaded) -> None:
        """Build the new index off the loop, then swap it in with single assignments."""
        assert self.term is not None and self.selector is not None
        config = loaded.config
        bundles, index = await asyncio.to_thread(
            build_serving,
            self.config,
            self.bundles,
            config,
            loaded.certs.bundles,
            loaded.certs.expired.keys(),
            loaded.pending,
        )
        unclean = await asyncio.to_thread(unclean_names, config.sites, loaded.certs, bundles)
        publishing = self.pool is not None and self.pool.current
        served = await asyncio.to_thread(served_certs, bundles) if publishing else {}
        old_floor = self.config.tls.min_version if self.config is not None else None
        new_floor = old_floor is not None and config.tls.min_version != old_floor
        if self.config is not None and config.tls != self.config.tls:
            cache = ContextCache(config.tls.context_cache_size, config.tls.min_version)
            self.selector.cache = cache
            self.selector.default_alpn = config.tls.alpn
            self.term.listen_ctx = build_listening_context(config.tls, self.selector)
        for site_index, problem in loaded.certs.expired.items():
            if bundles.get(site_index) == loaded.certs.bundles.get(site_index):
                log.error("certificate served although expired: %s", problem)
        self.selector.index = index
        self.term.settings = proxy_settings(config)
        self.term.origin_contexts = loaded.origin_contexts
        self.bundles = bundles
        if self.config is not None and (
            config.tls.ticket_key_rotation != self.config.tls.ticket_key_rotation
        ):
            self._rotation_changed.set()
        self.config = config
        self._loaded_watch = loaded.watch
        self._snapshot = loaded.snapshot
        self._snapshot_store = not loaded.pending
        self._unclean = unclean
        self._uploads = set(loaded.certs.uploads)
        if self.pool is not None and publishing:
            self.pool.publish(config, served)  # at once: no other change may come between
            if new_floor:  # the version floor lives in the listening context the workers share
                await self.pool.rotate(config.tls.min_version)
        await self.renewer.changed()

    # --- file watching ---------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        """Watch the config, every file it names and the store; restart when that set changes.
        Runs in the TaskGroup: it handles its own errors so serving never depends on it."""
        while not self._stop.is_set():
            assert self.config is not None
            self._watch_stop = asyncio.Event()
            if not self.config.edged.watch:
                self._watching = None
                await self._watch_stop.wait()
                continue
            self._watching = self._loaded_watch
            assert self._watching is not None
            try:
                async with asyncio.TaskGroup() as tg:
                    catching_up = tg.create_task(self._catch_up())
                    await watch_changes(self._watching, self._watch_stop, self._on_files_changed)
                    # Returned (a directory on the paths changed, or a new set to watch): the
                    # next watcher starts now, not once this catch-up's stat pass is over (the
                    # next catch-up compares again, against the same loaded state).
                    catching_up.cancel()
            except* InotifyError as group:  # a host limit: the message names it
                log.error(
                    "file watcher cannot run: %s; SIGHUP still reloads; retrying in %.0fs",
                    "; ".join(str(exc) for exc in group.exceptions),
                    WATCH_RETRY,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), WATCH_RETRY)
            except* Exception:
                log.exception("file watcher failed; SIGHUP still reloads; retrying in 5s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 5)

    async def _catch_up(self) -> None:
        """Changes made while no watcher ran (between the load and the watcher's start, or
        while it restarted for a new set of paths) are found by comparing stat snapshots."""
        await asyncio.sleep(0.2)  # let the watcher start first, so nothing falls in between
        if self._watch_stop.is_set() or self._watching is None:
            return
        # A store indexed in the background (lazy start) was read after the watcher started:
        # compare the files only, or the whole store would look changed.
        watching, with_store = self._watching, self._snapshot_store
        now = await asyncio.to_thread(take_snapshot, watching, store=with_store)
        before = self._snapshot
        if not with_store:
            # The files only, as `now`: entries read on demand meanwhile have their stamps too.
            files = {str(path) for path in watching.files}
            before = {path: stamp for path, stamp in before.items() if path in files}
        # The config is read before the snapshot is taken: an edit in between shows in its text.
        if now != before or await asyncio.to_thread(self._config_differs):
            log.info("files changed while not watched: reloading")
            self._changed = None  # not only what the watcher reports: never skipped
            self.request_reload("file")

    def _on_files_changed(self, paths: set[Path]) -> None:
        named = sorted(str(p) for p in paths)
        more = f" and {len(named) - LOG_PATHS} more" if len(named) > LOG_PATHS else ""
        log.info("changed: %s%s", ", ".join(named[:LOG_PATHS]), more)
        names = self._store_names(paths)
        if names is None and self._changed is not None:
            self._changed |= paths
        self.request_reload("store" if names is not None else "file", names)

    def _config_differs(self) -> bool:
        """Blocking: whether the config file no longer holds the text now serving."""
        if self._config_digest is None:
            return False  # not known: the stat snapshot is all there is
        return config_digest(self.config_path) != self._config_digest

    def _loaded_already(self, paths: set[Path]) -> bool:
        """Blocking (reads the config): whether `paths` is the config file alone and it holds
        the text now serving, in the file the watcher watches (a config switched to a symlink
        to the same text elsewhere is reloaded: the new watch set watches its target). By
        content, not by stat: two writes within one timestamp tick can leave the same size and
        mtime."""
        config_paths = {self.config_path.absolute(), Path(os.path.realpath(self.config_path))}
        if self._config_digest is None or not paths <= config_paths:
            return False
        if self._loaded_watch is None or not resolves_as_watched(
            self._loaded_watch, self.config_path
        ):
            return False  # the same text, in a file the watcher does not watch: reload
        return config_digest(self.config_path) == self._config_digest

    def _store_names(self, paths: set[Path]) -> set[str] | None:
        """The names whose store bundles the changed `paths` belong to; None when anything
        else changed (the config, a cert file, the store's layout): then reload everything."""
        store = self.config.store_path if self.config is not None else None
        if store is None:
            return None
        live = store.absolute() / "live"
        names: set[str] = set()
        for path in paths:
            try:
                parts = path.relative_to(live).parts
            except ValueError:
                return None
            if not parts:
                return None
            names.add(name_of_store_dir(parts[0]))
        return names

    async def _reread_admin_token(self, config: Config) -> None:
        """The admin API's token from listen.admin_token_file as it is now (a rotated token,
        or a file named anew), for the API already listening. A file that cannot be used
        keeps the previous token, with the reason logged."""
        admin = config.listen.admin
        if self._admin is None or self.config is None or admin != self.config.listen.admin:
            return  # a new admin address waits for the restart, and its token with it
        assert admin is not None
        path = config.listen.admin_token_file
        try:
            token = await asyncio.to_thread(read_token_file, path) if path is not None else None
        except AdminStartupError as exc:
            log.error("the admin API keeps its previous token: %s", exc)
            return
        if replace_token(self._admin, token):
            log.info("the admin API's token was replaced (listen.admin_token_file)")
            if token is None and not admin.is_unix:
                warn_no_token(admin)

    def _refresh_watch(self) -> None:
        """After a reload: restart the watcher when the set of files to watch changed."""
        assert self.config is not None
        fresh = self._loaded_watch if self.config.edged.watch else None
        if fresh != self._watching:
            self._watch_stop.set()  # the loop starts again with the new set

    # --- listeners ------------------------------------------------------------------------

    @staticmethod
    def _challenge_forwarder(
        loop: asyncio.AbstractEventLoop, pool: WorkerPool
    ) -> Callable[[str, str | None, float], None]:
        """TLS-ALPN-01 challenges are answered by the workers: the board (filled by the ACME
        solver in a thread) hands each change to them and waits until all have it."""

        def forward(name: str, key_authorization: str | None, ttl: float) -> None:
            try:
                on_loop = asyncio.get_running_loop() is loop
            except RuntimeError:
                on_loop = False
            if on_loop:  # cannot wait here: send and go on
                pool.share_challenge(name, key_authorization, ttl)
                return
            done = threading.Event()

            def start() -> None:
                pool.share_challenge(name, key_authorization, ttl).add_done_callback(
                    lambda _: done.set()
                )

            loop.call_soon_threadsafe(start)
            if not done.wait(CHALLENGE_SHARE_TIMEOUT):
                log.warning("tls-alpn-01 challenge for %s not confirmed by every worker", name)

        return forward

    async def _ticket_rotation_loop(self) -> None:
        """New TLS session ticket keys every `[tls] ticket_key_rotation`: a new listening
        context (with workers: a new generation of workers forked from it)."""
        last = time.monotonic()  # the keys in use were made at start
        while True:
            assert self.config is not None
            interval = self.config.tls.ticket_key_rotation
            # Woken by a reload that changes the interval: it applies from the last rotation
            # at once (24h -> 1h after 5 h rotates now; 0 stops; 0 -> on starts counting).
            self._rotation_changed.clear()
            if interval <= 0 or time.monotonic() < last + interval:
                wait = None if interval <= 0 else last + interval - time.monotonic()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._rotation_changed.wait()
                continue
            async with self._reload_lock:
                if self._stopping:
                    return
                config = self.config
                if self.pool is not None:
                    await self.pool.rotate(config.tls.min_version)
                elif self.term is not None and self.selector is not None:
                    self.term.listen_ctx = build_listening_context(config.tls, self.selector)
                self.counters.ticket_key_rotations += 1
                last = time.monotonic()
                log.info("TLS session ticket keys rotated")

    async def _sync_all_listeners(self, config: Config) -> None:
        """The https and http listeners as `config` says, all or nothing: the new http
        addresses are bound first, so that when an https one cannot be, no listener changed
        (StartupError), and the http ones cannot fail after the https ones moved."""
        running = set(self.http.addresses())
        bound: dict[Address, socket.socket] = {}
        try:
            for address in config.listen.http:
                if address not in running and address not in bound:
                    bound[address] = self._inherited.bind(address)
            await self._sync_listeners(config)
        except BaseException:
            for sock in bound.values():
                sock.close()
            raise

        def prebound(address: Address) -> socket.socket:
            sock = bound.pop(address, None)
            return sock if sock is not None else self._inherited.bind(address)

        await self.http.sync(config.listen.http, prebound)

    async def _sync_listeners(self, config: Config) -> None:
        """Bind new addresses first (all or nothing), then close the ones no longer wanted."""
        assert self.term is not None
        if self.pool is not None:
            assert self._tg is not None
            if not self.pool.current:
                self.pool.load_site = self._load_index
                self.pool.shared_challenge = self.alpn_board.shared_key_authorization
                await self.pool.start(
                    self._tg, config, worker_count(config), self.bundles, self._pending_indices()
                )
            else:
                await self.pool.sync_listeners(config)
            return
        wanted = list(config.listen.https)
        new: dict[Address, socket.socket] = {}
        try:
            for address in wanted:
                if address not in self._servers:
                    new[address] = self._inherited.bind(address)
        except StartupError:
            for sock in new.values():
                sock.close()
            raise
        pending = dict(new)
        try:
            for address, sock in new.items():
                self._servers[address] = await self.term.serve(sock)
                del pending[address]
        finally:
            for sock in pending.values():  # not handed to a server: ours to close
                sock.close()
        for address in list(self._servers):
            if address not in wanted:
                self._servers.pop(address).close()
                log.info("stopped listening on %s", address)

    async def _close_services(self) -> None:
        await self.http.close()
        for runner in (self._admin, self._metrics):
            if runner is not None:
                await runner.cleanup()
        self._admin = self._metrics = None

    def _close_listeners(self) -> None:
        for server in self._servers.values():
            server.close()
        self._servers.clear()

    def listening(self) -> list[Address]:
        return self.pool.addresses() if self.pool is not None else list(self._servers)

    # --- helpers --------------------------------------------------------------------------

    async def _prepare(self, config: Config, store: Store | None, *, lazy: bool = False) -> Loaded:
        serving = None
        if self.config is not None:
            # Copies: the loop goes on changing its own while the load runs in a thread.
            serving = Serving(
                self.config,
                self.bundles,
                dict(self._snapshot),
                frozenset(self._unclean),
                frozenset(self._uploads),
            )
        return await asyncio.to_thread(
            prepare,
            config,
            self.config_path,
            store,
            datetime.now(UTC),
            lazy=lazy,
            serving=serving,
        )

    def _open_store(self, config: Config) -> Store:
        return open_store(config, self.store)

    @staticmethod
    def _log_problems(problems: tuple[Problem, ...]) -> None:
        for problem in problems:
            if problem.warning:
                log.warning("%s", problem)
            else:
                log.error("certificate rejected, not served: %s", problem)


async def _cursor_of(store: Store) -> Cursor | None:
    """A Redis store's cursor now (see _fleet_cursor); None for a file store, or when Redis
    cannot be asked (then the first resync reads everything, as without a cursor)."""
    if not isinstance(store, RedisStore):
        return None
    try:
        return (await asyncio.to_thread(store.changes_since, None)).cursor
    except StoreError:
        return None


def status_summary(
    config: Config | None,
    bundles: Mapping[int, Sequence[CertBundle]],
    states: Iterable[RenewalState],
    conns: int,
) -> str:
    """The STATUS= line of a serving daemon: certificates, failed renewals, sites without a
    certificate, connections. Reads only what it is given: safe in a thread on copies."""
    certs = sum(len(b) for b in bundles.values())
    notes = []
    failed = sum(1 for s in states if s.status == CertStatus.FAILED)
    if failed:
        notes.append(f"{failed} failed")
    if config is not None:
        missing = sum(1 for site in config.sites if not bundles.get(site.index))
        if missing:
            notes.append(f"{missing} sites without a cert")
    detail = f" ({', '.join(notes)})" if notes else ""
    return f"serving {certs} certs{detail}, {conns} connections"


def cert_metrics_of(
    config: Config | None, bundles: Mapping[int, Sequence[CertBundle]]
) -> list[CertMetric]:
    """The served certificates' dates, per site name and key type."""
    if config is None:
        return []
    return [
        CertMetric(site.name, b.key_type, b.not_before.timestamp(), b.not_after.timestamp())
        for site in config.sites
        for b in bundles.get(site.index, ())
    ]


def name_statuses_of(
    config: Config | None,
    bundles: Mapping[int, Sequence[CertBundle]],
    states: Mapping[str, RenewalState],
) -> list[NameStatus]:
    """Each managed name's renewal state and whether it is served a fallback (its previous
    certificate, renewal having failed)."""
    now = datetime.now(UTC)
    statuses = []
    for name, state in states.items():
        site = config.site_for(name) if config is not None else None
        served = bundles.get(site.index) if site is not None else None
        not_after = served[0].not_after if served else None
        fallback = renewal.fallback_active(state, not_after, now)
        statuses.append(NameStatus(name, state.status.value, fallback))
    return statuses


@dataclass(frozen=True)
class FrozenMetrics:
    """What one scrape reads of the daemon, taken on the event loop (copies of what changes
    in place, the config and served bundles as they are: both only ever replaced whole), so
    that it is rendered in a thread."""

    counters: Counters
    active: int
    config: Config | None
    bundles: Mapping[int, Sequence[CertBundle]]
    states: Mapping[str, RenewalState]
    available: bool
    leftovers: int
    shared: tuple[int, int] | None

    def connections_active(self) -> int:
        return self.active

    def cert_metrics(self) -> list[CertMetric]:
        return cert_metrics_of(self.config, self.bundles)

    def name_statuses(self) -> list[NameStatus]:
        return name_statuses_of(self.config, self.bundles, self.states)

    def store_available(self) -> bool:
        return self.available

    def dns01_leftovers(self) -> int:
        return self.leftovers

    def shared_certs(self) -> tuple[int, int] | None:
        return self.shared


class MetricsView:
    """What /metrics reads: the daemon, with the counters of its worker processes added."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def frozen(self) -> FrozenMetrics:
        """This scrape's copy (edged.metrics.freeze): ~10 ms on the loop at 100k names."""
        d = self.daemon
        counters = d.total_counters()
        if counters is d.counters:  # with workers it is a sum made for this call already
            counters = merge_counters([counters])  # a copy: the loop counts on
        return FrozenMetrics(
            counters=counters,
            active=d.connections_active(),
            config=d.config,
            bundles=d.bundles,
            states=dict(d.renewer.states),
            available=d.store_available(),
            leftovers=d.dns01_leftovers(),
            shared=d.shared_certs(),
        )

    @property
    def counters(self) -> Counters:
        return self.daemon.total_counters()

    def connections_active(self) -> int:
        return self.daemon.connections_active()

    def cert_metrics(self) -> list[CertMetric]:
        return self.daemon.cert_metrics()

    def name_statuses(self) -> list[NameStatus]:
        return self.daemon.name_statuses()

    def store_available(self) -> bool:
        return self.daemon.store_available()

    def dns01_leftovers(self) -> int:
        return self.daemon.dns01_leftovers()

    def shared_certs(self) -> tuple[int, int] | None:
        return self.daemon.shared_certs()
