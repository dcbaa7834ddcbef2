"""Revocation through ACME (RFC 8555 section 7.6), signed with the account that ordered it."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from edged.acme.client import AcmeSession
from edged.errors import AcmeError

# RFC 5280 CRLReason codes for the reasons an operator may give.
REASON_CODES = {
    "unspecified": 0,
    "keyCompromise": 1,
    "affiliationChanged": 3,
    "superseded": 4,
    "cessationOfOperation": 5,
}
ALREADY_REVOKED = "urn:ietf:params:acme:error:alreadyRevoked"


@dataclass(frozen=True)
class Revoked:
    """What happened to one key type's certificate: `error` is None when it is revoked now."""

    key_type: str
    serial: str  # hex, as the CA and `edged cert inspect` show it
    already: bool = False  # the CA had revoked it before (an earlier, partly failed revoke)
    error: AcmeError | None = None

    @property
    def done(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        what = "already revoked" if self.already else "revoked"
        if self.error is not None:
            what = f"not revoked ({self.error.message})"
        return f"{self.key_type} (serial {self.serial}) {what}"


def revoke_certs(
    session: AcmeSession, name: str, chains: list[tuple[str, bytes]], reason: str
) -> list[Revoked]:
    """Revoke the leaf of every (key type, fullchain), one outcome each. One failure does not
    stop the others, and a leaf the CA already revoked counts as done: a retry then finishes a
    revoke that failed part-way. AcmeError only when the account cannot be reached at all."""
    code = REASON_CODES[reason]
    client = session.open(name)
    out = []
    for key_type, chain in chains:
        leaf = x509.load_pem_x509_certificates(chain)[0]
        serial = f"{leaf.serial_number:x}"
        try:
            with session.errors(name, f"revoking the {key_type} certificate (serial {serial})"):
                client.revoke(leaf, code)
        except AcmeError as exc:
            if exc.problem.get("type") == ALREADY_REVOKED:
                out.append(Revoked(key_type, serial, already=True))
            else:
                out.append(Revoked(key_type, serial, error=exc))
            continue
        out.append(Revoked(key_type, serial))
    return out
