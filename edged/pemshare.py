"""Certificates shared by the main process and its workers: PEM in sealed memfds.

Each worker used to hold a copy of every certificate's PEM of its own (~1 KiB a site, ~100 MiB
per worker at 100k sites), so memory grew with the number of cores. Now the main process
writes a large set of certificates (a worker's first state, a batch of the background read, a
reload's changes) once into a sealed memfd, a *segment*, that every worker maps read-only: its
pages are in memory once for all of them. The message then carries a `PemRef` (segment,
offset) in place of each certificate, and the segment's fd goes ahead of the first message
that names it, on a side channel (SCM_RIGHTS: a stream read would drop the fd).

Small changes (a renewal, an upload, a site a worker asked for) still go inline: a segment for
each renewal would soon be thousands of mappings per worker. What they leave behind is bounded:
the private copies in each worker, and the bytes of segments whose certificates were replaced.
Once those exceed REPACK_FRACTION of what is served (and REPACK_MIN_BYTES), or there are more
than MAX_SEGMENTS segments, everything served is written into one new segment, the workers get
references to it, and the older segments are forgotten: a worker unmaps one when nothing of it
refers to it any more.

A record at a reference's offset: a header (leaf length, key length, chain offset, chain
length), the leaf, the key. A chain (the intermediates) is stored once per segment.
"""

from __future__ import annotations

import ctypes
import fcntl
import itertools
import logging
import mmap
import os
import socket
import struct
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from edged.sni import ServedCert

log = logging.getLogger("edged.pemshare")

# Certificates not in a segment yet that a message must carry for a segment to be made: below
# it they go inline (a renewal), from it on (a first state, a batch of the background read).
PACK_MIN = 64
MAX_SEGMENTS = 64  # segments alive, past which everything is repacked into one
REPACK_FRACTION = 0.25  # of the bytes served: inline copies and replaced bytes tolerated
REPACK_MIN_BYTES = 1 << 20  # below this much of them, a repack is not worth its work
_HEADER = struct.Struct("!IIII")  # leaf length, key length, chain offset, chain length
_ANNOUNCE = struct.Struct("!QQ")  # on the side channel, with the fd: segment id, size
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_FLUSH = 1 << 20  # bytes gathered before each write into a segment


class PemShareError(Exception):
    """A segment could not be made, sent, received or mapped (the message says which)."""


class PemRef(NamedTuple):
    """A certificate in a segment, as a message to a worker carries it."""

    segment: int
    offset: int
    fingerprint: str
    key_type: str


Carried = ServedCert | PemRef  # what a state message's certificate tuples hold


# --- the main process's side ------------------------------------------------------------------


class Segment:
    """A sealed memfd: its fd is closed when the last holder (the share, a message queued for
    a worker that has not had it yet) lets go of it."""

    __slots__ = ("__weakref__", "fd", "id", "size")

    def __init__(self, id: int, fd: int, size: int) -> None:
        self.id = id
        self.fd = fd
        self.size = size
        weakref.finalize(self, os.close, fd)


@dataclass(frozen=True)
class Converted:
    """A message's certificates with references in place of those in segments."""

    certs: dict[int, tuple[Carried, ...]]
    segments: tuple[Segment, ...]  # the ones its references name: sent ahead of it


@dataclass(frozen=True)
class Repack:
    """A new segment holding every certificate served, not in use yet."""

    segment: Segment | None  # None: nothing is served
    where: dict[ServedCert, tuple[Segment, int]]


