"""A real BIND9 for tests: authoritative zones on a free loopback port, TSIG-signed updates.

    with start_bind(tmp_path, {"a.test": "www A 127.0.0.1", "acme.test": ""}) as bind:
        settings = bind.settings()          # DnsSettings pointing at this server
        assert bind.txt("_acme-challenge.a.test") == set()

or, shared by every test of a module:

    bind = bind_fixture({"a.test": "", "acme.test": ""})

Each zone gets SOA, `NS ns1.<zone>.`, `ns1 A 127.0.0.1`, an apex `A 127.0.0.1` and the given
extra records (zone-file lines, relative to the zone's origin), and
`update-policy { grant <key> zonesub TXT; };` so the key may add and delete TXT records
anywhere in it. named runs in the foreground (`-g`) in a temp dir and is stopped on exit.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import textwrap
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from edged.config import Address, DnsSettings
from tests.ports import free_port

NAMED = shutil.which("named") or "/usr/sbin/named"
TSIG_KEYGEN = shutil.which("tsig-keygen") or "/usr/sbin/tsig-keygen"
START_TIMEOUT = 15.0


@dataclass
class Bind:
    """A running named: where it listens and where its TSIG key is."""

    port: int
    dir: Path
    secret_file: Path
    key_name: str
    zones: tuple[str, ...]
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.port)

    @property
    def log(self) -> str:
        return (self.dir / "named.log").read_text(errors="replace")

    def settings(self, **overrides: Any) -> DnsSettings:
        """DnsSettings aimed at this server (updates, resolver and nameserver port)."""
        values: dict[str, Any] = {
            "server": self.address,
            "tsig_key_name": self.key_name,
            "tsig_algorithm": "hmac-sha256",
            "tsig_secret_file": self.secret_file,
            "resolver": self.address,
            "nameserver_port": self.port,
            "propagation_timeout": 5.0,
            "ttl": 60,
        }
        values.update(overrides)
        return DnsSettings(**values)

    def query(self, name: str, rdtype: str) -> dns.message.Message:
        """One direct, non-recursive query to this server."""
        q = dns.message.make_query(name, rdtype)
        q.flags &= ~dns.flags.RD
        return dns.query.udp(q, "127.0.0.1", port=self.port, timeout=2.0)

    def txt(self, name: str) -> set[str]:
        """The TXT strings at `name` (each record's strings joined), straight from named."""
        response = self.query(name, "TXT")
        out: set[str] = set()
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                for rdata in rrset:
                    out.add(b"".join(rdata.strings).decode())
        return out


def zone_file(zone: str, extra: str) -> str:
    head = f"""\
        $ORIGIN {zone}.
        $TTL 60
        @ IN SOA ns1.{zone}. hostmaster.{zone}. 1 3600 600 86400 60
        @ IN NS ns1.{zone}.
        @ IN A 127.0.0.1
        ns1 IN A 127.0.0.1
    """
    return textwrap.dedent(head) + textwrap.dedent(extra).strip() + "\n"


def named_conf(
    d: Path,
    port: int,
    zones: Mapping[str, str],
    key_name: str,
    recursion: bool,
    read_only: Collection[str] = (),
) -> str:
    recursion_lines = (
        "recursion yes; allow-recursion { 127.0.0.1; }; allow-query-cache { 127.0.0.1; };"
        if recursion
        else "recursion no;"
    )
    lines = [
        f'include "{d}/tsig.conf";',
        "options {",
        f'    directory "{d}";',
        f"    listen-on port {port} {{ 127.0.0.1; }};",
        "    listen-on-v6 { none; };",
        f'    pid-file "{d}/named.pid";',
        f'    session-keyfile "{d}/session.key";',
        f'    managed-keys-directory "{d}";',
        f"    {recursion_lines}",
        "    dnssec-validation no;",
        "    notify no;",
        "    allow-query { 127.0.0.1; };",
        "};",
        "controls { };",
    ]
    for zone in zones:
        lines += [
            f'zone "{zone}" {{',
            "    type primary;",
            f'    file "{d}/{zone}.zone";',
            "    allow-update { none; };"
            if zone in read_only
            else f"    update-policy {{ grant {key_name} zonesub TXT; }};",
            "};",
        ]
    return "\n".join(lines) + "\n"


def _answers_soa(port: int, zone: str) -> bool:
    q = dns.message.make_query(zone, "SOA")
    q.flags &= ~dns.flags.RD
    try:
        r = dns.query.udp(q, "127.0.0.1", port=port, timeout=0.2)
    except (dns.exception.DNSException, OSError):
        return False
    return r.rcode() == dns.rcode.NOERROR and bool(r.answer)


@contextlib.contextmanager
def start_bind(
    tmp_path: Path,
    zones: Mapping[str, str],
    *,
    recursion: bool = False,
    key_name: str = "edged",
    read_only: Collection[str] = (),
) -> Iterator[Bind]:
    """Run named for `zones` ({zone: extra zone-file lines}) on a free port; stop it on exit.

    Zones in `read_only` accept no updates (named answers REFUSED).
    """
    if not Path(NAMED).exists():
        pytest.skip("BIND9 (named) is not installed")
    d = tmp_path / "bind"
    d.mkdir(parents=True, exist_ok=True)
    keygen = subprocess.run(
        [TSIG_KEYGEN, "-a", "hmac-sha256", key_name], capture_output=True, check=True
    )
    secret_file = d / "tsig.conf"
    secret_file.write_bytes(keygen.stdout)
    secret_file.chmod(0o600)
    for zone, extra in zones.items():
        (d / f"{zone}.zone").write_text(zone_file(zone, extra))
    last_log = ""
    for _attempt in range(3):
        port = free_port()
        conf = d / "named.conf"
        conf.write_text(named_conf(d, port, zones, key_name, recursion, read_only))
        log_path = d / "named.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [NAMED, "-g", "-4", "-n", "1", "-c", str(conf), "-u", "root"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        first_zone = next(iter(zones))
        deadline = time.monotonic() + START_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if _answers_soa(port, first_zone):
                break
            time.sleep(0.05)
        if proc.poll() is None and _answers_soa(port, first_zone):
            break
        _stop(proc)
        last_log = log_path.read_text(errors="replace")
        if "address in use" not in last_log:
            raise RuntimeError(f"named did not start on 127.0.0.1:{port}:\n{last_log}")
    else:
        raise RuntimeError(f"named did not start (ports in use):\n{last_log}")
    server = Bind(port, d, secret_file, key_name, tuple(zones), proc)
    try:
        yield server
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def bind_fixture(
    zones: Mapping[str, str],
    *,
    scope: Literal["session", "package", "module", "class", "function"] = "module",
    recursion: bool = False,
    read_only: Collection[str] = (),
) -> Any:
    """A pytest fixture running one named for `zones`: `bind = bind_fixture({...})` in a module."""

    @pytest.fixture(scope=scope)
    def _bind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bind]:
        d = tmp_path_factory.mktemp("bind")
        with start_bind(d, zones, recursion=recursion, read_only=read_only) as server:
            yield server

    return _bind
