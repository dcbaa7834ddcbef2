"""Certificate bundles: parse and check a PEM certificate chain and its private key.

Pure: no file I/O and no clock (`now` is a parameter). Input is treated as hostile: every way it
can fail becomes a `CertError` whose `reason` is a stable code and whose message says the fix;
nothing raised inside cryptography escapes as another exception type.

`parse_bundle` does the structural checks (PEM, key, chain order), `check_bundle` the ones that
depend on the clock and the config (validity window, names, intermediates present).
"""

from __future__ import annotations

import base64
import binascii
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import NameOID

from edged.chains import split_fullchain
from edged.errors import CertError, CertReason
from edged.names import NameError_, covers, normalize_name

MIN_RSA_BITS = 2048
SUPPORTED_KEY_TYPES = "RSA >= 2048, ECDSA P-256, ECDSA P-384"
# Curves every TLS client supports for certificates; P-521 is missing from several (BoringSSL).
_CURVES = {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384"}
_ENCRYPTED_FIX = "remove the passphrase: openssl pkey -in KEY -out KEY.plain"
_CONCAT_HINT = "re-concatenate the certificates in that order (cat leaf.pem intermediate.pem ...)"
# Finding the right order is a path search; a real chain has a handful of certificates, so
# cap the work a hostile file with thousands of look-alike certificates could cause.
_MAX_REORDER_CERTS = 12
_MAX_REORDER_STEPS = 10_000
# Exceptions `verify_directly_issued_by` raises for a certificate that is not the issuer.
_NOT_ISSUER = (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm)

_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,64})-----")
_END = re.compile(rb"-----END ([A-Z0-9 ]{1,64})-----")


@dataclass(frozen=True)
class CertBundle:
    """A certificate chain with its private key: what serving and checking need, as PEM bytes
    and a few fields. The parsed certificates (`leaf`, `chain`) and their rendered names are
    made on first use and then kept: with 100k certificates in the store, holding parsed
    objects for each would cost gigabytes and most are never looked at."""

    names: tuple[str, ...]
    key_type: str
    not_before: datetime
    not_after: datetime
    fingerprint: str
    self_issued: bool
    leaf_pem: bytes  # the fullchain split (edged.chains): leaf_pem + chain_pem is all of it
    chain_pem: bytes  # the intermediates, one object shared by the bundles of the same chain
    key_pem: bytes = field(repr=False)
    # The RFC 9773 (ARI) id, "" when the certificate has none (no Authority Key Identifier):
    # read with the rest, off the event loop, so that planning renewals of 100k certificates
    # needs no parsing (~30 µs and, kept, ~3.5 KiB per certificate).
    ari_id: str = ""

    @property
    def fullchain_pem(self) -> bytes:
        """The certificate chain as served (a new bytes object each time)."""
        return self.leaf_pem + self.chain_pem

    @cached_property
    def leaf(self) -> x509.Certificate:
        """The parsed leaf, kept: for a few bundles looked at closely (an upload, a revoke).
        What every bundle may be asked for (subject, issuer, serial) reads it without
        keeping it (`_leaf_once`)."""
        return x509.load_pem_x509_certificate(self.leaf_pem)

    @cached_property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return tuple(x509.load_pem_x509_certificates(self.fullchain_pem)[1:])

    def _leaf_once(self) -> x509.Certificate:
        """The parsed leaf if it is kept, else parsed for this once: a listing of 100k
        certificates (GET /certs) must not leave a parsed copy of each behind."""
        kept = self.__dict__.get("leaf")
        if isinstance(kept, x509.Certificate):
            return kept
        return x509.load_pem_x509_certificate(self.leaf_pem)

    @cached_property
    def subject(self) -> str:
        return self._leaf_once().subject.rfc4514_string()

    @cached_property
    def issuer(self) -> str:
        # One string per issuer, however many certificates it issued.
        return sys.intern(self._leaf_once().issuer.rfc4514_string())

    @cached_property
    def serial(self) -> str:
        return _serial(self._leaf_once())

    @property
    def has_chain(self) -> bool:
        """Intermediates follow the leaf (counted without parsing them)."""
        return b"-----BEGIN CERTIFICATE-----" in self.chain_pem


