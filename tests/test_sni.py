"""SniIndex lookup: exact, one-level wildcard, default, refusal; and DNS name rules."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import resource
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from edged.certs import CertBundle, parse_bundle
from edged.clienthello import (
    ClientHello,
    ClientHelloError,
    ClientHelloReason,
    complete,
    peek_client_hello,
)
from edged.config import Address, Site, TlsSettings
from edged.names import NameError_, covers, normalize_name, store_dirname, wildcard_parent
from edged.sni import build_index
from edged.tls import (
    ROUTE_ATTR,
    ContextCache,
    SniSelector,
    UnservableCert,
    build_listening_context,
    client_can_use,
    pick_bundle,
)
from tests.conftest import peer_cn, run_backend, run_edged, s_client
from tests.many_certs import store_dual
from tests.pki import fullchain, make_ca, make_leaf
from tests.test_tls_hostile import real_hello, send_and_wait_close


def site(index: int, *names: str) -> Site:
    return Site(index=index, names=names, backend=Address("127.0.0.1", 8000 + index))


SITES = [
    site(0, "example.com", "*.example.com"),
    site(1, "api.example.com"),
    site(2, "*.cdn.example.net"),
]


def test_exact_beats_wildcard_across_sites() -> None:
    index = build_index(SITES, {})
    route = index.lookup("api.example.com")
    assert route is not None and route.site.index == 1 and route.name == "api.example.com"
    route = index.lookup("www.example.com")
    assert route is not None and route.site.index == 0 and route.name == "*.example.com"


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        ("EXAMPLE.com.", "example.com"),
        ("x.cdn.example.net", "*.cdn.example.net"),
        ("x.y.cdn.example.net", None),  # a wildcard covers one label only
        ("cdn.example.net", None),
        ("*.example.com", "*.example.com"),  # a literal '*' SNI only matches the literal name
        ("unknown.org", None),
        ("", None),
        (None, None),
        ("../../etc/passwd", None),
        ("a\x00.example.com", None),
    ],
)
def test_lookup(sni: str | None, expected: str | None) -> None:
    route = build_index(SITES, {}).lookup(sni)
    assert (route.name if route else None) == expected


def test_default_answers_unknown_and_missing_sni() -> None:
    index = build_index(SITES, {}, default_name="api.example.com")
    for sni in ("unknown.org", None, "x.y.cdn.example.net"):
        route = index.lookup(sni)
        assert route is not None and route.name == "api.example.com"


def test_names_normalisation_and_rules() -> None:
    assert normalize_name("WWW.Example.COM.") == "www.example.com"
    assert normalize_name("bücher.example") == "xn--bcher-kva.example"
    # IDNA 2008 (UTS 46, non-transitional), as browsers and CAs: Python's "idna" codec is
    # IDNA 2003, which made faß.de fass.de and folded the final sigma: other domains.
    assert normalize_name("faß.de") == "xn--fa-hia.de"
    assert normalize_name("βόλος.com") == "xn--nxasmm1c.com"
    assert normalize_name("*.Bücher.example.") == "*.xn--bcher-kva.example"
    for bad in ("", "a..b", "-a.com", "a-.com", "x" * 64 + ".com", "a/b.com", "*.*.a.com"):
        with pytest.raises(NameError_):
            normalize_name(bad)
    with pytest.raises(NameError_):
        normalize_name("*.a.com", allow_wildcard=False)


def test_covers_one_label_only() -> None:
    assert covers("*.a.com", "x.a.com")
    assert not covers("*.a.com", "a.com")
    assert not covers("*.a.com", "x.y.a.com")
    assert covers("*.a.com", "*.a.com")
    assert not covers("x.a.com", "*.a.com")
    assert wildcard_parent("x.y.a.com") == "*.y.a.com"
    assert wildcard_parent("a.com") is None


def test_store_dirname_never_leaves_the_store() -> None:
    assert store_dirname("*.a.com") == "_wildcard.a.com"
    for bad in ("../x.com", "A.com", "a.com/..", ".", "..", "x\x00.com"):
        with pytest.raises(NameError_):
            store_dirname(bad)


# --- certificate choice from the parsed ClientHello (edged.tls.pick_bundle, choose) ---------


def _bundle(key_type: str, name: str = "dual.example.test") -> CertBundle:
    leaf = make_leaf(_CA, [name], key_type=key_type)
    return parse_bundle(fullchain(leaf), leaf.key_pem, source=key_type)


_CA = make_ca("Choice CA")
TLS13_ONLY = (0x0304,)
TLS12_AND_13 = (0x0304, 0x0303)
ECDHE_ECDSA_GCM, ECDHE_RSA_GCM = 0xC02B, 0xC02F
ECDSA_P256, ECDSA_P384, RSA_PSS, RSA_PKCS1 = 0x0403, 0x0503, 0x0804, 0x0401


def _hello(
    versions: tuple[int, ...] = (),
    sigalgs: tuple[int, ...] = (),
    ciphers: tuple[int, ...] = (0x1301, ECDHE_ECDSA_GCM, ECDHE_RSA_GCM),
    groups: tuple[int, ...] = (29, 23, 24),
) -> ClientHello:
    return ClientHello(
        legacy_version=0x0303,
        cipher_suites=ciphers,
        extensions=(),
        server_name="dual.example.test",
        alpn=(),
        supported_versions=versions,
        signature_algorithms=sigalgs,
        supported_groups=groups,
        ec_point_formats=(0,),
        size=0,
    )


@pytest.fixture(scope="module")
def bundles() -> dict[str, CertBundle]:
    return {kt: _bundle(kt) for kt in ("ecdsa-p256", "ecdsa-p384", "rsa-2048")}


@pytest.mark.parametrize(
    ("hello", "offered", "expected"),
    [
        # TLS 1.3: the signature schemes decide (the curve is part of the ECDSA scheme).
        (_hello(TLS12_AND_13, (ECDSA_P256, RSA_PSS)), ("ecdsa-p256", "rsa-2048"), "ecdsa-p256"),
        (_hello(TLS13_ONLY, (RSA_PSS,)), ("ecdsa-p256", "rsa-2048"), "rsa-2048"),
        (_hello(TLS13_ONLY, (ECDSA_P256,)), ("ecdsa-p384", "rsa-2048"), None),
        (_hello(TLS13_ONLY, (ECDSA_P384, RSA_PSS)), ("ecdsa-p256", "ecdsa-p384"), "ecdsa-p384"),
        (_hello(TLS13_ONLY, (RSA_PKCS1,)), ("ecdsa-p256", "rsa-2048"), None),  # not in 1.3
        # TLS 1.2: cipher suites, then signature algorithms, then the curve.
        (_hello((), (ECDSA_P256, RSA_PKCS1)), ("ecdsa-p256", "rsa-2048"), "ecdsa-p256"),
        (_hello((), (), (ECDHE_RSA_GCM,)), ("ecdsa-p256", "rsa-2048"), "rsa-2048"),
        (_hello((), (RSA_PKCS1, RSA_PSS)), ("ecdsa-p256", "rsa-2048"), "rsa-2048"),
        (_hello((), (ECDSA_P256,), groups=(29, 24)), ("ecdsa-p256", "rsa-2048"), None),
        (_hello((), (), (ECDHE_ECDSA_GCM,)), ("ecdsa-p256", "rsa-2048"), "ecdsa-p256"),
        (_hello((), (), (0x009E,)), ("ecdsa-p256", "rsa-2048"), None),  # DHE: not enabled
        # One certificate: always that one (OpenSSL says no if the client cannot use it).
        (_hello(TLS13_ONLY, (RSA_PSS,)), ("ecdsa-p256",), "ecdsa-p256"),
    ],
)
def test_pick_bundle(
    bundles: dict[str, CertBundle],
    hello: ClientHello,
    offered: tuple[str, ...],
    expected: str | None,
) -> None:
    chosen = pick_bundle([bundles[kt] for kt in offered], hello)
    assert (chosen.key_type if chosen else None) == expected
    if expected is not None and len(offered) > 1:
        assert client_can_use(expected, hello)


def test_choice_before_the_handshake_is_kept_by_the_sni_callback(
    bundles: dict[str, CertBundle],
) -> None:
    """OpenSSL still calls the listening context's sni_callback when the connection's context
    was set before the handshake (measured); the callback must leave the pre-read's choice."""
    site = Site(index=0, names=("dual.example.test",), backend=Address("127.0.0.1", 8000))
    index = build_index([site], {0: (bundles["ecdsa-p256"], bundles["rsa-2048"])})
    selector = SniSelector(index, ContextCache(10, "1.2"), ("http/1.1",))
    listen = build_listening_context(TlsSettings(), selector)
    calls: list[str | None] = []

    def spy(obj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> int | None:
        calls.append(name)
        return selector.callback(obj, name, ctx)

    listen.sni_callback = spy  # type: ignore[assignment]
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client_ctx.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")  # an RSA-only client
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="dual.example.test")
    server = listen.wrap_bio(s_in, s_out, server_side=True)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    first = c_out.read()
    hello = peek_client_hello(first)
    route = index.lookup(hello.server_name)
    assert selector.choose(server, hello, route)
    chosen = server.context
    # The callback alone would give the context holding both certificates: a different one.
    assert chosen is selector.cache.get(route, ("http/1.1",), [bundles["rsa-2048"]])  # type: ignore[arg-type]
    assert chosen is not selector.cache.get(route, ("http/1.1",))  # type: ignore[arg-type]
    s_in.write(first)
    for _ in range(10):  # pump both sides until the client is done
        with contextlib.suppress(ssl.SSLWantReadError):
            server.do_handshake()
        c_in.write(s_out.read())
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            s_in.write(c_out.read())
    assert calls == ["dual.example.test"]  # the callback ran ...
    assert server.context is chosen  # ... and left the choice alone
    assert getattr(server, ROUTE_ATTR) is route
    cert = x509.load_der_x509_certificate(client.getpeercert(binary_form=True) or b"")
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)


