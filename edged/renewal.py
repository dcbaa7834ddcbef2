"""The pure core of certificate renewal: when to renew, ARI, per-name state and notifications.

Nothing here does I/O: the current time (`now`, an aware UTC datetime) and randomness (`rng`, a
`random.Random`) are parameters, so the whole state machine is tested without sleeping. The
I/O loop (RenewalLoop) calls these functions and persists `RenewalState.to_json()`.

State machine per name (CertStatus):

    new ──observe_cert──▶ ACTIVE ──is_due──▶ begin_attempt ──▶ PROCESSING (in_flight)
                            ▲                                     │ record_failure
                            └──────── record_success ─────────────┤ attempts < max: PROCESSING,
                                                                  │   retry after retry_interval
                                                                  └ attempts >= max: FAILED,
                                                                      retried once a day
"""

from __future__ import annotations

import email.utils
import json
import random
import re
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum

from cryptography import x509

from edged import certs
from edged.certs import CertBundle
from edged.config import AcmeSettings
from edged.errors import EdgedError

# Certificates shorter than this are "short-lived profiles": renew at half, not a third, left.
SHORT_LIVED = timedelta(days=10)
# Jitter spreads a fleet's renewals: proportional to the lifetime so a 6-day certificate is
# not moved by hours, capped so a 1-year certificate is not moved by days.
JITTER_FRACTION = 0.01
MAX_JITTER = timedelta(hours=4)
# RFC 9773 section 4.3: default and limits for how often renewal info is polled.
ARI_DEFAULT_CHECK = timedelta(hours=6)
ARI_MIN_CHECK = timedelta(minutes=1)
ARI_MAX_CHECK = timedelta(hours=24)
# A Retry-After further away than this is a broken or hostile CA: it must not stop renewals
# for years (a week covers the longest rate-limit windows of public CAs).
MAX_RETRY_AFTER = timedelta(days=7)
# Spread of due work after a restart, so a fleet restart does not start every order at once.
RESUME_SPREAD = timedelta(minutes=5)
EXPIRING_WITHIN = timedelta(days=7)
EXPIRING_EVERY = timedelta(days=1)
EXPIRED_EVERY = timedelta(hours=1)
INTERRUPTED = "interrupted by restart"

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:[Zz]|([+-])(\d{2}):(\d{2}))"
)
_SECONDS = re.compile(r"[0-9]{1,12}")
_EXPLANATION_URL = re.compile(r"https?://[\x21-\x7e]{1,2000}")


class AriError(EdgedError):
    """ARI (RFC 9773) is unusable for a certificate or a renewal-info response is malformed."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class StateError(EdgedError):
    """A stored renewal state is malformed; names the certificate and the bad key."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        self.message = message
        super().__init__(f"renewal state of {name}: {message}")


class CertStatus(StrEnum):
    """A name's renewal status (stable values: state files, metrics, admin API)."""

    PROCESSING = "processing"  # an order is running or a retry is pending
    ACTIVE = "active"  # a valid certificate, next renewal known
    FAILED = "failed"  # attempts exhausted; retried once a day until a success


# --- policy -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenewalPolicy:
    """How renewals are paced; built from `[acme]` by `from_settings`."""

    renew_before_days: int = 30  # 0 = lifetime fraction (a third left; half if < 10 days)
    retry_interval: float = 900.0  # seconds between failed attempts
    max_attempts: int = 5  # failed attempts before FAILED
    failed_retry_interval: float = 86400.0  # seconds between attempts once FAILED

    def __post_init__(self) -> None:
        # The config parser reports bad values to users; these guard programming errors only.
        if self.renew_before_days < 0:
            raise ValueError(f"renew_before_days must be >= 0, got {self.renew_before_days}")
        if self.retry_interval <= 0 or self.failed_retry_interval <= 0:
            raise ValueError("retry intervals must be positive")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    @classmethod
    def from_settings(cls, acme: AcmeSettings) -> RenewalPolicy:
        return cls(
            renew_before_days=acme.renew_before_days,
            retry_interval=acme.retry_interval,
            max_attempts=acme.max_attempts,
        )


