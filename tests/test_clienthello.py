"""ClientHello parsing and JA4: real ClientHellos (openssl s_client, Python ssl, FoxIO's pcaps),
fragmented over records and TCP segments, malformed ones, and fuzzing."""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edged import clienthello
from edged.clienthello import (
    MAX_CLIENT_HELLO,
    ClientHello,
    ClientHelloError,
    ClientHelloReason,
    NeedMore,
    parse_client_hello,
)
from edged.ja4 import is_grease, ja4, ja4_raw

# --- test vectors: ClientHellos from FoxIO-LLC/ja4's pcap/ directory, with the JA4 and JA4_r
# their reference tools give (python/test/testdata/*.json) -----------------------------------

ALPN_H2_PCAP = bytes.fromhex(
    "16030100e8010000e40303858226c04fbaeddef4246093b4cfdab38f9dcfef145360e417686575cac49c7000"
    "005cc030c02cc028c024c014c00a009f006b0039cca9cca8ccaaff8500c400880081009d003d003500c00084"
    "c02fc02bc027c023c013c009009e0067003300be0045009c003c002f00ba0041c011c00700050004c012c008"
    "0016000a00ff0100005f0000001700150000127777772e636c6f7564666c6172652e636f6d000b0002010000"
    "0a00080006001d00170018000d001c001a06010603efef0501050304010403eeeeeded030103030201020300"
    "10000e000c02683208687474702f312e31"
)
TLS12_PCAP = bytes.fromhex(
    "1603010200010001fc0303ecb2691addb2bf6c599c7aaae23de5f42561cc04eb41029acc6fc050a16ac1d220"
    "46f8617b580ac9358e2aa44e306d52466bcc989c87c8ca64309f5faf50ba7b4d0022130113031302c02bc02f"
    "cca9cca8c02cc030c00ac009c013c014009c009d002f00350100019100000021001f00001c636f6e74696c65"
    "2e73657276696365732e6d6f7a696c6c612e636f6d00170000ff01000100000a000e000c001d001700180019"
    "01000101000b00020100002300000010000e000c02683208687474702f312e31000500050100000000002200"
    "0a000804030503060302030033006b0069001d00208909858fbeb6ed2f1248ba5b9e2978bead0e840110192c"
    "61daed0096798b184400170041044d183d91f5eed35791fa982464e3b0214aaa5f5d1b78616d9b9fbebc22d1"
    "1f535b2f94c686143136aa795e6e5a875d6c08064ad5b76d44caad766e2483012748002b0005040304030300"
    "0d0018001604030503060308040805080604010501060102030201002d00020101001c000240010015007a00"
).ljust(517, b"\0")  # padding extension: zeros
TLS_SNI_PCAP = bytes.fromhex(  # Chrome, with GREASE
    "1603010200010001fc03030f9e38acb9a54a7c6e00e29a70ac2feee180ff76d7f25dca84932a66a42d1e5a20"
    "bc58b92f865e6b9aa4a6371cadcb0afe1da1c0f705209a11d52357f56d5dd9620020aaaa130113021303c02b"
    "c02fc02cc030cca9cca8c013c014009c009d002f0035010001939a9a0000ff010001000033002b00290a0a00"
    "0100001d0020cf55af2603e92f59eb321779706a18fa6b96b16c16404c2264ed687a59401878002d00020101"
    "000500050100000000446900050003026832000d00120010040308040401050308050501080606010010000e"
    "000c02683208687474702f312e3100230000001b0003020002002b0007060a0a030403030000002200200000"
    "1d636c69656e7473657276696365732e676f6f676c65617069732e636f6d00120000000a000a00080a0a001d"
    "0017001800170000000b000201006a6a000100001500ba"
).ljust(517, b"\0")
# tls-non-ascii-alpn.pcapng is the same hello with the first ALPN id h2 replaced by 0xba 0xad.
NON_ASCII_ALPN_PCAP = TLS_SNI_PCAP.replace(b"\x0c\x02h2\x08", b"\x0c\x02\xba\xad\x08")

