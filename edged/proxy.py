"""The data path: terminate TLS on an accepted TCP connection and relay plaintext to the backend.

TLS runs on an `ssl.SSLObject` over memory BIOs inside one protocol on the raw TCP transport
(not asyncio's SSL transport), because that is what lets edged
- classify and count every handshake failure (asyncio's transport only logs them at debug),
- half-close in both directions (TLS 1.3 close_notify closes one direction; asyncio's SSL
  transport closes the whole connection on the first close_notify),
- and read the ClientHello before the handshake starts.

The first bytes a client sends are held back until they make a whole ClientHello
(edged.clienthello; within the handshake timeout and a size cap). Its SNI decides: a name of a
passthrough site gets the raw bytes relayed to that site's backend, which terminates TLS itself;
anything else is fed to the SSLObject as if it had just arrived. A malformed ClientHello closes
the connection (counted like the handshake failure it is). The ClientHello is read in two steps
(peek, then complete only when needed: edged.clienthello). It also gives the client's JA4
fingerprint, computed only when a site sends it (ja4_tlv) or a connection is logged, and
chooses the certificate before the handshake starts (SniSelector.choose: the route and, for
names with ECDSA and RSA certificates, the key type the client can use).

ACME TLS-ALPN-01: a ClientHello offering exactly `acme-tls/1` is a CA validating a name. When
the name has a pending challenge (edged.tlsalpn's board, this node's or, in a fleet, another
node's through the store) the handshake completes with the challenge certificate and the
connection closes; otherwise the client gets a no_application_protocol alert. Nothing of it
reaches a backend, and clients offering anything else never see a challenge certificate.

Backpressure: when the backend's send buffer is full edged stops reading from the client, and
the other way round, so memory per connection stays bounded whatever the peers do.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from edged.clienthello import (
    ClientHelloError,
    ClientHelloReason,
    NeedMore,
    PeekedHello,
    complete,
    peek_client_hello,
)
from edged.config import Site
from edged.counters import Counters
from edged.ja4 import ja4
from edged.listen import LISTEN_BACKLOG
from edged.logs import Throttled
from edged.names import covers
from edged.proxy_header import Endpoints, TlsInfo, build_v1, build_v2
from edged.sni import Route
from edged.tls import REFUSED_ATTR, ROUTE_ATTR, SNI_ATTR, SniSelector, UnservableCert
from edged.tlsalpn import AlpnChallengeBoard, is_challenge_alpn

log = logging.getLogger("edged.proxy")
conn_log = logging.getLogger("edged.conn")  # [edged] connection_log: one line per connection

READ_CHUNK = 256 * 1024
WRITE_HIGH_WATER = 256 * 1024
# A ClientHello is at most a few KiB; more unprocessed bytes during the handshake is an attack.
MAX_HANDSHAKE_BUFFER = 64 * 1024

# ssl error reasons -> handshake result label (bounded set; see DESIGN.md metrics).
_HANDSHAKE_REASONS = {
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no_shared_cipher",
    "NO_SHARED_SIGNATURE_ALGORITHMS": "no_shared_cipher",
    "NO_SUITABLE_KEY_SHARE": "no_shared_cipher",
    "NO_SHARED_GROUPS": "no_shared_cipher",
    "UNSUPPORTED_PROTOCOL": "unsupported_version",
    "WRONG_VERSION_NUMBER": "unsupported_version",
    "VERSION_TOO_LOW": "unsupported_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "unsupported_version",
    "HTTP_REQUEST": "http_on_https",
    "HTTPS_PROXY_REQUEST": "http_on_https",
}


# A fatal no_application_protocol alert (TLS record: alert, 3.3, length 2, fatal, 120): the
# answer to a TLS-ALPN-01 validation for a name without a pending challenge (RFC 8737 s. 3).
ALERT_NO_APPLICATION_PROTOCOL = bytes([21, 3, 3, 0, 2, 2, 120])

# Malformed ClientHello -> handshake result label: the labels OpenSSL's own checks would give.
_HELLO_RESULTS = {
    ClientHelloReason.HTTP: "http_on_https",
    ClientHelloReason.SSLV2: "unsupported_version",
}


def classify_handshake_error(exc: ssl.SSLError, refused: str | None) -> str:
    if refused:
        return refused
    return _HANDSHAKE_REASONS.get(exc.reason or "", "protocol_error")


# Why connections ended -> edged_connections_closed_total{reason} (a bounded set; the
# connection log has the precise reason, e.g. handshake_timeout or backend_refused).
CLOSE_REASONS = (
    "done", "client_closed", "client_error", "idle_timeout", "tls_error", "drain_timeout",
    "handshake_failed", "backend_error", "other",
)  # fmt: skip


# Cached: asked once per close, and reasons are edged's own words (a bounded set).
@functools.cache
def close_category(reason: str) -> str:
    if reason.startswith(("handshake_", "clienthello_")):
        return "handshake_failed"
    if reason.startswith("backend_"):
        return "backend_error"
    return reason if reason in CLOSE_REASONS else "other"


def client_key(host: str) -> str:
    """What max_connections_per_ip counts: an IPv4 address (also when mapped into IPv6), or the
    /64 of an IPv6 address (one host or one customer network: a per-address limit would be
    bypassed by changing the interface identifier)."""
    if ":" not in host:
        return host
    try:
        addr = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.IPv6Network((addr, 64), strict=False))


@dataclass(frozen=True)
class ProxySettings:
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    connect_timeout: float = 5.0
    max_connections: int = 10000
    max_connections_per_ip: int = 1000  # open connections per client_key(); 0 = no limit
    connection_log_sample: float = 0.0  # fraction of closed connections logged; 0 = off
    preread: bool = True  # [tls] preread: parse the ClientHello before the handshake


@dataclass
class Terminator:
    """State shared by all TLS connections of this process; the daemon swaps its fields on
    reload (one reference each), connections read them when they start."""

    listen_ctx: ssl.SSLContext
    selector: SniSelector
    settings: ProxySettings
    counters: Counters
    tg: asyncio.TaskGroup
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    origin_contexts: dict[int, ssl.SSLContext] = field(default_factory=dict)
    alpn_board: AlpnChallengeBoard | None = None  # pending TLS-ALPN-01 challenges
    # Reads a pending route's certificate (see Route.pending) and swaps it into the index.
    load_pending: Callable[[Site], Awaitable[None]] | None = None
    active: set[ClientConnection] = field(default_factory=set)
    per_client: dict[str, int] = field(default_factory=dict)  # open connections by client_key
    throttle: Throttled = field(default_factory=lambda: Throttled(log))
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _draining: bool = False  # drain() waits for _idle (set only then: one call less per close)

    def protocol(self) -> ClientConnection:
        return ClientConnection(self)

    async def serve(self, sock: socket.socket) -> asyncio.AbstractServer:
        """Accept TLS connections on the listening `sock`. create_server would listen() again
        with its own backlog (100); edged's is LISTEN_BACKLOG."""
        return await self.loop.create_server(self.protocol, sock=sock, backlog=LISTEN_BACKLOG)

    def _removed(self, conn: ClientConnection) -> None:
        self.active.discard(conn)
        key = conn.client_key
        if key is not None:
            left = self.per_client[key] - 1
            if left > 0:
                self.per_client[key] = left
            else:
                del self.per_client[key]
        if not self.active and self._draining:
            self._idle.set()

    async def drain(self, grace: float | None) -> int:
        """Wait up to `grace` seconds (None: no limit) for open connections to finish, abort
        the rest, and return how many had to be aborted."""
        if self.active:
            self._draining = True
            self._idle.clear()
            try:
                async with asyncio.timeout(grace):
                    await self._idle.wait()
            except TimeoutError:
                pass
        left = list(self.active)
        for conn in left:
            conn.abort("drain_timeout")
        return len(left)


