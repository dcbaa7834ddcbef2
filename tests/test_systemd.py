"""edged under systemd, with real processes: sd_notify (READY, RELOADING, STATUS, WATCHDOG),
socket activation (LISTEN_FDS) with a restart that refuses no connection, and the second
signal that ends the drain at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import edged.daemon
from edged import systemd
from edged.config import parse_config
from edged.errors import ConfigError
from edged.listen import InheritedListeners
from tests.conftest import BackendConn, free_port, run_backend, run_edged
from tests.test_redis_store import wait_until

NAME = "one.example.test"
EDGED = str(Path(sys.executable).with_name("edged"))

# Puts the passed sockets at fds 3, 4, … and sets LISTEN_PID to its own pid before it becomes
# edged (exec keeps the pid), as systemd does for a socket-activated service.
ACTIVATE = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_FDNAMES"] = ":".join(f"s{i}" for i in range(len(fds)))
os.execv(sys.argv[2], sys.argv[2:])
"""


def site(pki: dict[str, Path], backend: str) -> str:
    return f"""
[[site]]
names = ["{NAME}"]
backend = "{backend}"
cert_file = "{pki["one_cert"]}"
key_file = "{pki["one_key"]}"
"""


def write_config(
    tmp_path: Path, pki: dict[str, Path], backend: str, https: Sequence[str], extra: str = ""
) -> Path:
    listen = ", ".join(f'"{a}"' for a in https)
    config = tmp_path / "edged.toml"
    config.write_text(
        textwrap.dedent(f"""
            [edged]
            store = "store"
            drain_timeout = 30
            {extra}
            [listen]
            https = [{listen}]
            http = []
            metrics = ""
            admin = ""
        """)
        + site(pki, backend)
    )
    return config


def listening_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    return sock


