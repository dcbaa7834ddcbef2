"""The C heap: which malloc edged runs on, and giving freed pages back to the kernel.

**jemalloc** (`[edged] allocator`: "system" by default, "auto" or "jemalloc" to use it).
OpenSSL allocates and frees a few hundred blocks per handshake; with jemalloc they reuse the
same few cache lines: per ECDSA handshake -1.4 % instructions, -16 % level-1 data misses. But
with its own 10 s page decay freed pages stay in RSS (tests/test_tls_hostile.py's slowloris
bound fails), and with immediate purging (JEMALLOC_CONF) full ECDSA handshakes per CPU-second
measured 0.92-0.93 of glibc's malloc (BENCHMARKS.md, "jemalloc"): hence not the default. A
malloc cannot be swapped in a running process, so `edged run` re-executes itself once, after
reading the config, with LD_PRELOAD naming the library (same pid, same arguments and
inherited sockets), and children it later starts get the environment it was started with.

**Giving pages back.** CPython keeps bytes objects in malloc's heap, and glibc keeps memory
freed there in the process: after a reload of a 100k-certificate store the previous state,
freed, still counted in the main process's RSS (439 MB after start, 942 MB after one reload,
1,065 MB after two). malloc_trim(0) returns the free pages (MADV_DONTNEED), whatever lies
between them; under jemalloc, purging every arena does the same.

**Keeping the long-lived state out of the cyclic GC.** With 100k certificates the state
(sites, bundles, routes) is ~1.5 million objects that the garbage collector's full passes
traverse every time: 40-255 ms each with the event loop stopped, a dozen while a large store
was indexed and two to four per full reload (BENCHMARKS.md). None of it is ever cyclic garbage: a
replaced state is freed by reference counting. So once a state is installed, what is alive is
frozen (gc.freeze), and later passes traverse only what was made since.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import sys
import sysconfig
from collections.abc import Callable, Mapping
from dataclasses import dataclass

ALLOCATORS = ("auto", "jemalloc", "system")
JEMALLOC_SONAME = "libjemalloc.so.2"
# Set in the re-executed process's environment: the LD_PRELOAD it was started with ("" for
# none), so that one is restored for its children, and no second exec is tried.
REEXEC_MARK = "EDGED_ALLOCATOR_REEXEC"
# Set when the config said "system" after the start had preloaded jemalloc: the exec that
# drops it must not preload it again.
SYSTEM_MARK = "EDGED_ALLOCATOR_SYSTEM"
# Set when edged gave jemalloc its MALLOC_CONF (none was set): removed again for children.
CONF_MARK = "EDGED_ALLOCATOR_CONF"
# jemalloc's options unless the environment sets MALLOC_CONF. Freed pages go back to the kernel
# at once instead of over ~10 s (dirty_decay_ms; muzzy_decay_ms: not left as MADV_FREE pages,
# which RSS still counts): RSS then follows what is in use, as operators read it. With the
# default, 1,500 slow handshakes closed and opened again left RSS ~10 MiB higher each time
# (tests/test_tls_hostile.py's slowloris, which glibc's malloc passes); with a 1 s decay it
# depended on when RSS was read. Under a steady handshake load the purges are rare:
# `strace -c` counted 25 madvise calls in 7 s (~6,000 handshakes), 0.1 ms in all.
JEMALLOC_CONF = "dirty_decay_ms:0,muzzy_decay_ms:0"


class AllocatorError(Exception):
    """`allocator = "jemalloc"` and it cannot be had."""


def jemalloc_candidates() -> list[str]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [f"/usr/lib/{multiarch}"] if multiarch else []
    return [f"{d}/{JEMALLOC_SONAME}" for d in (*dirs, "/usr/lib64", "/usr/lib")]


def find_jemalloc(candidates: list[str] | None = None) -> str | None:
    for path in jemalloc_candidates() if candidates is None else candidates:
        if os.path.isfile(path):
            return path
    return None


def running_allocator(maps: str | None = None) -> str:
    """ "jemalloc" when libjemalloc is mapped into this process, else "system"."""
    if maps is None:
        try:
            with open("/proc/self/maps") as f:
                maps = f.read()
        except OSError:
            return "system"
    return "jemalloc" if "/libjemalloc.so" in maps else "system"


@functools.cache
def current_allocator() -> str:
    """running_allocator() of this process (it cannot change while it runs)."""
    return running_allocator()


@dataclass(frozen=True)
class Plan:
    """What `edged run` does about its allocator before anything else."""

    env: dict[str, str] | None  # re-execute with this environment; None: go on as we are
    note: str  # for the log: what runs, or why not what was asked for


def plan(wanted: str, running: str, library: str | None, environ: Mapping[str, str]) -> Plan:
    """Pure: decide from the config's `allocator`, the allocator in use, the library found
    (None: not installed) and the environment. AllocatorError when "jemalloc" is required
    and cannot be had."""
    if running == "jemalloc":
        if wanted == "system" and REEXEC_MARK in environ:  # edged preloaded it: drop it
            env = {**original_environment(environ), SYSTEM_MARK: "1"}
            return Plan(env, "memory allocator: the C library's malloc ([edged] allocator)")
        if wanted == "system":
            return Plan(None, "memory allocator: jemalloc (preloaded by the environment)")
        return Plan(None, "memory allocator: jemalloc")
    if wanted == "system":
        return Plan(None, "memory allocator: the C library's malloc ([edged] allocator)")
    if REEXEC_MARK in environ:  # preloading it did not work: the loader said why on stderr
        if wanted == "jemalloc":
            raise AllocatorError(
                f'[edged] allocator = "jemalloc": {library or JEMALLOC_SONAME} could not be '
                "preloaded (see the loader's message above); reinstall libjemalloc2 or set "
                'allocator = "system"'
            )
        return Plan(None, "memory allocator: the C library's malloc (preloading jemalloc failed)")
    if library is None:
        if wanted == "jemalloc":
            raise AllocatorError(
                f'[edged] allocator = "jemalloc" but {JEMALLOC_SONAME} is not installed: '
                'apt-get install libjemalloc2, or set allocator = "system"'
            )
        return Plan(
            None,
            "memory allocator: the C library's malloc (install libjemalloc2 for faster "
            "handshakes, see [edged] allocator)",
        )
    return Plan(_preloading(library, environ), f"memory allocator: jemalloc ({library})")


def original_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Pure: `environ` without what _preloading added (the inverse of it): the environment
    edged was started with."""
    env = {k: v for k, v in environ.items() if k not in (REEXEC_MARK, CONF_MARK, SYSTEM_MARK)}
    if CONF_MARK in environ:
        env.pop("MALLOC_CONF", None)
    if REEXEC_MARK in environ:
        previous = environ[REEXEC_MARK]
        if previous:
            env["LD_PRELOAD"] = previous
        else:
            env.pop("LD_PRELOAD", None)
    return env


