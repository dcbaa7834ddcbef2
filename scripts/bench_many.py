#!/usr/bin/env python3
"""edged with many store certificates: time to the first handshake, time until the whole store
is read (background indexing), RSS then, cold-name vs warm handshake latency, and how long a
certificate replaced in the store takes to be served (one among N), and what a full reload
(SIGHUP: the config and every store entry checked again) takes in time and memory.

A script, not a test: loopback only, bounded in time. Every site gets its own store entry; the
certificate is one wildcard reused under every name (the store entries are what costs; the
distinct-certificate startup figures come from `scripts/bench tls --metrics startup`), or with
--distinct a certificate of its own for each (its own key, the same intermediate: ~2 minutes
to write 100k; what the workers' shared certificate memory is measured with). A name
is "cold" for the data path (its site read and its routes used for the first time) but shares
its SSLContext with the others; a context of its own adds ~1.2 ms (see BENCHMARKS.md).

With --gc, each edged process logs the garbage collector's passes (a `gc.callbacks` probe put
on its path as sitecustomize; thread CPU time, so waits for the interpreter's lock do not
count), and the passes are summed up per phase: start, background read, swaps, each reload.

With --acme the entries are ACME-managed and [acme] is set (its CA unreachable; the
certificates are fresh, so nothing is due): the start also reads and plans a renewal state for
every name, and the time until the renewer logs that it has is reported.

Run: scripts/bench many [--sites 100000] [--swaps 10] [--reloads 3] [--workers 1] [--gc]
                        [--distinct] [--acme] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edged.store.base import PemPair, StoredCert
from edged.store.files import FileStore
from tests.conftest import free_port
from tests.many_certs import many_sites_config, write_many
from tests.pki import Issued, fullchain, make_ca, make_intermediate, make_leaf

EDGED = str(Path(sys.executable).with_name("edged"))
DOMAIN = "many.bench.test"
# --gc: put on edged's path as sitecustomize.py; one line per pass of the oldest generation or
# of any generation taking 1 ms or more: wall time, pid, generation, thread CPU ms.
GC_PROBE = """
import gc, os, time
_log = os.environ.get("EDGED_BENCH_GC_LOG")
if _log:
    _started = [0.0]
    def _probe(phase, info):
        if phase == "start":
            _started[0] = time.thread_time()
            return
        ms = (time.thread_time() - _started[0]) * 1000
        if ms >= 1 or info["generation"] == 2:
            with open(_log, "a") as f:
                f.write(f"{time.time():.6f} {os.getpid()} {info['generation']} {ms:.2f}\\n")
    gc.callbacks.append(_probe)
"""


def _client_context() -> ssl.SSLContext:
    # Made once: ssl.create_default_context() loads the system's CA certificates, ~17 ms here,
    # which in the swap loop below made every poll that slow and the "served after" figures
    # up to two polls too high.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


CLIENT = _client_context()


def handshake(port: int, name: str) -> tuple[float, bytes]:
    """(milliseconds, the served certificate in DER) for one full handshake (no resumption:
    no session is handed back to the context)."""
    ctx = CLIENT
    start = time.perf_counter()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as tls,
    ):
        cert = tls.getpeercert(binary_form=True) or b""
    return (time.perf_counter() - start) * 1000, cert


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A /proc/<pid>/status memory field in MiB (VmHWM: the peak since the last reset)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def processes(pid: int) -> list[int]:
    """`pid` and its descendants (with workers: the zygote and the workers)."""
    found = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        found += processes(int(child))
    return found


def pss_mib(pid: int) -> float:
    """Proportional set size: pages shared with other processes count in part."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def write_distinct(store_dir: Path, names: list[str], issuer: Issued) -> None:
    """A store entry per name with a certificate of its own (leaf + `issuer`), as a CA
    issues them. FileStore's fsync skipped: throwaway fixture data."""
    store = FileStore(store_dir)
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        for name in names:
            leaf = make_leaf(issuer, [name])
            pair = PemPair("ecdsa-p256", fullchain(leaf, issuer), leaf.key_pem)
            store.save(StoredCert(name, (name,), (pair,), "upload", time.time()))
    finally:
        os.fsync = real


