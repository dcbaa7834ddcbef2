"""Three edge nodes sharing one Redis and one Pebble: one order per name, HTTP-01 answered by a
node that did not order, every node serving the new certificate within a second, Redis outages
that change nothing for serving, a Redis restarted empty getting the nodes' copies back, and a
node on a TLS Redis."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
import time
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from aiohttp import web

from edged.certs import parse_bundle
from edged.metrics import build_registry, render
from edged.operations import DaemonOperations
from edged.renewal import CertStatus
from edged.store.files import FileStore, account_dirname
from edged.store.redis import RedisStore, RedisTls
from tests.conftest import Edged, free_port, run_backend, run_cmd, run_edged
from tests.https_front import close_after
from tests.pebble import Pebble
from tests.pki import make_ca, make_leaf
from tests.redis_server import RedisServer, RedisTlsFiles
from tests.test_daemon_acme import acme_body, wait_for
from tests.test_redis_store import bundle
from tests.test_reload import EDGED


def site_only(backend_port: int) -> str:
    return f"""
        [[site]]
        names = ["shop.test", "www.shop.test"]
        backend = "127.0.0.1:{backend_port}"
    """


async def start_fleet(
    stack: AsyncExitStack, tmp_path: Path, redis_server: RedisServer, pebble: Pebble, backend: int
) -> list[Edged]:
    """Node a holds Pebble's HTTP-01 port and has no [acme] (it only serves and answers
    challenges from Redis); nodes b and c have [acme] and race for the lease."""
    nodes = []
    for node in ("a", "b", "c"):
        workdir = tmp_path / node
        workdir.mkdir()
        body = site_only(backend) if node == "a" else acme_body(pebble, backend)
        http = pebble.http_port if node == "a" else free_port()
        nodes.append(
            await stack.enter_async_context(
                run_edged(
                    workdir,
                    body,
                    http=(http,),
                    store=redis_server.url,
                    edged_extra='store_local = "local"\nredis_prefix = "fleet1"',
                )
            )
        )
    return nodes


async def test_one_order_shared_tokens_and_propagation(
    pebble: Pebble, redis_server: RedisServer, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        backend = await stack.enter_async_context(run_backend())
        a, b, c = await start_fleet(stack, tmp_path, redis_server, pebble, backend.port)
        await wait_for(lambda: all(n.daemon.serving("shop.test") is not None for n in (a, b, c)))
        prints = {n.daemon.serving("shop.test").fingerprint for n in (a, b, c)}  # type: ignore[union-attr]
        assert len(prints) == 1  # every node serves the same certificate
        # One order per key type for the fleet, not one per node.
        assert pebble.count('Added order "') == 2
        # Node a never ordered, yet Pebble's validation reached only node a's port: it
        # answered from the tokens the ordering node put in Redis.
        assert a.daemon.http01.answered >= 2
        orderer = b if b.daemon.counters.renewal_attempts["shop.test", "success"] else c
        assert orderer.daemon.http01.answered == 0
        await wait_for(
            lambda: all(
                n.daemon.renewer.states["shop.test"].status is CertStatus.ACTIVE for n in (b, c)
            )
        )

        # Status on any node says which node issued it (and who holds a lease, while one runs).
        ops = DaemonOperations(c.daemon)
        assert ops.cert("shop.test")["issued_by"] == socket.gethostname()
        await wait_for(lambda: ops.cert("shop.test")["lease"] == "")  # released after the order

        # A forced renewal on one node: every node serves the new certificate within 1 s.
        before = next(iter(prints))
        other = c if orderer is b else b
        other.daemon.renewer.force("shop.test")
        await wait_for(
            lambda: (s := other.daemon.serving("shop.test")) is not None and s.fingerprint != before
        )
        changed = time.monotonic()
        new = other.daemon.serving("shop.test")
        assert new is not None
        await wait_for(
            lambda: all(
                (s := n.daemon.serving("shop.test")) is not None
                and s.fingerprint == new.fingerprint
                for n in (a, b, c)
            ),
            limit=1.0,
        )
        assert time.monotonic() - changed < 1.0
        assert pebble.count('Added order "') == 4


async def settled(a: Edged, b: Edged, c: Edged) -> None:
    """The fleet's order is over (states saved, lease released on the nodes that did not
    order) and every node serves the same certificate."""
    await wait_for(
        lambda: all(
            n.daemon.renewer.states["shop.test"].status is CertStatus.ACTIVE
            and not n.daemon.renewer.lease_holders
            for n in (b, c)
        )
    )
    await wait_for(
        lambda: (
            len({getattr(n.daemon.serving("shop.test"), "fingerprint", None) for n in (a, b, c)})
            == 1
        )
    )


async def test_redis_outage_keeps_serving_and_resyncs(
    pebble: Pebble, redis_server: RedisServer, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        backend = await stack.enter_async_context(run_backend())
        a, b, c = await start_fleet(stack, tmp_path, redis_server, pebble, backend.port)
        # Settled: the order is over (states saved, lease released) and every node serves it.
        await settled(a, b, c)
        served = b.daemon.serving("shop.test")
        assert served is not None
        redis_server.stop()
        # Serving goes on; a reload while Redis is down keeps the certificate (local copy), and
        # the outage shows in edged_store_available.
        assert await b.daemon.reload("signal") in (True, False)
        still = b.daemon.serving("shop.test")
        assert still is not None and still.fingerprint == served.fingerprint
        assert not b.daemon.store_available()
        assert b"edged_store_available 0.0" in render(build_registry(b.daemon, process=False))
        # A node restarted while Redis is down starts from its local copy.
        # (Its own config and a copy of node a's local store: node a, restarted elsewhere; two
        # processes never write one directory store.)
        (tmp_path / "a2").mkdir()
        shutil.copytree(tmp_path / "a" / "local", tmp_path / "a2" / "local")
        restarted = await stack.enter_async_context(
            run_edged(
                tmp_path / "a2",
                site_only(backend.port),
                http=(free_port(),),
                store=redis_server.url,
                edged_extra='store_local = "local"\nredis_prefix = "fleet1"',
            )
        )
        again = restarted.daemon.serving("shop.test")
        assert again is not None and again.fingerprint == served.fingerprint
        # Redis comes back (empty, like a restart without persistence): nodes keep serving.
        redis_server.start_again()
        # The pub/sub follower reconnects and resyncs (within its backoff and a 0-5 s spread).
        await wait_for(lambda: all(n.daemon.store_available() for n in (a, b, c, restarted)), 20)
        for node in (a, b, c, restarted):
            s = node.daemon.serving("shop.test")
            assert s is not None and s.fingerprint == served.fingerprint


async def test_redis_restarted_empty_gets_certs_and_account_back(
    pebble: Pebble, redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis restarts without its data: the nodes write their local copies back (one node per
    name, after a random delay), the account is the fleet's own again (not a new one), and a
    node started afterwards with an empty local directory serves the certificate from Redis."""
    caplog.set_level(logging.INFO)
    async with AsyncExitStack() as stack:
        backend = await stack.enter_async_context(run_backend())
        a, b, c = await start_fleet(stack, tmp_path, redis_server, pebble, backend.port)
        await settled(a, b, c)
        served = a.daemon.serving("shop.test")
        assert served is not None
        raw = redis_server.client()
        cert_key = "fleet1:cert:shop.test"
        account_key = f"fleet1:account:{account_dirname(pebble.directory)}"
        account = raw.get(account_key)
        assert account is not None and raw.get(cert_key) is not None
        raw.close()
        orders = pebble.count('Added order "')

        redis_server.stop()
        redis_server.start_again()  # empty: no persistence
        raw = redis_server.client()
        assert raw.get(cert_key) is None
        # Back within the reconnect backoff plus two spreads of up to 5 s each.
        await wait_for(lambda: raw.get(cert_key) is not None and raw.get(account_key), 40)
        assert raw.get(account_key) == account  # the fleet's account, not a new registration
        assert raw.smembers("fleet1:names") == {b"shop.test"}

        def restored() -> list[str]:  # logged just after each write
            return [
                r.getMessage()
                for r in caplog.records
                if "certificate restored to redis" in r.getMessage()
            ]

        await wait_for(lambda: restored(), 10)
        assert len(restored()) == 1, restored()  # one node wrote it; the others found it there
        raw.close()

        (tmp_path / "d").mkdir()
        fresh = await stack.enter_async_context(
            run_edged(
                tmp_path / "d",
                site_only(backend.port),
                http=(free_port(),),
                store=redis_server.url,
                edged_extra='store_local = "local"\nredis_prefix = "fleet1"',
            )
        )
        again = fresh.daemon.serving("shop.test")
        assert again is not None and again.fingerprint == served.fingerprint
        for node in (a, b, c):
            s = node.daemon.serving("shop.test")
            assert s is not None and s.fingerprint == served.fingerprint
        assert pebble.count('Added order "') == orders  # nothing was ordered again


