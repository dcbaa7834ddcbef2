"""Hot reload from file changes: in-place writes, rename over, symlink swaps, config edits."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edged.config import load_config_digest
from edged.daemon import Daemon
from edged.store import FileStore, PemPair, StoredCert
from tests.conftest import Edged, free_port, peer_cn, run_backend, run_cmd, run_edged, s_client
from tests.pki import encrypted_key_pem, fullchain, make_ca, make_leaf, write_pair

EDGED = str(Path(sys.executable).with_name("edged"))


async def served_cn(edged: Edged, sni: str) -> str:
    return peer_cn((await s_client(edged.port, sni)).stderr)


async def wait_for(predicate_cn: str, edged: Edged, sni: str, limit: float = 3.0) -> float:
    """Seconds until `sni` is served with CN `predicate_cn` (fails after `limit`)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < limit:
        if await served_cn(edged, sni) == predicate_cn:
            return loop.time() - start
        await asyncio.sleep(0.05)
    raise AssertionError(f"{sni} not served with CN={predicate_cn} within {limit}s")


def cert_site(backend: str, cert: Path, key: Path) -> str:
    return (
        f'[[site]]\nnames = ["r.example.test"]\nbackend = "{backend}"\n'
        f'cert_file = "{cert}"\nkey_file = "{key}"\n'
    )


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
        body = cert_site(backend.address, cert, key)
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


async def test_a_directory_of_certs_swapped_by_rename_is_followed(tmp_path: Path) -> None:
    """A deploy that prepares a new directory and renames it into place: the old directory's
    watch ends with it; edged reloads and watches the new one from then on."""
    certs = tmp_path / "certs"
    deploy(certs, "d0", "dir-0")
    deploy(tmp_path / "certs.new", "d1", "dir-1")
    cert, key = certs / "fullchain.pem", certs / "privkey.pem"
    async with (
        run_backend() as backend,
        run_edged(tmp_path, cert_site(backend.address, cert, key)) as edged,
    ):
        assert await served_cn(edged, "r.example.test") == "dir-0"
        os.rename(certs, tmp_path / "certs.old")
        os.rename(tmp_path / "certs.new", certs)
        assert await wait_for("dir-1", edged, "r.example.test") < 3
        # And the new directory is the one watched now.
        deploy(certs, "d2", "dir-2")
        assert await wait_for("dir-2", edged, "r.example.test") < 3


def deploy(directory: Path, stem: str, cn: str) -> None:
    """A release directory holding fullchain.pem and privkey.pem for r.example.test (files
    already there are written in place: cert, then key)."""
    directory.mkdir(parents=True, exist_ok=True)
    c, k = pair(directory.parent, stem, cn)
    (directory / "fullchain.pem").write_bytes(c.read_bytes())
    (directory / "privkey.pem").write_bytes(k.read_bytes())


async def test_a_symlinked_directory_switched_to_another_release_is_followed(
    tmp_path: Path,
) -> None:
    """cert_file is reached through a symlinked directory (`current -> releases/1`, a deploy
    switching releases): switching the link changes what the path names although no file in a
    watched directory changed; edged reloads, and follows the new release from then on."""
    releases = tmp_path / "releases"
    deploy(releases / "1", "r1", "release-1")
    deploy(releases / "2", "r2", "release-2")
    current = tmp_path / "current"
    current.symlink_to(releases / "1")
    cert, key = current / "fullchain.pem", current / "privkey.pem"
    async with (
        run_backend() as backend,
        run_edged(tmp_path, cert_site(backend.address, cert, key)) as edged,
    ):
        assert await served_cn(edged, "r.example.test") == "release-1"
        await asyncio.sleep(0.5)  # past the start's catch-up: only the watcher can see it
        link = tmp_path / "current.new"
        link.symlink_to(releases / "2")
        os.replace(link, current)  # ln -sfn's atomic form
        assert await wait_for("release-2", edged, "r.example.test") < 3
        deploy(current, "r3", "release-3")  # in place, in releases/2 now
        assert await wait_for("release-3", edged, "r.example.test") < 3


async def test_a_renamed_parent_of_the_certs_directory_is_followed(tmp_path: Path) -> None:
    """A deploy renaming a new tree into place (`app.new` -> `app`) above the directory that
    holds the files: the watched directory itself only moved along, unseen by its watch."""
    deploy(tmp_path / "app" / "certs", "a1", "app-1")
    deploy(tmp_path / "app.new" / "certs", "a2", "app-2")
    certs = tmp_path / "app" / "certs"
    cert, key = certs / "fullchain.pem", certs / "privkey.pem"
    async with (
        run_backend() as backend,
        run_edged(tmp_path, cert_site(backend.address, cert, key)) as edged,
    ):
        assert await served_cn(edged, "r.example.test") == "app-1"
        await asyncio.sleep(0.5)  # past the start's catch-up: only the watcher can see it
        os.rename(tmp_path / "app", tmp_path / "app.old")
        os.rename(tmp_path / "app.new", tmp_path / "app")
        assert await wait_for("app-2", edged, "r.example.test") < 3
        deploy(certs, "a3", "app-3")
        assert await wait_for("app-3", edged, "r.example.test") < 3


async def test_a_certs_directory_removed_then_deployed_again_is_seen(tmp_path: Path) -> None:
    """A deploy that removes the directory holding the files and creates it again a while
    later: the reload in between fails (the old certificate keeps serving), and the new
    directory is seen although nothing watched it when it appeared."""
    certs = tmp_path / "certs"
    deploy(certs, "c1", "again-1")
    cert, key = certs / "fullchain.pem", certs / "privkey.pem"
    async with (
        run_backend() as backend,
        run_edged(tmp_path, cert_site(backend.address, cert, key)) as edged,
    ):
        assert await served_cn(edged, "r.example.test") == "again-1"
        await asyncio.sleep(0.5)  # past the start's catch-up: only the watcher can see it
        shutil.rmtree(certs)
        await asyncio.sleep(1.0)  # the reload without the files fails, the watch restarted
        assert await served_cn(edged, "r.example.test") == "again-1"
        deploy(certs, "c2", "again-2")
        assert await wait_for("again-2", edged, "r.example.test") < 3


