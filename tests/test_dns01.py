"""DNS-01 end to end: real Pebble validating against a real BIND9 that edged updates (RFC 2136).

Pebble's `-dnsserver` is the BIND started here, so Pebble reads `_acme-challenge` TXT records
exactly as edged wrote them with TSIG-signed updates (no challtestsrv, no VA_ALWAYS_VALID).
BIND recurses for 127.0.0.1 so a CNAME from one of its zones into another is chased for Pebble.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest
from acme import challenges, messages
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from josepy import jwk

from edged.acme.client import AcmeSession
from edged.acme.issue import OrderRequest, issue
from edged.acme.solvers import Dns01Solver
from edged.config import AcmeSettings, Address, DnsSettings
from edged.dns import DnsError, DnsUpdater, load_tsig_key
from edged.errors import AcmeError
from edged.store.files import FileStore
from tests.bind import TSIG_KEYGEN, Bind, bind_fixture
from tests.conftest import recv_exact, run_cmd, spawn_edged, write_process_config
from tests.pebble import Pebble, start_pebble
from tests.test_acme import verify_chain
from tests.test_renewal_e2e import wait_for

EDGED = str(Path(sys.executable).with_name("edged"))

bind = bind_fixture(
    {
        "example.test": "* A 127.0.0.1",
        "cli.test": "* A 127.0.0.1",
        "fail.test": "* A 127.0.0.1",
        "cust.test": "_acme-challenge CNAME cust.test.acme.edge.test.",
        "acme.edge.test": "",
        "crash.test": "* A 127.0.0.1",
    },
    recursion=True,
)


@pytest.fixture(scope="module")
def pebble(bind: Bind, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    p = start_pebble(tmp_path_factory.mktemp("pebble"), dns_server=f"127.0.0.1:{bind.port}")
    try:
        yield p
    finally:
        p.stop()


def acme_settings(pebble: Pebble, dns: DnsSettings) -> AcmeSettings:
    return AcmeSettings(
        directory=pebble.directory,
        ca_bundle=pebble.listener_ca,
        email="ops@example.test",
        challenge="dns-01",
        dns=dns,
    )


def updater(settings: DnsSettings) -> DnsUpdater:
    return DnsUpdater(settings, load_tsig_key(settings), timeout=2.0, poll_interval=0.05)


def leaf_names(fullchain: bytes) -> set[str]:
    leaf = x509.load_pem_x509_certificates(fullchain)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName))


def keygen(name: str) -> str:
    return subprocess.run(
        [TSIG_KEYGEN, "-a", "hmac-sha256", name], capture_output=True, text=True, check=True
    ).stdout


class RecordingUpdater(DnsUpdater):
    """Records where each TXT went, and what BIND itself answered once it was propagated."""

    def __init__(self, settings: DnsSettings, bind: Bind) -> None:
        super().__init__(settings, load_tsig_key(settings), timeout=2.0, poll_interval=0.05)
        self.bind = bind
        self.added: list[tuple[str, str]] = []  # (fqdn, zone)
        self.deleted: list[str] = []
        self.seen_at_bind: dict[str, set[str]] = {}

    def add_txt(self, fqdn: str, value: str) -> None:
        super().add_txt(fqdn, value)
        self.added.append((fqdn, self.find_zone(fqdn)))

    def delete_txt(self, fqdn: str, value: str) -> None:
        super().delete_txt(fqdn, value)
        self.deleted.append(fqdn)

    def wait_propagated(self, fqdn: str, values: Collection[str], **kw: object) -> None:
        super().wait_propagated(fqdn, values, **kw)  # type: ignore[arg-type]
        self.seen_at_bind[fqdn] = self.bind.txt(fqdn)


async def test_wildcard_and_apex_in_one_order(pebble: Pebble, bind: Bind, tmp_path: Path) -> None:
    dns = bind.settings()
    store = FileStore(tmp_path / "store")
    session = AcmeSession(acme_settings(pebble, dns), store)
    rec = RecordingUpdater(dns, bind)
    request = OrderRequest("example.test", ("example.test", "*.example.test"))
    issued = await asyncio.to_thread(issue, session, request, lambda: Dns01Solver(rec))
    assert issued.orders == 1
    pair = issued.cert.pairs[0]
    verify_chain(pebble, tmp_path, pair.fullchain)
    assert leaf_names(pair.fullchain) == {"example.test", "*.example.test"}
    # Both authorizations answered at the same name: two values, both seen by BIND at once.
    fqdn = "_acme-challenge.example.test"
    assert [a[0] for a in rec.added] == [fqdn, fqdn]
    assert len(rec.seen_at_bind[fqdn]) == 2
    assert bind.txt(fqdn) == set()  # cleaned up


async def test_cname_delegation(pebble: Pebble, bind: Bind, tmp_path: Path) -> None:
    dns = bind.settings(delegate_to="acme.edge.test")
    session = AcmeSession(acme_settings(pebble, dns), FileStore(tmp_path / "store"))
    rec = RecordingUpdater(dns, bind)
    request = OrderRequest("cust.test", ("cust.test", "*.cust.test"))
    issued = await asyncio.to_thread(issue, session, request, lambda: Dns01Solver(rec))
    verify_chain(pebble, tmp_path, issued.cert.pairs[0].fullchain)
    assert leaf_names(issued.cert.pairs[0].fullchain) == {"cust.test", "*.cust.test"}
    target = "cust.test.acme.edge.test"
    assert rec.added == [(target, "acme.edge.test")] * 2
    assert len(rec.seen_at_bind[target]) == 2  # written in the delegate zone
    assert rec.deleted == [target, target]
    assert "updating zone 'acme.edge.test/IN': adding an RR at 'cust.test.acme.edge.test' TXT" in (
        bind.log
    )
    assert bind.txt(target) == set()
    assert bind.txt("_acme-challenge.cust.test") == set()  # only the CNAME lives there
    cname = bind.query("_acme-challenge.cust.test", "CNAME").answer
    assert [rd.target.to_text() for rd in cname[0]] == [target + "."]


async def test_wrong_tsig_secret_stores_nothing(pebble: Pebble, bind: Bind, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.key"
    wrong.write_text(keygen("edged"))
    dns = bind.settings(tsig_secret_file=wrong)
    store = FileStore(tmp_path / "store")
    session = AcmeSession(acme_settings(pebble, dns), store)
    request = OrderRequest("fail.test", ("fail.test", "*.fail.test"))
    with pytest.raises((DnsError, AcmeError)) as info:
        await asyncio.to_thread(issue, session, request, lambda: Dns01Solver(updater(dns)))
    text = str(info.value)
    assert "TSIG key 'edged'" in text
    assert "BADSIG" in text
    assert str(wrong) in text
    secret = re.search(r'secret "([^"]+)"', wrong.read_text())
    assert secret and secret.group(1) not in text
    assert store.names() == []
    assert bind.txt("_acme-challenge.fail.test") == set()


class WrongValueSolver(Dns01Solver):
    """Publishes a wrong key authorization for the wildcard: Pebble must refuse that one."""

    def present(
        self, identifier: str, challb: messages.ChallengeBody, key: jwk.JWK
    ) -> challenges.ChallengeResponse:
        response = super().present(identifier, challb, key)
        if identifier.startswith("*."):
            fqdn, value = self._records.pop()
            self.updater.delete_txt(fqdn, value)
            self.updater.add_txt(fqdn, "not-the-key-authorization")
            self._records.append((fqdn, "not-the-key-authorization"))
        return response


async def test_failed_validation_cleans_up(pebble: Pebble, bind: Bind, tmp_path: Path) -> None:
    dns = bind.settings()
    store = FileStore(tmp_path / "store")
    session = AcmeSession(acme_settings(pebble, dns), store)
    rec = RecordingUpdater(dns, bind)
    request = OrderRequest("bad.fail.test", ("bad.fail.test", "*.bad.fail.test"))
    with pytest.raises(AcmeError) as info:
        await asyncio.to_thread(issue, session, request, lambda: WrongValueSolver(rec))
    err = info.value
    assert "could not validate *.bad.fail.test over dns-01" in err.message
    assert err.problem.get("type") == "urn:ietf:params:acme:error:unauthorized"
    fqdn = "_acme-challenge.bad.fail.test"
    assert len(rec.seen_at_bind[fqdn]) == 2  # both were published before the CA looked
    assert bind.txt(fqdn) == set()  # and every one is withdrawn after the failure
    assert sorted(rec.deleted).count(fqdn) >= 2
    assert store.names() == []


def write_config(
    tmp_path: Path,
    pebble: Pebble,
    bind: Bind,
    *,
    domain: str = "cli.test",
    secret_file: Path | None = None,
    nameserver_port: int | None = None,
    propagation_timeout: str = "5s",
    acme_extra: str = "",
) -> Path:
    """An edged config issuing `domain` and its wildcard over DNS-01 from Pebble and BIND."""
    return write_process_config(
        tmp_path,
        f"""
            [acme]
            directory = "{pebble.directory}"
            ca_bundle = "{pebble.listener_ca}"
            email = "ops@{domain}"
            challenge = "dns-01"
            {acme_extra}
            [acme.dns]
            server = "127.0.0.1:{bind.port}"
            tsig_key_name = "{bind.key_name}"
            tsig_secret_file = "{secret_file or bind.secret_file}"
            resolver = "127.0.0.1:{bind.port}"
            nameserver_port = {nameserver_port or bind.port}
            propagation_timeout = "{propagation_timeout}"
            [[site]]
            names = ["{domain}", "*.{domain}"]
            backend = "127.0.0.1:9"
        """,
    )


async def test_cli_issue_wildcard_over_dns01(pebble: Pebble, bind: Bind, tmp_path: Path) -> None:
    config = write_config(tmp_path, pebble, bind)
    out = await run_cmd(EDGED, "issue", "*.cli.test", "--config", str(config), limit=25)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cli.test: issued for cli.test, *.cli.test" in out.stdout
    live = tmp_path / "store" / "live" / "cli.test"
    fullchain = (live / "fullchain.pem").read_bytes()
    verify_chain(pebble, tmp_path, fullchain)
    assert leaf_names(fullchain) == {"cli.test", "*.cli.test"}
    assert bind.txt("_acme-challenge.cli.test") == set()
    check = await run_cmd(EDGED, "check", "--config", str(config))
    assert check.returncode == 0, check.stdout


async def test_cli_issue_unusable_tsig_key(pebble: Pebble, bind: Bind, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key at all\n")
    config = write_config(tmp_path, pebble, bind, secret_file=garbage)
    out = await run_cmd(EDGED, "issue", "cli.test", "--config", str(config), limit=25)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert f"cli.test: not issued: {garbage}: not a TSIG key" in out.stdout
    assert not (tmp_path / "store" / "live").exists()


@contextlib.contextmanager
def slow_dns_proxy(upstream: int, delay: float) -> Iterator[int]:
    """A DNS-over-TCP relay to 127.0.0.1:`upstream` that passes each query on at once and the
    answer back only after `delay` seconds: the server has applied an update whose client has
    timed out (a loaded primary)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def relay(client: socket.socket) -> None:
        with client, contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", upstream), timeout=5) as server:
                length = recv_exact(client, 2)
                server.sendall(length + recv_exact(client, struct.unpack("!H", length)[0]))
                answer_length = recv_exact(server, 2)
                answer = recv_exact(server, struct.unpack("!H", answer_length)[0])
            stop.wait(delay)
            client.sendall(answer_length + answer)

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=relay, args=(client,), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        listener.close()
        acceptor.join(5)