def test_an_os_error_building_a_context_refuses_that_handshake_only(
    bundles: dict[str, CertBundle], caplog: pytest.LogCaptureFixture
) -> None:
    """Out of file descriptors (EMFILE from memfd_create, for real) is not the certificate's
    fault: that handshake is refused, reported once however often it repeats, without
    telling to replace the certificate; once descriptors are free the same certificate is
    served (it used to be remembered as unservable until restart)."""
    site = Site(index=0, names=("fd.example.test",), backend=Address("127.0.0.1", 8000))
    route = build_index([site], {0: (bundles["ecdsa-p256"],)}).lookup("fd.example.test")
    assert route is not None
    cache = ContextCache(10, "1.2")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        for _ in range(3):
            with pytest.raises(UnservableCert) as refused:
                cache.get(route, ("http/1.1",))
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "Too many open files" in str(refused.value) and "replace it" not in str(refused.value)
    assert "LimitNOFILE" in str(refused.value)
    reports = [r.getMessage() for r in caplog.records if "fd.example.test" in r.getMessage()]
    assert len(reports) == 1, reports
    assert isinstance(cache.get(route, ("http/1.1",)), ssl.SSLContext)


def test_a_certificate_openssl_refuses_is_remembered(caplog: pytest.LogCaptureFixture) -> None:
    """A key that does not match its certificate fails every time: refused at once
    afterwards (no new build), reported once, advising to replace it."""
    ca = make_ca("Mismatch CA")
    leaf, stranger = make_leaf(ca, ["bad.example.test"]), make_leaf(ca, ["bad.example.test"])
    bad = dataclasses.replace(parse_bundle(leaf.cert_pem, leaf.key_pem), key_pem=stranger.key_pem)
    site = Site(index=0, names=("bad.example.test",), backend=Address("127.0.0.1", 8000))
    route = build_index([site], {0: (bad,)}).lookup("bad.example.test")
    assert route is not None
    cache = ContextCache(10, "1.2")
    for _ in range(2):
        with pytest.raises(UnservableCert, match="replace it"):
            cache.get(route, ("http/1.1",))
    assert cache.misses == 1
    assert len([r for r in caplog.records if "cannot be served" in r.getMessage()]) == 1


