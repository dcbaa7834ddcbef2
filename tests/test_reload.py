"""Hot reload from file changes: in-place writes, rename over, symlink swaps, config edits."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from tests.conftest import Edged, run_backend, run_edged, s_client
from tests.pki import make_ca, make_leaf, write_pair


async def served_cn(edged: Edged, sni: str) -> str:
    out = await s_client(edged.port, sni)
    for line in out.stderr.splitlines():
        if line.startswith("Peer certificate:") and "CN" in line:
            return line.split("CN", 1)[1].lstrip(" =").split(",")[0].strip()
    return ""


async def wait_for(predicate_cn: str, edged: Edged, sni: str, limit: float = 3.0) -> float:
    """Seconds until `sni` is served with CN `predicate_cn` (fails after `limit`)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < limit:
        if await served_cn(edged, sni) == predicate_cn:
            return loop.time() - start
        await asyncio.sleep(0.05)
    raise AssertionError(f"{sni} not served with CN={predicate_cn} within {limit}s")


def pair(tmp: Path, stem: str, cn: str) -> tuple[Path, Path]:
    ca = make_ca("Reload CA")
    return write_pair(tmp, stem, make_leaf(ca, ["r.example.test"], cn=cn), [])


async def test_cert_changes_are_picked_up_in_every_way_files_get_replaced(
    tmp_path: Path,
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "fullchain.pem", live / "privkey.pem"
    c0, k0 = pair(tmp_path, "v0", "version-0")
    cert.write_bytes(c0.read_bytes())
    key.write_bytes(k0.read_bytes())
    async with run_backend() as backend:
        body = (
            f'[[site]]\nnames = ["r.example.test"]\nbackend = "{backend.address}"\n'
            f'cert_file = "{cert}"\nkey_file = "{key}"\n'
        )
        async with run_edged(tmp_path, body) as edged:
            assert await served_cn(edged, "r.example.test") == "version-0"

            # 1. in place, key a few ms after the cert
            c1, k1 = pair(tmp_path, "v1", "version-1")
            cert.write_bytes(c1.read_bytes())
            await asyncio.sleep(0.005)
            key.write_bytes(k1.read_bytes())
            assert await wait_for("version-1", edged, "r.example.test") < 1.5

            # 2. temp file + rename over
            c2, k2 = pair(tmp_path, "v2", "version-2")
            for src, dst in ((c2, cert), (k2, key)):
                tmp = dst.with_suffix(".tmp")
                tmp.write_bytes(src.read_bytes())
                os.replace(tmp, dst)
            assert await wait_for("version-2", edged, "r.example.test") < 1.5

            # 3. certbot-style symlinks swapped to a new archive version
            archive = tmp_path / "archive"
            archive.mkdir()
            c3, k3 = pair(tmp_path, "v3", "version-3")
            (archive / "fullchain3.pem").write_bytes(c3.read_bytes())
            (archive / "privkey3.pem").write_bytes(k3.read_bytes())
            for link, target in ((cert, "fullchain3.pem"), (key, "privkey3.pem")):
                tmp = link.with_suffix(".lnk")
                tmp.symlink_to(archive / target)
                os.replace(tmp, link)
            assert await wait_for("version-3", edged, "r.example.test") < 1.5

            # 4. a bad pair (key of another cert) never replaces the good one
            _, k4 = pair(tmp_path, "v4", "version-4")
            (archive / "privkey3.pem").write_bytes(k4.read_bytes())
            await asyncio.sleep(1.0)
            assert await served_cn(edged, "r.example.test") == "version-3"
            assert edged.daemon.counters.reloads["file", "error"] >= 1
            assert edged.daemon.counters.reloads["file", "ok"] >= 3


async def test_config_edit_adds_a_site(tmp_path: Path) -> None:
    c0, k0 = pair(tmp_path, "a", "site-a")
    c1, k1 = pair(tmp_path, "b", "site-b")
    async with run_backend() as backend:
        body = (
            f'[[site]]\nnames = ["r.example.test"]\nbackend = "{backend.address}"\n'
            f'cert_file = "{c0}"\nkey_file = "{k0}"\n'
        )
        async with run_edged(tmp_path, body) as edged:
            assert await served_cn(edged, "r.example.test") == "site-a"
            text = edged.config_path.read_text().replace(str(c0), str(c1)).replace(str(k0), str(k1))
            edged.config_path.write_text(text)
            assert await wait_for("site-b", edged, "r.example.test") < 1.5
            edged.config_path.write_text(text + "\n[tls]\nmin_version = 'x'\n")
            await asyncio.sleep(0.8)
            assert await served_cn(edged, "r.example.test") == "site-b"
            # truncate + write may arrive as two batches: each one is rejected
            assert edged.daemon.counters.reloads["file", "error"] >= 1


async def test_change_right_after_start_is_not_lost(tmp_path: Path) -> None:
    """A write between the initial load and the watcher's start is caught by the snapshot."""
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    c0, k0 = pair(tmp_path, "v0", "early-0")
    cert.write_bytes(c0.read_bytes())
    key.write_bytes(k0.read_bytes())
    c1, k1 = pair(tmp_path, "v1", "early-1")
    async with run_backend() as backend:
        body = (
            f'[[site]]\nnames = ["r.example.test"]\nbackend = "{backend.address}"\n'
            f'cert_file = "{cert}"\nkey_file = "{key}"\n'
        )
        async with run_edged(tmp_path, body) as edged:
            cert.write_bytes(c1.read_bytes())
            key.write_bytes(k1.read_bytes())
            assert await wait_for("early-1", edged, "r.example.test") < 2
