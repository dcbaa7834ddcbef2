"""The DNS-01 journal: each TXT value edged adds, written down before the update is sent and
crossed out once the value is deleted, so that a value left in the zone by a crash between the
two (kill -9, a power loss) is found and deleted later.

In the node's own directory store (`edged.store`, or `edged.store_local` with Redis; never in
Redis, so each node only ever deletes values it added itself)::

    dns01/<node>.<token>.json    the values one edged process added and has not deleted yet
    dns01/<node>.<token>.lock    held (flock) by that process while it lives

`<node>` is the host name, `<token>` random per process. The JSON is replaced atomically (temp
file, fsync, rename, directory fsync) before each add is sent and after each delete succeeded;
it is removed when it lists nothing.

`sweep()` (at start, then every acme.retry_interval) deletes the leftovers: the values of this
node's journals whose process is gone (their lock is free: the kernel releases it when a
process dies, however it dies), which it first takes into its own journal, and this process's
own values whose delete failed. Each removal is logged; a value whose delete fails stays and is
tried again at the next sweep. Journals of other nodes and of live processes (an `edged issue`
beside the daemon) are left alone: their values may be challenges in flight. Only the exact
value recorded is deleted, never the other values at the name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from edged.dns import DnsError
from edged.store.files import (
    DIR_MODE,
    FILE_MODE,
    as_owner,
    fsync_dir,
    store_owner,
    write_atomic,
)

if TYPE_CHECKING:
    from edged.dns import DnsUpdater

log = logging.getLogger("edged.dns01")

DIRNAME = "dns01"  # in the node's local store directory
VERSION = 1
_FILE = re.compile(r"(?P<node>[A-Za-z0-9._-]+)\.(?P<token>[0-9a-f]{12})\.(?P<kind>json|lock)")
_TEMP = re.compile(r"\.tmp-(?P<node>[A-Za-z0-9._-]+)\.(?P<token>[0-9a-f]{12})\.json-[0-9a-f]+")


def _same_file(fd: int, path: Path) -> bool:
    """`path` is still the file open as `fd` (not removed, nor replaced by a new one)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (opened.st_dev, opened.st_ino)


def node_label(node: str) -> str:
    """The node's name as it appears in journal file names."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", node).strip(".") or "node"


@dataclass(frozen=True)
class JournalEntry:
    """One TXT value edged added: where, in which zone, through which server, when, by whom."""

    fqdn: str
    value: str
    zone: str
    server: str
    added: float  # unix time
    pid: int  # the edged process that added it

    @property
    def key(self) -> tuple[str, str]:
        return self.fqdn, self.value

    def to_json(self) -> dict[str, object]:
        return {
            "fqdn": self.fqdn,
            "value": self.value,
            "zone": self.zone,
            "server": self.server,
            "added": self.added,
            "pid": self.pid,
        }

    @classmethod
    def from_json(cls, raw: object) -> JournalEntry:
        if not isinstance(raw, dict):
            raise ValueError("an entry is not a JSON object")
        strings = [raw.get(k) for k in ("fqdn", "value", "zone", "server")]
        added, pid = raw.get("added"), raw.get("pid")
        if not all(isinstance(s, str) for s in strings) or not strings[0]:
            raise ValueError(f"entry {raw!r} lacks fqdn, value, zone or server")
        if not isinstance(added, int | float) or not isinstance(pid, int):
            raise ValueError(f"entry {raw!r} lacks added or pid")
        fqdn, value, zone, server = (str(s) for s in strings)
        return cls(fqdn, value, zone, server, float(added), pid)

    def describe(self) -> str:
        """`"VALUE" at FQDN (zone Z)`, as the logs name a value."""
        return f"{json.dumps(self.value)} at {self.fqdn} (zone {self.zone or '?'})"

    def origin(self, server: str) -> str:
        """Who added it and when (and through which server, when not `server`)."""
        added = datetime.fromtimestamp(self.added, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        via = f" via DNS server {self.server}" if self.server != server else ""
        return f"edged pid {self.pid}, added {added}{via}"


def parse_journal(raw: bytes) -> tuple[str, list[JournalEntry]]:
    """(node, entries) of a journal file; ValueError says what is wrong with it."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise ValueError(f"not a version {VERSION} journal object")
    node, values = data.get("node"), data.get("values")
    if not isinstance(node, str) or not isinstance(values, list):
        raise ValueError("'node' must be a string and 'values' a list")
    return node, [JournalEntry.from_json(v) for v in values]


