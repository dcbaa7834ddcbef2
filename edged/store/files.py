"""The file store: one directory per certificate, written so a crash never leaves a half bundle.

Layout under the root (DESIGN.md "Store layout")::

    live/<dir>/fullchain.pem, privkey.pem, meta.json     first key type
    live/<dir>/fullchain.<kt>.pem, privkey.<kt>.pem      further key types
    live/<dir>/previous/...                              the version before (same files)
    state/<dir>.json                                     renewal state

`<dir>` is names.store_dirname(normalised name). meta.json is written last and lists the
sha256 of every file of its version, so a reader detects a version whose files were only partly
replaced and falls back to previous/, which save() refreshes before touching live files.

Every file is written to a fresh temp file (O_EXCL, mode 0600 from creation), fsynced, renamed
over the target and the directory fsynced. Directories are 0700.

Single writer: one lock serialises this instance's mutations (the daemon calls it from several
threads via asyncio.to_thread); two processes must not write the same store at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from edged.errors import StoreError
from edged.names import NameError_, covers, name_from_dirname, normalize_name, store_dirname
from edged.store.base import KEY_TYPE_PATTERN, PemPair, StateRead, StoredCert, read_each

log = logging.getLogger(__name__)

META = "meta.json"
PREVIOUS = "previous"
META_VERSION = 1
FILE_MODE = 0o600
DIR_MODE = 0o700
_T = TypeVar("_T")
_TMP_PREFIX = ".tmp-"
_DELETED_PREFIX = ".deleted-"
# Files this store owns inside a bundle directory: anything matching and not listed in the
# current meta.json is a leftover (a dropped key type) and is removed after meta.json is written.
_OWNED_FILE = re.compile(r"(fullchain|privkey)(\.[a-z0-9-]{1,32})?\.pem")
_WRITE_HINT = "check free space and permissions of the store directory"


class _Unusable(Exception):
    """A bundle directory does not hold a whole, verified version (message says why)."""


class _Absent(_Unusable):
    """A bundle directory has no meta.json: no version was ever completed there."""


def pair_filenames(index: int, key_type: str) -> tuple[str, str]:
    """File names of the index-th pair: the first uses the plain names certbot users expect."""
    if index == 0:
        return "fullchain.pem", "privkey.pem"
    return f"fullchain.{key_type}.pem", f"privkey.{key_type}.pem"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _os_errors(action: str, path: Path) -> Iterator[None]:
    """Turn an OSError (ENOSPC, EACCES, EROFS...) into a StoreError naming the path."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StoreError(f"cannot {action} {path}: {reason}; {_WRITE_HINT}") from exc


