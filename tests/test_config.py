"""Config parsing: every problem is reported with file, key and a fix."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from edged.config import (
    AcmeSettings,
    Address,
    DnsSettings,
    EdgedSettings,
    ListenSettings,
    Site,
    TlsSettings,
    load_config,
    parse_address,
    parse_config,
)
from edged.errors import ConfigError

SRC = Path("/etc/edged/edged.toml")

MINIMAL = """
[listen]
https = ["127.0.0.1:8443"]

[[site]]
names = ["Example.COM.", "*.example.com"]
backend = "127.0.0.1:8080"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    return [str(p) for p in info.value.problems]


def test_minimal_config_defaults_and_normalisation() -> None:
    config = parse_config(MINIMAL, SRC)
    assert config.listen.https == (Address("127.0.0.1", 8443),)
    site = config.sites[0]
    assert site.names == ("example.com", "*.example.com")
    assert site.backend == Address("127.0.0.1", 8080)
    assert config.tls.min_version == "1.2"
    assert config.tls.alpn == ("h2", "http/1.1")
    assert config.store_path == Path("/etc/edged/certs")
    assert config.acme is None


def test_example_config_in_repo_parses() -> None:
    root = Path(__file__).resolve().parent.parent
    for name in ("edged.toml", "demo.toml"):
        path = root / "config" / name
        config = parse_config(path.read_text(), path)
        assert config.sites


def test_example_config_names_every_key() -> None:
    """config/edged.toml is where the unknown-key error sends the operator ("check its
    spelling against config/edged.toml") and, says the README, a commented example of every
    key: each key the parser reads is in it, set or commented out. The Redis keys and a
    site's own alpn were missing."""
    root = Path(__file__).resolve().parent.parent
    text = (root / "config" / "edged.toml").read_text()
    written = set(re.findall(r"^#?\s*([a-z_0-9]+)\s*=", text, re.MULTILINE))
    tables = (EdgedSettings, ListenSettings, TlsSettings, AcmeSettings, DnsSettings, Site)
    keys = {f.name for table in tables for f in dataclasses.fields(table)}
    keys -= {"index", "dns"}  # a site's position, and the [acme.dns] table
    assert sorted(keys - written) == []


def test_unknown_keys_are_named_with_their_table() -> None:
    text = MINIMAL + '\n[tls]\nmin_versoin = "1.3"\n'
    assert problems(text) == [
        f"{SRC}: tls.min_versoin: unknown key: check its spelling against config/edged.toml"
    ]


def test_unknown_key_in_site_and_top_level() -> None:
    text = MINIMAL.replace('backend = "127.0.0.1:8080"', 'backend = "127.0.0.1:8080"\nbakend = 1')
    text += "\n[bogus]\nx = 1\n"
    found = problems(text)
    assert any("site[0].bakend: unknown key" in p for p in found)
    assert any(": bogus: unknown key" in p for p in found)


def test_wrong_types_say_what_was_expected() -> None:
    text = MINIMAL + '\n[edged]\nworkers = "two"\nmax_connections = true\n'
    found = problems(text)
    assert f"{SRC}: edged.workers: must be an integer, got a string 'two'" in found
    assert any("edged.max_connections: must be an integer, got a boolean" in p for p in found)


def test_every_problem_is_reported_not_only_the_first() -> None:
    text = """
[listen]
https = ["localhost:443", "1.2.3.4:99999"]
[tls]
min_version = "1.1"
handshake_timeout = -1
[[site]]
names = ["ok.example.com", "bad_name.example.com"]
backend = "nohost"
"""
    found = problems(text)
    assert len(found) >= 5
    joined = "\n".join(found)
    assert "listen.https: 'localhost:443': a listen address needs an IP" in joined
    assert "port must be a number from 1 to 65535" in joined
    assert "tls.min_version: '1.1' is not one of '1.2', '1.3'" in joined
    assert "tls.handshake_timeout: must be > 0" in joined
    assert "site[0].names: 'bad_name.example.com': label 'bad_name'" in joined
    assert "site[0].backend: 'nohost': expected host:port" in joined


def test_duplicate_names_across_sites() -> None:
    text = MINIMAL + '\n[[site]]\nnames = ["example.com"]\nbackend = "127.0.0.1:9"\n'
    assert problems(text) == [
        f"{SRC}: site[1].names: 'example.com' is already in site[0]: a name belongs to one site"
    ]