async def test_fleet_over_tls_redis(
    redis_tls_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """rediss:// with a client certificate: a node serves what Redis holds and follows its
    changes over TLS pub/sub; a node with the wrong CA names the URL and the CA file and
    serves its local copy."""
    files = redis_tls_server.tls
    assert files is not None
    tls_keys = (
        f'redis_ca_file = "{files.ca}"\nredis_cert_file = "{files.client_cert}"\n'
        f'redis_key_file = "{files.client_key}"'
    )
    shared = RedisStore(
        redis_tls_server.url,
        FileStore(tmp_path / "writer"),
        tls=RedisTls(files.ca, files.client_cert, files.client_key),
    )
    first = bundle("shop.test", "v1")
    shared.save(replace(first, source="upload"))
    async with AsyncExitStack() as stack:
        backend = await stack.enter_async_context(run_backend())
        (tmp_path / "n").mkdir()
        node = await stack.enter_async_context(
            run_edged(
                tmp_path / "n",
                site_only(backend.port),
                store=redis_tls_server.url,
                edged_extra=f'store_local = "local"\n{tls_keys}',
            )
        )
        served = node.daemon.serving("shop.test")
        assert served is not None and node.daemon.store_available()
        second = replace(bundle("shop.test", "v2"), source="upload")
        await asyncio.to_thread(shared.save, second)
        await wait_for(
            lambda: (
                (s := node.daemon.serving("shop.test")) is not None
                and s.fingerprint != served.fingerprint
            )
        )

        other = RedisTlsFiles.create(tmp_path / "other", "Some Other CA")
        wrong_keys = tls_keys.replace(str(files.ca), str(other.ca))
        (tmp_path / "w").mkdir()
        shutil.copytree(tmp_path / "n" / "local", tmp_path / "w" / "local")
        wrong = await stack.enter_async_context(
            run_edged(
                tmp_path / "w",
                site_only(backend.port),
                store=redis_tls_server.url,
                edged_extra=f'store_local = "local"\n{wrong_keys}',
            )
        )
        assert wrong.daemon.serving("shop.test") is not None  # the local copy
        assert not wrong.daemon.store_available()
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any(
            f"rediss://localhost:{redis_tls_server.port}" in m
            and str(other.ca) in m
            and "TLS certificate verification failed" in m
            for m in errors
        ), errors
    shared.close()


async def test_a_reload_into_and_out_of_a_fleet_switches_every_role_of_the_store(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A reload that changes edged.store from a directory to Redis (and back) switches all
    that the store does: other nodes' certificates arrive as they are published, challenges
    are shared through Redis; back on a directory, nothing is shared or followed."""
    async with AsyncExitStack() as stack:
        backend = await stack.enter_async_context(run_backend())
        a = await stack.enter_async_context(run_edged(tmp_path, site_only(backend.port)))
        assert a.daemon.board.shared is None and a.daemon.alpn_board.shared is None
        text = a.config_path.read_text()
        fleet = f'store = "{redis_server.url}"\nstore_local = "local"\nredis_prefix = "moved"'
        assert 'store = "store"' in text
        a.config_path.write_text(text.replace('store = "store"', fleet))
        assert await a.daemon.reload("signal")
        store = a.daemon.store
        assert isinstance(store, RedisStore)
        assert a.daemon.board.shared is store and a.daemon.alpn_board.shared is store
        assert a.daemon.serving("shop.test") is None
        other = RedisStore(redis_server.url, FileStore(tmp_path / "other"), prefix="moved")
        await asyncio.to_thread(other.save, bundle("shop.test", "published"))
        await wait_for(lambda: a.daemon.serving("shop.test") is not None)  # followed
        following = a.daemon._following
        assert following is not None and not following.done()

        a.config_path.write_text(text)
        assert await a.daemon.reload("signal")
        assert not isinstance(a.daemon.store, RedisStore)
        assert a.daemon.board.shared is None and a.daemon.alpn_board.shared is None
        await wait_for(following.done)
        assert a.daemon._following is None


async def test_a_corrupt_certificate_in_redis_keeps_the_node_serving(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A value no edged writes (arrays nested deeper than json decodes) published for a name,
    one without a certificate yet and one served: the node logs it and keeps serving what it
    served (its local copy); a full reload and a restart do too."""
    body = site_only(9) + '[[site]]\nnames = ["new.test"]\nbackend = "127.0.0.1:9"\n'
    extra = 'store_local = "local"\nredis_prefix = "corrupt"'
    other = RedisStore(redis_server.url, FileStore(tmp_path / "other"), prefix="corrupt")
    await asyncio.to_thread(other.save, bundle("shop.test", "good"))
    raw = other.client
    async with run_edged(tmp_path, body, store=redis_server.url, edged_extra=extra) as a:
        served = a.daemon.serving("shop.test")
        assert served is not None
        # The messages below need the node's follower subscribed (its first resync reads
        # only what changed through edged's writers, not these raw values).
        await wait_for(lambda: dict(raw.pubsub_numsub(other.channel)).get(other.channel.encode()))
        for name in ("new.test", "shop.test"):
            reloads = sum(dict(a.daemon.counters.reloads).values())
            await asyncio.to_thread(raw.set, f"corrupt:cert:{name}", b"[" * 100_000)
            await asyncio.to_thread(raw.publish, other.channel, name)
            await wait_for(lambda r=reloads: sum(dict(a.daemon.counters.reloads).values()) > r)
            assert not a.task.done()
        assert a.daemon.serving("shop.test") == served  # the same, from the local copy
        assert a.daemon.serving("new.test") is None
        await a.daemon.reload("signal")  # False: it reports the corrupt entry of new.test
        assert a.daemon.serving("shop.test") == served
        assert not a.task.done()
    # A restart reads the same values: it starts, serving the local copy.
    async with run_edged(tmp_path, body, store=redis_server.url, edged_extra=extra) as a:
        assert not a.task.done()
        found = a.daemon.serving("shop.test")
        assert found is not None and found.fingerprint == served.fingerprint


async def test_a_rotated_redis_password_reaches_the_store_at_the_reload(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Redis's password is rotated (old connections stay authenticated, new ones need the new
    one) and the password file rewritten: the reload the file change brings makes the node's
    next connections use the new password."""
    admin = redis_server.client()
    admin.config_set("requirepass", "old-secret")
    admin = redis.Redis.from_url(redis_server.url, password="old-secret", socket_timeout=2)
    secret = tmp_path / "redis.pass"
    secret.write_text("old-secret\n")
    extra = f'store_local = "local"\nredis_prefix = "rotate"\nredis_password_file = "{secret}"'
    async with run_edged(tmp_path, site_only(9), store=redis_server.url, edged_extra=extra) as a:
        store = a.daemon.store
        assert isinstance(store, RedisStore)
        assert await asyncio.to_thread(store.names) == []
        admin.config_set("requirepass", "new-secret")
        secret.write_text("new-secret\n")
        assert await a.daemon.reload("signal")
        admin = redis.Redis.from_url(redis_server.url, password="new-secret", socket_timeout=2)
        admin.client_kill_filter(_type="normal", skipme=True)  # every connection made anew
        store = a.daemon.store
        assert isinstance(store, RedisStore)
        assert store.available
        assert await asyncio.to_thread(store.names) == []  # connects with the new password
        assert store.available


async def test_a_resync_does_not_apply_a_config_edit_staged_for_sighup(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """With edged.watch = false an edit waits for SIGHUP: the fleet's resyncs (every 60 s,
    after each reconnect) read the store again, not the config file."""
    extra = 'store_local = "local"\nredis_prefix = "staged"\nwatch = false'
    async with run_edged(tmp_path, site_only(9), store=redis_server.url, edged_extra=extra) as a:
        text = a.config_path.read_text()
        a.config_path.write_text(
            text + '\n[[site]]\nnames = ["staged.test"]\nbackend = "127.0.0.1:9"\n'
        )
        assert await a.daemon.reload("resync")
        assert a.daemon.config is not None and a.daemon.config.site_for("staged.test") is None
        assert await a.daemon.reload("signal")
        assert a.daemon.config.site_for("staged.test") is not None


async def test_edged_rollback_rolls_the_fleet_back_through_redis(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """`edged rollback NAME` with a Redis store swaps the fleet's live and previous versions in
    Redis (not a directory store it does not have): every node serves the previous one."""
    writer = RedisStore(redis_server.url, FileStore(tmp_path / "writer"), prefix="rb")
    first, second = bundle("shop.test", "v1"), bundle("shop.test", "v2")
    writer.save(first)
    writer.save(second)
    prints = {
        cn: parse_bundle(c.pairs[0].fullchain, c.pairs[0].privkey).fingerprint
        for cn, c in (("v1", first), ("v2", second))
    }

    def serve(nodes: tuple[Edged, ...], cn: str) -> bool:
        return all(
            getattr(n.daemon.serving("shop.test"), "fingerprint", None) == prints[cn] for n in nodes
        )

    extra = 'store_local = "local"\nredis_prefix = "rb"'
    async with AsyncExitStack() as stack:
        nodes = []
        for node in ("a", "b"):
            (tmp_path / node).mkdir()
            nodes.append(
                await stack.enter_async_context(
                    run_edged(
                        tmp_path / node, site_only(9), store=redis_server.url, edged_extra=extra
                    )
                )
            )
        a, b = nodes
        await wait_for(lambda: serve((a, b), "v2"))
        out = await run_cmd(EDGED, "rollback", "shop.test", "--config", str(a.config_path))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "rolled back to the previous version" in out.stdout
        await wait_for(lambda: serve((a, b), "v1"), limit=2)
        again = writer.load_previous("shop.test")
        assert again is not None and again.pairs == second.pairs  # rolled away from, kept
        # Each node's daemon keeps its local copy (served in a Redis outage) in step.
        local = FileStore(tmp_path / "a" / "local")
        await wait_for(lambda: getattr(local.load("shop.test"), "pairs", None) == first.pairs)
        # And back again, from the other node.
        out = await run_cmd(EDGED, "rollback", "shop.test", "--config", str(b.config_path))
        assert out.returncode == 0, out.stdout + out.stderr
        await wait_for(lambda: serve((a, b), "v2"), limit=2)
    writer.close()


async def test_a_failed_attempt_is_the_fleets_the_others_do_not_order_again(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The fleet's renewal of a name fails (the CA answers 503 after 2 s): the lease holder
    records the failed attempt and the other node adopts it, so the fleet makes one attempt
    per retry_interval with one attempt counter. The others adopted only successes: each
    took the lease in turn and ordered again, every node counting its own attempts (and
    sending its own "failed" webhook)."""

    async def overloaded(_request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(status=503, text="overloaded")

    app = web.Application(middlewares=[close_after])
    app.router.add_get("/dir", overloaded)
    runner = web.AppRunner(app)
    await runner.setup()
    ca, ca_port = make_ca("Overloaded CA"), free_port()
    leaf = make_leaf(ca, ["localhost"])
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    (tmp_path / "leaf.pem").write_bytes(leaf.cert_pem)
    (tmp_path / "leaf.key").write_bytes(leaf.key_pem)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    await web.TCPSite(runner, "127.0.0.1", ca_port, ssl_context=tls).start()
    body = f"""
        [acme]
        directory = "https://localhost:{ca_port}/dir"
        ca_bundle = "{tmp_path / "ca.pem"}"
        email = "ops@shop.test"
        retry_interval = "10m"
        preflight = false
    """ + site_only(9)
    try:
        async with AsyncExitStack() as stack:
            nodes = []
            for node in ("b", "c"):
                (tmp_path / node).mkdir()
                nodes.append(
                    await stack.enter_async_context(
                        run_edged(
                            tmp_path / node,
                            body,
                            store=redis_server.url,
                            edged_extra='store_local = "local"\nredis_prefix = "failing"',
                        )
                    )
                )
            b = nodes[0]

            def failures() -> int:
                return sum(
                    n.daemon.counters.renewal_attempts["shop.test", "failure"] for n in nodes
                )

            await wait_for(lambda: failures() >= 1)
            # The other node looks again 5 s after the lease was taken: past that, and past
            # an attempt of its own had it made one (2 s), it has ordered nothing.
            await asyncio.sleep(8)
            assert failures() == 1
            states = [n.daemon.renewer.states["shop.test"] for n in nodes]
            assert all(s.attempts == 1 and s.status is CertStatus.PROCESSING for s in states)
            assert states[0].next_try == states[1].next_try
            assert "HTTP 503" in str(states[1].last_error)
            assert b.daemon.renewer.fallback_active("shop.test") is False  # no certificate
    finally:
        await runner.cleanup()


async def test_an_upload_on_one_node_ends_acme_management_on_every_node(
    pebble: Pebble, redis_server: RedisServer, tmp_path: Path
) -> None:
    """`edged upload` on node b hands the site to the operator on every node: node c, which
    read the upload through a reload of that name alone (another node's write), went on
    planning ACME renewals of the uploaded certificate until a full reload, and would order
    one (its certificate dropped, the attempt failed, again and again). Handed back with
    `edged upload --remove` on node b, node c manages it again."""
    ca = make_ca("Own CA")
    own = make_leaf(ca, ["shop.test", "www.shop.test"], cn="uploaded")
    async with AsyncExitStack() as stack:
        backend = await stack.enter_async_context(run_backend())
        a, b, c = await start_fleet(stack, tmp_path, redis_server, pebble, backend.port)
        await settled(a, b, c)
        await DaemonOperations(b.daemon).upload("shop.test", own.cert_pem, own.key_pem)
        assert "shop.test" not in b.daemon.renewer.states
        await wait_for(lambda: "shop.test" not in c.daemon.renewer.states)
        served = c.daemon.serving("shop.test")
        assert (
            served is not None
            and served.fingerprint == parse_bundle(own.cert_pem, own.key_pem).fingerprint
        )

        await DaemonOperations(b.daemon).unmanage_upload("shop.test")
        await wait_for(lambda: "shop.test" in c.daemon.renewer.states)
