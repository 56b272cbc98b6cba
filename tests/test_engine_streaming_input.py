"""vLLM's own streaming-input sessions with the sink policy.

vLLM 0.26 takes a prompt that arrives in chunks: ``AsyncLLM.generate(prompt=<async generator
of StreamingInput>, ...)``. All chunks are one request (one id). After a chunk has generated
its tokens the request waits (``RequestStatus.WAITING_FOR_STREAMING_REQ``) with its KV pages
kept. The next chunk's tokens are then appended to its prompt, together with the generated
tokens it computed; the last sampled token is dropped, since it was never fed to the model.
The chunk is scheduled again from the waiting queue from ``num_computed_tokens`` on. The
worker gets it as a *new* request under an id it still holds
(``GPUModelRunner._update_streaming_request``), and its block ids are the manager's whole
row. When the generator is exhausted the request finishes (aborted status) and its pages are
freed.

With ``kv_policy="sink"`` a session must be the same stream as one request whose step
boundaries are the chunks' (checked against the plain-PyTorch reference at the float32
tolerance of the other reference tests, like the kept sessions in test_engine_sessions.py).
Evictions happen inside chunks and at a chunk's first step, and epochs and the partial sink
page carry over between chunks. While the session waits for input it holds exactly the
pages that the policy gives to its last step, within the page bound. Its pages go back to the
pool when it ends or is aborted.

The AsyncLLM engine core always runs in its own process. With
VLLM_ENABLE_V1_MULTIPROCESSING=0 (conftest) the model runs in that process too, so a
function sent through ``collective_rpc`` can read the scheduler's KV-cache manager and the
plugin's counters there. Such a function is pickled, which needs
VLLM_ALLOW_INSECURE_SERIALIZATION=1 in this test.

Note (vLLM 0.26): a chunk's own ``StreamingInput.sampling_params`` does not change the
session's ``max_tokens`` (``Scheduler._update_request_as_session`` leaves
``Request.max_tokens`` as it was), so every chunk generates GEN tokens.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import torch

from engine_helpers import COMMON
from test_engine_sessions import C as SESSIONS_C, _steps
from tolerances import F32_MAX_ABS, F32_MAX_MEAN

from vllm_sink.policy import cdiv, window_start


# Sink of 20 tokens (one page and 4 slots of a second: the partial sink page moves with the
# window), W=64, 16-token pages, 64-token prefill steps, 192 rotary positions (epochs).
B, S, W, C, P, GEN = 16, 20, 64, 64, 192, 8
S_PAGES = cdiv(S, B)
ENGINE = dict(
    COMMON,
    kv_cache_memory_bytes=64 << 20,
    block_size=B,
    max_num_batched_tokens=256,
    long_prefill_token_threshold=C,
    hf_overrides={"max_position_embeddings": P},
    additional_config={"kv_policy": "sink", "sink_tokens": S, "kv_window": W, "max_stream_len": 4096},
)
# Chunks of Hamlet. After chunk 0 the session has computed 140 + GEN - 1 = 147 tokens, and
# the window moves at the first step of chunk 1 (window_start(147) > window_start(146)).
CHUNKS = [(0, 140), (140, 240), (240, 301), (301, 304)]
ABORTED_CHUNK = (2000, 2100)


def _engine_probe():
    """What the engine-core process holds. Returns a function to send through
    ``collective_rpc``. It is built here so that it is pickled by value: the engine process
    cannot import this module."""

    def probe(worker):
        import sys

        from vllm.v1.engine.core import EngineCore

        from vllm_sink.invariants import ROW_LOG
        from vllm_sink.metrics import SINK_STATS

        frame = sys._getframe()  # collective_rpc runs inside EngineCore's busy loop
        while not isinstance(frame.f_locals.get("self"), EngineCore):
            frame = frame.f_back
        manager = frame.f_locals["self"].scheduler.kv_cache_manager.coordinator.single_type_managers[0]
        sessions = getattr(manager, "sessions", None)  # kept streams (kv_sessions)
        return dict(
            kept_pages=sessions.kept.pages if sessions is not None else 0,
            held={rid: sum(not b.is_null for b in blocks) for rid, blocks in manager.req_to_blocks.items()},
            first_live={rid: stream.first_live for rid, stream in manager.streams.items()},
            metric_live=dict(SINK_STATS.live_pages),
            free=manager.block_pool.get_num_free_blocks(),
            max_live_pages=manager.geometry.max_live_pages,
            decode_live_pages=manager.geometry.decode_live_pages,
            evicted=SINK_STATS.pages_evicted,
            epochs=SINK_STATS.epochs,
            rows=ROW_LOG.mismatches(),
        )

    return probe


async def _run_sessions(hamlet_ids):
    """Run the session over CHUNKS to its end, then a second session aborted while it
    waits for input. Returns (generated (token, logprob) per chunk, probes while
    waiting, probe before, probe after the first session, probe after the abort)."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.engine.protocol import StreamingInput
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from vllm_sink import assets

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(assets.model_dir()), **ENGINE))
    try:
        probe = _engine_probe()

        async def state():
            return (await engine.collective_rpc(probe))[0]

        params = SamplingParams(max_tokens=GEN, temperature=0, logprobs=0, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)

        async def session(request_id, chunks, abort_at_end=False):
            """Feed ``chunks`` one at a time, each after the previous one's output ended
            (so the chunk boundaries are the session's step boundaries); probe the engine
            while the session waits for each next chunk."""
            ended = [asyncio.Event() for _ in chunks]
            waiting = []

            async def inputs():
                for i, (a, b) in enumerate(chunks):
                    yield StreamingInput(prompt={"prompt_token_ids": list(hamlet_ids[a:b])})
                    await ended[i].wait()
                    waiting.append(await state())
                    if abort_at_end and i == len(chunks) - 1:
                        # As a client that goes away: the input never ends. generate()
                        # returns on the abort and cancels this generator.
                        await engine.abort(request_id)
                        await asyncio.Event().wait()

            gens, k = [[] for _ in chunks], 0
            async for out in engine.generate(inputs(), params, request_id=request_id):
                o = out.outputs[0]
                if k == len(chunks):  # the abort's final output
                    continue
                gens[k] += [(t, lp[t].logprob) for t, lp in zip(o.token_ids, o.logprobs)]
                if o.finish_reason is not None:
                    ended[k].set()
                    k += 1
            return gens, waiting

        before = await state()
        gens, waiting = await session("stream", CHUNKS)
        after = await state()
        _, aborted_waiting = await session("aborted", [ABORTED_CHUNK], abort_at_end=True)
        for _ in range(50):  # the abort reaches the engine core asynchronously
            after_abort = await state()
            if not after_abort["held"]:
                break
            await asyncio.sleep(0.1)
        return gens, waiting, before, after, aborted_waiting[0], after_abort
    finally:
        engine.shutdown()


