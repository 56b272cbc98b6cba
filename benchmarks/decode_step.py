"""The sink's decode step against vanilla vLLM's at the same attended context, side by side.

    python benchmarks/decode_step.py                          # GPU: batches 1, 64, 256
    python benchmarks/decode_step.py --batches 1:4096,64:4096,256:2048 --profile
    python benchmarks/decode_step.py --cpu --batches 1:256,8:256   # CPU smoke (SmolLM2, float32)

For each ``batch:context`` pair, three measurements, each engine in its own subprocess:

* ``vanilla``: vanilla vLLM (V1 model runner, the one the sink policy runs on), ``batch``
  prompts of ``context`` tokens, then ``--decode`` decode steps (context grows from
  ``context`` to ``context + decode``);
* ``sink past``: the sink policy with ``kv_window = context``, prompts of ``context + 512``
  tokens: every decode step attends to the sink plus a full window (about ``context`` keys),
  pages leave every 16 tokens and the sink is re-anchored;
* ``sink before``: the same sink engine, prompts short enough that nothing is evicted
  during the decode steps: the plugin's cost when it has nothing to do.

Two timings per measurement:

* ``pipelined``: wall time of the decode phase over the number of decode steps, the engine
  stepping freely (vLLM's asynchronous scheduling overlaps the host's preparation of a step
  with the GPU's work on the previous one: what a server sees);
* ``synced``: the median step with a device synchronisation after every step (host and
  device work in series: every microsecond of host work shows).

``--profile`` adds the host time per step spent in the scheduler, the runner's
``execute_model``, and the plugin's hooks (``_update_states`` and ``_prepare_inputs`` wraps,
the manager's page release), from wrapped timers, over each round: in the pipelined round
a piece's time includes its waits for the device; in the synced round it does not. Each
round also counts Python's garbage collections.

Speed runs use ``load_format="dummy"``: the Llama-3-8B shape in bfloat16 with CUDA graphs.
Writes ``benchmarks/results/decode_step.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from engine_bench import LLAMA3_8B, Timers, cpu_name, decode_phase, engine_kwargs, model_dir, policy_kwargs
from workers import emit, provenance, serve_worker, spawn

RESULTS = Path(__file__).parent / "results"


# --------------------------------------------------------------------------- worker side
def _instrument(llm, timers: Timers) -> None:
    core = llm.llm_engine.engine_core.engine_core
    runner = core.model_executor.driver_worker.worker.model_runner
    timers.wrap(core.scheduler, "schedule", "scheduler.schedule")
    timers.wrap(core.scheduler, "update_from_output", "scheduler.update_from_output")
    timers.wrap(runner, "execute_model", "runner.execute_model")
    timers.wrap(runner, "_update_states", "runner._update_states")
    timers.wrap(runner, "_prepare_inputs", "runner._prepare_inputs")
    hook = getattr(runner, "_vllm_sink_hook", None)
    if hook is not None:
        timers.wrap(hook, "after_update_states", "sink.after_update_states")
        timers.wrap(hook.frames, "after_prepare_inputs", "sink.after_prepare_inputs")
        timers.wrap(hook.kv, "reanchor", "sink._reanchor")
        for m in core.scheduler.kv_cache_manager.coordinator.single_type_managers:
            timers.wrap(m, "remove_skipped_blocks", "sink.remove_skipped_blocks")


def _trace(engine, batch: int, prompt_len: int, prompt, sync, path: Path, steps: int = 48) -> None:
    """The torch profiler over ``steps`` pipelined decode steps: the op tables (by device
    time and by host time) and a Chrome trace."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"trace-{path.stem}-{i}", prompt(prompt_len), params)
    started: set[str] = set()
    while len(started) < batch:
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    while engine.has_unfinished_requests():
        engine.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    ka = prof.key_averages()
    dev = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    path.with_suffix(".txt").write_text(
        f"{steps} decode steps, batch {batch}\n\nby device time\n" + ka.table(sort_by=dev, row_limit=45)
        + "\n\nby host time\n" + ka.table(sort_by="self_cpu_time_total", row_limit=45))
    prof.export_chrome_trace(str(path.with_suffix(".json")))


