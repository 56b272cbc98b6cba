"""Kept sessions: a chat's next turn resumes its stream exactly (vllm_sink.sessions).

Each turn re-sends the whole conversation, as a chat client does. With ``kv_sessions`` the
engine keeps each finished stream's pages and state; the next turn's prompt extends that
stream's history, so only the new tokens are prefilled, from the kept state. The generated
tokens' logprobs of every turn must equal the plain-PyTorch reference run over the
concatenated conversation with the same step boundaries, at the float32 tolerance of the
other reference tests.
"""

import pytest
import torch
from vllm import SamplingParams

from tolerances import F32_MAX_ABS, F32_MAX_MEAN

from vllm_sink.metrics import SINK_STATS

B, W, C, GEN = 16, 256, 64, 24


def _steps(prompt_len: int, n_gen: int, start: int = 0) -> list[tuple[int, int]]:
    """One request's steps: prompt chunks of C tokens from ``start``, then one token a step."""
    return [(x, min(x + C, prompt_len)) for x in range(start, prompt_len, C)] + [
        (t, t + 1) for t in range(prompt_len, prompt_len + n_gen - 1)]


def _chat(llm, turns, own_sink=None):
    """Run the turns (with a sink of their own if ``own_sink``); return (conversation
    tokens, plugin logprob by query index, steps, resume tokens)."""
    extra = None if own_sink is None else {"sink_tokens": own_sink}
    params = SamplingParams(max_tokens=GEN, temperature=0, logprobs=0, ignore_eos=True, extra_args=extra)
    history, plugin, steps, resumes = [], {}, [], []
    for user in turns:
        prompt = history + list(user)
        reused0, resumes0 = SINK_STATS.tokens_reused, SINK_STATS.resumes
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        a = SINK_STATS.tokens_reused - reused0
        resumes.append((SINK_STATS.resumes - resumes0, a))
        gen = list(out.outputs[0].token_ids)
        steps += _steps(len(prompt), len(gen), a)
        for i, (tok, lp) in enumerate(zip(gen, out.outputs[0].logprobs)):
            plugin[len(prompt) - 1 + i] = lp[tok].logprob
        history = prompt + gen
    return history, plugin, steps, resumes


@pytest.mark.parametrize("S,own", [
    pytest.param(16, False, marks=pytest.mark.engine("sink16")),
    # A partial sink page and 512 rotary positions: epochs start inside turns.
    pytest.param(20, False, marks=pytest.mark.engine("sink20_p512")),
    # The conversation's own sink (two pages and a partial one, as a system prompt's would
    # be) on an engine whose sink is one page: epochs inside turns too.
    pytest.param(36, True, marks=pytest.mark.engine("sink16_own40_p512"), id="own36"),
])
def test_turns_resume_and_match_the_reference(llm, reference, hamlet_ids, S, own):
    epochs0 = SINK_STATS.epochs
    turns = [hamlet_ids[0:700], hamlet_ids[700:900], hamlet_ids[900:1010], hamlet_ids[1010:1013]]
    history, plugin, steps, resumes = _chat(llm, turns, own_sink=S if own else None)
    # Every turn after the first resumed where the last one stopped computing (its last
    # sampled token was never fed).
    assert resumes[0] == (0, 0)
    end = len(turns[0]) + GEN
    for turn, (n, a) in enumerate(resumes[1:], 1):
        assert (n, a) == (1, end - 1), (turn, n, a, end)
        end += len(turns[turn]) + GEN
    if S != 16:
        assert SINK_STATS.epochs - epochs0 >= 3
    ref = reference.stream_logprobs(history, steps, sink_tokens=S, window=W, block_size=B)
    idx = sorted(plugin)
    diff = (torch.tensor([plugin[i] for i in idx], dtype=torch.float64) - ref[idx]).abs()
    print(f"\nsessions S={S}: {len(idx)} generated tokens over {len(turns)} turns, resumes {resumes}, "
          f"max {diff.max().item():.3g}, mean {diff.mean().item():.3g}")
    assert diff.max().item() <= F32_MAX_ABS and diff.mean().item() <= F32_MAX_MEAN
    # The comparison can fail: dense attention over the same conversation is far away.
    dense = reference.stream_logprobs(history, steps, sink_tokens=0, window=None, block_size=B)
    assert (torch.tensor([plugin[i] for i in idx], dtype=torch.float64) - dense[idx]).abs().mean() > 100 * F32_MAX_MEAN


@pytest.mark.engine("sink16_sessions_pool50")
def test_kept_streams_give_way_under_pool_pressure(llm, reference, hamlet_ids):
    """A pool of 50 pages: two kept conversations (about 17 pages each) leave too little for
    a third stream's 22-page footprint, so the least recently used is released, not a
    running stream preempted; the still-kept conversation resumes, the released one's next
    turn is a full prefill, and every generated token matches the reference."""
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    preempted = []
    orig = sched._preempt_request
    sched._preempt_request = lambda request, *a, **k: (preempted.append(request.request_id), orig(request, *a, **k))[1]
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=0, ignore_eos=True)
    released0, resumes0 = SINK_STATS.kept_released_for_pressure, SINK_STATS.resumes

    def turn(prompts):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].logprobs for o in outs]

    first = [hamlet_ids[0:400], hamlet_ids[2000:2400]]
    (gen_a,), _ = turn([first[0]])
    (gen_b,), _ = turn([first[1]])
    assert SINK_STATS.kept_streams == 2 and SINK_STATS.kept_released_for_pressure == released0
    (gen_c,), _ = turn([hamlet_ids[4000:4400]])  # A, the least recently used, gives way
    assert SINK_STATS.kept_released_for_pressure - released0 == 1
    # In one batch: B resumes; A (released) is prefilled from token 0.
    history = {"a": first[0] + gen_a, "b": first[1] + gen_b}
    prompts = [history["b"] + hamlet_ids[2400:2500], history["a"] + hamlet_ids[400:500]]
    gens, lps = turn(prompts)
    assert SINK_STATS.resumes - resumes0 == 1
    assert not preempted, preempted
    for name, prompt, gen, lp, start in (("b", prompts[0], gens[0], lps[0], None), ("a", prompts[1], gens[1], lps[1], 0)):
        tokens = prompt + gen
        if start is None:  # resumed where the first turn stopped computing
            n1 = len(first[1])
            steps = _steps(n1, len(gen_b)) + _steps(len(prompt), len(gen), len(history["b"]) - 1)
        else:
            steps = _steps(len(prompt), len(gen))
        ref = reference.stream_logprobs(tokens, steps, sink_tokens=16, window=W, block_size=B)
        got = torch.tensor([lp[i][t].logprob for i, t in enumerate(gen)], dtype=torch.float64)
        diff = (got - ref[len(prompt) - 1 : len(prompt) - 1 + len(gen)]).abs()
        assert diff.max().item() <= F32_MAX_ABS and diff.mean().item() <= F32_MAX_MEAN, (name, diff.max().item())