class Notify:
    """The NOTIFY_SOCKET end: every datagram edged sends, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.seen: list[str] = []

    async def next(self, limit: float = 20) -> str:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), limit)
        self.seen.append(data.decode())
        return self.seen[-1]

    async def until(self, prefix: str, limit: float = 20) -> str:
        """Skip to the next message starting with `prefix`."""
        deadline = time.monotonic() + limit
        while True:
            msg = await self.next(max(0.1, deadline - time.monotonic()))
            if msg.startswith(prefix):
                return msg

    def close(self) -> None:
        self.sock.close()


@dataclass
class Edged:
    proc: asyncio.subprocess.Process
    stderr: bytearray = field(default_factory=bytearray)
    reader: asyncio.Task[None] | None = None

    @property
    def log(self) -> str:
        return self.stderr.decode(errors="replace")


async def _collect(proc: asyncio.subprocess.Process, out: bytearray) -> None:
    assert proc.stderr is not None
    while chunk := await proc.stderr.read(65536):
        out += chunk


@contextlib.asynccontextmanager
async def start_edged(
    config: Path,
    env: dict[str, str],
    fds: Sequence[socket.socket] = (),
    args: Sequence[str] = (),
) -> AsyncIterator[Edged]:
    """`edged run` as a real process (socket-activated with `fds`), stderr collected; killed
    if the test leaves it running."""
    args = [EDGED, "run", "--config", str(config), *args]
    if fds:
        args = [sys.executable, "-c", ACTIVATE, ",".join(str(s.fileno()) for s in fds), *args]
    proc = await asyncio.create_subprocess_exec(
        *args,
        env={**os.environ, **env},
        stderr=asyncio.subprocess.PIPE,
        pass_fds=[s.fileno() for s in fds],
    )
    running = Edged(proc)
    running.reader = asyncio.create_task(_collect(proc, running.stderr))
    try:
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await running.reader
        print(f"--- edged stderr (exit {proc.returncode}):\n{running.log}")  # shown on failure


def client_context(pki: dict[str, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki["ca"]))


async def tls_request(port: int, ctx: ssl.SSLContext, limit: float = 30) -> bytes:
    """A full exchange through edged: handshake, one HTTP request, its response."""
    async with asyncio.timeout(limit):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=NAME
        )
        try:
            writer.write(f"GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length:")[1].split(b"\r\n")[0])
            return head + await reader.readexactly(length)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()


# --- watchdog and status -------------------------------------------------------------------


def test_watchdog_interval_follows_systemd_variables() -> None:
    me = str(os.getpid())
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None


async def test_notify_ready_status_watchdog_reload_stop(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    port = free_port()
    async with run_backend() as backend:
        config = write_config(tmp_path, pki, backend.address, [f"127.0.0.1:{port}"])
        notify = Notify(tmp_path / "notify.sock")
        env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
        try:
            async with start_edged(config, env) as edged:
                assert await notify.next() == "READY=1"
                assert await notify.next() == "STATUS=serving 1 certs, 0 connections"
                # Pings every 0.2 s from the event loop.
                start = time.monotonic()
                for _ in range(3):
                    assert await notify.until("WATCHDOG=1", limit=10) == "WATCHDOG=1"
                assert time.monotonic() - start < 5
                edged.proc.send_signal(signal.SIGHUP)
                await notify.until("RELOADING=1")
                assert await notify.until("READY=1") == "READY=1"
                assert await notify.until("STATUS=") == "STATUS=serving 1 certs, 0 connections"
                edged.proc.send_signal(signal.SIGTERM)
                await notify.until("STOPPING=1")
                assert await notify.until("STATUS=") == "STATUS=stopping: draining 0 connections"
                assert await asyncio.wait_for(edged.proc.wait(), 20) == 0
        finally:
            notify.close()
        assert "systemd watchdog: pinging every 0.2s" in edged.log


@pytest.mark.parametrize("in_thread", [False, True])
async def test_status_is_resent_when_it_changes(
    tmp_path: Path, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch, in_thread: bool
) -> None:
    """The periodic check of the STATUS= line; with many sites (STATUS_IN_THREAD) its walks
    run in a thread on copies, with the same line."""
    notify = Notify(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.setattr(edged.daemon, "STATUS_INTERVAL", 0.1)
    monkeypatch.setattr(edged.daemon, "STATUS_IN_THREAD", 1 if in_thread else 10_000)
    summaries: list[bool] = []
    summary = edged.daemon.status_summary

    def recorded(*args: Any) -> str:
        summaries.append(threading.current_thread() is threading.main_thread())
        return summary(*args)

    monkeypatch.setattr(edged.daemon, "status_summary", recorded)
    ctx = client_context(pki)
    try:
        async with run_backend() as backend, run_edged(tmp_path, site(pki, backend.address)) as e:
            assert await notify.until("STATUS=") == "STATUS=serving 1 certs, 0 connections"
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", e.port, ssl=ctx, server_hostname=NAME
            )
            msg = await notify.until("STATUS=")
            assert msg == "STATUS=serving 1 certs, 1 connections"
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            assert await notify.until("STATUS=") == "STATUS=serving 1 certs, 0 connections"
            # Unchanged: nothing more is sent.
            with pytest.raises(TimeoutError):
                await notify.until("STATUS=", limit=0.5)
            del reader
    finally:
        notify.close()
    # Off the loop, the periodic checks only: the start's line is made on the loop.
    assert summaries and (False in summaries) == in_thread, summaries


def held_status_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hold: Callable[[int], bool]
) -> tuple[Notify, threading.Event, threading.Event]:
    """Periodic STATUS= checks every 0.1 s, each in a thread: the first whose connection
    count `hold` picks sets `entered` and waits for `release` (a walk over 100k sites,
    taking its time)."""
    notify = Notify(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.setattr(edged.daemon, "STATUS_INTERVAL", 0.1)
    monkeypatch.setattr(edged.daemon, "STATUS_IN_THREAD", 1)
    entered, release = threading.Event(), threading.Event()
    summary = edged.daemon.status_summary

    def slow(*args: Any) -> str:
        if threading.current_thread() is not threading.main_thread() and hold(args[3]):
            entered.set()
            release.wait(10)
        return summary(*args)

    monkeypatch.setattr(edged.daemon, "status_summary", slow)
    return notify, entered, release


async def test_a_status_check_running_when_the_stop_comes_does_not_undo_stopping(
    tmp_path: Path, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A periodic check (in a thread) that began before the stop ends after STOPPING's
    "stopping: draining" line: its "serving" line is out of date, not sent over it."""
    notify, entered, release = held_status_checks(tmp_path, monkeypatch, lambda conns: True)
    ctx = client_context(pki)
    try:
        async with run_backend() as backend, run_edged(tmp_path, site(pki, backend.address)) as e:
            assert (await notify.until("STATUS=")).startswith("STATUS=serving")
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", e.port, ssl=ctx, server_hostname=NAME
            )
            await asyncio.to_thread(entered.wait, 10)
            e.daemon.request_stop()
            assert (await notify.until("STATUS=")).startswith("STATUS=stopping")
            release.set()
            with pytest.raises(TimeoutError):
                msg = await notify.until("STATUS=", limit=0.5)
                raise AssertionError(f"sent after the stop: {msg}")
            writer.close()
            del reader
    finally:
        release.set()
        notify.close()


