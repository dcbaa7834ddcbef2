"""The Redis store against a real redis-server: bundles, rollback, state, accounts, shared
HTTP-01 tokens, leases, prefixes, pub/sub, the local copy when Redis is down, local copies put
back when Redis lost its data, and TLS (rediss://) with client certificates."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from edged.certs import parse_bundle
from edged.errors import StoreError
from edged.fleet import follow_changes
from edged.store.base import PemPair, StoredCert
from edged.store.files import FileStore
from edged.store.redis import RedisStore, RedisTls, Stale, _encode
from tests.pki import make_ca, make_leaf
from tests.redis_server import RedisServer, RedisTlsFiles


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


async def wait_until(predicate: Callable[[], bool], limit: float = 15) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


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
    rolled = b.rollback("shop.test")
    # The version before, live again from now on (stored_at: newer than the copies of the
    # version rolled away from, so restoring local copies never undoes a rollback).
    assert rolled == replace(first, stored_at=rolled.stored_at)
    assert rolled.stored_at > second.stored_at
    assert a.load("shop.test") == rolled
    assert a.load_previous("shop.test") == second
    pair = first.pairs[0]
    parse_bundle(pair.fullchain, pair.privkey)  # PEM bytes survive the round trip intact
    key_file = b.local.root / "live" / "shop.test" / "privkey.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    b.delete("shop.test")
    assert a.load("shop.test") is None and a.names() == []


def test_save_unless_upload_keeps_another_nodes_upload(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The renewal loop's write: checked for an upload in the script that writes. Anything
    else is replaced like save() does (indexed and published); another node's upload stays
    (returned, nothing written); a value that is not JSON is no upload; an upload Redis lost
    (or holds unreadable) that this node's copy holds stays, unless it was deleted since."""
    a, b = store(redis_server, tmp_path, "a"), store(redis_server, tmp_path, "b")
    v1, v2 = bundle("shop.test", "v1"), bundle("shop.test", "v2")
    a.save(v1)
    cursor = a.changes_since(None).cursor
    assert a.save_unless_upload(v2) is None
    assert b.load("shop.test") == v2 and b.load_previous("shop.test") == v1
    changes = a.changes_since(cursor)
    assert changes.certs == ("shop.test",)

    upload = replace(bundle("shop.test", "up"), source="upload")
    b.save(upload)
    cursor = a.changes_since(changes.cursor).cursor
    assert a.save_unless_upload(bundle("shop.test", "v3")) == upload
    assert b.load("shop.test") == upload and b.load_previous("shop.test") == v2
    assert a.local.load("shop.test") == upload
    assert a.changes_since(cursor).certs == ()

    redis_server.client().set("edged:cert:shop.test", b"{not json")
    v4 = bundle("shop.test", "v4")
    # Node a serves its copy meanwhile (see load): the upload, which stays; a node without
    # one repairs the value.
    assert a.save_unless_upload(v4) == upload
    c = store(redis_server, tmp_path, "c")
    assert c.save_unless_upload(v4) is None
    assert b.load("shop.test") == v4

    a.save(upload)
    redis_server.client().flushall()  # Redis lost it; node a's copy is the upload
    assert a.save_unless_upload(bundle("shop.test", "v5")) == upload
    assert redis_server.client().get("edged:cert:shop.test") is None
    b.delete("shop.test")  # deleted since: the upload is gone, the order's result is written
    v6 = bundle("shop.test", "v6")
    assert a.save_unless_upload(v6) is None
    assert b.load("shop.test") == v6


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


# --- Redis comes back without its data: local copies go back -----------------------------------

ACME_DIR = "https://ca.test/dir"


