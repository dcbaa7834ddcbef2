"""Instructions (and simulated cache misses) per full TLS 1.3 handshake, per terminator.

`scripts/bench instructions [--terminators haproxy,python-plain,edged,edged-nopeek] [-n 300]`

The CPU-second rows of `scripts/bench tls` move by ±10-20 % on this shared machine; callgrind
counts the instructions a terminator executes, which do not depend on what else runs: the same
binary, input and environment give the same count (valgrind counts, it does not time). Each
terminator is started by `scripts/bench_tls.py`'s own code (same configs, certificates and
backend) under `valgrind --tool=callgrind --instr-atstart=no`; after 20 warm-up handshakes
instrumentation is switched on (`callgrind_control -i on`), N sequential full TLS 1.3
handshakes are made (a blocking Python client, no SNI, no resumption, the connection closed
right after the handshake like `openssl s_time -new`), the counters are dumped and divided by N.
`--cache-sim` adds valgrind's cache model (I1/D1 misses and last-level misses): time differs
from instructions mostly by those.

Instructions are not seconds: kernel work (syscalls, loopback TCP) is not counted, and
interpreted Python retires fewer instructions per cycle than OpenSSL's bignum code. The
figures show where the instructions go and whether a change removed some.
"""

from __future__ import annotations

import argparse
import glob
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_tls as bt

EVENTS_WANTED = ("Ir", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--terminators", default="haproxy,python-plain,edged,edged-nopeek")
    p.add_argument("--key-type", default="ecdsa-p256", choices=("ecdsa-p256", "rsa-2048"))
    p.add_argument("-n", "--handshakes", type=int, default=300)
    p.add_argument("--cache-sim", action="store_true", help="also simulate the caches (slower)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/edged-bench-instructions"))
    return p.parse_args()


def handshake(port: int, ctx: ssl.SSLContext) -> None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname=None),
    ):
        pass


def totals(files: list[str]) -> dict[str, int]:
    """The event totals of the newest callgrind dump among `files`."""
    events: list[str] = []
    for path in sorted(files, key=os.path.getmtime, reverse=True):
        with open(path) as f:
            for line in f:
                if line.startswith("events:"):
                    events = line.split()[1:]
                elif line.startswith("summary:") and events:
                    values = [int(v) for v in line.split()[1:]]
                    if values and values[0] > 0:
                        return dict(zip(events, values, strict=False))
    return {}


def measure(kind: str, args: argparse.Namespace, pki: Any, backend: int) -> dict[str, float]:
    original = bt.terminator_argv

    def under_valgrind(
        kind: str, d: Path, port: int, backend: int, certs: Any
    ) -> tuple[list[str], dict[str, Any]]:
        argv, extra = original(kind, d, port, backend, certs)
        tool = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=no"]
        if args.cache_sim:
            tool.append("--cache-sim=yes")
        return [*tool, f"--callgrind-out-file={d}/callgrind.out.%p", *argv], extra

    bt.terminator_argv = under_valgrind
    try:
        running = bt.start_terminator(
            kind, args.workdir, backend, pki.single[args.key_type], pki.ca_file, timeout=300
        )
    finally:
        bt.terminator_argv = original
    if not isinstance(running, bt.Running):
        raise SystemExit(f"{kind} did not start under valgrind within 300 s")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    pid = str(running.proc.popen.pid)
    d = args.workdir / "run" / f"{kind}-{running.port}"
    try:
        for _ in range(20):
            handshake(running.port, ctx)
        subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
        for _ in range(args.handshakes):
            handshake(running.port, ctx)
        time.sleep(0.5)
        subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
        time.sleep(0.5)
        found = totals(glob.glob(f"{d}/callgrind.out.*"))
    finally:
        running.proc.stop()
    if not found:
        raise SystemExit(f"{kind}: no callgrind dump with counts in {d}")
    return {e: found[e] / args.handshakes for e in EVENTS_WANTED if e in found}


def main() -> int:
    args = parse_args()
    kinds = [k.strip() for k in args.terminators.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in bt.TERMINATORS]
    if unknown:
        raise SystemExit(f"unknown terminators: {', '.join(unknown)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    pki = bt.make_pki(args.workdir)
    backend_port = bt.free_port()
    backend = bt.start_backend(args.workdir, backend_port)
    results: dict[str, dict[str, float]] = {}
    try:
        for kind in kinds:
            results[kind] = measure(kind, args, pki, backend_port)
            bt.log(f"{kind}: {results[kind]['Ir'] / 1000:,.0f}k instructions per handshake")
    finally:
        backend.stop()
    events = [e for e in EVENTS_WANTED if all(e in r for r in results.values())]
    first = kinds[0]
    print(f"\nper full TLS 1.3 handshake ({args.key_type}), {args.handshakes} handshakes each:\n")
    print("| terminator | " + " | ".join(events) + f" | Ir ÷ {first} |")
    print("|---|" + "---:|" * (len(events) + 1))
    for kind, r in results.items():
        cells = " | ".join(f"{r[e]:,.0f}" for e in events)
        print(f"| {kind} | {cells} | {r['Ir'] / results[first]['Ir']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
