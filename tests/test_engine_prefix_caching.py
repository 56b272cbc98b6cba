"""Prefix caching beside the sink policy (on by default, as in vLLM).

Requests share a 100-token system prefix (six full pages, shorter than the window). A first
request computes and caches it; then, at the same time, two requests stay inside the window
and two stream far past it (epochs: the model is shrunk to 512 positions; a 20-token sink,
so the page holding the window start takes over as a partial sink page, written); then the
first request again, which finds its pages in the cache after the long streams have moved.

* Requests inside the window give the tokens and logprobs of vanilla vLLM with prefix
  caching, given the same requests in the same order (the same cache hits), and as many
  hits: vLLM's own counters (``vllm:prefix_cache_queries`` and ``_hits``) move alike, for
  short requests, ``n=4`` and beam search.
* Streams past the window give the plain-PyTorch reference's logprobs for the steps they
  took: the pages found in the cache (computed before any eviction, so a function of the
  prefix alone) as one step, then 64-token chunks from there.
* No page another request can find or holds is written: a stream whose window first moves
  takes private copies of them (``pages_copied``); without the copies the last request
  reads the long streams' rewritten sink pages and leaves vanilla's logprobs.
* ``cache_salt`` keeps tenants apart; a prompt longer than the window finds its first pages;
  an abort in the middle of a shared prefix gives every page back and leaves the cached
  pages right for the next request.
* Every page is back in the pool (free, cached or kept) after each test.

Each test starts from an empty prefix cache (``EngineCache.fresh``), on both engines.
"""

import pytest
import torch
from vllm import SamplingParams
from vllm.sampling_params import BeamSearchParams

from engine_helpers import free_or_kept, scheduler_of
from tolerances import F32_MAX_ABS, F32_MAX_MEAN

from vllm_sink.metrics import SINK_STATS

PREFIX = 100
S, W, B, CHUNK = 20, 256, 16, 64
SINK, VANILLA = "sink20_p512", "vanilla16_p512"


def _requests(ids):
    prefix = ids[:PREFIX]
    return {
        "warm": (prefix + ids[1000:1040], 16),
        "inside1": (prefix + ids[5000:5060], 16),
        "inside2": (prefix + ids[6000:6030], 24),
        "long1": (prefix + ids[2000:2600], 40),
        "long2": (prefix + ids[3000:3300], 200),
    }


def _run(llm, reqs, names, salt=None):
    params = [SamplingParams(max_tokens=reqs[n][1], temperature=0, logprobs=0, ignore_eos=True) for n in names]
    prompts = [{"prompt_token_ids": reqs[n][0], **({"cache_salt": salt} if salt else {})} for n in names]
    outs = llm.generate(prompts, params, use_tqdm=False)
    res = {}
    for n, o in zip(names, outs):
        gen = list(o.outputs[0].token_ids)
        res[n] = (gen, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, gen)], o.num_cached_tokens or 0)
    return res


def _counters(llm) -> tuple[int, int]:
    """vLLM's prefix-cache counters: (tokens looked up, tokens found)."""
    got = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:prefix_cache_")}
    return got["vllm:prefix_cache_queries"], got["vllm:prefix_cache_hits"]


def _delta(llm, fn):
    q0, h0 = _counters(llm)
    out = fn()
    q1, h1 = _counters(llm)
    return out, (q1 - q0, h1 - h0)


BATCHES = (["warm"], ["inside1", "long1", "inside2", "long2"], ["warm"])


def _short_waves(ids):
    """Three waves of six short requests (a 150-token system prefix, 5-60 token questions)."""
    prefix = ids[8000:8150]
    return [{f"w{w}q{i}": (prefix + ids[9000 + 100 * (6 * w + i): 9000 + 100 * (6 * w + i) + 5 + 11 * i], 6)
             for i in range(6)} for w in range(3)]


