"""The file watcher: inotify events parsed and read (edged.inotify), batched (Debounce) and
delivered (edged.reload.watch_changes), on real directories."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from edged.inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_IGNORED,
    IN_ISDIR,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    Event,
    Inotify,
    parse_events,
)
from edged.reload import DEBOUNCE, QUIET, Debounce, WatchSet, _lookups, watch_changes
from edged.store import FileStore, PemPair, StoredCert
from tests.conftest import free_port, peer_cn, run_backend, run_cmd, s_client
from tests.pki import fullchain, make_ca, make_leaf


def raw_event(wd: int, mask: int, name: bytes = b"") -> bytes:
    padded = name + b"\0" * (-len(name) % 16 or (16 if name else 0))
    return struct.pack("iIII", wd, mask, 0, len(padded)) + padded


def test_events_are_parsed_for_every_path_of_their_directory() -> None:
    a, b, c = Path("/etc/edged"), Path("/srv/conf"), Path("/var/lib/edged/live")
    data = (
        raw_event(1, IN_CLOSE_WRITE, b"edged.toml")
        + raw_event(2, IN_ATTRIB | IN_ISDIR, b"example.com")
        + raw_event(9, IN_CREATE, b"unknown-wd")  # not ours (a watch already removed)
        + raw_event(1, IN_IGNORED)
        + raw_event(-1, IN_Q_OVERFLOW)
    )
    events = parse_events(data, {1: [a, b], 2: [c]})
    assert events == [
        Event(a / "edged.toml", IN_CLOSE_WRITE),
        Event(b / "edged.toml", IN_CLOSE_WRITE),
        Event(c / "example.com", IN_ATTRIB | IN_ISDIR),
        Event(a, IN_IGNORED),
        Event(b, IN_IGNORED),
        Event(None, IN_Q_OVERFLOW),
    ]
    assert events[3].watch_gone and not events[0].watch_gone
    assert events[5].overflow and not events[0].overflow


def test_a_batch_waits_for_quiet_and_store_entries_go_at_once() -> None:
    batch = Debounce()
    assert batch.due() is None
    batch.add(Path("/s/live/a"), 10.0, quick=True)
    assert batch.due() == 10.0  # a store entry announced whole: due now
    batch.add(Path("/etc/cert.pem"), 10.005, quick=False)
    assert batch.due() == pytest.approx(10.005 + QUIET)  # a file: wait for its key too
    for k in range(1, 100):  # a steady stream of changes is cut at DEBOUNCE
        batch.add(Path(f"/etc/f{k}"), 10.0 + k * QUIET / 2, quick=False)
    assert batch.due() == pytest.approx(10.0 + DEBOUNCE)
    assert len(batch.take()) == 101
    assert batch.due() is None
    batch.add(Path("/s/live/b"), 20.0, quick=True)  # a new batch starts quick again
    assert batch.due() == 20.0


def test_a_new_store_entry_goes_at_once_when_announced() -> None:
    """A new entry's directory is created (not whole yet: wait) and then announced by its
    writer once whole: from then on nothing about it waits. A file changed meanwhile still
    does."""
    batch = Debounce()
    entry = Path("/s/live/new.example.test")
    batch.add(entry, 10.0, quick=False)  # IN_CREATE: its files are being written
    assert batch.due() == pytest.approx(10.0 + QUIET)
    batch.add(entry, 10.004, quick=True)  # IN_ATTRIB: announced whole
    assert batch.due() == 10.004
    batch.add(Path("/etc/cert.pem"), 10.005, quick=False)
    assert batch.due() == pytest.approx(10.005 + QUIET)


def test_real_changes_are_read_as_events(tmp_path: Path) -> None:
    with Inotify() as ino:
        ino.add(tmp_path)
        assert ino.read_once() == []  # nothing yet, and it does not block
        (tmp_path / "a.pem").write_bytes(b"x")  # created, written, closed
        tmp = tmp_path / "b.tmp"
        tmp.write_bytes(b"y")
        os.rename(tmp, tmp_path / "b.pem")  # written beside, renamed over
        (tmp_path / "entry").mkdir()
        os.utime(tmp_path / "entry")  # the store's announcement of a written entry
        with (tmp_path / "kept-open.log").open("ab") as log:
            for _ in range(50):  # writes to an open file are not events (no IN_MODIFY)
                log.write(b"line\n")
                log.flush()
            seen = [(e.path, e.mask) for e in ino.read_once()]
        assert (tmp_path / "a.pem", IN_CREATE) in seen
        assert (tmp_path / "a.pem", IN_CLOSE_WRITE) in seen
        assert (tmp_path / "b.pem", IN_MOVED_TO) in seen
        assert (tmp_path / "entry", IN_CREATE | IN_ISDIR) in seen
        assert (tmp_path / "entry", IN_ATTRIB | IN_ISDIR) in seen
        assert [m for p, m in seen if p == tmp_path / "kept-open.log"] == [IN_CREATE]


def test_a_directory_that_cannot_be_watched_says_so(tmp_path: Path) -> None:
    with Inotify() as ino, pytest.raises(OSError) as exc:
        ino.add(tmp_path / "missing")
    assert exc.value.errno == errno.ENOENT
    assert "missing" in str(exc.value)


@asynccontextmanager
async def watching(
    watch: WatchSet,
) -> AsyncIterator[tuple[asyncio.Queue[set[Path]], asyncio.Task[None]]]:
    batches: asyncio.Queue[set[Path]] = asyncio.Queue()
    stop = asyncio.Event()
    task = asyncio.create_task(watch_changes(watch, stop, batches.put_nowait))
    await asyncio.sleep(0.05)  # the watches are in place once it has run
    try:
        yield batches, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


def store_watch(tmp_path: Path) -> tuple[WatchSet, Path, Path]:
    conf = tmp_path / "conf"
    conf.mkdir()
    cert, key = conf / "cert.pem", conf / "key.pem"
    store = tmp_path / "store"
    (store / "live").mkdir(parents=True)
    watch = WatchSet(
        dirs=frozenset({conf}),
        files=frozenset({conf / "edged.toml", cert, key}),
        trees=frozenset({store}),
        store_dirs=frozenset({store, store / "live"}),
    )
    return watch, cert, key


def stored(name: str, cn: str) -> StoredCert:
    ca = make_ca("watch CA")
    leaf = make_leaf(ca, [name], cn=cn)
    return StoredCert(
        name,
        (name,),
        (PemPair("ecdsa-p256", fullchain(leaf, ca), leaf.key_pem),),
        "upload",
        time.time(),
    )


async def test_a_store_write_is_one_batch_naming_its_entry(tmp_path: Path) -> None:
    watch, _, _ = store_watch(tmp_path)
    store = FileStore(tmp_path / "store")
    await asyncio.to_thread(store.save, stored("a.example.test", "v1"))  # a new entry
    async with watching(watch) as (batches, _):
        await asyncio.to_thread(store.save, stored("a.example.test", "v2"))
        batch = await asyncio.wait_for(batches.get(), 5)
        assert batch == {tmp_path / "store" / "live" / "a.example.test"}
        (tmp_path / "store" / "accounts").mkdir()  # not a certificate: no reload
        (tmp_path / "unwatched.txt").write_text("x")
        await asyncio.sleep(4 * DEBOUNCE)
        assert batches.empty()


async def test_a_cert_and_key_written_apart_arrive_together(tmp_path: Path) -> None:
    watch, cert, key = store_watch(tmp_path)
    async with watching(watch) as (batches, _):
        cert.write_bytes(b"cert")
        await asyncio.sleep(QUIET / 4)
        key.write_bytes(b"key")
        (cert.parent / "edged.log").write_text("not watched for\n")
        batch = await asyncio.wait_for(batches.get(), 5)
        assert batch == {cert, key}


async def test_a_watched_directory_replaced_ends_the_watch_after_its_files(
    tmp_path: Path,
) -> None:
    """A config directory swapped by rename (a deploy): the old one's watch ends; the
    watcher reports its files and returns, for the daemon starts it again on the new one."""
    watch, cert, key = store_watch(tmp_path)
    async with watching(watch) as (batches, task):
        os.rename(cert.parent, tmp_path / "conf.old")
        batch = await asyncio.wait_for(batches.get(), 5)
        assert {cert, key, cert.parent / "edged.toml"} <= batch
        await asyncio.wait_for(task, 5)  # returned on its own (stop is not set)


async def test_an_event_queue_overflow_reports_everything_and_ends_the_watch(
    tmp_path: Path,
) -> None:
    """The loop held up while more changes happen than the kernel queues for an instance
    (fs.inotify.max_queued_events): changes were lost, so everything is reported and the
    watcher returns (the daemon starts it again and compares snapshots)."""
    watch, cert, key = store_watch(tmp_path)
    limit = queue_limit()
    async with watching(watch) as (batches, task):
        conf = cert.parent
        for n in range(limit // 2 + 16):  # the loop is held: two events each, none read
            fd = os.open(conf / f"f{n}", os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        batch = await asyncio.wait_for(batches.get(), 5)
        assert batch == {cert, key, conf / "edged.toml", tmp_path / "store"}
        await asyncio.wait_for(task, 5)


def queue_limit() -> int:
    """Events the kernel queues per inotify instance before it drops them (overflow)."""
    return int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())


async def test_an_unmounted_directory_ends_the_watch_after_its_files(tmp_path: Path) -> None:
    """The files' directory is a mount point (a secrets volume), unmounted: its watch ends
    (IN_UNMOUNT, IN_IGNORED); what the path holds now is reported."""
    watch, cert, key = store_watch(tmp_path)
    conf = cert.parent
    mounted = await run_cmd("mount", "-t", "tmpfs", "-o", "size=1m", "edged-test", str(conf))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr}")
    try:
        cert.write_bytes(b"cert")
        async with watching(watch) as (batches, task):
            assert (await run_cmd("umount", str(conf))).returncode == 0
            batch = await asyncio.wait_for(batches.get(), 5)
            assert {cert, key, conf / "edged.toml"} <= batch
            await asyncio.wait_for(task, 5)
    finally:
        await run_cmd("umount", str(conf))


def test_the_names_on_the_way_to_a_file_are_its_lookups(tmp_path: Path) -> None:
    """Every directory above the file and every symlink passed (relative ones resolved from
    where they are), by the real path of the directory each is looked up in; a missing name
    ends the walk (its creation is what changes the path)."""
    (tmp_path / "..2024_v1").mkdir()
    (tmp_path / "..2024_v1" / "tls.crt").write_text("x")
    (tmp_path / "..data").symlink_to("..2024_v1")
    (tmp_path / "tls.crt").symlink_to("..data/tls.crt")
    (tmp_path / "mnt").symlink_to(tmp_path)
    parents = list(reversed(tmp_path.parents))[1:]  # without "/"
    assert _lookups(tmp_path / "mnt" / "tls.crt") == [
        *parents,
        tmp_path,
        tmp_path / "mnt",
        *parents,  # mnt's absolute target, from "/" again
        tmp_path,
        tmp_path / "tls.crt",
        tmp_path / "..data",
        tmp_path / "..2024_v1",
        tmp_path / "..2024_v1" / "tls.crt",
    ]
    assert _lookups(tmp_path / "missing" / "deeper" / "x.pem") == [
        *parents,
        tmp_path,
        tmp_path / "missing",
    ]


async def test_a_symlink_on_the_way_switched_ends_the_watch_after_everything(
    tmp_path: Path,
) -> None:
    """Kubernetes' secret volume: tls.crt -> ..data/tls.crt, ..data -> ..<version>, updated by
    renaming a new ..data over: the file's path names another file from then on, with no
    change to the file watched. Everything is reported and the watcher returns (to start
    again on the paths as they resolve now)."""
    old, new = tmp_path / "..v1", tmp_path / "..v2"
    for version in (old, new):
        version.mkdir()
        (version / "tls.crt").write_text(version.name)
    (tmp_path / "..data").symlink_to(old.name)
    cert = tmp_path / "tls.crt"
    cert.symlink_to("..data/tls.crt")
    real = old / "tls.crt"
    lookups = {*_lookups(cert), *_lookups(real)} - {cert, real}
    watch = WatchSet(
        dirs=frozenset({tmp_path, old}),
        files=frozenset({cert, real}),
        trees=frozenset(),
        lookups=frozenset(lookups),
    )
    async with watching(watch) as (batches, task):
        (tmp_path / "..data_tmp").symlink_to(new.name)
        os.rename(tmp_path / "..data_tmp", tmp_path / "..data")
        assert await asyncio.wait_for(batches.get(), 5) == {cert, real}
        await asyncio.wait_for(task, 5)  # returned on its own (stop is not set)


async def test_a_cancelled_watcher_closes_its_instance(tmp_path: Path) -> None:
    """Cancelled (its task group failing, the daemon aborting): the reader is removed and the
    descriptor closed, as when it returns."""
    watch, cert, _ = store_watch(tmp_path)
    before = inotify_fds()
    task = asyncio.create_task(watch_changes(watch, asyncio.Event(), lambda _: None))
    await asyncio.sleep(0.05)
    (opened,) = inotify_fds() - before
    cert.write_bytes(b"pending")  # a batch waiting for its quiet time
    await asyncio.sleep(QUIET / 4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert inotify_fds() == before
    loop = asyncio.get_running_loop()
    assert not loop.remove_reader(opened)  # no reader left on that number


def inotify_fds() -> set[int]:
    """This process's inotify descriptors open now."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                found.add(int(fd))
    return found


