"""The Redis store against a real redis-server: bundles, rollback, state, accounts, shared
HTTP-01 tokens, leases, prefixes, pub/sub, and the local copy when Redis is down."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from edged.certs import parse_bundle
from edged.errors import StoreError
from edged.store.base import PemPair, StoredCert
from edged.store.files import FileStore
from edged.store.redis import RedisStore
from tests.pki import make_ca, make_leaf
from tests.redis_server import RedisServer


def bundle(name: str, cn: str) -> StoredCert:
    ca = make_ca()
    leaf = make_leaf(ca, [name, f"www.{name}"], cn=cn)
    return StoredCert(
        name=name,
        names=(name, f"www.{name}"),
        pairs=(PemPair("ecdsa-p256", leaf.cert_pem, leaf.key_pem),),
        source="acme",
        stored_at=time.time(),
        extra={"node": "n1"},
    )


def store(
    redis_server: RedisServer, tmp_path: Path, node: str = "a", prefix: str = "edged"
) -> RedisStore:
    return RedisStore(redis_server.url, FileStore(tmp_path / f"local-{node}"), prefix=prefix)


def test_bundle_previous_rollback_and_local_copy(redis_server: RedisServer, tmp_path: Path) -> None:
    a, b = store(redis_server, tmp_path, "a"), store(redis_server, tmp_path, "b")
    first, second = bundle("shop.test", "v1"), bundle("shop.test", "v2")
    a.save(first)
    a.save(second)
    seen = b.load("shop.test")  # another node sees it, and mirrors it locally
    assert seen == second
    assert b.local.load("shop.test") == second
    assert b.load_previous("shop.test") == first
    assert b.names() == ["shop.test"]
    assert b.rollback("shop.test") == first
    assert a.load("shop.test") == first
    pair = first.pairs[0]
    parse_bundle(pair.fullchain, pair.privkey)  # PEM bytes survive the round trip intact
    key_file = b.local.root / "live" / "shop.test" / "privkey.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    b.delete("shop.test")
    assert a.load("shop.test") is None and a.names() == []


def test_state_accounts_and_prefix_isolation(redis_server: RedisServer, tmp_path: Path) -> None:
    a = store(redis_server, tmp_path, "a")
    other_fleet = store(redis_server, tmp_path, "x", prefix="fleet2")
    a.save_state("shop.test", {"status": "active", "attempts": 0})
    assert store(redis_server, tmp_path, "b").load_state("shop.test") == {
        "status": "active",
        "attempts": 0,
    }
    assert other_fleet.load_state("shop.test") is None
    a.save_account("https://ca.test/dir", {"uri": "https://ca.test/acct/1"}, b"KEY1")
    # NX: a second registration racing the first does not replace the fleet's account.
    store(redis_server, tmp_path, "b").save_account(
        "https://ca.test/dir", {"uri": "acct/2"}, b"KEY2"
    )
    assert a.load_account("https://ca.test/dir") == ({"uri": "https://ca.test/acct/1"}, b"KEY1")
    assert other_fleet.load_account("https://ca.test/dir") is None


def test_shared_tokens_expire(redis_server: RedisServer, tmp_path: Path) -> None:
    a, b = store(redis_server, tmp_path, "a"), store(redis_server, tmp_path, "b")
    a.put_token("tok_1", "tok_1.thumb", ["shop.test"], ttl=0.3)
    assert b.get_token("tok_1") == ("tok_1.thumb", ["shop.test"])
    time.sleep(0.5)
    assert b.get_token("tok_1") is None
    a.put_token("tok_2", "x", ["shop.test"], ttl=30)
    a.delete_token("tok_2")
    assert b.get_token("tok_2") is None


def test_lease_one_owner_expiry_and_compare_and_delete(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    a, b = store(redis_server, tmp_path, "a"), store(redis_server, tmp_path, "b")
    owner = a.acquire_lease("shop.test", ttl=0.5, node="node-a")
    assert owner is not None and owner.startswith("node-a/")
    assert b.acquire_lease("shop.test", ttl=0.5, node="node-b") is None
    assert b.lease_holder("shop.test") == owner
    assert not b.release_lease("shop.test", "node-b/forged")  # only the owner releases
    assert a.extend_lease("shop.test", owner, ttl=0.5)
    time.sleep(0.7)  # the owner "died": the lease expires, another node takes over
    taken = b.acquire_lease("shop.test", ttl=5, node="node-b")
    assert taken is not None
    assert not a.extend_lease("shop.test", owner, ttl=5)  # the old owner cannot extend it
    assert b.release_lease("shop.test", taken)
    assert a.lease_holder("shop.test") is None


def test_changes_are_published(redis_server: RedisServer, tmp_path: Path) -> None:
    a = store(redis_server, tmp_path, "a")
    listener = redis.Redis.from_url(redis_server.url).pubsub()
    listener.subscribe(a.channel)
    assert listener.get_message(timeout=1) is not None  # subscribe confirmation
    a.save(bundle("shop.test", "v1"))
    message = listener.get_message(timeout=2)
    assert message is not None and message["data"] == b"shop.test"
    listener.close()


def test_redis_down_serves_local_copy_and_reports(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    a = store(redis_server, tmp_path, "a")
    cert = bundle("shop.test", "v1")
    a.save(cert)
    a.save_state("shop.test", {"status": "active"})
    redis_server.stop()
    # A node (also one restarted now) keeps what it serves from its local copy.
    restarted = store(redis_server, tmp_path, "a")
    assert restarted.load("shop.test") == cert
    assert restarted.names() == ["shop.test"]
    assert restarted.load_state("shop.test") == {"status": "active"}
    assert not restarted.available
    with pytest.raises(StoreError) as info:
        restarted.save(bundle("shop.test", "v2"))
    assert "unavailable" in str(info.value) and "local copy" in str(info.value)
    assert restarted.load("shop.test") == cert  # the failed write changed nothing


def test_names_never_become_keys_unvalidated(redis_server: RedisServer, tmp_path: Path) -> None:
    a = store(redis_server, tmp_path, "a")
    for bad in ("../x", "a/b", "", "a\x00b", "*"):
        with pytest.raises(StoreError):
            a.load(bad)
        with pytest.raises(StoreError):
            a.save_state(bad, {})


def test_lease_under_contention_has_one_holder_at_a_time(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """16 threads (each its own client, like nodes) grab, hold and release one lease for 1.5 s:
    never two holders at once, and the lease changes hands many times."""
    inside = 0
    worst = 0
    grants = 0
    lock = threading.Lock()
    deadline = time.monotonic() + 1.5

    def node(i: int) -> None:
        nonlocal inside, worst, grants
        s = store(redis_server, tmp_path, f"n{i}")
        while time.monotonic() < deadline:
            owner = s.acquire_lease("shop.test", ttl=5, node=f"n{i}")
            if owner is None:
                continue
            with lock:
                inside += 1
                worst = max(worst, inside)
                grants += 1
            time.sleep(0.002)
            with lock:
                inside -= 1
            assert s.release_lease("shop.test", owner)
        s.close()

    threads = [threading.Thread(target=node, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert worst == 1
    assert grants > 20
