"""Shared fixtures: real vLLM engines on the CPU, one alive at a time in each pytest worker.

Engines run their core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so tests can
read the scheduler's block pool and the plugin's counters. Building an engine takes ~20 s
on the CPU, so each configuration is kept until a test asks for another one; a worker's
tests are grouped by configuration.
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
    from reference import ReferenceLlama

    from vllm_sink import assets

    return ReferenceLlama(assets.model_dir())


ENGINE_ORDER = list(ENGINES)


def pytest_collection_modifyitems(config, items):
    """Run unit tests first, then engine tests grouped by engine configuration, so each
    engine is built once."""

    def key(item):
        marker = item.get_closest_marker("engine")
        return ENGINE_ORDER.index(marker.args[0]) + 1 if marker else 0

    items.sort(key=key)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """With pytest-xdist (``-n 2`` in pyproject.toml), a worker takes a whole test module at a
    time (its engines are built once), and one worker takes all the server tests (they share
    a server); modules go out in the order above, the server tests first."""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndServerTests(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tests/server" if path.startswith("tests/server/") else path

    config.option.loadscopereorder = False  # (xdist would put the modules of most tests first)
    return ModulesAndServerTests(config, log)


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


