"""Preflight: find what would make an ACME order fail before ordering (`edged check --preflight`).

For every ACME-managed site (acme configured, no cert_file) and each of its names:

- `caa`: CAA lets the CA issue (its identities come from the directory's meta.caaIdentities; a
  directory that lists none is reported as skipped);
- http-01: `points-here` (the name resolves, and to an address of this host) and `http-01` (a
  probe token served on [listen].http comes back through each resolved address with the name
  as Host); wildcards fail (they need dns-01);
- dns-01: `tsig` (the key file is usable) and `dns-01` (the zone is found and the key may add
  and delete a TXT record where the challenge goes: DnsUpdater.check_permission);
- tls-alpn-01: `points-here` as for http-01 and `tls-alpn-01` (a probe challenge put on the
  board comes back through each resolved address: a TLS connection to [listen].https offering
  only acme-tls/1 gets the probe's challenge certificate); wildcards fail (they need dns-01).

Limitation: when [listen].http cannot be bound (usually because edged runs and holds the port)
the CLI cannot put a token on the running daemon's board; it then asks for an unknown token
and passes when the server answers like edged (404 "no such challenge"): that shows edged is
reachable there, not that it is this host's edged. The daemon itself passes its own `board`
(its listeners serve it), which gives the full round trip. The same holds for tls-alpn-01 and
[listen].https: with the port busy the CLI checks that a validation for a name without a
pending challenge gets edged's answer (the no_application_protocol alert).

Results are data (`PreflightResult`) for the CLI, the admin API and the daemon; `line()` is the
CLI's `name: check: ok|FAIL: message`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import os
import secrets
import socket
import ssl
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import aiohttp
import dns.exception
import dns.rdatatype
import dns.resolver
import requests
from cryptography import x509

from edged import __version__
from edged.config import AcmeSettings, Address, Config, DnsSettings, Site
from edged.dns import DnsError, DnsUpdater, build_resolver, check_caa, load_tsig_key
from edged.dnsjournal import DnsJournal
from edged.errors import EdgedError, StoreError
from edged.http01 import CHALLENGE_PREFIX, ChallengeBoard, Http01App, HttpListeners
from edged.listen import StartupError
from edged.renewer import fetch_directory, managed_sites
from edged.store.base import Store
from edged.tlsalpn import ACME_TLS_ALPN, ID_PE_ACME_IDENTIFIER, AlpnChallengeBoard
from edged.tlsalpn import acme_identifier_value as _identifier_value

DEFAULT_TIMEOUT = 5.0
EDGED_404 = "no such challenge"  # what edged's port 80 answers for an unknown token


@dataclass(frozen=True)
class PreflightResult:
    name: str  # the DNS name (or the setting/file) checked
    check: str  # caa | points-here | http-01 | tls-alpn-01 | tsig | dns-01 | resolver
    ok: bool
    message: str
    skipped: bool = False  # ok, but the check could not be made (the message says why)

    def line(self) -> str:
        status = "ok" if self.ok else "FAIL"
        text = f"skipped, {self.message}" if self.skipped else self.message
        head = f"{self.name}: {self.check}: {status}"
        return f"{head}: {text}" if text else head

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def any_failed(results: Iterable[PreflightResult]) -> bool:
    return any(not r.ok for r in results)


def preflight_sites(config: Config, store: Store | None = None) -> list[Site]:
    """The sites edged orders for: acme configured, no cert_file (and no upload, given a store)."""
    if config.acme is None:
        return []
    if store is not None:
        return managed_sites(config, store)
    return [site for site in config.sites if site.stored]


async def run_preflight(
    config: Config,
    *,
    sites: Sequence[Site] | None = None,
    store: Store | None = None,
    ca_domains: Sequence[str] | None = None,
    board: ChallengeBoard | None = None,
    alpn_board: AlpnChallengeBoard | None = None,
    resolver: dns.resolver.Resolver | None = None,
    query_timeout: float = DEFAULT_TIMEOUT,
    journal: DnsJournal | None = None,
) -> list[PreflightResult]:
    """Every check for every name of `sites` (default: preflight_sites(config, store)).

    `ca_domains` overrides the CA's CAA identities (else read from the ACME directory).
    `board`: a ChallengeBoard that listeners already running on [listen].http serve (the
    daemon's); without one the HTTP listeners are bound here for the probe, or, when that port
    is busy, only the answer to an unknown token is checked (see the module docstring).
    `alpn_board`: the same for tls-alpn-01 and the daemon's TLS listeners.
    `resolver`: for CAA and A/AAAA lookups (default: [acme.dns].resolver, else the system's).
    `journal`: where the dns-01 probe's TXT value is written down before it is added (the
    daemon's, so a probe a crash left is deleted like a challenge's).
    """
    acme = config.acme
    if acme is None:
        return []
    chosen = list(sites) if sites is not None else preflight_sites(config, store)
    names = list(dict.fromkeys(name for site in chosen for name in site.names))
    if not names:
        return []
    results: list[PreflightResult] = []
    if resolver is None:
        try:
            resolver = await asyncio.to_thread(build_resolver, acme.dns, query_timeout)
        except DnsError as exc:
            results.append(PreflightResult(exc.name, "resolver", False, exc.message))
    if resolver is not None:
        results += await asyncio.to_thread(
            _caa_checks, acme, names, ca_domains, resolver, query_timeout, store
        )
    if acme.challenge == "http-01":
        if resolver is not None:
            results += await _http01_checks(config, names, resolver, board, query_timeout)
    elif acme.challenge == "tls-alpn-01":
        if resolver is not None:
            results += await _tls_alpn_checks(config, names, resolver, alpn_board, query_timeout)
    else:
        results += await asyncio.to_thread(_dns01_checks, acme.dns, names, query_timeout, journal)
    # Settings-wide lines (directory, key file) first, then each name's checks together.
    order = {name: i + 1 for i, name in enumerate(names)}
    return sorted(results, key=lambda r: order.get(r.name, 0))


# --- CAA -----------------------------------------------------------------------------------


class _DirectoryError(Exception):
    pass


def directory_caa_identities(settings: AcmeSettings, query_timeout: float) -> tuple[str, ...]:
    """meta.caaIdentities of the ACME directory (empty when it lists none)."""
    url = settings.directory
    try:
        body = fetch_directory(settings, query_timeout, f"edged/{__version__} preflight")
    except requests.exceptions.SSLError as exc:
        raise _DirectoryError(
            f"TLS to the ACME directory {url} failed ({exc}); if it uses a private CA, point "
            "acme.ca_bundle at that CA's certificate"
        ) from None
    except requests.exceptions.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise _DirectoryError(
            f"the ACME directory {url} answered HTTP {status}: check acme.directory"
        ) from None
    except (requests.exceptions.JSONDecodeError, ValueError):
        raise _DirectoryError(
            f"the ACME directory {url} did not answer JSON: check acme.directory"
        ) from None
    except requests.exceptions.RequestException as exc:
        raise _DirectoryError(
            f"cannot fetch the ACME directory {url} ({type(exc).__name__}): check "
            "acme.directory and the network"
        ) from None
    meta = body.get("meta") if isinstance(body, dict) else None
    identities = meta.get("caaIdentities") if isinstance(meta, dict) else None
    if not isinstance(identities, list):
        return ()
    return tuple(str(i).strip().lower() for i in identities if isinstance(i, str) and i.strip())


def _caa_checks(
    acme: AcmeSettings,
    names: Sequence[str],
    ca_domains: Sequence[str] | None,
    resolver: dns.resolver.Resolver,
    query_timeout: float,
    store: Store | None = None,
) -> list[PreflightResult]:
    account_uri = _account_uri(acme, store)
    if ca_domains is None:
        try:
            ca_domains = directory_caa_identities(acme, query_timeout)
        except _DirectoryError as exc:
            return [PreflightResult(acme.directory, "caa", False, str(exc))]
        if not ca_domains:
            return [
                PreflightResult(
                    acme.directory,
                    "caa",
                    True,
                    "the ACME directory lists no meta.caaIdentities, so the CA's CAA domain is "
                    "unknown: CAA not checked",
                    skipped=True,
                )
            ]
    out = []
    for name in names:
        try:
            result = check_caa(
                name, ca_domains, resolver, method=acme.challenge, account_uri=account_uri
            )
        except DnsError as exc:
            out.append(PreflightResult(name, "caa", False, _dns_message(name, exc)))
            continue
        text = result.describe()
        prefix = f"{result.name}: "
        out.append(PreflightResult(name, "caa", result.allowed, text.removeprefix(prefix)))
    return out


def _account_uri(acme: AcmeSettings, store: Store | None) -> str | None:
    """This node's ACME account URI for the directory (None: none yet, or unreadable)."""
    if store is None:
        return None
    try:
        found = store.load_account(acme.directory)
    except StoreError:
        return None
    uri = found[0].get("uri") if found is not None else None
    return uri if isinstance(uri, str) and uri else None


def _dns_message(name: str, exc: DnsError) -> str:
    return exc.message if exc.name == name else f"{exc.name}: {exc.message}"


# --- HTTP-01 -------------------------------------------------------------------------------


def _resolve_addresses(name: str, resolver: dns.resolver.Resolver) -> tuple[list[str], str | None]:
    """(addresses, None) or ([], why it does not resolve)."""
    servers = ", ".join(str(ns) for ns in resolver.nameservers)
    via = f"resolver {servers}" + (f" port {resolver.port}" if resolver.port != 53 else "")
    found: list[str] = []
    nxdomain = False
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        try:
            answer = resolver.resolve(name, rdtype)
        except dns.resolver.NXDOMAIN:
            nxdomain = True
            continue
        except dns.resolver.NoAnswer:
            continue
        except dns.exception.DNSException as exc:
            why = "no answer in time" if isinstance(exc, dns.exception.Timeout) else str(exc)
            return [], f"A/AAAA lookup via {via} failed ({why}): check the name's DNS"
        found += [str(rd.address) for rd in answer if hasattr(rd, "address")]
    if found:
        return list(dict.fromkeys(found)), None
    if nxdomain:
        return [], (
            f"does not exist in DNS (NXDOMAIN via {via}): add an A/AAAA record pointing at this "
            "host"
        )
    return [], f"has no A or AAAA record (via {via}): add one pointing at this host"


def is_local_address(address: str) -> bool:
    """True when this host has `address` (a socket can be bound to it)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True


def host_addresses() -> list[str]:
    """This host's global addresses from `ip -j addr` (best effort: [] when unavailable)."""
    try:
        out = subprocess.run(
            ["ip", "-j", "addr"], capture_output=True, text=True, timeout=2, check=True
        ).stdout
        interfaces = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    found: list[str] = []
    for iface in interfaces if isinstance(interfaces, list) else []:
        for info in iface.get("addr_info", []) if isinstance(iface, dict) else []:
            if isinstance(info, dict) and info.get("scope") == "global" and info.get("local"):
                found.append(str(info["local"]))
    return found


@dataclass(frozen=True)
class _Probe:
    ok: bool
    detail: str


def _url(address: str, port: int, path: str) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}{path}"


