"""Shared fixtures: real vLLM engines on the CPU, one alive at a time.

Engines run their core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so tests can
read the scheduler's block pool and the plugin's counters. Building an engine takes ~20 s
on the CPU, so each configuration is built once per session and kept until a test asks for
another one; test modules are grouped by configuration.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

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


