"""[edged] allocator: `edged run` re-executes itself under jemalloc (same pid, arguments and
sockets), workers inherit it, children get the environment edged was started with; "system"
keeps the C library's malloc; "jemalloc" without the library is a clear error. And
release_free_memory gives jemalloc's freed pages back too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edged.config import Config
from edged.heap import (
    CONF_MARK,
    JEMALLOC_CONF,
    REEXEC_MARK,
    SYSTEM_MARK,
    AllocatorError,
    find_jemalloc,
    plan,
    restore_environment,
    running_allocator,
)
from tests.conftest import free_port, run_backend, spawn_edged
from tests.test_heap import SCRIPT as RELEASE_SCRIPT
from tests.test_workers import client_context, fetch, site

LIB = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


# --- the decision (pure) ----------------------------------------------------------------------


def test_plan_reexecutes_with_jemalloc_preloaded() -> None:
    decision = plan("auto", "system", LIB, {"PATH": "/usr/bin"})
    assert decision.env is not None
    assert decision.env["LD_PRELOAD"] == LIB
    assert decision.env[REEXEC_MARK] == ""  # nothing to restore for children
    assert decision.env["PATH"] == "/usr/bin"
    # jemalloc's own options: freed pages back at once (RSS follows what is in use).
    assert decision.env["MALLOC_CONF"] == JEMALLOC_CONF == "dirty_decay_ms:0,muzzy_decay_ms:0"
    assert decision.env[CONF_MARK] == "1"


def test_plan_keeps_an_operators_malloc_conf() -> None:
    decision = plan("auto", "system", LIB, {"MALLOC_CONF": "narenas:2"})
    assert decision.env is not None
    assert decision.env["MALLOC_CONF"] == "narenas:2" and CONF_MARK not in decision.env


def test_plan_keeps_an_operators_preload_after_jemalloc() -> None:
    decision = plan("jemalloc", "system", LIB, {"LD_PRELOAD": "/opt/x.so"})
    assert decision.env is not None
    assert decision.env["LD_PRELOAD"] == f"{LIB}:/opt/x.so"
    assert decision.env[REEXEC_MARK] == "/opt/x.so"


def test_plan_drops_a_preload_edged_added_when_the_config_says_system() -> None:
    environ = {"LD_PRELOAD": f"{LIB}:/opt/x.so", REEXEC_MARK: "/opt/x.so", "PATH": "/usr/bin"}
    decision = plan("system", "jemalloc", LIB, environ)
    assert decision.env == {"LD_PRELOAD": "/opt/x.so", SYSTEM_MARK: "1", "PATH": "/usr/bin"}
    environ = {"LD_PRELOAD": LIB, REEXEC_MARK: "", "MALLOC_CONF": JEMALLOC_CONF, CONF_MARK: "1"}
    decision = plan("system", "jemalloc", LIB, environ)
    assert decision.env == {SYSTEM_MARK: "1"}
    # The operator's own LD_PRELOAD is theirs: edged says what runs and goes on.
    decision = plan("system", "jemalloc", LIB, {"LD_PRELOAD": LIB})
    assert decision.env is None
    assert "preloaded by the environment" in decision.note


def test_plan_goes_on_when_jemalloc_runs_or_system_is_asked_for() -> None:
    assert plan("auto", "jemalloc", LIB, {REEXEC_MARK: ""}).env is None
    assert plan("jemalloc", "jemalloc", LIB, {REEXEC_MARK: ""}).env is None
    decision = plan("system", "system", LIB, {SYSTEM_MARK: "1"})
    assert decision.env is None
    assert "C library" in decision.note


def test_plan_without_the_library() -> None:
    decision = plan("auto", "system", None, {})
    assert decision.env is None
    assert "install libjemalloc2" in decision.note
    with pytest.raises(AllocatorError, match="apt-get install libjemalloc2"):
        plan("jemalloc", "system", None, {})


def test_plan_never_loops_when_preloading_failed() -> None:
    """The re-executed process still runs the C library's malloc (the loader refused the
    library): no second exec; an error only when jemalloc was required."""
    env = {REEXEC_MARK: "", "LD_PRELOAD": LIB}
    decision = plan("auto", "system", LIB, env)
    assert decision.env is None
    assert "failed" in decision.note
    with pytest.raises(AllocatorError, match="could not be preloaded"):
        plan("jemalloc", "system", LIB, env)


def test_restore_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", f"{LIB}:/opt/x.so")
    monkeypatch.setenv(REEXEC_MARK, "/opt/x.so")
    monkeypatch.setenv(SYSTEM_MARK, "1")
    monkeypatch.setenv("MALLOC_CONF", JEMALLOC_CONF)
    monkeypatch.setenv(CONF_MARK, "1")
    restore_environment()
    assert SYSTEM_MARK not in os.environ
    assert "MALLOC_CONF" not in os.environ and CONF_MARK not in os.environ
    assert os.environ["LD_PRELOAD"] == "/opt/x.so"
    assert REEXEC_MARK not in os.environ
    monkeypatch.setenv("LD_PRELOAD", LIB)
    monkeypatch.setenv(REEXEC_MARK, "")
    restore_environment()
    assert "LD_PRELOAD" not in os.environ


def test_running_allocator_reads_the_maps() -> None:
    assert running_allocator(f"7f0-7f1 r-xp 0 08:01 12 {LIB}\n") == "jemalloc"
    assert running_allocator("7f0-7f1 r-xp 0 08:01 12 /usr/lib/libc.so.6\n") == "system"
    assert running_allocator() == "system"  # pytest itself runs on glibc's malloc


# --- the real process -------------------------------------------------------------------------


def maps_of(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@dataclass
class Running:
    proc: asyncio.subprocess.Process
    port: int
    admin: int
    log: Path

    def status(self) -> dict[str, object]:
        url = f"http://127.0.0.1:{self.admin}/status"
        with urllib.request.urlopen(url, timeout=5) as resp:
            data = json.loads(resp.read())
        assert isinstance(data, dict)
        return data


@contextlib.asynccontextmanager
async def running(tmp_path: Path, pki: dict[str, Path], edged_extra: str) -> AsyncIterator[Running]:
    """`edged run` serving one.example.test, with `edged_extra` in [edged]; stopped (exit 0
    checked) at the end."""
    port, admin = free_port(), free_port()
    async with run_backend() as backend:
        config = tmp_path / "edged.toml"
        config.write_text(
            f'[edged]\nstore = "store"\n{edged_extra}\n'
            f'[listen]\nhttps = ["127.0.0.1:{port}"]\nhttp = []\nmetrics = ""\n'
            f'admin = "127.0.0.1:{admin}"\n[tls]\nalpn = ["http/1.1"]\n'
            + site(backend.address, pki["one_cert"], pki["one_key"], "one.example.test")
        )
        log = tmp_path / "edged.log"
        proc = await spawn_edged(config, log)
        try:
            deadline = time.monotonic() + 30
            while b"edged ready" not in log.read_bytes():
                assert proc.returncode is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
            yield Running(proc, port, admin, log)
        finally:
            if proc.returncode is None:
                proc.terminate()
            await asyncio.wait_for(proc.wait(), 20)
        assert proc.returncode == 0, log.read_text()[-2000:]


@pytest.mark.skipif(find_jemalloc() is None, reason="libjemalloc2 is installed by scripts/install")
async def test_edged_runs_on_jemalloc_and_so_do_its_workers(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    async with running(tmp_path, pki, 'workers = 2\nallocator = "auto"') as edged:
        # The same process (pid) after the exec, now with libjemalloc mapped; the exec's
        # environment carried the preload.
        assert "/libjemalloc.so" in maps_of(edged.proc.pid)
        assert environ_of(edged.proc.pid)["LD_PRELOAD"].endswith("libjemalloc.so.2")
        assert edged.status()["allocator"] == "jemalloc"
        assert "memory allocator: jemalloc" in edged.log.read_text()
        deadline = time.monotonic() + 30
        while True:
            workers = edged.status()["workers"]
            assert isinstance(workers, list)
            if len(workers) == 2 and all(w["ready"] for w in workers):
                break
            assert time.monotonic() < deadline, workers
            await asyncio.sleep(0.1)
        for worker in workers:  # forked: the same allocator
            assert "/libjemalloc.so" in maps_of(int(worker["pid"]))
        ctx = client_context(pki["ca"])
        for _ in range(4):  # served (fetch checks the certificate and the response)
            await asyncio.to_thread(fetch, edged.port, ctx, "one.example.test")


async def test_allocator_system_keeps_the_c_librarys_malloc(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    async with running(tmp_path, pki, 'allocator = "system"') as edged:
        assert "/libjemalloc.so" not in maps_of(edged.proc.pid)
        assert "LD_PRELOAD" not in environ_of(edged.proc.pid)
        assert edged.status()["allocator"] == "system"
        assert "memory allocator: the C library's malloc" in edged.log.read_text()
        ctx = client_context(pki["ca"])
        await asyncio.to_thread(fetch, edged.port, ctx, "one.example.test")


def test_bad_allocator_value_is_a_config_error(tmp_path: Path) -> None:
    from edged.config import load_config
    from edged.errors import ConfigError

    config = tmp_path / "edged.toml"
    config.write_text('[edged]\nallocator = "tcmalloc"\n')
    with pytest.raises(ConfigError, match=r"edged\.allocator: 'tcmalloc' is not one of"):
        load_config(config)


@pytest.mark.skipif(find_jemalloc() is None, reason="libjemalloc2 is installed by scripts/install")
def test_release_free_memory_under_jemalloc() -> None:
    lib = find_jemalloc()
    assert lib is not None
    out = subprocess.run(
        [sys.executable, "-c", RELEASE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "LD_PRELOAD": lib},
    )
    before, after, _ = (int(v) for v in out.stdout.split())
    print(f"jemalloc: RSS after freeing {before} MiB; after release_free_memory {after} MiB")
    assert before > 300  # jemalloc too kept what was freed (its decay had not run yet)
    assert after < before / 3


@pytest.mark.skipif(find_jemalloc() is None, reason="libjemalloc2 is installed by scripts/install")
def test_a_failed_exec_goes_on_with_the_c_library_malloc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An interpreter edged cannot execute again (sys.executable unusable): "auto" goes on
    with the malloc it has and says why; "jemalloc" is a startup error."""
    from edged.cli import _choose_allocator
    from edged.config import load_config

    def config(allocator: str) -> Config:
        path = tmp_path / f"{allocator}.toml"
        path.write_text(
            f'[edged]\nallocator = "{allocator}"\n[[site]]\nnames = ["a.example.test"]\n'
            'backend = "127.0.0.1:9"\n'
        )
        return load_config(path)

    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    caplog.set_level("INFO", logger="edged")
    _choose_allocator(config("auto"))
    assert "re-executing /nonexistent/python3 with jemalloc preloaded failed" in caplog.text
    assert REEXEC_MARK not in os.environ
    with pytest.raises(AllocatorError, match="re-executing /nonexistent/python3"):
        _choose_allocator(config("jemalloc"))
