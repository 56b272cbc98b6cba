"""Engine configurations and helpers shared by the engine tests (imported by name: two
``conftest`` modules would shadow each other)."""

from __future__ import annotations

import gc
from importlib.metadata import version


def vllm_version() -> str:
    """The installed vLLM's version, without a build's local label (``0.32.0+cpu`` -> ``0.32.0``)."""
    return version("vllm").split("+", 1)[0]


# The tests' page: 16 tokens on vLLM 0.26.0; vLLM 0.32.0's CPU attention (CPU_ATTN) takes
# pages of a multiple of 32 tokens only. The engines and servers below use it, and the
# numbers the tests check follow from it.
PAGE = 16 if vllm_version() == "0.26.0" else 32
PAGE_BYTES = 737280 * PAGE // 16  # one page of SmolLM2-135M in float32 (30 layers, K and V)


def chunked(per_sequence: int, budget: int = 512) -> dict:
    """Engine arguments under which each sequence computes at most ``per_sequence`` tokens a
    step, alone or in a batch. vLLM 0.26.0 caps every sequence at the long prefill threshold,
    within a step budget of ``budget``; vLLM 0.32.0 does not cap a request alone in the batch,
    so there the step budget is ``per_sequence`` itself (batches then share it)."""
    if vllm_version() == "0.26.0":
        return dict(max_num_batched_tokens=budget, long_prefill_token_threshold=per_sequence)
    return dict(max_num_batched_tokens=per_sequence)

# Engine configurations used across the suite (all float32: the CPU runs it ~4x faster
# than bfloat16, and the reference comparison is then at float32 precision). The names
# say vLLM 0.26.0's page (16): on 0.32.0 each "16" engine has pages of 32 (``PAGE``).
COMMON = dict(dtype="float32", enforce_eager=True, max_num_seqs=16, kv_cache_memory_bytes=256 << 20)
ENGINES = {
    # B=16, one sink page, W=256, the model's own 8192 positions. Each sequence computes
    # at most 64 tokens a step (long_prefill_token_threshold) and the step budget (512)
    # fits 8 such chunks, so a request is chunked the same way alone and in a batch.
    "sink16": dict(block_size=PAGE, **chunked(64), kv_policy="sink", sink_pages=1, kv_window=256, max_stream_len=16384),
    # Same policy with the model shrunk to 512 positions: epochs every few hundred tokens.
    "sink16_p512": dict(block_size=PAGE, max_num_batched_tokens=64, kv_policy="sink", sink_pages=1, kv_window=256, max_stream_len=16384, hf_overrides={"max_position_embeddings": 512}),
    # Window only (no sink), same shapes, shrunk positions.
    "window16_p512": dict(block_size=PAGE, max_num_batched_tokens=64, kv_policy="sink", sink_pages=0, kv_window=256, max_stream_len=16384, hf_overrides={"max_position_embeddings": 512}),
    # Two sink pages of 32 tokens, 48-token chunks, 512 positions.
    "sink32x2_p512": dict(block_size=32, max_num_batched_tokens=48, kv_policy="sink", sink_pages=2, kv_window=256, max_stream_len=16384, hf_overrides={"max_position_embeddings": 512}),
    # A sink of 20 tokens (one page and a partial one), 512 positions; chunked like "sink16"
    # (64 tokens a sequence, several sequences a step); with vLLM's counters (prefix cache
    # queries and hits).
    "sink20_p512": dict(block_size=PAGE, **chunked(64), kv_policy="sink", sink_tokens=PAGE + 4, kv_window=256, max_stream_len=16384, hf_overrides={"max_position_embeddings": 512}, disable_log_stats=False),
    # "sink16" in bfloat16: the tolerance the GPU runs are held to (benchmarks/gpu_correctness.py).
    "sink16_bf16": dict(block_size=PAGE, **chunked(64), kv_policy="sink", sink_pages=1, kv_window=256, max_stream_len=16384, dtype="bfloat16"),
    # (Sessions, kept finished streams, are on by default: "sink16" and "sink20_p512" keep
    # them too; kv_sessions=True below only says so.)
    # "sink16" in a pool of 50 pages (737,280 bytes each): two kept conversations
    # leave too little for a third stream's footprint (22 pages). Without prefix caching:
    # no cached page competes with the kept ones for the room.
    "sink16_sessions_pool50": dict(block_size=PAGE, **chunked(64), kv_policy="sink", sink_pages=1, kv_window=256, max_stream_len=16384, kv_sessions=True, kv_cache_memory_bytes=50 * PAGE_BYTES, enable_prefix_caching=False),
    # "sink20_p512"'s shapes with a 16-token engine sink and requests that bring their own
    # sink of up to 40 tokens (max_sink_tokens).
    "sink16_own40_p512": dict(block_size=PAGE, **chunked(64), kv_policy="sink", sink_pages=1, max_sink_tokens=40, kv_window=256, max_stream_len=16384, hf_overrides={"max_position_embeddings": 512}),
    # "sink16" with a pool of 2,200 pages: 50 idle conversations past the window (18 pages
    # kept each, and the 20 pages each computed before its window moved, cached) fit, and a
    # batch of long streams then needs some of their room.
    "sink16_sessions_pool2200": dict(block_size=PAGE, **chunked(64), kv_policy="sink", sink_pages=1, kv_window=256, max_stream_len=16384, kv_cache_memory_bytes=2200 * PAGE_BYTES),
    # Vanilla vLLM with "sink20_p512"'s shapes and chunking (512 positions: it serves requests
    # inside them), to compare prefix caching (on by default in both) and its counters.
    "vanilla16_p512": dict(block_size=PAGE, **chunked(64), max_model_len=512, hf_overrides={"max_position_embeddings": 512}, disable_log_stats=False),
    # Vanilla vLLM, same block size and chunking as "sink16".
    "vanilla16": dict(block_size=PAGE, **chunked(64), max_model_len=4096),
}


