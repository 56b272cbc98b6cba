"""vllm_sink.allocator: the arena limit a sink engine exports for its processes."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from vllm_sink import allocator


def test_exports_one_arena_when_unset():
    env = {}
    assert allocator.arena_setting(env) == ("1", True)
    assert env == {"MALLOC_ARENA_MAX": "1"}


def test_the_users_value_wins():
    for value in ("0", "8"):
        env = {"MALLOC_ARENA_MAX": value}
        assert allocator.arena_setting(env) == (value, False)
        assert env == {"MALLOC_ARENA_MAX": value}


def test_limit_arenas_applies_here_only_when_it_chose():
    calls = []
    orig = allocator._mallopt_arenas
    allocator._mallopt_arenas = lambda v: calls.append(v) or True
    try:
        assert allocator.limit_arenas({}) == ("1", True)
        assert allocator.limit_arenas({"MALLOC_ARENA_MAX": "4"}) == ("4", False)
    finally:
        allocator._mallopt_arenas = orig
    assert calls == [1]


def test_mallopt_reaches_glibc():
    if platform.libc_ver()[0] != "glibc":
        assert allocator._mallopt_arenas(1) is False
    else:
        # mallopt returns 1 on success; this process keeps the arenas it already has.
        assert allocator._mallopt_arenas(1) is True


# Four threads alive at once, each allocating from C: each takes an arena of its own, up
# to the limit.
THREADS = textwrap.dedent(
    """
    import threading
    from vllm_sink import allocator

    barrier = threading.Barrier(5)
    def work():
        held = [bytearray(4096) for _ in range(64)]
        barrier.wait()
        barrier.wait()
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    barrier.wait()
    print(allocator.heaps())
    barrier.wait()
    for t in threads:
        t.join()
    """
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's arenas")
@pytest.mark.parametrize("limit, heaps", [("1", 1), ("8", 5)])
def test_heaps_counts_the_arenas_the_limit_allows(limit, heaps):
    env = dict(os.environ, MALLOC_ARENA_MAX=limit)
    out = subprocess.run([sys.executable, "-c", THREADS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == heaps  # (the main thread's arena and one per thread)