def test_add_that_timed_out_is_still_cleaned_up(bind: Bind) -> None:
    """An update whose answer does not come in time may still have been applied: the solver's
    cleanup must delete that value too, or it stays in the zone for good."""
    fqdn = "_acme-challenge.slow.example.test"
    with slow_dns_proxy(bind.port, delay=1.5) as port:
        dns = bind.settings(server=Address("127.0.0.1", port))
        solver = Dns01Solver(DnsUpdater(dns, load_tsig_key(dns), timeout=0.5))
        challb = messages.ChallengeBody(
            chall=challenges.DNS01(token=b"t" * 32),
            uri="https://ca.test/chall/1",
            status=messages.STATUS_PENDING,
        )
        key = jwk.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        with pytest.raises(DnsError, match="no answer from DNS server"):
            solver.present("slow.example.test", challb, key)
        assert len(bind.txt(fqdn)) == 1  # applied by named all the same
        solver.cleanup()  # its delete times out as well, but named applies it
    deadline = time.monotonic() + 5
    while bind.txt(fqdn) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bind.txt(fqdn) == set()


def crash_config(tmp_path: Path, pebble: Pebble, bind: Bind, nameserver_port: int) -> Path:
    return write_config(
        tmp_path,
        pebble,
        bind,
        domain="crash.test",
        nameserver_port=nameserver_port,
        propagation_timeout="60s",
        acme_extra='retry_interval = "100ms"\n            preflight = false',
    )


