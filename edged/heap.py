"""Give the C heap's free pages back to the kernel after a large load.

CPython keeps bytes objects over 512 bytes — every PEM file — in malloc's heap, and glibc keeps
memory freed there in the process: after a reload of a 100k-certificate store the previous
state, freed, still counted in the main process's RSS (439 MB after start, 942 MB after one
reload, 1,065 MB after two). malloc_trim(0) returns the free pages (MADV_DONTNEED), whatever
lies between them.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own C library: glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    fn: Callable[[int], int] = trim
    return fn


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Blocking (up to tens of milliseconds on a large heap): call it in a thread. False
    where the C library has no malloc_trim."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
