"""A fleet node's resync against a real redis-server: every certificate and state write records
its name under the next rev, so the resync (every minute, after each reconnect) asks for the
names written since the last one and reloads those alone; every certificate is read again only
when Redis cannot tell (it lost its data, holds an older dump, too many names changed). An idle
node's resyncs read no certificate at all (they read every one before, 100k GETs a minute per
node at 100k names)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from edged import fleet
from edged.fleet import follow_changes
from edged.store.base import PemPair, StoredCert
from edged.store.files import FileStore
from edged.store.redis import Changes, Cursor, RedisStore
from tests.conftest import run_edged
from tests.pki import make_ca, make_leaf
from tests.redis_server import RedisServer
from tests.test_redis_store import bundle, wait_until
from tests.test_redis_store import store as redis_store


def store(redis_server: RedisServer, tmp_path: Path, node: str) -> RedisStore:
    return redis_store(redis_server, tmp_path, node, prefix="rs")


def since(s: RedisStore, cursor: Cursor) -> Changes:
    found = s.changes_since(cursor)
    assert not found.full, found
    return found


def test_changes_since_names_what_each_write_changed(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    a, b = store(redis_server, tmp_path, "a"), store(redis_server, tmp_path, "b")
    first = a.changes_since(None)
    assert first.full == "first resync" and first.cursor.rev == 0
    assert b.changes_since(None).cursor == first.cursor  # one epoch for the fleet
    assert since(a, first.cursor) == Changes(first.cursor)  # nothing written: nothing listed

    b.save(bundle("one.test", "v1"))
    b.save_state("two.test", {"status": "processing"})
    after = since(a, first.cursor)
    assert (after.certs, after.states, after.cursor.rev) == (("one.test",), ("two.test",), 2)
    assert since(a, after.cursor) == Changes(after.cursor)

    # Saves, a rollback, a delete, each name listed once however often it was written.
    b.save(bundle("one.test", "v2"))
    b.save(bundle("gone.test", "v1"))
    b.rollback("one.test")
    b.delete("gone.test")
    later = since(a, after.cursor)
    assert sorted(later.certs) == ["gone.test", "one.test"] and later.states == ()
    assert later.cursor.rev == after.cursor.rev + 4

    # Redis flushed: another epoch, so the cursor no longer tells; the copies put back are
    # writes too.
    raw = redis_server.client()
    raw.flushall()
    lost = a.changes_since(later.cursor)
    assert "lost its data" in lost.full and lost.cursor.epoch != later.cursor.epoch
    assert b.restore(b.stale_in_redis()).names == ("one.test",)
    assert since(a, lost.cursor).certs == ("one.test",)

    # An older dump (the counter behind the cursor): the cursor no longer tells either.
    now = a.changes_since(lost.cursor).cursor
    raw.set("rs:rev", now.rev - 1)
    assert "older" in a.changes_since(now).full


def test_too_many_changes_mean_a_full_read(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("edged.store.redis.CHANGES_MAX", 3)
    a = store(redis_server, tmp_path, "a")
    cursor = a.changes_since(None).cursor
    for i in range(2):
        a.save_state(f"n{i}.test", {"status": "processing"})
    assert len(since(a, cursor).states) == 2
    a.save_state("n2.test", {"status": "processing"})
    assert "3 or more names changed" in a.changes_since(cursor).full


async def test_a_resync_hands_over_only_the_names_written_since(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The follower starts with a cursor taken before the caller's load: a certificate
    written before it (read by that load) is not handed over, one written after it but before
    the subscription (no message reaches the follower) is, by the first resync; idle resyncs
    hand over nothing; a flushed Redis asks for a full read ("resync")."""
    caplog.set_level(logging.INFO, logger="edged.fleet")
    a, b = store(redis_server, tmp_path, "a"), store(redis_server, tmp_path, "b")
    a.save(bundle("before.test", "v1"))
    cursor = b.changes_since(None).cursor
    a.save(bundle("missed.test", "v1"))
    a.save_state("missed.test", {"status": "processing"})
    heard: list[str] = []
    certs: list[str] = []
    states: list[str] = []
    stop = asyncio.Event()
    follower = asyncio.create_task(
        follow_changes(
            b,
            heard.append,
            stop,
            states.append,
            on_cert=certs.append,
            cursor=cursor,
            resync_every=0.1,
            restore_spread=0,
        )
    )
    try:
        await wait_until(lambda: "missed.test" in certs and "missed.test" in states)
        assert "before.test" not in certs
        await asyncio.sleep(0.5)  # about five idle resyncs
        assert (certs, states, heard) == (["missed.test"], ["missed.test"], [])
        # Written now: the message and the next resync both name it (a reload each).
        await asyncio.to_thread(a.save, bundle("new.test", "v1"))
        await wait_until(lambda: certs.count("new.test") == 2)
        assert heard == []
        raw = redis_server.client()
        await asyncio.to_thread(raw.flushall)
        await wait_until(lambda: "resync" in heard)
        assert "resync: reading every certificate again: redis lost its data" in caplog.text
    finally:
        stop.set()
        await asyncio.wait_for(follower, 10)


