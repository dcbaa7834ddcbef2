"""DNS-01 support: RFC 2136 updates signed with TSIG, CNAME delegation, propagation, CAA.

Synchronous (dnspython's blocking API): the ACME client calls it from a worker thread.

    key = load_tsig_key(settings)
    updater = DnsUpdater(settings, key)
    fqdn = updater.challenge_fqdn("*.example.com")  # _acme-challenge.example.com, CNAMEs followed
    updater.add_txt(fqdn, value)
    updater.wait_propagated(fqdn, [value])  # every authoritative nameserver answers it
    ...
    updater.delete_txt(fqdn, value)

With `journal=` (an edged.dnsjournal.DnsJournal) each value is written down before it is added
and crossed out once deleted, so one left in the zone by a crash is deleted later.

Names go in with or without a trailing dot and come out lowercase without one. Every DnsError
names the DNS name, file or server concerned and says what to change.
"""

from __future__ import annotations

import base64
import binascii
import errno
import ipaddress
import re
import secrets
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CAA
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.NS
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.resolver
import dns.tsig
import dns.update

from edged.config import Address, DnsSettings
from edged.errors import EdgedError
from edged.names import NameError_, normalize_name

if TYPE_CHECKING:
    from edged.dnsjournal import DnsJournal

CHALLENGE_LABEL = "_acme-challenge"
MAX_CNAME_DEPTH = 8
TSIG_ALGORITHMS: dict[str, dns.name.Name] = {
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
    "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha1": dns.tsig.HMAC_SHA1,
}
# CAA property tags a CA understands (RFC 8659, RFC 8657 registry); anything else flagged
# critical (flags bit 128) forbids issuance.
CAA_KNOWN_TAGS = frozenset({"issue", "issuewild", "iodef", "contactemail", "contactphone"})
CAA_CRITICAL = 128

_KEY_BLOCK = re.compile(r'\bkey\s+(?:"([^"]*)"|([^\s{;"]+))\s*\{([^{}]*)\}\s*;?', re.S)
_SECRET = re.compile(r'\bsecret\s+"([^"]*)"\s*;')
_ALGORITHM = re.compile(r'\balgorithm\s+"?([A-Za-z0-9.-]+)"?\s*;')
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT}


