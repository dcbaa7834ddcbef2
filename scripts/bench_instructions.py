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
from instructions mostly by those. The simulated last level is this core's own level-2 cache,
read from /sys (valgrind would take the level 3 from CPUID: shared with every other tenant of
the host, and misread on this VM as 512 MiB, 2-way). The per-core L2 is the cache a
terminator's working set must fit in; `--l2 SIZE_KIB` models another size (the working set lies
between the sizes where the misses collapse). `--by-library` adds a table per shared object.

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

from edged.heap import REEXEC_MARK, find_jemalloc

EVENTS_WANTED = ("Ir", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--terminators", default="haproxy,python-plain,edged,edged-nopeek")
    p.add_argument("--key-type", default="ecdsa-p256", choices=("ecdsa-p256", "rsa-2048"))
    p.add_argument("-n", "--handshakes", type=int, default=300)
    p.add_argument("--cache-sim", action="store_true", help="also simulate the caches (slower)")
    p.add_argument(
        "--l2",
        type=int,
        metavar="KIB",
        help="with --cache-sim: the level-2 size to model (default: this core's, from /sys)",
    )
    p.add_argument(
        "--by-library", action="store_true", help="also print the counts per shared object"
    )
    p.add_argument("--workdir", type=Path, default=Path("/tmp/edged-bench-instructions"))
    return p.parse_args()


def handshake(port: int, ctx: ssl.SSLContext) -> None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname=None),
    ):
        pass


def core_l2() -> tuple[int, int, int] | None:
    """(size in bytes, ways, line size) of cpu0's level-2 cache, from /sys; None if unknown."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
            ways = int((index / "ways_of_associativity").read_text())
            line = int((index / "coherency_line_size").read_text())
        except (OSError, ValueError):
            continue
        if level == "2" and kind in ("Unified", "Data") and size.endswith("K"):
            return int(size[:-1]) * 1024, ways, line
    return None


def last_level(args: argparse.Namespace) -> tuple[int, int, int] | None:
    """The cache valgrind should model as its last level (see the module docstring)."""
    found = core_l2()
    if args.l2 is None:
        return found
    size, (ways, line) = args.l2 * 1024, (found[1:] if found else (16, 64))
    sets = size // (ways * line)
    if sets & (sets - 1):  # valgrind models power-of-two set counts only: change the ways
        sets = 1 << (sets.bit_length() - 1)
        ways = size // (sets * line)
    if sets < 1 or sets * ways * line != size:
        raise SystemExit(f"--l2 {args.l2}: no cache of {line}-byte lines fits; try 512, 1024, 1536")
    return size, ways, line


def newest_dump(files: list[str]) -> tuple[str, dict[str, int]] | None:
    """The newest callgrind dump among `files` that counted anything, and its event totals."""
    for path in sorted(files, key=os.path.getmtime, reverse=True):
        events: list[str] = []
        with open(path) as f:
            for line in f:
                if line.startswith("events:"):
                    events = line.split()[1:]
                elif line.startswith("summary:") and events:
                    values = [int(v) for v in line.split()[1:]]
                    if values and values[0] > 0:
                        return path, dict(zip(events, values, strict=False))
    return None


def by_object(path: str) -> dict[str, dict[str, int]]:
    """Self cost per shared object in a callgrind dump (the `ob=` of each cost line).

    Cost lines right after a `calls=` line are the inclusive cost of that call, already
    counted in the callee's own lines, so they are skipped."""
    events: list[str] = []
    names: dict[str, str] = {}
    current = "?"
    sums: dict[str, list[int]] = {}
    after_call = False
    with open(path) as f:
        for line in f:
            if line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith(("ob=", "cob=")):
                key, _, rest = line.partition("=")
                rest = rest.strip()
                if rest.startswith("("):
                    ref, _, name = rest.partition(")")
                    if name.strip():
                        names[ref] = name.strip()
                    rest = names.get(ref, ref)
                if key == "ob":
                    current = rest
            elif line.startswith("calls="):
                after_call = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                if after_call:
                    after_call = False
                    continue
                row = sums.setdefault(current, [0] * len(events))
                for i, value in enumerate(line.split()[1 : len(events) + 1]):
                    row[i] += int(value)
    return {Path(ob).name: dict(zip(events, row, strict=False)) for ob, row in sums.items()}