def sites(names: list[str]) -> str:
    return "".join(f'[[site]]\nnames = ["{n}"]\nbackend = "127.0.0.1:9"\n' for n in names)


def many(names: list[str], cn: str) -> list[StoredCert]:
    """One leaf for all the names (a key generation each would make the test slow)."""
    leaf = make_leaf(make_ca(), names, cn=cn)
    pair = PemPair("ecdsa-p256", leaf.cert_pem, leaf.key_pem)
    return [StoredCert(n, (n,), (pair,), "upload", time.time()) for n in names]


class Reads:
    """The certificates clients GET or MGET (not the reads inside scripts), seen with
    MONITOR."""

    def __init__(self, redis_server: RedisServer, prefix: str) -> None:
        self.prefix = f"GET {prefix}:cert:"
        self.key_prefix = f"{prefix}:cert:"
        self.certs: Counter[str] = Counter()
        self.marks: set[str] = set()
        self._conn = redis.Redis.from_url(redis_server.url)
        self._client = redis_server.client()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        assert started.wait(5)

    def _run(self, started: threading.Event) -> None:
        with (
            contextlib.suppress(redis.RedisError, OSError, AttributeError),
            self._conn.monitor() as m,
        ):
            started.set()
            for seen in m.listen():
                command = seen["command"]
                if seen["client_type"] == "lua":
                    continue
                if command.startswith(self.prefix):
                    self.certs[command.removeprefix(self.prefix)] += 1
                elif command.startswith("MGET "):
                    for key in command.split()[1:]:
                        if key.startswith(self.key_prefix):
                            self.certs[key.removeprefix(self.key_prefix)] += 1
                elif command.startswith("ECHO "):
                    self.marks.add(command.removeprefix("ECHO "))

    async def take(self) -> Counter[str]:
        """What was read up to now (after every command sent before it), then starts over."""
        mark = str(len(self.marks))
        await asyncio.to_thread(self._client.echo, mark)
        await wait_until(lambda: mark in self.marks)
        taken, self.certs = self.certs, Counter()
        return taken

    def close(self) -> None:
        self._conn.connection_pool.disconnect()
        self._thread.join(5)


class Unpublished(RedisStore):
    """A writer whose messages go where no node listens: a lost pub/sub message."""

    @property
    def channel(self) -> str:
        return self.key("nowhere")


