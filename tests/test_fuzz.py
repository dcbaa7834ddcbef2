"""Fuzzing the parsers of untrusted files: PEM bundles, the TOML config, the store's meta.json.

Every input must give a valid result or the module's typed error (CertError, ConfigError,
StoreError): never another exception type and never a hang (a per-example deadline and
pytest-timeout). tests/test_certs.py already fuzzes raw bytes and bit flips; this file adds
base64-preserving mutations (so the corrupted DER reaches cryptography's decoders), block
duplication and reordering, other key formats, huge inputs, and the config and meta readers.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import math
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edged.certs import describe_chain, parse_bundle
from edged.config import parse_config
from edged.errors import CertError, ConfigError, StoreError
from edged.store import FileStore, PemPair, StoredCert
from tests.pki import Issued, fullchain, make_ca, make_intermediate, make_leaf, new_key

REPO = Path(__file__).resolve().parent.parent
# A hang shows as a deadline error; the bound is generous for a loaded 2-core machine.
FUZZ = settings(
    max_examples=150,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)
B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


# --- PEM bundles ------------------------------------------------------------------------------


@functools.cache
def material() -> dict[str, bytes]:
    ca = make_ca("Fuzz Root")
    inter = make_intermediate(ca, "Fuzz Intermediate")
    ecdsa: Issued = make_leaf(inter, ["fuzz.example.test"])
    rsa: Issued = make_leaf(inter, ["rsa.fuzz.example.test"], key_type="rsa-2048")
    ed = make_leaf(inter, ["ed.fuzz.example.test"], key_type="ed25519")
    traditional = rsa.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    ec_traditional = ecdsa.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    p521 = new_key("ecdsa-p521").private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {
        "ecdsa_chain": fullchain(ecdsa, inter, ca),
        "ecdsa_key": ecdsa.key_pem,
        "rsa_chain": fullchain(rsa, inter),
        "rsa_key": rsa.key_pem,
        "rsa_traditional": traditional,
        "ec_traditional": ec_traditional,
        "ed_chain": fullchain(ed, inter),
        "ed_key": ed.key_pem,
        "p521_key": p521,
    }


@functools.cache
def key_pieces() -> tuple[str, ...]:
    """24-character pieces of every base64 line of the private keys used here."""
    pieces = []
    for name, pem in material().items():
        if name.endswith(("_key", "_traditional")):
            lines = pem.decode().splitlines()[1:-1]
            pieces += [line[i : i + 24] for line in lines for i in (0, 24) if len(line) >= i + 24]
    return tuple(pieces)


def cert_or_typed_error(cert_pem: bytes, key_pem: bytes) -> None:
    try:
        bundle = parse_bundle(cert_pem, key_pem)
    except CertError as exc:
        assert exc.message and str(exc.reason)
        # No input ever makes the message carry key material.
        assert not any(piece in str(exc) for piece in key_pieces())
    else:
        assert bundle.fingerprint and bundle.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    with contextlib.suppress(CertError):
        describe_chain(cert_pem)


def blocks_of(pem: bytes) -> list[bytes]:
    return re.findall(rb"-----BEGIN [^-]+-----.*?-----END [^-]+-----\n?", pem, re.S)


@st.composite
def mutated_pem(draw: st.DrawFn) -> tuple[bytes, bytes]:
    m = material()
    chain_name = draw(st.sampled_from(["ecdsa_chain", "rsa_chain", "ed_chain"]))
    key_name = draw(
        st.sampled_from(
            ["ecdsa_key", "rsa_key", "rsa_traditional", "ec_traditional", "ed_key", "p521_key"]
        )
    )
    parts = [bytearray(m[chain_name]), bytearray(m[key_name])]
    for _ in range(draw(st.integers(1, 6))):
        target = parts[draw(st.integers(0, 1))]
        action = draw(
            st.sampled_from(["b64", "b64", "truncate", "duplicate", "swap", "label", "junk"])
        )
        if not target:
            break
        if action == "b64":
            # Replace a base64 character with another: still decodes, but to different DER.
            spots = [i for i, c in enumerate(target) if c in B64]
            if spots:
                at = draw(st.sampled_from(spots))
                target[at] = draw(st.sampled_from(list(B64)))
        elif action == "truncate":
            del target[draw(st.integers(0, len(target) - 1)) :]
        elif action in ("duplicate", "swap"):
            blocks = blocks_of(bytes(target))
            if blocks:
                if action == "duplicate":
                    blocks.insert(draw(st.integers(0, len(blocks))), draw(st.sampled_from(blocks)))
                else:
                    blocks = draw(st.permutations(blocks))
                target[:] = b"".join(blocks)
        elif action == "label":
            new = draw(st.sampled_from([b"CERTIFICATE", b"PRIVATE KEY", b"EC PRIVATE KEY", b"X"]))
            target[:] = re.sub(
                rb"(BEGIN|END) [A-Z ]+-----", rb"\1 " + new + b"-----", target, count=1
            )
        else:
            at = draw(st.integers(0, len(target)))
            target[at:at] = draw(st.binary(min_size=1, max_size=32))
    return bytes(parts[0]), bytes(parts[1])


@FUZZ
@given(mutated_pem())
def test_fuzz_mutated_pem_bundles(pair: tuple[bytes, bytes]) -> None:
    cert_or_typed_error(*pair)


@FUZZ
@given(mutated_pem(), st.booleans())
def test_fuzz_combined_file(pair: tuple[bytes, bytes], key_first: bool) -> None:
    """One file holding chain and key (cert_file = key_file), in either order."""
    combined = pair[1] + pair[0] if key_first else pair[0] + pair[1]
    cert_or_typed_error(combined, combined)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "shape", ["random", "one_block", "many_certs", "many_begins", "many_keys", "long_line"]
)
def test_huge_pem_inputs(shape: str) -> None:
    """About 1 MiB of hostile PEM: a typed error, in bounded time."""
    m = material()
    size = 1 << 20
    if shape == "random":
        data = os.urandom(size)
    elif shape == "one_block":
        body = base64.encodebytes(os.urandom(size * 3 // 4))
        data = b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"
    elif shape == "many_certs":
        leaf = blocks_of(m["ecdsa_chain"])[0]
        data = leaf * (size // len(leaf))
    elif shape == "many_begins":
        data = b"-----BEGIN CERTIFICATE-----\n" * (size // 28)
    elif shape == "many_keys":
        data = m["ecdsa_chain"] + m["ecdsa_key"] * (size // len(m["ecdsa_key"]))
    else:
        data = b"-----BEGIN CERTIFICATE-----" + b"A" * size
    cert_or_typed_error(data, m["ecdsa_key"])
    cert_or_typed_error(m["ecdsa_chain"], data)


# --- config -----------------------------------------------------------------------------------

EXAMPLE = (REPO / "config" / "edged.toml").read_text()
SOURCE = Path("/etc/edged/edged.toml")


def config_or_typed_error(text: str) -> None:
    try:
        config = parse_config(text, SOURCE)
    except ConfigError as exc:
        assert exc.problems and all(p.source == str(SOURCE) for p in exc.problems)
    else:
        assert config.sites


TOML_ISH = st.text(
    alphabet=st.sampled_from(list("[]{}=\"'.,#\n \t:-_*+0123456789abcdefghistuvxyzTF\\\u00e9\x00")),
    max_size=400,
)


@FUZZ
@given(TOML_ISH)
def test_fuzz_toml_ish_text(text: str) -> None:
    config_or_typed_error(text)


@FUZZ
@given(st.data())
def test_fuzz_mutated_example_config(data: st.DataObject) -> None:
    lines = EXAMPLE.splitlines(keepends=True)
    for _ in range(data.draw(st.integers(1, 6))):
        action = data.draw(st.sampled_from(["drop", "dup", "swap", "edit", "insert"]))
        at = data.draw(st.integers(0, len(lines) - 1))
        if action == "drop" and len(lines) > 1:
            del lines[at]
        elif action == "dup":
            lines.insert(data.draw(st.integers(0, len(lines))), lines[at])
        elif action == "swap":
            other = data.draw(st.integers(0, len(lines) - 1))
            lines[at], lines[other] = lines[other], lines[at]
        elif action == "edit" and lines[at]:
            col = data.draw(st.integers(0, len(lines[at]) - 1))
            char = data.draw(st.characters(codec="utf-8"))
            lines[at] = lines[at][:col] + char + lines[at][col + 1 :]
        else:
            lines.insert(at, data.draw(TOML_ISH) + "\n")
    config_or_typed_error("".join(lines))


def toml_value(value: Any) -> str:
    """A TOML literal for a JSON-like value (lists and inline tables nest)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


