"""ARI (RFC 9773) in the renewal loop. Pebble 2.4 has no renewalInfo, so a small in-test HTTPS
server publishes a directory that is Pebble's plus `renewalInfo` (served by the test server) and
a `newOrder` the test server records (to see `replaces`) and refuses, or, with `forward_to`,
refuses only orders with `replaces` (as a CA that does not accept that replacement) and passes
the others on to Pebble, signed again with the account edged registered."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from acme import client as acme_client
from acme import messages
from aiohttp import web
from josepy import jwa

from edged.acme.client import load_account_key
from edged.certs import CertBundle
from edged.operations import DaemonOperations
from edged.renewal import CertStatus, ari_cert_id
from edged.renewer import ARI_RETRY
from edged.store.files import FileStore
from tests.conftest import Edged, run_backend, run_edged
from tests.https_front import HttpsFront
from tests.pebble import Pebble
from tests.test_daemon_acme import acme_body, wait_for


@dataclass
class AriServer:
    url: str
    ca_bundle: Path
    window: tuple[datetime, datetime]
    # Certificate id → its own window (others get `window`).
    windows: dict[str, tuple[datetime, datetime]] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)  # certificate ids answered with a 500
    retry_after: str = "3600"
    explanation: str = ""  # explanationURL, when set
    ari_requests: list[str] = field(default_factory=list)
    orders: list[dict[str, object]] = field(default_factory=list)
    # Set: renewalInfo answers only once it is released (a hanging endpoint).
    ari_hold: asyncio.Event | None = None
    # Set: orders without `replaces` go on to Pebble, signed with the account edged keeps in
    # this store; orders with it get `refusal` (HTTP status, ACME problem type, detail).
    forward_to: Path | None = None
    refusal: tuple[int, str, str] = (500, "serverInternal", "test CA")
    # With forward_to: orders with `replaces` go on to Pebble too (a CA that takes them).
    accept_replaces: bool = False


def forward_order(
    pebble: Pebble, store: Path, directory: str, payload: dict[str, object]
) -> tuple[int, dict[str, str], bytes]:
    """POST `payload` (a newOrder) to Pebble as the account edged registered at `directory`:
    the JWS edged signed names the test server's URL, which Pebble would refuse."""
    found = FileStore(store).load_account(directory)
    assert found is not None, "edged has no account yet"
    account, key_pem = found
    net = acme_client.ClientNetwork(
        load_account_key(key_pem),
        account=messages.RegistrationResource(
            uri=str(account["uri"]), body=messages.Registration()
        ),
        alg=jwa.ES256,
        verify_ssl=str(pebble.listener_ca),  # type: ignore[arg-type]
    )
    try:
        pebble_dir = pebble_directory(pebble)
        response = net.post(
            str(pebble_dir["newOrder"]),
            messages.NewOrder.from_json(payload),
            new_nonce_url=str(pebble_dir["newNonce"]),
        )
        headers = {k: response.headers[k] for k in ("Location", "Replay-Nonce")}
        return response.status_code, headers, response.content
    finally:
        net.session.close()


def pebble_directory(pebble: Pebble) -> dict[str, object]:
    data: dict[str, object] = requests.get(
        pebble.directory, verify=str(pebble.listener_ca), timeout=5
    ).json()
    return data


@asynccontextmanager
async def ari_server(pebble: Pebble, tmp_path: Path) -> AsyncIterator[AriServer]:
    front = HttpsFront(tmp_path, pebble, "ari")
    base = front.base
    bundle = front.trust
    pebble_dir = await asyncio.to_thread(pebble_directory, pebble)
    now = datetime.now(UTC)
    server = AriServer(f"{base}/dir", bundle, (now + timedelta(days=10), now + timedelta(days=11)))

    async def directory(_request: web.Request) -> web.Response:
        return web.json_response(
            {**pebble_dir, "renewalInfo": f"{base}/ari", "newOrder": f"{base}/new-order"}
        )

    async def renewal_info(request: web.Request) -> web.Response:
        cert_id = request.match_info["id"]
        server.ari_requests.append(cert_id)
        if server.ari_hold is not None:
            await server.ari_hold.wait()
        if cert_id in server.broken:
            return web.Response(status=500, text="renewal info unavailable")
        start, end = server.windows.get(cert_id, server.window)
        body: dict[str, object] = {
            "suggestedWindow": {"start": start.isoformat(), "end": end.isoformat()}
        }
        if server.explanation:
            body["explanationURL"] = server.explanation
        return web.json_response(body, headers={"Retry-After": server.retry_after})

    async def new_order(request: web.Request) -> web.Response:
        jws = await request.json()
        payload = jws["payload"] + "=" * (-len(jws["payload"]) % 4)
        order = json.loads(base64.urlsafe_b64decode(payload))
        server.orders.append(order)
        if server.forward_to is not None and ("replaces" not in order or server.accept_replaces):
            status, headers, body = await asyncio.to_thread(
                forward_order, pebble, server.forward_to, server.url, order
            )
            return web.Response(
                body=body, status=status, headers=headers, content_type="application/json"
            )
        status, kind, detail = server.refusal
        problem = {"type": f"urn:ietf:params:acme:error:{kind}", "detail": detail, "status": status}
        return web.json_response(problem, status=status, content_type="application/problem+json")

    routes = [
        web.get("/dir", directory),
        web.get("/ari/{id}", renewal_info),
        web.post("/new-order", new_order),
    ]
    async with front.serve(routes):
        yield server


