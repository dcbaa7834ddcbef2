"""Certificate files edged may not read: the old certificate keeps serving, the error names the
file and the reason, the daemon stays up, and fixing the mode is picked up by itself.

The tests run as root, and root reads any file (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH). So
edged runs here as a subprocess whose capability bounding set lacks both (setpriv): still uid
0, still owner of the files, but bound by their mode bits like the `edged` user in production.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Proc, free_port, peer_cn, run_backend
from tests.pki import make_ca, make_leaf

EDGED = str(Path(sys.executable).with_name("edged"))
DAC = "dac_override,dac_read_search"
# As root: drop the two capabilities that bypass file modes. As another user: nothing to drop.
RESTRICTED = (
    [
        "setpriv",
        f"--bounding-set=-{DAC.replace(',', ',-')}",
        f"--inh-caps=-{DAC.replace(',', ',-')}",
    ]
    if os.geteuid() == 0
    else []
)
NAME = "p.example.test"


async def run(*args: str, limit: float = 20) -> Proc:
    """Like conftest.run_cmd, with stdin at EOF from the start: nothing is written to a pipe
    that a fast-exiting command may already have closed (uvloop raises on that write)."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), limit)
    assert proc.returncode is not None
    return Proc(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


async def restricted(*args: str) -> Proc:
    return await run(*RESTRICTED, *args)


@dataclass
class Daemon:
    proc: asyncio.subprocess.Process
    port: int
    metrics_port: int
    config: Path
    log: Path
    cert: Path
    key: Path

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    async def wait_log(self, *needles: str, limit: float = 10) -> str:
        """The first log line holding every needle (fails after `limit` seconds)."""
        deadline = time.monotonic() + limit
        while True:
            for line in self.log_lines():
                if all(n in line for n in needles):
                    return line
            assert self.proc.returncode is None, "edged exited:\n" + self.log.read_text()
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line with {needles}:\n" + self.log.read_text())
            await asyncio.sleep(0.05)

    async def reloads(self, kind: str, result: str) -> float:
        """edged_reloads_total{kind, result} from the daemon's metrics listener."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        out = await run("curl", "-sS", url)
        assert out.returncode == 0, out.stderr
        for family in text_string_to_metric_families(out.stdout):
            for sample in family.samples:
                if sample.name == "edged_reloads_total" and sample.labels == {
                    "kind": kind,
                    "result": result,
                }:
                    return sample.value
        return 0.0

    async def served(self) -> str:
        args = ["-connect", f"127.0.0.1:{self.port}", "-brief", "-servername", NAME]
        return peer_cn((await run("openssl", "s_client", *args)).stderr)

    async def wait_served(self, cn: str, limit: float = 10) -> None:
        deadline = time.monotonic() + limit
        while (got := await self.served()) != cn:
            assert self.proc.returncode is None, "edged exited:\n" + self.log.read_text()
            if time.monotonic() > deadline:
                raise AssertionError(f"serving {got!r}, not {cn!r}:\n" + self.log.read_text())
            await asyncio.sleep(0.05)


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` the way deploy tools do: a temp file with its final mode, renamed over."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


@asynccontextmanager
async def edged_restricted(tmp_path: Path, live_mode: int = 0o755) -> AsyncIterator[Daemon]:
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "fullchain.pem", live / "privkey.pem"
    leaf = make_leaf(make_ca("Perm CA"), [NAME], cn="v0")
    write_new(cert, leaf.cert_pem, 0o644)
    write_new(key, leaf.key_pem, 0o600)
    live.chmod(live_mode)
    port, metrics = free_port(), free_port()
    async with run_backend() as backend:
        config = tmp_path / "edged.toml"
        config.write_text(
            textwrap.dedent(f"""
                [edged]
                store = "store"
                drain_timeout = 1
                [listen]
                https = ["127.0.0.1:{port}"]
                http = []
                metrics = "127.0.0.1:{metrics}"
                admin = ""
                [[site]]
                names = ["{NAME}"]
                backend = "{backend.address}"
                cert_file = "live/fullchain.pem"
                key_file = "live/privkey.pem"
            """)
        )
        # Not beside the config: edged watches that directory (a log there feeds itself).
        (tmp_path / "out").mkdir()
        log = tmp_path / "out" / "edged.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *RESTRICTED, EDGED, "run", "--config", str(config),
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            )  # fmt: skip
        daemon = Daemon(proc, port, metrics, config, log, cert, key)
        try:
            await daemon.wait_served("v0", limit=20)
            yield daemon
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


async def test_restricted_root_cannot_read_mode_000(tmp_path: Path) -> None:
    """The premise: without the two capabilities root obeys file modes (it still owns them)."""
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0)
    assert (await run("cat", str(secret))).returncode == (1 if not RESTRICTED else 0)
    out = await restricted("cat", str(secret))
    assert out.returncode == 1 and "Permission denied" in out.stderr
    secret.chmod(0o600)
    assert (await restricted("cat", str(secret))).stdout == "x"


async def test_unreadable_cert_then_key_keep_old_cert_until_mode_fixed(tmp_path: Path) -> None:
    ca = make_ca("Perm CA 2")
    async with edged_restricted(tmp_path) as edged:
        cert, key = edged.cert, edged.key

        # 1. A new pair arrives, the certificate with mode 000.
        v1 = make_leaf(ca, [NAME], cn="v1")
        write_new(cert, v1.cert_pem, 0o000)
        write_new(key, v1.key_pem, 0o600)
        line = await edged.wait_log("reload rejected", str(cert))
        assert "ERROR" in line
        assert f"site[0].cert_file: {cert}: not readable by this user: fix its mode" in line
        await asyncio.sleep(0.3)  # past the debounce: every batch of the change was handled
        assert await edged.served() == "v0"  # the old certificate keeps serving
        assert edged.proc.returncode is None
        assert await edged.reloads("file", "error") >= 1
        out = await restricted(EDGED, "check", "--config", str(edged.config))
        assert out.returncode == 1, out.stdout
        assert f"{edged.config}: site[0].cert_file: {cert}: not readable by this user" in out.stdout
        cert.chmod(0o644)  # the operator fixes it: the mode change alone triggers the reload
        await edged.wait_served("v1")
        assert await edged.reloads("file", "ok") >= 1
        out = await restricted(EDGED, "check", "--config", str(edged.config))
        assert out.returncode == 0, out.stdout

        # 2. The next pair's private key arrives unreadable (e.g. owned by another deploy user).
        v2 = make_leaf(ca, [NAME], cn="v2")
        write_new(key, v2.key_pem, 0o000)
        write_new(cert, v2.cert_pem, 0o644)
        await edged.wait_log("reload rejected", f"site[0].key_file: {key}: not readable")
        await asyncio.sleep(0.3)
        assert await edged.served() == "v1"
        assert edged.proc.returncode is None
        out = await restricted(EDGED, "check", "--config", str(edged.config))
        assert out.returncode == 1
        assert f"site[0].key_file: {key}: not readable by this user" in out.stdout
        key.chmod(0o600)
        await edged.wait_served("v2")
    # SIGTERM: a clean exit after all that.
    assert edged.proc.returncode == 0, edged.log.read_text()


async def test_unreadable_directory_keeps_old_cert(tmp_path: Path) -> None:
    """No search permission on the directory holding both files."""
    async with edged_restricted(tmp_path) as edged:
        live = edged.cert.parent
        live.chmod(0o600)  # rw but no x: names listed, files not reachable
        try:
            # The watcher sees nothing inside a directory it cannot search: ask for the reload.
            assert edged.proc.pid is not None
            os.kill(edged.proc.pid, signal.SIGHUP)
            line = await edged.wait_log("reload rejected", str(edged.cert))
            assert "Permission denied" in line
            assert await edged.served() == "v0"
            assert edged.proc.returncode is None
        finally:
            live.chmod(0o755)
        os.kill(edged.proc.pid, signal.SIGHUP)
        await edged.wait_log("reloaded (signal)")
        assert await edged.served() == "v0"


async def test_a_directory_edged_cannot_list_is_named_as_not_watched(tmp_path: Path) -> None:
    """The files can be read but their directory not listed (search without read, like
    Debian's /etc/ssl/private, 0710, for a member of ssl-cert): inotify cannot watch it, so
    changes to them are not seen. A warning says which files and what to do; SIGHUP reloads."""
    async with edged_restricted(tmp_path, live_mode=0o311) as edged:
        live = edged.cert.parent
        line = await edged.wait_log("cannot watch", str(live))
        assert "WARNING" in line and "Permission denied" in line
        assert "fullchain.pem" in line and "privkey.pem" in line and "SIGHUP" in line
        leaf = make_leaf(make_ca("Perm CA 4"), [NAME], cn="v1")
        write_new(edged.key, leaf.key_pem, 0o600)
        write_new(edged.cert, leaf.cert_pem, 0o644)
        assert edged.proc.pid is not None
        os.kill(edged.proc.pid, signal.SIGHUP)
        await edged.wait_served("v1")


async def test_cert_inspect_says_permission_denied(tmp_path: Path) -> None:
    leaf = make_leaf(make_ca("Perm CA 3"), [NAME])
    cert = tmp_path / "cert.pem"
    write_new(cert, leaf.cert_pem, 0o000)
    out = await restricted(EDGED, "cert", "inspect", str(cert))
    assert out.returncode == 1
    assert out.stdout.strip() == (
        f"{cert}: cannot read: permission denied: the user edged runs as needs read access "
        "to this file and search access to its directories (chmod/chown)"
    )
    cert.chmod(0o644)
    out = await restricted(EDGED, "cert", "inspect", str(cert))
    assert out.returncode == 0 and "leaf" in out.stdout


pytestmark = pytest.mark.skipif(
    os.geteuid() == 0 and not Path("/usr/bin/setpriv").exists(), reason="needs setpriv"
)
