"""The sink page writer's Triton kernel against its torch path, on the GPU.

    python benchmarks/page_writer_check.py [--out benchmarks/results/page_writer_check.json]

1. Kernel level: random bfloat16 caches shaped like the Llama-3-8B KV cache (32 layers, 8
   heads of 128, 16-token pages, vLLM's NHD layout), whole sink pages and a partial page's
   first slots, keys (rotated) and values (copied): the kernel's writes against the torch
   path's, element by element.
2. Engine level: the same sink engine (a 4-layer Llama shape with random weights, bf16, CUDA
   graphs, W=512, sink 16 tokens and 4 tokens) run twice, once per writer
   (``VLLMSINK_PAGE_WRITER``), over streams well past the window: their prompt logprobs and
   greedy tokens.

Writes JSON and prints a table. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from engine_bench import LLAMA3_8B
from workers import provenance, serve_worker, spawn

RESULTS = Path(__file__).parent / "results"
# The 8B shape, shrunk: the same architecture and rotary settings, four small layers.
SMALL_LLAMA = dict(LLAMA3_8B, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                   num_key_value_heads=4, num_hidden_layers=4, vocab_size=32000, max_position_embeddings=4096)


def kernel_check() -> list[dict]:
    import torch

    from vllm_sink.page_writer import PageWriter
    from vllm_sink.rotary import RotationTable

    torch.manual_seed(0)
    L, N, H, B, D = 32, 2048, 8, 16, 128
    rows = []
    for neox in (True, False):
        for T, rot, part in ((B, D, "keys, whole page"), (4, D, "keys, partial page"),
                             (4, 0, "values, partial page"), (B, 64, "keys, partial rotary")):
            def caches(seed):
                g = torch.Generator(device="cuda").manual_seed(seed)
                return [torch.randn(N, B, H, 2 * D, generator=g, device="cuda", dtype=torch.bfloat16)
                        .permute(0, 2, 1, 3) for _ in range(L)]
            a, b = caches(1), caches(1)
            R, P = 24, 1
            table = RotationTable.from_freqs(1.0 / (500000 ** (torch.arange(0, max(rot, 2), 2) / max(rot, 2))),
                                             8192, max(rot, 2), neox)
            deltas = torch.randint(-8000, 8000, (R,)).numpy()
            sources = [torch.randn(L, P, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(R)]
            ids = torch.randperm(N)[: R * P].view(R, P).numpy()
            PageWriter([c[..., :D] for c in a], table, use_triton=False).write(ids, sources, deltas, rot, neox)
            PageWriter([c[..., :D] for c in b], table, use_triton=True).write(ids, sources, deltas, rot, neox)
            diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
            same = sum(torch.equal(x, y) for x, y in zip(a, b))
            rows.append(dict(style="neox" if neox else "gpt-j", case=part, max_abs_diff=diff,
                             layers_bit_identical=f"{same}/{L}"))
    return rows


def engine_worker(task: dict) -> dict:
    os.environ["VLLMSINK_PAGE_WRITER"] = task["writer"]
    import random

    from vllm import LLM, SamplingParams

    import vllm_sink

    vllm_sink.register()
    d = Path(tempfile.gettempdir()) / "vllm-sink-small-llama"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(SMALL_LLAMA))
    llm = LLM(str(d), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, block_size=16,
              enable_prefix_caching=False, gpu_memory_utilization=0.3, seed=0,
              kv_policy="sink", sink_tokens=task["sink"], kv_window=512, max_stream_len=1 << 16)
    hook = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner._vllm_sink_hook
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 31990) for _ in range(n)]} for n in (2000, 2600, 1500, 3100)]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, prompt_logprobs=0, logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    res = []
    for o in outs:
        plp = [next(iter(x.values())).logprob for x in o.prompt_logprobs[1:]]
        res.append(dict(prompt_logprobs=plp, tokens=list(o.outputs[0].token_ids)))
    writers = hook.kv.writers()
    return dict(writer=task["writer"], used_triton=writers[0].use_triton, streams=res)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS / "page_writer_check.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        serve_worker(engine_worker, args.worker)
        os._exit(0)
    import torch
    import vllm

    doc = dict(device=torch.cuda.get_device_name(), vllm=vllm.__version__, **provenance(__file__),
               kernel=kernel_check(), engine=[])
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_USE_FLASHINFER_SAMPLER="0")
    for sink in (16, 4):
        runs = {w: spawn(__file__, dict(writer=w, sink=sink), env=env) for w in ("torch", "triton")}
        a, b = runs["torch"]["streams"], runs["triton"]["streams"]
        lp = [abs(x - y) for sa, sb in zip(a, b) for x, y in zip(sa["prompt_logprobs"], sb["prompt_logprobs"])]
        doc["engine"].append(dict(
            sink_tokens=sink, used_triton=[runs["torch"]["used_triton"], runs["triton"]["used_triton"]],
            prompt_tokens=len(lp), prompt_logprob_max_diff=max(lp), prompt_logprob_mean_diff=sum(lp) / len(lp),
            greedy_tokens_equal=f"{sum(sa['tokens'] == sb['tokens'] for sa, sb in zip(a, b))}/{len(a)}"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    lines = [f"Page writer, Triton kernel vs torch path: {doc['device']}, vLLM {doc['vllm']}", "",
             "| rotary style | case | max abs diff | layers bit-identical |", "|---|---|---|---|"]
    lines += [f"| {r['style']} | {r['case']} | {r['max_abs_diff']:.3g} | {r['layers_bit_identical']} |" for r in doc["kernel"]]
    lines += ["", "| sink tokens | writers (triton used) | prompt tokens | logprob max diff | mean diff | greedy equal |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['sink_tokens']} | {r['used_triton']} | {r['prompt_tokens']} | {r['prompt_logprob_max_diff']:.3g} | "
              f"{r['prompt_logprob_mean_diff']:.3g} | {r['greedy_tokens_equal']} |" for r in doc["engine"]]
    md = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
