"""Crash consistency of the file store: SIGKILL at random moments, and a full disk.

A writer subprocess (tests/crash_writer.py) saves bundles (ECDSA + RSA), rolls back, writes
renewal state and the ACME account in a loop and is killed with SIGKILL 0-20 ms after it
starts writing; a fresh FileStore must then read a whole version (old or new), never a half or
mixed one. A full disk (a 64 KiB tmpfs, and RLIMIT_FSIZE for EFBIG) must fail the write with a
StoreError that names the path, and leave the old bundle readable and no temp files behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.certs import parse_bundle
from edged.errors import StoreError
from edged.store import FileStore, StoredCert
from tests.crash_writer import DIRECTORY, NAME, account_key, load_versions
from tests.pki import Issued, fullchain, make_ca, make_intermediate, make_leaf

REPO = Path(__file__).resolve().parent.parent
KILLS = 200
MAX_DELAY = 0.020
LATE_DELAY = 0.300


def make_versions(path: Path, count: int = 4) -> list[StoredCert]:
    """`count` real bundles for NAME: ECDSA + RSA, except the last, which is ECDSA only (so a
    save also drops a key type)."""
    ca = make_ca("Crash Root")
    inter = make_intermediate(ca, "Crash Intermediate")
    versions = []
    for index in range(count):
        key_types = ["ecdsa-p256", "rsa-2048"] if index < count - 1 else ["ecdsa-p256"]
        pairs = []
        for key_type in key_types:
            leaf: Issued = make_leaf(inter, [NAME], key_type=key_type)
            pairs.append([key_type, fullchain(leaf, inter).decode(), leaf.key_pem.decode()])
        versions.append(pairs)
    path.write_text(json.dumps({"versions": versions}))
    return load_versions(path)


def digest(cert: StoredCert) -> tuple[tuple[str, str, str], ...]:
    return tuple(
        (
            p.key_type,
            hashlib.sha256(p.fullchain).hexdigest(),
            hashlib.sha256(p.privkey).hexdigest(),
        )
        for p in cert.pairs
    )


def writer(mode: str, *args: object) -> list[str]:
    return [sys.executable, "-m", "tests.crash_writer", mode, *(str(a) for a in args)]


def check_modes(root: Path) -> None:
    """Every directory of the store 0700, every file (temp files of a killed writer too) 0600."""
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            mode = stat.S_IMODE(os.lstat(os.path.join(dirpath, d)).st_mode)
            assert mode == 0o700, f"{dirpath}/{d} has mode {mode:o}"
        for f in filenames:
            st = os.lstat(os.path.join(dirpath, f))
            assert stat.S_ISREG(st.st_mode), f"{dirpath}/{f} is not a regular file"
            assert stat.S_IMODE(st.st_mode) == 0o600, f"{dirpath}/{f} has mode {st.st_mode:o}"


def check_whole(
    store: FileStore,
    known: dict[tuple[tuple[str, str, str], ...], StoredCert],
    fingerprints: dict[tuple[tuple[str, str, str], ...], list[str]],
    cert: StoredCert,
) -> None:
    """`cert` is exactly one of the versions written, and each of its pairs parses."""
    key = digest(cert)
    assert key in known, "a bundle that was never written (half or mixed) was read"
    assert cert == known[key]
    got = [parse_bundle(p.fullchain, p.privkey).fingerprint for p in cert.pairs]
    assert got == fingerprints[key]


def test_sigkill_while_writing_never_leaves_a_half_bundle(tmp_path: Path) -> None:
    versions = make_versions(tmp_path / "versions.json")
    known = {digest(v): v for v in versions}
    fingerprints = {
        digest(v): [parse_bundle(p.fullchain, p.privkey).fingerprint for p in v.pairs]
        for v in versions
    }
    account_keys = {account_key(i) for i in range(4)}
    root = tmp_path / "store"
    completed = tmp_path / "completed"
    rng = random.Random(1234)
    seen: set[tuple[tuple[str, str, str], ...]] = set()
    ever_loaded = False
    deadline = time.monotonic() + 30  # the file stays well under 40 s on a loaded machine
    kills = 0
    while kills < KILLS and time.monotonic() < deadline:
        proc = subprocess.Popen(
            writer("loop", root, tmp_path / "versions.json", rng.randrange(1 << 30)),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line == b"ready\n", line + proc.stderr.read() if proc.stderr else b""
            # Mostly within the first writes; every fifth kill later, so kills also land after
            # completed saves when fsync is slow on a loaded machine.
            time.sleep(rng.uniform(0, MAX_DELAY if kills % 5 else LATE_DELAY))
            if proc.poll() is not None:
                pytest.fail(f"writer died by itself: {proc.communicate()[1].decode()}")
            proc.send_signal(signal.SIGKILL)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        kills += 1

        store = FileStore(root)
        cert = store.load(NAME)
        if cert is None:
            # None only while no save ever returned; once one did, a version must stay.
            assert not completed.exists() and not ever_loaded
        else:
            ever_loaded = True
            check_whole(store, known, fingerprints, cert)
            seen.add(digest(cert))
        with contextlib.suppress(StoreError):  # a killed rewrite of previous/ is reported
            previous = store.load_previous(NAME)
            if previous is not None:
                check_whole(store, known, fingerprints, previous)
        state = store.load_state(NAME)  # never corrupt: raises StoreError if it were
        assert state is None or state["status"] == "active"
        account = store.load_account(DIRECTORY)
        if account is not None:
            registration, key_pem = account
            assert set(registration) == {"index", "step"} and key_pem in account_keys
        check_modes(root)

    print(f"{kills} kills, {len(seen)} distinct versions read back")
    assert kills >= 100, f"only {kills} kills within the time limit"
    assert ever_loaded and len(seen) >= 2, "the kills never landed after a completed save"
    # A clean write after all those kills tidies the leftovers of killed writes in live/.
    store = FileStore(root)
    store.save(versions[0])
    live = root / "live" / NAME
    assert not [p for p in live.rglob(".tmp-*")]
    check_whole(store, known, fingerprints, store.load(NAME) or versions[-1])
    check_modes(root)


# --- disk full ------------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (16 pages); skipped where mounting is not allowed."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({result.stderr.strip()}); "
            "test_efbig_keeps_old_bundle covers a failing write with RLIMIT_FSIZE"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def no_temp_files(root: Path) -> None:
    leftovers = [str(p) for p in root.rglob(".tmp-*")]
    assert leftovers == [], leftovers


def padded(cert: StoredCert, chain_pad: int = 0, key_pad: int = 0) -> StoredCert:
    """`cert` with a huge chain or key (the store does not parse what it stores)."""
    pair = cert.pairs[0]
    big = type(pair)(
        pair.key_type,
        pair.fullchain + b"\n" * chain_pad,
        pair.privkey + b"\n" * key_pad,
    )
    return StoredCert(cert.name, cert.names, (big,), cert.source, cert.stored_at + 1, {})


@pytest.mark.parametrize("where", ["chain", "key"])
def test_disk_full_keeps_old_bundle(tmp_path: Path, tiny_fs: Path, where: str) -> None:
    versions = make_versions(tmp_path / "versions.json", count=2)
    old = versions[1]  # ECDSA only: three small files
    store = FileStore(tiny_fs / "certs")
    store.save(old)
    # Too big for what is left: in "key" the chain fits and replaces live's fullchain.pem, so
    # the failure comes after a live file changed (meta.json still names the old digests).
    new = padded(
        versions[0], **({"chain_pad": 80_000} if where == "chain" else {"key_pad": 80_000})
    )
    with pytest.raises(StoreError) as info:
        store.save(new)
    message = str(info.value)
    assert str(tiny_fs / "certs" / "live" / NAME) in message
    assert "No space left on device" in message and "check free space" in message
    assert FileStore(tiny_fs / "certs").load(NAME) == old
    no_temp_files(tiny_fs)
    check_modes(tiny_fs / "certs")
    # Once space is back, the next save works and the old version becomes the previous one.
    smaller = padded(versions[0])
    store.save(smaller)
    assert store.load(NAME) == smaller
    assert store.load_previous(NAME) == old


def test_efbig_keeps_old_bundle(tmp_path: Path) -> None:
    """The same with RLIMIT_FSIZE (EFBIG), which needs no mount: any file over the limit fails."""
    versions = make_versions(tmp_path / "versions.json", count=2)
    root = tmp_path / "store"
    store = FileStore(root)
    store.save(versions[1])
    huge = padded(versions[0], chain_pad=200_000)
    versions_file = tmp_path / "big.json"
    pairs = [[p.key_type, p.fullchain.decode(), p.privkey.decode()] for p in huge.pairs]
    versions_file.write_text(json.dumps({"versions": [pairs]}))
    out = subprocess.run(
        writer("efbig", root, versions_file, 0, 100_000),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["error"] == "StoreError", result
    assert str(root / "live" / NAME / "fullchain.pem") in result["message"]
    assert "File too large" in result["message"] and "check free space" in result["message"]
    assert FileStore(root).load(NAME) == versions[1]
    no_temp_files(root)
    check_modes(root)
