"""Throughput and latency of the sink policy against vanilla vLLM, measured side by side.

    python benchmarks/throughput.py [--model-config llama3-8b] [--parts overhead,latency,recompute]

Parts (each engine runs in its own subprocess, so every measurement starts from a clean GPU):

* ``overhead``: short requests that never evict (prompt 512 + 128 output tokens, 256
  requests): sink against vanilla vLLM, same settings. Ratio of output tokens/s.
* ``latency``: decode latency per token against stream position (4K ... 1M tokens) with the
  sink policy (W=4096); vanilla dense vLLM as far as the model's positions go.
* ``recompute``: the paper's comparison: per-token cost of sliding window with
  re-computation at W (one W-token prefill per generated token) against the sink policy's
  decode step at the same window, at batch 1 and batch 64.

Speed runs use ``load_format="dummy"``: random weights of the real size (a hand-written
Llama-3-8B config), no weight files. Writes ``benchmarks/results/throughput.json``, a
markdown table next to it, and ``throughput_latency.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_hidden_layers": 32, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192, "rope_theta": 500000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}


def model_dir() -> Path:
    d = Path(tempfile.gettempdir()) / "vllm-sink-llama3-8b-shape"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(LLAMA3_8B))
    return d


def engine_kwargs(policy: str, window: int, max_len: int, max_num_seqs: int) -> dict:
    kw = dict(load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, block_size=16,
              max_num_seqs=max_num_seqs, gpu_memory_utilization=0.85, enable_prefix_caching=False)
    if policy == "sink":
        kw.update(kv_policy="sink", sink_pages=1, kv_window=window, max_stream_len=max_len)
    else:
        kw.update(max_model_len=max_len)
    return kw


# --------------------------------------------------------------------------- workers
def decode_step_ms(engine, sync) -> dict:
    """Step ``engine`` (an ``LLMEngine`` with one request added) until it finishes; the
    median and mean time of the steps after its first token (pure decode steps)."""
    step_times, produced = [], 0
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step()
        sync()
        dt = time.perf_counter() - t
        for o in outs:
            n = len(o.outputs[0].token_ids) if o.outputs else 0
            if n > produced:
                if produced >= 1:  # after the first token: pure decode steps
                    step_times.append(dt)
                produced = n
    step_times.sort()
    return dict(decode_ms_median=1000 * step_times[len(step_times) // 2],
                decode_ms_mean=1000 * sum(step_times) / len(step_times))


def worker(task: dict) -> dict:
    """Runs inside a subprocess: one engine, one measurement."""
    import random

    import torch
    from vllm import LLM, SamplingParams

    import vllm_sink  # noqa: F401

    kind = task["kind"]
    llm = LLM(str(model_dir()), **engine_kwargs(task["policy"], task.get("window", 4096), task["max_len"], task.get("max_num_seqs", 256)))
    rng = random.Random(0)
    vocab = LLAMA3_8B["vocab_size"] - 10

    def prompt(n):
        return {"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(n)]}

    out = {"task": task, "device": torch.cuda.get_device_name()}
    if kind == "overhead":
        prompts = [prompt(task["prompt"]) for _ in range(task["requests"])]
        params = SamplingParams(max_tokens=task["output"], temperature=0, ignore_eos=True)
        llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up
        t = time.perf_counter()
        res = llm.generate(prompts, params, use_tqdm=True)
        dt = time.perf_counter() - t
        n_out = sum(len(r.outputs[0].token_ids) for r in res)
        out.update(seconds=dt, output_tokens=n_out, output_tok_s=n_out / dt)
    elif kind == "latency":
        engine = llm.llm_engine
        rows = []
        for pos in task["positions"]:
            params = SamplingParams(max_tokens=task["decode"] + 1, temperature=0, ignore_eos=True)
            engine.add_request(f"pos-{pos}", prompt(pos), params)
            rows.append(dict(position=pos, **decode_step_ms(engine, torch.cuda.synchronize)))
            print(json.dumps(rows[-1]), flush=True)
        out.update(rows=rows)
    elif kind == "recompute":
        W, batch = task["window"], task["batch"]
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
        else:
            # Sink policy: batch streams already past the window, timed per decode step.
            params = SamplingParams(max_tokens=task["decode"], temperature=0, ignore_eos=True)
            engine = llm.llm_engine
            for i in range(batch):
                engine.add_request(f"s{i}", prompt(W + 512), params)
            step_times = []
            while engine.has_unfinished_requests():
                t = time.perf_counter()
                outs = engine.step()
                torch.cuda.synchronize()
                dt = time.perf_counter() - t
                if outs and all(len(o.outputs[0].token_ids) >= 2 for o in outs) and len(outs) == batch:
                    step_times.append(dt)
            step_times.sort()
            out.update(ms_per_token_step=1000 * step_times[len(step_times) // 2], steps=len(step_times))
    llm.llm_engine.engine_core.shutdown()
    return out


def run_task(task: dict) -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_USE_FLASHINFER_SAMPLER="0", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(task)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
        elif line.startswith("{") or "Error" in line or "error" in line[:80]:
            print("   ", line.rstrip()[:300], flush=True)
    proc.wait()
    if result is None:
        raise RuntimeError(f"task failed: {task}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="overhead,latency,recompute")
    p.add_argument("--positions", default="4096,16384,65536,262144,1048576")
    p.add_argument("--out", default=str(RESULTS / "throughput.json"))
    p.add_argument("--report", metavar="JSON", help="only rebuild the table and plot from a results file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text())["results"], Path(args.out))
        return
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    from tqdm import tqdm

    parts = args.parts.split(",")
    positions = [int(x) for x in args.positions.split(",")]
    tasks = []
    if "overhead" in parts:
        for policy in ("full", "sink"):
            tasks.append(dict(kind="overhead", policy=policy, window=4096, max_len=8192, prompt=512, output=128, requests=256))
    if "latency" in parts:
        tasks.append(dict(kind="latency", policy="sink", window=4096, max_len=max(positions) + 128, positions=positions, decode=32, max_num_seqs=4))
        tasks.append(dict(kind="latency", policy="full", max_len=8192, positions=[p for p in positions if p + 64 <= 8192], decode=32, max_num_seqs=4))
    if "recompute" in parts:
        for batch in (1, 64):
            tasks.append(dict(kind="recompute", policy="full", window=4096, max_len=4224, batch=batch, repeats=5, max_num_seqs=max(batch, 8)))
            tasks.append(dict(kind="recompute", policy="sink", window=4096, max_len=16384, batch=batch, decode=48, max_num_seqs=max(batch, 8)))
    results = []
    for task in tqdm(tasks, desc="engines"):
        results.append(run_task(task))
    report(results, Path(args.out))


def report(results: list[dict], out: Path) -> None:
    import vllm

    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"device": results[0]["device"] if results else None, "vllm": vllm.__version__,
           "model": "Llama-3-8B shape, dummy weights, bfloat16", "results": results}
    lines = ["| measurement | vanilla vLLM | sink | ratio |", "|---|---|---|---|"]
    by = {(r["task"]["kind"], r["task"]["policy"], r["task"].get("batch")): r for r in results}
    if ("overhead", "full", None) in by and ("overhead", "sink", None) in by:
        v, s = by[("overhead", "full", None)]["output_tok_s"], by[("overhead", "sink", None)]["output_tok_s"]
        lines.append(f"| short requests, output tok/s (256 x 512+128) | {v:,.0f} | {s:,.0f} | {s / v:.3f} |")
    for batch in (1, 64):
        f, s = by.get(("recompute", "full", batch)), by.get(("recompute", "sink", batch))
        if f and s:
            lines.append(f"| ms per generated token step, batch {batch}, W=4096: recompute vs sink | {f['ms_per_token_step']:.2f} | {s['ms_per_token_step']:.2f} | {f['ms_per_token_step'] / s['ms_per_token_step']:.1f}x |")
    lat = {r["task"]["policy"]: r for r in results if r["task"]["kind"] == "latency"}
    if "sink" in lat:
        vrows = {row["position"]: row for row in lat.get("full", {}).get("rows", [])}
        for row in lat["sink"]["rows"]:
            v = vrows.get(row["position"])
            vanilla = f"{v['decode_ms_median']:.2f}" if v else "n/a (past the model)"
            ratio = f"{row['decode_ms_median'] / v['decode_ms_median']:.3f}" if v else ""
            lines.append(f"| decode ms/token at position {row['position']:,} | {vanilla} | {row['decode_ms_median']:.2f} | {ratio} |")
        doc["latency_flatness_1M_over_4K"] = lat["sink"]["rows"][-1]["decode_ms_median"] / lat["sink"]["rows"][0]["decode_ms_median"]
    out.write_text(json.dumps(doc, indent=2))
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(f"Device: {doc['device']}, vLLM {doc['vllm']}, {doc['model']}\n\n{table}\n")
    print(table)
    if "sink" in lat:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for policy, label in (("sink", "vllm-sink (W=4096)"), ("full", "vanilla vLLM (dense)")):
            if policy in lat and lat[policy]["rows"]:
                xs = [r["position"] for r in lat[policy]["rows"]]
                ax.plot(xs, [r["decode_ms_median"] for r in lat[policy]["rows"]], "o-", label=label)
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
