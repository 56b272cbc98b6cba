"""The worker's per-stream state is bounded by the geometry, not by the stream's length.
(Each request has a ``cache_salt`` of its own here, so that it resumes no stream another
test of this engine left kept, unless it means to.)

One stream of a 1,200-token prompt and 900 greedy tokens (8.2x the "sink16" window of 256)
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
  after 900 tokens (past twice 432) it has released the first ones;

and the engine core's ``Request`` for it: its token ids (``all_token_ids``,
``output_token_ids``) are ``TokenTail``s that count every token but hold only the sink and
fewer than twice a row (``2 x 432``) of the last ones, checked equal to the stream's.
"""

import numpy as np
import pytest
from vllm import SamplingParams

from engine_helpers import ENGINES
from vllm_sink.block_row import BlockRow
from vllm_sink.policy import cdiv
from vllm_sink.token_rows import held_token, output_keep
from vllm_sink.token_tail import TokenTail

ENGINE = "sink16"
PROMPT, GEN = 1200, 900


def _runner(llm):
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


def _run_checked(llm, rid, prompt, gen, salt):
    """Run one request step by step and check the runner's state for it after every step
    (see the module docstring). Returns (steps, entries checked, most output ids kept,
    generated ids, tokens the request found computed)."""
    runner = _runner(llm)
    hook = runner._vllm_sink_hook
    g = hook.geometry
    S = g.sink_tokens
    width = g.widest.row_capacity * g.block_size
    engine = llm.llm_engine
    engine.add_request(rid, {"prompt_token_ids": prompt, "cache_salt": salt},
                       SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True))
    generated: list[int] = []
    steps = checked = max_outputs = cached = core_released = core_skipped = 0
    manager = engine.engine_core.engine_core.scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    B = g.block_size
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                generated = list(out.outputs[0].token_ids)
                cached = out.num_cached_tokens or cached
            steps += 1
            ib = runner.input_batch
            assert ib.token_ids_cpu.shape[1] == width and ib.is_token_ids.shape[1] == width
            live = [r for r in ib.req_ids if r is not None]
            if not live:
                continue
            internal = live[0]
            row = ib.req_id_to_index[internal]
            slot = hook.streams.slot_of[internal]
            off = int(hook.streams.token_off[slot])
            count = int(ib.num_tokens_no_spec[row])
            stream = prompt + generated
            assert count + off == len(stream)  # the row's count, compacted
            if len(stream) > len(prompt):  # the prompt is computed: the whole stream is in the row
                assert count <= width
            assert int(ib.block_table.block_tables[0].num_blocks_per_row[row]) <= g.widest.row_capacity
            # Every token the row holds, up to where this step starts, is the stream's.
            computed = int(ib.num_computed_tokens_cpu[row]) + off
            c = np.arange(min(count, width))
            t = held_token(c, S, off)
            mask = t < min(computed, len(stream))
            assert (ib.token_ids_cpu[row, c[mask]] == np.asarray(stream)[t[mask]]).all(), steps
            checked += int(mask.sum())
            max_outputs = max(max_outputs, len(runner.requests[internal].output_token_ids))
            assert max_outputs <= 2 * output_keep(width, 0)
            # The engine core's request: counts all, holds the sink and the last tokens.
            request = engine.engine_core.engine_core.scheduler.requests.get(internal)
            if request is not None:
                every, outs = request._all_token_ids, request._output_token_ids
                assert isinstance(every, TokenTail) and isinstance(outs, TokenTail)
                assert len(every) == len(stream) and len(outs) == len(generated)
                assert every.head == stream[:len(every.head)] and every.tail == stream[every.tail_start:]
                assert outs.tail == generated[outs.tail_start:]
                assert len(every.tail) < 2 * width and len(outs.tail) < 2 * width
                core_released = max(core_released, every.released)
                # The KV manager's row: one logical entry per block, the pages of the sink
                # and the window only (the evicted blocks are a count).
                blocks = manager.req_to_blocks[internal]
                assert isinstance(blocks, BlockRow)
                assert cdiv(request.num_computed_tokens, B) <= len(blocks) <= cdiv(len(every), B) + 1
                assert len(blocks.head) + len(blocks.live) <= g.widest.max_live_pages
                assert blocks.held() == [b for b in blocks if not b.is_null]
                core_skipped = max(core_skipped, blocks.skipped)
    finally:
        if engine.has_unfinished_requests():
            engine.abort_request([rid])
            while engine.has_unfinished_requests():
                engine.step()
    if len(prompt) + gen > 3 * width:
        assert core_released > 0, "the engine core held every token"
        assert core_skipped * B > len(prompt) + gen - 2 * width, "the KV manager's row kept its evicted blocks"
    return steps, checked, max_outputs, generated, cached


