"""The worker's per-stream state is bounded by the geometry, not by the stream's length.

One stream of a 1,200-token prompt and 1,000 greedy tokens (8.6x the "sink16" window of 256)
runs step by step on the real engine; after every step the test reads the model runner's
own state for it:

* its token row (``InputBatch.token_ids_cpu``) has the compacted block-table row's length in
  tokens, ``row_capacity * B`` (432 here), fixed at start-up, instead of the stream cap
  (16,384 here; by default there is none), and holds exactly the compacted sequence
  ``tokens[0:S] ++ tokens[w0:]`` (checked token by token against the prompt and the tokens
  the engine returned);
* its token count stays within the row once the prompt is computed;
* its block-table row holds at most ``row_capacity`` pages;
* the output ids the runner keeps for its sampler stay under ``2 x output_keep`` (864):
  after 1,000 tokens it has released the first ones.
"""

import numpy as np
import pytest
from vllm import SamplingParams

from engine_helpers import ENGINES
from vllm_sink.token_rows import held_token, output_keep

ENGINE = "sink16"
PROMPT, GEN = 1200, 1000


def _runner(llm):
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


@pytest.mark.engine(ENGINE)
def test_worker_state_bounded_over_a_long_stream(llm, hamlet_ids):
    runner = _runner(llm)
    hook = runner._vllm_sink_hook
    g = hook.geometry
    S, B, W = g.sink_tokens, g.block_size, g.kv_window
    width = g.widest.row_capacity * B
    cap = ENGINES[ENGINE]["max_stream_len"]
    assert width < S + W + 320 and cap > 20 * width
    engine = llm.llm_engine
    prompt = list(hamlet_ids[:PROMPT])
    engine.add_request("bounded", {"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=GEN, temperature=0, ignore_eos=True))
    generated: list[int] = []
    steps = checked = 0
    max_outputs = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            generated = list(out.outputs[0].token_ids)
        steps += 1
        ib = runner.input_batch
        assert ib.token_ids_cpu.shape[1] == width and ib.is_token_ids.shape[1] == width
        rid = next((r for r in ib.req_ids if r is not None), None)
        if rid is None:
            continue
        row = ib.req_id_to_index[rid]
        slot = hook.streams.slot_of[rid]
        off = int(hook.streams.token_off[slot])
        count = int(ib.num_tokens_no_spec[row])
        stream = prompt + generated
        assert count + off == len(stream)  # the row's count, compacted
        if len(stream) > PROMPT:  # the prompt is computed: the whole stream is in the row
            assert count <= width
        assert int(ib.block_table.block_tables[0].num_blocks_per_row[row]) <= g.widest.row_capacity
        # Every token the row holds, up to what has been computed, is the stream's.
        computed = int(ib.num_computed_tokens_cpu[row]) + off
        c = np.arange(min(count, width))
        t = held_token(c, S, off)
        mask = t < min(computed, len(stream))
        assert (ib.token_ids_cpu[row, c[mask]] == np.asarray(stream)[t[mask]]).all(), steps
        checked += int(mask.sum())
        outputs = len(runner.requests[rid].output_token_ids)
        max_outputs = max(max_outputs, outputs)
        assert outputs <= 2 * output_keep(width, 0)
    assert len(generated) == GEN
    assert max_outputs > output_keep(width, 0) and checked > GEN * S
    print(f"\n{steps} steps; token row {width} tokens (stream cap {cap}); at most {max_outputs} "
          f"output ids kept of {GEN}; {checked} row entries checked")


@pytest.mark.engine(ENGINE)
def test_penalties_read_the_held_prompt(llm, hamlet_ids):
    """Repetition penalties read a stream's prompt from its token row: a prompt 2.8x longer
    than the row is served with penalties (vLLM's own tensor of every row's prompt would be
    the prompt's length), and the sampler gets a tensor no wider than the row whose entries
    are the sink's and the window's prompt tokens, the rest padding."""
    runner = _runner(llm)
    hook = runner._vllm_sink_hook
    S = hook.geometry.sink_tokens
    width = runner.input_batch.token_ids_cpu.shape[1]
    prompt = list(hamlet_ids[:1200])
    seen = []
    orig = runner.input_batch._make_prompt_token_ids_cpu_tensor

    def spy():
        out = orig()
        ib = runner.input_batch
        slot = hook.streams.slot_of.get(ib.req_ids[0])
        off = int(hook.streams.token_off[slot]) if slot is not None else 0
        seen.append((out.clone(), off))
        return out

    runner.input_batch._make_prompt_token_ids_cpu_tensor = spy
    try:
        params = SamplingParams(max_tokens=20, temperature=0, repetition_penalty=1.3, frequency_penalty=0.5,
                                ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    finally:
        runner.input_batch._make_prompt_token_ids_cpu_tensor = orig  # the hook's wrap again
    assert len(out.outputs[0].token_ids) == 20
    assert seen, "the sampler never asked for the prompt ids"
    vocab = runner.input_batch.vocab_size
    for tensor, off in seen:
        assert tensor.shape[1] <= width
        row = tensor[0].tolist()
        held = [t for c, t in enumerate(row) if t != vocab]
        expect = [prompt[c if c < S else c + off] for c in range(len(row)) if (c if c < S else c + off) < len(prompt)]
        assert held == expect


@pytest.mark.engine(ENGINE)
def test_async_scheduling_hands_back_whole_outputs(llm):
    """With asynchronous scheduling (the GPU's default; vLLM's CPU platform turns it off), a
    stream that was not scheduled in the previous step gets its output ids back whole from
    the scheduler, and the runner replaces the ones it kept: the hook then counts none as
    released. Checked on this engine's hook with the runner flagged asynchronous for one
    call."""
    from types import SimpleNamespace

    runner = _runner(llm)
    hook = runner._vllm_sink_hook
    table = hook.streams
    slot = table.slot("async-probe")
    table.out_trimmed[slot] = 500
    out = SimpleNamespace(
        scheduled_cached_reqs=SimpleNamespace(all_token_ids={"async-probe": [1, 2, 3]}, resumed_req_ids=set()),
        scheduled_new_reqs=[], finished_req_ids=set())
    try:
        runner.use_async_scheduling = True
        hook.before_update_states(out)
        assert table.out_trimmed[slot] == 0
        table.out_trimmed[slot] = 500
        runner.use_async_scheduling = False
        hook.before_update_states(out)
        assert table.out_trimmed[slot] == 500  # synchronous: the runner keeps its own list
    finally:
        runner.use_async_scheduling = False
        table.drop("async-probe")
