"""Requests with sinks of their own (``SamplingParams(extra_args={"sink_tokens": n})``,
HTTP ``vllm_xargs``), batched together: each stream is the paper's with its own sink.

One engine (16-token engine sink, ``max_sink_tokens=40``, W=256, 512 rotary positions so
that epochs start) runs five requests in one batch: the engine's sink, a 4-token sink (the
paper's), a partial page (20), two pages and a partial one (36) and none (window only).
Every prompt and generated token's logprob must equal the plain-PyTorch reference run with
that request's sink (the float32 tolerance of the other reference tests). A sink over the
cap is refused in the front end; kept streams resume only for requests of the same sink.
"""

import pytest
import torch
from vllm import SamplingParams

from engine_helpers import free_or_kept
from reference import chunked_steps
from tolerances import F32_MAX_ABS, F32_MAX_MEAN

from vllm_sink.config import SinkConfigError
from vllm_sink.metrics import SINK_STATS

B, W, C, N_PROMPT, N_GEN = 16, 256, 64, 600, 16
SINKS = [None, 4, 20, 36, 0]  # None: the engine's (16)


def _params(sink, **kw):
    extra = None if sink is None else {"sink_tokens": sink}
    return SamplingParams(max_tokens=N_GEN, temperature=0, prompt_logprobs=0, logprobs=0, ignore_eos=True,
                          extra_args=extra, **kw)


def _use_writer(llm, writer: str, monkeypatch) -> None:
    """Re-anchor with the given sink page writer: ``torch`` (the CPU's), or ``triton``, the
    GPU's kernel run by Triton's interpreter on the CPU (the runner's call of it as on the
    GPU: one staged copy of the step's integers, the sources read where they lie)."""
    if writer == "torch":
        return
    pytest.importorskip("triton")
    from vllm_sink import page_writer

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(page_writer, "_KERNEL", None)  # built (interpreted) on first use
    hook = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner._vllm_sink_hook
    kv, put = hook.kv, hook.stager.put
    monkeypatch.setattr(kv, "_writers", (page_writer.PageWriter(kv.keys(), hook.table, put, use_triton=True),
                                         page_writer.PageWriter(kv.values(), None, put, use_triton=True)))


_REFERENCE: dict = {}


def _reference(reference, tokens, steps, S):
    """The reference's logprobs for a stream, computed once: both writers must give the
    same tokens, so the second writer's comparison reuses the first's reference run."""
    key = (tuple(tokens), tuple(steps), S)
    if key not in _REFERENCE:
        _REFERENCE[key] = reference.stream_logprobs(tokens, steps, sink_tokens=S, window=W, block_size=B)
    return _REFERENCE[key]


@pytest.mark.engine("sink16_own40_p512")
@pytest.mark.parametrize("writer", ["torch", "triton"])
def test_sinks_of_their_own_in_one_batch_match_the_reference(llm, reference, hamlet_ids, writer, monkeypatch):
    _use_writer(llm, writer, monkeypatch)
    # The GPU's writer (interpreted: slow on the CPU) on the sinks whose pages it writes in
    # both ways: a partial page alone (4), whole pages and a partial one (36).
    sinks = SINKS if writer == "torch" else [4, 36]
    epochs0, rotations0 = SINK_STATS.epochs, SINK_STATS.sink_rotations
    prompts = [hamlet_ids[SINKS.index(s) * 700 : SINKS.index(s) * 700 + N_PROMPT] for s in sinks]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [_params(s) for s in sinks], use_tqdm=False)
    assert SINK_STATS.epochs - epochs0 >= len(sinks)  # 616 tokens past 512 positions: each stream
    assert SINK_STATS.sink_rotations > rotations0
    report = {}
    for sink, prompt, out in zip(sinks, prompts, outs):
        S = 16 if sink is None else sink
        gen = list(out.outputs[0].token_ids)
        plugin = torch.tensor([next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
                              + [lp[g].logprob for lp, g in zip(out.outputs[0].logprobs, gen)], dtype=torch.float64)
        tokens = list(prompt) + gen
        steps = chunked_steps(len(prompt), C, len(tokens))
        ref = _reference(reference, tokens, steps, S)
        diff = (plugin - ref).abs()
        report[S] = (diff.max().item(), diff.mean().item())
        if S in (4, 36):  # The comparison can fail: the same stream with the engine's sink differs.
            other = _reference(reference, tokens, steps, 16)
            report[S] += ((plugin - other).abs()[W + 40 :].mean().item(),)
    print("\nown sinks, S: (max, mean[, mean vs the engine's sink after the window]):",
          {k: tuple(f"{x:.3g}" for x in v) for k, v in report.items()})
    for S, (mx, mean, *other) in report.items():
        assert mx <= F32_MAX_ABS and mean <= F32_MAX_MEAN, (S, report[S])
        assert all(o > 10 * F32_MAX_MEAN for o in other), (S, report[S])


@pytest.mark.engine("sink16_own40_p512")
def test_a_sink_over_the_cap_is_refused_and_sessions_keep_to_their_sink(llm, hamlet_ids):
    free0 = free_or_kept(llm)
    for bad in (41, -1, "16", 2.5):
        with pytest.raises(SinkConfigError, match="max_sink_tokens"):
            llm.generate([{"prompt_token_ids": hamlet_ids[:50]}], _params(bad), use_tqdm=False)
    # A conversation with its own sink resumes with that sink, not with another.
    first = llm.generate([{"prompt_token_ids": hamlet_ids[:300]}], _params(20), use_tqdm=False)[0]
    history = hamlet_ids[:300] + list(first.outputs[0].token_ids) + hamlet_ids[300:340]
    resumes0, reused0 = SINK_STATS.resumes, SINK_STATS.tokens_reused
    no_logprobs = dict(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": history}], SamplingParams(**no_logprobs, extra_args={"sink_tokens": 4}),
                 use_tqdm=False)
    assert SINK_STATS.resumes == resumes0  # another sink: the kept stream does not fit it
    second = history[: 300 + N_GEN] + hamlet_ids[340:360]
    llm.generate([{"prompt_token_ids": second}], SamplingParams(**no_logprobs, extra_args={"sink_tokens": 20}),
                 use_tqdm=False)
    assert SINK_STATS.resumes == resumes0 + 1 and SINK_STATS.tokens_reused - reused0 == 300 + N_GEN - 1
    assert free_or_kept(llm) == free0
