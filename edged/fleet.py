"""Following the fleet's changes: a node that stores a new certificate publishes its name; every
node reloads (fetch, validate, swap) when it hears it, and resyncs periodically and after a Redis
outage in case it missed a message. Reconnects back off with jitter so a Redis restart does not
bring every node back in the same second.

Before each resync a node checks whether Redis lacks what its local copy holds (Redis restarted
without persistence, flushed, or restored from an old dump) and writes it back: after a random
delay, and only where Redis still lacks it or holds an older version, so the first node to get
there restores a name and the others find nothing left to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

import redis.asyncio as aioredis

from edged.errors import StoreError
from edged.store.redis import RedisStore

log = logging.getLogger("edged.fleet")

RESYNC_EVERY = 60.0  # seconds; catches messages missed while subscribed
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
    resync_every: float = RESYNC_EVERY,
    restore_spread: float = RESTORE_SPREAD,
    rng: random.Random | None = None,
) -> None:
    """Call on_cert(name) (without it, on_change("store")) for every published certificate
    change, on_state(name) for a renewal state another node saved, on_change("resync")
    periodically and after each (re)subscribe, each time after restoring what Redis lost (see
    the module doc). Returns when `stop` is set; never raises for Redis trouble."""
    rng = rng or random.Random()
    delay = BACKOFF_FIRST
    failed = False
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
            # load and the subscription would otherwise wait for the periodic resync.
            await restore_local_copies(store, stop, rng, restore_spread)
            on_change("resync")
            failed = False
            delay = BACKOFF_FIRST
            loop = asyncio.get_running_loop()
            next_resync = loop.time() + resync_every
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
                    await restore_local_copies(store, stop, rng, restore_spread)
                    on_change("resync")
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
                await asyncio.wait_for(pubsub.aclose(), 2)  # type: ignore[no-untyped-call,unused-ignore]
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 2)


async def restore_local_copies(
    store: RedisStore, stop: asyncio.Event, rng: random.Random, spread: float
) -> None:
    """Write back what Redis lost, after a random delay of up to `spread` seconds. Only reads
    (one script call) when nothing is missing, which is nearly always."""
    try:
        stale = await asyncio.to_thread(store.stale_in_redis)
        if not stale:
            return
        log.warning(
            "redis lacks (or holds older) %d certificate(s) and %d account(s) of this node's "
            "copy: restoring",
            len(stale.names),
            len(stale.accounts),
        )
        await _sleep(stop, rng.uniform(0, spread))
        if stop.is_set():
            return
        # Again after the delay: what a faster node restored meanwhile is not sent at all.
        stale = await asyncio.to_thread(store.stale_in_redis)
        if stale:
            await asyncio.to_thread(store.restore, stale)
    except StoreError as exc:
        log.warning("local copies not restored to redis (next resync retries) error=%s", exc)


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