async def _probe(
    client: aiohttp.ClientSession,
    name: str,
    address: str,
    port: int,
    token: str,
    expected: str | None,
    query_timeout: float,
) -> _Probe:
    """GET the challenge path at `address` with Host `name`: `expected` body (or edged's 404)."""
    url = _url(address, port, CHALLENGE_PREFIX + token)
    where = f"http://{name}:{port}{CHALLENGE_PREFIX}{token} via {address}"
    try:
        async with client.get(
            url,
            headers={"Host": name},
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=query_timeout),
        ) as response:
            body = (await response.content.read(4096)).decode("utf-8", errors="replace")
            status = response.status
    except TimeoutError:
        return _Probe(
            False, f"{where}: no answer within {query_timeout:g}s (firewall? wrong address?)"
        )
    except aiohttp.ClientConnectorError as exc:
        code = exc.os_error.errno
        why = os.strerror(code) if code else (exc.os_error.strerror or str(exc.os_error))
        hint = (
            "nothing listens there: check that [listen].http covers this address"
            if code == errno.ECONNREFUSED
            else "check routing and firewalls"
        )
        return _Probe(False, f"{where}: cannot connect ({why}): {hint}")
    except aiohttp.ClientError as exc:
        return _Probe(False, f"{where}: request failed ({type(exc).__name__}: {exc})")
    shown = " ".join(body.split())[:80]
    if expected is not None:
        if status == 200 and body.strip() == expected:
            return _Probe(True, f"{where}: answered the probe token")
        return _Probe(
            False,
            f"{where}: answered HTTP {status} {shown!r} instead of the probe token: another "
            "server (or a proxy in front of this host) answers there",
        )
    if status == 404 and body.strip() == EDGED_404:
        return _Probe(True, f"{where}: reached a server on port {port} that answers like edged")
    return _Probe(
        False,
        f"{where}: port {port} is held by a server that is not edged (answered HTTP {status} "
        f"{shown!r} to an unknown token): the CA's requests would go there; stop it or give "
        f"edged port {port}",
    )


