"""Revocation against real Pebble: every key type's certificate, one outcome each, and a
retry that finishes a revoke which failed part-way."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edged.acme.client import AcmeSession
from edged.acme.issue import OrderRequest, issue
from edged.acme.revoke import ALREADY_REVOKED, revoke_certs
from edged.acme.solvers import Http01Solver
from edged.http01 import ChallengeBoard
from edged.store.files import FileStore
from tests.pebble import Pebble
from tests.pki import fullchain, make_ca, make_intermediate, make_leaf
from tests.test_acme import http01, settings


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