def test_cert_file_needs_key_file_and_default_cert_must_exist() -> None:
    text = MINIMAL.replace(
        'backend = "127.0.0.1:8080"', 'backend = "127.0.0.1:8080"\ncert_file = "a.pem"'
    )
    text += '\n[tls]\ndefault_cert = "other.example.com"\n'
    found = problems(text)
    assert any("cert_file and key_file go together" in p for p in found)
    assert any(
        "tls.default_cert: 'other.example.com' is not a name of any [[site]]" in p for p in found
    )


def test_wildcard_rules() -> None:
    found = problems(MINIMAL.replace('"*.example.com"', '"*.com", "a.*.example.com"'))
    assert any("'*.com': a wildcard needs at least two labels" in p for p in found)
    assert any("'a.*.example.com': label '*'" in p for p in found)


def test_admin_must_be_loopback_or_unix() -> None:
    found = problems(
        MINIMAL.replace(
            'https = ["127.0.0.1:8443"]', 'https = ["127.0.0.1:8443"]\nadmin = "0.0.0.0:9465"'
        )
    )
    assert found == [
        f"{SRC}: listen.admin: 0.0.0.0:9465 is not loopback: use unix:/path or 127.0.0.1:PORT"
    ]


def test_not_toml() -> None:
    [message] = problems("[edged\nstore=")
    assert message.startswith(f"{SRC}: not valid TOML:")


def test_relative_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'backend = "127.0.0.1:8080"',
        'backend = "127.0.0.1:8080"\ncert_file = "c/full.pem"\nkey_file = "/abs/key.pem"',
    )
    config = parse_config(text, tmp_path / "edged.toml")
    assert config.sites[0].cert_file == tmp_path / "c/full.pem"
    assert config.sites[0].key_file == Path("/abs/key.pem")


def test_load_config_reports_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "edged.toml"
    path.write_text(
        MINIMAL.replace(
            'backend = "127.0.0.1:8080"',
            'backend = "127.0.0.1:8080"\ncert_file = "full.pem"\nkey_file = "key.pem"',
        )
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    found = [str(p) for p in info.value.problems]
    assert found == [
        f"{path}: site[0].cert_file: {tmp_path}/full.pem: no such file: check the path",
        f"{path}: site[0].key_file: {tmp_path}/key.pem: no such file: check the path",
    ]


def test_a_directory_named_as_a_file_is_called_a_directory(tmp_path: Path) -> None:
    """cert_file naming the directory that holds the PEM files (a common slip) was reported
    as "no such file", which sends the operator after a path that exists."""
    (tmp_path / "example.com").mkdir()
    (tmp_path / "key.pem").write_text("k")
    path = tmp_path / "edged.toml"
    path.write_text(
        MINIMAL.replace(
            'backend = "127.0.0.1:8080"',
            'backend = "127.0.0.1:8080"\ncert_file = "example.com"\nkey_file = "key.pem"',
        )
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}: site[0].cert_file: {tmp_path}/example.com: is a directory: name the file in it"
    ]


def test_a_value_of_the_wrong_type_is_not_also_called_missing() -> None:
    """names = "a.test", backend = 5 or https = ["1.2.3.4"] were each reported twice: the
    real problem, then "needs at least one" / "needs a backend", which they do have."""
    text = MINIMAL.replace('["127.0.0.1:8443"]', '["1.2.3.4"]')
    text = text.replace('names = ["Example.COM.", "*.example.com"]', 'names = "a.test"')
    text = text.replace('backend = "127.0.0.1:8080"', "backend = 5")
    assert problems(text) == [
        f"{SRC}: listen.https: '1.2.3.4': expected host:port (e.g. 127.0.0.1:8080)",
        f"{SRC}: site[0].names: must be a list of DNS names, got a string 'a.test'",
        f"{SRC}: site[0].backend: must be host:port or unix:/path, got an integer 5",
    ]
    # Missing or empty still says what is needed.
    text = MINIMAL.replace('["127.0.0.1:8443"]', "[]").replace(
        'names = ["Example.COM.", "*.example.com"]', "names = []"
    )
    assert problems(text.replace('backend = "127.0.0.1:8080"', 'backend = ""')) == [
        f"{SRC}: site[0].names: a site needs at least one name, e.g. names = ['example.com']",
        f"{SRC}: site[0].backend: a site needs a backend, e.g. backend = '127.0.0.1:8080'",
        f"{SRC}: listen.https: needs at least one address, e.g. 0.0.0.0:443",
    ]


def test_load_config_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert "no such file: pass --config PATH" in str(info.value)


