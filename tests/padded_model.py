"""Head padding of a Llama directory, for the tensor-parallel tests and ``benchmarks/tp.py``.

SmolLM2-135M (``vllm_sink.assets``) has 9 query / 3 KV heads, which 2 ranks cannot split;
:func:`pad_heads` writes a copy with more heads that computes the same function.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def pad_heads(src_dir: Path, out_dir: Path, q_heads: int = 12, kv_heads: int = 4) -> Path:
    """A copy of the HF Llama directory ``src_dir`` with ``q_heads`` query and ``kv_heads``
    KV heads that computes exactly the same function (idempotent).

    For tensor parallelism: SmolLM2-135M's 9 query / 3 KV heads do not split over 2 GPUs,
    12 / 4 do. The HF layout groups the rows of q/k/v_proj per head (``head_dim`` rows each,
    already un-permuted by the GGUF conversion), and GQA maps query head ``h`` to KV head
    ``h // (q_heads / kv_heads)``. The ratio is kept (3 query heads per KV head), so the
    original heads keep their KV heads and the new query heads ``9..11`` map to the new KV
    head ``3``. The new heads' q/k/v rows are zeros (their attention output is then zero)
    and so are their columns of o_proj: they add exactly nothing to the residual stream.
    ``head_dim`` is written to the config, as ``hidden_size / q_heads`` no longer is.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists():
        return out_dir
    cfg = json.loads((src_dir / "config.json").read_text())
    n_q, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // n_q
    if q_heads < n_q or kv_heads < n_kv or q_heads % kv_heads or q_heads // kv_heads != n_q // n_kv:
        raise ValueError(
            f"pad_heads keeps {n_q // n_kv} query heads per KV head and only adds heads: "
            f"{n_q}/{n_kv} -> {q_heads}/{kv_heads} does not"
        )
    weights = load_file(str(src_dir / "model.safetensors"))
    out = {}
    for name, w in weights.items():
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            w = torch.cat([w, w.new_zeros(((q_heads - n_q) * hd,) + tuple(w.shape[1:]))])
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight",
                            "self_attn.k_proj.bias", "self_attn.v_proj.bias")):
            w = torch.cat([w, w.new_zeros(((kv_heads - n_kv) * hd,) + tuple(w.shape[1:]))])
        elif name.endswith("self_attn.o_proj.weight"):
            w = torch.cat([w, w.new_zeros(w.shape[0], (q_heads - n_q) * hd)], dim=1)
        out[name] = w.contiguous()
    cfg.update(num_attention_heads=q_heads, num_key_value_heads=kv_heads, head_dim=hd)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src_dir.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy2(f, tmp / f.name)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
