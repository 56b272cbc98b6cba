"""Shared fixtures: real vLLM engines on the CPU, one alive at a time in each pytest worker.

Engines run their core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so tests can
read the scheduler's block pool and the plugin's counters. Building an engine takes ~10-20 s
on the CPU, so each configuration is kept until a test asks for another one; a worker's
tests are grouped by configuration, across the modules of its lane (``LANES``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# pytest runs on two workers (pytest-xdist, ``-n 2`` in pyproject.toml): one CPU core each.
# vLLM binds a server's model worker to core 0 by default (it keeps the other core for the
# rest), so without this both workers' servers would compute on core 0; an engine in the
# test process computes on one thread, not on both cores at once.
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
if _XDIST_WORKER and int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    _core = int(_XDIST_WORKER.removeprefix("gw")) % (os.cpu_count() or 1)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(_core))
    os.environ.setdefault("OMP_NUM_THREADS", "1")

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# vLLM's CPU sampler compiles its random-sampling kernel with torch.compile (inductor) in
# every process at start-up, ~10 s on 2 cores (a C++ build check of each vector ISA, then
# the compile), for each server, engine-core worker and Ray worker the suite starts. The
# same kernel in eager mode samples the same way (softmax, exponential noise, argmax); the
# plugin compiles nothing itself.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
# The manager and the worker run in this process: check after every engine test that
# they held the same rows of pages (vllm_sink.invariants).
os.environ.setdefault("VLLMSINK_CHECK_ROWS", "1")
sys.path.insert(0, str(Path(__file__).parent))

from engine_helpers import ENGINES, EngineCache, Memo  # noqa: E402


@pytest.fixture(scope="session")
def engines():
    cache = EngineCache()
    yield cache
    cache.close()


@pytest.fixture(scope="session")
def hamlet_ids():
    """Token ids of Hamlet (real text, ~45K tokens)."""
    from transformers import AutoTokenizer

    from vllm_sink import assets

    tok = AutoTokenizer.from_pretrained(assets.model_dir())
    return tok(assets.play_text("hamlet"))["input_ids"]


@pytest.fixture(scope="session")
def reference():
    """The plain-PyTorch reference (tests/reference.py). Its logprobs for the same tokens,
    steps and contract are computed once per worker, and a run whose first passes are a
    recent run's takes them from it (the same computation gives the same bits): several
    tests stream the same text with the same steps (Hamlet's first tokens, 64-token chunks)."""
    from reference import ReferenceLlama

    from vllm_sink import assets

    class Memoised(ReferenceLlama):
        keep_runs = 8  # and a run that starts as a recent one did starts after it (~100 MB a run)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.memo = {}

        def stream_logprobs(self, tokens, steps, **contract):
            key = (tuple(tokens), tuple(tuple(s) for s in steps), tuple(sorted(contract.items())))
            if key not in self.memo:
                self.memo[key] = super().stream_logprobs(tokens, steps, **contract)
            return self.memo[key].clone()

    return Memoised(assets.model_dir())


ENGINE_ORDER = list(ENGINES)

# The modules of real engines and servers, in two lanes: with pytest-xdist each lane is one
# worker's (a lane goes out whole, its tests grouped by engine configuration across its
# modules, so each engine is built once per lane and a Memo's results stay with their
# engines). Lane "a": the server tests first (they share a server), then the modules on the
# unshrunk and 512-position sink engines. Lane "b": the other engine modules. The lanes take
# about the same time (from a whole run's --durations on 2 cores: about 23 minutes each);
# every other module goes out on its own, to whichever worker is free first.
LANES = {
    "a": ["tests/server/", "tests/test_engine_positions.py", "tests/test_engine_ray.py"],
    "b": ["tests/test_engine_batching.py", "tests/test_engine_bounded_state.py", "tests/test_engine_idle_sessions.py",
          "tests/test_engine_memory.py", "tests/test_engine_multiprocess.py", "tests/test_engine_own_sink.py",
          "tests/test_engine_reference.py", "tests/test_engine_rows.py", "tests/test_engine_sampling.py",
          "tests/test_engine_sessions.py", "tests/test_engine_streaming_input.py", "tests/test_engine_vanilla.py"],
}


def lane_of(path: str) -> str | None:
    return next((lane for lane, paths in LANES.items() if any(path.startswith(p) for p in paths)), None)


def pytest_collection_modifyitems(config, items):
    """Lane "a", lane "b", then the other modules; in a lane the tests without an engine
    first (the server tests), then the engine tests grouped by engine configuration, so each
    engine is built once."""
    lanes = list(LANES)

    def key(item):
        lane = lane_of(item.nodeid.split("::", 1)[0])
        marker = item.get_closest_marker("engine")
        return (lanes.index(lane) if lane else len(lanes), ENGINE_ORDER.index(marker.args[0]) + 1 if marker else 0)

    items.sort(key=key)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """With pytest-xdist (``-n 2`` in pyproject.toml), a worker takes a whole lane at a time
    (see ``LANES``), or a whole module outside the lanes; they go out in the order above."""
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            lane = lane_of(path)
            return f"lane {lane}" if lane else path

    config.option.loadscopereorder = False  # (xdist would put the scopes of most tests first)
    return Lanes(config, log)


@pytest.fixture(scope="module", autouse=True)
def no_kept_streams_of_other_modules(engines):
    """A module's engine tests start with no kept stream (session) and no cached page that
    another module's tests left on the engine they share: none of their prompts resumes or
    finds one, as on a fresh engine."""
    engines.fresh()


@pytest.fixture(autouse=True)
def rows_agree(request):
    """After each engine test: wherever the manager and the worker recorded a request's row
    at the same token count, the rows agree."""
    yield
    if request.node.get_closest_marker("engine") is None:
        return
    from vllm_sink.invariants import ROW_LOG

    compared, bad = ROW_LOG.mismatches()
    ROW_LOG.clear()
    assert not bad, f"{len(bad)} of {compared} rows differ: {bad[:3]}"


@pytest.fixture
def llm(request, engines):
    """The engine named by the test's ``@pytest.mark.engine(name)``."""
    return engines.get(request.node.get_closest_marker("engine").args[0])


@pytest.fixture(scope="session")
def memo(engines):
    return Memo(engines)