CHROME_RAW = (
    "002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,cca9_0005,000a,"
    "000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_0403,0804,0401,0503,0805,"
    "0501,0806,0601"
)
VECTORS = [
    # (hello, SNI, JA4, JA4_r after the "a" part)
    (
        ALPN_H2_PCAP,
        "www.cloudflare.com",
        "t12d4605h2_85626a9a5f7f_aaf95bb78ec9",
        "0004,0005,000a,0016,002f,0033,0035,0039,003c,003d,0041,0045,0067,006b,0081,0084,0088,"
        "009c,009d,009e,009f,00ba,00be,00c0,00c4,00ff,c007,c008,c009,c00a,c011,c012,c013,c014,"
        "c023,c024,c027,c028,c02b,c02c,c02f,c030,cca8,cca9,ccaa,ff85_000a,000b,000d_0601,0603,"
        "efef,0501,0503,0401,0403,eeee,eded,0301,0303,0201,0203",
    ),
    (
        TLS12_PCAP,
        "contile.services.mozilla.com",
        "t13d1715h2_5b57614c22b0_3d5424432f57",
        "002f,0035,009c,009d,1301,1302,1303,c009,c00a,c013,c014,c02b,c02c,c02f,c030,cca8,cca9_"
        "0005,000a,000b,000d,0015,0017,001c,0022,0023,002b,002d,0033,ff01_0403,0503,0603,0804,"
        "0805,0806,0401,0501,0601,0203,0201",
    ),
    (
        TLS_SNI_PCAP,
        "clientservices.googleapis.com",
        "t13d1516h2_8daaf6152771_e5627efa2ab1",
        CHROME_RAW,
    ),
    # FoxIO's JSON (made by an older tool) says "99" here; the specification's ALPN section says
    # a non-alphanumeric first or last byte gives the first and last hex digit: 0xbaad -> "bd".
    (
        NON_ASCII_ALPN_PCAP,
        "clientservices.googleapis.com",
        "t13d1516bd_8daaf6152771_e5627efa2ab1",
        CHROME_RAW,
    ),
]


@pytest.mark.parametrize(("hello", "sni", "fingerprint", "raw"), VECTORS)
def test_ja4_reference_vectors(hello: bytes, sni: str, fingerprint: str, raw: str) -> None:
    parsed = parse_client_hello(hello)
    assert parsed.server_name == sni
    assert parsed.size == len(hello)
    assert ja4(parsed) == fingerprint
    assert ja4_raw(parsed) == fingerprint[:10] + "_" + raw


def test_chrome_hello_fields() -> None:
    hello = parse_client_hello(TLS_SNI_PCAP + b"\x14\x03\x03\x00\x01\x01")  # + a CCS record
    assert hello.size == len(TLS_SNI_PCAP)
    assert hello.legacy_version == 0x0303
    assert hello.alpn == ("h2", "http/1.1")
    assert hello.cipher_suites[0] == 0xAAAA and is_grease(hello.cipher_suites[0])
    assert hello.supported_versions == (0x0A0A, 0x0304, 0x0303)
    assert hello.supported_groups == (0x0A0A, 0x001D, 0x0017, 0x0018)
    assert hello.ec_point_formats == (0,)
    assert hello.signature_algorithms[:2] == (0x0403, 0x0804)
    assert hello.extensions[0] == 0x9A9A and hello.extensions[-2:] == (0x6A6A, 0x0015)
    assert parse_client_hello(NON_ASCII_ALPN_PCAP).alpn == ("\xba\xad", "http/1.1")


def _hello(**kw: object) -> ClientHello:
    base: dict[str, object] = {
        "legacy_version": 0x0303,
        "cipher_suites": (0x1301,),
        "extensions": (0x0010,),
        "server_name": None,
        "alpn": (),
        "supported_versions": (),
        "signature_algorithms": (),
        "supported_groups": (),
        "ec_point_formats": (),
        "size": 0,
    }
    base.update(kw)
    return ClientHello(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("alpn", "chars"),
    [
        # The examples of the specification's ALPN section.
        ((), "00"),
        (("",), "00"),
        (("h2",), "h2"),
        (("http/1.1",), "h1"),
        (("x",), "xx"),
        (("\xab",), "ab"),
        (("\x20",), "20"),
        (("\xab\xcd",), "ad"),
        (("\x20\x61",), "21"),
        (("\x30\xab",), "3b"),
        (("\x61\x20",), "60"),
        (("\x30\x31\xab\xcd",), "3d"),
        (("\x30\xab\xcd\x31",), "01"),
    ],
)
def test_ja4_alpn_characters(alpn: tuple[str, ...], chars: str) -> None:
    assert ja4(_hello(alpn=alpn))[8:10] == chars


