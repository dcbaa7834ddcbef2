"""Linux inotify on the event loop: directories watched (not recursively), their entries'
changes read as they happen.

Why not a polling library: the watcher sleeps in the kernel until something changes (no
wakeups while nothing does) and edged learns of a change the moment it is made, so a
certificate written to the store is served a few milliseconds later (edged.reload decides how
long to wait for more). `parse_events` is pure; `Inotify` is the file descriptor around it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_EXCL_UNLINK = 0x04000000
IN_MASK_ADD = 0x20000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# Every way an entry of a watched directory can change: written (closed after writing, or
# renamed over), its metadata touched (the store announces a written entry so), created,
# removed; and the directory itself going away. Not IN_MODIFY: it fires on every write, and a
# log file kept open beside the config would wake edged for each line; a write is seen when the
# writer closes the file, which is also when it is whole.
WATCH_MASK = (
    IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_EXCL_UNLINK
)

# An entry of the directory named anew: created, removed, renamed away or over.
IN_NAMED = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO

# For a directory above the watched files (or holding a symlink on the way to them): only its
# entries named anew matter, and the directory itself going away.
NAMES_MASK = IN_NAMED | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_EXCL_UNLINK

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
READ_SIZE = 64 * 1024  # bytes per read: hundreds of events


@dataclass(frozen=True, slots=True)
class Event:
    """One change: `path` is the entry that changed (the directory itself for its own events,
    None for a queue overflow: changes were lost)."""

    path: Path | None
    mask: int

    @property
    def overflow(self) -> bool:
        return bool(self.mask & IN_Q_OVERFLOW)

    @property
    def watch_gone(self) -> bool:
        """The watched directory was removed or moved away (its watch ends)."""
        return bool(self.mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF))


def parse_events(data: bytes, watches: Mapping[int, Sequence[Path]]) -> list[Event]:
    """The events in `data` (whole events, as one read returns them), for each path a watch
    descriptor stands for (one directory reached by two paths has one descriptor). Events of
    descriptors not in `watches` are dropped. Pure."""
    events: list[Event] = []
    pos = 0
    end = len(data)
    while pos + _EVENT.size <= end:
        wd, mask, _, length = _EVENT.unpack_from(data, pos)
        pos += _EVENT.size
        name = data[pos : pos + length].rstrip(b"\0")
        pos += length
        if mask & IN_Q_OVERFLOW:
            events.append(Event(None, mask))
            continue
        for directory in watches.get(wd, ()):
            path = directory / os.fsdecode(name) if name else directory
            events.append(Event(path, mask))
    return events


class InotifyError(OSError):
    """inotify could not be set up (the message names the limit to raise, when one was hit)."""


def _libc() -> ctypes.CDLL:
    # The C library the interpreter already runs on (glibc or musl): no lookup by name, which
    # ctypes.util.find_library does by running ldconfig.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    return libc


_LIBC = _libc()


class Inotify:
    """An inotify instance (non-blocking, close-on-exec) and the directories it watches."""

    def __init__(self) -> None:
        fd = _LIBC.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            hint = (
                ": raise the file descriptor limit (LimitNOFILE) or, if edged is far below it, "
                "fs.inotify.max_user_instances (sysctl)"
                if err == errno.EMFILE
                else ""
            )
            raise InotifyError(err, f"cannot start watching files: {os.strerror(err)}{hint}")
        self.fd = fd
        self.watches: dict[int, list[Path]] = {}

    def add(self, directory: Path, mask: int = WATCH_MASK) -> None:
        """Watch `directory`'s entries for `mask` (added to what another path to the same
        directory asked for). OSError as the kernel gives it (ENOENT, EACCES, ...), with the
        sysctl to raise when the watch limit is reached."""
        wd = _LIBC.inotify_add_watch(self.fd, os.fsencode(directory), mask | IN_MASK_ADD)
        if wd < 0:
            err = ctypes.get_errno()
            if err == errno.ENOSPC:
                raise InotifyError(
                    err,
                    f"cannot watch {directory}: the inotify watch limit is reached: raise "
                    "fs.inotify.max_user_watches (sysctl)",
                )
            raise OSError(err, os.strerror(err), str(directory))
        paths = self.watches.setdefault(wd, [])
        if directory not in paths:
            paths.append(directory)

    def read_once(self) -> list[Event]:
        """The events one read returns (none when nothing is queued: it never blocks)."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return []
        return parse_events(data, self.watches)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