def test_choose_leaves_names_without_a_certificate_to_the_callback() -> None:
    site = Site(index=0, names=("new.example.test",), backend=Address("127.0.0.1", 8000))
    index = build_index([site], {})
    selector = SniSelector(index, ContextCache(10, "1.2"), ())
    listen = build_listening_context(TlsSettings(), selector)
    server = listen.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    hello = peek_client_hello(real_hello("new.example.test"))
    assert not selector.choose(server, hello, index.lookup("new.example.test"))
    assert not selector.choose(server, hello, None)
    assert server.context is listen and not hasattr(server, ROUTE_ATTR)


DUAL_CASES = [
    # (s_client options, the algorithm of the key the server must use)
    ((), "ECDSA"),
    (("-sigalgs", "RSA-PSS+SHA256"), "RSA"),  # the same scheme as rsa_pss_rsae_sha256
    (("-sigalgs", "rsa_pss_rsae_sha256"), "RSA"),
    (("-sigalgs", "ECDSA+SHA256"), "ECDSA"),
    (("-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"), "RSA"),
    (("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"), "ECDSA"),
    (("-tls1_2", "-sigalgs", "RSA+SHA256"), "RSA"),
]
SINGLE_CASES = {
    "one.example.test": [(), ("-sigalgs", "ECDSA+SHA256"), ("-tls1_2",)],
    "rsa.example.test": [
        (),
        ("-sigalgs", "rsa_pss_rsae_sha256"),
        ("-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"),
        ("-tls1_2", "-sigalgs", "RSA+SHA256"),
    ],
}


