"""Every start-up refusal of the sink policy that looks at vLLM objects, in one place.

Binds to: EngineArgs fields (speculative_config,
kv_transfer_config, kv_cache_dtype, decode/prefill_context_parallel_size,
pipeline_parallel_size), ModelConfig (runner_type, is_encoder_decoder, use_mla, is_hybrid,
is_attention_free, uses_mrope, uses_alibi, is_multimodal_model, get_sliding_window,
hf_text_config, model_arch_config.derived_max_model_len_and_key, architecture: the
registry name vLLM resolved, ``Transformers*`` for its Transformers modeling backend),
``FullAttentionSpec`` and ``KVQuantMode``, and ``GPUModelRunner`` (the runner the policy
binds). What is allowed is data, in ``vllm_sink.allowlist``; what the worker reads off the
built model (its rotary embedding, its attention backend) is probed by
``patches.worker.probes``.

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
* ``check_alibi_backend``: ALiBi models only on backends that bias by index in the row;
* ``check_runner``: the worker's model runner;
* ``check_partial_sink_kernel``: a partial sink page needs kernel block == KV block;
* ``check_context_parallel``: the scheduler's manager, under context parallelism;
* ``check_rotary_limit``, ``check_one_kv_cache_group``, ``check_geometry``: the worker.
"""

from __future__ import annotations

import os

from vllm.logger import init_logger

from vllm_sink.allowlist import (ALIBI_ARCHITECTURES, ALIBI_BACKENDS, ALLOW_UNCHECKED_ENV,
                                 SAME_CLASS_ALIASES, SUPPORTED_ROPE_TYPES, TESTED_ARCHITECTURES, VLLM_DEFAULT_MAX_LEN,
                                 checked_on)
from vllm_sink.config import SinkConfigError
from vllm_sink.patches.bindings import installed_version
from vllm_sink.policy import NO_ROTARY_LIMIT

logger = init_logger("vllm." + __name__)

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
                "MPT, BLOOM, and the mixtures of experts Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: "
                "docs/families.md). Use --kv-policy full for this model"
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
    served = checked_on(installed_version())
    checked = tuple(a for a in ALIBI_ARCHITECTURES if a in served) if alibi else tuple(served)
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
            f"its reference (checked: {', '.join(checked)}). Use --kv-policy full "
            f"for this model, or set {ALLOW_UNCHECKED_ENV}=1 to serve it unverified"
        )
    raise SinkConfigError(
        f"architecture {arch}{backend} is not checked against the sink policy's reference; "
        f"checked: {', '.join(a for a in TESTED_ARCHITECTURES if a in served)} (and their same-class "
        f"aliases {', '.join(a for a in SAME_CLASS_ALIASES if a in served)}; docs/families.md). "
        f"Use --kv-policy full for "
        f"{model or 'this model'}, or set {ALLOW_UNCHECKED_ENV}=1 to serve it with the sink "
        "policy unverified"
    )


def check_engine_args(args) -> None:
    """Refuse, before vLLM builds anything, engine settings the policy cannot serve."""
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
    """The worker's model runner is one the policy binds to: vLLM's V1 or V2 runner."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not isinstance(model_runner, (GPUModelRunner, V2Runner)):
        raise SinkConfigError(
            f"the sink KV policy runs on vLLM's V1 and V2 model runners, not "
            f"{type(model_runner).__module__}"
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
