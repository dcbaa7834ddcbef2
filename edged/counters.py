"""Live counters of the data path, read by the metrics collector at scrape time.

Plain integers in dicts: incrementing must cost next to nothing on the hot path. Label values
are bounded sets chosen by edged (results, reasons, configured names), never raw client input.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Counters:
    handshakes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (result, version)
    connections_total: int = 0
    connections_refused: Counter[str] = field(default_factory=Counter)  # reason
    bytes_in: int = 0  # from clients to backends
    bytes_out: int = 0  # from backends to clients
    backend_errors: Counter[str] = field(default_factory=Counter)  # reason
    reloads: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, result)
    last_reload_success: float = 0.0
