"""Throughput and latency of the sink policy against vanilla vLLM, measured side by side.

    python benchmarks/throughput.py [--parts overhead,latency,recompute,budget]   # GPU
    python benchmarks/throughput.py --parts overhead-cpu                          # CPU

Parts (each engine runs in its own subprocess, so every measurement starts from a clean GPU):

* ``overhead``: short requests that never evict (prompt 512 + 128 output tokens, 256
  requests): sink against vanilla vLLM, same settings. Ratio of output tokens/s.
* ``latency``: decode latency per token against stream position (1K ... 1M tokens) with the
  sink policy (W=4096), median of 96 decode steps per position, then the reference position
  (4K) again: the long prefills heat the GPU to its power cap and later decode steps run
  slower at any position, so the 4K reference is the mean of the measurements before and
  after; vanilla dense vLLM as far as the model's positions go.
* ``recompute``: the paper's comparison: per-token cost of sliding window with
  re-computation at W (one W-token prefill per generated token) against the sink policy's
  decode step at the same window, at batch 1 and batch 64. The vanilla engine also times its
  own decode step at W tokens of context in the same run: the ceiling of the speed-up is
  (W-token prefill) / (decode step at W context), and the sink's speed-up is reported as a
  fraction of it. Decode steps are timed as ``decode_step.py`` times them: ``pipelined``
  (wall time of ``--recompute-decode`` free-running steps over their number: vLLM overlaps
  the host's preparation of a step with the device's work on the one before, as a server
  runs) and ``synced`` (median step with a device synchronisation after each: every
  microsecond of host work shows). The speed-up and its fraction of the ceiling use the
  pipelined step; the synced ones are reported beside them.
* ``overhead-cpu`` (not in the default parts; runs on the CPU): the ``overhead`` comparison
  with the real SmolLM2-135M in float32, 32 requests of 128 + 64 tokens, engines in the
  order vanilla, sink, sink, vanilla, ``--cpu-rounds`` timed rounds each; the ratio of
  summed output tokens over summed time.
* ``budget``: many concurrent 32K-token streams (32,256-token prompt + 512 generated) in a
  fixed KV budget (``num_gpu_blocks_override``, default 8,192 pages of 16 tokens = 4 dense
  streams): how many run at once (peak), preemptions, and aggregate tokens/s, sink against
  dense. Dense runs ``budget / pages-per-stream`` streams at a time (more would only preempt
  each other); the sink policy admits as many as its page bound lets it (vllm-sink's
  admit check), never preempting.

Speed runs use ``load_format="dummy"``: random weights of the real size (a hand-written
Llama-3-8B config), no weight files. Writes ``benchmarks/results/throughput.json``, a
markdown table next to it, and ``throughput_latency.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from engine_bench import LLAMA3_8B, cpu_name, decode_phase, decode_step_ms, engine_kwargs, model_dir, policy_kwargs
from workers import emit, provenance, serve_worker, spawn

RESULTS = Path(__file__).parent / "results"


def cpu_engine_kwargs(task: dict) -> dict:
    """The CPU overhead part: the real SmolLM2-135M in float32, same settings for both."""
    kw = dict(dtype="float32", block_size=16, max_num_seqs=task["max_num_seqs"], enable_prefix_caching=False,
              kv_cache_memory_bytes=512 << 20, max_num_batched_tokens=2048)
    kw.update(policy_kwargs(task["policy"], task["window"], task["max_len"]))
    return kw


# --------------------------------------------------------------------------- workers
def budget_run(llm, task: dict, prompt) -> dict:
    """Serve ``task["streams"]`` streams of ``prompt + output`` tokens at once in a KV pool of
    ``task["budget_pages"]`` pages; record concurrency, preemptions and tokens/s."""
    from tqdm import tqdm
    from vllm import SamplingParams

    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    n, P, G = task["streams"], task["prompt"], task["output"]
    params = SamplingParams(max_tokens=G, temperature=0, ignore_eos=True)
    for i in range(n):
        engine.add_request(f"b{i}", prompt(P), params)
    reqs = dict(sched.requests)
    peak, running_sum, steps = 0, 0, 0
    bar = tqdm(total=n * (P + G), desc=f"{task['policy']} streams", unit="tok", unit_scale=True, mininterval=5)
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        running = len(sched.running)
        peak = max(peak, running)
        running_sum += running
        steps += 1
        done = sum(r.num_computed_tokens for r in reqs.values())
        bar.update(max(0, done - bar.n))
    wall = time.perf_counter() - t0
    bar.close()
    pool = sched.kv_cache_manager.block_pool.num_gpu_blocks - 1  # less vLLM's null page
    n_out = sum(len(r.output_token_ids) for r in reqs.values())
    return dict(wall_s=wall, streams=n, peak_concurrent=peak, mean_concurrent=running_sum / steps,
                preemptions=sum(r.num_preemptions for r in reqs.values()), pool_pages=pool,
                tokens=n * (P + G), tokens_per_s=n * (P + G) / wall,
                output_tokens=n_out, output_tok_s=n_out / wall)


def worker(task: dict) -> dict:
    """Runs inside a subprocess: one engine, one measurement."""
    import random

    import torch
    from vllm import LLM, SamplingParams

    import vllm_sink

    vllm_sink.register()  # the kv_policy keywords of LLM(...)

    kind = task["kind"]
    if task.get("device") == "cpu":
        from vllm_sink import assets

        llm = LLM(str(assets.model_dir()), **cpu_engine_kwargs(task))
        vocab = 49152 - 10
    else:
        llm = LLM(str(model_dir()), **engine_kwargs(task["policy"], task.get("window", 4096), task["max_len"],
                                                     task.get("max_num_seqs", 256), task.get("engine")))
        vocab = LLAMA3_8B["vocab_size"] - 10
    rng = random.Random(0)

    def prompt(n):
        return {"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(n)]}

    out = {"task": task, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()}
    if kind in ("overhead", "overhead_cpu"):
        # Every request has a prompt of its own (the warm-up's and each round's too): a prompt
        # sent twice would let the sink engine resume the stream the first one left (sessions
        # are on by default), a prefill vanilla (prefix caching off) does again.
        params = SamplingParams(max_tokens=task["output"], temperature=0, ignore_eos=True)
        llm.generate([prompt(task["prompt"]) for _ in range(task.get("warmup", 8))], params, use_tqdm=False)
        dt, n_out, rounds = 0.0, 0, []
        for _ in range(task.get("rounds", 1)):
            prompts = [prompt(task["prompt"]) for _ in range(task["requests"])]
            t = time.perf_counter()
            res = llm.generate(prompts, params, use_tqdm=True)
            rounds.append(time.perf_counter() - t)
            dt += rounds[-1]
            n_out += sum(len(r.outputs[0].token_ids) for r in res)
        out.update(seconds=dt, output_tokens=n_out, output_tok_s=n_out / dt, round_seconds=rounds)
    elif kind == "latency":
        engine = llm.llm_engine
        rows = []
        for pos in task["positions"]:
            params = SamplingParams(max_tokens=task["decode"] + 1, temperature=0, ignore_eos=True)
            engine.add_request(f"pos-{pos}", prompt(pos), params)
            rows.append(dict(position=pos, **decode_step_ms(engine, torch.cuda.synchronize)))
            emit("note", rows[-1])
        out.update(rows=rows)
    elif kind == "recompute":
        W, batch, decode, sync = task["window"], task["batch"], task["decode"], torch.cuda.synchronize
        engine = llm.llm_engine
        decode_phase(engine, 1, 64, 8, prompt, sync, "warm")  # every phase once, CUDA graphs included
        if task["policy"] == "full":
            # Sliding window with re-computation: each generated token costs a fresh pass over
            # the last W tokens (a W-token prefill), for every stream in the batch.
            prompts = [prompt(W) for _ in range(batch)]
            params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
            llm.generate(prompts[:2], params, use_tqdm=False)
            times = []
            for _ in range(task["repeats"]):
                t = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                times.append(time.perf_counter() - t)
            times.sort()
            out.update(ms_per_token_step=1000 * times[len(times) // 2])
            # The same engine's own decode step at W tokens of context (the ceiling's divisor).
            out.update(decode_at_window=decode_phase(engine, batch, W, decode, prompt, sync, "window"))
        else:
            # Sink policy: batch streams already past the window (every step attends to the
            # sink and W tokens; a page leaves every 16 tokens); then, as a control, the same
            # engine with streams that evict nothing during their decode steps.
            evicting = decode_phase(engine, batch, W + 512, decode, prompt, sync, "past")
            control = decode_phase(engine, batch, W - decode - 48, decode, prompt, sync, "before")
            out.update(ms_per_token_step=evicting["pipelined_ms"], evicting=evicting, before_eviction=control)
    elif kind == "budget":
        out.update(budget_run(llm, task, prompt))
    llm.llm_engine.engine_core.shutdown()
    return out


def run_task(task: dict, vanilla_runner: str = "default") -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_USE_FLASHINFER_SAMPLER="0", PYTHONUNBUFFERED="1")
    # vllm-sink runs on vLLM's V1 model runner; vanilla vLLM on its default (V2 on the GPU
    # for dense models) unless asked for V1.
    if task["policy"] == "sink" or vanilla_runner == "v1":
        env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    else:
        env.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    task = dict(task, model_runner="V1" if env.get("VLLM_USE_V2_MODEL_RUNNER") == "0" else "default")
    return spawn(__file__, task, env=env, on_note=lambda row: print("   ", json.dumps(row), flush=True),
                 label=f"{task['kind']} {task['policy']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="overhead,latency,recompute,budget",
                   help="comma-separated: overhead, latency, recompute, budget (GPU); overhead-cpu (CPU)")
    p.add_argument("--budget-pages", type=int, default=8192, help="KV pool of the budget part (16-token pages)")
    p.add_argument("--budget-streams", default="8,32", help="streams submitted in the budget part: dense,sink")
    p.add_argument("--cpu-rounds", type=int, default=4, help="timed rounds per engine in overhead-cpu")
    p.add_argument("--batches", default="1,64", help="batch sizes of the recompute part")
    p.add_argument("--recompute-decode", type=int, default=128,
                   help="decode steps timed per measurement in the recompute part")
    p.add_argument("--recompute-policies", default="full,sink",
                   help="engines of the recompute part (a partial run keeps the other side's "
                        "earlier result in --out: not a side-by-side ratio)")
    p.add_argument("--vanilla-runner", choices=("default", "v1"), default="default",
                   help="vanilla vLLM's model runner (default: vLLM's choice)")
    p.add_argument("--positions", default="1024,4096,16384,65536,262144,1048576")
    p.add_argument("--reference-position", type=int, default=4096,
                   help="latency: the position the longest is compared with (measured again at the end)")
    p.add_argument("--out", default=str(RESULTS / "throughput.json"))
    p.add_argument("--fresh", action="store_true", help="replace --out instead of merging into it")
    p.add_argument("--report", metavar="JSON", help="only rebuild the table and plot from a results file")
    p.add_argument("--runs", nargs="+", metavar="JSON",
                   help="only tabulate the recompute rows of several results files, one row per "
                        "invocation and batch (the run-to-run spread), into --out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text())["results"], Path(args.out))
        return
    if args.runs:
        recompute_runs({Path(f).name: json.loads(Path(f).read_text())["results"] for f in args.runs}, Path(args.out))
        return
    if args.worker:
        serve_worker(worker, args.worker)
        return

    from tqdm import tqdm

    parts = args.parts.split(",")
    positions = [int(x) for x in args.positions.split(",")]
    tasks = []
    if "overhead" in parts:
        for policy in ("full", "sink"):
            tasks.append(dict(kind="overhead", policy=policy, window=4096, max_len=8192, prompt=512, output=128, requests=256))
    if "latency" in parts:
        # The reference position is measured again after the longest: a 1M-token prefill heats the
        # GPU (it runs at its power cap), and the decode steps after it are slower at any
        # position, so the reference is taken before and after the long streams.
        if args.reference_position not in positions:
            raise SystemExit(f"--reference-position {args.reference_position} is not in --positions")
        tasks.append(dict(kind="latency", policy="sink", window=4096, max_len=max(positions) + 128, positions=positions + [args.reference_position], decode=96, max_num_seqs=4, reference_position=args.reference_position))
        tasks.append(dict(kind="latency", policy="full", max_len=8192, positions=[p for p in positions if p + 64 <= 8192], decode=96, max_num_seqs=4))
    if "recompute" in parts:
        for batch in (int(x) for x in args.batches.split(",")):
            if "full" in args.recompute_policies:
                tasks.append(dict(kind="recompute", policy="full", window=4096, max_len=4096 + args.recompute_decode + 64, batch=batch, repeats=5, decode=args.recompute_decode, max_num_seqs=max(batch, 8)))
            if "sink" in args.recompute_policies:
                tasks.append(dict(kind="recompute", policy="sink", window=4096, max_len=16384, batch=batch, decode=args.recompute_decode, max_num_seqs=max(batch, 8)))
    if "overhead-cpu" in parts:
        # Short requests that never evict, on the CPU (real SmolLM2, float32): vanilla, sink,
        # sink, vanilla, so slow drifts of the machine fall on both sides alike.
        for i, policy in enumerate(("full", "sink", "sink", "full")):
            tasks.append(dict(kind="overhead_cpu", device="cpu", policy=policy, repeat=i // 2 if policy == "full" else i - 1,
                              window=1024, max_len=2048, prompt=128, output=64, requests=32, warmup=4,
                              rounds=args.cpu_rounds, max_num_seqs=32))
    if "budget" in parts:
        # 32K-token streams; the 8B shape is given 128K positions (as Llama-3.1) so dense can
        # hold one. Same pool, same step budget; dense takes whole 8K-token prefill steps for
        # one stream, the sink 512-token chunks per stream (its in-flight pages count against
        # its page bound).
        n_dense, n_sink = (int(x) for x in args.budget_streams.split(","))
        common = dict(kind="budget", window=4096, max_len=32768, prompt=32256, output=512,
                      budget_pages=args.budget_pages)
        eng = dict(num_gpu_blocks_override=args.budget_pages, max_num_batched_tokens=8192,
                   hf_overrides={"max_position_embeddings": 131072})
        tasks.append(dict(common, policy="full", streams=n_dense, max_num_seqs=args.budget_pages // 2048, engine=eng))
        tasks.append(dict(common, policy="sink", streams=n_sink, max_num_seqs=n_sink,
                          engine=dict(eng, long_prefill_token_threshold=512)))
    invocation, prov = time.strftime("%Y-%m-%dT%H:%M:%S"), provenance(__file__)
    results = []
    for task in tqdm(tasks, desc="engines"):
        results.append(dict(run_task(task, args.vanilla_runner), invocation=invocation,
                            plugin=prov["plugin"], command=prov["command"]))
    out = Path(args.out)
    if out.exists() and not args.fresh:
        # Keep the other parts' results (a comparison's two sides always come from one
        # invocation: each part runs both of its engines).
        new_keys = {result_key(r) for r in results}
        results = [r for r in json.loads(out.read_text())["results"] if result_key(r) not in new_keys] + results
    report(results, out)


def result_key(r: dict) -> tuple:
    return (r["task"]["kind"], r["task"]["policy"], r["task"].get("batch"), r["task"].get("repeat"))


def recompute_fraction(full: dict, sink: dict, mode: str = "pipelined") -> dict:
    """The re-computation speed-up of one batch (``full`` and ``sink``: the two recompute
    results of one invocation), its ceiling (re-computation over vanilla's own decode step at W)
    and the fraction of it the sink reaches, with decode steps timed ``mode``."""
    key = f"{mode}_ms"
    dec, past, before = full["decode_at_window"][key], sink["evicting"][key], sink["before_eviction"][key]
    speedup, ceiling = full["ms_per_token_step"] / past, full["ms_per_token_step"] / dec
    return dict(vanilla_decode_ms=dec, sink_past_ms=past, sink_before_ms=before, speedup=speedup,
                ceiling=ceiling, fraction_of_ceiling=speedup / ceiling, past_over_before=past / before)


def recompute_runs(files: dict[str, list[dict]], out: Path) -> None:
    """One row per invocation and batch of the recompute part: the speed-up, the same run's
    ceiling and the sink's decode step past the window against before any eviction, pipelined
    and synced; then the median fraction of the ceiling per batch. ``files``: each results
    file's name and results. Each row's two sides come from one invocation."""
    import statistics

    rows = []
    for name, results in files.items():
        by = {(r["invocation"], r["task"]["batch"], r["task"]["policy"]): r
              for r in results if r["task"]["kind"] == "recompute"}
        for inv, batch in sorted({(i, b) for i, b, _ in by}):
            f, s = by.get((inv, batch, "full")), by.get((inv, batch, "sink"))
            if not (f and s and "pipelined_ms" in f.get("decode_at_window", {})):
                continue
            rows.append(dict(file=name, invocation=inv, batch=batch, device=s["device"], plugin=s.get("plugin"),
                             runner=f["task"].get("model_runner"), recompute_ms=f["ms_per_token_step"],
                             pipelined=recompute_fraction(f, s), synced=recompute_fraction(f, s, "synced")))
    batches = sorted({r["batch"] for r in rows})
    medians = {mode: {b: statistics.median(r[mode]["fraction_of_ceiling"] for r in rows if r["batch"] == b)
                      for b in batches} for mode in ("pipelined", "synced")}
    lines = ["| results file | started | batch | re-computation, ms/token | decode steps | vanilla decode at W | sink past the window | "
             "speed-up | ceiling | fraction of the ceiling | sink past / before eviction |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for mode in ("pipelined", "synced"):
            m = r[mode]
            lines.append(f"| {r['file']} | {r['invocation']} | {r['batch']} | {r['recompute_ms']:.2f} | {mode} | {m['vanilla_decode_ms']:.2f} | "
                         f"{m['sink_past_ms']:.2f} | {m['speedup']:.1f}x | {m['ceiling']:.1f}x | {m['fraction_of_ceiling']:.1%} | "
                         f"{m['past_over_before']:.3f} |")
    lines.append("")
    lines += [f"median fraction of the ceiling, {mode}: " + ", ".join(f"batch {b} {v:.1%}" for b, v in med.items())
              for mode, med in medians.items()]
    doc = dict(device=rows[0]["device"] if rows else None, runs=rows,
               median_fraction_of_ceiling={mode: {f"batch_{b}": v for b, v in med.items()}
                                           for mode, med in medians.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def repeated(rows: list[dict]) -> list[bool]:
    """For each latency row, whether its position was already measured earlier in the run."""
    seen, flags = set(), []
    for row in rows:
        flags.append(row["position"] in seen)
        seen.add(row["position"])
    return flags


def report(results: list[dict], out: Path) -> None:
    import vllm

    out.parent.mkdir(parents=True, exist_ok=True)
    gpu = [r for r in results if r["task"]["kind"] != "overhead_cpu"]
    doc = {"device": (gpu or results or [{}])[0].get("device"), "vllm": vllm.__version__,
           "model": "Llama-3-8B shape, dummy weights, bfloat16",
           "plugins": sorted({r["plugin"] for r in results if r.get("plugin")}), "results": results}
    lines = ["| measurement | vanilla vLLM | sink | ratio |", "|---|---|---|---|"]
    by = {result_key(r)[:3]: r for r in results if r["task"]["kind"] != "overhead_cpu"}
    if ("overhead", "full", None) in by and ("overhead", "sink", None) in by:
        v, s = by[("overhead", "full", None)]["output_tok_s"], by[("overhead", "sink", None)]["output_tok_s"]
        lines.append(f"| short requests, output tok/s (256 x 512+128) | {v:,.0f} | {s:,.0f} | {s / v:.3f} |")
    cpu = [r for r in results if r["task"]["kind"] == "overhead_cpu"]
    if cpu:
        tok = {pol: sum(r["output_tokens"] for r in cpu if r["task"]["policy"] == pol) for pol in ("full", "sink")}
        sec = {pol: sum(r["seconds"] for r in cpu if r["task"]["policy"] == pol) for pol in ("full", "sink")}
        v, s_ = tok["full"] / sec["full"], tok["sink"] / sec["sink"]
        t = cpu[0]["task"]
        doc["overhead_cpu"] = dict(device=cpu[0]["device"], vanilla_tok_s=v, sink_tok_s=s_, ratio=s_ / v,
                                   runs=[round(r["output_tok_s"], 2) for r in cpu])
        lines.append(f"| CPU ({cpu[0]['device']}), SmolLM2-135M fp32: short requests, output tok/s ({t['requests']} x {t['prompt']}+{t['output']}, 2 engines each, ABBA, {t.get('rounds', 1)} rounds per engine) | {v:,.1f} | {s_:,.1f} | {s_ / v:.3f} |")
    for batch in sorted({r["task"]["batch"] for r in results if r["task"]["kind"] == "recompute"}):
        f, s = by.get(("recompute", "full", batch)), by.get(("recompute", "sink", batch))
        if not (f and s):
            continue
        p, y = recompute_fraction(f, s), recompute_fraction(f, s, "synced")
        doc.setdefault("recompute_speedup", {})[f"batch_{batch}"] = dict(
            speedup=p["speedup"], ceiling=p["ceiling"], fraction_of_ceiling=p["fraction_of_ceiling"],
            synced=dict(speedup=y["speedup"], ceiling=y["ceiling"], fraction_of_ceiling=y["fraction_of_ceiling"]))
        lines.append(f"| ms per generated token, batch {batch}, W=4096: re-computation vs sink (decode step pipelined) | "
                     f"{f['ms_per_token_step']:.2f} | {p['sink_past_ms']:.2f} | {p['speedup']:.1f}x |")
        for mode, m in (("pipelined", p), ("synced", y)):
            lines.append(f"| decode step at 4,096 context, batch {batch}, {mode} (ceiling {m['ceiling']:.1f}x; sink "
                         f"reaches {m['fraction_of_ceiling']:.1%}) | {m['vanilla_decode_ms']:.2f} | {m['sink_past_ms']:.2f} | "
                         f"{m['sink_past_ms'] / m['vanilla_decode_ms']:.3f} |")
        for mode, m in (("pipelined", p), ("synced", y)):
            lines.append(f"| sink decode step past the window vs before any eviction, batch {batch}, same engine, {mode} | "
                         f"{m['sink_before_ms']:.2f} | {m['sink_past_ms']:.2f} | {m['past_over_before']:.3f} |")
    bd, bs = by.get(("budget", "full", None)), by.get(("budget", "sink", None))
    if bd and bs:
        t = bs["task"]
        lines.append(f"| {t['prompt'] + t['output']:,}-token streams in {t['budget_pages']:,} KV pages: peak concurrent (preemptions) | {bd['peak_concurrent']} ({bd['preemptions']}) | {bs['peak_concurrent']} ({bs['preemptions']}) | {bs['peak_concurrent'] / bd['peak_concurrent']:.1f}x |")
        lines.append(f"| same: aggregate tokens/s (prompt + output) | {bd['tokens_per_s']:,.0f} | {bs['tokens_per_s']:,.0f} | {bs['tokens_per_s'] / bd['tokens_per_s']:.2f}x |")
        lines.append(f"| same: output tokens/s | {bd['output_tok_s']:,.0f} | {bs['output_tok_s']:,.0f} | {bs['output_tok_s'] / bd['output_tok_s']:.2f}x |")
        doc["budget"] = dict(concurrency_ratio=bs["peak_concurrent"] / bd["peak_concurrent"],
                             tokens_per_s_ratio=bs["tokens_per_s"] / bd["tokens_per_s"])
    lat = {r["task"]["policy"]: r for r in results if r["task"]["kind"] == "latency" and not r["task"].get("repeat")}
    if "full" in lat and "sink" in lat and lat["full"].get("invocation") != lat["sink"].get("invocation"):
        # Only sides measured in one run are put side by side; the positions dense vLLM
        # could reach are still known from its task.
        lat["full"] = dict(lat["full"], rows=[])
    if "sink" in lat:
        vrows = {row["position"]: row for row in lat.get("full", {}).get("rows", [])}
        reachable = set(lat["full"]["task"]["positions"]) if "full" in lat else None
        rows = lat["sink"]["rows"]
        for row, again in zip(rows, repeated(rows)):
            v = None if again else vrows.get(row["position"])
            past = reachable is not None and row["position"] not in reachable
            vanilla = f"{v['decode_ms_median']:.2f}" if v else ("n/a (past the model)" if past else "")
            ratio = f"{row['decode_ms_median'] / v['decode_ms_median']:.3f}" if v else ""
            label = " (again, after the longer streams)" if again else ""
            lines.append(f"| decode ms/token at position {row['position']:,}{label} | {vanilla} | {row['decode_ms_median']:.2f} | {ratio} |")
        longest = max(rows, key=lambda r: r["position"])
        ref_pos = lat["sink"]["task"].get("reference_position", rows[0]["position"])
        first = [r["decode_ms_median"] for r in rows if r["position"] == ref_pos]
        ref = sum(first) / len(first)
        doc["latency_flatness_1M_over_4K"] = longest["decode_ms_median"] / ref
        doc["latency_reference_4K_ms"] = first
        lines.append(f"| decode ms/token at position {longest['position']:,} over {ref_pos:,} "
                     f"(mean of the {len(first)} measurements there) | | | {longest['decode_ms_median'] / ref:.3f} |")
    table = "\n".join(lines)
    doc["note"] = ("Each engine runs in its own subprocess; the two sides of every row come from one "
                   "invocation of benchmarks/throughput.py (each result's 'invocation'). Vanilla vLLM "
                   "on its default model runner where 'model_runner' says so, vllm-sink on V1.")
    out.write_text(json.dumps(doc, indent=2))
    plugins = ", plugin " + " and ".join(doc["plugins"]) if doc["plugins"] else ""
    out.with_suffix(".md").write_text(f"Device: {doc['device']}, vLLM {doc['vllm']}{plugins}, {doc['model']}\n\n{table}\n\n{doc['note']}\n")
    print(table)
    if "sink" in lat:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for policy, label in (("sink", "vllm-sink (W=4096)"), ("full", "vanilla vLLM (dense)")):
            rows = lat.get(policy, {}).get("rows", [])
            flags = repeated(rows)
            once = sorted((r for r, again in zip(rows, flags) if not again), key=lambda r: r["position"])
            again = [r for r, a in zip(rows, flags) if a]
            if once:
                ax.plot([r["position"] for r in once], [r["decode_ms_median"] for r in once], "o-", label=label)
            if again:
                ax.plot([r["position"] for r in again], [r["decode_ms_median"] for r in again], "x",
                        color="tab:red", label="measured again, after the 1M-token prefill")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("stream position (tokens)")
        ax.set_ylabel("decode latency (ms/token, median)")
        ax.set_title(f"Decode latency vs position, {doc['device']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_name("throughput_latency.png"), dpi=120)


if __name__ == "__main__":
    main()
