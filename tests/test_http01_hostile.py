"""Port 80 under hostile requests: only a pending token, asked for with one of its names, is ever
answered; bad requests are refused and the listener keeps serving.

The app runs behind the production HttpListeners (same header limits as the daemon) on a free
port; requests are written byte for byte on raw sockets where the exact bytes matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edged.config import parse_address, parse_config
from edged.http01 import MAX_SHARED_LOOKUPS, ChallengeBoard, Http01App, HttpListeners
from edged.store.files import FileStore
from edged.store.redis import RedisStore
from tests.conftest import free_port
from tests.redis_server import RedisServer

SITES = """
[listen]
https = ["127.0.0.1:8443"]
[[site]]
names = ["a.test", "www.a.test"]
backend = "127.0.0.1:9"
[[site]]
names = ["b.test", "*.wild.test"]
backend = "127.0.0.1:9"
"""
TOKEN = "tok_A-1"
KEY_AUTH = "tok_A-1.thumbprint"
OTHER = "tokB"
OTHER_AUTH = "tokB.thumbprint"
PREFIX = "/.well-known/acme-challenge/"


@dataclass
class Port80:
    port: int
    app: Http01App
    board: ChallengeBoard
    listeners: HttpListeners


@pytest.fixture
async def port80() -> AsyncIterator[Port80]:
    config = parse_config(SITES, Path("/etc/edged/edged.toml"))
    board = ChallengeBoard()
    board.add(TOKEN, KEY_AUTH, ["a.test"])
    board.add(OTHER, OTHER_AUTH, ["b.test"])
    app = Http01App(board, lambda: config)
    listeners = HttpListeners(app)
    port = free_port()
    await listeners.sync([parse_address(f"127.0.0.1:{port}", listen=True)])
    try:
        yield Port80(port, app, board, listeners)
    finally:
        await listeners.close()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_reply(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    match = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    assert match, f"not an HTTP response: {raw[:200]!r}"
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return Reply(int(match.group(1)), headers, body)


async def raw_request(port: int, data: bytes, *, body_chunks: int = 0) -> Reply:
    """Send `data` (and `body_chunks` more 64 KiB chunks while the server lets us), read to EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            for _ in range(body_chunks):
                writer.write(b"x" * 65536)
                await asyncio.wait_for(writer.drain(), 5)
        raw = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10):
                while chunk := await reader.read(65536):
                    raw += chunk
                    if b"\r\n\r\n" in raw and _complete(raw):
                        break
        return parse_reply(raw)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _complete(raw: bytes) -> bool:
    head, _, body = raw.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return match is not None and len(body) >= int(match.group(1))


async def get(port: int, path: str, host: str | None, extra: str = "") -> Reply:
    host_line = f"Host: {host}\r\n" if host is not None else ""
    request = f"GET {path} HTTP/1.1\r\n{host_line}{extra}Connection: close\r\n\r\n"
    return await raw_request(port, request.encode("latin-1"))


def refused(reply: Reply) -> bool:
    """Not answered: no key authorization anywhere in the reply."""
    return (
        reply.status != 200
        and KEY_AUTH.encode() not in reply.body
        and OTHER_AUTH.encode() not in reply.body
    )


async def still_serving(port: int) -> None:
    reply = await get(port, PREFIX + TOKEN, "a.test")
    assert (reply.status, reply.body) == (200, KEY_AUTH.encode())


# --- tokens -----------------------------------------------------------------------------------


async def test_only_pending_token_for_its_name(port80: Port80) -> None:
    port = port80.port
    await still_serving(port)
    assert refused(await get(port, PREFIX + "unknown", "a.test"))
    assert refused(await get(port, PREFIX + OTHER, "a.test"))  # token of another name
    assert refused(await get(port, PREFIX + TOKEN, "b.test"))
    assert refused(await get(port, PREFIX + TOKEN, "www.a.test"))  # same site, not the order's
    assert refused(await get(port, PREFIX + TOKEN, "evil.test"))
    assert refused(await get(port, PREFIX + TOKEN, None))  # no Host at all
    assert refused(await get(port, PREFIX + TOKEN.lower(), "a.test"))  # tokens are exact
    assert refused(await get(port, PREFIX, "a.test"))  # empty token
    assert refused(await get(port, PREFIX + TOKEN + "x", "a.test"))
    port80.board.remove(TOKEN)
    assert refused(await get(port, PREFIX + TOKEN, "a.test"))
    assert port80.app.answered == 1


