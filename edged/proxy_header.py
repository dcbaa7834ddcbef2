"""PROXY protocol v1 and v2 headers (haproxy.org/download/2.9/doc/proxy-protocol.txt). Pure.

The backend learns the client's address, and with v2 also the negotiated ALPN, the SNI (as the
authority TLV) and the TLS version and cipher (PP2_TYPE_SSL sub-TLVs). A passed-through
connection (not terminated) carries only the authority; custom TLVs (types 0xE0-0xEF, e.g. the
client's JA4 fingerprint) follow the standard ones.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_CLIENT_SSL = 0x01


@dataclass(frozen=True)
class Endpoints:
    """Client (source) and edged's accepting socket (destination); None when not IP (unix)."""

    src: tuple[str, int] | None
    dst: tuple[str, int] | None


@dataclass(frozen=True)
class TlsInfo:
    alpn: str = ""
    sni: str = ""
    version: str = ""
    cipher: str = ""


def _ip_pair(ends: Endpoints) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] | None:
    if ends.src is None or ends.dst is None:
        return None
    src, dst = ipaddress.ip_address(ends.src[0]), ipaddress.ip_address(ends.dst[0])
    if src.version != dst.version:
        # An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d; keep both v6.
        src = src if src.version == 6 else ipaddress.IPv6Address(f"::ffff:{src}")
        dst = dst if dst.version == 6 else ipaddress.IPv6Address(f"::ffff:{dst}")
    return src, dst


def build_v1(ends: Endpoints) -> bytes:
    pair = _ip_pair(ends)
    if pair is None or ends.src is None or ends.dst is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = pair
    proto = "TCP4" if src.version == 4 else "TCP6"
    line = f"PROXY {proto} {src} {dst} {ends.src[1]} {ends.dst[1]}\r\n"
    return line.encode("ascii")


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def build_v2(
    ends: Endpoints,
    tls: TlsInfo | None = None,
    *,
    authority: str = "",
    extra: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    """`tls`: the terminated connection's TLS details; `authority`: the SNI when edged did not
    terminate (ignored when `tls` is given: its sni is the authority); `extra`: further TLVs."""
    pair = _ip_pair(ends)
    if pair is None or ends.src is None or ends.dst is None:
        family, addresses = 0x00, b""  # AF_UNSPEC: the receiver uses the real connection
    else:
        src, dst = pair
        family = 0x11 if src.version == 4 else 0x21  # TCP over IPv4 / IPv6
        addresses = src.packed + dst.packed + struct.pack("!HH", ends.src[1], ends.dst[1])
    tlvs = b""
    if tls is not None:
        if tls.alpn:
            tlvs += _tlv(PP2_TYPE_ALPN, tls.alpn.encode("ascii", "replace"))
        if tls.sni:
            tlvs += _tlv(PP2_TYPE_AUTHORITY, tls.sni.encode("ascii", "replace"))
        sub = b""
        if tls.version:
            sub += _tlv(PP2_SUBTYPE_SSL_VERSION, tls.version.encode("ascii"))
        if tls.cipher:
            sub += _tlv(PP2_SUBTYPE_SSL_CIPHER, tls.cipher.encode("ascii"))
        tlvs += _tlv(PP2_TYPE_SSL, struct.pack("!BI", PP2_CLIENT_SSL, 0) + sub)
    elif authority:
        tlvs += _tlv(PP2_TYPE_AUTHORITY, authority.encode("ascii", "replace"))
    for kind, value in extra:
        tlvs += _tlv(kind, value)
    body = addresses + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body
