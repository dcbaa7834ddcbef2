"""The Prometheus side: the collector reads live state at scrape time, served over HTTP."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import shutil
import socket
import stat
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from edged import __version__
from edged.config import Address
from edged.counters import (
    ACME_REQUEST_BUCKETS,
    RELOAD_BUCKETS,
    Counters,
    LatencyHistogram,
    merge_counters,
)
from edged.metrics import (
    CertMetric,
    MetricsServerError,
    NameStatus,
    build_registry,
    openssl_version,
    render,
    render_per_name,
    scrape,
    start_metrics_server,
)
from tests.conftest import free_port, run_cmd

A, B = "a.example.test", "b.example.test"  # configured names
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: scripts/install")


@dataclass
class FakeSource:
    """A concrete MetricsSource over real Counters."""

    counters: Counters = field(default_factory=Counters)
    active: int = 0
    certs: list[CertMetric] = field(default_factory=list)
    statuses: list[NameStatus] = field(default_factory=list)
    fail: bool = False
    leftovers: int = 0  # DNS-01 TXT values interrupted orders left, not deleted yet

    def connections_active(self) -> int:
        if self.fail:
            raise RuntimeError("state is broken")
        return self.active

    def cert_metrics(self) -> Iterable[CertMetric]:
        return list(self.certs)

    def name_statuses(self) -> Iterable[NameStatus]:
        return list(self.statuses)

    def dns01_leftovers(self) -> int:
        return self.leftovers


def filled_source() -> FakeSource:
    c = Counters()
    c.handshakes["ok", "TLSv1.3"] += 7
    c.handshakes["ok", "TLSv1.2"] += 2
    c.handshakes["no_cert", "TLSv1.3"] += 1
    c.connections_total = 10
    c.connections_refused["limit"] += 3
    c.connections_closed["idle_timeout"] += 2
    c.bytes_in = 1234
    c.bytes_out = 56789
    c.backend_errors["connect_refused"] += 4
    c.reloads["signal", "success"] += 2
    c.reloads["file", "failure"] += 1
    c.last_reload_success = 1_700_000_123.5
    c.renewal_attempts[A, "success"] += 3
    c.renewal_attempts[B, "failure"] += 5
    c.ticket_key_rotations = 2
    c.worker_restarts = 1
    c.acme_tls_alpn["answered"] += 2
    c.acme_tls_alpn["no_challenge"] += 1
    c.dns01_leftovers_removed = 3
    for seconds in (0.001, 0.005, 0.2, 0.2, 3.0, 45.0):
        c.acme_requests.observe(seconds)
    c.full_reload_seconds.observe(1.5)
    c.names_reload_seconds.observe(0.02)
    c.names_reload_seconds.observe(0.03)
    return FakeSource(
        counters=c,
        active=5,
        certs=[
            CertMetric(A, "ecdsa-p256", 1_690_000_000.0, 1_697_776_000.0),
            CertMetric(A, "rsa-2048", 1_690_000_001.0, 1_697_776_001.0),
        ],
        statuses=[
            NameStatus(A, "active", False),
            NameStatus(B, "failed", True),
        ],
        leftovers=1,
    )


Key = tuple[str, frozenset[tuple[str, str]]]


def edged_samples(text: str) -> dict[Key, float]:
    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("edged_"):
                key = (s.name, frozenset(s.labels.items()))
                assert key not in out, f"duplicate series {key}"
                out[key] = s.value
    return out


def key(metric: str, /, **labels: str) -> Key:
    return metric, frozenset(labels.items())


def series(metric: str, value: float, /, **labels: str) -> tuple[Key, float]:
    return key(metric, **labels), value


def histogram_samples(text: str, name: str) -> list[Sample]:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    family = families[name]
    assert family.type == "histogram"
    return family.samples


@contextlib.asynccontextmanager
async def serving(source: FakeSource, address: Address | None = None) -> AsyncIterator[str]:
    """Run the metrics server; yields its base URL (TCP) or "unix" for a unix socket."""
    address = address or Address("127.0.0.1", free_port())
    runner = await start_metrics_server(address, source)
    try:
        yield "http://localhost" if address.is_unix else f"http://127.0.0.1:{address.port}"
    finally:
        await runner.cleanup()


async def get(url: str, unix: str = "") -> tuple[int, str, str]:
    connector = aiohttp.UnixConnector(path=unix) if unix else None
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp,
    ):
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def promtool_check(text: str) -> None:
    assert PROMTOOL is not None
    proc = await run_cmd(PROMTOOL, "check", "metrics", stdin=text.encode())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


async def test_scrape_has_exactly_the_live_values() -> None:
    source = filled_source()
    async with serving(source) as base:
        status, ctype, text = await get(base + "/metrics")
    assert status == 200
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    got = edged_samples(text)
    expected = dict(
        [
            series("edged_cert_not_after_seconds", 1_697_776_000.0, name=A, key_type="ecdsa-p256"),
            series("edged_cert_not_after_seconds", 1_697_776_001.0, name=A, key_type="rsa-2048"),
            series("edged_cert_not_before_seconds", 1_690_000_000.0, name=A, key_type="ecdsa-p256"),
            series("edged_cert_not_before_seconds", 1_690_000_001.0, name=A, key_type="rsa-2048"),
            series("edged_cert_fallback_active", 0, name=A),
            series("edged_cert_fallback_active", 1, name=B),
            series("edged_cert_state", 0, name=A, state="processing"),
            series("edged_cert_state", 1, name=A, state="active"),
            series("edged_cert_state", 0, name=A, state="failed"),
            series("edged_cert_state", 0, name=B, state="processing"),
            series("edged_cert_state", 0, name=B, state="active"),
            series("edged_cert_state", 1, name=B, state="failed"),
            series("edged_renewal_attempts_total", 3, name=A, result="success"),
            series("edged_renewal_attempts_total", 0, name=A, result="failure"),
            series("edged_renewal_attempts_total", 0, name=B, result="success"),
            series("edged_renewal_attempts_total", 5, name=B, result="failure"),
            series("edged_acme_tls_alpn_handshakes_total", 2, result="answered"),
            series("edged_acme_tls_alpn_handshakes_total", 1, result="no_challenge"),
            series("edged_acme_tls_alpn_handshakes_total", 0, result="failed"),
            series("edged_dns01_leftovers_removed_total", 3),
            series("edged_dns01_leftovers", 1),
            series("edged_tls_handshakes_total", 7, result="ok", version="TLSv1.3"),
            series("edged_tls_handshakes_total", 2, result="ok", version="TLSv1.2"),
            series("edged_tls_handshakes_total", 1, result="no_cert", version="TLSv1.3"),
            series("edged_connections_active", 5),
            series("edged_connections_total", 10),
            series("edged_connections_refused_total", 3, reason="limit"),
            series("edged_connections_closed_total", 2, reason="idle_timeout"),
            series("edged_bytes_total", 1234, direction="in"),
            series("edged_bytes_total", 56789, direction="out"),
            series("edged_backend_errors_total", 4, reason="connect_refused"),
            series("edged_tls_ticket_key_rotations_total", 2),
            series("edged_worker_restarts_total", 1),
            series("edged_reloads_total", 2, kind="signal", result="success"),
            series("edged_reloads_total", 1, kind="file", result="failure"),
            series("edged_config_last_reload_success_timestamp_seconds", 1_700_000_123.5),
            series(
                "edged_build_info", 1,
                version=__version__, python=platform.python_version(), openssl=openssl_version(),
            ),
        ]
    )  # fmt: skip
    histogram = {k: v for k, v in got.items() if k[0].startswith("edged_acme_request_seconds")}
    reloads = {k: v for k, v in got.items() if k[0].startswith("edged_reload_duration_seconds")}
    assert {k: v for k, v in got.items() if k not in histogram and k not in reloads} == expected
    assert len(histogram) == len(ACME_REQUEST_BUCKETS) + 1 + 2  # buckets, +Inf, _count, _sum
    assert len(reloads) == 2 * (len(RELOAD_BUCKETS) + 1 + 2)  # scope full and names
    assert reloads[key("edged_reload_duration_seconds_count", scope="full")] == 1
    assert reloads[key("edged_reload_duration_seconds_sum", scope="full")] == 1.5
    assert reloads[key("edged_reload_duration_seconds_count", scope="names")] == 2
    assert reloads[key("edged_reload_duration_seconds_bucket", scope="names", le="0.05")] == 2
    assert reloads[key("edged_reload_duration_seconds_bucket", scope="names", le="0.01")] == 0
    # The process collector is there too.
    assert "process_resident_memory_bytes " in text
    # Every family has a meaningful HELP.
    for family in text_string_to_metric_families(text):
        assert len(family.documentation) > 20, family.name


async def test_scrape_reads_state_at_scrape_time() -> None:
    source = filled_source()
    async with serving(source) as base:
        _, _, before = await get(base + "/metrics")
        source.counters.bytes_in += 100
        source.counters.handshakes["timeout", "unknown"] += 1
        source.active = 0
        source.statuses[1] = NameStatus(B, "processing", False)
        source.certs.pop()
        _, _, after = await get(base + "/metrics")
    b, a = edged_samples(before), edged_samples(after)
    k = key("edged_bytes_total", direction="in")
    assert (b[k], a[k]) == (1234, 1334)
    k = key("edged_tls_handshakes_total", result="timeout", version="unknown")
    assert k not in b and a[k] == 1
    assert a[key("edged_connections_active")] == 0
    assert a[key("edged_cert_state", name=B, state="processing")] == 1
    assert a[key("edged_cert_state", name=B, state="failed")] == 0
    assert a[key("edged_cert_fallback_active", name=B)] == 0
    gone = key("edged_cert_not_after_seconds", name=A, key_type="rsa-2048")
    assert gone in b and gone not in a


async def test_histogram_buckets_are_cumulative_and_match_observations() -> None:
    source = FakeSource()
    observations = [0.0001, 0.005, 0.0051, 0.07, 0.1, 0.9, 1.0, 4.0, 29.0, 30.0, 31.0, 600.0]
    for seconds in observations:
        source.counters.acme_requests.observe(seconds)
    async with serving(source) as base:
        _, _, text = await get(base + "/metrics")
    samples = histogram_samples(text, "edged_acme_request_seconds")
    buckets = [(s.labels["le"], s.value) for s in samples if s.name.endswith("_bucket")]
    assert [le for le, _ in buckets] == [repr(b) for b in ACME_REQUEST_BUCKETS] + ["+Inf"]
    for le, count in buckets:
        bound = float(le)  # float("+Inf") is inf
        assert count == sum(1 for o in observations if o <= bound), le
    counts = [count for _, count in buckets]
    assert counts == sorted(counts)  # cumulative
    by_name = {s.name: s.value for s in samples}
    assert by_name["edged_acme_request_seconds_count"] == len(observations) == counts[-1]
    assert by_name["edged_acme_request_seconds_sum"] == pytest.approx(sum(observations))


@needs_promtool
@pytest.mark.parametrize("filled", [True, False], ids=["filled", "empty"])
async def test_promtool_accepts_the_scrape(filled: bool) -> None:
    source = filled_source() if filled else FakeSource()
    async with serving(source) as base:
        _, _, text = await get(base + "/metrics")
    await promtool_check(text)


async def test_index_and_unknown_paths() -> None:
    async with serving(FakeSource()) as base:
        status, ctype, body = await get(base + "/")
        assert status == 200 and ctype.startswith("text/html")
        assert 'href="/metrics"' in body
        for path in ("/metric", "/metrics/x", "/favicon.ico", "/admin"):
            status, _, _ = await get(base + path)
            assert status == 404, path


async def test_unix_socket_is_0600_and_serves(tmp_path: Path) -> None:
    path = tmp_path / "metrics.sock"
    source = filled_source()
    async with serving(source, Address(path=str(path))) as base:
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        status, _, text = await get(base + "/metrics", unix=str(path))
    assert status == 200
    assert edged_samples(text)[key("edged_connections_active")] == 5


async def test_unix_socket_replaces_a_stale_one_but_not_a_live_one(tmp_path: Path) -> None:
    path = tmp_path / "metrics.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: as after a crash
    async with serving(FakeSource(), Address(path=str(path))):
        status, _, _ = await get("http://localhost/metrics", unix=str(path))
        assert status == 200
        with pytest.raises(MetricsServerError, match="another process listens"):
            await start_metrics_server(Address(path=str(path)), FakeSource())
        status, _, _ = await get("http://localhost/metrics", unix=str(path))
        assert status == 200
    regular = tmp_path / "not-a-socket"
    regular.write_text("keep me")
    with pytest.raises(MetricsServerError, match="not a socket"):
        await start_metrics_server(Address(path=str(regular)), FakeSource())
    assert regular.read_text() == "keep me"


async def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsServerError, match=f"127.0.0.1:{port}.*another process"):
            await start_metrics_server(Address("127.0.0.1", port), FakeSource())


async def test_collector_exception_is_a_500_and_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = filled_source()
    source.fail = True
    async with serving(source) as base:
        with caplog.at_level(logging.ERROR, logger="edged.metrics"):
            status, _, body = await get(base + "/metrics")
        assert status == 500
        assert "RuntimeError: state is broken" in body
        lines = [r.getMessage() for r in caplog.records if r.name == "edged.metrics"]
        assert lines == ["metrics: collection failed: RuntimeError: state is broken"]
        source.fail = False  # the server survived and serves the next scrape
        status, _, _ = await get(base + "/metrics")
        assert status == 200


def test_render_without_process_metrics() -> None:
    text = render(build_registry(FakeSource(), process=False)).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert all(n.startswith("edged_") for n in names)
    assert {"edged_connections", "edged_acme_request_seconds", "edged_build_info"} <= names


def test_unknown_state_sets_no_series_to_one() -> None:
    source = FakeSource(statuses=[NameStatus("c.example.test", "confused", False)])
    got = edged_samples(render(build_registry(source, process=False)).decode())
    states = {dict(k[1])["state"]: v for k, v in got.items() if k[0] == "edged_cert_state"}
    assert states == {"processing": 0, "active": 0, "failed": 0}


def test_merge_counters_sums_every_field() -> None:
    a, b = filled_source().counters, filled_source().counters
    b.last_reload_success = 1_800_000_000.0
    b.acme_requests.observe(0.01)
    total = merge_counters([a, b])
    assert total.handshakes == a.handshakes + b.handshakes
    assert total.connections_total == 20
    assert total.connections_refused == Counter({"limit": 6})
    assert total.connections_closed == Counter({"idle_timeout": 4})
    assert (total.bytes_in, total.bytes_out) == (2468, 113578)
    assert total.backend_errors == Counter({"connect_refused": 8})
    assert total.reloads == a.reloads + b.reloads
    assert total.last_reload_success == 1_800_000_000.0
    assert total.renewal_attempts == a.renewal_attempts + b.renewal_attempts
    snap = total.acme_requests.snapshot()
    assert snap.count == 13
    assert snap.sum == pytest.approx(2 * (0.001 + 0.005 + 0.2 + 0.2 + 3.0 + 45.0) + 0.01)
    assert a.connections_total == 10 and a.acme_requests.snapshot().count == 6  # unchanged
    # A field added to Counters and forgotten in merge_counters shows up here.
    defaults = Counters()
    for f in dataclasses.fields(Counters):
        merged, default = getattr(total, f.name), getattr(defaults, f.name)
        if isinstance(merged, LatencyHistogram):
            assert merged.snapshot() != default.snapshot(), f.name
        else:
            assert merged != default, f.name


def test_latency_histogram_is_thread_safe() -> None:
    hist = LatencyHistogram()
    per_thread, threads = 20_000, 8

    def work() -> None:
        for _ in range(per_thread):
            hist.observe(0.05)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    snap = hist.snapshot()
    assert snap.count == per_thread * threads
    assert snap.cumulative[ACME_REQUEST_BUCKETS.index(0.05)] == snap.count
    assert snap.cumulative[ACME_REQUEST_BUCKETS.index(0.05) - 1] == 0
    assert snap.sum == pytest.approx(0.05 * per_thread * threads)


def test_latency_histogram_timed_and_bounds() -> None:
    hist = LatencyHistogram([0.5, 1.0])
    with hist.timed():
        pass
    with pytest.raises(ZeroDivisionError), hist.timed():
        1 / 0  # noqa: B018
    assert hist.snapshot().cumulative == (2, 2, 2)
    for bad in ([], [1.0, 1.0], [2.0, 1.0], [float("inf")]):
        with pytest.raises(ValueError):
            LatencyHistogram(bad)
    with pytest.raises(ValueError, match="different bounds"):
        hist.add(LatencyHistogram())


def test_the_fast_per_name_rendering_writes_what_prometheus_client_writes() -> None:
    """scrape() (what the server answers) writes the families with a series per name itself;
    it must say exactly what rendering them as Metric objects says, escaping included."""
    source = filled_source()
    odd = 'we"ird\\name\nx'  # never a configured name, but the writer must not break on it
    source.certs.append(CertMetric(odd, "ecdsa-p256", 1.5e9, 1.6e9))
    source.statuses.append(NameStatus(odd, "processing", False))
    source.counters.renewal_attempts[odd, "failure"] += 1
    slow = render(build_registry(source, process=False)).decode()
    fast = scrape(source, process=False).decode()

    def families(text: str) -> dict[str, str]:
        """Each family's lines (HELP, TYPE, samples) as one block, by family name."""
        blocks: dict[str, list[str]] = {}
        for line in text.splitlines():
            if line.startswith("# HELP "):
                current = line.split(" ")[2]
            blocks.setdefault(current, []).append(line)
        return {name: "\n".join(lines) for name, lines in blocks.items()}

    assert families(fast) == families(slow)
    per_name = render_per_name(source).decode()
    assert 'edged_cert_state{name="we\\"ird\\\\name\\nx",state="processing"} 1.0' in per_name
    assert {f.name for f in text_string_to_metric_families(per_name)} == {
        "edged_cert_not_after_seconds",
        "edged_cert_not_before_seconds",
        "edged_cert_fallback_active",
        "edged_cert_state",
        "edged_renewal_attempts",
    }