async def test_expired_token_is_not_answered() -> None:
    now = [100.0]
    board = ChallengeBoard(clock=lambda: now[0])
    board.add(TOKEN, KEY_AUTH, ["a.test"], ttl=10)
    assert board.lookup(TOKEN, "a.test") == KEY_AUTH
    now[0] = 111.0
    assert board.lookup(TOKEN, "a.test") is None
    assert len(board) == 0


@pytest.mark.parametrize(
    "path",
    [
        PREFIX + "../" + TOKEN,
        PREFIX + "../../../../etc/passwd",
        PREFIX + "%2e%2e/%2e%2e/etc/passwd",
        PREFIX + "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        PREFIX + "..%2F..%2Fetc%2Fpasswd",
        PREFIX + "..%5c..%5cetc%5cpasswd",
        PREFIX + TOKEN + "/..",
        PREFIX + TOKEN + "%2f",
        PREFIX + TOKEN + "%00",
        PREFIX + TOKEN + "%0d%0aX-Injected:%201",
        PREFIX + "%252e%252e%252fetc",
        PREFIX + ".",
        PREFIX + "..",
        "/.well-known/acme-challenge%2f" + TOKEN,
        "/.well-known/./acme-challenge/../../etc/passwd",
        "//.well-known/acme-challenge/" + OTHER,
        PREFIX + OTHER + ";" + TOKEN,
        PREFIX + OTHER + "?" + TOKEN,
    ],
)
async def test_traversal_in_the_token_is_never_answered(port80: Port80, path: str) -> None:
    reply = await get(port80.port, path, "a.test")
    assert refused(reply), (path, reply)
    assert b"root:" not in reply.body
    assert "x-injected" not in reply.headers
    if reply.status in (301, 302, 307, 308):
        # Normalised away from the challenge path: a redirect to the same site, nothing else.
        assert reply.headers["location"].startswith("https://a.test:8443/")
    await still_serving(port80.port)


# --- Host -------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["A.TEST", "a.test.", "a.test:80", "A.Test.:8080", "a.test:"])
async def test_host_with_port_case_and_trailing_dot(port80: Port80, host: str) -> None:
    reply = await get(port80.port, PREFIX + TOKEN, host)
    assert (reply.status, reply.body) == (200, KEY_AUTH.encode())


@pytest.mark.parametrize(
    "host",
    [
        "evil.test",
        "a.test.evil.test",
        "evil.test/a.test",
        "a.test@evil.test",
        "evil.test#a.test",
        "evil.test?a.test",
        "a.test\\@evil.test",
        "[::1]",
        "[::1]:80",
        "127.0.0.1",
        "*.wild.test",
        "x.y.wild.test",
        "a..test",
        "",
        "a.test:80:80",
        "a.test .evil.test",
        "xn--a-test",
        "%61.test",
    ],
)
async def test_redirect_only_to_site_names(port80: Port80, host: str) -> None:
    reply = await get(port80.port, "/some/page?q=1", host)
    assert reply.status in (400, 404), (host, reply)
    assert "location" not in reply.headers
    assert refused(await get(port80.port, PREFIX + TOKEN, host))


async def test_redirect_for_site_names_stays_on_the_name(port80: Port80) -> None:
    for host, expected in [
        ("WWW.A.TEST.", "https://www.a.test:8443/p?q=1"),
        ("b.test:80", "https://b.test:8443/p?q=1"),
        ("x.wild.test", "https://x.wild.test:8443/p?q=1"),
    ]:
        reply = await get(port80.port, "/p?q=1", host)
        assert (reply.status, reply.headers.get("location")) == (301, expected), host
    # A path that looks like an authority stays a path on our host (no //evil.test).
    reply = await get(port80.port, "//evil.test/x", "a.test")
    location = reply.headers.get("location", "")
    assert reply.status == 404 or location.startswith("https://a.test:8443/"), reply