def with_directory(body: str, pebble: Pebble, server: AriServer) -> str:
    return body.replace(pebble.directory, server.url).replace(
        str(pebble.listener_ca), str(server.ca_bundle)
    )


@asynccontextmanager
async def restarted_with_ari(
    tmp_path: Path, body: str, pebble: Pebble, server: AriServer
) -> AsyncIterator[Edged]:
    """edged again on the same store, its renewal schedule forgotten, the directory now
    `server`'s (with renewalInfo)."""
    (tmp_path / "store" / "state" / "shop.test.json").unlink()
    async with run_edged(
        tmp_path, with_directory(body, pebble, server), http=(pebble.http_port,)
    ) as edged:
        yield edged


async def past_window_for(served: CertBundle) -> tuple[datetime, datetime]:
    """A renewal window for `served` that has closed by the time this returns: from two hours
    before it was issued to a second after."""
    end = served.not_before + timedelta(seconds=1)
    await asyncio.sleep(max(0.0, (end - datetime.now(UTC)).total_seconds()))
    return served.not_before - timedelta(hours=2), end


async def test_ari_window_retry_after_and_replaces(pebble: Pebble, tmp_path: Path) -> None:
    async with run_backend() as backend, ari_server(pebble, tmp_path) as ari:
        body = acme_body(pebble, backend.port)
        # Issue with plain Pebble (no ARI): the schedule decides, nothing is sent to ARI.
        async with run_edged(tmp_path, body, http=(pebble.http_port,)) as edged:
            await wait_for(lambda: edged.daemon.serving("shop.test") is not None)
            served = edged.daemon.serving("shop.test")
            assert served is not None
            state = edged.daemon.renewer.states["shop.test"]
            assert state.ari is None and state.next_try is not None
            assert state.next_try < served.not_after - timedelta(days=29)  # renew_before_days
            both = edged.daemon.served("shop.test")
        cert_id = ari_cert_id(served.leaf)

        # Same store, directory with renewalInfo: the CA's window wins, Retry-After paces.
        async with restarted_with_ari(tmp_path, body, pebble, ari) as edged:
            renewer = edged.daemon.renewer
            await wait_for(lambda: renewer.states["shop.test"].ari is not None)
            state = renewer.states["shop.test"]
            # Each key type's certificate is asked for (the same window here).
            assert sorted(ari.ari_requests) == sorted(ari_cert_id(b.leaf) for b in both)
            assert state.next_try is not None and state.ari is not None
            assert ari.window[0] <= state.next_try <= ari.window[1]
            now = datetime.now(UTC)
            assert timedelta(minutes=59) < state.ari.next_check - now <= timedelta(hours=1)
            assert ari.orders == []  # not due yet

        # A window that has passed: renew now, and say which certificate this replaces. (It
        # closed after the certificate was issued: an earlier window is not one for it.)
        ari.window = await past_window_for(served)
        async with restarted_with_ari(tmp_path, body, pebble, ari) as edged:
            await wait_for(lambda: len(ari.orders) >= 1)
            assert ari.orders[0]["replaces"] == cert_id
            renewer = edged.daemon.renewer
            await wait_for(lambda: renewer.states["shop.test"].attempts >= 1)
            assert "serverInternal" in str(renewer.states["shop.test"].last_error)
            # The old certificate keeps serving while renewal fails.
            still = edged.daemon.serving("shop.test")
            assert still is not None and still.fingerprint == served.fingerprint
            assert renewer.fallback_active("shop.test")