@pytest.mark.engine(ENGINE)
def test_worker_state_bounded_over_a_long_stream(llm, hamlet_ids):
    g = _runner(llm)._vllm_sink_hook.geometry
    width = g.widest.row_capacity * g.block_size
    cap = ENGINES[ENGINE]["max_stream_len"]
    assert width < g.sink_tokens + g.kv_window + 320 and cap > 20 * width
    # A salt of its own: a fresh stream, never a resume of a kept one.
    steps, checked, max_outputs, generated, _ = _run_checked(
        llm, "bounded", list(hamlet_ids[:PROMPT]), GEN, salt="bounded-fresh")
    assert len(generated) == GEN
    assert max_outputs > output_keep(width, 0) and checked > GEN * g.sink_tokens
    print(f"\n{steps} steps; token row {width} tokens (stream cap {cap}); at most {max_outputs} "
          f"output ids kept of {GEN}; {checked} row entries checked")


@pytest.mark.engine(ENGINE)
def test_resumed_stream_row_holds_its_window(llm, hamlet_ids):
    """A request that resumes a kept stream far past the window starts with a row written
    from token 0: its first step fills the window before the resume point from the prompt,
    so the row again holds exactly the compacted sequence."""
    first = list(hamlet_ids[3000:4000])
    _, _, _, reply, _ = _run_checked(llm, "resume-a", first, 8, salt="resume-probe")
    # The kept stream's history, as the engine core held it: its sink, its last tokens and
    # the digest of the rest (the request resumes it by matching the digest, then the tail).
    sessions = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.coordinator \
        .single_type_managers[0].sessions
    (kept,) = [k for k in sessions.kept._kept.values() if len(k.tokens) == len(first) + 8]
    assert isinstance(kept.tokens, TokenTail) and kept.tokens.released > 0
    second = first + reply + list(hamlet_ids[5000:5100])
    steps, checked, _, generated, cached = _run_checked(llm, "resume-b", second, 8, salt="resume-probe")
    assert cached >= len(first)  # it resumed the kept stream
    assert len(generated) == 8 and checked > 8 * 256


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
        out = llm.generate([{"prompt_token_ids": prompt, "cache_salt": "penalties"}], params, use_tqdm=False)[0]
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
    stream that was not scheduled in the previous step gets its output ids back from the
    scheduler (all, or the last ones the engine core holds), and the runner replaces the ones
    it kept: the hook then counts as released those the scheduler did not send. Checked on this engine's hook with the runner flagged asynchronous for one
    call."""
    from types import SimpleNamespace

    runner = _runner(llm)
    hook = runner._vllm_sink_hook
    table = hook.streams
    slot = table.slot("async-probe")
    table.out_trimmed[slot] = 500
    def step(num_output_tokens):
        return SimpleNamespace(
            scheduled_cached_reqs=SimpleNamespace(req_ids=["async-probe"], all_token_ids={"async-probe": [1, 2, 3]},
                                                  num_output_tokens=[num_output_tokens], resumed_req_ids=set()),
            scheduled_new_reqs=[], finished_req_ids=set())

    out = step(3)
    try:
        runner.use_async_scheduling = True
        hook.before_update_states(out)
        assert table.out_trimmed[slot] == 0
        # The engine core held only the last 3 of 10 output ids (TokenTail): 7 released.
        hook.before_update_states(step(10))
        assert table.out_trimmed[slot] == 7
        table.out_trimmed[slot] = 500
        runner.use_async_scheduling = False
        hook.before_update_states(out)
        assert table.out_trimmed[slot] == 500  # synchronous: the runner keeps its own list
    finally:
        runner.use_async_scheduling = False
        table.drop("async-probe")