class FileStore:
    """Store implementation on a local directory tree (see module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._live = self.root / "live"
        self._state = self.root / "state"
        self._accounts = self.root / "accounts"
        self._lock = threading.Lock()
        if not self.root.is_dir():
            with _os_errors("create", self.root):
                os.makedirs(self.root, DIR_MODE, exist_ok=True)
        self._owner = store_owner(self.root)

    # --- public API ---------------------------------------------------------------------

    def load(self, name: str) -> StoredCert | None:
        name, dirname = _checked(name)
        return self._load_dir(self._live / dirname, name, _read_bundle)

    def load_many(self, names: Sequence[str]) -> dict[str, StoredCert | StoreError | None]:
        """load() of each name, one by one (files: nothing to batch)."""
        return read_each(names, self.load)

    def load_previous(self, name: str) -> StoredCert | None:
        name, dirname = _checked(name)
        directory = self._live / dirname / PREVIOUS
        try:
            return _read_bundle(directory, name)
        except _Absent:
            return None
        except _Unusable as exc:
            raise StoreError(
                f"previous version of certificate {name!r} is unusable: {exc}; "
                f"it cannot be rolled back to; remove {directory} to clear this"
            ) from None

    def save(self, cert: StoredCert) -> None:
        cert = _normalised(cert)
        with self._lock, self._as_owner():
            self._save_locked(cert)

    def save_unless_upload(self, cert: StoredCert) -> StoredCert | None:
        """save(), unless the entry is an upload: then nothing is written and the upload is
        returned. The look and the write hold the lock together, so an upload of this process
        (the admin API's thread; the single writer) comes before both or after both."""
        cert = _normalised(cert)
        with self._lock, self._as_owner():
            try:
                current = self._load_dir(
                    self._live / store_dirname(cert.name), cert.name, _read_bundle
                )
            except StoreError:
                current = None  # unreadable: the new version repairs it
            if current is not None and current.source == "upload":
                return current
            self._save_locked(cert)
        return None

    def _save_locked(self, cert: StoredCert) -> None:
        directory = self._live / store_dirname(cert.name)
        self._make_dirs(directory)
        try:
            current: StoredCert | None = _read_bundle(directory, cert.name)
        except _Unusable:
            # Live is absent or half-written by a crash: previous/ already holds the last
            # whole version (or there is none), so keep it rather than overwrite it.
            current = None
        if current is not None:
            self._write_bundle(directory / PREVIOUS, current)
        self._write_bundle(directory, cert)
        _announce(directory)

    def rollback(self, name: str) -> StoredCert:
        name, dirname = _checked(name)
        directory = self._live / dirname
        with self._lock, self._as_owner():
            try:
                target = _read_bundle(directory / PREVIOUS, name)
            except _Unusable as exc:
                raise StoreError(
                    f"cannot roll back certificate {name!r}: no usable previous version ({exc})"
                ) from None
            try:
                current: StoredCert | None = _read_bundle(directory, name)
            except _Unusable:
                current = None
            # Live first: while its files change, readers fall back to previous/, which is the
            # target already. A crash while rewriting previous/ afterwards leaves the target
            # live and loses only the version rolled away from.
            self._write_bundle(directory, target)
            if current is not None:
                self._write_bundle(directory / PREVIOUS, current)
            _announce(directory)
        return target

    def delete(self, name: str) -> None:
        name, dirname = _checked(name)
        directory = self._live / dirname
        with self._lock, self._as_owner():
            if not directory.exists():
                return
            # One rename makes the certificate (live and previous together) vanish atomically;
            # deleting files one by one could expose previous/ as if it were live.
            grave = self._live / f"{_DELETED_PREFIX}{dirname}-{secrets.token_hex(6)}"
            with _os_errors("delete", directory):
                os.rename(directory, grave)
                fsync_dir(self._live)
        try:
            with self._as_owner():
                shutil.rmtree(grave)
        except OSError as exc:
            # The certificate is already gone; only disk space is wasted, so do not fail.
            log.warning("certificate %s deleted, but cannot remove %s: %s", name, grave, exc)

    def names(self) -> list[str]:
        found = []
        for entry in _entries(self._live):
            name = _name_of_entry(entry)
            if name is not None:
                found.append(name)
        return sorted(found)

    def load_state(self, name: str) -> dict[str, object] | None:
        _, dirname = _checked(name)
        path = self._state / f"{dirname}.json"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(
                f"cannot read {path}: {exc.strerror}; check permissions of the store"
            ) from exc
        try:
            state = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise StoreError(
                f"renewal state {path} is corrupt ({exc}); delete it to start over"
            ) from None
        if not isinstance(state, dict):
            raise StoreError(f"renewal state {path} is not a JSON object; delete it to start over")
        return state

    def load_states(self, names: Sequence[str]) -> dict[str, StateRead]:
        """load_state of each name, one by one (files: nothing to batch)."""
        return read_each(names, self.load_state)

    def save_state(self, name: str, state: Mapping[str, object]) -> None:
        name, dirname = _checked(name)
        try:
            data = json.dumps(dict(state), indent=2, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"renewal state of {name!r} is not JSON-serialisable: {exc}") from None
        with self._lock, self._as_owner():
            self._make_dirs(self._state)
            self._write_file(self._state / f"{dirname}.json", data.encode() + b"\n")

    def load_account(self, directory: str) -> tuple[dict[str, object], bytes] | None:
        return self.load_account_folder(account_dirname(directory))

    def account_folders(self) -> list[str]:
        """The accounts/<folder> names (one per ACME directory host) that hold an account."""
        return sorted(
            e.name
            for e in _entries(self._accounts)
            if re.fullmatch(r"[a-z0-9._-]+", e.name) and (Path(e.path) / "account.json").exists()
        )

    def load_account_folder(self, dirname: str) -> tuple[dict[str, object], bytes] | None:
        """The account in accounts/<dirname> (see account_dirname), or None."""
        if not re.fullmatch(r"[a-z0-9._-]+", dirname) or dirname in (".", ".."):
            raise StoreError(f"invalid account folder name {dirname!r}")
        folder = self._accounts / dirname
        try:
            raw = (folder / "account.json").read_bytes()
            key_pem = (folder / "key.pem").read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read the ACME account in {folder}: {exc.strerror}") from exc
        try:
            account = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            account = None
        if not isinstance(account, dict):
            raise StoreError(
                f"ACME account {folder}/account.json is corrupt; delete {folder} to register "
                "a new account"
            )
        return account, key_pem

    def save_account(self, directory: str, account: Mapping[str, object], key_pem: bytes) -> None:
        folder = self._accounts / account_dirname(directory)
        data = json.dumps(dict(account), indent=2, sort_keys=True).encode() + b"\n"
        with self._lock, self._as_owner():
            self._make_dirs(folder)
            # The key first: an account.json without its key would be unusable.
            self._write_file(folder / "key.pem", key_pem)
            self._write_file(folder / "account.json", data)

    # --- reading ------------------------------------------------------------------------

    def stored_at(self, name: str) -> float | None:
        """When the version load() returns was stored, from meta.json alone: its PEM files are
        neither read nor verified (~6x cheaper), for comparing every local copy with Redis,
        where a caller reads the version in full before it acts. None when absent."""
        name, dirname = _checked(name)
        return self._load_dir(self._live / dirname, name, _read_stamp)

    def _load_dir(self, directory: Path, name: str, read: Callable[[Path, str], _T]) -> _T | None:
        """Live version if whole, else previous/ if whole, else None (absent) or StoreError."""
        try:
            return read(directory, name)
        except _Unusable as exc:
            live_error = exc
        try:
            cert = read(directory / PREVIOUS, name)
        except _Unusable as exc:
            if isinstance(live_error, _Absent) and isinstance(exc, _Absent):
                return None
            raise StoreError(
                f"certificate {name!r} is unreadable: live: {live_error}; previous: {exc}; "
                f"re-issue or re-upload it, or restore {directory} from a backup"
            ) from None
        if not isinstance(live_error, _Absent):
            log.warning("certificate %s: using previous version: %s", name, live_error)
        return cert

    # --- writing ------------------------------------------------------------------------

    def _write_bundle(self, directory: Path, cert: StoredCert) -> None:
        """Write every file of `cert`, then meta.json naming their digests, then tidy up."""
        self._make_dirs(directory)
        digests: dict[str, str] = {}
        pairs = []
        for index, pair in enumerate(cert.pairs):
            chain_file, key_file = pair_filenames(index, pair.key_type)
            for filename, data in ((chain_file, pair.fullchain), (key_file, pair.privkey)):
                self._write_file(directory / filename, data)
                digests[filename] = _sha256(data)
            pairs.append({"key_type": pair.key_type, "fullchain": chain_file, "privkey": key_file})
        meta = {
            "version": META_VERSION,
            "name": cert.name,
            "names": list(cert.names),
            "source": cert.source,
            "stored_at": cert.stored_at,
            "extra": dict(cert.extra),
            "pairs": pairs,
            "sha256": digests,
        }
        self._write_file(directory / META, json.dumps(meta, indent=2).encode() + b"\n")
        self._remove_leftovers(directory, keep=set(digests))

    def _remove_leftovers(self, directory: Path, keep: set[str]) -> None:
        """Remove files of dropped key types and temp files of crashed writes."""
        with _os_errors("clean up", directory):
            stale = [
                entry.path
                for entry in os.scandir(directory)
                if entry.is_file(follow_symlinks=False)
                and (
                    entry.name.startswith(_TMP_PREFIX)
                    or (_OWNED_FILE.fullmatch(entry.name) is not None and entry.name not in keep)
                )
            ]
            for path in stale:
                os.unlink(path)
            if stale:
                fsync_dir(directory)

    def _write_file(self, path: Path, data: bytes) -> None:
        """Atomically replace `path` with `data` (see write_atomic); StoreError naming it."""
        with _os_errors("write", path):
            write_atomic(path, data)

    @contextlib.contextmanager
    def _as_owner(self) -> Iterator[None]:
        """as_owner(the store's owner), StoreError when this thread cannot act as it."""
        with contextlib.ExitStack() as stack:
            with _os_errors("act as the owner of", self.root):
                stack.enter_context(as_owner(self._owner))
            yield

    def _make_dirs(self, directory: Path) -> None:
        """Create `directory` and its parents up to the root, 0700, durably."""
        missing = []
        current = directory
        with _os_errors("create", directory):  # is_dir raises EACCES
            while current != self.root and not current.is_dir():
                missing.append(current)
                current = current.parent
        for path in reversed(missing):
            with _os_errors("create", path):
                os.mkdir(path, DIR_MODE)
                fsync_dir(path.parent)


def store_owner(root: Path) -> tuple[int, int] | None:
    """(uid, gid) that what is written under `root` must get: its owner's, when this process
    runs as root and the store is another user's. `sudo edged rollback` (or `issue`) beside a
    daemon running as the service user otherwise leaves root's files, mode 0600, that the
    daemon cannot read: the name's certificate is refused, its previous version too. None:
    files belong to whoever writes them."""
    if os.geteuid() != 0:
        return None
    try:
        st = root.stat()
    except OSError:
        return None
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


@contextlib.contextmanager
def as_owner(owner: tuple[int, int] | None) -> Iterator[None]:
    """The block's file system calls, on this thread, as `owner` (see store_owner; None: as
    this process): root writing another user's store reaches in it only what that user may.
    A directory of the store its owner replaced by a symlink then leads nowhere the owner
    could not go itself: root neither writes the owner's files into a directory of its own
    nor copies what it reads there (another store's key) into the store. Linux's fsuid and
    fsgid: this thread's alone (a glibc wrapper changes no other thread), and root's
    capabilities come back with them. What the block creates is the owner's, as if the owner
    had made it. PermissionError when they cannot be changed."""
    if owner is None:
        yield
        return
    uid, gid = owner
    old_gid = _setfsid(_libc().setfsgid, gid)
    try:
        old_uid = _setfsid(_libc().setfsuid, uid)
        try:
            yield
        finally:
            _setfsid(_libc().setfsuid, old_uid)
    finally:
        _setfsid(_libc().setfsgid, old_gid)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    for call in (libc.setfsuid, libc.setfsgid):
        call.argtypes = [ctypes.c_uint]
        call.restype = ctypes.c_int
    return libc


def _setfsid(call: Callable[[int], int], value: int) -> int:
    """setfsuid/setfsgid(value): the id before. They report no error: the id is read back
    (an invalid id changes nothing and answers the current one)."""
    before = call(value)
    if call(0xFFFFFFFF) != value:
        raise PermissionError(
            errno.EPERM, f"cannot take uid/gid {value}, the store's owner: run this as that user"
        )
    return before


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file, whole: a temp
    file beside it (mode 0600 from creation), fsync, rename, directory fsync. OSError."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{secrets.token_hex(6)}")
    # O_EXCL: never write through an existing file or symlink. The mode is set at creation so
    # a secret is never readable by others, not even for a moment.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def account_dirname(directory: str) -> str:
    """accounts/<dir> for an ACME directory URL: its host and port, safe as a file name."""
    host = urlsplit(directory).netloc.lower() or "unknown"
    return re.sub(r"[^a-z0-9.-]", "_", host)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _announce(directory: Path) -> None:
    """Touch a bundle's directory once its files are written: a running daemon watches live/
    itself, not the 100k directories below it (a recursive inotify watch of a large store takes
    seconds to set up and a watch per directory), and sees this as a change of that entry."""
    try:
        os.utime(directory)
    except OSError as exc:  # the write itself succeeded; a daemon then reloads on SIGHUP
        log.warning("cannot touch %s: %s", directory, exc)


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    """The entries of a store folder; none when it does not exist (yet)."""
    try:
        return list(os.scandir(directory))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StoreError(
            f"cannot list {directory}: {exc.strerror}; check permissions of the store"
        ) from exc


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename or create in it survives a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- names --------------------------------------------------------------------------------