class DnsError(EdgedError):
    """A DNS-01 step failed; `name` is the DNS name, file or server, `message` says the fix."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        self.message = message
        super().__init__(f"{name}: {message}")


class _NotApplied(DnsError):
    """An update that certainly changed nothing: never sent, or refused by the server (an
    RFC 2136 update is applied whole or not at all)."""


@dataclass(frozen=True)
class TsigKey:
    """A TSIG key: its name (as the server knows it), algorithm and raw secret."""

    name: str
    algorithm: str
    secret: bytes = field(repr=False)


# --- names ---------------------------------------------------------------------------------


def _to_name(text: str | dns.name.Name, what: str = "DNS name") -> dns.name.Name:
    """An absolute dns.name.Name from text with or without the trailing dot."""
    if isinstance(text, dns.name.Name):
        return text
    raw = text.strip()
    if not raw or raw == ".":
        raise DnsError(repr(text), f"empty {what}: give a DNS name such as example.com")
    try:
        return dns.name.from_text(raw.rstrip(".") + ".")
    except dns.exception.DNSException as exc:
        raise DnsError(text, f"not a valid {what}: {exc}") from None


def _text(name: dns.name.Name) -> str:
    """Lowercase, no trailing dot."""
    return name.to_text(omit_final_dot=True).lower()


def _base_name(name: str) -> str:
    """The name a challenge is for, normalised, without a leading `*.`."""
    try:
        norm = normalize_name(name)
    except NameError_ as exc:
        raise DnsError(name or repr(name), str(exc)) from None
    return norm[2:] if norm.startswith("*.") else norm


# --- TSIG keys -----------------------------------------------------------------------------


def _strip_comments(text: str) -> str:
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("#", "//", ";")):
            continue
        lines.append(line)
    return re.sub(r"/\*.*?\*/", " ", "\n".join(lines), flags=re.S)


def _decode_secret(encoded: str, source: str, what: str) -> bytes:
    compact = "".join(encoded.split())
    if not compact or not _BASE64.match(compact):
        raise DnsError(source, f"{what} is not base64; regenerate it with `tsig-keygen`")
    try:
        secret = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise DnsError(source, f"{what} is not valid base64 (bad padding or length)") from None
    if not secret:
        raise DnsError(source, f"{what} is empty; regenerate it with `tsig-keygen`")
    return secret


def _parse_tsig_text(text: str, key_name: str, source: str) -> tuple[bytes, str | None]:
    """(secret, algorithm named in the file or None for a bare secret)."""
    body = _strip_comments(text).strip()
    if not body:
        raise DnsError(
            source,
            "the TSIG secret file is empty; put the output of "
            f"`tsig-keygen -a hmac-sha256 {key_name}` (or the bare base64 secret) in it",
        )
    wanted = key_name.strip().rstrip(".").lower()
    blocks = list(_KEY_BLOCK.finditer(body))
    if blocks:
        found = []
        for block in blocks:
            block_name = (block.group(1) if block.group(1) is not None else block.group(2)) or ""
            found.append(block_name)
            if block_name.strip().rstrip(".").lower() != wanted:
                continue
            secret_match = _SECRET.search(block.group(3))
            if not secret_match:
                raise DnsError(
                    source,
                    f'key "{key_name}" has no `secret "...";` line; regenerate it with '
                    f"`tsig-keygen -a hmac-sha256 {key_name}`",
                )
            algorithm_match = _ALGORITHM.search(block.group(3))
            secret = _decode_secret(
                secret_match.group(1), source, f'the secret of key "{key_name}"'
            )
            return secret, algorithm_match.group(1).lower() if algorithm_match else None
        names = ", ".join(f'"{n}"' for n in found)
        raise DnsError(
            source,
            f'no TSIG key named "{key_name}" in this file (it has {names}): set '
            "acme.dns.tsig_key_name to the key the server grants updates to, or add that key",
        )
    if "{" in body or "key" in body.split()[0:1]:
        raise DnsError(
            source,
            'cannot parse the TSIG key: expected `key "NAME" { algorithm hmac-sha256; secret '
            '"BASE64"; };` as written by tsig-keygen, or a bare base64 secret',
        )
    if len(body.split()) != 1 or not _BASE64.match(body):
        raise DnsError(
            source,
            "not a TSIG key: expected tsig-keygen output "
            '(`key "NAME" { algorithm hmac-sha256; secret "BASE64"; };`) or a bare base64 '
            f"secret; create one with `tsig-keygen -a hmac-sha256 {key_name}`",
        )
    return _decode_secret(body, source, "the TSIG secret"), None


def parse_tsig_secret(text: str, key_name: str, source: str) -> bytes:
    """The secret of key `key_name` from tsig-keygen output, or a bare base64 secret.

    Errors name `source` and never contain the secret.
    """
    return _parse_tsig_text(text, key_name, source)[0]


def load_tsig_key(settings: DnsSettings) -> TsigKey:
    """Read `settings.tsig_secret_file` and build the key; DnsError says what to fix."""
    if settings.tsig_algorithm not in TSIG_ALGORITHMS:
        raise DnsError(
            "acme.dns.tsig_algorithm",
            f"{settings.tsig_algorithm!r} is not supported; use one of "
            + ", ".join(TSIG_ALGORITHMS),
        )
    if not settings.tsig_key_name.strip():
        raise DnsError("acme.dns.tsig_key_name", "is empty: set it to the TSIG key's name")
    path = settings.tsig_secret_file
    if path is None:
        raise DnsError(
            "acme.dns.tsig_secret_file",
            "is not set: point it at the TSIG key file (`tsig-keygen -a "
            f"{settings.tsig_algorithm} {settings.tsig_key_name} > tsig.key`)",
        )
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DnsError(
            str(path),
            f"cannot read the TSIG secret file ({exc.strerror or exc}): check "
            "acme.dns.tsig_secret_file and that edged may read it",
        ) from None
    secret, algorithm = _parse_tsig_text(text, settings.tsig_key_name, str(path))
    if algorithm is not None and algorithm != settings.tsig_algorithm:
        raise DnsError(
            str(path),
            f'key "{settings.tsig_key_name}" uses algorithm {algorithm} but '
            f"acme.dns.tsig_algorithm is {settings.tsig_algorithm}: make them the same",
        )
    return TsigKey(settings.tsig_key_name.strip().rstrip("."), settings.tsig_algorithm, secret)


# --- resolver and addresses ----------------------------------------------------------------


def _ip_of(address: Address, what: str) -> str:
    """The IP literal to send to (hostnames resolved through the system)."""
    try:
        return str(ipaddress.ip_address(address.host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise DnsError(
            str(address), f"cannot resolve the {what} host {address.host!r}: {exc}; use an IP"
        ) from None
    return str(infos[0][4][0])


def build_resolver(settings: DnsSettings | None, timeout: float = 5.0) -> dns.resolver.Resolver:
    """A resolver for CNAME/SOA/NS/CAA lookups: `settings.resolver`, else the system's."""
    if settings is None or settings.resolver is None:
        try:
            resolver = dns.resolver.Resolver()
        except dns.exception.DNSException as exc:
            raise DnsError(
                "/etc/resolv.conf",
                f'no system resolver configured ({exc}): set acme.dns.resolver = "IP:53"',
            ) from None
    else:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [_ip_of(settings.resolver, "acme.dns.resolver")]
        resolver.port = settings.resolver.port
    resolver.timeout = timeout
    resolver.lifetime = timeout
    return resolver


