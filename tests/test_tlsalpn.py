"""ACME TLS-ALPN-01 (RFC 8737): the challenge certificate, the board, the pre-read answering
validations without disturbing other clients, and real Pebble validating on edged's TLS port."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import sys
import threading
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edged.config import Config, parse_config
from edged.errors import EdgedError
from edged.metrics import build_registry, render
from edged.operations import DaemonOperations
from edged.preflight import run_preflight
from edged.store import FileStore
from edged.store.redis import RedisStore
from edged.tlsalpn import (
    ACME_TLS_ALPN,
    ID_PE_ACME_IDENTIFIER,
    AlpnChallengeBoard,
    build_challenge_cert,
    is_challenge_alpn,
)
from tests.bind import Bind
from tests.conftest import free_port, run_backend, run_cmd, run_edged, write_process_config
from tests.pebble import start_pebble
from tests.pki import make_ca, make_leaf, write_pair
from tests.redis_server import RedisServer
from tests.test_preflight import CA, bind, by_check, config_text  # noqa: F401 (bind: a fixture)
from tests.test_workers import run_workers, zygote_of

NAMES = ("shop.test", "www.shop.test")
EDGED = str(Path(sys.executable).with_name("edged"))
KEY_AUTH = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


# --- the certificate -----------------------------------------------------------------------


def test_challenge_certificate_carries_the_critical_acme_identifier() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_challenge_cert("shop.test", KEY_AUTH, key=key, serial=12345, now=now)
    parsed = x509.load_der_x509_certificate(cert.public_bytes(serialization.Encoding.DER))
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["shop.test"]
    assert len(list(san)) == 1  # the one name, nothing else
    ext = parsed.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
    assert ext.critical
    assert ext.oid.dotted_string == "1.3.6.1.5.5.7.1.31"
    # DER OCTET STRING (tag 4, length 32) of SHA-256 over the key authorization's ASCII.
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(KEY_AUTH.encode()).digest()
    assert parsed.issuer == parsed.subject  # self-signed, and the signature checks out
    parsed.verify_directly_issued_by(parsed)
    assert parsed.serial_number == 12345
    assert parsed.not_valid_before_utc <= now < parsed.not_valid_after_utc
    # A different key authorization gives a different digest.
    other = build_challenge_cert("shop.test", KEY_AUTH + "x", key=key, serial=1, now=now)
    assert other.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER).value != ext.value


def test_challenge_certificate_for_a_name_longer_than_a_common_name() -> None:
    """A DNS name over 64 characters cannot be a CN (cryptography refuses it, which crashed
    the attempt): the certificate has an empty subject and a critical SAN with the name."""
    name = "customer-0123456789-storefront-assets.eu-west-1.cdn.shop.example.com"
    assert len(name) > 64
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_challenge_cert(name, KEY_AUTH, key=key, serial=7, now=now)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.DNSName) == [name]
    assert len(cert.subject) == 0 and cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    # The board builds the context a validation is answered with (an SSLContext loads it).
    board = AlpnChallengeBoard()
    board.add(name, KEY_AUTH)
    assert (
        _served_digest(board.lookup(name))
        == b"\x04\x20" + hashlib.sha256(KEY_AUTH.encode()).digest()
    )


def test_only_exactly_acme_tls_1_is_a_validation() -> None:
    assert is_challenge_alpn(("acme-tls/1",))
    assert not is_challenge_alpn(())
    assert not is_challenge_alpn(("acme-tls/1", "http/1.1"))
    assert not is_challenge_alpn(("h2", "acme-tls/1"))
    assert not is_challenge_alpn(("ACME-TLS/1",))


def test_board_add_lookup_expire_remove() -> None:
    clock = [100.0]
    board = AlpnChallengeBoard(clock=lambda: clock[0])
    board.add("Shop.Test", KEY_AUTH, ttl=10)
    ctx = board.lookup("SHOP.test.")
    assert ctx is not None and board.lookup("www.shop.test") is None
    assert len(board) == 1
    clock[0] += 11
    assert board.lookup("shop.test") is None and len(board) == 0  # expired
    board.add("shop.test", KEY_AUTH)
    board.remove("shop.test")
    assert board.lookup("shop.test") is None


def _served_digest(ctx: ssl.SSLContext | None) -> bytes:
    """The acmeIdentifier value of the certificate `ctx` serves (a handshake on memory BIOs)."""
    assert ctx is not None
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.set_alpn_protocols([ACME_TLS_ALPN])
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="shop.test")
    server = ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            s_in.write(c_out.read())
        with contextlib.suppress(ssl.SSLWantReadError):
            server.do_handshake()
        c_in.write(s_out.read())
    cert = x509.load_der_x509_certificate(client.getpeercert(binary_form=True) or b"")
    value = cert.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER).value
    assert isinstance(value, x509.UnrecognizedExtension)
    return value.value


async def test_shared_board_always_answers_the_current_challenge(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A name gets a new challenge per order (one per key type, seconds apart): another node
    must serve the current one at once, never a cached earlier one (a real failure seen with
    Pebble when answers were cached for a second)."""
    ordering = AlpnChallengeBoard()
    ordering.shared = RedisStore(redis_server.url, FileStore(tmp_path / "b"), prefix="t")
    answering = AlpnChallengeBoard()
    answering.shared = RedisStore(redis_server.url, FileStore(tmp_path / "a"), prefix="t")
    assert await answering.lookup_shared("shop.test") is None
    for key_authorization in (KEY_AUTH, KEY_AUTH + "2", KEY_AUTH):
        await asyncio.to_thread(ordering.add, "shop.test", key_authorization)
        ctx = await answering.lookup_shared("Shop.Test.")
        expected = b"\x04\x20" + hashlib.sha256(key_authorization.encode()).digest()
        assert await asyncio.to_thread(_served_digest, ctx) == expected
        assert answering.lookup("shop.test") is None  # it never was on this node's own board
    await asyncio.to_thread(ordering.remove, "shop.test")
    assert await answering.lookup_shared("shop.test") is None  # withdrawn: refused at once
    assert await answering.lookup_shared("www.shop.test") is None

    # A worker process's board has no store: it asks the main process, which answers with
    # its own board's shared_key_authorization; an ask that fails refuses the validation.
    worker = AlpnChallengeBoard()
    assert not worker.fleet and await worker.lookup_shared("shop.test") is None
    worker.ask = answering.shared_key_authorization
    assert worker.fleet
    assert await worker.lookup_shared("shop.test") is None
    await asyncio.to_thread(ordering.add, "shop.test", KEY_AUTH)
    ctx = await worker.lookup_shared("shop.test")
    expected = b"\x04\x20" + hashlib.sha256(KEY_AUTH.encode()).digest()
    assert await asyncio.to_thread(_served_digest, ctx) == expected

    async def unreachable(name: str) -> str | None:
        raise EdgedError(f"redis unreachable looking up {name}")

    worker.ask = unreachable
    assert await worker.lookup_shared("shop.test") is None