@pytest.mark.parametrize(
    ("target", "path"),
    [
        # Escapes and dot segments as sent: decoded, "/%2e%2e/admin" would become "/admin" and
        # %2F, %3F, %23 would turn into a separator, a query and a fragment.
        ("/%2e%2e/admin", "/%2e%2e/admin"),
        ("/a/../b/./c", "/a/../b/./c"),
        ("/a%2Fb%3Fc%23d?x=%2F&y=%26", "/a%2Fb%3Fc%23d?x=%2F&y=%26"),
        ("/%7e%7E/p?a=b?c", "/%7e%7E/p?a=b?c"),
        # Authority-looking paths stay paths on our host.
        ("//evil.test/x", "//evil.test/x"),
        ("///evil.test", "///evil.test"),
        ("/\\evil.test", "/%5Cevil.test"),  # not a URI character: escaped, still a path
        ("/@evil.test", "/@evil.test"),
        # Absolute-form: its path and query as sent, never its host.
        ("http://evil.test/x%2Fy/../z?q=%2F", "/x%2Fy/../z?q=%2F"),
        ("https://evil.test//other.test/p", "//other.test/p"),
    ],
)
async def test_redirect_keeps_the_target_as_sent(port80: Port80, target: str, path: str) -> None:
    """The redirect names the resource the client asked for, byte for byte, on the Host's
    name: never another host."""
    reply = await get(port80.port, target, "a.test")
    assert (reply.status, reply.headers.get("location")) == (301, f"https://a.test:8443{path}")


async def test_two_host_headers_are_not_answered(port80: Port80) -> None:
    reply = await get(port80.port, PREFIX + TOKEN, "evil.test", extra="Host: a.test\r\n")
    assert refused(reply)
    await still_serving(port80.port)


# --- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["one_big_header", "long_request_line", "many_headers"])
async def test_huge_headers_refused_and_server_keeps_serving(port80: Port80, shape: str) -> None:
    if shape == "one_big_header":
        extra = "X-Big: " + "a" * 16384 + "\r\n"
        path = PREFIX + TOKEN
    elif shape == "long_request_line":
        extra = ""
        path = PREFIX + TOKEN + "?" + "q" * 16384
    else:
        extra = "".join(f"X-H{i}: {'v' * 100}\r\n" for i in range(2000))
        path = PREFIX + TOKEN
    reply = await get(port80.port, path, "a.test", extra)
    assert reply.status in (400, 413, 414, 431), reply
    assert refused(reply)
    await still_serving(port80.port)


