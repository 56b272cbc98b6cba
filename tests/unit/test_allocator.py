"""vllm_sink.allocator: the arena limit a sink engine exports for its processes."""

from vllm_sink import allocator


def test_exports_two_arenas_when_unset():
    env = {}
    assert allocator.arena_setting(env) == ("2", True)
    assert env == {"MALLOC_ARENA_MAX": "2"}


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
        assert allocator.limit_arenas({}) == ("2", True)
        assert allocator.limit_arenas({"MALLOC_ARENA_MAX": "4"}) == ("4", False)
    finally:
        allocator._mallopt_arenas = orig
    assert calls == [2]


def test_mallopt_reaches_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        assert allocator._mallopt_arenas(2) is False
    else:
        # mallopt returns 1 on success; this process keeps the limit it already had room for.
        assert allocator._mallopt_arenas(2) is True