async def test_a_status_check_running_when_a_reload_ends_does_not_undo_its_line(
    tmp_path: Path, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A periodic check (in a thread) that read one connection ends after a reload sent the
    newer line (no connection): its line is out of date, not sent over the reload's."""
    notify, entered, release = held_status_checks(tmp_path, monkeypatch, lambda conns: conns == 1)
    ctx = client_context(pki)
    try:
        async with run_backend() as backend, run_edged(tmp_path, site(pki, backend.address)) as e:
            assert (await notify.until("STATUS=")).startswith("STATUS=serving")
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", e.port, ssl=ctx, server_hostname=NAME
            )
            await asyncio.to_thread(entered.wait, 10)  # the check read 1 connection
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            await wait_until(lambda: e.daemon.connections_active() == 0)
            assert await e.daemon.reload("signal")
            assert await notify.until("STATUS=") == "STATUS=serving 1 certs, 0 connections"
            release.set()
            with pytest.raises(TimeoutError):
                msg = await notify.until("STATUS=", limit=0.5)
                raise AssertionError(f"sent after the reload: {msg}")
            del reader
    finally:
        release.set()
        notify.close()


# --- socket activation ---------------------------------------------------------------------


@dataclass
class Activated:
    """edged started with two sockets passed: `inherited` (named in [listen] https), `stray`
    (named nowhere)."""

    edged: Edged
    inherited: socket.socket
    stray: socket.socket
    inherited_port: int
    stray_port: int


@contextlib.asynccontextmanager
async def socket_activated(
    tmp_path: Path, pki: dict[str, Path], own: Sequence[str] = (), extra: str = ""
) -> AsyncIterator[Activated]:
    """edged as a service manager starts it with two listening sockets passed, the config's
    https the inherited one's address and `own` (bound by edged), once it has said READY=1.
    After the block: SIGTERM, and edged must exit 0."""
    inherited, stray = listening_socket(), listening_socket()
    inherited_port, stray_port = inherited.getsockname()[1], stray.getsockname()[1]
    async with run_backend() as backend:
        https = [*own, f"127.0.0.1:{inherited_port}"]
        config = write_config(tmp_path, pki, backend.address, https, extra=extra)
        notify = Notify(tmp_path / "notify.sock")
        try:
            async with start_edged(
                config, {"NOTIFY_SOCKET": str(notify.path)}, fds=[stray, inherited]
            ) as edged:
                assert await notify.until("READY=1") == "READY=1"
                yield Activated(edged, inherited, stray, inherited_port, stray_port)
                edged.proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(edged.proc.wait(), 20) == 0
        finally:
            notify.close()
            inherited.close()
            stray.close()


async def test_inherited_sockets_are_used_by_address(tmp_path: Path, pki: dict[str, Path]) -> None:
    """A passed socket serves the [listen] address it is bound to; a config address without
    one is bound as usual; a passed socket the config does not name is closed with a warning."""
    own_port = free_port()
    ctx = client_context(pki)
    async with socket_activated(tmp_path, pki, own=[f"127.0.0.1:{own_port}"]) as run:
        # edged could not have bound the inherited port itself: we hold it listening.
        for port in (run.inherited_port, own_port):
            assert b"backend=b1" in await tls_request(port, ctx)
    log = run.edged.log
    assert f"using the inherited socket for 127.0.0.1:{run.inherited_port}" in log
    assert f"127.0.0.1:{run.stray_port} is not in [listen] https or http: closing it" in log
    assert "LISTEN_" not in log


