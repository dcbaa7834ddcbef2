"""The file store: layout, names, permissions, rollback and crash consistency."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pwd
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from edged.errors import StoreError
from edged.store import FileStore, PemPair, Store, StoredCert
from edged.store import files as files_module

T = TypeVar("T")
NAME = "a.com"
ECDSA = "ecdsa-p256"
RSA = "rsa-2048"


def pem_pair(key_type: str, tag: str) -> PemPair:
    """Fake PEM bytes: the store never parses them, it only has to return them unchanged."""
    chain = f"-----BEGIN CERTIFICATE-----\n{tag}/{key_type}/chain\n-----END CERTIFICATE-----\n"
    key = f"-----BEGIN PRIVATE KEY-----\n{tag}/{key_type}/key\n-----END PRIVATE KEY-----\n"
    return PemPair(key_type, chain.encode(), key.encode())


def make_cert(
    tag: str, key_types: tuple[str, ...] = (ECDSA,), name: str = NAME, source: str = "acme"
) -> StoredCert:
    return StoredCert(
        name=name,
        names=(name, f"www.{name.removeprefix('*.')}"),
        pairs=tuple(pem_pair(kt, tag) for kt in key_types),
        source=source,
        stored_at=1_700_000_000.5,
        extra={"order": f"https://acme.test/order/{tag}"},
    )


V1 = make_cert("v1", (ECDSA, RSA))
V2 = make_cert("v2", (RSA,))
V3 = make_cert("v3", (ECDSA,))


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "certs")


def files_in(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.is_file()}


# --- round trip, layout ------------------------------------------------------------------


def test_round_trip(store: FileStore) -> None:
    assert isinstance(store, Store)
    assert store.load(NAME) is None
    assert store.names() == []
    store.save(V3)
    assert store.load(NAME) == V3
    assert store.names() == [NAME]
    assert store.load_previous(NAME) is None
    live = store.root / "live" / NAME
    assert files_in(live) == {"fullchain.pem", "privkey.pem", "meta.json"}
    assert (live / "privkey.pem").read_bytes() == V3.pairs[0].privkey
    meta = json.loads((live / "meta.json").read_text())
    assert meta["version"] == 1 and meta["name"] == NAME and meta["source"] == "acme"
    assert set(meta["sha256"]) == {"fullchain.pem", "privkey.pem"}


def test_two_key_types_use_suffixed_files(store: FileStore) -> None:
    store.save(V1)
    live = store.root / "live" / NAME
    assert files_in(live) == {
        "fullchain.pem",
        "privkey.pem",
        f"fullchain.{RSA}.pem",
        f"privkey.{RSA}.pem",
        "meta.json",
    }
    loaded = store.load(NAME)
    assert loaded == V1
    assert loaded is not None and loaded.key_types == (ECDSA, RSA)
    assert (live / f"fullchain.{RSA}.pem").read_bytes() == V1.pairs[1].fullchain


def test_previous_kept_and_dropped_key_type_files_removed(store: FileStore) -> None:
    store.save(V1)
    store.save(V2)
    assert store.load(NAME) == V2
    assert store.load_previous(NAME) == V1
    live = store.root / "live" / NAME
    # V2 has only RSA, in the plain file names: the old suffixed RSA files are gone from live…
    assert files_in(live) == {"fullchain.pem", "privkey.pem", "meta.json"}
    # …but still in previous/, which holds V1 whole.
    assert f"privkey.{RSA}.pem" in files_in(live / "previous")
    store.save(V3)
    assert store.load(NAME) == V3
    assert store.load_previous(NAME) == V2
    assert files_in(live / "previous") == {"fullchain.pem", "privkey.pem", "meta.json"}


def test_save_unless_upload_keeps_an_upload_and_repairs_an_unreadable_entry(
    store: FileStore,
) -> None:
    """The renewal loop's write: anything but an upload is replaced like save() does; an
    upload stays (and is returned); an entry that cannot be read is no upload."""
    assert store.save_unless_upload(V1) is None
    assert store.save_unless_upload(V2) is None
    assert store.load(NAME) == V2 and store.load_previous(NAME) == V1
    upload = make_cert("up", source="upload")
    store.save(upload)
    assert store.save_unless_upload(V3) == upload
    assert store.load(NAME) == upload and store.load_previous(NAME) == V2
    store.save(V1)
    store.save(V2)
    (live_dir(store) / "privkey.pem").unlink()
    (live_dir(store) / "previous" / "meta.json").write_text("[]")
    with pytest.raises(StoreError):
        store.load(NAME)
    assert store.save_unless_upload(V3) is None
    assert store.load(NAME) == V3


def test_save_unless_upload_looks_and_writes_under_one_lock(tmp_path: Path) -> None:
    """An upload by another thread of the process (the admin API's) while the renewal loop's
    write looks at the entry waits for that write, then replaces it: it is never lost
    between the look and the write."""

    class UploadWhileLooking(FileStore):
        upload: StoredCert | None = None
        uploader: threading.Thread | None = None

        def _load_dir(self, directory: Path, name: str, read: Callable[[Path, str], T]) -> T | None:
            found = super()._load_dir(directory, name, read)
            if self.upload is not None:
                self.uploader = threading.Thread(target=self.save, args=(self.upload,))
                self.upload = None
                self.uploader.start()
                self.uploader.join(0.5)  # done unless it waits for the lock
            return found

    store = UploadWhileLooking(tmp_path / "certs")
    store.save(V1)
    upload = make_cert("up", source="upload")
    store.upload = upload
    assert store.save_unless_upload(V2) is None  # it looked before the upload
    assert store.uploader is not None
    store.uploader.join()
    assert store.load(NAME) == upload and store.load_previous(NAME) == V2


def test_rollback_twice_is_back(store: FileStore) -> None:
    store.save(V1)
    store.save(V2)
    assert store.rollback(NAME) == V1
    assert store.load(NAME) == V1
    assert store.load_previous(NAME) == V2
    assert store.rollback(NAME) == V2
    assert store.load(NAME) == V2
    assert store.load_previous(NAME) == V1


def test_rollback_without_previous_fails(store: FileStore) -> None:
    with pytest.raises(StoreError, match=r"cannot roll back certificate 'a\.com'"):
        store.rollback(NAME)
    store.save(V1)
    with pytest.raises(StoreError, match="no usable previous"):
        store.rollback(NAME)
    assert store.load(NAME) == V1


def test_wildcard_directory(store: FileStore) -> None:
    cert = make_cert("w", name="*.b.com")
    store.save(cert)
    assert (store.root / "live" / "_wildcard.b.com" / "meta.json").is_file()
    assert store.load("*.B.com.") == cert
    assert store.names() == ["*.b.com"]


def test_names_are_normalised(store: FileStore) -> None:
    raw = StoredCert("A.COM.", ("A.COM.", "WWW.a.com"), V3.pairs, "upload", 1.0)
    store.save(raw)
    loaded = store.load("a.com")
    assert loaded is not None
    assert (loaded.name, loaded.names) == ("a.com", ("a.com", "www.a.com"))
    assert store.load(" A.Com ") == loaded


def test_delete(store: FileStore) -> None:
    store.save(V1)
    store.save(V2)
    store.save_state(NAME, {"status": "ok"})
    store.delete("A.com")
    assert store.load(NAME) is None
    assert store.load_previous(NAME) is None
    assert store.names() == []
    assert list((store.root / "live").iterdir()) == []
    store.delete(NAME)  # absent: no error
    assert store.load_state(NAME) == {"status": "ok"}  # renewal state is not the cert's


@pytest.mark.parametrize(
    "bad", ["../etc", "a/b", "a\x00b.com", "..", ".", "", "/etc/passwd", "a..b", "*", "-a.com"]
)
def test_bad_names_rejected(tmp_path: Path, bad: str) -> None:
    store = FileStore(tmp_path / "certs")
    calls: list[Callable[[], object]] = [
        lambda: store.load(bad),
        lambda: store.load_previous(bad),
        lambda: store.delete(bad),
        lambda: store.rollback(bad),
        lambda: store.load_state(bad),
        lambda: store.save_state(bad, {}),
        lambda: store.save(StoredCert(bad, (bad,), V3.pairs, "acme", 0)),
        lambda: store.save(StoredCert(NAME, (NAME, bad), V3.pairs, "acme", 0)),
    ]
    for call in calls:
        with pytest.raises(StoreError, match="invalid certificate name") as info:
            call()
        assert repr(bad) in str(info.value)
    # Nothing was created anywhere, in the store or next to it.
    assert [p.name for p in tmp_path.iterdir()] == ["certs"]
    assert list((tmp_path / "certs").iterdir()) == []


def test_save_requires_name_among_names(store: FileStore) -> None:
    with pytest.raises(StoreError, match="not among its names"):
        store.save(StoredCert(NAME, ("b.com",), V3.pairs, "acme", 0))
    # A wildcard covers exactly one label: not the name itself, not two labels deeper.
    with pytest.raises(StoreError, match="nor covered by one of them"):
        store.save(StoredCert(NAME, (f"*.{NAME}",), V3.pairs, "acme", 0))
    with pytest.raises(StoreError, match="nor covered by one of them"):
        store.save(StoredCert(f"x.y.{NAME}", (f"*.{NAME}",), V3.pairs, "acme", 0))


def test_a_site_name_covered_by_the_certificates_wildcard_is_stored(store: FileStore) -> None:
    """A site www.a.com served by an uploaded *.a.com certificate: its entry is stored under
    the site's name (it was refused, and `edged upload` answered 500 store_failed)."""
    cert = StoredCert(f"www.{NAME}", (f"*.{NAME}",), V3.pairs, "upload", 0)
    store.save(cert)
    loaded = store.load(f"www.{NAME}")
    assert loaded is not None and loaded.names == (f"*.{NAME}",)


def test_names_skips_foreign_directories(store: FileStore) -> None:
    store.save(V3)
    live = store.root / "live"
    for foreign in ("tmp", "lost+found", ".cache", "_wildcard.", "UPPER.com"):
        (live / foreign).mkdir()
    (live / "README").write_text("not a cert")
    assert store.names() == [NAME]
    assert store.load("tmp") is None


@pytest.fixture
def no_umask() -> Iterator[None]:
    """With umask 0 a file created 0666 and chmodded later would show up as such."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("no_umask")
def test_permissions(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "certs")
    store.save(V1)
    store.save(V2)
    store.rollback(NAME)
    store.save_state(NAME, {"attempts": 1})
    checked = 0
    for path in [store.root, *store.root.rglob("*")]:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path
        checked += 1
    assert checked == 5 + 5 + 3 + 1  # 5 dirs, live V1 (2 pairs), previous V2, state
    # A crash mid-write leaves no temp file around readable by others either.
    assert not [p for p in store.root.rglob(".tmp-*")]


@pytest.fixture
def reachable(tmp_path: Path) -> Iterator[Path]:
    """A directory under which another user (the store's owner) can reach what it owns:
    pytest's own temp directories are root's, mode 0700."""
    base = Path(tempfile.mkdtemp(prefix="edged-owner-"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files to another user")
def test_root_writes_what_the_stores_owner_can_read(reachable: Path) -> None:
    """`sudo edged rollback NAME` (or `edged issue`) beside a daemon running as the service
    user, which owns the store (README "Installing as a service"): what root writes gets the
    store's owner. It stayed root's, mode 0600: the daemon could read neither the name's live
    version nor its previous one, kept serving the old certificate and, at its next start,
    served none. The DNS-01 journal of `edged issue` too, which the daemon takes over."""
    from edged.dnsjournal import DnsJournal

    nobody = pwd.getpwnam("nobody")
    owner = (nobody.pw_uid, nobody.pw_gid)
    root = reachable / "certs"
    root.mkdir(mode=0o700)
    os.chown(root, *owner)
    store = FileStore(root)
    store.save(V1)
    store.save(V2)
    store.rollback(NAME)
    store.save_state(NAME, {"attempts": 1})
    store.save_account("https://acme.test/dir", {"uri": "https://acme.test/acct/1"}, b"key")
    journal = DnsJournal(root / "dns01", "edge1")
    journal.record("_acme-challenge.a.com", "value", "a.com", "127.0.0.1:53")
    written = [root, *root.rglob("*")]
    assert len(written) > 15
    assert [p for p in written if (p.stat().st_uid, p.stat().st_gid) != owner] == []
    # Beside a store root's own (a daemon run as root, a test): files stay root's.
    own = FileStore(reachable / "own")
    own.save(V1)
    assert {p.stat().st_uid for p in own.root.rglob("*")} == {0}


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files to another user")
def test_root_hands_the_stores_owner_nothing_through_a_symlink(reachable: Path) -> None:
    """What root gives the store's owner it gives by the file it made itself: a symlink the
    owner put where root is about to write (the journal's lock file here) is not followed,
    so the file it names keeps its owner."""
    from edged.dns import DnsError
    from edged.dnsjournal import DnsJournal

    nobody = pwd.getpwnam("nobody")
    root = reachable / "certs"
    (root / "dns01").mkdir(mode=0o700, parents=True)
    for path in (root, root / "dns01"):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    target = reachable / "roots-own-file"
    target.write_bytes(b"root's")
    journal = DnsJournal(root / "dns01", "edge1")
    journal._lock_path(journal.token).symlink_to(target)
    with pytest.raises(DnsError, match="Too many levels of symbolic links"):
        journal.record("_acme-challenge.a.com", "value", "a.com", "127.0.0.1:53")
    assert target.stat().st_uid == 0 and target.read_bytes() == b"root's"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files to another user")
def test_root_reaches_nothing_through_a_directory_the_owner_made_a_symlink(
    reachable: Path,
) -> None:
    """Root writing another user's store (`sudo edged issue`, `rollback`) works in it as that
    user: a directory of the store the owner replaced by a symlink leads nowhere the owner
    could not go itself. Root followed it: it wrote the owner's files into a directory of
    its own (which the owner could then fill at will), and copied the version it found there
    (another store's, key and all) into previous/ for the owner to read."""
    from edged.dns import DnsError
    from edged.dnsjournal import DnsJournal

    nobody = pwd.getpwnam("nobody")
    owner = (nobody.pw_uid, nobody.pw_gid)
    private = FileStore(reachable / "roots-own-store")  # root's, 0700
    secret = make_cert("secret")
    private.save(secret)
    root = reachable / "certs"
    (root / "live").mkdir(parents=True)
    for path in (root, root / "live"):
        os.chown(path, *owner)
    (root / "live" / NAME).symlink_to(private.root / "live" / NAME)
    (root / "state").symlink_to(private.root / "live")
    (root / "dns01").symlink_to(private.root / "live")
    before = {p: p.stat() for p in private.root.rglob("*")}

    store = FileStore(root)
    with pytest.raises(StoreError, match="Permission denied"):
        store.save(V1)
    with pytest.raises(StoreError, match="Permission denied"):
        store.save_state(NAME, {"attempts": 1})
    journal = DnsJournal(root / "dns01", "edge1")
    with pytest.raises(DnsError, match="Permission denied"):
        journal.record("_acme-challenge.a.com", "value", "a.com", "127.0.0.1:53")
    after = {p: p.stat() for p in private.root.rglob("*")}
    assert after.keys() == before.keys()
    assert {p: (s.st_uid, s.st_mtime_ns) for p, s in after.items()} == {
        p: (s.st_uid, s.st_mtime_ns) for p, s in before.items()
    }
    assert private.load(NAME) == secret
    copied = [p for p in root.rglob("*") if p.is_file() and b"secret" in p.read_bytes()]
    assert copied == []
    # Its own directories it writes as before, the owner's.
    for link in (root / "live" / NAME, root / "state", root / "dns01"):
        link.unlink()
    store.save(V1)
    store.save_state(NAME, {"attempts": 1})
    assert store.load(NAME) == V1
    assert {(p.stat().st_uid, p.stat().st_gid) for p in root.rglob("*")} == {owner}


# --- reading damaged stores --------------------------------------------------------------


def live_dir(store: FileStore) -> Path:
    return store.root / "live" / NAME


def test_corrupt_meta_falls_back_to_previous(
    store: FileStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.save(V1)
    store.save(V2)
    (live_dir(store) / "meta.json").write_text("{not json")
    assert store.load(NAME) == V1
    assert "using previous version" in caplog.text


def test_missing_or_changed_file_falls_back_to_previous(store: FileStore) -> None:
    store.save(V1)
    store.save(V2)
    (live_dir(store) / "privkey.pem").unlink()
    assert store.load(NAME) == V1
    store.save(V3)  # live was unusable: previous (V1) is kept, not overwritten
    assert store.load_previous(NAME) == V1
    (live_dir(store) / "fullchain.pem").write_bytes(b"changed")
    assert store.load(NAME) == V1


def test_both_versions_broken_is_an_error(store: FileStore) -> None:
    store.save(V1)
    store.save(V2)
    (live_dir(store) / "privkey.pem").unlink()
    (live_dir(store) / "previous" / "meta.json").write_text("[]")
    with pytest.raises(StoreError) as info:
        store.load(NAME)
    message = str(info.value)
    assert "'a.com'" in message and "privkey.pem is missing" in message
    assert "re-issue" in message
    with pytest.raises(StoreError, match=r"previous version of certificate 'a\.com' is unusable"):
        store.load_previous(NAME)


def test_broken_live_without_previous_is_an_error(store: FileStore) -> None:
    store.save(V1)
    (live_dir(store) / "fullchain.pem").write_bytes(b"x")
    with pytest.raises(StoreError, match="does not match the sha256"):
        store.load(NAME)


def test_meta_cannot_point_outside_its_directory(store: FileStore) -> None:
    store.save(V3)
    secret = store.root / "secret.pem"
    secret.write_bytes(b"secret")
    meta_path = live_dir(store) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["pairs"][0]["privkey"] = "../../secret.pem"
    meta["sha256"]["../../secret.pem"] = files_module._sha256(b"secret")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="expected"):
        store.load(NAME)


def test_meta_for_another_name_is_refused(store: FileStore) -> None:
    store.save(V3)
    shutil.copytree(live_dir(store), store.root / "live" / "b.com")
    with pytest.raises(StoreError, match=r"not 'b\.com'"):
        store.load("b.com")


def test_stored_at_reads_the_stamp_load_would_return_from_meta_alone(store: FileStore) -> None:
    """The local-copy check's cheap read: the stamp of the version load() returns, without
    reading the PEM files (restore() reads those in full before it writes anything)."""
    assert store.stored_at(NAME) is None
    store.save(V1)
    store.save(dataclasses.replace(V2, stored_at=1_700_000_100.0))
    assert store.stored_at(NAME) == 1_700_000_100.0
    (live_dir(store) / "privkey.pem").unlink()  # not read: the live meta still answers
    assert store.stored_at(NAME) == 1_700_000_100.0
    (live_dir(store) / "meta.json").write_text("{not json")
    assert store.stored_at(NAME) == V1.stored_at  # as load(): previous when live is unusable
    (live_dir(store) / "previous" / "meta.json").write_text(
        json.dumps({"version": files_module.META_VERSION, "name": NAME, "stored_at": "x"})
    )
    with pytest.raises(StoreError, match="'stored_at' must be a number"):
        store.stored_at(NAME)
    shutil.copytree(store.root / "live" / NAME, store.root / "live" / "b.com")
    with pytest.raises(StoreError, match="re-issue"):
        store.stored_at("b.com")


# --- state --------------------------------------------------------------------------------


def test_state_round_trip(store: FileStore) -> None:
    assert store.load_state(NAME) is None
    state: dict[str, object] = {"status": "failing", "attempts": 3, "next_try": 1.5, "x": None}
    store.save_state(NAME, state)
    assert store.load_state("A.com") == state
    store.save_state(NAME, {"status": "ok"})
    assert store.load_state(NAME) == {"status": "ok"}
    store.save_state("*.a.com", {"w": True})
    assert (store.root / "state" / "_wildcard.a.com.json").is_file()
    assert store.load_state("*.a.com") == {"w": True}


def test_corrupt_state_names_the_path(store: FileStore) -> None:
    store.save_state(NAME, {"status": "ok"})
    path = store.root / "state" / f"{NAME}.json"
    path.write_text('{"status": ')
    with pytest.raises(StoreError, match=re.escape(str(path))):
        store.load_state(NAME)
    path.write_text("[1]")
    with pytest.raises(StoreError, match="not a JSON object"):
        store.load_state(NAME)
    with pytest.raises(StoreError, match="not JSON-serialisable"):
        store.save_state(NAME, {"when": object()})


# --- value types ----------------------------------------------------------------------------


def test_value_types() -> None:
    # The private key never reaches a log.
    assert "v/ecdsa-p256/key" not in repr(pem_pair(ECDSA, "v"))
    assert "PRIVATE" not in repr(V1)
    assert hash(V1) == hash(make_cert("v1", (ECDSA, RSA)))
    assert make_cert("v1", (ECDSA, RSA)) == V1
    with pytest.raises(TypeError):
        V1.extra["x"] = "y"  # type: ignore[index]
    for bad_type in ("RSA", "rsa.2048", "a/b", "", "x" * 33, "rsa\n"):
        with pytest.raises(ValueError, match="key type"):
            PemPair(bad_type, b"c", b"k")
    with pytest.raises(ValueError, match="repeat"):
        StoredCert(NAME, (NAME,), (pem_pair(RSA, "a"), pem_pair(RSA, "b")), "acme", 0)
    with pytest.raises(ValueError, match="at least one"):
        StoredCert(NAME, (NAME,), (), "acme", 0)
    with pytest.raises(ValueError, match="source"):
        StoredCert(NAME, (NAME,), V3.pairs, "ftp", 0)


# --- OS errors and crashes ------------------------------------------------------------------


class FaultyOs:
    """Stands in for `os` inside edged.store.files; fails every mutating call from the Nth on.

    On failure it raises OSError(err) (a dying disk: every later call fails too) or, with
    `exit_code`, ends the process on the spot (a crash; a write is cut in half first).
    fsync is counted but not performed: visibility, not power loss, is what these tests see,
    and skipping it keeps hundreds of simulated crashes fast.
    """

    MUTATING = frozenset({"open", "write", "fsync", "replace", "rename", "unlink", "mkdir"})

    def __init__(
        self,
        fail_at: int = 1 << 30,
        *,
        ops: frozenset[str] = MUTATING,
        err: int = errno.EIO,
        exit_code: int | None = None,
    ) -> None:
        self.fail_at = fail_at
        self.ops = ops
        self.err = err
        self.exit_code = exit_code
        self.calls = 0

    def __getattr__(self, attr: str) -> Any:
        real = getattr(os, attr)
        if attr not in self.ops:
            return real

        def step(*args: Any, **kwargs: Any) -> Any:
            if attr == "open" and not args[1] & os.O_CREAT:
                return real(*args, **kwargs)  # opening a directory to fsync it changes nothing
            self.calls += 1
            if self.calls > self.fail_at:
                self._fail(attr, args)
            return None if attr == "fsync" else real(*args, **kwargs)

        return step

    def _fail(self, attr: str, args: tuple[Any, ...]) -> None:
        if self.exit_code is None:
            raise OSError(self.err, os.strerror(self.err))
        if attr == "write":
            fd, data = args
            os.write(fd, bytes(data[: len(data) // 2]))
        os._exit(self.exit_code)


def test_enospc_keeps_old_bundle(store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.save(V1)
    for op in ("write", "replace"):
        with monkeypatch.context() as m:
            m.setattr(files_module, "os", FaultyOs(0, ops=frozenset({op}), err=errno.ENOSPC))
            with pytest.raises(StoreError) as info:
                store.save(V2)
        message = str(info.value)
        assert message.startswith(f"cannot write {live_dir(store) / 'previous'}/")
        assert "No space left on device; check free space and permissions" in message
        assert store.load(NAME) == V1
        assert not list(store.root.rglob(".tmp-*"))  # the temp file was removed
    with monkeypatch.context() as m:
        m.setattr(files_module, "os", FaultyOs(0, ops=frozenset({"mkdir"}), err=errno.EROFS))
        with pytest.raises(StoreError, match=r"cannot create .*Read-only file system"):
            store.save_state(NAME, {})


Action = Callable[[FileStore], object]

# (name, versions saved before, action, outcomes a crash may leave)
SCENARIOS: list[tuple[str, tuple[StoredCert, ...], Action, tuple[StoredCert | None, ...]]] = [
    ("first-save", (), lambda s: s.save(V1), (None, V1)),
    ("save", (V1,), lambda s: s.save(V2), (V1, V2)),
    ("save-with-previous", (V1, V2), lambda s: s.save(V3), (V2, V3)),
    ("rollback", (V1, V2), lambda s: s.rollback(NAME), (V2, V1)),
]


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One prepared store per scenario, copied for each simulated crash (faster than saving)."""
    result = {}
    for name, before, _, _ in SCENARIOS:
        root = tmp_path_factory.mktemp("template") / "certs"
        store = FileStore(root)
        for cert in before:
            store.save(cert)
        result[name] = root
    return result


def check_after_crash(root: Path, outcomes: tuple[StoredCert | None, ...]) -> StoredCert | None:
    """The store shows one whole version, and accepts a new save on top of it."""
    store = FileStore(root)
    got = store.load(NAME)
    assert got in outcomes, f"mixed or unexpected version: {got!r}"
    store.save(make_cert("after", (ECDSA, RSA)))
    assert store.load(NAME) == make_cert("after", (ECDSA, RSA))
    assert store.load_previous(NAME) == got
    return got


@pytest.mark.parametrize(("scenario", "before", "action", "outcomes"), SCENARIOS)
def test_failure_at_every_step(
    tmp_path: Path,
    templates: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    scenario: str,
    before: tuple[StoredCert, ...],
    action: Action,
    outcomes: tuple[StoredCert | None, ...],
) -> None:
    monkeypatch.setattr(files_module, "os", FaultyOs())  # no fsync: hundreds of saves follow
    seen = set()
    for step in range(1000):
        root = tmp_path / f"s{step}"
        shutil.copytree(templates[scenario], root)
        faulty = FaultyOs(step)
        with monkeypatch.context() as m:
            m.setattr(files_module, "os", faulty)
            try:
                action(FileStore(root))
                finished = True
            except StoreError:
                finished = False
        seen.add(outcomes.index(check_after_crash(root, outcomes)))
        if finished:
            assert faulty.calls <= step
            break
    else:
        pytest.fail("the action never finished")
    assert seen == set(range(len(outcomes))), "both the old and the new version must occur"
    assert step > 10


# Calls that change what another process sees (fsync is skipped in tests, so a crash just
# before it looks the same as one just before the following replace).
CRASH_POINTS = frozenset({"open", "write", "replace", "rename", "unlink", "mkdir"})


def crash_in_child(root: Path, action: Action, step: int) -> int:
    """Run `action` in a forked child that os._exit()s at mutating call `step`."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            faulty = FaultyOs(step, ops=CRASH_POINTS, exit_code=99)
            files_module.os = faulty  # type: ignore[attr-defined,assignment]
            action(FileStore(root))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize(("scenario", "before", "action", "outcomes"), SCENARIOS)
def test_process_killed_at_every_step(
    tmp_path: Path,
    templates: dict[str, Path],
    scenario: str,
    before: tuple[StoredCert, ...],
    action: Action,
    monkeypatch: pytest.MonkeyPatch,
    outcomes: tuple[StoredCert | None, ...],
) -> None:
    monkeypatch.setattr(files_module, "os", FaultyOs())  # no fsync: hundreds of saves follow
    seen = set()
    for step in range(1000):
        root = tmp_path / f"s{step}"
        shutil.copytree(templates[scenario], root)
        code = crash_in_child(root, action, step)
        assert code in (0, 99)
        seen.add(outcomes.index(check_after_crash(root, outcomes)))
        if code == 0:
            break
    assert seen == set(range(len(outcomes)))
    assert step > 10


@pytest.mark.parametrize("slow", [False, True], ids=["page-cache", "thread-pool"])
def test_preread_reads_every_entry_in_either_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow: bool
) -> None:
    """sources._preread reads a large store in this thread while entries come from the page
    cache, and hands the rest to a thread pool once a chunk waits for the disk (a cold cache;
    forced here with a negative threshold). Either way every site gets its entry, its error or
    None."""
    from edged import sources
    from edged.config import Address, Site
    from edged.names import store_dirname

    monkeypatch.setattr(sources, "PREREAD_WAIT", -1.0 if slow else 1.0)
    store = FileStore(tmp_path / "store")
    names = [f"p{i}.example.test" for i in range(sources.PREREAD_CHUNK * 2 + 7)]
    for name in names[:-2]:
        store.save(
            StoredCert(
                name, (name,), (PemPair("ecdsa-p256", b"C" + name.encode(), b"K"),), "upload", 0.0
            )
        )
    broken = store.root / "live" / store_dirname(names[-3]) / "meta.json"
    broken.write_text("{not json")
    sites = [Site(i, (name,), Address("127.0.0.1", 9)) for i, name in enumerate(names)]
    found = sources._preread(store, sites)
    assert list(found) == names
    for name in names[:-3]:
        entry = found[name]
        assert isinstance(entry, StoredCert) and entry.pairs[0].fullchain == b"C" + name.encode()
    assert isinstance(found[names[-3]], StoreError)
    assert found[names[-2]] is None and found[names[-1]] is None