async def test_absurd_retry_after_is_clamped_and_the_loop_survives(
    pebble: Pebble, tmp_path: Path
) -> None:
    """`Retry-After: 999999999999` on renewalInfo overflowed datetime; the OverflowError left
    the renewal loop and ended the daemon. Now the next check is clamped to 24 hours."""
    async with run_backend() as backend, ari_server(pebble, tmp_path) as ari:
        body = acme_body(pebble, backend.port)
        async with run_edged(tmp_path, body, http=(pebble.http_port,)) as edged:
            await wait_for(lambda: edged.daemon.serving("shop.test") is not None)
        ari.retry_after = "999999999999"
        async with restarted_with_ari(tmp_path, body, pebble, ari) as edged:
            renewer = edged.daemon.renewer
            await wait_for(lambda: renewer.states["shop.test"].ari is not None)
            state = renewer.states["shop.test"]
            assert state.ari is not None
            assert state.ari.next_check - datetime.now(UTC) <= timedelta(hours=24)
            renewer.force("shop.test")  # the loop still runs: it starts the forced attempt
            await wait_for(lambda: len(ari.orders) >= 1)


async def test_a_hanging_renewal_info_does_not_delay_a_forced_renewal(
    pebble: Pebble, tmp_path: Path
) -> None:
    """ARI checks ran inside the renewal loop, one name at a time with a 30 s timeout: while
    renewalInfo hung, a forced renewal (`edged renew`) waited for it. Now they run beside the
    loop: the forced order starts while the check still hangs."""
    async with run_backend() as backend, ari_server(pebble, tmp_path) as ari:
        body = acme_body(pebble, backend.port)
        async with run_edged(tmp_path, body, http=(pebble.http_port,)) as edged:
            await wait_for(lambda: edged.daemon.serving("shop.test") is not None)
        ari.ari_hold = asyncio.Event()
        try:
            async with restarted_with_ari(tmp_path, body, pebble, ari) as edged:
                renewer = edged.daemon.renewer
                await wait_for(lambda: len(ari.ari_requests) >= 1)  # the check now hangs
                started = time.monotonic()
                renewer.force("shop.test")
                await wait_for(lambda: len(ari.orders) >= 1)
                assert time.monotonic() - started < 3.0
                assert not ari.ari_hold.is_set()  # the renewalInfo answer is still pending
                assert renewer.states["shop.test"].ari is None
        finally:
            ari.ari_hold.set()


@pytest.mark.parametrize(
    "refusal",
    [
        # Let's Encrypt, for a certificate that already has a replacement (one edged ordered
        # but could not serve, or the version before an `edged rollback`).
        (
            409,
            "alreadyReplaced",
            "cannot indicate an order replaces certificate with serial "
            "0536ea44, which already has a replacement order",
        ),
        # For a certificate of another account or CA (an upload handed back to ACME).
        (400, "malformed", "Cannot find any certificate to replace for given AKI and Serial"),
    ],
)
async def test_an_order_the_ca_refuses_as_a_replacement_is_sent_again_without_replaces(
    pebble: Pebble, tmp_path: Path, refusal: tuple[int, str, str]
) -> None:
    """A CA that does not take the `replaces` of an order (the certificate was replaced
    already, or is not one of this account's) refused every renewal of the name: each retry
    named the same certificate again, until it expired. Now the order is sent again without
    `replaces` in the same attempt, and the renewal succeeds."""
    async with run_backend() as backend, ari_server(pebble, tmp_path) as ari:
        body = acme_body(pebble, backend.port)
        async with run_edged(tmp_path, body, http=(pebble.http_port,)) as edged:
            await wait_for(lambda: edged.daemon.serving("shop.test") is not None)
            served = edged.daemon.serving("shop.test")
            assert served is not None
            rsa = edged.daemon.served("shop.test")[1]
        ari.window = await past_window_for(served)  # renew now
        ari.forward_to = tmp_path / "store"
        ari.refusal = refusal
        async with restarted_with_ari(tmp_path, body, pebble, ari) as edged:
            attempts = edged.daemon.counters.renewal_attempts
            await wait_for(lambda: sum(attempts.values()) >= 1)
            assert attempts["shop.test", "failure"] == 0, edged.daemon.renewer.states["shop.test"]
            # Each key type's order replaces its served certificate, refused, then sent again.
            replaced = [ari_cert_id(served.leaf), None, ari_cert_id(rsa.leaf), None]
            assert [o.get("replaces") for o in ari.orders] == replaced
            renewed = edged.daemon.serving("shop.test")
            assert renewed is not None and renewed.fingerprint != served.fingerprint
            assert edged.daemon.renewer.states["shop.test"].status is CertStatus.ACTIVE