@dataclass(frozen=True)
class SweepResult:
    removed: int = 0  # leftover values deleted from DNS (and from the journal)
    failed: int = 0  # leftover values whose delete failed: kept for the next sweep


class DnsJournal:
    """This process's journal in `directory` (see the module docstring). Thread-safe: orders
    run in worker threads, several at a time."""

    def __init__(self, directory: Path, node: str) -> None:
        self.directory = Path(directory)
        self.node = node_label(node)
        self.pid = os.getpid()
        self.token = secrets.token_hex(6)
        self._lock = threading.Lock()  # _entries, _in_flight and the file
        self._sweeping = threading.Lock()  # one sweep at a time
        self._entries: dict[tuple[str, str], JournalEntry] = {}
        self._in_flight: set[tuple[str, str]] = set()  # added by an order still running
        self._lock_fd: int | None = None
        self._reported: set[str] = set()  # files whose problem was logged (once per process)
        self._cannot_delete = ""  # why the last sweep could not delete (said once until it changes)

    @property
    def path(self) -> Path:
        return self.directory / f"{self.node}.{self.token}.json"

    def _lock_path(self, token: str) -> Path:
        return self.directory / f"{self.node}.{token}.lock"

    # --- recording ------------------------------------------------------------------------

    def record(self, fqdn: str, value: str, zone: str, server: str) -> None:
        """Write `value` at `fqdn` down before it is added; DnsError (naming the file) when
        that cannot be done: then the value must not be added either."""
        entry = JournalEntry(fqdn, value, zone, server, time.time(), self.pid)
        with self._lock:
            before = self._entries.get(entry.key)
            self._entries[entry.key] = entry
            self._in_flight.add(entry.key)
            try:
                self._write()
            except OSError as exc:
                if before is None:
                    del self._entries[entry.key]
                    self._in_flight.discard(entry.key)
                else:
                    self._entries[entry.key] = before
                raise DnsError(
                    str(self.path),
                    f"cannot write down the TXT value for {fqdn} before adding it "
                    f"({exc.strerror or exc}), so it was not added: check free space and "
                    f"permissions of {self.directory} (edged's user must be able to write it)",
                ) from None

    def forget(self, fqdn: str, value: str) -> None:
        """`value` at `fqdn` is deleted (or was never added): cross it out. A failed write is
        logged only: the entry then stays on disk and a later sweep deletes it again (a no-op)."""
        with self._lock:
            if self._entries.pop((fqdn, value), None) is None:
                return
            self._in_flight.discard((fqdn, value))
            try:
                self._write()
            except OSError as exc:
                log.warning(
                    "dns-01 journal not updated file=%s error=%s (the deleted value stays "
                    "listed; a later sweep deletes it again)",
                    self.path,
                    exc.strerror or exc,
                )

    def release(self, fqdn: str, value: str) -> None:
        """The delete of `value` at `fqdn` failed: it stays listed, a leftover that the next
        sweep deletes."""
        with self._lock:
            self._in_flight.discard((fqdn, value))

    def leftovers(self) -> list[JournalEntry]:
        """The listed values no running order owns: each must still be deleted."""
        with self._lock:
            return [e for k, e in self._entries.items() if k not in self._in_flight]

    def leftover_count(self) -> int:
        with self._lock:
            return len(self._entries) - len(self._in_flight)

    def close(self) -> None:
        """Tidy up at exit: with nothing listed, the lock file goes. With values listed the
        lock is kept until the process exits (an order's thread may still delete them);
        then the next sweep of this node takes them over."""
        with self._lock:
            if self._lock_fd is None or self._entries:
                return
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path(self.token))
            os.close(self._lock_fd)
            self._lock_fd = None

    def _write(self) -> None:
        """Replace the file with the entries (under self._lock); none: remove it. OSError."""
        # As the store's owner (see as_owner): what is made here is the owner's, and a
        # directory the owner replaced by a symlink leads nowhere the owner could not go.
        with as_owner(self._owner()):
            if not self._entries:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    return
                fsync_dir(self.directory)
                return
            self._hold_lock()
            data = {
                "version": VERSION,
                "node": self.node,
                "pid": self.pid,
                "values": [e.to_json() for e in self._entries.values()],
            }
            write_atomic(self.path, json.dumps(data, indent=2).encode() + b"\n")

    def _owner(self) -> tuple[int, int] | None:
        """The store's owner, for what `edged issue` run as root writes here (see
        store_owner): the daemon, its user's, must be able to take a journal over."""
        return store_owner(self.directory.parent)

    def _hold_lock(self) -> None:
        """Create and lock this process's lock file before its journal exists: a sweep of
        another process then sees this one alive. Called by _write, as the store's owner."""
        if self._lock_fd is not None:
            return
        if not self.directory.is_dir():
            os.makedirs(self.directory, DIR_MODE, exist_ok=True)
            fsync_dir(self.directory.parent)
        path = self._lock_path(self.token)
        while True:
            # O_NOFOLLOW: a lock file is never a symlink (one there was not made by edged).
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
            try:
                # Blocking: only a sweep can hold it, for a moment, between our open and
                # this lock (it found no journal yet and removes the file it locked).
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                os.close(fd)
                raise
            if _same_file(fd, path):
                break
            os.close(fd)  # that sweep removed it: lock a new one
        self._lock_fd = fd

    # --- sweeping -------------------------------------------------------------------------

    def sweep(
        self,
        updater: Callable[[], DnsUpdater],
        *,
        retry: str,
        cancel: threading.Event | None = None,
    ) -> SweepResult:
        """Take over the journals of this node's dead processes, then delete every leftover
        value (theirs, and this process's values whose delete failed) with `updater()`, which
        is only built when there is something to delete (DnsError when it cannot be: then the
        values stay). `retry` says when the next sweep comes, for the logs. Never raises for
        a journal or a DNS problem: those are logged, naming the file or record and the fix."""
        if not self._sweeping.acquire(blocking=False):
            return SweepResult()  # one is running: it does the same
        try:
            self._adopt_dead()
            leftovers = self.leftovers()
            if not leftovers:
                return SweepResult()
            try:
                dns = updater()
            except DnsError as exc:
                listed = "; ".join(e.describe() for e in leftovers)
                if f"{exc} {listed}" != self._cannot_delete:  # not every sweep again
                    self._cannot_delete = f"{exc} {listed}"
                    log.error(
                        "cannot remove %d leftover DNS-01 TXT value(s) left by interrupted "
                        "orders (%s): %s; they stay in %s and are tried again %s",
                        len(leftovers),
                        listed,
                        exc,
                        self.path,
                        retry,
                    )
                return SweepResult(failed=len(leftovers))
            self._cannot_delete = ""
            removed = failed = 0
            for entry in leftovers:
                if cancel is not None and cancel.is_set():
                    break
                if self._remove(dns, entry, retry):
                    removed += 1
                else:
                    failed += 1
            return SweepResult(removed, failed)
        finally:
            self._sweeping.release()

    def _remove(self, dns: DnsUpdater, entry: JournalEntry, retry: str) -> bool:
        server = str(dns.settings.server)
        try:
            dns.delete_txt(entry.fqdn, entry.value)
        except DnsError as exc:
            log.error(
                "cannot remove leftover DNS-01 TXT value %s left by an interrupted order (%s) "
                "from DNS server %s: %s; it stays in %s and is tried again %s (or delete it by "
                "hand: nsupdate with the TSIG key, `update delete %s. TXT %s`)",
                entry.describe(),
                entry.origin(server),
                server,
                exc.message,
                self.path,
                retry,
                entry.fqdn,
                json.dumps(entry.value),
            )
            return False
        self.forget(entry.fqdn, entry.value)
        log.warning(
            "removed leftover DNS-01 TXT value %s from DNS server %s, left by an interrupted "
            "order (%s)",
            entry.describe(),
            server,
            entry.origin(server),
        )
        return True

    def _report_once(self, path: Path, message: str, *args: object) -> None:
        if str(path) in self._reported:
            return
        self._reported.add(str(path))
        log.error(message, *args)

    def _adopt_dead(self) -> None:
        """Take the values of this node's journals whose process is gone into this one."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return  # no DNS-01 value was ever written down here
        except OSError as exc:
            self._report_once(
                self.directory,
                "cannot list the DNS-01 journals in %s (%s): leftover TXT values of interrupted "
                "orders are not removed; let edged's user read and write that directory",
                self.directory,
                exc.strerror or exc,
            )
            return
        tokens: set[str] = set()
        for name in sorted(names):
            journal = _FILE.fullmatch(name)
            match = journal or _TEMP.fullmatch(name)
            if match is None or match["token"] == self.token:
                continue
            if match["node"] == self.node:
                tokens.add(match["token"])
            elif journal is not None and journal["kind"] == "json":
                self._report_once(
                    self.directory / name,
                    "DNS-01 journal %s belongs to node %s, not this node (%s): left alone, as a "
                    "node removes only the TXT values it added itself (they may be challenges "
                    "in flight); if that node is gone for good, delete the values it lists by "
                    "hand and then the file",
                    self.directory / name,
                    match["node"],
                    self.node,
                )
        for token in sorted(tokens):
            self._adopt(token)

    def _adopt(self, token: str) -> None:
        path = self.directory / f"{self.node}.{token}.json"
        lock_path = self._lock_path(token)
        try:
            fd = os.open(
                lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE
            )
        except OSError as exc:
            self._report_once(
                lock_path,
                "cannot open %s (%s): the DNS-01 journal %s is not checked for leftover TXT "
                "values; let edged's user read and write %s",
                lock_path,
                exc.strerror or exc,
                path,
                self.directory,
            )
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # its process lives: the values are its orders', in flight
            if not _same_file(fd, lock_path):
                return  # another sweep took it over meanwhile and removed this file
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                raw = None  # it listed nothing when it ended
            except OSError as exc:
                self._report_once(
                    path,
                    "cannot read DNS-01 journal %s (%s): the leftover TXT values it lists are "
                    "not removed; make it readable for edged's user (it is tried again at each "
                    "sweep)",
                    path,
                    exc.strerror or exc,
                )
                return
            if raw is not None and not self._take(path, raw):
                return
            for name in os.listdir(self.directory):
                match = _TEMP.fullmatch(name)
                if match is not None and (match["node"], match["token"]) == (self.node, token):
                    os.unlink(self.directory / name)  # a write it did not finish
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)
            fsync_dir(self.directory)
        except OSError as exc:
            self._report_once(
                path,
                "cannot take over DNS-01 journal %s (%s): check permissions of %s",
                path,
                exc.strerror or exc,
                self.directory,
            )
        finally:
            os.close(fd)

    def _take(self, path: Path, raw: bytes) -> bool:
        """Move the entries of a dead process's journal into this one (this file written
        before that one goes); True when that journal may go."""
        try:
            node, entries = parse_journal(raw)
        except ValueError as exc:
            aside = path.with_name(path.name + ".corrupt")
            try:
                os.replace(path, aside)
            except OSError as move:
                self._report_once(
                    path,
                    "DNS-01 journal %s is corrupt (%s) and cannot be moved aside (%s): the TXT "
                    "values it listed are not removed; delete any _acme-challenge TXT value "
                    "edged left (dig TXT _acme-challenge.NAME at the zone's primary, nsupdate) "
                    "and then the file",
                    path,
                    exc,
                    move.strerror or move,
                )
                return False
            log.error(
                "DNS-01 journal %s is corrupt (%s): moved to %s and not used; the TXT values it "
                "listed are not removed: delete any _acme-challenge TXT value edged left (dig "
                "TXT _acme-challenge.NAME at the zone's primary, then nsupdate) and then %s. "
                "Serving and issuing go on",
                path,
                exc,
                aside,
                aside,
            )
            return True
        if node_label(node) != self.node:
            self._report_once(
                path,
                "DNS-01 journal %s says it is node %s's, not this node's (%s): left alone; if "
                "it was copied here from that node, delete it (that node removes its own values)",
                path,
                node,
                self.node,
            )
            return False
        with self._lock:
            added = [e for e in entries if e.key not in self._entries]
            for entry in added:
                self._entries[entry.key] = entry
            try:
                self._write()
            except OSError as exc:
                for entry in added:
                    del self._entries[entry.key]
                self._report_once(
                    path,
                    "cannot take the values of DNS-01 journal %s into %s (%s): they are not "
                    "removed yet; check free space and permissions of %s",
                    path,
                    self.path,
                    exc.strerror or exc,
                    self.directory,
                )
                return False
        os.unlink(path)
        if entries:
            log.info(
                "dns-01 journal of a process that is gone taken over file=%s values=%d",
                path,
                len(entries),
            )
        return True
