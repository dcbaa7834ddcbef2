"""The zygote: a small single-threaded process that forks the worker processes.

Why a separate process: fork() in a process with threads can deadlock the child (a lock held
by another thread at that moment stays held forever in the copy), and the main process runs
ACME, file I/O and Redis calls in threads. The zygote is forked from the main process at
startup, before any thread or event loop exists, and stays that way: a blocking loop that reads
commands from the main process and forks.

It also owns the listening SSLContext. TLS 1.3 session tickets are encrypted with keys made when
a context is created; workers forked from one context share them, so a ticket issued by one
worker resumes on any other. Rotating the ticket keys = a new context + a new generation of
workers (the main process then retires the old one).

Commands (main → zygote, one SOCK_SEQPACKET message each, fds attached with SCM_RIGHTS):
  ("fds",)                                    + up to FDS_PER_MESSAGE sockets for "listeners"
  ("listeners", [(address, n_sockets), ...])  the sockets sent before it, in that order
  ("context", min_version)                    a new listening context (new ticket keys)
  ("spawn", slot, generation, spawn_id)       + the worker's ends of its channel and of its
                                              segment channel (edged.pemshare)
  ("kill", pid)                               SIGKILL a worker (only a child not reaped yet)
Reports (zygote → main): ("spawned", spawn_id, pid), ("spawn_failed", spawn_id, why),
  ("exited", pid, status_text).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import pickle
import select
import signal
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edged.config import Address
from edged.ipc import writable

log = logging.getLogger("edged.zygote")

# Linux accepts at most 253 descriptors in one SCM_RIGHTS message (SCM_MAX_FD): the listeners
# of a config (addresses x workers) can be many more, so they go in several messages.
FDS_PER_MESSAGE = 250
_BUFSIZE = 1 << 16

# What a forked worker runs: (slot, generation, sockets, listening context, channel, segment
# channel, what the zygote was started with for the workers) → exit code.
Listeners = list[tuple[Address, socket.socket]]
WorkerMain = Callable[
    [int, int, Listeners, ssl.SSLContext, socket.socket, socket.socket, object], int
]
ContextFactory = Callable[[str], ssl.SSLContext]


@dataclass
class Zygote:
    """The main process's handle on the zygote."""

    pid: int
    sock: socket.socket  # SOCK_SEQPACKET, non-blocking: one command or report per message
    # One sender at a time: a listeners command is several messages that must not interleave.
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, command: tuple[object, ...], fds: Sequence[int] = ()) -> None:
        """Send one command (OSError: the zygote is gone)."""
        async with self._lock:
            await self._send(command, fds)

    async def send_listeners(self, layout: list[tuple[Address, int]], fds: Sequence[int]) -> None:
        async with self._lock:
            for start in range(0, len(fds), FDS_PER_MESSAGE):
                await self._send(("fds",), fds[start : start + FDS_PER_MESSAGE])
            await self._send(("listeners", layout), ())

    async def _send(self, command: tuple[object, ...], fds: Sequence[int]) -> None:
        data = pickle.dumps(command)
        while True:
            try:
                if fds:
                    socket.send_fds(self.sock, [data], list(fds))
                else:
                    self.sock.send(data)
                return
            except BlockingIOError:  # the zygote is busy forking: wait, never block the loop
                await writable(self.sock)

    def close(self) -> None:
        """Closing the channel makes the zygote exit (its workers are stopped separately);
        reap it with `reaped`."""
        self.sock.close()

    def kill(self) -> None:
        """SIGKILL it (call only while it is not reaped: its pid is still this child's)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def reaped(self) -> bool:
        """Whether the zygote has exited (and is reaped now). Never blocks."""
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return True  # reaped already
        return pid != 0


def start_zygote(
    min_version: str,
    make_context: ContextFactory,
    worker_main: WorkerMain,
    for_workers: object = None,
    parent_only: Sequence[socket.socket] = (),
) -> Zygote:
    """Fork the zygote. Call before any thread or event loop exists in this process.
    `for_workers` reaches each worker_main as it is in this process's memory now.
    `parent_only`: sockets the zygote and its workers must not keep a copy of."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the zygote
        code = 1
        try:
            # What it inherited stays untouched by its collector (and its workers'): their
            # passes would copy every page holding an object header (copy-on-write).
            gc.freeze()
            gc.enable()
            ours.close()
            for sock in parent_only:
                sock.close()
            ctx = make_context(min_version)
            code = _Loop(theirs, ctx, make_context, worker_main, for_workers).run()
        except BaseException:
            log.exception("zygote failed")
        finally:
            os._exit(code)
    theirs.close()
    ours.setblocking(False)
    return Zygote(pid, ours)