def test_acme_section_and_durations() -> None:
    text = (
        MINIMAL
        + """
[acme]
directory = "https://localhost:14000/dir"
email = "ops@example.com"
challenge = "dns-01"
retry_interval = "15m"
key_types = ["ecdsa-p256", "rsa-2048"]
[acme.dns]
server = "127.0.0.1:5353"
tsig_secret_file = "tsig.key"
"""
    )
    config = parse_config(text, SRC)
    assert config.acme is not None
    assert config.acme.retry_interval == 900.0
    assert config.acme.key_types == ("ecdsa-p256", "rsa-2048")
    assert config.acme.dns is not None
    assert config.acme.dns.server == Address("127.0.0.1", 5353)
    assert config.acme.dns.tsig_secret_file == Path("/etc/edged/tsig.key")


def test_acme_bad_values() -> None:
    text = (
        MINIMAL
        + """
[acme]
directory = "http://insecure/dir"
challenge = "dns-01"
retry_interval = "soon"
key_types = ["dsa"]
"""
    )
    joined = "\n".join(problems(text))
    assert (
        "acme.directory: 'http://insecure/dir': the ACME directory must be an https:// URL"
        in joined
    )
    assert "acme.retry_interval: must be a duration like '15m'" in joined
    assert "acme.key_types: 'dsa' is not one of" in joined
    assert "acme.challenge: dns-01 needs an [acme.dns] table" in joined


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:443", Address("127.0.0.1", 443)),
        ("[::1]:8443", Address("::1", 8443)),
        ("unix:/run/cache.sock", Address(path="/run/cache.sock")),
        ("Origin.Example.NET:443", Address("origin.example.net", 443)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text, listen=False) == expected


@pytest.mark.parametrize("text", ["unix:relative.sock", "[::1]443", ":443", "host:0", "a b:1"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text, listen=False)


def test_workers_and_ticket_key_rotation() -> None:
    config = parse_config("[edged]\nworkers = 0\n" + MINIMAL, SRC)
    assert config.edged.workers == 0  # one per core
    assert config.tls.ticket_key_rotation == 86400.0  # daily by default
    for text, seconds in (('"6h"', 21600.0), ("0", 0.0), ('"0s"', 0.0)):
        config = parse_config(MINIMAL + f"[tls]\nticket_key_rotation = {text}\n", SRC)
        assert config.tls.ticket_key_rotation == seconds
    with pytest.raises(ConfigError) as info:
        parse_config(MINIMAL + '[tls]\nticket_key_rotation = "daily"\n', SRC)
    assert "tls.ticket_key_rotation: must be a duration like '15m'" in str(info.value)
    assert "or 0 (off)" in str(info.value)


def test_preread_off_refused_where_the_clienthello_is_needed() -> None:
    config = parse_config(MINIMAL + "[tls]\npreread = false\n", SRC)
    assert config.tls.preread is False
    text = (
        "[tls]\npreread = false\n"
        + MINIMAL
        + '[[site]]\nnames = ["pass.example.com"]\nbackend = "127.0.0.1:9443"\n'
        + 'mode = "passthrough"\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    message = str(info.value)
    assert "tls.preread: false, but site[1] (mode = passthrough) need" in message
    assert "remove preread = false" in message


def test_backend_connect() -> None:
    assert parse_config(MINIMAL, SRC).sites[0].backend_connect == "first_data"
    text = MINIMAL + 'backend_connect = "handshake"\n'
    assert parse_config(text, SRC).sites[0].backend_connect == "handshake"
    assert problems(MINIMAL + 'backend_connect = "eager"\n') == [
        f"{SRC}: site[0].backend_connect: 'eager' is not one of 'first_data', 'handshake'"
    ]


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://redis.internal:abc/0", "Port could not be cast to integer"),
        ("redis://redis.internal:70000/0", "Port out of range"),
        ("redis://[::1/0", "Invalid IPv6 URL"),
        ("redis://redis.internal:6379/0?bogus=1", "unknown option 'bogus'"),
        ("redis://redis.internal:6379/0?socket_timeout=soon", "socket_timeout"),
        ("rediss://redis.internal/0?ssl_cert_reqs=bogus", "Certificate Requirements"),
        ("redis://redis.internal:6379/fleet", "'/fleet' is not a database number"),
    ],
)
def test_redis_url_typos_are_config_errors(url: str, says: str) -> None:
    # redis-py would raise these at start or reload; `edged check` must find them first.
    (message,) = problems(f'[edged]\nstore = "{url}"\n' + MINIMAL)
    assert message.startswith(f"{SRC}: edged.store: ")
    assert says in message
    assert "redis://[user:password@]host:port/db" in message  # the fix