def shared_segments_mib(pids: list[int]) -> float:
    """The size of edged's shared certificate segments (edged.pemshare), each counted once."""
    sizes: dict[int, int] = {}
    for pid in pids:
        inode = None
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 6:
                inode = int(fields[4]) if "memfd:edged-pem" in line else None
            elif inode is not None and fields[0] == "Size:":
                sizes[inode] = int(fields[1])
    return sum(sizes.values()) / 1024


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (proc(5): clear_refs, 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def gc_report(log: Path, main_pid: int, phases: list[tuple[str, float, float]]) -> list[str]:
    """Per phase and process kind (main, others): the passes of the oldest generation and the
    longest pass of any generation, from the probe's log."""
    passes = []
    if log.exists():
        for line in log.read_text().splitlines():
            when, pid, generation, ms = line.split()
            passes.append((float(when), int(pid), int(generation), float(ms)))
    lines = []
    for name, begin, end in phases:
        cells = []
        for who in ("main", "others"):
            inside = [
                p for p in passes if begin <= p[0] <= end and (p[1] == main_pid) == (who == "main")
            ]
            if not inside and who == "others":
                continue
            full = [p[3] for p in inside if p[2] == 2]
            longest = max((p[3] for p in inside), default=0.0)
            cells.append(
                f"{who}: {len(full)} full passes"
                + (f" ({min(full):.0f}-{max(full):.0f} ms)" if full else "")
                + f", longest pass {longest:.0f} ms"
            )
        lines.append(f"collector {name}: " + "; ".join(cells))
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sites", type=int, default=100_000)
    p.add_argument("--swaps", type=int, default=10)
    p.add_argument("--samples", type=int, default=200, help="handshakes per latency figure")
    p.add_argument("--reloads", type=int, default=3, help="full reloads (SIGHUP) timed")
    p.add_argument("--workers", type=int, default=1, help="[edged] workers")
    p.add_argument("--gc", action="store_true", help="log and sum up the collector's passes")
    p.add_argument("--distinct", action="store_true", help="a certificate of its own per site")
    p.add_argument(
        "--acme",
        action="store_true",
        help="ACME-managed entries and an [acme] table (its CA unreachable: nothing is due), "
        "started twice: without renewal states (each planned and saved), then with them",
    )
    p.add_argument("--workdir", type=Path, default=Path("/tmp/edged-bench-many"))
    args = p.parse_args()

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ca = make_ca("bench many CA")
    # One intermediate, as a public CA's chains have: the fullchain is leaf + intermediate.
    inter = make_intermediate(ca, "bench many intermediate")
    leaf = make_leaf(inter, [f"*.{DOMAIN}"], cn="v0")
    names = [f"n{i}.{DOMAIN}" for i in range(args.sites)]
    t = time.perf_counter()
    if args.distinct:
        write_distinct(work / "store", names, inter)
    else:
        chain = fullchain(leaf, inter)
        source = "acme" if args.acme else "upload"
        write_many(work / "store", names, [PemPair("ecdsa-p256", chain, leaf.key_pem)], source)
    print(f"store with {args.sites} entries written in {time.perf_counter() - t:.1f} s")
    port = free_port()
    (work / "edged.toml").write_text(
        f'[edged]\nstore = "store"\nworkers = {args.workers}\n'
        f'[listen]\nhttps = ["127.0.0.1:{port}"]\nhttp = []\n'
        f'metrics = ""\nadmin = ""\n'
        # An unreachable CA: the certificates are fresh, so nothing is due; ARI checks fail
        # (logged) and only delay themselves.
        + (
            f'[acme]\ndirectory = "https://127.0.0.1:{free_port()}/dir"\nemail = "a@b.test"\n'
            if args.acme
            else ""
        )
        + many_sites_config(names, "127.0.0.1:9")
    )

    env = dict(os.environ)
    gc_log = work / "gc.log"
    if args.gc:
        (work / "gcprobe").mkdir()
        (work / "gcprobe" / "sitecustomize.py").write_text(GC_PROBE)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(work / "gcprobe"), env.get("PYTHONPATH", "")) if p
        )
        env["EDGED_BENCH_GC_LOG"] = str(gc_log)
    phases: list[tuple[str, float, float]] = []  # (name, wall time begin, end)
    rng = random.Random(7)
    start = time.monotonic()
    started_wall = time.time()
    proc = subprocess.Popen(
        [EDGED, "run", "--config", str(work / "edged.toml")],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    indexed = threading.Event()
    reloaded = threading.Event()
    planned = threading.Event()

    def read_log() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "store indexed" in line:
                indexed.set()
            elif "renewal planned" in line:
                planned.set()
            elif "reloaded (signal)" in line:
                reloaded.set()

    threading.Thread(target=read_log, daemon=True).start()
    try:
        first = rng.choice(names)
        while True:
            try:
                handshake(port, first)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() - start > 300:
                    print("edged did not start")
                    return 1
                time.sleep(0.02)
        first_s = time.monotonic() - start
        phases.append(("start (exec to the first handshake)", started_wall, time.time()))
        first_rss = rss_mib(proc.pid)
        indexed.wait(600)
        indexed_s = time.monotonic() - start
        phases.append(("background read", phases[-1][2], time.time()))
        planned_s = planned_rss = 0.0
        if args.acme:
            # Every name's renewal state read and planned (the renewer logs it).
            if not planned.wait(900):
                print("renewal not planned within 900 s")
                return 1
            planned_s, planned_rss = time.monotonic() - start, rss_mib(proc.pid)
            phases.append(("renewal planned", phases[-1][2], time.time()))
        cold = [handshake(port, rng.choice(names))[0] for _ in range(args.samples)]
        warm = [handshake(port, first)[0] for _ in range(args.samples)]
        full_rss = rss_mib(proc.pid)
        tree = [(pid, rss_mib(pid), pss_mib(pid)) for pid in processes(proc.pid)]
        segments = shared_segments_mib(processes(proc.pid))
        store = FileStore(work / "store")
        swaps = []
        swaps_wall = time.time()
        for k in range(1, args.swaps + 1):
            name = rng.choice(names)
            new = make_leaf(inter, [f"*.{DOMAIN}"], cn=f"v{k}")
            _, before = handshake(port, name)
            t0 = time.perf_counter()
            pair = PemPair("ecdsa-p256", fullchain(new, inter), new.key_pem)
            store.save(StoredCert(name, (name,), (pair,), "upload", time.time()))
            while handshake(port, name)[1] == before:
                if time.perf_counter() - t0 > 30:
                    print(f"swap of {name} not served within 30 s")
                    return 1
            swaps.append((time.perf_counter() - t0) * 1000)
        phases.append(("swaps", swaps_wall, time.time()))
        reloads = []  # (seconds, peak RSS MiB, RSS after MiB)
        for k in range(1, args.reloads + 1):
            reloaded.clear()
            reset_peak(proc.pid)
            reload_wall = time.time()
            t0 = time.perf_counter()
            os.kill(proc.pid, signal.SIGHUP)
            if not reloaded.wait(300):
                print("full reload did not finish within 300 s")
                return 1
            seconds = time.perf_counter() - t0
            if args.gc:
                time.sleep(0.2)  # the reload's last pass follows its log line
            phases.append((f"full reload {k}", reload_wall, time.time()))
            reloads.append((seconds, rss_mib(proc.pid, "VmHWM"), rss_mib(proc.pid)))
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"sites: {args.sites}")
    print(f"first handshake after exec: {first_s:.2f} s (RSS {first_rss:.0f} MiB)")
    print(f"whole store read after: {indexed_s:.1f} s (RSS then {full_rss:.0f} MiB)")
    if args.acme:
        print(
            f"renewal planned for every name after: {planned_s:.1f} s (RSS {planned_rss:.0f} MiB)"
        )
    print(
        "processes after indexing (RSS / PSS MiB): "
        + ", ".join(f"{pid} {rss:.0f} / {pss:.0f}" for pid, rss, pss in tree)
        + f"; PSS summed {sum(pss for _, _, pss in tree):.0f} MiB"
    )
    print(
        f"certificate segments shared with the workers (memfd): {segments:.1f} MiB "
        "(in a PSS above only the pages a process has read)"
    )
    print(
        f"handshake median: cold name {statistics.median(cold):.2f} ms, "
        f"warm {statistics.median(warm):.2f} ms ({args.samples} each)"
    )
    print(
        f"replaced certificate served after: median {statistics.median(swaps):.0f} ms, "
        f"max {max(swaps):.0f} ms ({len(swaps)} swaps)"
    )
    for k, (seconds, peak, after) in enumerate(reloads, 1):
        print(
            f"full reload {k}: {seconds:.1f} s, main process RSS peak {peak:.0f} MiB, "
            f"after {after:.0f} MiB"
        )
    if args.gc:
        print("\n".join(gc_report(gc_log, proc.pid, phases)))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
