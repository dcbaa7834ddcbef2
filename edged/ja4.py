"""The JA4 TLS client fingerprint of a parsed ClientHello. Pure.

Per FoxIO's specification (github.com/FoxIO-LLC/ja4, technical_details/JA4.md):

    t13d1516h2_8daaf6152771_e5627efa2ab1
    a: protocol (t = TLS over TCP), TLS version, d/i (SNI present or not), cipher count,
       extension count (both without GREASE, at most 99), first+last character of the first
       ALPN value ("00" when none)
    b: sha256 of the sorted cipher suites (4-digit hex, comma separated), first 12 hex digits
    c: sha256 of the sorted extensions without SNI and ALPN, then "_" and the signature
       algorithms in the order sent, first 12 hex digits

The fingerprint describes the client software, not the user; it is still unbounded client
input, so it goes to logs and PROXY headers, never into metric labels.
"""

from __future__ import annotations

from hashlib import sha256

from edged.clienthello import EXT_ALPN, EXT_SERVER_NAME, ClientHello

_VERSIONS = {
    0x0304: "13",
    0x0303: "12",
    0x0302: "11",
    0x0301: "10",
    0x0300: "s3",
    0x0002: "s2",
    0xFEFF: "d1",
    0xFEFD: "d2",
    0xFEFC: "d3",
}
_EMPTY_HASH = "000000000000"


def is_grease(value: int) -> bool:
    """RFC 8701 GREASE values: 0x0a0a, 0x1a1a, … 0xfafa."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


def _version(hello: ClientHello) -> str:
    versions = [v for v in hello.supported_versions if not is_grease(v)]
    version = max(versions) if versions else hello.legacy_version
    return _VERSIONS.get(version, "00")


def _alpn_chars(hello: ClientHello) -> str:
    if not hello.alpn or not hello.alpn[0]:
        return "00"
    first = hello.alpn[0]
    a, z = first[0], first[-1]
    if a.isascii() and a.isalnum() and z.isascii() and z.isalnum():
        return a + z
    hexed = first.encode("latin-1").hex()
    return hexed[0] + hexed[-1]


def _hex_list(values: list[int]) -> str:
    return ",".join(f"{v:04x}" for v in values)


def _parts(hello: ClientHello, transport: str) -> tuple[str, str, str]:
    ciphers = [c for c in hello.cipher_suites if not is_grease(c)]
    extensions = [e for e in hello.extensions if not is_grease(e)]
    a = (
        f"{transport}{_version(hello)}"
        f"{'d' if EXT_SERVER_NAME in extensions else 'i'}"
        f"{min(len(ciphers), 99):02d}{min(len(extensions), 99):02d}{_alpn_chars(hello)}"
    )
    b = _hex_list(sorted(ciphers))
    c = _hex_list(sorted(e for e in extensions if e not in (EXT_SERVER_NAME, EXT_ALPN)))
    sigalgs = [s for s in hello.signature_algorithms if not is_grease(s)]
    if sigalgs:
        c += "_" + _hex_list(sigalgs)
    return a, b, c


def _hash(text: str) -> str:
    return sha256(text.encode("ascii")).hexdigest()[:12] if text else _EMPTY_HASH


def ja4(hello: ClientHello, transport: str = "t") -> str:
    """The JA4 fingerprint (`transport` "t" = TLS over TCP, "q" = QUIC, "d" = DTLS)."""
    a, b, c = _parts(hello, transport)
    return f"{a}_{_hash(b)}_{_hash(c)}"


def ja4_raw(hello: ClientHello, transport: str = "t") -> str:
    """JA4_r: the same fields before hashing (for debugging and comparing with other tools)."""
    a, b, c = _parts(hello, transport)
    return f"{a}_{b}_{c}"