def worker(task: dict) -> dict:
    import random

    import torch
    from vllm import LLM

    import vllm_sink

    vllm_sink.register()

    cpu = task.get("cpu", False)
    max_batch = max(b for b, _ in task["pairs"])
    if cpu:
        from vllm_sink import assets

        kw = dict(dtype="float32", block_size=16, max_num_seqs=max_batch, enable_prefix_caching=False,
                  kv_cache_memory_bytes=1 << 30, skip_tokenizer_init=True)
        kw.update(policy_kwargs(task["policy"], task["window"], task["max_len"]))
        llm = LLM(str(assets.model_dir()), **kw)
        vocab, sync, device = 49152 - 10, (lambda: None), cpu_name()
    else:
        kw = engine_kwargs(task["policy"], task["window"], task["max_len"], max_batch)
        llm = LLM(str(model_dir()), **kw)
        vocab, sync, device = LLAMA3_8B["vocab_size"] - 10, torch.cuda.synchronize, torch.cuda.get_device_name()
    rng = random.Random(0)

    def prompt(n):
        return {"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(n)]}

    timers = Timers()
    if task.get("profile"):
        _instrument(llm, timers)
    engine = llm.llm_engine
    decode = task["decode"]
    # Warm-up: one short request through every phase.
    decode_phase(engine, 1, 64, 8, prompt, sync, "warm")
    rows = []
    for batch, ctx in task["pairs"]:
        if task["policy"] == "sink":
            cases = [("sink past", ctx + 512), ("sink before", ctx - decode - 48)]
        else:
            cases = [("vanilla", ctx)]
        for name, plen in cases:
            res = decode_phase(engine, batch, plen, decode, prompt, sync, f"{name}-{batch}",
                                timers if task.get("profile") else None)
            rows.append(dict(case=name, batch=batch, context=ctx, prompt=plen, decode=decode, **res))
            if task.get("trace_dir") and batch in task.get("trace_batches", []):
                _trace(engine, batch, plen, prompt, sync,
                       Path(task["trace_dir"]) / f"{name.replace(' ', '_')}_b{batch}")
            emit("note", rows[-1])
    return dict(device=device, policy=task["policy"], rows=rows)


# --------------------------------------------------------------------------- parent side
def run_task(task: dict) -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_USE_FLASHINFER_SAMPLER="0",
               VLLM_USE_V2_MODEL_RUNNER="0", PYTHONUNBUFFERED="1")
    return spawn(__file__, task, env=env, on_note=lambda row: print("   ", json.dumps(row), flush=True))


def markdown(doc: dict) -> str:
    rows = {(r["case"], r["batch"]): r for res in doc["results"] for r in res["rows"]}
    lines = [
        f"Decode step, {doc['device']}, vLLM {doc['vllm']}, {doc['model']}; "
        f"`{doc['command']}`",
        "",
        "| batch | context | vanilla pipelined | sink past | ratio | sink before | ratio "
        "| vanilla synced | sink past synced | ratio | sink before synced | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch, ctx in doc["pairs"]:
        v, p, b = rows[("vanilla", batch)], rows[("sink past", batch)], rows[("sink before", batch)]
        lines.append(
            f"| {batch} | {ctx} | {v['pipelined_ms']:.2f} ms | {p['pipelined_ms']:.2f} ms | "
            f"{p['pipelined_ms'] / v['pipelined_ms']:.3f}x | {b['pipelined_ms']:.2f} ms | "
            f"{b['pipelined_ms'] / v['pipelined_ms']:.3f}x | {v['synced_ms']:.2f} ms | {p['synced_ms']:.2f} ms | "
            f"{p['synced_ms'] / v['synced_ms']:.3f}x | {b['synced_ms']:.2f} ms | {b['synced_ms'] / v['synced_ms']:.3f}x |"
        )
    for key, mode, title in (("host_ms_per_step", "pipelined", "pipelined (a piece's time includes its waits for the device)"),
                             ("host_ms_per_step_synced", "synced", "synced (host and device in series: no waits)")):
        prof = [r for r in (rows.get(k) for k in rows) if r and r.get(key)]
        if not prof:
            continue
        labels = sorted({k for r in prof for k in r[key]})
        lines += ["", f"Host time per engine step (ms), from wrapped timers, {title}:", "",
                  "| case | batch | " + " | ".join(labels) + " | gc collections (gen 0, 1, 2) |",
                  "|---|---|" + "---|" * (len(labels) + 1)]
        for r in prof:
            h = r[key]
            gcs = ", ".join(str(x) for x in r.get(f"gc_collections_{mode}", []))
            lines.append(f"| {r['case']} | {r['batch']} | " + " | ".join(f"{h[k]:.3f}" if k in h else "" for k in labels)
                         + f" | {gcs} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on the CPU with SmolLM2-135M in float32 (smoke)")
    p.add_argument("--profile", action="store_true", help="also time the host-side pieces of each step")
    p.add_argument("--batches", default="1:4096,64:4096,256:2048",
                   help="batch:context pairs (the sink's window is the context)")
    p.add_argument("--decode", type=int, default=128, help="decode steps timed per measurement")
    p.add_argument("--trace-dir", help="write torch-profiler tables and traces here")
    p.add_argument("--trace-batches", default="1,64", help="batches traced with --trace-dir")
    p.add_argument("--out", default=str(RESULTS / "decode_step.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        serve_worker(worker, args.worker)
        os._exit(0)  # vLLM's teardown at exit can abort after the engine is shut down
    pairs = [tuple(int(x) for x in s.split(":")) for s in args.batches.split(",")]
    results = []
    # One engine per (policy, window): pairs sharing a window share the engine.
    for window in sorted({c for _, c in pairs}, reverse=True):
        group = [(b, c) for b, c in pairs if c == window]
        for policy in ("full", "sink"):
            max_len = window + 1024 if policy == "full" else 1 << 20
            task = dict(policy=policy, window=window, pairs=group, decode=args.decode,
                        profile=args.profile, cpu=args.cpu, max_len=max_len,
                        trace_dir=args.trace_dir and str(Path(args.trace_dir).resolve()),
                        trace_batches=[int(x) for x in args.trace_batches.split(",")])
            print(f"== {policy} W={window} batches {[b for b, _ in group]}", flush=True)
            results.append(run_task(task))
    import vllm

    doc = dict(device=results[0]["device"], vllm=vllm.__version__,
               model="SmolLM2-135M float32" if args.cpu else "Llama-3-8B shape, dummy weights, bf16, CUDA graphs",
               **provenance(__file__),
               pairs=pairs, results=results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