def test_inherited_listeners_match_by_address() -> None:
    a, b = listening_socket(), listening_socket()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pool = InheritedListeners(
        [systemd.Inherited(a, "https"), systemd.Inherited(b, ""), systemd.Inherited(udp, "x")]
    )
    try:
        assert udp.fileno() == -1  # not a listening stream: closed
        assert len(pool) == 2
        from edged.config import Address

        port_b = b.getsockname()[1]
        assert pool.take(Address("127.0.0.1", port_b)) is b
        assert pool.take(Address("127.0.0.1", port_b)) is None  # once
        pool.close_unused()
        assert a.fileno() == -1 and b.fileno() != -1
    finally:
        a.close()
        b.close()


def test_listen_fds_only_for_this_process() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "https:http"}
    assert systemd.listen_fds(env) == []
    assert env == {}  # consumed: a child process must not take them for its own


def refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


async def test_unused_inherited_socket_is_closed_in_the_worker_processes_too(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """With worker processes, a passed socket the config does not name is closed everywhere:
    the zygote and the workers (forked from the main process) hold no copy that would go on
    accepting connections for nobody; the one the config names is served by the workers."""
    async with socket_activated(tmp_path, pki, extra="workers = 2") as run:
        run.stray.close()  # the service manager's copy: only edged's processes hold it now
        run.inherited.close()
        assert b"backend=b1" in await tls_request(run.inherited_port, client_context(pki))
        assert await asyncio.to_thread(refuses, run.stray_port)
    assert f"127.0.0.1:{run.stray_port} is not in [listen] https or http: closing it" in (
        run.edged.log
    )


async def test_listen_fds_naming_fds_not_passed_with_workers(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """LISTEN_FDS names fds 3 and 4, which are not open: edged says so and starts with its
    worker processes (before, its own zygote channel took fd 3, was taken for a passed socket
    and closed, and startup failed)."""
    port = free_port()
    # Sets the variables for its own pid (kept by exec) without passing any fd.
    claim = (
        "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
        "os.environ['LISTEN_FDS'] = '2'; os.execv(sys.argv[1], sys.argv[1:])"
    )
    async with run_backend() as backend:
        config = write_config(
            tmp_path, pki, backend.address, [f"127.0.0.1:{port}"], extra="workers = 2"
        )
        notify = Notify(tmp_path / "notify.sock")
        try:
            cmd = [sys.executable, "-c", claim, EDGED, "run", "--config", str(config)]
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                env={**os.environ, "NOTIFY_SOCKET": str(notify.path)},
                stderr=asyncio.subprocess.PIPE,
            )
            edged = Edged(proc)
            edged.reader = asyncio.create_task(_collect(proc, edged.stderr))
            try:
                assert await notify.until("READY=1") == "READY=1"
                assert b"backend=b1" in await tls_request(port, client_context(pki))
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 20) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
                await edged.reader
                print(f"--- edged stderr (exit {proc.returncode}):\n{edged.log}")
        finally:
            notify.close()
    assert "socket activation: fd 3 (-) is not a socket" in edged.log
    assert "socket activation: fd 4 (-) is not a socket" in edged.log
    assert "Traceback" not in edged.log


