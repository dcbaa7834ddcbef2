"""SSLContexts: the listening context, per-certificate contexts in a bounded LRU, the choice of
certificate per connection (from the parsed ClientHello, or in the sni_callback).

Contexts are built lazily from PEM bytes (one costs ~1 ms and ~24 KiB; PEM bytes cost almost
nothing), so startup with many names stays fast and memory stays bounded. `load_cert_chain` only
takes paths: the PEM goes through a memfd, never through a file other users could read.

Choosing the certificate: the data path parses the whole ClientHello before the handshake, so
`SniSelector.choose` sets the connection's context from it (the route of the SNI and, for names
with an ECDSA and an RSA certificate, the key type the client can use: `pick_bundle`) before
OpenSSL sees a byte. OpenSSL still calls the listening context's sni_callback during the
handshake (it is the session context's callback, whichever context the connection has by then;
measured); the callback sees that the choice was made and leaves it. It chooses itself only
when the pre-read did not (no route: it refuses with the alert as before).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import ssl
from collections import OrderedDict
from collections.abc import Sequence

from edged.clienthello import ClientHello, PeekedHello, complete
from edged.config import TlsSettings
from edged.logs import Throttled
from edged.sni import Route, Servable, SniIndex

log = logging.getLogger("edged.tls")

# Attributes the sni_callback leaves on the connection's SSLObject: on the server side the SNI
# is only visible inside the callback, and the connection needs it afterwards for routing.
ROUTE_ATTR = "edged_route"
SNI_ATTR = "edged_sni"
REFUSED_ATTR = "edged_refused"
CHOSEN_ATTR = "edged_chosen"  # set when the context was chosen before the handshake

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


def build_challenge_context(cert_pem: bytes, key_pem: bytes, alpn: str) -> ssl.SSLContext:
    """A context that only completes a validation handshake (TLS-ALPN-01): one certificate,
    one ALPN protocol, no session tickets. TLS 1.2 is its floor whatever tls.min_version says:
    the CA's validator decides, and nothing but the certificate is ever sent."""
    ctx = server_context("1.2")
    ctx.num_tickets = 0
    _load_pem(ctx, cert_pem, key_pem)
    ctx.set_alpn_protocols([alpn])
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


TRANSIENT_LOG_INTERVAL = 10.0  # seconds between reports of contexts not built for an OS error


class UnservableCert(Exception):
    """A certificate's context cannot be had: OpenSSL would not load the certificate and key,
    or (for this handshake only) the OS refused a resource. The message says which site,
    why and what to do."""


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
        # Certificates OpenSSL refused to load (e.g. a key that does not match, in a store
        # entry loaded light): refused at once afterwards, reported once.
        self._failed: OrderedDict[tuple[tuple[str, ...], tuple[str, ...]], str] = OrderedDict()
        # Contexts not built for a passing reason (an OS error) are not remembered, only
        # their reports throttled.
        self._transient_log = Throttled(log, TRANSIENT_LOG_INTERVAL)

    def __len__(self) -> int:
        return len(self._contexts)

    def get(
        self,
        route: Route,
        default_alpn: Sequence[str],
        bundles: Sequence[Servable] | None = None,
    ) -> ssl.SSLContext:
        """The context serving `bundles` (default: all of the route's) with the route's ALPN."""
        chosen = tuple(route.bundles if bundles is None else bundles)
        alpn = tuple(route.site.alpn if route.site.alpn is not None else default_alpn)
        key = (tuple(b.fingerprint for b in chosen), alpn)
        ctx = self._contexts.get(key)
        if ctx is not None:
            self.hits += 1
            self._contexts.move_to_end(key)
            return ctx
        failed = self._failed.get(key)
        if failed is not None:
            raise UnservableCert(failed)
        self.misses += 1
        try:
            ctx = build_cert_context(chosen, alpn, self.min_version)
        except ssl.SSLError as exc:  # OpenSSL refused the certificate: it will again
            message = (
                f"{route.site.key} ({route.site.name}): the certificate cannot be served: "
                f"OpenSSL refused it ({exc}); handshakes for its names are refused: replace it "
                "(edged upload, or a new order: edged renew)"
            )
            log.error("%s", message)
            self._failed[key] = message
            if len(self._failed) > self.capacity:
                self._failed.popitem(last=False)
            raise UnservableCert(message) from None
        except OSError as exc:  # e.g. EMFILE from memfd_create: the next handshake tries again
            raise UnservableCert(self._transient(route, exc)) from None
        self._contexts[key] = ctx
        if len(self._contexts) > self.capacity:
            self._contexts.popitem(last=False)
        return ctx

    def _transient(self, route: Route, exc: OSError) -> str:
        """Report a context that could not be built for a passing reason (the certificate is
        not at fault), at most once per TRANSIENT_LOG_INTERVAL: under fd exhaustion every
        handshake fails this way, and one line per handshake would flood the log."""
        fix = (
            "raise the file descriptor limit (LimitNOFILE) or find what holds them"
            if exc.errno in (errno.EMFILE, errno.ENFILE)
            else "see the OS error"
        )
        message = (
            f"{route.site.key} ({route.site.name}): this handshake is refused: the "
            f"certificate's context could not be built ({exc}); the next handshake tries "
            f"again: if it repeats, {fix}"
        )
        self._transient_log.log(logging.ERROR, "context_os_error", "%s", message)
        return message

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
            if getattr(sslobj, CHOSEN_ATTR, False):
                return None  # chosen from the ClientHello before the handshake: keep it
            setattr(sslobj, SNI_ATTR, server_name)
            route = self.index.lookup(server_name)
            setattr(sslobj, ROUTE_ATTR, route)
            if route is None or not route.bundles:
                setattr(sslobj, REFUSED_ATTR, "no_cert")
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            sslobj.context = self.cache.get(route, self.default_alpn)
            return None
        except Exception as exc:
            if not isinstance(exc, UnservableCert):  # that one was reported when it was found
                log.exception("sni_callback failed for server name %r", server_name)
            with contextlib.suppress(Exception):
                setattr(sslobj, REFUSED_ATTR, "internal_error")
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR

    def choose(self, sslobj: ssl.SSLObject, hello: PeekedHello, route: Route | None) -> bool:
        """Before the handshake: give `sslobj` the context for `route` (the SNI's, looked up
        by the caller), with the certificate of the key type `hello` can use. False (nothing
        set) when there is nothing to serve; the sni_callback then refuses as always. Raises
        ClientHelloError when a name with several certificates needs the hello's lists and
        one of them is malformed."""
        if route is None or not route.bundles:
            return False
        bundles = route.bundles
        if len(bundles) == 1:  # the common case: no lists to read
            ctx = self.cache.get(route, self.default_alpn)
        else:
            chosen = pick_bundle(bundles, complete(hello))
            ctx = self.cache.get(
                route, self.default_alpn, (chosen,) if chosen is not None else None
            )
        sslobj.context = ctx
        setattr(sslobj, SNI_ATTR, hello.server_name)
        setattr(sslobj, ROUTE_ATTR, route)
        setattr(sslobj, CHOSEN_ATTR, True)
        return True


