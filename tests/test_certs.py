"""edged.certs: every rejection reason from a real bad input, the good cases, and fuzzing."""

from __future__ import annotations

import base64
import functools
import hashlib
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edged.certs import (
    CertBundle,
    check_bundle,
    describe_chain,
    key_type_of,
    parse_bundle,
    validate_bundle,
)
from edged.errors import CertError, CertReason
from tests.pki import (
    Issued,
    encrypted_key_pem,
    fullchain,
    legacy_encrypted_key_pem,
    make_ca,
    make_intermediate,
    make_leaf,
    new_key,
)

NOW = datetime.now(UTC)
SUPPORTED = "RSA >= 2048, ECDSA P-256, ECDSA P-384"


@functools.cache
def pki() -> tuple[Issued, Issued, Issued]:
    """Root, intermediate, and a leaf for a.example.test signed by the intermediate."""
    ca = make_ca("Test Root CA")
    inter = make_intermediate(ca, "Test Intermediate")
    leaf = make_leaf(inter, ["a.example.test", "*.a.example.test"])
    return ca, inter, leaf


def rejected(cert_pem: bytes, key_pem: bytes, reason: CertReason, **kw: str) -> CertError:
    with pytest.raises(CertError) as info:
        parse_bundle(cert_pem, key_pem, **kw)
    assert info.value.reason == reason, info.value.message
    return info.value


def pem_of(label: bytes, der: bytes) -> bytes:
    return b"-----BEGIN %s-----\n%s-----END %s-----\n" % (label, base64.encodebytes(der), label)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


# --- accepted bundles -------------------------------------------------------------------------


def test_ecdsa_p256_bundle_fields() -> None:
    _, inter, leaf = pki()
    bundle = parse_bundle(fullchain(leaf, inter), leaf.key_pem, source="a.crt")
    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    assert bundle.names == ("a.example.test", "*.a.example.test")
    assert bundle.key_type == "ecdsa-p256"
    assert bundle.fingerprint == hashlib.sha256(der).hexdigest()
    assert bundle.serial == format(leaf.cert.serial_number, "x")
    assert bundle.subject == "CN=a.example.test"
    assert bundle.issuer == "CN=Test Intermediate"
    assert not bundle.self_issued
    assert bundle.not_before.tzinfo is not None and bundle.not_before < NOW < bundle.not_after
    assert bundle.fullchain_pem == leaf.cert_pem + inter.cert_pem
    assert bundle.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert bundle.leaf == leaf.cert and bundle.chain == (inter.cert,)
    assert check_bundle(bundle, now=NOW, names=["a.example.test"], require_chain=True) == []
    assert "key_pem" not in repr(bundle)


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ecdsa-p384", "rsa-2048"])
def test_supported_key_types(key_type: str) -> None:
    ca = make_ca("Root " + key_type, key_type=key_type)
    leaf = make_leaf(ca, ["k.example.test"], key_type=key_type)
    bundle = parse_bundle(leaf.cert_pem, leaf.key_pem)
    assert bundle.key_type == key_type
    assert key_type_of(leaf.key.public_key()) == key_type


def test_chain_of_two_intermediates_and_trailing_root() -> None:
    ca = make_ca()
    a = make_intermediate(ca, "Intermediate A")
    b = make_intermediate(a, "Intermediate B")
    leaf = make_leaf(b, ["deep.example.test"])
    bundle = parse_bundle(fullchain(leaf, b, a, ca), leaf.key_pem)
    assert [c.subject.rfc4514_string() for c in bundle.chain] == [
        "CN=Intermediate B",
        "CN=Intermediate A",
        "CN=Test Root CA",
    ]


def test_fullchain_is_normalised() -> None:
    """Comments, CRLF line ends and indentation are dropped; only the certificates remain."""
    _, inter, leaf = pki()
    messy = (
        b"subject=CN = a.example.test\r\n"
        + leaf.cert_pem.replace(b"\n", b"\r\n")
        + b"\n\n# the intermediate\n"
        + inter.cert_pem.replace(b"\n", b"\n  ")
    )
    assert parse_bundle(messy, leaf.key_pem).fullchain_pem == fullchain(leaf, inter)


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa-2048"])
def test_traditional_key_formats_become_pkcs8(key_type: str) -> None:
    _, inter, _ = pki()
    leaf = make_leaf(inter, ["t.example.test"], key_type=key_type)
    traditional = leaf.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert b"BEGIN RSA PRIVATE KEY" in traditional or b"BEGIN EC PRIVATE KEY" in traditional
    bundle = parse_bundle(fullchain(leaf, inter), traditional)
    assert bundle.key_pem == leaf.key_pem