def test_streaming_input_session_matches_one_stream(engines, reference, hamlet_ids, monkeypatch):
    assert C == SESSIONS_C  # test_engine_sessions._steps chunks prefills by C
    engines.close()  # one engine alive at a time (this one is an AsyncLLM)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(probe)
    from vllm import envs

    if envs._is_envs_cache_enabled():  # an in-process engine cached the environment
        envs.disable_envs_cache()
    t0 = time.monotonic()
    gens, waiting, before, after, aborted_waiting, after_abort = asyncio.run(_run_sessions(hamlet_ids))
    t_engine = time.monotonic() - t0

    # The same stream as one request: each chunk's prompt follows the tokens the session
    # computed, which are the generated ones without the last; the chunk is prefilled from
    # there in steps of C, then decoded one token a step.
    history, steps, picks, ends = [], [], {}, []
    for (a, b), gen in zip(CHUNKS, gens):
        assert len(gen) == GEN
        prompt = history + list(hamlet_ids[a:b])
        steps += _steps(len(prompt), GEN, len(history))
        picks.update({len(prompt) - 1 + i: tok for i, (tok, _) in enumerate(gen)})
        history = prompt + [tok for tok, _ in gen[:-1]]
        ends.append(len(history))  # tokens computed when the chunk ends
    tokens = history + [gens[-1][-1][0]]
    # The last sampled token of each chunk but the last is discarded (the next chunk
    # follows instead), so logprobs are taken from the reference's logits.
    ref = {}
    for a, b, logits in reference.stream_logits(tokens, steps, sink_tokens=S, window=W, block_size=B):
        logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
        ref.update({t: logp[t - a, picks[t]].item() for t in range(a, b) if t in picks})
    got = [lp for gen in gens for _, lp in gen]
    diff = (torch.tensor(got, dtype=torch.float64) - torch.tensor([ref[t] for t in sorted(picks)])).abs()
    print(f"\nstreaming input: {len(CHUNKS)} chunks, {len(tokens)} tokens, {len(steps)} steps, "
          f"{after['evicted'] - before['evicted']} pages evicted, {after['epochs'] - before['epochs']} epochs; "
          f"max {diff.max().item():.3g}, mean {diff.mean().item():.3g}; engine part {t_engine:.0f} s")
    assert diff.max().item() <= F32_MAX_ABS and diff.mean().item() <= F32_MAX_MEAN

    # Evictions inside chunks and at a chunk's first step, epochs across chunks.
    assert window_start(ends[0], S, W, B) > window_start(ends[0] - 1, S, W, B)
    assert after["epochs"] - before["epochs"] >= 2
    # While waiting for input, the session holds what its last step's window needs: the
    # sink pages plus the pages from the window start's page to its last token. That is
    # within the page bound, and every page that left the window was freed.
    for end, w in zip(ends, waiting):
        (rid,) = w["held"]
        first_live = cdiv(window_start(end - 1, S, W, B), B)
        assert w["first_live"][rid] == first_live, (end, w)
        assert w["held"][rid] == S_PAGES + cdiv(end, B) - first_live == w["metric_live"][rid], (end, w)
        assert w["held"][rid] <= w["decode_live_pages"] <= w["max_live_pages"]
        assert w["evicted"] - before["evicted"] == first_live - S_PAGES
        assert w["free"] == before["free"] - w["held"][rid]
    # Its pages are back once the input ends, and those of a session aborted while waiting.
    ((rid, held),) = aborted_waiting["held"].items()
    assert 0 < held <= aborted_waiting["decode_live_pages"]
    # (Not kept for resumption either: vLLM ends a streaming-input session as aborted.)
    assert after["held"] == {} and after["free"] == before["free"] and after["kept_pages"] == 0
    assert after_abort["held"] == {} and after_abort["free"] == before["free"] and after_abort["kept_pages"] == 0
    # The scheduler's rows and the worker's agreed at every step (vllm_sink.invariants).
    compared, bad = after_abort["rows"]
    assert compared > 0 and not bad, bad[:3]