# --- which certificate a client can use ------------------------------------------------------

TLS13 = 0x0304
# TLS 1.3 binds the curve to the signature scheme; RSA keys sign with RSA-PSS (rsae) only.
_TLS13_SCHEMES = {
    "ecdsa-p256": frozenset({0x0403}),
    "ecdsa-p384": frozenset({0x0503}),
    "rsa": frozenset({0x0804, 0x0805, 0x0806}),
}
# TLS 1.2: any hash with the key's algorithm (SHA-1 and SHA-224 are below OpenSSL's floor).
_TLS12_SCHEMES = {
    "ecdsa": frozenset({0x0403, 0x0503, 0x0603}),
    "rsa": frozenset({0x0401, 0x0501, 0x0601, 0x0804, 0x0805, 0x0806}),
}
_CURVE_GROUPS = {"ecdsa-p256": 23, "ecdsa-p384": 24}  # secp256r1, secp384r1


def _tls12_suites(auth: str) -> frozenset[int]:
    """The TLS 1.2 cipher suites edged's contexts enable for an authentication type (ECDHE
    only: Python sets no DH parameters, so DHE suites cannot be chosen)."""
    return frozenset(
        c["id"] & 0xFFFF
        for c in server_context("1.2").get_ciphers()
        if c["protocol"] == "TLSv1.2" and c["auth"] == auth and c["kea"] == "kx-ecdhe"
    )


_TLS12_SUITES = {"ecdsa": _tls12_suites("auth-ecdsa"), "rsa": _tls12_suites("auth-rsa")}


def client_can_use(key_type: str, hello: ClientHello) -> bool:
    """Whether the client of `hello` can verify a certificate with a key of `key_type`
    (ecdsa-p256, ecdsa-p384, rsa-N) in the version edged will negotiate with it. Pure."""
    algorithm = "rsa" if key_type.startswith("rsa") else "ecdsa"
    sigalgs = set(hello.signature_algorithms)
    if TLS13 in hello.supported_versions:
        schemes = _TLS13_SCHEMES.get(key_type if algorithm == "ecdsa" else "rsa", frozenset())
        return bool(sigalgs & schemes)
    if not set(hello.cipher_suites) & _TLS12_SUITES[algorithm]:
        return False
    # Without the extension a TLS 1.2 client accepts the suite's algorithm (RFC 5246 7.4.1.4.1).
    if sigalgs and not sigalgs & _TLS12_SCHEMES[algorithm]:
        return False
    group = _CURVE_GROUPS.get(key_type)
    return group is None or not hello.supported_groups or group in hello.supported_groups


def pick_bundle(bundles: Sequence[Servable], hello: ClientHello) -> Servable | None:
    """The certificate to serve the client of `hello`: the only one, else ECDSA when the
    client can use it (smaller, faster), else RSA; None when the client seems to accept none
    of them (then all are offered and OpenSSL decides, as without the pre-read). Pure."""
    if len(bundles) == 1:
        return bundles[0]
    ranked = sorted(bundles, key=lambda b: (b.key_type.startswith("rsa"), b.key_type))
    for bundle in ranked:
        if client_can_use(bundle.key_type, hello):
            return bundle
    return None


def build_origin_context(ca_file: os.PathLike[str] | None) -> ssl.SSLContext:
    """Client context for origin_tls: verify the origin against `ca_file` or the system CAs."""
    ctx = ssl.create_default_context(cafile=os.fspath(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
