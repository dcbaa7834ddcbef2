"""A store writer for tests/test_crash.py, run as a subprocess and killed with SIGKILL.

python -m tests.crash_writer loop ROOT VERSIONS.json SEED
    prints "ready" once imported, then writes to the FileStore at ROOT forever: saves of
    the versions in VERSIONS.json, rollbacks, renewal state and the ACME account. Creates
    ROOT/../completed after its first save returns (so the test knows a bundle exists).

python -m tests.crash_writer efbig ROOT VERSIONS.json INDEX LIMIT
    saves version INDEX with RLIMIT_FSIZE = LIMIT bytes (SIGXFSZ ignored, so a write past
    it fails with EFBIG, like a full disk) and prints the outcome as one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import random
import resource
import signal
import sys
from pathlib import Path

from edged.errors import StoreError
from edged.store import FileStore, PemPair, StoredCert

NAME = "crash.example.test"
DIRECTORY = "https://acme.example.test/dir"


def load_versions(path: Path) -> list[StoredCert]:
    raw = json.loads(path.read_text())
    return [
        StoredCert(
            NAME,
            (NAME,),
            tuple(PemPair(kt, chain.encode(), key.encode()) for kt, chain, key in version),
            "acme",
            1_700_000_000 + index,
            {"version": str(index)},
        )
        for index, version in enumerate(raw["versions"])
    ]


def account_key(index: int) -> bytes:
    body = f"account key {index} ".encode() * (20 + index * 7)
    return b"-----BEGIN PRIVATE KEY-----\n" + body + b"\n-----END PRIVATE KEY-----\n"


def loop(root: Path, versions_file: Path, seed: int) -> None:
    versions = load_versions(versions_file)
    rng = random.Random(seed)
    store = FileStore(root)
    completed = root.parent / "completed"
    print("ready", flush=True)
    step = 0
    while True:
        step += 1
        op = rng.random()
        if op < 0.5:
            store.save(versions[rng.randrange(len(versions))])
            if not completed.exists():
                completed.touch()
        elif op < 0.7:
            # StoreError: no usable previous version (yet, or a crash left it half written).
            with contextlib.suppress(StoreError):
                store.rollback(NAME)
        elif op < 0.85:
            pad = "x" * rng.randrange(8000)
            store.save_state(NAME, {"status": "active", "attempts": step, "pad": pad})
        else:
            index = rng.randrange(4)
            store.save_account(DIRECTORY, {"index": index, "step": step}, account_key(index))


def efbig(root: Path, versions_file: Path, index: int, limit: int) -> None:
    versions = load_versions(versions_file)
    store = FileStore(root)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        store.save(versions[index])
    except StoreError as exc:
        print(json.dumps({"error": "StoreError", "message": str(exc)}))
    except Exception as exc:  # reported to the test, which fails on it
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    else:
        print(json.dumps({"error": None, "message": ""}))


def main(argv: list[str]) -> None:
    mode, root, versions_file, *rest = argv
    if mode == "loop":
        loop(Path(root), Path(versions_file), int(rest[0]))
    elif mode == "efbig":
        efbig(Path(root), Path(versions_file), int(rest[0]), int(rest[1]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
