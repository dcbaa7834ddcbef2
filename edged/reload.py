"""What to watch for a reload, and the watcher itself (inotify, debounced and coalesced).

Files are replaced in many ways: written in place, written to a temp file and renamed over, or
swapped as symlinks (certbot's live/ -> archive/). Watching a file's inode misses the last two,
so edged watches the directories that hold each configured file (and the directory its symlink
points into), and filters events down to the paths it cares about. A cert and its key written a
few milliseconds apart arrive in one debounced batch; if they still do not match, validation
keeps the old pair and the next write triggers another reload.

A path can also come to name another file with no change in those directories: a directory on
the way renamed or replaced (a deploy renaming a new tree into place, or removing one and
creating it again), or a symlinked directory switched (`current -> releases/2`, Kubernetes'
`..data`). So the directories above the files, and those holding the symlinks passed on the way,
are watched for their entries named anew (WatchSet.lookups); such a change reloads everything
and the watch starts again on the paths as they resolve now.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edged.config import Config, config_files
from edged.inotify import IN_CREATE, IN_NAMED, NAMES_MASK, WATCH_MASK, Inotify, InotifyError
from edged.names import store_dirname

log = logging.getLogger("edged.reload")

# Seconds a batch of changes waits for more: QUIET after the last one, at most DEBOUNCE after
# the first (store entries go at once: see Debounce).
QUIET = 0.02
DEBOUNCE = 0.15


@dataclass(frozen=True)
class WatchSet:
    """Directories to watch and the paths inside them that matter."""

    dirs: frozenset[Path]
    files: frozenset[Path]
    trees: frozenset[Path]  # directories where any change matters (the store)
    # What is watched of the store, not recursively: the store and its live/ (when it exists).
    # The store's writers touch live/<name> after writing it (edged.store.files._announce).
    store_dirs: frozenset[Path] = frozenset()
    # Every other name looked up to reach the files and the store (see _lookups): the
    # directories above them and the symlinks passed on the way. One of them named anew
    # (created, removed, renamed, replaced) changes what the paths name.
    lookups: frozenset[Path] = frozenset()

    def relevant(self, path: Path) -> bool:
        if path in self.files:
            return True
        # In the store only certificates matter (live/); renewal state and accounts change on
        # every attempt and must not reload the daemon.
        return any(
            path in (tree, tree / "live") or tree / "live" in path.parents for tree in self.trees
        )


def watch_set(config: Config, config_path: Path) -> WatchSet:
    """The config file, every file it names (and their symlink targets), and the store."""
    files: set[Path] = {config_path.absolute()}
    files.update(path.absolute() for _, path in config_files(config))
    for path in list(files):
        with contextlib.suppress(OSError):
            files.add(Path(os.path.realpath(path)))
    dirs = {path.parent for path in files}
    trees: set[Path] = set()
    store = config.store_path
    if store is not None:
        trees.add(store.absolute())
    trees = {t for t in trees if _is_dir(t)}
    store_dirs = trees | {t / "live" for t in trees if _is_dir(t / "live")}
    lookups: set[Path] = set()
    for path in files | trees:
        lookups.update(_lookups(path))
    return WatchSet(
        frozenset(d for d in dirs if _is_dir(d)),
        frozenset(files),
        frozenset(trees),
        frozenset(store_dirs),
        frozenset(lookups - files),
    )


MAX_SYMLINKS = 40  # as the kernel follows at most (ELOOP beyond)


def _lookups(path: Path) -> list[Path]:
    """Each name the kernel looks up to resolve `path`, as the path of the directory it is
    looked up in (that directory's own path resolved: a real directory, watchable) joined
    with the name: every directory above it and every symlink it passes, up to the first
    name that does not exist (its creation is what changes the path then). Blocking."""
    seen: list[Path] = []
    pending = list(reversed(path.parts[1:]))  # absolute: parts[0] is "/"
    current = Path("/")
    hops = 0
    while pending:
        part = pending.pop()
        if part == "..":
            current = current.parent
            continue
        entry = current / part
        seen.append(entry)
        try:
            target = os.readlink(entry)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # missing, or not searchable: it ends here
                break
            current = entry  # not a symlink
            continue
        hops += 1
        if hops > MAX_SYMLINKS:
            break
        link = Path(target)
        if link.is_absolute():
            current = Path("/")
        pending.extend(reversed(link.parts[1:] if link.is_absolute() else link.parts))
    return seen


def resolves_as_watched(watch: WatchSet, path: Path) -> bool:
    """Whether `path` still resolves through the names `watch` was made for (False: a symlink
    on the way, or the file itself, was switched to point elsewhere since). Blocking."""
    return set(_lookups(path.absolute())) <= watch.lookups | watch.files


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # EACCES on a parent: cannot be watched, the load reports the file
        return False


Stamp = tuple[int, int, int, int]  # inode, size, mtime, ctime (ns)
Snapshot = dict[str, Stamp]  # absolute path → stamp (str keys: 100k Paths cost ~30 MiB)


def take_snapshot(watch: WatchSet, *, store: bool = True) -> Snapshot:
    """The stamp of every watched file and of each stored bundle's meta.json: the state a load
    saw, to find changes made while no watcher was running and the store entries a full load
    need not read again. `store=False`: the files only (a store indexed in the background is
    read after the watcher started)."""
    paths = {str(path) for path in watch.files}
    for tree in watch.trees if store else ():
        # No live/ yet, or unreadable: the watcher and the load report it.
        with contextlib.suppress(OSError), os.scandir(tree / "live") as entries:
            paths.update(entry.path + "/meta.json" for entry in entries)
    snap: Snapshot = {}
    for path in paths:
        entry = snapshot_entry(path)
        if entry is not None:
            snap[path] = entry
    return snap


def snapshot_entry(path: str) -> Stamp | None:
    """A file's stamp as a Snapshot holds it; None when it cannot be read. The ctime changes
    with any write, even one that puts the size and mtime back."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def meta_paths(store_root: Path, names: Iterable[str]) -> dict[str, str]:
    """Store name → the path of its entry's meta.json, as a Snapshot names it."""
    live = f"{store_root.absolute()}/live/"
    return {name: f"{live}{store_dirname(name)}/meta.json" for name in names}


def unchanged_entries(
    before: Snapshot, after: Snapshot, store_root: Path, names: Iterable[str]
) -> list[str]:
    """The store names whose entry is in both snapshots with the same stamp: unchanged, for
    the store writes an entry's meta.json last and by rename (a new inode)."""
    return [
        name
        for name, path in meta_paths(store_root, names).items()
        if (stamp := before.get(path)) is not None and after.get(path) == stamp
    ]


class Debounce:
    """Changed paths gathered into one batch: due QUIET seconds after the last change (a cert
    and its key written a few milliseconds apart arrive together), at most DEBOUNCE after the
    first. A batch whose paths' latest changes are all `quick` (a store entry: the store's
    writers touch one once it is whole, or move it in whole; a new one's directory created
    before that is not) is due at once. Pure: times are the caller's."""

    def __init__(self) -> None:
        self.paths: set[Path] = set()
        self.slow: set[Path] = set()  # paths whose latest change was not quick
        self.first = 0.0
        self.last = 0.0

    def add(self, path: Path, now: float, *, quick: bool) -> None:
        if not self.paths:
            self.first = now
        self.paths.add(path)
        self.last = now
        if quick:
            self.slow.discard(path)
        else:
            self.slow.add(path)

    def due(self) -> float | None:
        """When the batch is to go (None: nothing gathered)."""
        if not self.paths:
            return None
        if not self.slow:
            return self.last
        return min(self.first + DEBOUNCE, self.last + QUIET)

    def take(self) -> set[Path]:
        paths, self.paths, self.slow = self.paths, set(), set()
        return paths


MAX_READS = 16  # reads of queued events per wakeup (a flood does not hold the loop)


async def watch_changes(
    watch: WatchSet, stop: asyncio.Event, on_change: Callable[[set[Path]], None]
) -> None:
    """Call `on_change` with each debounced batch of relevant changed paths until `stop`.
    Returns early (after a last batch) when a watched directory went away or the kernel's
    event queue overflowed: the caller starts it again, and compares what it saw before with
    what is there now."""
    # Nothing recursive: a config dir may hold much else, and the store may hold 100k
    # directories (see WatchSet.store_dirs).
    roots = (watch.dirs - watch.trees) | watch.store_dirs
    above = {entry.parent for entry in watch.lookups} - roots
    live_dirs = {tree / "live" for tree in watch.trees}
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    batch = Debounce()
    with Inotify() as inotify:
        for directory, mask in [(d, NAMES_MASK) for d in sorted(above)] + [
            (d, WATCH_MASK) for d in sorted(roots)
        ]:
            try:
                inotify.add(directory, mask)
            except InotifyError:
                raise
            except OSError as exc:
                if mask == WATCH_MASK and exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    log.warning("%s", _unwatched(watch, directory, exc))
                else:  # gone (its parent's watch sees it back), or only above the files
                    log.debug("not watching %s: %s", directory, exc)
        loop.add_reader(inotify.fd, wake.set)
        try:
            async with asyncio.TaskGroup() as tg:
                stopping = tg.create_task(_set_when(stop, wake))
                lost = ""  # why the watch must start again
                while not stop.is_set():
                    due = batch.due()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(None if due is None else due - loop.time()):
                            await wake.wait()
                    wake.clear()
                    now = loop.time()
                    for _ in range(MAX_READS):
                        events = inotify.read_once()
                        if not events:
                            break
                        for event in events:
                            if event.path is None or event.watch_gone:
                                lost = lost or (
                                    "changes were lost (the kernel's event queue overflowed)"
                                    if event.path is None
                                    else f"{event.path} went away"
                                )
                                for path in _lost(watch, event.path):
                                    batch.add(path, now, quick=False)
                            elif event.path in watch.lookups and event.mask & IN_NAMED:
                                # The paths name other files now: everything.
                                lost = lost or f"{event.path} was created, removed or renamed"
                                for path in _lost(watch, None):
                                    batch.add(path, now, quick=False)
                            elif watch.relevant(event.path):
                                quick = event.path.parent in live_dirs and not (
                                    event.mask & IN_CREATE
                                )
                                batch.add(event.path, now, quick=quick)
                    due = batch.due()
                    if due is not None and (lost or loop.time() >= due):
                        on_change(batch.take())
                    if lost:
                        log.info("file watch restarting: %s", lost)
                        break
                stopping.cancel()
        finally:
            loop.remove_reader(inotify.fd)


def _unwatched(watch: WatchSet, directory: Path, exc: OSError) -> str:
    """Why changes in `directory` will not be seen, and what to do about it."""
    names = sorted({path.name for path in watch.files if path.parent == directory})
    what = [f"changes to {', '.join(names)} there"] if names else []
    if directory in watch.store_dirs:
        what.append("changes to the store")
    return (
        f"cannot watch {directory}: {exc.strerror or exc}: {' and '.join(what) or 'changes'} "
        "are not seen; reload with SIGHUP after changing them, or let the user edged runs as "
        "list that directory (read permission)"
    )


async def _set_when(stop: asyncio.Event, wake: asyncio.Event) -> None:
    await stop.wait()
    wake.set()


def _lost(watch: WatchSet, directory: Path | None) -> set[Path]:
    """What may have changed unseen: everything (None: the event queue overflowed, or a path
    names another file now) or what lies below `directory` (its watch ended)."""
    everything = set(watch.files) | set(watch.trees)
    if directory is None:
        return everything
    return {path for path in everything if path == directory or directory in path.parents} | (
        {tree for tree in watch.trees if directory == tree / "live"}
    )
