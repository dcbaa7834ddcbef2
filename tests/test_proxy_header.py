"""PROXY protocol headers, checked against the spec's byte layout."""

from __future__ import annotations

import struct

from edged.proxy_header import V2_SIGNATURE, Endpoints, TlsInfo, build_v1, build_v2


def test_v1_ipv4_ipv6_unknown() -> None:
    assert build_v1(Endpoints(("192.0.2.1", 5555), ("198.51.100.2", 443))) == (
        b"PROXY TCP4 192.0.2.1 198.51.100.2 5555 443\r\n"
    )
    assert build_v1(Endpoints(("2001:db8::1", 5555), ("2001:db8::2", 443))) == (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 5555 443\r\n"
    )
    assert build_v1(Endpoints(None, None)) == b"PROXY UNKNOWN\r\n"


def test_v1_mixed_families_become_v6() -> None:
    line = build_v1(Endpoints(("192.0.2.1", 1), ("2001:db8::2", 443)))
    assert line == b"PROXY TCP6 ::ffff:c000:201 2001:db8::2 1 443\r\n"


def test_v2_ipv4_with_tlvs() -> None:
    header = build_v2(
        Endpoints(("192.0.2.1", 5555), ("198.51.100.2", 443)),
        TlsInfo(alpn="h2", sni="a.example", version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256"),
    )
    assert header[:12] == V2_SIGNATURE
    ver_cmd, fam, length = struct.unpack("!BBH", header[12:16])
    assert (ver_cmd, fam, length) == (0x21, 0x11, len(header) - 16)
    body = header[16:]
    assert body[:12] == bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 5555, 443)
    tlvs = body[12:]
    assert tlvs[:5] == b"\x01\x00\x02h2"
    assert tlvs[5:17] == b"\x02\x00\x09a.example"
    ssl_tlv = tlvs[17:]
    assert ssl_tlv[0] == 0x20
    assert struct.unpack("!H", ssl_tlv[1:3])[0] == len(ssl_tlv) - 3
    assert ssl_tlv[3:8] == b"\x01\x00\x00\x00\x00"  # PP2_CLIENT_SSL, verify 0
    assert ssl_tlv[8:] == b"\x21\x00\x07TLSv1.3" + b"\x23\x00\x16TLS_AES_128_GCM_SHA256"


def test_v2_ipv6_and_unspec() -> None:
    header = build_v2(Endpoints(("2001:db8::1", 1), ("2001:db8::2", 2)))
    assert header[13] == 0x21 and struct.unpack("!H", header[14:16])[0] == 36
    header = build_v2(Endpoints(None, None))
    assert header == V2_SIGNATURE + b"\x21\x00\x00\x00"