def test_combined_cert_and_key_file() -> None:
    _, inter, leaf = pki()
    combined = leaf.key_pem + fullchain(leaf, inter)
    bundle = parse_bundle(combined, combined, source="combined.pem")
    assert bundle.fullchain_pem == fullchain(leaf, inter)
    assert bundle.key_pem == leaf.key_pem


def test_key_file_may_hold_certificates_too() -> None:
    _, inter, leaf = pki()
    bundle = parse_bundle(fullchain(leaf, inter), inter.cert_pem + leaf.key_pem)
    assert bundle.key_pem == leaf.key_pem


def test_openssl_self_signed_with_ec_parameters_block(tmp_path: Path) -> None:
    """`openssl ecparam -genkey` writes an EC PARAMETERS block before the key: ignored."""
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-out", "key.pem", cwd=tmp_path)
    openssl(
        "req", "-x509", "-key", "key.pem", "-out", "cert.pem", "-days", "30",
        "-subj", "/CN=self.example.test", "-addext", "subjectAltName=DNS:self.example.test",
        cwd=tmp_path,
    )  # fmt: skip
    key_pem = (tmp_path / "key.pem").read_bytes()
    assert b"EC PARAMETERS" in key_pem
    bundle = parse_bundle((tmp_path / "cert.pem").read_bytes(), key_pem)
    assert bundle.self_issued and bundle.names == ("self.example.test",)
    assert bundle.key_type == "ecdsa-p256"
    # A self-signed certificate has no intermediates to append.
    now = datetime.now(UTC) + timedelta(seconds=5)  # openssl starts validity at this second
    assert check_bundle(bundle, now=now, names=["self.example.test"], require_chain=True) == []


def test_cn_is_the_name_without_san() -> None:
    _, inter, _ = pki()
    leaf = make_leaf(inter, [], cn="Legacy.Example.Test.")
    assert parse_bundle(fullchain(leaf, inter), leaf.key_pem).names == ("legacy.example.test",)
    not_dns = make_leaf(inter, [], cn="My Test Server")
    assert parse_bundle(fullchain(not_dns, inter), not_dns.key_pem).names == ()


def test_wildcard_covers_exactly_one_label() -> None:
    _, inter, _ = pki()
    leaf = make_leaf(inter, ["*.a.com"])
    bundle = parse_bundle(fullchain(leaf, inter), leaf.key_pem)
    assert check_bundle(bundle, now=NOW, names=["x.a.com", "X.A.COM."]) == []
    bare, deep = check_bundle(bundle, now=NOW, names=["a.com", "x.y.a.com"])
    assert bare.reason == deep.reason == CertReason.NAME_NOT_COVERED
    assert "a.com" in bare.message and "*.a.com" in bare.message
    assert "x.y.a.com" in deep.message
    assert "a wildcard covers exactly one label" in deep.message


# --- structural rejections (parse_bundle) -----------------------------------------------------


@pytest.mark.parametrize("empty", [b"", b"  \n\t\r\n"])
def test_empty(empty: bytes) -> None:
    _, _, leaf = pki()
    err = rejected(empty, leaf.key_pem, CertReason.EMPTY, source="a.crt")
    assert err.source == "a.crt" and "empty" in err.message
    err = rejected(leaf.cert_pem, empty, CertReason.EMPTY, source="a.crt", key_source="a.key")
    assert err.source == "a.key"


def test_garbage_text_and_der() -> None:
    _, _, leaf = pki()
    err = rejected(b"hello, I am not a certificate\n", leaf.key_pem, CertReason.GARBAGE)
    assert "-----BEGIN CERTIFICATE-----" in err.message
    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    err = rejected(der, leaf.key_pem, CertReason.GARBAGE)
    assert "DER" in err.message and "openssl x509 -inform der" in err.message


