"""SSLContexts: the listening context, per-certificate contexts in a bounded LRU, the sni_callback.

Contexts are built lazily from PEM bytes (one costs ~1 ms and ~24 KiB; PEM bytes cost almost
nothing), so startup with many names stays fast and memory stays bounded. `load_cert_chain` only
takes paths: the PEM goes through a memfd, never through a file other users could read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
from collections import OrderedDict
from collections.abc import Sequence

from edged.config import TlsSettings
from edged.sni import Route, Servable, SniIndex

log = logging.getLogger("edged.tls")

# Attributes the sni_callback leaves on the connection's SSLObject: on the server side the SNI
# is only visible inside the callback, and the connection needs it afterwards for routing.
ROUTE_ATTR = "edged_route"
SNI_ATTR = "edged_sni"
REFUSED_ATTR = "edged_refused"

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_OPTIONS = ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION


def server_context(min_version: str) -> ssl.SSLContext:
    """A bare server context with edged's options and version floor (the zygote's listening
    context: the sni_callback is set in each worker)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.options |= _OPTIONS
    return ctx


def build_cert_context(
    bundles: Sequence[Servable], alpn: Sequence[str], min_version: str = "1.2"
) -> ssl.SSLContext:
    """A context serving `bundles` (RSA and ECDSA together: OpenSSL picks by client sigalgs)."""
    ctx = server_context(min_version)
    for bundle in bundles:
        _load_pem(ctx, bundle.fullchain_pem, bundle.key_pem)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def _load_pem(ctx: ssl.SSLContext, fullchain: bytes, key: bytes) -> None:
    fd = os.memfd_create("edged-cert", os.MFD_CLOEXEC)
    try:
        os.write(fd, key + b"\n" + fullchain)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def build_listening_context(tls: TlsSettings, sni: SniSelector) -> ssl.SSLContext:
    """The context every connection starts with: no cert of its own, the version floor (the
    sni_callback's context switch does not carry minimum_version) and the callback."""
    ctx = server_context(tls.min_version)
    ctx.sni_callback = sni.callback
    return ctx


class ContextCache:
    """LRU of SSLContexts keyed by certificate identity and ALPN list.

    A replaced certificate has new fingerprints, so its old context simply ages out: changing
    one name never invalidates the others.
    """

    def __init__(self, capacity: int, min_version: str) -> None:
        self.capacity = capacity
        self.min_version = min_version
        self._contexts: OrderedDict[tuple[tuple[str, ...], tuple[str, ...]], ssl.SSLContext]
        self._contexts = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._contexts)

    def get(self, route: Route, default_alpn: Sequence[str]) -> ssl.SSLContext:
        alpn = tuple(route.site.alpn if route.site.alpn is not None else default_alpn)
        key = (route.cert_key, alpn)
        ctx = self._contexts.get(key)
        if ctx is not None:
            self.hits += 1
            self._contexts.move_to_end(key)
            return ctx
        self.misses += 1
        ctx = build_cert_context(route.bundles, alpn, self.min_version)
        self._contexts[key] = ctx
        if len(self._contexts) > self.capacity:
            self._contexts.popitem(last=False)
        return ctx

    def clear(self) -> None:
        self._contexts.clear()


class SniSelector:
    """Owns the current SniIndex and answers the sni_callback. Swapping the index is one
    assignment: a handshake in flight keeps the context it was given."""

    def __init__(self, index: SniIndex, cache: ContextCache, default_alpn: Sequence[str]) -> None:
        self.index = index
        self.cache = cache
        self.default_alpn = tuple(default_alpn)

    def callback(
        self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        """Pick the certificate for `server_name`. Never raises: an exception here would reset
        the connection with no alert and no trace, so every failure becomes an alert."""
        try:
            setattr(sslobj, SNI_ATTR, server_name)
            route = self.index.lookup(server_name)
            setattr(sslobj, ROUTE_ATTR, route)
            if route is None or not route.bundles:
                setattr(sslobj, REFUSED_ATTR, "no_cert")
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            sslobj.context = self.cache.get(route, self.default_alpn)
            return None
        except Exception:
            log.exception("sni_callback failed for server name %r", server_name)
            with contextlib.suppress(Exception):
                setattr(sslobj, REFUSED_ATTR, "internal_error")
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR


def build_origin_context(ca_file: os.PathLike[str] | None) -> ssl.SSLContext:
    """Client context for origin_tls: verify the origin against `ca_file` or the system CAs."""
    ctx = ssl.create_default_context(cafile=os.fspath(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
