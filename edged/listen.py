"""Listening sockets: binding with errors that say what to do."""

from __future__ import annotations

import errno
import socket

from edged.config import Address
from edged.errors import EdgedError

LISTEN_BACKLOG = 4096


class StartupError(EdgedError):
    """The daemon cannot start (bad config, a port it cannot bind)."""


def bind_tcp(address: Address) -> socket.socket:
    """A listening, non-blocking TCP socket; StartupError says why binding failed."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # [::] and 0.0.0.0 are separate listeners in the config: keep them separate.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = {
            errno.EADDRINUSE: "another process (web server, another edged) listens there",
            errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
            errno.EADDRNOTAVAIL: "this host has no such address",
        }.get(exc.errno or 0, "check [listen]")
        raise StartupError(f"cannot listen on {address}: {exc.strerror}: {hint}") from None
    return sock