def test_garbage_corrupt_base64_and_truncation() -> None:
    _, inter, leaf = pki()
    corrupt = leaf.cert_pem.replace(leaf.cert_pem[40:44], b"!@#$")
    err = rejected(corrupt, leaf.key_pem, CertReason.GARBAGE)
    assert "certificate 1" in err.message and "base64" in err.message
    truncated = fullchain(leaf, inter)[:-40]
    err = rejected(truncated, leaf.key_pem, CertReason.GARBAGE)
    assert "certificate 2" in err.message and "END" in err.message


def test_garbage_der_that_is_not_a_certificate() -> None:
    _, _, leaf = pki()
    fake = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(b"\x30\x03\x02\x01\x05" * 8)
    fake += b"-----END CERTIFICATE-----\n"
    err = rejected(fake, leaf.key_pem, CertReason.GARBAGE)
    assert "not a valid X.509 certificate" in err.message
    bad_key = b"-----BEGIN PRIVATE KEY-----\nMAMCAQU=\n-----END PRIVATE KEY-----\n"
    err = rejected(leaf.cert_pem, bad_key, CertReason.GARBAGE)
    assert "private key could not be parsed" in err.message


def test_no_certificate_key_given_as_cert() -> None:
    _, _, leaf = pki()
    err = rejected(leaf.key_pem, leaf.key_pem, CertReason.NO_CERTIFICATE)
    assert "key file given as the certificate" in err.message


def test_no_key() -> None:
    _, inter, leaf = pki()
    err = rejected(leaf.cert_pem, fullchain(leaf, inter), CertReason.NO_KEY)
    assert "found: CERTIFICATE" in err.message
    public = leaf.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    err = rejected(leaf.cert_pem, public, CertReason.NO_KEY)
    assert "PUBLIC KEY is not enough" in err.message


def test_multiple_keys() -> None:
    _, inter, leaf = pki()
    other = make_leaf(inter, ["b.example.test"])
    err = rejected(leaf.cert_pem, leaf.key_pem + other.key_pem, CertReason.MULTIPLE_KEYS)
    assert "found 2 private keys" in err.message


FIX = "remove the passphrase: openssl pkey -in KEY -out KEY.plain"


def test_encrypted_pkcs8_key() -> None:
    _, _, leaf = pki()
    encrypted = encrypted_key_pem(leaf, b"hunter2")
    assert b"ENCRYPTED PRIVATE KEY" in encrypted
    assert FIX in rejected(leaf.cert_pem, encrypted, CertReason.ENCRYPTED_KEY).message


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa-2048"])
def test_legacy_encrypted_key(key_type: str) -> None:
    ca = make_ca()
    leaf = make_leaf(ca, ["l.example.test"], key_type=key_type)
    legacy = legacy_encrypted_key_pem(leaf)
    assert b"Proc-Type: 4,ENCRYPTED" in legacy
    assert FIX in rejected(leaf.cert_pem, legacy, CertReason.ENCRYPTED_KEY).message


def test_openssl_genpkey_aes256_key(tmp_path: Path) -> None:
    openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-aes256",
        "-pass", "pass:hunter2", "-out", "key.pem",
        cwd=tmp_path,
    )  # fmt: skip
    openssl(
        "req", "-x509", "-key", "key.pem", "-passin", "pass:hunter2", "-out", "cert.pem",
        "-subj", "/CN=enc.example.test", "-days", "1",
        cwd=tmp_path,
    )  # fmt: skip
    err = rejected(
        (tmp_path / "cert.pem").read_bytes(),
        (tmp_path / "key.pem").read_bytes(),
        CertReason.ENCRYPTED_KEY,
        key_source="key.pem",
    )
    assert FIX in err.message and err.source == "key.pem"
    # The fix given in the message works, and then the pair is accepted.
    openssl("pkey", "-in", "key.pem", "-passin", "pass:hunter2", "-out", "plain.pem", cwd=tmp_path)
    parse_bundle((tmp_path / "cert.pem").read_bytes(), (tmp_path / "plain.pem").read_bytes())


