"""The admin API and CLI against the real daemon, with real Pebble: status, renew, upload,
remove, revoke, reload; and /metrics while serving."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from edged.acme.client import AcmeSession
from edged.admin_client import AdminClient, AdminRequestError
from edged.config import Address
from tests.conftest import free_port, peer_cn, run_backend, run_cmd, run_edged, s_client
from tests.https_front import HttpsFront
from tests.pebble import Pebble
from tests.pki import fullchain, make_ca, make_intermediate, make_leaf
from tests.test_daemon_acme import acme_body, wait_for

EDGED = str(Path(sys.executable).with_name("edged"))


async def test_admin_end_to_end(pebble: Pebble, tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    async with (
        run_backend() as backend,
        run_edged(
            tmp_path,
            acme_body(pebble, backend.port),
            http=(pebble.http_port,),
            admin=f"unix:{sock}",
        ) as edged,
    ):
        await wait_for(lambda: edged.daemon.serving("shop.test") is not None)
        assert sock.stat().st_mode & 0o777 == 0o600
        client = AdminClient(Address(path=str(sock)))
        config = str(edged.config_path)

        status = await asyncio.to_thread(client.status)
        assert status["certs"] == {"active": 1}
        first = edged.daemon.serving("shop.test")
        assert first is not None

        out = await run_cmd(EDGED, "status", "--config", config)
        assert out.returncode == 0, out.stderr
        assert "shop.test" in out.stdout and "active" in out.stdout
        out = await run_cmd(EDGED, "status", "--json", "--config", config)
        assert json.loads(out.stdout)

        # Force a renewal: a new certificate is served.
        out = await run_cmd(EDGED, "renew", "www.shop.test", "--config", config, limit=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "renewed shop.test" in out.stdout
        second = edged.daemon.serving("shop.test")
        assert second is not None and second.fingerprint != first.fingerprint

        # Upload our own certificate: validated, served, ACME stops managing the name.
        ca = make_ca("Own CA")
        inter = make_intermediate(ca, "Own Intermediate")
        leaf = make_leaf(inter, ["shop.test", "www.shop.test"], cn="own upload")
        cert_file = tmp_path / "own.pem"
        key_file = tmp_path / "own.key"
        cert_file.write_bytes(fullchain(leaf, inter))
        key_file.write_bytes(leaf.key_pem)
        out = await run_cmd(
            EDGED, "upload", "shop.test", "--cert", str(cert_file), "--key", str(key_file),
            "--config", config,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        cn = peer_cn((await s_client(edged.port, "www.shop.test")).stderr)
        assert cn == "own upload"
        assert "shop.test" not in edged.daemon.renewer.states

        # A bad upload (key of another cert) is refused with the reason; nothing changes.
        other = make_leaf(inter, ["shop.test"])
        key_file.write_bytes(other.key_pem)
        out = await run_cmd(
            EDGED, "upload", "shop.test", "--cert", str(cert_file), "--key", str(key_file),
            "--config", config,
        )  # fmt: skip
        assert out.returncode == 1
        assert "key_mismatch" in out.stderr
        assert "PRIVATE KEY" not in out.stderr + out.stdout
        assert peer_cn((await s_client(edged.port, "shop.test")).stderr) == "own upload"

        # Hand the name back to ACME: the upload serves until the new cert is there.
        out = await run_cmd(EDGED, "upload", "shop.test", "--remove", "--config", config)
        assert out.returncode == 0, out.stdout + out.stderr
        await wait_for(
            lambda: (s := edged.daemon.serving("shop.test")) is not None and "Pebble" in s.issuer
        )

        # Revoke through ACME; a replacement is ordered at once. An earlier revoke that failed
        # part-way revoked the ECDSA certificate already: the CA's alreadyRevoked for it counts
        # as done, and the RSA certificate is revoked too.
        before = edged.daemon.serving("shop.test")
        assert before is not None
        stored = edged.daemon.store.load("shop.test")
        acme = edged.daemon.config.acme
        assert stored is not None and acme is not None and edged.daemon.store is not None
        session = AcmeSession(acme, edged.daemon.store)
        [ecdsa] = [p.fullchain for p in stored.pairs if p.key_type == "ecdsa-p256"]
        leaf = x509.load_pem_x509_certificates(ecdsa)[0]
        await asyncio.to_thread(lambda: session.open("shop.test").revoke(leaf, 0))
        session.close()
        out = await run_cmd(
            EDGED, "revoke", "shop.test", "--reason", "keyCompromise", "--config", config,
            limit=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert "revoked 2 certificate(s)" in out.stdout
        assert ") already revoked" in out.stdout and "rsa-2048 (serial" in out.stdout
        await wait_for(
            lambda: (
                (s := edged.daemon.serving("shop.test")) is not None
                and s.fingerprint != before.fingerprint
            )
        )

        # Unknown name and reload.
        with pytest.raises(AdminRequestError) as info:
            await asyncio.to_thread(client.cert, "nope.test")
        assert info.value.status == 404
        out = await run_cmd(EDGED, "reload", "--config", config)
        assert out.returncode == 0, out.stdout + out.stderr
        assert edged.daemon.counters.reloads["admin", "ok"] >= 1


async def test_metrics_while_serving(pebble: Pebble, tmp_path: Path) -> None:
    metrics_port = free_port()
    async with (
        run_backend() as backend,
        run_edged(
            tmp_path,
            acme_body(pebble, backend.port),
            http=(pebble.http_port,),
            metrics=f"127.0.0.1:{metrics_port}",
        ) as edged,
    ):
        await wait_for(lambda: edged.daemon.serving("shop.test") is not None)
        ok = await s_client(edged.port, "shop.test")
        assert "CONNECTION ESTABLISHED" in ok.stderr
        refused = await s_client(edged.port, "unknown.test")
        assert "alert" in (refused.stdout + refused.stderr).lower()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response,
        ):
            assert response.status == 200
            text = await response.text()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        served = edged.daemon.serving("shop.test")
        assert served is not None
        key = ("edged_cert_not_after_seconds", (("key_type", "ecdsa-p256"), ("name", "shop.test")))
        assert samples[key] == served.not_after.timestamp()
        assert samples[("edged_cert_state", (("name", "shop.test"), ("state", "active")))] == 1
        assert samples[("edged_cert_fallback_active", (("name", "shop.test"),))] == 0
        ok_total = sum(
            v
            for (n, labels), v in samples.items()
            if n == "edged_tls_handshakes_total" and ("result", "ok") in labels
        )
        no_cert = sum(
            v
            for (n, labels), v in samples.items()
            if n == "edged_tls_handshakes_total" and ("result", "no_cert") in labels
        )
        assert ok_total >= 1 and no_cert >= 1
        attempts = ("edged_renewal_attempts_total", (("name", "shop.test"), ("result", "success")))
        assert samples[attempts] == 1
        assert samples[("edged_acme_request_seconds_count", ())] > 5
        check = await run_cmd("promtool", "check", "metrics", stdin=text.encode())
        assert check.returncode == 0, check.stdout + check.stderr


async def test_renew_answers_when_a_reload_removes_the_site_meanwhile(
    pebble: Pebble, tmp_path: Path
) -> None:
    """`edged renew` waits for the attempt; a reload that drops the site meanwhile gets a
    409 naming that, not a 500 (the wait read the removed state and raised KeyError)."""
    from edged.admin import AdminError
    from edged.operations import DaemonOperations

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.5)  # the attempt is still running when the reload comes
        return web.Response(status=503)

    front = HttpsFront(tmp_path, pebble, "slow")
    other = '[[site]]\nnames = ["kept.test"]\nbackend = "127.0.0.1:9"\n'
    body = (
        f'[acme]\ndirectory = "{front.base}/dir"\npreflight = false\n'
        f'ca_bundle = "{front.trust}"\n'
        '[[site]]\nnames = ["renew.test"]\nbackend = "127.0.0.1:9"\n' + other
    )
    async with front.serve([web.get("/dir", slow)]), run_edged(tmp_path, body) as edged:
        ops = DaemonOperations(edged.daemon)
        renewing = asyncio.create_task(ops.renew("renew.test"))
        await asyncio.sleep(0.5)
        text = edged.config_path.read_text()
        edged.config_path.write_text(
            text.replace('names = ["renew.test"]', 'names = ["moved.test"]')
        )
        await edged.daemon.reload("signal")
        with pytest.raises(AdminError) as raised:
            await asyncio.wait_for(renewing, 30)
        assert raised.value.code == "not_acme" and raised.value.status == 409
        assert "no longer managed" in raised.value.message


async def test_upload_of_a_wildcard_for_a_site_name_it_covers_serves(tmp_path: Path) -> None:
    """Site www.wild.test, uploaded certificate for *.wild.test: stored and served (it was
    refused by the store, a 500 store_failed). A reload the daemon rejects (a broken config)
    answers not_served, naming the way back, instead of claiming it serves. Without the file
    watcher: it would report the stored entry on its own, and a reload of that name alone
    (which reads no config) serves it, as the answer says the next reload that succeeds
    does; whether that comes before the check below depends on how the broken config's
    report and the store's fall into batches."""
    from edged.admin import AdminError
    from edged.operations import DaemonOperations

    ca = make_ca("Own CA")
    wild = make_leaf(ca, ["*.wild.test"], cn="wildcard upload")
    body = '[[site]]\nnames = ["www.wild.test"]\nbackend = "127.0.0.1:9"\n'
    async with run_edged(tmp_path, body, edged_extra="watch = false") as edged:
        ops = DaemonOperations(edged.daemon)
        done = await ops.upload("www.wild.test", fullchain(wild), wild.key_pem)
        assert "now serves www.wild.test" in str(done["message"])
        cn = peer_cn((await s_client(edged.port, "www.wild.test")).stderr)
        assert cn == "wildcard upload"
        other = make_leaf(ca, ["*.wild.test"], cn="second upload")
        edged.config_path.write_text(edged.config_path.read_text() + "\n[broken\n")
        with pytest.raises(AdminError) as refused:
            await ops.upload("www.wild.test", fullchain(other), other.key_pem)
        assert refused.value.code == "not_served" and refused.value.status == 502
        assert "edged rollback www.wild.test" in refused.value.message
        cn = peer_cn((await s_client(edged.port, "www.wild.test")).stderr)
        assert cn == "wildcard upload"


async def test_status_counts_the_sites_states_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`GET /status` counts every site's state (~20 ms for 100k sites) in a thread, from one
    view of the serving state, with the same counts."""
    import threading

    import edged.operations as operations
    from edged.operations import DaemonOperations

    on_loop: list[bool] = []
    state = operations._state

    def recorded(site: object, view: object) -> str:
        on_loop.append(threading.current_thread() is threading.main_thread())
        return state(site, view)  # type: ignore[arg-type]

    monkeypatch.setattr(operations, "_state", recorded)
    body = "".join(f'[[site]]\nnames = ["s{i}.test"]\nbackend = "127.0.0.1:9"\n' for i in range(3))
    async with run_edged(tmp_path, body) as edged:
        status = await DaemonOperations(edged.daemon).status()
    assert status["sites"] == 3 and status["certs"] == {"missing": 3}
    assert on_loop == [False, False, False]
