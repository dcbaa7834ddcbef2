"""Prometheus metrics: a collector that reads the live state at scrape time, and its server.

Nothing is copied into prometheus-client metric objects as it happens: the data path increments
plain integers in `Counters`, and `EdgedCollector.collect` turns those and the current
certificate and renewal state into metric families when Prometheus asks. Collection only reads
memory, so it runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import platform
import socket
import ssl
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, cast

from aiohttp import web
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from edged import __version__
from edged.config import Address
from edged.counters import RENEWAL_RESULTS, TLS_ALPN_RESULTS, Counters
from edged.errors import EdgedError

log = logging.getLogger("edged.metrics")

CERT_STATES = ("processing", "active", "failed")  # edged_cert_state{state}: one series each

# The families with a series per name (100k names: ~700k lines), rendered by render_per_name.
NOT_AFTER_HELP = "Expiry (notAfter) of the certificate served for a name, as a unix timestamp."
NOT_BEFORE_HELP = (
    "Start of validity (notBefore) of the certificate served for a name, unix timestamp."
)
FALLBACK_HELP = "1 while a name is served its previous certificate because renewal failed, else 0."
STATE_HELP = (
    "Renewal state of a name: 1 on the series of its current state "
    "(processing, active, failed), 0 on the others."
)
ATTEMPTS_HELP = "Certificate issuance and renewal attempts per name, by result (success, failure)."


@dataclass(frozen=True)
class CertMetric:
    """One certificate being served: a site `name` can have one per key type."""

    name: str  # the configured name, never raw SNI
    key_type: str  # "ecdsa-p256", "rsa-2048", …
    not_before: float  # unix seconds
    not_after: float  # unix seconds


@dataclass(frozen=True)
class NameStatus:
    """The renewal state of one configured name."""

    name: str
    state: str  # one of CERT_STATES
    fallback_active: bool  # serving an old certificate because renewal failed


class MetricsSource(Protocol):
    """What the collector reads. The daemon adapts its live objects to this; a multi-process
    source can sum the workers' counters with `merge_counters`."""

    @property
    def counters(self) -> Counters: ...

    def connections_active(self) -> int: ...

    def cert_metrics(self) -> Iterable[CertMetric]: ...

    def name_statuses(self) -> Iterable[NameStatus]: ...


def openssl_version() -> str:
    """ "3.0.15" from "OpenSSL 3.0.15 3 Sep 2024" (the whole string if it looks different)."""
    parts = ssl.OPENSSL_VERSION.split()
    return parts[1] if len(parts) > 1 and parts[0] == "OpenSSL" else ssl.OPENSSL_VERSION