async def _resolve_for_probe(
    names: Sequence[str], resolver: dns.resolver.Resolver, check: str
) -> tuple[list[PreflightResult], dict[str, list[str]]]:
    """The addresses of each name a probe can check, and a result for each it cannot: a
    wildcard (`check` cannot validate one) or a name that does not resolve here."""
    out: list[PreflightResult] = []
    resolved: dict[str, list[str]] = {}
    for name in names:
        if name.startswith("*."):
            out.append(
                PreflightResult(
                    name,
                    check,
                    False,
                    'wildcards need dns-01: set acme.challenge = "dns-01" with an [acme.dns] '
                    "table, or list the names without the wildcard",
                )
            )
            continue
        addresses, why = await asyncio.to_thread(_resolve_addresses, name, resolver)
        if why is not None:
            out.append(PreflightResult(name, "points-here", False, why))
            continue
        resolved[name] = addresses
    return out, resolved


async def _http01_checks(
    config: Config,
    names: Sequence[str],
    resolver: dns.resolver.Resolver,
    board: ChallengeBoard | None,
    query_timeout: float,
) -> list[PreflightResult]:
    out, resolved = await _resolve_for_probe(names, resolver, "http-01")
    if not resolved:
        return out
    listen: list[Address] = list(config.listen.http)
    if not listen:
        for name in resolved:
            out.append(
                PreflightResult(
                    name,
                    "http-01",
                    False,
                    "listen.http is [] (no port 80 listener): HTTP-01 needs one, e.g. "
                    'http = ["0.0.0.0:80"], or use dns-01',
                )
            )
        return out
    port = listen[0].port
    token = "edged-preflight-" + secrets.token_urlsafe(12)
    expected: str | None = token + ".preflight"
    own: HttpListeners | None = None
    busy = ""
    probe_board = board
    if probe_board is None:
        probe_board = ChallengeBoard()
        own = HttpListeners(Http01App(probe_board, lambda: config))
        try:
            await own.sync(listen)
        except StartupError as exc:
            await own.close()
            own = None
            probe_board = None
            expected = None
            busy = str(exc)
    try:
        if probe_board is not None:
            # In a fleet the board also writes to Redis (blocking): never on the loop.
            with contextlib.suppress(EdgedError):  # on this node's board all the same
                await asyncio.to_thread(
                    probe_board.add,
                    token,
                    token + ".preflight",
                    list(resolved),
                    query_timeout * 4 + 60,
                )
        async with aiohttp.ClientSession() as client:
            for name, addresses in resolved.items():
                probes = {
                    a: await _probe(client, name, a, port, token, expected, query_timeout)
                    for a in addresses
                }
                out += await asyncio.to_thread(_judge, name, addresses, probes, port, busy)
    finally:
        if probe_board is not None:
            await asyncio.to_thread(probe_board.remove, token)
        if own is not None:
            await own.close()
    return out


