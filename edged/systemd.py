"""The systemd protocols edged speaks, a few lines each and no dependency:

- sd_notify over the NOTIFY_SOCKET datagram socket (READY, RELOADING, STOPPING, STATUS, WATCHDOG);
- the watchdog interval (WATCHDOG_USEC / WATCHDOG_PID);
- socket activation, sd_listen_fds: inherited listening sockets from fd 3 on
  (LISTEN_PID / LISTEN_FDS / LISTEN_FDNAMES).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

log = logging.getLogger("edged.systemd")

LISTEN_FDS_START = 3


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1") to systemd; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def status_line(text: str) -> str:
    """A STATUS= message: one line (systemd shows it in `systemctl status`)."""
    return "STATUS=" + " ".join(text.split())


def watchdog_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when systemd does not
    watch this process (no WATCHDOG_USEC, or WATCHDOG_PID names another process)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1e6 / 2


@dataclass
class Inherited:
    """One listening socket passed by the service manager."""

    sock: socket.socket
    name: str  # FileDescriptorName= ("" when unnamed)


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[Inherited]:
    """The sockets passed by socket activation (sd_listen_fds with unset_environment=1): only
    when LISTEN_PID is this process. The variables are removed so that nothing this process
    starts mistakes them for its own. Each fd is marked close-on-exec."""
    env = os.environ if environ is None else environ
    pid_text = env.pop("LISTEN_PID", "")
    count_text = env.pop("LISTEN_FDS", "")
    names_text = env.pop("LISTEN_FDNAMES", "")
    if not pid_text or not count_text:
        return []
    try:
        pid, count = int(pid_text), int(count_text)
    except ValueError:
        log.warning("ignoring socket activation: LISTEN_PID=%r LISTEN_FDS=%r", pid_text, count_text)
        return []
    if pid != os.getpid():
        return []  # meant for another process (e.g. our parent)
    names = names_text.split(":") if names_text else []
    found: list[Inherited] = []
    for i in range(max(count, 0)):
        fd = LISTEN_FDS_START + i
        name = names[i] if i < len(names) else ""
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("socket activation: fd %d (%s) is not a socket: %s", fd, name or "-", exc)
            continue
        found.append(Inherited(sock, name))
    return found
