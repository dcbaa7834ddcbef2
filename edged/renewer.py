"""The renewal loop: obtains missing certificates and renews due ones, forever, beside serving.

The decisions (when, how often, which state) are the pure functions of edged.renewal; this
module does the I/O: ACME in worker threads (one session per attempt), store writes, state
persistence, notifications. A new certificate is validated by the order flow before it is
stored, and the daemon's reload validates it again before it serves it; a failure leaves the
old certificate serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Container,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal, TypeVar

import aiohttp
import certifi
import requests
from cryptography import x509

from edged import renewal
from edged.acme.client import USER_AGENT, AcmeSession
from edged.acme.issue import Issued, OrderRequest, issue
from edged.acme.solvers import Dns01Solver, Http01Solver, Solver, TlsAlpn01Solver
from edged.certs import CertBundle, parse_bundle
from edged.config import AcmeSettings, Config, Site
from edged.counters import Counters
from edged.errors import AcmeError, EdgedError, StoreError
from edged.http01 import ChallengeBoard, Http01App, HttpListeners
from edged.listen import StartupError, bind_tcp
from edged.names import covers
from edged.proxy import ProxySettings, Terminator
from edged.renewal import CertStatus, Notice, RenewalPolicy, RenewalState
from edged.sni import SniIndex
from edged.store.base import StateRead, Store
from edged.store.redis import RedisStore
from edged.tls import ContextCache, SniSelector, build_listening_context
from edged.tlsalpn import AlpnChallengeBoard

if TYPE_CHECKING:
    from edged.dns import DnsUpdater
    from edged.dnsjournal import DnsJournal

log = logging.getLogger("edged.renewal")

MAX_SLEEP = 60.0  # re-evaluate at least this often (config reloads, expiry logging)
# Seconds between the loop's expiry checks (logs and notices of expiring or expired served
# certificates, rate limited to hours anyway): every served certificate is looked at, ~2 µs a
# name, so not at every wake.
EXPIRY_CHECK_EVERY = 60.0
MIN_SLEEP = 0.5  # and never more often than this: a state that stays due cannot spin the loop
CONCURRENT_ORDERS = 4
WEBHOOK_ATTEMPTS = 5
ARI_RETRY = timedelta(hours=1)
# ARI checks run beside the loop, this many requests at a time, each given this long: a slow
# or hanging renewalInfo endpoint delays only other ARI checks, never an attempt.
ARI_CONCURRENCY = 8
ARI_TIMEOUT = 10.0
LEASE_RECHECK = timedelta(seconds=5)
# Names a configure (or an adoption of announced states) goes through before it lets the
# event loop serve again: the states come in one batch, not one thread hop per name.
YIELD_EVERY = 1000
LEASE_EXTENSIONS = 3  # the holder extends its lease this many times per TTL
# DNS-01 leftovers are deleted at start, then every acme.retry_interval but at most this often
# (a short retry_interval must not hammer a DNS server that refuses the deletes).
DNS_SWEEP_MIN_INTERVAL = 60.0
# Names from which configure() plans their renewals in a thread (observe_cert, ~5 µs a name).
OBSERVE_IN_THREAD = 2000
# A configure pass (start, reload, fleet resync) taking this long is logged with its time.
SLOW_CONFIGURE = 1.0  # seconds


def node_id() -> str:
    return socket.gethostname()


def managed_sites(
    config: Config,
    store: Store | None,
    uploads: Collection[str] | None = None,
    unread: Collection[str] = (),
) -> list[Site]:
    """Sites whose certificate edged obtains itself: ACME configured, no cert files, no upload.

    `uploads`: the store names whose entry holds an upload, as the caller's load of the store
    just found them (the daemon's; see edged.sources.SiteCerts.uploads), so that no entry is
    read again here: the daemon's full load had just read all of them, and this read them a
    second time at every configure (a Redis fleet's resync: a GET per name, 3.6 s of 20,000
    names). `unread`: names that load has not read yet (a background fill cut short), read
    here. Without `uploads` (`edged issue`, no load before it) every site's entry is read."""
    if config.acme is None or store is None:
        return []
    out = []
    for site in config.sites:
        if site.cert_file is not None or site.passthrough:
            continue
        if uploads is not None and site.name not in unread:
            if site.name in uploads:
                continue
            out.append(site)
            continue
        try:
            stored = store.load(site.name)
        except StoreError:
            stored = None  # unreadable: obtaining a fresh one repairs it
        if stored is not None and stored.source == "upload":
            continue
        out.append(site)
    return out


T = TypeVar("T")
# How a name's renewal state was read: as stored, absent (never saved), unreadable (corrupt).
StateFound = Literal["stored", "absent", "unreadable"]


async def _cancellable(cancel: threading.Event, func: Callable[..., T], *args: object) -> T:
    """`func(*args)` in a thread; when the caller is cancelled, `cancel` is set so that the
    thread gives up at its next wait instead of holding the process's exit."""
    try:
        return await asyncio.to_thread(func, *args)
    except asyncio.CancelledError:
        cancel.set()
        raise


def build_solver_factory(
    settings: AcmeSettings,
    board: ChallengeBoard,
    alpn_board: AlpnChallengeBoard | None = None,
    cancel: threading.Event | None = None,
    journal: DnsJournal | None = None,
) -> Callable[[], Solver]:
    """`journal`: where dns-01 writes each TXT value down before adding it."""
    if settings.challenge == "tls-alpn-01":
        if alpn_board is None:
            raise ValueError("tls-alpn-01 needs the board the TLS listeners answer from")
        board_ = alpn_board
        return lambda: TlsAlpn01Solver(board_)
    if settings.challenge == "dns-01":
        from edged.dns import DnsUpdater, load_tsig_key

        dns_settings = settings.dns
        assert dns_settings is not None  # the config parser requires [acme.dns] for dns-01
        key = load_tsig_key(dns_settings)
        return lambda: Dns01Solver(DnsUpdater(dns_settings, key, journal=journal), cancel)
    return lambda: Http01Solver(board)


def open_dns_journal(config: Config) -> DnsJournal:
    """This process's DNS-01 journal, in the node's local store directory."""
    from edged.dnsjournal import DIRNAME, DnsJournal

    return DnsJournal(config.local_store_path / DIRNAME, node_id())


def dns_sweep_interval(config: Config) -> float:
    """Seconds between two sweeps of the DNS-01 journal."""
    retry = config.acme.retry_interval if config.acme is not None else 0.0
    return max(retry, DNS_SWEEP_MIN_INTERVAL)


def sweep_dns_journal(
    journal: DnsJournal, config: Config, cancel: threading.Event | None = None
) -> int:
    """Blocking: delete the TXT values interrupted orders left (DnsJournal.sweep) with the
    configured DNS server and TSIG key; the number removed."""
    from edged.dns import DnsError, DnsUpdater, load_tsig_key

    settings = config.acme.dns if config.acme is not None else None

    def updater() -> DnsUpdater:
        if settings is None:
            raise DnsError(
                "acme.dns",
                "is not configured, so they cannot be deleted: add [acme.dns] again with the "
                "server and TSIG key that added them, or delete them by hand (nsupdate)",
            )
        return DnsUpdater(settings, load_tsig_key(settings), journal=journal)

    every = dns_sweep_interval(config)
    retry = f"in {every:g}s (acme.retry_interval, a minute at least) and at the next start"
    return journal.sweep(updater, retry=retry, cancel=cancel).removed


class WildcardChallengeError(EdgedError):
    """A site has a wildcard name but acme.challenge is not dns-01: CAs validate wildcards
    only over dns-01 (RFC 8555 section 7.1.3), so an order could never succeed."""

    def __init__(self, site: str, wildcard: str, challenge: str) -> None:
        self.site = site
        self.wildcard = wildcard
        self.challenge = challenge
        super().__init__(
            f"wildcard {wildcard} of site {site} needs dns-01, but acme.challenge is "
            f'{challenge}: set acme.challenge = "dns-01" with an [acme.dns] table, or upload '
            "a certificate for the site (edged upload); no order was sent to the CA"
        )


def check_challenge(site: Site, settings: AcmeSettings) -> None:
    """WildcardChallengeError when `settings.challenge` cannot validate one of the site's
    names. Checked per attempt, not by the config parser: a wildcard site may be served from
    an uploaded certificate, which ACME leaves alone."""
    wildcard = site.wildcard_without(settings.challenge)
    if wildcard is not None:
        raise WildcardChallengeError(site.name, wildcard, settings.challenge)


def covers_all(bundle: CertBundle, names: Sequence[str]) -> bool:
    """`bundle` covers each of the site's `names` (normalised, as configured)."""
    return all(any(covers(pattern, name) for pattern in bundle.names) for name in names)


class UploadKept(AcmeError):
    """The order's certificate was not stored: an upload for the site landed while it ran."""

    def __init__(self, name: str) -> None:
        super().__init__(
            name,
            "a certificate was uploaded for the site while this order ran: the upload stays "
            "and ACME no longer manages the site (the new certificate is dropped)",
        )


def obtain(
    settings: AcmeSettings,
    store: Store,
    site: Site,
    new_solver: Callable[[], Solver],
    counters: Counters | None = None,
    replaces: Mapping[str, str] | None = None,
    cancel: threading.Event | None = None,
    keep_upload: bool = False,
) -> Issued:
    """Blocking: order a certificate for `site`, store it atomically. AcmeError on failure.
    `replaces`: key type → the ARI id of the certificate its order replaces.
    `cancel` set: give up at the next wait (the caller was cancelled; edged is stopping).
    `keep_upload` (the renewal loop, which orders only for managed sites): a certificate
    uploaded meanwhile is not replaced."""
    observe = counters.acme_requests.observe if counters is not None else None
    session = AcmeSession(settings, store, observe=observe, cancel=cancel)
    request = OrderRequest(
        name=site.name,
        names=site.names,
        key_types=settings.key_types,
        replaces=dict(replaces or {}),
    )
    try:
        issued = issue(session, request, new_solver, extra={"node": node_id()})
    finally:
        session.close()
    try:
        if not keep_upload:
            store.save(issued.cert)
            return issued
        # An upload while this order ran hands the site to the operator: it stays (the site
        # was managed when the order began, so any upload found now is that new one). Looked
        # for in the write itself: another node's upload, or the admin API's, may land until
        # the last moment.
        upload = store.save_unless_upload(issued.cert)
    except StoreError as exc:
        raise AcmeError(site.name, f"the new certificate could not be stored: {exc}") from exc
    if upload is None:
        return issued
    serials = ",".join(
        f"{x509.load_pem_x509_certificate(p.fullchain).serial_number:x}" for p in issued.cert.pairs
    )
    log.warning(
        "certificate obtained but not stored: an upload for the site landed while its order "
        "ran, the upload stays and ACME no longer manages the site name=%s upload_stored_at=%s "
        "unused_serials=%s",
        site.name,
        datetime.fromtimestamp(upload.stored_at, UTC).isoformat(timespec="seconds"),
        serials,
    )
    raise UploadKept(site.name)


def replaced_certs(
    state: RenewalState, served: Sequence[CertBundle], key_types: Sequence[str]
) -> dict[str, str]:
    """Key type → the ARI id of the served certificate its next order replaces (RFC 9773
    section 5: each order names the certificate it replaces). With none served (deleted from
    the store) the state remembers the first key type's."""
    found = {b.key_type: b.ari_id for b in served if b.ari_id}
    if not found and state.replaces and key_types:
        found[key_types[0]] = state.replaces
    return found


def fetch_directory(
    settings: AcmeSettings, timeout: float = 30.0, user_agent: str = USER_AGENT
) -> object:
    """Blocking: the ACME directory's JSON (for `renewalInfo`, `meta.caaIdentities`).
    requests' errors (HTTPError for a non-2xx answer) and ValueError for a non-JSON body."""
    verify: bool | str = str(settings.ca_bundle) if settings.ca_bundle else True
    with requests.get(
        settings.directory, verify=verify, timeout=timeout, headers={"User-Agent": user_agent}
    ) as response:
        response.raise_for_status()
        return response.json()


def build_ari_session(settings: AcmeSettings) -> aiohttp.ClientSession:
    """An HTTP session for the CA's directory and renewalInfo: the CA bundle `requests` would
    use (acme.ca_bundle, else certifi's), the proxy environment honoured like `requests` does,
    and ARI_TIMEOUT on each request in total (a CA that trickles bytes cannot hold it).
    OSError or ssl.SSLError when acme.ca_bundle is unreadable."""
    cafile = str(settings.ca_bundle) if settings.ca_bundle else certifi.where()
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=cafile)),
        timeout=aiohttp.ClientTimeout(total=ARI_TIMEOUT),
        headers={"User-Agent": USER_AGENT},
        trust_env=True,
    )


