"""Renewal states of many names in a fleet, against a real redis-server: a configure (each
full reload and each fleet resync) reads every state it needs in one batch per STATES_BATCH
names, not one GET (and one thread hop) per name, with the same result as the reads one by one
(new, known, adopted, forced, in flight under another node's lease, interrupted, corrupt); a
node's start does not save (and publish, for every other node to read again) states it found
as they are; states announced over pub/sub are read in batches too."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from edged.certs import CertBundle, parse_bundle
from edged.config import Config, parse_config
from edged.errors import StoreError
from edged.renewal import CertStatus, RenewalState
from edged.renewer import Renewer
from edged.store.files import FileStore
from edged.store.redis import STATES_BATCH, RedisStore
from tests.conftest import new_renewer
from tests.pki import fullchain, make_ca, make_leaf
from tests.redis_server import RedisServer

NOW = datetime.now(UTC).replace(microsecond=0)


def fleet_config(tmp_path: Path, url: str, names: list[str], prefix: str = "states") -> Config:
    sites = "".join(f'[[site]]\nnames = ["{n}"]\nbackend = "127.0.0.1:9"\n' for n in names)
    return parse_config(
        f"""
[edged]
store = "{url}"
store_local = "local"
redis_prefix = "{prefix}"
[acme]
directory = "https://127.0.0.1:9/dir"
email = "ops@shop.test"
preflight = false
{sites}""",
        tmp_path / "edged.toml",
    )


def failing(name: str, attempts: int, **changes: object) -> RenewalState:
    """A name whose renewal fails (PROCESSING: without a served certificate a configure
    leaves it as it is), next try in a day."""
    fields: dict[str, object] = {
        "status": CertStatus.PROCESSING,
        "attempts": attempts,
        "last_error": {"message": "boom"},
        "last_attempt": NOW - timedelta(hours=1),
        "next_try": NOW + timedelta(days=1),
        "failing_since": NOW - timedelta(hours=2),
    }
    return RenewalState(name=name, **{**fields, **changes})  # type: ignore[arg-type]


def commands(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def counted(client: redis.Redis, before: dict[str, int]) -> dict[str, int]:
    after = commands(client)
    return {
        k: n - before.get(k, 0)
        for k, n in after.items()
        if n - before.get(k, 0)
        and k not in ("info", "config|resetstat", "hello")  # the counting, new connections
        and not k.startswith("client|")
    }


def test_load_states_matches_load_state_and_batches(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Present, absent, corrupt and invalid names give what load_state gives (a corrupt one
    its StoreError, not the others'); 2,500 names are 3 MGETs and no GET; with Redis gone the
    local copy answers, as load_state's does."""
    store = RedisStore(redis_server.url, FileStore(tmp_path / "local"), prefix="ls")
    names = [f"n{i}.shop.test" for i in range(2500)]
    for name in names[:2000]:
        store.save_state(name, failing(name, 1).to_json())
    client = redis_server.client()
    client.set("ls:state:corrupt.shop.test", b"{not json")
    asked = [*names, "corrupt.shop.test", "bad name!"]
    client.config_resetstat()
    before = commands(client)
    found = store.load_states(asked)
    assert counted(client, before) == {"mget": -(-2501 // STATES_BATCH)}  # 3, one per batch
    assert set(found) == set(asked)
    for name in names:
        assert found[name] == store.load_state(name)
    assert found[names[0]] == json.loads(json.dumps(failing(names[0], 1).to_json()))
    assert found[names[-1]] is None
    for name in ("corrupt.shop.test", "bad name!"):
        error = found[name]
        assert isinstance(error, StoreError)
        try:
            store.load_state(name)
        except StoreError as exc:
            assert str(exc) == str(error)
        else:
            raise AssertionError(f"load_state({name!r}) did not fail")
    assert "corrupt" in str(found["corrupt.shop.test"])
    # The file store's plain loop gives the same (its local copy: what save_state wrote).
    local = store.local.load_states(names[:3])
    assert local == {n: store.load_state(n) for n in names[:3]}

    redis_server.stop()
    try:
        down = store.load_states(names[:1500])
        assert down == {n: store.local.load_state(n) for n in names[:1500]}
        assert store.available is False
    finally:
        redis_server.start_again()


async def test_configure_reads_states_in_batches_with_the_per_name_result(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The cases a configure meets, read in one batch, end as the reads one by one made them
    end: new (not saved: its absent state reads as new), known and unchanged (left as stored,
    not saved nor published again), interrupted (a failed attempt, saved), in flight under
    another node's live lease (looked at again in 5 s), corrupt (started over). At the next
    configure (a resync): a state another node saved newer is adopted, one older is not, a
    forced name keeps its attempt unless the fleet renewed it."""
    store = RedisStore(redis_server.url, FileStore(tmp_path / "local"), prefix="states")
    other = RedisStore(redis_server.url, FileStore(tmp_path / "other"), prefix="states")
    client = redis_server.client()
    names = ["new.test", "known.test", "interrupted.test", "leased.test", "corrupt.test"]
    names += ["adopted.test", "older.test", "forced.test", "renewed.test"]
    for name in names[5:]:
        other.save_state(name, failing(name, 1).to_json())
    other.save_state("known.test", failing("known.test", 2).to_json())
    other.save_state("interrupted.test", failing("interrupted.test", 1, in_flight=True).to_json())
    other.save_state("leased.test", failing("leased.test", 1, in_flight=True).to_json())
    assert other.acquire_lease("leased.test", 30, "other-node")
    client.set("states:state:corrupt.test", b"[]")
    config = fleet_config(tmp_path, redis_server.url, names)

    # What the per-name read gives, to compare with.
    reader = new_renewer()
    reader.store = store
    one_by_one = {n: reader._load_state_read(n) for n in names}
    assert reader._load_states(names) == one_by_one

    renewer = new_renewer()
    client.config_resetstat()
    before = commands(client)
    await renewer.configure(config, store)
    used = counted(client, before)
    assert used.get("mget") == 1
    states = renewer.states
    # Saved: interrupted, leased (its next look), corrupt (started over, so the error is not
    # met again); not the rest, nor the new name, which has nothing to record.
    assert used.get("publish") == 3, used
    assert states["new.test"] == RenewalState.new("new.test")
    assert store.load_state("new.test") is None and store.local.load_state("new.test") is None
    assert store.load_state("corrupt.test") == RenewalState.new("corrupt.test").to_json()
    assert states["known.test"] == one_by_one["known.test"][0]
    assert store.load_state("known.test") == failing("known.test", 2).to_json()
    assert store.local.load_state("known.test") == failing("known.test", 2).to_json()
    interrupted = states["interrupted.test"]
    assert interrupted.attempts == 2 and not interrupted.in_flight
    assert store.load_state("interrupted.test") == interrupted.to_json()
    leased = states["leased.test"]
    assert not leased.in_flight and leased.attempts == 1
    assert leased.next_try is not None and leased.next_try <= datetime.now(UTC) + timedelta(
        seconds=6
    )
    assert states["corrupt.test"] == RenewalState.new("corrupt.test")

    # Another node's attempts: adopted.test and renewed.test newer; older.test older.
    renewer.force("forced.test")
    other.save_state(
        "adopted.test",
        failing("adopted.test", 2, last_attempt=NOW - timedelta(minutes=1)).to_json(),
    )
    other.save_state(
        "older.test", failing("older.test", 3, last_attempt=NOW - timedelta(days=1)).to_json()
    )
    other.save_state(
        "forced.test", failing("forced.test", 2, last_attempt=NOW - timedelta(minutes=1)).to_json()
    )
    renewed = RenewalState(
        name="renewed.test",
        status=CertStatus.ACTIVE,
        last_success=NOW,
        last_attempt=NOW,
        next_try=NOW + timedelta(days=30),
        issued_by="other-node",
    )
    other.save_state("renewed.test", renewed.to_json())
    forced = renewer.states["forced.test"]
    renewer.force("renewed.test")
    client.config_resetstat()
    before = commands(client)
    await renewer.configure(config, store)  # a resync
    used = counted(client, before)
    assert used.get("mget") == 1 and "publish" not in used and "set" not in used, used
    assert states["adopted.test"].attempts == 2
    assert states["older.test"].attempts == 1
    assert states["forced.test"] == forced  # `edged renew` here stands
    # ... unless the fleet renewed it meanwhile (served nothing here, it is due again).
    assert states["renewed.test"].last_success == NOW
    assert states["renewed.test"].issued_by == "other-node"
    assert "renewed.test" not in renewer._forced and "forced.test" in renewer._forced


async def test_a_configure_of_many_names_is_a_round_trip_per_batch(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """2,500 managed names whose states the fleet holds: the node's start reads them in 3
    MGETs and saves none of them (each was a GET, a SET and a PUBLISH, and every other node
    read each one again); a resync reads them in 3 MGETs (was 2,500 GETs). The GETs left are
    the certificate lookups of managed_sites, which the daemon spares (it tells it the uploads
    its own load found): then a resync is the 3 MGETs alone (was 2,500 GETs more)."""
    names = [f"n{i}.shop.test" for i in range(2500)]
    client = redis_server.client()
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.set(f"many:state:{name}", json.dumps(failing(name, 1).to_json(), sort_keys=True))
    pipe.execute()
    store = RedisStore(redis_server.url, FileStore(tmp_path / "local"), prefix="many")
    config = fleet_config(tmp_path, redis_server.url, names, prefix="many")
    renewer = new_renewer()
    batches = -(-len(names) // STATES_BATCH)
    for _ in ("start", "resync"):
        client.config_resetstat()
        before = commands(client)
        await renewer.configure(config, store)
        used = counted(client, before)
        assert used == {"get": len(names), "mget": batches}, used
    client.config_resetstat()
    before = commands(client)
    await renewer.configure(config, store, frozenset())  # the daemon's: no upload among them
    assert counted(client, before) == {"mget": batches}
    assert len(renewer.states) == len(names)
    assert all(renewer.states[n] == failing(n, 1) for n in names)
    # The node's local copy (for an outage) holds them, without a write to Redis.
    assert store.local.load_state(names[-1]) == failing(names[-1], 1).to_json()

    # States announced over pub/sub (another node's attempts) are read in batches too.
    for name in names:
        newer = failing(name, 2, last_attempt=NOW - timedelta(minutes=1))
        pipe.set(f"many:state:{name}", json.dumps(newer.to_json(), sort_keys=True))
        renewer.note_shared_state(name)
    pipe.execute()
    client.config_resetstat()
    before = commands(client)
    await renewer._adopt_shared_states()
    assert counted(client, before) == {"mget": batches}
    assert all(renewer.states[n].attempts == 2 for n in names)


async def planned_in_fleet(
    redis_server: RedisServer,
    tmp_path: Path,
    name: str,
    serving: Callable[[str], CertBundle | None],
    prefix: str,
) -> tuple[RedisStore, Config, Renewer, RenewalState]:
    """A fleet node's renewer that planned `name` from the certificate `serving` gives, with
    no state saved for it (absent in Redis): its store, config, renewer and the plan."""
    store = RedisStore(redis_server.url, FileStore(tmp_path / "local"), prefix=prefix)
    config = fleet_config(tmp_path, redis_server.url, [name], prefix=prefix)
    renewer = new_renewer(serving)
    await renewer.configure(config, store)
    planned = renewer.states[name]
    assert planned.status is CertStatus.ACTIVE and store.load_state(name) is None
    return store, config, renewer, planned


async def test_a_resync_keeps_the_plan_of_a_name_whose_state_no_node_saved(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name served with a certificate whose renewal state no node saved (`edged issue`, a
    store that came with its certificates, a name new to the store: its absent state reads
    as new) is planned from that certificate. A resync must not take the absent state, which
    records no attempt of anyone's, as the fleet's truth: it did, and the name was new again,
    due at once, until planned anew; the renewal loop, woken meanwhile (plans of 2,000 names
    and more are made in a thread), ordered a certificate still valid for months."""
    import edged.renewer as renewer_module

    monkeypatch.setattr(renewer_module, "OBSERVE_IN_THREAD", 1)
    name = "served.test"
    made = make_leaf(make_ca("Served CA"), [name])
    served = parse_bundle(fullchain(made), made.key_pem, source=name)
    loop = asyncio.get_running_loop()
    armed = threading.Event()

    def serving(asked: str) -> CertBundle | None:
        if armed.is_set() and threading.current_thread() is not threading.main_thread():
            armed.clear()  # the resync's plan, in its thread: the loop wakes meanwhile
            loop.call_soon_threadsafe(renewer._wake.set)
            time.sleep(1)
        return served if asked == name else None

    store, config, renewer, planned = await planned_in_fleet(
        redis_server, tmp_path, name, serving, "absent"
    )
    stop = asyncio.Event()
    task = asyncio.create_task(renewer.run(stop))
    try:
        await asyncio.sleep(0.5)  # its first pass (which looks at expiry, served) is done
        armed.set()
        await renewer.configure(config, store)  # a resync
        for _ in range(200):
            if not renewer._running:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert not armed.is_set()  # the plan was made in a thread, the loop woken meanwhile
    assert renewer.counters.renewal_attempts[name, "failure"] == 0
    assert renewer.states[name].status is CertStatus.ACTIVE
    assert renewer.states[name].next_try == planned.next_try


async def test_a_new_state_another_node_publishes_does_not_undo_a_plan(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """An edged before this one saved and published a new state for every name new to the
    store at its start (this one saves none): in a fleet being upgraded, an old node's
    restart announced such a state for every name the upgraded nodes had planned from the
    certificates they serve, and each of them took it (the fleet's truth), without planning
    again: every name due at once, ordered although served with a valid certificate."""
    name = "served.test"
    made = make_leaf(make_ca("Served CA"), [name])
    served = parse_bundle(fullchain(made), made.key_pem, source=name)
    old_node = RedisStore(redis_server.url, FileStore(tmp_path / "old"), prefix="old")
    _, _, renewer, planned = await planned_in_fleet(
        redis_server, tmp_path, name, lambda asked: served if asked == name else None, "old"
    )
    stop = asyncio.Event()
    task = asyncio.create_task(renewer.run(stop))
    try:
        old_node.save_state(name, RenewalState.new(name).to_json())  # and publishes it
        renewer.note_shared_state(name)  # as the follower does when the message arrives
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not renewer._shared_changed and not renewer._running:
                break
        await asyncio.sleep(0.5)  # an attempt it would start, done
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert renewer.counters.renewal_attempts[name, "failure"] == 0
    assert renewer.states[name] == planned


async def test_a_configure_of_some_names_reads_and_plans_those_alone(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """An upload that comes or goes on a fleet node configures the renewal loop for that name
    alone (`only`): every node read every state again for each upload (100 MGETs and a plan
    of every name at 100k names). A name handed over to ACME is read, resumed and planned;
    one taken by an upload leaves the loop; the others keep their states as they were."""
    store = RedisStore(redis_server.url, FileStore(tmp_path / "local"), prefix="states")
    names = [f"n{i}.test" for i in range(1500)]
    for name in names[:3]:
        store.save_state(name, failing(name, 1).to_json())
    config = fleet_config(tmp_path, redis_server.url, names)
    renewer = new_renewer()
    await renewer.configure(config, store, frozenset({"n0.test"}))
    assert "n0.test" not in renewer.states and renewer.states["n1.test"].attempts == 1
    kept = dict(renewer.states)
    client = redis_server.client()
    store.save_state("n2.test", failing("n2.test", 4).to_json())  # not adopted: not asked for
    before = commands(client)
    await renewer.configure(config, store, frozenset({"n1.test"}), only=["n0.test", "n1.test"])
    used = counted(client, before)
    assert used.get("mget") == 1 and "get" not in used, used  # n0's state alone
    assert renewer.states["n0.test"].attempts == 1  # handed back: its stored state resumed
    assert "n1.test" not in renewer.states  # an upload now
    assert all(renewer.states[n] is kept[n] for n in names[2:])
