"""Certificates hold their leaf and their chain apart, one copy of each distinct chain."""

from __future__ import annotations

import pickle
import socket

import pytest

from edged import chains
from edged.certs import parse_bundle, stored_bundle
from edged.chains import shared_chain, split_fullchain
from edged.pemshare import SegmentMaps
from edged.sni import ServedCert
from edged.worker import received_certs
from tests.pki import fullchain, make_ca, make_intermediate, make_leaf

CA = make_ca("Chains CA")
INTER = make_intermediate(CA, "Chains Intermediate")
INTER2 = make_intermediate(INTER, "Chains Intermediate 2")


@pytest.mark.parametrize(
    "pem",
    [
        fullchain(make_leaf(INTER, ["a.test"])),  # a leaf alone
        fullchain(make_leaf(INTER, ["a.test"]), INTER),
        fullchain(make_leaf(INTER2, ["a.test"]), INTER2, INTER),
        fullchain(make_leaf(INTER, ["a.test"]), INTER).replace(b"\n", b"\r\n"),
        fullchain(make_leaf(INTER, ["a.test"]), INTER).rstrip(b"\n"),  # no final line break
        b"Bag Attributes\n" + fullchain(make_leaf(INTER, ["a.test"]), INTER),  # text before
        b"no certificate here",
        b"",
    ],
)
def test_splitting_is_lossless(pem: bytes) -> None:
    leaf_pem, chain_pem = split_fullchain(pem)
    assert leaf_pem + chain_pem == pem
    assert leaf_pem.count(b"-----BEGIN CERTIFICATE-----") <= 1
    if pem.count(b"-----BEGIN CERTIFICATE-----") > 1:
        assert chain_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    else:
        assert chain_pem == b""


def test_certificates_of_one_chain_share_its_bytes() -> None:
    issued = make_leaf(INTER, ["a.test"])
    a = parse_bundle(fullchain(issued, INTER), issued.key_pem, source="a")
    first = make_leaf(INTER, ["b.test"])
    b = parse_bundle(fullchain(first, INTER), first.key_pem, source="b")
    second = make_leaf(INTER, ["c.test"])
    c = stored_bundle(fullchain(second, INTER), second.key_pem, "ecdsa-p256", source="c")
    assert a.chain_pem == INTER.cert_pem
    assert b.chain_pem is a.chain_pem and c.chain_pem is a.chain_pem
    assert b.fullchain_pem == fullchain(first, INTER) and b.has_chain
    assert c.leaf.subject == second.cert.subject
    alone = stored_bundle(second.cert_pem, second.key_pem, "ecdsa-p256", source="d")
    assert alone.chain_pem == b"" and not alone.has_chain
    assert alone.fullchain_pem == second.cert_pem


def test_the_table_of_chains_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chains, "MAX_SHARED", 2)
    monkeypatch.setattr(chains, "_shared", {})
    kept = [shared_chain(bytes([n]) * 100) for n in range(5)]
    assert len(chains._shared) <= 2
    assert [bytes(k) for k in kept] == [bytes([n]) * 100 for n in range(5)]  # bytes unchanged
    again = bytes([4]) * 100
    assert shared_chain(again) is kept[4]


def test_workers_hold_one_copy_of_a_chain_across_messages() -> None:
    """One message pickles a shared chain once; certificates of separate messages (renewals)
    are mapped onto the copy the worker has."""
    certs = []
    for name in ("a.test", "b.test"):
        issued = make_leaf(INTER, [name])
        certs.append(
            stored_bundle(fullchain(issued, INTER), issued.key_pem, "ecdsa-p256", source=name)
        )
    served = {i: (ServedCert.of(b),) for i, b in enumerate(certs)}
    one = pickle.loads(pickle.dumps(served))
    assert one[0][0].chain_pem is one[1][0].chain_pem
    other = pickle.loads(pickle.dumps({2: (ServedCert.of(certs[0]),)}))
    assert other[2][0].chain_pem is not one[0][0].chain_pem  # a copy of its own, unpickled
    main, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker.setblocking(False)
    maps = SegmentMaps(worker)  # inline certificates: nothing comes on it
    try:
        in_worker = received_certs(one, maps)
        renewed = received_certs(other, maps)
    finally:
        maps.close()
        main.close()
        worker.close()
    assert renewed[2][0].chain_pem is in_worker[0][0].chain_pem
    assert renewed[2][0].fullchain_pem == certs[0].fullchain_pem