@pytest.mark.parametrize("activated", [True, False], ids=["socket-activated", "control"])
async def test_restart_refuses_no_connection(
    tmp_path: Path, pki: dict[str, Path], activated: bool
) -> None:
    """The service manager (this test) holds the listening socket; edged is stopped and a new
    edged started on the same socket while clients keep connecting: connections made while no
    edged runs wait in the accept queue and are all served, none is refused. The control run,
    where edged binds the port itself, shows that the same restart does refuse connections."""
    listener = listening_socket()
    port = listener.getsockname()[1]
    fds = [listener] if activated else []
    if not activated:
        listener.close()
    ctx = client_context(pki)
    results: list[str] = []

    async def one_client() -> None:
        try:
            response = await tls_request(port, ctx, limit=60)
            results.append("ok" if b"backend=b1" in response else f"bad: {response!r}")
        except ConnectionRefusedError:
            results.append("refused")
        except Exception as exc:  # every failure is reported by the assertion below
            results.append(f"error: {exc!r}")

    async def client_loop(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
        while not stop.is_set():  # ~30 new connections a second
            tasks.append(asyncio.create_task(one_client()))
            await asyncio.sleep(1 / 30)

    async with run_backend() as backend:
        config = write_config(tmp_path, pki, backend.address, [f"127.0.0.1:{port}"])
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        clients: asyncio.Task[None] | None = None
        notify = Notify(tmp_path / "notify.sock")
        env = {"NOTIFY_SOCKET": str(notify.path)}
        try:
            async with start_edged(config, env, fds=fds) as first:
                assert await notify.until("READY=1") == "READY=1"
                clients = asyncio.create_task(client_loop(stop, tasks))
                await asyncio.sleep(1.0)
                # From here until the second edged is ready nobody accepts.
                gap_start = time.monotonic()
                during_gap = len(tasks)
                first.proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(first.proc.wait(), 30) == 0
            async with start_edged(config, env, fds=fds) as second:
                assert await notify.until("READY=1") == "READY=1"
                gap = time.monotonic() - gap_start
                during_gap = len(tasks) - during_gap
                await asyncio.sleep(1.0)
                stop.set()
                await clients
                await asyncio.wait_for(asyncio.gather(*tasks), 90)
                second.proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(second.proc.wait(), 30) == 0
        finally:
            stop.set()
            if clients is not None:
                await asyncio.gather(clients, return_exceptions=True)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            notify.close()
            listener.close()
    failures = [r for r in results if r != "ok"]
    print(
        f"restart ({'socket-activated' if activated else 'control'}): {len(results)} "
        f"connections, {during_gap} opened while no edged accepted ({gap:.2f}s), "
        f"{results.count('refused')} refused, {len(failures)} failed"
    )
    assert len(results) >= 40
    assert during_gap >= 5  # the gap was really exercised
    if activated:
        assert failures == []
    else:
        assert results.count("refused") > 0


# --- shutdown ------------------------------------------------------------------------------


async def test_second_signal_ends_the_drain_at_once(tmp_path: Path, pki: dict[str, Path]) -> None:
    held = asyncio.Event()

    async def hold(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, c: BackendConn
    ) -> None:
        await reader.read(10)
        held.set()
        await reader.read()  # never answers; returns when edged closes the connection

    port = free_port()
    ctx = client_context(pki)
    async with run_backend(hold) as backend:
        config = write_config(tmp_path, pki, backend.address, [f"127.0.0.1:{port}"])
        notify = Notify(tmp_path / "notify.sock")
        try:
            async with start_edged(config, {"NOTIFY_SOCKET": str(notify.path)}) as edged:
                await notify.until("READY=1")
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname=NAME
                )
                writer.write(b"request")
                await asyncio.wait_for(held.wait(), 20)
                edged.proc.send_signal(signal.SIGTERM)
                assert await notify.until("STOPPING=1") == "STOPPING=1"
                # Draining (drain_timeout = 30): still running a while later.
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(edged.proc.wait()), 1.0)
                start = time.monotonic()
                edged.proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(edged.proc.wait(), 20) == 0
                elapsed = time.monotonic() - start
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    assert await asyncio.wait_for(reader.read(), 10) == b""
                writer.close()
        finally:
            notify.close()
    print(f"second SIGTERM: exited after {elapsed:.2f}s")
    assert elapsed < 3
    assert "draining 1 connections" in edged.log
    assert "SIGTERM again: aborting open connections" in edged.log
    assert "second signal: aborted 1 connections" in edged.log


def test_shutdown_timeout_is_drain_timeout() -> None:
    base = '[[site]]\nnames = ["a.example.test"]\nbackend = "127.0.0.1:1"\n'
    config = parse_config("[edged]\nshutdown_timeout = 7\n" + base, Path("t.toml"))
    assert config.edged.drain_timeout == 7.0
    with pytest.raises(ConfigError, match="set only one of them"):
        parse_config("[edged]\nshutdown_timeout = 7\ndrain_timeout = 3\n" + base, Path("t.toml"))
