"""Free loopback ports for the real components under test.

A port from `bind(0)` lies in the kernel's ephemeral range, so between choosing it and the
server binding it, any outgoing connection (a test client, edged dialling a backend) may take
it as its source port: the test then fails with "address already in use". So ports come from
below that range, each one handed out once per run, and only when free for TCP and UDP on
both loopback families (BIND wants both protocols; some tests add [::1] to a 127.0.0.1 port).
"""

from __future__ import annotations

import itertools
import os
import socket
import threading

_LOW_DEFAULT = 32768


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _LOW_DEFAULT


_HIGH = max(_ephemeral_low(), 12000)
_LOW = max(10000, _HIGH - 12000)
# Several test processes (a second pytest, the demo) start far apart in the range.
_cursor = itertools.count(os.getpid() * 7919 % (_HIGH - _LOW))
_lock = threading.Lock()


def _bindable(port: int, hosts: tuple[str, ...]) -> bool:
    for host in hosts:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            try:
                with socket.socket(family, kind) as s:
                    s.bind((host, port))
            except OSError as e:
                if family == socket.AF_INET6 and e.errno == 99:  # EADDRNOTAVAIL: no IPv6 here
                    continue
                return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now on `host` and on 127.0.0.1 and ::1, for TCP and UDP, outside the
    ephemeral range, and not handed out before in this process."""
    hosts = tuple(dict.fromkeys((host, "127.0.0.1", "::1")))
    with _lock:
        for _ in range(_HIGH - _LOW):
            port = _LOW + next(_cursor) % (_HIGH - _LOW)
            if _bindable(port, hosts):
                return port
    raise RuntimeError(f"no free port in {_LOW}-{_HIGH} on {', '.join(hosts)}")
