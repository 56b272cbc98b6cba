"""A stream many times longer than the window holds a bounded number of pages,
and every page goes back to the pool when requests finish or are aborted.

Pages are counted straight from vLLM's own KV-cache manager (non-null entries of
``req_to_blocks``), not from the plugin's counters, at every engine step.
"""

import pytest
from vllm import SamplingParams

from engine_helpers import free_or_kept, scheduler_of
from vllm_sink.metrics import SINK_STATS
from vllm_sink.policy import page_bound

B, S_PAGES, W, CHUNK = 16, 1, 256, 64  # the "sink16" engine


def _held_pages(llm):
    manager = scheduler_of(llm).kv_cache_manager.coordinator.single_type_managers[0]
    return {rid: sum(not b.is_null for b in blocks) for rid, blocks in manager.req_to_blocks.items()}


def _free(llm):
    return free_or_kept(llm)


@pytest.mark.engine("sink16")
def test_page_count_bounded_over_long_stream(llm, hamlet_ids):
    engine = llm.llm_engine
    free0 = _free(llm)
    prompt = hamlet_ids[:3000]  # ~12x the window
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    engine.add_request("long", {"prompt_token_ids": prompt}, params)
    bound = page_bound(S_PAGES, W, B, CHUNK)
    peak, steps, finished = 0, 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished = out
        for held in _held_pages(llm).values():
            peak = max(peak, held)
            assert held <= bound, f"{held} pages held, bound {bound}"
        steps += 1
    assert finished is not None and len(finished.outputs[0].token_ids) == 100
    # The count is real: a stream 12x the window fills the bound (less one page of slack).
    assert peak >= bound - 2, (peak, bound)
    assert _free(llm) == free0
    print(f"\npage bound {bound}; peak pages held {peak}; {steps} steps; free pages {free0} -> {_free(llm)}")


@pytest.mark.engine("sink16")
def test_aborted_requests_return_their_pages(llm, hamlet_ids):
    engine = llm.llm_engine
    free0 = _free(llm)
    evicted0 = SINK_STATS.pages_evicted
    params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
    for i, n in enumerate([100, 700, 1500]):
        engine.add_request(f"abort-{i}", {"prompt_token_ids": hamlet_ids[2000 * i : 2000 * i + n]}, params)
    for _ in range(40):  # long enough for the longer prompts to evict pages
        engine.step()
    assert SINK_STATS.pages_evicted > evicted0
    assert _free(llm) < free0
    engine.abort_request(["abort-0", "abort-1", "abort-2"])
    while engine.has_unfinished_requests():
        engine.step()
    assert _held_pages(llm) == {}
    assert _free(llm) == free0
