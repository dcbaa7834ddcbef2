"""Parse a TLS ClientHello from the first bytes of a connection, before terminating TLS. Pure.

The bytes are what a client sent first: TLS records of content type handshake (22) carrying
the ClientHello handshake message, which may be fragmented over several records (and those
over several TCP segments). `parse_client_hello(data)` returns a `ClientHello` once `data`
holds the whole message, raises `NeedMore` while it does not yet, and `ClientHelloError` (with
a stable `reason` code) for anything malformed. It never raises anything else, never loops
longer than the input and never reads past `MAX_CLIENT_HELLO` bytes of handshake message.

The data path calls it in two steps: `peek_client_hello(data)` checks the framing (record and
message lengths, extension lengths, duplicate extensions) and reads what routing needs, the
server name and the ALPN ids; `complete(peeked)` reads and checks the cipher, version,
signature and group lists, which only a choice between key types and JA4 need. For one name
with one certificate (the common case) the handshake then costs half the parsing, and a
malformed list is OpenSSL's to refuse (it does, with decode_error).

The server name is kept only when it is a plausible host name: 1 to 255 printable ASCII
characters (no NUL, no space, no bytes >= 0x80). Anything else is a `bad_server_name` error:
the connection would be refused anyway (OpenSSL rejects NUL and over-long names; Python's
`sni_callback` cannot decode non-ASCII names and answers internal_error).

ALPN protocol ids are bytes on the wire; they are decoded as latin-1, which maps each byte to
one character and back (`s.encode("latin-1")` gives the exact bytes).
"""

from __future__ import annotations

import struct
from enum import StrEnum
from typing import NamedTuple

from edged.errors import EdgedError

RECORD_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
MAX_RECORD = 16384 + 256  # TLSPlaintext.length <= 2^14; a little slack as OpenSSL allows
MAX_CLIENT_HELLO = 16 * 1024  # the handshake message (post-quantum key shares need ~2 KiB)

EXT_SERVER_NAME = 0x0000
EXT_SUPPORTED_GROUPS = 0x000A
EXT_EC_POINT_FORMATS = 0x000B
EXT_SIGNATURE_ALGORITHMS = 0x000D
EXT_ALPN = 0x0010
EXT_SUPPORTED_VERSIONS = 0x002B


class ClientHelloReason(StrEnum):
    """Why bytes are not a usable ClientHello (stable codes: logs and tests)."""

    HTTP = "http_on_https"  # plain text (an HTTP request) on the TLS port
    SSLV2 = "sslv2"  # an SSL 2.0 style hello: not supported
    NOT_HANDSHAKE = "not_handshake"  # the first record is not a handshake record
    BAD_RECORD = "bad_record"  # record version or length out of range
    NOT_CLIENT_HELLO = "not_client_hello"  # the first handshake message is something else
    TOO_LARGE = "too_large"  # over MAX_CLIENT_HELLO
    BAD_LENGTH = "bad_length"  # an inner length disagrees with the message length
    BAD_EXTENSION = "bad_extension"  # a known extension's body is malformed
    DUPLICATE_EXTENSION = "duplicate_extension"
    BAD_SERVER_NAME = "bad_server_name"  # empty, too long, NUL or non-ASCII host name


class ClientHelloError(EdgedError):
    """Malformed ClientHello; `reason` is a ClientHelloReason (a bounded set)."""

    def __init__(self, reason: ClientHelloReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"malformed ClientHello: {reason}" + (f": {detail}" if detail else ""))


class NeedMore(Exception):  # a signal, not an error
    """The bytes end before the ClientHello does: read more and parse again once there are at
    least `need` bytes (a lower bound; parsing earlier only raises NeedMore again)."""

    def __init__(self, need: int) -> None:
        super().__init__(need)
        self.need = need


class ClientHello(NamedTuple):  # immutable; a tuple is the cheapest to build per connection
    legacy_version: int
    cipher_suites: tuple[int, ...]
    extensions: tuple[int, ...]  # extension type ids, in the order sent (GREASE included)
    server_name: str | None  # the host_name entry of server_name, as sent (not lowercased)
    alpn: tuple[str, ...]  # latin-1 decoded protocol ids
    supported_versions: tuple[int, ...]
    signature_algorithms: tuple[int, ...]
    supported_groups: tuple[int, ...]
    ec_point_formats: tuple[int, ...]
    size: int  # bytes of `data` the ClientHello occupied, record headers included


