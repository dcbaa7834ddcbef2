"""Where each site's certificates come from, loaded and validated.

First that applies: the site's `cert_file`/`key_file` (the files are the source of truth), else
the certificate stored under the site's first name (uploaded or issued by ACME). A bundle that
fails validation is not served; the problem is reported with the file and what to do. Runs in a
thread (file I/O); `now` is a parameter.

One exception, for the daemon only (`keep_expired=True`): when every certificate a site has in
the store is expired and otherwise valid, it is served anyway (clients decide whether to accept
it) and reported at error level; a replacement for a certificate already served is still
refused (see edged.daemon.build_serving), and `edged check` reports it as the error it is.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from edged.certs import CertBundle, _span, _when, check_bundle, parse_bundle, stored_bundle
from edged.chains import split_fullchain
from edged.config import Config, Site
from edged.errors import CertError, CertReason, Problem, StoreError
from edged.renewal import RenewalState, StateError
from edged.store.base import PemPair, Store, StoredCert


@dataclass(frozen=True)
class SiteCerts:
    """Valid bundles per site index, and every problem found while loading them."""

    bundles: dict[int, tuple[CertBundle, ...]] = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()
    # Sites served with an expired store certificate because they have nothing else (only with
    # keep_expired): index → the error to report. Not in `problems`: nothing was rejected.
    expired: dict[int, Problem] = field(default_factory=dict)
    # The store names among the sites loaded whose entry holds an upload (source "upload"),
    # as read now or, for an entry not read again because unchanged, as last read: ACME does
    # not manage them (edged.renewer.managed_sites), and needs no second read to know it.
    uploads: frozenset[str] = frozenset()

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if not p.warning]

    def only(self, sites: Sequence[Site]) -> SiteCerts:
        """What was found for these sites alone."""
        indices = {site.index for site in sites}
        keys = {site.key for site in sites}
        names = {site.name for site in sites}
        return SiteCerts(
            {i: b for i, b in self.bundles.items() if i in indices},
            tuple(p for p in self.problems if p.key.split(".", 1)[0] in keys),
            {i: p for i, p in self.expired.items() if i in indices},
            self.uploads & names,
        )


def read_pem(path: Path) -> bytes:
    """Read a PEM file; CertError (not OSError) so callers report it like any bad cert."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertError(CertReason.EMPTY, "no such file: check the path", str(path)) from None
    except IsADirectoryError:
        raise CertError(
            CertReason.EMPTY, "is a directory: name the PEM file in it", str(path)
        ) from None
    except PermissionError:
        raise CertError(
            CertReason.EMPTY,
            "cannot read: permission denied: the user edged runs as needs read access to this "
            "file and search access to its directories (chmod/chown)",
            str(path),
        ) from None
    except OSError as exc:
        raise CertError(
            CertReason.EMPTY, f"cannot read: {exc.strerror}: check its permissions", str(path)
        ) from None


def load_file_bundle(
    site: Site, now: datetime, require_chain: bool
) -> tuple[CertBundle, list[CertError]]:
    """Parse and validate a site's cert_file/key_file: the bundle and the names it does not
    cover (see partly_covers); raises the first other CertError."""
    assert site.cert_file is not None and site.key_file is not None
    cert_pem = read_pem(site.cert_file)
    key_pem = cert_pem if site.key_file == site.cert_file else read_pem(site.key_file)
    bundle = parse_bundle(
        cert_pem, key_pem, source=str(site.cert_file), key_source=str(site.key_file)
    )
    problems = check_bundle(bundle, now=now, names=site.names, require_chain=require_chain)
    if problems and not partly_covers(problems, site):
        raise problems[0]
    return bundle, problems


def partly_covers(errors: Sequence[CertError], site: Site) -> bool:
    """The only problems of a certificate are names of the site it does not cover, and it
    covers at least one: names were added to the site (its certificate is ordered or uploaded
    after the config). It serves the names it covers meanwhile, rather than the whole site
    going dark; the new names get it too (and their clients' name check fails) until then."""
    return all(e.reason is CertReason.NAME_NOT_COVERED for e in errors) and len(errors) < len(
        set(site.names)
    )


def _uncovered(source: str, site: Site, errors: Sequence[CertError]) -> list[Problem]:
    """The warnings for a certificate served although it does not cover all the names."""
    return [
        Problem(source, site.key, f"{e.message} (served for the names it covers meanwhile)", True)
        for e in errors
    ]


