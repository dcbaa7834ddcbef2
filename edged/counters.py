"""Live counters of the data path, read by the metrics collector at scrape time.

Plain integers in dicts: incrementing must cost next to nothing on the hot path. Label values
are bounded sets chosen by edged (results, reasons, configured names), never raw client input.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

# Upper bounds (seconds) for ACME HTTP requests: a local Pebble answers in milliseconds, a
# public CA in tens to hundreds of milliseconds, a slow or rate-limiting one in seconds.
ACME_REQUEST_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


# Reloads: one site's certificate in milliseconds; a full reload of 100k sites in seconds, of
# a cold store (every entry read from disk) in a minute or more.
RELOAD_BUCKETS: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


@dataclass(frozen=True)
class HistogramSnapshot:
    """A consistent copy of a histogram: `cumulative[i]` counts observations <= `bounds[i]`,
    and `cumulative[-1]` (one longer than `bounds`) counts all of them (the +Inf bucket)."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return self.cumulative[-1]


class LatencyHistogram:
    """Request latencies in fixed buckets. Thread-safe: ACME requests run in worker threads."""

    def __init__(self, bounds: Sequence[float] = ACME_REQUEST_BUCKETS) -> None:
        bounds = tuple(float(b) for b in bounds)
        if not bounds or any(not math.isfinite(b) for b in bounds):
            raise ValueError("histogram bounds must be finite numbers (+Inf is implicit)")
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError("histogram bounds must be strictly increasing")
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        i = bisect.bisect_left(self.bounds, seconds)  # first bound >= seconds ("le")
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Observe the duration of the `with` body (also when it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - start)

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        cumulative: list[int] = []
        running = 0
        for n in counts:
            running += n
            cumulative.append(running)
        return HistogramSnapshot(self.bounds, tuple(cumulative), total)

    def add(self, other: LatencyHistogram) -> None:
        """Add another histogram's observations (same bounds) to this one."""
        if other.bounds != self.bounds:
            raise ValueError("cannot add histograms with different bounds")
        with other._lock:
            counts = list(other._counts)
            total = other._sum
        with self._lock:
            for i, n in enumerate(counts):
                self._counts[i] += n
            self._sum += total

    def __getstate__(self) -> dict[str, object]:
        # Worker processes send their Counters to the main process: a lock cannot be pickled.
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        snap = self.snapshot()
        return f"LatencyHistogram(count={snap.count}, sum={snap.sum:.6g})"


RENEWAL_RESULTS = ("success", "failure")  # the `result` of Counters.renewal_attempts
# The `result` of Counters.acme_tls_alpn: a TLS-ALPN-01 validation handshake completed with the
# challenge certificate, refused (no pending challenge for the name), or failed midway.
TLS_ALPN_RESULTS = ("answered", "no_challenge", "failed")


@dataclass
class Counters:
    handshakes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (result, version)
    connections_total: int = 0
    connections_refused: Counter[str] = field(default_factory=Counter)  # reason
    connections_closed: Counter[str] = field(default_factory=Counter)  # proxy.CLOSE_REASONS
    bytes_in: int = 0  # from clients to backends
    bytes_out: int = 0  # from backends to clients
    backend_errors: Counter[str] = field(default_factory=Counter)  # reason
    reloads: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, result)
    last_reload_success: float = 0.0
    renewal_attempts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (name, result)
    acme_requests: LatencyHistogram = field(default_factory=LatencyHistogram)  # seconds
    ticket_key_rotations: int = 0
    worker_restarts: int = 0  # worker processes replaced after dying
    acme_tls_alpn: Counter[str] = field(default_factory=Counter)  # TLS_ALPN_RESULTS
    dns01_leftovers_removed: int = 0  # TXT values interrupted DNS-01 orders left, deleted
    # Seconds each reload took, accepted or not: a full one (the config and every site) and
    # one of a few names' store certificates.
    full_reload_seconds: LatencyHistogram = field(
        default_factory=lambda: LatencyHistogram(RELOAD_BUCKETS)
    )
    names_reload_seconds: LatencyHistogram = field(
        default_factory=lambda: LatencyHistogram(RELOAD_BUCKETS)
    )


def merge_counters(parts: Iterable[Counters]) -> Counters:
    """One Counters holding the sum of `parts` (e.g. one per worker process); the last
    successful reload is the latest of theirs. The parts are not changed."""
    total = Counters()
    for part in parts:
        total.handshakes.update(part.handshakes)
        total.connections_total += part.connections_total
        total.connections_refused.update(part.connections_refused)
        total.connections_closed.update(part.connections_closed)
        total.bytes_in += part.bytes_in
        total.bytes_out += part.bytes_out
        total.backend_errors.update(part.backend_errors)
        total.reloads.update(part.reloads)
        total.last_reload_success = max(total.last_reload_success, part.last_reload_success)
        total.renewal_attempts.update(part.renewal_attempts)
        total.acme_requests.add(part.acme_requests)
        total.ticket_key_rotations += part.ticket_key_rotations
        total.worker_restarts += part.worker_restarts
        total.acme_tls_alpn.update(part.acme_tls_alpn)
        total.dns01_leftovers_removed += part.dns01_leftovers_removed
        total.full_reload_seconds.add(part.full_reload_seconds)
        total.names_reload_seconds.add(part.names_reload_seconds)
    return total
