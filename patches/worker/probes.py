"""What the worker reads off the built model and its attention backend, checked against the
allow-list (``vllm_sink.allowlist``) and handed to the runner hook.

Binds to: the rotary embedding classes under
``vllm.model_executor.layers.rotary_embedding`` (``RotaryEmbeddingBase``: ``rotary_dim``,
``is_neox_style``, ``cos_sin_cache``, ``_compute_cos_sin_cache``),
``get_layers_from_vllm_config`` with ``AttentionLayerBase.get_attn_backend``, the runner's
``attn_groups`` (``group.backend.get_name()``) and the CPU backend's ``_get_attn_isa``.

* ``rotary_table``: the model's rotary embedding as a pure rotation table;
* ``kv_layout``: the attention backend and its key layout (``vllm_sink.rotary``);
* ``attention_backend``: the one backend of the model's attention layers (for ALiBi models).
"""

from __future__ import annotations

import torch

from vllm_sink.allowlist import PURE_ROTARY_CLASSES
from vllm_sink.config import SinkConfigError
from vllm_sink.rotary import RotationTable


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