def load_stored_bundles(
    site: Site,
    store: Store,
    now: datetime,
    require_chain: bool,
    *,
    keep_expired: bool = False,
    light: bool = False,
    preread: Mapping[str, StoredCert | StoreError | None] | None = None,
    known: Mapping[bytes, CertBundle] | None = None,
    uploads: set[str] | None = None,
) -> tuple[tuple[CertBundle, ...], list[Problem]]:
    """The store's bundles for a site (one per key type) that pass validation (or, with
    `keep_expired`, the expired ones when that is all there is: see validate_stored).
    `preread`: what store.load returned (or raised) for some names already; `known`: see
    validate_stored. `uploads`: the site's name is added when its entry is an upload (whether
    or not it passes validation: the source is what decides who manages it)."""
    label = f"store:{site.name}"
    try:
        if preread is not None and site.name in preread:
            stored = preread[site.name]
        else:
            stored = store.load(site.name)
        if isinstance(stored, StoreError):
            raise stored
    except StoreError as exc:
        return (), [Problem(label, site.key, str(exc))]
    if stored is None:
        return (), []
    if uploads is not None and stored.source == "upload":
        uploads.add(site.name)
    return validate_stored(
        stored,
        site,
        now,
        require_chain,
        label,
        keep_expired=keep_expired,
        light=light,
        known=known,
    )


def validate_stored(
    stored: StoredCert,
    site: Site,
    now: datetime,
    require_chain: bool,
    label: str,
    *,
    keep_expired: bool = False,
    light: bool = False,
    known: Mapping[bytes, CertBundle] | None = None,
) -> tuple[tuple[CertBundle, ...], list[Problem]]:
    """Parse and check each key type of a stored certificate exactly as the daemon serves it:
    the bundles that pass, and a Problem (source `label:key_type`) for each that does not.

    With `keep_expired`, when no key type passes but some fail only by having expired, those
    are returned instead (without a problem: the caller reports them as served while expired).
    `light` (the daemon): trust what the store validated when writing, re-read only the leaf
    (see edged.certs.stored_bundle); `edged check` and uploads validate everything. With
    `light`, `known` (the bundles being served, by their leaf's PEM) spares parsing a
    pair again: stored_bundle's result depends on the bytes and the key type alone, and the
    checks below run on it as on a new one (a full reload of 100k unchanged entries parsed
    every leaf again: 3.3 s).
    """
    parsed: list[tuple[str, CertBundle]] = []
    problems: list[Problem] = []
    for pair in stored.pairs:
        source = f"{label}:{pair.key_type}"
        try:
            if light:
                bundle = _served(known, pair) or stored_bundle(
                    pair.fullchain, pair.privkey, pair.key_type, source=source
                )
            else:
                bundle = parse_bundle(pair.fullchain, pair.privkey, source=source)
        except CertError as exc:
            problems.append(Problem(source, site.key, exc.message))
            continue
        parsed.append((source, bundle))
    return _checked(parsed, site, now, require_chain, keep_expired, problems)


def recheck_served(
    bundles: Sequence[CertBundle],
    site: Site,
    now: datetime,
    require_chain: bool,
    label: str,
    *,
    keep_expired: bool = False,
) -> tuple[tuple[CertBundle, ...], list[Problem]]:
    """validate_stored for a store entry known unchanged since `bundles` were made from it,
    all of its pairs (see edged.reload.unchanged_entries): the same checks, no read."""
    parsed = [(f"{label}:{b.key_type}", b) for b in bundles]
    return _checked(parsed, site, now, require_chain, keep_expired, [])