async def fetch_renewal_base(session: aiohttp.ClientSession, directory: str) -> str:
    """The directory's `renewalInfo` URL, "" when the CA has none. aiohttp.ClientError (a
    non-2xx answer too), TimeoutError, ValueError for a body that is not JSON."""
    async with session.get(directory) as response:
        response.raise_for_status()
        data = json.loads(await response.read())
    found = data.get("renewalInfo") if isinstance(data, dict) else None
    return found if isinstance(found, str) else ""


async def fetch_renewal_info(
    session: aiohttp.ClientSession, base_url: str, bundle: CertBundle, now: datetime
) -> renewal.AriInfo:
    """GET renewalInfo/<cert id> (RFC 9773 section 4.1) and parse it. aiohttp.ClientError (a
    non-2xx answer too), TimeoutError, AriError."""
    # Only a certificate without one is parsed here, for AriError to say why.
    cert_id = bundle.ari_id or renewal.ari_cert_id(x509.load_pem_x509_certificate(bundle.leaf_pem))
    async with session.get(f"{base_url.rstrip('/')}/{cert_id}") as response:
        response.raise_for_status()
        body = await response.read()
        retry_after = response.headers.get("Retry-After")
    return renewal.parse_renewal_info(body, retry_after, now, cert_id=cert_id)