class EngineCache:
    def __init__(self):
        self.name = None
        self.llm = None

    def get(self, name: str, model=None, **config):
        """The engine ``name``: a configuration of ``ENGINES`` on the real model, or, given
        ``model`` (a directory), that model with ``COMMON`` and ``config``."""
        if self.name == name:
            return self.llm
        self.close()
        from vllm_sink import LLM  # vLLM's LLM, with the kv_policy keywords

        from vllm_sink import assets

        if model is None:
            model, config = assets.model_dir(), ENGINES[name]
        self.llm = LLM(str(model), **{**COMMON, **config})
        self.name = name
        return self.llm

    def release_kept(self):
        """Release the streams the live engine keeps for resumption (as pool pressure would:
        pages back to the pool, the worker told at the next step), so that the next module's
        tests find the engine as a fresh one: no stream that one of their prompts could
        resume. Engines are shared by the modules of a worker (tests/conftest.py)."""
        if self.llm is None or not hasattr(self.llm.llm_engine.engine_core, "engine_core"):
            return
        from vllm_sink.metrics import SINK_STATS

        for m in scheduler_of(self.llm).kv_cache_manager.coordinator.single_type_managers:
            sessions = getattr(m, "sessions", None)
            if sessions is not None and len(sessions.kept):
                sessions.release_all()
                assert not len(sessions.kept) and not sessions.held_pages()

    def fresh(self):
        """The live engine as a fresh one: no kept stream, nothing in the prefix cache."""
        self.release_kept()
        if self.llm is not None:
            assert self.llm.reset_prefix_cache(), "a page is still held"

    def close(self):
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            self.name = None
            gc.collect()


def scheduler_of(llm):
    """The engine core's scheduler (engine core runs in this process)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def free_or_kept(llm) -> int:
    """Pages of the pool that no running request holds: free (cached ones included), or
    held by a kept stream (a finished stream kept for resumption). Kept pages wait in vLLM's
    free queue, so vLLM's free count holds them; the published ``free_kv_pages`` does not."""
    kv = scheduler_of(llm).kv_cache_manager
    kept = 0
    for m in kv.coordinator.single_type_managers:
        sessions = getattr(m, "sessions", None)
        if sessions is None:
            continue
        # Each kept page waits in the free queue, the kept stream's alone: no request holds
        # it, the prefix cache cannot find it.
        parked = [b for key in sessions.kept.keys() for b in sessions.kept.get(key).handle.blocks if not b.is_null]
        assert all(b.ref_cnt == 0 and b.block_hash is None for b in parked), parked
        assert len({b.block_id for b in parked}) == len(parked) == sessions.held_pages() == sessions.kept.pages
        kept += len(parked)
    free = kv.block_pool.get_num_free_blocks()
    assert 0 <= kept <= free
    return free


class Memo:
    """Results computed once per session, on whichever engine they need (built on demand,
    so a test that compares two engines also runs on its own)."""

    def __init__(self, engines):
        self.engines = engines
        self.values = {}

    def get(self, engine: str, key: str, fn):
        if (engine, key) not in self.values:
            self.values[(engine, key)] = fn(self.engines.get(engine))
        return self.values[(engine, key)]


def run_scored(llm, prompt_ids, max_tokens):
    """Greedy run with prompt logprobs and sampled-token logprobs. Returns
    (prompt logprobs [len-1], generated ids, generated logprobs, output)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, prompt_logprobs=0, logprobs=0, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": list(prompt_ids)}], params, use_tqdm=False)[0]
    prompt_lp = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
    gen = list(out.outputs[0].token_ids)
    gen_lp = [lp[g].logprob for lp, g in zip(out.outputs[0].logprobs, gen)]
    return prompt_lp, gen, gen_lp, out


def _mapped_shm() -> set[str]:
    """/dev/shm files some live process has mapped (read from every /proc/<pid>/maps)."""
    import glob

    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                for line in f:
                    i = line.find("/dev/shm/")
                    if i >= 0:
                        mapped.add(line[i:].split(" (deleted)")[0].strip())
        except OSError:  # the process ended while we read
            pass
    return mapped


def sweep_cpu_shm(created_since: set[str] | None = None) -> list[str]:
    """Unlink shared-memory files that vLLM's CPU tensor-parallel runs leave in /dev/shm
    when their process ends without vLLM's teardown (``os._exit``, a crash), and that no
    live process maps. Returns the paths removed.

    vLLM's CPU all-reduce names its segment after the TCP store's port
    (``<port>-tp:0-[0-1]-cpushm_<rank>``), and its Ray executor picks that port
    deterministically (``data_parallel_master_port + 100``, port 100 when it is free), so a
    stale segment from an earlier run makes the next TP run fail at start-up with "create shm
    in SHMManager failed. errno: 17". Always removes such unmapped ``*-cpushm_*`` files;
    given ``created_since`` (a listing of /dev/shm taken before a run), also the unmapped
    files the run created (vLLM's message queues, ``psm_*``)."""
    import glob
    import os

    mapped = _mapped_shm()
    removed = []
    for path in glob.glob("/dev/shm/*"):
        stale_allreduce = "-cpushm_" in os.path.basename(path)
        new = created_since is not None and path not in created_since
        if (stale_allreduce or new) and path not in mapped:
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def shm_listing() -> set[str]:
    import glob

    return set(glob.glob("/dev/shm/*"))