def _checked(
    parsed: Sequence[tuple[str, CertBundle]],
    site: Site,
    now: datetime,
    require_chain: bool,
    keep_expired: bool,
    problems: list[Problem],
) -> tuple[tuple[CertBundle, ...], list[Problem]]:
    """The bundles of one store entry that pass the checks (dates, names, chain); see
    validate_stored for `keep_expired`. Adds to `problems`."""
    bundles: list[CertBundle] = []
    expired: list[tuple[str, CertBundle]] = []
    for source, bundle in parsed:
        errors = check_bundle(bundle, now=now, names=site.names, require_chain=require_chain)
        if errors and keep_expired and all(e.reason is CertReason.EXPIRED for e in errors):
            expired.append((source, bundle))
            continue
        if errors and partly_covers(errors, site):
            problems.extend(_uncovered(source, site, errors))
        elif errors:
            problems.extend(Problem(source, site.key, e.message) for e in errors)
            continue
        bundles.append(bundle)
    if expired and not bundles:
        return tuple(b for _, b in expired), problems
    for source, bundle in expired:  # a valid key type serves the site: the expired ones go
        problems.extend(Problem(source, site.key, e.message) for e in check_bundle(bundle, now=now))
    return tuple(bundles), problems


def _served(known: Mapping[bytes, CertBundle] | None, pair: PemPair) -> CertBundle | None:
    """The bundle in `known` made from exactly this pair, if any."""
    if not known:
        return None
    leaf, chain = split_fullchain(pair.fullchain)
    found = known.get(leaf)
    if (
        found is not None
        and found.chain_pem == chain
        and found.key_type == pair.key_type
        and found.key_pem == pair.privkey
    ):
        return found
    return None


def expired_problem(
    site: Site, bundles: tuple[CertBundle, ...], store: Store, acme: bool, now: datetime
) -> Problem:
    """The error for a site served with expired certificates because it has no other."""
    not_after = max(b.not_after for b in bundles)
    ago = _span((now - not_after).total_seconds())
    return Problem(
        f"store:{site.name}",
        site.key,
        f"expired since {_when(not_after)} ({ago} ago), still served because there is no "
        f"replacement; renewal state: {renewal_summary(site, store, acme)}",
    )


def renewal_summary(site: Site, store: Store, acme: bool) -> str:
    """One line on where a site's next certificate comes from (for the expired-cert error)."""
    try:
        stored = store.load(site.name)
        raw = store.load_state(site.name) if acme else None
        state = RenewalState.from_json(raw, site.name) if raw else None
    except (StoreError, StateError) as exc:
        return f"unreadable ({exc})"
    if not acme or (stored is not None and stored.source == "upload"):
        return "none: not managed by ACME, upload or install a new certificate"
    if state is None:
        return "no attempt yet"
    parts = [state.status.value, f"{state.attempts} failed attempts"]
    if state.last_error:
        message = state.last_error.get("detail") or state.last_error.get("message")
        parts.append(f"last error: {message}")
    if state.next_try is not None:
        parts.append(f"next try {_when(state.next_try)}")
    return ", ".join(parts)


def load_site_certs(
    config: Config,
    store: Store | None,
    now: datetime,
    *,
    keep_expired: bool = False,
    light: bool = False,
    sites: Sequence[Site] | None = None,
    known: Mapping[bytes, CertBundle] | None = None,
    unchanged: Mapping[str, tuple[CertBundle, ...]] | None = None,
    uploaded: Collection[str] = (),
) -> SiteCerts:
    """Load every site's certificates; never raises for bad input, reports it instead.

    `keep_expired` (the daemon): a site whose store certificates are all expired, and have no
    other fault, is served with them and listed in SiteCerts.expired (see the module doc).
    `light`, `known`: see validate_stored. `sites`: only these (a store change for a few
    names). `unchanged`: store name → the bundles served from its entry, which has not
    changed since they were made from it: checked again, not read (see recheck_served).
    `uploaded`: the names among `unchanged` whose entry held an upload when last read (see
    SiteCerts.uploads)."""
    unchanged = unchanged or {}
    uploads: set[str] = set()
    require_chain = config.tls.require_chain
    bundles: dict[int, tuple[CertBundle, ...]] = {}
    problems: list[Problem] = []
    expired: dict[int, Problem] = {}
    chosen = config.sites if sites is None else sites
    preread = _preread(store, [s for s in chosen if s.stored and s.name not in unchanged])
    for site in chosen:
        if site.passthrough:
            continue  # its backend terminates TLS and holds the certificate
        if site.cert_file is not None:
            try:
                bundle, uncovered = load_file_bundle(site, now, require_chain)
                bundles[site.index] = (bundle,)
                problems.extend(_uncovered(str(site.cert_file), site, uncovered))
            except CertError as exc:
                source = exc.source or str(site.cert_file)
                # Name the setting of the file at fault (the key's own problems come with the
                # key file as their source).
                key = (
                    "key_file"
                    if source == str(site.key_file) != str(site.cert_file)
                    else "cert_file"
                )
                problems.append(Problem(source, f"{site.key}.{key}", exc.message))
            continue
        found: tuple[CertBundle, ...] = ()
        if store is not None:
            served = unchanged.get(site.name)
            if served is not None:
                if site.name in uploaded:
                    uploads.add(site.name)
                found, store_problems = recheck_served(
                    served,
                    site,
                    now,
                    require_chain,
                    f"store:{site.name}",
                    keep_expired=keep_expired,
                )
            else:
                found, store_problems = load_stored_bundles(
                    site,
                    store,
                    now,
                    require_chain,
                    keep_expired=keep_expired,
                    light=light,
                    preread=preread,
                    known=known,
                    uploads=uploads,
                )
            problems.extend(store_problems)
            if found and all(b.not_after < now for b in found):
                expired[site.index] = expired_problem(
                    site, found, store, config.acme is not None, now
                )
        if found:
            bundles[site.index] = found
        elif not any(p.key == site.key for p in problems):
            how = _how_to_get_one(site, config)
            problems.append(
                Problem(
                    str(config.source),
                    site.key,
                    f"no certificate yet for {', '.join(site.names)}: handshakes for these "
                    f"names are refused until there is one ({how})",
                    warning=True,
                )
            )
    return SiteCerts(bundles, tuple(problems), expired, frozenset(uploads))


