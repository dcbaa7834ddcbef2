"""The TOML config: frozen dataclasses, a pure parser that reports every problem, and a loader.

`parse_config(text, source)` is pure: it never touches the disk (relative paths are resolved
against the config file's directory but not opened). `load_config(path)` reads the file and
then checks that every file the config names exists and is readable.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from edged.errors import ConfigError, Problem
from edged.heap import ALLOCATORS
from edged.names import NameError_, normalize_name

DEFAULT_CONFIG_PATH = Path("/etc/edged/edged.toml")
TLS_VERSIONS = ("1.2", "1.3")
PROXY_PROTOCOLS = ("", "v1", "v2")
CHALLENGES = ("http-01", "dns-01", "tls-alpn-01")
HTTP_MODES = ("redirect", "forward")
SITE_MODES = ("terminate", "passthrough")
# When a terminated connection opens its backend connection: at the client's first bytes of
# application data (HTTP and every client-speaks-first protocol), or right after the handshake
# (protocols where the server speaks first).
BACKEND_CONNECT = ("first_data", "handshake")
PP2_CUSTOM_TLV = range(0xE0, 0xF0)  # PP2_TYPE_MIN_CUSTOM..PP2_TYPE_MAX_CUSTOM
ACME_KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096")
TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1")
_ALPN_TOKEN = re.compile(r"^[\x21-\x7e]{1,255}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
# A URL's userinfo (up to the last @ before the path) and a ?password= query value.
_URL_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)@")
_URL_PASSWORD = re.compile(r"([?&]password=)[^&#]*")
_UNKNOWN_KWARG = re.compile(r"unexpected keyword argument '(\w+)'")
LEASE_TTL_MIN, LEASE_TTL_MAX = 3.0, 3600.0  # seconds: edged.lease_ttl


@dataclass(frozen=True)
class Address:
    """A TCP address (`host:port`, `[v6]:port`) or a unix socket (`unix:/path`)."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class EdgedSettings:
    store: str = "certs"
    workers: int = 1
    allocator: str = "system"  # one of heap.ALLOCATORS; takes effect at start
    max_connections: int = 10000
    max_connections_per_ip: int = 1000  # per client address (IPv6: per /64); 0 = no limit
    idle_timeout: float = 300.0
    drain_timeout: float = 30.0
    backend_connect_timeout: float = 5.0
    watch: bool = True
    connection_log: bool = False  # one log line per closed client connection
    connection_log_sample: float = 1.0  # the fraction of connections logged (0..1)
    store_local: str = "certs"  # with a redis:// store: the local copy served during outages
    redis_prefix: str = "edged"  # key prefix, so several fleets can share one Redis
    redis_password_file: Path | None = None
    # rediss:// only: the CA that signs the Redis server's certificate (None = system CAs),
    # and the client certificate Redis asks for (its default `tls-auth-clients yes`).
    redis_ca_file: Path | None = None
    redis_cert_file: Path | None = None
    redis_key_file: Path | None = None
    # How long a node's claim on a name's order outlives the node (kill -9, power loss); the
    # holder extends it every third of this while its order runs.
    lease_ttl: float = 60.0


@dataclass(frozen=True)
class ListenSettings:
    https: tuple[Address, ...] = (Address("0.0.0.0", 443),)
    http: tuple[Address, ...] = (Address("0.0.0.0", 80),)
    metrics: Address | None = Address("127.0.0.1", 9464)
    admin: Address | None = Address(path="/run/edged/admin.sock")
    admin_token_file: Path | None = None  # bearer token for the admin API (loopback TCP)


@dataclass(frozen=True)
class TlsSettings:
    min_version: str = "1.2"
    alpn: tuple[str, ...] = ("h2", "http/1.1")
    default_cert: str = ""
    handshake_timeout: float = 10.0
    require_chain: bool = False
    context_cache_size: int = 1000
    # New TLS session ticket keys this often (seconds; 0 = never): tickets issued before stop
    # resuming, so a stolen ticket key cannot decrypt sessions older than this.
    ticket_key_rotation: float = 86400.0
    # Read the ClientHello before the handshake (passthrough, JA4, TLS-ALPN-01, certificate
    # choice, background indexing need it); false saves its CPU where none of those is used.
    preread: bool = True


@dataclass(frozen=True)
class DnsSettings:
    server: Address = Address("127.0.0.1", 53)
    tsig_key_name: str = "edged"
    tsig_algorithm: str = "hmac-sha256"
    tsig_secret_file: Path | None = None
    zone: str = ""
    delegate_to: str = ""
    # Recursive resolver for CNAME/SOA/CAA lookups; None = the system resolver.
    resolver: Address | None = None
    # Port on which the zone's authoritative nameservers are asked during the propagation wait.
    nameserver_port: int = 53
    propagation_timeout: float = 120.0
    ttl: int = 60


@dataclass(frozen=True)
class AcmeSettings:
    directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    email: str = ""
    ca_bundle: Path | None = None
    challenge: str = "http-01"
    key_types: tuple[str, ...] = ("ecdsa-p256",)
    renew_before_days: int = 30
    retry_interval: float = 900.0
    max_attempts: int = 5
    notify_webhook: str = ""
    dns: DnsSettings | None = None
    eab_kid: str = ""
    eab_hmac_file: Path | None = None
    preflight: bool = True  # CAA / points-here / challenge self-check before a name's first order


