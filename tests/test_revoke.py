"""Revocation against real Pebble: every key type's certificate, one outcome each, and a
retry that finishes a revoke which failed part-way."""

from __future__ import annotations

import asyncio
import json
import urllib.error
from pathlib import Path

import pytest

from edged.acme.client import AcmeSession
from edged.acme.issue import OrderRequest, issue
from edged.acme.revoke import ALREADY_REVOKED, revoke_certs
from edged.acme.solvers import Http01Solver
from edged.admin import AdminError
from edged.http01 import ChallengeBoard
from edged.operations import DaemonOperations
from edged.store.files import FileStore, account_dirname
from tests.conftest import run_backend, run_edged
from tests.pebble import Pebble, start_pebble
from tests.pki import fullchain, make_ca, make_intermediate, make_leaf
from tests.test_acme import http01, settings
from tests.test_daemon_acme import acme_body, wait_for


async def test_a_failed_revoke_goes_on_and_a_retry_finishes_it(
    pebble: Pebble, tmp_path: Path
) -> None:
    board = ChallengeBoard()
    session = AcmeSession(settings(pebble), FileStore(tmp_path / "store"))
    request = OrderRequest("a.test", ("a.test",), ("ecdsa-p256", "rsa-2048"))
    async with http01(board, pebble.http_port):
        issued = await asyncio.to_thread(issue, session, request, lambda: Http01Solver(board))
    ecdsa, rsa = ((p.key_type, p.fullchain) for p in issued.cert.pairs)
    # A certificate this CA never issued fails at the CA, between two that it did issue.
    inter = make_intermediate(make_ca("Other CA"), "Other Intermediate")
    foreign = ("rsa-3072", fullchain(make_leaf(inter, ["a.test"]), inter))

    first = await asyncio.to_thread(revoke_certs, session, "a.test", [ecdsa, foreign], "superseded")
    assert [(o.key_type, o.done, o.already) for o in first] == [
        ("ecdsa-p256", True, False),
        ("rsa-3072", False, False),
    ]
    failed = first[1].error
    assert failed is not None and failed.problem.get("type") != ALREADY_REVOKED
    assert "rsa-3072 (serial" in first[1].describe() and "not revoked" in first[1].describe()

    # The retry: the ECDSA certificate is revoked already (the CA says alreadyRevoked), which
    # is done, and the RSA one behind it is revoked now.
    again = await asyncio.to_thread(revoke_certs, session, "a.test", [ecdsa, rsa], "superseded")
    assert [(o.key_type, o.done, o.already) for o in again] == [
        ("ecdsa-p256", True, True),
        ("rsa-2048", True, False),
    ]
    assert again[0].describe().endswith(") already revoked")
    assert again[1].describe().endswith(") revoked")
    session.close()


def cert_status(pebble: Pebble, serial: int) -> str:
    """What Pebble's management API says about the certificate with `serial` ("Valid",
    "Revoked"; "" when this Pebble never issued it)."""
    try:
        body = pebble._get(f"/cert-status-by-serial/{serial:x}")
    except urllib.error.HTTPError:
        return ""
    return str(json.loads(body).get("Status", ""))


async def test_a_revoke_after_a_change_of_ca_goes_to_the_ca_that_issued_it(
    pebble: Pebble, tmp_path: Path
) -> None:
    """acme.directory moved to another CA after the certificate was issued: the revoke went
    to the new CA (registering an account there, then refused) and the certificate stayed
    valid. Now it goes to the CA the store recorded at issuance, with the account kept for it;
    without that account it is refused, naming that CA and how to revoke by the key."""
    other = start_pebble(tmp_path / "other-ca")
    try:
        # One acme.ca_bundle trusting both CAs' listeners (what an operator moving between
        # private CAs configures).
        trust = tmp_path / "both-cas.pem"
        trust.write_bytes(pebble.listener_ca.read_bytes() + other.listener_ca.read_bytes())
        async with run_backend() as backend:
            body = acme_body(pebble, backend.port).replace(str(pebble.listener_ca), str(trust))
            async with run_edged(tmp_path, body, http=(pebble.http_port,)) as edged:
                await wait_for(lambda: len(edged.daemon.served("shop.test")) == 2)
                serials = [b.leaf.serial_number for b in edged.daemon.served("shop.test")]
                assert [cert_status(pebble, s) for s in serials] == ["Valid", "Valid"]
                edged.config_path.write_text(
                    edged.config_path.read_text().replace(pebble.directory, other.directory)
                )
                assert await edged.daemon.reload("signal")
                ops = DaemonOperations(edged.daemon)
                accounts = tmp_path / "store" / "accounts"
                issuer_account = accounts / account_dirname(pebble.directory)
                aside = tmp_path / "account-aside"

                issuer_account.rename(aside)  # the store lost the issuing CA's account
                with pytest.raises(AdminError) as refused:
                    await ops.revoke("shop.test", "superseded", replace=False)
                assert refused.value.status == 409
                message = refused.value.message
                assert pebble.directory in message and "certbot revoke" in message, message
                assert [cert_status(pebble, s) for s in serials] == ["Valid", "Valid"]

                aside.rename(issuer_account)
                done = await ops.revoke("shop.test", "superseded", replace=False)
                assert done["revoked"] == 2 and pebble.directory in str(done["message"])
                assert [cert_status(pebble, s) for s in serials] == ["Revoked", "Revoked"]
                # Nothing was sent to the new CA: no account registered there.
                assert not (accounts / account_dirname(other.directory)).exists()
    finally:
        other.stop()
