"""edged.dns against a real BIND9: TSIG-signed updates, CNAME delegation, propagation, CAA."""

from __future__ import annotations

import base64
import contextlib
import itertools
import re
import socket
import subprocess
import threading
import time
from collections.abc import Collection, Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
import pytest

from edged.config import Address, DnsSettings
from edged.dns import (
    CaaResult,
    DnsError,
    DnsUpdater,
    TsigKey,
    build_resolver,
    check_caa,
    load_tsig_key,
    parse_tsig_secret,
)
from tests.bind import TSIG_KEYGEN, Bind, bind_fixture, start_bind

PEBBLE = "pebble.letsencrypt.org"

bind = bind_fixture(
    {
        "a.test": """
            _acme-challenge.deleg CNAME deleg.a.test.acme.test.
            _acme-challenge.inzone CNAME inzone.a.test.acme.b.test.
            _acme-challenge.hops CNAME hop1.a.test.
            hop1 CNAME hops.a.test.acme.test.
            _acme-challenge.elsewhere CNAME _acme-challenge.elsewhere.b.test.
            _acme-challenge.loop1 CNAME _acme-challenge.loop2.a.test.
            _acme-challenge.loop2 CNAME _acme-challenge.loop1.a.test.
            _acme-challenge.long CNAME l1.a.test.
            l1 CNAME l2.a.test.
            l2 CNAME l3.a.test.
            l3 CNAME l4.a.test.
            l4 CNAME l5.a.test.
            l5 CNAME l6.a.test.
            l6 CNAME l7.a.test.
            l7 CNAME l8.a.test.
            l8 CNAME l9.a.test.
        """,
        "acme.test": "",
        "b.test": "",
        "locked.test": "",
    },
    read_only=("locked.test",),
)

caa_bind = bind_fixture(
    {
        "test": "",
        "nocaa.test": 'iodef-only CAA 0 iodef "mailto:ops@nocaa.test"',
        "le.test": f"""
            @ CAA 0 issue "{PEBBLE}"
            own CAA 0 issue "other.ca"
            params CAA 0 issue "{PEBBLE}; validationmethods=dns-01"
            acct CAA 0 issue "{PEBBLE}; accounturi=https://ca.test/acct/1"
            either CAA 0 issue "{PEBBLE}; validationmethods=dns-01"
            either CAA 0 issue "{PEBBLE}; validationmethods = http-01 , tls-alpn-01"
            alias CNAME b2.test.
            alias-empty CNAME target.b2.test.
        """,
        "b2.test": '@ CAA 0 issue "other.ca"',
        "wild.test": f"""
            @ CAA 0 issue "other.ca"
            @ CAA 0 issuewild "{PEBBLE}"
        """,
        "forbid.test": '@ CAA 0 issue ";"',
        "crit.test": f"""
            @ CAA 0 issue "{PEBBLE}"
            @ CAA 128 tbs "unknown"
        """,
        "noncrit.test": f"""
            @ CAA 0 issue "{PEBBLE}"
            @ CAA 0 tbs "unknown"
        """,
    },
    recursion=True,
)


def updater(named: Bind, /, **overrides: object) -> DnsUpdater:
    settings = named.settings(**overrides)
    return DnsUpdater(settings, load_tsig_key(settings), timeout=2.0, poll_interval=0.05)


def secret_of(server: Bind) -> str:
    match = re.search(r'secret "([^"]+)"', server.secret_file.read_text())
    assert match
    return match.group(1)


def keygen(name: str, algorithm: str = "hmac-sha256") -> str:
    return subprocess.run(
        [TSIG_KEYGEN, "-a", algorithm, name], capture_output=True, check=True, text=True
    ).stdout


# --- updates -------------------------------------------------------------------------------


def test_add_and_delete_txt(bind: Bind) -> None:
    u = updater(bind)
    fqdn = u.challenge_fqdn("add.a.test")
    assert fqdn == "_acme-challenge.add.a.test"
    assert u.find_zone(fqdn) == "a.test"
    u.add_txt(fqdn, "value-one")
    assert bind.txt(fqdn) == {"value-one"}
    ttl = bind.query(fqdn, "TXT").answer[0].ttl
    assert ttl == 60
    u.delete_txt(fqdn + ".", "value-one")  # trailing dot accepted
    assert bind.txt(fqdn) == set()
    u.delete_txt(fqdn, "value-one")  # deleting what is not there is fine