# --- ARI (RFC 9773) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AriInfo:
    """A CA's suggested renewal window for one certificate, and when to ask again.

    `cert_id` is the ARI id of the certificate the window is for; "" means unbound (the caller
    vouches that it belongs to the state's current certificate).
    """

    start: datetime
    end: datetime
    explanation_url: str
    next_check: datetime
    cert_id: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "start": format_time(self.start),
            "end": format_time(self.end),
            "explanation_url": self.explanation_url,
            "next_check": format_time(self.next_check),
            "cert_id": self.cert_id,
        }


def ari_cert_id(leaf: x509.Certificate) -> str:
    """The RFC 9773 certificate id (edged.certs.ari_cert_id); AriError says why there is none."""
    try:
        return certs.ari_cert_id(leaf)
    except certs.NoAriId as exc:
        raise AriError(str(exc)) from None


def parse_retry_after(value: str | None, now: datetime) -> datetime | None:
    """The time a Retry-After header (delay seconds or HTTP-date) names, at most
    MAX_RETRY_AFTER from `now`; None if absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        # Clamped before adding: 12 digits of seconds would overflow datetime.
        return now + min(timedelta(seconds=int(value)), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
        # "-0000" (and obsolete zones) parse as naive; HTTP-dates are always GMT.
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(when, now + MAX_RETRY_AFTER)


def parse_renewal_info(
    body: bytes,
    retry_after: str | None,
    now: datetime,
    default_check: timedelta = ARI_DEFAULT_CHECK,
    *,
    cert_id: str = "",
) -> AriInfo:
    """Parse a renewalInfo response; AriError names what is wrong with the body.

    A missing or unreadable Retry-After header does not invalidate a good window: the next
    check then uses `default_check`. The delay is clamped to [1 minute, 24 hours] (RFC 9773
    section 4.3) so a hostile or broken CA can neither make us poll constantly nor never.
    """
    data = _json_object(body)
    window = data.get("suggestedWindow")
    if not isinstance(window, Mapping):
        raise AriError("renewal info has no suggestedWindow object")
    start = _window_time(window, "start")
    end = _window_time(window, "end")
    if end <= start:
        raise AriError(
            f"renewal info suggestedWindow.end ({format_time(end)}) is not after "
            f"start ({format_time(start)})"
        )
    url = data.get("explanationURL", "")
    if not isinstance(url, str):
        raise AriError(f"renewal info explanationURL must be a string, got {_kind(url)}")
    # Shown to operators (log, `edged status`): only a plain http(s) URL, never other text.
    if not _EXPLANATION_URL.fullmatch(url):
        url = ""
    return AriInfo(start, end, url, _next_check(retry_after, now, default_check), cert_id)


def _json_object(body: bytes) -> Mapping[str, object]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # ValueError includes UnicodeDecodeError
        raise AriError(f"renewal info is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AriError(f"renewal info must be a JSON object, got {_kind(data)}")
    return data


def _window_time(window: Mapping[str, object], key: str) -> datetime:
    value = window.get(key)
    if not isinstance(value, str):
        raise AriError(f"renewal info suggestedWindow.{key} must be an RFC 3339 time string")
    try:
        return parse_time(value)
    except ValueError:
        raise AriError(
            f"renewal info suggestedWindow.{key} {value[:64]!r} is not an RFC 3339 time"
        ) from None


def _next_check(retry_after: str | None, now: datetime, default: timedelta) -> datetime:
    when = parse_retry_after(retry_after, now)
    delay = default if when is None else when - now
    return now + min(max(delay, ARI_MIN_CHECK), ARI_MAX_CHECK)


def pick_in_window(start: datetime, end: datetime, now: datetime, rng: random.Random) -> datetime:
    """A uniformly random time in [start, end); `now` when that time (or the window) is past.

    This is RFC 9773 section 4.2 literally: picking in the whole window (not only its remaining
    part) keeps re-picks independent, so re-reading the same window cannot drift towards its end.
    """
    if end <= now:
        return now
    if end <= start:
        raise ValueError(f"window end {format_time(end)} is not after start {format_time(start)}")
    return max(start + (end - start) * rng.random(), now)


def ari_check_due(state: RenewalState, now: datetime) -> bool:
    """True when renewal info should be (re)fetched for the state's certificates."""
    return state.ari is None or state.ari.next_check <= now