def _preloading(library: str, environ: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if k != SYSTEM_MARK}
    previous = env.get("LD_PRELOAD", "")
    env[REEXEC_MARK] = previous
    env["LD_PRELOAD"] = f"{library}:{previous}" if previous else library
    if "MALLOC_CONF" not in env:
        env["MALLOC_CONF"] = JEMALLOC_CONF
        env[CONF_MARK] = "1"
    return env


def reexec(env: dict[str, str]) -> OSError:
    """Replace this process by itself (same interpreter, flags and arguments) under `env`;
    returns only when the exec failed (the caller goes on with the allocator it has)."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as exc:  # no usable sys.executable (an embedded interpreter)
        return exc
    raise AssertionError("unreachable: execve returned")  # pragma: no cover


def restore_environment() -> None:
    """In the re-executed process: give children the environment edged was started with."""
    original = original_environment(os.environ)
    for key in [k for k in os.environ if k not in original]:
        del os.environ[key]
    os.environ.update(original)


def _release() -> Callable[[], object] | None:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    mallctl = getattr(libc, "mallctl", None)
    if mallctl is not None:  # jemalloc: purge the unused dirty pages of all arenas
        mallctl.argtypes = [
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
        ]
        mallctl.restype = ctypes.c_int
        return lambda: mallctl(b"arena.4096.purge", None, None, None, 0)  # 4096: all arenas
    trim = getattr(libc, "malloc_trim", None)  # glibc
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


_RELEASE = _release()


def release_free_memory() -> bool:
    """Blocking (up to tens of milliseconds on a large heap): call it in a thread. False
    where the allocator offers no way to do it."""
    if _RELEASE is None:
        return False
    _RELEASE()
    return True


def freeze_long_lived() -> None:
    """Collect what is unreachable now, then move every object alive out of the cyclic
    garbage collector's reach (gc.freeze), and let the collector run (`edged run` starts with
    it off, see edged.cli). Call it on the event loop once a state is installed: the
    collection first traverses only what was made since the last freeze, so no garbage is
    frozen with the rest. An object frozen while alive and in a reference cycle would never be
    collected once unreachable: the data path frees its connections by reference counting for
    that reason (tests/test_data_path.py checks it), and a replaced state is acyclic
    (tests/test_reload.py)."""
    gc.collect()
    gc.freeze()
    gc.enable()