async def test_the_explanation_url_reaches_the_operator(
    pebble: Pebble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 9773 section 4.2: clients SHOULD provide a window's explanationURL to their
    operator (a CA moving windows for an incident says why there). edged kept it in the
    state file only; now the window's log line and `edged status NAME` show it."""
    caplog.set_level(logging.INFO, "edged.renewal")
    url = "https://ca.example/incidents/2026-12-01"
    async with run_backend() as backend, ari_server(pebble, tmp_path) as ari:
        body = acme_body(pebble, backend.port)
        async with run_edged(tmp_path, body, http=(pebble.http_port,)) as edged:
            await wait_for(lambda: edged.daemon.serving("shop.test") is not None)
        ari.explanation = url
        async with restarted_with_ari(tmp_path, body, pebble, ari) as edged:
            renewer = edged.daemon.renewer
            await wait_for(lambda: renewer.states["shop.test"].ari is not None)
            lines = [r.getMessage() for r in caplog.records if "ari window" in r.getMessage()]
            assert lines and f"explanation={url}" in lines[-1]
            shown = DaemonOperations(edged.daemon).cert("shop.test")["ari_window"]
            assert isinstance(shown, dict) and shown["explanation_url"] == url
            assert shown["start"] == ari.window[0] and shown["end"] == ari.window[1]


async def test_each_key_types_certificate_is_asked_for_and_the_first_window_decides(
    pebble: Pebble, tmp_path: Path
) -> None:
    """A site served with an ECDSA and an RSA certificate: ARI asked about the first one
    alone, so a CA that wants the RSA certificate replaced (an incident affecting it) was not
    heard, and only the ECDSA order named what it replaces. Now each served certificate is
    asked for, the window that needs renewal first decides (one attempt renews both), and
    each key type's order names its own certificate in `replaces`."""
    async with run_backend() as backend, ari_server(pebble, tmp_path) as ari:
        body = acme_body(pebble, backend.port)
        async with run_edged(tmp_path, body, http=(pebble.http_port,)) as edged:
            await wait_for(lambda: len(edged.daemon.served("shop.test")) == 2)
            ecdsa, rsa = edged.daemon.served("shop.test")
        assert (ecdsa.key_type, rsa.key_type) == ("ecdsa-p256", "rsa-2048")
        ids = [ari_cert_id(ecdsa.leaf), ari_cert_id(rsa.leaf)]

        # The RSA certificate's window is later than the ECDSA one's: the ECDSA one decides.
        later = (ari.window[0] + timedelta(days=5), ari.window[1] + timedelta(days=5))
        ari.windows = {ids[1]: later}
        async with restarted_with_ari(tmp_path, body, pebble, ari) as edged:
            renewer = edged.daemon.renewer
            await wait_for(lambda: renewer.states["shop.test"].ari is not None)
            assert sorted(ari.ari_requests) == sorted(ids)
            state = renewer.states["shop.test"]
            assert state.ari is not None and state.ari.cert_id == ids[0]
            assert state.next_try is not None and ari.window[0] <= state.next_try < ari.window[1]
            shown = DaemonOperations(edged.daemon).cert("shop.test")["ari_window"]
            assert isinstance(shown, dict) and shown["key_type"] == "ecdsa-p256"
            assert ari.orders == []

        # The CA moves the RSA certificate's window into the past: both are renewed now.
        ari.windows = {ids[1]: await past_window_for(rsa)}
        ari.forward_to = tmp_path / "store"
        ari.accept_replaces = True
        async with restarted_with_ari(tmp_path, body, pebble, ari) as edged:
            counts = edged.daemon.counters.renewal_attempts
            await wait_for(lambda: counts["shop.test", "success"] >= 1, limit=30)
            assert [o.get("replaces") for o in ari.orders] == ids
            renewed = edged.daemon.served("shop.test")
            assert {b.fingerprint for b in renewed}.isdisjoint({ecdsa.fingerprint, rsa.fingerprint})


async def test_a_certificate_whose_renewal_info_fails_is_asked_again_within_the_hour(
    pebble: Pebble, tmp_path: Path
) -> None:
    """The RSA certificate's renewalInfo fails: the ECDSA certificate's window applies, and
    the name is asked again within ARI_RETRY (not at that window's Retry-After, an hour
    here but up to a day), in case the one not heard from needs renewal first."""
    async with run_backend() as backend, ari_server(pebble, tmp_path) as ari:
        body = acme_body(pebble, backend.port)
        async with run_edged(tmp_path, body, http=(pebble.http_port,)) as edged:
            await wait_for(lambda: len(edged.daemon.served("shop.test")) == 2)
            ecdsa, rsa = edged.daemon.served("shop.test")
        ari.broken = {ari_cert_id(rsa.leaf)}
        ari.retry_after = str(20 * 3600)
        async with restarted_with_ari(tmp_path, body, pebble, ari) as edged:
            renewer = edged.daemon.renewer
            await wait_for(lambda: renewer.states["shop.test"].ari is not None)
            state = renewer.states["shop.test"]
            assert state.ari is not None and state.ari.cert_id == ari_cert_id(ecdsa.leaf)
            assert state.ari.next_check - datetime.now(UTC) <= ARI_RETRY
            assert state.next_try is not None and ari.window[0] <= state.next_try < ari.window[1]
