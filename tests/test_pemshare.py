"""Certificates shared with the workers through sealed memfds (edged.pemshare): the main
process's side and a worker's, over a real SOCK_SEQPACKET pair as edged uses them."""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import resource
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.pemshare import (
    MAX_SEGMENTS,
    PACK_MIN,
    REPACK_MIN_BYTES,
    Converted,
    PemRef,
    PemShare,
    PemShareError,
    SegmentMaps,
    SharedPem,
    send_segment,
)
from edged.sni import ServedCert
from tests.pki import Issued, make_ca, make_intermediate, make_leaf


@pytest.fixture(scope="module")
def intermediate() -> Issued:
    return make_intermediate(make_ca("Share CA"), "Share intermediate")


@pytest.fixture
def channel() -> Iterator[tuple[socket.socket, socket.socket]]:
    main, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    main.setblocking(False)
    worker.setblocking(False)
    yield main, worker
    main.close()
    worker.close()


def served(issuer: Issued, count: int, stem: str = "s") -> dict[int, tuple[ServedCert, ...]]:
    """`count` sites, each with a certificate of its own issued by `issuer` (a chain of one)."""
    out = {}
    for i in range(count):
        leaf = make_leaf(issuer, [f"{stem}{i}.share.test"])
        out[i] = (
            ServedCert(f"{stem}-{i}", "ecdsa-p256", leaf.cert_pem, issuer.cert_pem, leaf.key_pem),
        )
    return out


def deliver(converted: Converted, chan: socket.socket, sent: set[int]) -> None:
    """What the main process's writer does: each segment's fd ahead of the message."""
    for segment in converted.segments:
        if segment.id not in sent:
            send_segment(chan, segment)
            sent.add(segment.id)


@contextlib.contextmanager
def out_of_descriptors(limit: int = 64) -> Iterator[None]:
    """This process at a descriptor limit of `limit` with every descriptor in use (as a worker
    whose connections hold them all); the limit and descriptors restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        with pytest.raises(OSError) as caught:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        assert caught.value.errno == errno.EMFILE
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def pem_segments(pid: int) -> set[int]:
    """The inodes of edged's shared certificate segments (edged.pemshare) `pid` maps."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if "memfd:edged-pem" in line:
            found.add(int(line.split()[4]))
    return found


def test_a_large_set_is_packed_once_and_every_byte_reads_back(
    intermediate: Issued, channel: tuple[socket.socket, socket.socket]
) -> None:
    certs = served(intermediate, PACK_MIN + 6)
    share = PemShare()
    converted = share.convert(certs)
    assert len(converted.segments) == 1 and len(share) == 1
    assert all(isinstance(c, PemRef) for group in converted.certs.values() for c in group)
    segment = converted.segments[0]
    # The intermediate is stored once, not once per certificate.
    records = sum(len(c.leaf_pem) + len(c.key_pem) + 16 for (c,) in certs.values())
    assert segment.size == records + len(intermediate.cert_pem)

    main, worker = channel
    deliver(converted, main, set())
    maps = SegmentMaps(worker)
    got = maps.resolve(converted.certs)
    for i, (original,) in certs.items():
        (cert,) = got[i]
        assert isinstance(cert, SharedPem)
        assert cert.fingerprint == original.fingerprint and cert.key_type == "ecdsa-p256"
        assert cert.leaf_pem == original.leaf_pem
        assert cert.chain_pem == original.chain_pem
        assert cert.key_pem == original.key_pem
        assert cert.fullchain_pem == original.fullchain_pem
        assert cert.shared() is cert

    # Sent again (a site asked for, a later message): references to the same place.
    again = share.convert({3: certs[3]})
    assert again.segments == (segment,) and again.certs[3] == converted.certs[3]


