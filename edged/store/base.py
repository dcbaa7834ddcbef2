"""What the certificate store holds and the interface every store implements.

The store keeps PEM bytes as given: it never parses certificates (edged.certs does), so a store
can be read even when the crypto library changes its mind about a certificate.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, TypeAlias, TypeVar, runtime_checkable

from edged.errors import StoreError

# Key types become file names (fullchain.<key_type>.pem): keep them to a safe alphabet.
KEY_TYPE_PATTERN = re.compile(r"[a-z0-9-]{1,32}")
SOURCES = frozenset({"acme", "upload"})
# What Store.load_states gives per name: the state, None when absent, or why it is unreadable.
StateRead: TypeAlias = dict[str, object] | StoreError | None


T = TypeVar("T")


def read_each(names: Iterable[str], read: Callable[[str], T]) -> dict[str, T | StoreError]:
    """`read(name)` for each name, one by one; a name whose read raises StoreError gets that
    error, and the others are still read."""
    found: dict[str, T | StoreError] = {}
    for name in names:
        try:
            found[name] = read(name)
        except StoreError as exc:
            found[name] = exc
    return found


def _empty_extra() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True)
class PemPair:
    """One certificate chain and its private key, for one key type."""

    key_type: str  # e.g. "ecdsa-p256", "rsa-2048"
    fullchain: bytes
    privkey: bytes = field(repr=False)  # never shown in repr, so never in logs

    def __post_init__(self) -> None:
        if not isinstance(self.key_type, str) or not KEY_TYPE_PATTERN.fullmatch(self.key_type):
            raise ValueError(
                f"key type {self.key_type!r} is invalid: use 1-32 of a-z, 0-9 and '-' "
                "(e.g. 'ecdsa-p256')"
            )
        if not isinstance(self.fullchain, bytes) or not isinstance(self.privkey, bytes):
            raise ValueError(f"key type {self.key_type!r}: fullchain and privkey must be bytes")


@dataclass(frozen=True)
class StoredCert:
    """One certificate as stored: every key type's PEM pair plus metadata.

    `names` and `pairs` are converted to tuples and `extra` to a read-only copy
    (MappingProxyType), so an instance cannot change after construction. `extra` is left out
    of the hash (a mapping proxy is not hashable) but still compared by `==`; equal instances
    therefore still hash equal.
    """

    name: str  # the certificate's first DNS name (normalised; may be a wildcard "*.a.com")
    names: tuple[str, ...]  # every name the certificate covers (normalised)
    pairs: tuple[PemPair, ...]  # one per key type; at least one; key types distinct
    source: str  # "acme" | "upload"
    stored_at: float  # unix time
    extra: Mapping[str, str] = field(default_factory=_empty_extra, hash=False)

    def __post_init__(self) -> None:
        # Frozen: normalise container types through object.__setattr__ (dataclass idiom).
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "pairs", tuple(self.pairs))
        object.__setattr__(self, "stored_at", float(self.stored_at))
        extra = dict(self.extra)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise ValueError(f"certificate {self.name!r}: extra must map str to str")
        object.__setattr__(self, "extra", MappingProxyType(extra))
        if not self.names or not all(isinstance(n, str) for n in self.names):
            raise ValueError(f"certificate {self.name!r}: names must be a non-empty list of str")
        if not self.pairs or not all(isinstance(p, PemPair) for p in self.pairs):
            raise ValueError(f"certificate {self.name!r}: needs at least one PemPair")
        key_types = [p.key_type for p in self.pairs]
        if len(set(key_types)) != len(key_types):
            raise ValueError(f"certificate {self.name!r}: key types repeat: {key_types}")
        if self.source not in SOURCES:
            raise ValueError(
                f"certificate {self.name!r}: source {self.source!r} is not one of {sorted(SOURCES)}"
            )

    @property
    def key_types(self) -> tuple[str, ...]:
        return tuple(p.key_type for p in self.pairs)


@runtime_checkable
class Store(Protocol):
    """Certificates, previous versions and renewal state, keyed by a certificate's first name.

    Synchronous: the daemon calls it through asyncio.to_thread. Every name argument is
    validated and normalised; a bad one raises StoreError. Reads never return a half-written
    certificate: either a whole version or StoreError.
    """

    def load(self, name: str) -> StoredCert | None:
        """The live certificate; None when absent; StoreError when present but unreadable."""
        ...

    def load_many(self, names: Sequence[str]) -> dict[str, StoredCert | StoreError | None]:
        """load() of each of `names` at once, keyed by the names as given (one bad name does
        not fail the others). A store may read them in batches (Redis: one round trip per
        CERTS_BATCH names)."""
        ...

    def save(self, cert: StoredCert) -> None:
        """Make `cert` live; the current live version (if whole) becomes the previous one."""
        ...

    def save_unless_upload(self, cert: StoredCert) -> StoredCert | None:
        """save(), unless the live entry is an upload: then nothing is written and that upload
        is returned. Checked and written in one step, so an upload by another writer lands
        before both (and stays) or after both (and replaces `cert`). An unreadable entry is
        no upload: `cert` replaces it."""
        ...

    def delete(self, name: str) -> None:
        """Remove the certificate and its previous version (no error when absent)."""
        ...

    def names(self) -> list[str]:
        """Names that have a stored certificate, sorted."""
        ...

    def rollback(self, name: str) -> StoredCert:
        """Swap live and previous; returns the new live one; StoreError if no previous."""
        ...

    def load_previous(self, name: str) -> StoredCert | None:
        """The version before the live one; None when there is none."""
        ...

    def load_state(self, name: str) -> dict[str, object] | None:
        """Renewal state saved by save_state; None when absent; StoreError when corrupt."""
        ...

    def load_states(self, names: Sequence[str]) -> dict[str, StateRead]:
        """load_state of each of `names` at once, keyed by the names as given: the state, None
        when absent, or the StoreError that name's load_state would raise (one bad name does
        not fail the others). A store may read them in batches (Redis: one round trip per
        STATES_BATCH names)."""
        ...

    def save_state(self, name: str, state: Mapping[str, object]) -> None:
        """Replace the renewal state (a JSON object) atomically."""
        ...

    def load_account(self, directory: str) -> tuple[dict[str, object], bytes] | None:
        """The ACME account (registration JSON, key PEM) for a directory URL, or None."""
        ...

    def save_account(self, directory: str, account: Mapping[str, object], key_pem: bytes) -> None:
        """Store the ACME account of a directory URL (the key file is 0600)."""
        ...