def _describe_resolver(resolver: dns.resolver.Resolver) -> str:
    servers = [str(ns) for ns in resolver.nameservers]
    port = resolver.port
    listed = ", ".join(
        s if port == 53 or "@" in s or "://" in s else f"{s}:{port}" for s in servers
    )
    return f"resolver {listed or '(none)'}"


def _lookup_failed(
    name: dns.name.Name | str, kind: str, exc: Exception, resolver_text: str
) -> DnsError:
    shown = _text(name) if isinstance(name, dns.name.Name) else name
    if isinstance(exc, dns.exception.Timeout):
        why = "no answer in time"
    elif isinstance(exc, dns.resolver.NoNameservers):
        why = "every nameserver failed (SERVFAIL/REFUSED)"
    else:
        why = str(exc) or type(exc).__name__
    return DnsError(
        shown,
        f"{kind} lookup via {resolver_text} failed: {why}; check acme.dns.resolver "
        "(it must be able to resolve this name) and that the name's zone is served",
    )


def _rdata_strings(rdata: dns.rdtypes.ANY.TXT.TXT) -> str:
    return b"".join(rdata.strings).decode("utf-8", errors="replace")


def _txt_rdata(value: str) -> dns.rdtypes.ANY.TXT.TXT:
    data = value.encode("utf-8")
    chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)


def _soa_in_authority(
    response: dns.message.Message | None, name: dns.name.Name
) -> dns.name.Name | None:
    """The zone named by an SOA in a negative answer's authority section, if it encloses name."""
    if response is None:
        return None
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and name.is_subdomain(rrset.name):
            return rrset.name
    return None


# --- updates -------------------------------------------------------------------------------

_RCODE_HELP = {
    dns.rcode.REFUSED: (
        "check that TSIG key {key} ({alg}, secret from {file}) is the one the server expects and "
        "that zone {zone}'s update-policy grants it TXT updates there, e.g. "
        "`update-policy {{ grant {key} zonesub TXT; }};`"
    ),
    dns.rcode.NOTAUTH: (
        "the server is not authoritative for zone {zone} or did not accept TSIG key {key}: check "
        "that acme.dns.server is the zone's primary and the TSIG key name, secret and algorithm"
    ),
    dns.rcode.NOTZONE: (
        "the name is not inside zone {zone}: set acme.dns.zone to the zone that holds it, or "
        'leave it "" to find the zone by SOA'
    ),
    dns.rcode.SERVFAIL: (
        "the server failed to apply the update: check its log (zone loaded, journal writable)"
    ),
    dns.rcode.NOTIMP: (
        "the server does not implement dynamic updates (RFC 2136): point acme.dns.server at the "
        "zone's primary with updates enabled"
    ),
    dns.rcode.FORMERR: (
        "the server could not parse the update: point acme.dns.server at a server that accepts "
        "RFC 2136 updates for zone {zone}"
    ),
}


class _OutOfTime(Exception):
    """A lookup of the propagation wait could not finish within its deadline: the `kind`
    lookup of `qname` ran out of time without an answer, or had none left to start."""

    def __init__(self, kind: str, qname: dns.name.Name, *, started: bool) -> None:
        self.kind = kind
        self.qname = qname
        self.started = started
        super().__init__(f"{kind} lookup of {_text(qname)}")

    def describe(self, resolver_text: str) -> str:
        lookup = f"the {self.kind} lookup of {_text(self.qname)} via {resolver_text}"
        if self.started:
            return f"{lookup} did not answer in time"
        return f"no time was left for {lookup} (the lookups before it were slow)"


# The seconds left before a deadline, asked before each lookup.
Remaining = Callable[[], float]


@dataclass(frozen=True)
class _Nameserver:
    name: str
    ip: str

    def describe(self, port: int) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.name} ({host}:{port})"


