"""Listening sockets: binding with errors that say what to do, or taking them over from the
service manager (socket activation)."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket

from edged.config import Address
from edged.errors import EdgedError
from edged.systemd import Inherited

log = logging.getLogger("edged.listen")

# The accept queue: a burst of new connections beyond it loses SYNs, and each lost SYN costs
# its client a 1 s retransmission. asyncio/uvloop's create_server(sock=...) listens again with
# its own default (100) unless given this (capped by net.core.somaxconn).
LISTEN_BACKLOG = 4096


class StartupError(EdgedError):
    """The daemon cannot start (bad config, a port it cannot bind)."""


def bind_tcp(address: Address, *, reuseport: bool = False) -> socket.socket:
    """A listening, non-blocking TCP socket; StartupError says why binding failed.
    `reuseport`: one of several sockets on the same address, one per worker process, among
    which the kernel spreads new connections evenly."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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


def _key(host: str, port: int) -> tuple[str, int]:
    try:
        return str(ipaddress.ip_address(host.split("%", 1)[0])), port
    except ValueError:
        return host, port


class InheritedListeners:
    """Listening sockets passed by socket activation, handed out by the address they are bound
    to (getsockname), so the unit's ListenStream= lines and `[listen]` need not be in the same
    order and no FileDescriptorName= is needed."""

    def __init__(self, inherited: list[Inherited]) -> None:
        self._by_address: dict[tuple[str, int], socket.socket] = {}
        for item in inherited:
            sock = item.sock
            label = item.name or f"fd {sock.fileno()}"
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                log.warning("socket activation: %s is not a TCP socket: closing it", label)
                sock.close()
                continue
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if sock.type != socket.SOCK_STREAM or not listening:
                log.warning("socket activation: %s is not a listening stream: closing it", label)
                sock.close()
                continue
            host, port = sock.getsockname()[:2]
            self._by_address[_key(host, port)] = sock

    def take(self, address: Address) -> socket.socket | None:
        """The inherited socket bound to `address` (once), non-blocking; None if there is none."""
        sock = self._by_address.pop(_key(address.host, address.port), None)
        if sock is not None:
            sock.setblocking(False)
            log.info("using the inherited socket for %s", address)
        return sock

    def bind(self, address: Address) -> socket.socket:
        """The inherited socket for `address`, else a freshly bound one."""
        return self.take(address) or bind_tcp(address)

    def close_unused(self) -> None:
        """Close the sockets the config does not name (the service manager keeps its copy)."""
        for (host, port), sock in self._by_address.items():
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            log.warning(
                "socket activation: %s is not in [listen] https or http: closing it "
                "(remove it from the socket unit or add it to the config)",
                shown,
            )
            sock.close()
        self._by_address.clear()

    def close(self) -> None:
        """Close what was not taken (quietly: at exit or after a failed start)."""
        for sock in self._by_address.values():
            sock.close()
        self._by_address.clear()

    def __len__(self) -> int:
        return len(self._by_address)