def test_ja4_without_extensions_or_sigalgs() -> None:
    assert ja4(_hello(cipher_suites=(), extensions=())) == "t12i000000_000000000000_000000000000"
    # Only SNI and ALPN: nothing left to hash in c.
    only = _hello(extensions=(0, 0x10), server_name="a.test", alpn=("h2",))
    assert ja4(only).endswith("_000000000000") and ja4(only).startswith("t12d0102h2_")
    # Extensions but no signature algorithms: no trailing "_" (the spec's 6d807ffa2a79 example).
    exts = (0x001B, 0x0000, 0x0033, 0x0010, 0x4469, 0x0017, 0x002D, 0x000D, 0x0005, 0x0023)
    exts += (0x0012, 0x002B, 0xFF01, 0x000B, 0x000A, 0x0015)
    assert ja4(_hello(extensions=exts)).endswith("_6d807ffa2a79")
    sigalgs = (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601)
    assert ja4(_hello(extensions=exts, signature_algorithms=sigalgs)).endswith("_e5627efa2ab1")
    # The version comes from supported_versions (GREASE ignored), else legacy_version.
    assert ja4(_hello(supported_versions=(0x7A7A, 0x0304, 0x0303)))[1:3] == "13"
    assert ja4(_hello(legacy_version=0x0301))[1:3] == "10"
    assert ja4(_hello(legacy_version=0x1234))[1:3] == "00"
    assert ja4(_hello(cipher_suites=tuple(range(1, 200))))[4:6] == "99"


# --- real ClientHellos, captured from a TCP connection -----------------------------------


def _read_hello(conn: socket.socket, chunk: int = 65536) -> tuple[bytes, int]:
    """Read until the bytes make a ClientHello; (bytes, number of NeedMore answers)."""
    data = b""
    partial = 0
    conn.settimeout(10)
    while True:
        got = conn.recv(chunk)
        if not got:
            raise AssertionError(f"closed after {len(data)} bytes")
        data += got
        try:
            parse_client_hello(data)
        except NeedMore as more:
            assert more.need > len(data)
            partial += 1
            continue
        return data, partial