class DnsUpdater:
    """Adds and deletes `_acme-challenge` TXT records with TSIG-signed RFC 2136 updates."""

    def __init__(
        self,
        settings: DnsSettings,
        key: TsigKey,
        *,
        resolver: dns.resolver.Resolver | None = None,
        timeout: float = 5.0,
        poll_interval: float = 2.0,
        journal: DnsJournal | None = None,
    ) -> None:
        if key.algorithm not in TSIG_ALGORITHMS:
            raise DnsError(
                "acme.dns.tsig_algorithm",
                f"{key.algorithm!r} is not supported; use one of " + ", ".join(TSIG_ALGORITHMS),
            )
        self.settings = settings
        self.key = key
        self.resolver = resolver if resolver is not None else build_resolver(settings, timeout)
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.journal = journal  # each value added is written down there first
        self._tsig = dns.tsig.Key(_to_name(key.name), key.secret, TSIG_ALGORITHMS[key.algorithm])
        self._resolver_text = _describe_resolver(self.resolver)

    # -- lookups --

    def _resolve(
        self,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        remaining: Remaining | None,
        *,
        raise_on_no_answer: bool = True,
    ) -> dns.resolver.Answer:
        """resolver.resolve, given no longer than `remaining()` seconds (and its own lifetime);
        _OutOfTime when no time is left, or when it timed out because the time ran out."""
        if remaining is None:
            return self.resolver.resolve(qname, rdtype, raise_on_no_answer=raise_on_no_answer)
        left = remaining()
        if left <= 0:
            raise _OutOfTime(dns.rdatatype.to_text(rdtype), qname, started=False)
        lifetime = min(left, self.resolver.lifetime)
        try:
            return self.resolver.resolve(
                qname, rdtype, raise_on_no_answer=raise_on_no_answer, lifetime=lifetime
            )
        except dns.exception.Timeout:
            if lifetime < self.resolver.lifetime:  # cut short by the deadline, not its own
                raise _OutOfTime(dns.rdatatype.to_text(rdtype), qname, started=True) from None
            raise

    def _cname_target(self, name: dns.name.Name) -> dns.name.Name | None:
        try:
            answer = self.resolver.resolve(name, dns.rdatatype.CNAME)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return None
        except dns.exception.DNSException as exc:
            raise _lookup_failed(name, "CNAME", exc, self._resolver_text) from None
        for rdata in answer:
            if isinstance(rdata, dns.rdtypes.ANY.CNAME.CNAME):
                return rdata.target.derelativize(dns.name.root)
        return None

    def challenge_fqdn(self, name: str) -> str:
        """Where the TXT record for `name` goes: `_acme-challenge.<name>` after its CNAMEs."""
        base = _base_name(name)
        start = _to_name(f"{CHALLENGE_LABEL}.{base}")
        chain = [start]
        current = start
        while True:
            target = self._cname_target(current)
            if target is None:
                break
            if target in chain:
                loop = " -> ".join(_text(n) for n in [*chain[chain.index(target) :], target])
                raise DnsError(
                    _text(start),
                    f"CNAME loop ({loop}): fix the CNAME records so the chain ends at a name "
                    "whose zone accepts our updates",
                )
            chain.append(target)
            current = target
            if len(chain) > MAX_CNAME_DEPTH:
                shown = " -> ".join(_text(n) for n in chain)
                raise DnsError(
                    _text(start),
                    f"CNAME chain longer than {MAX_CNAME_DEPTH} ({shown} -> ...): point "
                    "_acme-challenge directly at the final name",
                )
        if self.settings.delegate_to:
            delegate = _to_name(self.settings.delegate_to, "acme.dns.delegate_to")
            if not current.is_subdomain(delegate):
                wanted = f"{_text(start)}. CNAME {base}.{_text(delegate)}."
                if len(chain) == 1:
                    message = (
                        f"has no CNAME, but acme.dns.delegate_to = {_text(delegate)!r} expects "
                        f"one: add `{wanted}` to the zone of {base}"
                    )
                else:
                    shown = " -> ".join(_text(n) for n in chain)
                    message = (
                        f"points outside acme.dns.delegate_to {_text(delegate)!r} ({shown}): "
                        f"replace it with `{wanted}`"
                    )
                raise DnsError(_text(start), message)
        return _text(current)

    def find_zone(self, fqdn: str, remaining: Remaining | None = None) -> str:
        """The zone holding `fqdn`: acme.dns.zone when it encloses it, else found by SOA (the
        lookups given no longer than `remaining()` seconds: _OutOfTime past that).

        acme.dns.delegate_to may be a zone of its own or a name inside one (`acme.example.net`
        in zone example.net): a name under it is looked up by SOA like any other, and only when
        that finds nothing is delegate_to taken as the zone.
        """
        name = _to_name(fqdn)
        delegate: dns.name.Name | None = None
        if self.settings.delegate_to:
            delegate = _to_name(self.settings.delegate_to, "acme.dns.delegate_to")
            if not name.is_subdomain(delegate):
                delegate = None
        if self.settings.zone:
            zone = _to_name(self.settings.zone, "acme.dns.zone")
            if name.is_subdomain(zone):
                return _text(zone)
            if delegate is None:
                raise DnsError(
                    _text(name),
                    f"is not inside acme.dns.zone {_text(zone)!r}: set acme.dns.zone to the zone "
                    'that holds it, or to "" to find the zone by SOA',
                )
        try:
            return self._zone_by_soa(name, remaining)
        except DnsError:
            if delegate is not None:
                return _text(delegate)
            raise

    def _zone_by_soa(self, name: dns.name.Name, remaining: Remaining | None) -> str:
        failures: list[str] = []
        current = name
        while len(current) > 1:
            response: dns.message.Message | None = None
            zone: dns.name.Name | None = None
            try:
                answer = self._resolve(
                    current, dns.rdatatype.SOA, remaining, raise_on_no_answer=False
                )
                if answer.rrset is not None and answer.rrset.name == current:
                    zone = current
                response = answer.response
            except dns.resolver.NXDOMAIN as exc:
                responses: dict[dns.name.Name, dns.message.Message] = exc.kwargs.get(
                    "responses", {}
                )
                response = responses.get(current)
            except dns.resolver.NoNameservers:
                failures.append(_text(current))
            except dns.exception.DNSException as exc:
                raise _lookup_failed(current, "SOA", exc, self._resolver_text) from None
            zone = zone or _soa_in_authority(response, current)
            if zone is not None and failures:
                # A zone above a name whose lookup failed (a lame delegation, a zone that did
                # not load) is not known to be where the name lives: updating it would fail
                # with a NOTAUTH naming the wrong zone, so say which lookup failed instead.
                raise DnsError(
                    _text(name),
                    f"the SOA lookup for {', '.join(failures)} failed (no nameserver via "
                    f"{self._resolver_text} answered it: SERVFAIL or REFUSED), so zone "
                    f"{_text(zone)} found above is not known to hold the name: fix the "
                    "nameservers of the zone that does, or set acme.dns.zone to it",
                )
            if zone is not None:
                return _text(zone)
            current = current.parent()
        note = f" (lookups failed for {', '.join(failures)})" if failures else ""
        raise DnsError(
            _text(name),
            f"no DNS zone found: SOA lookups via {self._resolver_text} up to the top-level "
            f"domain found none{note}; check that the name's zone exists and is served, or "
            "set acme.dns.zone",
        )

    # -- updates --

    def _server_text(self) -> str:
        return f"DNS server {self.settings.server}"

    def _update(self, fqdn: str, value: str, *, delete: bool, zone_text: str = "") -> None:
        """One TSIG-signed update; _NotApplied (a DnsError) when it certainly changed nothing."""
        name = _to_name(fqdn)
        zone = _to_name(zone_text or self.find_zone(fqdn))
        server = self.settings.server
        fmt = {
            "key": self.key.name,
            "alg": self.key.algorithm,
            "file": self.settings.tsig_secret_file or "acme.dns.tsig_secret_file",
            "zone": _text(zone),
        }
        message = dns.update.UpdateMessage(
            zone,
            keyring=self._tsig,
            keyname=self._tsig.name,
            keyalgorithm=self._tsig.algorithm,
        )
        if delete:
            message.delete(name, _txt_rdata(value))
        else:
            message.add(name, self.settings.ttl, _txt_rdata(value))
        action = "delete" if delete else "add"
        where = _text(name)
        try:
            ip = _ip_of(server, "acme.dns.server")
        except DnsError as exc:
            raise _NotApplied(exc.name, exc.message) from None
        try:
            response = dns.query.tcp(message, ip, port=server.port, timeout=self.timeout)
        except dns.tsig.PeerBadKey:
            raise _NotApplied(
                where,
                f"{self._server_text()} does not know TSIG key {fmt['key']!r} with algorithm "
                f"{fmt['alg']} (BADKEY): set acme.dns.tsig_key_name and acme.dns.tsig_algorithm "
                "to the key the server's update-policy grants",
            ) from None
        except dns.tsig.PeerBadSignature:
            raise _NotApplied(
                where,
                f"{self._server_text()} rejected the signature made with TSIG key "
                f"{fmt['key']!r} (BADSIG): the secret in {fmt['file']} does not match the "
                "server's key of that name; copy the key from the server",
            ) from None
        except dns.tsig.PeerBadTime:
            raise _NotApplied(
                where,
                f"{self._server_text()} rejected TSIG key {fmt['key']!r} because the clocks "
                "differ (BADTIME): synchronise this host's and the server's clocks (NTP)",
            ) from None
        except (dns.tsig.PeerError, dns.message.BadTSIG, dns.message.UnknownTSIGKey) as exc:
            raise DnsError(
                where,
                f"TSIG with key {fmt['key']!r} failed against {self._server_text()} "
                f"({type(exc).__name__}): check the key name, secret and algorithm",
            ) from None
        except dns.exception.Timeout:
            raise DnsError(
                where,
                f"no answer from {self._server_text()} over TCP within {self.timeout:g}s: check "
                f"acme.dns.server is the primary of zone {fmt['zone']} and reachable on TCP",
            ) from None
        except (OSError, EOFError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise DnsError(
                where,
                f"cannot send the update to {self._server_text()} over TCP ({why}): check "
                f"acme.dns.server is the primary of zone {fmt['zone']} and reachable",
            ) from None
        except dns.exception.DNSException as exc:
            raise DnsError(
                where,
                f"the update to {self._server_text()} failed ({exc}): check acme.dns.server",
            ) from None
        rcode = response.rcode()
        if rcode == dns.rcode.NOERROR:
            return
        helptext = _RCODE_HELP.get(rcode, "check the server's log").format(**fmt)
        raise _NotApplied(
            where,
            f"{self._server_text()} answered {dns.rcode.to_text(rcode)} to the TSIG-signed "
            f"update ({action} TXT in zone {fmt['zone']}): {helptext}",
        )

    def add_txt(self, fqdn: str, value: str) -> None:
        """Add one TXT rdata at `fqdn` (other values there stay), TTL acme.dns.ttl. With a
        journal the value is written down there before the update is sent (not sent when that
        fails) and crossed out again when the update certainly changed nothing."""
        if self.journal is None:
            self._update(fqdn, value, delete=False)
            return
        where = _text(_to_name(fqdn))
        zone = self.find_zone(where)
        self.journal.record(where, value, zone, str(self.settings.server))
        try:
            self._update(where, value, delete=False, zone_text=zone)
        except _NotApplied:
            self.journal.forget(where, value)
            raise
        # Any other failure (no answer in time) may still have been applied: it stays listed
        # until a delete succeeds.

    def delete_txt(self, fqdn: str, value: str) -> None:
        """Delete exactly the TXT rdata `value` at `fqdn` (a missing one is not an error). With a
        journal the value is crossed out there once deleted; when the delete fails it stays,
        a leftover for DnsJournal.sweep."""
        if self.journal is None:
            self._update(fqdn, value, delete=True)
            return
        where = _text(_to_name(fqdn))
        try:
            self._update(where, value, delete=True)
        except DnsError:
            self.journal.release(where, value)
            raise
        self.journal.forget(where, value)

    # -- propagation --

    def _nameservers(self, zone: str, remaining: Remaining | None = None) -> list[_Nameserver]:
        zone_name = _to_name(zone)
        try:
            answer = self._resolve(zone_name, dns.rdatatype.NS, remaining)
        except dns.exception.DNSException as exc:
            raise _lookup_failed(zone_name, "NS", exc, self._resolver_text) from None
        ns_names = sorted(
            {
                rd.target.derelativize(dns.name.root)
                for rd in answer
                if isinstance(rd, dns.rdtypes.ANY.NS.NS)
            }
        )
        out: list[_Nameserver] = []
        failures: list[str] = []
        for ns in ns_names:
            for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                try:
                    addresses = self._resolve(ns, rdtype, remaining)
                except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                    continue
                except dns.exception.DNSException as exc:
                    failures.append(f"{_text(ns)} {dns.rdatatype.to_text(rdtype)}: {exc}")
                    continue
                for rd in addresses:
                    if isinstance(rd, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA):
                        out.append(_Nameserver(_text(ns), str(rd.address)))
        if not out:
            names = ", ".join(_text(n) for n in ns_names) or "none"
            note = f" ({'; '.join(failures)})" if failures else ""
            raise DnsError(
                zone,
                f"cannot find the addresses of the zone's nameservers (NS: {names}) via "
                f"{self._resolver_text}{note}: check the zone's NS records and acme.dns.resolver",
            )
        return out

    def _missing_on(
        self, name: dns.name.Name, wanted: set[str], ns: _Nameserver, timeout: float
    ) -> str | None:
        """None when `ns` answers every wanted value at `name`, else what is wrong there."""
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        query.flags &= ~dns.flags.RD
        try:
            response, _ = dns.query.udp_with_fallback(
                query, ns.ip, port=self.settings.nameserver_port, timeout=timeout
            )
        except dns.exception.Timeout:
            return f"no answer within {timeout:g}s"
        except OSError as exc:
            if exc.errno in _UNREACHABLE:
                return "unreachable"
            return f"query failed ({exc.strerror or exc})"
        except (EOFError, dns.exception.DNSException) as exc:
            return f"query failed ({exc or type(exc).__name__})"
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            return "no such name (NXDOMAIN)"
        if rcode != dns.rcode.NOERROR:
            return f"answered {dns.rcode.to_text(rcode)}"
        if not response.flags & dns.flags.AA:
            return "answered without authority (not authoritative for the zone)"
        got: set[str] = set()
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.TXT and rrset.name == name:
                got.update(
                    _rdata_strings(rd) for rd in rrset if isinstance(rd, dns.rdtypes.ANY.TXT.TXT)
                )
        missing = wanted - got
        if not missing:
            return None
        if len(missing) == len(wanted):
            return (
                "does not have the TXT record yet" if len(wanted) == 1 else "has none of the values"
            )
        return f"has {len(wanted) - len(missing)} of {len(wanted)} values"

    def wait_propagated(
        self,
        fqdn: str,
        values: Collection[str],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Return once every authoritative nameserver of the zone answers all `values` at `fqdn`.

        Polls every `poll_interval` seconds; after `acme.dns.propagation_timeout` raises DnsError
        listing the nameservers still missing the record. The timeout bounds the whole wait,
        the lookups of the zone and its nameservers included.
        """
        name = _to_name(fqdn)
        wanted = set(values)
        if not wanted:
            return
        timeout = self.settings.propagation_timeout
        deadline = clock() + timeout
        zone = ""
        try:
            zone = self.find_zone(fqdn, lambda: deadline - clock())
            nameservers = self._nameservers(zone, lambda: deadline - clock())
        except _OutOfTime as late:
            looking_for = (
                f"the nameservers of zone {zone}" if zone else f"the zone of {_text(name)}"
            )
            raise DnsError(
                _text(name),
                f"acme.dns.propagation_timeout ({timeout:g}s) ran out while looking up "
                f"{looking_for}: {late.describe(self._resolver_text)}; check that "
                "acme.dns.resolver answers for the zone (and quickly), or raise "
                "acme.dns.propagation_timeout",
            ) from None
        port = self.settings.nameserver_port
        pending: dict[_Nameserver, str] = {ns: "not asked" for ns in nameservers}
        unreachable: set[_Nameserver] = set()
        while True:
            for ns in list(pending):
                query_timeout = max(0.05, min(self.timeout, deadline - clock()))
                status = self._missing_on(name, wanted, ns, query_timeout)
                if status is None:
                    del pending[ns]
                elif status == "unreachable":
                    # No route from this host (e.g. IPv6): cannot be checked from here.
                    unreachable.add(ns)
                    del pending[ns]
                else:
                    pending[ns] = status
            if not pending and len(unreachable) < len(nameservers):
                return
            now = clock()
            if now >= deadline or not pending:
                break
            sleep(max(0.0, min(self.poll_interval, deadline - now)))
        details = "; ".join(f"{ns.describe(port)}: {why}" for ns, why in pending.items())
        if not pending:
            details = "no nameserver address is reachable from this host: " + ", ".join(
                ns.describe(port) for ns in sorted(unreachable, key=lambda n: (n.name, n.ip))
            )
        raise DnsError(
            _text(name),
            f"TXT record not on every authoritative nameserver of zone {zone} after "
            f"{self.settings.propagation_timeout:g}s: {details}; check that the primary "
            "notifies its secondaries (zone transfers work), or raise "
            "acme.dns.propagation_timeout",
        )

    # -- preflight --

    def check_permission(self, name: str) -> str:
        """Add and delete a random probe TXT where `name`'s challenge would go; one-line summary."""
        fqdn = self.challenge_fqdn(name)
        zone = self.find_zone(fqdn)
        probe = "edged-preflight-" + secrets.token_hex(8)
        self.add_txt(fqdn, probe)
        self.delete_txt(fqdn, probe)
        direct = f"{CHALLENGE_LABEL}.{_base_name(name)}"
        via = f" (CNAME from {direct})" if fqdn != direct else ""
        return (
            f"{name}: DNS-01 ok: TSIG key {self.key.name!r} may add and delete TXT at {fqdn}"
            f"{via} in zone {zone} on {self.settings.server}"
        )


# --- CAA -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaaResult:
    """Whether CAA lets one of our CAs issue for `name`, and the records that decided it."""

    name: str
    allowed: bool
    owner: str  # where the relevant CAA RRset was found; "" when there is none
    records: tuple[str, ...]
    blocking: str  # the record that forbids issuance; "" when allowed
    ca_domains: tuple[str, ...] = ()
    # When a record names the CA but its RFC 8657 parameters refuse this order: why and the fix.
    refused_by_parameter: str = ""
    # The name whose lookup a CNAME led to `owner` (RFC 8659 follows aliases); "" when none.
    via: str = ""

    def describe(self) -> str:
        cas = ", ".join(self.ca_domains) or "the CA"
        if not self.owner:
            return f"{self.name}: no CAA records: any CA may issue"
        shown = "; ".join(self.records)
        at = f"{self.owner} (the CNAME target of {self.via})" if self.via else self.owner
        if self.allowed:
            return f"{self.name}: CAA at {at} allows {cas} ({shown})"
        if self.refused_by_parameter:
            return (
                f"{self.name}: CAA at {at} names {cas} but {self.blocking} "
                f"{self.refused_by_parameter} (all: {shown})"
            )
        tag = "issuewild" if self.name.startswith("*.") else "issue"
        ca = self.ca_domains[0] if self.ca_domains else "CA-DOMAIN"
        # No record can sit beside a CNAME: the fix is at the target, or in the alias itself.
        where = (
            f" (in the zone of {self.owner}: no CAA record can sit beside the CNAME at "
            f"{self.via}), or point {self.via} elsewhere"
            if self.via
            else " or remove the record"
        )
        return (
            f"{self.name}: CAA at {at} forbids issuance by {cas}: {self.blocking} "
            f'(all: {shown}); add `{self.owner}. CAA 0 {tag} "{ca}"`{where}'
        )


def _caa_text(rd: dns.rdtypes.ANY.CAA.CAA) -> str:
    value = rd.value.decode("utf-8", errors="replace")
    return f'{rd.flags} {rd.tag.decode("ascii", errors="replace")} "{value}"'


def check_caa(
    name: str,
    ca_domains: Collection[str],
    resolver: dns.resolver.Resolver,
    *,
    method: str | None = None,
    account_uri: str | None = None,
) -> CaaResult:
    """RFC 8659: may a CA in `ca_domains` issue for `name` (wildcards use issuewild if present)?
    With `method` (the ACME challenge type) and `account_uri` (the ACME account), a record's
    RFC 8657 parameters `validationmethods` and `accounturi` count too: CAs enforce them. An
    unknown account (None) is not held against `accounturi`."""
    wildcard = name.strip().startswith("*.")
    base = _base_name(name)
    shown_name = f"*.{base}" if wildcard else base
    cas = tuple(d.strip().rstrip(".").lower() for d in ca_domains if d.strip())
    resolver_text = _describe_resolver(resolver)
    current = _to_name(base)
    while len(current) > 1:
        try:
            answer = resolver.resolve(current, dns.rdatatype.CAA)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            current = current.parent()
            continue
        except dns.exception.DNSException as exc:
            raise _lookup_failed(current, "CAA", exc, resolver_text) from None
        rdatas = [rd for rd in answer if isinstance(rd, dns.rdtypes.ANY.CAA.CAA)]
        if not rdatas:
            current = current.parent()
            continue
        # Through a CNAME the records are the target's (the resolver followed it).
        owner = answer.rrset.name if answer.rrset is not None else current
        result = _evaluate_caa(shown_name, wildcard, cas, _text(owner), rdatas, method, account_uri)
        return replace(result, via=_text(current)) if owner != current else result
    return CaaResult(shown_name, True, "", (), "", cas)


def _evaluate_caa(
    name: str,
    wildcard: bool,
    cas: tuple[str, ...],
    owner: str,
    rdatas: list[dns.rdtypes.ANY.CAA.CAA],
    method: str | None = None,
    account_uri: str | None = None,
) -> CaaResult:
    records = tuple(sorted(_caa_text(rd) for rd in rdatas))
    for rd in rdatas:
        tag = rd.tag.decode("ascii", errors="replace").lower()
        if rd.flags & CAA_CRITICAL and tag not in CAA_KNOWN_TAGS:
            return CaaResult(name, False, owner, records, _caa_text(rd), cas)
    issue = [rd for rd in rdatas if rd.tag.lower() == b"issue"]
    issuewild = [rd for rd in rdatas if rd.tag.lower() == b"issuewild"]
    relevant = issuewild if wildcard and issuewild else issue
    if not relevant:
        return CaaResult(name, True, owner, records, "", cas)
    refused: tuple[dns.rdtypes.ANY.CAA.CAA, str] | None = None
    for rd in relevant:
        domain, _, parameters = rd.value.decode("utf-8", errors="replace").partition(";")
        if not domain.strip() or domain.strip().rstrip(".").lower() not in cas:
            continue
        why = _parameters_refuse(parameters, method, account_uri)
        if not why:
            return CaaResult(name, True, owner, records, "", cas)
        refused = refused or (rd, why)
    if refused is not None:
        return CaaResult(name, False, owner, records, _caa_text(refused[0]), cas, refused[1])
    return CaaResult(name, False, owner, records, _caa_text(relevant[0]), cas)


def _parameters_refuse(parameters: str, method: str | None, account_uri: str | None) -> str:
    """Why a record's RFC 8657 parameters refuse an order by `method` for `account_uri`, and
    the fix; "" when they allow it (or say nothing about what is unknown)."""
    for item in parameters.split(";"):
        key, _, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if key == "validationmethods" and method is not None:
            methods = [m.strip().lower() for m in value.split(",") if m.strip()]
            if method not in methods:
                return (
                    f"limits validation to {', '.join(methods) or 'nothing'}, not {method}: "
                    f"set acme.challenge to one of them, or add {method} to validationmethods"
                )
        if key == "accounturi" and account_uri is not None and value != account_uri:
            return (
                f"allows only the ACME account {value}, not this node's {account_uri}: put "
                "this account's URI in accounturi (or add a record for it)"
            )
    return ""
