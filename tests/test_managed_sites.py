"""Which sites ACME manages is decided from what the daemon's own load of the store read:
configuring the renewer (every full reload, a fleet's resync every 60 s) reads no store entry
again (edged.renewer.managed_sites), and still leaves out exactly the uploads, cert_file and
passthrough sites it left out when it read each entry itself."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from edged.daemon import Daemon
from edged.errors import StoreError
from edged.renewer import managed_sites
from edged.store.base import StoredCert
from edged.store.files import FileStore
from tests.conftest import free_port, run_backend, run_edged
from tests.pki import fullchain, make_ca, make_leaf
from tests.test_reload import count_reads, lazy_store, stored_leaf


def acme_head() -> str:
    # Nothing answers there: orders fail and are retried later, which is all this needs.
    return f'[acme]\ndirectory = "https://127.0.0.1:{free_port()}/dir"\nemail = "ops@m.test"\n'


def site(name: str, backend: str, extra: str = "") -> str:
    return f'[[site]]\nnames = ["{name}"]\nbackend = "{backend}"\n{extra}'


async def configured(daemon: Daemon, limit: float = 10) -> None:
    """Until the renewal loop has taken the config (its first configure is done)."""
    deadline = asyncio.get_running_loop().time() + limit
    while not daemon.renewer.states:
        assert asyncio.get_running_loop().time() < deadline, "renewer never configured"
        await asyncio.sleep(0.02)


async def test_a_full_reload_configures_the_renewer_without_reading_the_store_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ACME entry, an upload, an unreadable entry, no entry, a cert_file site and a
    passthrough site: the same sites are managed as when each entry was read for it, and a
    full reload of unchanged entries reads only those its load reads again (the unreadable
    and the missing one), not one per site (before: all four store sites read again by
    managed_sites). An upload handed back to ACME is managed from its reload, also when a
    names reload read it first (the full reload then does not read it)."""
    ca = make_ca("Managed CA")
    store = FileStore(tmp_path / "store")
    store.save(replace(stored_leaf("acme.test", "acme", ca), source="acme"))
    store.save(stored_leaf("up.test", "upload", ca))
    store.save(replace(stored_leaf("bad.test", "bad", ca), source="acme"))
    (tmp_path / "store" / "live" / "bad.test" / "meta.json").write_text("{not json")
    with pytest.raises(StoreError):
        store.load("bad.test")
    own = make_leaf(ca, ["file.test"])
    (tmp_path / "file.pem").write_bytes(fullchain(own))
    (tmp_path / "file.key").write_bytes(own.key_pem)
    async with run_backend() as backend:
        b = backend.address
        body = (
            acme_head()
            + site("acme.test", b)
            + site("up.test", b)
            + site("bad.test", b)
            + site("none.test", b)
            + site("file.test", b, 'cert_file = "file.pem"\nkey_file = "file.key"\n')
            + site("pass.test", b, 'mode = "passthrough"\n')
        )
        async with run_edged(tmp_path, body, edged_extra="watch = false") as edged:
            daemon = edged.daemon
            await configured(daemon)
            assert daemon.config is not None
            expected = {s.name for s in managed_sites(daemon.config, store)}
            assert expected == {"acme.test", "bad.test", "none.test"}
            assert set(daemon.renewer.states) == expected

            reads = count_reads(monkeypatch)
            assert await daemon.reload("signal") is False  # bad.test: still an error
            assert set(reads) <= {"bad.test", "none.test"}, reads
            assert set(daemon.renewer.states) == expected

            # Handed back to ACME (what `edged upload --remove` stores), then a full reload.
            store.save(replace(stored_leaf("up.test", "upload", ca), source="acme"))
            reads.clear()
            await daemon.reload("signal")
            assert "up.test" in reads and "acme.test" not in reads
            assert "up.test" in daemon.renewer.states

            # Uploaded again, read by a names reload (a renewal's or another node's write):
            # the full reload after it finds the entry unchanged, reads nothing of it, and
            # knows from the names reload's read that it is an upload.
            store.save(stored_leaf("up.test", "upload", ca))
            assert await daemon.reload("store", {"up.test"})
            reads.clear()
            await daemon.reload("signal")
            assert "up.test" not in reads, reads
            assert "up.test" not in daemon.renewer.states
            assert set(daemon.renewer.states) == expected


async def test_a_background_fill_reads_each_entry_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store indexed in the background (lazy start): the renewal loop starts once it is
    read, from what the fill read, without reading each entry a second time (before: two
    reads per entry)."""
    names = ["a.lazy.test", "b.lazy.test", "up.lazy.test"]
    ca, store = lazy_store(tmp_path, monkeypatch, names, "lazy")
    for name in names[:2]:
        store.save(replace(stored_leaf(name, "lazy", ca), source="acme"))
    reads = count_reads(monkeypatch)
    async with run_backend() as backend:
        body = acme_head() + "".join(site(n, backend.address) for n in names)
        async with run_edged(tmp_path, body, edged_extra="watch = false") as edged:
            await configured(edged.daemon)
            assert set(edged.daemon.renewer.states) == set(names[:2])
            assert sorted(reads) == sorted(names), reads


def test_managed_sites_reads_only_the_entries_not_read_before(tmp_path: Path) -> None:
    """Given what a load found (`uploads`), managed_sites reads no entry, but those the load
    has not read yet (`unread`: a background fill cut short), as it reads every entry for a
    caller that loaded nothing (`edged issue`)."""
    from edged.config import parse_config

    ca = make_ca("Unread CA")
    store = FileStore(tmp_path / "store")
    store.save(stored_leaf("up.test", "upload", ca))
    config = parse_config(
        acme_head() + site("up.test", "127.0.0.1:9") + site("new.test", "127.0.0.1:9"),
        tmp_path / "edged.toml",
    )

    class Counting(FileStore):
        def __init__(self, root: Path) -> None:
            super().__init__(root)
            self.reads: list[str] = []

        def load(self, name: str) -> StoredCert | None:
            self.reads.append(name)
            return super().load(name)

    counting = Counting(tmp_path / "store")
    names = [s.name for s in managed_sites(config, counting)]
    assert names == ["new.test"] and sorted(counting.reads) == ["new.test", "up.test"]
    counting.reads.clear()
    assert [s.name for s in managed_sites(config, counting, {"up.test"})] == ["new.test"]
    assert counting.reads == []
    # What the caller read is trusted; a name it has not read is read here.
    assert [s.name for s in managed_sites(config, counting, set(), {"up.test"})] == ["new.test"]
    assert counting.reads == ["up.test"]