def capture(client: Callable[[int], None], chunk: int = 65536) -> tuple[bytes, int]:
    """Start `client(port)` in a thread against a TCP listener and return what it sent first."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        thread = threading.Thread(target=client, args=(port,), daemon=True)
        thread.start()
        server.settimeout(10)
        conn, _ = server.accept()
        with conn:
            result = _read_hello(conn, chunk)
        thread.join(10)
        return result


def openssl_client(*args: str) -> Callable[[int], None]:
    def run(port: int) -> None:
        subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
        )

    return run


def python_client(sni: str | None, alpn: list[str] | None = None) -> Callable[[int], None]:
    def run(port: int) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        if alpn:
            ctx.set_alpn_protocols(alpn)
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
                ctx.wrap_socket(sock, server_hostname=sni),
            ):
                pass
        except (OSError, ssl.SSLError):
            pass

    return run


@pytest.fixture(scope="module")
def captured() -> dict[str, bytes]:
    return {
        "openssl": capture(
            openssl_client("-servername", "one.example.test", "-alpn", "h2,http/1.1")
        )[0],
        "openssl_nosni": capture(openssl_client("-noservername", "-tls1_2"))[0],
        "python": capture(python_client("py.example.test", ["acme-tls/1"]))[0],
        "python_nosni": capture(python_client(None))[0],
    }


def test_openssl_client_hello(captured: dict[str, bytes]) -> None:
    hello = parse_client_hello(captured["openssl"])
    assert hello.server_name == "one.example.test"
    assert hello.alpn == ("h2", "http/1.1")
    assert 0x0304 in hello.supported_versions
    assert {0x1301, 0x1302} <= set(hello.cipher_suites)
    assert hello.signature_algorithms and hello.supported_groups
    assert {0x0000, 0x0010, 0x002B, 0x000D, 0x000A} <= set(hello.extensions)
    fp = ja4(hello)
    assert fp.startswith("t13d") and fp[8:10] == "h2" and len(fp) == 36
    nosni = parse_client_hello(captured["openssl_nosni"])
    assert nosni.server_name is None and 0 not in nosni.extensions
    assert ja4(nosni).startswith("t12i")  # -tls1_2: no supported_versions extension
    assert nosni.supported_versions == ()


def test_python_client_hello(captured: dict[str, bytes]) -> None:
    hello = parse_client_hello(captured["python"])
    assert hello.server_name == "py.example.test"
    assert hello.alpn == ("acme-tls/1",)
    assert ja4(hello)[8:10] == "a1"
    nosni = parse_client_hello(captured["python_nosni"])
    assert nosni.server_name is None and nosni.alpn == ()
    assert ja4(nosni)[3] == "i" and ja4(nosni)[8:10] == "00"
    # Same client, same b and c parts whatever the name and ALPN (they leave SNI and ALPN out).
    assert ja4(hello)[10:] == ja4(nosni)[10:]


def refragment(record: bytes, sizes: list[int]) -> bytes:
    """The handshake message of one TLS record re-cut into records of `sizes` bytes (the last
    record takes the rest)."""
    message = record[5 : 5 + int.from_bytes(record[3:5], "big")]
    out = b""
    pos = 0
    for size in [*sizes, len(message)]:
        part = message[pos : pos + size]
        if part:
            out += b"\x16" + record[1:3] + struct.pack("!H", len(part)) + part
        pos += len(part)
    return out


def test_hello_split_across_records(captured: dict[str, bytes]) -> None:
    original = parse_client_hello(captured["openssl"])
    for sizes in ([100], [2], [3, 1], [4], [1] * 40):
        data = refragment(captured["openssl"], sizes)
        hello = parse_client_hello(data + b"\x17\x03\x03")  # more bytes after it: ignored
        assert hello.size == len(data)
        assert hello == ClientHello(**{**_fields(original), "size": len(data)})
    # Every prefix of the two-record form asks for more, with a need beyond what it has.
    data = refragment(captured["openssl"], [100])
    for cut in range(len(data)):
        with pytest.raises(NeedMore) as more:
            parse_client_hello(data[:cut])
        assert cut < more.value.need <= len(data)


def _fields(hello: ClientHello) -> dict[str, object]:
    return {name: getattr(hello, name) for name in ClientHello._fields}


def test_hello_delivered_byte_by_byte_over_tcp() -> None:
    """A client writes its ClientHello one byte per TCP segment; the reader parses after each."""
    hello = TLS_SNI_PCAP

    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(hello)):
                sock.send(hello[i : i + 1])
                if i % 64 == 0:
                    time.sleep(0.001)
            sock.recv(1)

    data, partial = capture(client, chunk=1)
    assert data == hello and partial == len(hello) - 1
    assert ja4(parse_client_hello(data)) == VECTORS[2][2]


# --- malformed input ----------------------------------------------------------------------


def _record(message: bytes, rtype: int = 22) -> bytes:
    return bytes([rtype, 3, 1]) + struct.pack("!H", len(message)) + message


def _client_hello(extensions: bytes | None, ciphers: bytes = b"\x13\x01") -> bytes:
    body = b"\x03\x03" + bytes(32) + b"\x00" + struct.pack("!H", len(ciphers)) + ciphers
    body += b"\x01\x00"
    if extensions is not None:
        body += struct.pack("!H", len(extensions)) + extensions
    return _record(b"\x01" + len(body).to_bytes(3, "big") + body)


def _ext(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


def _sni(name: bytes) -> bytes:
    entry = b"\x00" + struct.pack("!H", len(name)) + name
    return _ext(0, struct.pack("!H", len(entry)) + entry)


def test_minimal_hellos() -> None:
    bare = parse_client_hello(_client_hello(None))
    assert bare.extensions == () and bare.server_name is None and ja4(bare).startswith("t12i0100")
    named = parse_client_hello(_client_hello(_sni(b"Example.TEST")))
    assert named.server_name == "Example.TEST"  # as sent; routing lowercases


BAD = [
    (b"GET / HTTP/1.1\r\n\r\n", ClientHelloReason.HTTP),
    (b"\x80\x2e\x01\x00\x02", ClientHelloReason.SSLV2),
    (b"\x17\x03\x03\x00\x10", ClientHelloReason.NOT_HANDSHAKE),
    (b"\x00", ClientHelloReason.NOT_HANDSHAKE),
    (b"\x16\x02\x00\x00\x10", ClientHelloReason.BAD_RECORD),
    (b"\x16\x03\x01\x00\x00", ClientHelloReason.BAD_RECORD),
    (b"\x16\x03\x01\x50\x00", ClientHelloReason.BAD_RECORD),
    (b"\x16\x03\x01\x00\x05garbage-after-a-record-header", ClientHelloReason.NOT_CLIENT_HELLO),
    (_record(b"\x02\x00\x00\x30" + bytes(0x30)), ClientHelloReason.NOT_CLIENT_HELLO),
    (_record(b"\x01\x00\x40\x01"), ClientHelloReason.TOO_LARGE),
    (_record(b"\x01\x00\x00\x10" + bytes(16)), ClientHelloReason.BAD_LENGTH),
    (_client_hello(None, ciphers=b""), ClientHelloReason.BAD_LENGTH),
    (_client_hello(None, ciphers=b"\x13"), ClientHelloReason.BAD_LENGTH),
    (_client_hello(b"\x00"), ClientHelloReason.BAD_LENGTH),
    (_client_hello(_ext(0x17, b"") + b"\x00\x05\x00"), ClientHelloReason.BAD_LENGTH),
    (_client_hello(_ext(0x17, b"") + _ext(0x17, b"")), ClientHelloReason.DUPLICATE_EXTENSION),
    (_client_hello(_sni(b"")), ClientHelloReason.BAD_SERVER_NAME),
    (_client_hello(_sni(b"a\x00.example")), ClientHelloReason.BAD_SERVER_NAME),
    (_client_hello(_sni("bücher.example".encode())), ClientHelloReason.BAD_SERVER_NAME),
    (_client_hello(_sni(b"a b.example")), ClientHelloReason.BAD_SERVER_NAME),
    (_client_hello(_sni(b"a" * 256)), ClientHelloReason.BAD_SERVER_NAME),
    (_client_hello(_ext(0, b"\x00\x00")), ClientHelloReason.BAD_EXTENSION),
    (_client_hello(_ext(0, b"")), ClientHelloReason.BAD_EXTENSION),
    (_client_hello(_ext(0, b"\x00\x04\x00\x00\x05a")), ClientHelloReason.BAD_EXTENSION),
    (_client_hello(_ext(0x10, b"\x00\x00")), ClientHelloReason.BAD_EXTENSION),
    (_client_hello(_ext(0x10, b"\x00\x01\x00")), ClientHelloReason.BAD_EXTENSION),
    (_client_hello(_ext(0x2B, b"\x03\x03\x04\x03")), ClientHelloReason.BAD_EXTENSION),
    (_client_hello(_ext(0x0D, b"\x00\x00")), ClientHelloReason.BAD_EXTENSION),
    (_client_hello(_ext(0x0A, b"")), ClientHelloReason.BAD_EXTENSION),
    (_client_hello(_ext(0x0B, b"\x02\x00")), ClientHelloReason.BAD_EXTENSION),
    # One byte per record: a real client never needs more than MAX_RECORDS.
    (
        b"".join(_record(bytes([b])) for b in b"\x01\x00\x02\x00" + bytes(100)),
        ClientHelloReason.BAD_RECORD,
    ),
]


@pytest.mark.parametrize(("data", "reason"), BAD)
def test_malformed(data: bytes, reason: ClientHelloReason) -> None:
    with pytest.raises(ClientHelloError) as err:
        parse_client_hello(data)
    assert err.value.reason == reason
    assert str(reason) in str(err.value)


def test_size_cap() -> None:
    pad = _ext(0x15, bytes(MAX_CLIENT_HELLO - 100))
    message = _client_hello(pad)[5:]  # larger than one record: re-cut it
    data = b"".join(_record(message[i : i + 16000]) for i in range(0, len(message), 16000))
    assert parse_client_hello(data).size == len(data)
    pad = _ext(0x15, bytes(MAX_CLIENT_HELLO))
    message = _client_hello(pad)[5:]
    with pytest.raises(ClientHelloError) as err:
        parse_client_hello(_record(message[:16000]))
    assert err.value.reason == ClientHelloReason.TOO_LARGE


# --- fuzzing: every input gives a ClientHello, NeedMore or ClientHelloError, quickly -------


def _parser_lines(parse: Callable[[], object]) -> int:
    """The lines of edged/clienthello.py that `parse()` executes: a measure of its work that,
    unlike time, does not depend on what else the machine is doing."""
    count = 0

    def trace(frame: FrameType, event: str, _arg: object) -> object:
        nonlocal count
        if frame.f_code.co_filename != clienthello.__file__:
            return None
        if event == "line":
            count += 1
        return trace

    previous = sys.gettrace()  # hypothesis may be tracing too
    sys.settrace(trace)
    try:
        parse()
    finally:
        sys.settrace(previous)
    return count


def _outcome(data: bytes) -> str:
    result = "hello"

    def parse() -> None:
        nonlocal result
        try:
            parse_client_hello(data)
        except NeedMore as more:
            assert more.need > len(data)
            result = "more"
        except ClientHelloError as exc:
            assert isinstance(exc.reason, ClientHelloReason)
            result = "error"

    # Linear in the input, never more (measured: ~2.5 lines per byte for a hello of 3,000
    # empty extensions, under 1 per byte for real ones): a loop that went back over the
    # input would exceed it at once.
    assert _parser_lines(parse) <= 1000 + 8 * len(data)
    return result


FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = [v[0] for v in VECTORS] + [_client_hello(_sni(b"a.test") + _ext(0x10, b"\x00\x03\x02h2"))]


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    _outcome(data)


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_behind_a_handshake_header(data: bytes) -> None:
    _outcome(
        b"\x16\x03\x01"
        + struct.pack("!H", len(data) + 4)
        + b"\x01"
        + len(data).to_bytes(3, "big")
        + data
    )


def _mutations() -> st.SearchStrategy[bytes]:
    def mutate(seed: bytes, edits: list[tuple[int, int, int]]) -> bytes:
        data = bytearray(seed)
        for kind, pos, value in edits:
            pos %= len(data) + 1
            if kind == 0 and pos < len(data):
                data[pos] = value  # overwrite
            elif kind == 1:
                data.insert(pos, value)
            elif pos < len(data):
                del data[pos]
        return bytes(data)

    edit = st.tuples(st.integers(0, 2), st.integers(0, 4096), st.integers(0, 255))
    return st.builds(mutate, st.sampled_from(SEEDS), st.lists(edit, min_size=1, max_size=8))


@FUZZ
@given(_mutations())
def test_fuzz_mutated_real_hellos(data: bytes) -> None:
    _outcome(data)


@FUZZ
@given(st.sampled_from(SEEDS), st.data())
def test_fuzz_truncated_and_refragmented(seed: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(seed) - 1))
    assert _outcome(seed[:cut]) == "more"
    sizes = data.draw(st.lists(st.integers(1, 300), max_size=6))
    whole = refragment(seed, sizes)
    assert _outcome(whole) == "hello"
    assert _fields(parse_client_hello(whole)) | {"size": 0} == _fields(parse_client_hello(seed)) | {
        "size": 0
    }


def test_fuzz_captured_prefixes_and_flips(captured: dict[str, bytes]) -> None:
    """Every prefix of each captured hello asks for more; every single-byte flip of it is
    either parsed or rejected."""
    outcomes: set[str] = set()
    for data in captured.values():
        for cut in range(len(data)):
            assert _outcome(data[:cut]) == "more"
        for pos in range(len(data)):
            for flip in (0x01, 0x80, 0xFF):
                mutated = bytearray(data)
                mutated[pos] ^= flip
                outcomes.add(_outcome(bytes(mutated)))
    assert outcomes == {"hello", "more", "error"}