def test_flushed_redis_gets_local_copies_back_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """After FLUSHALL every node finds the same things missing; the first restore writes them,
    the others write nothing (checked inside Redis), and the account is the fleet's own."""
    a, b = store(redis_server, tmp_path, "a"), store(redis_server, tmp_path, "b")
    before, cert = bundle("shop.test", "v0"), bundle("shop.test", "v1")
    a.save(before)
    assert b.load("shop.test") == before  # b follows: its copy gets v0, then v1 over it
    a.save(cert)
    a.save_account(ACME_DIR, {"uri": "https://ca.test/acct/1"}, b"KEY1")
    assert b.load("shop.test") == cert and b.load_account(ACME_DIR) is not None  # mirrored
    assert not a.stale_in_redis() and not b.stale_in_redis()  # nothing to do: no writes
    redis_server.client().flushall()

    plan_a, plan_b = a.stale_in_redis(), b.stale_in_redis()
    assert plan_a.names == plan_b.names == ("shop.test",)
    assert plan_a.reasons == {"shop.test": "missing"}
    assert plan_a.accounts == plan_b.accounts == ("ca.test",)
    listener = redis_server.client().pubsub()
    listener.subscribe(a.channel)
    assert listener.get_message(timeout=1) is not None  # subscribe confirmation
    done_b = b.restore(plan_b)
    done_a = a.restore(plan_a)  # lost the race: Redis has it again
    assert done_b.names == ("shop.test",) and done_b.accounts == ("ca.test",)
    assert not done_a
    message = listener.get_message(timeout=2)  # the restore told the fleet
    assert message is not None and message["data"] == b"shop.test"
    listener.close()
    fresh = store(redis_server, tmp_path, "fresh")  # a node with an empty local copy
    assert fresh.load("shop.test") == cert
    assert fresh.load_previous("shop.test") == before  # b's copy had it: rollback works again
    assert fresh.names() == ["shop.test"]
    assert fresh.load_account(ACME_DIR) == ({"uri": "https://ca.test/acct/1"}, b"KEY1")
    assert (fresh.local.root / "accounts" / "ca.test" / "key.pem").stat().st_mode & 0o777 == 0o600


