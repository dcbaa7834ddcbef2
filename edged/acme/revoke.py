"""Revocation through ACME (RFC 8555 section 7.6), signed with the account that ordered it."""

from __future__ import annotations

from cryptography import x509

from edged.acme.client import AcmeSession

# RFC 5280 CRLReason codes for the reasons an operator may give.
REASON_CODES = {
    "unspecified": 0,
    "keyCompromise": 1,
    "affiliationChanged": 3,
    "superseded": 4,
    "cessationOfOperation": 5,
}


def revoke_certs(session: AcmeSession, name: str, fullchains: list[bytes], reason: str) -> int:
    """Revoke the leaf of every chain (one per key type); AcmeError names the failure."""
    code = REASON_CODES[reason]
    client = session.open(name)
    done = 0
    for chain in fullchains:
        leaf = x509.load_pem_x509_certificates(chain)[0]
        with session.errors(name, f"revoking serial {leaf.serial_number:x}"):
            client.revoke(leaf, code)
        done += 1
    return done