@dataclass(frozen=True)
class CertSummary:
    """One certificate of a PEM file as `edged cert inspect` shows it (index 0 is first)."""

    index: int
    subject: str
    issuer: str
    serial: str
    not_before: datetime
    not_after: datetime
    names: tuple[str, ...]
    is_ca: bool
    self_issued: bool
    key_type: str  # a supported key type, or a description such as "rsa-1024 (unsupported: ...)"
    fingerprint: str


@dataclass(frozen=True)
class _Block:
    """One PEM block; `der` is None when it cannot be decoded (`problem` says why)."""

    label: str
    der: bytes | None
    headers: tuple[tuple[str, str], ...] = ()
    problem: str = ""


# --- public API -------------------------------------------------------------------------------


def parse_bundle(
    cert_pem: bytes, key_pem: bytes, *, source: str = "", key_source: str = ""
) -> CertBundle:
    """Parse a PEM chain (leaf first) and its private key; raise CertError for the first problem.

    `key_pem` may be the same bytes as `cert_pem` (a combined file); certificates in the key
    file and keys in the certificate file are ignored.
    """
    key_source = key_source or source
    with _quiet():
        certs = _read_certs(cert_pem, source)
        key = _read_key(key_pem, key_source)
        key_type = _key_type(key.public_key(), key_source, "the private key")
        _check_chain(certs, key, source)
        leaf = certs[0]
        fullchain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
        bundle = _bundle(leaf, key_type, fullchain, _pkcs8(key, key_source), source)
        # Parsed already: keep them (cached_property reads the instance dict first).
        bundle.__dict__.update(leaf=leaf, chain=tuple(certs[1:]))
        return bundle


def stored_bundle(fullchain: bytes, key_pem: bytes, key_type: str, *, source: str) -> CertBundle:
    """A bundle from the store, which holds only what `parse_bundle` accepted when it was
    written (issued, uploaded or synced) and whose files meta.json's digests vouch for: only the
    leaf is read again (names and dates, for `check_bundle`), not the key and the chain (a
    third of a millisecond, 28 ms for RSA keys, times 100k certificates). OpenSSL still
    checks that key and certificate match when a context is built from them."""
    with _quiet():
        blocks = [b for b in _blocks(fullchain, source, "CERTIFICATE") if b.label == "CERTIFICATE"]
        if not blocks:
            raise CertError(CertReason.NO_CERTIFICATE, "no CERTIFICATE block found", source)
        if blocks[0].der is None:
            raise CertError(CertReason.GARBAGE, f"certificate 1 {blocks[0].problem}", source)
        try:  # not _load_cert: rendering subject and issuer is most of the cost, done lazily
            leaf = x509.load_der_x509_certificate(blocks[0].der)
            _ = (leaf.not_valid_before_utc, leaf.not_valid_after_utc)
        except Exception as exc:  # any failure to decode DER is a property of the input
            raise CertError(
                CertReason.GARBAGE,
                f"certificate 1 is not a valid X.509 certificate ({exc})",
                source,
            ) from None
        found = _summary_key_type(leaf)
        if found != key_type:
            raise CertError(
                CertReason.KEY_MISMATCH,
                f"stored as {key_type} but the certificate has a {found} key: store it again",
                source,
            )
        return _bundle(leaf, key_type, fullchain, key_pem, source)


def _bundle(
    leaf: x509.Certificate, key_type: str, fullchain: bytes, key_pem: bytes, source: str
) -> CertBundle:
    leaf_pem, chain_pem = split_fullchain(fullchain)
    return CertBundle(
        names=_dns_names(leaf, 1, source),
        key_type=key_type,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        fingerprint=_fingerprint(leaf),
        self_issued=leaf.subject == leaf.issuer,
        leaf_pem=leaf_pem,
        chain_pem=chain_pem,
        key_pem=key_pem,
        ari_id=_ari_id_or_empty(leaf),
    )


class NoAriId(ValueError):
    """Why a certificate has no RFC 9773 (ARI) id."""