SCALARS = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.sampled_from(["", "1.2", "1.3", "v1", "v2", "unix:/x", "127.0.0.1:0", "*.a.test", "15m"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
KEYS = {
    "edged": ["store", "workers", "max_connections", "idle_timeout", "drain_timeout",
              "backend_connect_timeout", "watch", "connection_log", "connection_log_sample"],
    "listen": ["https", "http", "metrics", "admin", "admin_token_file"],
    "tls": ["min_version", "alpn", "default_cert", "handshake_timeout", "require_chain",
            "context_cache_size"],
    "acme": ["directory", "email", "ca_bundle", "challenge", "key_types", "renew_before_days",
             "retry_interval", "max_attempts", "notify_webhook", "eab_kid", "preflight"],
    "acme.dns": ["server", "tsig_key_name", "tsig_algorithm", "tsig_secret_file", "zone",
                 "delegate_to", "resolver", "nameserver_port", "propagation_timeout", "ttl"],
    "site": ["names", "backend", "proxy_protocol", "cert_file", "key_file", "origin_tls",
             "origin_ca_file", "origin_server_name", "http", "alpn"],
}  # fmt: skip


@FUZZ
@given(st.data())
def test_fuzz_structured_config(data: st.DataObject) -> None:
    """Valid TOML with every known key given values of random types and shapes."""
    out = ['[listen]\nhttps = ["127.0.0.1:8443"]\n']
    for table, keys in KEYS.items():
        chosen = data.draw(st.lists(st.sampled_from(keys), unique=True, max_size=4))
        header = "[[site]]" if table == "site" else f"[{table}]"
        if table == "listen":
            chosen = [k for k in chosen if k != "https"]
            out[0] = out[0].rstrip("\n") + "\n"
            out.extend(f"{k} = {toml_value(data.draw(VALUES))}\n" for k in chosen)
            continue
        if table == "site":
            out.append(f'{header}\nnames = ["a.test"]\nbackend = "127.0.0.1:1"\n')
            chosen = [k for k in chosen if k not in ("names", "backend")]
        else:
            out.append(f"{header}\n")
        out.extend(f"{k} = {toml_value(data.draw(VALUES))}\n" for k in chosen)
    text = "".join(out)
    config_or_typed_error(text)


@FUZZ
@given(st.integers(1, 60), st.sampled_from(["table", "array", "inline"]))
def test_fuzz_nested_tables(depth: int, shape: str) -> None:
    if shape == "table":
        text = "[" + ".".join(f"t{i}" for i in range(depth)) + "]\nx = 1\n"
    elif shape == "array":
        text = "[edged]\nstore = " + "[" * depth + "1" + "]" * depth + "\n"
    else:
        text = "[tls]\nalpn = " + "{a = " * depth + "1" + "}" * depth + "\n"
    config_or_typed_error(text)


@pytest.mark.parametrize("size", [1 << 16, 1 << 20])
def test_huge_strings_in_config(size: int) -> None:
    big = "a" * size
    config_or_typed_error(f'[edged]\nstore = "{big}"\n[[site]]\nnames = ["{big}"]\nbackend = "x"\n')
    config_or_typed_error(f"# {big}\n" * 4)
    config_or_typed_error(f'[listen]\nhttps = ["{big}:443"]\n')


@pytest.mark.parametrize("shape", ["array", "inline"])
def test_deeply_nested_config_is_a_config_error(shape: str) -> None:
    depth = 5000
    if shape == "array":
        text = "a = " + "[" * depth + "]" * depth
    else:
        text = "a = " + "{x=" * depth + "1" + "}" * depth
    with pytest.raises(ConfigError):
        parse_config(text, SOURCE)


# --- the store's meta.json ------------------------------------------------------------------

NAME = "meta.example.test"


@functools.cache
def stored() -> StoredCert:
    m = material()
    return StoredCert(
        NAME,
        (NAME, "www.meta.example.test"),
        (
            PemPair("ecdsa-p256", m["ecdsa_chain"], m["ecdsa_key"]),
            PemPair("rsa-2048", m["rsa_chain"], m["rsa_key"]),
        ),
        "upload",
        1_700_000_000.0,
        {"k": "v"},
    )


@pytest.fixture(scope="module")
def meta_store(tmp_path_factory: pytest.TempPathFactory) -> FileStore:
    store = FileStore(tmp_path_factory.mktemp("meta") / "certs")
    store.save(stored())
    return store


def meta_path(store: FileStore) -> Path:
    return store.root / "live" / NAME / "meta.json"


def load_or_typed_error(store: FileStore, meta: bytes) -> None:
    meta_path(store).write_bytes(meta)
    try:
        cert = store.load(NAME)
    except StoreError as exc:
        assert NAME in str(exc)
    else:
        # Only whole, verified versions come back: the files are the ones saved.
        assert cert is not None and cert.pairs[0].privkey == stored().pairs[0].privkey
    store.names()
    with contextlib.suppress(StoreError):
        store.load_previous(NAME)


@pytest.fixture(scope="module")
def good_meta(meta_store: FileStore) -> bytes:
    return meta_path(meta_store).read_bytes()


@FUZZ
@given(st.data())
def test_fuzz_meta_bytes(meta_store: FileStore, good_meta: bytes, data: st.DataObject) -> None:
    raw = bytearray(good_meta)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        if action == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "delete":
            del raw[at : at + data.draw(st.integers(1, 40))]
        elif action == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            del raw[at:]
        if not raw:
            break
    load_or_typed_error(meta_store, bytes(raw))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON document (for picking a place to mutate)."""
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += paths(v, (*prefix, i))
    return found


@FUZZ
@given(st.data())
def test_fuzz_meta_structure(meta_store: FileStore, good_meta: bytes, data: st.DataObject) -> None:
    """Valid JSON with a value anywhere replaced by another of any type, or a key removed."""
    doc = json.loads(good_meta)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths(doc)))
        if not path:
            doc = data.draw(JSON)
            continue
        parent: Any = doc
        for step in path[:-1]:
            parent = parent[step]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(JSON)
        if not isinstance(doc, dict | list):
            break
    load_or_typed_error(meta_store, json.dumps(doc).encode())


@pytest.mark.parametrize(
    "meta",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"version": 1, "name": "' + b"x" * (1 << 20) + b'"}',
        b'{"version": 1e999, "name": NaN}',
        b'{"version": 1, "stored_at": ' + b"9" * 5000 + b"}",
        b"\xff\xfe" + "{}".encode("utf-16-le"),
    ],
    ids=["deep_array", "deep_object", "huge_string", "nan_inf", "huge_int", "utf16"],
)
def test_hostile_meta_json(meta_store: FileStore, good_meta: bytes, meta: bytes) -> None:
    load_or_typed_error(meta_store, meta)
    meta_path(meta_store).write_bytes(good_meta)
    assert meta_store.load(NAME) == stored()


@pytest.mark.parametrize("deep", [b"[" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000])
def test_hostile_state_and_account_json(tmp_path: Path, deep: bytes) -> None:
    store = FileStore(tmp_path / "certs")
    store.save_state(NAME, {"status": "active"})
    (store.root / "state" / f"{NAME}.json").write_bytes(deep)
    with pytest.raises(StoreError, match="corrupt"):
        store.load_state(NAME)
    store.save_account("https://ca.test/dir", {"a": 1}, b"key")
    (store.root / "accounts" / "ca.test" / "account.json").write_bytes(deep)
    with pytest.raises(StoreError, match="corrupt"):
        store.load_account("https://ca.test/dir")


@pytest.mark.parametrize("key", ["idle_timeout", "backend_connect_timeout", "drain_timeout"])
def test_nan_timeouts_are_config_errors(key: str) -> None:
    text = f'[edged]\n{key} = nan\n[listen]\nhttps = ["127.0.0.1:1"]\n'
    text += '[[site]]\nnames = ["a.test"]\nbackend = "127.0.0.1:1"\n'
    with pytest.raises(ConfigError, match=key):
        parse_config(text, SOURCE)