def _how_to_get_one(site: Site, config: Config) -> str:
    """What gets a certificate for a site without one, for its "no certificate yet" warning."""
    if config.acme is None:
        return "set cert_file/key_file, upload one, or configure [acme]"
    wildcard = site.wildcard_without(config.acme.challenge)
    if wildcard is not None:
        # The renewer fails such a site at once (renewer.check_challenge): not "will request".
        return (
            f"ACME cannot order it: CAs validate {wildcard} only over dns-01: set "
            'acme.challenge = "dns-01" with an [acme.dns] table, or upload one'
        )
    return "ACME will request one"


PREREAD_MIN = 256  # below this many store sites, read them one by one
PREREAD_CHUNK = 256  # entries per unit of work (a thread pool's per-item cost is ~40 µs)
PREREAD_THREADS = 4
# Seconds per entry spent waiting (wall time beyond this thread's CPU time) above which the
# disk is being read: from the page cache an entry (three small files, JSON, two SHA-256)
# takes ~40 µs of CPU and no waiting; from disk ~250 µs, mostly waiting. Wall time alone
# would mistake a garbage-collector pause (CPU) for the disk.
PREREAD_WAIT = 100e-6


def _preread(
    store: Store | None, sites: Sequence[Site]
) -> dict[str, StoredCert | StoreError | None]:
    """Read many sites' store entries before they are parsed. From the page cache one thread
    is fastest: the reads are short and the interpreter's lock makes threads contend (4
    threads took twice as long as one, 30k entries). From disk, threads overlap the waits (4
    threads 1.7x faster than one, 10k entries, caches dropped); 100k certificates with a cold
    page cache took a minute one by one. So chunks are read in this thread while they hardly
    wait, and the rest go to a thread pool once one waits for the disk."""
    if store is None or len(sites) < PREREAD_MIN:
        return {}
    names = [site.name for site in sites]
    chunks = [names[i : i + PREREAD_CHUNK] for i in range(0, len(names), PREREAD_CHUNK)]
    found: dict[str, StoredCert | StoreError | None] = {}
    for done, chunk in enumerate(chunks):
        wall, cpu = time.perf_counter(), time.thread_time()
        found.update(_read_chunk(store, chunk))
        waited = (time.perf_counter() - wall) - (time.thread_time() - cpu)
        if waited > PREREAD_WAIT * len(chunk):
            rest = chunks[done + 1 :]
            with ThreadPoolExecutor(PREREAD_THREADS, thread_name_prefix="edged-preread") as pool:
                for part in pool.map(functools.partial(_read_chunk, store), rest):
                    found.update(part)
            break
    return found


def _read_chunk(store: Store, names: list[str]) -> dict[str, StoredCert | StoreError | None]:
    """The reads release the interpreter's lock; parsing stays in the caller's thread."""
    return store.load_many(names)
