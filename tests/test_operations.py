"""The admin API and CLI against the real daemon, with real Pebble: status, renew, upload,
remove, revoke, reload; and /metrics while serving."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable
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
from tests.pki import fullchain, make_ca, make_intermediate, make_leaf, write_pair
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


async def test_refusals_name_their_cause_and_fix(tmp_path: Path) -> None:
    """`edged renew/revoke/upload --remove` on a name edged cannot act on: each refusal says
    why (a cert_file, no [acme], a passthrough site) and what to do. They said "not managed by
    ACME (cert_file, an upload, or no [acme])", "no [acme] table: nothing would manage the
    name" (no name, no fix) or "was not issued by edged's ACME account"."""
    from edged.admin import AdminError
    from edged.operations import DaemonOperations

    inter = make_intermediate(make_ca(), "Files Intermediate")
    leaf = make_leaf(inter, ["files.test"])
    cert, key = write_pair(tmp_path, "files", leaf, [inter])
    body = (
        f'[[site]]\nnames = ["files.test"]\nbackend = "127.0.0.1:9"\n'
        f'cert_file = "{cert}"\nkey_file = "{key}"\n'
        '[[site]]\nnames = ["bare.test"]\nbackend = "127.0.0.1:9"\n'
        '[[site]]\nnames = ["pass.test"]\nbackend = "127.0.0.1:9"\nmode = "passthrough"\n'
    )
    async with run_edged(tmp_path, body) as edged:
        ops = DaemonOperations(edged.daemon)
        config = edged.config_path

        async def refusal(call: Awaitable[object]) -> tuple[str, int, str]:
            with pytest.raises(AdminError) as refused:
                await call
            return refused.value.code, refused.value.status, refused.value.message

        assert await refusal(ops.renew("files.test")) == (
            "not_acme",
            409,
            f"files.test is not managed by ACME: site[0] serves cert_file {cert}: "
            "replace that file",
        )
        no_acme = f"bare.test is not managed by ACME: there is no [acme] table in {config}"
        assert await refusal(ops.renew("bare.test")) == (
            "not_acme",
            409,
            f"{no_acme}: add one and reload to have edged obtain its certificate",
        )
        assert await refusal(ops.revoke("bare.test", "unspecified", True)) == (
            "not_acme",
            409,
            f"{no_acme}: revoke it at the CA that issued it",
        )
        assert await refusal(ops.unmanage_upload("bare.test")) == (
            "not_acme",
            409,
            f"bare.test: there is no [acme] table in {config}, so nothing would obtain its "
            "certificate: add one and reload first, or keep the upload",
        )
        assert await refusal(ops.upload("pass.test", fullchain(leaf), leaf.key_pem)) == (
            "passthrough",
            409,
            "site[2] passes TLS through to its backend, which holds the certificate: install "
            "it there, or set mode = 'terminate' on the site",
        )


async def test_renew_while_the_store_is_still_read_is_busy_not_unmanaged(tmp_path: Path) -> None:
    """From LAZY_MIN store sites on, edged serves before it has read the store and starts
    renewals after: `edged renew` meanwhile answered "not managed by ACME (cert_file, an
    upload, or no [acme])" for any name. It is 503 busy, saying when to try again; once the
    store is read, an upload is refused naming the way back to ACME."""
    from edged.admin import AdminError
    from edged.daemon import LAZY_MIN
    from edged.operations import DaemonOperations
    from edged.store import PemPair
    from tests.many_certs import many_sites_config, write_many

    leaf = make_leaf(make_ca("Lazy CA"), ["*.lazy.test"])
    names = [f"n{i}.lazy.test" for i in range(LAZY_MIN + 2000)]
    pairs = [PemPair("ecdsa-p256", leaf.cert_pem, leaf.key_pem)]
    await asyncio.to_thread(write_many, tmp_path / "store", names, pairs)
    # No order is ever due (every site holds an upload): the directory is never asked.
    body = '[acme]\ndirectory = "https://127.0.0.1:1/dir"\npreflight = false\n'
    async with run_edged(tmp_path, body + many_sites_config(names, "127.0.0.1:9")) as edged:
        ops = DaemonOperations(edged.daemon)
        assert edged.daemon.renewer.config is None  # the store is still being read
        with pytest.raises(AdminError) as refused:
            await ops.renew(names[-1])
        assert (refused.value.code, refused.value.status) == ("busy", 503)
        assert refused.value.message == (
            f"{names[-1]}: edged is still reading its store and starts renewals once it has "
            "(logged as 'store indexed'): renew it then"
        )
        await wait_for(lambda: edged.daemon.renewer.config is not None, 60)
        with pytest.raises(AdminError) as refused:
            await ops.renew(names[-1])
        assert (refused.value.code, refused.value.status) == ("not_acme", 409)
        assert refused.value.message == (
            f"{names[-1]} is not managed by ACME: it serves an uploaded certificate: "
            f"`edged upload {names[-1]} --remove` hands it back to ACME, which orders a new one "
            "at once"
        )
