"""External account binding (RFC 8555 section 7.3.4) against real Pebble that requires it.

Pebble is started with `externalAccountBindingRequired` and one key id; edged registers with
acme.eab_kid + acme.eab_hmac_file, and tells the operator what to set when the CA wants EAB and
edged has none. The HMAC key is a secret: it never shows up in an error or a log line.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.acme.client import AcmeSession
from edged.acme.issue import OrderRequest, issue
from edged.acme.solvers import Http01Solver
from edged.config import AcmeSettings, parse_config
from edged.errors import AcmeError, ConfigError
from edged.http01 import ChallengeBoard
from edged.store.files import FileStore
from tests.pebble import Pebble, start_pebble
from tests.test_acme import http01, verify_chain

KID = "kid-1"


def new_hmac_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(48)).decode().rstrip("=")


HMAC_KEY = new_hmac_key()


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    p = start_pebble(
        tmp_path_factory.mktemp("pebble-eab"), eab_required=True, eab_keys={KID: HMAC_KEY}
    )
    try:
        yield p
    finally:
        p.stop()


def settings(pebble: Pebble, tmp_path: Path, hmac_key: str | None, kid: str = KID) -> AcmeSettings:
    hmac_file = None
    if hmac_key is not None:
        hmac_file = tmp_path / "eab.hmac"
        hmac_file.write_text(hmac_key + "\n")  # as an operator's editor saves it
        hmac_file.chmod(0o600)
    return AcmeSettings(
        directory=pebble.directory,
        ca_bundle=pebble.listener_ca,
        email="ops@a.test",
        eab_kid=kid if hmac_key is not None else "",
        eab_hmac_file=hmac_file,
    )


def assert_secret_absent(error: AcmeError, caplog: pytest.LogCaptureFixture, *keys: str) -> None:
    shown = [str(error), error.message, repr(error.problem), caplog.text]
    for key in keys:
        for text in shown:
            assert key not in text


async def register(session: AcmeSession) -> None:
    try:
        await asyncio.to_thread(session.open, "a.test")
    finally:
        session.close()


async def test_eab_registers_account_and_issues(
    pebble: Pebble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    board = ChallengeBoard()
    store = FileStore(tmp_path / "store")
    session = AcmeSession(settings(pebble, tmp_path, HMAC_KEY), store)
    request = OrderRequest("a.test", ("a.test", "www.a.test"))
    try:
        async with http01(board, pebble.http_port) as app:
            issued = await asyncio.to_thread(issue, session, request, lambda: Http01Solver(board))
    finally:
        session.close()
    assert app.answered >= 2  # Pebble validated over HTTP-01 for the EAB-bound account
    verify_chain(pebble, tmp_path, issued.cert.pairs[0].fullchain)
    assert session.net is not None and session.net.account is not None
    account_dir = next((tmp_path / "store" / "accounts").iterdir())
    assert session.net.account.uri in (account_dir / "account.json").read_text()
    for path in account_dir.iterdir():  # the HMAC key is not kept with the account
        assert HMAC_KEY not in path.read_text()
    assert HMAC_KEY not in caplog.text
    # The stored account is reused: no second binding needed (the file may even be gone).
    (tmp_path / "eab.hmac").unlink()
    again = AcmeSession(settings(pebble, tmp_path, None), store)
    await register(again)
    assert again.net is not None and again.net.account is not None
    assert again.net.account.uri == session.net.account.uri


async def test_eab_required_but_not_configured(pebble: Pebble, tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    session = AcmeSession(settings(pebble, tmp_path, None), store)
    with pytest.raises(AcmeError) as info:
        await register(session)
    err = info.value
    assert err.name == "a.test"
    assert "requires external account binding" in err.message
    assert "acme.eab_kid" in err.message and "acme.eab_hmac_file" in err.message
    assert store.load_account(pebble.directory) is None  # nothing half-registered


async def test_eab_wrong_hmac_key(
    pebble: Pebble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    wrong = new_hmac_key()
    store = FileStore(tmp_path / "store")
    session = AcmeSession(settings(pebble, tmp_path, wrong), store)
    with pytest.raises(AcmeError) as info:
        await register(session)
    err = info.value
    # Which settings were used (the key id, the file) but not the key.
    assert err.message.startswith(
        "registering the ACME account (external account binding with acme.eab_kid 'kid-1' "
        f"and the key in {tmp_path / 'eab.hmac'}): unauthorized: "
    )
    assert str(err.problem["type"]).startswith("urn:ietf:params:acme:error:")
    detail = str(err.problem["detail"])
    assert detail and detail in err.message  # the CA's own words reach the operator
    assert store.load_account(pebble.directory) is None
    assert_secret_absent(err, caplog, wrong, HMAC_KEY)


async def test_eab_unknown_key_id(
    pebble: Pebble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    session = AcmeSession(settings(pebble, tmp_path, HMAC_KEY, kid="kid-404"), FileStore(tmp_path))
    with pytest.raises(AcmeError) as info:
        await register(session)
    err = info.value
    assert str(err.problem["type"]).startswith("urn:ietf:params:acme:error:")
    assert str(err.problem["detail"]) in err.message
    assert_secret_absent(err, caplog, HMAC_KEY)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("", "is empty: put the HMAC key the CA gave you in it"),
        ("kid-1: " + HMAC_KEY, "does not hold a base64url HMAC key"),
        (HMAC_KEY[:-2] + "!x", "does not hold a base64url HMAC key"),
        ("abcde", "does not hold a base64url HMAC key"),  # cannot be base64 at all
    ],
)
async def test_eab_hmac_file_unusable(
    pebble: Pebble, tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str, says: str
) -> None:
    """Checked before anything is sent: the operator learns which file is wrong, not its text."""
    store = FileStore(tmp_path / "store")
    session = AcmeSession(settings(pebble, tmp_path, content), store)
    with pytest.raises(AcmeError) as info:
        await register(session)
    err = info.value
    assert err.name == "a.test"
    assert err.message.startswith(f"acme.eab_hmac_file {tmp_path / 'eab.hmac'} {says}")
    assert store.load_account(pebble.directory) is None
    if content:
        assert_secret_absent(err, caplog, content, HMAC_KEY)


async def test_eab_hmac_file_missing(pebble: Pebble, tmp_path: Path) -> None:
    config = settings(pebble, tmp_path, HMAC_KEY)
    assert config.eab_hmac_file is not None
    config.eab_hmac_file.unlink()
    with pytest.raises(AcmeError) as info:
        await register(AcmeSession(config, FileStore(tmp_path / "store")))
    assert info.value.message == (
        f"cannot read acme.eab_hmac_file {config.eab_hmac_file}: No such file or directory"
    )


def test_config_eab_kid_needs_hmac_file() -> None:
    base = """
        [listen]
        https = ["127.0.0.1:8443"]
        [acme]
        directory = "https://127.0.0.1:14000/dir"
        {eab}
        [[site]]
        names = ["a.test"]
        backend = "127.0.0.1:9"
    """
    source = Path("/etc/edged/edged.toml")
    for eab in ('eab_kid = "kid-1"', 'eab_hmac_file = "eab.hmac"'):
        with pytest.raises(ConfigError) as info:
            parse_config(base.format(eab=eab).replace("\n        ", "\n"), source)
        found = [str(p) for p in info.value.problems]
        assert found == [
            f"{source}: acme.eab_kid: eab_kid and eab_hmac_file go together: set both or neither"
        ], found
    both = 'eab_kid = "kid-1"\neab_hmac_file = "eab.hmac"'
    config = parse_config(base.format(eab=both).replace("\n        ", "\n"), source)
    assert config.acme is not None
    assert config.acme.eab_kid == "kid-1"
    assert config.acme.eab_hmac_file == Path("/etc/edged/eab.hmac")