def test_rsa_1024_is_too_small() -> None:
    ca = make_ca()
    leaf = make_leaf(ca, ["weak.example.test"], key_type="rsa-1024")
    err = rejected(leaf.cert_pem, leaf.key_pem, CertReason.UNSUPPORTED_KEY)
    assert "1024" in err.message and "minimum is 2048" in err.message


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa-p521"])
def test_unsupported_key_types(key_type: str) -> None:
    ca = make_ca()
    leaf = make_leaf(ca, ["odd.example.test"], key_type=key_type)
    err = rejected(leaf.cert_pem, leaf.key_pem, CertReason.UNSUPPORTED_KEY)
    assert SUPPORTED in err.message
    with pytest.raises(CertError) as info:
        key_type_of(leaf.key.public_key())
    assert info.value.reason == CertReason.UNSUPPORTED_KEY


def test_key_mismatch() -> None:
    _, inter, leaf = pki()
    other = make_leaf(inter, ["a.example.test"])
    err = rejected(fullchain(leaf, inter), other.key_pem, CertReason.KEY_MISMATCH)
    assert "does not belong" in err.message and "CN=a.example.test" in err.message
    # The same check with RSA keys from the pool: two leaves must get different keys.
    one = make_leaf(inter, ["r.example.test"], key_type="rsa-2048")
    two = make_leaf(inter, ["r.example.test"], key_type="rsa-2048")
    rejected(one.cert_pem, two.key_pem, CertReason.KEY_MISMATCH)


def test_chain_order_leaf_not_first() -> None:
    ca = make_ca()
    a = make_intermediate(ca, "Intermediate A")
    b = make_intermediate(a, "Intermediate B")
    leaf = make_leaf(b, ["leaf.example.test"], cn="leaf")
    err = rejected(fullchain(b, leaf, a), leaf.key_pem, CertReason.CHAIN_ORDER)
    assert "the leaf certificate must come first" in err.message
    assert "certificate 2 (CN=leaf) should come first" in err.message
    assert "correct order: CN=leaf, CN=Intermediate B, CN=Intermediate A" in err.message
    assert "re-concatenate" in err.message


def test_chain_order_intermediates_swapped() -> None:
    ca = make_ca()
    a = make_intermediate(ca, "Intermediate A")
    b = make_intermediate(a, "Intermediate B")
    leaf = make_leaf(b, ["leaf.example.test"], cn="leaf")
    err = rejected(fullchain(leaf, a, b, ca), leaf.key_pem, CertReason.CHAIN_ORDER)
    assert (
        "correct order: CN=leaf, CN=Intermediate B, CN=Intermediate A, CN=Test Root CA"
        in err.message
    )


def test_chain_broken_missing_intermediate() -> None:
    ca = make_ca()
    a = make_intermediate(ca, "Intermediate A")
    b = make_intermediate(a, "Intermediate B")
    leaf = make_leaf(b, ["leaf.example.test"], cn="leaf")
    err = rejected(fullchain(leaf, a), leaf.key_pem, CertReason.CHAIN_BROKEN)
    assert "certificate 1 (CN=leaf) is not signed by certificate 2" in err.message
    assert "its issuer is CN=Intermediate B" in err.message
    assert "subject is CN=Intermediate A" in err.message


def test_chain_broken_same_name_other_ca() -> None:
    """An intermediate of the same name from another CA (a re-issued CA): names match."""
    leaf = make_leaf(make_intermediate(make_ca(), "Shared Name"), ["s.example.test"])
    impostor = make_intermediate(make_ca("Other Root"), "Shared Name")
    err = rejected(fullchain(leaf, impostor), leaf.key_pem, CertReason.CHAIN_BROKEN)
    assert "signature does not verify" in err.message


def test_chain_broken_duplicate() -> None:
    _, inter, leaf = pki()
    err = rejected(fullchain(leaf, inter, inter), leaf.key_pem, CertReason.CHAIN_BROKEN)
    assert "certificate 3 is a duplicate" in err.message


# --- clock and config dependent checks (check_bundle) -----------------------------------------