@pytest.mark.parametrize("method", ["POST", "PUT"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_huge_body_to_the_challenge_path(port80: Port80, method: str, framing: str) -> None:
    if framing == "length":
        head = f"Content-Length: {100 * 1024 * 1024}\r\n"
    else:
        head = "Transfer-Encoding: chunked\r\n"
    request = (
        f"{method} {PREFIX}{TOKEN} HTTP/1.1\r\nHost: a.test\r\n{head}Connection: close\r\n\r\n"
    ).encode()
    if framing == "chunked":
        request += b"10000\r\n"
    reply = await raw_request(port80.port, request, body_chunks=64)  # up to 4 MiB
    assert reply.status in (404, 405, 413), reply
    assert refused(reply)
    await still_serving(port80.port)


async def test_unread_body_does_not_hold_the_listener(port80: Port80) -> None:
    """A client that starts a chunked upload and leaves must not keep the server busy (aiohttp
    lingers up to lingering_time reading the unread body): stopping the listener is prompt."""
    request = (
        f"POST {PREFIX}{TOKEN} HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        "10000\r\n"
    ).encode()
    assert refused(await raw_request(port80.port, request, body_chunks=4))
    await asyncio.wait_for(port80.listeners.close(), 5)  # aiohttp's default lingers 10 s


# --- many at once -----------------------------------------------------------------------------


async def test_200_concurrent_requests_only_valid_tokens_answered(port80: Port80) -> None:
    cases = [
        (PREFIX + TOKEN, "a.test", KEY_AUTH),
        (PREFIX + OTHER, "b.test", OTHER_AUTH),
        (PREFIX + TOKEN, "b.test", None),
        (PREFIX + OTHER, "a.test", None),
        (PREFIX + "nope", "a.test", None),
        (PREFIX + "../" + TOKEN, "evil.test", None),
        (PREFIX + TOKEN, "evil.test", None),
        ("/", "evil.test", None),
    ]
    jobs = [cases[i % len(cases)] for i in range(200)]
    replies = await asyncio.gather(*(get(port80.port, path, host) for path, host, _ in jobs))
    for (path, host, expected), reply in zip(jobs, replies, strict=True):
        if expected is None:
            assert refused(reply), (path, host, reply)
        else:
            assert (reply.status, reply.body) == (200, expected.encode()), (path, host)
    assert port80.app.answered == 50


# --- a fleet's shared tokens ------------------------------------------------------------------


async def test_random_tokens_while_redis_hangs_do_not_stall_the_daemon(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Random tokens miss the 1 s cache, so each one asks Redis. With Redis hung (SIGSTOP: it
    accepts, never answers) a flood must neither occupy the loop's default executor (reloads,
    certificate loads and renewals run there) nor queue behind Redis timeouts nor write a log
    line per request; the node's own tokens are still answered, other nodes' again once Redis
    is back."""
    caplog.set_level(logging.INFO, logger="edged.http01")
    store = RedisStore(redis_server.url, FileStore(tmp_path / "local"))
    config = parse_config(SITES, Path("/etc/edged/edged.toml"))
    board = ChallengeBoard()
    board.add(TOKEN, KEY_AUTH, ["a.test"])
    board.shared = store
    listeners = HttpListeners(Http01App(board, lambda: config))
    port = free_port()
    await listeners.sync([parse_address(f"127.0.0.1:{port}", listen=True)])
    try:
        await _flood_while_redis_hangs(redis_server, port, caplog)
        # Redis is back and every slot is free again: another node's token is answered.
        await asyncio.to_thread(store.put_token, "fromB", "fromB.thumb", ["b.test"], 60)
        for _ in range(150):  # the hung lookups end with Redis's answers or their timeouts
            reply = await get(port, PREFIX + "fromB", "b.test")
            if reply.status == 200:
                break
            await asyncio.sleep(0.2)
        assert (reply.status, reply.body) == (200, b"fromB.thumb")
    finally:
        await listeners.close()
        store.close()


async def _flood_while_redis_hangs(
    redis_server: RedisServer, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        flood = [
            asyncio.create_task(get(port, PREFIX + secrets.token_urlsafe(16), "a.test"))
            for _ in range(300)
        ]
        await asyncio.sleep(0.5)  # the requests are in
        started = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 5)
        # The default executor is free: milliseconds, 2 s of room for a loaded CI machine
        # (before the fix its queue held this call ~100 s, past the wait_for's 5 s).
        assert time.monotonic() - started < 2.0
        await still_serving(port)
        # All but the lookups that got a slot are refused at once.
        done, _ = await asyncio.wait(flood, timeout=1)
        assert len(done) >= 300 - MAX_SHARED_LOOKUPS
        assert all(task.result().status == 404 for task in done)
        lines = [r for r in caplog.records if r.name == "edged.http01"]
        assert len(lines) <= 3, [r.getMessage() for r in lines]
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
        replies = await asyncio.wait_for(asyncio.gather(*flood, return_exceptions=True), 60)
    assert all(not isinstance(r, BaseException) and r.status == 404 for r in replies)


# --- http = "forward" -------------------------------------------------------------------------


@dataclass
class RawBackend:
    """A backend that reads a request's head, sends `answer` (by default nothing: a hung
    backend) and nothing more; records each request head and when edged closed the
    connection."""

    port: int
    requests: list[bytes]
    closed: list[float]
    got_request: asyncio.Event
    answer: bytes = b""  # sent after the request (then nothing more)


@pytest.fixture
async def raw_backend() -> AsyncIterator[RawBackend]:
    backend = RawBackend(free_port(), [], [], asyncio.Event())
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        data = b""
        with contextlib.suppress(ConnectionError):
            while b"\r\n\r\n" not in data and (chunk := await reader.read(65536)):
                data += chunk
            backend.requests.append(data)
            backend.got_request.set()
            writer.write(backend.answer)
            while await reader.read(65536):  # until edged closes its side
                pass
        backend.closed.append(time.monotonic())
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", backend.port)
    try:
        yield backend
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def forwarding(backend_port: int, edged_extra: str = "") -> AsyncIterator[int]:
    """Port 80 with site f.test forwarded to 127.0.0.1:`backend_port`; yields the port."""
    text = f"""
[edged]
{edged_extra}
[listen]
https = ["127.0.0.1:8443"]
[[site]]
names = ["f.test"]
backend = "127.0.0.1:{backend_port}"
http = "forward"
"""
    config = parse_config(text, Path("/etc/edged/edged.toml"))
    listeners = HttpListeners(Http01App(ChallengeBoard(), lambda: config))
    port = free_port()
    await listeners.sync([parse_address(f"127.0.0.1:{port}", listen=True)])
    try:
        yield port
    finally:
        await asyncio.wait_for(listeners.close(), 10)


async def test_forward_client_gone_ends_the_backend_request(raw_backend: RawBackend) -> None:
    """A client that gives up on a hung backend takes the backend connection with it."""
    async with forwarding(raw_backend.port) as port:
        for _ in range(5):
            raw_backend.got_request.clear()
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /x HTTP/1.1\r\nHost: f.test\r\nConnection: close\r\n\r\n")
            await asyncio.wait_for(raw_backend.got_request.wait(), 5)
            gone = time.monotonic()
            writer.close()
            await writer.wait_closed()
            for _ in range(50):
                if len(raw_backend.closed) == len(raw_backend.requests):
                    break
                await asyncio.sleep(0.05)
            assert len(raw_backend.closed) == len(raw_backend.requests), "backend still held"
            assert raw_backend.closed[-1] - gone < 2


async def test_forward_raw_backend_times_out(raw_backend: RawBackend) -> None:
    """A backend that never answers gets `idle_timeout` (as TLS connections do): then 504."""
    async with forwarding(raw_backend.port, "idle_timeout = 1") as port:
        started = time.monotonic()
        reply = await asyncio.wait_for(get(port, "/x", "f.test"), 10)
        assert reply.status == 504
        assert 0.9 < time.monotonic() - started < 5
        for _ in range(50):
            if raw_backend.closed:
                break
            await asyncio.sleep(0.05)
        assert len(raw_backend.closed) == 1


@pytest.mark.parametrize("chunked", [False, True])
async def test_forward_backend_stalling_mid_body_cuts_the_connection(
    raw_backend: RawBackend, chunked: bool
) -> None:
    """Headers and part of the body, then nothing: after `idle_timeout` the client's connection
    is closed, so the short body cannot pass for a whole one."""
    raw_backend.answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        if chunked
        else b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello"
    )
    async with forwarding(raw_backend.port, "idle_timeout = 1") as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: f.test\r\n\r\n")  # keep-alive
        raw = await asyncio.wait_for(reader.read(), 5)  # to EOF: edged closed the connection
        writer.close()
        assert raw.startswith(b"HTTP/1.1 200") and b"hello" in raw, raw
        head, _, body = raw.partition(b"\r\n\r\n")
        if chunked:
            # Relayed chunked (aiohttp decoded the backend's chunks): no last chunk came.
            assert b"transfer-encoding: chunked" in head.lower(), raw
            assert not raw.endswith(b"0\r\n\r\n"), raw
        else:
            # The backend's Content-Length, and fewer bytes than it promises.
            assert b"content-length: 100" in head.lower(), raw
            assert b"transfer-encoding" not in head.lower(), raw
            assert body == b"hello", raw


OK_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a%2Fb/%2e%2e/secret%23frag?x=1&y=%2e%2e", "/a%2Fb/%2e%2e/secret%23frag?x=1&y=%2e%2e"),
        ("/a/../b/./c//d?q=a+b&q=%2F", "/a/../b/./c//d?q=a+b&q=%2F"),
        ("/%7e%7E/p?a=b?c", "/%7e%7E/p?a=b?c"),
        ("http://f.test/x/../y?q", "/x/../y?q"),  # absolute-form: its path, as sent
    ],
)
async def test_forward_sends_the_target_as_received(
    raw_backend: RawBackend, target: str, expected: str
) -> None:
    """The backend decides on the path edged saw: no dot segments resolved, no escapes
    decoded or re-encoded."""
    raw_backend.answer = OK_CLOSE
    async with forwarding(raw_backend.port) as port:
        reply = await get(port, target, "f.test")
    assert reply.status == 200 and b"ok" in reply.body
    line = raw_backend.requests[0].split(b"\r\n")[0].decode()
    assert line == f"GET {expected} HTTP/1.1"


async def test_forward_sends_only_the_clients_headers(raw_backend: RawBackend) -> None:
    """No Accept, Accept-Encoding, User-Agent or Content-Type the client did not send (the
    backend would compress or vary on them); repeated headers stay repeated."""
    raw_backend.answer = OK_CLOSE
    async with forwarding(raw_backend.port) as port:
        reply = await raw_request(
            port,
            b"POST /p HTTP/1.1\r\nHost: f.test\r\nX-Dup: 1\r\nX-Dup: 2\r\n"
            b"X-Forwarded-For: 192.0.2.1\r\nContent-Length: 4\r\nConnection: close\r\n\r\n"
            b"body",
        )
    assert reply.status == 200
    head = raw_backend.requests[0].split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    names = [line.partition(":")[0].lower() for line in head[1:]]
    for added in ("accept", "accept-encoding", "user-agent", "content-type"):
        assert added not in names, head
    assert [h for h in head if h.lower().startswith("x-dup:")] == ["X-Dup: 1", "X-Dup: 2"]
    assert "Host: f.test" in head
    assert "X-Forwarded-For: 192.0.2.1, 127.0.0.1" in head
    assert names.count("x-forwarded-for") == 1


def header_lines(head: bytes) -> list[tuple[str, str]]:
    """A message head's header fields as (lowercase name, value), in order."""
    lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]


