"""glibc's malloc arenas in the processes of a sink engine.

A stream that generates for days takes millions of decode steps. With glibc's defaults
(up to eight arenas per core, one taken by each thread that allocates), the engine core's
and the worker's native memory grows a little every step: 35.7 and 76.7 KiB per 1,000
decode steps on a 2-core machine, although no Python object grows. With two arenas the
engine core still grew (34 to 39 KiB per 1,000 steps), all of it in the second arena's heap
(``benchmarks/memory.py --heaps``; which of the engine core's threads share that arena is
decided by timing as they start). With one arena there is no other heap, and every run
measured stayed flat (docs/benchmarks.md).

glibc reads ``MALLOC_ARENA_MAX`` once, when a process starts. So a sink engine's front end
exports it before vLLM starts the engine core and its workers, which inherit it, and
applies the same limit to itself with ``mallopt`` (it counts for the arenas the process has
yet to make). A worker that does not inherit the front end's environment (Ray's) applies it
with ``mallopt`` when its model runner is built. A value the user set is left as it is:
``MALLOC_ARENA_MAX=0`` restores glibc's own choice.

Most small allocations do not take the one arena's lock: glibc serves them from a cache
per thread (its tcache), and Python's small objects come from Python's own allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from collections.abc import MutableMapping

ENV = "MALLOC_ARENA_MAX"
ARENAS = 1
_M_ARENA_MAX = -8  # glibc's <malloc.h>


def arena_setting(environ: MutableMapping[str, str], arenas: int = ARENAS) -> tuple[str, bool]:
    """The arena limit in force in ``environ``, exporting ``arenas`` there unless the user
    set one: ``(value, set_here)``."""
    if ENV in environ:
        return environ[ENV], False
    environ[ENV] = str(arenas)
    return environ[ENV], True


def _glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc (Linux), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _mallopt_arenas(value: int) -> bool:
    """``mallopt(M_ARENA_MAX, value)`` in this process; False where libc is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    try:
        return bool(libc.mallopt(_M_ARENA_MAX, int(value)))
    except (AttributeError, ValueError):
        return False


def limit_arenas(environ: MutableMapping[str, str] | None = None, arenas: int = ARENAS) -> tuple[str, bool]:
    """Export the arena limit for the processes this one starts and apply it here.

    Returns ``(value, set_here)``: the value in force and whether this call chose it (False
    when the user's environment already had one, which is then left alone, in the
    environment and in this process)."""
    global last
    environ = os.environ if environ is None else environ
    value, set_here = arena_setting(environ, arenas)
    if set_here:
        _mallopt_arenas(int(value))
    last = (value, set_here)
    return last


# This process's last ``limit_arenas`` result (None before any): a worker that inherited the
# front end's limit reads ``("1", False)``.
last: tuple[str, bool] | None = None


def heaps() -> int | None:
    """How many malloc arenas this process has (glibc's ``malloc_info``: one ``<heap>``
    each); None where libc is not glibc."""
    libc = _glibc()
    if libc is None:
        return None
    libc.open_memstream.restype = ctypes.c_void_p
    libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.free.argtypes = [ctypes.c_void_p]
    buf, size = ctypes.c_void_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    if not stream:
        return None
    try:
        libc.malloc_info(0, stream)
    finally:
        libc.fclose(stream)
    try:
        xml = ctypes.string_at(buf, size.value).decode()
    finally:
        libc.free(buf)
    return xml.count("<heap nr=")