def test_a_segment_is_sealed(intermediate: Issued) -> None:
    """No process can change the PEM a worker serves under it, nor shrink the memfd under
    its mapping."""
    share = PemShare()
    (segment,) = share.convert(served(intermediate, PACK_MIN)).segments
    with pytest.raises(PermissionError):
        os.pwrite(segment.fd, b"x", 0)
    with pytest.raises(PermissionError):
        os.ftruncate(segment.fd, 1)
    writable = os.open(f"/proc/self/fd/{segment.fd}", os.O_RDWR)
    try:
        with pytest.raises(PermissionError):
            os.write(writable, b"-----BEGIN")
    finally:
        os.close(writable)


def test_a_few_go_inline_and_repeats_count(intermediate: Issued) -> None:
    """A renewal's few certificates go inline; the same certificate under many sites (equal
    bytes from separate store entries, so as many copies inline) is packed, once."""
    share = PemShare()
    few = served(intermediate, 3)
    converted = share.convert(few)
    assert converted.segments == () and len(share) == 0
    assert converted.certs == few

    (one,) = served(intermediate, 1, "same")[0]
    many = {
        i: (
            ServedCert(
                one.fingerprint, one.key_type, bytes(one.leaf_pem), one.chain_pem, one.key_pem
            ),
        )
        for i in range(PACK_MIN)
    }
    converted = share.convert(many)
    assert len(converted.segments) == 1
    assert converted.segments[0].size == 16 + len(one.leaf_pem) + len(one.key_pem) + len(
        one.chain_pem
    )
    assert len({c for group in converted.certs.values() for c in group}) == 1


def test_a_reference_to_a_segment_not_sent_is_an_error(
    intermediate: Issued, channel: tuple[socket.socket, socket.socket]
) -> None:
    share = PemShare()
    converted = share.convert(served(intermediate, PACK_MIN))
    _, worker = channel
    with pytest.raises(PemShareError, match="segment 1 was named but not sent"):
        SegmentMaps(worker).resolve(converted.certs)


def test_a_malformed_announcement_is_refused_and_its_fd_closed(
    channel: tuple[socket.socket, socket.socket],
) -> None:
    main, worker = channel
    r, w = os.pipe()
    os.close(w)
    socket.send_fds(main, [b"short"], [r])
    os.close(r)
    maps = SegmentMaps(worker)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(PemShareError, match="malformed segment announcement"):
        maps.resolve({0: (PemRef(9, 0, "f", "ecdsa-p256"),)})
    assert len(os.listdir("/proc/self/fd")) == before
    maps.close()


def test_a_mapped_segment_holds_no_file_descriptor(
    intermediate: Issued, channel: tuple[socket.socket, socket.socket]
) -> None:
    """A worker's descriptors are for its connections: a segment, once mapped, holds none
    (mmap.mmap would keep a duplicate per segment)."""
    main, worker = channel
    share = PemShare()
    certs = served(intermediate, PACK_MIN)
    converted = share.convert(certs)
    maps = SegmentMaps(worker)
    before = len(os.listdir("/proc/self/fd"))
    deliver(converted, main, set())
    got = maps.resolve(converted.certs)
    assert len(maps) == 1 and len(pem_segments(os.getpid())) == 1
    assert len(os.listdir("/proc/self/fd")) == before
    assert got[7][0].leaf_pem == certs[7][0].leaf_pem
    maps.close()


def test_a_segment_is_received_at_the_file_descriptor_limit(
    intermediate: Issued, channel: tuple[socket.socket, socket.socket]
) -> None:
    """A worker out of descriptors (its connections hold them all) still gets each segment:
    a lost fd is a message it cannot read, and it would exit with every connection it holds.
    Segment after segment: mapping one leaves the spare descriptor to the next."""
    main, worker = channel
    share = PemShare()
    first, second = served(intermediate, PACK_MIN, "a"), served(intermediate, PACK_MIN, "b")
    # Made before the limit: this process is the main process's side too.
    converted = {id(certs): share.convert(certs) for certs in (first, second)}
    maps = SegmentMaps(worker)
    sent: set[int] = set()
    with out_of_descriptors():
        for certs in (first, second):
            deliver(converted[id(certs)], main, sent)
            maps.receive()
            got = maps.resolve(converted[id(certs)].certs)
            assert got[3][0].key_pem == certs[3][0].key_pem
        with pytest.raises(OSError):  # still every descriptor in use
            os.open("/dev/null", os.O_RDONLY)
    assert len(maps) == 2
    maps.close()


