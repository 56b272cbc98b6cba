"""The scheduler's manager and the worker hold the same row of pages.

Both apply ``vllm_sink.policy.row_transition`` to their own copy of each sequence's row (the
manager frees the pages that leave, the worker compacts its block-table row). With
``VLLMSINK_CHECK_ROWS=1`` (set by tests/conftest.py) each side records its row, by request
and by the token count its window start came from, and the ``rows_agree`` fixture compares
them after every engine test. This test makes sure the comparison has something to compare:
streams that evict, with whole and partial sink pages, across epochs, batched, one of them
aborted mid-stream.
"""

import pytest
from vllm import SamplingParams

from vllm_sink.invariants import ROW_LOG
from vllm_sink.metrics import SINK_STATS


@pytest.mark.parametrize("S", [
    pytest.param(16, marks=pytest.mark.engine("sink16")),
    # Partial sink page (20 = 16 + 4 tokens), 512 rotary positions: epochs start.
    pytest.param(20, marks=pytest.mark.engine("sink20_p512")),
])
def test_manager_and_worker_rows_agree(llm, hamlet_ids, S):
    engine = llm.llm_engine
    epochs0, evicted0 = SINK_STATS.epochs, SINK_STATS.pages_evicted
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    engine.add_request("rows-long", {"prompt_token_ids": hamlet_ids[:1400]}, params)
    engine.add_request("rows-other", {"prompt_token_ids": hamlet_ids[3000:3700]}, params)
    engine.add_request("rows-aborted", {"prompt_token_ids": hamlet_ids[6000:7000]}, params)
    for _ in range(14):
        engine.step()
    engine.abort_request(["rows-aborted"])
    while engine.has_unfinished_requests():
        engine.step()
    assert SINK_STATS.pages_evicted - evicted0 > 100
    if S == 20:
        assert SINK_STATS.epochs - epochs0 >= 3
    compared, bad = ROW_LOG.mismatches()
    assert not bad, bad[:3]
    # Rows of all three requests compared, at many token counts.
    assert len(ROW_LOG.worker) >= 3 and compared >= 60, (compared, list(ROW_LOG.worker))