def _error_of(exc: Exception) -> tuple[dict[str, object], datetime | None]:
    """What a failed attempt records: the CA's problem document and Retry-After, or the text."""
    if isinstance(exc, AcmeError):
        return exc.problem, exc.retry_after
    if isinstance(exc, EdgedError):
        return {"message": str(exc)}, None
    return {"message": f"unexpected error: {type(exc).__name__}: {exc}"}, None


def _check_served(name: str, new: CertBundle, served: CertBundle | None) -> None:
    """AcmeError unless the daemon serves the new certificate: it validates again (and may
    refuse what the order flow accepted, e.g. a site whose config changed meanwhile)."""
    if served is None or served.fingerprint != new.fingerprint:
        raise AcmeError(
            name,
            "the new certificate was stored but the daemon refused to serve it (the reload "
            "error is logged above); the previous certificate keeps serving",
        )


@dataclass(frozen=True)
class _Expiring:
    """A served certificate's expiry, seen by a wake's pass (see Renewer._expiring)."""

    state: RenewalState  # as the pass saw it
    not_after: datetime
    after: RenewalState  # with its last_expiry_notice, when a notice is due
    notices: list[Notice]


async def _wait_any(events: Iterable[asyncio.Event], seconds: float) -> None:
    """Until one of `events` is set or `seconds` passed."""
    waiters = {asyncio.ensure_future(event.wait()) for event in events}
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class Renewer:
    def __init__(
        self,
        *,
        board: ChallengeBoard,
        alpn_board: AlpnChallengeBoard,
        counters: Counters,
        on_installed: Callable[[str], Awaitable[object]],
        serving: Callable[[str], CertBundle | None],
        rng: random.Random | None = None,
        served: Callable[[str], Sequence[CertBundle]] | None = None,
    ) -> None:
        """`serving`: a name's served certificate of the first key type; `served`: all of them
        (by default that one alone)."""
        self.board = board
        self.alpn_board = alpn_board
        self.counters = counters
        self.on_installed = on_installed
        self.serving = serving
        self.served = served or (lambda name: tuple(b for b in (serving(name),) if b is not None))
        self.rng = rng or random.Random()
        self.states: dict[str, RenewalState] = {}
        self.config: Config | None = None
        self.store: Store | None = None
        self._sites: dict[str, Site] = {}
        self._wake = asyncio.Event()
        self._running: set[str] = set()
        # force() asked for an attempt here that has not begun yet (an attempt that began
        # before it, and is still running, must not take its place).
        self._forced: set[str] = set()
        self._shared_changed: set[str] = set()  # names whose state another node saved
        self.lease_holders: dict[str, str] = {}  # fleet: who orders a name (last seen)
        self._expired_log: dict[str, float] = {}
        self._next_expiry_check = 0.0  # monotonic: the run loop's first pass looks at once
        self._renewal_info: dict[str, str] = {}  # directory URL → renewalInfo base ("" = none)
        self._ari_retry: dict[str, datetime] = {}  # name → next try after a failed ARI fetch
        self._ari_wake = asyncio.Event()  # a certificate changed: its ARI check is due
        # DNS-01 TXT values written down before they are added (see edged.dnsjournal); opened
        # with the first config, in its local store directory (kept there across reloads).
        self.journal: DnsJournal | None = None
        self._stop = asyncio.Event()  # run()'s: set when edged stops
        self._notices: list[Notice] = []  # for the loop to send
        self._configuring = asyncio.Lock()
        self._observed_policy: RenewalPolicy | None = None  # the policy names are planned with
        # Notified after every attempt and every swap of served certificates (see changed()).
        self.changes = asyncio.Condition()

    async def changed(self) -> None:
        async with self.changes:
            self.changes.notify_all()

    # --- control -------------------------------------------------------------------------

    async def configure(
        self,
        config: Config,
        store: Store | None,
        uploads: Collection[str] | None = None,
        unread: Collection[str] = (),
        only: Collection[str] | None = None,
    ) -> None:
        """Take a (re)loaded config: load states of newly managed names, resume them. Calls
        take turns: a reload's and the loop's start may come together, and each would load
        and resume the names new to it (an interrupted attempt counted twice). `uploads`,
        `unread`: what the caller's load found, see managed_sites (not changed meanwhile).
        `only`: the names whose management may have changed (an upload came or went), the
        only ones read and planned; the others are left as they are."""
        async with self._configuring:
            started, first = time.monotonic(), self.config is None
            await self._configure(config, store, uploads, unread, only)
            took = time.monotonic() - started
            if config.acme is not None and (first or took >= SLOW_CONFIGURE):
                # When renewal is planned for every name: at a start with 100k names, that
                # comes after the first handshakes.
                log.info("renewal planned names=%d seconds=%.1f", len(self.states), took)

    async def _configure(
        self,
        config: Config,
        store: Store | None,
        uploads: Collection[str] | None,
        unread: Collection[str],
        only: Collection[str] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        if self.journal is None:
            # Also without [acme]: values an earlier config's orders left are still found
            # (and said to need [acme.dns]). The directory is the first config's.
            self.journal = open_dns_journal(config)
        sites = await asyncio.to_thread(managed_sites, config, store, uploads, unread)
        self._sites = {s.name: s for s in sites}
        now = datetime.now(UTC)
        policy = self._policy()
        resumed: set[str] = set()
        fleet = isinstance(store, RedisStore)
        # Every state this pass needs, read in one thread call (Redis: one round trip per
        # STATES_BATCH names): names new to this node, and in a fleet the known ones, whose
        # state another node may have saved (a message missed). One read per name, each a
        # thread hop and a round trip, took 3 s per resync for 20,000 names.
        # With `only` (an upload came or went), a fleet node does not read every state again:
        # seconds at 100k names, on every node, for each upload.
        names = list(self._sites) if only is None else [n for n in only if n in self._sites]
        wanted = [n for n in names if n not in self.states or (fleet and n not in self._running)]
        read = await asyncio.to_thread(self._load_states, wanted) if wanted else {}
        unchanged: dict[str, RenewalState] = {}  # read from a fleet's store, left as read
        for done, name in enumerate(names, 1):
            if done % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # 20,000 names held the loop ~300 ms in one go
            if name in self.states:
                if name in read and name not in self._running:
                    self._adopt_shared(name, read[name][0])
                continue
            if name in read:
                state, found = read[name]
            else:  # not expected: the names in self.states change only in this (locked) pass
                state, found = await asyncio.to_thread(self._load_state_read, name)
            loaded = state
            # A name never tried is ordered at once; known ones resume their pacing, spread so
            # a fleet restart does not start every overdue order in the same second.
            if state.in_flight and name in self._running:
                pass  # our own attempt, still running (the site was renamed back meanwhile)
            elif (
                state.in_flight
                and isinstance(store, RedisStore)
                and await self._lease_held(store, name)
            ):
                # In a fleet the attempt in flight is another node's, alive (it holds the
                # lease): not an interrupted attempt of ours. Look again once it is done.
                state = replace(state, in_flight=False, next_try=now + LEASE_RECHECK)
            elif policy is not None and not state.is_new:
                loaded, state = state, renewal.resume(state, policy, now, self.rng)
                resumed.add(name)
                if loaded.in_flight:
                    state = self._interrupted(loaded, state, now)
            self.states[name] = state
            if found == "absent" and state == loaded:
                # A name new to the store, left new: saved, it would record nothing a read of
                # the absent state does not give (100k names new at a node's first start were
                # 100k writes, two fsyncs each: minutes; in a fleet 100k messages besides).
                continue
            if found == "stored" and state == loaded:
                # The store holds it already: saved again, it would only be published for
                # every other node of the fleet to read again (each node's start made the
                # whole fleet re-read every name). The node's local copy is kept, below.
                if fleet:
                    unchanged[name] = state
                continue
            await self._save(state)
        if unchanged and isinstance(store, RedisStore):
            await self._mirror_states(store, unchanged)
        for name in list(self.states):
            if name not in self._sites:
                del self.states[name]
                self._forced.discard(name)
        if only is None:
            await self._observe_all(resumed)
        else:
            self.observe_serving(resumed, names=[n for n in names if n in self.states])
        self._wake.set()
        self._ari_wake.set()

    def _interrupted(
        self, before: RenewalState, after: RenewalState, now: datetime
    ) -> RenewalState:
        """An attempt a restart cut short, which resume() counted as failed: counted, logged
        and notified (maybe the transition to FAILED) like any failed attempt; the notices go
        out from the loop."""
        self.counters.renewal_attempts[after.name, "failure"] += 1
        self._log_failure(after, renewal.INTERRUPTED)
        serving = self.serving(after.name)
        after, found = renewal.notify(before, after, serving.not_after if serving else None, now)
        self._notices.extend(found)
        return after

    def observe_serving(
        self, resumed: Collection[str] = (), *, names: Collection[str] | None = None
    ) -> None:
        """After a reload: schedule renewals of the certificates now being served (of `names`
        alone after a reload of only their store certificates: a rollback, an upload handed
        back, another fleet node's write).

        A name already scheduled for the certificate it serves keeps its next try (configure
        runs several times at startup and at each reload); names just loaded from the store
        (`resumed`) and all names after a policy change are planned again, overdue ones of
        the former spread like any resumed work.
        """
        observation = self._observation(names)
        if observation is not None:
            policy, replan, observed = observation
            now = datetime.now(UTC)
            self._install(observed, self._plan(observed, resumed, policy, replan, now, self.rng))

    async def _observe_all(self, resumed: Collection[str]) -> None:
        """observe_serving() for every name; with many, planned in a thread (100k names take
        ~0.5 s, which the data path would otherwise wait for)."""
        observation = self._observation(None)
        if observation is None:
            return
        policy, replan, observed = observation
        now = datetime.now(UTC)
        if len(observed) < OBSERVE_IN_THREAD:
            planned = self._plan(observed, resumed, policy, replan, now, self.rng)
        else:
            rng = random.Random(self.rng.getrandbits(64))  # the thread's own
            planned = await asyncio.to_thread(
                self._plan, observed, resumed, policy, replan, now, rng
            )
        self._install(observed, planned)

    def _observation(
        self, names: Collection[str] | None
    ) -> tuple[renewal.RenewalPolicy, bool, dict[str, RenewalState]] | None:
        """The policy, whether it changed since the last observation, and the states to plan
        (all, or those of `names`); None without [acme]."""
        policy = self._policy()
        if policy is None:
            return None
        replan = self._observed_policy is not None and policy != self._observed_policy
        self._observed_policy = policy
        if names is None:
            return policy, replan, dict(self.states)
        return policy, replan, {n: self.states[n] for n in names if n in self.states}

    def _plan(
        self,
        observed: Mapping[str, RenewalState],
        resumed: Collection[str],
        policy: renewal.RenewalPolicy,
        replan: bool,
        now: datetime,
        rng: random.Random,
    ) -> dict[str, RenewalState]:
        """The new plan of each observed state (in flight ones keep theirs). Reads the served
        bundles and sites, changes nothing: safe in a thread."""
        planned: dict[str, RenewalState] = {}
        for name, state in observed.items():
            if state.in_flight:
                continue
            served = self.served(name)
            site = self._sites.get(name)
            if not served or (site is not None and not covers_all(served[0], site.names)):
                # Names added to the site: the one served covers only some (sources.py's
                # partly_covers), so one for them all is due now, as if there were none.
                planned[name] = renewal.observe_no_cert(state, now)
            else:
                again = replan or name in resumed
                state = renewal.observe_cert(
                    state, served[0], policy, now, rng, reschedule=again, others=served[1:]
                )
                if name in resumed:
                    state = renewal.spread_overdue(state, now, rng)
                planned[name] = state
        return planned

    def _install(
        self, observed: Mapping[str, RenewalState], planned: Mapping[str, RenewalState]
    ) -> None:
        """Put the plans in place, except where the state changed while they were made (an
        attempt ended meanwhile: its own record stands)."""
        states = self.states
        for name, state in planned.items():
            if states.get(name) is observed[name]:
                states[name] = state
        self._wake.set()  # the loop's sleep was computed from the plans before

    def note_shared_state(self, name: str) -> None:
        """Another node (or this one) saved `name`'s state in the shared store."""
        if name in self.states:
            self._shared_changed.add(name)
            self._wake.set()

    async def _adopt_shared_states(self) -> None:
        """A renewal another node finished is the fleet's truth: take its state. The names
        announced since the last pass are read in one thread call (one round trip per
        STATES_BATCH names: a fleet's start announces every name)."""
        changed, self._shared_changed = self._shared_changed, set()
        names = [n for n in changed if n not in self._running and n in self.states]
        if not names:
            return
        read = await asyncio.to_thread(self._load_states, names)
        for done, name in enumerate(names, 1):
            if done % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if name not in self._running and name in self.states:  # an attempt began meanwhile
                self._adopt_shared(name, read[name][0])

    async def _adopt_newer_shared(self, name: str) -> bool:
        """Read the shared store's state for `name` and adopt it (see _adopt_shared)."""
        shared = await asyncio.to_thread(self._load_state, name)
        return self._adopt_shared(name, shared)

    def _adopt_shared(self, name: str, shared: RenewalState) -> bool:
        """Take `shared`, the shared store's state for `name`, when another node's attempt
        made it newer than ours (see renewal.adoptable: the fleet's truth). An attempt forced
        here stands unless the fleet renewed the name meanwhile. True when adopted."""
        ours = self.states.get(name)
        if ours is None or not renewal.adoptable(shared, ours):
            return False
        renewed = shared.last_success is not None and shared.last_success != ours.last_success
        if name in self._forced and not renewed:
            return False
        self.states[name] = shared
        self._forced.discard(name)
        self.lease_holders.pop(name, None)  # that node's order is over
        log.info(
            "renewal state from the fleet name=%s state=%s attempts=%d by=%s",
            name,
            shared.status.value,
            shared.attempts,
            shared.issued_by or "-",
        )
        return True

    def force(self, name: str) -> RenewalState:
        """Start an attempt now, in any state, with a fresh attempt counter."""
        state = self.states.get(name)
        if state is None:
            raise KeyError(name)
        state = renewal.force_retry(state, datetime.now(UTC))
        self.states[name] = state
        # An attempt that has begun records its own result when it ends, which would drop
        # this request: it is applied again then, so that a new attempt follows (see
        # _attempt_locked). One that was picked but has not begun is the forced one.
        self._forced.add(name)
        self._wake.set()
        return state

    def fallback_active(self, name: str) -> bool:
        state = self.states.get(name)
        if state is None:
            return False
        bundle = self.serving(name)
        not_after = bundle.not_after if bundle else None
        return renewal.fallback_active(state, not_after, datetime.now(UTC))

    # --- the loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        try:
            await self._run(stop)
        finally:
            if self.journal is not None:
                self.journal.close()

    async def _run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            limit = asyncio.Semaphore(CONCURRENT_ORDERS)
            # ARI in its own task: the loop only reads its results (the states it updates).
            ari = tg.create_task(self._run_ari(stop))
            # Beside it too: deleting what interrupted DNS-01 orders left delays no order.
            sweeps = tg.create_task(self._run_dns_sweeps(stop))
            while not stop.is_set():
                self._wake.clear()
                if self._notices:  # from configure(), which has no task group for them
                    found, self._notices = self._notices, []
                    self._notify(found, tg)
                if self._shared_changed:
                    await self._adopt_shared_states()
                now = datetime.now(UTC)
                expiry = time.monotonic() >= self._next_expiry_check
                states: Mapping[str, RenewalState] = self.states
                if len(states) < OBSERVE_IN_THREAD:
                    due, wait, expiring = self._pass(states, self._running, now, expiry)
                else:  # ~0.3 s at 100k names, at every wake: not on the event loop
                    states = dict(states)
                    due, wait, expiring = await asyncio.to_thread(
                        self._pass, states, frozenset(self._running), now, expiry
                    )
                for name in due:
                    if name in self._running:
                        continue
                    if self.states.get(name) is not states[name]:
                        wait = MIN_SLEEP  # changed meanwhile: look again soon, not in a minute
                        continue
                    self._running.add(name)
                    tg.create_task(self._attempt(name, limit, tg))
                if expiry:
                    self._next_expiry_check = time.monotonic() + EXPIRY_CHECK_EVERY
                    await self._apply_expiry(expiring, now, tg)
                await _wait_any((self._wake, stop), wait)
            ari.cancel()  # a check in progress is of no use any more
            sweeps.cancel()  # the values it did not get to stay listed for the next start

    def _pass(
        self,
        states: Mapping[str, RenewalState],
        running: Container[str],
        now: datetime,
        expiry: bool,
    ) -> tuple[list[str], float, list[_Expiring]]:
        """A wake's look at every state: the names due, how long to sleep then, and (when
        `expiry`) what _apply_expiry needs. Reads the served bundles, changes nothing: safe in
        a thread."""
        due, wait = renewal.due_and_wait(states, running, now, MIN_SLEEP, MAX_SLEEP)
        return due, wait, self._expiring(states, now) if expiry else []

    def _expiring(self, states: Mapping[str, RenewalState], now: datetime) -> list[_Expiring]:
        """The served certificates that expired, and the states with an expiry notice due."""
        found: list[_Expiring] = []
        for name, state in states.items():
            bundle = self.serving(name)
            if bundle is None:
                continue
            after, notices = renewal.notify(state, state, bundle.not_after, now)
            if notices or bundle.not_after <= now:
                found.append(_Expiring(state, bundle.not_after, after, notices))
        return found

    async def _attempt(self, name: str, limit: asyncio.Semaphore, tg: asyncio.TaskGroup) -> None:
        try:
            async with limit:
                await self._attempt_once(name, tg)
        except Exception as exc:
            # Never let one name's bug stop the loop for every other name.
            log.exception("renewal attempt crashed name=%s", name)
            try:
                await self._fail_stuck(name, exc)
            except Exception:
                log.exception("renewal state not recorded name=%s", name)
        finally:
            self._running.discard(name)
            self._ari_wake.set()  # a new certificate's window is worth asking for soon
            self._wake.set()

    async def _fail_stuck(self, name: str, exc: Exception) -> None:
        """An attempt that crashed outside its own error handling still ends as a failed
        attempt: left in flight, the name would never be tried again (nor forced)."""
        state = self.states.get(name)
        if state is None or not state.in_flight:
            return
        after = self._forced_again(
            self._record_failure(state, self._policy() or RenewalPolicy(), exc)
        )
        self.states[name] = after
        await self._save(after)

    async def _attempt_once(self, name: str, tg: asyncio.TaskGroup) -> None:
        site, config, store, policy = self._sites.get(name), self.config, self.store, self._policy()
        if site is None or config is None or config.acme is None or store is None:
            return
        assert policy is not None
        if not isinstance(store, RedisStore):
            await self._attempt_locked(name, tg, site, config, store, policy)
            return
        # A fleet: one node orders a name at a time (a lease in Redis, kept alive while the
        # order runs, released by compare-and-delete); the others adopt its result.
        ttl = config.edged.lease_ttl
        lease = await self._take_lease(name, store, ttl)
        if lease is None:
            return
        keeper = tg.create_task(self._keep_lease(name, store, lease, ttl))
        self.lease_holders[name] = lease
        try:
            if await self._adopt_newer_shared(name):
                return  # another node renewed it while we waited: order nothing
            await self._attempt_locked(name, tg, site, config, store, policy)
        finally:
            keeper.cancel()
            self.lease_holders.pop(name, None)
            try:
                await asyncio.to_thread(store.release_lease, name, lease)
            except StoreError as exc:
                log.warning("lease not released (it expires) name=%s error=%s", name, exc)

    @staticmethod
    async def _lease_held(store: RedisStore, name: str) -> bool:
        try:
            return await asyncio.to_thread(store.lease_holder, name) is not None
        except StoreError:
            return False

    async def _take_lease(self, name: str, store: RedisStore, ttl: float) -> str | None:
        """The lease on ordering `name` (edged.lease_ttl: how long it outlives a node that
        dies mid-order), or None when another node holds it or Redis is down."""
        now = datetime.now(UTC)
        try:
            lease = await asyncio.to_thread(store.acquire_lease, name, ttl, node_id())
            holder = None if lease else await asyncio.to_thread(store.lease_holder, name)
        except StoreError as exc:
            log.warning("renewal waits for Redis name=%s error=%s", name, exc)
            holder, lease = "", None
        if lease is None:
            if holder:
                self.lease_holders[name] = holder
                log.info("renewal of %s runs on another node holder=%s", name, holder)
            # Look again soon: the holder's result arrives over pub/sub before that.
            self.states[name] = replace(self.states[name], next_try=now + LEASE_RECHECK)
        return lease

    async def _keep_lease(self, name: str, store: RedisStore, lease: str, ttl: float) -> None:
        while True:
            # Well before expiry: two extensions may fail (a Redis hiccup) before it lapses.
            await asyncio.sleep(ttl / LEASE_EXTENSIONS)
            try:
                if not await asyncio.to_thread(store.extend_lease, name, lease, ttl):
                    log.error("lease of %s lost while ordering (Redis restarted?)", name)
                    return
            except StoreError as exc:
                log.warning("lease not extended name=%s error=%s", name, exc)

    async def _attempt_locked(
        self,
        name: str,
        tg: asyncio.TaskGroup,
        site: Site,
        config: Config,
        store: Store,
        policy: RenewalPolicy,
    ) -> None:
        assert config.acme is not None
        before = self.states[name]
        state = renewal.begin_attempt(before, datetime.now(UTC))
        self.states[name] = state
        self._forced.discard(name)
        await self._save(state)
        log.info("renewal attempt name=%s attempt=%d", name, state.attempts + 1)
        # `replaces` only where the CA speaks ARI (RFC 9773 section 5); others may reject it.
        replaces = {}
        if self._renewal_info.get(config.acme.directory):
            replaces = replaced_certs(state, self.served(name), config.acme.key_types)
        # Cancelled (a second SIGTERM), the order's thread must not keep the process alive
        # until the CA is done: it gives up at its next wait.
        cancel = threading.Event()
        failure: Exception | None = None
        try:
            check_challenge(site, config.acme)  # before the CA: such an order only fails
            if before.is_new and config.acme.preflight:
                await self._preflight(config, site, store)
            new_solver = build_solver_factory(
                config.acme, self.board, self.alpn_board, cancel, self.journal
            )
            try:
                issued = await _cancellable(
                    cancel,
                    obtain,
                    config.acme,
                    store,
                    site,
                    new_solver,
                    self.counters,
                    replaces,
                    cancel,
                    True,  # keep_upload
                )
            except UploadKept:
                # The daemon reads the upload now (another node's may reach it later over
                # pub/sub): it serves it, and the name leaves this loop (below).
                await self.on_installed(name)
                raise
            pair = issued.cert.pairs[0]
            bundle = parse_bundle(pair.fullchain, pair.privkey, source=name)
            log.info(
                "certificate obtained name=%s not_after=%s key_types=%s seconds=%.2f",
                name,
                bundle.not_after.isoformat(),
                ",".join(issued.cert.key_types),
                issued.seconds,
            )
            await self.on_installed(name)
            if name in self.states:
                _check_served(name, bundle, self.serving(name))  # before the attempt is done
        except Exception as exc:
            failure = exc
        if name not in self.states:
            # A reload renamed or removed the site, or an upload took it over, while the order
            # ran: the name is no longer the loop's. Its stored state must not stay in flight
            # (a site named so again would count this attempt as one a restart cut short).
            log.info(
                "renewal attempt ended after the name left ACME management (site renamed or "
                "removed, or uploaded) name=%s result=%s",
                name,
                "obtained" if failure is None else failure,
            )
            await self._save(replace(state, in_flight=False))
            await self.changed()
            return
        current = self.states[name]
        if isinstance(failure, WildcardChallengeError):
            # Only a config change or an upload fixes it: FAILED (and said loudly) at once.
            after = self._record_failure(current, policy, failure, give_up=True)
        elif isinstance(failure, EdgedError):
            after = self._record_failure(current, policy, failure)
        elif failure is not None:
            # A bug or input nothing foresaw: still a failed attempt, paced like any other, so
            # the name is neither left in flight (never retried) nor retried in a tight loop.
            log.error("renewal attempt failed unexpectedly name=%s", name, exc_info=failure)
            after = self._record_failure(current, policy, failure)
        else:
            after = renewal.record_success(
                current, bundle, policy, datetime.now(UTC), self.rng, issued_by=node_id()
            )
            self.counters.renewal_attempts[name, "success"] += 1
        serving = self.serving(name)
        after, found = renewal.notify(
            before, after, serving.not_after if serving else None, datetime.now(UTC)
        )
        after = self._forced_again(after)
        self.states[name] = after
        await self._save(after)
        await self.changed()
        self._notify(found, tg)

    def _forced_again(self, after: RenewalState) -> RenewalState:
        """An attempt's result; forced again when `edged renew` came while it ran."""
        if after.name not in self._forced:
            return after
        return renewal.force_retry(after, datetime.now(UTC))

    def _record_failure(
        self, state: RenewalState, policy: RenewalPolicy, exc: Exception, *, give_up: bool = False
    ) -> RenewalState:
        """The failed attempt's state: the CA's problem document or the error's text."""
        error, retry_after = _error_of(exc)
        after = renewal.record_failure(
            state, policy, datetime.now(UTC), error, retry_after, give_up=give_up
        )
        self.counters.renewal_attempts[state.name, "failure"] += 1
        self._log_failure(after, exc if isinstance(exc, EdgedError) else error["message"])
        return after

    @staticmethod
    def _log_failure(after: RenewalState, error: object) -> None:
        log.error(
            "renewal failed name=%s state=%s attempts=%d next_try=%s error=%s",
            after.name,
            after.status.value,
            after.attempts,
            after.next_try.isoformat() if after.next_try else "-",
            error,
        )

    async def _preflight(self, config: Config, site: Site, store: Store) -> None:
        """Before a name's first order: say what will make it fail (CAA, DNS not pointing
        here, challenge not reachable). Advisory: the order runs anyway, the CA decides."""
        from edged.preflight import run_preflight

        try:
            results = await run_preflight(
                config,
                sites=[site],
                store=store,
                board=self.board,
                alpn_board=self.alpn_board,
                journal=self.journal,
            )
        except Exception as exc:  # a broken check must not stop issuance
            log.warning("preflight could not run name=%s error=%s", site.name, exc)
            return
        for result in results:
            if not result.ok:
                log.warning("preflight %s", result.line())

    async def _apply_expiry(
        self, expiring: list[_Expiring], now: datetime, tg: asyncio.TaskGroup
    ) -> None:
        """Log what expired and is still served (hourly per name), and send the expiry
        notices found, for states unchanged since (an attempt running saves its own)."""
        for item in expiring:
            name = item.state.name
            if (
                item.not_after <= now
                and time.monotonic() - self._expired_log.get(name, -1e9) > 3600
            ):
                self._expired_log[name] = time.monotonic()
                log.error(
                    "certificate expired and still served name=%s not_after=%s state=%s",
                    name,
                    item.not_after.isoformat(),
                    item.state.status.value,
                )
            if not item.notices or name in self._running or self.states.get(name) is not item.state:
                continue
            self.states[name] = item.after
            await self._save(item.after)  # a restart must not repeat the notice
            self._notify(item.notices, tg)

    async def _run_dns_sweeps(self, stop: asyncio.Event) -> None:
        """Delete the DNS-01 TXT values interrupted orders left (this node's only): at start,
        then every acme.retry_interval (a minute at least); the run loop cancels it."""
        while not stop.is_set():
            config, journal = self.config, self.journal
            interval = DNS_SWEEP_MIN_INTERVAL
            if config is not None and journal is not None:
                interval = dns_sweep_interval(config)
                cancel = threading.Event()
                try:
                    removed = await _cancellable(cancel, sweep_dns_journal, journal, config, cancel)
                    self.counters.dns01_leftovers_removed += removed
                except Exception:
                    # Must not end the renewal loop (and the daemon with it).
                    log.exception("dns-01 leftover sweep failed unexpectedly")
            await _wait_any((stop,), interval)

    async def _run_ari(self, stop: asyncio.Event) -> None:
        """ARI checks (RFC 9773), round after round, until `stop`; the run loop cancels it."""
        while not stop.is_set():
            self._ari_wake.clear()
            try:
                await self._refresh_ari(datetime.now(UTC))
            except Exception:
                # Must not end the renewal loop (and the daemon with it): ARI is optional.
                log.exception("ari checks failed unexpectedly")
            await _wait_any((self._ari_wake, stop), MAX_SLEEP)

    async def _refresh_ari(self, now: datetime) -> None:
        """Ask the CA when to renew each certificate whose check is due, ARI_CONCURRENCY at a
        time; its window replaces the schedule. Failures only delay the next ARI check: the
        schedule still applies."""
        config, policy = self.config, self._policy()
        if config is None or config.acme is None or policy is None:
            return
        acme = config.acme
        try:
            session = build_ari_session(acme)
        except (OSError, ssl.SSLError) as exc:
            log.warning("acme.ca_bundle unreadable (ARI check skipped) error=%s", exc)
            return
        async with session:
            base = await self._renewal_base(session, acme.directory)
            if not base:
                return
            limit = asyncio.Semaphore(ARI_CONCURRENCY)
            async with asyncio.TaskGroup() as checks:
                for name, served in self._ari_due(now):
                    checks.create_task(self._check_ari(session, limit, base, name, served))

    async def _renewal_base(self, session: aiohttp.ClientSession, directory: str) -> str:
        """The CA's renewalInfo URL ("" = no ARI), read from its directory once."""
        base = self._renewal_info.get(directory)
        if base is not None:
            return base
        try:
            base = await fetch_renewal_base(session, directory)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("acme directory unreadable (ARI check skipped) error=%s", exc)
            return ""
        self._renewal_info[directory] = base
        return base

    def _ari_due(self, now: datetime) -> list[tuple[str, Sequence[CertBundle]]]:
        """The names whose served certificates' renewal info should be fetched now."""
        due = []
        for name, state in self.states.items():
            served = self.served(name)
            retry = self._ari_retry.get(name)
            if (
                not served
                or name in self._running
                or state.status is not CertStatus.ACTIVE
                or not renewal.ari_check_due(state, now)
                or (retry is not None and now < retry)
            ):
                continue
            due.append((name, served))
        return due

    async def _check_ari(
        self,
        session: aiohttp.ClientSession,
        limit: asyncio.Semaphore,
        base: str,
        name: str,
        served: Sequence[CertBundle],
    ) -> None:
        """Fetch the window of each served certificate (one per key type): the one that
        needs renewal first decides (renewal.governing_window). A certificate whose fetch
        fails is asked again within ARI_RETRY; when none could be, the name waits that long."""
        found: list[tuple[CertBundle, renewal.AriInfo]] = []
        async with limit:
            now = datetime.now(UTC)
            for bundle in served:
                try:
                    found.append((bundle, await fetch_renewal_info(session, base, bundle, now)))
                except (aiohttp.ClientError, TimeoutError, EdgedError) as exc:
                    log.warning(
                        "ari check failed name=%s key_type=%s error=%s",
                        name,
                        bundle.key_type,
                        exc or type(exc).__name__,
                    )
                except Exception:
                    # A CA's answer nothing foresaw must not end the other checks: the
                    # schedule still applies, ARI is asked again later.
                    log.exception(
                        "ari check failed unexpectedly name=%s key_type=%s", name, bundle.key_type
                    )
        if not found:
            self._ari_retry[name] = now + ARI_RETRY
            return
        self._ari_retry.pop(name, None)
        retry_at = now + ARI_RETRY if len(found) < len(served) else None
        await self._record_ari(name, served, renewal.governing_window(found, retry_at))

    async def _record_ari(
        self, name: str, served: Sequence[CertBundle], info: renewal.AriInfo
    ) -> None:
        """Apply the window fetched for the `served` certificates, unless the name moved on
        while it was asked for (an attempt started, other certificates serve, the site is
        gone)."""
        state, policy, serving = self.states.get(name), self._policy(), self.served(name)
        if (
            state is None
            or policy is None
            or name in self._running
            or state.status is not CertStatus.ACTIVE
            or [b.fingerprint for b in serving] != [b.fingerprint for b in served]
        ):
            return
        updated = renewal.record_ari(
            state, served[0], policy, datetime.now(UTC), self.rng, info, others=served[1:]
        )
        if updated == state:
            return
        self.states[name] = updated
        self._wake.set()  # the loop's sleep was computed from the old next try
        await self._save(updated)
        log.info(
            "ari window name=%s key_type=%s start=%s end=%s next_try=%s explanation=%s",
            name,
            next((b.key_type for b in served if b.ari_id == info.cert_id), "-"),
            info.start.isoformat(),
            info.end.isoformat(),
            updated.next_try.isoformat() if updated.next_try else "-",
            info.explanation_url or "-",  # RFC 9773 4.2: for the operator
        )

    # --- notifications ------------------------------------------------------------------------

    def _notify(self, found: Iterable[Notice], tg: asyncio.TaskGroup) -> None:
        url = self.config.acme.notify_webhook if self.config and self.config.acme else ""
        for notice in found:
            fields = notice.to_json()
            log.warning(
                "certificate notice %s",
                " ".join(
                    f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in fields.items()
                ),
            )
            if url:
                tg.create_task(self._post_webhook(url, fields))

    async def _post_webhook(self, url: str, body: dict[str, object]) -> None:
        """POST `body`, retried with backoff; the retries end when edged stops (the loop's
        task group waits for this task: a SIGTERM must not wait minutes for a webhook)."""
        delay = 1.0
        timeout = aiohttp.ClientTimeout(total=10)
        for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
            try:
                async with (
                    aiohttp.ClientSession(timeout=timeout) as session,
                    session.post(url, json=body) as response,
                ):
                    if response.status < 300:
                        return
                    reason = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            log.warning(
                "webhook failed url=%s attempt=%d/%d reason=%s",
                url,
                attempt,
                WEBHOOK_ATTEMPTS,
                reason,
            )
            if attempt == WEBHOOK_ATTEMPTS:
                break
            await _wait_any((self._stop,), delay)
            if self._stop.is_set():
                log.error(
                    "webhook not sent, edged is stopping url=%s event=%s", url, body.get("event")
                )
                return
            delay = min(delay * 4, 300.0)
        log.error("webhook not sent, giving up url=%s event=%s", url, body.get("event"))

    # --- state persistence ------------------------------------------------------------------

    def _policy(self) -> RenewalPolicy | None:
        if self.config is None or self.config.acme is None:
            return None
        return RenewalPolicy.from_settings(self.config.acme)

    def _load_state(self, name: str) -> RenewalState:
        return self._load_state_read(name)[0]

    def _load_state_read(self, name: str) -> tuple[RenewalState, StateFound]:
        """Blocking: `name`'s stored state, and how it was found (absent or unreadable: a new
        state instead)."""
        assert self.store is not None
        try:
            raw: StateRead = self.store.load_state(name)
        except StoreError as exc:
            raw = exc
        return self._state_of(name, raw)

    def _load_states(self, names: Sequence[str]) -> dict[str, tuple[RenewalState, StateFound]]:
        """Blocking: _load_state_read of each name, read from the store at once (one round
        trip per batch of names in Redis)."""
        assert self.store is not None
        try:
            found = self.store.load_states(names)
        except StoreError as exc:  # a store that cannot read any of them
            found = dict.fromkeys(names, exc)
        return {name: self._state_of(name, found.get(name)) for name in names}

    @staticmethod
    def _state_of(name: str, raw: StateRead) -> tuple[RenewalState, StateFound]:
        try:
            if isinstance(raw, StoreError):
                raise raw
            if not raw:
                return RenewalState.new(name), "absent"
            return RenewalState.from_json(raw, name), "stored"
        except (StoreError, renewal.StateError) as exc:
            log.error("renewal state unreadable, starting over name=%s error=%s", name, exc)
            return RenewalState.new(name), "unreadable"

    @staticmethod
    async def _mirror_states(store: RedisStore, states: Mapping[str, RenewalState]) -> None:
        """Keep the node's local copy (read in a Redis outage, also after a restart) of
        states that were read from Redis and not saved again."""
        data = {name: state.to_json() for name, state in states.items()}
        await asyncio.to_thread(store.mirror_states, data)

    async def _save(self, state: RenewalState) -> None:
        if self.store is None:
            return
        try:
            await asyncio.to_thread(self.store.save_state, state.name, state.to_json())
        except StoreError as exc:
            log.error("cannot save renewal state name=%s error=%s", state.name, exc)


async def issue_now(
    config: Config, store: Store, sites: Iterable[Site], counters: Counters | None = None
) -> list[tuple[Site, Issued | EdgedError]]:
    """One-shot issuance (`edged issue`): serve HTTP-01 (on [listen].http) or TLS-ALPN-01 (on
    [listen].https, answering nothing but validations) ourselves when that is the challenge.

    StartupError when the listeners cannot be bound (usually: the daemon runs; then
    `edged renew` is the way)."""
    assert config.acme is not None
    board = ChallengeBoard()
    alpn_board = AlpnChallengeBoard()
    async with contextlib.AsyncExitStack() as stack:
        if config.acme.challenge == "http-01":
            listeners = HttpListeners(Http01App(board, lambda: config))
            stack.push_async_callback(listeners.close)
            await listeners.sync(config.listen.http)
        elif config.acme.challenge == "tls-alpn-01":
            await stack.enter_async_context(serve_tls_alpn(config, alpn_board))
        journal: DnsJournal | None = None
        if config.acme.challenge == "dns-01":
            journal = open_dns_journal(config)
            stack.callback(journal.close)
            # What an interrupted order of this node left goes first (the daemon's journal,
            # held by the running daemon, is left to it).
            removed = await asyncio.to_thread(sweep_dns_journal, journal, config)
            if counters is not None:
                counters.dns01_leftovers_removed += removed
        try:
            new_solver = build_solver_factory(config.acme, board, alpn_board, journal=journal)
        except EdgedError as exc:  # e.g. the TSIG key file is unreadable: every site fails
            return [(site, exc) for site in sites]
        results: list[tuple[Site, Issued | EdgedError]] = []
        for site in sites:
            try:
                issued = await asyncio.to_thread(
                    obtain, config.acme, store, site, new_solver, counters
                )
            except EdgedError as exc:
                results.append((site, exc))
            else:
                results.append((site, issued))
        return results


@contextlib.asynccontextmanager
async def serve_tls_alpn(config: Config, board: AlpnChallengeBoard) -> AsyncIterator[None]:
    """[listen].https bound to a data path with no certificate of its own: it answers the
    TLS-ALPN-01 validations on `board` and refuses every other handshake (for `edged issue`
    and preflight while no daemon holds the port). StartupError when a port is busy."""
    socks: list[socket.socket] = []
    try:
        for address in config.listen.https:
            socks.append(bind_tcp(address))
    except StartupError:
        for sock in socks:
            sock.close()
        raise
    async with asyncio.TaskGroup() as tg:
        selector = SniSelector(SniIndex([]), ContextCache(1, config.tls.min_version), ())
        term = Terminator(
            listen_ctx=build_listening_context(config.tls, selector),
            selector=selector,
            settings=ProxySettings(handshake_timeout=config.tls.handshake_timeout),
            counters=Counters(),
            tg=tg,
            alpn_board=board,
        )
        servers: list[asyncio.AbstractServer] = []
        try:
            while socks:
                servers.append(await term.serve(socks[0]))
                socks.pop(0)
            yield
        finally:
            for sock in socks:  # not handed to a server: ours to close
                sock.close()
            for server in servers:
                server.close()
            await term.drain(0)
