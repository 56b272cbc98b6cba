"""Serving: `vllm bench serve` (vLLM's own load client) against `vllm serve --kv-policy sink`
and vanilla `vllm serve`, side by side in one run.

    python benchmarks/serve.py [--workloads a,b] [--out benchmarks/results/serve.json]

For each policy (vanilla first, then sink) the stock ``vllm serve`` starts on the Llama-3-8B
shape with dummy weights (bf16, vLLM's defaults: torch.compile and CUDA graphs) and the
SmolLM2 tokenizer, with nothing but the stock command and the policy's flags
(``--kv-policy sink --kv-window 4096``), and serves every workload. With ``--gpus`` (a
machine with several GPUs) the servers start at once, each on its own GPU, and the
workloads still run against one server at a time:

* ``a``: short chat-like requests that never evict: 512 prompt + 256 output tokens, 256
  prompts, concurrency 64.
* ``b``: long generations past the window: 1,024 prompt + 8,192 output tokens, 32 prompts,
  concurrency 32. Vanilla cannot pass the model's 8,192 positions: it generates as far as
  its context goes (8,192 - 1,024 = 7,168 tokens).
* ``p``: prefix sharing (vLLM's ``prefix_repetition`` dataset): 8 prefixes of 2,048 tokens,
  each request one of them + 256 tokens of its own, 256 output tokens, 512 prompts,
  concurrency 64. Both servers run vLLM's prefix caching (on by default); the table adds the
  prefix-cache hit rate (``vllm:prefix_cache_hits`` over ``_queries``).

Reports output tokens/s, TTFT and TPOT (mean, median, P99), and, from ``/metrics`` after
each workload, preemptions, pages evicted and whether the KV pool is whole again (every page
free, or held by a finished stream kept for resumption, which a new request reclaims). Writes
JSON and a markdown table (``serve.md``) next to it. Needs the CUDA build of vLLM with the
plugin installed (run it from outside the source tree, see ``shared/gpu`` staging), and
the ``vllm`` command on PATH.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine_bench import LLAMA3_8B, model_dir  # noqa: E402
from workers import provenance, scrape_metrics, stop_group, wait_healthy  # noqa: E402

SERVED = "llama3-8b-shape"
WORKLOADS = {
    "a": dict(input_len=512, output_len=256, num_prompts=256, concurrency=64),
    "b": dict(input_len=1024, output_len=8192, num_prompts=32, concurrency=32),
    "p": dict(input_len=2048 + 256, output_len=256, num_prompts=512, concurrency=64, prefix_len=2048, num_prefixes=8),
}
POLICY_FLAGS = {"full": [], "sink": ["--kv-policy", "sink", "--kv-window", "4096"]}


# --smoke: the same flow on the CPU in minutes (a 4-layer model of the same family, shorter
# workloads), to check the script, not to measure.
SMOKE_CONFIG = dict(LLAMA3_8B, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                    num_key_value_heads=2, num_hidden_layers=4)


class Server:
    def __init__(self, model: Path, policy: str, port: int, log: Path, extra: list[str] = (), gpu: str | None = None):
        self.url = f"http://127.0.0.1:{port}"
        cmd = ["vllm", "serve", str(model), "--load-format", "dummy", "--dtype", "bfloat16",
               "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
               "--disable-uvicorn-access-log", *POLICY_FLAGS[policy], *extra]
        self.cmd = cmd
        self.log = log
        self.started = time.time()
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu) if gpu is not None else None
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=tempfile.gettempdir(), env=env)

    def wait(self, timeout: float = 900) -> float:
        """Seconds from this server's launch until it is healthy."""
        wait_healthy(self.proc, self.url, self.log, timeout)
        return time.time() - self.started

    def stop(self) -> None:
        stop_group(self.proc)


