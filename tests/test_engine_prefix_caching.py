"""Prefix caching beside the sink policy (``enable_prefix_caching=True``).

Requests share a 100-token system prefix (six full pages, shorter than the window). A first
request computes and caches it; then, at the same time, two requests stay inside the window
and two stream far past it (epochs: the model is shrunk to 512 positions; a 20-token sink,
so the page holding the window start takes over as a partial sink page, written); then the
first request again, which finds its pages in the cache after the long streams have moved.

* Requests inside the window give the tokens and logprobs of vanilla vLLM with prefix
  caching, given the same requests in the same order (the same cache hits).
* Streams past the window give the plain-PyTorch reference's logprobs for the steps they
  took: the pages found in the cache (computed before any eviction, so a function of the
  prefix alone) as one step, then 64-token chunks from there.
* No page another request can find or holds is written: a stream whose window first moves
  takes private copies of them (``pages_copied``); without the copies the last request
  reads the long streams' rewritten sink pages and leaves vanilla's logprobs.
* Every page is back in the pool (free, cached or kept) after each batch.
"""

import pytest
import torch
from vllm import SamplingParams

from engine_helpers import free_or_kept, scheduler_of
from tolerances import F32_MAX_ABS, F32_MAX_MEAN

from vllm_sink.metrics import SINK_STATS

PREFIX = 100
S, W, B, CHUNK = 20, 256, 16, 64


def _requests(ids):
    prefix = ids[:PREFIX]
    return {
        "warm": (prefix + ids[1000:1040], 16),
        "inside1": (prefix + ids[5000:5060], 16),
        "inside2": (prefix + ids[6000:6030], 24),
        "long1": (prefix + ids[2000:2600], 40),
        "long2": (prefix + ids[3000:3300], 200),
    }


def _run(llm, reqs, names):
    params = [SamplingParams(max_tokens=reqs[n][1], temperature=0, logprobs=0, ignore_eos=True) for n in names]
    outs = llm.generate([{"prompt_token_ids": reqs[n][0]} for n in names], params, use_tqdm=False)
    res = {}
    for n, o in zip(names, outs):
        gen = list(o.outputs[0].token_ids)
        res[n] = (gen, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, gen)], o.num_cached_tokens or 0)
    return res


BATCHES = (["warm"], ["inside1", "long1", "inside2", "long2"], ["warm"])


def _workload(llm, reqs):
    out = []
    for names in BATCHES:
        out.append(_run(llm, reqs, names))
    return out


@pytest.fixture(scope="module")
def vanilla(engines, hamlet_ids):
    reqs = _requests(hamlet_ids)
    llm = engines.get("vanilla16_p512_prefix")
    inside = {n: reqs[n] for n in ("warm", "inside1", "inside2")}
    return [_run(llm, inside, [n for n in names if n in inside]) for names in BATCHES]


@pytest.mark.engine("sink20_p512_prefix")
def test_shared_prefix_exact_and_never_written(llm, reference, hamlet_ids, vanilla):
    reqs = _requests(hamlet_ids)
    total = free_or_kept(llm)
    copied0, epochs0 = SINK_STATS.pages_copied, SINK_STATS.epochs
    got = _workload(llm, reqs)
    assert free_or_kept(llm) == total
    copied = SINK_STATS.pages_copied - copied0
    hits = {n: r[2] for batch in got for n, r in batch.items()}
    print(f"\nprefix caching: cached tokens found {hits}, pages copied {copied}, epochs {SINK_STATS.epochs - epochs0}")
    assert copied > 0 and SINK_STATS.epochs > epochs0
    assert all(got[1][n][2] >= 96 for n in ("inside1", "inside2", "long1", "long2"))  # the shared prefix's pages
    # Inside the window: vanilla's tokens and logprobs, batch by batch.
    for i, batch in enumerate(vanilla):
        for n, (tokens, lps, cached) in batch.items():
            assert got[i][n][0] == tokens, (i, n)
            diff = (torch.tensor(got[i][n][1]) - torch.tensor(lps)).abs()
            assert diff.max().item() <= F32_MAX_ABS, (i, n, diff.max().item())
    # Past the window: the reference, with the steps each stream took.
    for n in ("long1", "long2"):
        prompt, gen_n = reqs[n]
        gen, lps, h = got[1][n]
        tokens = list(prompt) + gen
        steps = [(0, h)] + [(a, min(a + CHUNK, len(prompt))) for a in range(h, len(prompt), CHUNK)]
        steps += [(t, t + 1) for t in range(len(prompt), len(tokens) - 1)]
        ref = reference.stream_logprobs(tokens, steps, sink_tokens=S, window=W, block_size=B)
        diff = (torch.tensor(lps, dtype=torch.float64) - ref[len(prompt) - 1:]).abs()
        print(f"{n}: {len(prompt)} + {gen_n} tokens, {h} found cached; max |diff| {diff.max().item():.2e}")
        assert diff.max().item() <= F32_MAX_ABS and diff.mean().item() <= F32_MAX_MEAN, (n, diff.max().item())
