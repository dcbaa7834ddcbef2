"""Throwaway PKI for tests: CAs, intermediates and leaf certificates made with cryptography.

    ca = make_ca()                                   # self-signed root
    inter = make_intermediate(ca, "Test Intermediate")
    leaf = make_leaf(inter, ["a.example.test", "*.a.example.test"])
    cert_path, key_path = write_pair(tmp_path, "a", leaf, [inter])

Every object has `.cert`, `.key`, `.cert_pem` and `.key_pem` (PKCS#8, unencrypted). Key types:
"ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "rsa-2048", "rsa-1024", "ed25519". RSA keys come from
a small pool (generating them is slow): consecutive calls still get different keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = CertificateIssuerPrivateKeyTypes
KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "rsa-2048", "rsa-1024", "ed25519")

_RSA_POOL_SIZE = 6
_rsa_pool: dict[int, list[rsa.RSAPrivateKey]] = {}
_rsa_next: dict[int, int] = {}


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def subject(self) -> str:
        """The subject as RFC 4514 text, e.g. "CN=Test Root CA"."""
        return self.cert.subject.rfc4514_string()


def new_key(key_type: str = "ecdsa-p256") -> PrivateKey:
    """A private key of `key_type`; RSA keys are handed out round-robin from a small pool."""
    if key_type.startswith("rsa-"):
        return _pooled_rsa(int(key_type.removeprefix("rsa-")))
    curves: dict[str, ec.EllipticCurve] = {
        "ecdsa-p256": ec.SECP256R1(),
        "ecdsa-p384": ec.SECP384R1(),
        "ecdsa-p521": ec.SECP521R1(),
    }
    if key_type in curves:
        return ec.generate_private_key(curves[key_type])
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")


def _pooled_rsa(bits: int) -> rsa.RSAPrivateKey:
    pool = _rsa_pool.setdefault(bits, [])
    index = _rsa_next.get(bits, 0)
    _rsa_next[bits] = (index + 1) % _RSA_POOL_SIZE
    if index == len(pool):
        pool.append(rsa.generate_private_key(public_exponent=65537, key_size=bits))
    return pool[index]


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    # Ed25519 signs without a separate digest; everything else here uses SHA-256.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _name(cn: str | None) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])


def _build(
    subject: x509.Name,
    key: PrivateKey,
    issuer: Issued | None,
    not_before: datetime | None,
    not_after: datetime | None,
) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(hours=1))
        .not_valid_after(not_after or now + timedelta(days=90))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
        builder = builder.add_extension(aki, critical=False)
    return builder


def _ca_extensions(
    builder: x509.CertificateBuilder, path_length: int | None
) -> x509.CertificateBuilder:
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    return builder.add_extension(
        x509.BasicConstraints(ca=True, path_length=path_length), critical=True
    ).add_extension(usage, critical=True)


def make_ca(name: str = "Test Root CA", key_type: str = "ecdsa-p256") -> Issued:
    """A self-signed root CA named CN=`name`, valid from an hour ago for ten years."""
    key = new_key(key_type)
    now = datetime.now(UTC)
    builder = _build(_name(name), key, None, now - timedelta(hours=1), now + timedelta(days=3650))
    cert = _ca_extensions(builder, None).sign(key, _hash_for(key))
    return Issued(cert, key)


def make_intermediate(parent: Issued, name: str, key_type: str = "ecdsa-p256") -> Issued:
    """An intermediate CA named CN=`name` signed by `parent` (a root or another intermediate)."""
    key = new_key(key_type)
    now = datetime.now(UTC)
    builder = _build(_name(name), key, parent, now - timedelta(hours=1), now + timedelta(days=1825))
    cert = _ca_extensions(builder, None).sign(parent.key, _hash_for(parent.key))
    return Issued(cert, key)


def make_leaf(
    issuer: Issued | None,
    names: Sequence[str],
    key_type: str = "ecdsa-p256",
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    cn: str | None = None,
) -> Issued:
    """A TLS server certificate for DNS `names`, signed by `issuer` (None: self-signed).

    Valid from an hour ago for 90 days unless `not_before`/`not_after` say otherwise. The CN
    is `cn`, else the first name; with `names` empty there is no SAN extension at all.
    """
    key = new_key(key_type)
    subject = _name(cn if cn is not None else (names[0] if names else None))
    builder = _build(subject, key, issuer, not_before, not_after)
    if names:
        san = x509.SubjectAlternativeName([x509.DNSName(n) for n in names])
        builder = builder.add_extension(san, critical=False)
    builder = builder.add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True
    ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    signer = issuer.key if issuer is not None else key
    return Issued(builder.sign(signer, _hash_for(signer)), key)


def fullchain(leaf: Issued, *intermediates: Issued) -> bytes:
    """PEM of `leaf` followed by `intermediates`, in the order given."""
    return b"".join(item.cert_pem for item in (leaf, *intermediates))


def _key_of(key: Issued | PrivateKey) -> PrivateKey:
    return key.key if isinstance(key, Issued) else key


def encrypted_key_pem(key: Issued | PrivateKey, password: bytes = b"secret") -> bytes:
    """The key as passphrase-protected PKCS#8 ("-----BEGIN ENCRYPTED PRIVATE KEY-----")."""
    return _key_of(key).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )


def legacy_encrypted_key_pem(key: Issued | PrivateKey, password: bytes = b"secret") -> bytes:
    """The key in the traditional OpenSSL format with a "Proc-Type: 4,ENCRYPTED" header."""
    return _key_of(key).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(password),
    )


def write_pair(
    directory: Path, stem: str, leaf: Issued, chain: Sequence[Issued] = ()
) -> tuple[Path, Path]:
    """Write `<stem>.crt` (leaf then `chain`) and `<stem>.key` (0600) into `directory`."""
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(fullchain(leaf, *chain))
    key_path.touch()
    key_path.chmod(0o600)  # before the key goes in, like a real deployment
    key_path.write_bytes(leaf.key_pem)
    return cert_path, key_path
