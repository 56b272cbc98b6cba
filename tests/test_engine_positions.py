"""A request runs far past the model's rotary positions.

With ``hf_overrides={"max_position_embeddings": 512}`` a 5,200-token prompt plus 64
generated tokens (over 10x the model's positions) is served. Its perplexity on real text
equals (to rounding) the sink-policy perplexity of the unshrunk model, since the contract's
positions never exceed S + W + C: epochs are invisible. Window-only (sink_pages=0) on the
same text is clearly worse.
"""

import math

import pytest

from engine_helpers import run_scored
from vllm_sink.metrics import SINK_STATS

N_PROMPT, N_GEN = 5200, 64


def _score(llm, ids):
    prompt_lp, gen, gen_lp, out = run_scored(llm, ids, N_GEN)
    assert out.outputs[0].finish_reason == "length" and len(gen) == N_GEN
    return prompt_lp


def _ppl(lps):
    return math.exp(-sum(lps) / len(lps))


def _run(memo, engine, ids):
    return memo.get(engine, "positions", lambda e: _score(e, ids))


@pytest.mark.engine("sink16")
def test_unshrunk_model_serves_the_stream(memo, hamlet_ids):
    assert len(_run(memo, "sink16", hamlet_ids[:N_PROMPT])) == N_PROMPT - 1


@pytest.mark.engine("sink16_p512")
def test_shrunk_model_serves_10x_its_positions(memo, hamlet_ids):
    assert N_PROMPT + N_GEN >= 10 * 512
    epochs0 = SINK_STATS.epochs
    assert len(_run(memo, "sink16_p512", hamlet_ids[:N_PROMPT])) == N_PROMPT - 1
    assert SINK_STATS.epochs - epochs0 >= 10


@pytest.mark.engine("window16_p512")
def test_perplexity_past_positions_sink_vs_window(memo, hamlet_ids):
    ids = hamlet_ids[:N_PROMPT]
    window_only = _run(memo, "window16_p512", ids)
    shrunk = _run(memo, "sink16_p512", ids)
    unshrunk = _run(memo, "sink16", ids)
    p_shrunk, p_unshrunk, p_window = _ppl(shrunk), _ppl(unshrunk), _ppl(window_only)
    print(f"\nPPL over {N_PROMPT} tokens: sink (512 positions) {p_shrunk:.3f}, sink (8192 positions) "
          f"{p_unshrunk:.3f}, window only {p_window:.3f}")
    assert abs(p_shrunk - p_unshrunk) / p_unshrunk < 0.002
    assert max(abs(a - b) for a, b in zip(shrunk, unshrunk)) < 1e-3
    assert p_window > 1.3 * p_shrunk