async def test_an_idle_node_reads_no_certificate_at_its_resyncs(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 sites in Redis: the node's start reads them once (its follower's first resync reads
    none again); resyncs every 0.2 s then read nothing but the change index; a certificate
    whose message was lost is served after the next resync, which reads that one alone."""
    monkeypatch.setattr(fleet, "RESYNC_EVERY", 0.2)
    names = [f"n{i}.shop.test" for i in range(300)]
    writer = Unpublished(redis_server.url, FileStore(tmp_path / "writer"), prefix="idle")
    for cert in many(names, "v1"):
        writer.save(cert)
    extra = 'store_local = "local"\nredis_prefix = "idle"'
    reads = Reads(redis_server, "idle")
    try:
        async with run_edged(
            tmp_path, sites(names), store=redis_server.url, edged_extra=extra
        ) as e:
            await wait_until(lambda: e.daemon._following is not None)
            await asyncio.sleep(0.6)  # the first resync and two periodic ones
            assert await reads.take() == Counter(names)  # the start's load, nothing more
            assert not any(kind == "resync" for kind, _ in e.daemon.counters.reloads)
            reloads = dict(e.daemon.counters.reloads)
            await asyncio.sleep(1.0)  # five resyncs
            assert await reads.take() == Counter()
            assert dict(e.daemon.counters.reloads) == reloads  # no reload at all

            served = e.daemon.serving(names[7])
            assert served is not None
            await asyncio.to_thread(writer.save, many([names[7]], "v2")[0])
            await wait_until(
                lambda: (
                    getattr(e.daemon.serving(names[7]), "fingerprint", None)
                    not in (None, served.fingerprint)
                )
            )
            assert e.daemon.counters.reloads["store", "ok"] == reloads.get(("store", "ok"), 0) + 1
            assert await reads.take() == Counter({names[7]: 1})
    finally:
        reads.close()


async def test_a_restore_that_failed_is_tried_again_at_the_next_resync(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis lost its data and refused the writes back (here: too few replicas) at the resync
    that found out: the next resync tries again, not the hourly check an hour later."""
    a = store(redis_server, tmp_path, "a")
    a.save(bundle("kept.test", "v1"))
    cursor = a.changes_since(None).cursor
    heard: list[str] = []
    stop = asyncio.Event()
    follower = asyncio.create_task(
        follow_changes(
            a,
            heard.append,
            stop,
            cursor=cursor,
            resync_every=0.1,
            check_every=3600,
            restore_spread=0,
        )
    )
    raw = redis_server.client()
    try:
        await asyncio.sleep(0.3)  # subscribed, first resyncs done
        # Lost (another epoch, the certificate gone), and writes refused from then on.
        pipe = raw.pipeline(transaction=True)
        pipe.delete("rs:cert:kept.test", "rs:names")
        pipe.set("rs:epoch", "another")
        pipe.config_set("min-replicas-to-write", 1)
        await asyncio.to_thread(pipe.execute)
        await wait_until(lambda: "local copies not restored" in caplog.text)
        await wait_until(lambda: "resync" in heard)
        await asyncio.to_thread(raw.config_set, "min-replicas-to-write", 0)
        await wait_until(lambda: raw.exists("rs:cert:kept.test") == 1, limit=5)
    finally:
        await asyncio.to_thread(raw.config_set, "min-replicas-to-write", 0)
        stop.set()
        await asyncio.wait_for(follower, 10)


@pytest.mark.parametrize("kind", ["cert", "state"])
def test_a_lost_change_index_means_a_full_read(
    redis_server: RedisServer, tmp_path: Path, kind: str
) -> None:
    """An index evicted (maxmemory allkeys-*) or deleted, the epoch and the counter kept: the
    names written before are gone from it, so the cursor no longer tells."""
    a, b = store(redis_server, tmp_path, "a"), store(redis_server, tmp_path, "b")
    cursor = a.changes_since(None).cursor
    b.save(bundle("before.test", "v1"))
    b.save_state("before.test", {"status": "processing"})
    redis_server.client().delete(f"rs:revs:{kind}")  # what eviction does
    b.save(bundle("after.test", "v1"))
    b.save_state("after.test", {"status": "processing"})
    lost = a.changes_since(cursor)
    assert "index" in lost.full, lost
    assert since(a, lost.cursor) == Changes(lost.cursor)  # told once, then it tells again