def _checked(name: str) -> tuple[str, str]:
    """(normalised name, directory name) or StoreError: the only way a name reaches a path."""
    if not isinstance(name, str):
        raise StoreError(f"invalid certificate name {name!r}: not a string")
    try:
        normal = normalize_name(name)
        return normal, store_dirname(normal)
    except NameError_ as exc:
        raise StoreError(f"invalid certificate name {name!r}: {exc}") from None


def _normalised(cert: StoredCert) -> StoredCert:
    """`cert` with every name normalised; StoreError naming a bad one."""
    name, _ = _checked(cert.name)
    names = tuple(_checked(n)[0] for n in cert.names)
    # Its name is the site's: one of the certificate's names, or covered by one of them (a
    # site www.a.com served by an uploaded *.a.com certificate).
    if not any(covers(n, name) for n in names):
        raise StoreError(
            f"certificate {name!r}: its name is not among its names, nor covered by one of "
            f"them {list(names)}"
        )
    if (name, names) == (cert.name, cert.names):
        return cert
    return StoredCert(name, names, cert.pairs, cert.source, cert.stored_at, cert.extra)


def _name_of_entry(entry: os.DirEntry[str]) -> str | None:
    """The certificate name of a live/ entry, or None for anything that is not one of ours."""
    if not entry.is_dir(follow_symlinks=False):
        return None
    try:
        name = name_from_dirname(entry.name)
    except NameError_:
        return None  # lost+found, .deleted-*, ...
    directory = Path(entry.path)
    if (directory / META).is_file() or (directory / PREVIOUS / META).is_file():
        return name
    return None  # a directory named like a host ("tmp") that holds no certificate


