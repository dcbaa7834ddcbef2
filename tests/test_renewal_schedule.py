"""edged.renewal, the pure core: schedule, jitter, ARI, state transitions, JSON, notices.

Everything runs on a fixed `NOW` and seeded `random.Random`s: no sleeps, no clock.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edged.certs import CertBundle, parse_bundle, stored_bundle
from edged.config import AcmeSettings
from edged.renewal import (
    INTERRUPTED,
    MAX_RETRY_AFTER,
    AriError,
    AriInfo,
    CertStatus,
    Notice,
    RenewalPolicy,
    RenewalState,
    StateError,
    adoptable,
    ari_cert_id,
    ari_check_due,
    begin_attempt,
    due_and_wait,
    fallback_active,
    force_retry,
    format_time,
    governing_window,
    is_due,
    max_jitter,
    next_renewal,
    notices,
    notify,
    observe_cert,
    observe_no_cert,
    parse_renewal_info,
    parse_retry_after,
    parse_time,
    pick_in_window,
    record_ari,
    record_failure,
    record_success,
    renewal_deadline,
    resume,
    spread_overdue,
    window_cert,
)
from edged.renewer import replaced_certs
from tests.pki import Issued, fullchain, make_ca, make_leaf

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)
SEEDS = range(500)
POLICY = RenewalPolicy(renew_before_days=30, retry_interval=900, max_attempts=5)
ERROR: dict[str, object] = {
    "type": "urn:ietf:params:acme:error:connection",
    "detail": "connection refused",
}
# RFC 9773 Appendix A: keyIdentifier and serial of the example certificate and its ARI id.
RFC_AKI = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
RFC_SERIAL = 0x87654321
RFC_CERT_ID = "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


@functools.cache
def _ca() -> Issued:
    return make_ca()


def bundle_for(
    lifetime: timedelta, not_before: datetime = NOW, issuer: Issued | None = None
) -> CertBundle:
    """A parsed bundle valid from `not_before` for `lifetime`, issued by a test CA (with AKI)."""
    leaf = make_leaf(
        issuer or _ca(), ["a.example.test"], not_before=not_before, not_after=not_before + lifetime
    )
    return parse_bundle(leaf.cert_pem, leaf.key_pem)


@functools.cache
def cached_bundle(days: float) -> CertBundle:
    return bundle_for(timedelta(days=days))


def rng(seed: int = 1) -> random.Random:
    return random.Random(seed)


def policy(renew_before_days: int) -> RenewalPolicy:
    return replace(POLICY, renew_before_days=renew_before_days)


def active_state(bundle: CertBundle, name: str = "a.example.test") -> RenewalState:
    return observe_cert(RenewalState.new(name), bundle, POLICY, NOW, rng())


def ari_window(
    start: datetime, end: datetime, cert_id: str = "", next_check: datetime = NOW + 6 * HOUR
) -> AriInfo:
    return AriInfo(start, end, "", next_check, cert_id)


# --- schedule ---------------------------------------------------------------------------------

# (lifetime days, renew_before_days, time left at the deadline)
SCHEDULES = [
    (90, 30, timedelta(days=30)),
    (90, 0, timedelta(days=30)),
    (45, 30, timedelta(days=30)),
    (45, 0, timedelta(days=15)),
    (6, 30, timedelta(days=3)),  # renew_before >= lifetime: fraction rule, half for < 10 days
    (6, 0, timedelta(days=3)),
    (6, 5, timedelta(days=5)),  # an explicit value shorter than the lifetime is honoured
    (200, 30, timedelta(days=30)),
    (200, 0, timedelta(days=200) / 3),
    (365, 30, timedelta(days=30)),
    (365, 0, timedelta(days=365) / 3),
    (30, 30, timedelta(days=10)),  # equal to the lifetime: fraction rule
    (10, 0, timedelta(days=10) / 3),  # 10 days is not "shorter than 10 days"
    (9.9, 0, timedelta(days=9.9) / 2),
]


@pytest.mark.parametrize(("days", "before", "left"), SCHEDULES)
def test_deadline_for_each_lifetime(days: float, before: int, left: timedelta) -> None:
    bundle = cached_bundle(days)
    assert renewal_deadline(bundle, policy(before)) == bundle.not_after - left


@pytest.mark.parametrize(("days", "before", "left"), SCHEDULES)
def test_next_renewal_is_the_deadline_minus_bounded_jitter(
    days: float, before: int, left: timedelta
) -> None:
    bundle = cached_bundle(days)
    deadline = bundle.not_after - left
    bound = min(timedelta(days=days) / 100, 4 * HOUR)
    assert max_jitter(bundle) == bound
    times = [next_renewal(bundle, None, policy(before), NOW, rng(seed)) for seed in SEEDS]
    assert all(deadline - bound <= t <= deadline for t in times)
    assert all(t >= bundle.not_before for t in times)
    # The jitter is really used: the seeds spread over most of the allowed range.
    assert max(times) - min(times) > bound * 0.9


def test_jitter_never_moves_before_not_before() -> None:
    # One day and one minute with renew_before 1 day: the deadline is a minute after
    # not_before, while the jitter may be up to ~14 minutes.
    bundle = bundle_for(DAY + timedelta(minutes=1))
    times = [next_renewal(bundle, None, policy(1), NOW, rng(seed)) for seed in SEEDS]
    assert all(bundle.not_before <= t <= bundle.not_before + timedelta(minutes=1) for t in times)
    assert min(times) == bundle.not_before


def test_past_times_become_now() -> None:
    bundle = cached_bundle(90)
    later = bundle.not_after - DAY  # well after the deadline
    assert next_renewal(bundle, None, POLICY, later, rng()) == later
    expired = bundle.not_after + DAY
    assert next_renewal(bundle, None, POLICY, expired, rng()) == expired


def test_same_seed_same_time_and_different_seeds_differ() -> None:
    bundle = cached_bundle(90)
    assert next_renewal(bundle, None, POLICY, NOW, rng(7)) == next_renewal(
        bundle, None, POLICY, NOW, rng(7)
    )
    assert len({next_renewal(bundle, None, POLICY, NOW, rng(s)) for s in range(20)}) == 20


# --- ARI window in the schedule ---------------------------------------------------------------


def test_ari_window_is_used_instead_of_the_schedule() -> None:
    bundle = cached_bundle(90)
    start, end = NOW + 40 * DAY, NOW + 42 * DAY
    state = replace(active_state(bundle), ari=ari_window(start, end, ari_cert_id(bundle.leaf)))
    times = [next_renewal(bundle, state, POLICY, NOW, rng(seed)) for seed in SEEDS]
    assert all(start <= t < end for t in times)
    assert max(times) - min(times) > timedelta(days=1.9)  # uniform over the window


def test_unbound_ari_window_is_used() -> None:
    bundle = cached_bundle(90)
    start, end = NOW + 40 * DAY, NOW + 42 * DAY
    state = replace(active_state(bundle), ari=ari_window(start, end))
    assert start <= next_renewal(bundle, state, POLICY, NOW, rng()) < end


def test_past_ari_window_means_now() -> None:
    bundle = cached_bundle(90)  # issued at NOW
    later = NOW + 10 * DAY
    # e.g. a mass revocation: the CA moved the window into the past
    state = replace(active_state(bundle), ari=ari_window(later - 2 * DAY, later - DAY))
    assert next_renewal(bundle, state, POLICY, later, rng()) == later


def test_ari_window_that_closed_before_the_certificate_was_issued_is_ignored() -> None:
    """Such a window cannot be for this certificate. Followed, a CA that answers every
    certificate with the same past window made each renewed certificate due at once: an order
    after every ARI check, forever (a replacement order, which CAs exempt from rate limits)."""
    bundle = cached_bundle(90)  # issued at NOW
    for end in (NOW - DAY, NOW):
        state = replace(active_state(bundle), ari=ari_window(NOW - 2 * DAY, end))
        when = next_renewal(bundle, state, POLICY, NOW + HOUR, rng())
        assert when == next_renewal(bundle, None, POLICY, NOW + HOUR, rng())
        assert when > NOW + 59 * DAY
    # A window that closes a second after issuance is one for it (and past: renew now).
    state = replace(active_state(bundle), ari=ari_window(NOW - DAY, NOW + timedelta(seconds=1)))
    assert next_renewal(bundle, state, POLICY, NOW + HOUR, rng()) == NOW + HOUR


def test_ari_window_for_another_certificate_is_ignored() -> None:
    bundle = cached_bundle(90)
    state = replace(active_state(bundle), ari=ari_window(NOW - 2 * DAY, NOW - DAY, "b3RoZXI.AQ"))
    when = next_renewal(bundle, state, POLICY, NOW, rng())
    assert when == next_renewal(bundle, None, POLICY, NOW, rng())
    assert when > NOW + 59 * DAY


def test_ari_window_ending_after_expiry_is_not_trusted() -> None:
    bundle = cached_bundle(90)
    state = replace(active_state(bundle), ari=ari_window(NOW + 80 * DAY, bundle.not_after + DAY))
    assert next_renewal(bundle, state, POLICY, NOW, rng()) <= bundle.not_after - 30 * DAY


@functools.cache
def rsa_bundle() -> CertBundle:
    """The RSA certificate issued beside cached_bundle(90) (same names, CA and lifetime)."""
    leaf = make_leaf(
        _ca(), ["a.example.test"], "rsa-2048", not_before=NOW, not_after=NOW + 90 * DAY
    )
    return parse_bundle(leaf.cert_pem, leaf.key_pem)


def test_the_window_of_another_served_certificate_is_followed() -> None:
    """A site served with two key types: the window the state holds may be the second
    certificate's (the one that needs renewal first, see governing_window). It is followed
    while that certificate serves, and ignored once it does not."""
    ecdsa, rsa = cached_bundle(90), rsa_bundle()
    start, end = NOW + 20 * DAY, NOW + 21 * DAY
    state = replace(active_state(ecdsa), ari=ari_window(start, end, ari_cert_id(rsa.leaf)))
    times = [next_renewal(ecdsa, state, POLICY, NOW, rng(seed), (rsa,)) for seed in SEEDS]
    assert all(start <= t < end for t in times)
    assert window_cert(ecdsa, state, (rsa,)) is rsa
    assert next_renewal(ecdsa, state, POLICY, NOW, rng()) > NOW + 59 * DAY  # not served
    assert observe_cert(state, ecdsa, POLICY, NOW, rng(), others=(rsa,)).ari == state.ari
    assert observe_cert(state, ecdsa, POLICY, NOW, rng()).ari is None
    # Checked against its own certificate: ending after the RSA certificate expires, it is
    # not followed.
    late = ari_window(NOW + DAY, rsa.not_after + MINUTE, ari_cert_id(rsa.leaf))
    assert window_cert(ecdsa, replace(state, ari=late), (rsa,)) is None


def test_governing_window_is_the_first_to_end_of_those_to_follow() -> None:
    ecdsa, rsa = cached_bundle(90), rsa_bundle()
    own = ari_window(NOW + 50 * DAY, NOW + 52 * DAY, ari_cert_id(ecdsa.leaf), NOW + 6 * HOUR)
    other = ari_window(NOW + 40 * DAY, NOW + 45 * DAY, ari_cert_id(rsa.leaf), NOW + 3 * HOUR)
    assert governing_window([(ecdsa, own), (rsa, other)]) == other
    assert governing_window([(rsa, other), (ecdsa, own)]) == other
    # A window not to follow (ending after the certificate expires) never decides; the
    # earliest next check of them all still applies.
    broken = ari_window(NOW + DAY, rsa.not_after + DAY, ari_cert_id(rsa.leaf), NOW + HOUR)
    assert governing_window([(ecdsa, own), (rsa, broken)]) == replace(own, next_check=NOW + HOUR)
    # None to follow: the first one fetched is kept (shown, paced), the schedule applies.
    assert governing_window([(rsa, broken)]) == broken
    # A certificate whose fetch failed is asked again by `retry_at`.
    assert governing_window([(ecdsa, own)], NOW + HOUR).next_check == NOW + HOUR
    assert governing_window([(ecdsa, own)], NOW + DAY).next_check == own.next_check
    with pytest.raises(ValueError):
        governing_window([])


def test_each_key_types_order_replaces_its_own_certificate() -> None:
    ecdsa, rsa = cached_bundle(90), rsa_bundle()
    state = active_state(ecdsa)
    key_types = ("ecdsa-p256", "rsa-2048")
    assert replaced_certs(state, (ecdsa, rsa), key_types) == {
        "ecdsa-p256": ari_cert_id(ecdsa.leaf),
        "rsa-2048": ari_cert_id(rsa.leaf),
    }
    # Nothing served (deleted from the store): the certificate the state remembers.
    assert replaced_certs(state, (), key_types) == {"ecdsa-p256": state.replaces}
    assert replaced_certs(RenewalState.new("a.example.test"), (), key_types) == {}


def test_pick_in_window() -> None:
    start, end = NOW - DAY, NOW + DAY
    picks = [pick_in_window(start, end, NOW, rng(seed)) for seed in SEEDS]
    assert all(NOW <= p < end for p in picks)
    # Picks that land before now become now (RFC 9773 4.2): about half of them here.
    assert 150 < sum(p == NOW for p in picks) < 350
    assert pick_in_window(NOW - 2 * DAY, NOW - DAY, NOW, rng()) == NOW
    assert pick_in_window(NOW - DAY, NOW, NOW, rng()) == NOW  # the end is exclusive
    with pytest.raises(ValueError, match="not after start"):
        pick_in_window(NOW + 2 * DAY, NOW + DAY, NOW, rng())


# --- ARI certificate id -----------------------------------------------------------------------


def _cert_with_aki(aki: x509.AuthorityKeyIdentifier | None, serial: int) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ari.example.test")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW)
        .not_valid_after(NOW + 90 * DAY)
    )
    if aki is not None:
        builder = builder.add_extension(aki, critical=False)
    return builder.sign(key, hashes.SHA256())


def test_ari_cert_id_rfc_9773_vector() -> None:
    aki = x509.AuthorityKeyIdentifier(RFC_AKI, None, None)
    assert ari_cert_id(_cert_with_aki(aki, RFC_SERIAL)) == RFC_CERT_ID


@pytest.mark.parametrize(
    ("serial", "encoded"),
    [(0x7F, "fw"), (0x80, "AIA"), (0x0100, "AQA"), (0x87654321, "AIdlQyE")],
)
def test_ari_cert_id_serial_is_minimal_positive_der(serial: int, encoded: str) -> None:
    aki = x509.AuthorityKeyIdentifier(RFC_AKI, None, None)
    assert ari_cert_id(_cert_with_aki(aki, serial)) == f"aYhba4dGQEHhs3uEe6CuLN4ByNQ.{encoded}"


def test_ari_cert_id_of_a_test_pki_leaf_matches_its_extensions() -> None:
    import base64

    leaf = cached_bundle(90).leaf
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    issuer_ski = _ca().cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == issuer_ski.digest
    key_part, serial_part = ari_cert_id(leaf).split(".")
    assert "=" not in key_part + serial_part
    assert base64.urlsafe_b64decode(key_part + "=" * (-len(key_part) % 4)) == aki.key_identifier
    serial_bytes = base64.urlsafe_b64decode(serial_part + "=" * (-len(serial_part) % 4))
    assert int.from_bytes(serial_bytes, "big", signed=True) == leaf.serial_number
    assert serial_bytes[0] != 0 or serial_bytes[1] & 0x80  # minimal: a 0x00 only before 1-bit


def test_ari_cert_id_needs_an_authority_key_identifier() -> None:
    self_signed = make_leaf(None, ["a.example.test"]).cert
    with pytest.raises(AriError, match="no Authority Key Identifier"):
        ari_cert_id(self_signed)
    issuer_only = x509.AuthorityKeyIdentifier(None, [x509.DNSName("ca.example.test")], RFC_SERIAL)
    with pytest.raises(AriError, match="without keyIdentifier"):
        ari_cert_id(_cert_with_aki(issuer_only, RFC_SERIAL))


def test_a_stored_bundle_carries_its_ari_id_and_planning_parses_nothing() -> None:
    """The ARI id is read with the bundle (off the event loop); planning its renewal, as
    every reload does for every managed name, neither parses the leaf (~30 µs) nor keeps a
    parsed copy (~3.5 KiB per certificate: 350 MiB at 100k)."""
    leaf = make_leaf(_ca(), ["a.example.test"])
    stored = stored_bundle(fullchain(leaf, _ca()), leaf.key_pem, "ecdsa-p256", source="test")
    assert stored.ari_id == ari_cert_id(leaf.cert)
    state = observe_cert(RenewalState.new("a.example.test"), stored, POLICY, NOW, rng())
    assert state.replaces == stored.ari_id
    assert "leaf" not in stored.__dict__
    # A listing (GET /certs) reads subject, issuer and serial without keeping the leaf.
    assert stored.issuer == leaf.cert.issuer.rfc4514_string()
    assert stored.subject and stored.serial
    assert "leaf" not in stored.__dict__
    self_signed = make_leaf(None, ["b.example.test"])
    plain = stored_bundle(self_signed.cert_pem, self_signed.key_pem, "ecdsa-p256", source="t")
    assert plain.ari_id == ""  # no Authority Key Identifier: the lifetime schedule


# --- renewal info -----------------------------------------------------------------------------


def info_body(start: str, end: str, **extra: object) -> bytes:
    return json.dumps({"suggestedWindow": {"start": start, "end": end}, **extra}).encode()


def test_parse_renewal_info_good_body() -> None:
    body = info_body(
        "2026-04-01T00:00:00Z",
        "2026-04-03T01:30:00.123456789+01:00",
        explanationURL="https://ca.example/why",
        unknown={"ignored": True},
    )
    info = parse_renewal_info(body, "3600", NOW, cert_id=RFC_CERT_ID)
    assert info == AriInfo(
        start=datetime(2026, 4, 1, tzinfo=UTC),
        end=datetime(2026, 4, 3, 0, 30, 0, 123456, tzinfo=UTC),
        explanation_url="https://ca.example/why",
        next_check=NOW + HOUR,
        cert_id=RFC_CERT_ID,
    )


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "https://ca.example/why\x1b[2J",  # a terminal escape, shown by `edged status NAME`
        "https://ca.example/a b",
        "ca.example/why",
        "https://" + "a" * 2001,
    ],
)
def test_an_explanation_url_that_is_no_plain_url_is_dropped_not_the_window(url: str) -> None:
    info = parse_renewal_info(
        info_body("2026-04-01T00:00:00Z", "2026-04-02T00:00:00Z", explanationURL=url), None, NOW
    )
    assert info.explanation_url == "" and info.start == datetime(2026, 4, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("retry_after", "delay"),
    [
        (None, 6 * HOUR),  # RFC 9773's suggested default
        ("not a date", 6 * HOUR),  # unreadable header: default, the window is still good
        ("120", timedelta(minutes=2)),
        ("0", timedelta(minutes=1)),  # clamped up: no hammering
        ("604800", 24 * HOUR),  # clamped down: at least daily
        ("Sun, 01 Mar 2026 15:00:00 GMT", 3 * HOUR),  # HTTP-date
        ("Sun, 01 Mar 2026 11:00:00 GMT", timedelta(minutes=1)),  # HTTP-date in the past
        ("99999999999999999999", 6 * HOUR),  # absurd number: default (no overflow)
        ("999999999999", 24 * HOUR),  # 12 digits: clamped (it raised OverflowError)
        ("Fri, 31 Dec 9999 23:59:59 GMT", 24 * HOUR),  # far future HTTP-date: clamped
    ],
)
def test_parse_renewal_info_next_check(retry_after: str | None, delay: timedelta) -> None:
    body = info_body("2026-04-01T00:00:00Z", "2026-04-02T00:00:00Z")
    assert parse_renewal_info(body, retry_after, NOW).next_check == NOW + delay


def test_parse_renewal_info_default_check_is_a_parameter() -> None:
    body = info_body("2026-04-01T00:00:00Z", "2026-04-02T00:00:00Z")
    assert parse_renewal_info(body, None, NOW, 2 * HOUR).next_check == NOW + 2 * HOUR


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "must be a JSON object, got an array"),
        (b"{}", "no suggestedWindow"),
        (b'{"suggestedWindow": "soon"}', "no suggestedWindow"),
        (b'{"suggestedWindow": {"end": "2026-04-02T00:00:00Z"}}', "suggestedWindow.start"),
        (
            b'{"suggestedWindow": {"start": "2026-04-01T00:00:00Z", "end": 5}}',
            "suggestedWindow.end must be",
        ),
        (info_body("yesterday", "2026-04-02T00:00:00Z"), "start 'yesterday' is not an RFC 3339"),
        (info_body("2026-04-01", "2026-04-02T00:00:00Z"), "start '2026-04-01' is not"),
        (info_body("2026-04-01T00:00:00", "2026-04-02T00:00:00Z"), "start .* is not"),  # no zone
        (info_body("2026-02-30T00:00:00Z", "2026-04-02T00:00:00Z"), "start .* is not"),
        (info_body("2026-04-01T00:00:00+25:00", "2026-04-02T00:00:00Z"), "start .* is not"),
        # Times datetime cannot hold in UTC: an AriError, not OverflowError.
        (info_body("0001-01-01T00:00:00+01:00", "2026-04-02T00:00:00Z"), "start .* is not"),
        (info_body("2026-04-01T00:00:00Z", "9999-12-31T23:59:59-23:59"), "end .* is not"),
        (info_body("2026-04-02T00:00:00Z", "2026-04-02T00:00:00Z"), "end .* is not after start"),
        (info_body("2026-04-03T00:00:00Z", "2026-04-02T00:00:00Z"), "end .* is not after start"),
        (
            info_body("2026-04-01T00:00:00Z", "2026-04-02T00:00:00Z", explanationURL=7),
            "explanationURL must be a string",
        ),
    ],
)
def test_parse_renewal_info_rejects_malformed_bodies(body: bytes, message: str) -> None:
    with pytest.raises(AriError, match=message):
        parse_renewal_info(body, None, NOW)


def test_parse_retry_after() -> None:
    assert parse_retry_after(None, NOW) is None
    assert parse_retry_after(" 30 ", NOW) == NOW + timedelta(seconds=30)
    assert parse_retry_after("Sun, 01 Mar 2026 13:00:00 GMT", NOW) == NOW + HOUR
    assert parse_retry_after("-5", NOW) is None
    assert parse_retry_after("1.5", NOW) is None
    assert parse_retry_after("²", NOW) is None  # a Unicode digit is not a delay
    # A broken or hostile CA cannot stop renewals for years (nor overflow datetime).
    assert parse_retry_after("999999999999", NOW) == NOW + MAX_RETRY_AFTER
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", NOW) == NOW + MAX_RETRY_AFTER
    assert parse_retry_after(str(7 * 86400 - 1), NOW) == NOW + timedelta(seconds=7 * 86400 - 1)


def test_parse_time_and_format_time() -> None:
    assert parse_time("2026-03-01t12:00:00z") == NOW
    assert parse_time("2026-03-01 07:00:00-05:00") == NOW
    assert parse_time("2016-12-31T23:59:60Z") == datetime(2016, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert format_time(NOW) == "2026-03-01T12:00:00Z"
    assert parse_time(format_time(NOW + timedelta(microseconds=5))) == NOW + timedelta(
        microseconds=5
    )


def test_ari_check_due() -> None:
    state = RenewalState.new("a.example.test")
    assert ari_check_due(state, NOW)
    state = replace(state, ari=ari_window(NOW + DAY, NOW + 2 * DAY, next_check=NOW + HOUR))
    assert not ari_check_due(state, NOW)
    assert ari_check_due(state, NOW + HOUR)


# --- transitions ------------------------------------------------------------------------------


def test_new_state() -> None:
    state = RenewalState.new("a.example.test")
    assert state.status is CertStatus.PROCESSING
    assert (state.attempts, state.next_try, state.in_flight, state.replaces) == (0, None, False, "")
    assert state.is_new
    assert is_due(state, NOW)  # no certificate yet: issue at once


def test_observe_cert_schedules_new_and_active_states() -> None:
    bundle = cached_bundle(90)
    state = observe_cert(RenewalState.new("a.example.test"), bundle, POLICY, NOW, rng())
    assert state.status is CertStatus.ACTIVE
    assert state.next_try == next_renewal(bundle, None, POLICY, NOW, rng())
    assert state.replaces == ari_cert_id(bundle.leaf)
    assert not is_due(state, NOW)
    assert is_due(state, state.next_try)
    newer = bundle_for(90 * DAY, not_before=NOW + 10 * DAY)
    again = observe_cert(state, newer, POLICY, NOW, rng())
    assert again.status is CertStatus.ACTIVE
    assert again.next_try == next_renewal(newer, None, POLICY, NOW, rng())
    assert again.replaces == ari_cert_id(newer.leaf)


def test_observe_cert_keeps_processing_and_failed_pacing() -> None:
    bundle = cached_bundle(90)
    for attempts in (1, POLICY.max_attempts):
        state = RenewalState.new("a.example.test")
        for _ in range(attempts):
            state = record_failure(begin_attempt(state, NOW), POLICY, NOW, ERROR, None)
        seen = observe_cert(state, bundle, POLICY, NOW, rng())
        assert seen == replace(state, replaces=ari_cert_id(bundle.leaf))


def test_observe_cert_drops_the_window_of_another_certificate() -> None:
    bundle = cached_bundle(90)
    old = replace(active_state(bundle), ari=ari_window(NOW, NOW + DAY, "b3RoZXI.AQ"))
    assert observe_cert(old, bundle, POLICY, NOW, rng()).ari is None
    own = ari_window(NOW + 50 * DAY, NOW + 51 * DAY, ari_cert_id(bundle.leaf))
    # Not yet scheduled for this certificate (an ACTIVE state that is, keeps its next try).
    kept = observe_cert(replace(old, ari=own, replaces=""), bundle, POLICY, NOW, rng())
    assert kept.ari == own
    assert kept.next_try is not None and own.start <= kept.next_try < own.end


def test_observe_cert_without_aki_has_nothing_to_replace() -> None:
    leaf = make_leaf(None, ["a.example.test"], not_before=NOW, not_after=NOW + 90 * DAY)
    bundle = parse_bundle(leaf.cert_pem, leaf.key_pem)
    state = observe_cert(RenewalState.new("a.example.test"), bundle, POLICY, NOW, rng())
    assert state.replaces == ""
    assert state.status is CertStatus.ACTIVE


def test_record_failure_gives_up_at_once_when_told() -> None:
    # An attempt that cannot succeed until the operator acts: FAILED after one attempt,
    # retried daily, a rate limit still kept.
    state = begin_attempt(RenewalState.new("a.example.test"), NOW)
    failed = record_failure(state, POLICY, NOW, ERROR, NOW + 2 * DAY, give_up=True)
    assert failed.status is CertStatus.FAILED and failed.attempts == 1
    assert failed.next_try == NOW + 2 * DAY and failed.not_before_retry == NOW + 2 * DAY
    failed = record_failure(state, POLICY, NOW, ERROR, None, give_up=True)
    assert failed.next_try == NOW + timedelta(seconds=POLICY.failed_retry_interval)
    assert failed.last_error == ERROR and not failed.in_flight
    assert [n.event for n in notices(state, failed, None, NOW, None)] == ["failed"]


def test_observe_cert_keeps_the_spread_of_an_overdue_active_certificate() -> None:
    # A restart spreads overdue work over 5 minutes; the daemon then observes the certificates
    # it serves, more than once. Observing the certificate the state is already scheduled for
    # must not make the work due at once again.
    bundle = cached_bundle(90)
    later = NOW + 80 * DAY  # past the renewal time: overdue
    for seed in range(20):
        spread = resume(active_state(bundle), POLICY, later, rng(seed))
        assert spread.next_try is not None and later < spread.next_try <= later + 5 * MINUTE
        seen = spread
        for _ in range(3):
            seen = observe_cert(seen, bundle, POLICY, later, rng(seed + 100))
            assert seen == spread
            assert not is_due(seen, later)


def test_observe_cert_keeps_any_schedule_of_the_same_certificate() -> None:
    # An ARI pick or a jitter draw is not redone by a reload: the same rng would give another.
    bundle = cached_bundle(90)
    state = active_state(bundle)
    for seed in range(5):
        # The very object: a full reload observes every name, and a copy of each unchanged
        # state (100k at 100k names) only raised the reload's memory peak.
        assert observe_cert(state, bundle, POLICY, NOW, rng(seed + 7)) is state


def test_observe_cert_replans_a_changed_certificate_or_on_request() -> None:
    bundle = cached_bundle(90)
    later = NOW + 70 * DAY  # overdue with renew_before_days = 30, not with 10
    spread = resume(active_state(bundle), POLICY, later, rng())
    newer = bundle_for(90 * DAY, not_before=NOW + 70 * DAY)
    changed = observe_cert(spread, newer, POLICY, later, rng())
    assert changed.next_try == next_renewal(newer, None, POLICY, later, rng())
    assert changed.replaces == ari_cert_id(newer.leaf)
    # A changed policy (reschedule=True) plans the same certificate again.
    again = observe_cert(spread, bundle, policy(10), later, rng(), reschedule=True)
    assert again.next_try == next_renewal(bundle, None, policy(10), later, rng())
    assert again.next_try is not None and again.next_try > later


def test_observe_cert_replans_a_certificate_it_cannot_recognise() -> None:
    # Without an AKI there is no certificate id to compare: planned again, as before.
    leaf = make_leaf(None, ["a.example.test"], not_before=NOW, not_after=NOW + 90 * DAY)
    bundle = parse_bundle(leaf.cert_pem, leaf.key_pem)
    later = NOW + 80 * DAY
    spread = resume(active_state(bundle), POLICY, later, rng())
    assert observe_cert(spread, bundle, POLICY, later, rng()).next_try == later


def test_spread_overdue_moves_only_due_work() -> None:
    state = active_state(cached_bundle(90))
    assert spread_overdue(state, NOW, rng()) == state
    for seed in SEEDS:
        moved = spread_overdue(state, NOW + 80 * DAY, rng(seed))
        assert moved.next_try is not None
        assert NOW + 80 * DAY <= moved.next_try <= NOW + 80 * DAY + 5 * MINUTE


def test_observe_cert_after_resume_still_sees_a_new_name() -> None:
    # The loop may resume (spreading due work) before it loads the certificates.
    spread = resume(RenewalState.new("a.example.test"), POLICY, NOW, rng())
    assert spread.is_new
    state = observe_cert(spread, cached_bundle(90), POLICY, NOW, rng())
    assert state.status is CertStatus.ACTIVE
    assert state.next_try == next_renewal(cached_bundle(90), None, POLICY, NOW, rng())


def test_observe_no_cert_makes_an_active_name_due() -> None:
    active = active_state(cached_bundle(90))
    gone = observe_no_cert(active, NOW)
    assert gone.status is CertStatus.PROCESSING
    assert gone.next_try == NOW and is_due(gone, NOW)
    assert gone.replaces == active.replaces
    limited = observe_no_cert(replace(active, not_before_retry=NOW + HOUR), NOW)
    assert limited.next_try == NOW + HOUR
    failing = failing_state(2)
    assert observe_no_cert(failing, NOW) == failing


def test_begin_attempt() -> None:
    state = begin_attempt(active_state(cached_bundle(90)), NOW)
    assert state.status is CertStatus.PROCESSING
    assert state.in_flight
    assert state.last_attempt == NOW
    assert not is_due(state, NOW + 365 * DAY)  # never two orders at once


def test_retry_pacing_then_failed_then_daily() -> None:
    state = active_state(cached_bundle(90))
    now = NOW
    for attempt in range(1, POLICY.max_attempts):
        state = record_failure(begin_attempt(state, now), POLICY, now, ERROR, None)
        assert state.status is CertStatus.PROCESSING
        assert state.attempts == attempt
        assert state.next_try == now + timedelta(seconds=900)
        assert not state.in_flight
        assert state.last_error == ERROR
        assert state.failing_since == NOW
        assert not is_due(state, now + timedelta(seconds=899))
        now = state.next_try
        assert is_due(state, now)
    state = record_failure(begin_attempt(state, now), POLICY, now, ERROR, None)
    assert state.status is CertStatus.FAILED
    assert state.attempts == POLICY.max_attempts
    assert state.next_try == now + DAY
    # The daily attempt keeps the name FAILED and never paces faster than daily.
    for day in range(1, 4):
        now = state.next_try
        running = begin_attempt(state, now)
        assert running.status is CertStatus.FAILED and running.in_flight
        state = record_failure(running, POLICY, now, ERROR, None)
        assert state.status is CertStatus.FAILED
        assert state.attempts == POLICY.max_attempts + day
        assert state.next_try == now + DAY


def test_retry_after_beats_retry_interval() -> None:
    state = begin_attempt(active_state(cached_bundle(90)), NOW)
    limit = NOW + 3 * HOUR
    failed = record_failure(state, POLICY, NOW, ERROR, limit)
    assert failed.next_try == limit
    assert failed.not_before_retry == limit
    # A shorter Retry-After does not make retries faster than retry_interval.
    short = record_failure(state, POLICY, NOW, ERROR, NOW + timedelta(seconds=10))
    assert short.next_try == NOW + timedelta(seconds=900)
    # A rate limit from an earlier failure holds over a later, shorter one.
    again = record_failure(begin_attempt(failed, NOW + HOUR), POLICY, NOW + HOUR, ERROR, None)
    assert again.not_before_retry == limit
    assert again.next_try == limit
    assert not is_due(replace(again, next_try=NOW), NOW + 2 * HOUR)
    # A limit in the past is forgotten.
    late = record_failure(begin_attempt(failed, NOW + DAY), POLICY, NOW + DAY, ERROR, None)
    assert late.not_before_retry is None


def test_retry_after_beats_the_daily_failed_retry_too() -> None:
    state = replace(active_state(cached_bundle(90)), attempts=POLICY.max_attempts - 1)
    failed = record_failure(state, POLICY, NOW, ERROR, NOW + 7 * DAY)
    assert failed.status is CertStatus.FAILED
    assert failed.next_try == NOW + 7 * DAY


def test_failure_error_is_stored_as_plain_json() -> None:
    state = record_failure(
        RenewalState.new("a"), POLICY, NOW, {"message": "boom", "at": NOW, "n": 1}, None
    )
    assert state.last_error == {"message": "boom", "at": str(NOW), "n": 1}
    assert state.last_attempt == NOW  # failed before begin_attempt was called
    json.dumps(state.to_json())


def test_record_success() -> None:
    bundle = cached_bundle(90)
    state = RenewalState.new("a.example.test")
    for _ in range(POLICY.max_attempts):
        state = record_failure(begin_attempt(state, NOW), POLICY, NOW, ERROR, None)
    old_window = ari_window(NOW - DAY, NOW, "b3RoZXI.AQ")
    running = begin_attempt(replace(state, ari=old_window), NOW + DAY)
    done = record_success(running, bundle, POLICY, NOW + DAY, rng(), issued_by="node-1")
    assert done.status is CertStatus.ACTIVE
    assert (done.attempts, done.last_error, done.in_flight) == (0, None, False)
    assert done.last_success == NOW + DAY
    assert done.failing_since is None
    assert done.ari is None  # the old certificate's window is gone
    assert done.replaces == ari_cert_id(bundle.leaf)
    assert done.issued_by == "node-1"
    assert done.next_try == next_renewal(bundle, None, POLICY, NOW + DAY, rng())


def test_record_success_with_ari_uses_its_window() -> None:
    bundle = cached_bundle(90)
    window = ari_window(NOW + 55 * DAY, NOW + 57 * DAY, ari_cert_id(bundle.leaf))
    running = begin_attempt(RenewalState.new("a.example.test"), NOW)
    done = record_success(running, bundle, POLICY, NOW, rng(), window)
    assert done.ari == window
    assert done.next_try is not None and window.start <= done.next_try < window.end


def test_record_success_respects_a_rate_limit_still_running() -> None:
    bundle = bundle_for(6 * DAY, not_before=NOW - 5 * DAY)  # renewal due at once
    state = replace(begin_attempt(RenewalState.new("a"), NOW), not_before_retry=NOW + HOUR)
    done = record_success(state, bundle, POLICY, NOW, rng())
    assert done.next_try == NOW + HOUR
    assert done.not_before_retry == NOW + HOUR


def test_record_ari_reschedules_only_for_a_new_window() -> None:
    bundle = cached_bundle(90)
    state = active_state(bundle)
    cert_id = ari_cert_id(bundle.leaf)
    first = ari_window(NOW + 50 * DAY, NOW + 52 * DAY, cert_id)
    got = record_ari(state, bundle, POLICY, NOW, rng(1), first)
    assert got.ari == first
    assert got.next_try is not None and first.start <= got.next_try < first.end
    # The same window polled again: only next_check changes, the picked time stays.
    polled = replace(first, next_check=NOW + 12 * HOUR)
    again = record_ari(got, bundle, POLICY, NOW + 6 * HOUR, rng(2), polled)
    assert (again.next_try, again.ari) == (got.next_try, polled)
    # A moved window (e.g. revocation ahead) is honoured at once.
    urgent = ari_window(NOW - DAY, NOW + MINUTE, cert_id)  # closes after issuance (NOW)
    assert record_ari(again, bundle, POLICY, NOW + HOUR, rng(), urgent).next_try == NOW + HOUR
    # A failing name keeps its retry pacing.
    failing = record_failure(begin_attempt(state, NOW), POLICY, NOW, ERROR, None)
    kept = record_ari(failing, bundle, POLICY, NOW, rng(), urgent)
    assert kept.next_try == failing.next_try and kept.ari == urgent


def test_force_retry_resets_attempts_but_keeps_the_rate_limit() -> None:
    state = RenewalState.new("a.example.test")
    for _ in range(POLICY.max_attempts):
        state = record_failure(begin_attempt(state, NOW), POLICY, NOW, ERROR, None)
    assert state.status is CertStatus.FAILED
    forced = force_retry(state, NOW + HOUR)
    assert forced.status is CertStatus.PROCESSING
    assert forced.attempts == 0
    assert forced.next_try == NOW + HOUR
    assert is_due(forced, NOW + HOUR)
    assert forced.failing  # still an outage until a certificate arrives
    limited = replace(state, not_before_retry=NOW + 3 * HOUR)
    forced = force_retry(limited, NOW + HOUR)
    assert forced.next_try == NOW + 3 * HOUR
    assert forced.not_before_retry == NOW + 3 * HOUR
    assert not is_due(forced, NOW + HOUR)
    # A forced retry while an order runs does not start a second one.
    running = begin_attempt(active_state(cached_bundle(90)), NOW)
    assert force_retry(running, NOW).in_flight
    assert not is_due(force_retry(running, NOW), NOW)


def test_forced_retries_start_a_fresh_count() -> None:
    state = RenewalState.new("a")
    for _ in range(POLICY.max_attempts):
        state = record_failure(begin_attempt(state, NOW), POLICY, NOW, ERROR, None)
    state = force_retry(state, NOW)
    state = record_failure(begin_attempt(state, NOW), POLICY, NOW, ERROR, None)
    assert (state.status, state.attempts) == (CertStatus.PROCESSING, 1)
    assert state.next_try == NOW + timedelta(seconds=900)


def test_resume_counts_an_interrupted_attempt_as_failed() -> None:
    running = begin_attempt(replace(RenewalState.new("a"), attempts=2), NOW - HOUR)
    resumed = resume(running, POLICY, NOW, rng())
    assert resumed.status is CertStatus.PROCESSING
    assert resumed.attempts == 3  # not reset: a crash loop cannot flood the CA
    assert resumed.last_error == {"message": INTERRUPTED}
    assert not resumed.in_flight
    assert resumed.last_attempt == NOW - HOUR
    assert resumed.next_try == NOW + timedelta(seconds=900)
    last = begin_attempt(replace(RenewalState.new("a"), attempts=4), NOW - HOUR)
    assert resume(last, POLICY, NOW, rng()).status is CertStatus.FAILED


def test_resume_spreads_overdue_work() -> None:
    spread = timedelta(minutes=5)
    overdue = replace(active_state(cached_bundle(90)), next_try=NOW - DAY)
    times = [resume(overdue, POLICY, NOW, rng(seed)).next_try for seed in SEEDS]
    assert all(t is not None and NOW <= t <= NOW + spread for t in times)
    assert len(set(times)) > 400
    fresh = resume(RenewalState.new("a"), POLICY, NOW, rng(), spread=HOUR)
    assert fresh.next_try is not None and NOW <= fresh.next_try <= NOW + HOUR
    # Not overdue: untouched.
    planned = active_state(cached_bundle(90))
    assert resume(planned, POLICY, NOW, rng()) == planned
    # Overdue but rate limited: the limit wins over the spread.
    limited = replace(overdue, not_before_retry=NOW + HOUR)
    assert resume(limited, POLICY, NOW, rng()).next_try == NOW + HOUR
    # An expired limit is dropped.
    stale = replace(planned, not_before_retry=NOW - HOUR)
    assert resume(stale, POLICY, NOW, rng()).not_before_retry is None


def test_is_due() -> None:
    state = replace(RenewalState.new("a"), next_try=NOW)
    assert is_due(state, NOW)
    assert not is_due(state, NOW - timedelta(seconds=1))
    assert not is_due(replace(state, in_flight=True), NOW)
    assert not is_due(replace(state, not_before_retry=NOW + HOUR), NOW)
    assert is_due(replace(state, not_before_retry=NOW), NOW)


# --- policy -----------------------------------------------------------------------------------


def test_policy_from_settings() -> None:
    acme = AcmeSettings(renew_before_days=0, retry_interval=60.0, max_attempts=3)
    assert RenewalPolicy.from_settings(acme) == RenewalPolicy(0, 60.0, 3, 86400.0)
    assert RenewalPolicy() == RenewalPolicy(30, 900.0, 5, 86400.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"renew_before_days": -1}, {"retry_interval": 0}, {"max_attempts": 0}],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RenewalPolicy(**kwargs)  # type: ignore[arg-type]


# --- JSON -------------------------------------------------------------------------------------


def full_state() -> RenewalState:
    return RenewalState(
        name="a.example.test",
        status=CertStatus.FAILED,
        attempts=6,
        last_error={
            "type": "urn:ietf:params:acme:error:rejectedIdentifier",
            "detail": "nope",
            "subproblems": [{"type": "x", "identifier": {"type": "dns", "value": "a"}}],
        },
        last_success=NOW - 60 * DAY,
        last_attempt=NOW - HOUR + timedelta(microseconds=250),
        next_try=NOW + DAY,
        not_before_retry=NOW + 2 * HOUR,
        in_flight=True,
        ari=AriInfo(NOW, NOW + DAY, "https://ca.example/why", NOW + 6 * HOUR, RFC_CERT_ID),
        replaces=RFC_CERT_ID,
        issued_by="node-7",
        failing_since=NOW - 2 * DAY,
        last_expiry_notice=NOW - 3 * HOUR,
    )


@pytest.mark.parametrize(
    "state", [full_state(), RenewalState.new("a.example.test")], ids=["full", "new"]
)
def test_json_round_trip(state: RenewalState) -> None:
    text = json.dumps(state.to_json())
    assert RenewalState.from_json(json.loads(text), "a.example.test") == state


def test_json_uses_rfc_3339_and_status_values() -> None:
    data = full_state().to_json()
    assert data["status"] == "failed"
    assert data["next_try"] == "2026-03-02T12:00:00Z"
    assert data["ari"] == {
        "start": "2026-03-01T12:00:00Z",
        "end": "2026-03-02T12:00:00Z",
        "explanation_url": "https://ca.example/why",
        "next_check": "2026-03-01T18:00:00Z",
        "cert_id": RFC_CERT_ID,
    }


def test_from_json_tolerates_unknown_and_missing_keys() -> None:
    data = {"status": "active", "next_try": "2026-03-02T12:00:00Z", "future_field": [1, 2]}
    state = RenewalState.from_json(data, "a.example.test")
    assert state == replace(
        RenewalState.new("a.example.test"), status=CertStatus.ACTIVE, next_try=NOW + DAY
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a JSON object, got an array"),
        ({"name": "b.example.test"}, "the file is for 'b.example.test'"),
        ({"name": 5}, "name: must be a string"),
        ({"status": "renewing"}, "status: 'renewing' is not one of processing, active, failed"),
        ({"attempts": -1}, "attempts: must be a non-negative integer"),
        ({"attempts": True}, "attempts: must be a non-negative integer"),
        ({"attempts": "3"}, "attempts: must be a non-negative integer"),
        ({"in_flight": "yes"}, "in_flight: must be true or false"),
        ({"next_try": 1700000000}, "next_try: must be an RFC 3339 time string, got int"),
        ({"last_success": "yesterday"}, "last_success: 'yesterday' is not an RFC 3339 time"),
        ({"last_error": "boom"}, "last_error: must be an object or null, got a string"),
        ({"ari": []}, "ari: must be an object or null"),
        ({"ari": {"start": "2026-03-01T12:00:00Z"}}, "ari: needs start, end and next_check"),
        ({"ari": {"start": "x", "end": "y", "next_check": "z"}}, "ari.start: 'x' is not"),
        (
            {
                "ari": {
                    "start": "2026-03-02T12:00:00Z",
                    "end": "2026-03-01T12:00:00Z",
                    "next_check": "2026-03-01T12:00:00Z",
                }
            },
            "ari: end is not after start",
        ),
        ({"replaces": None}, "replaces: must be a string"),
    ],
)
def test_from_json_rejects_malformed_state(data: object, message: str) -> None:
    with pytest.raises(StateError, match=message) as info:
        RenewalState.from_json(data, "a.example.test")  # type: ignore[arg-type]
    assert info.value.name == "a.example.test"
    assert str(info.value).startswith("renewal state of a.example.test: ")


# --- notices and fallback ---------------------------------------------------------------------


def failing_state(attempts: int) -> RenewalState:
    state = active_state(cached_bundle(90))
    for _ in range(attempts):
        state = record_failure(begin_attempt(state, NOW), POLICY, NOW, ERROR, None)
    return state


def events(found: list[Notice]) -> list[str]:
    return [n.event for n in found]


def test_failed_notice_on_the_transition_only() -> None:
    before = begin_attempt(failing_state(POLICY.max_attempts - 1), NOW)
    after = record_failure(before, POLICY, NOW, ERROR, None)
    found = notices(before, after, None, NOW, None)
    assert found == [Notice("failed", "a.example.test", "failed", POLICY.max_attempts, ERROR, None)]
    # The daily attempt of a FAILED name does not repeat it.
    daily = begin_attempt(after, NOW + DAY)
    assert (
        notices(daily, record_failure(daily, POLICY, NOW + DAY, ERROR, None), None, NOW, None) == []
    )
    assert notices(after, after, None, NOW, None) == []
    assert events(notices(None, after, None, NOW, None)) == ["failed"]  # e.g. first load


@pytest.mark.parametrize(
    "before",
    [
        failing_state(1),
        failing_state(POLICY.max_attempts),
        force_retry(failing_state(POLICY.max_attempts), NOW),  # a forced success recovers too
    ],
    ids=["processing", "failed", "forced"],
)
def test_recovered_notice(before: RenewalState) -> None:
    bundle = cached_bundle(90)
    running = begin_attempt(before, NOW)
    after = record_success(running, bundle, POLICY, NOW, rng())
    found = notices(running, after, bundle.not_after, NOW, None)
    assert events(found) == ["recovered"]
    assert found[0].state == "active" and found[0].error is None
    assert notices(after, after, bundle.not_after, NOW, None) == []


def test_routine_renewal_is_silent() -> None:
    bundle = cached_bundle(90)
    running = begin_attempt(active_state(bundle), NOW)
    assert (
        notices(running, record_success(running, bundle, POLICY, NOW, rng()), None, NOW, None) == []
    )
    assert notices(None, active_state(bundle), bundle.not_after, NOW, None) == []


def test_expiring_notice_at_most_daily_while_renewal_fails() -> None:
    state = failing_state(2)
    not_after = NOW + 5 * DAY
    found = notices(state, state, not_after, NOW, None)
    assert found == [Notice("expiring", "a.example.test", "processing", 2, ERROR, not_after)]
    assert notices(state, state, not_after, NOW + 23 * HOUR, NOW) == []
    assert events(notices(state, state, not_after, NOW + DAY, NOW)) == ["expiring"]
    assert notices(state, state, NOW + 8 * DAY, NOW, None) == []  # not within 7 days


def test_no_expiring_notice_for_a_healthy_short_lived_cert() -> None:
    bundle = cached_bundle(6)  # always within 7 days of expiry
    state = active_state(bundle)
    assert notices(state, state, bundle.not_after, NOW, None) == []
    running = begin_attempt(state, NOW + 3 * DAY)  # routine renewal in progress
    assert notices(running, running, bundle.not_after, NOW + 3 * DAY, None) == []


def test_expiry_notices_from_failed_attempts_keep_their_limit_across_restarts() -> None:
    """Each failed attempt of a failing 6-day certificate used to send "expiring" again (the
    loop passed no last notice); the last one is in the state, so a restart keeps the limit."""
    bundle = cached_bundle(6)
    state = replace(active_state(bundle), next_try=NOW)
    now, sent = NOW, []
    for _ in range(5):  # five attempts 15 minutes apart, all failing
        running = begin_attempt(state, now)
        failed = record_failure(running, POLICY, now, ERROR, None)
        state, found = notify(running, failed, bundle.not_after, now)
        sent += events(found)
        assert state.next_try is not None
        now = state.next_try
    assert sent == ["expiring", "failed"]  # the fifth attempt makes it failed
    assert state.last_expiry_notice == NOW
    # A restart (state saved and loaded) within the day: no second notice; a day later: one.
    loaded = RenewalState.from_json(json.loads(json.dumps(state.to_json())), state.name)
    assert notify(loaded, loaded, bundle.not_after, NOW + 23 * HOUR)[1] == []
    later, found = notify(loaded, loaded, bundle.not_after, NOW + DAY)
    assert events(found) == ["expiring"] and later.last_expiry_notice == NOW + DAY
    # Expired: hourly, by the same stored time.
    expired, found = notify(later, later, NOW + DAY, NOW + DAY + HOUR)
    assert events(found) == ["expired"]
    assert notify(expired, expired, NOW + DAY, NOW + DAY + 90 * MINUTE)[1] == []


def test_expired_notice_at_most_hourly() -> None:
    state = failing_state(POLICY.max_attempts)
    not_after = NOW - HOUR
    found = notices(state, state, not_after, NOW, None)
    assert events(found) == ["expired"]
    assert found[0].to_json() == {
        "name": "a.example.test",
        "state": "failed",
        "attempts": POLICY.max_attempts,
        "error": ERROR,
        "not_after": "2026-03-01T11:00:00Z",
        "event": "expired",
    }
    assert notices(state, state, not_after, NOW + 59 * timedelta(minutes=1), NOW) == []
    assert events(notices(state, state, not_after, NOW + HOUR, NOW)) == ["expired"]


def test_failed_and_expiring_together() -> None:
    before = begin_attempt(failing_state(POLICY.max_attempts - 1), NOW)
    after = record_failure(before, POLICY, NOW, ERROR, None)
    assert events(notices(before, after, NOW + DAY, NOW, None)) == ["failed", "expiring"]


def test_fallback_active() -> None:
    serving = NOW + 10 * DAY
    assert not fallback_active(active_state(cached_bundle(90)), serving, NOW)
    assert not fallback_active(begin_attempt(active_state(cached_bundle(90)), NOW), serving, NOW)
    assert fallback_active(failing_state(1), serving, NOW)
    assert fallback_active(failing_state(POLICY.max_attempts), serving, NOW)
    assert fallback_active(force_retry(failing_state(1), NOW), serving, NOW)
    assert fallback_active(failing_state(1), NOW - DAY, NOW)  # still served after expiry
    assert not fallback_active(failing_state(1), None, NOW)  # nothing old to fall back on


# --- a whole life -----------------------------------------------------------------------------


def test_a_certificate_lifecycle() -> None:
    """New name → issued → renewal fails into FAILED → daily retries → success → recovered."""
    r = rng(42)
    first = bundle_for(6 * DAY)
    state = begin_attempt(RenewalState.new("a.example.test"), NOW)
    state = record_success(state, first, POLICY, NOW, r)
    assert state.next_try is not None and state.next_try >= NOW + 3 * DAY - 2 * HOUR
    now = first_try = state.next_try
    seen: list[str] = []
    last_expiry_notice: datetime | None = None  # kept by the loop, as the caller's duty
    while state.status is not CertStatus.FAILED:
        assert is_due(state, now)
        running = begin_attempt(state, now)
        after = record_failure(running, POLICY, now, ERROR, None)
        found = notices(running, after, first.not_after, now, last_expiry_notice)
        if any(n.event in ("expiring", "expired") for n in found):
            last_expiry_notice = now
        seen += events(found)
        state = after
        assert state.next_try is not None
        now = state.next_try
    # Three days left when renewal starts failing: one "expiring" (daily), then "failed".
    assert seen == ["expiring", "failed"]
    # Five attempts 15 minutes apart, the last one an hour after renewal began; then daily.
    assert state.last_attempt is not None and state.last_attempt - first_try == HOUR
    assert now == state.last_attempt + DAY
    second = bundle_for(6 * DAY, not_before=now)
    running = begin_attempt(state, now)
    state2 = record_success(running, second, POLICY, now, r)
    assert events(notices(running, state2, second.not_after, now, None)) == ["recovered"]
    assert state2.next_try is not None and state2.next_try > now + 2 * DAY


def test_due_and_wait_names_the_due_and_the_sleep_until_the_next() -> None:
    due = RenewalState.new("a.example.test")  # next_try None: due now
    later = replace(due, name="b.example.test", next_try=NOW + timedelta(seconds=30))
    stuck = replace(due, name="c.example.test", in_flight=True)  # left by a crashed attempt
    limited = replace(
        due, name="d.example.test", next_try=NOW, not_before_retry=NOW + timedelta(seconds=20)
    )
    overdue = replace(due, name="e.example.test", next_try=NOW - DAY)

    def check(*states: RenewalState, running: tuple[str, ...] = ()) -> tuple[list[str], float]:
        return due_and_wait({s.name: s for s in states}, running, NOW, 0.5, 60)

    assert check() == ([], 60)
    assert check(later) == ([], 30)
    assert check(later, limited) == ([], 20)  # a rate limit holds it back, not due yet
    assert check(replace(limited, not_before_retry=NOW)) == (["d.example.test"], 60)
    # The due ones are started: the sleep is until the next of the others, with a floor so
    # that nothing can spin the loop.
    assert check(due, later, overdue) == (["a.example.test", "e.example.test"], 30)
    assert check(due, replace(later, next_try=NOW + timedelta(seconds=0.1))) == (
        ["a.example.test"],
        0.5,
    )
    # In flight, or running here: not due by time, and no shorter sleep (its end wakes it).
    assert check(stuck) == ([], 60)
    assert check(due, later, running=("a.example.test",)) == ([], 30)
    # The same answers as is_due, one by one.
    for state in (due, later, stuck, limited, overdue):
        assert (check(state)[0] == [state.name]) == is_due(state, NOW)


def test_a_fleet_node_adopts_another_nodes_attempt_not_an_older_or_running_one() -> None:
    bundle = cached_bundle(90)
    ours = active_state(bundle)
    running = begin_attempt(ours, NOW + HOUR)  # another node's attempt, saved as it starts
    failed = record_failure(running, POLICY, NOW + HOUR, ERROR, None)
    renewed = record_success(running, bundle, POLICY, NOW + HOUR, rng())
    assert not adoptable(running, ours)  # its lease says it runs: not ours to take
    assert adoptable(failed, ours) and adoptable(renewed, ours)
    # A node that saw the attempt start (its state then not in flight: configure) takes the
    # outcome, which has the same last_attempt.
    seen = replace(running, in_flight=False, next_try=NOW + HOUR + 5 * MINUTE)
    assert adoptable(failed, seen)
    # Nothing to take: its own state again, or one older in any respect.
    assert not adoptable(failed, failed)
    later = record_failure(
        begin_attempt(failed, NOW + 2 * HOUR), POLICY, NOW + 2 * HOUR, ERROR, None
    )
    assert not adoptable(failed, later)
    noticed = replace(failed, last_expiry_notice=NOW + 3 * HOUR)
    assert not adoptable(failed, noticed) and adoptable(noticed, failed)