async def test_the_watch_starts_again_at_once_while_a_catch_up_still_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catch-up after a watcher's start compares every store entry's stamp (seconds for a
    large store on a cold disk). A watched directory replaced meanwhile ends that watcher; the
    next one starts at once, not after that comparison, which the next one's own catch-up
    makes again: a change right after the replacement is seen within the usual delay."""
    import threading

    from edged import daemon as daemon_module

    real_snapshot = daemon_module.take_snapshot
    armed, entered, release = threading.Event(), threading.Event(), threading.Event()

    def slow_disk(watch: object, *, store: bool = True) -> object:
        if armed.is_set() and not entered.is_set():  # the first catch-up after the start
            entered.set()
            release.wait(10)
        return real_snapshot(watch, store=store)  # type: ignore[arg-type]

    monkeypatch.setattr(daemon_module, "take_snapshot", slow_disk)
    certs = tmp_path / "certs"
    deploy(certs, "s0", "slow-0")
    deploy(tmp_path / "certs.new", "s1", "slow-1")
    cert, key = certs / "fullchain.pem", certs / "privkey.pem"
    loop = asyncio.get_running_loop()
    async with run_backend() as backend:
        try:
            async with run_edged(tmp_path, cert_site(backend.address, cert, key)) as edged:
                armed.set()  # ready: the catch-up, 0.2 s after the watcher's start, is next
                assert await loop.run_in_executor(None, entered.wait, 10)
                assert await served_cn(edged, "r.example.test") == "slow-0"
                os.rename(certs, tmp_path / "certs.old")
                os.rename(tmp_path / "certs.new", certs)
                assert await wait_for("slow-1", edged, "r.example.test") < 3
                await asyncio.sleep(0.5)  # the next watcher and its catch-up are up
                deploy(certs, "s2", "slow-2")
                assert await wait_for("slow-2", edged, "r.example.test") < 2
        finally:
            release.set()


def inotify_fds() -> int:
    """This process's inotify instances open now."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
    return count


async def test_restarts_of_the_watcher_leave_one_inotify_instance(tmp_path: Path) -> None:
    """Each restart (a watched directory replaced, a reload with a new set of paths) closes
    the instance before it: one is open while edged runs, none once it stopped."""
    before = inotify_fds()
    certs = tmp_path / "certs"
    deploy(certs, "f0", "fd-0")
    cert, key = certs / "fullchain.pem", certs / "privkey.pem"
    async with (
        run_backend() as backend,
        run_edged(tmp_path, cert_site(backend.address, cert, key)) as edged,
    ):
        for n in range(1, 6):
            deploy(tmp_path / f"certs.{n}", f"f{n}", f"fd-{n}")
            os.rename(certs, tmp_path / f"certs.old{n}")
            os.rename(tmp_path / f"certs.{n}", certs)
            assert await wait_for(f"fd-{n}", edged, "r.example.test") < 3
        other = pair(tmp_path, "f9", "fd-9")  # other files to watch: a new set, a restart
        text = edged.config_path.read_text().replace(str(cert), str(other[0]))
        edged.config_path.write_text(text.replace(str(key), str(other[1])))
        assert await wait_for("fd-9", edged, "r.example.test") < 3
        await asyncio.sleep(0.5)
        assert inotify_fds() == before + 1
    assert inotify_fds() == before