def test_next_chunk_is_admitted_like_a_new_stream():
    """A waiting session's reservation is the decode bound. Its next chunk prefills again
    (up to ``max_live_pages``), so it is admitted only if that growth fits beside what every
    admitted stream may still claim. Otherwise that stream, once grown, would find no page
    and vLLM would preempt it (recompute from token 0)."""
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.request import RequestStatus

    from vllm_sink.patches.scheduler.manager import StreamingSinkManager
    from vllm_sink.patches.spec import SinkWindowSpec
    from vllm_sink.policy import SinkGeometry

    g = SinkGeometry(block_size=B, sink_tokens=16, kv_window=64, step_tokens=64, concurrent_steps=1, rope_limit=8192)
    spec = SinkWindowSpec(block_size=B, num_kv_heads=1, head_size=8, dtype=torch.float32, geometry=g)
    pool = BlockPool(num_gpu_blocks=17, enable_caching=False, hash_block_size=B)  # 16 usable
    mgr = StreamingSinkManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0, scheduler_block_size=B)

    def step(req, n):
        """One scheduling of ``n`` tokens of ``req``, in the order allocate_slots calls the
        manager; False if refused."""
        a = req.num_computed_tokens
        mgr.note_request(req)
        mgr.remove_skipped_blocks(req.request_id, a)
        if mgr.get_num_blocks_to_allocate(req.request_id, a + n, [], a, a, a + n) > pool.get_num_free_blocks():
            return False
        mgr.allocate_new_blocks(req.request_id, a + n, a + n)
        req.status, req.num_computed_tokens = RequestStatus.RUNNING, a + n
        return True

    # The session's first chunk: 200 tokens prefilled, 8 generated (7 computed); it waits.
    s = SimpleNamespace(request_id="s", num_prompt_tokens=200, max_tokens=8, num_computed_tokens=0,
                        status=RequestStatus.WAITING, sampling_params=None)
    while s.num_computed_tokens < 207:
        assert step(s, min(64, 200 - s.num_computed_tokens) if s.num_computed_tokens < 200 else 1)
    mgr.note_request(s)
    assert mgr.streams["s"].live == mgr.streams["s"].footprint == g.decode_live_pages == 6
    # A long stream is admitted meanwhile: its footprint (10) is reserved.
    o = SimpleNamespace(request_id="o", num_prompt_tokens=1000, max_tokens=100, num_computed_tokens=0,
                        status=RequestStatus.WAITING, sampling_params=None)
    assert step(o, 64) and mgr.outstanding_pages() == g.max_live_pages - mgr.streams["o"].live == 6
    # The session's next chunk: 6 free pages would serve its first step, but not both the
    # session's growth to 10 pages and the stream's reserved 6: it waits.
    s.status, s.num_prompt_tokens = RequestStatus.WAITING, 300
    assert not step(s, 64)
    assert mgr.streams["s"].admitted  # still holding its pages, nothing preempted
    mgr.free("o")
    assert step(s, 64)
    while s.num_computed_tokens < 300:
        assert step(s, min(64, 300 - s.num_computed_tokens))
        assert mgr.streams["s"].live <= g.max_live_pages
    mgr.free("s")
    assert pool.get_num_free_blocks() == 16
