"""Typed errors shared across modules.

Every error a user can see names the thing that is wrong (file, config key, certificate name)
and says what to do about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class EdgedError(Exception):
    """Base of every error edged raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One finding about an input: printed by `edged check` as `source: key: message`."""

    source: str
    key: str
    message: str
    warning: bool = False

    def __str__(self) -> str:
        prefix = "warning: " if self.warning else ""
        key = f"{self.key}: " if self.key else ""
        return f"{self.source}: {key}{prefix}{self.message}"


class ConfigError(EdgedError):
    """The config file is invalid; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in problems))


class CertReason(StrEnum):
    """Why a certificate bundle was rejected (stable codes: used in logs, metrics and the API)."""

    EMPTY = "empty"
    GARBAGE = "garbage"
    NO_CERTIFICATE = "no_certificate"
    NO_KEY = "no_key"
    MULTIPLE_KEYS = "multiple_keys"
    ENCRYPTED_KEY = "encrypted_key"
    UNSUPPORTED_KEY = "unsupported_key"
    KEY_MISMATCH = "key_mismatch"
    CHAIN_ORDER = "chain_order"
    CHAIN_BROKEN = "chain_broken"
    CHAIN_INCOMPLETE = "chain_incomplete"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    NAME_NOT_COVERED = "name_not_covered"


class CertError(EdgedError):
    """A certificate or key was rejected; `reason` is a stable code, the message says the fix."""

    def __init__(self, reason: CertReason, message: str, source: str = "") -> None:
        self.reason = reason
        self.message = message
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class StoreError(EdgedError):
    """The certificate store could not be read or written."""


class AcmeError(EdgedError):
    """An ACME operation failed for a certificate name.

    `problem` keeps the CA's problem document (type, detail, status, subproblems) or, for
    failures outside the protocol (network, DNS, validation of the result), {"message": ...}.
    `retry_after` is the earliest time the CA allows the next attempt (429 / rateLimited).
    """

    def __init__(
        self,
        name: str,
        message: str,
        problem: dict[str, object] | None = None,
        retry_after: datetime | None = None,
    ) -> None:
        self.name = name
        self.message = message
        self.problem: dict[str, object] = problem or {"message": message}
        self.retry_after = retry_after
        super().__init__(f"{name}: {message}" if name else message)
