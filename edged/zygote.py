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
  ("listeners", [(address, n_sockets), ...])  + the sockets, in that order
  ("context", min_version)                    a new listening context (new ticket keys)
  ("spawn", slot, generation)                 + the worker's end of its channel
Reports (zygote → main): ("spawned", slot, generation, pid), ("exited", pid, status_text).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from edged.config import Address

log = logging.getLogger("edged.zygote")

MAX_FDS = 1024  # per command: the listeners of one config (addresses x workers)
_BUFSIZE = 1 << 16

# What a forked worker runs: (slot, generation, sockets, listening context, channel) → exit code.
Listeners = list[tuple[Address, socket.socket]]
WorkerMain = Callable[[int, int, Listeners, ssl.SSLContext, socket.socket], int]
ContextFactory = Callable[[str], ssl.SSLContext]


@dataclass
class Zygote:
    """The main process's handle on the zygote."""

    pid: int
    sock: socket.socket  # SOCK_SEQPACKET: one command or report per message

    def send(self, command: tuple[object, ...], fds: list[int] | None = None) -> None:
        data = pickle.dumps(command)
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.send(data)

    def close(self) -> None:
        """Closing the channel makes the zygote exit (its workers are stopped separately);
        reap it with `reaped`."""
        self.sock.close()

    def reaped(self) -> bool:
        """Whether the zygote has exited (and is reaped now). Never blocks."""
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return True  # reaped already
        return pid != 0


def start_zygote(min_version: str, make_context: ContextFactory, worker_main: WorkerMain) -> Zygote:
    """Fork the zygote. Call before any thread or event loop exists in this process."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the zygote
        code = 1
        try:
            ours.close()
            code = _Loop(theirs, make_context(min_version), make_context, worker_main).run()
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
    ) -> None:
        self.chan = chan
        self.ctx = ctx
        self.make_context = make_context
        self.worker_main = worker_main
        self.listeners: list[tuple[Address, list[socket.socket]]] = []
        self.children: set[int] = set()

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
            data, fds, _, _ = socket.recv_fds(self.chan, _BUFSIZE, MAX_FDS)
        except ConnectionError:
            data, fds = b"", []
        if not data:
            return False  # the main process is gone
        command = pickle.loads(data)
        kind = command[0]
        if kind == "listeners":
            self._set_listeners(command[1], fds)
        elif kind == "context":
            self.ctx = self.make_context(command[1])
        elif kind == "spawn":
            self._spawn(command[1], command[2], fds[0])
        else:
            log.error("zygote: unknown command %r", kind)
            for fd in fds:
                os.close(fd)
        return True

    def _set_listeners(self, layout: list[tuple[Address, int]], fds: list[int]) -> None:
        for _, socks in self.listeners:
            for sock in socks:
                sock.close()
        self.listeners = []
        it = iter(fds)
        for address, count in layout:
            self.listeners.append((address, [socket.socket(fileno=next(it)) for _ in range(count)]))

    def _spawn(self, slot: int, generation: int, chan_fd: int) -> None:
        pid = os.fork()
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
                code = self.worker_main(slot, generation, mine, self.ctx, chan)
            except BaseException:
                log.exception("worker %d failed", slot)
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(chan_fd)
        self.children.add(pid)
        self._report(("spawned", slot, generation, pid))

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