class EdgedCollector(Collector):
    """Builds every `edged_*` metric family from a MetricsSource on each scrape."""

    def __init__(self, source: MetricsSource, *, per_name: bool = True) -> None:
        self.source = source
        # False: the families with a series per name are left to render_per_name.
        self.per_name = per_name
        self.build_labels = (__version__, platform.python_version(), openssl_version())

    def collect(self) -> Iterator[Metric]:
        if self.per_name:
            yield from self._certs()
        yield from self._data_path(self.source.counters, self.source.connections_active())
        yield from self._renewal(self.source.counters)
        yield from self._reloads(self.source.counters)
        up = getattr(self.source, "store_available", None)
        if callable(up):
            yield GaugeMetricFamily(
                "edged_store_available",
                "1 while the certificate store answers (0: a Redis outage; serving goes on "
                "from the local copy, renewals wait).",
                value=1 if up() else 0,
            )
        shared = getattr(self.source, "shared_certs", None)
        found = shared() if callable(shared) else None
        if found is not None:
            segments, size = found
            yield GaugeMetricFamily(
                "edged_worker_shared_cert_segments",
                "Shared-memory segments holding the certificates the worker processes serve.",
                value=segments,
            )
            yield GaugeMetricFamily(
                "edged_worker_shared_cert_bytes",
                "Bytes of those segments: in memory once for all workers (not in any "
                "process's RSS until it reads them).",
                value=size,
            )
        info = GaugeMetricFamily(
            "edged_build_info",
            "Always 1; the labels say which edged, Python and OpenSSL versions run.",
            labels=["version", "python", "openssl"],
        )
        info.add_metric(list(self.build_labels), 1)
        yield info

    def _certs(self) -> Iterator[Metric]:
        not_after = GaugeMetricFamily(
            "edged_cert_not_after_seconds", NOT_AFTER_HELP, labels=["name", "key_type"]
        )
        not_before = GaugeMetricFamily(
            "edged_cert_not_before_seconds", NOT_BEFORE_HELP, labels=["name", "key_type"]
        )
        for (name, key_type), cert in _certs_by_series(self.source):
            not_after.add_metric([name, key_type], cert.not_after)
            not_before.add_metric([name, key_type], cert.not_before)
        yield not_after
        yield not_before
        fallback = GaugeMetricFamily("edged_cert_fallback_active", FALLBACK_HELP, labels=["name"])
        state = GaugeMetricFamily("edged_cert_state", STATE_HELP, labels=["name", "state"])
        for name, status in _statuses_by_name(self.source):
            fallback.add_metric([name], 1 if status.fallback_active else 0)
            for candidate in CERT_STATES:
                state.add_metric([name, candidate], 1 if status.state == candidate else 0)
        yield fallback
        yield state

    def _data_path(self, c: Counters, active: int) -> Iterator[Metric]:
        handshakes = CounterMetricFamily(
            "edged_tls_handshakes",
            "TLS handshakes by result (ok, no_cert, no_shared_cipher, timeout, protocol_error, "
            "...) and negotiated or offered TLS version.",
            labels=["result", "version"],
        )
        for (result, version), n in sorted(c.handshakes.items()):
            handshakes.add_metric([result, version], n)
        yield handshakes
        yield GaugeMetricFamily(
            "edged_connections_active",
            "Client connections open now (in handshake or proxying).",
            value=active,
        )
        yield CounterMetricFamily(
            "edged_connections",
            "Client connections accepted on the TLS listeners.",
            value=c.connections_total,
        )
        refused = CounterMetricFamily(
            "edged_connections_refused",
            "Client connections reset before reading anything, by the limit they hit "
            "(max_connections, max_connections_per_ip).",
            labels=["reason"],
        )
        for reason, n in sorted(c.connections_refused.items()):
            refused.add_metric([reason], n)
        yield refused
        closed = CounterMetricFamily(
            "edged_connections_closed",
            "Client connections closed after they were accepted, by why they ended (done, "
            "client_closed, idle_timeout, handshake_failed, backend_error, tls_error, ...).",
            labels=["reason"],
        )
        for reason, n in sorted(c.connections_closed.items()):
            closed.add_metric([reason], n)
        yield closed
        traffic = CounterMetricFamily(
            "edged_bytes",
            "Plaintext bytes proxied: direction in = client to backend, out = backend to client.",
            labels=["direction"],
        )
        traffic.add_metric(["in"], c.bytes_in)
        traffic.add_metric(["out"], c.bytes_out)
        yield traffic
        backend = CounterMetricFamily(
            "edged_backend_errors",
            "Failures talking to backends (connect refused, timeout, reset, ...) by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(c.backend_errors.items()):
            backend.add_metric([reason], n)
        yield backend
        yield CounterMetricFamily(
            "edged_tls_ticket_key_rotations",
            "TLS session ticket key rotations ([tls] ticket_key_rotation).",
            value=c.ticket_key_rotations,
        )
        yield CounterMetricFamily(
            "edged_worker_restarts",
            "Worker processes that died and were replaced ([edged] workers > 1).",
            value=c.worker_restarts,
        )

    def _renewal(self, c: Counters) -> Iterator[Metric]:
        if self.per_name:
            attempts = CounterMetricFamily(
                "edged_renewal_attempts", ATTEMPTS_HELP, labels=["name", "result"]
            )
            for name in _attempted_names(c):
                for result in RENEWAL_RESULTS:
                    attempts.add_metric([name, result], c.renewal_attempts[name, result])
            yield attempts
        alpn = CounterMetricFamily(
            "edged_acme_tls_alpn_handshakes",
            "TLS-ALPN-01 validation connections (ALPN exactly acme-tls/1) by result: answered "
            "with the challenge certificate, no_challenge (refused: no pending challenge for "
            "the name), failed (the handshake did not complete).",
            labels=["result"],
        )
        for result in TLS_ALPN_RESULTS:
            alpn.add_metric([result], c.acme_tls_alpn[result])
        yield alpn
        yield CounterMetricFamily(
            "edged_dns01_leftovers_removed",
            "DNS-01 TXT values left in DNS by interrupted orders (a crash, a failed delete) "
            "and deleted later from this node's journal.",
            value=c.dns01_leftovers_removed,
        )
        leftovers = getattr(self.source, "dns01_leftovers", None)
        if callable(leftovers):
            yield GaugeMetricFamily(
                "edged_dns01_leftovers",
                "DNS-01 TXT values interrupted orders left in DNS that this node has not "
                "deleted yet (a delete failed: retried every acme.retry_interval; see the log).",
                value=leftovers(),
            )
        snap = c.acme_requests.snapshot()
        bounds = [repr(b) for b in snap.bounds] + ["+Inf"]  # "0.005", "1.0" as the client does
        yield HistogramMetricFamily(
            "edged_acme_request_seconds",
            "Duration of HTTP requests to the ACME server, in seconds.",
            buckets=list(zip(bounds, snap.cumulative, strict=True)),
            sum_value=snap.sum,
        )

    def _reloads(self, c: Counters) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            "edged_reloads",
            "Configuration and certificate reloads by trigger (kind) and result.",
            labels=["kind", "result"],
        )
        for (kind, result), n in sorted(c.reloads.items()):
            reloads.add_metric([kind, result], n)
        yield reloads
        yield GaugeMetricFamily(
            "edged_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful (re)load of the configuration; 0 before the first.",
            value=c.last_reload_success,
        )
        durations = HistogramMetricFamily(
            "edged_reload_duration_seconds",
            "Seconds a reload took, accepted or rejected, by scope: full (the config and every "
            "site's certificates) or names (the store certificates of a few names).",
            labels=["scope"],
        )
        for scope, histogram in (
            ("full", c.full_reload_seconds),
            ("names", c.names_reload_seconds),
        ):
            snap = histogram.snapshot()
            bounds = [repr(b) for b in snap.bounds] + ["+Inf"]
            durations.add_metric(
                [scope], list(zip(bounds, snap.cumulative, strict=True)), sum_value=snap.sum
            )
        yield durations