def governing_window(
    found: Sequence[tuple[CertBundle, AriInfo]], retry_at: datetime | None = None
) -> AriInfo:
    """The window a name follows, of those fetched for its served certificates (one per key
    type; an attempt renews them all, so the first to need it decides): the one that ends
    first among those usable for their certificate (see renewal_window), else the first
    fetched (kept, shown and paced, not followed). Asked again at the earliest next_check of
    them all, and by `retry_at` (some certificate's fetch failed) at the latest."""
    if not found:
        raise ValueError("no window fetched")
    usable = [ari for bundle, ari in found if _usable(bundle, ari)]
    chosen = min(usable, key=lambda a: (a.end, a.start)) if usable else found[0][1]
    checks = [ari.next_check for _, ari in found]
    if retry_at is not None:
        checks.append(retry_at)
    return replace(chosen, next_check=min(checks))


# --- schedule ---------------------------------------------------------------------------------


def renewal_deadline(bundle: CertBundle, policy: RenewalPolicy) -> datetime:
    """The latest time the schedule renews `bundle` (before jitter; ARI not considered)."""
    lifetime = bundle.not_after - bundle.not_before
    before = timedelta(days=policy.renew_before_days)
    # renew_before >= lifetime would renew right after every issuance: use the fraction then.
    if timedelta(0) < before < lifetime:
        return bundle.not_after - before
    left = lifetime / 2 if lifetime < SHORT_LIVED else lifetime / 3
    return bundle.not_after - left


def max_jitter(bundle: CertBundle) -> timedelta:
    """How much earlier than the deadline the schedule may renew (1% of lifetime, <= 4 h)."""
    lifetime = max(bundle.not_after - bundle.not_before, timedelta(0))
    return min(lifetime * JITTER_FRACTION, MAX_JITTER)


def next_renewal(
    bundle: CertBundle,
    state: RenewalState | None,
    policy: RenewalPolicy,
    now: datetime,
    rng: random.Random,
    others: Sequence[CertBundle] = (),
) -> datetime:
    """When to renew `bundle`: in the CA's ARI window if one is known, else on the schedule.

    The schedule renews `renew_before_days` before expiry (or at a lifetime fraction), minus a
    random jitter: earlier, never later than the deadline, never before not_before. A time in
    the past becomes `now`. `others`: the name's further served certificates (other key
    types), whose ARI window the state may hold (see governing_window).
    """
    window = renewal_window(bundle, state, others)
    if window is not None:
        return pick_in_window(window.start, window.end, now, rng)
    if bundle.not_after <= bundle.not_before:
        return now  # a certificate with no lifetime is useless: replace it
    jittered = renewal_deadline(bundle, policy) - max_jitter(bundle) * rng.random()
    return max(jittered, bundle.not_before, now)


def renewal_window(
    bundle: CertBundle, state: RenewalState | None, others: Sequence[CertBundle] = ()
) -> AriInfo | None:
    """The state's ARI window when it is one for `bundle`, or for one of `others` (the name's
    further served certificates), that the schedule follows."""
    followed = _followed(bundle, state, others)
    return followed[0] if followed is not None else None


def window_cert(
    bundle: CertBundle, state: RenewalState | None, others: Sequence[CertBundle] = ()
) -> CertBundle | None:
    """The certificate, of `bundle` and `others`, whose window the schedule follows."""
    followed = _followed(bundle, state, others)
    if followed is None:
        return None
    ari, cert = followed
    # A window without a certificate id: the first certificate without one either, as before.
    return cert if ari.cert_id else (_cert_of("", bundle, others) or bundle)


def _followed(
    bundle: CertBundle, state: RenewalState | None, others: Sequence[CertBundle]
) -> tuple[AriInfo, CertBundle] | None:
    """The state's ARI window the schedule follows and the certificate it is for."""
    ari = state.ari if state is not None else None
    if ari is None:
        return None
    if ari.cert_id:
        found = _cert_of(ari.cert_id, bundle, others)
        if found is None:
            return None  # the window is for another (older) certificate
        bundle = found
    return (ari, bundle) if _usable(bundle, ari) else None


def _cert_of(cert_id: str, bundle: CertBundle, others: Sequence[CertBundle]) -> CertBundle | None:
    """The certificate, of `bundle` and `others`, whose ARI id is `cert_id`."""
    return next((b for b in (bundle, *others) if _cert_id_or_empty(b) == cert_id), None)


