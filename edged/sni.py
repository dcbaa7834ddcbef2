"""SniIndex: which site and certificates answer a TLS server name.

Pure and immutable: a new index is built off the event loop and swapped in as one reference,
so a handshake always sees one consistent index. Lookup is O(1): exact name, then the one-level
wildcard, then the default (`[tls].default_cert`), else None (refuse the handshake).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from edged.certs import CertBundle
from edged.config import Site


@dataclass(frozen=True)
class Route:
    """What one configured name resolves to: its site (backend) and its certificates."""

    name: str  # the configured name that matched (exact or wildcard): a bounded label
    site: Site
    bundles: tuple[CertBundle, ...]  # empty: no certificate yet, handshakes are refused

    @property
    def cert_key(self) -> tuple[str, ...]:
        """Identity of the certificate set: a changed cert gives a new key (new cached context)."""
        return tuple(b.fingerprint for b in self.bundles)


class SniIndex:
    """Immutable map from server name to Route."""

    __slots__ = ("_default", "_routes")

    def __init__(self, routes: Iterable[Route], default_name: str = "") -> None:
        self._routes = {route.name: route for route in routes}
        self._default = self._routes.get(default_name) if default_name else None

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
    sites: Iterable[Site], bundles: dict[int, tuple[CertBundle, ...]], default_name: str = ""
) -> SniIndex:
    """One route per configured name; `bundles` maps site index to its valid certificates."""
    routes = [
        Route(name, site, bundles.get(site.index, ())) for site in sites for name in site.names
    ]
    return SniIndex(routes, default_name)