# --- the data path -------------------------------------------------------------------------


def handshake(
    port: int, sni: str, alpn: list[str] | None, rsa_only: bool = False, request: bool = False
) -> tuple[str | None, x509.Certificate]:
    """A TLS handshake offering `alpn`: (selected protocol, the server's certificate). With
    `request`, a normal client then sends a request (which opens the backend connection)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if rsa_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        selected = tls.selected_alpn_protocol()
        if request and selected != ACME_TLS_ALPN:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {sni}\r\n\r\n".encode())
            answer = b""
            while b"backend=" not in answer and (chunk := tls.recv(4096)):
                answer += chunk
            assert b"backend=" in answer, answer
        return selected, x509.load_der_x509_certificate(der)


def is_challenge_cert(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
    except x509.ExtensionNotFound:
        return False
    return True


async def test_preread_answers_validations_and_leaves_other_clients_alone(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    async with run_backend() as backend:
        body = f"""
            [[site]]
            names = ["one.example.test"]
            backend = "{backend.address}"
            cert_file = "{pki["one_cert"]}"
            key_file = "{pki["one_key"]}"
            [[site]]
            names = ["new.example.test"]
            backend = "{backend.address}"
        """
        async with run_edged(tmp_path, body) as edged:
            daemon = edged.daemon
            counters = daemon.counters
            await asyncio.to_thread(daemon.alpn_board.add, "one.example.test", KEY_AUTH)
            # The validation: challenge certificate, ALPN acme-tls/1, then edged closes.
            alpn, cert = await asyncio.to_thread(
                handshake, edged.port, "one.example.test", [ACME_TLS_ALPN]
            )
            assert alpn == ACME_TLS_ALPN and is_challenge_cert(cert)
            digest = cert.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER).value
            assert digest.value[2:] == hashlib.sha256(KEY_AUTH.encode()).digest()  # type: ignore[attr-defined]
            # Normal clients for the same name, with or without ALPN, and one that offers
            # acme-tls/1 among others, get the site's certificate and the backend.
            for offer in (["h2", "http/1.1"], None, [ACME_TLS_ALPN, "http/1.1"]):
                alpn, cert = await asyncio.to_thread(
                    handshake, edged.port, "one.example.test", offer, request=True
                )
                assert not is_challenge_cert(cert), offer
                assert cert.subject.rfc4514_string().endswith("one.example.test"), offer
                assert alpn != ACME_TLS_ALPN
            # acme-tls/1 for a name without a pending challenge: no_application_protocol.
            for name in ("new.example.test", "unknown.example.test"):
                with pytest.raises(ssl.SSLError, match="no application protocol"):
                    await asyncio.to_thread(handshake, edged.port, name, [ACME_TLS_ALPN])
            # A validator that cannot use the (ECDSA) challenge certificate: a failed one.
            with pytest.raises(ssl.SSLError):
                await asyncio.to_thread(
                    handshake, edged.port, "one.example.test", [ACME_TLS_ALPN], True
                )
            # A name without a certificate yet, its first order pending: the validation is
            # answered, a normal client is refused (unrecognized_name) as before.
            await asyncio.to_thread(daemon.alpn_board.add, "new.example.test", KEY_AUTH)
            alpn, cert = await asyncio.to_thread(
                handshake, edged.port, "new.example.test", [ACME_TLS_ALPN]
            )
            assert alpn == ACME_TLS_ALPN and is_challenge_cert(cert)
            with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
                await asyncio.to_thread(handshake, edged.port, "new.example.test", ["http/1.1"])
            assert counters.handshakes["no_cert", "none"] == 1
            await asyncio.to_thread(daemon.alpn_board.remove, "new.example.test")
            # Removed (the order finished): refused like any other name.
            await asyncio.to_thread(daemon.alpn_board.remove, "one.example.test")
            with pytest.raises(ssl.SSLError, match="no application protocol"):
                await asyncio.to_thread(handshake, edged.port, "one.example.test", [ACME_TLS_ALPN])
            assert counters.acme_tls_alpn["answered"] == 2
            assert counters.acme_tls_alpn["no_challenge"] == 3
            assert counters.acme_tls_alpn["failed"] == 1
            assert sum(n for (result, _), n in counters.handshakes.items() if result == "ok") == 3
            text = render(build_registry(daemon, process=False)).decode()
            assert 'edged_acme_tls_alpn_handshakes_total{result="answered"} 2.0' in text
            assert 'edged_acme_tls_alpn_handshakes_total{result="no_challenge"} 3.0' in text
            assert 'edged_acme_tls_alpn_handshakes_total{result="failed"} 1.0' in text
            await asyncio.sleep(0.1)
            assert len(backend.conns) == 3  # the three normal clients only


# --- real Pebble ---------------------------------------------------------------------------


def acme_table(directory: str, ca_bundle: Path, extra: str = "") -> str:
    return f"""
        [acme]
        directory = "{directory}"
        ca_bundle = "{ca_bundle}"
        email = "ops@shop.test"
        challenge = "tls-alpn-01"
        key_types = ["ecdsa-p256", "rsa-2048"]
        preflight = false
        {extra}
    """


class NormalClients(threading.Thread):
    """Normal TLS clients (ALPN h2, http/1.1) handshaking with edged in a loop: each is either
    refused (no certificate yet) or gets a certificate Pebble issued, never a challenge one."""

    def __init__(self, port: int, name: str) -> None:
        super().__init__(daemon=True)
        self.port, self.name = port, name
        self.stop = threading.Event()
        self.refused = self.served = 0
        self.wrong: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                _, cert = handshake(self.port, self.name, ["h2", "http/1.1"])
            except ssl.SSLError as exc:
                if "UNRECOGNIZED_NAME" not in str(exc):
                    self.wrong.append(repr(exc))
                self.refused += 1
            except OSError as exc:
                self.wrong.append(repr(exc))
            else:
                if is_challenge_cert(cert) or "Pebble" not in cert.issuer.rfc4514_string():
                    self.wrong.append(cert.subject.rfc4514_string())
                self.served += 1
            self.stop.wait(0.01)


@pytest.mark.parametrize("workers", [1, 2])
async def test_edged_process_obtains_certificates_over_tls_alpn_01_only(
    tmp_path: Path, workers: int
) -> None:
    """No HTTP listener at all: Pebble validates on edged's TLS port (its tlsPort); with
    workers, the challenges reach every worker before Pebble is told to validate."""
    https = free_port()
    pebble = start_pebble(tmp_path / "pebble", tls_port=https)
    proc = None
    clients = NormalClients(https, "shop.test")
    try:
        config = write_process_config(
            tmp_path,
            acme_table(pebble.directory, pebble.listener_ca)
            + f'[[site]]\nnames = {json.dumps(list(NAMES))}\nbackend = "127.0.0.1:9"\n',
            https=https,
            edged_extra=f"workers = {workers}",
        )
        log = tmp_path / "edged.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                EDGED, "run", "--config", str(config), stdout=out, stderr=out
            )
        root = tmp_path / "root.pem"
        root.write_bytes(pebble.root_pem() + pebble.intermediate_pem())
        ctx = ssl.create_default_context(cafile=str(root))
        while True:  # listening: from now on edged must answer every normal client rightly
            try:
                socket.create_connection(("127.0.0.1", https), timeout=5).close()
                break
            except ConnectionRefusedError:
                assert proc.returncode is None, log.read_text()
                await asyncio.sleep(0.02)
        clients.start()  # at once: edged serves no certificate until the order is done

        def verified(name: str) -> str:
            with (
                socket.create_connection(("127.0.0.1", https), timeout=5) as raw,
                ctx.wrap_socket(raw, server_hostname=name) as tls,
            ):
                cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
                return type(cert.public_key()).__name__

        deadline = asyncio.get_running_loop().time() + 60
        while True:
            try:
                kinds = [await asyncio.to_thread(verified, n) for n in NAMES]
                break
            except (ssl.SSLError, OSError):
                if asyncio.get_running_loop().time() > deadline or proc.returncode is not None:
                    raise AssertionError(log.read_text()[-3000:]) from None
                await asyncio.sleep(0.2)
        assert kinds == ["ECPublicKey", "ECPublicKey"], kinds  # ECDSA preferred
        await asyncio.sleep(0.3)
        clients.stop.set()
        await asyncio.to_thread(clients.join, 10)
        assert clients.wrong == [], clients.wrong
        assert clients.served > 0
        text = log.read_text()
        assert "certificate obtained name=shop.test" in text
        if workers > 1:  # the validations reached worker processes, not the main process
            assert f"worker {workers - 1} (pid" in text, text[-2000:]
        # Pebble validated the names through edged's TLS port (there is no other listener),
        # from each of its validation perspectives.
        validated = pebble.count("set VALID by completed challenge")
        assert validated >= 2
        assert text.count("tls-alpn-01 answered") >= validated
    finally:
        clients.stop.set()
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 15)
        pebble.stop()
    assert proc.returncode == 0


async def test_a_replacement_worker_has_the_pending_challenges_before_it_serves(
    tmp_path: Path,
) -> None:
    """Both workers die while a validation is pending, and a validation connection waits in
    their sockets' queues: the replacements install the pending challenges before they serve,
    so the waiting connection is answered (they came as messages handled after serving)."""
    hold_port = free_port()  # Pebble's tlsPort: a relay that holds its validations
    pebble = start_pebble(tmp_path / "pebble", tls_port=hold_port)
    validating = asyncio.Event()
    release = asyncio.Event()
    edged_port: list[int] = []
    opened: list[asyncio.StreamWriter] = []  # closed at the end: none left for loop.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.append(writer)
        validating.set()
        await release.wait()
        with contextlib.suppress(OSError):
            up_r, up_w = await asyncio.open_connection("127.0.0.1", edged_port[0])
            opened.append(up_w)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    holder = await asyncio.start_server(relay, "127.0.0.1", hold_port)
    body = acme_table(pebble.directory, pebble.listener_ca) + (
        '[[site]]\nnames = ["shop.test"]\nbackend = "127.0.0.1:9"\n'
    )
    try:
        async with run_workers(tmp_path, body) as e:
            edged_port.append(e.port)
            await asyncio.wait_for(validating.wait(), 60)  # the challenge is pending now
            zygote = await asyncio.to_thread(zygote_of, e)
            os.kill(zygote, signal.SIGSTOP)  # no replacement until the client waits
            try:
                for worker in await asyncio.to_thread(e.workers):
                    os.kill(int(str(worker["pid"])), signal.SIGKILL)
                await asyncio.sleep(0.5)
                waiting = asyncio.create_task(
                    asyncio.to_thread(handshake, e.port, "shop.test", [ACME_TLS_ALPN])
                )
                await asyncio.sleep(0.5)  # connected: queued on a slot's listening socket
            finally:
                os.kill(zygote, signal.SIGCONT)
            alpn, cert = await asyncio.wait_for(waiting, 30)
            assert alpn == ACME_TLS_ALPN and is_challenge_cert(cert)
            release.set()
    finally:
        release.set()
        holder.close()
        pebble.stop()
        for writer in opened:
            writer.close()
        await asyncio.sleep(0.1)  # the closes complete


async def test_fleet_node_answers_the_challenge_another_node_ordered(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Node a holds Pebble's tlsPort and has no [acme]; node b orders over tls-alpn-01 and
    puts its challenges in Redis, where node a finds them."""
    tls_port = free_port()
    pebble = start_pebble(tmp_path / "pebble", tls_port=tls_port)
    try:
        async with AsyncExitStack() as stack:
            backend = await stack.enter_async_context(run_backend())
            site = f'[[site]]\nnames = ["shop.test"]\nbackend = "{backend.address}"\n'
            extra = 'store_local = "local"\nredis_prefix = "alpn"'
            nodes = []
            for node, port, body in (
                ("a", tls_port, site),
                ("b", free_port(), acme_table(pebble.directory, pebble.listener_ca) + site),
            ):
                (tmp_path / node).mkdir()
                nodes.append(
                    await stack.enter_async_context(
                        run_edged(
                            tmp_path / node,
                            body,
                            port=port,
                            store=redis_server.url,
                            edged_extra=extra,
                        )
                    )
                )
            a, b = nodes
            deadline = asyncio.get_running_loop().time() + 60
            # b counts its success once it serves the certificate itself, which may be after
            # a (told over pub/sub) serves it.
            successes = b.daemon.counters.renewal_attempts
            while a.daemon.serving("shop.test") is None or successes["shop.test", "success"] < 1:
                assert asyncio.get_running_loop().time() < deadline, "no certificate in time"
                await asyncio.sleep(0.1)
            assert b.daemon.counters.renewal_attempts["shop.test", "success"] == 1
            assert a.daemon.counters.acme_tls_alpn["answered"] >= 1
            assert b.daemon.counters.acme_tls_alpn["answered"] == 0
            assert len(b.daemon.alpn_board) == 0
    finally:
        pebble.stop()


