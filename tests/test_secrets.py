"""Secrets: key files 0600 in 0700 directories whatever the umask; key material never in logs,
/metrics, `edged status --json`, admin API errors or CertError messages; and no name (`../x`,
`a/b`, `..`, NUL) can address a path outside the store, through the store or the admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization

from edged.acme.client import AcmeSession
from edged.certs import parse_bundle
from edged.config import AcmeSettings
from edged.errors import CertError, StoreError
from edged.store import FileStore, PemPair, StoredCert
from tests.conftest import free_port, run_backend, run_cmd, run_edged
from tests.pebble import Pebble
from tests.pki import (
    Issued,
    encrypted_key_pem,
    fullchain,
    legacy_encrypted_key_pem,
    make_ca,
    make_intermediate,
    make_leaf,
)

EDGED = str(Path(sys.executable).with_name("edged"))
UPLOAD = "one.example.test"
FILES = "two.example.test"
BAD_NAMES = ["../x", "a/b", "..", ".", "a\x00b", "/etc/passwd", "..\\x", "a.test/../../x", ""]


def key_pieces(*keys: bytes) -> list[str]:
    """24-character pieces of every base64 line of the PEM keys: one found means a leak."""
    pieces = []
    for pem in keys:
        for line in pem.decode("latin-1").splitlines():
            if line.startswith("-----") or ":" in line:
                continue
            pieces += [line[i : i + 24] for i in range(0, len(line) - 23, 24)]
    return pieces


def assert_no_key(text: str, *keys: bytes, where: str) -> None:
    assert not re.search(r"PRIVATE KEY-----\s*[A-Za-z0-9+/=]{16}", text), f"a PEM key in {where}"
    leaked = [piece for piece in key_pieces(*keys) if piece in text]
    assert not leaked, f"key material in {where}: {leaked[:3]}"


def check_modes(root: Path) -> None:
    assert stat.S_IMODE(root.stat().st_mode) == 0o700, root
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            assert stat.S_IMODE(os.lstat(os.path.join(dirpath, d)).st_mode) == 0o700, d
        for f in filenames:
            mode = stat.S_IMODE(os.lstat(os.path.join(dirpath, f)).st_mode)
            assert mode == 0o600, f"{dirpath}/{f} has mode {mode:o}"


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def chain() -> dict[str, Issued]:
    ca = make_ca("Secrets Root")
    inter = make_intermediate(ca, "Secrets Intermediate")
    return {
        "ca": ca,
        "inter": inter,
        "one": make_leaf(inter, [UPLOAD]),
        "one_rsa": make_leaf(inter, [UPLOAD], key_type="rsa-2048"),
        "other": make_leaf(inter, [UPLOAD]),
        "two": make_leaf(inter, [FILES]),
    }


def stored(leaf: Issued, inter: Issued, stamp: float) -> StoredCert:
    return StoredCert(
        UPLOAD,
        (UPLOAD,),
        (PemPair("ecdsa-p256", fullchain(leaf, inter), leaf.key_pem),),
        "upload",
        stamp,
    )


# --- permissions ------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_store_modes_whatever_the_umask(
    tmp_path: Path, chain: dict[str, Issued], mask: int
) -> None:
    with umask(mask):
        store = FileStore(tmp_path / "certs")
        store.save(stored(chain["one"], chain["inter"], 1.0))
        check_modes(store.root)
        store.save(stored(chain["other"], chain["inter"], 2.0))
        check_modes(store.root)
        store.rollback(UPLOAD)
        check_modes(store.root)
        store.save_state(UPLOAD, {"status": "active"})
        store.save_account("https://ca.test/dir", {"id": 1}, chain["one"].key_pem)
        check_modes(store.root)
        store.delete(UPLOAD)
        check_modes(store.root)


async def test_acme_account_key_0600_and_never_logged(
    pebble: Pebble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = AcmeSettings(
        directory=pebble.directory, ca_bundle=pebble.listener_ca, email="ops@a.test"
    )
    store = FileStore(tmp_path / "store")
    with umask(0):
        session = AcmeSession(settings, store)
        try:
            await asyncio.to_thread(session.open)
        finally:
            session.close()
    account_dirs = list((tmp_path / "store" / "accounts").iterdir())
    assert len(account_dirs) == 1
    check_modes(tmp_path / "store")
    key_pem = (account_dirs[0] / "key.pem").read_bytes()
    assert_no_key(caplog.text, key_pem, where="logs")
    assert_no_key((account_dirs[0] / "account.json").read_text(), key_pem, where="account.json")


# --- CertError messages -----------------------------------------------------------------------


def bad_keys(chain: dict[str, Issued]) -> dict[str, tuple[bytes, bytes]]:
    """(cert, key) pairs parse_bundle rejects, each carrying real key material somewhere."""
    one, other = chain["one"], chain["other"]
    cert = fullchain(one, chain["inter"])
    key = one.key_pem
    lines = key.decode().splitlines()
    flipped = "\n".join([lines[0], lines[1][:10] + "!" + lines[1][11:], *lines[2:]]).encode()
    der = one.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {
        "mismatch": (cert, other.key_pem),
        "truncated": (cert, key[: len(key) // 2]),
        "truncated_body": (cert, b"\n".join(key.splitlines()[:-2] + key.splitlines()[-1:])),
        "bad_base64": (cert, flipped),
        "encrypted": (cert, encrypted_key_pem(one)),
        "legacy_encrypted": (cert, legacy_encrypted_key_pem(one)),
        "two_keys": (cert, key + other.key_pem),
        "key_as_cert": (key, key),
        "cert_as_key": (cert, cert),
        "der_key": (cert, der),
        "rsa_1024": (cert, make_leaf(None, ["x.test"], key_type="rsa-1024").key_pem),
        "ed25519": (cert, make_leaf(None, ["x.test"], key_type="ed25519").key_pem),
        "key_in_label": (cert, key.replace(b"PRIVATE KEY", b"PRIVATE KEYX")),
    }


def test_cert_errors_never_carry_key_material(chain: dict[str, Issued]) -> None:
    for case, (cert, key) in bad_keys(chain).items():
        with pytest.raises(CertError) as info:
            parse_bundle(cert, key, source="cert.pem", key_source="key.pem")
        text = f"{info.value} {info.value.message} {info.value!r}"
        assert_no_key(text, key, cert, chain["one"].key_pem, where=f"CertError for {case}")
        assert not re.search(r"[A-Za-z0-9+/]{48,}", text), (case, text)


# --- the daemon: logs, admin API, /metrics, status --------------------------------------------


async def test_daemon_never_shows_keys(
    tmp_path: Path, chain: dict[str, Issued], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    inter = chain["inter"]
    files = tmp_path / "files"
    files.mkdir()
    (files / "two.crt").write_bytes(fullchain(chain["two"], inter))
    (files / "two.key").write_bytes(chain["two"].key_pem)
    (files / "two.key").chmod(0o600)
    (files / "wrong.key").write_bytes(chain["other"].key_pem)
    all_keys = [c.key_pem for c in chain.values()]
    admin_port, metrics_port = free_port(), free_port()
    async with run_backend() as backend:
        body = f"""