class _Loop:
    def __init__(
        self,
        chan: socket.socket,
        ctx: ssl.SSLContext,
        make_context: ContextFactory,
        worker_main: WorkerMain,
        for_workers: object = None,
    ) -> None:
        self.chan = chan
        self.ctx = ctx
        self.make_context = make_context
        self.worker_main = worker_main
        self.listeners: list[tuple[Address, list[socket.socket]]] = []
        self.incoming: list[int] = []  # listener fds of a "listeners" command still to come
        self.children: set[int] = set()
        self.for_workers = for_workers

    def run(self) -> int:
        # The main process decides when to stop: the zygote leaves terminal signals to it
        # (its channel closing is the zygote's stop), and reaps its children on SIGCHLD.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        try:
            while True:
                readable, _, _ = select.select([self.chan.fileno(), wake_r], [], [], 1.0)
                if wake_r in readable:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 512)
                self._reap()
                if self.chan.fileno() in readable and not self._command():
                    return 0
        finally:
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)

    def _command(self) -> bool:
        try:
            data, fds, _, _ = socket.recv_fds(self.chan, _BUFSIZE, FDS_PER_MESSAGE)
        except ConnectionError:
            data, fds = b"", []
        if not data:
            return False  # the main process is gone
        command = pickle.loads(data)
        kind = command[0]
        if kind == "fds":
            self.incoming.extend(fds)
        elif kind == "listeners":
            self._set_listeners(command[1], self.incoming)
            self.incoming = []
        elif kind == "context":
            try:
                self.ctx = self.make_context(command[1])
            except Exception:  # ssl.SSLError, MemoryError: the old keys are still good
                log.exception("zygote: cannot make a new listening context; keeping the old one")
        elif kind == "spawn" and len(fds) == 2:
            self._spawn(command[1], command[2], command[3], fds[0], fds[1])
        elif kind == "kill":
            # Only a child not reaped yet: its pid cannot have been reused by another process.
            if command[1] in self.children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(command[1], signal.SIGKILL)
        else:
            log.error("zygote: unknown or malformed command %r", kind)
            for fd in fds:
                os.close(fd)
        return True

    def _set_listeners(self, layout: list[tuple[Address, int]], fds: list[int]) -> None:
        if sum(count for _, count in layout) != len(fds):
            log.error("zygote: %d listener sockets for a layout of %r; ignored", len(fds), layout)
            for fd in fds:
                os.close(fd)
            return
        for _, socks in self.listeners:
            for sock in socks:
                sock.close()
        self.listeners = []
        it = iter(fds)
        for address, count in layout:
            self.listeners.append((address, [socket.socket(fileno=next(it)) for _ in range(count)]))

    def _spawn(
        self, slot: int, generation: int, spawn_id: int, chan_fd: int, segments_fd: int
    ) -> None:
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN, ENOMEM: the main process retries after a back-off
            os.close(chan_fd)  # the worker's channel closes: to the main process, a dead worker
            os.close(segments_fd)
            self._report(("spawn_failed", spawn_id, str(exc)))
            return
        if pid == 0:  # the worker
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                self.chan.close()
                mine: list[tuple[Address, socket.socket]] = []
                for address, socks in self.listeners:
                    keep = socks[slot % len(socks)]
                    mine.append((address, keep))
                    for sock in socks:
                        if sock is not keep:
                            sock.close()
                chan = socket.socket(fileno=chan_fd)
                segments = socket.socket(fileno=segments_fd)
                code = self.worker_main(
                    slot, generation, mine, self.ctx, chan, segments, self.for_workers
                )
            except BaseException:
                log.exception("worker %d failed", slot)
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(chan_fd)
        os.close(segments_fd)
        self.children.add(pid)
        self._report(("spawned", spawn_id, pid))

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self._report(("exited", pid, _status_text(status)))

    def _report(self, report: tuple[object, ...]) -> None:
        with contextlib.suppress(OSError):  # the main process is gone: nobody to tell
            self.chan.send(pickle.dumps(report))


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
