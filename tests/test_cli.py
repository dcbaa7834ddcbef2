"""`edged check` and `edged cert inspect` as an operator runs them, on real bad files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edged.certs import parse_bundle
from edged.store import FileStore, PemPair, StoredCert
from tests.pki import encrypted_key_pem, fullchain, make_ca, make_intermediate, make_leaf

EDGED = str(Path(sys.executable).with_name("edged"))


def edged(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGED, *args], capture_output=True, text=True, timeout=60)


def cert_files() -> dict[str, tuple[str, bytes, bytes, str]]:
    """stem -> (site name, cert PEM, key PEM, text its problem line must contain)."""
    ca = make_ca()
    inter = make_intermediate(ca, "Test Intermediate")
    now = datetime.now(UTC)
    good = make_leaf(inter, ["good.test"])
    mismatch = make_leaf(inter, ["mismatch.test"])
    encrypted = make_leaf(inter, ["encrypted.test"])
    order = make_leaf(inter, ["order.test"])
    broken = make_leaf(inter, ["broken.test"])
    day = timedelta(days=1)
    expired = make_leaf(inter, ["expired.test"], not_before=now - 30 * day, not_after=now - day)
    future = make_leaf(inter, ["future.test"], not_before=now + 2 * day, not_after=now + 9 * day)
    wild = make_leaf(inter, ["*.a.test"])
    weak = make_leaf(inter, ["weak.test"], key_type="rsa-1024")
    other_key = make_leaf(inter, ["other.test"]).key_pem
    unrelated = make_intermediate(ca, "Unrelated Intermediate")
    return {
        "good": ("good.test", fullchain(good, inter), good.key_pem, ""),
        "mismatch": ("mismatch.test", fullchain(mismatch, inter), other_key,
                     "the private key does not belong to the certificate"),
        "encrypted": ("encrypted.test", fullchain(encrypted, inter), encrypted_key_pem(encrypted),
                      "remove the passphrase: openssl pkey -in"),
        "order": ("order.test", fullchain(inter, order), order.key_pem,
                  "the leaf certificate must come first"),
        "broken": ("broken.test", fullchain(broken, unrelated), broken.key_pem,
                   "is not signed by certificate 2"),
        "expired": ("expired.test", fullchain(expired, inter), expired.key_pem, "expired"),
        "future": ("future.test", fullchain(future, inter), future.key_pem, "not valid"),
        "wild": ("x.y.a.test", fullchain(wild, inter), wild.key_pem,
                 "a wildcard covers exactly one label"),
        "empty": ("empty.test", b"", good.key_pem, "empty"),
        "garbage": ("garbage.test", b"hello, no PEM here\n", good.key_pem, "no PEM block"),
        "weak": ("weak.test", fullchain(weak, inter), weak.key_pem, "2048"),
    }  # fmt: skip


def test_check_prints_every_bad_certificate_and_exits_1(tmp_path: Path) -> None:
    files = cert_files()
    body = '[listen]\nhttps = ["127.0.0.1:8443"]\n'
    for stem, (name, cert, key, _) in files.items():
        (tmp_path / f"{stem}.crt").write_bytes(cert)
        (tmp_path / f"{stem}.key").write_bytes(key)
        body += (
            f'[[site]]\nnames = ["{name}"]\nbackend = "127.0.0.1:9"\n'
            f'cert_file = "{stem}.crt"\nkey_file = "{stem}.key"\n'
        )
    body += '[[site]]\nnames = ["nocert.test"]\nbackend = "127.0.0.1:9"\n'
    config = tmp_path / "edged.toml"
    config.write_text(body)
    out = edged("check", "--config", str(config))
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    for index, (stem, (_, _, _, expected)) in enumerate(files.items()):
        mine = [ln for ln in lines if f"site[{index}]" in ln]
        if stem == "good":
            assert mine == [], mine
            continue
        assert len(mine) == 1, (stem, lines)
        assert mine[0].startswith(f"{tmp_path}/{stem}.") and expected in mine[0], (stem, mine)
    warning = [ln for ln in lines if "site[11]" in ln]
    assert warning and "warning: no certificate yet for nocert.test" in warning[0]
    assert lines[-1] == f"{config}: FAILED: 12 sites, 1 valid certificates"


def test_check_reports_config_errors_as_path_key_message(tmp_path: Path) -> None:
    config = tmp_path / "edged.toml"
    config.write_text('[tls]\nmin_versoin = "1.3"\n[[site]]\nnames = ["a.test"]\nbackend = "x"\n')
    out = edged("check", "--config", str(config))
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        f"{config}: tls.min_versoin: unknown key: check its spelling against config/edged.toml",
        f"{config}: site[0].backend: 'x': expected host:port (e.g. 127.0.0.1:8080)",
    ]


def test_check_ok_with_only_warnings(tmp_path: Path) -> None:
    config = tmp_path / "edged.toml"
    config.write_text('[[site]]\nnames = ["a.test"]\nbackend = "127.0.0.1:9"\n')
    out = edged("check", "--config", str(config))
    assert out.returncode == 0, out.stdout
    assert "warning: no certificate yet for a.test" in out.stdout
    assert out.stdout.splitlines()[-1].endswith(": ok: 1 sites, 0 valid certificates")


def test_check_says_acme_cannot_order_a_wildcard_without_dns01(tmp_path: Path) -> None:
    """A wildcard site without a certificate under [acme] over http-01 (the default): the
    renewer fails it at once without an order, yet `edged check` said "ACME will request
    one". It names the fix instead (still a warning: an upload would serve it)."""
    config = tmp_path / "edged.toml"
    config.write_text(
        "[acme]\n"
        '[[site]]\nnames = ["*.w.test"]\nbackend = "127.0.0.1:9"\n'
        '[[site]]\nnames = ["a.test"]\nbackend = "127.0.0.1:9"\n'
    )
    out = edged("check", "--config", str(config))
    assert out.returncode == 0, out.stdout
    assert out.stdout.splitlines()[:2] == [
        f"{config}: site[0]: warning: no certificate yet for *.w.test: handshakes for these "
        "names are refused until there is one (ACME cannot order it: CAs validate *.w.test "
        'only over dns-01: set acme.challenge = "dns-01" with an [acme.dns] table, or upload '
        "one)",
        f"{config}: site[1]: warning: no certificate yet for a.test: handshakes for these "
        "names are refused until there is one (ACME will request one)",
    ]


