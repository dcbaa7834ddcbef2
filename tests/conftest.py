"""Shared test fixtures: uvloop, free ports, a recording backend, edged started in-process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import socket
import ssl
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop

from edged.certs import CertBundle
from edged.counters import Counters
from edged.daemon import Daemon
from edged.http01 import ChallengeBoard
from edged.listen import LISTEN_BACKLOG
from edged.proxy_header import V2_SIGNATURE
from edged.renewer import Renewer
from edged.sni import Route
from edged.tlsalpn import AlpnChallengeBoard
from tests.pebble import Pebble, start_pebble
from tests.pki import make_ca, make_intermediate, make_leaf, write_pair
from tests.ports import free_port
from tests.redis_server import redis_server, redis_tls_server  # noqa: F401  (fixtures for every test module)


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Callable[[], Any]]:
    # edged runs on uvloop in production: test on it too.
    return {"uvloop": uvloop.new_event_loop}


def write_process_config(
    tmp_path: Path,
    body: str,
    *,
    https: int = 0,
    http: tuple[int, ...] = (),
    store: str = "store",
    edged_extra: str = "",
) -> Path:
    """edged.toml for edged run as a process: `store` (default "store"), TLS on
    127.0.0.1:`https` (a free port by default), HTTP on 127.0.0.1:`http` ports, no metrics or
    admin; `edged_extra` adds [edged] keys; then `body`."""
    config = tmp_path / "edged.toml"
    config.write_text(
        textwrap.dedent(f"""
            [edged]
            store = "{store}"
            {edged_extra}
            [listen]
            https = ["127.0.0.1:{https or free_port()}"]
            http = {json.dumps([f"127.0.0.1:{p}" for p in http])}
            metrics = ""
            admin = ""
        """)
        + textwrap.dedent(body)
    )
    return config


@dataclass
class BackendConn:
    data: bytearray = field(default_factory=bytearray)
    raw: bytearray = field(default_factory=bytearray)  # every byte, PROXY header included
    eof: asyncio.Event = field(default_factory=asyncio.Event)
    writer: asyncio.StreamWriter | None = None


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, BackendConn], Any]


async def http_handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: BackendConn, name: str
) -> None:
    """Answers each HTTP request (after an optional PROXY header) with `name` and the Host."""
    header_done = False
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            conn.eof.set()
            return
        conn.raw += chunk
        conn.data += chunk
        if not header_done:
            if conn.data.startswith(V2_SIGNATURE):
                if len(conn.data) < 16:
                    continue
                del conn.data[: 16 + int.from_bytes(conn.data[14:16], "big")]
            elif conn.data.startswith(b"PROXY "):
                if b"\r\n" not in conn.data:
                    continue
                del conn.data[: conn.data.index(b"\r\n") + 2]
            header_done = True
        while b"\r\n\r\n" in conn.data:
            head, _, rest = bytes(conn.data).partition(b"\r\n\r\n")
            conn.data[:] = rest
            host = b""
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"host:"):
                    host = line[5:].strip()
            body = b"backend=" + name.encode() + b" host=" + host + b"\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()


@dataclass
class Backend:
    """A real TCP server on loopback recording every byte each connection receives."""

    port: int
    conns: list[BackendConn]
    server: asyncio.AbstractServer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def spawn_edged(config: Path, log: Path) -> asyncio.subprocess.Process:
    """`edged run --config CONFIG` as a real process, its stderr written to `log`."""
    with log.open("wb") as err:
        return await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("edged")), "run", "--config", str(config),
            stderr=err,
        )  # fmt: skip


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes from a blocking socket (ConnectionError if it closes first)."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


@contextlib.asynccontextmanager
async def run_backend(
    handler: Handler | None = None, name: str = "b1", ssl_ctx: ssl.SSLContext | None = None
) -> AsyncIterator[Backend]:
    conns: list[BackendConn] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = BackendConn(writer=writer)
        conns.append(conn)
        try:
            if handler is None:
                await http_handler(reader, writer, conn, name)
            else:
                await handler(reader, writer, conn)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=ssl_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Backend(port, conns, server)
    finally:
        server.close()


@dataclass
class Edged:
    daemon: Daemon
    config_path: Path
    port: int
    task: asyncio.Task[int]

    def route(self, name: str) -> Route | None:
        return self.daemon.index.lookup(name)


@contextlib.asynccontextmanager
async def run_edged(
    tmp_path: Path,
    body: str,
    port: int | None = None,
    http: tuple[int, ...] = (),
    admin: str = "",
    metrics: str = "",
    store: str = "store",
    edged_extra: str = "",
) -> AsyncIterator[Edged]:
    """Start edged in this event loop with `body` (sites, tls…), a free https port and the
    plain-HTTP listeners on 127.0.0.1:`http` ports; `edged_extra` adds [edged] keys."""
    port = port or free_port()
    config_path = tmp_path / "edged.toml"
    head = f"""
        [edged]
        store = "{store}"
        drain_timeout = 2
        {edged_extra}
        [listen]
        https = ["127.0.0.1:{port}"]
        http = {json.dumps([f"127.0.0.1:{p}" for p in http])}
        metrics = "{metrics}"
        admin = "{admin}"
    """
    config_path.write_text(textwrap.dedent(head) + textwrap.dedent(body))
    daemon = Daemon(config_path)
    task = asyncio.create_task(daemon.run(install_signals=False))
    ready = asyncio.create_task(daemon.ready.wait())
    await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if not daemon.ready.is_set():
        ready.cancel()
        raise RuntimeError(f"edged did not start (exit {task.result() if task.done() else '?'})")
    try:
        yield Edged(daemon, config_path, port, task)
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0


@dataclass
class Proc:
    returncode: int
    stdout: str
    stderr: str


async def run_cmd(*args: str, stdin: bytes = b"", limit: float = 20) -> Proc:
    proc = await asyncio.create_subprocess_exec(
        *args,
        # No input: stdin closed from the start (writing to the pipe of a process that already
        # exited raises under uvloop).
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin or None), limit)
    assert proc.returncode is not None
    return Proc(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def peer_cn(s_client_stderr: str) -> str:
    """The CN of the certificate `openssl s_client -brief` reports ("" if none)."""
    match = re.search(r"^Peer certificate:.*?CN\s*=\s*([^,/\n]+)", s_client_stderr, re.M)
    return match.group(1).strip() if match else ""


async def s_client(port: int, servername: str | None, *extra: str) -> Proc:
    """openssl s_client against edged; stdin closed at once (-ign_eof keeps reading)."""
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief"]
    args += ["-servername", servername] if servername else ["-noservername"]
    return await run_cmd(*args, *extra)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, an intermediate and leaf certificates written as files."""
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca("Test Root CA")
    inter = make_intermediate(ca, "Test Intermediate")
    (d / "ca.pem").write_bytes(ca.cert_pem)
    out: dict[str, Path] = {"dir": d, "ca": d / "ca.pem"}
    leaves = {
        "one": (["one.example.test"], "ecdsa-p256"),
        "two": (["two.example.test"], "ecdsa-p256"),
        "wild": (["*.wild.example.test", "wild.example.test"], "ecdsa-p256"),
        "fallback": (["fallback.example.test"], "ecdsa-p256"),
        "rsa": (["rsa.example.test"], "rsa-2048"),
    }
    for stem, (names, key_type) in leaves.items():
        leaf = make_leaf(inter, names, key_type=key_type)
        cert, key = write_pair(d, stem, leaf, [inter])
        out[stem + "_cert"], out[stem + "_key"] = cert, key
    return out