def test_no_inotify_instance_names_the_limit_to_raise() -> None:
    """At the process's file descriptor limit (one way inotify_init1 says EMFILE)."""
    probe = (
        "import os, resource\n"
        "from edged.inotify import Inotify, InotifyError\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "held = []\n"
        "try:\n"
        "    while True: held.append(os.open('/dev/null', os.O_RDONLY))\n"
        "except OSError: pass\n"
        "try:\n"
        "    Inotify()\n"
        "except InotifyError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert "cannot start watching files" in out
    assert "LimitNOFILE" in out and "fs.inotify.max_user_instances" in out


def test_loading_the_c_library_runs_no_program() -> None:
    """The inotify calls come from the C library the interpreter runs on: importing the
    module spawns nothing (ctypes.util.find_library runs ldconfig, and finds no glibc name on
    a musl system)."""
    probe = (
        "import sys\n"
        "spawned = []\n"
        "sys.addaudithook(lambda e, args: e == 'subprocess.Popen' and spawned.append(args))\n"
        "import edged.inotify\n"
        "edged.inotify.Inotify().close()\n"
        "print(spawned)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert out.strip() == "[]"


NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
# Opens inotify instances as long as the kernel gives them, says how many, holds them.
HOLD_INSTANCES = (
    "import ctypes, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "held = 0\n"
    "while libc.inotify_init1(0) >= 0:\n"
    "    held += 1\n"
    "print(held, ctypes.get_errno(), flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory the user nobody owns (pytest's own are root's, 0700)."""
    base = Path(tempfile.mkdtemp(prefix="edged-inotify-"))
    base.chmod(0o755)
    os.chown(base, NOBODY, NOBODY)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def owned_pair(directory: Path, cn: str) -> None:
    leaf = make_leaf(make_ca("Limit CA"), ["l.example.test"], cn=cn)
    for name, data in (("fullchain.pem", fullchain(leaf)), ("privkey.pem", leaf.key_pem)):
        tmp = directory / f"{name}.new"
        tmp.write_bytes(data)
        os.chown(tmp, NOBODY, NOBODY)
        os.replace(tmp, directory / name)


@pytest.mark.skipif(os.geteuid() != 0, reason="runs edged as another user")
async def test_no_inotify_instance_left_for_its_user_edged_serves_and_says_what_to_raise(
    nobody_dir: Path,
) -> None:
    """Other processes of the user edged runs as hold every inotify instance the host allows
    a user (fs.inotify.max_user_instances): edged starts and serves all the same, the log
    names the setting to raise, and SIGHUP reloads."""
    holder = await asyncio.create_subprocess_exec(
        *AS_NOBODY, sys.executable, "-c", HOLD_INSTANCES,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert holder.stdin is not None and holder.stdout is not None
    try:
        held, err = (await asyncio.wait_for(holder.stdout.readline(), 10)).split()
        assert int(held) > 0 and int(err) == errno.EMFILE
        owned_pair(nobody_dir, "limit-0")
        port = free_port()
        config = nobody_dir / "edged.toml"
        async with run_backend() as backend:
            config.write_text(
                f'[edged]\nstore = "store"\ndrain_timeout = 1\n'
                f'[listen]\nhttps = ["127.0.0.1:{port}"]\nhttp = []\nmetrics = ""\nadmin = ""\n'
                f'[[site]]\nnames = ["l.example.test"]\nbackend = "{backend.address}"\n'
                f'cert_file = "fullchain.pem"\nkey_file = "privkey.pem"\n'
            )
            log = nobody_dir / "edged.log"
            with log.open("wb") as out:
                edged = await asyncio.create_subprocess_exec(
                    *AS_NOBODY, str(Path(sys.executable).with_name("edged")), "run",
                    "--config", str(config),
                    stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                )  # fmt: skip

            async def served() -> str:
                return peer_cn((await s_client(port, "l.example.test")).stderr)

            async def logged(needle: str) -> str:
                for _ in range(200):
                    lines = [x for x in log.read_text().splitlines() if needle in x]
                    if lines:
                        return lines[0]
                    assert edged.returncode is None, log.read_text()
                    await asyncio.sleep(0.05)
                raise AssertionError(f"no {needle!r} in:\n{log.read_text()}")

            try:
                line = await logged("file watcher cannot run")
                assert "ERROR" in line and "fs.inotify.max_user_instances" in line
                assert "SIGHUP still reloads" in line
                assert await served() == "limit-0"
                owned_pair(nobody_dir, "limit-1")
                edged.send_signal(signal.SIGHUP)
                await logged("reloaded (signal)")
                assert await served() == "limit-1"
            finally:
                edged.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(edged.wait(), 10) == 0, log.read_text()
    finally:
        holder.stdin.close()
        await asyncio.wait_for(holder.wait(), 10)
