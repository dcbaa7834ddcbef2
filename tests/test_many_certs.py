"""100,000 names: the index loads from the store without building a context per name, a cold
name is served, and replacing one certificate reloads only that site.

A few certificates are reused under many names to keep the test fast: 10,000 sites of 10 names
each, one wildcard certificate stored under each site (10,000 store directories). The timing
targets (100k distinct certificates: first handshake within 5 s, < 500 MiB) are measured by
scripts/bench, not asserted here.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from edged.store.base import PemPair, StoredCert
from edged.store.files import FileStore
from tests.conftest import peer_cn, run_backend, run_edged, s_client
from tests.many_certs import write_many
from tests.pki import fullchain, make_ca, make_intermediate, make_leaf

SITES = 10_000
NAMES_PER_SITE = 10


def site_names(i: int) -> list[str]:
    return [f"s{i}-{j}.many.test" for j in range(NAMES_PER_SITE)]


async def test_100k_names_index_and_one_swap(tmp_path: Path) -> None:
    ca = make_ca("Many CA")
    inter = make_intermediate(ca, "Many Intermediate")
    leaf = make_leaf(inter, ["*.many.test"], cn="wildcard-v1")
    pair = PemPair("ecdsa-p256", fullchain(leaf, inter), leaf.key_pem)
    firsts = [site_names(i)[0] for i in range(SITES)]
    await asyncio.to_thread(write_many, tmp_path / "store", firsts, [pair])
    async with run_backend() as backend:
        sites = "".join(
            f"[[site]]\nnames = {site_names(i)!r}\nbackend = {backend.address!r}\n".replace(
                "'", '"'
            )
            for i in range(SITES)
        )
        async with run_edged(tmp_path, sites) as e:
            assert len(e.daemon.index) == SITES * NAMES_PER_SITE
            selector = e.daemon.selector
            assert selector is not None
            assert len(selector.cache) == 0  # no context was built for any name at startup
            rng = random.Random(11)
            cold = f"s{rng.randrange(SITES)}-{rng.randrange(NAMES_PER_SITE)}.many.test"
            result = await s_client(e.port, cold)
            assert peer_cn(result.stderr) == "wildcard-v1", result.stderr
            assert len(selector.cache) == 1  # built for that handshake alone

            # Replace the certificate of one site among 10,000: only that site is read again.
            target = rng.randrange(SITES)
            new_leaf = make_leaf(inter, ["*.many.test"], cn="wildcard-v2")
            new_pair = PemPair("ecdsa-p256", fullchain(new_leaf, inter), new_leaf.key_pem)
            stored = StoredCert(
                firsts[target], (firsts[target],), (new_pair,), "upload", time.time()
            )
            await asyncio.to_thread(FileStore(tmp_path / "store").save, stored)
            name = site_names(target)[3]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                result = await s_client(e.port, name)
                if peer_cn(result.stderr) == "wildcard-v2":
                    break
                await asyncio.sleep(0.05)
            assert peer_cn(result.stderr) == "wildcard-v2", result.stderr
            # The store reload of that one site follows the watcher's debounce. When the
            # background indexing had not reached the site yet, its first handshake read the
            # new certificate itself, before that reload: wait for it.
            reloads = e.daemon.counters.reloads
            for _ in range(200):
                if reloads["store", "ok"] >= 1:
                    break
                await asyncio.sleep(0.05)
            assert reloads["store", "ok"] >= 1 and reloads["file", "ok"] == 0, reloads
            # The other sites still serve the first certificate.
            other = site_names((target + 1) % SITES)[0]
            assert peer_cn((await s_client(e.port, other)).stderr) == "wildcard-v1"


async def test_store_entry_openssl_refuses_is_reported_once_and_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Store entries are loaded light (the key is not parsed at load): one whose key does not
    match its certificate is found when its context is built, reported once naming the site,
    and its handshakes are refused; the other sites are unaffected."""
    ca = make_ca("Light CA")
    good, other = make_leaf(ca, ["good.light.test"]), make_leaf(ca, ["bad.light.test"])
    stranger = make_leaf(ca, ["bad.light.test"])
    store = FileStore(tmp_path / "store")
    for leaf, key in ((good, good.key_pem), (other, stranger.key_pem)):
        name = leaf.cert.subject.rfc4514_string().removeprefix("CN=")
        pair = PemPair("ecdsa-p256", leaf.cert_pem, key)
        await asyncio.to_thread(
            store.save, StoredCert(name, (name,), (pair,), "upload", time.time())
        )
    async with run_backend() as backend:
        sites = "".join(
            f'[[site]]\nnames = ["{n}"]\nbackend = "{backend.address}"\n'
            for n in ("good.light.test", "bad.light.test")
        )
        async with run_edged(tmp_path, sites) as e:
            for _ in range(3):
                refused = await s_client(e.port, "bad.light.test")
                assert "internal error" in refused.stderr, refused.stderr
            served = await s_client(e.port, "good.light.test")
            assert peer_cn(served.stderr) == "good.light.test", served.stderr
            assert e.daemon.counters.handshakes["internal_error", "none"] == 3
    reports = [r for r in caplog.records if "cannot be served" in r.getMessage()]
    assert len(reports) == 1, [r.getMessage() for r in reports]
    assert "bad.light.test" in reports[0].getMessage()
    assert "Traceback" not in caplog.text
