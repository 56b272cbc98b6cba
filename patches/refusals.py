"""Every start-up refusal of the sink policy that looks at vLLM objects, in one place.

Binds to vLLM 0.26.0: EngineArgs fields (enable_prefix_caching, speculative_config,
kv_transfer_config, kv_cache_dtype, decode/prefill_context_parallel_size,
pipeline_parallel_size), ModelConfig (runner_type, is_encoder_decoder, use_mla, is_hybrid,
is_attention_free, uses_mrope, uses_alibi, is_multimodal_model, get_sliding_window,
hf_text_config, model_arch_config.derived_max_model_len_and_key, architecture: the
registry name vLLM resolved, ``Transformers*`` for its Transformers modeling backend), the rotary embedding
classes under ``vllm.model_executor.layers.rotary_embedding``, ``FullAttentionSpec`` and
``KVQuantMode``, ``get_layers_from_vllm_config`` with ``AttentionLayerBase.get_attn_backend``,
the attention backends' names and the CPU backend's ``_get_attn_isa``.

Settings that need no vLLM object are validated by ``vllm_sink.config``; everything else
the policy cannot serve exactly is refused here, each with a ``SinkConfigError`` naming
the fix (``tests/test_errors.py`` checks every row of the README's table against the
function that raises it):

* ``check_engine_args``: engine settings, before vLLM builds its config (API server,
  ``LLM(...)``);
* ``check_model``: the model's config, once vLLM has resolved it (RoPE or ALiBi), and
  ``check_architecture``: the architecture vLLM resolved is one a test checks
  (``CHECKED_ARCHITECTURES``; ``scripts/registry_sweep.py`` runs both over vLLM's registry);
* ``position_limits``: the rotary positions and the context the default window comes from;
* ``check_layer_spec``: each attention layer's KV-cache spec, on the worker;
* ``rotary_table``: the model's rotary embedding (an allow-list of pure rotations);
* ``kv_layout``: the attention backend and its key layout;
* ``check_alibi_backend``: ALiBi models only on backends that bias by index in the row;
* ``check_runner``: the worker's model runner;
* ``check_partial_sink_kernel``: a partial sink page needs kernel block == KV block;
* ``check_context_parallel``: the scheduler's manager, under context parallelism;
* ``check_rotary_limit``, ``check_one_kv_cache_group``, ``check_geometry``: the worker.
"""

from __future__ import annotations

import os

import torch
from vllm.logger import init_logger

from vllm_sink.config import SinkConfigError
from vllm_sink.policy import NO_ROTARY_LIMIT
from vllm_sink.rotary import RotationTable

logger = init_logger("vllm." + __name__)

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


def rope_limit_of(hf_text_config) -> int:
    """Rows of the rotary table vLLM builds for this config (checked again on the worker)."""
    limit = int(hf_text_config.max_position_embeddings)
    params = getattr(hf_text_config, "rope_parameters", None) or getattr(
        hf_text_config, "rope_scaling", None
    ) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("linear", "yarn"):
        limit = int(limit * float(params.get("factor", 1.0)))
    return limit


_FAMILY = "tests/test_families.py::test_plugin_matches_family_reference"
_ALIBI_FAMILY = "tests/test_families.py::test_alibi_plugin_matches_reference"

