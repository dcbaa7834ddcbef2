"""Prometheus metrics: a collector that reads the live state at scrape time, and its server.

Nothing is copied into prometheus-client metric objects as it happens: the data path increments
plain integers in `Counters`, and `EdgedCollector.collect` turns those and the current
certificate and renewal state into metric families when Prometheus asks. Collection only reads
memory, so it runs on the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import platform
import socket
import ssl
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

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

from edged import __version__
from edged.config import Address
from edged.counters import RENEWAL_RESULTS, TLS_ALPN_RESULTS, Counters
from edged.errors import EdgedError

log = logging.getLogger("edged.metrics")

CERT_STATES = ("processing", "active", "failed")  # edged_cert_state{state}: one series each


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

    def __init__(self, source: MetricsSource) -> None:
        self.source = source
        self.build_labels = (__version__, platform.python_version(), openssl_version())

    def collect(self) -> Iterator[Metric]:
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
            "edged_cert_not_after_seconds",
            "Expiry (notAfter) of the certificate served for a name, as a unix timestamp.",
            labels=["name", "key_type"],
        )
        not_before = GaugeMetricFamily(
            "edged_cert_not_before_seconds",
            "Start of validity (notBefore) of the certificate served for a name, unix timestamp.",
            labels=["name", "key_type"],
        )
        # A dict per label set: a duplicate from the source must not become a duplicate series.
        certs = {(c.name, c.key_type): c for c in self.source.cert_metrics()}
        for (name, key_type), cert in sorted(certs.items()):
            not_after.add_metric([name, key_type], cert.not_after)
            not_before.add_metric([name, key_type], cert.not_before)
        yield not_after
        yield not_before

        fallback = GaugeMetricFamily(
            "edged_cert_fallback_active",
            "1 while a name is served its previous certificate because renewal failed, else 0.",
            labels=["name"],
        )
        state = GaugeMetricFamily(
            "edged_cert_state",
            "Renewal state of a name: 1 on the series of its current state "
            "(processing, active, failed), 0 on the others.",
            labels=["name", "state"],
        )
        statuses = {s.name: s for s in self.source.name_statuses()}
        for name, status in sorted(statuses.items()):
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
        attempts = CounterMetricFamily(
            "edged_renewal_attempts",
            "Certificate issuance and renewal attempts per name, by result (success, failure).",
            labels=["name", "result"],
        )
        # Both results for every name seen, so increase(...{result="failure"}) has a series.
        names = {name for name, _ in c.renewal_attempts}
        for name in sorted(names):
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


def build_registry(source: MetricsSource, *, process: bool = True) -> CollectorRegistry:
    """A fresh registry (not prometheus-client's global one) with the edged collector and,
    unless `process` is False, the process_* metrics (memory, CPU, open files)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgedCollector(source))
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


def build_app(registry: CollectorRegistry) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        try:
            body = render(registry)
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


async def start_metrics_server(address: Address, registry: CollectorRegistry) -> web.AppRunner:
    """Serve GET /metrics (and a small index at /) on `address`; stop with `runner.cleanup()`.
    Raises MetricsServerError when the address cannot be used."""
    runner = web.AppRunner(build_app(registry), access_log=None, handle_signals=False)
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
