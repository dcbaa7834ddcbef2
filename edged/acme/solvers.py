"""Challenge solvers: make a challenge answerable, wait until it is, and clean up afterwards.

A solver instance belongs to one order. `cleanup()` removes everything `present()` created and
is called in a finally block, so tokens and TXT records never outlive a failed order.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Protocol

from acme import challenges, messages
from josepy import jwk

from edged.errors import AcmeError
from edged.http01 import ChallengeBoard

if TYPE_CHECKING:
    from edged.dns import DnsUpdater
    from edged.tlsalpn import AlpnChallengeBoard

log = logging.getLogger(__name__)


class Solver(Protocol):
    challenge_type: str

    def present(
        self, identifier: str, challb: messages.ChallengeBody, key: jwk.JWK
    ) -> challenges.ChallengeResponse:
        """Publish the answer for `identifier`; return the response to send to the CA."""
        ...

    def wait_ready(self) -> None:
        """Block until every presented answer is visible to the CA (DNS propagation)."""
        ...

    def cleanup(self) -> None:
        """Withdraw everything presented (never raises)."""
        ...


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """The (empty) answer to a tls-alpn-01 challenge. The acme library dropped its own
    TLS-ALPN-01 classes; without these the challenge would parse as UnrecognizedChallenge."""

    typ = "tls-alpn-01"


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """ACME tls-alpn-01 (RFC 8737); `validation` is the key authorization the challenge
    certificate's acmeIdentifier extension hashes."""

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: jwk.JWK, **kwargs: Any) -> str:
        return self.key_authorization(account_key)


class Http01Solver:
    challenge_type = "http-01"

    def __init__(self, board: ChallengeBoard) -> None:
        self.board = board
        self._tokens: list[str] = []

    def present(
        self, identifier: str, challb: messages.ChallengeBody, key: jwk.JWK
    ) -> challenges.ChallengeResponse:
        chall = challb.chall
        assert isinstance(chall, challenges.HTTP01)
        response, validation = chall.response_and_validation(key)
        token = chall.encode("token")
        self.board.add(token, validation, [identifier])
        self._tokens.append(token)
        return response

    def wait_ready(self) -> None:
        return None

    def cleanup(self) -> None:
        for token in self._tokens:
            self.board.remove(token)
        self._tokens.clear()


class TlsAlpn01Solver:
    challenge_type = "tls-alpn-01"

    def __init__(self, board: AlpnChallengeBoard) -> None:
        self.board = board
        self._names: list[str] = []

    def present(
        self, identifier: str, challb: messages.ChallengeBody, key: jwk.JWK
    ) -> challenges.ChallengeResponse:
        chall = challb.chall
        assert isinstance(chall, TLSALPN01)
        response, validation = chall.response_and_validation(key)
        self._names.append(identifier)  # first: cleanup removes it also if add fails midway
        self.board.add(identifier, validation)
        return response

    def wait_ready(self) -> None:
        return None

    def cleanup(self) -> None:
        for name in self._names:
            self.board.remove(name)
        self._names.clear()


class Dns01Solver:
    challenge_type = "dns-01"

    def __init__(self, updater: DnsUpdater, cancel: threading.Event | None = None) -> None:
        self.updater = updater
        self.cancel = cancel if cancel is not None else threading.Event()
        self._records: list[tuple[str, str]] = []

    def present(
        self, identifier: str, challb: messages.ChallengeBody, key: jwk.JWK
    ) -> challenges.ChallengeResponse:
        chall = challb.chall
        assert isinstance(chall, challenges.DNS01)
        response, validation = chall.response_and_validation(key)
        fqdn = self.updater.challenge_fqdn(identifier)
        # First: an update that fails (no answer in time) may still have been applied, and
        # deleting a value that is not there is no error.
        self._records.append((fqdn, validation))
        self.updater.add_txt(fqdn, validation)
        return response

    def wait_ready(self) -> None:
        by_name: dict[str, list[str]] = {}
        for fqdn, value in self._records:
            by_name.setdefault(fqdn, []).append(value)
        for fqdn, values in by_name.items():
            self.updater.wait_propagated(fqdn, values, sleep=self._sleep)

    def _sleep(self, seconds: float) -> None:
        if self.cancel.wait(seconds):
            raise AcmeError("dns-01", "stopped waiting for the TXT records: edged is stopping")

    def cleanup(self) -> None:
        for fqdn, value in self._records:
            try:
                self.updater.delete_txt(fqdn, value)
            except Exception as exc:  # cleanup must go on for the other records
                kept = (
                    " (kept in the DNS-01 journal: deleted again at its next sweep)"
                    if self.updater.journal is not None
                    else ""
                )
                log.warning("dns-01 cleanup failed record=%s error=%s%s", fqdn, exc, kept)
        self._records.clear()
