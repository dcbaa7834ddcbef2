"""kill -9 of the node holding a name's lease in the middle of its order: three edged processes
share one redis-server and one Pebble; the holder keeps its lease past the TTL while alive,
another node finishes the order once the dead holder's lease expired, no second order is placed
while the lease lives, and every remaining node serves the result."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from edged.certs import parse_bundle
from edged.store.files import FileStore
from edged.store.redis import RedisStore
from tests.conftest import free_port, write_process_config
from tests.pebble import Pebble
from tests.redis_server import RedisServer
from tests.test_renewal_e2e import EDGED, ORDER, handshake_fp, wait_for

NAME = "shop.test"
PREFIX = "killfleet"
LEASE_TTL = 4.0  # seconds: short, so the test waits for its expiry in seconds


class Gate:
    """Pebble's HTTP-01 port. Closed, it accepts the validation connections and holds them
    unanswered, so the ordering node stays mid-order (polling a pending authorization). Open,
    it closes what it held (that validation fails) and forwards new connections to a node."""

    def __init__(self) -> None:
        self.target: int | None = None
        self.held = 0
        self.forwarded = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self.target is None:
            self.held += 1
            return  # kept open (referenced in _writers) until open() or close()
        self.forwarded += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers.append(up_writer)
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def open(self, target: int) -> None:
        self.close_all()
        self.target = target

    def close_all(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers.clear()


@contextlib.asynccontextmanager
async def run_gate(port: int) -> AsyncIterator[Gate]:
    gate = Gate()
    server = await asyncio.start_server(gate.handle, "127.0.0.1", port)
    try:
        yield gate
    finally:
        server.close()
        gate.close_all()
        await server.wait_closed()


@dataclass
class Node:
    name: str
    workdir: Path
    https: int
    http: int
    proc: asyncio.subprocess.Process | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.workdir / "edged.log"

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self) -> str:
        """The end of its log for a failure message."""
        return "\n".join(self.text().splitlines()[-30:])


def node_config(node: Node, pebble: Pebble, redis_url: str) -> Path:
    return write_process_config(
        node.workdir,
        f"""
        [acme]
        directory = "{pebble.directory}"
        ca_bundle = "{pebble.listener_ca}"
        email = "ops@shop.test"
        key_types = ["ecdsa-p256"]
        retry_interval = "1s"
        preflight = false
        [[site]]
        names = ["{NAME}", "www.{NAME}"]
        backend = "127.0.0.1:9"
        """,
        https=node.https,
        http=(node.http,),
        store=redis_url,
        edged_extra=(
            f'store_local = "local"\nredis_prefix = "{PREFIX}"\nlease_ttl = "{LEASE_TTL:g}s"'
        ),
    )


async def start(node: Node, pebble: Pebble, redis_url: str) -> None:
    config = node_config(node, pebble, redis_url)
    with node.log.open("wb") as out:
        node.proc = await asyncio.create_subprocess_exec(
            EDGED, "run", "--config", str(config), stdout=out, stderr=out
        )


def leaf_fingerprint(store: RedisStore) -> str | None:
    cert = store.load(NAME)
    if cert is None:
        return None
    pair = cert.pairs[0]
    return parse_bundle(pair.fullchain, pair.privkey, source=NAME).fingerprint


async def test_kill_9_of_the_lease_holder_mid_order(
    pebble: Pebble, redis_server: RedisServer, tmp_path: Path
) -> None:
    nodes = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        nodes.append(Node(name, tmp_path / name, free_port(), free_port()))
    raw = redis.Redis.from_url(redis_server.url)
    lease_key = f"{PREFIX}:lease:{NAME}"
    fleet = RedisStore(redis_server.url, FileStore(tmp_path / "reader"), prefix=PREFIX)
    async with run_gate(pebble.http_port) as gate:
        try:
            for node in nodes:
                await start(node, pebble, redis_server.url)
            # One node took the lease and is mid-order: Pebble is validating its challenge
            # (the connection held at the gate) and waits for the answer.
            await wait_for(lambda: gate.held >= 1, 30, "the first node's validation request")
            attempting = [n for n in nodes if f"renewal attempt name={NAME}" in n.text()]
            assert len(attempting) == 1, [n.tail() for n in nodes]
            holder = attempting[0]
            owner = raw.get(lease_key)
            assert owner is not None
            orders = pebble.count(ORDER)
            assert orders == 1
            # Alive, the holder keeps its lease past the TTL (extended every third of it):
            # still its own and still one order after 1.5 TTL mid-order.
            held_until = time.monotonic() + 1.5 * LEASE_TTL
            while time.monotonic() < held_until:
                assert raw.get(lease_key) == owner
                await asyncio.sleep(0.1)
            assert pebble.count(ORDER) == orders

            assert holder.proc is not None
            holder.proc.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(holder.proc.wait(), 10) == -signal.SIGKILL
            killed = time.monotonic()
            rest = [n for n in nodes if n is not holder]
            gate.open(rest[0].http)  # validations now reach a node (any node answers any token)

            # While the dead node's lease lives, nobody orders: sample the order count, then
            # the lease (a count read before a look that still finds the lease was read while
            # it lived).
            samples = 0
            while True:
                count = pebble.count(ORDER)
                if raw.get(lease_key) != owner:
                    break
                assert count == orders, "a second order while the dead node's lease lived"
                samples += 1
                assert time.monotonic() - killed < 30, "the dead node's lease never expired"
                await asyncio.sleep(0.05)
            assert samples > 0
            lived = time.monotonic() - killed

            # Another node takes over after the TTL and finishes: one more order, one
            # certificate, served by every remaining node.
            await wait_for(lambda: leaf_fingerprint(fleet) is not None, 60, "the certificate")

            def finished() -> list[Node]:  # logged just after the store write
                return [n for n in rest if f"certificate obtained name={NAME}" in n.text()]

            await wait_for(lambda: finished(), 20, "the success in a node's log")
            assert len(finished()) == 1, [n.tail() for n in rest]
            expected = leaf_fingerprint(fleet)
            (tmp_path / "root.pem").write_bytes(pebble.root_pem())
            ctx = ssl.create_default_context(cafile=str(tmp_path / "root.pem"))

            deadline = time.monotonic() + 20
            for node in rest:  # off the loop: the gate runs on it
                while await asyncio.to_thread(handshake_fp, node.https, ctx) != expected:
                    assert time.monotonic() < deadline, f"node {node.name} serves another cert"
                    await asyncio.sleep(0.05)
            assert pebble.count(ORDER) == orders + 1
            assert gate.forwarded >= 1  # Pebble validated the new order against a live node
            # The finishing node records its success after its own reload (served first).
            await wait_for(
                lambda: (
                    (s := fleet.load_state(NAME)) is not None
                    and s["status"] == "active"
                    and not s["in_flight"]
                ),
                20,
                "the fleet's state to record the success",
            )
            print(
                f"lease lived {lived:.1f}s after the kill (ttl {LEASE_TTL:g}s, {samples} "
                f"samples, 1 order); taken over by node {finished()[0].name}"
            )
        finally:
            for node in nodes:
                if node.proc is not None and node.proc.returncode is None:
                    node.proc.send_signal(signal.SIGTERM)
                    try:
                        await asyncio.wait_for(node.proc.wait(), 15)
                    except TimeoutError:
                        node.proc.kill()
                        await node.proc.wait()
            raw.close()
            fleet.close()
    for node in rest:  # the survivors shut down cleanly
        assert node.proc is not None and node.proc.returncode == 0, node.tail()