async def test_a_report_of_many_files_is_one_short_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A directory above thousands of cert_file paths renamed reports them all: the line
    that says so names a few and counts the rest (journald splits lines past 48 KiB)."""
    c0, k0 = pair(tmp_path, "m0", "many-0")
    async with (
        run_backend() as backend,
        run_edged(tmp_path, cert_site(backend.address, c0, k0)) as edged,
    ):
        caplog.set_level("INFO", logger="edged.daemon")
        paths = {tmp_path / "certs" / f"site{n:04}.pem" for n in range(5000)}
        edged.daemon._on_files_changed(paths)
        (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("changed:")]
        assert len(line) < 2000
        assert str(tmp_path / "certs" / "site0000.pem") in line and "and 4990 more" in line
        await asyncio.sleep(0.5)  # the reload it asked for


async def test_a_config_file_turned_into_a_symlink_is_followed_into_its_target(
    tmp_path: Path,
) -> None:
    """The config replaced by a symlink to a file elsewhere holding the same text (a deploy
    moving it under a release directory): nothing to reload, but the file to watch is the
    target now, and an edit made to it in place is seen."""
    c0, k0 = pair(tmp_path, "y0", "link-0")
    c1, k1 = pair(tmp_path, "y1", "link-1")
    async with (
        run_backend() as backend,
        run_edged(tmp_path, cert_site(backend.address, c0, k0)) as edged,
    ):
        assert await served_cn(edged, "r.example.test") == "link-0"
        await asyncio.sleep(0.5)  # past the start's catch-up: only the watcher can see it
        release = tmp_path / "release"
        release.mkdir()
        text = edged.config_path.read_text()
        (release / "edged.toml").write_text(text)
        link = tmp_path / "edged.toml.new"
        link.symlink_to(release / "edged.toml")
        os.replace(link, edged.config_path)
        await asyncio.sleep(0.5)  # reported, and the same text: no reload needed
        assert await served_cn(edged, "r.example.test") == "link-0"
        edited = text.replace(str(c0), str(c1)).replace(str(k0), str(k1))
        (release / "edged.toml").write_text(edited)  # in place, in the target's directory
        assert await wait_for("link-1", edged, "r.example.test") < 3


async def test_config_edit_adds_a_site(tmp_path: Path) -> None:
    c0, k0 = pair(tmp_path, "a", "site-a")
    c1, k1 = pair(tmp_path, "b", "site-b")
    async with run_backend() as backend:
        body = cert_site(backend.address, c0, k0)
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
        body = cert_site(backend.address, cert, key)
        async with run_edged(tmp_path, body) as edged:
            cert.write_bytes(c1.read_bytes())
            key.write_bytes(k1.read_bytes())
            assert await wait_for("early-1", edged, "r.example.test") < 2


BAD_INPUTS = ["truncated", "other_key", "expired", "wrong_names", "encrypted", "empty", "no_key",
              "deleted"]  # fmt: skip


async def test_every_bad_replacement_keeps_the_old_cert(tmp_path: Path) -> None:
    ca = make_ca("Bad CA")
    now = datetime.now(UTC)
    good = make_leaf(ca, ["r.example.test"], cn="good")
    cert, key = write_pair(tmp_path, "live", good, [])
    bad_leaf = {
        "expired": make_leaf(
            ca, ["r.example.test"], not_before=now - timedelta(days=9), not_after=now - timedelta(1)
        ),
        "wrong_names": make_leaf(ca, ["other.example.test"]),
    }
    async with run_backend() as backend:
        body = cert_site(backend.address, cert, key)
        async with run_edged(tmp_path, body) as edged:
            for case in BAD_INPUTS:
                errors_before = edged.daemon.counters.reloads["signal", "error"]
                if case == "truncated":
                    cert.write_bytes(good.cert_pem[: len(good.cert_pem) // 2])
                elif case == "other_key":
                    key.write_bytes(make_leaf(ca, ["r.example.test"]).key_pem)
                elif case in bad_leaf:
                    cert.write_bytes(bad_leaf[case].cert_pem)
                    key.write_bytes(bad_leaf[case].key_pem)
                elif case == "encrypted":
                    key.write_bytes(encrypted_key_pem(good))
                elif case == "empty":
                    cert.write_bytes(b"")
                elif case == "no_key":
                    key.write_bytes(good.cert_pem)
                elif case == "deleted":
                    cert.unlink()
                assert not await edged.daemon.reload("signal"), case
                assert edged.daemon.counters.reloads["signal", "error"] == errors_before + 1
                assert await served_cn(edged, "r.example.test") == "good", case
                # restore, and the good pair is accepted again
                cert.write_bytes(good.cert_pem)
                key.write_bytes(good.key_pem)
                assert await edged.daemon.reload("signal"), case


async def test_sighup_burst_coalesces_and_serving_goes_on(tmp_path: Path) -> None:
    c0, k0 = pair(tmp_path, "a", "burst")
    async with run_backend() as backend:
        body = cert_site(backend.address, c0, k0)
        async with run_edged(tmp_path, body) as edged:
            for _ in range(100):
                edged.daemon.request_reload("signal")
            assert await served_cn(edged, "r.example.test") == "burst"
            await asyncio.sleep(0.5)
            reloads = sum(
                n for (kind, _), n in edged.daemon.counters.reloads.items() if kind == "signal"
            )
            assert 1 <= reloads <= 2  # 100 requests, one or two reloads


async def test_a_sighup_meeting_a_file_change_is_reported_as_the_sighup(tmp_path: Path) -> None:
    """Requests that coalesce are one reload; it counts under the operator's kind (a file
    change or a store change found while a SIGHUP waits does not relabel it), and a SIGHUP
    relabels a waiting file change."""
    c0, k0 = pair(tmp_path, "a", "kinds")
    async with run_backend() as backend:
        body = cert_site(backend.address, c0, k0)
        async with run_edged(tmp_path, body) as edged:
            daemon = edged.daemon
            await asyncio.sleep(0.5)  # the start-up catch-up has run
            for first, second in (("signal", "file"), ("file", "signal"), ("signal", "store")):
                before = dict(daemon.counters.reloads)
                daemon.request_reload(first)  # no await between: the two coalesce
                daemon.request_reload(second, {"r.example.test"} if second == "store" else None)
                for _ in range(100):
                    await asyncio.sleep(0.02)
                    if daemon.counters.reloads != before:
                        break
                await asyncio.sleep(0.2)
                new = {k: n - before.get(k, 0) for k, n in daemon.counters.reloads.items()}
                assert {k: n for k, n in new.items() if n} == {("signal", "ok"): 1}, (first, new)


async def test_removing_a_listener_closes_only_that_one(tmp_path: Path) -> None:
    c0, k0 = pair(tmp_path, "a", "listeners")
    extra = free_port()
    async with run_backend() as backend:
        body = cert_site(backend.address, c0, k0)
        async with run_edged(tmp_path, body) as edged:
            text = edged.config_path.read_text()
            both = text.replace(
                f'https = ["127.0.0.1:{edged.port}"]',
                f'https = ["127.0.0.1:{edged.port}", "127.0.0.1:{extra}"]',
            )
            edged.config_path.write_text(both)
            assert await edged.daemon.reload("signal")
            socket.create_connection(("127.0.0.1", extra), timeout=2).close()
            held = socket.create_connection(("127.0.0.1", edged.port), timeout=2)
            edged.config_path.write_text(text)
            assert await edged.daemon.reload("signal")
            try:
                socket.create_connection(("127.0.0.1", extra), timeout=2).close()
                raise AssertionError("removed listener still accepts")
            except ConnectionRefusedError:
                pass
            assert await served_cn(edged, "r.example.test") == "listeners"
            held.close()


@pytest.mark.parametrize("busy_kind", ["http", "https"])
async def test_a_reload_whose_listener_cannot_be_bound_moves_no_listener(
    tmp_path: Path, busy_kind: str
) -> None:
    """https moves A -> B and http gets a new port in the same edit; one of the new ports is
    taken: the reload is rejected and every listener stays as it was (before, a taken http
    port left the https listener moved to B and A closed)."""
    c0, k0 = pair(tmp_path, "a", "listeners")
    moved, http_port = free_port(), free_port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", http_port if busy_kind == "http" else moved))
        blocker.listen()
        async with (
            run_backend() as backend,
            run_edged(tmp_path, cert_site(backend.address, c0, k0)) as edged,
        ):
            text = edged.config_path.read_text()
            edited = text.replace(
                f'https = ["127.0.0.1:{edged.port}"]', f'https = ["127.0.0.1:{moved}"]'
            ).replace("http = []", f'http = ["127.0.0.1:{http_port}"]')
            assert edited.count(str(moved)) == 1 and edited.count(str(http_port)) == 1
            edged.config_path.write_text(edited)
            assert not await edged.daemon.reload("signal")
            assert await served_cn(edged, "r.example.test") == "listeners"  # still on A
            assert [a.port for a in edged.daemon.listening()] == [edged.port]
            assert edged.daemon.http.addresses() == []
            free = moved if busy_kind == "http" else http_port
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", free), timeout=2).close()


async def test_a_changed_ticket_key_rotation_applies_at_the_reload(tmp_path: Path) -> None:
    """The interval is taken at each reload, counted from the last rotation: from daily to
    one second rotates within about a second (before: only after the day), and 0 stops."""
    c0, k0 = pair(tmp_path, "a", "rotation")
    body = '[tls]\nticket_key_rotation = "24h"\n' + cert_site("127.0.0.1:9", c0, k0)
    async with run_edged(tmp_path, body) as edged:
        text = edged.config_path.read_text()
        counters = edged.daemon.counters
        edged.config_path.write_text(text.replace('"24h"', '"1s"'))
        assert await edged.daemon.reload("signal")
        for _ in range(100):
            if counters.ticket_key_rotations >= 2:
                break
            await asyncio.sleep(0.05)
        assert counters.ticket_key_rotations >= 2
        edged.config_path.write_text(text.replace('"24h"', "0"))
        assert await edged.daemon.reload("signal")
        stopped = counters.ticket_key_rotations
        await asyncio.sleep(1.5)
        assert counters.ticket_key_rotations == stopped


def stored(name: str, cn: str, ca: object) -> StoredCert:
    leaf = make_leaf(ca, [name], cn=cn)  # type: ignore[arg-type]
    return StoredCert(
        name=name,
        names=(name,),
        pairs=(PemPair("ecdsa-p256", fullchain(leaf), leaf.key_pem),),
        source="upload",
        stored_at=0.0,
    )


async def test_rollback_command_restores_previous_and_daemon_serves_it(tmp_path: Path) -> None:
    ca = make_ca("Rollback CA")
    store = FileStore(tmp_path / "store")
    store.save(stored("r.example.test", "first", ca))
    store.save(stored("r.example.test", "second", ca))
    async with run_backend() as backend:
        body = f'[[site]]\nnames = ["r.example.test"]\nbackend = "{backend.address}"\n'
        async with run_edged(tmp_path, body) as edged:
            assert await served_cn(edged, "r.example.test") == "second"
            out = await run_cmd(
                EDGED, "rollback", "--config", str(edged.config_path), "R.example.test"
            )
            assert out.returncode == 0, out.stdout
            assert "rolled back" in out.stdout
            assert await wait_for("first", edged, "r.example.test") < 1.5
            out = await run_cmd(EDGED, "rollback", "--config", str(edged.config_path), "x.test")
            assert out.returncode == 1 and "not the first name of any [[site]]" in out.stdout
    mode = (tmp_path / "store/live/r.example.test/privkey.pem").stat().st_mode & 0o777
    assert mode == 0o600


async def test_a_store_written_by_another_process_is_followed_from_its_first_entry(
    tmp_path: Path,
) -> None:
    """The store holds nothing yet (no live/: nothing to watch there) when edged starts; the
    first entry, written by another process (`edged issue`, an upload elsewhere), creates
    live/ and is served; live/ is watched from then on, so the next write goes at once."""
    ca = make_ca("First entry CA")
    async with run_backend() as backend:
        body = f'[[site]]\nnames = ["r.example.test"]\nbackend = "{backend.address}"\n'
        async with run_edged(tmp_path, body) as edged:
            assert not (tmp_path / "store" / "live").exists()
            await asyncio.sleep(0.5)  # past the start's catch-up: only the watcher can see it
            other = FileStore(tmp_path / "store")  # not the daemon's: only the watch tells it
            await asyncio.to_thread(other.save, stored("r.example.test", "first", ca))
            assert await wait_for("first", edged, "r.example.test") < 3
            await asyncio.sleep(0.5)
            await asyncio.to_thread(other.save, stored("r.example.test", "second", ca))
            assert await wait_for("second", edged, "r.example.test") < 1


async def test_an_edit_followed_by_a_sighup_is_one_reload(tmp_path: Path) -> None:
    """The usual "edit the config, then systemctl reload": the watcher's report of the edit
    comes while or after the SIGHUP's reload runs, and a second reload would read the same
    files again (~10 s of work with 100k store certificates): it is skipped. A real change
    after that still reloads."""
    c0, k0 = pair(tmp_path, "a", "once")
    async with run_backend() as backend:
        body = cert_site(backend.address, c0, k0)
        async with run_edged(tmp_path, body) as edged:
            daemon = edged.daemon
            await asyncio.sleep(0.5)  # the start-up catch-up has run
            before = dict(daemon.counters.reloads)

            def new() -> dict[tuple[str, str], int]:
                counts = daemon.counters.reloads.items()
                return {k: n - before.get(k, 0) for k, n in counts if n - before.get(k, 0)}

            edged.config_path.write_text(edged.config_path.read_text() + "\n# edited\n")
            daemon.request_reload("signal")
            await asyncio.sleep(3.0)  # the watcher's report of the edit has come (debounced)
            assert new() == {("signal", "ok"): 1}
            edged.config_path.write_text(edged.config_path.read_text() + "# edited again\n")
            for _ in range(100):
                await asyncio.sleep(0.05)
                if ("file", "ok") in new():
                    break
            assert new() == {("signal", "ok"): 1, ("file", "ok"): 1}


async def test_a_skipped_file_report_never_drops_a_store_change_merged_with_it(
    tmp_path: Path,
) -> None:
    """A store change (a fleet node's message, a write under live/) waiting when the watcher
    reports a config file that is as already loaded: the two coalesce into one full reload,
    which must run (skipping it would lose the store change)."""
    c0, k0 = pair(tmp_path, "a", "merged")
    async with run_backend() as backend:
        body = cert_site(backend.address, c0, k0)
        async with run_edged(tmp_path, body) as edged:
            daemon = edged.daemon
            await asyncio.sleep(0.5)  # the start-up catch-up has run
            before = sum(daemon.counters.reloads.values())
            daemon.request_reload("store", {"r.example.test"})  # no await: the two coalesce
            daemon._on_files_changed({edged.config_path.absolute()})  # as the watcher reports
            for _ in range(100):
                await asyncio.sleep(0.05)
                if sum(daemon.counters.reloads.values()) > before:
                    break
            assert sum(daemon.counters.reloads.values()) == before + 1


async def test_an_edit_between_reading_the_config_and_the_snapshot_is_caught(
    tmp_path: Path,
) -> None:
    """The config is read (by the CLI, before the daemon starts) before the load takes its
    stat snapshot, so an edit in between looks loaded by its stat; its text shows it, and the
    catch-up after the watcher starts reloads. Made deterministic here: the daemon is handed
    the config as read (the old text and its digest) while the file already holds the edit."""
    c0, k0 = pair(tmp_path, "a", "first")
    c1, k1 = write_pair(tmp_path, "b", make_leaf(make_ca("Reload CA"), ["s.example.test"]), [])
    async with run_backend() as backend:
        path = tmp_path / "edged.toml"
        head = (
            f'[edged]\nstore = "store"\n[listen]\nhttps = ["127.0.0.1:{free_port()}"]\n'
            'http = []\nmetrics = ""\nadmin = ""\n'
        )
        path.write_text(head + cert_site(backend.address, c0, k0))
        config, digest = load_config_digest(path)
        second = cert_site(backend.address, c1, k1).replace("r.example.test", "s.example.test")
        path.write_text(head + cert_site(backend.address, c0, k0) + second)
        daemon = Daemon(path, None, config, digest)
        task = asyncio.create_task(daemon.run(install_signals=False))
        try:
            await asyncio.wait_for(daemon.ready.wait(), 10)
            for _ in range(100):
                if daemon.index.lookup("s.example.test") is not None:
                    break
                await asyncio.sleep(0.05)
            assert daemon.index.lookup("s.example.test") is not None
        finally:
            daemon.request_stop()
            assert await asyncio.wait_for(task, 10) == 0


async def test_settings_that_need_a_restart_are_logged_at_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """edged.allocator (the process's malloc), edged.workers and listen.metrics cannot change
    in a running process: a reload applies the rest and says which ones wait for a restart."""
    c0, k0 = pair(tmp_path, "a", "restart")
    async with run_backend() as backend:
        body = cert_site(backend.address, c0, k0)
        async with run_edged(tmp_path, body, edged_extra='allocator = "auto"') as edged:
            text = edged.config_path.read_text()
            edged.config_path.write_text(
                text.replace('allocator = "auto"', 'allocator = "system"\nworkers = 2').replace(
                    'metrics = ""', f'metrics = "127.0.0.1:{free_port()}"'
                )
            )
            caplog.set_level("WARNING", logger="edged.daemon")
            assert await edged.daemon.reload("signal")
            assert "edged.allocator changed: takes effect at the next restart" in caplog.text
            assert "edged.workers changed: takes effect at the next restart" in caplog.text
            assert "listen.metrics changed: takes effect at the next restart" in caplog.text
            assert await served_cn(edged, "r.example.test") == "restart"


async def test_a_full_reload_reuses_what_it_serves_for_unchanged_store_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full reload reads every store entry again, but a pair whose bytes are those of a
    bundle being served is not parsed again: the same bundle is served on. It is still
    checked (an expired one is reported as on the first load), and a changed entry is parsed
    and served."""
    from edged import sources

    ca = make_ca("Reuse CA")
    store = FileStore(tmp_path / "store")
    store.save(stored("r.example.test", "same", ca))
    store.save(stored("s.example.test", "old", ca))
    async with run_backend() as backend:
        body = sites_body(backend.address, "r.example.test", "s.example.test")
        async with run_edged(tmp_path, body) as edged:
            daemon = edged.daemon
            r, s = (daemon.bundles[i][0] for i in (0, 1))
            parsed: list[bytes] = []
            real = sources.stored_bundle

            def counting(fullchain: bytes, *args: object, **kwargs: object) -> object:
                parsed.append(fullchain)
                return real(fullchain, *args, **kwargs)  # type: ignore[arg-type]

            monkeypatch.setattr(sources, "stored_bundle", counting)
            store.save(stored("s.example.test", "new", ca))
            assert await daemon.reload("signal")
            assert daemon.bundles[0][0] is r  # unchanged: not parsed, the same bundle
            assert daemon.bundles[1][0] is not s
            assert parsed == [daemon.bundles[1][0].fullchain_pem]
            assert await served_cn(edged, "r.example.test") == "same"
            assert await served_cn(edged, "s.example.test") == "new"


def test_reused_bundles_are_still_checked() -> None:
    """validate_stored with `known`: the served bundle for the same bytes is taken as is, and
    checked like a new one (expired at `now`: refused); other key bytes: parsed."""
    from edged import sources
    from edged.config import Address, Site

    ca = make_ca("Checked CA")
    cert = stored("c.example.test", "checked", ca)
    site = Site(0, ("c.example.test",), Address("127.0.0.1", 9))
    now = datetime.now(UTC)
    fresh, problems = sources.validate_stored(cert, site, now, False, "store", light=True)
    assert fresh and not problems
    known = {fresh[0].leaf_pem: fresh[0]}
    again, problems = sources.validate_stored(
        cert, site, now, False, "store", light=True, known=known
    )
    assert again[0] is fresh[0] and not problems
    later = fresh[0].not_after + timedelta(days=1)
    expired, problems = sources.validate_stored(
        cert, site, later, False, "store", light=True, known=known
    )
    assert not expired and any("expired" in p.message for p in problems)
    other = StoredCert(
        cert.name,
        cert.names,
        (PemPair("ecdsa-p256", cert.pairs[0].fullchain, b"another key"),),
        cert.source,
        cert.stored_at,
    )
    parsed, _ = sources.validate_stored(other, site, now, False, "store", light=True, known=known)
    assert parsed and parsed[0] is not fresh[0] and parsed[0].key_pem == b"another key"


def stored_leaf(name: str, cn: str, ca: object, **leaf: object) -> StoredCert:
    """A store entry for `name` holding a leaf made with `leaf` (names, dates)."""
    made = make_leaf(ca, leaf.pop("names", [name]), cn=cn, **leaf)  # type: ignore[arg-type]
    pair = PemPair("ecdsa-p256", fullchain(made), made.key_pem)
    return StoredCert(name, (name,), (pair,), "upload", 0.0)


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names FileStore.load reads from now on."""
    reads: list[str] = []
    real = FileStore.load

    def load(self: FileStore, name: str) -> StoredCert | None:
        reads.append(name)
        return real(self, name)

    monkeypatch.setattr(FileStore, "load", load)
    return reads


def lazy_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, names: list[str], cn: str
) -> tuple[object, FileStore]:
    """A store holding `names` (CN `cn`), past the background-fill threshold (lowered to 2):
    the daemon starts serving before reading it."""
    from edged import daemon as daemon_module

    monkeypatch.setattr(daemon_module, "LAZY_MIN", 2)
    ca = make_ca("Lazy CA")
    store = FileStore(tmp_path / "store")
    for name in names:
        store.save(stored_leaf(name, cn, ca))
    return ca, store


def sites_body(backend: str, *names: str) -> str:
    return "".join(f'[[site]]\nnames = ["{n}"]\nbackend = "{backend}"\n' for n in names)


@contextlib.asynccontextmanager
async def unwatched_sites(tmp_path: Path, *names: str) -> AsyncIterator[Edged]:
    """edged serving one store site per name (CN as stored) to a backend, with the watcher
    off: only the reloads a test asks for happen."""
    async with (
        run_backend() as backend,
        run_edged(
            tmp_path, sites_body(backend.address, *names), edged_extra="watch = false"
        ) as edged,
    ):
        yield edged


async def test_a_full_reload_reads_only_the_store_entries_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full reload does not read a store entry unchanged since its served certificate was
    read from it (same meta.json stamp): it checks that certificate again. Entries that
    changed are read, and so is every entry whose last read found a problem (a certificate
    for other names, one expired), so each full reload reports those as before."""
    ca = make_ca("Stamp CA")
    store = FileStore(tmp_path / "store")
    past = datetime.now(UTC) - timedelta(days=1)
    store.save(stored_leaf("r.example.test", "same", ca))
    store.save(stored_leaf("s.example.test", "old", ca))
    store.save(stored_leaf("t.example.test", "other", ca, names=["x.example.test"]))
    store.save(
        stored_leaf(
            "u.example.test", "expired", ca, not_before=past - timedelta(days=30), not_after=past
        )
    )
    async with unwatched_sites(tmp_path, *(f"{n}.example.test" for n in "rstu")) as edged:
        daemon = edged.daemon
        served_r = daemon.bundles[0][0]
        reads = count_reads(monkeypatch)
        store.save(stored_leaf("s.example.test", "new", ca))
        caplog.set_level("WARNING")
        assert not await daemon.reload("signal")  # t's problem makes it an "error" reload
        # (u's twice: the expired-certificate error reads its renewal state too)
        assert set(reads) == {"s.example.test", "t.example.test", "u.example.test"}
        assert daemon.bundles[0][0] is served_r
        assert "store:t.example.test" in caplog.text
        assert await served_cn(edged, "r.example.test") == "same"
        assert await served_cn(edged, "s.example.test") == "new"
        assert await served_cn(edged, "u.example.test") == "expired"  # all it has

        reads.clear()
        caplog.clear()
        assert not await daemon.reload("signal")
        assert set(reads) == {"t.example.test", "u.example.test"}
        assert "store:t.example.test" in caplog.text  # reported again, every full reload
        assert "served although expired" in caplog.text

        # The entry of r rewritten in place with its size and mtime put back: the ctime
        # tells.
        meta = tmp_path / "store/live/r.example.test/meta.json"
        before = meta.stat()
        meta.write_bytes(meta.read_bytes())
        os.utime(meta, ns=(before.st_atime_ns, before.st_mtime_ns))
        reads.clear()
        await daemon.reload("signal")
        assert "r.example.test" in reads
        # Each reload is timed, accepted or not (edged_reload_duration_seconds); a store
        # change for a name no site has is no reload (neither counted nor timed).
        assert await daemon.reload("store", {"nobody.example.test"})
        assert daemon.counters.full_reload_seconds.snapshot().count == 3
        assert daemon.counters.names_reload_seconds.snapshot().count == 0
        assert await daemon.reload("store", {"s.example.test"})
        assert daemon.counters.names_reload_seconds.snapshot().count == 1


async def test_a_store_write_during_a_names_reload_is_read_at_the_next_full_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload of a few names (a renewal, an upload) stamps the entries before reading them:
    a write that lands after the read leaves the stamp older than the entry, so the next full
    reload reads it. Stamped after the read, the full reload would take the entry as served
    and go on serving what the first read got."""
    ca = make_ca("Stamp CA")
    store = FileStore(tmp_path / "store")
    store.save(stored_leaf("s.example.test", "v1", ca))
    async with unwatched_sites(tmp_path, "s.example.test") as edged:
        daemon = edged.daemon
        real = daemon._read_sites

        async def read_then_write(*args: object) -> object:
            got = await real(*args)  # type: ignore[arg-type]
            store.save(stored_leaf("s.example.test", "v3", ca))
            return got

        store.save(stored_leaf("s.example.test", "v2", ca))
        monkeypatch.setattr(daemon, "_read_sites", read_then_write)
        assert await daemon.reload("store", {"s.example.test"})
        monkeypatch.undo()
        assert await served_cn(edged, "s.example.test") == "v2"
        assert daemon.counters.names_reload_seconds.snapshot().count == 1
        assert await daemon.reload("signal")
        assert await served_cn(edged, "s.example.test") == "v3"


async def test_an_unchanged_config_is_not_parsed_again_but_its_files_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload with the config file holding the text already loaded (a SIGHUP to pick up
    certificates) reuses the parsed config; the files it names are still checked, and a
    changed text is parsed."""
    from edged import config as config_module

    c0, k0 = pair(tmp_path, "a", "parsed")
    parses: list[Path] = []
    real = config_module.parse_config

    def counting(text: str, source: Path) -> object:
        parses.append(source)
        return real(text, source)

    async with run_backend() as backend:
        body = cert_site(backend.address, c0, k0)
        async with run_edged(tmp_path, body, edged_extra="watch = false") as edged:
            daemon = edged.daemon
            monkeypatch.setattr(config_module, "parse_config", counting)
            first = daemon.config
            assert await daemon.reload("signal")
            assert parses == [] and daemon.config is not first and daemon.config == first
            moved = k0.with_suffix(".moved")
            k0.rename(moved)
            assert not await daemon.reload("signal")  # the key file is gone: refused
            assert daemon.counters.reloads["signal", "error"] == 1
            moved.rename(k0)
            edged.config_path.write_text(edged.config_path.read_text() + "\n# edited\n")
            assert await daemon.reload("signal")
            assert parses == [edged.config_path.absolute()]
            assert await served_cn(edged, "r.example.test") == "parsed"


async def test_after_a_background_fill_a_full_reload_reads_nothing_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large store is read in the background after start (daemon.LAZY_MIN); the stamps the
    fill took before reading cover the store once it is done, so the next full reload reads
    only what changed since."""
    from edged import daemon as daemon_module

    monkeypatch.setattr(daemon_module, "FILL_BATCH", 1)
    names = [f"{n}.example.test" for n in "abc"]
    ca, store = lazy_store(tmp_path, monkeypatch, names, "filled")
    async with unwatched_sites(tmp_path, *names) as edged:
        daemon = edged.daemon
        await asyncio.wait_for(daemon._filled.wait(), 10)
        reads = count_reads(monkeypatch)
        store.save(stored_leaf("b.example.test", "changed", ca))
        assert await daemon.reload("signal")
        assert reads == ["b.example.test"]
        assert await served_cn(edged, "a.example.test") == "filled"
        assert await served_cn(edged, "b.example.test") == "changed"


async def test_installed_states_are_frozen_and_none_is_stranded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state installed at start, by each batch of the background fill and by each full
    reload is frozen out of the cyclic GC's passes (edged.heap.freeze_long_lived), and what a
    reload replaces is freed by reference counting: once unfrozen, a full collection finds
    none of edged's state among the garbage (a frozen cycle would never have been freed)."""
    from edged import daemon as daemon_module
    from edged.certs import CertBundle
    from edged.config import Config, Site
    from edged.sni import Route, ServedCert, SniIndex

    monkeypatch.setattr(daemon_module, "FILL_BATCH", 1)
    names = [f"{n}.example.test" for n in "abc"]
    ca, store = lazy_store(tmp_path, monkeypatch, names, "first")

    def unfrozen(daemon: Daemon) -> list[object]:
        assert daemon.config is not None and daemon.selector is not None
        routes = [daemon.selector.index.lookup(n) for n in names]
        seen = {id(o) for o in gc.get_objects()}  # the permanent generation is not listed
        return [o for o in (daemon.config, *daemon.config.sites, *routes) if id(o) in seen]

    gc.disable()  # as `edged run` starts (edged.cli): the daemon turns it on once frozen
    try:
        async with unwatched_sites(tmp_path, *names) as edged:
            assert gc.isenabled()
            daemon = edged.daemon
            await asyncio.wait_for(daemon._filled.wait(), 10)
            assert unfrozen(daemon) == []
            store.save(stored_leaf("b.example.test", "second", ca))
            assert await daemon.reload("store", {"b.example.test"})
            edged.config_path.write_text(edged.config_path.read_text() + "# edited\n")
            assert await daemon.reload("signal")  # parsed again: a new Config, new Sites
            assert gc.isenabled()  # off during the reload only
            assert await served_cn(edged, "b.example.test") == "second"
            assert unfrozen(daemon) == []
            gc.unfreeze()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                gc.collect()
                state = (CertBundle, Config, Site, Route, ServedCert, SniIndex)
                stranded = [type(o).__name__ for o in gc.garbage if isinstance(o, state)]
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
            assert stranded == []
    finally:
        gc.enable()


@pytest.mark.parametrize("change", ["none", "names", "require_chain", "expired"])
def test_an_unchanged_entry_is_judged_as_a_read_one_would_be(tmp_path: Path, change: str) -> None:
    """What a full load finds for a store entry it does not read again (its served bundles,
    checked again) is exactly what reading it would find: the same bundles, the same problems,
    the same expired-but-served report, for a config that changed in the meantime (names,
    require_chain) and for a certificate that expired since."""
    from edged import sources
    from edged.config import parse_config

    ca = make_ca("Judged CA")
    store = FileStore(tmp_path / "store")
    store.save(stored_leaf("r.example.test", "judged", ca))

    def config(names: str, require_chain: bool) -> object:
        text = (
            f'[edged]\nstore = "store"\n[tls]\nrequire_chain = {str(require_chain).lower()}\n'
            f'[[site]]\nnames = [{names}]\nbackend = "127.0.0.1:9"\n'
        )
        return parse_config(text, tmp_path / "edged.toml")

    now = datetime.now(UTC)
    first = sources.load_site_certs(
        config('"r.example.test"', False),  # type: ignore[arg-type]
        store, now, keep_expired=True, light=True,
    )  # fmt: skip
    served = first.bundles[0]
    assert served and not first.problems
    later, new_config = now, config('"r.example.test"', False)
    if change == "names":
        new_config = config('"r.example.test", "x.example.test"', False)
    elif change == "require_chain":
        new_config = config('"r.example.test"', True)
    elif change == "expired":
        later = served[0].not_after + timedelta(days=1)

    def load(unchanged: dict[str, tuple[object, ...]]) -> tuple[object, ...]:
        got = sources.load_site_certs(
            new_config,  # type: ignore[arg-type]
            store, later, keep_expired=True, light=True,
            known={b.leaf_pem: b for b in served},
            unchanged=unchanged,  # type: ignore[arg-type]
        )  # fmt: skip
        problems = [(p.source, p.key, p.message, p.warning) for p in got.problems]
        expired = {i: str(p) for i, p in got.expired.items()}
        return got.bundles, problems, expired

    read = load({})
    reused = load({"r.example.test": served})
    assert reused == read
    if change != "none":
        assert read[1] or read[2]  # the scenario does find something to report


async def test_the_background_fill_never_puts_back_an_older_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store change read by a names reload while the background fill was reading the same
    entry: the fill does not apply its older read over it (nor its stamp), so a full reload
    after that serves the newest and does not take the older one as unchanged."""
    names = ["a.example.test", "b.example.test"]
    ca, store = lazy_store(tmp_path, monkeypatch, names, "A")
    async with unwatched_sites(tmp_path, *names) as edged:
        daemon = edged.daemon
        real = daemon._read_sites
        nested = False

        async def read_then_renew(config: object, sites: list[object]) -> object:
            nonlocal nested
            got = await real(config, sites)  # type: ignore[arg-type]
            if len(sites) > 1 and not nested:  # the fill's batch, read with A
                nested = True
                store.save(stored_leaf("a.example.test", "B", ca))
                assert await daemon.reload("store", {"a.example.test"})  # reads B
            return got

        monkeypatch.setattr(daemon, "_read_sites", read_then_renew)
        await asyncio.wait_for(daemon._filled.wait(), 10)
        assert nested
        assert await served_cn(edged, "a.example.test") == "B"
        assert await daemon.reload("signal")
        assert await served_cn(edged, "a.example.test") == "B"
        assert await served_cn(edged, "b.example.test") == "A"


async def test_a_site_read_on_demand_keeps_the_stamp_of_its_own_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site read on a handshake's demand before the background fill took its stamps, and
    changed in between: the fill (which skips it) does not give it the newer stamp, so the
    next full reload reads it again instead of taking what is served as unchanged."""
    import threading

    from edged import daemon as daemon_module

    real_snapshot = daemon_module.take_snapshot
    entered, release = threading.Event(), threading.Event()

    def gated(watch: object, *, store: bool = True) -> object:
        if store and not release.is_set():  # the fill's snapshot (the lazy load's has no store)
            entered.set()
            release.wait(10)
        return real_snapshot(watch, store=store)  # type: ignore[arg-type]

    monkeypatch.setattr(daemon_module, "take_snapshot", gated)
    names = ["a.example.test", "b.example.test"]
    ca, store = lazy_store(tmp_path, monkeypatch, names, "A")
    loop = asyncio.get_running_loop()
    async with unwatched_sites(tmp_path, *names) as edged:
        daemon = edged.daemon
        try:
            assert await loop.run_in_executor(None, entered.wait, 10)
            assert daemon.config is not None
            site = daemon.config.sites[0]
            await daemon.load_now(site)  # as a handshake for a.example.test would
            assert await served_cn(edged, "a.example.test") == "A"
            store.save(stored_leaf("a.example.test", "B", ca))
        finally:
            release.set()
        await asyncio.wait_for(daemon._filled.wait(), 10)
        assert await served_cn(edged, "a.example.test") == "A"  # no watcher: not seen yet
        assert await daemon.reload("signal")
        assert await served_cn(edged, "a.example.test") == "B"


async def test_a_site_read_on_demand_during_a_lazy_start_is_no_file_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a large store is still indexed, the watcher's catch-up compares the watched
    files only; the stamp a handshake's on-demand read records for its store entry is not a
    file that changed while unwatched, and must not set off a full reload."""
    import threading

    from edged import daemon as daemon_module

    real_snapshot = daemon_module.take_snapshot
    release = threading.Event()

    def gated(watch: object, *, store: bool = True) -> object:
        if store:  # the background fill's: held, so the sites stay pending meanwhile
            release.wait(10)
        return real_snapshot(watch, store=store)  # type: ignore[arg-type]

    monkeypatch.setattr(daemon_module, "take_snapshot", gated)
    names = ["a.example.test", "b.example.test"]
    lazy_store(tmp_path, monkeypatch, names, "A")
    async with (
        run_backend() as backend,
        run_edged(tmp_path, sites_body(backend.address, *names)) as edged,
    ):
        daemon = edged.daemon
        try:
            assert daemon.config is not None
            await daemon.load_now(daemon.config.sites[0])  # as a handshake would
            assert await served_cn(edged, "a.example.test") == "A"
            await daemon._catch_up()  # as when the watcher (re)starts
            await asyncio.sleep(0.5)
        finally:
            release.set()
        await asyncio.wait_for(daemon._filled.wait(), 10)
        assert not [kind for kind, _ in daemon.counters.reloads if kind == "file"]
        assert not daemon._reload.is_set()
