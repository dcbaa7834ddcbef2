#!/usr/bin/env python3
"""Measures how long a replaced certificate takes to be served: write (rename over) -> the first
new handshake that sees it. Prints p50/p99 over N replacements. Run: .venv/bin/python
scripts/bench_reload.py [N]"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import run_backend, run_edged
from tests.test_reload import pair, wait_for


async def main(count: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="edged-bench-reload-"))
    cert, key = tmp / "fullchain.pem", tmp / "privkey.pem"
    c0, k0 = pair(tmp, "v0", "v-0")
    cert.write_bytes(c0.read_bytes())
    key.write_bytes(k0.read_bytes())
    delays = []
    async with run_backend() as backend:
        body = (
            f'[[site]]\nnames = ["r.example.test"]\nbackend = "{backend.address}"\n'
            f'cert_file = "{cert}"\nkey_file = "{key}"\n'
        )
        async with run_edged(tmp, body) as edged:
            for i in range(1, count + 1):
                c, k = pair(tmp, f"v{i}", f"v-{i}")
                for src, dst in ((c, cert), (k, key)):
                    staged = dst.with_suffix(".new")
                    staged.write_bytes(src.read_bytes())
                    os.replace(staged, dst)
                delays.append(await wait_for(f"v-{i}", edged, "r.example.test", 5))
                await asyncio.sleep(0.25)
    delays.sort()
    p99 = delays[min(len(delays) - 1, round(0.99 * (len(delays) - 1)))]
    print(
        f"rename -> served (s), n={count}: p50 {statistics.median(delays):.3f} "
        f"p99 {p99:.3f} max {delays[-1]:.3f} (includes openssl s_client polling, ~50 ms steps)"
    )


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
