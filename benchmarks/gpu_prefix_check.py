"""Copy on write on the GPU: a page shared through vLLM's prefix cache is never written by a
stream that passes its window.

    python benchmarks/gpu_prefix_check.py [--out benchmarks/results/gpu_prefix_check.json]

An engine with the sink policy (a 20-token sink, so a partial sink page is written; W=256)
and prefix caching (on by default), Llama-3.2-1B's layer shape (4 layers) with 512 positions
(epochs every few hundred tokens) and randomly initialised weights, with vLLM's
GPU defaults (CUDA graphs, the default attention backend) in bfloat16, and TRITON_ATTN in
float32. In one engine:

1. ``X``, a shared 200-token prefix ``P`` plus 40 tokens of its own, 64 greedy tokens with
   their logprobs, on an empty cache: the control.
2. At once: 8 streams of ``P`` plus their own 300 tokens that generate 1,500 tokens (far past
   the window: they find ``P``'s pages, and copy each shared page they keep when their window
   first moves, then rewrite their sink pages at every epoch) and 8 short requests ``P`` + 30.
3. ``X`` again: it finds ``P``'s pages in the cache; its logprobs must be the control's, to
   the noise of computing the same tokens in other batches (the prefix cache is exact).

``--no-copies`` switches the copies off in the same script (the scheduler's manager runs in
the process): the streams then rewrite pages ``X`` finds, and step 3 must fail. Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine_bench import LLAMA32_1B  # noqa: E402
from workers import provenance  # noqa: E402

SETTINGS = {"bf16": dict(dtype="bfloat16"), "fp32-triton": dict(dtype="float32", attention_backend="TRITON_ATTN")}


def random_model() -> Path:
    """Llama-3.2-1B's layer shape, 4 layers, a 32,000-token vocabulary and 512 positions,
    with transformers' random initialisation (normal, std 0.02), saved once in bfloat16."""
    import tempfile

    import torch
    import transformers

    cfg = dict(LLAMA32_1B, max_position_embeddings=512, num_hidden_layers=4, vocab_size=32000,
               bos_token_id=1, eos_token_id=2)
    out = Path(tempfile.gettempdir()) / "vllm-sink-prefix-check-model"
    if not (out / "model.safetensors").exists():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
    return out


def check(setting: str, copies: bool) -> dict:
    import torch
    from vllm import SamplingParams

    from vllm_sink import LLM
    from vllm_sink.metrics import SINK_STATS

    if not copies:
        from vllm_sink.patches.scheduler.manager import StreamingSinkManager

        StreamingSinkManager._copy_pages = lambda self, row, positions: []
    # 512 positions: the streams' epochs re-rotate and re-anchor their rows every few hundred
    # tokens, so without the copies they write pages X finds. Weights: a standard random
    # initialisation (vLLM's dummy weights are so small that the attention barely moves
    # the logprobs, and a rewritten page would not show).
    llm = LLM(str(random_model()), skip_tokenizer_init=True, block_size=16,
              max_num_seqs=32, gpu_memory_utilization=0.5, kv_policy="sink", sink_tokens=20, kv_window=256,
              max_stream_len=4096, **SETTINGS[setting])
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(100, 30000, (n,), generator=g).tolist()  # noqa: E731
    prefix = ids(200)
    x = prefix + ids(40)
    # (no prompt logprobs: a request that asks for them never reads the prefix cache)
    scored = SamplingParams(max_tokens=64, temperature=0, logprobs=0, ignore_eos=True)

    def run_x():
        out = llm.generate([{"prompt_token_ids": x}], scored, use_tqdm=False)[0]
        gen = list(out.outputs[0].token_ids)
        return torch.tensor([lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, gen)]), gen, out.num_cached_tokens

    control, control_gen, cached0 = run_x()
    copied0, epochs0 = SINK_STATS.pages_copied, SINK_STATS.epochs
    longs = [{"prompt_token_ids": prefix + ids(300)} for _ in range(8)]
    shorts = [{"prompt_token_ids": prefix + ids(30)} for _ in range(8)]
    params = [SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)] * 8
    params += [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)] * 8
    outs = llm.generate(longs + shorts, params, use_tqdm=False)
    found = [o.num_cached_tokens for o in outs]
    again, again_gen, cached1 = run_x()
    diff = (again - control).abs()
    row = dict(setting=setting, copies=copies, x_cached_first=cached0, x_cached_again=cached1,
               streams_found=found[:8], shorts_found=found[8:], pages_copied=SINK_STATS.pages_copied - copied0,
               epochs=SINK_STATS.epochs - epochs0, max_abs=diff.max().item(), mean_abs=diff.mean().item(),
               same_tokens=again_gen == control_gen, tokens=len(control))
    print("@row", json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="bf16,fp32-triton")
    p.add_argument("--no-copies", action="store_true", help="switch the copies off (the check must fail)")
    p.add_argument("--worker", nargs=2, metavar=("SETTING", "COPIES"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(HERE / "results" / "gpu_prefix_check.json"))
    args = p.parse_args()
    if args.worker:  # one engine per process
        check(args.worker[0], args.worker[1] == "1")
        return
    import subprocess

    import torch
    import vllm

    rows = []
    for setting in args.settings.split(","):
        for copies in ([True, False] if args.no_copies else [True]):
            env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_USE_FLASHINFER_SAMPLER="0")
            res = subprocess.run([sys.executable, __file__, "--worker", setting, "1" if copies else "0"],
                                 env=env, capture_output=True, text=True)
            lines = [l for l in res.stdout.splitlines() if l.startswith("@row ")]
            if not lines:
                print(res.stdout[-3000:], res.stderr[-6000:])
                raise SystemExit(f"{setting}: no result")
            rows.append(json.loads(lines[-1][5:]))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    meta = dict(device=device, vllm=vllm.__version__, model="Llama-3.2-1B layer shape, 4 layers, random init",
                **provenance(__file__))
    Path(args.out).write_text(json.dumps(dict(meta, results=rows), indent=1))
    lines = [f"Copy on write, {device}, vLLM {vllm.__version__}, {meta['model']}, S=20, W=256", "",
             "| setting | copies | X cached (first, again) | streams found | pages copied | epochs | X logprobs max / mean abs diff | same tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {'on' if r['copies'] else 'off'} | {r['x_cached_first']}, {r['x_cached_again']} | "
                     f"{min(r['streams_found'])}-{max(r['streams_found'])} | {r['pages_copied']} | {r['epochs']} | "
                     f"{r['max_abs']:.2e} / {r['mean_abs']:.2e} | {r['same_tokens']} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
