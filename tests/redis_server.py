"""A real redis-server on a free loopback port, for the fleet tests; plain or TLS-only
(`redis_tls_server`: certificates from tests.pki, client certificates required)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.pki import Issued, make_ca, make_leaf, new_key, write_pair
from tests.ports import free_port


@dataclass(frozen=True)
class RedisTlsFiles:
    """The CA that signs the server's certificate (for "localhost") and a client's."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def create(cls, directory: Path, ca_name: str = "Redis Test CA") -> RedisTlsFiles:
        directory.mkdir(parents=True, exist_ok=True)
        ca = make_ca(ca_name)
        (directory / "redis-ca.pem").write_bytes(ca.cert_pem)
        server_cert, server_key = write_pair(
            directory, "redis-server", make_leaf(ca, ["localhost"])
        )
        client_cert, client_key = write_pair(directory, "redis-client", _client_leaf(ca))
        return cls(directory / "redis-ca.pem", server_cert, server_key, client_cert, client_key)


def _client_leaf(ca: Issued) -> Issued:
    """A TLS client certificate (clientAuth): Redis checks the purpose of client certificates."""
    key = new_key("ecdsa-p256")
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edged node")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, tls: RedisTlsFiles | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.tls = tls
        # TLS: the certificate names "localhost", so the URL does (the client checks it).
        self.url = (
            f"rediss://localhost:{self.port}/0" if tls else f"redis://127.0.0.1:{self.port}/0"
        )
        self._start()

    def _start(self) -> None:
        args = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir)]  # fmt: skip
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            args += ["--port", "0", "--tls-port", str(self.port),
                     "--tls-cert-file", str(self.tls.server_cert),
                     "--tls-key-file", str(self.tls.server_key),
                     "--tls-ca-cert-file", str(self.tls.ca),
                     "--tls-auth-clients", "yes"]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        client.close()

    def client(self) -> redis.Redis:
        """A client of this server (with the client certificate in TLS mode)."""
        tls: dict[str, Any] = {}
        if self.tls is not None:
            tls = {
                "ssl_ca_certs": str(self.tls.ca),
                "ssl_certfile": str(self.tls.client_cert),
                "ssl_keyfile": str(self.tls.client_key),
            }
        return redis.Redis.from_url(self.url, socket_timeout=2, **tls)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)

    def start_again(self) -> None:
        """Restart on the same port (after stop()): the data is gone, like a Redis restart."""
        self._start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def redis_tls_server(tmp_path: Path) -> Iterator[RedisServer]:
    """redis-server speaking only TLS and requiring a client certificate (.tls has the files)."""
    s = RedisServer(tmp_path, tls=RedisTlsFiles.create(tmp_path / "redis-tls"))
    try:
        yield s
    finally:
        s.stop()
