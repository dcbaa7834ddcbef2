"""Following the fleet's changes: a node that stores a new certificate publishes its name; every
node reloads (fetch, validate, swap) when it hears it. Reconnects back off with jitter so a Redis
restart does not bring every node back in the same second.

Pub/sub delivers at most once, so a node also resyncs, every minute and after each reconnect:
it asks Redis for the names written since its last resync (RedisStore.changes_since, one script
call) and reloads those alone; every certificate is read again only when Redis cannot tell
(it lost its data, went back to an older dump, too many names changed) or at the first resync
of a node that read nothing before subscribing.

A node also checks whether Redis lacks what its local copy holds (Redis restarted without
persistence, flushed, restored from an old dump, a key evicted) and writes it back: after each
(re)connect, whenever Redis cannot tell what changed, and at least hourly; after a random delay,
and only where Redis still lacks it or holds an older version, so the first node to get there
restores a name and the others find nothing left to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

import redis.asyncio as aioredis

from edged.errors import StoreError
from edged.store.redis import Cursor, RedisStore

log = logging.getLogger("edged.fleet")

RESYNC_EVERY = 60.0  # seconds; catches messages missed while subscribed
# Seconds: the local copies are compared with Redis at least this often. It reads every local
# copy (~2 s of a thread per 20k names), so not at every resync: a lost or older dump shows in
# the resync itself (epoch, rev), this is for keys lost one by one (eviction, a manual DEL).
CHECK_EVERY = 3600.0
BACKOFF_FIRST, BACKOFF_CAP = 0.5, 30.0
RECONNECT_SPREAD = 5.0  # seconds: resyncs after an outage spread over this across the fleet
RESTORE_SPREAD = 5.0  # seconds: restores of local copies spread over this across the fleet


async def follow_changes(
    store: RedisStore,
    on_change: Callable[[str], None],
    stop: asyncio.Event,
    on_state: Callable[[str], None] | None = None,
    *,
    on_cert: Callable[[str], None] | None = None,
    cursor: Cursor | None = None,
    resync_every: float | None = None,
    check_every: float | None = None,
    restore_spread: float = RESTORE_SPREAD,
    rng: random.Random | None = None,
) -> None:
    """Call on_cert(name) (without it, on_change("store")) for every certificate change
    published or found by a resync, on_state(name) for every renewal state another node saved,
    on_change("resync") when every certificate must be read again (see the module doc), each
    time after restoring what Redis lost. `cursor`: taken before the caller read the store
    (changes_since(None)), so the first resync reads only what changed since. Returns when
    `stop` is set; never raises for Redis trouble."""
    rng = rng or random.Random()
    resync_every = RESYNC_EVERY if resync_every is None else resync_every
    check_every = CHECK_EVERY if check_every is None else check_every
    delay = BACKOFF_FIRST
    failed = False
    sync = _Resync(store, on_change, stop, on_state, on_cert, rng, restore_spread, cursor)
    while not stop.is_set():
        client = aioredis.Redis.from_url(store.url, **store.connection_kwargs)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(store.channel, store.state_channel)
            if failed:
                # Back after an outage: resync, spread over a few seconds across the fleet.
                await _sleep(stop, rng.uniform(0, RECONNECT_SPREAD))
                log.info("redis reachable again: resyncing")
            # Also right after the first subscribe: a change published between the startup
            # load and the subscription would otherwise wait for the periodic resync. After
            # every (re)connect the local copies are checked: Redis may be back without them.
            await sync.run(check=True)
            failed = False
            delay = BACKOFF_FIRST
            loop = asyncio.get_running_loop()
            next_resync = loop.time() + resync_every
            next_check = loop.time() + check_every
            while not stop.is_set():
                timeout = max(0.0, min(1.0, next_resync - loop.time()))
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
                if message is not None:
                    if message["channel"] == store.state_channel.encode():
                        if on_state is not None:
                            on_state(message["data"].decode())
                    elif on_cert is not None:
                        on_cert(message["data"].decode())
                    else:
                        on_change("store")
                if loop.time() >= next_resync:
                    check = loop.time() >= next_check
                    await sync.run(check=check)
                    if check:
                        next_check = loop.time() + check_every
                    next_resync = loop.time() + resync_every
        except Exception as exc:  # Redis trouble of any kind must never take the daemon down
            failed = True
            log.warning(
                "redis pub/sub lost error=%s retry_in=%.1fs", store.describe_error(exc), delay
            )
            await _sleep(stop, delay * rng.uniform(0.5, 1.5))
            delay = min(delay * 2, BACKOFF_CAP)
        finally:
            # Bounded: closing must not hang a shutdown when Redis is gone mid-close.
            with contextlib.suppress(Exception):
                # Closed and waited for: pubsub.aclose() only starts the close (nowait), and a
                # TLS connection whose shutdown still runs when the event loop closes (edged's
                # exit) makes uvloop fail the close (EBUSY, a transport left open).
                if pubsub.connection is not None:
                    await asyncio.wait_for(pubsub.connection.disconnect(), 2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pubsub.aclose(), 2)  # type: ignore[no-untyped-call,unused-ignore]
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 2)


class _Resync:
    """One resync: what changed since the last (the cursor kept across reconnects), handed
    to the callbacks; the local copies restored first when asked or when Redis lost data."""

    def __init__(
        self,
        store: RedisStore,
        on_change: Callable[[str], None],
        stop: asyncio.Event,
        on_state: Callable[[str], None] | None,
        on_cert: Callable[[str], None] | None,
        rng: random.Random,
        spread: float,
        cursor: Cursor | None,
    ) -> None:
        self.store, self.on_change, self.stop = store, on_change, stop
        self.on_state, self.on_cert = on_state, on_cert
        self.rng, self.spread, self.cursor = rng, spread, cursor
        self.restore_failed = False  # then the next resync checks again, not the hourly one

    async def run(self, *, check: bool) -> None:
        """Raises StoreError when Redis cannot be asked (the caller's reconnect handles it)."""
        changes = await asyncio.to_thread(self.store.changes_since, self.cursor)
        known = self.cursor is not None
        if changes.full or check or self.restore_failed:
            done = await restore_local_copies(self.store, self.stop, self.rng, self.spread)
            self.restore_failed = not done
        if changes.full:
            if known:
                log.warning("resync: reading every certificate again: %s", changes.full)
            self.on_change("resync")
        else:
            if changes.certs or changes.states:
                log.info(
                    "resync: %d certificate(s) and %d renewal state(s) written since the last",
                    len(changes.certs),
                    len(changes.states),
                )
            if self.on_cert is not None:
                for name in changes.certs:
                    self.on_cert(name)
            elif changes.certs:
                self.on_change("store")
            if self.on_state is not None:
                for name in changes.states:
                    self.on_state(name)
        self.cursor = changes.cursor


async def restore_local_copies(
    store: RedisStore, stop: asyncio.Event, rng: random.Random, spread: float
) -> bool:
    """Write back what Redis lost, after a random delay of up to `spread` seconds. Only reads
    (one script call) when nothing is missing, which is nearly always. False when Redis
    refused (the caller tries again at its next resync)."""
    try:
        stale = await asyncio.to_thread(store.stale_in_redis)
        if not stale:
            return True
        log.warning(
            "redis lacks (or holds older) %d certificate(s) and %d account(s) of this node's "
            "copy: restoring",
            len(stale.names),
            len(stale.accounts),
        )
        await _sleep(stop, rng.uniform(0, spread))
        if stop.is_set():
            return True
        # Again after the delay: what a faster node restored meanwhile is not sent at all.
        stale = await asyncio.to_thread(store.stale_in_redis)
        if stale:
            await asyncio.to_thread(store.restore, stale)
    except StoreError as exc:
        log.warning("local copies not restored to redis (next resync retries) error=%s", exc)
        return False
    return True


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