async def test_fleet_node_with_workers_answers_the_challenge_another_node_ordered(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """As above, but node a serves TLS from two worker processes, which have no store
    connection: a worker the CA reaches asks the main process, which reads Redis."""
    tls_port = free_port()
    pebble = start_pebble(tmp_path / "pebble", tls_port=tls_port)
    proc = None
    log = tmp_path / "a.log"
    try:
        async with AsyncExitStack() as stack:
            backend = await stack.enter_async_context(run_backend())
            site = f'[[site]]\nnames = ["shop.test"]\nbackend = "{backend.address}"\n'
            extra = 'store_local = "local"\nredis_prefix = "alpnw"'
            (tmp_path / "a").mkdir()
            config = write_process_config(
                tmp_path / "a",
                site,
                https=tls_port,
                store=redis_server.url,
                edged_extra=extra + "\nworkers = 2",
            )
            with log.open("wb") as out:
                proc = await asyncio.create_subprocess_exec(
                    EDGED,
                    "run",
                    "--config",
                    str(config),
                    stdout=out,
                    stderr=out,
                    cwd=tmp_path / "a",
                )
            while log.read_text().count("serving after") < 2:  # both workers serve
                assert proc.returncode is None, log.read_text()
                await asyncio.sleep(0.05)
            (tmp_path / "b").mkdir()
            b = await stack.enter_async_context(
                run_edged(
                    tmp_path / "b",
                    acme_table(pebble.directory, pebble.listener_ca) + site,
                    store=redis_server.url,
                    edged_extra=extra,
                )
            )
            deadline = asyncio.get_running_loop().time() + 60
            while b.daemon.counters.renewal_attempts["shop.test", "success"] < 1:
                assert asyncio.get_running_loop().time() < deadline, log.read_text()[-3000:]
                assert b.daemon.counters.renewal_attempts["shop.test", "failure"] == 0, (
                    log.read_text()[-3000:]
                )
                await asyncio.sleep(0.1)
            assert b.daemon.counters.acme_tls_alpn["answered"] == 0  # b's port is not Pebble's
            text = log.read_text()
            # Only workers listen on a's TLS port: they answered each validation.
            validated = pebble.count("set VALID by completed challenge")
            assert validated >= 1
            assert text.count("tls-alpn-01 answered") >= validated, text[-3000:]
    finally:
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 15)
        pebble.stop()
    assert proc is not None and proc.returncode == 0