class ClientConnection(asyncio.Protocol):
    """One client connection: TLS handshake, then relay to the site's backend."""

    # Slots: a connection has more attributes than CPython 3.11's shared-key instance dicts
    # hold (29), so each would carry its own ~1.5 KiB dict; slots are smaller and faster.
    __slots__ = (
        "_backend_owes",
        "_early",
        "_fin_sent",
        "_hello_buf",
        "_hello_need",
        "_incoming",
        "_ja4",
        "_lost",
        "_notify_sent",
        "_outgoing",
        "_paused_for",
        "_prereading",
        "_sslobj",
        "_timer",
        "acme_challenge",
        "backend",
        "backend_eof",
        "bytes_in",
        "bytes_out",
        "client_eof",
        "client_key",
        "close_reason",
        "closed",
        "handshaking",
        "hello",
        "last_activity",
        "loop",
        "passthrough",
        "peer",
        "route",
        "sni",
        "started",
        "term",
        "transport",
    )

    def __init__(self, term: Terminator) -> None:
        self.term = term
        self.loop = term.loop
        self.transport: asyncio.Transport | None = None
        self.backend: BackendConnection | None = None
        self.route: Route | None = None
        self.sni: str | None = None
        self.handshaking = True
        self.hello: PeekedHello | None = None  # set once the whole ClientHello has arrived
        self._prereading = term.settings.preread  # until the ClientHello is parsed
        self._hello_buf = bytearray()  # the bytes before that
        self._hello_need = 0  # parse again once _hello_buf holds this many bytes
        self._ja4: str | None = None
        self.passthrough = False  # relaying the raw TLS stream (a passthrough site)
        self.acme_challenge = False  # answering a TLS-ALPN-01 validation (no backend)
        self.closed = False
        self.close_reason = ""  # why the connection ended (connection log); first one wins
        self.client_eof = False
        self.backend_eof = False
        self._notify_sent = False
        self._fin_sent = False
        self.peer: tuple[str, int] | None = None
        self.client_key: str | None = None  # counted in term.per_client while active
        self._lost = False  # connection_lost was called
        self.started = time.monotonic()
        self.last_activity = self.started
        self.bytes_in = 0
        self.bytes_out = 0
        # The client sent data the backend has not answered yet (an idle timeout then is the
        # backend's fault: counted as a backend error).
        self._backend_owes = False
        self._early = b""  # the client's first plaintext, while its backend connects
        self._paused_for: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj = term.listen_ctx.wrap_bio(self._incoming, self._outgoing, server_side=True)

    # --- client transport callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        term = self.term
        term.counters.connections_total += 1
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = (str(peer[0]), int(peer[1]))
        settings = term.settings
        if len(term.active) >= settings.max_connections:
            self._refuse(
                "max_connections",
                "refusing connection: max_connections=%d reached "
                "(raise [edged].max_connections if the host can take more)",
                settings.max_connections,
            )
            return
        key = client_key(self.peer[0]) if self.peer is not None else None
        if key is not None:
            limit = settings.max_connections_per_ip
            count = term.per_client.get(key, 0)
            if limit and count >= limit:
                self._refuse(
                    "max_connections_per_ip",
                    "refusing connection from %s: max_connections_per_ip=%d reached (raise "
                    "[edged].max_connections_per_ip, or set it to 0 when a proxy or load "
                    "balancer that hides client addresses sits in front)",
                    key,
                    limit,
                )
                return
            term.per_client[key] = count + 1
            self.client_key = key
        term.active.add(self)
        # No TCP_NODELAY here: uvloop (and asyncio) set it on every TCP transport.
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._timer = self.loop.call_later(term.settings.handshake_timeout, self._on_timer)

    def _refuse(self, reason: str, msg: str, *args: object) -> None:
        """Reset a connection over a limit before reading anything from it."""
        self.term.counters.connections_refused[reason] += 1
        self.term.throttle.warning(reason, msg, *args)
        self.closed = True
        self.handshaking = False
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_activity = time.monotonic()
        if self.passthrough:
            self._relay_raw(data)
            return
        if self._prereading:
            self._preread(data)
            return
        self._incoming.write(data)
        if self.handshaking:
            self._handshake()
        else:
            self._relay_to_backend()

    def eof_received(self) -> bool:
        if self.handshaking:
            self._handshake_failed("client_closed", None)
            return False
        self._on_client_eof()
        # Keep the TCP connection open: the response may still be on its way (half-close).
        return not self.closed

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self.handshaking and not self.closed:
            self._count_handshake("client_closed")
            self._reason("handshake_client_closed")
        self._reason("client_closed" if exc is None else "client_error")
        self.closed = True
        self._finish()
        if self.backend is not None:
            self.backend.close(graceful=exc is None)
            # Nothing reads it from now on (a late backend callback finds the connection
            # closed): without the cycle (backend.client) reference counting frees both, so
            # neither waits for, nor is hidden by a gc.freeze from, the cyclic GC.
            self.backend = None

    def pause_writing(self) -> None:
        if self.backend is not None:
            self.backend.pause_reading()

    def resume_writing(self) -> None:
        if self.backend is not None:
            self.backend.resume_reading()

    # --- ClientHello and passthrough ------------------------------------------------------

    def _preread(self, data: bytes) -> None:
        """Hold the first bytes until they make a whole ClientHello, then route by its SNI."""
        buf = self._hello_buf
        if buf:
            buf += data
            if len(buf) < self._hello_need:
                return  # parsing now would only say NeedMore again
            data = bytes(buf)
        try:
            hello = peek_client_hello(data)
        except NeedMore as more:
            if not buf:
                buf += data
            self._hello_need = more.need
            if len(buf) > MAX_HANDSHAKE_BUFFER:  # parse_client_hello caps it well before
                self._hello_failed(ClientHelloError(ClientHelloReason.TOO_LARGE))
            return
        except ClientHelloError as exc:
            self._hello_failed(exc)
            return
        self.hello = hello
        self._prereading = False
        self._hello_buf = bytearray()
        selector = self.term.selector
        # Without SNI only the default certificate can answer (lookup(None) gives it).
        route = selector.index.lookup(hello.server_name)
        if route is not None and route.site.passthrough and hello.server_name:
            try:  # the backend terminates this TLS: it gets only a well-formed hello
                complete(hello)
            except ClientHelloError as exc:
                self._hello_failed(exc)
                return
            self._start_passthrough(route, data)
            return
        if is_challenge_alpn(hello.alpn):
            self._tls_alpn_challenge(hello, data)
            return
        if route is not None and route.pending and self.term.load_pending is not None:
            # A large store is still being indexed: read this site's certificate now (off
            # the loop), then go on with the handshake.
            self._pause_reading("loading_cert")
            self.term.tg.create_task(self._load_then_terminate(route, hello, data))
            return
        self._terminate(route, hello, data)

    def _terminate(self, route: Route | None, hello: PeekedHello, data: bytes) -> None:
        try:
            self.term.selector.choose(self._sslobj, hello, route)
        except ClientHelloError as exc:  # a list needed to choose between key types
            self._hello_failed(exc)
            return
        except UnservableCert:
            pass  # reported once by the cache; the sni_callback refuses it (internal_error)
        except Exception:  # the sni_callback then chooses (or refuses) as without the pre-read
            log.exception("choosing the certificate for %r failed", hello.server_name)
        self._incoming.write(data)
        self._handshake()

    async def _load_then_terminate(self, route: Route, hello: PeekedHello, data: bytes) -> None:
        assert self.term.load_pending is not None
        try:
            await self.term.load_pending(route.site)
        except Exception:  # the handshake then finds no certificate and is refused, counted
            log.exception("loading the certificate of %s failed", route.site.name)
        if self.closed:
            return
        self._resume_reading("loading_cert")
        self._terminate(self.term.selector.index.lookup(hello.server_name), hello, data)

    def _hello_failed(self, exc: ClientHelloError) -> None:
        self._reason(f"clienthello_{exc.reason}")
        log.debug("malformed ClientHello from %s: %s", self.peer, exc)
        self._handshake_failed(_HELLO_RESULTS.get(exc.reason, "protocol_error"), exc)

    def _start_passthrough(self, route: Route, data: bytes) -> None:
        self.passthrough = True
        self.handshaking = False
        self.route = route
        self.sni = self.hello.server_name if self.hello is not None else None
        self.term.counters.handshakes["passthrough", "none"] += 1
        self._hello_buf = bytearray(data)  # relayed once the backend is connected
        self._arm_idle_timer()
        self._start_backend(route.site)

    # --- TLS-ALPN-01 ----------------------------------------------------------------------

    def _tls_alpn_challenge(self, hello: PeekedHello, data: bytes) -> None:
        board = self.term.alpn_board
        name = (hello.server_name or "").lower().rstrip(".")
        self.sni = hello.server_name
        ctx = board.lookup(name) if board is not None and name else None
        if ctx is not None:
            self._answer_challenge(ctx, data)
            return
        # Another node's challenge (fleet): asked of the store only for configured names, so
        # a flood of made-up names costs no store lookups.
        if board is not None and board.fleet and self.term.selector.index.get(name):
            self._pause_reading("tls_alpn_lookup")
            self.term.tg.create_task(self._shared_challenge(board, name, data))
            return
        self._refuse_challenge()

    async def _shared_challenge(self, board: AlpnChallengeBoard, name: str, data: bytes) -> None:
        """Runs in the daemon's TaskGroup; handles every error itself so the group survives."""
        try:
            ctx = await board.lookup_shared(name)
        except Exception:
            log.exception("tls-alpn-01 shared lookup failed for %s", name)
            ctx = None
        if self.closed:  # the handshake timeout or the client ended it meanwhile
            return
        self._resume_reading("tls_alpn_lookup")
        if ctx is None:
            self._refuse_challenge()
        else:
            self._answer_challenge(ctx, data)

    def _answer_challenge(self, ctx: ssl.SSLContext, data: bytes) -> None:
        # A fresh SSLObject from the challenge context: not the listening context, whose
        # sni_callback and session tickets have no business in a validation handshake.
        self.acme_challenge = True
        self._sslobj = ctx.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._incoming.write(data)
        self._handshake()

    def _refuse_challenge(self) -> None:
        self.term.counters.acme_tls_alpn["no_challenge"] += 1
        self._reason("tls_alpn_no_challenge")
        # Debug only: anyone can send such hellos (the metric counts them).
        log.debug("tls-alpn-01 refused: no pending challenge for this name peer=%s", self.peer)
        self.handshaking = False
        self.closed = True
        if self.transport is not None:
            self.transport.write(ALERT_NO_APPLICATION_PROTOCOL)
            self.transport.close()
        self._finish()

    def _count_handshake(self, result: str, version: str = "none") -> None:
        if self.acme_challenge:  # validations have their own metric, not the clients' one
            self.term.counters.acme_tls_alpn["answered" if result == "ok" else "failed"] += 1
        else:
            self.term.counters.handshakes[result, version] += 1

    def _relay_raw(self, data: bytes) -> None:
        if self.backend is None or not self.backend.connected:
            self._hello_buf += data  # cannot happen while paused, but keep the order if it does
            return
        self.bytes_in += len(data)
        self.term.counters.bytes_in += len(data)
        self._backend_owes = True
        self.backend.write(data)

    @property
    def ja4(self) -> str:
        """The client's JA4 fingerprint ("" before the ClientHello); computed on first use."""
        if self._ja4 is None:
            if self.hello is None:
                return ""
            try:
                self._ja4 = ja4(complete(self.hello))
            except ClientHelloError:  # a malformed list: OpenSSL refused this handshake too
                self._ja4 = ""
        return self._ja4

    # --- handshake ------------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            if self._incoming.pending > MAX_HANDSHAKE_BUFFER:
                self._handshake_failed("protocol_error", None)
            return
        except ssl.SSLError as exc:
            self._flush()  # deliver the alert
            refused = getattr(self._sslobj, REFUSED_ATTR, None)
            self._handshake_failed(classify_handshake_error(exc, refused), exc)
            return
        except OSError as exc:
            self._handshake_failed("protocol_error", exc)
            return
        self._flush()
        self.handshaking = False
        version = self._sslobj.version() or "unknown"
        self._count_handshake("ok", version)
        if self.acme_challenge:
            log.info("tls-alpn-01 answered peer=%s version=%s", self.peer, version)
            self.close("tls_alpn_answered")  # validation done: close_notify, nothing else
            return
        self.route = getattr(self._sslobj, ROUTE_ATTR, None)
        self.sni = getattr(self._sslobj, SNI_ATTR, None)
        if self.route is None:  # cannot happen: the callback refuses without a route
            self.abort("no_route")
            return
        self._arm_idle_timer()
        if self.route.site.backend_connect == "handshake":
            self._start_backend(self.route.site)
        else:
            # The backend connection opens with the client's first bytes, mostly sent with its
            # Finished (read now): a client that completes the handshake and leaves (a probe, a
            # scanner, a handshake flood) costs the backend nothing.
            self._relay_to_backend()

    def _handshake_failed(self, result: str, exc: Exception | None) -> None:
        self._count_handshake(result)
        self._reason(f"handshake_{result}")
        if result in ("no_shared_cipher", "internal_error"):
            # The failures that otherwise leave no trace: an RSA-only client and an
            # ECDSA-only certificate fail without any alert the operator could see.
            self.term.throttle.warning(
                f"handshake:{result}",
                "TLS handshake failed: %s for SNI %r from %s (%s)",
                result,
                getattr(self._sslobj, SNI_ATTR, None),
                self.peer[0] if self.peer else "?",
                exc,
            )
        else:
            log.debug("TLS handshake failed: %s from %s: %s", result, self.peer, exc)
        self.handshaking = False
        self.closed = True
        if self.transport is not None:
            # close() sends what is buffered (the alert) before closing.
            self.transport.close()
        self._finish()

    # --- relay ----------------------------------------------------------------------------

    def _relay_to_backend(self) -> None:
        """Decrypt what the client sent and pass it on (once the backend is connected; the
        first bytes start connecting it)."""
        backend = self.backend
        if backend is not None and not backend.connected:
            return  # stays in the BIO; read after connecting
        if self.passthrough:
            held, self._hello_buf = self._hello_buf, bytearray()
            if held:
                self._relay_raw(bytes(held))
            return
        chunks = []
        eof = False
        incoming, sslobj = self._incoming, self._sslobj
        # Reading with nothing new in the BIO only raises SSLWantReadError (costly): skip it.
        while incoming.pending or sslobj.pending():
            try:
                chunk = sslobj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True
                break
            except ssl.SSLError as exc:
                log.debug("TLS error from client %s: %s", self.peer, exc)
                self.abort("tls_error")
                return
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
        if self._outgoing.pending and not eof and self._sslobj.version() == "TLSv1.2":
            # Reading TLS 1.2 application data makes OpenSSL write only one thing: the
            # no_renegotiation warning with which it refuses a client's renegotiation
            # (OP_NO_RENEGOTIATION). Count it, so the attempts are visible.
            self.term.counters.handshakes["renegotiation_refused", "TLSv1.2"] += 1
        self._flush()  # TLS 1.3 key updates and alerts need answers
        if chunks:
            data = b"".join(chunks)
            self.bytes_in += len(data)
            self.term.counters.bytes_in += len(data)
            self._backend_owes = True
            if backend is not None:
                backend.write(data)
            elif self.route is not None:
                self._early = data  # written first once connected
                self._start_backend(self.route.site)
        if eof:
            self._on_client_eof()

    def from_backend(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            return
        self.last_activity = time.monotonic()
        self.bytes_out += len(data)
        self.term.counters.bytes_out += len(data)
        self._backend_owes = False
        if self.passthrough:
            if not self.transport.is_closing():
                self.transport.write(data)
            return
        try:
            self._sslobj.write(data)
        except ssl.SSLError as exc:
            log.debug("cannot encrypt to client %s: %s", self.peer, exc)
            self.abort("tls_error")
            return
        self._flush()

    def _on_client_eof(self) -> None:
        if self.client_eof:
            return
        self.client_eof = True
        self._forward_client_eof()

    def _forward_client_eof(self) -> None:
        """Pass the client's EOF on as a FIN (once connected; backend_ready calls it again)."""
        if self.backend is None:
            self.close("client_closed")  # it sent nothing: no backend connection to end
            return
        if self.backend.connected:
            if not self.backend.can_write_eof():
                # TLS to the origin cannot half-close: the client is done, so is the exchange.
                self.close()
                return
            self.backend.write_eof()
        if self.backend_eof:
            self.close()

    def on_backend_eof(self) -> None:
        """The backend finished sending: send close_notify (half-close towards the client) and
        keep reading until the client is done too."""
        if self.backend_eof or self.closed:
            return
        self.backend_eof = True
        if self.client_eof:
            self.close()
            return
        self._send_close_notify()
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()
            self._fin_sent = True

    def on_backend_lost(self, reason: str | None) -> None:
        if self.closed:
            return
        if reason is not None:
            self.term.counters.backend_errors[reason] += 1
            self.abort(f"backend_{reason}")
        elif not self.backend_eof:
            self.on_backend_eof()

    def on_backend_failed(self, reason: str, detail: str) -> None:
        site = self.route.site if self.route else None
        self.term.counters.backend_errors[reason] += 1
        self.term.throttle.warning(
            f"backend:{site.index if site else -1}:{reason}",
            "backend %s of %s: %s: %s",
            site.backend if site else "?",
            site.key if site else "?",
            reason,
            detail,
        )
        self.close(f"backend_{reason}")

    # --- flow control ---------------------------------------------------------------------

    def _pause_reading(self, why: str) -> None:
        if not self._paused_for and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._paused_for.add(why)

    def _resume_reading(self, why: str) -> None:
        if why not in self._paused_for:
            return
        self._paused_for.discard(why)
        if not self._paused_for and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def backend_full(self) -> None:
        self._pause_reading("backend_full")

    def backend_drained(self) -> None:
        self._resume_reading("backend_full")

    def backend_ready(self, backend: BackendConnection) -> None:
        self.backend = backend
        if self._early:
            backend.write(self._early)
            self._early = b""
        self._resume_reading("connecting")
        self._relay_to_backend()
        if self.client_eof:  # the client finished while we were connecting
            self._forward_client_eof()

    # --- backend connection ---------------------------------------------------------------

    def _start_backend(self, site: Site) -> None:
        backend = BackendConnection(self)
        self.backend = backend
        self._pause_reading("connecting")
        self.term.tg.create_task(self._connect_backend(site, backend))

    async def _connect_backend(self, site: Site, backend: BackendConnection) -> None:
        """Runs in the daemon's TaskGroup; handles every error itself so the group survives."""
        origin: tuple[ssl.SSLContext, str] | None = None
        if site.origin_tls:
            # Taken now: a reload during the connect may renumber the sites.
            ctx = self.term.origin_contexts.get(site.index)
            if ctx is None:
                self.on_backend_failed("origin_tls", "no usable origin CA: see origin_ca_file")
                return
            origin = (ctx, self._origin_sni(site))
        try:
            async with asyncio.timeout(self.term.settings.connect_timeout):
                await backend.connect(site, self._proxy_header(site), origin)
        except TimeoutError:
            self.on_backend_failed("connect_timeout", "no answer within connect timeout")
            return
        except ConnectionRefusedError:
            self.on_backend_failed("refused", "connection refused: is the backend running?")
            return
        except ssl.SSLCertVerificationError as exc:
            self.on_backend_failed("origin_tls", f"origin certificate not trusted: {exc}")
            return
        except ssl.SSLError as exc:
            self.on_backend_failed("origin_tls", f"TLS to origin failed: {exc}")
            return
        except OSError as exc:
            self.on_backend_failed("connect_error", exc.strerror or str(exc))
            return
        except Exception as exc:  # the TaskGroup must never see an exception
            log.exception("unexpected error connecting to backend")
            self.on_backend_failed("internal_error", repr(exc))
            return
        if self.closed:  # the client left while we were connecting
            backend.close(graceful=False)
            return
        self.backend_ready(backend)

    def _proxy_header(self, site: Site) -> bytes:
        if not site.proxy_protocol or self.transport is None:
            return b""
        ends = Endpoints(_ip_port(self.transport, "peername"), _ip_port(self.transport, "sockname"))
        if site.proxy_protocol == "v1":
            return build_v1(ends)
        extra = [(site.ja4_tlv, self.ja4.encode("ascii"))] if site.ja4_tlv and self.hello else []
        if self.passthrough:
            return build_v2(ends, authority=self.sni or "", extra=extra)
        cipher = self._sslobj.cipher()
        info = TlsInfo(
            alpn=self._sslobj.selected_alpn_protocol() or "",
            sni=self.sni or "",
            version=self._sslobj.version() or "",
            cipher=cipher[0] if cipher else "",
        )
        return build_v2(ends, info, extra=extra)

    def _origin_sni(self, site: Site) -> str:
        if site.origin_server_name:
            return site.origin_server_name
        sni = (self.sni or "").lower().rstrip(".")
        # Only a name the site really serves goes to the origin (not an unknown SNI that fell
        # back to the default certificate).
        if sni and self.route is not None and covers(self.route.name, sni):
            return sni
        if not site.backend.is_unix and not _is_ip(site.backend.host):
            return site.backend.host
        return site.name.removeprefix("*.")

    # --- timers and closing ---------------------------------------------------------------

    def _arm_idle_timer(self) -> None:
        """The handshake is over: from now on the timer enforces idle_timeout. The handshake
        timer keeps running when it fires before the idle deadline (it then reschedules
        itself for the rest), which saves replacing it on every connection."""
        idle_timeout = self.term.settings.idle_timeout
        deadline = self.started + self.term.settings.handshake_timeout
        if self._timer is not None and time.monotonic() + idle_timeout >= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(idle_timeout, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        if self.handshaking:
            self._handshake_failed("timeout", None)
            return
        idle = time.monotonic() - self.last_activity
        remaining = self.term.settings.idle_timeout - idle
        if remaining > 0.05:
            self._timer = self.loop.call_later(remaining, self._on_timer)
            return
        if self._backend_owes and self.backend is not None and self.backend.connected:
            self.term.counters.backend_errors["timeout"] += 1
            log.info("backend never answered peer=%s idle=%.0fs", self.peer, idle)
            self.close("backend_timeout")
            return
        log.debug("closing idle connection from %s after %.0fs", self.peer, idle)
        self.close("idle_timeout")

    def _flush(self) -> None:
        if not self._outgoing.pending:
            return
        data = self._outgoing.read()
        # Nothing can follow our FIN (e.g. an alert OpenSSL emits after close_notify).
        transport = self.transport
        if data and transport is not None and not transport.is_closing() and not self._fin_sent:
            transport.write(data)

    def _send_close_notify(self) -> None:
        if self._notify_sent or self.passthrough:
            return
        self._notify_sent = True
        try:
            self._sslobj.unwrap()
        except ssl.SSLWantReadError:
            pass  # our close_notify is out; the client's may follow later
        except (ssl.SSLError, OSError, ValueError):
            return
        self._flush()

    def close(self, reason: str = "done") -> None:
        """Orderly close: close_notify to the client, flush, close both sides."""
        if self.closed:
            return
        self._reason(reason)
        self.closed = True
        if self.backend is not None:
            self.backend.close(graceful=True)
        transport = self.transport
        if transport is not None:
            if not self.handshaking:
                self._send_close_notify()
            transport.close()
            left = transport.get_write_buffer_size()
            if left and not self._lost:
                # The transport sends what is buffered before it lets go of the socket, and a
                # client that stopped reading would hold both forever. So the connection still
                # counts (max_connections, per client) until it is gone, and it is reset when
                # the client takes nothing for idle_timeout.
                self._linger(left)
                return
        self._finish()

    def _linger(self, left: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(
            self.term.settings.idle_timeout, self._linger_expired, left
        )

    def _linger_expired(self, left_before: int) -> None:
        self._timer = None
        transport = self.transport
        if transport is None or self._lost:
            return
        left = lingered(transport, left_before)
        if left is None:
            log.debug("resetting %s: it took none of the last %d bytes", self.peer, left_before)
            transport.abort()  # connection_lost follows and finishes the connection
        elif left:
            self._linger(left)  # slow, but reading

    def abort(self, reason: str) -> None:
        """Hard close (RST) of both sides, e.g. when the backend reset: the client must not
        mistake a truncated response for a complete one."""
        if self.closed and self.transport is None:
            return
        self._reason(reason)
        if self.handshaking and not self.closed:
            self._count_handshake("aborted")
            self.handshaking = False
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        if self.backend is not None:
            self.backend.close(graceful=False)
        log.debug("aborted connection from %s: %s", self.peer, reason)
        self._finish()

    def _reason(self, reason: str) -> None:
        if not self.close_reason:
            self.close_reason = reason

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self in self.term.active:
            self.term._removed(self)
            self.term.counters.connections_closed[close_category(self.close_reason)] += 1
            sample = self.term.settings.connection_log_sample
            if sample > 0 and random.random() < sample:
                self._log_connection()

    def _log_connection(self) -> None:
        """The connection log line. The SNI is shown only when it is a name the route serves
        (so an unknown or hostile SNI never reaches the log); every field is edged's own text
        or a number."""
        sni = (self.sni or "").lower().rstrip(".")
        if not (sni and self.route is not None and covers(self.route.name, sni)):
            sni = "-"
        obj = self._sslobj
        done = not self.handshaking and self.route is not None and not self.passthrough
        cipher = obj.cipher() if done else None
        fields = {
            "client": _format_peer(self.peer),
            "sni": sni,
            "site": self.route.site.name if self.route is not None else "-",
            "tls_version": (obj.version() if done else None) or "-",
            "cipher": cipher[0] if cipher else "-",
            "alpn": (obj.selected_alpn_protocol() if done else None) or "-",
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration": round(time.monotonic() - self.started, 3),
            "reason": self.close_reason or "closed",
            "mode": "passthrough" if self.passthrough else "terminate",
            "ja4": self.ja4 or "-",
        }
        text = (
            "conn client=%s sni=%s site=%s tls=%s cipher=%s alpn=%s in=%d out=%d secs=%.3f "
            "reason=%s"
        )
        args = list(fields.values())[:10]
        site = self.route.site if self.route is not None else None
        if site is not None and (site.passthrough or site.ja4_tlv):
            # Sites that use the ClientHello say so in the text line too (the JSON line has
            # mode and ja4 always).
            text += " mode=%s ja4=%s"
            args += [fields["mode"], fields["ja4"]]
        conn_log.info(text, *args, extra=fields)


class BackendConnection(asyncio.Protocol):
    """The plaintext (or re-encrypted) side towards the site's backend."""

    __slots__ = (
        "_eof_received",
        "_eof_sent",
        "_linger",
        "_tls",
        "client",
        "closed",
        "connected",
        "transport",
    )

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.connected = False
        self.closed = False
        self._eof_sent = False
        self._eof_received = False
        self._tls = False  # TLS to the origin (origin_tls)
        self._linger: asyncio.TimerHandle | None = None

    async def connect(
        self, site: Site, header: bytes, origin: tuple[ssl.SSLContext, str] | None
    ) -> None:
        loop = self.client.loop
        backend = site.backend
        if backend.is_unix:
            transport, _ = await loop.create_unix_connection(lambda: self, backend.path)
        else:
            transport, _ = await loop.create_connection(lambda: self, backend.host, backend.port)
        # The PROXY header goes first, in clear, also when the origin speaks TLS.
        if header:
            transport.write(header)
        if origin is not None:
            ctx, server_name = origin
            new = await loop.start_tls(transport, self, ctx, server_hostname=server_name)
            if new is None:
                raise ConnectionResetError("origin closed during TLS handshake")
            transport = new
            self._tls = True
        self.transport = transport
        self.connected = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.client.from_backend(data)

    def eof_received(self) -> bool:
        # Over TLS this is the origin's close_notify (a bare FIN never reaches here).
        self._eof_received = True
        self.client.on_backend_eof()
        # Keep our write side open (the client may still be sending) unless the transport
        # cannot half-close (TLS to the origin).
        return self.can_write_eof()

    def can_write_eof(self) -> bool:
        return self.transport is not None and self.transport.can_write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if not self.connected:
            return  # connect() reports the failure
        reason = None
        if isinstance(exc, ConnectionResetError):
            reason = "reset"
        elif exc is not None:
            reason = "connection_error"
        elif self._tls and not self._eof_received:
            # The origin's TLS ended without close_notify (a crash mid-response, a FIN
            # injected on the path): its response may be cut short, so the client must see
            # an abort, not a clean close_notify.
            reason = "truncated"
        self.client.on_backend_lost(reason)

    def pause_writing(self) -> None:
        self.client.backend_full()

    def resume_writing(self) -> None:
        self.client.backend_drained()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is None or self._eof_sent or self.transport.is_closing():
            return
        self._eof_sent = True
        if self.transport.can_write_eof():
            self.transport.write_eof()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self, *, graceful: bool) -> None:
        self.closed = True
        if self.transport is None or self.transport.is_closing():
            return  # connect() closes what it opens after the client left
        if not graceful:
            self.transport.abort()
            return
        self.transport.close()  # after what is buffered has been sent
        left = self.transport.get_write_buffer_size()
        if left:
            # A backend that stopped reading would hold the socket and the buffer forever,
            # outside every connection limit (the client is gone from them): as the client
            # side, reset it once an idle_timeout passes without it taking any.
            self._arm_linger(left)

    def _arm_linger(self, left: int) -> None:
        self._linger = self.client.loop.call_later(
            self.client.term.settings.idle_timeout, self._linger_expired, left
        )

    def _linger_expired(self, left_before: int) -> None:
        self._linger = None
        transport = self.transport
        if transport is None:
            return
        left = lingered(transport, left_before)
        if left is None:
            log.debug("resetting a backend that took none of the last %d bytes", left_before)
            transport.abort()
        elif left:
            self._arm_linger(left)  # slow, but reading


def lingered(transport: asyncio.Transport, left_before: int) -> int | None:
    """What a closing transport's peer did over one linger period (an idle_timeout): None when
    it took none of the `left_before` bytes still buffered (reset it), 0 when it took them all
    (the transport is closing the socket now), else the bytes left (slow, but reading)."""
    left = transport.get_write_buffer_size()
    return None if left and left >= left_before else left


def _ip_port(transport: asyncio.BaseTransport, which: str) -> tuple[str, int] | None:
    value = transport.get_extra_info(which)
    if isinstance(value, tuple) and len(value) >= 2:
        return str(value[0]), int(value[1])
    return None


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def _format_peer(peer: tuple[str, int] | None) -> str:
    if peer is None:
        return "-"
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