# --- reading one bundle directory ---------------------------------------------------------


def _read_bundle(directory: Path, name: str) -> StoredCert:
    """The version in `directory`, verified against its meta.json; _Unusable says why not."""
    meta, meta_path = _read_meta(directory)
    try:
        return _cert_from_meta(meta, directory, name)
    except (KeyError, TypeError, ValueError) as exc:
        raise _Unusable(f"{meta_path} is invalid: {exc}") from None


def _read_stamp(directory: Path, name: str) -> float:
    """The stored_at of the version in `directory`, from its meta.json alone."""
    meta, meta_path = _read_meta(directory)
    try:
        return _meta_header(meta, name)[1]
    except (KeyError, ValueError) as exc:
        raise _Unusable(f"{meta_path} is invalid: {exc}") from None


def _meta_header(meta: object, name: str) -> tuple[dict[str, Any], float]:
    """A meta object of this version, for `name`, and its stored_at. KeyError, ValueError."""
    if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
        raise ValueError(f"not a version {META_VERSION} meta object")
    if meta["name"] != name:
        raise ValueError(f"it is for {meta['name']!r}, not {name!r}")
    stored_at = meta["stored_at"]
    if not isinstance(stored_at, int | float):
        raise ValueError("'stored_at' must be a number")
    return meta, float(stored_at)