def test_apex_and_wildcard_values_coexist(bind: Bind) -> None:
    u = updater(bind, ttl=120)
    fqdn = u.challenge_fqdn("two.a.test")
    assert u.challenge_fqdn("*.two.a.test") == fqdn
    assert u.challenge_fqdn("TWO.A.TEST.") == fqdn
    u.add_txt(fqdn, "apex-value")
    u.add_txt(fqdn, "wildcard-value")
    assert bind.txt(fqdn) == {"apex-value", "wildcard-value"}
    assert bind.query(fqdn, "TXT").answer[0].ttl == 120
    u.delete_txt(fqdn, "apex-value")
    assert bind.txt(fqdn) == {"wildcard-value"}
    u.delete_txt(fqdn, "wildcard-value")
    assert bind.txt(fqdn) == set()


def test_long_value_is_split_and_rejoined(bind: Bind) -> None:
    u = updater(bind)
    fqdn = u.challenge_fqdn("long-value.a.test")
    value = "x" * 300
    u.add_txt(fqdn, value)
    assert bind.txt(fqdn) == {value}
    u.wait_propagated(fqdn, [value])
    u.delete_txt(fqdn, value)
    assert bind.txt(fqdn) == set()


def test_explicit_zone_setting(bind: Bind) -> None:
    u = updater(bind, zone="a.test.")
    fqdn = u.challenge_fqdn("zoned.a.test")
    assert u.find_zone(fqdn) == "a.test"
    u.add_txt(fqdn, "v")
    assert bind.txt(fqdn) == {"v"}
    u.delete_txt(fqdn, "v")
    with pytest.raises(DnsError) as err:
        u.find_zone("_acme-challenge.x.b.test")
    assert err.value.name == "_acme-challenge.x.b.test"
    assert "acme.dns.zone" in err.value.message


# --- propagation ---------------------------------------------------------------------------


def test_wait_propagated_after_add(bind: Bind) -> None:
    u = updater(bind)
    fqdn = u.challenge_fqdn("prop.a.test")
    u.add_txt(fqdn, "p1")
    u.add_txt(fqdn, "p2")
    started = time.monotonic()
    u.wait_propagated(fqdn, ["p1", "p2"])
    assert time.monotonic() - started < 1.0
    u.delete_txt(fqdn, "p1")
    u.delete_txt(fqdn, "p2")


def test_wait_propagated_times_out_naming_the_nameserver(bind: Bind) -> None:
    u = updater(bind, propagation_timeout=0.3)
    fqdn = u.challenge_fqdn("absent.a.test")
    started = time.monotonic()
    with pytest.raises(DnsError) as err:
        u.wait_propagated(fqdn, ["never-added"])
    assert 0.3 <= time.monotonic() - started < 2.0
    text = str(err.value)
    assert text.startswith(f"{fqdn}: ")
    assert f"ns1.a.test (127.0.0.1:{bind.port})" in text
    assert "zone a.test" in text
    assert "propagation_timeout" in text