def test_restore_replaces_only_older_and_never_undoes_delete_or_rollback(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    a, b = store(redis_server, tmp_path, "a"), store(redis_server, tmp_path, "b")
    # v1 from a day ago: "older" means older by more than OLDER_MARGIN (clock skew).
    v1 = replace(bundle("shop.test", "v1"), stored_at=time.time() - 86400)
    v2 = bundle("shop.test", "v2")
    a.save(v1)
    assert b.load("shop.test") == v1  # b's copy: v1
    a.save(v2)  # a's copy: v2
    # Redis restored from an old dump: it holds v1 again.
    raw = redis_server.client()
    raw.set(a.key("cert", "shop.test"), _encode(v1))
    assert b.stale_in_redis().names == ()  # b's copy is no newer than Redis
    assert a.load("shop.test") == v2  # a read does not replace the newer local copy
    plan = a.stale_in_redis()
    assert plan.reasons == {"shop.test": "older"}
    assert a.restore(plan).names == ("shop.test",)
    assert b.load("shop.test") == v2 and b.load_previous("shop.test") == v1

    # A rollback makes v1 live "now": a's newer copy of v2 does not undo it.
    rolled = b.rollback("shop.test")
    assert a.stale_in_redis().names == ()
    assert a.restore(Stale(("shop.test",))).names == ()  # even when told to: checked in Redis
    assert b.load("shop.test") == rolled

    # A deleted certificate stays deleted, although a's copy still has it.
    a_copy = a.local.load("shop.test")
    b.delete("shop.test")
    assert a.local.load("shop.test") == a_copy
    assert a.stale_in_redis().names == ()
    assert a.restore(Stale(("shop.test",))).names == ()
    assert a.load("shop.test") is None and b.load("shop.test") is None
    # ...until a newer one is stored.
    v3 = bundle("shop.test", "v3")
    a.save(v3)
    assert b.load("shop.test") == v3

    # Two saves seconds apart on nodes whose clocks disagree by 30 s: the later save, in
    # Redis, wins although its stored_at is earlier (within OLDER_MARGIN).
    skewed = replace(bundle("shop.test", "v4"), stored_at=v3.stored_at - 30)
    b.save(skewed)
    assert a.stale_in_redis().names == ()
    assert a.load("shop.test") == skewed == a.local.load("shop.test")


def test_read_before_the_resync_uses_the_local_copy(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Between a flush and the next resync a node reads (a restart, an order needing the
    account): it gets its local copy, not None (which would serve nothing, order anew or
    register a new account). Certificates go back with restore() (jittered), the account at
    once (SET NX)."""
    a, b = store(redis_server, tmp_path, "a"), store(redis_server, tmp_path, "b")
    cert = bundle("shop.test", "v1")
    a.save(cert)
    a.save_account(ACME_DIR, {"uri": "https://ca.test/acct/1"}, b"KEY1")
    redis_server.client().flushall()
    assert b.load("shop.test") is None  # b never had it
    assert a.load("shop.test") == cert
    assert not redis_server.client().exists(a.key("cert", "shop.test"))  # reading wrote nothing
    assert a.load_account(ACME_DIR) == ({"uri": "https://ca.test/acct/1"}, b"KEY1")
    assert b.load_account(ACME_DIR) == ({"uri": "https://ca.test/acct/1"}, b"KEY1")
    # A registration that lost the SET NX race leaves the fleet's account in the local copy.
    b.save_account(ACME_DIR, {"uri": "https://ca.test/acct/2"}, b"KEY2")
    assert b.local.load_account(ACME_DIR) == ({"uri": "https://ca.test/acct/1"}, b"KEY1")
    assert a.restore(a.stale_in_redis()).names == ("shop.test",)
    assert b.load("shop.test") == cert


# --- TLS (rediss://) ------------------------------------------------------------------------------


def tls_store(server: RedisServer, tmp_path: Path, tls: RedisTls, node: str = "t") -> RedisStore:
    return RedisStore(server.url, FileStore(tmp_path / f"local-{node}"), tls=tls)


async def test_tls_store_with_client_certificate_and_pubsub(
    redis_tls_server: RedisServer, tmp_path: Path
) -> None:
    files = redis_tls_server.tls
    assert files is not None and redis_tls_server.url.startswith("rediss://")
    tls = RedisTls(files.ca, files.client_cert, files.client_key)
    a, b = (
        tls_store(redis_tls_server, tmp_path, tls, "a"),
        tls_store(redis_tls_server, tmp_path, tls, "b"),
    )
    cert = bundle("shop.test", "v1")
    a.save(cert)
    assert b.load("shop.test") == cert and b.available
    owner = a.acquire_lease("shop.test", ttl=5, node="a")
    assert owner is not None and b.lease_holder("shop.test") == owner
    # The pub/sub follower connects with the same TLS settings (asyncio client).
    heard: list[str] = []
    stop = asyncio.Event()
    follower = asyncio.create_task(
        follow_changes(b, heard.append, stop, resync_every=60, restore_spread=0)
    )
    before = connections_to(redis_tls_server.port)
    try:
        await wait_until(lambda: "resync" in heard)
        assert connections_to(redis_tls_server.port) == before + 1  # the subscription
        await asyncio.to_thread(a.save, bundle("shop.test", "v2"))
        await wait_until(lambda: "store" in heard)
    finally:
        stop.set()
        await asyncio.wait_for(follower, 10)
    # Closed when the follower returns, its TLS shutdown included: a close still running when
    # the event loop closes (edged's exit) made uvloop fail it (EBUSY, a transport left open).
    assert connections_to(redis_tls_server.port) == before


def connections_to(port: int) -> int:
    """This process's established TCP connections to `port` on this host (/proc)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def test_tls_wrong_ca_or_no_client_certificate_is_named(
    redis_tls_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = redis_tls_server.tls
    assert files is not None
    other = RedisTlsFiles.create(tmp_path / "other", "Some Other CA")
    wrong_ca = tls_store(
        redis_tls_server, tmp_path, RedisTls(other.ca, files.client_cert, files.client_key)
    )
    where = f"rediss://localhost:{redis_tls_server.port}"
    with pytest.raises(StoreError) as info:
        wrong_ca.save(bundle("shop.test", "v1"))
    message = str(info.value)
    assert where in message and str(other.ca) in message, message
    assert "TLS certificate verification failed" in message and "redis_ca_file" in message
    assert str(other.ca) in caplog.text  # logged once, naming the file to fix
    assert not wrong_ca.available
    # Reads fall back to the local copy, as in any outage.
    assert wrong_ca.load("shop.test") is None

    no_client_cert = tls_store(redis_tls_server, tmp_path, RedisTls(files.ca), "n")
    with pytest.raises(StoreError) as info:
        no_client_cert.load_previous("shop.test")
    assert where in str(info.value) and "redis_cert_file" in str(info.value)

    # The right CA, but the URL names a host the certificate does not ("localhost" only).
    by_ip = RedisStore(
        redis_tls_server.url.replace("localhost", "127.0.0.1"),
        FileStore(tmp_path / "local-ip"),
        tls=RedisTls(files.ca, files.client_cert, files.client_key),
    )
    with pytest.raises(StoreError) as info:
        by_ip.load_previous("shop.test")
    assert f"rediss://127.0.0.1:{redis_tls_server.port}" in str(info.value)
    assert "does not name 127.0.0.1: use a host name it has in edged.store" in str(info.value)


def test_corrupt_values_are_store_errors_that_name_the_key(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Whatever a key holds (garbage, the wrong JSON, arrays nested deeper than json can
    decode: RecursionError), reading it raises a StoreError naming it, never anything else; a
    corrupt certificate is read from the node's local copy when it has one."""
    s = store(redis_server, tmp_path, "a", prefix="corrupt")
    raw = redis.Redis.from_url(redis_server.url)
    saved = bundle("shop.test", "cn")
    s.save(saved)
    bare = store(redis_server, tmp_path, "bare", prefix="corrupt")
    s.save_account("https://ca.test/dir", {"uri": "acct"}, b"KEY")
    account_key = next(k for k in raw.keys("corrupt:account:*"))
    for value in (b"[" * 100_000, b"not json", b"[1, 2]", b'{"name": 1}'):
        raw.set("corrupt:cert:shop.test", value)
        raw.set("corrupt:state:shop.test", value)
        raw.set(account_key, value)
        raw.set("corrupt:token:tok_1", value)
        assert s.load("shop.test") == saved  # the last good version: this node's copy
        with pytest.raises(StoreError, match=r"'shop\.test' in Redis"):
            bare.load("shop.test")  # a node without one
        if not value.startswith(b"{"):  # an object is a state (its fields are checked later)
            with pytest.raises(StoreError, match=r"renewal state of 'shop\.test'"):
                s.load_state("shop.test")
        with pytest.raises(StoreError, match="ACME account"):
            s.load_account("https://ca.test/dir")
        with pytest.raises(StoreError, match="challenge token 'tok_1'"):
            s.get_token("tok_1")


def test_load_many_matches_load_and_batches(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store read of a full reload, in batches: each name gives what load() gives (present,
    absent, lost by Redis but in the local copy, corrupt with and without a local copy, an
    invalid name), in one MGET per CERTS_BATCH names and no GET for the names Redis has; with
    Redis gone, the local copies answer, as load()'s do."""
    monkeypatch.setattr("edged.store.redis.CERTS_BATCH", 4)
    a, b = store(redis_server, tmp_path, "a"), store(redis_server, tmp_path, "b")
    present = [f"n{i}.test" for i in range(6)]
    one = bundle("n0.test", "v1")
    for name in present:
        b.save(replace(one, name=name, names=(name,)))
    a.load("n1.test")  # a's local copy, then Redis loses it
    a.load("n2.test")  # a's local copy, then Redis's value is corrupted
    client = redis_server.client()
    client.delete("edged:cert:n1.test")
    client.set("edged:cert:n2.test", b"{not json")
    client.set("edged:cert:corrupt.test", b"{not json")
    asked = [*present, "absent.test", "corrupt.test", "bad name!"]
    before = client.info("commandstats")
    found = a.load_many(asked)
    after = client.info("commandstats")
    calls = {k: after[k]["calls"] - before.get(k, {"calls": 0})["calls"] for k in after}
    assert calls.get("cmdstat_mget") == -(-(len(asked) - 1) // 4)  # the bad name asks nothing
    assert calls.get("cmdstat_get", 0) == 1  # n1's `gone` marker (lost, in the local copy)
    assert set(found) == set(asked)
    for name in asked:
        try:
            expected: object = a.load(name)
        except StoreError as exc:
            expected = str(exc)
        got = found[name]
        assert (str(got) if isinstance(got, StoreError) else got) == expected, name
    assert found["n1.test"] is not None and found["absent.test"] is None
    assert found["n2.test"] == a.local.load("n2.test")  # corrupt in Redis: the local copy
    assert isinstance(found["corrupt.test"], StoreError)

    redis_server.stop()
    try:
        down = a.load_many(present)
        assert down == {n: a.local.load(n) for n in present}
    finally:
        redis_server.start_again()
