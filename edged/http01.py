"""Port 80: ACME HTTP-01 answers, and a redirect to https (or forwarding) for everything else.

The challenge path is matched first and never redirected or forwarded: a token is answered only
while its order is pending and only for a Host that is one of that order's names. Everything
else about a request is untrusted: Host must be a configured site name before we redirect or
forward (no open redirect), tokens must be base64url before they are looked up.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

import aiohttp
from aiohttp import web
from yarl import URL

from edged.config import Address, Config, Site
from edged.errors import EdgedError
from edged.listen import LISTEN_BACKLOG, StartupError, bind_tcp
from edged.logs import Throttled
from edged.names import NameError_, covers, normalize_name

log = logging.getLogger(__name__)

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_PORT = re.compile(r"[0-9]{0,5}")
_ABSOLUTE_FORM = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")
# Not unreserved, reserved or "%" (RFC 3986 section 2): kept as is it would not be a URI.
_NOT_URI = re.compile(r"[^A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]")
TOKEN_TTL = 900.0  # an order that takes longer than this has failed anyway
SHARED_CACHE = 1.0  # seconds a Redis token answer (or its absence) is reused
# Redis token lookups running at once. A CA validates each challenge from a handful of places,
# and an answer takes about a millisecond; a flood of random tokens (the cache cannot help)
# while Redis hangs would otherwise queue behind timeouts.
MAX_SHARED_LOOKUPS = 16


class SharedTokens(Protocol):
    def put_token(
        self, token: str, key_authorization: str, names: list[str], ttl: float
    ) -> None: ...

    def get_token(self, token: str) -> tuple[str, list[str]] | None: ...

    def delete_token(self, token: str) -> None: ...


# Fields about one connection only (RFC 9110 section 7.6.1, and the Proxy-* ones of section
# 11.7), never forwarded either way; so are the fields a message's Connection header names.
# Host and Content-Length are not hop-by-hop, but the forward sets its own.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def _not_forwarded(connection: Iterable[str]) -> frozenset[str]:
    """Lowercase names of a message's fields that stay on their hop: the standard hop-by-hop
    fields and those its Connection fields (`connection`, comma-separated lists) name."""
    named = {token.strip().lower() for value in connection for token in value.split(",")}
    return _HOP_BY_HOP | named


# What aiohttp's client would add when the client sent none: only the client's headers go on.
_CLIENT_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


@dataclass(frozen=True)
class PendingToken:
    key_authorization: str
    names: frozenset[str]
    expires: float  # time.monotonic()


class ChallengeBoard:
    """Tokens of pending HTTP-01 challenges. Written by ACME worker threads, read on the loop."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._tokens: dict[str, PendingToken] = {}
        self._lock = threading.Lock()
        self._clock = clock
        # In a fleet: tokens also go to Redis, so any node answers any node's challenge.
        self.shared: SharedTokens | None = None
        self._cache: dict[str, tuple[float, PendingToken | None]] = {}
        # Lookups run in their own threads, one per slot: a hung Redis holds these, never the
        # loop's default executor that reloads, certificate loads and renewals wait on. A slot is
        # free again only when its lookup has ended (a cancelled request leaves it running).
        # Threads start on first use; the executor ends them when the board is collected.
        self._lookups = ThreadPoolExecutor(
            max_workers=MAX_SHARED_LOOKUPS, thread_name_prefix="edged-http01-lookup"
        )
        self._slots = threading.BoundedSemaphore(MAX_SHARED_LOOKUPS)
        self._throttle = Throttled(log)

    def add(
        self, token: str, key_authorization: str, names: Iterable[str], ttl: float = TOKEN_TTL
    ) -> None:
        if not _TOKEN.match(token):
            raise ValueError(f"ACME token {token!r} is not base64url")
        entry = PendingToken(key_authorization, frozenset(names), self._clock() + ttl)
        with self._lock:
            self._tokens[token] = entry
        if self.shared is not None:  # called from an ACME worker thread: blocking is fine
            self.shared.put_token(token, key_authorization, sorted(entry.names), ttl)

    def remove(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)
        if self.shared is not None:
            try:
                self.shared.delete_token(token)
            except EdgedError as exc:  # it expires by itself
                log.warning("shared token not removed error=%s", exc)

    async def lookup_shared(self, token: str, host: str) -> str | None:
        """Another node's pending token, from Redis through a short local cache. With
        MAX_SHARED_LOOKUPS lookups running it is None at once: refused, not queued."""
        shared = self.shared
        if shared is None:
            return None
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None and cached[0] > now:
            entry = cached[1]
        else:
            if not self._slots.acquire(blocking=False):
                self._throttle.warning(
                    "busy", "shared token lookups busy, refused limit=%d", MAX_SHARED_LOOKUPS
                )
                return None
            try:
                running = self._lookups.submit(shared.get_token, token)
            except BaseException:
                self._slots.release()
                raise
            running.add_done_callback(self._release_slot)
            try:
                found = await asyncio.wrap_future(running)
            except EdgedError as exc:
                self._throttle.warning("failed", "shared token lookup failed error=%s", exc)
                return None
            entry = (
                None
                if found is None
                else PendingToken(found[0], frozenset(found[1]), now + SHARED_CACHE)
            )
            if len(self._cache) > 10000:
                self._cache.clear()  # bounded: tokens are random, a flood must not grow it
            self._cache[token] = (now + SHARED_CACHE, entry)
        if entry is None or host not in entry.names:
            return None
        return entry.key_authorization

    def _release_slot(self, _done: Future[tuple[str, list[str]] | None]) -> None:
        # Runs in the lookup's thread when it ends, or at once when cancelled before it ran.
        self._slots.release()

    def lookup(self, token: str, host: str) -> str | None:
        """The key authorization when `token` is pending for `host`; None otherwise."""
        with self._lock:
            entry = self._tokens.get(token)
            if entry is not None and entry.expires < self._clock():
                del self._tokens[token]
                entry = None
        if entry is None or host not in entry.names:
            return None
        return entry.key_authorization

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)


