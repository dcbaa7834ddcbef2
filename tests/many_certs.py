"""Write a file store and a config with many sites fast (tests and scripts/bench).

One real bundle is stored with FileStore (so the format is exactly the store's); every other
name gets a copy of its directory with meta.json naming it. No fsync: these are throwaway
trees. The certificate must cover every name (a wildcard does).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from edged.names import store_dirname
from edged.store.base import PemPair, StoredCert
from edged.store.files import META, FileStore
from tests.pki import Issued, fullchain, make_leaf


def write_many(
    store_dir: Path, names: Sequence[str], pairs: Sequence[PemPair], source: str = "upload"
) -> None:
    """live/<name>/ for each of `names`, all holding `pairs`."""
    template = names[0]
    FileStore(store_dir).save(StoredCert(template, (template,), tuple(pairs), source, time.time()))
    live = store_dir / "live"
    src = live / store_dirname(template)
    meta = json.loads((src / META).read_bytes())
    files = [(p.name, p.read_bytes()) for p in src.iterdir() if p.is_file() and p.name != META]
    for name in names[1:]:
        directory = live / store_dirname(name)
        directory.mkdir(mode=0o700)
        for filename, data in files:
            fd = os.open(directory / filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        meta["name"] = name
        meta["names"] = [name]
        (directory / META).write_bytes(json.dumps(meta).encode())


def store_dual(store_dir: Path, issuer: Issued, name: str) -> None:
    """An ECDSA P-256 and an RSA-2048 certificate for `name`, issued by `issuer`, stored as one
    entry (a dual certificate, as ACME with both key types leaves it)."""
    ec = make_leaf(issuer, [name])
    rsa = make_leaf(issuer, [name], key_type="rsa-2048")
    pairs = (
        PemPair("ecdsa-p256", fullchain(ec), ec.key_pem),
        PemPair("rsa-2048", fullchain(rsa), rsa.key_pem),
    )
    FileStore(store_dir).save(StoredCert(name, (name,), pairs, "upload", 0.0))


def many_sites_config(names: Sequence[str], backend: str) -> str:
    """One [[site]] per name, all to `backend`."""
    return "".join(f'[[site]]\nnames = ["{n}"]\nbackend = "{backend}"\n' for n in names)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
