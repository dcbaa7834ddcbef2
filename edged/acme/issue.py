"""The order flow: one certificate for all names of a site, per key type, validated, stored.

    order → authorizations → present challenges → wait until visible → answer → poll
          → finalize with a CSR → poll → download the chain → validate → store

Runs in a worker thread (the acme library is synchronous). Nothing reaches the store unless the
downloaded chain passes the same validation as any other certificate; solvers are cleaned up
whatever happens.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import requests
from acme import challenges, crypto_util, messages
from acme import client as acme_client
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy import json_util, jwk

from edged.acme.client import AcmeSession, problem_of
from edged.acme.solvers import Solver
from edged.certs import check_bundle, parse_bundle
from edged.errors import AcmeError, CertError
from edged.store.base import PemPair, StoredCert

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OrderRequest:
    name: str  # the store name (the site's first name)
    names: tuple[str, ...]
    key_types: tuple[str, ...] = ("ecdsa-p256",)
    replaces: Mapping[str, str] = field(default_factory=dict)  # key type → ARI cert id


@dataclass(frozen=True)
class Issued:
    cert: StoredCert
    orders: int
    seconds: float


class NewOrderReplacing(messages.NewOrder):
    """newOrder with the ARI `replaces` field (RFC 9773 section 5), which the library lacks."""

    replaces: str | None = json_util.field("replaces", omitempty=True)


def new_private_key(key_type: str) -> bytes:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if key_type == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif key_type == "ecdsa-p384":
        key = ec.generate_private_key(ec.SECP384R1())
    elif key_type.startswith("rsa-"):
        key = rsa.generate_private_key(65537, int(key_type[4:]))
    else:
        raise ValueError(f"unknown key type {key_type!r}")
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def issue(
    session: AcmeSession,
    request: OrderRequest,
    new_solver: Callable[[], Solver],
    *,
    extra: Mapping[str, str] | None = None,
) -> Issued:
    """Order, validate and return the certificate (every key type); the caller stores it."""
    started = time.monotonic()
    pairs = []
    for key_type in request.key_types:
        key_pem = new_private_key(key_type)
        chain = _order_one(session, request, key_type, key_pem, new_solver)
        _validate(request, chain, key_pem, key_type, session.clock())
        pairs.append(PemPair(key_type, chain, key_pem))
    cert = StoredCert(
        name=request.name,
        names=request.names,
        pairs=tuple(pairs),
        source="acme",
        stored_at=time.time(),
        extra={"directory": session.settings.directory, **(extra or {})},
    )
    return Issued(cert, len(pairs), time.monotonic() - started)


def _validate(
    request: OrderRequest, chain: bytes, key_pem: bytes, key_type: str, now: datetime
) -> None:
    try:
        bundle = parse_bundle(chain, key_pem, source=f"{request.name} ({key_type}) from the CA")
        # check_bundle allows NOT_BEFORE_SKEW itself, as every later check of it does.
        problems = check_bundle(bundle, now=now, names=request.names, require_chain=True)
        if problems:
            raise problems[0]
    except CertError as exc:
        raise AcmeError(
            request.name, f"the CA issued a certificate edged refuses: {exc.message}"
        ) from exc


def _order_one(
    session: AcmeSession,
    request: OrderRequest,
    key_type: str,
    key_pem: bytes,
    new_solver: Callable[[], Solver],
) -> bytes:
    name = request.name
    client = session.open(name)
    account_key = client.net.key
    assert account_key is not None
    csr_pem = crypto_util.make_csr(key_pem, list(request.names))
    identifiers = [
        messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=n) for n in request.names
    ]
    replaces = request.replaces.get(key_type) or None
    try:
        order, order_url = _new_order(session, client, name, identifiers, replaces)
    except AcmeError as exc:
        if replaces is None or not _refuses_replacement(exc):
            raise
        # The CA does not take this replacement (RFC 9773 section 5: the certificate was
        # replaced already, e.g. by an order whose certificate edged refused or rolled back,
        # or it is not this account's, e.g. an upload handed back to ACME). Naming it again
        # would fail every retry until it expires: order it as a new certificate instead.
        log.warning(
            "acme order refused as a replacement, ordering without replaces name=%s "
            "key_type=%s replaces=%s error=%s",
            name,
            key_type,
            replaces,
            exc.message,
        )
        order, order_url = _new_order(session, client, name, identifiers, None)
    log.info("acme order created name=%s key_type=%s order=%s", name, key_type, order_url)
    _authorize(session, name, order, account_key, new_solver)
    return _finalize(session, name, order_url, csr_pem)


# Problems that say nothing about the order's content: the same order may work later.
_TRANSIENT = {f"urn:ietf:params:acme:error:{t}" for t in ("rateLimited", "serverInternal")}


def _refuses_replacement(exc: AcmeError) -> bool:
    """True when the CA answered the order with a problem document about its content (which
    may be its `replaces`), not a transport failure or a load problem (rate limit, 5xx)."""
    kind = exc.problem.get("type")
    return isinstance(kind, str) and kind != "" and kind not in _TRANSIENT


def _new_order(
    session: AcmeSession,
    client: acme_client.ClientV2,
    name: str,
    identifiers: list[messages.Identifier],
    replaces: str | None,
) -> tuple[messages.Order, str]:
    order_msg = NewOrderReplacing(identifiers=identifiers, replaces=replaces)
    with session.errors(name, "creating the order"):
        response = client._post(client.directory["newOrder"], order_msg)
        order = messages.Order.from_json(response.json())
        order_url = response.headers.get("Location")
    if not order_url:
        raise AcmeError(name, "creating the order: the CA did not say where the order is")
    return order, order_url


def _authorize(
    session: AcmeSession,
    name: str,
    order: messages.Order,
    account_key: jwk.JWK,
    new_solver: Callable[[], Solver],
) -> None:
    # identifier, authorization URL, challenge, the response to send for it
    pending: list[tuple[str, str, messages.ChallengeBody, challenges.ChallengeResponse]] = []
    solver = new_solver()
    try:
        for url in order.authorizations:
            with session.errors(name, "reading an authorization"):
                authz = messages.Authorization.from_json(session.post_as_get(url).json())
            ident = _identifier(authz)
            if authz.status == messages.STATUS_VALID:
                continue  # the CA remembers a recent validation (and the second key type)
            if authz.status != messages.STATUS_PENDING:
                raise AcmeError(
                    name, f"authorization for {ident} is {authz.status.name}", _authz_problem(authz)
                )
            challb = _pick_challenge(name, authz, ident, solver.challenge_type)
            pending.append((ident, url, challb, solver.present(ident, challb, account_key)))
        if not pending:
            return
        solver.wait_ready()
        client = session.open(name)
        for ident, _url, challb, response in pending:
            with session.errors(
                name, f"answering the {solver.challenge_type} challenge of {ident}"
            ):
                client.answer_challenge(challb, response)
        for ident, url, _challb, _response in pending:
            authz = session.poll(
                name,
                f"waiting for the CA to validate {ident}",
                functools.partial(_fetch_authz, session, url),
                lambda a: a.status not in (messages.STATUS_PENDING, messages.STATUS_PROCESSING),
            )
            if authz.status != messages.STATUS_VALID:
                problem = _authz_problem(authz)
                raise AcmeError(
                    name,
                    f"the CA could not validate {ident} over {solver.challenge_type}: "
                    f"{problem.get('detail') or problem.get('message')}",
                    problem,
                )
    finally:
        solver.cleanup()


def _fetch_authz(
    session: AcmeSession, url: str
) -> tuple[messages.Authorization, requests.Response]:
    response = session.post_as_get(url)
    return messages.Authorization.from_json(response.json()), response


def _identifier(authz: messages.Authorization) -> str:
    value = str(authz.identifier.value)
    return f"*.{value}" if authz.wildcard else value


def _pick_challenge(
    name: str, authz: messages.Authorization, ident: str, kind: str
) -> messages.ChallengeBody:
    for challb in authz.challenges:
        if challb.chall.typ == kind:
            return challb
    offered = ", ".join(c.chall.typ for c in authz.challenges) or "none"
    raise AcmeError(
        name,
        f"the CA offers no {kind} challenge for {ident} (offered: {offered}); "
        "set acme.challenge to one it offers (wildcards need dns-01)",
    )


def _authz_problem(authz: messages.Authorization) -> dict[str, object]:
    for challb in authz.challenges:
        error = challb.error
        if error is not None:
            return problem_of(error)
    return {"message": f"authorization is {authz.status.name} without an error from the CA"}


def _finalize(session: AcmeSession, name: str, order_url: str, csr_pem: bytes) -> bytes:
    client = session.open(name)

    def fetch() -> tuple[messages.Order, requests.Response]:
        response = session.post_as_get(order_url)
        return messages.Order.from_json(response.json()), response

    order = session.poll(
        name,
        "waiting for the order to become ready",
        fetch,
        lambda o: o.status != messages.STATUS_PENDING,
    )
    if order.status == messages.STATUS_READY:
        csr = x509.load_pem_x509_csr(csr_pem)
        with session.errors(name, "finalizing the order"):
            client._post(order.finalize, messages.CertificateRequest(csr=csr))
        order = session.poll(
            name,
            "waiting for the certificate",
            fetch,
            lambda o: o.status not in (messages.STATUS_READY, messages.STATUS_PROCESSING),
        )
    if order.status != messages.STATUS_VALID or not order.certificate:
        problem = problem_of(order.error) if order.error is not None else None
        detail = (problem or {}).get("detail") or f"the order is {order.status.name}"
        raise AcmeError(name, f"finalizing the order failed: {detail}", problem)
    with session.errors(name, "downloading the certificate"):
        text = session.post_as_get(order.certificate).text
    return text.encode()


def utc_now() -> datetime:
    return datetime.now(UTC)