def _port_ok(raw_host: str) -> bool:
    """The Host header's port, if any, is a number (RFC 9110: host [":" port], port = *DIGIT):
    "f.test:evil" names nothing, and must not reach a backend as if it did."""
    if raw_host.startswith("["):  # an IPv6 literal: the port follows its "]"
        raw_host = raw_host.rpartition("]")[2]
    return _PORT.fullmatch(raw_host.partition(":")[2]) is not None


def request_host(request: web.Request) -> str | None:
    """The Host header as a normalised DNS name (port and trailing dot dropped), or None."""
    raw = request.headers.get("Host", "")
    if raw.startswith("["):
        return None  # an IPv6 literal is never a certificate name
    if not _port_ok(raw):
        return None
    host = raw.partition(":")[0]
    try:
        return normalize_name(host.rstrip("."), allow_wildcard=False)
    except NameError_:
        return None


def site_for_host(config: Config, host: str) -> Site | None:
    for site in config.sites:
        if any(covers(pattern, host) for pattern in site.names):
            return site
    return None


def origin_form(target: str) -> str:
    """The path and query of a request target exactly as sent (escapes and dot segments kept;
    an absolute-form target loses its scheme and authority), always starting with "/".
    Characters no URI may hold (a "\\", control or non-ASCII ones) are percent-encoded."""
    if not target.startswith("/"):
        target = _ABSOLUTE_FORM.sub("", target, count=1)
        if not target.startswith("/"):
            target = "/" + target
    return _NOT_URI.sub(lambda m: quote(m.group().encode("utf-8", "surrogateescape")), target)


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", content_type="text/plain")


class _Relayed(web.StreamResponse):
    """A backend's reply relayed by a forward; `backend_sent`: the fields of it we relay."""

    backend_sent: frozenset[str] = frozenset()


async def _keep_relayed_fields(_request: web.Request, response: web.StreamResponse) -> None:
    """Take back the fields aiohttp set on a relayed reply that its backend did not send (run
    after aiohttp's defaults, before the head is written): no invented Content-Type
    ("application/octet-stream") or Server. Date stays: RFC 9110 section 6.6.1 asks whoever
    forwards a reply without one to add it."""
    if isinstance(response, _Relayed):
        for name in ("Content-Type", "Server"):
            if name.lower() not in response.backend_sent:
                response.headers.popall(name, None)