def bundle_of(leaf: Issued, *chain: Issued) -> CertBundle:
    return parse_bundle(fullchain(leaf, *chain), leaf.key_pem)


def test_chain_incomplete() -> None:
    _, inter, leaf = pki()
    bundle = bundle_of(leaf)
    assert check_bundle(bundle, now=NOW) == []
    (err,) = check_bundle(bundle, now=NOW, require_chain=True)
    assert err.reason == CertReason.CHAIN_INCOMPLETE
    assert "append the intermediate certificates of your CA after the leaf" in err.message
    assert check_bundle(bundle_of(leaf, inter), now=NOW, require_chain=True) == []


def test_not_yet_valid() -> None:
    _, inter, _ = pki()
    start = datetime(2031, 5, 4, 12, 0, tzinfo=UTC)
    leaf = make_leaf(inter, ["f.example.test"], not_before=start, not_after=start + timedelta(90))
    (err,) = check_bundle(bundle_of(leaf, inter), now=start - timedelta(hours=3))
    assert err.reason == CertReason.NOT_YET_VALID
    assert "2031-05-04 12:00:00 UTC" in err.message and "in 3 hours" in err.message
    assert "clock" in err.message
    assert check_bundle(bundle_of(leaf, inter), now=start) == []
    # Starting within NOT_BEFORE_SKEW (5 min) it is usable already: this host's clock may lag
    # the CA's; an order, an upload and a reload judge it alike (a reload refused what the
    # order had accepted).
    assert check_bundle(bundle_of(leaf, inter), now=start - timedelta(minutes=4)) == []
    (err,) = check_bundle(bundle_of(leaf, inter), now=start - timedelta(minutes=6))
    assert err.reason == CertReason.NOT_YET_VALID


def test_expired() -> None:
    _, inter, _ = pki()
    end = datetime(2024, 2, 1, tzinfo=UTC)
    leaf = make_leaf(inter, ["e.example.test"], not_before=end - timedelta(90), not_after=end)
    bundle = bundle_of(leaf, inter)
    (err,) = check_bundle(bundle, now=end + timedelta(days=10))
    assert err.reason == CertReason.EXPIRED
    assert "expired at 2024-02-01 00:00:00 UTC" in err.message and "10 days ago" in err.message
    with pytest.raises(CertError) as info:
        validate_bundle(bundle, now=end + timedelta(seconds=1))
    assert info.value.reason == CertReason.EXPIRED
    validate_bundle(bundle, now=end)


def test_name_not_covered_and_all_problems_at_once() -> None:
    _, inter, _ = pki()
    end = datetime(2024, 2, 1, tzinfo=UTC)
    leaf = make_leaf(inter, ["one.example.test"], not_after=end, not_before=end - timedelta(9))
    errors = check_bundle(
        bundle_of(leaf),
        now=end + timedelta(days=1),
        names=["one.example.test", "two.example.test"],
        require_chain=True,
    )
    assert [e.reason for e in errors] == [
        CertReason.EXPIRED,
        CertReason.NAME_NOT_COVERED,
        CertReason.CHAIN_INCOMPLETE,
    ]
    assert "two.example.test" in errors[1].message and "one.example.test" in errors[1].message


# --- describe_chain ---------------------------------------------------------------------------


def test_describe_chain_is_tolerant() -> None:
    """Order problems and unsupported keys are shown, not raised."""
    ca, inter, _ = pki()
    weak = make_leaf(inter, ["weak.example.test"], key_type="rsa-1024")
    summaries = describe_chain(fullchain(inter, weak, ca))
    assert [s.subject for s in summaries] == [
        "CN=Test Intermediate",
        "CN=weak.example.test",
        "CN=Test Root CA",
    ]
    assert [s.index for s in summaries] == [0, 1, 2]
    assert [s.is_ca for s in summaries] == [True, False, True]
    assert [s.self_issued for s in summaries] == [False, False, True]
    assert summaries[1].names == ("weak.example.test",)
    assert summaries[1].key_type.startswith("rsa-1024 (unsupported")
    assert summaries[0].key_type == "ecdsa-p256"
    der = weak.cert.public_bytes(serialization.Encoding.DER)
    assert summaries[1].fingerprint == hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", CertReason.EMPTY),
        (b"junk", CertReason.GARBAGE),
        (pem_of(b"PRIVATE KEY", b"0\x00"), CertReason.NO_CERTIFICATE),
    ],
)
def test_describe_chain_rejects_only_unreadable_files(data: bytes, reason: CertReason) -> None:
    with pytest.raises(CertError) as info:
        describe_chain(data)
    assert info.value.reason == reason