# --- preflight -----------------------------------------------------------------------------


def alpn_config(server: Bind, names: list[str], https: int) -> Config:
    text = config_text(server, names, challenge="tls-alpn-01")
    text = re.sub(r'https = \["127\.0\.0\.1:\d+"\]', f'https = ["127.0.0.1:{https}"]', text)
    return parse_config(text, Path("/etc/edged/edged.toml"))


async def test_preflight_probes_the_tls_port(bind: Bind, tmp_path: Path) -> None:  # noqa: F811
    names = ["www.pf.test", "away.pf.test", "*.pf.test"]
    https = free_port()
    # Nothing holds the port: the check binds it and a probe challenge makes the round trip.
    results = await run_preflight(alpn_config(bind, names, https), ca_domains=[CA])
    checks = by_check(results, "tls-alpn-01")
    assert checks["www.pf.test"].ok, checks["www.pf.test"]
    assert "a probe challenge answered on port" in checks["www.pf.test"].message
    assert "port 443 must be forwarded" in checks["www.pf.test"].message
    assert not checks["*.pf.test"].ok and "wildcards need dns-01" in checks["*.pf.test"].message
    points = by_check(results, "points-here")
    assert points["www.pf.test"].ok and not points["away.pf.test"].ok
    # edged runs there: the CLI can only see that it answers like edged; the daemon's own
    # board gives the full round trip.
    site = '[[site]]\nnames = ["www.pf.test"]\nbackend = "127.0.0.1:9"\n'
    async with run_edged(tmp_path, site, port=https) as edged:
        config = alpn_config(bind, names[:1], https)
        busy = by_check(await run_preflight(config, ca_domains=[CA]), "tls-alpn-01")
        assert busy["www.pf.test"].ok, busy
        assert "refuses an unknown validation like edged" in busy["www.pf.test"].message
        own = await run_preflight(config, ca_domains=[CA], alpn_board=edged.daemon.alpn_board)
        assert "came back" in by_check(own, "tls-alpn-01")["www.pf.test"].message
        assert len(edged.daemon.alpn_board) == 0  # the probe is gone again
    # Another TLS server holds the port: it does not answer like edged.
    other = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf = make_leaf(make_ca("Other"), ["www.pf.test"])
    cert, key = write_pair(tmp_path, "other", leaf, [])
    other.load_cert_chain(cert, key)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", https, ssl=other)
    try:
        config = alpn_config(bind, names[:1], https)
        failed = by_check(await run_preflight(config, ca_domains=[CA]), "tls-alpn-01")
        assert not failed["www.pf.test"].ok, failed
        assert "another server" in failed["www.pf.test"].message
    finally:
        server.close()
        await server.wait_closed()