# Slots: one per site, 100k per process, and a pickled instance (the config goes to the
# workers) would otherwise get a dict of its own, ~90 B (3.11 keeps values inline until then).
@dataclass(frozen=True, slots=True)
class Site:
    """One `[[site]]`: its names, where its plaintext goes, where its certificate comes from."""

    index: int
    names: tuple[str, ...]
    backend: Address
    proxy_protocol: str = ""
    cert_file: Path | None = None
    key_file: Path | None = None
    origin_tls: bool = False
    origin_ca_file: Path | None = None
    origin_server_name: str = ""
    alpn: tuple[str, ...] | None = None
    http: str = "redirect"  # plain-HTTP requests (other than ACME challenges): redirect|forward
    # terminate: edged holds the certificate; passthrough: the raw TLS stream goes to the
    # backend, which terminates (edged only reads the ClientHello to route by SNI).
    mode: str = "terminate"
    ja4_tlv: int = 0  # PROXY v2 TLV type carrying the client's JA4 fingerprint; 0 = off
    backend_connect: str = "first_data"  # one of BACKEND_CONNECT

    @property
    def passthrough(self) -> bool:
        return self.mode == "passthrough"

    @property
    def stored(self) -> bool:
        """Its certificates come from the store: no cert_file, and edged terminates its TLS."""
        return self.cert_file is None and not self.passthrough

    @property
    def name(self) -> str:
        """The site's first name: its certificate's directory in the store."""
        return self.names[0]

    @property
    def key(self) -> str:
        return f"site[{self.index}]"

    def wildcard_without(self, challenge: str) -> str | None:
        """The first wildcard name `challenge` cannot validate (CAs validate wildcards only
        over dns-01, RFC 8555 section 7.1.3), None when it can validate every name."""
        if challenge == "dns-01":
            return None
        return next((n for n in self.names if n.startswith("*.")), None)


@dataclass(frozen=True)
class Config:
    source: Path
    edged: EdgedSettings
    listen: ListenSettings
    tls: TlsSettings
    acme: AcmeSettings | None
    sites: tuple[Site, ...]

    @property
    def redis_url(self) -> str | None:
        return self.edged.store if "://" in self.edged.store else None

    @property
    def local_store_path(self) -> Path:
        """The directory store, or the local copy a Redis-backed node serves from in outages."""
        path = Path(self.edged.store_local if self.redis_url else self.edged.store)
        return path if path.is_absolute() else self.source.parent / path

    @property
    def store_path(self) -> Path | None:
        """The file store's directory, or None when the store is a URL (redis://)."""
        if "://" in self.edged.store:
            return None
        path = Path(self.edged.store)
        return path if path.is_absolute() else self.source.parent / path

    def site_at(self, index: int) -> Site | None:
        """The site with this `index` (its position in `sites`: a valid config has no gaps)."""
        if 0 <= index < len(self.sites) and self.sites[index].index == index:
            return self.sites[index]
        return None

    def site_for(self, name: str) -> Site | None:
        return self._site_by_name.get(name)

    @cached_property
    def _site_by_name(self) -> dict[str, Site]:
        # O(1) lookups: with 100k sites a scan per renewal or status call adds up.
        return {name: site for site in self.sites for name in site.names}


T = TypeVar("T")