def _usable(bundle: CertBundle, ari: AriInfo) -> bool:
    """`ari`, a window fetched for `bundle`, is one to follow."""
    # A window ending after expiry would let the certificate lapse: such a CA answer is broken,
    # and the lifetime schedule is safer.
    if ari.end > bundle.not_after:
        return False
    # Nor is a window that closed before the certificate existed one for renewing it: a CA
    # that answers every certificate so would make each new one due at once, in a loop.
    return ari.end > bundle.not_before


def _cert_id_or_empty(bundle: CertBundle) -> str:
    return bundle.ari_id  # read with the bundle: no parsing here, on the event loop


# --- state ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RenewalState:
    """Everything the renewal loop remembers about one name (persisted as JSON in the store)."""

    name: str
    status: CertStatus = CertStatus.PROCESSING
    attempts: int = 0  # failed attempts since the last success or force_retry
    last_error: dict[str, object] | None = None  # ACME problem fields, or {"message": ...}
    last_success: datetime | None = None
    last_attempt: datetime | None = None
    next_try: datetime | None = None  # None: never scheduled, due at once
    not_before_retry: datetime | None = None  # Retry-After / rate limit: nothing before it
    in_flight: bool = False  # an order was started and not finished
    ari: AriInfo | None = None
    replaces: str = ""  # ARI id of the certificate the next order replaces
    issued_by: str = ""  # node id that obtained the current certificate
    # First failure since the last success. Unlike `attempts` it survives force_retry, so the
    # fallback alarm and the "recovered" notice track the outage until a certificate arrives.
    failing_since: datetime | None = None
    # When the last "expiring"/"expired" notice was sent: kept so a restart does not repeat it.
    last_expiry_notice: datetime | None = None

    @classmethod
    def new(cls, name: str) -> RenewalState:
        """A name never seen before: no certificate, no attempt yet, due at once."""
        return cls(name=name)

    @property
    def is_new(self) -> bool:
        """Never attempted and never succeeded (resume's spread does not change that)."""
        return (
            self.status is CertStatus.PROCESSING
            and self.last_attempt is None
            and self.last_success is None
            and self.attempts == 0
            and not self.in_flight
        )

    @property
    def failing(self) -> bool:
        """True from the first failed attempt until the next success."""
        return (
            self.status is CertStatus.FAILED
            or (self.status is CertStatus.PROCESSING and self.attempts > 0)
            or self.failing_since is not None
        )

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "status": self.status.value,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "last_success": _format_optional(self.last_success),
            "last_attempt": _format_optional(self.last_attempt),
            "next_try": _format_optional(self.next_try),
            "not_before_retry": _format_optional(self.not_before_retry),
            "in_flight": self.in_flight,
            "ari": self.ari.to_json() if self.ari is not None else None,
            "replaces": self.replaces,
            "issued_by": self.issued_by,
            "failing_since": _format_optional(self.failing_since),
            "last_expiry_notice": _format_optional(self.last_expiry_notice),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object], name: str) -> RenewalState:
        """Rebuild a state; missing keys take defaults, unknown keys are ignored (newer files)."""
        if not isinstance(data, Mapping):
            raise StateError(name, f"must be a JSON object, got {_kind(data)}")
        reader = _StateReader(data, name)
        stored_name = reader.string("name", name)
        if stored_name != name:
            raise StateError(name, f"the file is for {stored_name!r}: remove or rename it")
        return cls(
            name=name,
            status=reader.status(),
            attempts=reader.count("attempts"),
            last_error=reader.error(),
            last_success=reader.time("last_success"),
            last_attempt=reader.time("last_attempt"),
            next_try=reader.time("next_try"),
            not_before_retry=reader.time("not_before_retry"),
            in_flight=reader.flag("in_flight"),
            ari=reader.ari(),
            replaces=reader.string("replaces", ""),
            issued_by=reader.string("issued_by", ""),
            failing_since=reader.time("failing_since"),
            last_expiry_notice=reader.time("last_expiry_notice"),
        )