def test_wait_propagated_partial_values_with_injected_clock(bind: Bind) -> None:
    u = updater(bind, propagation_timeout=10.0)
    u.poll_interval = 2.0
    fqdn = u.challenge_fqdn("partial.a.test")
    u.add_txt(fqdn, "here")
    now = [100.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    with pytest.raises(DnsError) as err:
        u.wait_propagated(fqdn, ["here", "missing"], clock=lambda: now[0], sleep=sleep)
    assert sleeps == [2.0] * 5
    assert "has 1 of 2 values" in str(err.value)
    sleeps.clear()
    u.wait_propagated(fqdn, ["here"], clock=lambda: now[0], sleep=sleep)
    assert sleeps == []
    u.delete_txt(fqdn, "here")


@contextlib.contextmanager
def udp_relay(upstream: int | None, drop: Collection[str] = ()) -> Iterator[int]:
    """A DNS-over-UDP relay on loopback: passes queries on to 127.0.0.1:`upstream` and the
    answers back, except queries of the types in `drop` (and every query when `upstream` is
    None), which it reads and never answers: a resolver that does not answer them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.05)
    stop = threading.Event()

    def relay() -> None:
        while not stop.is_set():
            try:
                data, client = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            query = dns.message.from_wire(data)
            if upstream is None or dns.rdatatype.to_text(query.question[0].rdtype) in drop:
                continue
            with contextlib.suppress(OSError, dns.exception.DNSException):
                answer = dns.query.udp(query, "127.0.0.1", port=upstream, timeout=2.0)
                sock.sendto(answer.to_wire(), client)

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        sock.close()


@pytest.mark.parametrize("zone", ["", "a.test"])
def test_wait_propagated_timeout_covers_a_resolver_that_does_not_answer(
    bind: Bind, zone: str
) -> None:
    """propagation_timeout bounds the whole wait: the SOA lookup finding the zone (zone "")
    or the NS lookup (zone set) through a resolver that never answers ends with it, though
    each lookup alone may take the resolver's 5 s."""
    with udp_relay(None) as port:
        resolver = Address("127.0.0.1", port)
        settings = bind.settings(resolver=resolver, propagation_timeout=1.0, zone=zone)
        u = DnsUpdater(settings, load_tsig_key(settings), timeout=5.0, poll_interval=0.05)
        fqdn = "_acme-challenge.late.a.test"
        started = time.monotonic()
        with pytest.raises(DnsError) as err:
            u.wait_propagated(fqdn, ["v"])
        assert time.monotonic() - started < 1.0 + 1.0
    assert err.value.name == fqdn
    text = err.value.message
    assert "acme.dns.propagation_timeout (1s) ran out while looking up" in text
    if zone:
        assert "the nameservers of zone a.test: the NS lookup of a.test" in text
    else:
        assert f"the zone of {fqdn}: the SOA lookup of {fqdn}" in text
    assert f"via resolver 127.0.0.1:{port} did not answer in time" in text
    assert "check that acme.dns.resolver answers" in text
    assert "raise acme.dns.propagation_timeout" in text


def test_wait_propagated_timeout_covers_the_nameserver_address_lookups(bind: Bind) -> None:
    """The zone and its NS records are found, but the addresses of the nameservers (A and
    AAAA lookups, one after the other, for each) never come: the wait still ends with
    propagation_timeout and names the lookup that did not answer."""
    with udp_relay(bind.port, drop={"A", "AAAA"}) as port:
        settings = bind.settings(resolver=Address("127.0.0.1", port), propagation_timeout=1.0)
        u = DnsUpdater(settings, load_tsig_key(settings), timeout=5.0, poll_interval=0.05)
        fqdn = "_acme-challenge.late.a.test"
        started = time.monotonic()
        with pytest.raises(DnsError) as err:
            u.wait_propagated(fqdn, ["v"])
        assert time.monotonic() - started < 1.0 + 1.0
    text = err.value.message
    assert "ran out while looking up the nameservers of zone a.test" in text
    assert "the A lookup of ns1.a.test" in text


def test_wait_propagated_with_no_time_left_for_a_lookup(bind: Bind) -> None:
    """A lookup that would start after the deadline is not sent: the error says no time was
    left for it (the clock jumps past the deadline right after the wait began)."""
    u = updater(bind, propagation_timeout=1.0, zone="a.test")
    times = itertools.chain([100.0], itertools.repeat(105.0))
    with pytest.raises(DnsError) as err:
        u.wait_propagated("_acme-challenge.late.a.test", ["v"], clock=lambda: next(times))
    assert "no time was left for the NS lookup of a.test via resolver" in err.value.message
    assert "(the lookups before it were slow)" in err.value.message


def test_wait_propagated_through_delegation(bind: Bind) -> None:
    u = updater(bind, delegate_to="acme.test")
    fqdn = u.challenge_fqdn("deleg.a.test")
    u.add_txt(fqdn, "delegated")
    u.wait_propagated(fqdn, ["delegated"])
    u.delete_txt(fqdn, "delegated")


def test_delegate_to_inside_a_zone(bind: Bind) -> None:
    """delegate_to need not be a zone apex: `acme.b.test` is a name inside zone b.test, where
    the TXT goes (an update for "zone acme.b.test" would be NOTAUTH)."""
    for extra in ({}, {"zone": "b.test"}):
        u = updater(bind, delegate_to="acme.b.test", **extra)
        fqdn = u.challenge_fqdn("*.inzone.a.test")
        assert fqdn == "inzone.a.test.acme.b.test"
        assert u.find_zone(fqdn) == "b.test"
        u.add_txt(fqdn, "in-b")
        assert bind.txt(fqdn) == {"in-b"}
        u.wait_propagated(fqdn, ["in-b"])
        u.delete_txt(fqdn, "in-b")
        assert bind.txt(fqdn) == set()
        assert "in zone b.test" in u.check_permission("inzone.a.test")


# --- TSIG failures -------------------------------------------------------------------------


def test_wrong_tsig_secret_names_the_key_not_the_secret(bind: Bind, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.key"
    wrong.write_text(keygen("edged"))
    wrong_secret = re.search(r'secret "([^"]+)"', wrong.read_text())
    assert wrong_secret
    u = updater(bind, tsig_secret_file=wrong)
    fqdn = u.challenge_fqdn("badsig.a.test")
    with pytest.raises(DnsError) as err:
        u.add_txt(fqdn, "v")
    text = str(err.value)
    assert "BADSIG" in text
    assert "'edged'" in text
    assert str(wrong) in text
    assert wrong_secret.group(1) not in text
    assert secret_of(bind) not in text
    assert bind.txt(fqdn) == set()


def test_wrong_tsig_key_name(bind: Bind, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    other.write_text(f'key "other" {{ algorithm hmac-sha256; secret "{secret_of(bind)}"; }};\n')
    u = updater(bind, tsig_key_name="other", tsig_secret_file=other)
    with pytest.raises(DnsError) as err:
        u.add_txt("_acme-challenge.badkey.a.test", "v")
    text = str(err.value)
    assert "BADKEY" in text
    assert "'other'" in text
    assert "acme.dns.tsig_key_name" in text
    assert secret_of(bind) not in text


def test_wrong_tsig_algorithm(bind: Bind, tmp_path: Path) -> None:
    key_file = tmp_path / "sha512.key"
    key_file.write_text(secret_of(bind) + "\n")  # bare secret: the algorithm comes from settings
    u = updater(bind, tsig_algorithm="hmac-sha512", tsig_secret_file=key_file)
    with pytest.raises(DnsError, match=r"hmac-sha512 \(BADKEY\)"):
        u.add_txt("_acme-challenge.badalg.a.test", "v")


def test_check_permission(bind: Bind, tmp_path: Path) -> None:
    summary = updater(bind).check_permission("perm.a.test")
    assert "_acme-challenge.perm.a.test" in summary
    assert "zone a.test" in summary
    assert "\n" not in summary
    assert bind.txt("_acme-challenge.perm.a.test") == set()

    summary = updater(bind, delegate_to="acme.test").check_permission("*.deleg.a.test")
    assert "deleg.a.test.acme.test" in summary
    assert "CNAME from _acme-challenge.deleg.a.test" in summary
    assert bind.txt("deleg.a.test.acme.test") == set()

    wrong = tmp_path / "wrong.key"
    wrong.write_text(keygen("edged"))
    with pytest.raises(DnsError, match="BADSIG"):
        updater(bind, tsig_secret_file=wrong).check_permission("perm.a.test")
    with pytest.raises(DnsError, match="CNAME"):
        updater(bind, delegate_to="acme.test").check_permission("perm.a.test")


# --- zones ---------------------------------------------------------------------------------


def test_unknown_zone(bind: Bind) -> None:
    u = updater(bind)
    with pytest.raises(DnsError) as err:
        u.find_zone("_acme-challenge.www.nowhere.example")
    assert err.value.name == "_acme-challenge.www.nowhere.example"
    assert "no DNS zone found" in err.value.message
    assert f"127.0.0.1:{bind.port}" in err.value.message
    with pytest.raises(DnsError, match="no DNS zone found"):
        u.add_txt("_acme-challenge.www.nowhere.example", "v")


def test_a_zone_that_does_not_answer_is_not_skipped_for_its_parent(tmp_path: Path) -> None:
    """sub.a.test is served but its zone did not load (named answers SERVFAIL): climbing on to
    a.test would send the update to a zone that does not hold the name (NOTAUTH, naming the
    wrong zone). The error names the lookup that failed and the fix."""
    zones = {"a.test": "", "sub.a.test": "broken IN A not-an-address"}
    with start_bind(tmp_path, zones) as named:
        u = updater(named)
        assert u.find_zone("_acme-challenge.www.a.test") == "a.test"
        with pytest.raises(DnsError) as err:
            u.find_zone("_acme-challenge.www.sub.a.test")
        text = err.value.message
        assert "the SOA lookup for _acme-challenge.www.sub.a.test" in text
        assert "sub.a.test failed" in text and "SERVFAIL" in text
        assert "zone a.test found above is not known to hold the name" in text
        assert "set acme.dns.zone" in text
        assert u.find_zone("_acme-challenge.x.a.test") == "a.test"  # the rest still works


def test_server_not_authoritative_for_zone(bind: Bind) -> None:
    u = updater(bind, zone="nozone.test")
    with pytest.raises(DnsError) as err:
        u.add_txt("_acme-challenge.x.nozone.test", "v")
    assert "NOTAUTH" in err.value.message
    assert "primary" in err.value.message
    assert str(bind.address) in err.value.message


def test_update_refused_mentions_update_policy(bind: Bind) -> None:
    u = updater(bind)
    with pytest.raises(DnsError) as err:
        u.add_txt("_acme-challenge.x.locked.test", "v")
    assert "REFUSED" in err.value.message
    assert "update-policy" in err.value.message
    assert "zone locked.test" in err.value.message


def test_unreachable_server(bind: Bind) -> None:
    u = updater(bind, server=Address("127.0.0.1", 1))
    with pytest.raises(DnsError) as err:
        u.add_txt("_acme-challenge.x.a.test", "v")
    assert "DNS server 127.0.0.1:1" in err.value.message
    assert "acme.dns.server" in err.value.message


# --- CNAME delegation ----------------------------------------------------------------------


def test_cname_delegation_is_followed(bind: Bind) -> None:
    u = updater(bind, delegate_to="acme.test")
    fqdn = u.challenge_fqdn("deleg.a.test")
    assert fqdn == "deleg.a.test.acme.test"
    assert u.challenge_fqdn("*.deleg.a.test") == fqdn
    assert u.find_zone(fqdn) == "acme.test"
    u.add_txt(fqdn, "in-delegate")
    assert bind.txt(fqdn) == {"in-delegate"}
    # What the CA sees: the CNAME at the original name, then the TXT in the delegate zone.
    cname = bind.query("_acme-challenge.deleg.a.test", "CNAME").answer
    assert [rd.target.to_text() for rd in cname[0]] == [fqdn + "."]
    u.delete_txt(fqdn, "in-delegate")
    assert bind.txt(fqdn) == set()


def test_cname_chain_followed_without_delegate_to(bind: Bind) -> None:
    u = updater(bind)
    assert u.challenge_fqdn("hops.a.test") == "hops.a.test.acme.test"
    assert u.challenge_fqdn("deleg.a.test") == "deleg.a.test.acme.test"


def test_delegate_to_without_cname_says_which_cname_to_add(bind: Bind) -> None:
    u = updater(bind, delegate_to="acme.test.")
    with pytest.raises(DnsError) as err:
        u.challenge_fqdn("*.nocname.a.test")
    assert err.value.name == "_acme-challenge.nocname.a.test"
    assert "`_acme-challenge.nocname.a.test. CNAME nocname.a.test.acme.test.`" in str(err.value)
    with pytest.raises(DnsError) as err:
        u.challenge_fqdn("elsewhere.a.test")
    assert "_acme-challenge.elsewhere.b.test" in err.value.message
    assert "CNAME elsewhere.a.test.acme.test." in err.value.message


def test_cname_loop(bind: Bind) -> None:
    with pytest.raises(DnsError) as err:
        updater(bind).challenge_fqdn("loop1.a.test")
    assert "CNAME loop" in err.value.message
    assert "_acme-challenge.loop2.a.test" in err.value.message


def test_cname_chain_too_long(bind: Bind) -> None:
    with pytest.raises(DnsError, match="CNAME chain longer than"):
        updater(bind).challenge_fqdn("long.a.test")


def test_invalid_name() -> None:
    u = DnsUpdater(DnsSettings(resolver=Address("127.0.0.1", 1)), TsigKey("k", "hmac-sha256", b"s"))
    with pytest.raises(DnsError):
        u.challenge_fqdn("bad_name!.a.test")
    with pytest.raises(DnsError):
        u.find_zone("")


# --- TSIG key files ------------------------------------------------------------------------


def test_parse_tsig_secret_from_tsig_keygen_output() -> None:
    text = keygen("other") + keygen("edged")
    secret = re.findall(r'secret "([^"]+)"', text)[1]
    assert parse_tsig_secret(text, "edged", "k.conf") == base64.b64decode(secret)
    assert parse_tsig_secret(text, "edged.", "k.conf") == base64.b64decode(secret)
    unquoted = f'# comment\nkey edged {{\n  algorithm hmac-sha256;\n  secret "{secret}";\n}};'
    assert parse_tsig_secret(unquoted, "edged", "k.conf") == base64.b64decode(secret)


def test_parse_tsig_secret_bare_base64() -> None:
    raw = bytes(range(32))
    assert parse_tsig_secret(base64.b64encode(raw).decode() + "\n", "edged", "k") == raw


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not a key at all",
        "c2VjcmV0===",
        'key edged { algorithm hmac-sha256; secret "!!notbase64!!"; };',
        'key "edged" { algorithm hmac-sha256; };',
        "key edged {",
    ],
)
def test_parse_tsig_secret_rejects_garbage(text: str) -> None:
    with pytest.raises(DnsError) as err:
        parse_tsig_secret(text, "edged", "/etc/edged/tsig.key")
    assert err.value.name == "/etc/edged/tsig.key"
    assert str(err.value).startswith("/etc/edged/tsig.key: ")


def test_parse_tsig_secret_missing_key_name() -> None:
    text = keygen("other")
    secret = re.findall(r'secret "([^"]+)"', text)[0]
    with pytest.raises(DnsError) as err:
        parse_tsig_secret(text, "edged", "k.conf")
    assert 'no TSIG key named "edged"' in err.value.message
    assert '"other"' in err.value.message
    assert secret not in str(err.value)


def test_load_tsig_key(tmp_path: Path) -> None:
    path = tmp_path / "tsig.key"
    path.write_text(keygen("edged", "hmac-sha512"))
    key = load_tsig_key(DnsSettings(tsig_algorithm="hmac-sha512", tsig_secret_file=path))
    assert key.name == "edged"
    assert key.algorithm == "hmac-sha512"
    assert len(key.secret) == 64
    assert repr(key.secret) not in repr(key)
    with pytest.raises(DnsError, match=r"hmac-sha512 but acme\.dns\.tsig_algorithm is hmac-sha256"):
        load_tsig_key(DnsSettings(tsig_secret_file=path))
    with pytest.raises(DnsError, match="cannot read the TSIG secret file"):
        load_tsig_key(DnsSettings(tsig_secret_file=tmp_path / "missing"))
    with pytest.raises(DnsError, match=r"^acme\.dns\.tsig_secret_file: is not set"):
        load_tsig_key(DnsSettings())


def test_build_resolver_uses_settings() -> None:
    resolver = build_resolver(DnsSettings(resolver=Address("127.0.0.1", 5353)), timeout=1.5)
    assert [str(ns) for ns in resolver.nameservers] == ["127.0.0.1"]
    assert resolver.port == 5353
    assert resolver.lifetime == 1.5


# --- CAA -----------------------------------------------------------------------------------


def caa(named: Bind, name: str, *cas: str) -> CaaResult:
    return check_caa(name, cas or (PEBBLE,), build_resolver(named.settings(), timeout=2.0))


def test_caa_absent_allows_any_ca(caa_bind: Bind) -> None:
    result = caa(caa_bind, "www.nocaa.test")
    assert result.allowed
    assert result.owner == ""
    assert result.records == ()
    assert "no CAA" in result.describe()
    only_iodef = caa(caa_bind, "iodef-only.nocaa.test")
    assert only_iodef.allowed
    assert only_iodef.owner == "iodef-only.nocaa.test"


def test_caa_issue_allows_named_ca_and_blocks_others(caa_bind: Bind) -> None:
    ok = caa(caa_bind, "le.test.")
    assert ok.allowed
    assert ok.owner == "le.test"
    assert ok.records == (f'0 issue "{PEBBLE}"',)
    blocked = caa(caa_bind, "le.test", "sectigo.com")
    assert not blocked.allowed
    assert blocked.blocking == f'0 issue "{PEBBLE}"'
    described = blocked.describe()
    assert "le.test" in described
    assert f'0 issue "{PEBBLE}"' in described
    assert 'CAA 0 issue "sectigo.com"' in described
    # Without a method or an account to check, RFC 8657 parameters cannot refuse.
    assert caa(caa_bind, "params.le.test").allowed


def test_caa_parameters_of_rfc_8657_refuse_what_the_ca_would(caa_bind: Bind) -> None:
    """validationmethods and accounturi are enforced by CAs (Let's Encrypt): a record that
    names the CA but not this order's challenge or account does not allow it."""
    resolver = build_resolver(caa_bind.settings(), timeout=2.0)

    def check(name: str, method: str, account: str | None = None) -> CaaResult:
        return check_caa(name, (PEBBLE,), resolver, method=method, account_uri=account)

    assert check("params.le.test", "dns-01").allowed
    refused = check("params.le.test", "http-01")
    assert not refused.allowed
    text = refused.describe()
    assert "limits validation to dns-01, not http-01" in text, text
    assert "set acme.challenge to one of them, or add http-01 to validationmethods" in text
    assert check("acct.le.test", "http-01", "https://ca.test/acct/1").allowed
    assert check("acct.le.test", "http-01", None).allowed  # no account yet: not held against
    other = check("acct.le.test", "http-01", "https://ca.test/acct/2")
    assert not other.allowed and "allows only the ACME account" in other.describe()
    # Any one record that allows the order is enough (RFC 8659), spaces around the values.
    assert check("either.le.test", "http-01").allowed
    assert check("either.le.test", "tls-alpn-01").allowed
    assert check("either.le.test", "dns-01").allowed


def test_caa_on_parent_applies_to_child(caa_bind: Bind) -> None:
    child = caa(caa_bind, "deep.sub.le.test")
    assert child.allowed
    assert child.owner == "le.test"
    own = caa(caa_bind, "own.le.test")
    assert not own.allowed
    assert own.owner == "own.le.test"
    assert own.blocking == '0 issue "other.ca"'


def test_caa_issuewild_for_wildcards(caa_bind: Bind) -> None:
    wild = caa(caa_bind, "*.wild.test")
    assert wild.allowed
    assert wild.name == "*.wild.test"
    apex = caa(caa_bind, "wild.test")
    assert not apex.allowed
    assert apex.blocking == '0 issue "other.ca"'
    other = caa(caa_bind, "*.wild.test", "other.ca")
    assert not other.allowed
    assert other.blocking == f'0 issuewild "{PEBBLE}"'
    assert "issuewild" in other.describe()
    assert caa(caa_bind, "*.le.test").allowed  # no issuewild: issue applies


def test_caa_empty_issue_forbids_all(caa_bind: Bind) -> None:
    result = caa(caa_bind, "forbid.test")
    assert not result.allowed
    assert result.blocking == '0 issue ";"'


def test_caa_critical_unknown_tag_blocks(caa_bind: Bind) -> None:
    result = caa(caa_bind, "crit.test")
    assert not result.allowed
    assert result.blocking == '128 tbs "unknown"'
    assert caa(caa_bind, "noncrit.test").allowed


def test_caa_follows_cname(caa_bind: Bind) -> None:
    result = caa(caa_bind, "alias.le.test")
    assert not result.allowed  # the CNAME target (b2.test) only lets other.ca issue
    assert result.blocking == '0 issue "other.ca"'
    # The records are the target's, and the fix goes there: no CAA can sit beside a CNAME.
    assert result.owner == "b2.test"
    assert result.via == "alias.le.test"
    text = result.describe()
    assert "CAA at b2.test (the CNAME target of alias.le.test) forbids" in text, text
    assert f'add `b2.test. CAA 0 issue "{PEBBLE}"`' in text, text
    assert "alias.le.test. CAA" not in text
    assert "b2.test (the CNAME target of alias.le.test) allows other.ca" in (
        caa(caa_bind, "alias.le.test", "other.ca").describe()
    )
    # RFC 8659: no CAA at the target, so the climb continues from the alias's parent.
    result = caa(caa_bind, "alias-empty.le.test")
    assert result.allowed
    assert result.owner == "le.test"


def test_caa_lookup_failure_is_an_error(caa_bind: Bind) -> None:
    resolver = build_resolver(caa_bind.settings(resolver=Address("127.0.0.1", 1)), timeout=0.3)
    with pytest.raises(DnsError) as err:
        check_caa("le.test", [PEBBLE], resolver)
    assert "CAA lookup" in err.value.message
    assert "acme.dns.resolver" in err.value.message
