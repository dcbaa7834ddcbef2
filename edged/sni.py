"""SniIndex: which site and certificates answer a TLS server name.

Pure and immutable: a new index is built off the event loop and swapped in as one reference,
so a handshake always sees one consistent index. Lookup is O(1): exact name, then the one-level
wildcard, then the default (`[tls].default_cert`), else None (refuse the handshake).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from edged.chains import shared_chain
from edged.config import Site


class Servable(Protocol):
    """What serving a certificate needs: a CertBundle (parsed) or a ServedCert (bytes only)."""

    @property
    def fingerprint(self) -> str: ...

    @property
    def key_type(self) -> str: ...

    @property
    def leaf_pem(self) -> bytes: ...

    @property
    def chain_pem(self) -> bytes: ...

    @property
    def fullchain_pem(self) -> bytes: ...

    @property
    def key_pem(self) -> bytes: ...


# Slots: 100k of them per process, and a pickled instance (they go to the workers) would
# otherwise get a dict of its own, ~90 B (3.11 keeps values inline until then).
@dataclass(frozen=True, slots=True)
class ServedCert:
    """A certificate as worker processes get it: PEM bytes and identity, no parsed objects
    (those cannot be pickled, and the main process has validated the bundle already). The
    chain is held apart from the leaf, shared (edged.chains): one message pickles a shared
    chain once, and a worker shares what arrives in separate ones (`shared`)."""

    fingerprint: str
    key_type: str
    leaf_pem: bytes
    chain_pem: bytes
    key_pem: bytes = field(repr=False)

    @property
    def fullchain_pem(self) -> bytes:
        return self.leaf_pem + self.chain_pem

    @classmethod
    def of(cls, bundle: Servable) -> ServedCert:
        return cls(
            bundle.fingerprint, bundle.key_type, bundle.leaf_pem, bundle.chain_pem, bundle.key_pem
        )

    def shared(self) -> ServedCert:
        """This certificate holding the process's one copy of its chain."""
        chain = shared_chain(self.chain_pem)
        if chain is self.chain_pem:
            return self
        return ServedCert(self.fingerprint, self.key_type, self.leaf_pem, chain, self.key_pem)


@dataclass(frozen=True, slots=True)  # slots: one per name, 100k per process, ~40 B each less
class Route:
    """What one configured name resolves to: its site (backend) and its certificates."""

    name: str  # the configured name that matched (exact or wildcard): a bounded label
    site: Site
    bundles: tuple[Servable, ...]  # empty: no certificate yet, handshakes are refused
    # Not read from the store yet (a large store is indexed in the background after start):
    # the data path loads it before the handshake.
    pending: bool = False


class SniIndex:
    """Immutable map from server name to Route."""

    __slots__ = ("_default", "_default_name", "_routes")

    def __init__(self, routes: Iterable[Route], default_name: str = "") -> None:
        self._routes = {route.name: route for route in routes}
        self._default_name = default_name
        self._default = self._routes.get(default_name) if default_name else None

    def updated(self, changes: Iterable[tuple[Site, Sequence[Servable]]]) -> SniIndex:
        """A new index where the names of each site in `changes` get its new certificates;
        O(names) for a dict copy instead of rebuilding every Route (one renewal among 100k)."""
        new = SniIndex((), "")
        routes = dict(self._routes)
        for site, bundles in changes:
            for name in site.names:
                routes[name] = Route(name, site, tuple(bundles))
        new._routes = routes
        new._default_name = self._default_name
        new._default = routes.get(self._default_name) if self._default_name else None
        return new

    def __len__(self) -> int:
        return len(self._routes)

    def routes(self) -> list[Route]:
        return list(self._routes.values())

    def get(self, name: str) -> Route | None:
        """The route of a configured name (no wildcard matching, no default)."""
        return self._routes.get(name)

    def lookup(self, server_name: str | None) -> Route | None:
        """Route for a client's SNI (None = no SNI). Never raises."""
        if server_name:
            name = server_name.lower().rstrip(".")
            route = self._routes.get(name)
            if route is not None:
                return route
            head, dot, rest = name.partition(".")
            # One level only: *.a.com answers x.a.com but never x.y.a.com.
            if dot and "." in rest and _is_label(head):
                route = self._routes.get("*." + rest)
                if route is not None:
                    return route
        return self._default


def _is_label(text: str) -> bool:
    # Only a real DNS label may stand in for the '*' (no NUL, '/', '*' or non-ASCII bytes).
    return 0 < len(text) <= 63 and text.isascii() and text.replace("-", "").isalnum()


def build_index(
    sites: Iterable[Site],
    bundles: Mapping[int, Sequence[Servable]],
    default_name: str = "",
    pending: Collection[int] = (),
) -> SniIndex:
    """One route per configured name; `bundles` maps site index to its valid certificates,
    `pending` holds the site indices whose certificates are not read yet."""
    routes = [
        Route(name, site, tuple(bundles.get(site.index, ())), site.index in pending)
        for site in sites
        for name in site.names
    ]
    return SniIndex(routes, default_name)
