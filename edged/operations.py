"""What the admin API asks of the running daemon: status, certificates, renew, upload, revoke.

Every answer is built from the daemon's live objects (the served bundles, the renewal states),
so `edged status` shows what is actually being served. Mutations go through the same paths as
everything else: uploads are validated like files and stored atomically, then picked up by a
reload; renewals go through the renewal loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from edged import __version__
from edged.acme.client import AcmeSession
from edged.acme.revoke import revoke_certs
from edged.admin import AdminError
from edged.certs import CertBundle, check_bundle, parse_bundle
from edged.config import Config, Site
from edged.errors import AcmeError, StoreError
from edged.heap import current_allocator
from edged.names import NameError_, normalize_name, store_dirname
from edged.renewal import CertStatus, RenewalState, fallback_active, window_cert
from edged.store.base import PemPair, Store, StoredCert

if TYPE_CHECKING:
    from edged.daemon import Daemon

WAIT_LIMIT = 90.0  # the CLI waits up to 120 s; answer before it gives up


@dataclass(frozen=True)
class _View:
    """What a certificate summary reads, taken at one moment on the event loop: a listing
    built from it in a thread cannot pair a site with another's certificate when a reload
    renumbers the sites meanwhile."""

    config: Config
    bundles: Mapping[int, tuple[CertBundle, ...]]  # replaced, never changed, by the daemon
    states: Mapping[str, RenewalState]
    leases: Mapping[str, str]
    now: datetime


class DaemonOperations:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    # --- reading ------------------------------------------------------------------------

    def _config(self) -> Config:
        config = self.daemon.config
        if config is None:
            raise AdminError("busy", "edged is still starting", 503)
        return config

    def _site(self, raw: str) -> Site:
        try:
            name = normalize_name(raw)
        except NameError_ as exc:
            raise AdminError("bad_name", str(exc), 400) from None
        site = self._config().site_for(name)
        if site is None:
            raise AdminError("unknown_name", f"{name} is not a name of any [[site]]", 404)
        return site

    def _view(self) -> _View:
        renewer = self.daemon.renewer
        config = self._config()
        return _View(
            config,
            self.daemon.bundles,
            dict(renewer.states),
            dict(renewer.lease_holders),
            datetime.now(UTC),
        )

    async def status(self) -> dict[str, object]:
        view = self._view()
        config = view.config
        # Only the states (a summary reads each certificate's issuer), counted in a thread
        # from the view: ~20 ms for 100k sites, and monitoring polls this.
        counts = await asyncio.to_thread(_count_states, view)
        handshakes = self.daemon.total_counters().handshakes
        return {
            "node": socket.gethostname(),
            "version": __version__,
            "uptime_seconds": round(time.time() - self.daemon.started, 1),
            "allocator": current_allocator(),
            "listeners": [f"https {a}" for a in self.daemon.listening()]
            + [f"http {a}" for a in self.daemon.http.addresses()],
            "sites": len(config.sites),
            "certs": counts,
            "connections_active": self.daemon.connections_active(),
            "handshakes_ok": sum(n for (result, _), n in handshakes.items() if result == "ok"),
            "handshakes_failed": sum(n for (result, _), n in handshakes.items() if result != "ok"),
            "acme": config.acme.directory if config.acme else None,
            "workers": self.daemon.pool.describe() if self.daemon.pool is not None else [],
        }

    async def certs(self) -> list[dict[str, object]]:
        # One summary per site, each reading its certificate's issuer: seconds for 100k
        # sites, in a thread so the event loop (port 80's challenges, /metrics) goes on.
        view = self._view()
        return await asyncio.to_thread(lambda: [_summary(site, view) for site in view.config.sites])

    def cert(self, name: str) -> dict[str, object]:
        site = self._site(name)
        view = self._view()
        summary = _summary(site, view)
        served = view.bundles.get(site.index, ())
        summary["certificates"] = [
            {
                "key_type": b.key_type,
                "subject": b.subject,
                "issuer": b.issuer,
                "serial": b.serial,
                "fingerprint_sha256": b.fingerprint,
                "not_before": b.not_before,
                "not_after": b.not_after,
                "names": list(b.names),
            }
            for b in served
        ]
        state = self.daemon.renewer.states.get(site.name)
        if state is not None:
            summary["last_success"] = state.last_success
            summary["last_attempt"] = state.last_attempt
            summary["not_before_retry"] = state.not_before_retry
            summary["issued_by"] = state.issued_by
            summary["error"] = state.last_error
            window = window_cert(served[0], state, served[1:]) if served else None
            if state.ari is not None and window is not None:
                # The CA's window the renewal follows, the served certificate (key type) it
                # is for, and its page saying why (RFC 9773 section 4.2: for the operator).
                summary["ari_window"] = {
                    "start": state.ari.start,
                    "end": state.ari.end,
                    "key_type": window.key_type,
                    "explanation_url": state.ari.explanation_url,
                }
        return summary

    # --- actions --------------------------------------------------------------------------

    async def _not_acme(self, site: Site, action: str) -> AdminError:
        """The refusal of `action` (renew, revoke) for a site without a renewal state, naming
        its own cause and fix: the operator cannot tell a cert_file, an upload, a missing
        [acme] and a store still being read apart from the outside."""
        config = self._config()
        store = self.daemon.store
        if config.acme is not None and self.daemon.renewer.config is None:
            # A large store is read in the background; renewals start once it has been.
            return AdminError(
                "busy",
                f"{site.name}: edged is still reading its store and starts renewals once it "
                f"has (logged as 'store indexed'): {action} it then",
                503,
            )
        elsewhere = "revoke it at the CA that issued it" if action == "revoke" else ""
        if site.passthrough:
            why = f"{site.key} passes TLS through to its backend, which holds the certificate"
            fix = elsewhere or "renew it on the backend"
        elif site.cert_file is not None:
            why = f"{site.key} serves cert_file {site.cert_file}"
            fix = elsewhere or "replace that file"
        elif config.acme is None:
            why = f"there is no [acme] table in {config.source}"
            fix = elsewhere or "add one and reload to have edged obtain its certificate"
        elif store is not None and await self._uploaded(store, site.name):
            why = "it serves an uploaded certificate"
            fix = elsewhere or (
                f"`edged upload {site.name} --remove` hands it back to ACME, which orders a new "
                "one at once"
            )
        else:
            return AdminError("not_acme", f"{site.name} is not managed by ACME", 409)
        return AdminError("not_acme", f"{site.name} is not managed by ACME: {why}: {fix}", 409)

    @staticmethod
    async def _uploaded(store: Store, name: str) -> bool:
        try:
            stored = await asyncio.to_thread(store.load, name)
        except StoreError:
            return False  # the refusal stands; it only says less about why
        return stored is not None and stored.source == "upload"

    async def renew(self, name: str) -> dict[str, object]:
        site = self._site(name)
        renewer = self.daemon.renewer
        if site.name not in renewer.states:
            raise await self._not_acme(site, "renew")
        started = datetime.now(UTC)
        forced = renewer.force(site.name)
        limit = forced.not_before_retry
        if limit is not None and limit > started:
            # No attempt can start before the CA's limit ends (an earlier one only fails and
            # may extend it): say when it will, rather than wait for nothing.
            return {
                "name": site.name,
                "state": forced.status.value,
                "message": f"renewal of {site.name} waits for the CA's rate limit until "
                f"{limit:%Y-%m-%d %H:%M:%S} UTC (its Retry-After): the attempt starts then, "
                "with a fresh attempt counter; `edged status` shows the result",
            }
        await self._wait(
            lambda: (
                (s := renewer.states.get(site.name)) is None  # a reload removed it meanwhile
                or (s.last_attempt is not None and s.last_attempt >= started and not s.in_flight)
            )
        )
        state = renewer.states.get(site.name)
        if state is None:
            raise AdminError(
                "not_acme",
                f"{site.name} is no longer managed by ACME: a reload removed it (or its [acme]) "
                "while it was renewed",
                409,
            )
        if (
            state.status is CertStatus.ACTIVE
            and state.last_success
            and (state.last_success >= started)
        ):
            served = self.daemon.serving(site.name)
            until = f" valid until {served.not_after:%Y-%m-%d %H:%M} UTC" if served else ""
            return {"name": site.name, "state": "active", "message": f"renewed {site.name};{until}"}
        if state.last_attempt is None or state.last_attempt < started:
            return {
                "name": site.name,
                "state": state.status.value,
                "message": f"renewal of {site.name} started; `edged status` shows the result",
            }
        raise AdminError(
            "renewal_failed",
            f"renewal of {site.name} failed: {_error_line(state.last_error or {})}; "
            f"state {state.status.value}, next try {state.next_try}",
            502,
        )

    async def upload(self, name: str, cert_pem: bytes, key_pem: bytes) -> dict[str, object]:
        site = self._site(name)
        config = self._config()
        if site.passthrough:
            raise AdminError(
                "passthrough",
                f"{site.key} passes TLS through to its backend, which holds the certificate: "
                "install it there, or set mode = 'terminate' on the site",
                409,
            )
        if site.cert_file is not None:
            raise AdminError(
                "managed_by_files",
                f"{site.key} uses cert_file {site.cert_file}: replace that file instead",
                409,
            )
        store = self.daemon.store
        if store is None:
            raise AdminError("no_store", "edged.store is not a directory store", 409)
        bundle = parse_bundle(cert_pem, key_pem, source="upload", key_source="upload key")
        problems = check_bundle(
            bundle, now=datetime.now(UTC), names=site.names, require_chain=config.tls.require_chain
        )
        if problems:
            raise problems[0]
        cert = StoredCert(
            name=site.name,
            names=bundle.names,
            pairs=(PemPair(bundle.key_type, bundle.fullchain_pem, bundle.key_pem),),
            source="upload",
            stored_at=time.time(),
        )
        await self._store(lambda: store.save(cert))
        reloaded = await self.daemon.reload("admin")
        if reloaded:
            await self._wait(lambda: _serves(self.daemon.serving(site.name), bundle))
        if not _serves(self.daemon.serving(site.name), bundle):
            why = "was rejected" if not reloaded else "did not install it"
            raise AdminError(
                "not_served",
                f"the certificate for {site.name} is stored but not served: the reload {why} "
                f"(the log says why); it serves from the next reload that succeeds, or "
                f"`edged rollback {site.name}` takes it back",
                502,
            )
        return {
            "name": site.name,
            "fingerprint_sha256": bundle.fingerprint,
            "message": f"uploaded certificate now serves {', '.join(site.names)} "
            f"(valid until {bundle.not_after:%Y-%m-%d} UTC); ACME stops managing {site.name} "
            f"until `edged upload {site.name} --remove`",
        }

    async def unmanage_upload(self, name: str) -> dict[str, object]:
        site = self._site(name)
        config = self._config()
        store = self.daemon.store
        if store is None or config.acme is None:
            raise AdminError(
                "not_acme",
                f"{site.name}: there is no [acme] table in {config.source}, so nothing would "
                "obtain its certificate: add one and reload first, or keep the upload",
                409,
            )
        stored = await asyncio.to_thread(store.load, site.name)
        if stored is None or stored.source != "upload":
            raise AdminError(
                "not_uploaded",
                f"{site.name} has no uploaded certificate: nothing to hand back to ACME",
                409,
            )
        # The upload keeps serving until ACME has a certificate: hand it back to ACME as the
        # certificate to renew, and renew it now.
        handed_back = StoredCert(
            name=stored.name,
            names=stored.names,
            pairs=stored.pairs,
            source="acme",
            stored_at=time.time(),
            extra={**stored.extra, "origin": "upload"},
        )
        await self._store(lambda: store.save(handed_back))
        await self.daemon.reload("admin")
        if site.name in self.daemon.renewer.states:
            self.daemon.renewer.force(site.name)
        return {
            "name": site.name,
            "message": f"{site.name} is managed by ACME again; the uploaded certificate serves "
            "until the new one is issued",
        }

    async def revoke(self, name: str, reason: str, replace: bool) -> dict[str, object]:
        site = self._site(name)
        config = self._config()
        store = self.daemon.store
        if config.acme is None or store is None or site.name not in self.daemon.renewer.states:
            raise await self._not_acme(site, "revoke")
        stored = await asyncio.to_thread(store.load, site.name)
        if stored is None or stored.source != "acme":
            raise AdminError("not_acme", f"{site.name} has no ACME certificate to revoke", 409)
        # At the CA that issued it (recorded at issuance), which acme.directory may no longer
        # name: the configured CA would refuse it, after registering an account for nothing.
        # Its settings otherwise (acme.ca_bundle must trust both then).
        directory = stored.extra.get("directory") or config.acme.directory
        settings = config.acme
        if directory != settings.directory:
            settings = dataclasses.replace(settings, directory=directory)
        try:
            account = await asyncio.to_thread(store.load_account, directory)
        except StoreError as exc:
            raise AdminError("store_failed", str(exc), 500) from exc
        if account is None:
            raise AdminError("no_account", _no_account(config, site, directory), 409)
        session = AcmeSession(settings, store, observe=self.daemon.counters.acme_requests.observe)
        chains = [(pair.key_type, pair.fullchain) for pair in stored.pairs]
        try:
            outcomes = await asyncio.to_thread(revoke_certs, session, site.name, chains, reason)
        except AcmeError as exc:
            raise AdminError("revoke_failed", str(exc), 502) from exc
        finally:
            session.close()
        each = "; ".join(o.describe() for o in outcomes)
        done = sum(o.done for o in outcomes)
        if done < len(outcomes):
            # Not done: no replacement, so the retry revokes the same certificates (those
            # already revoked count as done then).
            raise AdminError(
                "revoke_failed",
                f"revoked {done} of {len(outcomes)} certificate(s) of {site.name}: {each}; "
                f"no replacement ordered: run `edged revoke {site.name}` again to finish",
                502,
            )
        message = f"revoked {done} certificate(s) of {site.name} (reason {reason}): {each}"
        if directory != config.acme.directory:
            message += f"; at {directory}, the CA that issued them (not acme.directory)"
        if replace:
            self.daemon.renewer.force(site.name)
            message += "; a replacement is being ordered"
        return {
            "name": site.name,
            "revoked": done,
            "certificates": [
                {"key_type": o.key_type, "serial": o.serial, "already_revoked": o.already}
                for o in outcomes
            ],
            "message": message,
        }

    async def reload(self) -> dict[str, object]:
        ok = await self.daemon.reload("admin")
        if not ok:
            raise AdminError(
                "reload_failed",
                "reload rejected or partly rejected; the last good state keeps serving: "
                "see `edged check` and the log",
                422,
            )
        return {"message": "reloaded"}

    # --- helpers --------------------------------------------------------------------------

    async def _wait(self, done: Callable[[], bool]) -> None:
        changes = self.daemon.renewer.changes
        async with changes:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changes.wait_for(done), WAIT_LIMIT)

    @staticmethod
    async def _store(write: Callable[[], None]) -> None:
        try:
            await asyncio.to_thread(write)
        except StoreError as exc:
            raise AdminError("store_failed", str(exc), 500) from exc


def _no_account(config: Config, site: Site, directory: str) -> str:
    """Why a certificate cannot be revoked through ACME here, and how to do it instead."""
    assert config.acme is not None
    where = "" if directory == config.acme.directory else " (not the configured acme.directory)"
    live = config.local_store_path / "live" / store_dirname(site.name)
    return (
        f"{site.name}'s certificate was issued by {directory}{where}, and the store holds no "
        "account for that CA (only that account, or the certificate's own key, may revoke "
        f"it): revoke it with its key, e.g. `certbot revoke --server {directory} --cert-path "
        f"{live}/fullchain.pem --key-path {live}/privkey.pem` (and fullchain.<key type>.pem "
        "with privkey.<key type>.pem for further key types); nothing was sent to a CA"
    )


def _serves(served: CertBundle | None, bundle: CertBundle) -> bool:
    return served is not None and served.fingerprint == bundle.fingerprint


def _error_line(error: dict[str, object]) -> str:
    if "detail" in error:
        return f"{error.get('type', '')}: {error['detail']}".strip(": ")
    return str(error.get("message", error))


def _summary(site: Site, view: _View) -> dict[str, object]:
    served = view.bundles.get(site.index, ())
    state = view.states.get(site.name)
    first = served[0] if served else None
    if site.cert_file is not None:
        source = "files"
    elif state is not None:
        source = "acme"
    elif first is not None:
        source = "upload"
    else:
        source = "none"
    return {
        "name": site.name,
        "names": list(site.names),
        "state": _state(site, view),
        "source": source,
        "not_after": first.not_after if first else None,
        "key_types": [b.key_type for b in served],
        "issuer": first.issuer if first else "",
        "attempts": state.attempts if state else 0,
        "next_try": state.next_try if state else None,
        "last_error": _error_line(state.last_error) if state and state.last_error else None,
        "issued_by": state.issued_by if state else "",
        "lease": view.leases.get(site.name, ""),
    }


def _count_states(view: _View) -> dict[str, int]:
    counts: dict[str, int] = {}
    for site in view.config.sites:
        state = _state(site, view)
        counts[state] = counts.get(state, 0) + 1
    return counts


def _state(site: Site, view: _View) -> str:
    served = view.bundles.get(site.index)
    state = view.states.get(site.name)
    if state is not None:
        not_after = served[0].not_after if served else None
        if fallback_active(state, not_after, view.now):
            return "fallback"
        return state.status.value
    return "active" if served else "missing"
