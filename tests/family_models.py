"""Tiny random-weight models of the paper's families and today's, mixtures of experts
included, built locally (no hub).

Each is a transformers config (2 layers, a small hidden size, the real SmolLM2 tokenizer and
its 49,152-token vocabulary) built with ``from_config`` and saved as safetensors, so vLLM,
transformers and ``tests/reference_families.py`` all load the same files. Weights are drawn
with a large ``initializer_range`` (attention far from uniform) and every 1-D parameter
(norm weights and biases, projection biases) is perturbed from its default, so a norm or
bias applied the wrong way shows. Built once into ``~/.cache/vllm-sink/families/<name>-<hash
of the config>`` (``VLLM_SINK_HOME`` overrides the root); a build takes a second or two.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

VOCAB = 49152
POSITIONS = 512  # small, so a 1,000-token stream crosses several epochs
SEED = 0
INIT = 0.15  # initializer_range: attention far from uniform
PERTURB = 0.2  # noise added to every 1-D parameter (norm weights and biases, biases)
CLIP_QKV = 3.0  # MPT's clip_qkv

_COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=POSITIONS,
               initializer_range=INIT, bos_token_id=1, eos_token_id=2, pad_token_id=2)

# name -> (transformers config class, its arguments)
FAMILIES = {
    # Pythia: GPT-NeoX, 25% rotary, parallel residual, fused per-head qkv.
    "pythia": ("GPTNeoXConfig", dict(hidden_size=128, num_attention_heads=4, intermediate_size=512,
                                     rotary_pct=0.25, use_parallel_residual=True)),
    # GPT-NeoX with half rotary and the sequential residual.
    "neox_seq": ("GPTNeoXConfig", dict(hidden_size=128, num_attention_heads=4, intermediate_size=512,
                                       rotary_pct=0.5, use_parallel_residual=False)),
    # Falcon-7B: multi-query, one layer norm, parallel attention + MLP.
    "falcon7b": ("FalconConfig", dict(hidden_size=128, num_attention_heads=4, multi_query=True,
                                      parallel_attn=True, new_decoder_architecture=False,
                                      alibi=False, bias=False)),
    # Falcon-40B: grouped KV heads, separate attention / MLP layer norms.
    "falcon40b": ("FalconConfig", dict(hidden_size=128, num_attention_heads=4, num_kv_heads=2,
                                       new_decoder_architecture=True, parallel_attn=True,
                                       alibi=False, bias=False)),
    # Qwen3: per-head RMSNorm of q and k before RoPE, explicit head_dim, GQA.
    "qwen3": ("Qwen3Config", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=32, intermediate_size=256, tie_word_embeddings=False)),
    # Llama with Llama-3 rope scaling (original context 128 of 512).
    "llama3": ("LlamaConfig", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=256, rope_parameters=dict(
                                       rope_type="llama3", rope_theta=10000.0, factor=4.0,
                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=128))),
    # Gemma: head_dim 256, (1 + w) RMSNorm, embeddings scaled by sqrt(hidden), GeGLU (tanh).
    "gemma": ("GemmaConfig", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                                  head_dim=256, intermediate_size=256)),
    # Phi-2: head_dim 80 with 40% (32 channels) rotary, one LayerNorm, parallel attention
    # + MLP, biases, gelu_new. (vLLM sizes the MLP 4 x hidden whatever intermediate_size says.)
    "phi2": ("PhiConfig", dict(hidden_size=160, num_attention_heads=2, intermediate_size=640,
                               partial_rotary_factor=0.4)),
    # GPT-J: interleaved (GPT-J style) rotary on 16 of 32 channels, parallel residual.
    "gptj": ("GPTJConfig", dict(n_embd=128, n_head=4, rotary_dim=16)),
    # Mistral without its sliding window (MistralConfig's default is 4096: here None), GQA.
    "mistral": ("MistralConfig", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=256, sliding_window=None)),
    # Qwen2: Llama with biases on q, k and v (random here: PERTURB), GQA; no sliding window
    # (use_sliding_window=False: every layer_types entry is full_attention).
    "qwen2": ("Qwen2Config", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=256, use_sliding_window=False)),
    # Mixture-of-experts families (4 experts, top-2, every layer sparse), ordinary attention.
    # Mixtral: Mistral's attention (no sliding window), softmax router, top-2 weights always
    # renormalised to sum to 1.
    "mixtral": ("MixtralConfig", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=None)),
    # Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm), top-k weights renormalised
    # (norm_topk_prob, as Qwen3-30B-A3B's config sets it).
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=32, moe_intermediate_size=128, num_experts=4,
                                         num_experts_per_tok=2, norm_topk_prob=True)),
    # Qwen2-MoE: Qwen2's attention (q/k/v biases), top-k weights as the softmax gives them
    # (norm_topk_prob false, as Qwen1.5-MoE's), plus a shared expert behind a sigmoid gate.
    "qwen2_moe": ("Qwen2MoeConfig", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                         moe_intermediate_size=128, shared_expert_intermediate_size=256,
                                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                                         use_sliding_window=False)),
    # OLMoE: RMSNorm over the whole q and k projections (not per head) before RoPE, top-k
    # weights not renormalised, no clip_qkv (OLMoE-1B-7B's settings).
    "olmoe": ("OlmoeConfig", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                                  norm_topk_prob=False)),
}

# Families with ALiBi positions instead of RoPE, with no max_position_embeddings (MPT names
# its context max_seq_len; BLOOM names none: vLLM assumes 2048). 6 heads, not a power of
# two: the slopes of the extra heads follow each family's own rule.
ALIBI_FAMILIES = {
    # MPT: no biases (no_bias, MPT's default), q/k/v clamped to clip_qkv (about 15% of them
    # at this scale), exact GELU, tied head.
    "mpt": ("MptConfig", dict(d_model=192, n_heads=6, max_seq_len=512, attn_config=dict(alibi=True, clip_qkv=CLIP_QKV))),
    # BLOOM: word-embedding LayerNorm, fused per-head qkv, biases everywhere.
    "bloom": ("BloomConfig", dict(hidden_size=192, n_head=6)),
}
_ALIBI_COMMON = {k: v for k, v in _COMMON.items() if k != "max_position_embeddings"}


def tokenizer_dir() -> Path:
    from vllm_sink import assets

    return assets.model_dir()


def _spec(name: str) -> tuple[str, dict, dict]:
    """(config class, common arguments, the family's arguments)."""
    alibi = name in ALIBI_FAMILIES
    cls, kwargs = (ALIBI_FAMILIES if alibi else FAMILIES)[name]
    return cls, _ALIBI_COMMON if alibi else _COMMON, kwargs


def config_of(name: str):
    import transformers

    cls, common, kwargs = _spec(name)
    return getattr(transformers, cls)(**{**common, **kwargs})


def model_dir(name: str) -> Path:
    """The model's directory, built if missing (idempotent)."""
    import transformers

    from vllm_sink import assets

    cls, common, kwargs = _spec(name)
    key = json.dumps([cls, common, kwargs, SEED, PERTURB, transformers.__version__], sort_keys=True)
    out = assets.home() / "families" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import torch

    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config_of(name), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norm weights and biases, projection biases
                p.add_(PERTURB * torch.randn_like(p))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir() / f, tmp / f)
    tmp.rename(out)
    return out
