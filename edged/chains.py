"""One copy of each certificate chain's intermediates, however many certificates carry it.

A fullchain is the leaf followed by the CA's intermediates, and the intermediates are the same
bytes for every certificate a CA issued through them: with 100k certificates from one CA they
are about half of all PEM held (an intermediate's PEM is as long as a leaf's, or longer).
Bundles therefore hold the leaf and the rest apart, the rest shared through `shared_chain`.
Splitting is lossless: leaf + chain is the fullchain, byte for byte.
"""

from __future__ import annotations

_END = b"-----END CERTIFICATE-----"
# Distinct chains kept: a host serves a handful (a CA's current intermediates, a few private
# CAs); past this many (every certificate with a chain of its own) sharing gains nothing and
# the table starts again, so it never holds more than this.
MAX_SHARED = 4096

_shared: dict[bytes, bytes] = {}


def split_fullchain(fullchain: bytes) -> tuple[bytes, bytes]:
    """(leaf, chain): the bytes up to the end of the first certificate and its line break,
    and everything after (b"" for a leaf alone)."""
    end = fullchain.find(_END)
    if end < 0:
        return fullchain, b""
    cut = end + len(_END)
    if fullchain.startswith(b"\r\n", cut):
        cut += 2
    elif fullchain.startswith(b"\n", cut):
        cut += 1
    if cut >= len(fullchain):
        return fullchain, b""
    return fullchain[:cut], shared_chain(fullchain[cut:])


def shared_chain(chain: bytes) -> bytes:
    """The one object held for these chain bytes (`chain` itself the first time). Safe from
    any thread: dict operations are atomic under the interpreter's lock."""
    if not chain:
        return b""
    found = _shared.get(chain)
    if found is not None:
        return found
    if len(_shared) >= MAX_SHARED:
        _shared.clear()
    return _shared.setdefault(chain, chain)
