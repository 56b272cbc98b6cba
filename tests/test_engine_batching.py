"""Continuous batching: eight requests of different lengths, most of them
evicting, run concurrently and give the same greedy tokens as each run alone."""

import pytest
from vllm import SamplingParams

from vllm_sink.metrics import SINK_STATS

PROMPT_LENS = [40, 150, 300, 400, 520, 640, 760, 900]
MAX_TOKENS = [24, 8, 40, 16, 32, 12, 20, 28]


@pytest.mark.engine("sink16")
@pytest.mark.parametrize("small_batch, steady", [(8, False), (0, True)],
                         ids=["python-quiet-steps", "numpy-and-steady-steps"])
def test_batched_equals_alone(llm, hamlet_ids, monkeypatch, small_batch, steady):
    """Also checks the worker's three ways of carrying out a quiet step: a batch of at most
    ``SMALL_BATCH`` rows in Python numbers (first case); any batch with numpy, which in the
    second case carries out the quiet rows of every step in which some row moves (the eight
    streams move at different steps), and a batch unchanged since the last planned step by
    ``SteadyBatch`` (second case, and every other engine test): the same tokens."""
    from vllm_sink.patches.worker import steady as fast_paths

    monkeypatch.setattr(fast_paths, "SMALL_BATCH", small_batch)
    monkeypatch.setattr(fast_paths, "STEADY", steady)
    hook = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner._vllm_sink_hook
    steady0 = hook.fast.steady_steps
    prompts = [hamlet_ids[3000 * i : 3000 * i + n] for i, n in enumerate(PROMPT_LENS)]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS]
    evicted0 = SINK_STATS.pages_evicted
    batched = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert SINK_STATS.pages_evicted > evicted0
    for prompt, p, out in zip(prompts, params, batched):
        alone = llm.generate([{"prompt_token_ids": prompt}], p, use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == list(alone.outputs[0].token_ids), len(prompt)
        assert len(out.outputs[0].token_ids) == p.max_tokens
    # The steady path carried out steps (the batched run's and each alone run's decode steps)
    # only when it is on.
    steady_steps = hook.fast.steady_steps
    assert (steady_steps > steady0 + sum(MAX_TOKENS) // 2) if steady else steady_steps == steady0


@pytest.mark.parametrize("S", [
    pytest.param(16, marks=pytest.mark.engine("sink16")),
    # A partial sink page (20 = 16 + 4 tokens) and 512 rotary positions: each move of the
    # window makes the page holding its start a stream's new sink page, and epochs start.
    pytest.param(20, marks=pytest.mark.engine("sink20_p512")),
])
def test_streams_moving_their_window_in_the_same_step(llm, hamlet_ids, S):
    """Three streams move their windows in the same steps (64-token chunks), so their sink
    re-anchorings are done together, one batched rewrite per layer: two copies of one
    stream, and another text started one step later, whose window start (and so its sink
    angle) is 64 tokens behind theirs at every step. Each scores the same as alone."""
    first, other = hamlet_ids[:900], hamlet_ids[5000:5900]
    params = SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=0, ignore_eos=True)
    engine = llm.llm_engine
    rot0 = SINK_STATS.sink_rotations
    engine.add_request("same-0", {"prompt_token_ids": first}, params)
    engine.add_request("same-1", {"prompt_token_ids": first}, params)
    done = {o.request_id: o for o in engine.step() if o.finished}
    engine.add_request("later", {"prompt_token_ids": other}, params)
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    # One re-anchoring per stream per step that moves its window.
    assert SINK_STATS.sink_rotations - rot0 >= 3 * ((900 - S - 256 - 64) // 64)
    alone = {name: llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0]
             for name, p in (("first", first), ("other", other))}

    def lps(o):
        return [next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]]

    for rid, ref in (("same-0", "first"), ("same-1", "first"), ("later", "other")):
        out, ref = done[rid], alone[ref]
        assert list(out.outputs[0].token_ids) == list(ref.outputs[0].token_ids), rid
        assert max(abs(a - b) for a, b in zip(lps(out), lps(ref))) < 1e-3, rid