async def curl(port: int, host: str, cafile: Path, *extra: str) -> Proc:
    """curl https://host:port/ through edged on loopback, HTTP/1.1, verified against `cafile`."""
    return await run_cmd(
        "curl", "-sS", "--http1.1", "--cacert", str(cafile), *extra,
        "--resolve", f"{host}:{port}:127.0.0.1", f"https://{host}:{port}/",
    )  # fmt: skip


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[Pebble]:
    """Real Pebble + pebble-challtestsrv on free ports (HTTP-01 validated on pebble.http_port)."""
    p = start_pebble(tmp_path / "pebble")
    try:
        yield p
    finally:
        p.stop()


async def listen_backlogs(port: int) -> list[int]:
    """The accept-queue size of each socket listening on `port` (`ss`: Send-Q of LISTEN)."""
    out = await run_cmd("ss", "-ltnH", f"sport = :{port}")
    assert out.returncode == 0, out.stderr
    return [int(line.split()[2]) for line in out.stdout.splitlines() if line.strip()]


async def edged_backlog() -> int:
    """The accept queue edged's listeners should have: LISTEN_BACKLOG, capped by the kernel."""
    somaxconn = await asyncio.to_thread(Path("/proc/sys/net/core/somaxconn").read_text)
    return min(LISTEN_BACKLOG, int(somaxconn))


@pytest.fixture(autouse=True)
def _unfreeze_gc() -> Iterator[None]:
    """edged, started in this process, freezes what is alive once a state is installed
    (edged.heap.freeze_long_lived): the test's own objects too, whose cycles would then never
    be collected. Each test ends with everything back in the collector's reach."""
    yield
    gc.unfreeze()


def new_renewer(
    serving: Callable[[str], CertBundle | None] = lambda _name: None,
    counters: Counters | None = None,
) -> Renewer:
    """A Renewer outside a daemon (nothing installed when it issues), serving what `serving`
    says for each name."""

    async def installed(_name: str) -> None:
        return None

    return Renewer(
        board=ChallengeBoard(),
        alpn_board=AlpnChallengeBoard(),
        counters=counters if counters is not None else Counters(),
        on_installed=installed,
        serving=serving,
    )
