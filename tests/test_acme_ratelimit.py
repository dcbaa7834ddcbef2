"""Rate limits and Retry-After. Pebble has no rate limits, so a small in-test HTTPS server
publishes Pebble's directory with `newOrder` pointing at itself: accounts and nonces stay real
(Pebble), the order is answered by the test server with a 429 `rateLimited` problem and a
Retry-After (seconds or an HTTP-date), or with an order whose polls say "wait" by Retry-After."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from aiohttp import web

from edged.acme.client import AcmeSession
from edged.acme.issue import OrderRequest, issue
from edged.acme.solvers import Http01Solver
from edged.config import AcmeSettings
from edged.errors import AcmeError
from edged.http01 import ChallengeBoard
from edged.renewal import CertStatus
from edged.store.files import FileStore
from tests.conftest import run_backend, run_edged
from tests.https_front import HttpsFront
from tests.pebble import Pebble, start_pebble
from tests.test_ari import pebble_directory
from tests.test_daemon_acme import wait_for

RATE_LIMITED = "urn:ietf:params:acme:error:rateLimited"
DETAIL = "too many new orders recently: see https://ca.test/docs/rate-limits"


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    p = start_pebble(tmp_path_factory.mktemp("pebble-ratelimit"))
    try:
        yield p
    finally:
        p.stop()


@dataclass
class CaFront:
    """The test server in front of Pebble: what it answers and what it saw."""

    url: str  # its directory
    ca_bundle: Path  # trusts it and Pebble's listener
    base: str
    retry_after: str | None = "120"  # on the 429; None = no header
    mode: str = "rate-limit"  # or "slow-order": newOrder works, the order says "wait"
    orders: list[float] = field(default_factory=list)  # monotonic time of each newOrder
    polls: list[float] = field(default_factory=list)  # monotonic time of each order poll

    def settings(self) -> AcmeSettings:
        return AcmeSettings(directory=self.url, ca_bundle=self.ca_bundle, email="ops@shop.test")


def nonce_headers() -> dict[str, str]:
    # The acme library wants a nonce on every answer to a POST; the test server does not check
    # them (a nonce of its own reaching Pebble would only cost a badNonce retry).
    return {"Replay-Nonce": secrets.token_urlsafe(16)}


@asynccontextmanager
async def ca_front(pebble: Pebble, tmp_path: Path) -> AsyncIterator[CaFront]:
    https = HttpsFront(tmp_path, pebble, "front")
    base = https.base
    bundle = https.trust
    pebble_dir = await asyncio.to_thread(pebble_directory, pebble)
    front = CaFront(f"{base}/dir", bundle, base)

    async def directory(_request: web.Request) -> web.Response:
        return web.json_response({**pebble_dir, "newOrder": f"{base}/new-order"})

    async def new_order(request: web.Request) -> web.Response:
        front.orders.append(time.monotonic())
        await request.read()
        if front.mode == "slow-order":
            order = {
                "status": "pending",
                "identifiers": [{"type": "dns", "value": "shop.test"}],
                "authorizations": [],
                "finalize": f"{base}/finalize/1",
            }
            headers = {**nonce_headers(), "Location": f"{base}/order/1"}
            return web.json_response(order, status=201, headers=headers)
        problem = {"type": RATE_LIMITED, "detail": DETAIL, "status": 429}
        headers = {"Retry-After": front.retry_after} if front.retry_after is not None else {}
        return web.json_response(
            problem, status=429, headers=headers, content_type="application/problem+json"
        )

    async def order(request: web.Request) -> web.Response:
        front.polls.append(time.monotonic())
        await request.read()
        body: dict[str, object] = {
            "status": "pending",
            "identifiers": [{"type": "dns", "value": "shop.test"}],
            "authorizations": [],
            "finalize": f"{base}/finalize/1",
        }
        headers = nonce_headers()
        if len(front.polls) == 1:
            headers["Retry-After"] = "1"
        else:
            body["status"] = "invalid"
            body["error"] = {"type": "urn:ietf:params:acme:error:serverInternal", "detail": "t"}
        return web.json_response(body, headers=headers)

    routes = [
        web.get("/dir", directory),
        web.post("/new-order", new_order),
        web.post("/order/1", order),
    ]
    async with https.serve(routes):
        yield front


def order_once(front: CaFront, store: FileStore) -> None:
    """Blocking: one issuance attempt for shop.test through the front."""
    session = AcmeSession(front.settings(), store)
    try:
        issue(
            session,
            OrderRequest("shop.test", ("shop.test",)),
            lambda: Http01Solver(ChallengeBoard()),
        )
    finally:
        session.close()


def http_date(when: datetime) -> str:
    return format_datetime(when, usegmt=True)


@pytest.mark.parametrize("form", ["seconds", "http-date", "absent"])
async def test_rate_limited_order_keeps_retry_after_and_problem(
    pebble: Pebble, tmp_path: Path, form: str
) -> None:
    async with ca_front(pebble, tmp_path) as front:
        before = datetime.now(UTC)
        expect = timedelta(seconds=120)
        if form == "http-date":
            front.retry_after = http_date(before + expect)
        elif form == "absent":
            front.retry_after = None
            expect = timedelta(hours=1)  # edged's own pause when the CA gives no time
        store = FileStore(tmp_path / "store")
        with pytest.raises(AcmeError) as info:
            await asyncio.to_thread(order_once, front, store)
        after = datetime.now(UTC)
    err = info.value
    assert len(front.orders) == 1  # a rate limit is not retried on the spot
    assert err.name == "shop.test"
    assert err.problem["type"] == RATE_LIMITED
    assert err.problem["detail"] == DETAIL
    assert err.message == f"creating the order: rateLimited: {DETAIL}"
    assert err.retry_after is not None
    # An HTTP-date has whole seconds: allow the one lost.
    slack = timedelta(seconds=1) if form == "http-date" else timedelta(0)
    assert before + expect - slack <= err.retry_after <= after + expect
    assert store.names() == []


async def test_daemon_waits_out_the_rate_limit(pebble: Pebble, tmp_path: Path) -> None:
    """Through the renewal loop: the limit lands in the state, nothing is ordered before it,
    not even with a 50 ms retry interval, and not after a restart."""
    async with run_backend() as backend, ca_front(pebble, tmp_path) as front:
        body = f"""
            [acme]
            directory = "{front.url}"
            ca_bundle = "{front.ca_bundle}"
            email = "ops@shop.test"
            retry_interval = "50ms"
            max_attempts = 50
            preflight = false
            [[site]]
            names = ["shop.test"]
            backend = "127.0.0.1:{backend.port}"
        """
        async with run_edged(tmp_path, body) as edged:
            renewer = edged.daemon.renewer
            await wait_for(lambda: renewer.states["shop.test"].attempts >= 1)
            first = datetime.now(UTC)
            state = renewer.states["shop.test"]
            assert state.status is CertStatus.PROCESSING
            assert state.not_before_retry is not None and state.next_try is not None
            assert timedelta(seconds=110) < state.not_before_retry - first <= timedelta(seconds=120)
            assert state.next_try >= state.not_before_retry
            assert state.last_error is not None
            assert state.last_error["type"] == RATE_LIMITED
            assert state.last_error["detail"] == DETAIL
            stored = json.loads((tmp_path / "store/state/shop.test.json").read_text())
            assert datetime.fromisoformat(stored["not_before_retry"]) == state.not_before_retry
            assert stored["last_error"]["type"] == RATE_LIMITED
            await asyncio.sleep(1.0)  # twenty retry intervals
            assert len(front.orders) == 1
            assert renewer.states["shop.test"].attempts == 1
            assert edged.daemon.counters.renewal_attempts["shop.test", "failure"] == 1
        # A restart resumes the limit from the stored state.
        async with run_edged(tmp_path, body) as edged:
            state = edged.daemon.renewer.states["shop.test"]
            assert state.not_before_retry is not None
            assert state.not_before_retry - datetime.now(UTC) > timedelta(seconds=110)
            await asyncio.sleep(0.5)
            assert len(front.orders) == 1


async def test_order_poll_honours_retry_after(pebble: Pebble, tmp_path: Path) -> None:
    """A poll answered "pending" with Retry-After: 1 is repeated no sooner than 1 s later
    (without it edged polls again after 50 ms)."""
    async with ca_front(pebble, tmp_path) as front:
        front.mode = "slow-order"
        with pytest.raises(AcmeError) as info:
            await asyncio.to_thread(order_once, front, FileStore(tmp_path / "store"))
    assert len(front.polls) == 2
    assert front.polls[1] - front.polls[0] >= 1.0
    assert front.polls[1] - front.polls[0] < 5.0
    assert "finalizing the order failed" in info.value.message
