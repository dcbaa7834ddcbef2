"""Certificates swapped 500 times under steady handshake load: not one failed handshake."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import ssl
import sys
import threading
from pathlib import Path

from tests.conftest import free_port, run_backend, write_process_config
from tests.pki import make_ca, make_leaf, write_pair

NAMES = ["a.load.test", "b.load.test", "c.load.test"]
VERSIONS = 6
SWAPS = 500


class Handshaker(threading.Thread):
    """Full handshakes (no resumption) as fast as it can, each verified against the CA."""

    def __init__(self, port: int, cafile: Path, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.stop = port, stop
        self.ctx = ssl.create_default_context(cafile=str(cafile))
        self.ok = 0
        self.failures: list[str] = []
        self.seen: dict[str, set[str]] = {n: set() for n in NAMES}

    def run(self) -> None:
        rng = random.Random(1)
        while not self.stop.is_set():
            name = rng.choice(NAMES)
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
                    self.ctx.wrap_socket(raw, server_hostname=name) as tls,
                ):
                    cert = tls.getpeercert()
                    cn = dict(x[0] for x in cert["subject"])["commonName"]
                    if not cn.startswith(name):
                        self.failures.append(f"{name}: served {cn}")
                    self.seen[name].add(cn)
                    self.ok += 1
            except (OSError, ssl.SSLError) as exc:
                self.failures.append(f"{name}: {exc!r}")


def swap(mode: str, live: Path, cert_src: Path, key_src: Path, n: int) -> None:
    cert, key = live / "fullchain.pem", live / "privkey.pem"
    if mode == "inplace":  # the worst case: truncate+write, cert and key one after the other
        cert.write_bytes(cert_src.read_bytes())
        key.write_bytes(key_src.read_bytes())
    elif mode == "rename":
        for src, dst in ((cert_src, cert), (key_src, key)):
            tmp = dst.with_name(f".{dst.name}.{n}")
            tmp.write_bytes(src.read_bytes())
            os.replace(tmp, dst)
    else:  # symlink swap to the archive copy
        for src, dst in ((cert_src, cert), (key_src, key)):
            tmp = dst.with_name(f".{dst.name}.{n}.lnk")
            tmp.symlink_to(src)
            os.replace(tmp, dst)


async def test_500_mixed_swaps_under_handshake_load(tmp_path: Path) -> None:
    ca = make_ca("Load CA")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    archive = tmp_path / "archive"
    archive.mkdir()
    versions: dict[str, list[tuple[Path, Path]]] = {}
    for name in NAMES:
        versions[name] = [
            write_pair(archive, f"{name}-{v}", make_leaf(ca, [name], cn=f"{name}-v{v}"))
            for v in range(VERSIONS)
        ]
        live = tmp_path / "live" / name
        live.mkdir(parents=True)
        swap("rename", live, *versions[name][0], 0)
    port = free_port()
    async with run_backend() as backend:
        sites = "".join(
            f'[[site]]\nnames = ["{n}"]\nbackend = "{backend.address}"\n'
            f'cert_file = "live/{n}/fullchain.pem"\nkey_file = "live/{n}/privkey.pem"\n'
            for n in NAMES
        )
        config = write_process_config(tmp_path, sites, https=port)
        edged_bin = str(Path(sys.executable).with_name("edged"))
        proc = await asyncio.create_subprocess_exec(
            edged_bin, "run", "--config", str(config), stderr=asyncio.subprocess.DEVNULL
        )
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            stop = threading.Event()
            clients = [Handshaker(port, tmp_path / "ca.pem", stop) for _ in range(2)]
            for c in clients:
                c.start()
            rng = random.Random(7)
            modes = ["inplace", "rename", "symlink"]
            for n in range(1, SWAPS + 1):
                name = rng.choice(NAMES)
                cert_src, key_src = versions[name][n % VERSIONS]
                await asyncio.to_thread(
                    swap, modes[n % 3], tmp_path / "live" / name, cert_src, key_src, n
                )
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.0)
            stop.set()
            for c in clients:
                await asyncio.to_thread(c.join, 10)
            assert proc.returncode is None  # still serving
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)
    failures = [f for c in clients for f in c.failures]
    total = sum(c.ok for c in clients)
    assert failures == [], failures[:10]
    assert total > 500, total
    for name in NAMES:  # the swaps were seen, not just the first version
        seen = set().union(*(c.seen[name] for c in clients))
        assert len(seen) >= 3, (name, seen)
