"""ACME TLS-ALPN-01 (RFC 8737): the challenge certificate and the board of pending challenges.

The CA validates a name by connecting to port 443 with the name as SNI and `acme-tls/1` as the
only ALPN protocol; the server must complete the handshake with ALPN `acme-tls/1` and a
self-signed certificate whose only SAN is the name and which carries the critical
id-pe-acmeIdentifier extension holding SHA-256 of the key authorization. No application data
follows. Clients offering anything else never see that certificate (the pre-read in
edged.proxy decides before the handshake).

`build_challenge_cert` is pure (key, serial and `now` are parameters). The board is written by
ACME worker threads (the solver) and read on the event loop (the pre-read); in a fleet its
entries also go to the store's shared tokens, so any node can answer any node's challenge.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edged.errors import EdgedError
from edged.http01 import SharedTokens
from edged.tls import build_challenge_context

log = logging.getLogger(__name__)

ACME_TLS_ALPN = "acme-tls/1"
ID_PE_ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
CHALLENGE_TTL = 900.0  # an order that takes longer than this has failed anyway
MAX_SHARED_LOOKUPS = 64  # store lookups in flight at once; a CA opens a handful
# Shared entries live beside HTTP-01 tokens; a dot never occurs in a (base64url) token, so
# this id can neither collide with one nor be asked for over HTTP-01.
SHARED_PREFIX = "tls-alpn-01."
_BUILT_LIMIT = 256
MAX_COMMON_NAME = 64  # RFC 5280 ub-common-name


def is_challenge_alpn(alpn: tuple[str, ...]) -> bool:
    """A validation connection offers exactly `acme-tls/1` (RFC 8737 section 3)."""
    return alpn == (ACME_TLS_ALPN,)


def acme_identifier_value(key_authorization: str) -> bytes:
    """The extension value: DER OCTET STRING of SHA-256(key authorization)."""
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    return b"\x04\x20" + digest


def build_challenge_cert(
    name: str,
    key_authorization: str,
    *,
    key: ec.EllipticCurvePrivateKey,
    serial: int,
    now: datetime,
) -> x509.Certificate:
    """The self-signed TLS-ALPN-01 certificate for `name` (a DNS name, no wildcard). Pure."""
    # RFC 8737 needs only the SAN; a CN holds at most 64 characters (RFC 5280) while a DNS
    # name may have 253, so a longer name gets an empty subject and, as RFC 5280 4.2.1.6 asks
    # then, a critical SAN.
    fits = len(name) <= MAX_COMMON_NAME
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)] if fits else [])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=not fits)
        .add_extension(
            x509.UnrecognizedExtension(
                ID_PE_ACME_IDENTIFIER, acme_identifier_value(key_authorization)
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )


def challenge_pem(name: str, key_authorization: str, now: datetime) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a fresh challenge certificate (new P-256 key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    serial = int.from_bytes(secrets.token_bytes(16), "big") >> 1 or 1
    cert = build_challenge_cert(name, key_authorization, key=key, serial=serial, now=now)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def build_challenge(name: str, key_authorization: str, now: datetime) -> ssl.SSLContext:
    """A server context answering the challenge: the certificate and ALPN acme-tls/1 only."""
    cert_pem, key_pem = challenge_pem(name, key_authorization, now)
    return build_challenge_context(cert_pem, key_pem, ACME_TLS_ALPN)


@dataclass(frozen=True)
class PendingAlpn:
    key_authorization: str
    context: ssl.SSLContext
    expires: float  # clock()


class AlpnChallengeBoard:
    """Pending TLS-ALPN-01 challenges by DNS name. Thread-safe: the ACME solver adds and
    removes in worker threads, the data path looks up on the event loop."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] | None = None,
    ) -> None:
        self._pending: dict[str, PendingAlpn] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._wall = wall or _utcnow
        # In a fleet: challenges also go to Redis, so any node answers any node's challenge.
        self.shared: SharedTokens | None = None
        # In a worker process, which has no store connection: asks the main process for the
        # key authorization another node put in the shared store for a name (None: none).
        self.ask: Callable[[str], Awaitable[str | None]] | None = None
        self._built: dict[tuple[str, str], ssl.SSLContext] = {}  # (name, key auth) → context
        # With worker processes: (name, key authorization or None when removed, ttl) goes to
        # every worker, which answer the validations on the https listeners.
        self.on_change: Callable[[str, str | None, float], None] | None = None
        self._inflight = 0  # shared lookups running (on the event loop: no lock needed)

    def add(
        self, name: str, key_authorization: str, ttl: float = CHALLENGE_TTL, *, share: bool = True
    ) -> None:
        """Blocking (builds the certificate; writes to the shared store): call it in a thread.
        `share=False` keeps it on this node (preflight probes)."""
        name = name.lower()
        context = build_challenge(name, key_authorization, self._wall())
        with self._lock:
            self._pending[name] = PendingAlpn(key_authorization, context, self._clock() + ttl)
        if self.on_change is not None:
            self.on_change(name, key_authorization, ttl)
        if share and self.shared is not None:
            self.shared.put_token(SHARED_PREFIX + name, key_authorization, [name], ttl)

    def remove(self, name: str, *, share: bool = True) -> None:
        name = name.lower()
        with self._lock:
            self._pending.pop(name, None)
        if self.on_change is not None:
            self.on_change(name, None, 0.0)
        if share and self.shared is not None:
            try:
                self.shared.delete_token(SHARED_PREFIX + name)
            except EdgedError as exc:  # it expires by itself
                log.warning("shared tls-alpn-01 challenge not removed name=%s error=%s", name, exc)

    def lookup(self, server_name: str) -> ssl.SSLContext | None:
        """The challenge context when `server_name` has a pending challenge on this node."""
        name = server_name.lower().rstrip(".")
        with self._lock:
            entry = self._pending.get(name)
            if entry is not None and entry.expires < self._clock():
                del self._pending[name]
                entry = None
        return entry.context if entry is not None else None

    @property
    def fleet(self) -> bool:
        """Other nodes' challenges can be looked up (`lookup_shared`)."""
        return self.shared is not None or self.ask is not None

    async def shared_key_authorization(self, name: str) -> str | None:
        """The key authorization another node put in the shared store for `name` (lower case,
        no trailing dot); None when there is none or no shared store. Raises EdgedError when
        the store cannot be read."""
        shared = self.shared
        if shared is None:
            return None
        found = await asyncio.to_thread(shared.get_token, SHARED_PREFIX + name)
        if found is None or name not in found[1]:
            return None
        return found[0]

    async def lookup_shared(self, server_name: str) -> ssl.SSLContext | None:
        """Another node's pending challenge for `server_name`, from the shared store (in a
        worker, through the main process). Call it only for configured names.

        Every call asks the store: a name gets a new challenge (new key authorization) for
        each order, e.g. one per key type seconds apart, so a cached answer, or a cached
        absence, could be stale just when the CA connects. The certificate is built once per
        key authorization, and at most MAX_SHARED_LOOKUPS lookups run at once (a flood of
        acme-tls/1 hellos is refused rather than queued on the store)."""
        if not self.fleet or self._inflight >= MAX_SHARED_LOOKUPS:
            return None
        name = server_name.lower().rstrip(".")
        ask = self.ask if self.ask is not None else self.shared_key_authorization
        self._inflight += 1
        try:
            key_authorization = await ask(name)
        except EdgedError as exc:
            log.warning("shared tls-alpn-01 lookup failed name=%s error=%s", name, exc)
            return None
        finally:
            self._inflight -= 1
        if key_authorization is None:
            return None
        key = (name, key_authorization)
        context = self._built.get(key)
        if context is None:
            context = await asyncio.to_thread(
                build_challenge, name, key_authorization, self._wall()
            )
            if len(self._built) >= _BUILT_LIMIT:
                self._built.clear()  # entries exist only for real challenges: rarely reached
            self._built[key] = context
        return context

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


def _utcnow() -> datetime:
    return datetime.now(UTC)