def build_registry(
    source: MetricsSource, *, process: bool = True, per_name: bool = True
) -> CollectorRegistry:
    """A fresh registry (not prometheus-client's global one) with the edged collector and,
    unless `process` is False, the process_* metrics (memory, CPU, open files); `per_name`
    False leaves out the families with a series per name (render_per_name writes them)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgedCollector(source, per_name=per_name))
    if process:
        ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format (version 0.0.4) of everything in `registry`."""
    return generate_latest(registry)


INDEX_HTML = (
    b"<!DOCTYPE html><html><head><title>edged metrics</title></head><body>"
    b'<h1>edged</h1><p><a href="/metrics">Metrics</a></p></body></html>\n'
)


def freeze(source: MetricsSource) -> MetricsSource:
    """What one scrape reads of `source`, taken on the event loop so that rendering it can
    run in a thread: the source's own `frozen()` (copies of what changes in place, references
    to what is only ever replaced), else `source` itself."""
    frozen = getattr(source, "frozen", None)
    return frozen() if callable(frozen) else source


def scrape(source: MetricsSource, *, process: bool = True) -> bytes:
    """The text exposition of a frozen source: what `render(build_registry(source))` gives,
    the families with a series per name written directly (blocking)."""
    return render_per_name(source) + render(build_registry(source, process=process, per_name=False))


# In the order the source gives (the config's): not sorted, as one sort of 100k series holds
# the interpreter's lock for ~0.1 s, which the data path (on the event loop) would wait for.


def _certs_by_series(source: MetricsSource) -> list[tuple[tuple[str, str], CertMetric]]:
    # A dict per label set: a duplicate from the source must not become a duplicate series.
    return list({(c.name, c.key_type): c for c in source.cert_metrics()}.items())


def _statuses_by_name(source: MetricsSource) -> list[tuple[str, NameStatus]]:
    return list({s.name: s for s in source.name_statuses()}.items())


def _attempted_names(c: Counters) -> list[str]:
    # Both results for every name seen, so increase(...{result="failure"}) has a series.
    return list(dict.fromkeys(name for name, _ in c.renewal_attempts))


# How prometheus-client writes a value (as Go does: 1.8e+09, 3.0); typed here.
_go_float = cast(Callable[[float], str], floatToGoString)
_ONE, _ZERO = _go_float(1), _go_float(0)
_count_text = functools.lru_cache(maxsize=1024)(_go_float)  # counts repeat, timestamps do not