def test_a_restart_that_lost_the_last_writes_means_a_full_read(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Redis restarted from a dump (or an AOF, or failed over to a replica) that lacks the last
    writes, then written to again before the node resynced: the counter is past the cursor
    again, but the revs the node had seen now name other writes, which it would never read."""
    a, b = store(redis_server, tmp_path, "a"), store(redis_server, tmp_path, "b")
    b.save(bundle("old.test", "v1"))
    a.changes_since(None)  # the fleet's epoch, in the dump
    redis_server.client().save()  # the dump the restart comes back with
    b.save(bundle("lost.test", "v1"))
    b.save_state("lost.test", {"status": "processing"})
    cursor = a.changes_since(None).cursor
    redis_server.stop()
    redis_server.start_again()
    b.save(bundle("written.test", "v1"))
    b.save_state("written.test", {"status": "processing"})
    b.save_state("again.test", {"status": "processing"})
    assert redis_server.client().get("rs:rev") == str(cursor.rev + 1).encode()  # past it again
    assert "restarted" in a.changes_since(cursor).full


def test_a_read_redis_failed_since_the_cursor_means_a_full_read(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Redis stalls past the client's timeout: a read then serves the node's local copy
    (the older version) and the index will not list that name again, so the next resync
    reads everything; the one after that is back to the names written."""
    a, b = store(redis_server, tmp_path, "a"), store(redis_server, tmp_path, "b")
    b.save(bundle("one.test", "v1"))
    assert a.load("one.test") is not None  # a's local copy: v1
    cursor = a.changes_since(None).cursor
    b.save(bundle("one.test", "v2"))
    raw = redis_server.client()
    raw.client_pause(3000)  # a's timeout is 2 s
    try:
        stale = a.load("one.test")  # what a reload meanwhile would read
    finally:
        raw.client_unpause()
    assert stale is not None and stale.pairs != b.load("one.test").pairs  # type: ignore[union-attr]
    assert a.failures == 1
    found = a.changes_since(cursor)
    assert found.full == "redis calls failed since the last resync"
    assert since(a, found.cursor) == Changes(found.cursor)


@pytest.mark.parametrize("refusal", ["read-only replica", "out of memory"])
def test_redis_refusing_the_index_writes_means_a_full_read(
    redis_server: RedisServer, tmp_path: Path, refusal: str
) -> None:
    """The epoch or an index marker must be written again (here: the index lost) while Redis
    takes no writes: the resync reads everything, as without an index, instead of failing and
    reconnecting until Redis takes writes again; once it does, the index is made again."""
    a, b = store(redis_server, tmp_path, "a"), store(redis_server, tmp_path, "b")
    cursor = a.changes_since(None).cursor
    b.save(bundle("one.test", "v1"))
    raw = redis_server.client()
    raw.delete("rs:revs:cert")
    if refusal == "read-only replica":
        raw.replicaof("127.0.0.1", "1")  # a master that never answers: read-only meanwhile
        undo = lambda: raw.replicaof("NO", "ONE")  # noqa: E731
    else:
        raw.config_set("maxmemory-policy", "noeviction")
        raw.config_set("maxmemory", "1")
        undo = lambda: raw.config_set("maxmemory", "0")  # noqa: E731
    try:
        for _ in range(2):  # each resync meanwhile, not only the first
            refused = a.changes_since(cursor)
            assert refused.full.startswith("redis refused to write its change index ("), refused
            assert ("READONLY" if refusal == "read-only replica" else "OOM") in refused.full
            cursor = refused.cursor
        assert a.failures == 0  # not a failed call: the follower stays connected
    finally:
        undo()
    again = a.changes_since(cursor)
    assert "lost the change index" in again.full  # made again now: told once
    b.save(bundle("two.test", "v1"))
    assert since(a, again.cursor).certs == ("two.test",)


def test_an_acl_denying_info_is_said_once(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without INFO the epoch carries no run_id, so a restart that lost the last writes goes
    unnoticed (test_a_restart_that_lost_the_last_writes_means_a_full_read): the operator is
    told what to allow, once, and the index still serves."""
    redis_server.client().acl_setuser(
        "edge",
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-info"],
    )
    url = redis_server.url.replace("redis://", "redis://edge:pw@")
    a = RedisStore(url, FileStore(tmp_path / "acl"), prefix="rs")
    b = store(redis_server, tmp_path, "b")
    with caplog.at_level(logging.WARNING, logger="edged"):
        cursor = a.changes_since(None).cursor
        b.save(bundle("one.test", "v1"))
        assert since(a, cursor).certs == ("one.test",)
    warned = [r for r in caplog.records if "refuses INFO" in r.getMessage()]
    assert len(warned) == 1 and "+info" in warned[0].getMessage()
    assert ":" not in cursor.epoch