async def test_kill_9_mid_order_leaves_txt_values_the_next_start_removes(
    pebble: Pebble, bind: Bind, tmp_path: Path
) -> None:
    """edged run is SIGKILLed while its DNS-01 order waits for propagation (its nameserver
    port does not answer): both TXT values stay in the zone, written down in its journal.
    Started again, it deletes exactly those two, logging each, and the new order succeeds."""
    fqdn = "_acme-challenge.crash.test"
    store = tmp_path / "store"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # reads nothing, answers never
        silent.bind(("127.0.0.1", 0))
        config = crash_config(tmp_path, pebble, bind, silent.getsockname()[1])
        first = await spawn_edged(config, tmp_path / "run1.log")
        try:
            await wait_for(lambda: len(bind.txt(fqdn)) == 2, 30, "both TXT values in BIND")
        finally:
            first.send_signal(signal.SIGKILL)
            await first.wait()
    left = bind.txt(fqdn)
    assert len(left) == 2  # the order never got to its cleanup
    (journal,) = (store / "dns01").glob("*.json")
    assert {v["value"] for v in json.loads(journal.read_text())["values"]} == left

    config = crash_config(tmp_path, pebble, bind, bind.port)
    log = tmp_path / "run2.log"
    second = await spawn_edged(config, log)
    try:
        await wait_for(
            lambda: (store / "live" / "crash.test" / "meta.json").exists(), 40, "the certificate"
        )
        await wait_for(lambda: not bind.txt(fqdn), 10, "no TXT value left at " + fqdn)
        text = log.read_text()
        for value in left:
            assert text.count(f'removed leftover DNS-01 TXT value "{value}" at {fqdn}') == 1, text
        assert text.count("removed leftover DNS-01 TXT value") == 2
        assert "left by an interrupted order (edged pid " in text
        assert not journal.exists()
    finally:
        second.send_signal(signal.SIGTERM)
        await asyncio.wait_for(second.wait(), 15)
    assert second.returncode == 0
    assert list((store / "dns01").iterdir()) == []  # nothing listed: journal and lock gone
    fullchain = (store / "live" / "crash.test" / "fullchain.pem").read_bytes()
    assert leaf_names(fullchain) == {"crash.test", "*.crash.test"}