class _StateReader:
    """Typed access to one state document; every problem is a StateError naming the key."""

    def __init__(self, data: Mapping[str, object], name: str) -> None:
        self.data = data
        self.name = name

    def fail(self, key: str, message: str) -> StateError:
        return StateError(self.name, f"{key}: {message}")

    def string(self, key: str, default: str) -> str:
        value = self.data.get(key, default)
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, got {_kind(value)}")
        return value

    def count(self, key: str) -> int:
        value = self.data.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self.fail(key, f"must be a non-negative integer, got {value!r}")
        return value

    def flag(self, key: str) -> bool:
        value = self.data.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {_kind(value)}")
        return value

    def status(self) -> CertStatus:
        value = self.string("status", CertStatus.PROCESSING.value)
        try:
            return CertStatus(value)
        except ValueError:
            allowed = ", ".join(s.value for s in CertStatus)
            raise self.fail("status", f"{value[:32]!r} is not one of {allowed}") from None

    def time(self, key: str) -> datetime | None:
        return self.time_value(key, self.data.get(key))

    def time_value(self, key: str, value: object) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(key, f"must be an RFC 3339 time string, got {_kind(value)}")
        try:
            return parse_time(value)
        except ValueError:
            raise self.fail(key, f"{value[:64]!r} is not an RFC 3339 time") from None

    def error(self) -> dict[str, object] | None:
        value = self.data.get("last_error")
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.fail("last_error", f"must be an object or null, got {_kind(value)}")
        return _plain_error(value)

    def ari(self) -> AriInfo | None:
        value = self.data.get("ari")
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.fail("ari", f"must be an object or null, got {_kind(value)}")
        start, end, next_check = (self.time_value(f"ari.{k}", value.get(k)) for k in _ARI_TIMES)
        if start is None or end is None or next_check is None:
            raise self.fail("ari", "needs start, end and next_check")
        if end <= start:
            raise self.fail("ari", "end is not after start")
        url = value.get("explanation_url", "")
        cert_id = value.get("cert_id", "")
        if not isinstance(url, str) or not isinstance(cert_id, str):
            raise self.fail("ari", "explanation_url and cert_id must be strings")
        return AriInfo(start, end, url, next_check, cert_id)


_ARI_TIMES = ("start", "end", "next_check")


# --- transitions ------------------------------------------------------------------------------


def due_at(state: RenewalState, now: datetime) -> datetime | None:
    """When an attempt should start: `now` when it is due at once (never scheduled), None
    while one runs (its end decides); never before a rate limit's end."""
    if state.in_flight:
        return None
    when = state.next_try or now
    if state.not_before_retry is not None and state.not_before_retry > when:
        return state.not_before_retry
    return when


def is_due(state: RenewalState, now: datetime) -> bool:
    """True when an attempt should start now (never while one runs or a rate limit holds)."""
    when = due_at(state, now)
    return when is not None and when <= now


def due_and_wait(
    states: Mapping[str, RenewalState],
    running: Container[str],
    now: datetime,
    floor: float,
    ceiling: float,
) -> tuple[list[str], float]:
    """One pass over `states` (the loop's wake at 100k names: one pass, not two): the names
    due now (is_due) that are not `running`, and how long the loop may sleep after starting
    them before another of the rest is due, within [floor, ceiling]: the floor keeps a state
    that stays due from spinning the loop."""
    due: list[str] = []
    wait = ceiling
    for name, state in states.items():
        when = due_at(state, now)
        if when is None or name in running:
            continue  # not due by time: its attempt's end wakes the loop
        if when <= now:
            due.append(name)
        else:
            wait = min(wait, (when - now).total_seconds())
    return due, max(wait, floor)


def begin_attempt(state: RenewalState, now: datetime) -> RenewalState:
    """An order starts. A FAILED name stays FAILED during its daily attempt (so the "failed"
    notice and metric do not flap); everything else becomes PROCESSING."""
    status = CertStatus.FAILED if state.status is CertStatus.FAILED else CertStatus.PROCESSING
    return replace(state, status=status, in_flight=True, last_attempt=now)