class Http01App:
    """The aiohttp application of the HTTP listeners; reads the live config on every request."""

    def __init__(self, board: ChallengeBoard, config: Callable[[], Config]) -> None:
        self.board = board
        self.config = config
        self._client: aiohttp.ClientSession | None = None
        self.app = web.Application(client_max_size=1024 * 1024)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self.app.on_cleanup.append(self._close_client)
        self.app.on_response_prepare.append(_keep_relayed_fields)
        self.answered = 0
        self.refused = 0
        self._throttle = Throttled(log)  # refusals are logged, but a flood of them is not

    async def _close_client(self, _app: web.Application) -> None:
        if self._client is not None:
            await self._client.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        # The raw (still percent-encoded) path: a token is base64url and needs no escapes, so
        # "acme-challenge%2fTOKEN" or "%54OKEN" is not a challenge request (the decoded path
        # would let encoded slashes act as separators).
        path = request.rel_url.raw_path
        if path.startswith(CHALLENGE_PREFIX):
            return await self._challenge(request, path[len(CHALLENGE_PREFIX) :])
        if not _port_ok(request.headers.get("Host", "")):
            return _text(400, "bad Host header")
        host = request_host(request)
        config = self.config()
        site = site_for_host(config, host) if host else None
        if host is None or site is None:
            return _text(404, "unknown host")
        if site.http == "forward":
            return await self._forward(request, config, site, host)
        port = config.listen.https[0].port if config.listen.https else 443
        authority = host if port == 443 else f"{host}:{port}"
        # Built by hand: HTTPMovedPermanently re-parses the URL (yarl), which resolves dot
        # segments and re-quotes escapes. The path follows our authority, so no target (not
        # "//evil.test" either) can name another host.
        return web.Response(
            status=301,
            headers={"Location": f"https://{authority}{origin_form(request.raw_path)}"},
        )

    async def _challenge(self, request: web.Request, token: str) -> web.Response:
        host = request_host(request)
        if request.method not in ("GET", "HEAD") or host is None or not _TOKEN.match(token):
            self.refused += 1
            return _text(404, "no such challenge")
        answer = self.board.lookup(token, host) or await self.board.lookup_shared(token, host)
        if answer is None:
            self.refused += 1
            self._throttle.info(
                "refused", "http-01 refused host=%s reason=unknown token or host", host
            )
            return _text(404, "no such challenge")
        self.answered += 1
        return web.Response(status=200, text=answer, content_type="text/plain")

    async def _forward(
        self, request: web.Request, config: Config, site: Site, host: str
    ) -> web.StreamResponse:
        """Plain-HTTP reverse proxy to the site's backend (for sites with http = "forward").

        Like TLS connections: `backend_connect_timeout` to connect, and `idle_timeout` for the
        backend to send something (headers or the next piece of the body) and for the client
        to take it; a client that goes away cancels this handler (HttpListeners), which closes
        the backend connection."""
        settings = config.edged
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=settings.backend_connect_timeout,
            sock_read=settings.idle_timeout,
        )
        if self._client is None:
            self._client = aiohttp.ClientSession(auto_decompress=False)
        backend = site.backend
        # The client's headers as sent, in order, repeated ones included (a dict would keep
        # only the last of each); ours replace any the client sent.
        ours = {"x-forwarded-for", "x-forwarded-proto"}
        dropped = _not_forwarded(request.headers.getall("Connection", []))
        headers = [
            (k, v)
            for k, v in request.headers.items()
            if k.lower() not in dropped and k.lower() not in ours
        ]
        peer = request.remote or ""
        prior = ""
        if "x-forwarded-for" not in dropped:  # named in Connection: it was for our hop only
            prior = ", ".join(request.headers.getall("X-Forwarded-For", []))
        headers += [
            ("Host", request.headers.get("Host", host)),
            ("X-Forwarded-For", f"{prior}, {peer}" if prior else peer),
            ("X-Forwarded-Proto", "http"),
        ]
        if request.content_length is not None:
            # The body goes on as the client framed it: with its length, not re-chunked (a
            # backend may not take chunked request bodies). Without one it is chunked.
            headers.append(("Content-Length", str(request.content_length)))
        # The target exactly as received: the backend must see the path edged saw (a decoded
        # %2F or a resolved "/.." would make it another path). Absolute-form targets
        # ("GET http://x/p") are sent in origin-form ("/p"), unnormalised too.
        target = request.raw_path
        if not target.startswith("/"):
            target = request.rel_url.raw_path_qs
        if backend.is_unix:
            url = URL(f"http://{host}{target}", encoded=True)
            connector_session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=backend.path), auto_decompress=False
            )
        else:
            url = URL(f"http://{backend}{target}", encoded=True)
            connector_session = None
        session = connector_session or self._client
        response: web.StreamResponse | None = None
        try:
            async with session.request(
                request.method,
                url,
                headers=headers,
                data=request.content if request.body_exists else None,
                allow_redirects=False,
                timeout=timeout,
                skip_auto_headers=_CLIENT_AUTO_HEADERS,
            ) as upstream:
                response = _Relayed(status=upstream.status, reason=upstream.reason)
                dropped = _not_forwarded(upstream.headers.getall("Connection", []))
                for key, value in upstream.headers.items():
                    if key.lower() not in dropped:
                        response.headers.add(key, value)
                response.backend_sent = frozenset(k.lower() for k in response.headers)
                if "transfer-encoding" not in upstream.headers:
                    # The backend's own framing: its body goes on as is, not re-chunked.
                    response.content_length = upstream.content_length
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(65536):
                    # A client that stops reading would otherwise hold the backend forever.
                    async with asyncio.timeout(settings.idle_timeout):
                        await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, TimeoutError) as exc:
            timed_out = isinstance(exc, TimeoutError)
            self._throttle.warning(
                f"forward {site.key}",  # keys from the config only: a bounded set
                "http forward failed site=%s backend=%s error=%s",
                site.key,
                backend,
                "timeout" if timed_out and not str(exc) else exc,
            )
            if response is not None and response.prepared:
                # Too late for an error status: cut the connection, so the client sees the
                # reply is incomplete rather than a short body that looks whole.
                if request.transport is not None:
                    request.transport.close()
                return response
            if timed_out:
                return _text(504, f"backend {backend} timed out")
            return _text(502, f"backend {backend} unavailable")
        finally:
            if connector_session is not None:
                await connector_session.close()