def _label(value: str) -> str:
    """A label value escaped for the text format (names from the config rarely need it)."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def _family(name: str, help_text: str, kind: str) -> str:
    doc = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


def render_per_name(source: MetricsSource) -> bytes:
    """The families with a series per name, as generate_latest writes them (labels in name
    order, values as Go formats floats), ~5x faster than building them as Metric objects:
    at 100k names a scrape cost ~5 s of CPU that way."""
    out: list[str] = []
    certs = _certs_by_series(source)
    labels = [f'key_type="{_label(k)}",name="{_label(n)}"' for (n, k), _ in certs]
    out.append(_family("edged_cert_not_after_seconds", NOT_AFTER_HELP, "gauge"))
    out.extend(
        f"edged_cert_not_after_seconds{{{label}}} {_go_float(cert.not_after)}\n"
        for label, (_, cert) in zip(labels, certs, strict=True)
    )
    out.append(_family("edged_cert_not_before_seconds", NOT_BEFORE_HELP, "gauge"))
    out.extend(
        f"edged_cert_not_before_seconds{{{label}}} {_go_float(cert.not_before)}\n"
        for label, (_, cert) in zip(labels, certs, strict=True)
    )
    statuses = _statuses_by_name(source)
    names = [_label(name) for name, _ in statuses]
    out.append(_family("edged_cert_fallback_active", FALLBACK_HELP, "gauge"))
    out.extend(
        f'edged_cert_fallback_active{{name="{name}"}} {_ONE if status.fallback_active else _ZERO}\n'
        for name, (_, status) in zip(names, statuses, strict=True)
    )
    out.append(_family("edged_cert_state", STATE_HELP, "gauge"))
    for name, (_, status) in zip(names, statuses, strict=True):
        for candidate in CERT_STATES:
            value = _ONE if status.state == candidate else _ZERO
            out.append(f'edged_cert_state{{name="{name}",state="{candidate}"}} {value}\n')
    c = source.counters
    out.append(_family("edged_renewal_attempts_total", ATTEMPTS_HELP, "counter"))
    for name in _attempted_names(c):
        escaped = _label(name)
        for result in RENEWAL_RESULTS:
            n = _count_text(c.renewal_attempts[name, result])
            out.append(f'edged_renewal_attempts_total{{name="{escaped}",result="{result}"}} {n}\n')
    return "".join(out).encode()


def build_app(source: MetricsSource) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        try:
            # Rendered in a thread: with 100k names a scrape takes ~2 s of CPU, which the
            # data path used to wait for on every scrape.
            body = await asyncio.to_thread(scrape, freeze(source))
        except Exception as exc:
            log.error("metrics: collection failed: %s: %s", type(exc).__name__, exc)
            return web.Response(
                status=500, text=f"metrics collection failed: {type(exc).__name__}: {exc}\n"
            )
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    async def index(request: web.Request) -> web.Response:
        return web.Response(body=INDEX_HTML, content_type="text/html")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", index)
    return app


class MetricsServerError(EdgedError):
    """The metrics listener cannot be opened; the message names the address and the fix."""


def _bind_unix(path: str) -> socket.socket:
    """A bound (not yet listening) unix socket at `path`, mode 0600 before anyone can connect.
    A stale socket file is replaced; a live one or any other file is left alone."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise MetricsServerError(
                f"cannot listen on unix:{path}: a file that is not a socket is there; remove it"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # left by a process that is gone
        except OSError:
            pass  # bind below reports the problem
        else:
            raise MetricsServerError(
                f"cannot listen on unix:{path}: another process listens there (another edged?)"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Nobody can connect before listen(): setting the mode now leaves no window.
        os.chmod(path, 0o600)
    except OSError as exc:
        sock.close()
        raise MetricsServerError(f"cannot listen on unix:{path}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


async def start_metrics_server(address: Address, source: MetricsSource) -> web.AppRunner:
    """Serve GET /metrics of `source` (and a small index at /) on `address`; stop with
    `runner.cleanup()`. Raises MetricsServerError when the address cannot be used."""
    runner = web.AppRunner(build_app(source), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site: web.BaseSite
        if address.is_unix:
            site = web.SockSite(runner, _bind_unix(address.path))
        else:
            site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        hint = {
            errno.EADDRINUSE: "another process listens there",
            errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
            errno.EADDRNOTAVAIL: "this host has no such address",
        }.get(exc.errno or 0, "check [listen].metrics")
        raise MetricsServerError(f"cannot listen on {address}: {exc.strerror}: {hint}") from None
    except BaseException:
        await runner.cleanup()
        raise
    log.info("metrics: serving on %s", address)
    return runner