def record_failure(
    state: RenewalState,
    policy: RenewalPolicy,
    now: datetime,
    error: Mapping[str, object],
    retry_after: datetime | None,
    *,
    give_up: bool = False,
) -> RenewalState:
    """An attempt failed: retry after retry_interval, or daily once max_attempts are used up.

    `give_up`: the attempt cannot succeed until the operator changes something (e.g. the
    config), so retrying soon is pointless: FAILED at once, retried daily like any FAILED name.
    `retry_after` (Retry-After, a rate limit's reset) wins over the schedule: no attempt is
    made before it, and an earlier, longer limit is kept.
    """
    attempts = state.attempts + 1
    if attempts < policy.max_attempts and not give_up:
        status, delay = CertStatus.PROCESSING, policy.retry_interval
    else:
        # Attempts keep counting (they are "failures since the last success") but only a
        # success leaves FAILED; the daily attempt exists so a fixed problem heals by itself.
        status, delay = CertStatus.FAILED, policy.failed_retry_interval
    limit = _future(_latest(state.not_before_retry, retry_after), now)
    return replace(
        state,
        status=status,
        attempts=attempts,
        last_error=_plain_error(error),
        last_attempt=state.last_attempt if state.in_flight and state.last_attempt else now,
        next_try=_latest(now + timedelta(seconds=delay), limit),
        not_before_retry=limit,
        in_flight=False,
        failing_since=state.failing_since or now,
    )


def record_success(
    state: RenewalState,
    bundle: CertBundle,
    policy: RenewalPolicy,
    now: datetime,
    rng: random.Random,
    ari: AriInfo | None = None,
    *,
    issued_by: str = "",
) -> RenewalState:
    """A new certificate was obtained and installed; `ari` is the window for it, if fetched."""
    done = replace(
        state,
        status=CertStatus.ACTIVE,
        attempts=0,
        last_error=None,
        last_success=now,
        in_flight=False,
        ari=ari,  # any older window was for the replaced certificate
        replaces=_cert_id_or_empty(bundle),
        issued_by=issued_by,
        not_before_retry=_future(state.not_before_retry, now),
        failing_since=None,
    )
    return _scheduled(done, next_renewal(bundle, done, policy, now, rng))


def observe_cert(
    state: RenewalState,
    bundle: CertBundle,
    policy: RenewalPolicy,
    now: datetime,
    rng: random.Random,
    *,
    reschedule: bool = False,
    others: Sequence[CertBundle] = (),
) -> RenewalState:
    """A certificate for the name was loaded at startup or installed by another node.

    New states, and ACTIVE ones whose certificate changed, are (re)scheduled for it; an ACTIVE
    state already scheduled for this very certificate keeps its next try (a restart's spread,
    an ARI pick) unless `reschedule` (the policy changed): seeing the same certificate again
    is no news, and re-planning would make overdue work due at once. PROCESSING and FAILED
    keep their retry pacing (a running outage is not hidden by a reload). The ARI id to
    replace always follows the certificate, and a window for another certificate than
    `bundle` and `others` (the name's further served certificates) is dropped.
    """
    cert_id = _cert_id_or_empty(bundle)
    ari = state.ari
    if ari is not None and ari.cert_id and _cert_of(ari.cert_id, bundle, others) is None:
        ari = None
    # The same object when nothing changes: a full reload observes every name again, and new
    # copies of 100k unchanged states only raised the reload's memory peak.
    seen = (
        state
        if ari is state.ari and state.replaces == cert_id
        else replace(state, ari=ari, replaces=cert_id)
    )
    if not (state.status is CertStatus.ACTIVE or state.is_new):
        return seen
    if not reschedule and ari is state.ari and _scheduled_for(state, cert_id):
        return seen
    seen = replace(seen, status=CertStatus.ACTIVE)
    return _scheduled(seen, next_renewal(bundle, seen, policy, now, rng, others))


def _scheduled_for(state: RenewalState, cert_id: str) -> bool:
    """True when `state` is ACTIVE with a next try planned for the certificate `cert_id`.

    `replaces` is the ARI id of the certificate the state last saw (observe_cert and
    record_success set it); a certificate without one ("") cannot be recognised, so it is
    planned again as before.
    """
    return (
        state.status is CertStatus.ACTIVE
        and state.next_try is not None
        and cert_id != ""
        and state.replaces == cert_id
    )


def observe_no_cert(state: RenewalState, now: datetime) -> RenewalState:
    """The name has no usable certificate (none in the store, or it was deleted): an ACTIVE
    name is due now, since its schedule was for a certificate that is gone. Failing names keep
    their pacing, and a rate limit still holds."""
    if state.status is not CertStatus.ACTIVE:
        return state
    # `replaces` stays: the certificate still exists at the CA, and naming it in the order lets
    # the CA treat the order as its renewal (RFC 9773 section 5).
    return _scheduled(replace(state, status=CertStatus.PROCESSING), now)