def _key_algorithm(stderr: str) -> str:
    """ECDSA or RSA, from the signature s_client saw (RSA keys sign with RSA or RSA-PSS)."""
    match = re.search(r"^(?:Peer )?[Ss]ignature type: (\S+)", stderr, re.M)
    return match.group(1).split("-")[0] if match else ""


@pytest.mark.parametrize("preread", [True, False])
async def test_served_key_type_follows_the_client(
    tmp_path: Path, pki: dict[str, Path], preread: bool
) -> None:
    """With the pre-read edged picks the certificate from the parsed ClientHello; with
    `[tls] preread = false` the sni_callback serves both and OpenSSL picks: same result."""
    store_dual(tmp_path / "store", _CA, "dual.example.test")
    async with run_backend() as backend:
        body = f"[tls]\npreread = {str(preread).lower()}\n"
        body += f'[[site]]\nnames = ["dual.example.test"]\nbackend = "{backend.address}"\n'
        for stem in ("one", "rsa"):
            body += (
                f'[[site]]\nnames = ["{stem}.example.test"]\nbackend = "{backend.address}"\n'
                f'cert_file = "{pki[stem + "_cert"]}"\nkey_file = "{pki[stem + "_key"]}"\n'
            )
        async with run_edged(tmp_path, body) as edged:
            for options, expected in DUAL_CASES:
                out = await s_client(edged.port, "dual.example.test", *options)
                assert out.returncode == 0, (options, out.stderr)
                assert _key_algorithm(out.stderr) == expected, (options, out.stderr)
            for name, cases in SINGLE_CASES.items():
                for options in cases:
                    out = await s_client(edged.port, name, *options)
                    assert out.returncode == 0, (name, options, out.stderr)
                    assert peer_cn(out.stderr) == name
            failures = {k: n for k, n in edged.daemon.counters.handshakes.items() if k[0] != "ok"}
            assert failures == {}, failures
            # Chosen before the handshake: one single-key context per certificate, and never
            # the context holding both (what the sni_callback alone builds, without pre-read).
            expected_contexts = 4 if preread else 3
            assert len(edged.daemon.selector.cache) == expected_contexts  # type: ignore[union-attr]


def _hello_with_bad_sigalgs(name: str) -> bytes:
    """A real ClientHello (one record) for `name` whose signature_algorithms list length is
    one byte short of its extension: malformed for edged's parser and for OpenSSL alike."""
    data = bytearray(real_hello(name))
    at = 9 + peek_client_hello(bytes(data)).starts[0x0D]  # record + handshake headers
    inner = int.from_bytes(data[at : at + 2], "big")
    data[at : at + 2] = (inner - 1).to_bytes(2, "big")
    return bytes(data)


async def test_malformed_lists_are_refused_by_whoever_reads_them(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """The pre-read reads a hello's cipher, version, signature and group lists only to choose
    between key types. A name with one certificate leaves them to OpenSSL, which refuses a
    malformed one with a decode_error alert; a name with two refuses it before the handshake."""
    single = _hello_with_bad_sigalgs("one.example.test")
    peeked = peek_client_hello(single)
    assert peeked.server_name == "one.example.test"
    with pytest.raises(ClientHelloError) as err:
        complete(peeked)
    assert err.value.reason == ClientHelloReason.BAD_EXTENSION
    store_dual(tmp_path / "store", _CA, "dual.example.test")
    async with run_backend() as backend:
        body = f'[[site]]\nnames = ["dual.example.test"]\nbackend = "{backend.address}"\n'
        body += (
            f'[[site]]\nnames = ["one.example.test"]\nbackend = "{backend.address}"\n'
            f'cert_file = "{pki["one_cert"]}"\nkey_file = "{pki["one_key"]}"\n'
        )
        async with run_edged(tmp_path, body) as edged:
            counters = edged.daemon.counters
            answer = await send_and_wait_close(edged.port, single)
            assert answer[:1] == b"\x15" and answer[-2:] == b"\x02\x32", answer  # decode_error
            answer = await send_and_wait_close(
                edged.port, _hello_with_bad_sigalgs("dual.example.test")
            )
            assert answer == b""  # refused before OpenSSL saw a byte
            assert counters.handshakes == {("protocol_error", "none"): 2}
            assert counters.connections_closed == {"handshake_failed": 2}
            assert len(edged.daemon.selector.cache) == 1  # type: ignore[union-attr]
            # And well-formed hellos still get their key type on both names.
            for name in ("dual.example.test", "one.example.test"):
                out = await s_client(edged.port, name)
                assert out.returncode == 0 and _key_algorithm(out.stderr) == "ECDSA", out.stderr