def _shared_workloads(llm, ids):
    """What both engines run, each from an empty cache: (name -> result, name -> counters)."""
    results, counters = {}, {}

    def fresh():
        assert llm.reset_prefix_cache()

    fresh()
    results["short"], counters["short"] = _delta(llm, lambda: [_run(llm, wave, list(wave)) for wave in _short_waves(ids)])
    fresh()
    n4 = SamplingParams(n=4, max_tokens=8, temperature=1.0)
    _, counters["n=4"] = _delta(llm, lambda: llm.generate([{"prompt_token_ids": ids[10000:10200]}], n4, use_tqdm=False))
    fresh()
    beams, counters["beam"] = _delta(llm, lambda: llm.beam_search([{"prompt_token_ids": ids[10300:10500]}],
                                                                  BeamSearchParams(beam_width=2, max_tokens=6)))
    results["beam"] = [s.tokens for s in beams[0].sequences]
    fresh()
    salted = {"q": (ids[11000:11200], 8)}
    results["salt"] = [_run(llm, salted, ["q"], salt)["q"] for salt in ("tenant-a", "tenant-b", "tenant-a")]
    fresh()
    return results, counters


@pytest.fixture(scope="module")
def vanilla(engines, hamlet_ids):
    reqs = _requests(hamlet_ids)
    llm = engines.get(VANILLA)
    engines.fresh()
    inside = {n: reqs[n] for n in ("warm", "inside1", "inside2")}
    batches = [_run(llm, inside, [n for n in names if n in inside]) for names in BATCHES]
    return batches, _shared_workloads(llm, hamlet_ids)


def _same(got, want, what):
    assert got[0] == want[0], what
    diff = (torch.tensor(got[1]) - torch.tensor(want[1])).abs()
    assert diff.max().item() <= F32_MAX_ABS, (what, diff.max().item())


def _matches_reference(reference, prompt, gen, lps, steps, what):
    tokens = list(prompt) + gen
    steps = steps + [(t, t + 1) for t in range(len(prompt), len(tokens) - 1)]
    ref = reference.stream_logprobs(tokens, steps, sink_tokens=S, window=W, block_size=B)
    diff = (torch.tensor(lps, dtype=torch.float64) - ref[len(prompt) - 1:]).abs()
    print(f"{what}: {len(prompt)} + {len(gen)} tokens, steps from {steps[0]}; max |diff| {diff.max().item():.2e}")
    assert diff.max().item() <= F32_MAX_ABS and diff.mean().item() <= F32_MAX_MEAN, (what, diff.max().item())


def _chunks(start, end):
    return [(a, min(a + CHUNK, end)) for a in range(start, end, CHUNK)]


@pytest.fixture
def fresh_llm(llm, engines):
    engines.fresh()
    total = free_or_kept(llm)
    yield llm
    assert free_or_kept(llm) == total, "a page is missing from the pool"


@pytest.mark.engine(SINK)
def test_shared_prefix_exact_and_never_written(fresh_llm, reference, hamlet_ids, vanilla):
    llm, reqs = fresh_llm, _requests(hamlet_ids)
    copied0, epochs0 = SINK_STATS.pages_copied, SINK_STATS.epochs
    got = [_run(llm, reqs, names) for names in BATCHES]
    copied = SINK_STATS.pages_copied - copied0
    hits = {n: r[2] for batch in got for n, r in batch.items()}
    print(f"\nprefix caching: cached tokens found {hits}, pages copied {copied}, epochs {SINK_STATS.epochs - epochs0}")
    assert copied > 0 and SINK_STATS.epochs > epochs0
    assert all(got[1][n][2] >= 96 for n in ("inside1", "inside2", "long1", "long2"))  # the shared prefix's pages
    # Inside the window: vanilla's tokens and logprobs, batch by batch.
    for i, batch in enumerate(vanilla[0]):
        for n, want in batch.items():
            _same(got[i][n], want, (i, n))
    # Past the window: the reference, with the steps each stream took.
    for n in ("long1", "long2"):
        prompt = reqs[n][0]
        gen, lps, h = got[1][n]
        _matches_reference(reference, prompt, gen, lps, [(0, h)] + _chunks(h, len(prompt)), n)