def record_ari(
    state: RenewalState,
    bundle: CertBundle,
    policy: RenewalPolicy,
    now: datetime,
    rng: random.Random,
    ari: AriInfo,
    others: Sequence[CertBundle] = (),
) -> RenewalState:
    """Fresh renewal info for the current certificates (`bundle` and `others`, see
    governing_window): store it; an ACTIVE name is rescheduled only when the window changed
    (RFC 9773: pick a new time for a new window)."""
    old = state.ari
    same = old is not None and (old.start, old.end, old.cert_id) == (
        ari.start,
        ari.end,
        ari.cert_id,
    )
    updated = replace(state, ari=ari)
    if state.status is not CertStatus.ACTIVE or (same and state.next_try is not None):
        return updated
    return _scheduled(updated, next_renewal(bundle, updated, policy, now, rng, others))


def force_retry(state: RenewalState, now: datetime) -> RenewalState:
    """An operator asked for a renewal now (`edged renew NAME`): attempts start from zero.

    A CA's Retry-After/rate limit (`not_before_retry`) is kept: trying earlier only fails and
    can extend the limit, so the forced attempt starts when the limit ends. An attempt already
    running is not duplicated (in_flight is kept; is_due stays False until it finishes).
    """
    forced = replace(state, status=CertStatus.PROCESSING, attempts=0)
    return _scheduled(forced, now)


def resume(
    state: RenewalState,
    policy: RenewalPolicy,
    now: datetime,
    rng: random.Random,
    spread: timedelta = RESUME_SPREAD,
) -> RenewalState:
    """A state loaded after a restart.

    An attempt that was in flight counts as failed (attempts are not reset, so a crash loop
    cannot turn into an order flood: it is paced like any failure). Work that is overdue is
    moved to now + a uniform delay in [0, spread], so a fleet restart does not start every
    order in the same second.
    """
    if state.in_flight:
        state = record_failure(state, policy, now, {"message": INTERRUPTED}, None)
    state = replace(state, not_before_retry=_future(state.not_before_retry, now))
    return spread_overdue(state, now, rng, spread)


def adoptable(shared: RenewalState, ours: RenewalState) -> bool:
    """True when a fleet node should take `shared`, the state another node saved, for `ours`.

    The node holding the name's lease makes the attempts; the others follow the state it
    saves: a success and a failure alike (else each would order again once the lease is
    free, counting attempts of its own). Not while the shared state is in flight (that
    node's attempt runs; its lease tells), nor when it records anything earlier than ours
    (an older save arriving late): only a state that differs and is no older. Nor a new one
    that records nothing (no attempt, no notice) of any node's: a name whose state no node
    saved reads so (see Renewer._configure), and taken, it would undo this node's plan for
    the certificate it serves (due at once until planned again).
    """
    if shared.in_flight or shared == ours:
        return False
    if shared.is_new and shared.last_expiry_notice is None:
        return False
    times = ("last_success", "last_attempt", "last_expiry_notice")
    return not any(_earlier(getattr(shared, t), getattr(ours, t)) for t in times)


def _earlier(a: datetime | None, b: datetime | None) -> bool:
    return b is not None and (a is None or a < b)


def spread_overdue(
    state: RenewalState, now: datetime, rng: random.Random, spread: timedelta = RESUME_SPREAD
) -> RenewalState:
    """Work due by `now` moved to now + a uniform delay in [0, spread] (see resume)."""
    if state.next_try is None or state.next_try <= now:
        return _scheduled(state, now + spread * rng.random())
    return state


def _scheduled(state: RenewalState, when: datetime) -> RenewalState:
    """`state` with next_try = when, but never before a rate limit."""
    return replace(state, next_try=_latest(when, state.not_before_retry))


# --- notifications ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Notice:
    """Something an operator must hear about (log line, webhook)."""

    event: str  # "failed" | "recovered" | "expiring" | "expired"
    name: str
    state: str
    attempts: int
    error: dict[str, object] | None
    not_after: datetime | None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "state": self.state,
            "attempts": self.attempts,
            "error": self.error,
            "not_after": _format_optional(self.not_after),
            "event": self.event,
        }