MAX_RECORDS = 64  # a real client needs one or two; each re-parse walks them all
_HOST_NAME_BYTES = bytes(range(0x21, 0x7F))  # printable ASCII without space
_EXT_HEADER = struct.Struct("!HH")
_U16 = [struct.Struct(f"!{n}H") for n in range(0, 256)]  # common list sizes, compiled once


def _message(data: bytes) -> tuple[bytes, int]:
    """Reassemble the handshake message from the records at the start of `data`: (message
    body after the 4-byte handshake header, bytes of `data` used)."""
    if not data:
        raise NeedMore(1)
    first = data[0]
    if first != RECORD_HANDSHAKE:
        if 0x41 <= first <= 0x5A:  # 'A'..'Z': GET, POST, CONNECT…
            raise ClientHelloError(ClientHelloReason.HTTP)
        if first & 0x80:
            raise ClientHelloError(ClientHelloReason.SSLV2)
        raise ClientHelloError(ClientHelloReason.NOT_HANDSHAKE, f"record type {first}")
    size = len(data)
    pos = 0
    parts: list[bytes] = []
    have = 0
    need = -1  # handshake message length incl. its 4-byte header, once known
    records = 0
    while True:
        records += 1
        if records > MAX_RECORDS:
            raise ClientHelloError(ClientHelloReason.BAD_RECORD, "too many records")
        if size - pos < 5:
            raise NeedMore(pos + 5)
        if data[pos] != RECORD_HANDSHAKE:
            raise ClientHelloError(
                ClientHelloReason.NOT_HANDSHAKE, f"record type {data[pos]} inside the hello"
            )
        if data[pos + 1] != 3:
            raise ClientHelloError(ClientHelloReason.BAD_RECORD, "record version is not 3.x")
        length = (data[pos + 3] << 8) | data[pos + 4]
        if length == 0 or length > MAX_RECORD:
            raise ClientHelloError(ClientHelloReason.BAD_RECORD, f"record length {length}")
        pos += 5
        end = pos + length
        if need < 0 and have == 0 and end <= size and length >= 4:
            # The common case: the whole header is in the first record.
            msg_type = data[pos]
            mlen = (data[pos + 1] << 16) | (data[pos + 2] << 8) | data[pos + 3]
            _check_header(msg_type, mlen)
            need = mlen + 4
            if length >= need:
                return data[pos + 4 : pos + need], pos + need
        stop = min(end, size)
        chunk = data[pos:stop]
        parts.append(chunk)
        have += len(chunk)
        if need < 0 and have >= 4:
            head = b"".join(parts)[:4]
            _check_header(head[0], int.from_bytes(head[1:4], "big"))
            need = int.from_bytes(head[1:4], "big") + 4
        if need >= 0 and have >= need:
            used = stop - (have - need)
            return b"".join(parts)[4:need], used
        if end > size:
            raise NeedMore(end)
        pos = end


def _check_header(msg_type: int, length: int) -> None:
    if msg_type != HANDSHAKE_CLIENT_HELLO:
        raise ClientHelloError(ClientHelloReason.NOT_CLIENT_HELLO, f"handshake type {msg_type}")
    if length > MAX_CLIENT_HELLO:
        raise ClientHelloError(ClientHelloReason.TOO_LARGE, f"{length} bytes")
    if length < 38:  # version + random + session id length + (empty) lists
        raise ClientHelloError(ClientHelloReason.BAD_LENGTH, f"{length} bytes is too short")


def _u16_list(body: bytes, start: int, end: int) -> tuple[int, ...]:
    n = (end - start) // 2
    if n < 256:
        return _U16[n].unpack_from(body, start)
    return struct.unpack_from(f"!{n}H", body, start)


class PeekedHello(NamedTuple):
    """What routing a connection needs from its ClientHello: the server name and ALPN ids
    (parsed and checked), the message framing checked (lengths, duplicate extensions). The
    other lists stay unread until `complete()` is asked for them (a certificate choice between
    key types, JA4): one name with one certificate, the common case, never needs them."""

    server_name: str | None  # the host_name entry of server_name, as sent (not lowercased)
    alpn: tuple[str, ...]  # latin-1 decoded protocol ids
    size: int  # bytes of `data` the ClientHello occupied, record headers included
    msg: bytes  # the handshake message body (after its 4-byte header)
    suites: int  # where the cipher suites list starts in `msg` (after its length)
    first_extension: int  # where the first extension header is in `msg` (len(msg): none)
    starts: dict[int, int]  # extension type -> where its body starts in `msg`


def parse_client_hello(data: bytes) -> ClientHello:
    """The ClientHello at the start of `data`; NeedMore or ClientHelloError (see module doc)."""
    return complete(peek_client_hello(data))


def peek_client_hello(data: bytes) -> PeekedHello:
    """The routing part of the ClientHello at the start of `data`; NeedMore or
    ClientHelloError as parse_client_hello, except for the lists `complete()` reads."""
    msg, used = _message(data)
    bad = ClientHelloReason.BAD_LENGTH
    end = len(msg)
    pos = 34  # version + random
    sid_len = msg[pos]
    if sid_len > 32:
        raise ClientHelloError(bad, f"session id of {sid_len} bytes")
    pos += 1 + sid_len
    if pos + 2 > end:
        raise ClientHelloError(bad, "no cipher suites")
    n = (msg[pos] << 8) | msg[pos + 1]
    pos += 2
    suites = pos
    if n == 0 or n % 2 or pos + n > end:
        raise ClientHelloError(bad, f"cipher suites length {n}")
    pos += n
    if pos >= end:
        raise ClientHelloError(bad, "no compression methods")
    n = msg[pos]
    pos += 1 + n
    if n == 0 or pos > end:
        raise ClientHelloError(bad, f"compression methods length {n}")

    starts: dict[int, int] = {}  # extension type -> where its body starts
    first = end
    if pos < end:  # extensions are optional (before TLS 1.3)
        if pos + 2 > end:
            raise ClientHelloError(bad, "truncated extensions length")
        n = (msg[pos] << 8) | msg[pos + 1]
        pos += 2
        if pos + n != end:
            raise ClientHelloError(bad, "extensions do not fill the message")
        first = pos
        header = _EXT_HEADER.unpack_from
        count = 0
        kind = 0
        try:  # the hot loop: no bound checks inside (reading past the message raises)
            while pos < end:
                kind, n = header(msg, pos)
                pos += 4
                starts[kind] = pos
                pos += n
                count += 1
        except struct.error:
            raise ClientHelloError(bad, "truncated extension header") from None
        if pos > end:  # only the last one can overrun: the loop stops there
            raise ClientHelloError(bad, f"extension {kind:#06x} overruns the message")
        if len(starts) != count:
            types = _extension_types(msg, first)
            dup = next(k for k in types if types.count(k) > 1)
            raise ClientHelloError(ClientHelloReason.DUPLICATE_EXTENSION, f"{dup:#06x}")
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    if (start := starts.get(EXT_SERVER_NAME)) is not None:
        server_name = _server_name(msg, start, _body_end(msg, start))
    if (start := starts.get(EXT_ALPN)) is not None:
        alpn = _alpn(msg, start, _body_end(msg, start))
    return PeekedHello(server_name, alpn, used, msg, suites, first, starts)


def _extension_types(msg: bytes, pos: int) -> list[int]:
    """The extension types in the order sent from `pos` on (GREASE and duplicates included),
    in a message whose extension framing peek_client_hello checked."""
    end = len(msg)
    types: list[int] = []
    header = _EXT_HEADER.unpack_from
    while pos < end:
        kind, n = header(msg, pos)
        types.append(kind)
        pos += 4 + n
    return types


def complete(peeked: PeekedHello) -> ClientHello:
    """The whole ClientHello of a peeked one: the remaining lists read and checked (the
    ClientHelloError of a malformed one, as parse_client_hello)."""
    msg, starts = peeked.msg, peeked.starts
    n = (msg[peeked.suites - 2] << 8) | msg[peeked.suites - 1]
    ciphers = _u16_list(msg, peeked.suites, peeked.suites + n)
    formats: tuple[int, ...] = ()
    get = starts.get
    if (start := get(EXT_EC_POINT_FORMATS)) is not None:
        stop = _body_end(msg, start)
        if stop - start < 2 or msg[start] != stop - start - 1:
            raise ClientHelloError(ClientHelloReason.BAD_EXTENSION, "ec_point_formats")
        formats = tuple(msg[start + 1 : stop])
    versions = _list(msg, get(EXT_SUPPORTED_VERSIONS), 1, EXT_SUPPORTED_VERSIONS)
    sigalgs = _list(msg, get(EXT_SIGNATURE_ALGORITHMS), 2, EXT_SIGNATURE_ALGORITHMS)
    groups = _list(msg, get(EXT_SUPPORTED_GROUPS), 2, EXT_SUPPORTED_GROUPS)
    return ClientHello(
        legacy_version=(msg[0] << 8) | msg[1],
        cipher_suites=ciphers,
        extensions=tuple(_extension_types(msg, peeked.first_extension)),
        server_name=peeked.server_name,
        alpn=peeked.alpn,
        supported_versions=versions,
        signature_algorithms=sigalgs,
        supported_groups=groups,
        ec_point_formats=formats,
        size=peeked.size,
    )


def _body_end(msg: bytes, start: int) -> int:
    """Where the extension whose body starts at `start` ends (its length precedes it)."""
    return start + ((msg[start - 2] << 8) | msg[start - 1])


def _list(msg: bytes, start: int | None, prefix: int, kind: int) -> tuple[int, ...]:
    """A list of uint16 behind a `prefix`-byte length that must fill the extension whose body
    starts at `start`."""
    if start is None:
        return ()
    end = _body_end(msg, start)
    if end - start < prefix:
        raise ClientHelloError(ClientHelloReason.BAD_EXTENSION, f"{kind:#06x}: empty")
    n = msg[start] if prefix == 1 else (msg[start] << 8) | msg[start + 1]
    start += prefix
    if n != end - start or n == 0 or n % 2:
        raise ClientHelloError(ClientHelloReason.BAD_EXTENSION, f"{kind:#06x}: list length {n}")
    return _u16_list(msg, start, end)


def _server_name(msg: bytes, start: int, end: int) -> str | None:
    bad = ClientHelloReason.BAD_EXTENSION
    if end - start < 2 or (msg[start] << 8) | msg[start + 1] != end - start - 2:
        raise ClientHelloError(bad, "server_name: list length")
    pos = start + 2
    if pos == end:
        raise ClientHelloError(bad, "server_name: empty list")
    name: str | None = None
    while pos < end:
        if pos + 3 > end:
            raise ClientHelloError(bad, "server_name: truncated entry")
        kind = msg[pos]
        n = (msg[pos + 1] << 8) | msg[pos + 2]
        pos += 3
        if pos + n > end:
            raise ClientHelloError(bad, "server_name: entry overruns the list")
        if kind == 0:
            if name is not None:
                raise ClientHelloError(bad, "server_name: two host names")
            raw = msg[pos : pos + n]
            if not 0 < n <= 255 or raw.translate(None, _HOST_NAME_BYTES):
                raise ClientHelloError(ClientHelloReason.BAD_SERVER_NAME, f"{n} bytes")
            name = raw.decode("ascii")
        pos += n
    return name


def _alpn(msg: bytes, start: int, end: int) -> tuple[str, ...]:
    bad = ClientHelloReason.BAD_EXTENSION
    if end - start < 2 or (msg[start] << 8) | msg[start + 1] != end - start - 2:
        raise ClientHelloError(bad, "alpn: list length")
    pos = start + 2
    if pos == end:
        raise ClientHelloError(bad, "alpn: empty list")
    out: list[str] = []
    while pos < end:
        n = msg[pos]
        pos += 1
        if n == 0 or pos + n > end:
            raise ClientHelloError(bad, "alpn: protocol id length")
        out.append(msg[pos : pos + n].decode("latin-1"))
        pos += n
    return tuple(out)
