"""Where each site's certificates come from, loaded and validated.

First that applies: the site's `cert_file`/`key_file` (the files are the source of truth), else
the certificate stored under the site's first name (uploaded or issued by ACME). A bundle that
fails validation is not served; the problem is reported with the file and what to do. Runs in a
thread (file I/O); `now` is a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from edged.certs import CertBundle, check_bundle, parse_bundle
from edged.config import Config, Site
from edged.errors import CertError, CertReason, Problem, StoreError
from edged.store.base import Store, StoredCert


@dataclass(frozen=True)
class SiteCerts:
    """Valid bundles per site index, and every problem found while loading them."""

    bundles: dict[int, tuple[CertBundle, ...]] = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if not p.warning]


def read_pem(path: Path) -> bytes:
    """Read a PEM file; CertError (not OSError) so callers report it like any bad cert."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertError(CertReason.EMPTY, "no such file: check the path", str(path)) from None
    except OSError as exc:
        raise CertError(
            CertReason.EMPTY, f"cannot read: {exc.strerror}: check its permissions", str(path)
        ) from None


def load_file_bundle(site: Site, now: datetime, require_chain: bool) -> CertBundle:
    """Parse and validate a site's cert_file/key_file; raises the first CertError."""
    assert site.cert_file is not None and site.key_file is not None
    cert_pem = read_pem(site.cert_file)
    key_pem = cert_pem if site.key_file == site.cert_file else read_pem(site.key_file)
    bundle = parse_bundle(
        cert_pem, key_pem, source=str(site.cert_file), key_source=str(site.key_file)
    )
    problems = check_bundle(bundle, now=now, names=site.names, require_chain=require_chain)
    if problems:
        raise problems[0]
    return bundle


def load_stored_bundles(
    site: Site, store: Store, now: datetime, require_chain: bool
) -> tuple[tuple[CertBundle, ...], list[Problem]]:
    """The store's bundles for a site (one per key type) that pass validation."""
    label = f"store:{site.name}"
    try:
        stored = store.load(site.name)
    except StoreError as exc:
        return (), [Problem(label, site.key, str(exc))]
    if stored is None:
        return (), []
    return validate_stored(stored, site, now, require_chain, label)


def validate_stored(
    stored: StoredCert, site: Site, now: datetime, require_chain: bool, label: str
) -> tuple[tuple[CertBundle, ...], list[Problem]]:
    """Parse and check each key type of a stored certificate exactly as the daemon serves it:
    the bundles that pass, and a Problem (source `label:key_type`) for each that does not."""
    bundles: list[CertBundle] = []
    problems: list[Problem] = []
    for pair in stored.pairs:
        source = f"{label}:{pair.key_type}"
        try:
            bundle = parse_bundle(pair.fullchain, pair.privkey, source=source)
        except CertError as exc:
            problems.append(Problem(source, site.key, exc.message))
            continue
        errors = check_bundle(bundle, now=now, names=site.names, require_chain=require_chain)
        if errors:
            problems.extend(Problem(source, site.key, e.message) for e in errors)
            continue
        bundles.append(bundle)
    return tuple(bundles), problems


def load_site_certs(config: Config, store: Store | None, now: datetime) -> SiteCerts:
    """Load every site's certificates; never raises for bad input, reports it instead."""
    require_chain = config.tls.require_chain
    bundles: dict[int, tuple[CertBundle, ...]] = {}
    problems: list[Problem] = []
    for site in config.sites:
        if site.cert_file is not None:
            try:
                bundles[site.index] = (load_file_bundle(site, now, require_chain),)
            except CertError as exc:
                source = exc.source or str(site.cert_file)
                problems.append(Problem(source, f"{site.key}.cert_file", exc.message))
            continue
        found: tuple[CertBundle, ...] = ()
        if store is not None:
            found, store_problems = load_stored_bundles(site, store, now, require_chain)
            problems.extend(store_problems)
        if found:
            bundles[site.index] = found
        elif not any(p.key == site.key for p in problems):
            how = (
                "ACME will request one"
                if config.acme is not None
                else "set cert_file/key_file, upload one, or configure [acme]"
            )
            problems.append(
                Problem(
                    str(config.source),
                    site.key,
                    f"no certificate yet for {', '.join(site.names)}: handshakes for these "
                    f"names are refused until there is one ({how})",
                    warning=True,
                )
            )
    return SiteCerts(bundles, tuple(problems))