def _judge(
    name: str, addresses: list[str], probes: dict[str, _Probe], port: int, busy: str
) -> list[PreflightResult]:
    shown = ", ".join(addresses)
    foreign = [a for a in addresses if not is_local_address(a)]
    nat = [a for a in foreign if probes[a].ok and not busy]
    missing = [a for a in foreign if a not in nat]
    if missing:
        mine = host_addresses()
        have = f" (this host has {', '.join(mine)})" if mine else ""
        points = PreflightResult(
            name,
            "points-here",
            False,
            f"resolves to {shown}, but {', '.join(missing)} is not an address of this host"
            f"{have} and the probe did not reach this host through it: point the name's "
            "A/AAAA records here",
        )
    elif nat:
        points = PreflightResult(
            name,
            "points-here",
            True,
            f"resolves to {shown}; {', '.join(nat)} is not an address of this host but the "
            "probe through it reached this host (NAT or port forwarding)",
        )
    else:
        points = PreflightResult(name, "points-here", True, f"resolves to {shown} (this host)")
    note = (
        f"; note: the CA connects to port 80, listen.http uses port {port}: port 80 must be "
        "forwarded to it"
        if port != 80
        else ""
    )
    failures = [probes[a].detail for a in addresses if not probes[a].ok]
    if failures:
        check = PreflightResult(name, "http-01", False, "; ".join(failures))
    elif busy:
        check = PreflightResult(
            name,
            "http-01",
            True,
            f"reached a server on port {port} via {shown} that answers like edged (404 for an "
            f"unknown token); the port is busy ({busy}), presumably the running edged, so the "
            f"token round trip itself was not tested{note}",
        )
    else:
        check = PreflightResult(
            name,
            "http-01",
            True,
            f"a probe token served on port {port} came back via {shown}{note}",
        )
    return [points, check]


