"""The sink policy on vLLM's V2 model runner (the runner vLLM picks for dense models on the
GPU), run on the CPU by ``tests/v2_harness.py`` (its Triton kernels interpreted), in a
process of its own.

Two streams of Hamlet in one batch, each with prompt logprobs and greedy tokens: 512 + 8 and
384 + 24 tokens, a sink of 20 tokens (not a whole number of pages: a partial sink page),
W=128, 64-token prefill chunks, the model shrunk to 512 rotary positions so that epochs
start. Every token's logprob equals the plain-PyTorch reference's for that stream alone
(tests/reference.py) within the float32 tolerance of ``tests/tolerances.py``; the dense
reading of the same tokens is far off (the comparison can fail). Then the first stream's
next turn (its history re-sent with 100 new tokens, as a chat client sends it) resumes its
kept stream where it stopped computing, and its 8 generated tokens match the reference over
the whole conversation.

The V2 runner keeps its token rows, counts and block-table rows on the device and advances
them there: the binding (``patches/worker/runner_v2.py``) writes only the rows whose window
moved or whose prompt is still coming, in compacted coordinates, and turns vLLM's positions
into frame positions for the model and back into the stream's for the sampler.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine_helpers import PAGE
from reference import chunked_steps
from tolerances import F32_MAX_ABS, F32_MAX_MEAN, check

from vllm_sink.patches.bindings import behaves
from vllm_sink.policy import window_start

S, W, CHUNK = 20, 128, 64
STREAMS = [(0, 512, 8), (600, 384, 24)]  # (first token in Hamlet, prompt tokens, generated)
TURN = (2000, 100, 8)  # the first stream's next turn: new tokens (from Hamlet), generated

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import v2_harness
    v2_harness.enable()
    from engine_helpers import COMMON
    from vllm import SamplingParams
    from vllm_sink import LLM, assets
    from vllm_sink.metrics import SINK_STATS

    page, S, W, chunk = (int(x) for x in sys.argv[2:6])
    streams, turn = json.loads(sys.argv[6]), json.loads(sys.argv[7])
    # Each stream computes ``chunk`` tokens a step, side by side (on vLLM 0.32.0 too: the cap
    # applies to a request that is not alone, and neither is alone while it prefills).
    budget = dict(max_num_batched_tokens=len(streams) * chunk, long_prefill_token_threshold=chunk)
    llm = LLM(str(assets.model_dir()), **{**COMMON, **budget}, block_size=page, kv_policy="sink",
              sink_tokens=S, kv_window=W, max_stream_len=16384, hf_overrides={"max_position_embeddings": 512})
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    params = [SamplingParams(max_tokens=n, temperature=0, prompt_logprobs=0, logprobs=0, ignore_eos=True)
              for _, n in streams]
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in streams], params, use_tqdm=False)
    result = []
    for out in outs:
        gen = list(out.outputs[0].token_ids)
        result.append(dict(prompt_lp=[next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]],
                           gen=gen, gen_lp=[lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, gen)]))
    # The first stream's next turn (a chat re-sending its history) resumes its kept stream:
    # only the new tokens are prefilled, from where it stopped computing.
    history = streams[0][0] + result[0]["gen"]
    resumes0, reused0 = SINK_STATS.resumes, SINK_STATS.tokens_reused
    out = llm.generate([{"prompt_token_ids": history + turn}],
                       SamplingParams(max_tokens=8, temperature=0, logprobs=0, ignore_eos=True), use_tqdm=False)[0]
    gen = list(out.outputs[0].token_ids)
    resumed = dict(gen=gen, gen_lp=[lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, gen)],
                   resumes=SINK_STATS.resumes - resumes0, reused=SINK_STATS.tokens_reused - reused0)
    print("RESULT " + json.dumps(dict(streams=result, resumed=resumed, runner=type(runner).__module__,
                                      v2=hasattr(runner, "req_states"), epochs=SINK_STATS.epochs,
                                      evicted=SINK_STATS.pages_evicted)), flush=True)
    """
)