[[site]]
names = ["{UPLOAD}"]
backend = "{backend.address}"

[[site]]
names = ["{FILES}"]
backend = "{backend.address}"
cert_file = "{files / "two.crt"}"
key_file = "{files / "two.key"}"
"""
        async with (
            run_edged(
                tmp_path,
                body,
                admin=f"127.0.0.1:{admin_port}",
                metrics=f"127.0.0.1:{metrics_port}",
            ) as edged,
            aiohttp.ClientSession() as http,
        ):
            admin = f"http://127.0.0.1:{admin_port}"
            texts: dict[str, str] = {}

            async def put(name: str, cert: bytes, key: bytes) -> tuple[int, str]:
                payload = {"cert": cert.decode("latin-1"), "key": key.decode("latin-1")}
                async with http.put(f"{admin}/certs/{name}", json=payload) as r:
                    return r.status, await r.text()

            # Uploads: a good one twice (the second moves the first to previous/) …
            for leaf in (chain["one"], chain["one_rsa"]):
                status, text = await put(UPLOAD, fullchain(leaf, inter), leaf.key_pem)
                assert status == 200, text
                texts[f"upload reply {leaf.subject}"] = text
            check_modes(tmp_path / "store")
            # … and rejected ones: the error bodies never echo the key.
            for case, (cert, key) in bad_keys(chain).items():
                status, text = await put(UPLOAD, cert, key)
                assert status in (400, 422), (case, status, text)
                assert json.loads(text)["error"] in ("invalid_cert", "bad_request")
                texts[f"admin error {case}"] = text
            status, text = await put(FILES, fullchain(chain["two"], inter), chain["two"].key_pem)
            assert status == 409
            texts["admin managed_by_files"] = text
            # A cert_file whose key does not match: the reload is refused and logged.
            config = edged.config_path.read_text()
            edged.config_path.write_text(config.replace("two.key", "wrong.key"))
            assert not await edged.daemon.reload("test")
            edged.config_path.write_text(config)
            assert await edged.daemon.reload("test")

            for path in ("/status", "/certs", f"/certs/{UPLOAD}", f"/certs/{FILES}"):
                async with http.get(admin + path) as r:
                    texts[f"admin GET {path}"] = await r.text()
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                assert r.status == 200
                texts["/metrics"] = await r.text()
            out = await run_cmd(EDGED, "status", "--json", "--config", str(edged.config_path))
            assert out.returncode == 0, out.stderr
            texts["edged status --json"] = out.stdout + out.stderr
            out = await run_cmd(EDGED, "status", "--config", str(edged.config_path))
            texts["edged status"] = out.stdout + out.stderr

    assert "uploaded certificate" in texts[f"upload reply {chain['one'].subject}"]
    for where, text in texts.items():
        assert_no_key(text, *all_keys, where=where)
    assert_no_key(caplog.text, *all_keys, where="logs")
    assert "PRIVATE KEY" not in caplog.text
    # The rejection was logged, naming the file (it used to be found through the watcher's
    # "changed: …/privkey.pem" lines, which a non-recursive store watch no longer writes).
    assert "certificate rejected, not served" in caplog.text
    assert "two.crt" in caplog.text and "does not belong to the certificate" in caplog.text


# --- names never leave the store --------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_never_address_a_path(
    tmp_path: Path, chain: dict[str, Issued], name: str
) -> None:
    root = tmp_path / "store" / "certs"
    store = FileStore(root)
    before = tree(tmp_path)
    cert = StoredCert(name, (name,), stored(chain["one"], chain["inter"], 1.0).pairs, "upload", 1)
    calls = [
        lambda: store.save(cert),
        lambda: store.load(name),
        lambda: store.load_previous(name),
        lambda: store.rollback(name),
        lambda: store.delete(name),
        lambda: store.load_state(name),
        lambda: store.save_state(name, {"status": "x"}),
    ]
    for call in calls:
        with pytest.raises(StoreError, match="invalid certificate name"):
            call()
    assert tree(tmp_path) == before


async def test_admin_put_with_bad_names_writes_nothing(
    tmp_path: Path, chain: dict[str, Issued]
) -> None:
    admin_port = free_port()
    inter = chain["inter"]
    payload = json.dumps(
        {"cert": fullchain(chain["one"], inter).decode(), "key": chain["one"].key_pem.decode()}
    ).encode()
    async with (
        run_backend() as backend,
        run_edged(
            tmp_path,
            f'[[site]]\nnames = ["{UPLOAD}"]\nbackend = "{backend.address}"\n',
            admin=f"127.0.0.1:{admin_port}",
        ),
    ):
        before = tree(tmp_path)
        raw_names = [
            "..%2fx", "a%2fb", "..", "%2e%2e", "a%00b", "%00", "..%5cx", "%2e%2e%2f%2e%2e%2fx",
            "x%2f..%2f..%2f..%2ftmp%2fpwn", "one.example.test%2f..%2f..%2fx", "*", "%2a.%2a",
        ]  # fmt: skip
        for raw in raw_names:
            reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
            writer.write(
                f"PUT /certs/{raw} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            reply = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            status = int(reply.split(b" ", 2)[1])
            assert status in (400, 404, 405), (raw, reply[:200])
            assert_no_key(reply.decode(errors="replace"), chain["one"].key_pem, where=raw)
        # A body nested thousands deep is a 400 too (it was a RecursionError: a 500).
        deep = b"[" * 100_000
        reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
        writer.write(
            f"PUT /certs/{UPLOAD} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(deep)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + deep
        )
        reply = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
        assert tree(tmp_path) == before