async def test_cli_issue_answers_tls_alpn_01_itself(tmp_path: Path) -> None:
    """`edged issue` without a daemon binds [listen].https for the validations only."""
    https = free_port()
    pebble = start_pebble(tmp_path / "pebble", tls_port=https)
    try:
        site = f'[[site]]\nnames = {json.dumps(list(NAMES))}\nbackend = "127.0.0.1:9"\n'
        config = write_process_config(
            tmp_path, acme_table(pebble.directory, pebble.listener_ca) + site, https=https
        )
        out = await run_cmd(EDGED, "issue", "shop.test", "--config", str(config), limit=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "shop.test: issued for shop.test, www.shop.test" in out.stdout
        assert (tmp_path / "store" / "live" / "shop.test" / "meta.json").exists()
        with socket.socket() as probe:  # the port is free again
            probe.bind(("127.0.0.1", https))
    finally:
        pebble.stop()


async def test_failed_order_withdraws_its_challenges(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Pebble validates somewhere nothing listens: the order fails with the CA's reason and
    the challenge is gone from the board and from the fleet's store."""
    pebble = start_pebble(tmp_path / "pebble", tls_port=free_port())
    try:
        body = acme_table(
            pebble.directory, pebble.listener_ca, 'max_attempts = 1\nretry_interval = "1h"'
        )
        body += '[[site]]\nnames = ["shop.test"]\nbackend = "127.0.0.1:9"\n'
        async with run_edged(
            tmp_path, body, store=redis_server.url, edged_extra='store_local = "local"'
        ) as edged:
            daemon = edged.daemon
            deadline = asyncio.get_running_loop().time() + 60
            while daemon.counters.renewal_attempts["shop.test", "failure"] == 0:
                assert asyncio.get_running_loop().time() < deadline, "no failed attempt in time"
                await asyncio.sleep(0.1)
            error = str(daemon.renewer.states["shop.test"].last_error)
            assert "Failed to connect to 127.0.0.1" in error and "tls-alpn-01" in error, error
            assert len(daemon.alpn_board) == 0
            store = daemon.store
            assert isinstance(store, RedisStore)
            assert await asyncio.to_thread(store.get_token, "tls-alpn-01.shop.test") is None
    finally:
        pebble.stop()


async def test_renewals_over_tls_alpn_01_never_disturb_normal_clients(tmp_path: Path) -> None:
    """Three forced renewals, each with fresh challenges on the name being served (Pebble told
    not to reuse authorizations), under a stream of normal handshakes: every one of them gets a
    certificate Pebble issued, none a challenge certificate, none is refused."""
    https = free_port()
    pebble = start_pebble(tmp_path / "pebble", tls_port=https, env={"PEBBLE_AUTHZREUSE": "0"})
    clients = NormalClients(https, "shop.test")
    try:
        body = acme_table(pebble.directory, pebble.listener_ca).replace(
            '["ecdsa-p256", "rsa-2048"]', '["ecdsa-p256"]'
        )
        body += '[[site]]\nnames = ["shop.test"]\nbackend = "127.0.0.1:9"\n'
        async with run_edged(tmp_path, body, port=https) as edged:
            daemon = edged.daemon
            deadline = asyncio.get_running_loop().time() + 60
            while daemon.serving("shop.test") is None:
                assert asyncio.get_running_loop().time() < deadline, "no certificate in time"
                await asyncio.sleep(0.05)
            answered = daemon.counters.acme_tls_alpn["answered"]
            clients.start()
            operations = DaemonOperations(daemon)
            for _ in range(3):
                result = await operations.renew("shop.test")
                assert result["state"] == "active", result
            clients.stop.set()
            await asyncio.to_thread(clients.join, 10)
            assert daemon.counters.acme_tls_alpn["answered"] >= answered + 3  # new challenges
            assert daemon.counters.renewal_attempts["shop.test", "success"] == 4
    finally:
        clients.stop.set()
        pebble.stop()
    assert clients.wrong == [], clients.wrong
    assert clients.refused == 0 and clients.served > 0, (clients.refused, clients.served)