def test_redis_url_problems_never_show_its_password() -> None:
    for url in ("redis://edged:s3cret@redis.internal:abc/0", "redis://h:1/0?password=s3cret&x=1"):
        (message,) = problems(f'[edged]\nstore = "{url}"\n' + MINIMAL)
        assert "s3cret" not in message and "***" in message
    (message,) = problems('[edged]\nstore = "http://u:s3cret@h/0"\n' + MINIMAL)
    assert "s3cret" not in message


def test_good_redis_urls_pass() -> None:
    for url in (
        "redis://redis.internal:6379/0",
        "redis://:pw@[::1]:6379/2",
        "rediss://redis.internal/0?ssl_cert_reqs=required",
        "redis://redis.internal",
        "unix:///run/redis.sock?db=1",
    ):
        assert parse_config(f'[edged]\nstore = "{url}"\n' + MINIMAL, SRC).redis_url == url


def test_empty_acme_table_means_acme_with_defaults() -> None:
    # Every [acme] key has a default: writing the table turns ACME on, even with no keys.
    config = parse_config(MINIMAL.replace("*.example.com", "www.example.com") + "[acme]\n", SRC)
    assert config.acme is not None
    assert config.acme.directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert config.acme.challenge == "http-01"


def test_empty_acme_dns_table_is_read_not_called_missing() -> None:
    try:
        parse_config(MINIMAL + '[acme]\nchallenge = "dns-01"\n[acme.dns]\n', SRC)
    except ConfigError as exc:
        assert "needs an [acme.dns] table" not in str(exc)  # it is there, only empty
    text = MINIMAL + '[acme]\nchallenge = "dns-01"\n[acme.dns]\ntsig_secret_file = "tsig.key"\n'
    dns = parse_config(text, SRC).acme.dns  # type: ignore[union-attr]
    assert dns is not None and dns.server == Address("127.0.0.1", 53)


def test_dns01_needs_the_tsig_secret_file() -> None:
    # edged signs every RFC 2136 update with TSIG (edged.dns.load_tsig_key): without the key
    # file every dns-01 attempt would fail, so the config is refused.
    for dns in ("", 'server = "127.0.0.1:5353"\n'):
        found = problems(MINIMAL + f'[acme]\nchallenge = "dns-01"\n[acme.dns]\n{dns}')
        assert len(found) == 1, found
        assert found[0].startswith(f"{SRC}: acme.dns.tsig_secret_file: is not set")
        assert "tsig-keygen -a hmac-sha256 edged" in found[0]
    found = problems(
        MINIMAL
        + '[acme]\nchallenge = "dns-01"\n[acme.dns]\ntsig_secret_file = "k"\ntsig_key_name = " "\n'
    )
    assert found == [f"{SRC}: acme.dns.tsig_key_name: is empty: set it to the TSIG key's name"]
    # Without dns-01 the DNS settings only serve lookups: no key needed.
    text = MINIMAL.replace("*.example.com", "www.example.com")
    assert parse_config(text + '[acme]\n[acme.dns]\nresolver = "127.0.0.1:53"\n', SRC).acme


@pytest.mark.parametrize(
    "url",
    [
        "hooks.example.com/edged",  # no scheme: was accepted, then every notice failed
        "ftp://hooks.example.com/edged",
        "https:///edged",
        "https://hooks.example.com:abc/edged",
        "https://[::1/edged",
    ],
)
def test_notify_webhook_must_be_an_http_url(url: str) -> None:
    found = problems(MINIMAL + f'[acme]\nnotify_webhook = "{url}"\n')
    assert len(found) == 1, found
    assert found[0].startswith(f"{SRC}: acme.notify_webhook: must be an http:// or https:// URL")
    assert "https://hooks.example.com/edged" in found[0]  # the example of the fix


def test_notify_webhook_urls_that_work() -> None:
    text = MINIMAL.replace("*.example.com", "www.example.com")
    for url in ("https://hooks.example.com/edged?t=1", "http://127.0.0.1:8080/x", "http://[::1]/"):
        acme = parse_config(text + f'[acme]\nnotify_webhook = "{url}"\n', SRC).acme
        assert acme is not None and acme.notify_webhook == url
    assert parse_config(text + '[acme]\nnotify_webhook = ""\n', SRC).acme is not None  # off