def ari_cert_id(leaf: x509.Certificate) -> str:
    """The RFC 9773 certificate id: base64url(AKI keyIdentifier) "." base64url(DER serial).
    NoAriId says why there is none."""
    try:
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise NoAriId(
            f"the certificate with serial {leaf.serial_number:x} has no Authority Key "
            "Identifier, so it has no ARI id: it is renewed on the lifetime schedule"
        ) from None
    except ValueError as exc:  # a malformed extension elsewhere in the certificate
        raise NoAriId(f"the certificate's extensions cannot be read ({exc})") from None
    if not aki.key_identifier:
        raise NoAriId(
            f"the certificate with serial {leaf.serial_number:x} has an Authority Key "
            "Identifier without keyIdentifier, so it has no ARI id"
        )
    return f"{_b64url(aki.key_identifier)}.{_b64url(_serial_der(leaf.serial_number))}"


def _ari_id_or_empty(leaf: x509.Certificate) -> str:
    try:
        return ari_cert_id(leaf)
    except NoAriId:
        return ""


def _serial_der(serial: int) -> bytes:
    # The content octets of a DER INTEGER: minimal two's complement, so a positive serial whose
    # high bit is set gets a leading 0x00 (RFC 9773 section 4.1).
    magnitude = serial if serial >= 0 else ~serial
    return serial.to_bytes(magnitude.bit_length() // 8 + 1, "big", signed=True)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# A certificate that starts within this long is usable already: this host's clock may lag the
# CA's by that much (an ACME order, an upload and a reload judge alike; CAs backdate anyway).
NOT_BEFORE_SKEW = timedelta(minutes=5)


def check_bundle(
    bundle: CertBundle, *, now: datetime, names: Sequence[str] = (), require_chain: bool = False
) -> list[CertError]:
    """Every clock- and config-dependent problem of a parsed bundle (empty list: usable)."""
    now = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
    problems: list[CertError] = []
    if now + NOT_BEFORE_SKEW < bundle.not_before:
        problems.append(_not_yet_valid(bundle, now))
    if now > bundle.not_after:
        problems.append(_expired(bundle, now))
    for raw in names:
        name = _normalized_or_raw(raw)
        if not any(covers(pattern, name) for pattern in bundle.names):
            problems.append(_not_covered(bundle, name))
    if require_chain and not bundle.self_issued and not bundle.has_chain:
        problems.append(
            CertError(
                CertReason.CHAIN_INCOMPLETE,
                f"the certificate issued by {bundle.issuer or '<empty issuer>'} comes without "
                "intermediates, so clients that do not already have them fail: append the "
                "intermediate certificates of your CA after the leaf",
            )
        )
    return problems


def validate_bundle(
    bundle: CertBundle, *, now: datetime, names: Sequence[str] = (), require_chain: bool = False
) -> None:
    """Raise the first problem `check_bundle` finds."""
    problems = check_bundle(bundle, now=now, names=names, require_chain=require_chain)
    if problems:
        raise problems[0]


def describe_chain(cert_pem: bytes) -> list[CertSummary]:
    """Summaries of every certificate in a PEM file, in file order, without judging the chain.

    Raises CertError only when there is nothing to describe (EMPTY, GARBAGE, NO_CERTIFICATE).
    """
    with _quiet():
        return [_summary(i, cert) for i, cert in enumerate(_read_certs(cert_pem, ""))]


def key_type_of(public_key: PublicKeyTypes) -> str:
    """The key type name edged uses ("ecdsa-p256", "rsa-2048", ...); CertError if unsupported."""
    return _key_type(public_key, "", "the key")


# --- PEM scanning -----------------------------------------------------------------------------


@contextmanager
def _quiet() -> Iterator[None]:
    # cryptography warns (instead of failing) on some malformed input, e.g. a negative serial or
    # an over-long name attribute. Such certificates still work in OpenSSL, and a warning must
    # not turn into another exception type where warnings are errors (tests): silence them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _scan_pem(data: bytes) -> list[_Block]:
    """Every `-----BEGIN X-----` block, in order; linear time on any input."""
    blocks: list[_Block] = []
    pos = 0
    while (begin := _BEGIN.search(data, pos)) is not None:
        label = begin.group(1).decode("ascii")
        end = _END.search(data, begin.end())
        if end is None:
            blocks.append(_Block(label, None, problem="has no -----END line"))
            break
        if end.group(1) != begin.group(1):
            problem = f"ends with -----END {end.group(1).decode('ascii')}----- (truncated?)"
            blocks.append(_Block(label, None, problem=problem))
        else:
            blocks.append(_decode_block(label, data[begin.end() : end.start()]))
        pos = end.end()
    return blocks


def _decode_block(label: str, body: bytes) -> _Block:
    lines = [line.strip() for line in body.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    headers: list[tuple[str, str]] = []
    # RFC 1421 headers ("Proc-Type: 4,ENCRYPTED") precede a blank line; base64 has no ':'.
    if lines and b":" in lines[0]:
        while lines and lines[0]:
            key, _, value = lines.pop(0).partition(b":")
            headers.append((_text(key), _text(value.strip())))
    try:
        der = base64.b64decode(b"".join(lines), validate=True)
    except (binascii.Error, ValueError) as exc:
        return _Block(label, None, tuple(headers), f"has corrupt base64 ({exc})")
    if not der:
        return _Block(label, None, tuple(headers), "is empty")
    return _Block(label, der, tuple(headers))


def _text(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace")


def _blocks(data: bytes, source: str, expected: str) -> list[_Block]:
    """The PEM blocks of a file, or CertError(EMPTY/GARBAGE) when there are none."""
    if not data.strip():
        raise CertError(CertReason.EMPTY, "the file is empty", source)
    blocks = _scan_pem(data)
    if blocks:
        return blocks
    hint = f"expected PEM text starting with -----BEGIN {expected}-----"
    if data[:1] == b"\x30":
        # DER starts with an ASN.1 SEQUENCE; this is the usual mistake, so name the conversion.
        command = "openssl x509" if expected == "CERTIFICATE" else "openssl pkey"
        hint += f"; this looks like binary DER: convert it with {command} -inform der -in FILE"
    raise CertError(CertReason.GARBAGE, f"no PEM block found: {hint}", source)


def _found(blocks: Sequence[_Block]) -> str:
    labels = sorted({b.label for b in blocks})
    return ", ".join(labels)


def _read_certs(data: bytes, source: str) -> list[x509.Certificate]:
    blocks = _blocks(data, source, "CERTIFICATE")
    cert_blocks = [b for b in blocks if b.label == "CERTIFICATE"]
    if not cert_blocks:
        hint = ""
        if any(b.label.endswith("PRIVATE KEY") for b in blocks):
            hint = ": is this the key file given as the certificate?"
        raise CertError(
            CertReason.NO_CERTIFICATE,
            f"no CERTIFICATE block found (found: {_found(blocks)}){hint}",
            source,
        )
    return [_load_cert(block, n, source) for n, block in enumerate(cert_blocks, 1)]


def _load_cert(block: _Block, number: int, source: str) -> x509.Certificate:
    if block.der is None:
        raise CertError(CertReason.GARBAGE, f"certificate {number} {block.problem}", source)
    try:
        cert = x509.load_der_x509_certificate(block.der)
        # Names and dates are decoded lazily; touch them now so a bad one fails here, as GARBAGE.
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
        _ = (cert.not_valid_before_utc, cert.not_valid_after_utc, cert.serial_number)
    except Exception as exc:  # any failure to decode hostile DER is a property of the input
        raise CertError(
            CertReason.GARBAGE,
            f"certificate {number} is not a valid X.509 certificate ({exc})",
            source,
        ) from None
    return cert


def _read_key(data: bytes, source: str) -> PrivateKeyTypes:
    blocks = _blocks(data, source, "PRIVATE KEY")
    keys = [b for b in blocks if b.label.endswith("PRIVATE KEY")]
    if not keys:
        hint = ""
        if any(b.label == "PUBLIC KEY" for b in blocks):
            hint = ": a PUBLIC KEY is not enough, give the private key"
        raise CertError(
            CertReason.NO_KEY,
            f"no private key found (found: {_found(blocks)}){hint or ': give the key file'}",
            source,
        )
    if len(keys) > 1:
        raise CertError(
            CertReason.MULTIPLE_KEYS,
            f"found {len(keys)} private keys: keep only the one that belongs to the certificate",
            source,
        )
    return _load_key(keys[0], source)


def _load_key(block: _Block, source: str) -> PrivateKeyTypes:
    legacy_encrypted = any(
        k.lower() == "proc-type" and "ENCRYPTED" in v.upper() for k, v in block.headers
    )
    if block.label == "ENCRYPTED PRIVATE KEY" or legacy_encrypted:
        raise CertError(
            CertReason.ENCRYPTED_KEY,
            f"the private key is protected by a passphrase, which edged cannot ask for: "
            f"{_ENCRYPTED_FIX}",
            source,
        )
    if block.label == "OPENSSH PRIVATE KEY":
        raise CertError(
            CertReason.UNSUPPORTED_KEY,
            "this is an OpenSSH private key: convert it to PEM with ssh-keygen -p -m PKCS8 -f KEY",
            source,
        )
    if block.der is None:
        raise CertError(CertReason.GARBAGE, f"the private key {block.problem}", source)
    try:
        return serialization.load_pem_private_key(_pem(block.label, block.der), password=None)
    except UnsupportedAlgorithm as exc:
        raise CertError(
            CertReason.UNSUPPORTED_KEY,
            f"the private key's algorithm is not supported ({exc}): use {SUPPORTED_KEY_TYPES}",
            source,
        ) from None
    except Exception as exc:  # any failure to decode hostile DER is a property of the input
        raise CertError(
            CertReason.GARBAGE, f"the private key could not be parsed ({exc})", source
        ) from None


def _pem(label: str, der: bytes) -> bytes:
    # Rebuilt from the decoded bytes, so stray whitespace or headers in the file cannot matter.
    body = base64.encodebytes(der)
    tag = label.encode("ascii")
    return b"-----BEGIN " + tag + b"-----\n" + body + b"-----END " + tag + b"-----\n"


def _pkcs8(key: PrivateKeyTypes, source: str) -> bytes:
    try:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    except Exception as exc:  # only supported key types get here; keep the guarantee anyway
        raise CertError(
            CertReason.UNSUPPORTED_KEY, f"cannot re-encode the key ({exc})", source
        ) from None


# --- keys -------------------------------------------------------------------------------------


def _key_description(public_key: object) -> str:
    """A short name for any key, supported or not, for messages."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"rsa-{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return _CURVES.get(public_key.curve.name, f"ecdsa-{public_key.curve.name}")
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "ed448"
    if isinstance(public_key, dsa.DSAPublicKey):
        return f"dsa-{public_key.key_size}"
    return type(public_key).__name__.removesuffix("PublicKey").lower()


def _key_type(public_key: object, source: str, what: str) -> str:
    description = _key_description(public_key)
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size >= MIN_RSA_BITS:
            return description
        raise CertError(
            CertReason.UNSUPPORTED_KEY,
            f"{what} is a {public_key.key_size}-bit RSA key, too weak for clients: the minimum "
            f"is {MIN_RSA_BITS} bits (supported: {SUPPORTED_KEY_TYPES})",
            source,
        )
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name in _CURVES:
        return description
    # Ed25519/Ed448 certificates are not accepted by browsers, DSA is gone from TLS 1.3.
    raise CertError(
        CertReason.UNSUPPORTED_KEY,
        f"{what} is {description}, which TLS clients do not broadly accept: "
        f"supported types are {SUPPORTED_KEY_TYPES}",
        source,
    )


def _spki(public_key: PublicKeyTypes) -> bytes | None:
    """SubjectPublicKeyInfo DER of a key; None if the key cannot be encoded."""
    try:
        return public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except Exception:  # an exotic or malformed key simply matches nothing
        return None


def _cert_spki(cert: x509.Certificate) -> bytes | None:
    try:
        public_key = cert.public_key()
    except Exception:  # an unparseable certificate key matches no private key
        return None
    return _spki(public_key)


# --- chain ------------------------------------------------------------------------------------


def _label(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "<empty subject>"


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except _NOT_ISSUER:
        return False
    return True


def _check_chain(certs: list[x509.Certificate], key: PrivateKeyTypes, source: str) -> None:
    """KEY_MISMATCH, CHAIN_ORDER or CHAIN_BROKEN, or nothing for a leaf-first linked chain."""
    want = _spki(key.public_key())
    matches = [i for i, cert in enumerate(certs) if want is not None and _cert_spki(cert) == want]
    if not matches:
        raise CertError(
            CertReason.KEY_MISMATCH,
            f"the private key does not belong to the certificate ({_label(certs[0])}): use the "
            "key generated with its CSR (compare the output of openssl x509 -noout -pubkey -in "
            "CERT and openssl pkey -pubout -in KEY)",
            source,
        )
    _check_order(certs, matches[0], source)


def chain_problem(cert_pem: bytes, source: str = "") -> CertError | None:
    """Chain order and linkage of a PEM file without its key (for `edged cert inspect`): the
    leaf is taken to be the first certificate that is not a CA. Raises CertError only for
    unreadable input."""
    certs = _read_certs(cert_pem, source)
    leaf_index = next((i for i, c in enumerate(certs) if not _is_ca(c)), 0)
    try:
        _check_order(certs, leaf_index, source)
    except CertError as exc:
        return exc
    return None


def _check_order(certs: list[x509.Certificate], leaf_index: int, source: str) -> None:
    broken = _first_broken_link(certs)
    if leaf_index == 0 and broken is None:
        return
    order = _find_order(certs, leaf_index)
    if leaf_index != 0:
        raise CertError(CertReason.CHAIN_ORDER, _leaf_not_first(certs, leaf_index, order), source)
    assert broken is not None
    if order is not None:
        message = (
            f"the certificates are out of order: certificate {broken + 1} "
            f"({_label(certs[broken])}) is not followed by its issuer; "
            f"{_order_text(certs, order)}"
        )
        raise CertError(CertReason.CHAIN_ORDER, message, source)
    raise CertError(CertReason.CHAIN_BROKEN, _broken_message(certs, broken), source)


def _first_broken_link(certs: Sequence[x509.Certificate]) -> int | None:
    """Index i of the first certificate not signed by certificate i+1."""
    for i in range(len(certs) - 1):
        if not _issued_by(certs[i], certs[i + 1]):
            return i
    return None


def _find_order(certs: Sequence[x509.Certificate], leaf_index: int) -> list[int] | None:
    """An order using every certificate, starting at the leaf, each signed by the next."""
    count = len(certs)
    if count > _MAX_REORDER_CERTS:
        return None
    issuers = [
        [j for j in range(count) if j != i and _issued_by(certs[i], certs[j])] for i in range(count)
    ]
    steps = 0

    def extend(path: list[int]) -> list[int] | None:
        nonlocal steps
        if len(path) == count:
            return path
        for nxt in issuers[path[-1]]:
            steps += 1
            if steps > _MAX_REORDER_STEPS:
                return None
            if nxt not in path and (found := extend([*path, nxt])) is not None:
                return found
        return None

    return extend([leaf_index])


def _order_text(certs: Sequence[x509.Certificate], order: Sequence[int]) -> str:
    subjects = ", ".join(_label(certs[i]) for i in order)
    return f"correct order: {subjects}: {_CONCAT_HINT}"


def _leaf_not_first(
    certs: Sequence[x509.Certificate], leaf_index: int, order: list[int] | None
) -> str:
    leaf = f"certificate {leaf_index + 1} ({_label(certs[leaf_index])})"
    message = (
        f"the private key belongs to {leaf}, but the leaf certificate must come first: "
        f"{leaf} should come first"
    )
    if order is not None:
        return f"{message}; {_order_text(certs, order)}"
    return f"{message}, followed by the intermediate that signed it, then that one's issuer"


def _broken_message(certs: Sequence[x509.Certificate], i: int) -> str:
    cert, nxt = certs[i], certs[i + 1]
    head = f"certificate {i + 1} ({_label(cert)}) is not signed by certificate {i + 2}"
    issuer = cert.issuer.rfc4514_string() or "<empty issuer>"
    if nxt in certs[: i + 1]:
        return f"{head}: certificate {i + 2} is a duplicate, remove it"
    if cert.issuer == nxt.subject:
        return (
            f"{head} ({_label(nxt)}): the names match but the signature does not verify, so it "
            f"is a different certificate with the same name: get the intermediate that issued "
            f"this certificate from your CA"
        )
    return (
        f"{head}: its issuer is {issuer} but certificate {i + 2}'s subject is {_label(nxt)}: "
        f"replace certificate {i + 2} with the intermediate {issuer} from your CA, or remove it"
    )


# --- certificate fields -----------------------------------------------------------------------


def _dns_names(cert: x509.Certificate, number: int, source: str) -> tuple[str, ...]:
    """Normalised DNS SANs in certificate order; the CN when there is no SAN extension."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        raw: list[str] = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        raw = [a.value for a in common_names if isinstance(a.value, str)][:1]
    except Exception as exc:  # malformed extensions are decoded lazily, here
        raise CertError(
            CertReason.GARBAGE, f"certificate {number} has malformed extensions ({exc})", source
        ) from None
    names: list[str] = []
    for value in raw:
        try:
            name = normalize_name(value)
        except NameError_:
            continue  # not a DNS name (e.g. a CN "My Server"): nothing a client could ask for
        if name not in names:
            names.append(name)
    return tuple(names)


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except Exception:  # absent or malformed: inspect shows it as not a CA
        return False


def _summary_key_type(cert: x509.Certificate) -> str:
    try:
        public_key = cert.public_key()
    except Exception as exc:  # inspect must show the other certificates anyway
        return f"unreadable ({exc})"
    try:
        return _key_type(public_key, "", "the key")
    except CertError as exc:
        return f"{_key_description(public_key)} (unsupported: {exc.message})"


def _summary(index: int, cert: x509.Certificate) -> CertSummary:
    try:
        names = _dns_names(cert, index + 1, "")
    except CertError:
        names = ()
    return CertSummary(
        index=index,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=_serial(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        names=names,
        is_ca=_is_ca(cert),
        self_issued=cert.subject == cert.issuer,
        key_type=_summary_key_type(cert),
        fingerprint=_fingerprint(cert),
    )


# --- time and names ---------------------------------------------------------------------------


def _when(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def _span(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{int(seconds // 86400)} days"
    if seconds >= 2 * 3600:
        return f"{int(seconds // 3600)} hours"
    if seconds >= 120:
        return f"{int(seconds // 60)} minutes"
    return f"{int(seconds)} seconds"


def _not_yet_valid(bundle: CertBundle, now: datetime) -> CertError:
    wait = _span((bundle.not_before - now).total_seconds())
    return CertError(
        CertReason.NOT_YET_VALID,
        f"the certificate is not valid yet: it becomes valid at {_when(bundle.not_before)} (in "
        f"{wait}); if it should be valid already, check the host clock (timedatectl)",
    )


def _expired(bundle: CertBundle, now: datetime) -> CertError:
    ago = _span((now - bundle.not_after).total_seconds())
    return CertError(
        CertReason.EXPIRED,
        f"the certificate expired at {_when(bundle.not_after)} ({ago} ago): renew it",
    )


def _normalized_or_raw(raw: str) -> str:
    try:
        return normalize_name(raw)
    except NameError_:
        return raw.strip().lower()  # covered by nothing; the message still names it


def _not_covered(bundle: CertBundle, name: str) -> CertError:
    have = ", ".join(bundle.names) or "none"
    message = f"the certificate does not cover {name} (its names: {have})"
    for pattern in bundle.names:
        if not pattern.startswith("*."):
            continue
        parent = pattern[2:]
        if name == parent:
            message += (
                f"; {pattern} does not cover {name} itself: a wildcard covers exactly one label "
                f"in front of {parent}, add {name} to the certificate"
            )
            break
        if name.endswith("." + parent):
            message += (
                f"; {pattern} does not cover {name}: a wildcard covers exactly one label, add "
                f"{name} to the certificate"
            )
            break
    else:
        message += f": get a certificate that includes {name}, or remove it from the site"
    return CertError(CertReason.NAME_NOT_COVERED, message)