class HttpListeners:
    """The plain-HTTP listeners of `[listen].http`, re-synced on config reloads."""

    def __init__(self, app: Http01App) -> None:
        # Small limits: port 80 only ever needs short GETs (challenges, redirects).
        self.runner = web.AppRunner(
            app.app,
            access_log=None,
            keepalive_timeout=15,
            max_line_size=8190,
            max_field_size=8190,
            # After answering a request whose body was not read (a POST to the challenge
            # path), aiohttp reads and discards the rest for lingering_time (default 10 s),
            # even after the client has gone: a cheap way to hold connections and delay a
            # shutdown. One second is plenty for a client to read a short refusal.
            lingering_time=1.0,
            # A client that disconnects cancels its request's handler: a forward to a slow or
            # hung backend ends with it (aiohttp lets handlers run on by default).
            handler_cancellation=True,
        )
        self._sites: dict[Address, web.SockSite] = {}
        self._started = False

    async def sync(
        self,
        addresses: Iterable[Address],
        bind: Callable[[Address], socket.socket] = bind_tcp,
    ) -> None:
        """Bind new addresses first (all or nothing), then stop the ones no longer wanted.
        `bind` gives the listening socket for an address (socket activation passes its own)."""
        if not self._started:
            await self.runner.setup()
            self._started = True
        wanted = list(addresses)
        new: dict[Address, socket.socket] = {}
        try:
            for address in wanted:
                if address not in self._sites:
                    new[address] = bind(address)
        except StartupError:
            for sock in new.values():
                sock.close()
            raise
        for address, sock in new.items():
            site = web.SockSite(self.runner, sock, backlog=LISTEN_BACKLOG)
            await site.start()
            self._sites[address] = site
        for address in list(self._sites):
            if address not in wanted:
                await self._sites.pop(address).stop()
                log.info("stopped listening on http %s", address)

    def addresses(self) -> list[Address]:
        return list(self._sites)

    async def close(self) -> None:
        self._sites.clear()
        if self._started:
            await self.runner.cleanup()
            self._started = False