HOP_BY_HOP = ["keep-alive", "proxy-connection", "te", "trailer", "upgrade", "x-hop", "x-hop2"]


async def test_forward_drops_hop_by_hop_headers(raw_backend: RawBackend) -> None:
    """RFC 9110 section 7.6.1: Connection, the fields it names and the standard hop-by-hop
    fields concern one connection only; neither the backend nor the client gets the other
    side's (the end-to-end fields go on)."""
    raw_backend.answer = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close, X-Hop\r\n"
        b"connection: x-HOP2\r\nX-Hop: 1\r\nX-Hop2: 2\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\nUpgrade: h2c\r\n"
        b"X-End: kept\r\n\r\nok"
    )
    async with forwarding(raw_backend.port) as port:
        reply = await raw_request(
            port,
            b"GET /p HTTP/1.1\r\nHost: f.test\r\nConnection: close, X-Hop\r\n"
            b"CONNECTION: x-hop2 , Keep-Alive,X-Forwarded-For\r\nX-Forwarded-For: 192.0.2.1\r\n"
            b"X-Hop: 1\r\nX-Hop2: 2\r\nKeep-Alive: 5\r\n"
            b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\n"
            b"Upgrade: h2c\r\nX-End: kept\r\n\r\n",
        )
    assert reply.status == 200 and b"ok" in reply.body
    sent = header_lines(raw_backend.requests[0])
    names = [name for name, _ in sent]
    for name in HOP_BY_HOP:
        assert name not in names, sent
    # aiohttp's own Connection for its hop only, never the client's tokens.
    assert all("hop" not in value.lower() for name, value in sent if name == "connection"), sent
    assert ("x-end", "kept") in sent and ("host", "f.test") in sent
    # An X-Forwarded-For named in Connection was for our hop: only our own goes on.
    assert [value for name, value in sent if name == "x-forwarded-for"] == ["127.0.0.1"]
    for name in HOP_BY_HOP:
        assert name not in reply.headers, reply.headers
    assert "hop" not in reply.headers.get("connection", "").lower(), reply.headers
    assert reply.headers.get("x-end") == "kept"