# --- fuzzing: hostile input gives a result or a CertError, never another exception -----------


@functools.cache
def sample() -> tuple[bytes, bytes]:
    _, inter, leaf = pki()
    return fullchain(leaf, inter), leaf.key_pem


def survives(cert_pem: bytes, key_pem: bytes) -> None:
    try:
        bundle = parse_bundle(cert_pem, key_pem)
    except CertError as exc:
        assert isinstance(exc.reason, CertReason) and exc.message
    else:
        check_bundle(bundle, now=NOW, names=["a.example.test"], require_chain=True)
    try:
        describe_chain(cert_pem)
    except CertError as exc:
        assert exc.reason in (CertReason.EMPTY, CertReason.GARBAGE, CertReason.NO_CERTIFICATE)


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2048), st.binary(max_size=512))
def test_fuzz_random_bytes(cert_pem: bytes, key_pem: bytes) -> None:
    survives(cert_pem, key_pem)


PEM_PIECES = [
    b"-----BEGIN CERTIFICATE-----\n",
    b"-----END CERTIFICATE-----\n",
    b"-----BEGIN PRIVATE KEY-----\n",
    b"-----END PRIVATE KEY-----\n",
    b"-----BEGIN EC PRIVATE KEY-----\n",
    b"-----END EC PRIVATE KEY-----\n",
    b"Proc-Type: 4,ENCRYPTED\n",
    b"\n",
    b"MIIB",
    b"AAAA",
    b"=",
    b"-----BEGIN ",
    b"-----",
]


@FUZZ
@given(st.lists(st.sampled_from(PEM_PIECES) | st.binary(max_size=16), max_size=30))
def test_fuzz_pem_shaped_text(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    survives(data, data)


@FUZZ
@given(st.data())
def test_fuzz_mutated_pem(data: st.DataObject) -> None:
    cert_pem, key_pem = sample()
    combined = bytearray(cert_pem + key_pem)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(combined) - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if action == "flip":
            combined[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "delete":
            del combined[at : at + data.draw(st.integers(1, 64))]
        else:
            combined[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        if not combined:
            break
    survives(bytes(combined), bytes(combined))


def mutate_der(data: st.DataObject, der: bytes) -> bytes:
    buf = bytearray(der)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(buf) - 1))
        buf[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(0, len(buf)))]
    return bytes(buf)


@FUZZ
@given(st.data())
def test_fuzz_mutated_der(data: st.DataObject) -> None:
    """Valid PEM around corrupted DER, to reach the certificate and key decoders."""
    _, inter, leaf = pki()
    which = data.draw(st.sampled_from(["leaf", "chain", "key"]))
    leaf_der = leaf.cert.public_bytes(serialization.Encoding.DER)
    inter_der = inter.cert.public_bytes(serialization.Encoding.DER)
    key_der = leaf.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if which == "leaf":
        leaf_der = mutate_der(data, leaf_der)
    elif which == "chain":
        inter_der = mutate_der(data, inter_der)
    else:
        key_der = mutate_der(data, key_der)
    cert_pem = pem_of(b"CERTIFICATE", leaf_der) + pem_of(b"CERTIFICATE", inter_der)
    survives(cert_pem, pem_of(b"PRIVATE KEY", key_der))


def test_hostile_many_certificates_is_fast() -> None:
    """Hundreds of look-alike certificates: no exponential search for a better order."""
    _, inter, leaf = pki()
    data = leaf.cert_pem + inter.cert_pem * 300
    err = rejected(data, leaf.key_pem, CertReason.CHAIN_BROKEN)
    assert "duplicate" in err.message


def test_new_key_rejects_unknown_type() -> None:
    with pytest.raises(ValueError, match="unknown key type"):
        new_key("dsa-1024")