def test_check_with_a_redis_store_checks_the_local_copy_and_says_so(tmp_path: Path) -> None:
    """With a Redis store, `check` reads the node's local copy (edged.store_local) and says
    that Redis itself was not read. It used to read nothing: every site had "no certificate
    yet" and the check passed over a bad certificate."""
    files = cert_files()
    copy = FileStore(tmp_path / "copy")
    for stem in ("good", "expired"):
        name, cert, key, _ = files[stem]
        bundle = parse_bundle(cert, key)
        pair = PemPair(bundle.key_type, cert, key)
        copy.save(StoredCert(name, bundle.names, (pair,), "upload", time.time()))
    config = tmp_path / "edged.toml"
    config.write_text(
        '[edged]\nstore = "redis://:pw@127.0.0.1:1/0"\nstore_local = "copy"\n'
        '[[site]]\nnames = ["good.test"]\nbackend = "127.0.0.1:9"\n'
        '[[site]]\nnames = ["expired.test"]\nbackend = "127.0.0.1:9"\n'
    )
    out = edged("check", "--config", str(config))
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == (
        f"{config}: edged.store: note: a Redis store (redis://127.0.0.1:1): the certificates "
        f"checked are this node's local copy in {tmp_path}/copy (edged.store_local); Redis "
        "itself was not read"
    )
    assert any("expired.test" in ln and "expired" in ln for ln in lines[1:-1]), lines
    assert "no certificate yet" not in out.stdout and "pw" not in out.stdout
    assert lines[-1] == f"{config}: FAILED: 2 sites, 1 valid certificates"


def test_issue_with_a_redis_store_names_the_command_to_use(tmp_path: Path) -> None:
    """`edged issue` orders into a directory store only; with Redis it said just that, not
    what the README says to do instead (the fleet's daemons order: `edged renew`)."""
    config = tmp_path / "edged.toml"
    config.write_text(
        '[edged]\nstore = "redis://127.0.0.1:1/0"\n[acme]\n'
        '[[site]]\nnames = ["a.test"]\nbackend = "127.0.0.1:9"\n'
    )
    out = edged("issue", "a.test", "--config", str(config))
    assert (out.returncode, out.stdout) == (
        1,
        f"{config}: edged.store: `edged issue` needs a directory store; with Redis the fleet's "
        f"daemons order: run `edged renew NAME --config {config}` on a node\n",
    )