# --- TLS-ALPN-01 ---------------------------------------------------------------------------


def _tls_probe(name: str, address: str, port: int, expected: str | None, timeout: float) -> _Probe:
    """Blocking: a validation-like connection (SNI `name`, ALPN acme-tls/1 only) to `address`.
    `expected`: the probe's key authorization (None: only check that edged refuses it)."""
    where = f"{name} via {address}:{port}"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the challenge certificate is self-signed by design
    ctx.set_alpn_protocols([ACME_TLS_ALPN])
    try:
        with (
            socket.create_connection((address, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=name) as tls,
        ):
            alpn = tls.selected_alpn_protocol()
            der = tls.getpeercert(binary_form=True) or b""
    except ssl.SSLError as exc:
        # OpenSSL's reason for this alert has no name in Python's table: match the text too.
        refused = "no application protocol" in str(exc).lower().replace("_", " ")
        if refused and expected is None:
            return _Probe(True, f"{where}: answered like edged (no pending challenge: refused)")
        return _Probe(
            False,
            f"{where}: the TLS handshake failed ({exc.reason or exc}): another server (or a "
            "proxy in front of this host) answers there, or not this edged",
        )
    except TimeoutError:
        return _Probe(False, f"{where}: no answer within {timeout:g}s (firewall? wrong address?)")
    except OSError as exc:
        hint = (
            "nothing listens there: check that [listen].https covers this address"
            if exc.errno == errno.ECONNREFUSED
            else "check routing and firewalls"
        )
        return _Probe(False, f"{where}: cannot connect ({exc.strerror or exc}): {hint}")
    if expected is None or alpn != ACME_TLS_ALPN:
        return _Probe(
            False,
            f"{where}: a server answered an acme-tls/1 connection with ALPN {alpn!r} instead of "
            "edged's answer: another server (or a TLS proxy) answers there",
        )
    try:
        cert = x509.load_der_x509_certificate(der)
        value = cert.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER).value
        got = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    except (ValueError, x509.ExtensionNotFound):
        got = b""
    if got != _identifier_value(expected):
        return _Probe(
            False,
            f"{where}: answered with a certificate that is not the probe's challenge "
            "certificate: another server (or another edged) answers there",
        )
    return _Probe(True, f"{where}: answered the probe challenge")


