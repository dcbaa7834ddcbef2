#!/usr/bin/env python3
"""ACME issuance benchmark: edged against certbot and lego, measured in the same run.

For each challenge type (HTTP-01, DNS-01) every client gets its own real Pebble
(PEBBLE_VA_NOSLEEP=1) and orders, one after the other, `--runs` certificates, each for two
fresh names (`<tag><i>.test`, `www.<tag><i>.test`) with an ECDSA P-256 key. One untimed warm-up
issuance per client registers its ACME account first. Runs are interleaved round-robin across
clients so machine noise is shared. Clients:

- edged CLI:     the `edged issue NAME --config C` process (Python start-up included: certbot and
                 lego are processes too); HTTP-01 answered by its own listener on Pebble's port.
- edged library: the in-process `edged.renewer.obtain()` call (HTTP-01 listener started once).
- certbot:       `certbot certonly --standalone` / `--authenticator dns-rfc2136`.
- lego:          `lego --http` / `--dns rfc2136`.

DNS-01 uses a real BIND9 (tests/bind.py: zone `test`, TSIG key) both for the RFC 2136 updates
and as Pebble's `-dnsserver`. certbot's rfc2136 plugin waits a fixed
`--dns-rfc2136-propagation-seconds` (default here 0, the minimum: BIND applies an update before
it answers it); lego runs with RFC2136_POLLING_INTERVAL=0 and RFC2136_SEQUENCE_INTERVAL=0 (its
default waits 60 s between the names) and `--dns.disable-cp` (its check of every authoritative
nameserver asks them on port 53, and this BIND is not on 53), so it checks the record at
`--dns.resolvers` only; edged asks every authoritative nameserver on
`acme.dns.nameserver_port`.

Every certificate is checked after its run (outside the timing): both names, EC P-256 key.

Run: scripts/bench acme [--runs N] [--json PATH]  (or .venv/bin/python scripts/bench_acme.py)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edged.config import Config, load_config
from edged.dns import load_tsig_key
from edged.http01 import ChallengeBoard, Http01App, HttpListeners
from edged.renewer import build_solver_factory, obtain
from edged.store.files import FileStore
from tests.bind import NAMED, Bind, start_bind
from tests.pebble import Pebble, free_port, start_pebble

EDGED = str(Path(sys.executable).with_name("edged"))
EMAIL = "bench@edged.test"
ZONE = "test"
CHALLENGES = ("http-01", "dns-01")
RUN_TIMEOUT = 120.0


class RunFailed(Exception):
    """One issuance failed; the message is the client's last words."""


def tail(text: str, lines: int = 6) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def names_for(tag: str, index: int) -> tuple[str, str]:
    base = f"{tag}{index}.{ZONE}"
    return base, f"www.{base}"