def _read_meta(directory: Path) -> tuple[object, Path]:
    meta_path = directory / META
    try:
        raw = meta_path.read_bytes()
    except FileNotFoundError:
        raise _Absent(f"{meta_path} is missing") from None
    except OSError as exc:
        raise _Unusable(f"cannot read {meta_path}: {exc.strerror}") from None
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: a hostile or corrupt file nesting arrays thousands deep.
        raise _Unusable(f"{meta_path} is not valid JSON ({exc})") from None
    return meta, meta_path


def _cert_from_meta(raw: object, directory: Path, name: str) -> StoredCert:
    meta, _ = _meta_header(raw, name)
    digests = meta["sha256"]
    if not isinstance(digests, dict) or not isinstance(meta["pairs"], list):
        raise ValueError("'sha256' must be an object and 'pairs' a list")
    pairs = []
    for index, entry in enumerate(meta["pairs"]):
        key_type = entry["key_type"]
        if not isinstance(key_type, str) or not KEY_TYPE_PATTERN.fullmatch(key_type):
            raise ValueError(f"pair {index} has an invalid key type {key_type!r}")
        expected = pair_filenames(index, key_type)
        # Only the file names this store would use: meta.json never steers a read elsewhere.
        if (entry["fullchain"], entry["privkey"]) != expected:
            raise ValueError(f"pair {index} names files {entry!r}, expected {expected}")
        chain, key = (_read_verified(directory / f, digests.get(f)) for f in expected)
        pairs.append(PemPair(key_type, chain, key))
    names = meta["names"]
    extra = meta["extra"]
    if not isinstance(names, list) or not isinstance(extra, dict):
        raise ValueError("'names' must be a list and 'extra' an object")
    if not all(isinstance(n, str) and normalize_name(n) == n for n in names):
        raise ValueError(f"'names' holds a name that is not normalised: {names!r}")
    return StoredCert(name, tuple(names), tuple(pairs), meta["source"], meta["stored_at"], extra)


def _read_verified(path: Path, digest: object) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _Unusable(f"{path} is missing") from None
    except OSError as exc:
        raise _Unusable(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(digest, str) or _sha256(data) != digest:
        raise _Unusable(f"{path} does not match the sha256 in meta.json (partly written?)")
    return data