def notices(
    before: RenewalState | None,
    after: RenewalState,
    serving_not_after: datetime | None,
    now: datetime,
    last_expiry_notice: datetime | None,
) -> list[Notice]:
    """The notices a state change and the serving certificate's expiry call for.

    "failed" and "recovered" fire on transitions only, so calling this again with the same
    states yields nothing. "expiring"/"expired" are rate limited by `last_expiry_notice`,
    which the caller sets to `now` whenever one of them is returned.
    """
    events: list[str] = []
    if after.status is CertStatus.FAILED and (before is None or before.status is not after.status):
        events.append("failed")
    if after.status is CertStatus.ACTIVE and before is not None and before.failing:
        events.append("recovered")
    expiry = _expiry_event(after, serving_not_after, now, last_expiry_notice)
    if expiry:
        events.append(expiry)
    return [_notice(event, after, serving_not_after) for event in events]


def notify(
    before: RenewalState | None,
    after: RenewalState,
    serving_not_after: datetime | None,
    now: datetime,
) -> tuple[RenewalState, list[Notice]]:
    """The notices (see `notices`), rate limited by the state's own last expiry notice, and
    `after` with that time updated when an expiry notice is among them."""
    found = notices(before, after, serving_not_after, now, after.last_expiry_notice)
    if any(n.event in ("expiring", "expired") for n in found):
        after = replace(after, last_expiry_notice=now)
    return after, found


def _expiry_event(
    state: RenewalState, not_after: datetime | None, now: datetime, last: datetime | None
) -> str:
    if not_after is None:
        return ""
    if not_after <= now:
        return "expired" if last is None or now - last >= EXPIRED_EVERY else ""
    # A healthy short-lived certificate is always within 7 days of expiry: only a failing
    # renewal makes that worth a notice.
    if not_after - now > EXPIRING_WITHIN or not state.failing:
        return ""
    return "expiring" if last is None or now - last >= EXPIRING_EVERY else ""


def _notice(event: str, state: RenewalState, not_after: datetime | None) -> Notice:
    return Notice(
        event, state.name, state.status.value, state.attempts, state.last_error, not_after
    )


def fallback_active(state: RenewalState, serving_not_after: datetime | None, now: datetime) -> bool:
    """True when renewal is failing while an older certificate still serves the name.

    An expired certificate that is still served counts too (the alarm must not clear at
    expiry); `now` is accepted so callers need not special-case that.
    """
    del now  # the decision does not depend on the time (see above)
    return serving_not_after is not None and state.failing


# --- time and JSON helpers --------------------------------------------------------------------


def parse_time(text: str) -> datetime:
    """An RFC 3339 timestamp as an aware UTC datetime (nanoseconds truncated); ValueError."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {text[:64]!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, sign, off_h, off_m = match.groups()[6:]
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    offset = timedelta(0)
    if sign:
        if int(off_h) > 23 or int(off_m) > 59:
            raise ValueError(f"bad UTC offset in {text[:64]!r}")
        offset = timedelta(hours=int(off_h), minutes=int(off_m)) * (-1 if sign == "-" else 1)
    # A leap second (":60") is a real RFC 3339 value that datetime cannot hold.
    second = min(second, 59)
    local = datetime(year, month, day, hour, minute, second, micro, timezone(offset))
    try:
        return local.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:00:00-05:00 is after datetime's last day
        raise ValueError(f"time out of range: {text[:64]!r}") from None


def format_time(when: datetime) -> str:
    """RFC 3339 in UTC with a "Z" (microseconds only when present)."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _format_optional(when: datetime | None) -> str | None:
    return None if when is None else format_time(when)


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None or b is None:
        return a or b
    return max(a, b)


def _future(when: datetime | None, now: datetime) -> datetime | None:
    return when if when is not None and when > now else None


def _plain_error(error: Mapping[str, object]) -> dict[str, object]:
    # The error is persisted and sent in webhooks: force it into plain JSON types now (a stray
    # exception object or datetime becomes its text) rather than fail when saving later.
    plain = json.loads(json.dumps(dict(error), default=str))
    if not isinstance(plain, dict):  # dict(...) of a Mapping always is; keeps mypy exact
        raise TypeError("error must be a mapping")
    return plain


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )
