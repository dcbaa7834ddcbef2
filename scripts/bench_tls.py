#!/usr/bin/env python3
"""TLS termination per CPU-second: edged against HAProxy (TCP mode), nginx (stream), hitch and a
plain uvloop terminator (scripts/bench_tls_plain.py), one at a time, all on loopback with the same
certificates and the same backend (nginx http, outside the measured processes).

The terminator runs on core 0 (taskset, every process of it), the load generators, the backend
and this script on core 1. CPU-seconds are utime+stime from /proc/<pid>/stat of every process of
the terminator, read before and after each load interval, so the figures are work per CPU-second
of the terminator, not wall-clock throughput (which the load generator's core also limits).

Metrics (`--metrics`): handshake (full TLS 1.3 handshakes, ECDSA P-256 and RSA-2048, by parallel
`openssl s_time -new`, whose per-connection marks prove that none resumed), resumed (TLS 1.3
resumptions with a ticket, `openssl s_time -reuse -www /small`: each connection resumes and
fetches the 100-byte body, which is how a ticket arrives; the marks prove they resumed),
requests (keep-alive HTTP/1.1 requests for a 100-byte body, wrk), bulk (1 MiB responses, wrk),
idle (memory per idle established TLS connection), startup (time from exec to the first
handshake for a random name, and memory, with 1k/10k/100k certificates). Each measurement starts
its terminator afresh. Within a run every terminator is measured on one metric before the next
metric starts (their samples are a minute or two apart, not a whole run: this machine's load
drifts over minutes), and each run starts with a different terminator. Medians are reported, and
edged's ratio to each peer twice: the ratio of the medians, and the median of the per-run ratios
with their range (each ratio from two samples of the same run). With `edged-w2` (and `nginx-w2`,
nginx's reference for it) among the terminators, a third table gives two worker processes ÷
one, run by run.

Run: scripts/bench tls [--quick] [--runs N] [--duration S] [--terminators a,b] [--metrics a,b]
     [--cert-counts 1000,10000,100000] [--markdown PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

PEERS = ("haproxy", "nginx", "hitch", "python-plain")
# edged-w2: `workers = 2`; edged-nopeek: `[tls] preread = false` (no ClientHello pre-read: the
# same-run A/B for what the pre-read costs); edged-jemalloc: `allocator = "auto"` (jemalloc
# instead of the C library's malloc: the A/B for the opt-in, edged.heap). Every other edged
# kind runs with the defaults otherwise (the C library's malloc). nginx-w2: two worker
# processes with a listening socket each (`reuseport`, as edged's workers): what two processes
# sharing the one pinned core cost a C terminator, the reference for edged-w2 ÷ edged.
TERMINATORS = (*PEERS, "nginx-w2", "edged", "edged-w2", "edged-nopeek", "edged-jemalloc")
# A second process per terminator and the one-process kind it is compared with.
SCALED = {"edged-w2": "edged", "nginx-w2": "nginx"}
PYTHON_TERMINATORS = ("python-plain", "edged", "edged-w2", "edged-nopeek", "edged-jemalloc")
PY_SPY = Path(sys.executable).parent / "py-spy"
METRICS = ("handshake", "resumed", "requests", "bulk", "idle", "startup")
TERM_CPU, LOAD_CPU = 0, 1
NAME = "bench.test"
SMALL = b"0123456789" * 10  # the keep-alive requests' body: 100 bytes
MIB = 1 << 20
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
CLK_TCK = os.sysconf("SC_CLK_TCK")
AFTER_START = 20  # handshakes for random names right after the first one, at startup


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- certificates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cert:
    """One leaf certificate for NAME: PEM files as each terminator wants them."""

    key_type: str
    cert: Path  # leaf (the CA is the client's trust anchor, not part of the chain)
    key: Path
    combined: Path  # cert then key, one file (HAProxy, hitch)


@dataclass(frozen=True)
class ManyCerts:
    """`count` names, each with its own leaf certificate, all sharing one ECDSA key."""

    count: int
    names: tuple[str, ...]
    directory: Path  # combined/<name>.pem, haproxy.crtlist, store/ (edged), sites.toml

    @property
    def combined_dir(self) -> Path:
        return self.directory / "combined"


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca_name: x509.Name
    single: dict[str, Cert]  # key type -> cert for NAME


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _leaf(pki_key: Any, ca_name: x509.Name, public: Any, name: str, serial: int) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=60))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(pki_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def make_pki(directory: Path) -> Pki:
    """A throwaway CA and one ECDSA P-256 and one RSA-2048 leaf for NAME (fresh each run)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edged bench TLS CA")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    single = {}
    keys = {
        "ecdsa-p256": ec.generate_private_key(ec.SECP256R1()),
        "rsa-2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }
    for serial, (key_type, key) in enumerate(keys.items(), start=2):
        leaf = _leaf(ca_key, ca_name, key.public_key(), NAME, serial)
        paths = [directory / f"{key_type}.{ext}" for ext in ("crt", "key", "pem")]
        paths[0].write_bytes(leaf)
        paths[1].write_bytes(_pem_key(key))
        paths[2].write_bytes(leaf + _pem_key(key))
        for path in paths:
            path.chmod(0o600)
        single[key_type] = Cert(key_type, *paths)
    return Pki(ca_file, ca_key, ca_name, single)


@contextmanager
def _no_fsync() -> Iterator[None]:
    """Fixture data only: the store's per-file fsync would make 100k bundles take minutes."""
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


def make_many(pki: Pki, workdir: Path, count: int, backend_port: int) -> ManyCerts:
    """`count` names s<i>.bench.test, a leaf each (one shared key: peers only need files), written
    as combined PEMs (HAProxy crt-list, hitch pem-dir, nginx by $ssl_server_name) and as an edged
    file store (FileStore.save, upload source) with a config fragment of one [[site]] per name."""
    from edged.store.base import PemPair, StoredCert
    from edged.store.files import FileStore

    directory = workdir / f"many-{count}"
    if directory.exists():
        shutil.rmtree(directory)
    combined = directory / "combined"
    combined.mkdir(parents=True)
    started = time.monotonic()
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem, public = _pem_key(key), key.public_key()
    names = tuple(f"s{i}.bench.test" for i in range(count))
    store = FileStore(directory / "store")
    with _no_fsync():
        for i, name in enumerate(names):
            leaf = _leaf(pki.ca_key, pki.ca_name, public, name, 1000 + i)
            (combined / f"{name}.pem").write_bytes(leaf + key_pem)
            store.save(
                StoredCert(
                    name=name,
                    names=(name,),
                    pairs=(PemPair("ecdsa-p256", leaf, key_pem),),
                    source="upload",
                    stored_at=time.time(),
                )
            )
    (directory / "haproxy.crtlist").write_text("".join(f"{combined / n}.pem\n" for n in names))
    (directory / "sites.toml").write_text(
        "".join(f'[[site]]\nnames = ["{n}"]\nbackend = "127.0.0.1:{backend_port}"\n' for n in names)
    )
    log(f"{count} certificates generated in {time.monotonic() - started:.1f} s")
    return ManyCerts(count, names, directory)


# --- processes ----------------------------------------------------------------------------------


def _ppids() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def _pss_kib(pid: int) -> int:
    """Proportional set size: RSS with pages shared between processes (a master and its forked
    workers) split between them, so a sum over processes counts each page once."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Proc:
    """A process we started (in its own process group) and every descendant of it."""

    def __init__(self, label: str, argv: list[str], logfile: Path, cpu: int, **kw: Any) -> None:
        self.label, self.logfile = label, logfile
        self.started = time.monotonic()
        with logfile.open("ab") as out:
            self.popen = subprocess.Popen(
                ["taskset", "-c", str(cpu), *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **kw,
            )

    def pids(self) -> set[int]:
        parents = _ppids()
        found, frontier = {self.popen.pid}, [self.popen.pid]
        while frontier:
            parent = frontier.pop()
            for pid, ppid in parents.items():
                if ppid == parent and pid not in found:
                    found.add(pid)
                    frontier.append(pid)
        return found

    def cpu(self) -> dict[int, int]:
        return {pid: t for pid in self.pids() if (t := _cpu_ticks(pid)) is not None}

    def rss_kib(self) -> int:
        """Resident memory of all its processes (summed PSS, see _pss_kib)."""
        return sum(_pss_kib(pid) for pid in self.pids())

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            with _quiet():
                os.killpg(self.popen.pid, signal.SIGTERM)
            with _quiet():
                self.popen.wait(10)
        # Whatever of its group is left (a worker that outlived its parent, a stuck drain).
        with _quiet():
            os.killpg(self.popen.pid, signal.SIGKILL)
        with _quiet():
            self.popen.wait(5)


@contextmanager
def _quiet() -> Iterator[None]:
    with suppress(ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
        yield


def cpu_seconds(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU time used between two samples by the processes seen in either (a process that started
    in between counts from 0; one that exited in between is lost, and none do here)."""
    return sum(after[pid] - before.get(pid, 0) for pid in after) / CLK_TCK


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the backend --------------------------------------------------------------------------------


def _nginx_main(d: Path) -> str:
    """The main context every nginx here runs with (the backend and the stream terminator):
    foreground, one worker, its pid and error log in `d`."""
    return f"""
daemon off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 19000; }}"""


def start_backend(workdir: Path, port: int) -> Proc:
    """nginx http on core 1: /small (100 bytes) and /1m (1 MiB file), keep-alive without limit."""
    d = workdir / "backend"
    (d / "www").mkdir(parents=True, exist_ok=True)
    (d / "www" / "small").write_bytes(SMALL)
    (d / "www" / "1m").write_bytes(os.urandom(MIB))
    conf = d / "nginx.conf"
    conf.write_text(f"""{_nginx_main(d)}
http {{
    access_log off;
    client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
    sendfile on;
    keepalive_requests 100000000;
    keepalive_timeout 900s;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {d}/www;
    }}
}}
""")
    proc = Proc("backend", ["nginx", "-p", str(d), "-c", str(conf)], d / "out.log", LOAD_CPU)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 1) as sock:
                sock.sendall(b"GET /small HTTP/1.0\r\n\r\n")
                if sock.recv(65536).startswith(b"HTTP/1.1 200"):
                    return proc
        except OSError:
            pass
        if not proc.alive():
            break
        time.sleep(0.05)
    proc.stop()
    raise SystemExit(f"backend nginx did not start:\n{proc.log_tail()}")


# --- the terminators ----------------------------------------------------------------------------


def terminator_argv(
    kind: str, d: Path, port: int, backend: int, certs: Cert | ManyCerts
) -> tuple[list[str], dict[str, Any]]:
    """The command (and Popen extras) that runs `kind` on `port` with `certs`; writes its config
    into `d`."""
    d.mkdir(parents=True, exist_ok=True)
    many = isinstance(certs, ManyCerts)
    if kind == "haproxy":
        crt = f"crt-list {certs.directory / 'haproxy.crtlist'}" if many else f"crt {certs.combined}"
        (d / "haproxy.cfg").write_text(f"""
global
    maxconn 9000
    nbthread 1
    ssl-load-extra-files none
defaults
    mode tcp
    timeout connect 5s
    timeout client 900s
    timeout server 900s
frontend tls
    bind 127.0.0.1:{port} ssl {crt}
    default_backend be
backend be
    server s1 127.0.0.1:{backend}
""")
        return ["haproxy", "-db", "-f", str(d / "haproxy.cfg")], {}
    if kind in ("nginx", "nginx-w2"):
        if many:
            # nginx (stream, 1.22) picks among many certificates only through a variable in the
            # path: the file is read and parsed at every handshake, nothing at startup.
            pem = f"{certs.combined_dir}/$ssl_server_name.pem"
            cert_lines = f"ssl_certificate {pem}; ssl_certificate_key {pem};"
        else:
            cert_lines = f"ssl_certificate {certs.cert}; ssl_certificate_key {certs.key};"
        main, listen = _nginx_main(d), "ssl backlog=4096"
        if kind == "nginx-w2":
            main = main.replace("worker_processes 1;", "worker_processes 2;")
            listen += " reuseport"
        (d / "nginx.conf").write_text(f"""
load_module {STREAM_MODULE};{main}
stream {{
    server {{
        listen 127.0.0.1:{port} {listen};
        ssl_protocols TLSv1.2 TLSv1.3;
        {cert_lines}
        proxy_pass 127.0.0.1:{backend};
        proxy_timeout 900s;
    }}
}}
""")
        return ["nginx", "-p", str(d), "-c", str(d / "nginx.conf")], {}
    if kind == "hitch":
        pem = f'pem-dir = "{certs.combined_dir}"' if many else f'pem-file = "{certs.combined}"'
        (d / "ocsp").mkdir(exist_ok=True)
        (d / "hitch.conf").write_text(f"""
frontend = "[127.0.0.1]:{port}"
backend = "[127.0.0.1]:{backend}"
{pem}
workers = 1
backlog = 4096
daemon = off
user = "nobody"
group = "nogroup"
tls-protos = TLSv1.2 TLSv1.3
ocsp-dir = "{d}/ocsp"
log-level = 1
""")
        return ["hitch", "--config", str(d / "hitch.conf")], {}
    if kind == "python-plain":
        if many:
            raise ValueError("python-plain serves one certificate")
        script = str(ROOT / "scripts" / "bench_tls_plain.py")
        return [
            sys.executable,
            script,
            str(port),
            str(backend),
            str(certs.cert),
            str(certs.key),
        ], {}
    if kind in ("edged", "edged-w2", "edged-nopeek", "edged-jemalloc"):
        workers = 2 if kind == "edged-w2" else 1
        allocator = "auto" if kind == "edged-jemalloc" else "system"
        preread = "false" if kind == "edged-nopeek" else "true"
        if many:
            store, tls, sites = certs.directory / "store", "", (certs.directory / "sites.toml")
            sites_text = sites.read_text()
        else:
            store, tls = d / "store", f'default_cert = "{NAME}"\n'  # s_time sends no SNI
            sites_text = (
                f'[[site]]\nnames = ["{NAME}"]\nbackend = "127.0.0.1:{backend}"\n'
                f'cert_file = "{certs.cert}"\nkey_file = "{certs.key}"\n'
            )
        (d / "edged.toml").write_text(
            f'[edged]\nstore = "{store}"\nworkers = {workers}\ndrain_timeout = 1\n'
            f'allocator = "{allocator}"\n'
            f"max_connections = 9000\nmax_connections_per_ip = 0\nidle_timeout = 900\n"
            f'[listen]\nhttps = ["127.0.0.1:{port}"]\nhttp = []\nmetrics = ""\nadmin = ""\n'
            f'[tls]\nalpn = ["http/1.1"]\npreread = {preread}\n{tls}' + sites_text
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        # The `edged` console script, run from this checkout (PYTHONPATH) by this interpreter.
        start = "import sys; from edged.cli import main; sys.exit(main())"
        return [sys.executable, "-c", start, "run", "--config", str(d / "edged.toml")], {
            "env": env,
            "cwd": str(d),
        }
    raise ValueError(kind)


def handshake_once(port: int, name: str, ca: Path, timeout: float = 2.0) -> bool:
    """One TLS handshake with SNI `name`, verifying the certificate against the CA and the name."""
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=name),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False


@dataclass
class Running:
    kind: str
    proc: Proc
    port: int
    ready_after: float  # seconds from exec to the first good handshake


def start_terminator(
    kind: str,
    workdir: Path,
    backend: int,
    certs: Cert | ManyCerts,
    ca: Path,
    probe: str = NAME,
    timeout: float = 60.0,
) -> Running | float:
    """Start `kind`, wait for a verified handshake for `probe`; on timeout return the seconds
    waited (the process is stopped), on an early exit raise with its log."""
    port = free_port()
    d = workdir / "run" / f"{kind}-{port}"
    argv, extra = terminator_argv(kind, d, port, backend, certs)
    proc = Proc(kind, argv, d / "out.log", TERM_CPU, **extra)
    while True:
        if handshake_once(port, probe, ca):
            return Running(kind, proc, port, time.monotonic() - proc.started)
        if not proc.alive():
            tail = proc.log_tail()
            proc.stop()
            raise RuntimeError(f"{kind} exited before serving:\n{tail}")
        waited = time.monotonic() - proc.started
        if waited > timeout:
            return _timed_out(proc, waited)
        time.sleep(0.02)


def _timed_out(proc: Proc, waited: float) -> float:
    proc.rss_at_timeout = proc.rss_kib()  # type: ignore[attr-defined]
    proc.stop()
    return waited


# --- load generators ----------------------------------------------------------------------------


@dataclass
class Sample:
    value: float  # the metric, per CPU-second of the terminator (or KiB, s)
    wall: float = 0.0  # the same per wall-clock second
    cpu_use: float = 0.0  # terminator CPU-seconds per wall second
    note: str = ""
    run: int = 0  # which run measured it (pairs samples for the per-run ratios)


def measured(
    running: Running, load: Callable[[], tuple[float, str]], profile: Path | None = None
) -> Sample:
    """Run `load` (returns units done and a note); units per terminator CPU-second. With
    `profile`, py-spy samples the (Python) terminator meanwhile into that file."""
    spy = None
    if profile is not None:
        spy = subprocess.Popen(
            [*("taskset", "-c", str(LOAD_CPU), str(PY_SPY), "record", "--native"),
             *("-r", "100", "-f", "raw", "-o", str(profile)),
             *("--pid", str(running.proc.popen.pid))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
    before, t0 = running.proc.cpu(), time.monotonic()
    try:
        units, note = load()
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            with _quiet():
                spy.wait(30)
    after, t1 = running.proc.cpu(), time.monotonic()
    cpu = cpu_seconds(before, after)
    if not running.proc.alive():
        raise RuntimeError(f"{running.kind} died under load:\n{running.proc.log_tail()}")
    if spy is not None:
        note += f"; profiled (py-spy attached: slower), {profile}"
    return Sample(units / cpu if cpu else 0.0, units / (t1 - t0), cpu / (t1 - t0), note)


def s_time(port: int, clients: int, seconds: int, *, reuse: bool = False) -> tuple[float, str]:
    """`clients` parallel `openssl s_time -new -tls1_3`; handshakes done, and the proof that none
    resumed: s_time prints one mark per connection, 'r' for a resumed session. `reuse`: resumed
    handshakes instead (`-reuse`, with a request so that each connection receives its ticket)."""
    mode = ("-reuse", "-www", "/small") if reuse else ("-new",)
    procs = [
        subprocess.Popen(
            [
                *("taskset", "-c", str(LOAD_CPU), "openssl", "s_time", *mode, "-tls1_3"),
                *("-connect", f"127.0.0.1:{port}", "-time", str(seconds)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        for _ in range(clients)
    ]
    total = new = resumed = 0
    for p in procs:
        out = p.communicate(timeout=seconds + 60)[0].decode(errors="replace")
        m = re.search(r"^(\d+) connections in [\d.]+s;", out, re.M)
        if p.returncode != 0 or m is None:
            raise RuntimeError(f"openssl s_time failed (exit {p.returncode}):\n{out[-800:]}")
        total += int(m.group(1))
        # -new prints "Collecting connection statistics for N seconds", -reuse "starting".
        marks_at = re.search(
            r"^(?:Collecting connection statistics for \d+ seconds|starting)\n(.*?)\n\n",
            out,
            re.M | re.S,
        )
        marks = marks_at.group(1) if marks_at else ""
        if len(marks) != int(m.group(1)):
            raise RuntimeError(
                f"openssl s_time: {len(marks)} marks for {m.group(1)} connections:\n{out[-800:]}"
            )
        new += marks.count("*")
        resumed += marks.count("r")
    return float(total), f"{total} handshakes, {new} new, {resumed} resumed"


def wrk(port: int, path: str, conns: int, seconds: int) -> tuple[int, str]:
    cmd = ["taskset", "-c", str(LOAD_CPU), "wrk", "-t1", f"-c{conns}", f"-d{seconds}s"]
    cmd += ["--timeout", "10s", f"https://127.0.0.1:{port}{path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"(\d+) requests in", out)
    if m is None:
        raise RuntimeError(f"wrk failed:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if bad:
        raise RuntimeError(f"wrk got {bad.group(1)} error responses:\n{out}")
    return int(m.group(1)), f"{m.group(1)} requests" + (
        f"; socket errors {errors.group(1)}" if errors else ""
    )


async def _hold_idle(port: int, count: int, ca: Path, on_open: Callable[[], None]) -> int:
    """Open `count` TLS connections (SNI NAME, verified), call on_open while all are held; return
    how many were still open then."""
    ctx = ssl.create_default_context(cafile=str(ca))
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(200)
    transports: list[asyncio.BaseTransport] = []

    async def one() -> None:
        async with gate:
            for attempt in range(5):
                try:
                    transport, _ = await loop.create_connection(
                        asyncio.Protocol, "127.0.0.1", port, ssl=ctx, server_hostname=NAME
                    )
                    transports.append(transport)
                    return
                except (OSError, ssl.SSLError):
                    await asyncio.sleep(0.1 * (attempt + 1))

    try:
        await asyncio.gather(*(one() for _ in range(count)))
        await asyncio.sleep(2)  # let the terminator connect every backend and settle
        open_now = sum(not t.is_closing() for t in transports)
        on_open()
        return open_now
    finally:
        for t in transports:
            t.close()
        await asyncio.sleep(0.5)


def idle_rss(running: Running, count: int, ca: Path) -> Sample:
    import uvloop

    # Warm-up: the same path once for a few connections, so pools and code are paged in.
    uvloop.run(_hold_idle(running.port, 200, ca, lambda: None))
    time.sleep(1)
    base = running.proc.rss_kib()
    held: list[int] = []
    opened = uvloop.run(
        _hold_idle(running.port, count, ca, lambda: held.append(running.proc.rss_kib()))
    )
    if opened < count:
        raise RuntimeError(f"{running.kind}: only {opened} of {count} idle connections stayed open")
    per = (held[0] - base) / count
    return Sample(per, note=f"PSS {base / 1024:.1f} -> {held[0] / 1024:.1f} MiB with {count} open")


# --- the benchmark ------------------------------------------------------------------------------


@dataclass
class Results:
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)  # (row, kind)
    failures: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, row: str, kind: str, sample: Sample) -> None:
        self.samples.setdefault((row, kind), []).append(sample)
        log(f"  {kind:13} {row}: {sample.value:,.1f} ({sample.note})")

    def fail(self, row: str, kind: str, why: str) -> None:
        self.failures[(row, kind)] = why
        log(f"  {kind:13} {row}: FAILED: {why.splitlines()[0] if why else ''}")


ROW_HS = {
    "ecdsa-p256": "full TLS 1.3 handshakes / CPU-s, ECDSA P-256",
    "rsa-2048": "full TLS 1.3 handshakes / CPU-s, RSA-2048",
}
ROW_REQ = "keep-alive HTTP/1.1 requests / CPU-s (100 B body)"
ROW_RESUMED = "resumed TLS 1.3 handshakes (+1 small request each) / CPU-s, ECDSA P-256"
ROW_BULK = "1 MiB responses: MiB / CPU-s"
ROW_IDLE = "memory (PSS) per idle TLS connection, KiB (lower is better)"


def row_startup(count: int) -> str:
    return f"startup with {count:,} certs, s (lower is better)"


def row_after_start(count: int) -> str:
    return f"then the slowest of {AFTER_START} handshakes, {count:,} certs, ms (lower is better)"


def row_startup_rss(count: int) -> str:
    return f"memory (PSS) after startup with {count:,} certs, MiB (lower is better)"


def throughput_units(metrics: list[str]) -> list[tuple[str, str]]:
    """The (metric, key type) pairs to measure, in order: every metric with the ECDSA
    certificate, full handshakes with the RSA one too."""
    units = []
    for metric in ("idle", "handshake", "resumed", "requests", "bulk"):
        if metric in metrics:
            units.append((metric, "ecdsa-p256"))
            if metric == "handshake":
                units.append((metric, "rsa-2048"))
    return units


def throughput_session(
    kind: str,
    unit: tuple[str, str],
    run: int,
    args: argparse.Namespace,
    pki: Pki,
    workdir: Path,
    backend: int,
    res: Results,
) -> None:
    """One measurement: start `kind` with the unit's certificate, measure, stop it."""
    metric, key_type = unit
    row = row_of(metric, key_type)
    try:
        running = start_terminator(kind, workdir, backend, pki.single[key_type], pki.ca_file)
    except RuntimeError as exc:
        res.fail(row, kind, str(exc))
        return
    assert isinstance(running, Running)
    try:
        sample = measure(metric, key_type, running, args, pki.ca_file)
        sample.run = run
        res.add(row, kind, sample)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        res.fail(row, kind, str(exc))
    finally:
        running.proc.stop()


def row_of(metric: str, key_type: str) -> str:
    if metric == "handshake":
        return ROW_HS[key_type]
    return {"idle": ROW_IDLE, "requests": ROW_REQ, "bulk": ROW_BULK, "resumed": ROW_RESUMED}[metric]


def measure(
    metric: str, key_type: str, running: Running, args: argparse.Namespace, ca: Path
) -> Sample:
    port = running.port
    profile = None
    if args.py_spy and running.kind in PYTHON_TERMINATORS and metric != "idle":
        args.py_spy.mkdir(parents=True, exist_ok=True)
        tag = metric + ("-" + key_type if metric == "handshake" else "")
        profile = args.py_spy / f"{running.kind}-{tag}-{time.strftime('%H%M%S')}.txt"
    if metric == "idle":
        return idle_rss(running, args.idle_conns, ca)
    if metric == "handshake":
        s_time(port, 2, 1)  # warm-up
        sample = measured(running, lambda: s_time(port, args.hs_clients, args.duration), profile)
        if " 0 resumed" not in sample.note:
            raise RuntimeError(f"sessions were resumed: {sample.note}")
        return sample
    if metric == "resumed":
        s_time(port, 2, 1, reuse=True)  # warm-up
        sample = measured(
            running, lambda: s_time(port, args.hs_clients, args.duration, reuse=True), profile
        )
        m = re.search(r"(\d+) handshakes, (\d+) new, (\d+) resumed", sample.note)
        # Each s_time process makes one full handshake first (its marks start after it).
        if m is None or int(m.group(3)) < int(m.group(1)) - args.hs_clients:
            raise RuntimeError(f"sessions were not resumed: {sample.note}")
        return sample
    if metric == "requests":
        wrk(port, "/small", args.req_conns, 1)  # warm-up
        return measured(
            running, lambda: wrk(port, "/small", args.req_conns, args.duration), profile
        )
    # bulk: one MiB body per request
    return measured(running, lambda: wrk(port, "/1m", args.bulk_conns, args.duration), profile)


def startup_session(
    kind: str,
    many: ManyCerts,
    args: argparse.Namespace,
    pki: Pki,
    workdir: Path,
    backend: int,
    res: Results,
) -> None:
    if kind == "python-plain":
        return
    probe = random.choice(many.names)
    try:
        got = start_terminator(
            kind, workdir, backend, many, pki.ca_file, probe, args.startup_timeout
        )
    except RuntimeError as exc:
        res.fail(row_startup(many.count), kind, str(exc))
        return
    if isinstance(got, float):
        res.add(
            row_startup(many.count),
            kind,
            Sample(float("inf"), note=f"no handshake for {probe} within {got:.0f} s"),
        )
        return
    try:
        # The first handshake may come before the terminator has finished starting: 20 more, for
        # random names, one after the other, show whether it keeps answering.
        ok, worst = 0, 0.0
        for name in random.sample(many.names, AFTER_START):
            began = time.monotonic()
            ok += handshake_once(got.port, name, pki.ca_file, timeout=30)
            worst = max(worst, time.monotonic() - began)
        time.sleep(1)
        rss = got.proc.rss_kib() / 1024
        procs = len(got.proc.pids())
        note = f"probe {probe}; {procs} process(es)"
        res.add(row_startup(many.count), kind, Sample(got.ready_after, note=note))
        note = f"{ok} of {AFTER_START} handshakes ok"
        res.add(row_after_start(many.count), kind, Sample(worst * 1000, note=note))
        res.add(row_startup_rss(many.count), kind, Sample(rss, note="after those handshakes"))
    finally:
        got.proc.stop()


# --- report -------------------------------------------------------------------------------------


def median(samples: list[Sample]) -> float:
    return statistics.median(s.value for s in samples)


def fmt(value: float, row: str) -> str:
    if value == float("inf"):
        return "timeout"
    if "KiB" in row or "ms (lower" in row or "MiB, " in row or "MiB (lower" in row:
        return f"{value:,.1f}"
    if "s (lower" in row:
        return f"{value:,.2f}"
    return f"{value:,.0f}"


def report(res: Results, kinds: list[str], rows: list[str], args: argparse.Namespace) -> str:
    peers = [k for k in kinds if k in PEERS]
    edged = "edged" if "edged" in kinds else None
    head = ["metric", *kinds] + ([f"edged ÷ {p}" for p in peers] if edged else [])
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in rows:
        cells, med = [row], {}
        for kind in kinds:
            samples = res.samples.get((row, kind))
            if samples:
                med[kind] = median(samples)
                cell = fmt(med[kind], row)
                if med[kind] == float("inf"):
                    cell = f"> {args.startup_timeout:.0f} s"
                cells.append(cell)
            elif (row, kind) in res.failures:
                cells.append("failed")
            else:
                cells.append("n/a")
        if edged:
            for p in peers:
                e, v = med.get("edged"), med.get(p)
                if p == "nginx" and "startup" in row:
                    cells.append("—")  # nginx loads the certificate at each handshake instead
                elif "slowest" in row:
                    cells.append("")  # milliseconds of a loopback handshake: no ratio to make
                elif e is None or v is None or v == 0 or float("inf") in (e, v):
                    cells.append("")
                else:
                    cells.append(f"{e / v:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_run_ratios(res: Results, rows: list[str], pairs: list[tuple[str, str]]) -> str:
    """For each (a, b) of `pairs`, a ÷ b run by run (two samples of the same run, a minute or
    two apart): the median of those ratios, their range and count. Less moved by the machine's
    load drifting between runs than the ratio of the medians."""
    if not pairs:
        return ""
    head = ["metric", *(f"{a} ÷ {b}, per run" for a, b in pairs)]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(pairs) + "|"]
    for row in rows:
        if "certs" in row:  # startup rows: one run each, nothing to pair
            continue
        cells = [row]
        for a, b in pairs:
            base = {s.run: s.value for s in res.samples.get((row, b), [])}
            ratios = sorted(
                s.value / base[s.run] for s in res.samples.get((row, a), []) if base.get(s.run)
            )
            if ratios:
                mid = statistics.median(ratios)
                cells.append(f"{mid:.2f} ({ratios[0]:.2f} to {ratios[-1]:.2f}, n={len(ratios)})")
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(res: Results, kinds: list[str], rows: list[str]) -> str:
    """edged ÷ each peer, run by run."""
    if "edged" not in kinds:
        return ""
    return per_run_ratios(res, rows, [("edged", p) for p in kinds if p in PEERS])


def scaling(res: Results, kinds: list[str], rows: list[str]) -> str:
    """Two worker processes ÷ one, run by run, for each terminator measured both ways (edged
    and, as the reference, nginx)."""
    pairs = [(two, one) for two, one in SCALED.items() if two in kinds and one in kinds]
    return per_run_ratios(res, rows, pairs)


def details(res: Results, kinds: list[str], rows: list[str]) -> str:
    lines = [
        "| metric | terminator | runs | per wall-s (median) | terminator CPU use | last run |",
        "|---|---|---|---:|---:|---|",
    ]
    for row in rows:
        for kind in kinds:
            samples = res.samples.get((row, kind))
            if samples:
                values = ", ".join(fmt(s.value, row) for s in samples)
                wall = statistics.median(s.wall for s in samples)
                use = statistics.median(s.cpu_use for s in samples)
                wall_s = f"{wall:,.0f}" if wall else ""
                use_s = f"{use:.0%}" if use else ""
                lines.append(
                    f"| {row} | {kind} | {values} | {wall_s} | {use_s} | {samples[-1].note} |"
                )
            elif (row, kind) in res.failures:
                why = res.failures[(row, kind)].strip().replace("\n", " ")[:200].replace("|", "/")
                lines.append(f"| {row} | {kind} | failed | | | {why} |")
    return "\n".join(lines)


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def environment() -> dict[str, str]:
    import cryptography
    import uvloop

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores ({cpu}), kernel {platform.release()}",
        "load average at start": f"{os.getloadavg()[0]:.2f}",
        "haproxy": _first_line(["haproxy", "-v"]),
        "nginx": _first_line(["nginx", "-v"]),
        "hitch": _first_line(["hitch", "--version"]),
        "wrk": _first_line(["wrk", "-v"]),
        "openssl": _first_line(["openssl", "version"]),
        "python": f"Python {platform.python_version()} ({ssl.OPENSSL_VERSION}), "
        f"uvloop {uvloop.__version__}, cryptography {cryptography.__version__}",
        "edged": f"edged at {commit}",
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="1 run of 3 s, 1,000 idle connections, 1k certificates"
    )
    p.add_argument("--runs", type=int, help="runs per metric (default 3; medians reported)")
    p.add_argument("--duration", type=int, help="seconds per load interval (default 10)")
    p.add_argument(
        "--terminators",
        default="haproxy,nginx,hitch,python-plain,edged",
        help=f"comma-separated, of {','.join(TERMINATORS)}",
    )
    p.add_argument(
        "--metrics", default=",".join(METRICS), help=f"comma-separated, of {','.join(METRICS)}"
    )
    p.add_argument(
        "--hs-clients", type=int, default=8, help="parallel s_time processes (default 8)"
    )
    p.add_argument(
        "--req-conns", type=int, default=50, help="wrk connections for requests (default 50)"
    )
    p.add_argument(
        "--bulk-conns", type=int, default=4, help="wrk connections for 1 MiB responses (default 4)"
    )
    p.add_argument("--idle-conns", type=int, help="idle TLS connections held (default 5000)")
    p.add_argument(
        "--cert-counts", help="certificate counts for startup (default 1000,10000,100000)"
    )
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds (default 120)")
    p.add_argument(
        "--startup-runs", type=int, default=1, help="startups per terminator and count (default 1)"
    )
    p.add_argument("--workdir", type=Path, default=Path("/tmp/edged-bench-tls"))
    p.add_argument("--markdown", type=Path, help="also write the tables as markdown here")
    p.add_argument("--json", type=Path, help="also write every sample as JSON here")
    p.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="profile the Python terminators during each load interval (py-spy record --native, "
        "raw collapsed stacks) into DIR; py-spy runs on the load core and pauses the terminator "
        "100 times a second, so profiled runs are a little slower",
    )
    args = p.parse_args()
    quick = args.quick
    args.runs = args.runs or (1 if quick else 3)
    args.duration = args.duration or (3 if quick else 10)
    args.idle_conns = args.idle_conns or (1000 if quick else 5000)
    args.cert_counts = [
        int(c)
        for c in (args.cert_counts or ("1000" if quick else "1000,10000,100000")).split(",")
        if c
    ]
    args.terminators = [t for t in args.terminators.split(",") if t]
    args.metrics = [m for m in args.metrics.split(",") if m]
    for t in args.terminators:
        if t not in TERMINATORS:
            p.error(f"unknown terminator {t!r}: use {', '.join(TERMINATORS)}")
    for m in args.metrics:
        if m not in METRICS:
            p.error(f"unknown metric {m!r}: use {', '.join(METRICS)}")
    if args.py_spy and not PY_SPY.exists():
        p.error(f"--py-spy: no {PY_SPY}: pip install py-spy into this venv")
    return args


def check_tools(kinds: list[str]) -> None:
    need = {"taskset", "openssl", "wrk", "nginx"}
    need |= {k for k in kinds if k in ("haproxy", "hitch")}
    missing = [t for t in sorted(need) if shutil.which(t) is None]
    if {"nginx", "nginx-w2"} & set(kinds) and not Path(STREAM_MODULE).exists():
        missing.append("libnginx-mod-stream")
    if missing:
        raise SystemExit(
            f"missing: {', '.join(missing)}: run it as `scripts/bench tls`, which installs them"
        )
    if os.cpu_count() is None or os.cpu_count() < 2:
        raise SystemExit("needs 2 cores: the terminator on core 0, the load on core 1")


def main() -> int:
    args = parse_args()
    kinds = args.terminators
    check_tools(kinds)
    # Room for 5,000 client + 5,000 terminator + 5,000 backend sockets (the hard limit may be
    # lower where we may not raise it: 20,000 here); children inherit it.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = 65536
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, PermissionError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.sched_setaffinity(0, {LOAD_CPU})
    # SIGTERM (timeout, a CI limit) unwinds like Ctrl-C, so every `finally` stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = environment()
    started = time.monotonic()
    workdir = args.workdir
    if (workdir / "run").exists():
        shutil.rmtree(workdir / "run")
    workdir.mkdir(parents=True, exist_ok=True)
    pki = make_pki(workdir / "pki")
    backend_port = free_port()
    backend = start_backend(workdir, backend_port)
    res = Results()
    try:
        if set(args.metrics) - {"startup"}:
            for run in range(1, args.runs + 1):
                log(f"run {run}/{args.runs}")
                first = (run - 1) % len(kinds)
                order = kinds[first:] + kinds[:first]
                for unit in throughput_units(args.metrics):
                    for kind in order:
                        throughput_session(kind, unit, run, args, pki, workdir, backend_port, res)
        if "startup" in args.metrics:
            for count in args.cert_counts:
                many = make_many(pki, workdir, count, backend_port)
                for _ in range(args.startup_runs):
                    for kind in kinds:
                        startup_session(kind, many, args, pki, workdir, backend_port, res)
                shutil.rmtree(many.directory, ignore_errors=True)
    finally:
        backend.stop()
    rows = []
    if "handshake" in args.metrics:
        rows += [ROW_HS["ecdsa-p256"], ROW_HS["rsa-2048"]]
    rows += [
        r
        for m, r in (
            ("resumed", ROW_RESUMED),
            ("requests", ROW_REQ),
            ("bulk", ROW_BULK),
            ("idle", ROW_IDLE),
        )
        if m in args.metrics
    ]
    if "startup" in args.metrics:
        for c in args.cert_counts:
            rows += [row_startup(c), row_after_start(c), row_startup_rss(c)]
    table, detail = report(res, kinds, rows, args), details(res, kinds, rows)
    pairs = paired(res, kinds, rows)
    scaled = scaling(res, kinds, rows)
    env["load average at end"] = f"{os.getloadavg()[0]:.2f}"
    env["total time"] = f"{time.monotonic() - started:.0f} s"
    settings = (
        f"runs {args.runs} x {args.duration} s; handshakes: {args.hs_clients} x "
        f"`openssl s_time -new -tls1_3`; requests: `wrk -t1 -c{args.req_conns}`; "
        f"1 MiB: `wrk -t1 -c{args.bulk_conns}`; idle: {args.idle_conns} connections; "
        f"startup: timeout {args.startup_timeout:.0f} s, {args.startup_runs} run(s)"
    )
    text = "\n".join(
        [table, ""]
        + (["Per run (the ratio of two samples of the same run):", "", pairs, ""] if pairs else [])
        + (["Two worker processes ÷ one, per run:", "", scaled, ""] if scaled else [])
        + ["Every run:", "", detail, "", f"Settings: {settings}", ""]
        + [f"- {k}: {v}" for k, v in env.items()]
    )
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "env": env,
                    "settings": settings,
                    "samples": [
                        {"row": r, "terminator": k, "runs": [s.__dict__ for s in v]}
                        for (r, k), v in res.samples.items()
                    ],
                    "failures": [
                        {"row": r, "terminator": k, "error": e}
                        for (r, k), e in res.failures.items()
                    ],
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