def test_cert_inspect(tmp_path: Path) -> None:
    files = cert_files()
    _, cert, key, _ = files["good"]
    (tmp_path / "good.crt").write_bytes(cert)
    (tmp_path / "good.key").write_bytes(key)
    out = edged("cert", "inspect", str(tmp_path / "good.crt"), "--key", str(tmp_path / "good.key"))
    assert out.returncode == 0, out.stdout
    assert "[0] leaf: CN=good.test" in out.stdout
    assert "[1] intermediate: CN=Test Intermediate" in out.stdout
    assert "names:      good.test" in out.stdout
    assert "key:        ecdsa-p256" in out.stdout
    assert "chain order: ok" in out.stdout and "key:         matches the leaf" in out.stdout

    # Without --key the order is still checked.
    _, cert, _, _ = files["order"]
    (tmp_path / "order.crt").write_bytes(cert)
    out = edged("cert", "inspect", str(tmp_path / "order.crt"))
    assert out.returncode == 1
    assert "problem:" in out.stdout and "come first" in out.stdout
    assert "chain order: ok" not in out.stdout

    _, cert, key, _ = files["wild"]
    (tmp_path / "wild.crt").write_bytes(cert)
    out = edged("cert", "inspect", str(tmp_path / "wild.crt"), "--name", "x.y.a.test")
    assert out.returncode == 1 and "'x.y.a.test' is not covered by *.a.test" in out.stdout

    (tmp_path / "empty.crt").write_bytes(b"")
    out = edged("cert", "inspect", str(tmp_path / "empty.crt"))
    assert out.returncode == 1 and "empty" in out.stdout

    # The directory holding the files, not a file: said so (it was "check its permissions").
    out = edged("cert", "inspect", str(tmp_path))
    assert (out.returncode, out.stdout) == (
        1,
        f"{tmp_path}: is a directory: name the PEM file in it\n",
    )


@pytest.mark.parametrize("key_type", ["ecdsa-p521", "rsa-1024", "ed25519"])
def test_cert_inspect_counts_an_unsupported_key_with_or_without_key(
    tmp_path: Path, key_type: str
) -> None:
    """An unsupported leaf key is a problem (exit 1) whether or not --key is given; without
    --key it used to be shown as unsupported but reported ok."""
    inter = make_intermediate(make_ca(), "Test Intermediate")
    leaf = make_leaf(inter, ["odd.test"], key_type=key_type)
    (tmp_path / "odd.crt").write_bytes(fullchain(leaf, inter))
    (tmp_path / "odd.key").write_bytes(leaf.key_pem)
    for extra in ([], ["--key", str(tmp_path / "odd.key")]):
        out = edged("cert", "inspect", str(tmp_path / "odd.crt"), *extra)
        assert out.returncode == 1, (extra, out.stdout)
        problems = [ln for ln in out.stdout.splitlines() if ": problem: " in ln]
        assert len(problems) == 1, (extra, out.stdout)
        assert "supported types are" in problems[0] or "minimum is 2048 bits" in problems[0]
        assert not out.stdout.endswith(": ok\n")


def test_cert_inspect_normalises_names_like_the_rest_of_edged(tmp_path: Path) -> None:
    """--name is IDNA-normalised (bücher.test is xn--bcher-kva.test), with or without --key;
    an impossible name is refused naming it."""
    inter = make_intermediate(make_ca(), "Test Intermediate")
    leaf = make_leaf(inter, ["xn--bcher-kva.test"])
    (tmp_path / "idn.crt").write_bytes(fullchain(leaf, inter))
    (tmp_path / "idn.key").write_bytes(leaf.key_pem)
    for extra in ([], ["--key", str(tmp_path / "idn.key")]):
        out = edged("cert", "inspect", str(tmp_path / "idn.crt"), "--name", "Bücher.test.", *extra)
        assert out.returncode == 0, (extra, out.stdout)
        assert out.stdout.endswith("idn.crt: ok\n")
        out = edged("cert", "inspect", str(tmp_path / "idn.crt"), "--name", "bad..test", *extra)
        assert out.returncode == 1 and out.stdout.startswith("--name: 'bad..test': label ''")


def test_usage_errors_exit_2() -> None:
    assert edged("frobnicate").returncode == 2
    assert edged("check", "--bogus").returncode == 2


def test_output_into_a_closed_pipe_is_no_traceback(tmp_path: Path) -> None:
    """`edged status | head -1`, `edged cert inspect F | head`: the reader stops reading and
    the command's next write fails (EPIPE). That ends the command quietly (exit 1), not with
    a Python traceback on the terminal."""
    _, cert, _, _ = cert_files()["good"]
    (tmp_path / "good.crt").write_bytes(cert)
    config = tmp_path / "edged.toml"
    config.write_text('[[site]]\nnames = ["a.test"]\nbackend = "127.0.0.1:9"\n')
    for args in (
        ["cert", "inspect", str(tmp_path / "good.crt")],
        ["check", "--config", str(config)],
    ):
        read, write = os.pipe()
        os.close(read)  # nobody reads: the first write (or the flush at the end) fails
        try:
            out = subprocess.run(
                [EDGED, *args], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60
            )
        finally:
            os.close(write)
        assert (out.returncode, out.stderr) == (1, ""), args