def test_durations_no_timer_can_take_are_refused() -> None:
    """`inf` (TOML) or '99999999999d' passed, then `now + interval` overflowed at the first
    failed renewal attempt, which the renewal loop could not record."""
    for value in ("inf", '"99999999999d"', '"366d"'):
        found = problems(MINIMAL + f"\n[acme]\nretry_interval = {value}\n")
        assert any("acme.retry_interval" in p and "at most 365d" in p for p in found), found
    assert parse_config(MINIMAL + '\n[tls]\nticket_key_rotation = "365d"\n', SRC)


def test_every_timeout_takes_a_duration_string_like_the_other_durations() -> None:
    """`idle_timeout = "5m"` reads as every duration key does; numbers stay seconds."""
    text = MINIMAL.replace(
        "[listen]",
        '[edged]\nidle_timeout = "5m"\ndrain_timeout = "0s"\n'
        "backend_connect_timeout = 2.5\n[listen]",
    )
    config = parse_config(text + '\n[tls]\nhandshake_timeout = "500ms"\n', SRC)
    assert config.edged.idle_timeout == 300.0
    assert config.edged.drain_timeout == 0.0
    assert config.edged.backend_connect_timeout == 2.5
    assert config.tls.handshake_timeout == 0.5
    for value, expected in (
        ('"5 minutes"', "must be seconds or a duration like '30s', '5m', got '5 minutes'"),
        ('"0"', "must be > 0, got 0.0"),
        ('"366d"', "at most 365d"),
        ("inf", "at most 365d"),
        ("nan", "must be a finite number of seconds"),
    ):
        found = problems(MINIMAL + f"\n[tls]\nhandshake_timeout = {value}\n")
        assert any("tls.handshake_timeout: " in p and expected in p for p in found), found


def test_addresses_that_cannot_work_are_refused_at_parse() -> None:
    long_path = "/run/" + "x" * 120 + ".sock"
    cases = {
        f'backend = "unix:{long_path}"': "at most 107 bytes",
        'backend = "unix:/"': "must be absolute",
        'backend = "unix:/run/a\\u0000b.sock"': "cannot hold a NUL",
        'backend = "::1:8080"': "in brackets",
        'backend = "2001:db8::1:443"': "in brackets",
        'backend = "[127.0.0.1]:8080"': "for IPv6 addresses only",
        'backend = "[example.com]:80"': "for IPv6 addresses only",
        'backend = "127.0.0.1:\\uff18\\uff10"': "port must be a number",  # full-width 80
    }
    for line, expected in cases.items():
        text = MINIMAL.replace('backend = "127.0.0.1:8080"', line)
        found = problems(text)
        assert any(expected in p for p in found), (line, found)
    ok = MINIMAL.replace('backend = "127.0.0.1:8080"', 'backend = "[::1]:8080"')
    assert str(parse_config(ok, SRC).sites[0].backend) == "[::1]:8080"


def test_two_listeners_of_different_keys_on_one_address_are_refused() -> None:
    """They passed `edged check` and then could not bind at start or reload."""
    site = '[[site]]\nnames = ["a.test"]\nbackend = "127.0.0.1:9"\n'
    clashes = {
        'https = ["0.0.0.0:443"]\nhttp = ["0.0.0.0:443"]': "listen.http: 0.0.0.0:443",
        'https = ["127.0.0.1:8443"]\nhttp = ["0.0.0.0:8443"]': "listen.http: 0.0.0.0:8443",
        'https = ["[::]:8443"]\nhttp = ["[::1]:8443"]': "listen.http: [::1]:8443",
        'metrics = "127.0.0.1:9100"\nadmin = "127.0.0.1:9100"': "listen.admin: 127.0.0.1:9100",
        'metrics = "unix:/run/e.sock"\nadmin = "unix:/run/e.sock"': "listen.admin: unix:/run/e",
    }
    for listen, expected in clashes.items():
        found = problems(f"[listen]\n{listen}\n{site}")
        assert any(expected in p and "is also where" in p for p in found), (listen, found)
    fine = '[listen]\nhttps = ["0.0.0.0:443", "[::]:443"]\nhttp = ["0.0.0.0:80"]\n'
    assert parse_config(fine + site, SRC).listen.https


def test_an_empty_store_is_refused_not_replaced_by_the_default() -> None:
    """`store = ""` silently became the default "certs" (a relative directory where edged
    happened to run): it is refused, naming what to put there."""
    found = problems(MINIMAL + '\n[edged]\nstore = ""\n')
    assert any("edged.store: is empty" in p for p in found), found