def test_repack_moves_everything_served_into_one_segment(
    intermediate: Issued, channel: tuple[socket.socket, socket.socket]
) -> None:
    """Replaced certificates leave dead bytes in their segments, renewals inline copies; past
    the bound everything served goes into one new segment and the old ones are retired. A
    worker unmaps a retired segment once it has forgotten it and nothing of it is left."""
    main, worker = channel
    share = PemShare()
    sent: set[int] = set()
    maps = SegmentMaps(worker)
    # Enough that replacing them all leaves more than REPACK_MIN_BYTES behind.
    count = REPACK_MIN_BYTES // 800 + 100
    first = served(intermediate, count, "a")
    converted = share.convert(first)
    deliver(converted, main, sent)
    held = maps.resolve(converted.certs)
    assert not share.wants_repack(first)
    assert len(pem_segments(os.getpid())) == 1

    second = served(intermediate, count, "b")
    converted = share.convert(second)
    deliver(converted, main, sent)
    held = maps.resolve(converted.certs)  # the first set is no longer held
    assert len(share) == 2
    assert share.wants_repack(second)  # the first segment is all dead bytes

    repack = share.prepare_repack(second)
    retired = share.install(repack)
    assert sorted(retired) == [1, 2]
    converted = share.convert(second)
    assert [s.id for s in converted.segments] == [3] and len(share) == 1
    deliver(converted, main, sent)
    held = maps.resolve(converted.certs)
    maps.forget(retired)
    assert not share.wants_repack(second)
    del repack, converted
    gc.collect()
    assert len(pem_segments(os.getpid())) == 1  # only the new one: 1 and 2 are unmapped
    assert held[5][0].leaf_pem == second[5][0].leaf_pem


def test_inline_copies_call_for_a_repack(intermediate: Issued) -> None:
    share = PemShare()
    base = served(intermediate, PACK_MIN, "base")
    share.convert(base)
    renewed = dict(base)
    count = REPACK_MIN_BYTES // 800 + 100
    for i, group in served(intermediate, count, "renewed").items():
        renewed[PACK_MIN + i] = group
        if i < PACK_MIN - 1:
            assert not share.wants_repack(renewed)
    assert share.wants_repack(renewed)


def test_too_many_segments_call_for_a_repack(intermediate: Issued) -> None:
    share = PemShare(pack_min=1)
    certs = served(intermediate, MAX_SEGMENTS + 1)
    for i in range(MAX_SEGMENTS):
        share.convert({i: certs[i]})
    assert len(share) == MAX_SEGMENTS and not share.wants_repack(certs)
    share.convert({MAX_SEGMENTS: certs[MAX_SEGMENTS]})
    assert len(share) == MAX_SEGMENTS + 1
    assert share.wants_repack(certs)


def test_a_segment_that_cannot_be_made_is_a_clear_error(
    intermediate: Issued, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of file descriptors (the one way a memfd fails on a healthy host): a repack fails
    with an error that says what; a message goes with copies instead, and the share is
    unchanged."""
    share = PemShare()
    certs = served(intermediate, PACK_MIN)
    with out_of_descriptors():
        with pytest.raises(PemShareError, match="cannot create a memfd"):
            share.prepare_repack(certs)
        with caplog.at_level(logging.WARNING, "edged.pemshare"):
            converted = share.convert(certs)
        assert converted.certs == certs and converted.segments == ()  # copies: nothing lost
        assert "cannot create a memfd for shared certificates" in caplog.text
        assert f"the workers get copies of {PACK_MIN} certificates" in caplog.text
    assert len(share) == 0
    assert len(share.convert(certs).segments) == 1
