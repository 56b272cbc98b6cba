"""The allow-list: what the sink policy serves, as data (no vLLM needed).

The architectures checked against the plain-PyTorch StreamingLLM reference (each with the
test that checks it), the rotary embeddings and rope types that are pure rotations, and the
attention backends whose ALiBi bias is the contract's cache position. The checks that read
vLLM objects against these lists are in ``vllm_sink.patches.refusals`` (start-up) and
``vllm_sink.patches.worker.probes`` (the worker's model and backend);
``scripts/registry_sweep.py`` runs them over vLLM's registry (``docs/families.md``).
"""

from __future__ import annotations

# rope types whose rotary table is a pure function of position (vLLM 0.26 semantics).
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3", "yarn", "dynamic", "ntk"}

# Rotary embedding classes whose cos/sin table is a rotation by a fixed angle per position
# (times a constant scale, e.g. YaRN's mscale, which vllm_sink.rotary divides out): keys
# can be re-positioned by rotating them. Any other class (M-RoPE, dual-chunk, LongRoPE,
# XD-RoPE, a new one) is refused.
PURE_ROTARY_CLASSES = frozenset({
    "RotaryEmbedding",
    "LinearScalingRotaryEmbedding",
    "Llama3RotaryEmbedding",
    "NTKScalingRotaryEmbedding",
    "DynamicNTKScalingRotaryEmbedding",
    "DynamicNTKAlphaRotaryEmbedding",
    "YaRNScalingRotaryEmbedding",
})

FAMILY_TEST = "tests/test_families.py::test_plugin_matches_family_reference"
_ALIBIFAMILY_TEST = "tests/test_families.py::test_alibi_plugin_matches_reference"

# The architectures (vLLM registry names, as a config's ``architectures`` gives them) whose
# output with the sink policy a test matches against an independent plain-PyTorch
# StreamingLLM reference (tests/reference.py, tests/reference_families.py), each with that
# test. Any other architecture is refused at start-up (``check_architecture``): the worker's
# checks (pure rotary, full-attention layers, one backend) are necessary, not sufficient; a
# model's own code can still place positions, norms or scales where the policy does not
# expect them, and only a reference comparison shows it.
TESTED_ARCHITECTURES = {
    "LlamaForCausalLM": "tests/test_engine_reference.py (SmolLM2-135M, real weights); "
                        f"{FAMILY_TEST}[llama3] (Llama-3 rope scaling)",
    "GPTNeoXForCausalLM": f"{FAMILY_TEST}[pythia], [neox_seq]",
    "FalconForCausalLM": f"{FAMILY_TEST}[falcon7b], [falcon40b] (RoPE; Falcon with ALiBi is refused)",
    "Qwen3ForCausalLM": f"{FAMILY_TEST}[qwen3]",
    "GemmaForCausalLM": f"{FAMILY_TEST}[gemma]",
    "PhiForCausalLM": f"{FAMILY_TEST}[phi2]",
    "GPTJForCausalLM": f"{FAMILY_TEST}[gptj]",
    "MistralForCausalLM": f"{FAMILY_TEST}[mistral] (sliding_window: null; a sliding window is refused)",
    "Qwen2ForCausalLM": f"{FAMILY_TEST}[qwen2] (q/k/v biases; use_sliding_window: false)",
    "MptForCausalLM": f"{_ALIBIFAMILY_TEST}[mpt-page], [mpt-4] (ALiBi)",
    "BloomForCausalLM": f"{_ALIBIFAMILY_TEST}[bloom-page], [bloom-4] (ALiBi)",
    "MixtralForCausalLM": f"{FAMILY_TEST}[mixtral] (mixture of experts; sliding_window: null)",
    "Qwen3MoeForCausalLM": f"{FAMILY_TEST}[qwen3_moe] (mixture of experts, norm_topk_prob)",
    "Qwen2MoeForCausalLM": f"{FAMILY_TEST}[qwen2_moe] (mixture of experts with a gated shared expert)",
    "OlmoeForCausalLM": f"{FAMILY_TEST}[olmoe] (mixture of experts; q/k RMSNorm over the whole projection)",
}

# Other registry names that vLLM 0.26 maps to exactly the same model class (same module,
# same class: the same attention, rotary and layer code) as a tested one; they are served
# on the strength of that class's test, not a test of their own config
# (tests/unit/test_allowlist.py checks each still resolves to its tested name's class).
SAME_CLASS_ALIASES = {
    "LLaMAForCausalLM": "LlamaForCausalLM",  # decapoda-research/llama-*
    "InternLM3ForCausalLM": "LlamaForCausalLM",
    "IQuestCoderForCausalLM": "LlamaForCausalLM",
    "TeleChat3ForCausalLM": "LlamaForCausalLM",
    "CwmForCausalLM": "LlamaForCausalLM",  # its configs' sliding layers are refused anyway
    "RWForCausalLM": "FalconForCausalLM",  # tiiuae's original Falcon configs
    "MPTForCausalLM": "MptForCausalLM",  # vLLM's own spelling of MPT
}

# name -> the test that checks it (for an alias: its tested name's test).
CHECKED_ARCHITECTURES = {
    **TESTED_ARCHITECTURES,
    **{alias: f"same vLLM class as {target}: {TESTED_ARCHITECTURES[target]}"
       for alias, target in SAME_CLASS_ALIASES.items()},
}

# Checked names that a supported vLLM version no longer serves with the class tested here:
# vLLM 0.32.0 dropped MPT and the original Falcon configs ("RW"), and runs GPT-NeoX, Phi and
# Cwm on its Transformers modeling backend, which the sink policy refuses (another
# implementation than the one a test checked). tests/unit/test_allowlist.py checks each
# against the installed vLLM's registry.
NOT_SERVED_ON = {
    "0.32.0": frozenset({"MptForCausalLM", "MPTForCausalLM", "RWForCausalLM",
                         "GPTNeoXForCausalLM", "PhiForCausalLM", "CwmForCausalLM"}),
}


def checked_on(vllm_version: str) -> dict[str, str]:
    """``CHECKED_ARCHITECTURES`` less what ``vllm_version`` (``0.32.0+cpu`` reads as
    ``0.32.0``) no longer serves with the tested class."""
    gone = NOT_SERVED_ON.get(vllm_version.split("+", 1)[0], frozenset())
    return {arch: test for arch, test in CHECKED_ARCHITECTURES.items() if arch not in gone}


# ALiBi architectures whose sink-policy output is checked against a reference
# (tests/test_families.py); other ALiBi models (Falcon-RW, Baichuan-13B, ...) are refused.
ALIBI_ARCHITECTURES = ("MptForCausalLM", "MPTForCausalLM", "BloomForCausalLM")

# Set to 1 to serve an architecture that is not in CHECKED_ARCHITECTURES (every other
# start-up check still applies); the engine logs a warning that its output is unverified.
ALLOW_UNCHECKED_ENV = "VLLMSINK_ALLOW_UNCHECKED"

# vLLM's assumption for a config that names no maximum length (``_get_and_verify_max_len``).
VLLM_DEFAULT_MAX_LEN = 2048

# Backends whose ALiBi bias is ``slope * (kv_idx - q_idx)`` with ``kv_idx`` the key's index
# in the block-table row and ``q_idx = seq_len - q_len + i``: with a compacted row that is
# the contract's cache positions (CPU: ``apply_alibi_slopes``; Triton:
# ``triton_attention_helpers``). Others (FLASH_ATTN, ...) are not verified.
ALIBI_BACKENDS = ("CPU_ATTN", "TRITON_ATTN")