def _report(plugin, ref, dense, first):
    diff = (plugin - ref).abs()
    return dict(tokens=len(diff), max=diff.max().item(), mean=diff.mean().item(),
                control_mean=diff[:first].mean().item(), evicting_mean=diff[first:].mean().item(),
                dense_mean=(plugin - dense).abs()[first:].mean().item())


def test_v2_runner_streams_match_the_reference(reference, hamlet_ids, tmp_path):
    streams = [(hamlet_ids[start:start + n], gen) for start, n, gen in STREAMS]
    turn = hamlet_ids[TURN[0]:TURN[0] + TURN[1]]
    script = tmp_path / "v2_child.py"
    script.write_text(SCRIPT)
    tests = str(Path(__file__).resolve().parent)
    res = subprocess.run([sys.executable, str(script), tests, str(PAGE), str(S), str(W), str(CHUNK),
                          json.dumps(streams), json.dumps(turn)], capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, PYTHONPATH=tests))
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, res.stdout[-3000:] + res.stderr[-6000:]
    out = json.loads(lines[-1][7:])
    # The engine ran on the V2 runner (its request states), with the policy's evictions and epochs.
    assert out["v2"], out["runner"]
    assert out["epochs"] >= 1, out
    assert out["evicted"] >= sum(n - W - S - CHUNK for _, n, _ in STREAMS) // PAGE, out
    for (prompt, _), got in zip(streams, out["streams"]):
        plugin = torch.tensor(got["prompt_lp"] + got["gen_lp"], dtype=torch.float64)
        tokens = list(prompt) + got["gen"]
        steps = chunked_steps(len(prompt), CHUNK, len(tokens))
        ref = reference.stream_logprobs(tokens, steps, sink_tokens=S, window=W, block_size=PAGE)
        dense = reference.stream_logprobs(tokens, steps, sink_tokens=0, window=None, block_size=PAGE)
        first = next(a for a, _ in steps if window_start(a, S, W, PAGE) > S)
        report = _report(plugin, ref, dense, first)
        print(f"\nV2 runner, {len(prompt)} + {len(got['gen'])} tokens: {report} "
              f"(both streams: {out['epochs']} epochs, {out['evicted']} pages evicted)")
        assert not check(report, "float32"), (check(report, "float32"), report)
        assert report["dense_mean"] > 100 * F32_MAX_MEAN, report
    # The next turn resumed the first stream where it stopped computing (its last sampled
    # token was never fed) and matches the reference over the whole conversation.
    (prompt, _), got, nxt = streams[0], out["streams"][0], out["resumed"]
    history = list(prompt) + got["gen"] + list(turn)
    end = len(prompt) + len(got["gen"])
    assert (nxt["resumes"], nxt["reused"]) == (1, end - 1), nxt
    tokens = history + nxt["gen"]
    steps = chunked_steps(len(prompt), CHUNK, end)
    # (alone in the batch: on a vLLM that does not cap a lone request, the step budget)
    lone = len(STREAMS) * CHUNK if behaves("lone_request_uncapped") else CHUNK
    steps += [(a, min(a + lone, len(history))) for a in range(end - 1, len(history), lone)]
    steps += [(t, t + 1) for t in range(len(history), len(tokens) - 1)]
    ref = reference.stream_logprobs(tokens, steps, sink_tokens=S, window=W, block_size=PAGE)
    dense = reference.stream_logprobs(tokens, steps, sink_tokens=0, window=None, block_size=PAGE)
    idx = list(range(len(history) - 1, len(tokens) - 1))
    plugin = torch.tensor(nxt["gen_lp"], dtype=torch.float64)
    diff = (plugin - ref[idx]).abs()
    print(f"V2 runner, resumed turn of {len(turn)} + {len(nxt['gen'])} tokens: max {diff.max().item():.3g}, "
          f"mean {diff.mean().item():.3g}")
    assert diff.max().item() <= F32_MAX_ABS and diff.mean().item() <= F32_MAX_MEAN
    assert (plugin - dense[idx]).abs().mean().item() > 100 * F32_MAX_MEAN