Counts = dict[str, float]


def measure(
    kind: str, args: argparse.Namespace, pki: Any, backend: int
) -> tuple[Counts, dict[str, Counts]]:
    """Events per handshake of `kind`, in total and (with --by-library) per shared object."""
    original = bt.terminator_argv

    def under_valgrind(
        kind: str, d: Path, port: int, backend: int, certs: Any
    ) -> tuple[list[str], dict[str, Any]]:
        argv, extra = original(kind, d, port, backend, certs)
        tool = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=no"]
        if args.cache_sim:
            tool.append("--cache-sim=yes")
            ll = last_level(args)
            if ll is not None:
                tool.append(f"--LL={ll[0]},{ll[1]},{ll[2]}")
        env = extra.get("env")
        lib = find_jemalloc()
        if env is not None and lib is not None and kind == "edged-jemalloc":
            # With allocator = "auto" edged would re-execute itself under jemalloc
            # (edged.heap), out of valgrind's sight (--trace-children=no): start it
            # preloaded, as the re-exec would.
            extra = {**extra, "env": {**env, "LD_PRELOAD": lib, REEXEC_MARK: ""}}
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
        dump = newest_dump(glob.glob(f"{d}/callgrind.out.*"))
    finally:
        running.proc.stop()
    if dump is None:
        raise SystemExit(f"{kind}: no callgrind dump with counts in {d}")
    path, found = dump
    per = {e: found[e] / args.handshakes for e in EVENTS_WANTED if e in found}
    libraries = by_object(path) if args.by_library else {}
    return per, {
        ob: {e: c[e] / args.handshakes for e in EVENTS_WANTED if e in c}
        for ob, c in libraries.items()
    }


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
    results: dict[str, Counts] = {}
    libraries: dict[str, dict[str, Counts]] = {}
    try:
        for kind in kinds:
            results[kind], libraries[kind] = measure(kind, args, pki, backend_port)
            bt.log(f"{kind}: {results[kind]['Ir'] / 1000:,.0f}k instructions per handshake")
    finally:
        backend.stop()
    events = [e for e in EVENTS_WANTED if all(e in r for r in results.values())]
    first = kinds[0]
    print(f"\nper full TLS 1.3 handshake ({args.key_type}), {args.handshakes} handshakes each:\n")
    if args.cache_sim:
        ll = last_level(args)
        model = f"{ll[0] // 1024:,} KiB, {ll[1]}-way" if ll else "valgrind's choice"
        print(f"(IL/DL: misses in the modelled level-2 cache, {model})\n")
    print("| terminator | " + " | ".join(events) + f" | Ir ÷ {first} |")
    print("|---|" + "---:|" * (len(events) + 1))
    for kind, r in results.items():
        cells = " | ".join(f"{r[e]:,.0f}" for e in events)
        print(f"| {kind} | {cells} | {r['Ir'] / results[first]['Ir']:.3f} |")
    if args.by_library:
        print("\nper shared object (self cost; objects under 1,000 instructions left out):\n")
        print("| terminator | object | " + " | ".join(events) + " |")
        print("|---|---|" + "---:|" * len(events))
        for kind, objects in libraries.items():
            for ob, c in sorted(objects.items(), key=lambda kv: -kv[1].get("Ir", 0)):
                if c.get("Ir", 0) >= 1000:
                    cells = " | ".join(f"{c.get(e, 0):,.0f}" for e in events)
                    print(f"| {kind} | {ob} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