async def test_forward_keeps_the_clients_content_length(raw_backend: RawBackend) -> None:
    """A body the client sent with its length reaches the backend with that length, not
    re-chunked (a backend may refuse chunked request bodies)."""
    raw_backend.answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    async with forwarding(raw_backend.port) as port:
        reply = await raw_request(
            port,
            b"POST /p HTTP/1.1\r\nHost: f.test\r\nContent-Length: 5\r\n"
            b"Content-Type: text/plain\r\nConnection: close\r\n\r\nhello",
        )
    assert reply.status == 200 and b"ok" in reply.body
    sent = header_lines(raw_backend.requests[0])
    assert ("content-length", "5") in sent, sent
    assert "transfer-encoding" not in [name for name, _ in sent], sent


async def forwarded_raw(port: int, request: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Send `request` (which asks for Connection: close) to edged; its reply's head fields and
    body, read to EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw
    return header_lines(raw), raw.partition(b"\r\n\r\n")[2]


async def test_forward_relays_the_backends_reply_as_sent(raw_backend: RawBackend) -> None:
    """The client gets the backend's fields and body: its Content-Length (not re-chunked), its
    own Server and Date, and no Content-Type or Server the backend did not send (aiohttp would
    add "application/octet-stream" and its own name). A missing Date is added: RFC 9110
    section 6.6.1 asks that of anything forwarding a reply without one."""
    get_p = b"GET /p HTTP/1.1\r\nHost: f.test\r\nConnection: close\r\n\r\n"
    async with forwarding(raw_backend.port) as port:
        raw_backend.answer = (
            b"HTTP/1.1 200 OK\r\nServer: backend/1\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
            b"Content-Length: 5\r\nConnection: close\r\n\r\nhello"
        )
        fields, body = await forwarded_raw(port, get_p)
        assert body == b"hello"
        assert [(k, v) for k, v in fields if k in ("server", "date", "content-length")] == [
            ("server", "backend/1"),
            ("date", "Mon, 01 Jan 2024 00:00:00 GMT"),
            ("content-length", "5"),
        ], fields
        names = [name for name, _ in fields]
        assert "content-type" not in names and "transfer-encoding" not in names, fields

        raw_backend.answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        fields, body = await forwarded_raw(port, get_p)
        names = [name for name, _ in fields]
        assert body == b"ok" and ("content-length", "2") in fields, fields
        assert "content-type" not in names and "server" not in names, fields
        assert names.count("date") == 1, fields

        # HEAD: the length of what a GET would get, and no body.
        raw_backend.answer = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 1234\r\n"
            b"Connection: close\r\n\r\n"
        )
        fields, body = await forwarded_raw(port, get_p.replace(b"GET", b"HEAD"))
        assert body == b""
        assert ("content-length", "1234") in fields and ("content-type", "text/html") in fields


@pytest.mark.parametrize(
    "host", ["f.test:evil", "f.test:80x", "f.test:1@evil.test", "f.test:80:80", "f.test: 80"]
)
async def test_forward_refuses_a_host_with_a_bad_port(raw_backend: RawBackend, host: str) -> None:
    """Host is a name and an optional numeric port; anything else is a bad request, never
    passed on to the backend (nor redirected)."""
    raw_backend.answer = OK_CLOSE
    async with forwarding(raw_backend.port) as port:
        reply = await get(port, "/x", host)
        assert reply.status == 400, reply
        assert "location" not in reply.headers
        assert raw_backend.requests == []
        # A good one with a port goes on unchanged.
        assert (await get(port, "/x", "F.test:8080")).status == 200
    assert b"\r\nHost: F.test:8080\r\n" in raw_backend.requests[0]


async def test_redirect_refuses_a_host_with_a_bad_port(port80: Port80) -> None:
    reply = await get(port80.port, "/p", "a.test:evil")
    assert reply.status == 400 and "location" not in reply.headers
    assert refused(await get(port80.port, PREFIX + TOKEN, "a.test:evil"))
    reply = await get(port80.port, "/p", "a.test:80")
    assert reply.headers.get("location") == "https://a.test:8443/p"