@dataclass
class PemShare:
    """Where the main process has put which certificate. Thread-safe: messages are converted
    on the event loop and, when large, in threads."""

    pack_min: int = PACK_MIN
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _where: dict[ServedCert, tuple[Segment, int]] = field(default_factory=dict)
    _segments: dict[int, Segment] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __len__(self) -> int:
        return len(self._segments)

    def size(self) -> int:
        """Bytes in the segments alive (in memory once, however many workers map them)."""
        with self._lock:
            return sum(s.size for s in self._segments.values())

    def convert(self, certs: Mapping[int, Sequence[ServedCert]]) -> Converted:
        """`certs` as a message carries them: those in a segment as references, the others
        written into a new segment if there are `pack_min` of them, else inline (inline too
        when the segment cannot be made, which is logged). Written outside the lock: small
        messages converted on the event loop meanwhile do not wait for it."""
        # Counted with repeats: one certificate for many sites is as many copies inline (pickle
        # shares an object, not equal bytes read from separate store entries).
        unplaced = [c for group in certs.values() for c in group if c not in self._where]
        if len(unplaced) >= self.pack_min:
            fresh = _distinct(unplaced)
            try:
                segment, placed = self._write(fresh)
            except PemShareError as exc:  # they go as copies: more memory, nothing lost
                log.warning("%s; the workers get copies of %d certificates", exc, len(fresh))
                return Converted({i: tuple(group) for i, group in certs.items()}, ())
            with self._lock:
                self._segments[segment.id] = segment
                self._where.update(placed)
        used: dict[int, Segment] = {}
        out = {i: tuple(self._carried(cert, used) for cert in group) for i, group in certs.items()}
        return Converted(out, tuple(used.values()))

    def prepare_repack(self, certs: Mapping[int, Sequence[ServedCert]]) -> Repack:
        """Every one of `certs` written into one new segment, not in use yet (`install`).
        Blocking (~0.2 s at 100k certificates): call it in a thread."""
        fresh = _distinct(c for group in certs.values() for c in group)
        if not fresh:
            return Repack(None, {})
        return Repack(*self._write(fresh))

    def install(self, repack: Repack) -> tuple[int, ...]:
        """Refer to the repack's segment from now on (a certificate not in it goes inline or
        into a new segment again); returns the ids of the segments retired. O(1): call it
        when the next message is queued, so every message converted after it names only the
        repack's segment (and newer ones)."""
        with self._lock:
            retired = tuple(self._segments)
            self._segments = {} if repack.segment is None else {repack.segment.id: repack.segment}
            self._where = repack.where
        return retired

    def wants_repack(self, served: Mapping[int, Sequence[ServedCert]]) -> bool:
        """Whether what `served` leaves behind calls for a repack: bytes each worker holds
        privately (inline certificates) and bytes of segments no longer served, against all
        that is served; or too many segments. ~30 ms at 100k sites: call it in a thread."""
        with self._lock:
            segments = list(self._segments.values())
        if len(segments) > MAX_SEGMENTS:
            return True
        where = self._where  # read without the lock: dict lookups are atomic
        inline = shared = 0
        records: set[tuple[int, int]] = set()  # (segment id, offset): each counted once
        chains: set[tuple[int, bytes]] = set()  # (segment id or 0 for inline, chain)
        for group in served.values():
            for cert in group:
                place = where.get(cert)
                size = _HEADER.size + len(cert.leaf_pem) + len(cert.key_pem)
                if place is None:
                    # Each inline copy is a worker's own, even of equal bytes (pickle shares
                    # one object, not equal bytes read from separate store entries); chains
                    # are shared in a worker (edged.chains).
                    inline += size
                    chains.add((0, cert.chain_pem))
                elif (place[0].id, place[1]) not in records:
                    records.add((place[0].id, place[1]))
                    shared += size
                    chains.add((place[0].id, cert.chain_pem))
        for segment_id, chain in chains:
            if segment_id:
                shared += len(chain)
            else:
                inline += len(chain)
        dead = max(0, sum(s.size for s in segments) - shared)
        return inline + dead > max(REPACK_MIN_BYTES, REPACK_FRACTION * (inline + shared))

    def _carried(self, cert: ServedCert, used: dict[int, Segment]) -> Carried:
        place = self._where.get(cert)
        if place is None:
            return cert
        segment, offset = place
        used[segment.id] = segment
        return PemRef(segment.id, offset, cert.fingerprint, cert.key_type)

    def _write(
        self, certs: Sequence[ServedCert]
    ) -> tuple[Segment, dict[ServedCert, tuple[Segment, int]]]:
        """A new sealed segment holding `certs`, and where each one is in it."""
        try:
            fd = os.memfd_create("edged-pem", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            raise PemShareError(f"cannot create a memfd for shared certificates: {exc}") from None
        try:
            offsets: dict[ServedCert, int] = {}
            chains: dict[bytes, int] = {}
            buf = bytearray()
            done = 0  # bytes written before buf
            for cert in certs:
                chain = cert.chain_pem
                chain_at = chains.get(chain)
                if chain_at is None:
                    chain_at = chains[chain] = done + len(buf)
                    buf += chain
                offsets[cert] = done + len(buf)
                buf += _HEADER.pack(len(cert.leaf_pem), len(cert.key_pem), chain_at, len(chain))
                buf += cert.leaf_pem
                buf += cert.key_pem
                if len(buf) >= _FLUSH:
                    done += _write_all(fd, buf)
                    buf.clear()
            done += _write_all(fd, buf)
            # Sealed: no process can change what a worker serves under it, nor shrink it to
            # make a mapped page fault.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        except OSError as exc:
            os.close(fd)
            raise PemShareError(f"cannot write shared certificates into a memfd: {exc}") from None
        except BaseException:
            os.close(fd)
            raise
        segment = Segment(next(self._ids), fd, done)
        return segment, {cert: (segment, at) for cert, at in offsets.items()}


def send_segment(chan: socket.socket, segment: Segment) -> None:
    """Announce `segment` to a worker with its fd. BlockingIOError when the channel is full
    (wait until it is writable); OSError when the worker is gone."""
    socket.send_fds(chan, [_ANNOUNCE.pack(segment.id, segment.size)], [segment.fd])


def _write_all(fd: int, data: bytes | bytearray) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


def _distinct(certs: Iterable[ServedCert]) -> list[ServedCert]:
    return list(dict.fromkeys(certs))


# --- a worker's side ----------------------------------------------------------------------------

# mmap(2) itself: mmap.mmap keeps a duplicate of the file descriptor for as long as the mapping
# lives (Python 3.11 has no trackfd=False), one descriptor per segment out of the budget of a
# worker's connections, and one more needed while a segment is mapped.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


class MappedSegment:
    """A segment mapped read-only, holding no file descriptor; unmapped when the last
    certificate in it is let go of."""

    __slots__ = ("__weakref__", "_address", "id", "size")

    def __init__(self, id: int, fd: int, size: int) -> None:
        self.id = id
        self.size = size
        self._address = 0
        if size:  # a zero-length mapping is refused; an empty segment holds nothing to read
            address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address is None or address == _MAP_FAILED:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            self._address = int(address)
            weakref.finalize(self, _libc.munmap, address, size).atexit = False

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` (ValueError outside the segment: never read there)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"bytes {offset}+{length} are outside segment {self.id}")
        return ctypes.string_at(self._address + offset, length) if length else b""


@dataclass(frozen=True, slots=True)
class SharedPem:
    """A certificate in a mapped segment: what serving needs, read from the segment when a
    context is built (rarely: the contexts are cached)."""

    fingerprint: str
    key_type: str
    segment: MappedSegment = field(repr=False, compare=False)
    offset: int = field(repr=False, compare=False)

    def _header(self) -> tuple[int, int, int, int]:
        leaf_len, key_len, chain_at, chain_len = _HEADER.unpack(
            self.segment.read(self.offset, _HEADER.size)
        )
        return leaf_len, key_len, chain_at, chain_len

    @property
    def leaf_pem(self) -> bytes:
        leaf_len, _, _, _ = self._header()
        return self.segment.read(self.offset + _HEADER.size, leaf_len)

    @property
    def key_pem(self) -> bytes:
        leaf_len, key_len, _, _ = self._header()
        return self.segment.read(self.offset + _HEADER.size + leaf_len, key_len)

    @property
    def chain_pem(self) -> bytes:
        _, _, chain_at, chain_len = self._header()
        return self.segment.read(chain_at, chain_len)

    @property
    def fullchain_pem(self) -> bytes:
        return self.leaf_pem + self.chain_pem

    def shared(self) -> SharedPem:
        return self  # its chain is in the segment, once for every worker


Received = ServedCert | SharedPem  # a certificate as a worker holds it


class SegmentMaps:
    """A worker's mapped segments: takes the fds the main process sends ahead of the messages
    that name them, and turns references into certificates.

    A worker at its file descriptor limit (connections held open) must still get each fd: one
    lost is a message it cannot read, and the worker would exit with every connection it holds.
    So a spare descriptor is kept, closed just before each fd is received and opened again
    once the segment is mapped (a mapping holds no descriptor). Receive on the event loop
    (`receive`): nothing there can take the spare's slot meanwhile, as an accept could."""

    def __init__(self, chan: socket.socket) -> None:
        self.chan = chan  # non-blocking: what a message names was sent before the message
        self._maps: dict[int, MappedSegment] = {}
        self._spare = _spare_fd()

    def __len__(self) -> int:
        return len(self._maps)

    def close(self) -> None:
        """Let go of the spare descriptor (the mappings go with the certificates in them)."""
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    def receive(self) -> None:
        """Map every segment sent so far (PemShareError: one cannot be received or mapped).
        Once a message has been read, the segments it names have been sent: call this then,
        on the event loop, and resolving it (in a thread or not) receives nothing."""
        while self._receive_one() is not None:
            pass

    def resolve(self, certs: Mapping[int, Sequence[Carried]]) -> dict[int, tuple[Received, ...]]:
        """The message's certificates with each reference made a SharedPem (PemShareError: a
        segment it names was not sent, or cannot be mapped)."""
        out: dict[int, tuple[Received, ...]] = {}
        for i, group in certs.items():
            out[i] = tuple(self._resolved(c) for c in group)
        return out

    def forget(self, ids: Iterable[int]) -> None:
        """The main process will name these segments no more."""
        for i in ids:
            self._maps.pop(i, None)

    def _resolved(self, cert: Carried) -> Received:
        if not isinstance(cert, PemRef):
            return cert
        segment = self._maps.get(cert.segment)
        if segment is None:
            segment = self._receive(cert.segment)
        return SharedPem(cert.fingerprint, cert.key_type, segment, cert.offset)

    def _receive(self, wanted: int) -> MappedSegment:
        while wanted not in self._maps:
            if self._receive_one() is None:
                raise PemShareError(f"segment {wanted} was named but not sent")
        return self._maps[wanted]

    def _receive_one(self) -> int | None:
        """The id of the next segment sent, now mapped; None when none is waiting."""
        if self._spare is not None:  # its slot is the received fd's
            os.close(self._spare)
            self._spare = None
        fds: list[int] = []
        try:
            try:
                data, fds, flags, _ = socket.recv_fds(self.chan, _ANNOUNCE.size, 1)
            except BlockingIOError:
                return None
            except OSError as exc:
                raise PemShareError(f"cannot receive a segment: {exc}") from None
            if not data and not fds:
                return None  # the main process is gone: nothing more comes
            if len(data) != _ANNOUNCE.size or len(fds) != 1:
                if flags & socket.MSG_CTRUNC:
                    raise PemShareError("a segment's fd was lost: out of file descriptors")
                raise PemShareError("malformed segment announcement")
            seg_id, size = _ANNOUNCE.unpack(data)
            try:
                self._maps[seg_id] = MappedSegment(seg_id, fds[0], size)
            except (OSError, ValueError) as exc:
                raise PemShareError(f"cannot map segment {seg_id}: {exc}") from None
            return int(seg_id)
        finally:
            for fd in fds:
                os.close(fd)
            self._spare = _spare_fd()


def _spare_fd() -> int | None:
    try:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # none to spare now: the next segment takes its chances
        return None
