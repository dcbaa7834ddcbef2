"""Real Pebble (the ACME test CA) and pebble-challtestsrv on free loopback ports.

Used by the tests and by scripts/demo (`python -m tests.pebble DIR` prints a directory URL and
runs until killed). pebble-challtestsrv answers every A query with 127.0.0.1, so Pebble validates
HTTP-01 by connecting to 127.0.0.1:<http_port>, where edged's HTTP listener must be. For DNS-01
pass `dns_server` (e.g. a BIND from tests/bind.py) instead and no challtestsrv is started.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.ports import free_port


@dataclass
class Pebble:
    directory: str  # ACME directory URL
    listener_ca: Path  # trust this for the ACME server's own TLS (edged's acme.ca_bundle)
    management: str  # https://127.0.0.1:M
    http_port: int  # where Pebble sends HTTP-01 validation requests
    tls_port: int
    dns_port: int
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def _get(self, path: str) -> bytes:
        ctx = ssl.create_default_context(cafile=str(self.listener_ca))
        with urllib.request.urlopen(self.management + path, context=ctx, timeout=5) as resp:
            data: bytes = resp.read()
            return data

    def root_pem(self) -> bytes:
        """Pebble's issuing root (changes every start)."""
        return self._get("/roots/0")

    def intermediate_pem(self) -> bytes:
        return self._get("/intermediates/0")

    def log(self) -> str:
        path = self.workdir / "pebble.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def count(self, needle: str) -> int:
        """How often `needle` appears in Pebble's log (e.g. orders created)."""
        return self.log().count(needle)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def _listener_cert(workdir: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    # A name of its own: two Pebbles' listener certificates in one CA bundle (a test of a
    # change of CA) must not be taken for each other by the subject lookup.
    serial = x509.random_serial_number()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pebble listener {serial:x}")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = workdir / "listener.pem"
    key_path = workdir / "listener.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _wait_ready(pebble: Pebble, deadline: float) -> None:
    ctx = ssl.create_default_context(cafile=str(pebble.listener_ca))
    while True:
        for proc in pebble.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"pebble exited at startup:\n{pebble.log()[-2000:]}")
        try:
            with urllib.request.urlopen(pebble.directory, context=ctx, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"pebble not ready:\n{pebble.log()[-2000:]}") from None
            time.sleep(0.05)


def start_pebble(
    workdir: Path,
    *,
    http_port: int | None = None,
    tls_port: int | None = None,
    dns_server: str | None = None,
    nonce_reject: int = 0,
    env: dict[str, str] | None = None,
    port: int | None = None,
    eab_required: bool = False,
    eab_keys: dict[str, str] | None = None,
) -> Pebble:
    """Start Pebble (+ challtestsrv unless `dns_server` is given); the caller must stop() it.

    `eab_required` makes new accounts need an external account binding (RFC 8555 section
    7.3.4); `eab_keys` maps each key id Pebble accepts to its base64url HMAC key."""
    workdir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = _listener_cert(workdir)
    acme_port = port or free_port()
    mgmt_port = free_port()
    http_port = http_port or free_port()
    tls_port = tls_port or free_port()
    dns_port = 0
    pebble = Pebble(
        directory=f"https://127.0.0.1:{acme_port}/dir",
        listener_ca=cert_path,
        management=f"https://127.0.0.1:{mgmt_port}",
        http_port=http_port,
        tls_port=tls_port,
        dns_port=0,
        workdir=workdir,
    )
    log = (workdir / "pebble.log").open("ab")
    try:
        if dns_server is None:
            dns_port = free_port()
            dns_server = f"127.0.0.1:{dns_port}"
            pebble.dns_port = dns_port
            pebble.procs.append(
                subprocess.Popen(
                    [
                        "pebble-challtestsrv",
                        "-dns01",
                        dns_server,
                        "-http01",
                        "",
                        "-https01",
                        "",
                        "-tlsalpn01",
                        "",
                        "-management",
                        f"127.0.0.1:{free_port()}",
                        "-defaultIPv4",
                        "127.0.0.1",
                        "-defaultIPv6",
                        "",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{acme_port}",
                "managementListenAddress": f"127.0.0.1:{mgmt_port}",
                "certificate": str(cert_path),
                "privateKey": str(key_path),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": eab_required,
            }
        }
        if eab_keys:
            config["pebble"]["externalAccountMACKeys"] = dict(eab_keys)
        config_path = workdir / "pebble-config.json"
        config_path.write_text(json.dumps(config))
        proc_env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": str(nonce_reject),
            **(env or {}),
        }
        pebble.procs.append(
            subprocess.Popen(
                ["pebble", "-config", str(config_path), "-dnsserver", dns_server],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=proc_env,
            )
        )
        _wait_ready(pebble, time.monotonic() + 15)
    except BaseException:
        pebble.stop()
        raise
    finally:
        log.close()
    return pebble


@contextlib.contextmanager
def running_pebble(workdir: Path, **kwargs: object) -> Iterator[Pebble]:
    pebble = start_pebble(workdir, **kwargs)  # type: ignore[arg-type]
    try:
        yield pebble
    finally:
        pebble.stop()


if __name__ == "__main__":
    # scripts/demo: `python -m tests.pebble DIR HTTP_PORT ACME_PORT` starts Pebble (validating
    # HTTP-01 on HTTP_PORT), writes Pebble's root to DIR/root.pem and runs until killed.
    import signal

    def _stop(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)  # so `finally` stops Pebble when the demo ends
    workdir = Path(sys.argv[1])
    p = start_pebble(workdir, http_port=int(sys.argv[2]), port=int(sys.argv[3]))
    (workdir / "root.pem").write_bytes(p.root_pem())
    print(json.dumps({"directory": p.directory, "ca_bundle": str(p.listener_ca)}), flush=True)
    try:
        while all(proc.poll() is None for proc in p.procs):
            time.sleep(0.5)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        p.stop()