def bench(model: Path, url: str, w: dict, out_dir: Path, name: str) -> dict:
    if "prefix_len" in w:
        data = ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(w["prefix_len"]),
                "--prefix-repetition-suffix-len", str(w["input_len"] - w["prefix_len"]),
                "--prefix-repetition-num-prefixes", str(w["num_prefixes"]),
                "--prefix-repetition-output-len", str(w["output_len"])]
    else:
        data = ["--dataset-name", "random", "--random-input-len", str(w["input_len"]),
                "--random-output-len", str(w["output_len"]), "--random-range-ratio", "0"]
    cmd = ["vllm", "bench", "serve", "--backend", "vllm", "--base-url", url, "--model", SERVED,
           "--tokenizer", str(model), *data, "--num-prompts", str(w["num_prompts"]),
           "--max-concurrency", str(w["concurrency"]), "--ignore-eos", "--seed", "0",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
           "--save-result", "--result-dir", str(out_dir), "--result-filename", name + ".json"]
    subprocess.run(cmd, check=True, cwd=tempfile.gettempdir())
    return json.loads((out_dir / (name + ".json")).read_text())


KEEP = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
        "request_throughput", "output_throughput", "total_token_throughput",
        "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
        "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms")


def run(args) -> list[dict]:
    from vllm_sink import assets

    config = SMOKE_CONFIG if args.smoke else LLAMA3_8B
    model = model_dir(config, Path(args.tokenizer) if args.tokenizer else assets.model_dir())
    extra = ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 30)] if args.smoke else []
    work = Path(tempfile.mkdtemp(prefix="vllm-sink-serve-"))
    rows = []
    policies = args.policies.split(",")
    gpus = args.gpus.split(",") if args.gpus else None
    if gpus and len(gpus) < len(policies):
        raise SystemExit(f"--gpus names {len(gpus)} GPUs for {len(policies)} policies")
    # With --gpus every server starts at once, each on its own GPU; the workloads still run
    # against one server at a time (the others idle), in the order of --policies.
    servers = {}
    if gpus:
        for i, policy in enumerate(policies):
            servers[policy] = Server(model, policy, args.port + i, work / f"server-{policy}.log", extra, gpus[i])
    for policy in policies:
        log = work / f"server-{policy}.log"
        srv = servers.get(policy) or Server(model, policy, args.port, log, extra)
        try:
            start_s = srv.wait()
            print(f"[serve] {policy}: server up in {start_s:.0f} s", flush=True)
            for key in args.workloads.split(","):
                w = dict(WORKLOADS[key])
                if args.smoke:
                    w.update(num_prompts=w["num_prompts"] // 8, output_len=w["output_len"] // 16 + (5000 if key == "b" else 0))
                    if "prefix_len" in w:
                        w.update(prefix_len=w["prefix_len"] // 8, input_len=w["input_len"] // 8)
                if policy == "full":  # as far as vanilla's context goes
                    w["output_len"] = min(w["output_len"], LLAMA3_8B["max_position_embeddings"] - w["input_len"])
                before = scrape_metrics(srv.url)
                res = bench(model, srv.url, w, work, f"{policy}-{key}")
                after = scrape_metrics(srv.url)
                row = dict(policy=policy, workload=key, **w, server_start_s=round(start_s, 1),
                           **{k: res.get(k) for k in KEEP},
                           preemptions=after.get("vllm:num_preemptions_total", 0) - before.get("vllm:num_preemptions_total", 0))
                queries = after.get("vllm:prefix_cache_queries_total", 0) - before.get("vllm:prefix_cache_queries_total", 0)
                hits = after.get("vllm:prefix_cache_hits_total", 0) - before.get("vllm:prefix_cache_hits_total", 0)
                row.update(prefix_cache_queries=queries, prefix_cache_hits=hits)
                if policy == "sink":
                    time.sleep(3)
                    after = scrape_metrics(srv.url)
                    row.update(pages_evicted=after["vllm_sink:pages_evicted_total"] - before["vllm_sink:pages_evicted_total"],
                               free_pages=after["vllm_sink:free_kv_pages"], pool_pages=after["vllm_sink:kv_pool_pages"],
                               kept_pages=after.get("vllm_sink:kept_session_pages", 0),
                               kept_streams=after.get("vllm_sink:kept_sessions", 0))
                rows.append(row)
                print("[serve]", json.dumps(row), flush=True)
            if policy == "sink":
                startup = [l for l in log.read_text().splitlines() if "vllm-sink" in l or "model runner" in l.lower()]
                rows[-1]["startup_log"] = startup[:6]
        finally:
            srv.stop()
    for srv in servers.values():  # (a server that failed before its turn)
        if srv.proc.poll() is None:
            srv.stop()
    return rows


def pool_after(r: dict) -> str:
    """The "pool whole after" cell: every page free or kept by a finished stream."""
    if r["policy"] == "full":
        return ""
    free, pool = r["free_pages"], r["pool_pages"]
    if "kept_pages" not in r:  # (a run from before kept pages were recorded)
        return f"{free:.0f} free of {pool:.0f}, kept not recorded"
    kept = r["kept_pages"]
    held = f" + {kept:.0f} kept by {r.get('kept_streams', 0):.0f} finished streams" if kept else ""
    return f"{'yes' if free + kept == pool else 'no'} ({free:.0f} free{held} of {pool:.0f})"


def report(rows: list[dict], out: Path) -> None:
    import platform

    try:
        import torch
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()
    except Exception:  # noqa: BLE001
        device = "unknown"
    import vllm

    meta = dict(device=device, vllm=vllm.__version__, model="Llama-3-8B shape, dummy weights, bf16",
                **provenance(__file__))
    out.write_text(json.dumps(dict(meta, results=rows), indent=1))
    lines = [f"`vllm bench serve`, {device}, vLLM {vllm.__version__}, {meta['model']}", "",
             "| workload | server | output tok/s | mean TTFT ms | P99 TTFT ms | mean TPOT ms | P99 TPOT ms | served | preemptions | prefix-cache hits | pages evicted | pool whole after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wl = f"({r['workload']}) {r['input_len']} in + {r['output_len']} out, {r['num_prompts']} prompts, concurrency {r['concurrency']}"
        if "prefix_len" in r:
            wl += f", {r['num_prefixes']} shared prefixes of {r['prefix_len']}"
        hit = f"{r['prefix_cache_hits'] / r['prefix_cache_queries']:.1%}" if r.get("prefix_cache_queries") else ""
        name = "vanilla" if r["policy"] == "full" else "sink W=4096"
        whole = pool_after(r)
        lines.append(f"| {wl} | {name} | {r['output_throughput']:,.0f} | {r['mean_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} | "
                     f"{r['mean_tpot_ms']:.2f} | {r['p99_tpot_ms']:.2f} | {r['completed']}/{r['num_prompts']} | "
                     f"{r['preemptions']:.0f} | {hit} | {r.get('pages_evicted', 0):,.0f} | {whole} |")
    by = {(r["policy"], r["workload"]): r for r in rows}
    for key in sorted({r["workload"] for r in rows}):
        if ("full", key) in by and ("sink", key) in by:
            f, s = by[("full", key)], by[("sink", key)]
            lines.append("")
            lines.append(f"({key}) sink / vanilla: output tok/s {s['output_throughput'] / f['output_throughput']:.3f}, "
                         f"mean TPOT {s['mean_tpot_ms'] / f['mean_tpot_ms']:.3f}, mean TTFT {s['mean_ttft_ms'] / f['mean_ttft_ms']:.3f}")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="a,b", help="comma-separated: a, b, p")
    p.add_argument("--policies", default="full,sink", help="comma-separated, run in this order")
    p.add_argument("--tokenizer", default=None, help="directory with the tokenizer files (default: the SmolLM2 model set up by scripts/setup.sh)")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--gpus", default=None,
                   help="comma-separated GPU ids, one per policy: start every server at once, each on its "
                        "own GPU (a machine with several), to save the servers' start-up time; the "
                        "workloads still run one server at a time")
    p.add_argument("--smoke", action="store_true", help="check the flow on the CPU: a 4-layer model, short workloads")
    p.add_argument("--out", default=str(HERE / "results" / "serve.json"))
    args = p.parse_args()
    rows = run(args)
    report(rows, Path(args.out))


if __name__ == "__main__":
    main()