class _Reader:
    """Reads one TOML table, recording a Problem (and returning the default) for each bad key."""

    def __init__(
        self, data: Mapping[str, Any], prefix: str, source: str, problems: list[Problem]
    ) -> None:
        self.data = data
        self.prefix = prefix
        self.source = source
        self.problems = problems
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def problem(self, name: str, message: str) -> None:
        self.problems.append(Problem(self.source, self.key(name), message))

    def get(self, name: str, kind: type[T], default: T, what: str) -> T:
        self.seen.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)  # type: ignore[return-value]
        if not ok:
            self.problem(name, f"must be {what}, got {_toml_type(value)} {value!r}")
            return default
        return value  # type: ignore[no-any-return]

    def str_list(self, name: str, default: tuple[str, ...], what: str) -> tuple[str, ...]:
        value = self.get(name, list, list(default), f"a list of {what}")
        if not all(isinstance(v, str) for v in value):
            self.problem(name, f"must be a list of {what} (strings)")
            return default
        return tuple(value)

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(name, str, default, "a string")
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            self.problem(name, f"{value!r} is not one of {allowed}")
            return default
        return value

    def positive(self, name: str, default: float, *, allow_zero: bool = False) -> float:
        """Seconds: a number, or a duration string like every other duration ('30s', '5m')."""
        raw = self.data.get(name)
        if isinstance(raw, str):
            self.seen.add(name)
            parsed = _duration_text(raw)
            if parsed is None:
                self.problem(name, f"must be seconds or a duration like '30s', '5m', got {raw!r}")
                return default
            value = parsed
        else:
            value = self.get(name, float, default, "a number of seconds")
        if self._too_long(name, value, raw):
            return default
        if not math.isfinite(value):
            self.problem(name, f"must be a finite number of seconds, got {value}")
            return default
        if value < 0 or (value == 0 and not allow_zero):
            self.problem(name, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")
            return default
        return value

    def integer(self, name: str, default: int, minimum: int) -> int:
        value = self.get(name, int, default, "an integer")
        if value < minimum:
            self.problem(name, f"must be >= {minimum}, got {value}")
            return default
        return value

    def duration(self, name: str, default: float, *, zero: bool = False) -> float:
        """A positive duration (`zero`: 0 allowed too, meaning "off")."""
        self.seen.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and (parsed := _duration_text(value)) is not None:
            number = parsed
        else:
            number = -1.0  # not a duration: refused below
        if self._too_long(name, number, value):
            return default
        if number > 0 or (zero and number == 0):
            return number
        what = " or 0 (off)" if zero else ""
        self.problem(
            name, f"must be a duration like '15m', '30s', '1h' or seconds{what}, got {value!r}"
        )
        return default

    def _too_long(self, name: str, seconds: float, raw: object) -> bool:
        """Longer than any timer or date edged keeps can take (inf too): reported."""
        if seconds > MAX_DURATION:
            self.problem(name, f"{raw!r} is longer than any edged can use: at most 365d")
            return True
        return False

    def path(self, name: str, base: Path) -> Path | None:
        value = self.get(name, str, "", "a file path")
        if not value:
            return None
        path = Path(value)
        return path if path.is_absolute() else base / path

    def table(self, name: str) -> Mapping[str, Any] | None:
        self.seen.add(name)
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.problem(name, f"must be a table ([{self.key(name)}]), got {_toml_type(value)}")
            return None
        return value

    def finish(self, known: Callable[[str], bool] | None = None) -> None:
        for name in self.data:
            if name not in self.seen and not (known and known(name)):
                self.problem(name, "unknown key: check its spelling against config/edged.toml")


def _toml_type(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


MAX_DURATION = 365 * 86400.0  # seconds; more overflows dates (`now + interval`) and timers
UNIX_PATH_MAX = 107  # bytes of a unix socket path Linux takes (sun_path less its NUL)


@functools.lru_cache(maxsize=4096)
def parse_address(text: str, *, listen: bool, allow_unix: bool = True) -> Address:
    """Parse `host:port`, `[v6]:port` or `unix:/path`; listen addresses need an IP literal.
    Cached (pure; Address is frozen): 100k sites usually name a handful of backends."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not allow_unix:
            raise ValueError(f"{text!r}: a unix socket is not allowed here")
        if not path.startswith("/") or path == "/":
            raise ValueError(f"{text!r}: a unix socket path must be absolute (unix:/run/x.sock)")
        if "\0" in path:
            raise ValueError(f"{text!r}: a unix socket path cannot hold a NUL character")
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise ValueError(
                f"{text!r}: a unix socket path takes at most {UNIX_PATH_MAX} bytes on Linux: "
                "use a shorter one (e.g. under /run)"
            )
        return Address(path=path)
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: an IPv6 address is written [addr]:port")
        if ":" not in host:  # [127.0.0.1]:443, [example.com]:80
            raise ValueError(f"{text!r}: brackets are for IPv6 addresses only ([::1]:443)")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r}: expected host:port (e.g. 127.0.0.1:8080)")
        if ":" in host:  # 2001:db8::1:443 is itself an address: which part is the port?
            raise ValueError(f"{text!r}: write an IPv6 address in brackets: [addr]:port")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: port must be a number from 1 to 65535")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if listen:
            raise ValueError(
                f"{text!r}: a listen address needs an IP (0.0.0.0, [::], 127.0.0.1)"
            ) from None
        try:
            normalize_name(host, allow_wildcard=False)
        except NameError_ as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        return Address(host.lower(), int(port_text))
    return Address(str(ip), int(port_text))


def _address_list(r: _Reader, name: str, default: tuple[Address, ...]) -> tuple[Address, ...]:
    items = r.str_list(name, tuple(str(a) for a in default), "addresses")
    out: list[Address] = []
    for item in items:
        try:
            out.append(parse_address(item, listen=True, allow_unix=False))
        except ValueError as exc:
            r.problem(name, str(exc))
    if len(set(out)) != len(out):
        r.problem(name, "lists the same address twice")
    return tuple(dict.fromkeys(out))


def _optional_address(r: _Reader, name: str, default: Address | None) -> Address | None:
    text = r.get(name, str, str(default) if default else "", "an address or ''")
    if not text:
        return None
    try:
        return parse_address(text, listen=True)
    except ValueError as exc:
        r.problem(name, str(exc))
        return default


def _alpn(r: _Reader, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    protos = r.str_list(name, default, "ALPN protocol ids")
    for p in protos:
        if not _ALPN_TOKEN.match(p):
            r.problem(name, f"{p!r} is not a valid ALPN protocol id (e.g. 'h2', 'http/1.1')")
            return default
    return protos


def _parse_edged(r: _Reader, base: Path) -> EdgedSettings:
    d = EdgedSettings()
    s = EdgedSettings(
        store=r.get("store", str, d.store, "a directory or redis:// URL"),
        workers=r.integer("workers", d.workers, 0),
        allocator=r.choice("allocator", ALLOCATORS, d.allocator),
        max_connections=r.integer("max_connections", d.max_connections, 1),
        max_connections_per_ip=r.integer("max_connections_per_ip", d.max_connections_per_ip, 0),
        idle_timeout=r.positive("idle_timeout", d.idle_timeout),
        drain_timeout=_drain_timeout(r, d.drain_timeout),
        backend_connect_timeout=r.positive("backend_connect_timeout", d.backend_connect_timeout),
        watch=r.get("watch", bool, d.watch, "true or false"),
        connection_log=r.get("connection_log", bool, d.connection_log, "true or false"),
        connection_log_sample=r.get(
            "connection_log_sample", float, d.connection_log_sample, "a number from 0 to 1"
        ),
        store_local=r.get("store_local", str, d.store_local, "a directory") or d.store_local,
        redis_prefix=r.get("redis_prefix", str, d.redis_prefix, "a key prefix"),
        redis_password_file=r.path("redis_password_file", base),
        redis_ca_file=r.path("redis_ca_file", base),
        redis_cert_file=r.path("redis_cert_file", base),
        redis_key_file=r.path("redis_key_file", base),
        lease_ttl=r.duration("lease_ttl", d.lease_ttl),
    )
    if not 0.0 <= s.connection_log_sample <= 1.0:
        r.problem(
            "connection_log_sample",
            f"must be a fraction from 0 to 1 (1 = every connection), got {s.connection_log_sample}",
        )
    if not s.store.strip():
        r.problem("store", "is empty: name a directory (e.g. /var/lib/edged) or a redis:// URL")
    if "://" in s.store and not s.store.startswith(("redis://", "rediss://", "unix://")):
        r.problem(
            "store",
            f"{redact_url(s.store)!r}: use a directory, redis://host:port/db, rediss://… (TLS) "
            "or unix://path",
        )
    elif "://" in s.store:
        _check_redis_url(r, s.store)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", s.redis_prefix):
        r.problem("redis_prefix", f"{s.redis_prefix!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    _check_redis_tls(r, s)
    if not LEASE_TTL_MIN <= s.lease_ttl <= LEASE_TTL_MAX:
        r.problem(
            "lease_ttl",
            f"{s.lease_ttl:g}s is out of range: use {LEASE_TTL_MIN:g}s to {LEASE_TTL_MAX / 60:g}m "
            "(shorter cannot outlast a slow Redis round trip; longer blocks a name that long "
            "after its ordering node died)",
        )
    r.finish()
    return s


def redact_url(url: str) -> str:
    """The URL with its password (userinfo, ?password=) replaced by ***: config problems are
    printed and logged."""
    return _URL_PASSWORD.sub(r"\1***", _URL_USERINFO.sub(r"\1***@", url))


def _check_redis_url(r: _Reader, url: str) -> None:
    """Build the connection as redis-py does at start, without connecting: a typo in the URL is
    then a config error for `edged check` and reload, not a ValueError when the store opens."""
    import redis  # here: a config with a file store never needs it

    fix = "write it as redis://[user:password@]host:port/db, rediss://… (TLS) or unix:///path?db=N"
    try:
        redis.ConnectionPool.from_url(url).make_connection()
    except TypeError as exc:  # an unknown ?option= becomes an unexpected keyword argument
        option = _UNKNOWN_KWARG.search(str(exc))
        what = f"unknown option {option.group(1)!r} in its query" if option else str(exc)
        r.problem("store", f"{redact_url(url)!r}: {what}: remove it, or {fix}")
        return
    except (ValueError, redis.RedisError) as exc:
        password = _url_password(url)
        message = str(exc).replace(password, "***") if password else str(exc)
        r.problem("store", f"{redact_url(url)!r}: {message}: {fix}")
        return
    # redis-py reads a path that is not a number as db 0: a typo would share another's data.
    path = urlsplit(url).path if url.startswith(("redis://", "rediss://")) else ""
    if path.strip("/") and not path.strip("/").isdigit():
        r.problem("store", f"{redact_url(url)!r}: {path!r} is not a database number: {fix}")


def _url_password(url: str) -> str:
    userinfo = _URL_USERINFO.match(url)
    return userinfo.group(2).partition(":")[2] if userinfo else ""


def _check_redis_tls(r: _Reader, s: EdgedSettings) -> None:
    tls_keys = ("redis_ca_file", "redis_cert_file", "redis_key_file")
    if not s.store.startswith("rediss://"):
        for key in tls_keys:
            if getattr(s, key) is not None:
                r.problem(
                    key, f"only applies to a TLS store (rediss://…), not {redact_url(s.store)!r}"
                )
        return
    if (s.redis_cert_file is None) != (s.redis_key_file is None):
        missing = "redis_key_file" if s.redis_key_file is None else "redis_cert_file"
        r.problem(missing, "set redis_cert_file and redis_key_file together (a client certificate)")


def _duration_text(text: str) -> float | None:
    """Seconds in a duration string like '500ms', '30s', '15m', '1h', '2d' or '90' (None: not
    one)."""
    m = _DURATION.match(text)
    return None if m is None else float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _drain_timeout(r: _Reader, default: float) -> float:
    """`drain_timeout`, also spelled `shutdown_timeout` (the name systemd users look for)."""
    if "shutdown_timeout" not in r.data:
        return r.positive("drain_timeout", default, allow_zero=True)
    if "drain_timeout" in r.data:
        r.seen.add("drain_timeout")
        r.problem("shutdown_timeout", "is another name for drain_timeout: set only one of them")
    return r.positive("shutdown_timeout", default, allow_zero=True)


def _parse_listen(r: _Reader, base: Path) -> ListenSettings:
    d = ListenSettings()
    s = ListenSettings(
        https=_address_list(r, "https", d.https),
        http=_address_list(r, "http", d.http),
        metrics=_optional_address(r, "metrics", d.metrics),
        admin=_optional_address(r, "admin", d.admin),
        admin_token_file=r.path("admin_token_file", base),
    )
    _check_admin_loopback(r, s.admin)
    _check_listen_clashes(r, s)
    r.finish()
    return s


def _check_admin_loopback(r: _Reader, admin: Address | None) -> None:
    if admin and not admin.is_unix and not ipaddress.ip_address(admin.host).is_loopback:
        r.problem("admin", f"{admin} is not loopback: use unix:/path or 127.0.0.1:PORT")


def _check_listen_clashes(r: _Reader, s: ListenSettings) -> None:
    """Two listeners of different keys on one address (or 0.0.0.0:P and an IPv4 address on
    P, [::]:P and an IPv6 one): the second cannot bind. Found here, not at start or reload."""
    seen: dict[tuple[str, int] | str, str] = {}
    keyed = [("https", a) for a in s.https] + [("http", a) for a in s.http]
    keyed += [(k, a) for k, a in (("metrics", s.metrics), ("admin", s.admin)) if a is not None]
    for key, address in keyed:
        if address.is_unix:
            spots: list[tuple[str, int] | str] = [address.path]
        else:
            ip = ipaddress.ip_address(address.host)
            anywhere = "0.0.0.0" if ip.version == 4 else "::"
            spots = [(address.host, address.port), (anywhere, address.port)]
            if address.host == anywhere:  # the wildcard clashes with any address of its family
                spots += [
                    spot
                    for spot in seen
                    if isinstance(spot, tuple)
                    and spot[1] == address.port
                    and ipaddress.ip_address(spot[0]).version == ip.version
                ]
        for spot in spots:
            other = seen.get(spot)
            if other is not None and other != key:
                r.problem(
                    key, f"{address} is also where {other} listens: one address, one listener"
                )
                break
        seen[(address.host, address.port) if not address.is_unix else address.path] = key


def _parse_tls(r: _Reader) -> TlsSettings:
    d = TlsSettings()
    s = TlsSettings(
        min_version=r.choice("min_version", TLS_VERSIONS, d.min_version),
        alpn=_alpn(r, "alpn", d.alpn),
        default_cert=r.get("default_cert", str, d.default_cert, "a site name or ''"),
        handshake_timeout=r.positive("handshake_timeout", d.handshake_timeout),
        require_chain=r.get("require_chain", bool, d.require_chain, "true or false"),
        context_cache_size=r.integer("context_cache_size", d.context_cache_size, 1),
        ticket_key_rotation=r.duration("ticket_key_rotation", d.ticket_key_rotation, zero=True),
        preread=r.get("preread", bool, d.preread, "true or false"),
    )
    r.finish()
    return s


def _peer_address(r: _Reader, key: str) -> Address | None:
    text = r.get(key, str, "", "host:port or ''")
    if not text:
        return None
    try:
        return parse_address(text, listen=False, allow_unix=False)
    except ValueError as exc:
        r.problem(key, str(exc))
        return None


def _parse_dns(r: _Reader, base: Path) -> DnsSettings:
    d = DnsSettings()
    server_text = r.get("server", str, str(d.server), "host:port")
    try:
        server = parse_address(server_text, listen=False, allow_unix=False)
    except ValueError as exc:
        r.problem("server", str(exc))
        server = d.server
    s = DnsSettings(
        server=server,
        tsig_key_name=r.get("tsig_key_name", str, d.tsig_key_name, "a string"),
        tsig_algorithm=r.choice("tsig_algorithm", TSIG_ALGORITHMS, d.tsig_algorithm),
        tsig_secret_file=r.path("tsig_secret_file", base),
        zone=r.get("zone", str, d.zone, "a zone name or ''"),
        delegate_to=r.get("delegate_to", str, d.delegate_to, "a zone name or ''"),
        resolver=_peer_address(r, "resolver"),
        nameserver_port=r.integer("nameserver_port", d.nameserver_port, 1),
        propagation_timeout=r.duration("propagation_timeout", d.propagation_timeout),
        ttl=r.integer("ttl", d.ttl, 1),
    )
    if not s.tsig_key_name.strip():
        r.problem("tsig_key_name", "is empty: set it to the TSIG key's name")
    if s.nameserver_port > 65535:
        r.problem("nameserver_port", f"{s.nameserver_port} is not a port (1-65535)")
    for key in ("zone", "delegate_to"):
        value = getattr(s, key)
        if value:
            try:
                normalize_name(value, allow_wildcard=False)
            except NameError_ as exc:
                r.problem(key, str(exc))
    r.finish()
    return s


def _is_http_url(url: str) -> bool:
    """What aiohttp can POST to; anything else would fail every notice, seen only in the log."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _tsig_key_missing(r: _Reader, dns: DnsSettings) -> None:
    """edged signs every RFC 2136 update with TSIG (edged.dns.load_tsig_key): without the key
    each dns-01 attempt would fail at its first update."""
    r.problem(
        "dns.tsig_secret_file",
        "is not set, and dns-01 updates are signed with a TSIG key: create one with "
        f"`tsig-keygen -a {dns.tsig_algorithm} {dns.tsig_key_name or 'edged'} > tsig.key`, allow "
        "that key to update the zone on the DNS server, and set tsig_secret_file = 'tsig.key'",
    )


def _parse_acme(r: _Reader, base: Path) -> AcmeSettings:
    d = AcmeSettings()
    directory = r.get("directory", str, d.directory, "an https:// URL")
    if not directory.startswith("https://"):
        r.problem("directory", f"{directory!r}: the ACME directory must be an https:// URL")
    key_types = r.str_list("key_types", d.key_types, "key types")
    for kt in key_types:
        if kt not in ACME_KEY_TYPES:
            r.problem("key_types", f"{kt!r} is not one of {', '.join(ACME_KEY_TYPES)}")
            key_types = d.key_types
            break
    if not key_types:
        r.problem("key_types", "must name at least one key type, e.g. ['ecdsa-p256']")
        key_types = d.key_types
    challenge = r.choice("challenge", CHALLENGES, d.challenge)
    dns_table = r.table("dns")
    dns = (
        _parse_dns(_Reader(dns_table, r.key("dns"), r.source, r.problems), base)
        if dns_table is not None  # an empty table is there, with every key at its default
        else None
    )
    if challenge == "dns-01" and dns is None:
        r.problem("challenge", "dns-01 needs an [acme.dns] table (server, TSIG key)")
    elif challenge == "dns-01" and dns is not None and dns.tsig_secret_file is None:
        _tsig_key_missing(r, dns)
    s = AcmeSettings(
        directory=directory,
        email=r.get("email", str, d.email, "an email address"),
        ca_bundle=r.path("ca_bundle", base),
        challenge=challenge,
        key_types=key_types,
        renew_before_days=r.integer("renew_before_days", d.renew_before_days, 0),
        retry_interval=r.duration("retry_interval", d.retry_interval),
        max_attempts=r.integer("max_attempts", d.max_attempts, 1),
        notify_webhook=r.get("notify_webhook", str, d.notify_webhook, "a URL or ''"),
        dns=dns,
        eab_kid=r.get("eab_kid", str, d.eab_kid, "the CA's key identifier or ''"),
        eab_hmac_file=r.path("eab_hmac_file", base),
        preflight=r.get("preflight", bool, d.preflight, "true or false"),
    )
    if bool(s.eab_kid) != bool(s.eab_hmac_file):
        r.problem("eab_kid", "eab_kid and eab_hmac_file go together: set both or neither")
    if s.notify_webhook and not _is_http_url(s.notify_webhook):
        r.problem(
            "notify_webhook",
            "must be an http:// or https:// URL with a host, e.g. "
            "'https://hooks.example.com/edged' (or '' for none)",
        )
    if s.email and "@" not in s.email:
        r.problem("email", f"{s.email!r} is not an email address")
    r.finish()
    return s


def _parse_site(r: _Reader, index: int, base: Path) -> Site | None:
    raw_names = r.str_list("names", (), "DNS names")
    names: list[str] = []
    for raw in raw_names:
        try:
            names.append(normalize_name(raw))
        except NameError_ as exc:
            r.problem("names", str(exc))
    # Missing or empty only: a value of the wrong type was reported already, and "needs at
    # least one" would send the operator after a problem they do not have.
    if r.data.get("names", []) == []:
        r.problem("names", "a site needs at least one name, e.g. names = ['example.com']")
    backend_text = r.get("backend", str, "", "host:port or unix:/path")
    backend: Address | None = None
    if not backend_text:
        if r.data.get("backend", "") == "":
            r.problem("backend", "a site needs a backend, e.g. backend = '127.0.0.1:8080'")
    else:
        try:
            backend = parse_address(backend_text, listen=False)
        except ValueError as exc:
            r.problem("backend", str(exc))
    cert_file = r.path("cert_file", base)
    key_file = r.path("key_file", base)
    if bool(cert_file) != bool(key_file):
        r.problem("cert_file", "cert_file and key_file go together: set both or neither")
    alpn = _alpn(r, "alpn", ()) if "alpn" in r.data else None
    origin_tls = r.get("origin_tls", bool, False, "true or false")
    site = Site(
        index=index,
        names=tuple(dict.fromkeys(names)),
        backend=backend or Address(),
        proxy_protocol=r.choice("proxy_protocol", PROXY_PROTOCOLS, ""),
        cert_file=cert_file,
        key_file=key_file,
        origin_tls=origin_tls,
        origin_ca_file=r.path("origin_ca_file", base),
        origin_server_name=r.get("origin_server_name", str, "", "a DNS name or ''"),
        alpn=alpn,
        http=r.choice("http", HTTP_MODES, "redirect"),
        mode=r.choice("mode", SITE_MODES, "terminate"),
        ja4_tlv=r.integer("ja4_tlv", 0, 0),
        backend_connect=r.choice("backend_connect", BACKEND_CONNECT, "first_data"),
    )
    if site.origin_tls and site.backend.is_unix and not site.origin_server_name:
        r.problem("origin_server_name", "origin_tls to a unix socket needs origin_server_name")
    if site.ja4_tlv and site.ja4_tlv not in PP2_CUSTOM_TLV:
        r.problem(
            "ja4_tlv",
            f"{site.ja4_tlv} is not a custom PROXY v2 TLV type: use one from 0xE0 to 0xEF "
            "(e.g. ja4_tlv = 0xE4), or 0 for off",
        )
    elif site.ja4_tlv and site.proxy_protocol != "v2":
        r.problem("ja4_tlv", "the JA4 TLV travels in a PROXY v2 header: set proxy_protocol = 'v2'")
    if site.passthrough:
        _check_passthrough(r, site)
    if len(site.names) != len(names):
        r.problem("names", "lists the same name twice")
    r.finish()
    return site if names and backend else None


def _check_passthrough(r: _Reader, site: Site) -> None:
    """A passthrough site's backend terminates TLS itself: the TLS settings do not apply."""
    why = "a passthrough site does not terminate TLS (its backend holds the certificate)"
    if site.cert_file is not None:
        r.problem("cert_file", f"{why}: remove cert_file/key_file or set mode = 'terminate'")
    if site.origin_tls:
        r.problem("origin_tls", f"{why}: the client's TLS stream already reaches the backend")
    if site.alpn is not None:
        r.problem("alpn", f"{why}: the backend negotiates ALPN; remove alpn")
    if site.http == "forward":
        r.problem("http", f"{why}: its backend speaks TLS, not plain HTTP; use 'redirect'")
    if site.backend_connect != "first_data":
        r.problem(
            "backend_connect",
            f"{why}: its backend connection opens once the ClientHello is read; remove "
            "backend_connect",
        )


def _toml(text: str, src: str) -> dict[str, Any]:
    """The TOML document; ConfigError naming `src` when it is not TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(src, "", f"not valid TOML: {exc}")]) from None
    except RecursionError:
        raise ConfigError(
            [Problem(src, "", "not valid TOML: nested too deeply (arrays or inline tables)")]
        ) from None


def _read_config(path: Path) -> str:
    """The config file's text; ConfigError naming the file when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [Problem(str(path), "", "no such file: pass --config PATH or create it")]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(str(path), "", f"cannot read: {exc}")]) from None


def parse_config(text: str, source: Path) -> Config:
    """Parse config text; raise ConfigError listing every problem. Does no I/O."""
    src = str(source)
    data = _toml(text, src)
    problems: list[Problem] = []
    base = source.parent
    top = _Reader(data, "", src, problems)

    def section(name: str) -> _Reader:
        return _Reader(top.table(name) or {}, name, src, problems)

    edged = _parse_edged(section("edged"), base)
    listen = _parse_listen(section("listen"), base)
    tls = _parse_tls(section("tls"))
    acme_table = top.table("acme")
    # An empty [acme] is ACME with every default (LE production); only no table means none.
    acme = (
        _parse_acme(_Reader(acme_table, "acme", src, problems), base)
        if acme_table is not None
        else None
    )

    top.seen.add("site")
    raw_sites = data.get("site", [])
    if not isinstance(raw_sites, list):
        problems.append(Problem(src, "site", "sites are written as [[site]] tables"))
        raw_sites = []
    sites: list[Site] = []
    owner: dict[str, int] = {}
    for index, raw in enumerate(raw_sites):
        r = _Reader(raw, f"site[{index}]", src, problems)
        site = _parse_site(r, index, base)
        if site is None:
            continue
        for name in site.names:
            if name in owner:
                r.problem(
                    "names",
                    f"{name!r} is already in site[{owner[name]}]: a name belongs to one site",
                )
            else:
                owner[name] = index
        sites.append(site)
    top.finish()

    if tls.default_cert:
        try:
            default = normalize_name(tls.default_cert)
        except NameError_ as exc:
            problems.append(Problem(src, "tls.default_cert", str(exc)))
        else:
            if default not in owner:
                problems.append(
                    Problem(src, "tls.default_cert", f"{default!r} is not a name of any [[site]]")
                )
            elif any(s.passthrough and default in s.names for s in sites):
                problems.append(
                    Problem(
                        src,
                        "tls.default_cert",
                        f"{default!r} belongs to a passthrough site, which has no certificate: "
                        "name a terminated site",
                    )
                )
            tls = TlsSettings(**{**tls.__dict__, "default_cert": default})
    if not tls.preread:
        needs = [
            *(f"{s.key} (mode = passthrough)" for s in sites if s.passthrough),
            *(f"{s.key} (ja4_tlv)" for s in sites if s.ja4_tlv),
            *(["acme.challenge = tls-alpn-01"] if acme and acme.challenge == "tls-alpn-01" else []),
        ]
        if needs:
            problems.append(
                Problem(
                    src,
                    "tls.preread",
                    f"false, but {', '.join(needs[:3])} need the ClientHello read before the "
                    "handshake: remove preread = false or those settings",
                )
            )
    # Only when none was given: addresses that did not parse are reported each already.
    if not listen.https and not any(p.key == "listen.https" for p in problems):
        problems.append(
            Problem(src, "listen.https", "needs at least one address, e.g. 0.0.0.0:443")
        )
    if not raw_sites:
        problems.append(Problem(src, "site", "no [[site]] defined: add at least one"))
    if problems:
        raise ConfigError(problems)
    return Config(source, edged, listen, tls, acme, tuple(sites))


def config_files(config: Config) -> list[tuple[str, Path]]:
    """Every file the config refers to, with the key that names it."""
    files: list[tuple[str, Path]] = []
    for key in ("redis_password_file", "redis_ca_file", "redis_cert_file", "redis_key_file"):
        path = getattr(config.edged, key)
        if path is not None:
            files.append((f"edged.{key}", path))
    if config.listen.admin_token_file is not None:
        files.append(("listen.admin_token_file", config.listen.admin_token_file))
    for site in config.sites:
        for key in ("cert_file", "key_file", "origin_ca_file"):
            path = getattr(site, key)
            if path is not None:
                files.append((f"{site.key}.{key}", path))
    if config.acme:
        if config.acme.ca_bundle:
            files.append(("acme.ca_bundle", config.acme.ca_bundle))
        if config.acme.dns and config.acme.dns.tsig_secret_file:
            files.append(("acme.dns.tsig_secret_file", config.acme.dns.tsig_secret_file))
        if config.acme.eab_hmac_file:
            files.append(("acme.eab_hmac_file", config.acme.eab_hmac_file))
    return files


def check_files(config: Config) -> list[Problem]:
    """A problem for each referenced file that is missing or unreadable."""
    problems = []
    for key, path in config_files(config):
        try:
            exists = path.is_file()
            directory = not exists and path.is_dir()
        except OSError as exc:  # e.g. EACCES on a parent directory
            problems.append(
                Problem(str(config.source), key, f"{path}: {exc.strerror}: fix its mode")
            )
            continue
        if directory:
            problems.append(
                Problem(str(config.source), key, f"{path}: is a directory: name the file in it")
            )
        elif not exists:
            problems.append(
                Problem(str(config.source), key, f"{path}: no such file: check the path")
            )
        elif not os.access(path, os.R_OK):
            problems.append(
                Problem(str(config.source), key, f"{path}: not readable by this user: fix its mode")
            )
    return problems


def load_config(path: Path) -> Config:
    """Read and parse the config file and check that the files it names exist."""
    return load_config_digest(path)[0]


def load_config_digest(
    path: Path, parsed: tuple[Config, bytes] | None = None
) -> tuple[Config, bytes]:
    """load_config, and the SHA-256 of the text it parsed (to tell later whether the file
    still holds what is loaded). `parsed`: a config parsed before from a text with that
    digest; when the file still holds that text it is not parsed again (parsing is a pure
    function of the text and the path: 100k sites take ~2 s), only its files are checked."""
    text = _read_config(path)
    digest = _digest(text)
    source = path.absolute()
    if parsed is not None and parsed[1] == digest and parsed[0].source == source:
        config = copy.copy(parsed[0])  # a new object, as a reload's config always is
    else:
        config = parse_config(text, source)
    problems = check_files(config)
    if problems:
        raise ConfigError(problems)
    return config, digest


def config_digest(path: Path) -> bytes | None:
    """The SHA-256 of the config file's text as load_config_digest computes it (None: it
    cannot be read)."""
    try:
        return _digest(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def load_admin_settings(path: Path) -> ListenSettings:
    """Only what reaching the running daemon's admin API takes: listen.admin and
    listen.admin_token_file (the rest of the ListenSettings are defaults). The rest of the file
    is not validated and the files it names are not checked: the daemon keeps serving through
    a config it rejected or a certificate being replaced, and `edged status`/`edged reload`
    must still reach it then. ConfigError when the file or those two keys are unusable."""
    src = str(path)
    data = _toml(_read_config(path), src)
    problems: list[Problem] = []
    listen = _Reader(
        _Reader(data, "", src, problems).table("listen") or {}, "listen", src, problems
    )
    admin = _optional_address(listen, "admin", ListenSettings().admin)
    token_file = listen.path("admin_token_file", path.absolute().parent)
    _check_admin_loopback(listen, admin)
    if problems:
        raise ConfigError(problems)
    return ListenSettings(admin=admin, admin_token_file=token_file)