def verify(fullchain: Path, privkey: Path, names: Sequence[str]) -> None:
    """The certificate covers exactly `names` and its key is EC P-256 and matches."""
    try:
        cert = x509.load_pem_x509_certificates(fullchain.read_bytes())[0]
        key = serialization.load_pem_private_key(privkey.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise RunFailed(f"no usable certificate/key: {exc}") from None
    san = set(
        cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
    )
    if san != set(names):
        raise RunFailed(f"certificate names {sorted(san)} != {sorted(names)}")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise RunFailed(f"certificate key is not EC P-256: {public}")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != public:
        raise RunFailed("private key does not match the certificate")


def run_process(
    argv: Sequence[str], env: dict[str, str] | None = None, log: Path | None = None
) -> float:
    """Run one client process; its wall time, or RunFailed with its last output lines.
    Its output goes to `log` (kept with --keep) after the timing."""
    start = time.perf_counter()
    try:
        out = subprocess.run(
            argv,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=RUN_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        text = exc.output.decode(errors="replace") if exc.output else ""
        raise RunFailed(f"timed out after {RUN_TIMEOUT:g} s: {tail(text)}") from None
    elapsed = time.perf_counter() - start
    if log is not None:
        log.write_bytes(out.stdout)
    if out.returncode != 0:
        raise RunFailed(f"exit {out.returncode}: {tail(out.stdout.decode(errors='replace'))}")
    return elapsed


@dataclass
class Dns:
    """Where the DNS-01 clients send updates and queries."""

    bind: Bind
    secret_b64: str


class Client:
    key = ""
    label = ""
    tag = ""

    def __init__(self, workdir: Path, challenge: str, pebble: Pebble, dns: Dns | None) -> None:
        self.workdir = workdir
        self.challenge = challenge
        self.pebble = pebble
        self.dns = dns

    async def setup(self, runs: int) -> None:
        """Prepare (configs, listeners); raise RunFailed when the client cannot work here."""

    async def issue(self, index: int) -> float:
        raise NotImplementedError

    def files(self, name: str) -> tuple[Path, Path]:
        raise NotImplementedError

    def log(self, index: int) -> Path:
        return self.workdir / f"run-{index}.log"

    async def close(self) -> None:
        pass


class EdgedCli(Client):
    key, label, tag = "edged-cli", "edged CLI", "ec"

    def write_config(self, runs: int) -> Path:
        http = f'"127.0.0.1:{self.pebble.http_port}"' if self.challenge == "http-01" else ""
        text = textwrap.dedent(f"""\
            [edged]
            store = "store"
            [listen]
            https = ["127.0.0.1:{free_port()}"]
            http = [{http}]
            metrics = ""
            admin = ""
            [acme]
            directory = "{self.pebble.directory}"
            ca_bundle = "{self.pebble.listener_ca}"
            email = "{EMAIL}"
            challenge = "{self.challenge}"
            key_types = ["ecdsa-p256"]
            """)
        if self.dns is not None:
            port = self.dns.bind.port
            text += textwrap.dedent(f"""\
                [acme.dns]
                server = "127.0.0.1:{port}"
                tsig_key_name = "{self.dns.bind.key_name}"
                tsig_algorithm = "hmac-sha256"
                tsig_secret_file = "{self.dns.bind.secret_file}"
                resolver = "127.0.0.1:{port}"
                nameserver_port = {port}
                propagation_timeout = "10s"
                """)
        for index in range(runs + 1):
            names = ", ".join(f'"{n}"' for n in names_for(self.tag, index))
            text += f'[[site]]\nnames = [{names}]\nbackend = "127.0.0.1:9"\n'
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "edged.toml"
        path.write_text(text)
        return path

    async def setup(self, runs: int) -> None:
        self.config_path = self.write_config(runs)

    async def issue(self, index: int) -> float:
        name = names_for(self.tag, index)[0]
        argv = [EDGED, "issue", name, "--config", str(self.config_path)]
        return await asyncio.to_thread(run_process, argv, None, self.log(index))

    def files(self, name: str) -> tuple[Path, Path]:
        live = self.workdir / "store" / "live" / name
        return live / "fullchain.pem", live / "privkey.pem"


class EdgedLibrary(EdgedCli):
    key, label, tag = "edged-lib", "edged library", "el"

    async def setup(self, runs: int) -> None:
        self.config: Config = load_config(self.write_config(runs))
        acme = self.config.acme
        assert acme is not None and self.config.store_path is not None
        self.acme = acme
        self.store = FileStore(self.config.store_path)
        board = ChallengeBoard()
        self.new_solver = build_solver_factory(acme, board)
        self.listeners: HttpListeners | None = None
        if self.challenge == "http-01":
            config = self.config
            self.listeners = HttpListeners(Http01App(board, lambda: config))
            await self.listeners.sync(config.listen.http)

    async def issue(self, index: int) -> float:
        site = self.config.site_for(names_for(self.tag, index)[0])
        assert site is not None
        start = time.perf_counter()
        try:
            await asyncio.to_thread(obtain, self.acme, self.store, site, self.new_solver)
        except Exception as exc:
            raise RunFailed(f"{type(exc).__name__}: {exc}") from None
        return time.perf_counter() - start

    async def close(self) -> None:
        if self.listeners is not None:
            await self.listeners.close()


class Certbot(Client):
    key, label, tag = "certbot", "certbot", "cb"
    propagation_seconds = 0

    def common(self) -> list[str]:
        return [
            "--config-dir",
            str(self.workdir / "config"),
            "--work-dir",
            str(self.workdir / "work"),
            "--logs-dir",
            str(self.workdir / "logs"),
        ]

    async def setup(self, runs: int) -> None:
        if shutil.which("certbot") is None:
            raise RunFailed("certbot is not installed (apt-get install certbot)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = {"REQUESTS_CA_BUNDLE": str(self.pebble.listener_ca)}
        if self.challenge == "http-01":
            self.auth = [
                "--standalone",
                "--preferred-challenges",
                "http",
                "--http-01-port",
                str(self.pebble.http_port),
                "--http-01-address",
                "127.0.0.1",
            ]
            return
        assert self.dns is not None
        plugins = await asyncio.to_thread(
            subprocess.run,
            ["certbot", "plugins", *self.common()],
            capture_output=True,
            text=True,
            check=False,
        )
        if "dns-rfc2136" not in plugins.stdout:
            raise RunFailed(
                "certbot's dns-rfc2136 plugin is absent (apt-get install "
                "python3-certbot-dns-rfc2136)"
            )
        ini = self.workdir / "rfc2136.ini"
        ini.write_text(
            f"dns_rfc2136_server = 127.0.0.1\n"
            f"dns_rfc2136_port = {self.dns.bind.port}\n"
            f"dns_rfc2136_name = {self.dns.bind.key_name}\n"
            f"dns_rfc2136_secret = {self.dns.secret_b64}\n"
            f"dns_rfc2136_algorithm = HMAC-SHA256\n"
        )
        ini.chmod(0o600)
        self.auth = [
            "--authenticator",
            "dns-rfc2136",
            "--preferred-challenges",
            "dns",
            "--dns-rfc2136-credentials",
            str(ini),
            "--dns-rfc2136-propagation-seconds",
            str(self.propagation_seconds),
        ]

    async def issue(self, index: int) -> float:
        name, www = names_for(self.tag, index)
        argv = [
            "certbot",
            "certonly",
            "--non-interactive",
            "--agree-tos",
            "-m",
            EMAIL,
            "--no-eff-email",
            "--server",
            self.pebble.directory,
            *self.common(),
            "--key-type",
            "ecdsa",
            "--elliptic-curve",
            "secp256r1",
            "--cert-name",
            name,
            "-d",
            name,
            "-d",
            www,
            *self.auth,
        ]
        return await asyncio.to_thread(run_process, argv, self.env, self.log(index))

    def files(self, name: str) -> tuple[Path, Path]:
        live = self.workdir / "config" / "live" / name
        return live / "fullchain.pem", live / "privkey.pem"


class Lego(Client):
    key, label, tag = "lego", "lego", "lg"

    async def setup(self, runs: int) -> None:
        if shutil.which("lego") is None:
            raise RunFailed("lego is not installed (apt-get install lego)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = {"LEGO_CA_CERTIFICATES": str(self.pebble.listener_ca)}
        if self.challenge == "http-01":
            self.auth = ["--http", "--http.port", f"127.0.0.1:{self.pebble.http_port}"]
            return
        assert self.dns is not None
        address = f"127.0.0.1:{self.dns.bind.port}"
        self.env.update(
            {
                "RFC2136_NAMESERVER": address,
                "RFC2136_TSIG_KEY": self.dns.bind.key_name,
                "RFC2136_TSIG_SECRET": self.dns.secret_b64,
                "RFC2136_TSIG_ALGORITHM": "hmac-sha256.",
                "RFC2136_PROPAGATION_TIMEOUT": "10",
                "RFC2136_POLLING_INTERVAL": "0",
                "RFC2136_SEQUENCE_INTERVAL": "0",
            }
        )
        self.auth = ["--dns", "rfc2136", "--dns.resolvers", address, "--dns.disable-cp"]

    async def issue(self, index: int) -> float:
        name, www = names_for(self.tag, index)
        argv = [
            "lego",
            "--accept-tos",
            "--email",
            EMAIL,
            "--server",
            self.pebble.directory,
            "--path",
            str(self.workdir / "lego"),
            "--key-type",
            "ec256",
            "-d",
            name,
            "-d",
            www,
            *self.auth,
            "run",
        ]
        return await asyncio.to_thread(run_process, argv, self.env, self.log(index))

    def files(self, name: str) -> tuple[Path, Path]:
        certs = self.workdir / "lego" / "certificates"
        return certs / f"{name}.crt", certs / f"{name}.key"


CLIENTS: tuple[type[Client], ...] = (EdgedCli, EdgedLibrary, Certbot, Lego)


@dataclass
class Result:
    client: str
    label: str
    challenge: str
    times: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warmup: float | None = None
    na: str = ""

    def stats(self) -> dict[str, float] | None:
        if not self.times:
            return None
        return {
            "median": statistics.median(self.times),
            "min": min(self.times),
            "max": max(self.times),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "label": self.label,
            "challenge": self.challenge,
            "times": self.times,
            "failures": self.failures,
            "warmup": self.warmup,
            "na": self.na,
            "stats": self.stats(),
        }


async def attempt(client: Client, index: int, result: Result) -> float | None:
    name, www = names_for(client.tag, index)
    try:
        seconds = await client.issue(index)
        verify(*client.files(name), (name, www))
    except RunFailed as exc:
        result.failures.append(f"run {index}: {exc}")
        return None
    return seconds


async def bench_challenge(
    challenge: str, runs: int, workdir: Path, dns: Dns | None, only: Sequence[str]
) -> list[Result]:
    results: list[Result] = []
    active: list[tuple[Client, Result]] = []
    pebbles: list[Pebble] = []
    try:
        for cls in CLIENTS:
            if cls.key not in only:
                continue
            result = Result(cls.key, cls.label, challenge)
            results.append(result)
            dns_server = f"127.0.0.1:{dns.bind.port}" if dns is not None else None
            pebble = start_pebble(workdir / cls.key / "pebble", dns_server=dns_server)
            pebbles.append(pebble)
            client = cls(workdir / cls.key, challenge, pebble, dns)
            try:
                await client.setup(runs)
            except RunFailed as exc:
                result.na = str(exc)
                continue
            # Warm-up: registers the account (and loads whatever is loaded once); not timed.
            result.warmup = await attempt(client, 0, result)
            if result.warmup is None:
                result.na = "warm-up failed: " + result.failures[-1].splitlines()[-1][:160]
                await client.close()
                continue
            active.append((client, result))
            print(f"  {challenge} {cls.label}: ready (warm-up {result.warmup:.2f} s)", flush=True)
        for index in range(1, runs + 1):
            order = active[index % len(active) :] + active[: index % len(active)] if active else []
            for client, result in order:
                seconds = await attempt(client, index, result)
                if seconds is not None:
                    result.times.append(seconds)
            line = "  ".join(
                f"{r.label} {r.times[-1]:.2f}" if len(r.times) else f"{r.label} -"
                for _, r in active
            )
            print(f"  {challenge} run {index}/{runs}: {line}", flush=True)
    finally:
        for client, _ in active:
            await client.close()
        for pebble in pebbles:
            pebble.stop()
    for result in results:
        if not result.na and not result.times:
            result.na = "every run failed: " + result.failures[-1].splitlines()[-1][:160]
    return results


def dns_zone_records(runs: int, only: Sequence[str]) -> str:
    lines = []
    for cls in CLIENTS:
        if cls.key in only:
            for index in range(runs + 1):
                for name in names_for(cls.tag, index):
                    lines.append(f"{name.removesuffix('.' + ZONE)} IN A 127.0.0.1")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """Versions of the peers (Debian packages) and of edged."""
    out = {"python": platform.python_version()}
    for tool, argv in (
        ("edged", [EDGED, "--version"]),
        *(
            (pkg, ["dpkg-query", "-W", "-f", "${Version}", pkg])
            for pkg in ("certbot", "python3-certbot-dns-rfc2136", "lego", "pebble", "bind9")
        ),
    ):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            out[tool] = done.stdout.strip().splitlines()[0] if done.returncode == 0 else "n/a"
        except (OSError, IndexError, subprocess.TimeoutExpired):
            out[tool] = "n/a"
    return out


def startup_times(repeat: int = 5) -> dict[str, float | None]:
    """Median wall time of `--version`: the bare process start of each CLI, for context."""
    out: dict[str, float | None] = {}
    for tool, argv in (
        ("edged", [EDGED, "--version"]),
        ("certbot", ["certbot", "--version"]),
        ("lego", ["lego", "--version"]),
    ):
        try:
            out[tool] = statistics.median(run_process(argv) for _ in range(repeat))
        except (OSError, RunFailed):
            out[tool] = None
    return out


def have_named() -> bool:
    return Path(NAMED).exists()


def write_json(path: Path, raw: dict[str, Any]) -> None:
    path.write_text(json.dumps(raw, indent=2) + "\n")


def ratio(results: list[Result], slow: str, fast: str) -> float | None:
    by_key = {r.client: r.stats() for r in results}
    a, b = by_key.get(slow), by_key.get(fast)
    if not a or not b:
        return None
    return a["median"] / b["median"]


def table(all_results: dict[str, list[Result]], runs: int) -> str:
    rows = [
        "| challenge | client | median s | min s | max s | ok runs |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for challenge, results in all_results.items():
        for r in results:
            s = r.stats()
            if r.na:
                rows.append(f"| {challenge} | {r.label} | n/a: {r.na} | | | 0/{runs} |")
            elif s is not None:
                rows.append(
                    f"| {challenge} | {r.label} | {s['median']:.2f} | {s['min']:.2f} | "
                    f"{s['max']:.2f} | {len(r.times)}/{runs} |"
                )
    rows += [
        "",
        "Ratios of medians (> 1: edged is that many times faster):",
        "",
        "| challenge | certbot ÷ edged CLI | lego ÷ edged CLI | certbot ÷ edged library "
        "| lego ÷ edged library |",
        "|---|---:|---:|---:|---:|",
    ]
    for challenge, results in all_results.items():
        cells = []
        for slow, fast in (
            ("certbot", "edged-cli"),
            ("lego", "edged-cli"),
            ("certbot", "edged-lib"),
            ("lego", "edged-lib"),
        ):
            value = ratio(results, slow, fast)
            cells.append(f"{value:.2f}x" if value is not None else "n/a")
        rows.append(f"| {challenge} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


async def main(args: argparse.Namespace) -> int:
    only = [c.key for c in CLIENTS if c.key in args.clients.split(",")]
    challenges = [c for c in CHALLENGES if c in args.challenges.split(",")]
    Certbot.propagation_seconds = args.certbot_propagation_seconds
    workdir = Path(tempfile.mkdtemp(prefix="edged-bench-acme-"))
    started = time.monotonic()
    info = versions()
    startup = startup_times()
    all_results: dict[str, list[Result]] = {}
    notes: list[str] = []
    try:
        for challenge in challenges:
            print(f"== {challenge}", flush=True)
            if challenge == "http-01":
                all_results[challenge] = await bench_challenge(
                    challenge, args.runs, workdir / challenge, None, only
                )
                continue
            if not have_named():
                all_results[challenge] = [
                    Result(c.key, c.label, challenge, na="BIND9 (named) is not installed")
                    for c in CLIENTS
                    if c.key in only
                ]
                continue
            zones = {ZONE: dns_zone_records(args.runs, only)}
            with start_bind(workdir / challenge, zones) as bind:
                secret = load_tsig_key(bind.settings()).secret
                dns = Dns(bind, base64.b64encode(secret).decode())
                all_results[challenge] = await bench_challenge(
                    challenge, args.runs, workdir / challenge, dns, only
                )
    finally:
        if args.keep:
            notes.append(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    print()
    print(
        f"ACME issuance: {args.runs} timed runs per client (after 1 untimed warm-up), one "
        f"certificate for 2 names, ECDSA P-256, Pebble with PEBBLE_VA_NOSLEEP=1, one Pebble per "
        f"client; certbot dns-rfc2136 propagation-seconds={args.certbot_propagation_seconds}, "
        f"lego --dns.disable-cp, polling and sequence interval 0"
    )
    print(
        f"machine: {os.cpu_count()} cores, load average at end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; total {elapsed:.0f} s"
    )
    print(
        "process start (`--version`, median of 5): "
        + ", ".join(f"{k} {v:.3f} s" if v is not None else f"{k} n/a" for k, v in startup.items())
    )
    print("versions: " + "; ".join(f"{k}: {v}" for k, v in info.items()))
    print()
    print(table(all_results, args.runs))
    failures = [
        f"{r.challenge} {r.label}: {f}"
        for rs in all_results.values()
        for r in rs
        for f in r.failures
    ]
    if failures:
        print("\nfailures:")
        for failure in failures:
            print("  " + failure.replace("\n", "\n    "))
    for note in notes:
        print(note)
    if args.json:
        raw = {
            "runs": args.runs,
            "machine": {
                "cores": os.cpu_count(),
                "loadavg_end": os.getloadavg(),
                "platform": platform.platform(),
            },
            "versions": info,
            "startup_seconds": startup,
            "certbot_propagation_seconds": args.certbot_propagation_seconds,
            "total_seconds": elapsed,
            "results": {c: [r.to_json() for r in rs] for c, rs in all_results.items()},
            "ratios": {
                c: {
                    f"{slow}/{fast}": ratio(rs, slow, fast)
                    for slow in ("certbot", "lego")
                    for fast in ("edged-cli", "edged-lib")
                }
                for c, rs in all_results.items()
            },
        }
        write_json(Path(args.json), raw)
        print(f"raw results: {args.json}")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="timed issuances per client")
    parser.add_argument("--json", default="", help="also write the raw results here")
    parser.add_argument(
        "--challenges", default=",".join(CHALLENGES), help="comma-separated: http-01,dns-01"
    )
    parser.add_argument(
        "--clients",
        default=",".join(c.key for c in CLIENTS),
        help="comma-separated: " + ",".join(c.key for c in CLIENTS),
    )
    parser.add_argument(
        "--certbot-propagation-seconds",
        type=int,
        default=0,
        help="certbot's fixed wait after its DNS updates (default 0)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