@pytest.mark.engine(SINK)
def test_as_many_prefix_hits_as_vanilla(fresh_llm, hamlet_ids, vanilla):
    """Short requests sharing a prefix, ``n=4`` and beam search: the same hits as vanilla
    (vLLM's counters), the same greedy outputs; cache_salt keeps tenants apart."""
    results, counters = _shared_workloads(fresh_llm, hamlet_ids)
    want_results, want_counters = vanilla[1]
    for what, (q, h) in counters.items():
        wq, wh = want_counters[what]
        print(f"{what}: sink {h}/{q} tokens found ({h / q:.1%}), vanilla {wh}/{wq} ({wh / wq:.1%})")
        assert q == wq and h == wh and h > 0, what
    for wave, want in zip(results["short"], want_results["short"]):
        for n in want:
            _same(wave[n], want[n], n)
    assert results["beam"] == want_results["beam"]
    # cache_salt: tenant b finds nothing tenant a cached; tenant a finds its own pages again.
    cached = [r[2] for r in results["salt"]]
    assert cached[0] == 0 and cached[1] == 0 and cached[2] >= 192, cached
    for got, want in zip(results["salt"], want_results["salt"]):
        _same(got, want, "salt")
    # n=4: the three other samples find the first one's prompt pages.
    assert counters["n=4"][1] >= 3 * 128


@pytest.mark.engine(SINK)
def test_prompt_longer_than_the_window_finds_its_first_pages(fresh_llm, reference, hamlet_ids):
    """Two 700-token prompts (window 256) that part after 300 tokens, before the first
    one's window: the second finds the pages the first computed before its window moved
    (not its kept stream, whose window is past where they part), and both match the
    reference for the steps they took."""
    first_prompt = hamlet_ids[12000:12700]
    second_prompt = first_prompt[:300] + hamlet_ids[13000:13400]
    first = _run(fresh_llm, {"p": (first_prompt, 8)}, ["p"])["p"]
    second = _run(fresh_llm, {"p": (second_prompt, 8)}, ["p"])["p"]
    h = second[2]
    assert first[2] == 0 and (S + W) // B * B - B <= h <= 300, h
    _matches_reference(reference, first_prompt, first[0], first[1], _chunks(0, len(first_prompt)), "cold")
    _matches_reference(reference, second_prompt, second[0], second[1], [(0, h)] + _chunks(h, len(second_prompt)),
                       "found")


@pytest.mark.engine(SINK)
def test_abort_in_a_shared_prefix_gives_every_page_back(fresh_llm, hamlet_ids):
    """A request aborted while it prefills a prefix another request shares: every page comes
    back, and the survivor and a later request give a cold request's output."""
    llm = fresh_llm
    engine = llm.llm_engine
    shared = hamlet_ids[15000:15400]
    a, b, c = shared + hamlet_ids[14000:14050], shared + hamlet_ids[14100:14150], shared + hamlet_ids[14200:14260]
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=0, ignore_eos=True)
    engine.add_request("abort-a", {"prompt_token_ids": a}, params)
    engine.step()  # a computes its first chunk (its full pages are cached as it goes)
    engine.add_request("abort-b", {"prompt_token_ids": b}, params)
    engine.step()  # b finds a's pages; both compute a chunk of the shared prefix
    computed = {r.request_id.split("-")[1]: r.num_computed_tokens for r in scheduler_of(llm).requests.values()}
    assert 0 < computed["a"] < len(shared) and 0 < computed["b"] < len(shared), computed
    engine.abort_request(["abort-a"])  # in the middle of the shared prefix
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    survivor = outs["abort-b"].outputs[0]
    gen = list(survivor.token_ids)
    got_b = (gen, [lp[t].logprob for lp, t in zip(survivor.logprobs, gen)])
    later = _run(llm, {"c": (c, 12)}, ["c"])["c"]
    assert later[2] >= 128, later[2]  # found the pages computed before the abort
    cold = _run(llm, {"b": (b, 12), "c": (c, 12)}, ["b", "c"], salt="cold")
    assert cold["b"][2] == 0
    _same(got_b, cold["b"], "survivor")
    _same(later, cold["c"], "later")
