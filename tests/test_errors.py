"""Invalid settings and unsupported models are refused at start-up with a message that
names the fix, never silently ignored.

``python tests/test_errors.py`` prints the table (setting, error) of docs/refusals.md from
the real messages.
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from pathlib import Path

import pytest

SMOL = dict(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=128 << 20)
REFUSERS = {"config.py": "vllm_sink", "refusals.py": "patches"}  # file -> its folder

# (name, LLM keyword arguments, model variant or None for the real SmolLM2, expected text)
SETTINGS = [
    ("window smaller than a page", dict(kv_policy="sink", kv_window=8, block_size=16), None, "smaller than one page"),
    ("window not a multiple of the page", dict(kv_policy="sink", kv_window=100, block_size=16), None, "not a multiple of block_size"),
    ("sink larger than the window", dict(kv_policy="sink", sink_pages=20, kv_window=256, block_size=16), None, "larger than the window"),
    ("window past the model's positions", dict(kv_policy="sink", kv_window=8192, block_size=16), None, "rotary positions"),
    ("negative sink pages", dict(kv_policy="sink", sink_pages=-1), None, "negative"),
    ("unknown policy", dict(kv_policy="lru"), None, "is not a KV policy"),
    ("sink setting without the sink policy", dict(sink_pages=2), None, "only apply with kv_policy='sink'"),
    ("stream cap below sink + window", dict(kv_policy="sink", kv_window=1024, max_stream_len=512, block_size=16), None, "raise max_stream_len"),
    ("max_model_len below sink + window", dict(kv_policy="sink", kv_window=1024, max_model_len=512, block_size=16), None, "max-model-len"),
    ("fp8 KV cache", dict(kv_policy="sink", kv_cache_dtype="fp8"), None, "--kv-cache-dtype auto"),
    ("speculative decoding", dict(kv_policy="sink", speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}), None, "drop --speculative-config"),
    ("KV connector", dict(kv_policy="sink", kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both"}), None, "drop --kv-transfer-config"),
    ("pipeline parallel", dict(kv_policy="sink", pipeline_parallel_size=2), None, "--tensor-parallel-size"),
    ("pooling model", dict(kv_policy="sink", runner="pooling"), None, "text generation"),
    ("no RoPE (GPT-2)", dict(kv_policy="sink"), "gpt2", "no rotary position embeddings"),
    ("own sliding window (Mistral)", dict(kv_policy="sink"), "mistral_sliding", "sliding-window"),
    ("own sliding window (Qwen2)", dict(kv_policy="sink"), "qwen2_sliding", "sliding-window"),
    ("LongRoPE", dict(kv_policy="sink"), "longrope", "rope_type='longrope'"),
    ("MLA (DeepSeek-V2)", dict(kv_policy="sink"), "deepseek_mla", "multi-head latent attention"),
    ("architecture no test checks (Granite, full attention)", dict(kv_policy="sink"), "granite_full", "is not checked against the sink policy's reference"),
]


def _variants(smol_cfg: dict) -> dict[str, dict]:
    dims = {k: smol_cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size", "rms_norm_eps", "bos_token_id", "eos_token_id")}
    dims["num_hidden_layers"] = 2
    return {
        "gpt2": dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=64, n_head=2, n_layer=2, n_positions=1024, vocab_size=smol_cfg["vocab_size"]),
        "mistral_sliding": dict(dims, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=128, max_position_embeddings=8192, head_dim=64, rope_theta=1e5),
        "qwen2_sliding": dict(dims, architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True, sliding_window=128, max_window_layers=0, max_position_embeddings=8192, rope_theta=1e5),
        "granite_full": dict(dims, architectures=["GraniteForCausalLM"], model_type="granite", max_position_embeddings=8192, rope_theta=1e5),
        "longrope": dict(smol_cfg, rope_parameters=dict(rope_type="longrope", rope_theta=1e5, short_factor=[1.0] * 32, long_factor=[2.0] * 32, original_max_position_embeddings=4096)),
        "deepseek_mla": dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=2, max_position_embeddings=2048, vocab_size=smol_cfg["vocab_size"], rope_theta=1e4),
    }


def make_variant(root: Path, name: str) -> Path:
    """A model directory with SmolLM2's tokenizer and an edited config (no weights)."""
    from vllm_sink import assets

    src = assets.model_dir()
    out = root / name
    if not out.exists():
        out.mkdir(parents=True)
        for f in src.iterdir():
            if f.name not in ("config.json", "model.safetensors"):
                shutil.copy(f, out / f.name)
        cfg = _variants(json.loads((src / "config.json").read_text()))[name]
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def attempt(kwargs: dict, variant: str | None, root: Path) -> Exception | None:
    from vllm_sink import LLM  # vLLM's LLM, with the kv_policy keywords

    from vllm_sink import assets

    model = assets.model_dir() if variant is None else make_variant(root, variant)
    try:
        llm = LLM(str(model), load_format="dummy", **SMOL, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the error is the result
        return exc
    llm.llm_engine.engine_core.shutdown()
    return None


@pytest.mark.parametrize("name,kwargs,variant,expected", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_refused_with_a_clear_error(name, kwargs, variant, expected, tmp_path_factory):
    from vllm_sink.config import SinkConfigError

    exc = attempt(kwargs, variant, tmp_path_factory.getbasetemp() / "models")
    assert exc is not None, f"{name}: the engine started"
    assert isinstance(exc, SinkConfigError), f"{name}: {type(exc).__name__}: {exc}"
    assert expected in str(exc), str(exc)
    # Refusals are made in two places: the settings (vllm_sink/config.py, no vLLM needed)
    # and everything that looks at vLLM's objects (patches/refusals.py).
    origin = Path(traceback.extract_tb(exc.__traceback__)[-1].filename)
    assert origin.name in REFUSERS and origin.parent.name == REFUSERS[origin.name], origin


def test_unknown_keyword_is_not_ignored():
    """A misspelt setting is vLLM's own TypeError, before anything starts."""
    exc = attempt(dict(kv_policy="sink", sink_size=4), None, Path("/nonexistent"))
    assert isinstance(exc, TypeError) and "sink_size" in str(exc)


if __name__ == "__main__":
    import os
    import tempfile

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    root = Path(tempfile.mkdtemp())
    rows = ["| setting or model | error |", "|---|---|"]
    for name, kwargs, variant, _ in SETTINGS:
        exc = attempt(kwargs, variant, root)
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        what = f"{name}: `{args}`" + (f" on a {variant} config" if variant else "")
        rows.append(f"| {what} | {type(exc).__name__}: {str(exc).replace('|', '/')} |")
    print("\n".join(rows), file=sys.stdout)