# The architectures (vLLM registry names, as a config's ``architectures`` gives them) whose
# output with the sink policy a test matches against an independent plain-PyTorch
# StreamingLLM reference (tests/reference.py, tests/reference_families.py), each with that
# test. Any other architecture is refused at start-up (``check_architecture``): the worker's
# checks (pure rotary, full-attention layers, one backend) are necessary, not sufficient; a
# model's own code can still place positions, norms or scales where the policy does not
# expect them, and only a reference comparison shows it.
TESTED_ARCHITECTURES = {
    "LlamaForCausalLM": "tests/test_engine_reference.py (SmolLM2-135M, real weights); "
                        f"{_FAMILY}[llama3] (Llama-3 rope scaling)",
    "GPTNeoXForCausalLM": f"{_FAMILY}[pythia], [neox_seq]",
    "FalconForCausalLM": f"{_FAMILY}[falcon7b], [falcon40b] (RoPE; Falcon with ALiBi is refused)",
    "Qwen3ForCausalLM": f"{_FAMILY}[qwen3]",
    "GemmaForCausalLM": f"{_FAMILY}[gemma]",
    "PhiForCausalLM": f"{_FAMILY}[phi2]",
    "GPTJForCausalLM": f"{_FAMILY}[gptj]",
    "MistralForCausalLM": f"{_FAMILY}[mistral] (sliding_window: null; a sliding window is refused)",
    "Qwen2ForCausalLM": f"{_FAMILY}[qwen2] (q/k/v biases; use_sliding_window: false)",
    "MptForCausalLM": f"{_ALIBI_FAMILY}[mpt-page], [mpt-4] (ALiBi)",
    "BloomForCausalLM": f"{_ALIBI_FAMILY}[bloom-page], [bloom-4] (ALiBi)",
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

# ALiBi architectures whose sink-policy output is checked against a reference
# (tests/test_families.py); other ALiBi models (Falcon-RW, Baichuan-13B, ...) are refused.
ALIBI_ARCHITECTURES = ("MptForCausalLM", "MPTForCausalLM", "BloomForCausalLM")

# Set to 1 to serve an architecture that is not in CHECKED_ARCHITECTURES (every other
# start-up check still applies); the engine logs a warning that its output is unverified.
ALLOW_UNCHECKED_ENV = "VLLMSINK_ALLOW_UNCHECKED"

# vLLM's assumption for a config that names no maximum length (``_get_and_verify_max_len``).
VLLM_DEFAULT_MAX_LEN = 2048


def position_limits(model_config) -> tuple[int, int]:
    """``(rope_limit, context)``: rows of the model's rotary table and the positions the
    default window is half of. An ALiBi model has no rotary table (``NO_ROTARY_LIMIT``: no
    epoch ever starts); its context is the maximum length vLLM derives from its config
    (MPT's ``max_seq_len``; 2048 for a config with none, e.g. BLOOM's), not the stream cap
    the sink policy sets as ``max_model_len``."""
    if model_config.uses_alibi:
        derived, _ = model_config.model_arch_config.derived_max_model_len_and_key
        return NO_ROTARY_LIMIT, VLLM_DEFAULT_MAX_LEN if derived == float("inf") else int(derived)
    limit = rope_limit_of(model_config.hf_text_config)
    return limit, limit


def check_model(model_config) -> None:
    """Refuse, before any process starts, models the policy cannot serve exactly."""
    name = model_config.model
    if model_config.runner_type != "generate":
        raise SinkConfigError(
            f"{name} runs as a {model_config.runner_type} model; the sink KV policy is for "
            "text generation. Use --kv-policy full"
        )
    checks = [
        (model_config.is_encoder_decoder, "is an encoder-decoder model"),
        (model_config.use_mla, "uses multi-head latent attention (MLA)"),
        (model_config.is_hybrid, "is a hybrid (Mamba/linear-attention) model"),
        (model_config.is_attention_free, "has no attention layers"),
        (model_config.uses_mrope, "uses M-RoPE"),
        (model_config.is_multimodal_model, "is multimodal"),
    ]
    for bad, what in checks:
        if bad:
            raise SinkConfigError(
                f"{name} {what}; the sink KV policy supports decoder-only text models with "
                "RoPE or ALiBi and full attention, of the architectures checked against its "
                "reference (Llama, Mistral, Qwen2, Qwen3, GPT-NeoX, Falcon, Gemma, Phi, GPT-J, "
                "MPT, BLOOM: docs/families.md). Use --kv-policy full for this model"
            )
    hf = model_config.hf_text_config
    if model_config.get_sliding_window() is not None or getattr(hf, "layer_types", None) and any(
        t != "full_attention" for t in hf.layer_types
    ):
        raise SinkConfigError(
            f"{name} has sliding-window or local attention layers of its own; the sink KV "
            "policy cannot combine them with its window. Use --kv-policy full, or a config "
            "with sliding_window: null if the model was trained without it"
        )
    if model_config.uses_alibi:
        # Keys carry no position; the kernel biases by index in the compacted row, i.e. by
        # the contract's cache positions (the worker checks the backend: check_alibi_backend).
        check_architecture(architecture_of(model_config), alibi=True, model=name,
                           transformers_backend=uses_transformers_backend(model_config))
        return
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    # GPT-J's config names its RoPE only by ``rotary_dim`` (vLLM builds a plain,
    # GPT-J-style RotaryEmbedding from it; the worker checks the module it built).
    if not params and getattr(hf, "rope_theta", None) is None and not getattr(hf, "rotary_dim", None):
        raise SinkConfigError(
            f"{name} ({hf.model_type}) names no rotary position embeddings (RoPE) and no ALiBi "
            "in its config (no rope_parameters, rope_theta or rotary_dim); "
            "the sink KV policy re-positions keys by rotation (RoPE) or by their place in the "
            "cache (ALiBi), not learned absolute positions. Use --kv-policy full for this model"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise SinkConfigError(
            f"{name} uses rope_type={rope_type!r}, whose rotation depends on more than the "
            f"position; the sink KV policy supports {sorted(SUPPORTED_ROPE_TYPES)}. Use "
            "--kv-policy full for this model"
        )
    if getattr(hf, "max_position_embeddings", None) is None:
        raise SinkConfigError(f"{name} has no max_position_embeddings; use --kv-policy full")
    if getattr(hf, "llama_4_scaling", None):
        # vLLM's Mistral scales each query by a function of its absolute position: a
        # position the sink policy re-assigns, and that no test checks.
        raise SinkConfigError(
            f"{name} scales its queries by their absolute position (llama_4_scaling); the sink "
            "KV policy re-assigns positions and has not been checked with that scale. Use "
            "--kv-policy full for this model"
        )
    check_architecture(architecture_of(model_config), model=name,
                       transformers_backend=uses_transformers_backend(model_config))


def architecture_of(model_config) -> str:
    """The registry name vLLM resolved the model to (``ModelConfig.architecture``: the
    config's first architecture vLLM serves, or its Transformers backend class)."""
    arch = getattr(model_config, "architecture", None)
    if not arch:
        archs = getattr(model_config, "architectures", None) or ()
        arch = archs[0] if archs else "(none)"
    return arch


def allow_unchecked() -> bool:
    return os.environ.get(ALLOW_UNCHECKED_ENV, "").strip().lower() in ("1", "true", "yes")


def uses_transformers_backend(model_config) -> bool:
    """Whether vLLM runs the model through its Transformers modeling backend (``model_impl``
    transformers, or an architecture vLLM has no class of its own for)."""
    try:
        return bool(model_config.using_transformers_backend())
    except Exception:  # noqa: BLE001 - a stand-in config without vLLM's registry info
        return architecture_of(model_config).startswith("Transformers")


def check_architecture(arch: str, alibi: bool = False, model: str | None = None,
                       transformers_backend: bool = False) -> None:
    """Refuse an architecture whose output with the sink policy no test checks against the
    reference (``CHECKED_ARCHITECTURES``; for ALiBi, ``ALIBI_ARCHITECTURES``), unless
    ``VLLMSINK_ALLOW_UNCHECKED=1`` asks for it knowingly (logged as a warning). vLLM's
    Transformers modeling backend is another implementation than the class a test checked,
    so it is refused even under a checked name."""
    checked = ALIBI_ARCHITECTURES if alibi else tuple(CHECKED_ARCHITECTURES)
    transformers_backend = transformers_backend or arch.startswith("Transformers")
    if arch in checked and not transformers_backend:
        return
    who = f"{model} ({arch})" if model else arch
    if allow_unchecked():
        logger.warning(
            "vllm-sink: serving %s with the sink KV policy although its architecture is not "
            "checked against the policy's reference (%s=1): every start-up check passed, but "
            "its output past the window is not verified",
            who,
            ALLOW_UNCHECKED_ENV,
        )
        return
    backend = (
        " (run by vLLM's Transformers modeling backend: model_impl='transformers', or an "
        "architecture vLLM has no class of its own for)" if transformers_backend else ""
    )
    if alibi:
        raise SinkConfigError(
            f"{who}{backend} uses ALiBi in an architecture vllm-sink has not checked against "
            f"its reference (checked: {', '.join(ALIBI_ARCHITECTURES)}). Use --kv-policy full "
            f"for this model, or set {ALLOW_UNCHECKED_ENV}=1 to serve it unverified"
        )
    raise SinkConfigError(
        f"architecture {arch}{backend} is not checked against the sink policy's reference; "
        f"checked: {', '.join(TESTED_ARCHITECTURES)} (and their same-class aliases "
        f"{', '.join(SAME_CLASS_ALIASES)}; docs/families.md). Use --kv-policy full for "
        f"{model or 'this model'}, or set {ALLOW_UNCHECKED_ENV}=1 to serve it with the sink "
        "policy unverified"
    )


def check_engine_args(args) -> None:
    """Refuse, before vLLM builds anything, engine settings the policy cannot serve."""
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
        raise SinkConfigError(
            "the sink KV policy runs on vLLM's V1 model runner, but VLLM_USE_V2_MODEL_RUNNER=1 "
            "asks for V2; unset VLLM_USE_V2_MODEL_RUNNER (the plugin picks V1 for sink engines)"
        )
    if args.enable_prefix_caching:
        raise SinkConfigError(
            "prefix caching cannot be combined with the sink KV policy (evicted, re-rotated "
            "pages cannot be shared by hash); drop --enable-prefix-caching"
        )
    if args.speculative_config:
        raise SinkConfigError(
            "speculative decoding is not supported with the sink KV policy; drop "
            "--speculative-config"
        )
    if args.kv_transfer_config:
        raise SinkConfigError(
            "KV connectors are not supported with the sink KV policy (they would save and "
            "load whole prefixes); drop --kv-transfer-config"
        )
    if str(args.kv_cache_dtype) not in ("auto", "bfloat16", "float16", "float32", "half", "float"):
        raise SinkConfigError(
            f"kv_cache_dtype={args.kv_cache_dtype!r}: the sink KV policy re-rotates cached "
            "keys and needs an unquantised KV cache; use --kv-cache-dtype auto"
        )
    if args.decode_context_parallel_size > 1 or getattr(args, "prefill_context_parallel_size", 1) > 1:
        raise SinkConfigError(
            "context parallelism is not supported with the sink KV policy; use tensor "
            "parallelism"
        )
    if args.pipeline_parallel_size > 1:
        raise SinkConfigError(
            "pipeline parallelism is not supported with the sink KV policy yet; use "
            "--tensor-parallel-size"
        )


def rotary_table(model: torch.nn.Module) -> RotationTable:
    """The model's one rotary embedding as a pure rotation table; refuses what is not a
    plain RoPE (M-RoPE, dual-chunk, several distinct embeddings, none at all)."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

    found = {}
    for module in model.modules():
        if isinstance(module, RotaryEmbeddingBase):
            found[id(module)] = module
    if not found:
        raise SinkConfigError(
            "the sink KV policy needs a model with rotary position embeddings (RoPE); "
            f"{type(model).__name__} has none. Use --kv-policy full for this model"
        )
    modules = list(found.values())
    kinds = {type(m).__name__ for m in modules}
    unsupported = kinds - PURE_ROTARY_CLASSES
    if unsupported:
        raise SinkConfigError(
            f"the sink KV policy re-positions keys by pure rotation and supports the rotary "
            f"embeddings {sorted(PURE_ROTARY_CLASSES)}, not {sorted(unsupported)}; "
            "use --kv-policy full for this model"
        )
    shapes = {(m.rotary_dim, m.is_neox_style, tuple(m.cos_sin_cache.shape)) for m in modules}
    if len(shapes) != 1:
        raise SinkConfigError(
            "the sink KV policy needs one rotary embedding shared by all layers; this "
            f"model has {len(shapes)} different ones. Use --kv-policy full"
        )
    m = modules[0]
    with torch.no_grad():
        cache = m._compute_cos_sin_cache().to("cpu", torch.float32)
    return RotationTable(cache, m.rotary_dim, m.is_neox_style)


def kv_layout(runner) -> str:
    """The key layout of the runner's attention backend (see ``vllm_sink.rotary``)."""
    backends = set()
    for groups in getattr(runner, "attn_groups", []):
        for group in groups:
            backends.add(group.backend.get_name())
    if not backends:
        raise SinkConfigError("no attention backend found for the sink KV policy")
    if len(backends) != 1:
        raise SinkConfigError(f"the sink KV policy needs one attention backend, got {backends}")
    name = backends.pop()
    if name == "CPU_ATTN":
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        cfg = runner.vllm_config
        isa = _get_attn_isa(
            cfg.model_config.dtype,
            cfg.cache_config.block_size,
            cfg.model_config.get_head_size(),
            cfg.cache_config.cache_dtype,
        )
        if isa not in ("vec", "vec16"):
            raise SinkConfigError(
                f"the sink KV policy supports the CPU attention kernels 'vec' and 'vec16', "
                f"not {isa!r} (chosen for this dtype and block size); use dtype float32 "
                "or a block_size that is not a multiple of 32"
            )
        return "cpu"
    if name in ("FLASH_ATTN", "TRITON_ATTN"):
        return "paged"
    raise SinkConfigError(
        f"the sink KV policy supports the CPU_ATTN, FLASH_ATTN and TRITON_ATTN attention "
        f"backends, not {name}; pick one with --attention-backend"
    )


# Backends whose ALiBi bias is ``slope * (kv_idx - q_idx)`` with ``kv_idx`` the key's index
# in the block-table row and ``q_idx = seq_len - q_len + i``: with a compacted row that is
# the contract's cache positions (CPU: ``apply_alibi_slopes``; Triton:
# ``triton_attention_helpers``). Others (FLASH_ATTN, ...) are not verified.
ALIBI_BACKENDS = ("CPU_ATTN", "TRITON_ATTN")


def attention_backend(runner) -> str:
    """The name of the one attention backend of the runner's attention layers (known as
    soon as the model is built, before the KV cache and ``runner.attn_groups`` exist)."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    layers = get_layers_from_vllm_config(runner.vllm_config, AttentionLayerBase)
    names = {layer.get_attn_backend().get_name() for layer in layers.values()}
    if len(names) != 1:
        raise SinkConfigError(f"the sink KV policy needs one attention backend, got {sorted(names)}")
    return names.pop()


def check_alibi_backend(backend: str) -> None:
    """An ALiBi model is served exactly only where the kernel's ALiBi distance is the key's
    index in the (compacted) row."""
    if backend not in ALIBI_BACKENDS:
        raise SinkConfigError(
            f"this ALiBi model runs on the {backend} attention backend; the sink KV policy "
            "needs the ALiBi bias computed from each key's index in the cache, verified for "
            f"{' and '.join(ALIBI_BACKENDS)} only. Use --attention-backend TRITON_ATTN (or "
            "--kv-policy full)"
        )


def check_layer_spec(name: str, spec) -> None:
    """A layer's KV-cache spec: plain causal full attention with an unquantised cache."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode

    if type(spec) is not FullAttentionSpec:
        raise SinkConfigError(
            f"layer {name} uses {type(spec).__name__}; the sink KV policy serves only "
            "plain full-attention layers (no MLA, Mamba/hybrid, cross-attention or "
            "learned attention sinks). Use --kv-policy full for this model"
        )
    if spec.sliding_window is not None or spec.attention_chunk_size is not None:
        raise SinkConfigError(
            f"layer {name} has its own sliding window / chunked local attention; the "
            "sink KV policy would measure it in compacted cache space. Use "
            "--kv-policy full for this model"
        )
    if spec.non_causal:
        raise SinkConfigError(f"layer {name} is non-causal; use --kv-policy full")
    if spec.kv_quant_mode != KVQuantMode.NONE:
        raise SinkConfigError(
            "the sink KV policy re-rotates cached keys and needs an unquantised KV "
            "cache; use --kv-cache-dtype auto"
        )


def check_runner(model_runner) -> None:
    """The worker's model runner is vLLM's V1 runner, the one the policy binds to."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not isinstance(model_runner, GPUModelRunner):
        raise SinkConfigError(
            f"the sink KV policy runs on vLLM's V1 model runner, not "
            f"{type(model_runner).__module__}; unset VLLM_USE_V2_MODEL_RUNNER"
        )


def check_partial_sink_kernel(sink_tokens: int, block_size: int, blocks_per_kv_block: int,
                              max_sink_tokens: int | None = None) -> None:
    if blocks_per_kv_block == 1:
        return
    if sink_tokens % block_size:
        raise SinkConfigError(
            f"a sink of {sink_tokens} tokens (not a whole number of {block_size}-token pages) "
            "needs the attention kernel to use the same block size as the KV cache; use "
            "sink_pages (whole pages) for this model"
        )
    if max_sink_tokens is not None and max_sink_tokens != sink_tokens:
        raise SinkConfigError(
            f"requests' own sinks (max_sink_tokens={max_sink_tokens}) may end inside a "
            f"{block_size}-token page, which needs the attention kernel to use the same block "
            "size as the KV cache; drop max_sink_tokens for this model"
        )


def check_context_parallel(dcp_world_size: int, pcp_world_size: int) -> None:
    if dcp_world_size > 1 or pcp_world_size > 1:
        raise SinkConfigError(
            "context parallelism is not supported with the sink KV policy; use tensor "
            "parallelism"
        )


def check_rotary_limit(table_rows: int, rope_limit: int) -> None:
    if table_rows < rope_limit:
        raise SinkConfigError(
            f"the model's rotary table has {table_rows} positions, fewer than the "
            f"{rope_limit} its config declares; use --kv-policy full for this model"
        )


def check_one_kv_cache_group(groups: int) -> None:
    if groups != 1:
        raise SinkConfigError(
            f"the sink KV policy needs exactly one KV cache group, this model has {groups}; "
            "use --kv-policy full for this model"
        )


def check_geometry(geometry) -> None:
    """The worker found the sink policy configured without the geometry the plugin
    resolves at start-up (settings put straight into ``additional_config["vllm_sink"]``)."""
    if geometry is None:
        raise SinkConfigError(
            "the sink KV policy was configured without going through the plugin's engine "
            "set-up (no resolved geometry in additional_config); pass the settings as "
            "kv_policy='sink' (LLM keywords, --kv-policy sink or --additional-config)"
        )