async def _tls_alpn_checks(
    config: Config,
    names: Sequence[str],
    resolver: dns.resolver.Resolver,
    board: AlpnChallengeBoard | None,
    query_timeout: float,
) -> list[PreflightResult]:
    from edged.renewer import serve_tls_alpn  # the renewer imports this module lazily too

    out, resolved = await _resolve_for_probe(names, resolver, "tls-alpn-01")
    if not resolved:
        return out
    if not config.listen.https:
        for name in resolved:
            out.append(
                PreflightResult(
                    name,
                    "tls-alpn-01",
                    False,
                    "listen.https is [] (no TLS listener): TLS-ALPN-01 is answered there, e.g. "
                    'https = ["0.0.0.0:443"]',
                )
            )
        return out
    port = config.listen.https[0].port
    key_authorization = "edged-preflight-" + secrets.token_urlsafe(12)
    expected: str | None = key_authorization
    busy = ""
    async with contextlib.AsyncExitStack() as stack:
        probe_board = board
        if probe_board is None:
            try:
                probe_board = AlpnChallengeBoard()
                await stack.enter_async_context(serve_tls_alpn(config, probe_board))
            except StartupError as exc:
                probe_board, expected, busy = None, None, str(exc)
        if probe_board is not None:
            for name in resolved:  # on this node only: never in the fleet's shared store
                await asyncio.to_thread(
                    probe_board.add, name, key_authorization, query_timeout * 4 + 60, share=False
                )
                stack.callback(probe_board.remove, name, share=False)
        for name, addresses in resolved.items():
            probes = {
                a: await asyncio.to_thread(_tls_probe, name, a, port, expected, query_timeout)
                for a in addresses
            }
            out += await asyncio.to_thread(_judge_tls_alpn, name, addresses, probes, port, busy)
    return out


def _judge_tls_alpn(
    name: str, addresses: list[str], probes: dict[str, _Probe], port: int, busy: str
) -> list[PreflightResult]:
    points = _judge(name, addresses, probes, port, busy)[0]  # the same rule as for http-01
    note = (
        f"; note: the CA connects to port 443, listen.https uses port {port}: port 443 must be "
        "forwarded to it"
        if port != 443
        else ""
    )
    failures = [probes[a].detail for a in addresses if not probes[a].ok]
    shown = ", ".join(addresses)
    if failures:
        check = PreflightResult(name, "tls-alpn-01", False, "; ".join(failures))
    elif busy:
        check = PreflightResult(
            name,
            "tls-alpn-01",
            True,
            f"reached a TLS server on port {port} via {shown} that refuses an unknown validation "
            f"like edged; the port is busy ({busy}), presumably the running edged, so the "
            f"challenge round trip itself was not tested{note}",
        )
    else:
        check = PreflightResult(
            name,
            "tls-alpn-01",
            True,
            f"a probe challenge answered on port {port} came back via {shown}{note}",
        )
    return [points, check]


# --- DNS-01 --------------------------------------------------------------------------------


def _dns01_checks(
    settings: DnsSettings | None,
    names: Sequence[str],
    query_timeout: float,
    journal: DnsJournal | None = None,
) -> list[PreflightResult]:
    if settings is None:
        return [
            PreflightResult(
                "acme.dns", "dns-01", False, "acme.challenge is dns-01 but [acme.dns] is missing"
            )
        ]
    source = str(settings.tsig_secret_file or "acme.dns.tsig_secret_file")
    try:
        key = load_tsig_key(settings)
        updater = DnsUpdater(settings, key, timeout=query_timeout, journal=journal)
    except DnsError as exc:
        return [PreflightResult(exc.name, "tsig", False, exc.message)]
    out = [
        PreflightResult(
            source, "tsig", True, f"key {key.name!r} ({key.algorithm}) read from {source}"
        )
    ]
    for name in names:
        try:
            summary = updater.check_permission(name)
        except DnsError as exc:
            out.append(PreflightResult(name, "dns-01", False, _dns_message(name, exc)))
            continue
        out.append(
            PreflightResult(name, "dns-01", True, summary.removeprefix(f"{name}: DNS-01 ok: "))
        )
    return out
