"""What binds the sink policy to vLLM's V1 model runner: the runner's construction, its
KV-cache specs, and the per-instance wraps that run the hook (``hook.SinkRunnerHook``).

Binds to (``vllm/v1/worker/gpu_model_runner.py``; the CPU runner subclasses it):
  GPUModelRunner.__init__(vllm_config, device)              wrapped: built with the model
    length of a compacted row (``row_tokens``), so its InputBatch is that size; limits
    glibc's arenas where the worker did not inherit the limit (vllm_sink.allocator)
  GPUModelRunner.get_kv_cache_spec()                        wrapped: our spec, attach
  GPUModelRunner._update_states(scheduler_output)           wrapped per instance (``attach``)
  GPUModelRunner._prepare_inputs(scheduler_output, num_scheduled_tokens)  wrapped per instance
  GPUModelRunner: vllm_config (additional_config, model_config.max_model_len), max_model_len
  vllm.v1.kv_cache_interface.FullAttentionSpec (each layer's, checked by
    ``refusals.check_layer_spec`` and turned into ``patches.spec.SinkWindowSpec``)

Only runners of engines configured with the sink policy are touched: ``attach`` wraps the
two methods on the runner *instance* (and its sampler's two: ``sampler``), and the hook
wraps two of its InputBatch's (``input_batch.TokenRows.bind``), all through
``bindings.wrap_once``.
"""

from __future__ import annotations

from vllm_sink import allocator
from vllm_sink.config import SinkConfig
from vllm_sink.patches import refusals
from vllm_sink.patches.bindings import wrap_once
from vllm_sink.patches.worker import sampler
from vllm_sink.patches.worker.block_table import block_table, kernel_blocks_per_page
from vllm_sink.patches.worker.hook import SinkRunnerHook
from vllm_sink.policy import SinkGeometry


def attach(runner, geometry: SinkGeometry) -> SinkRunnerHook:
    """Wrap ``_update_states`` and ``_prepare_inputs`` of this runner instance, and its
    sampler (``sampler.attach``), around a new hook; idempotent: a runner keeps its hook
    (``runner._vllm_sink_hook``)."""
    hook = getattr(runner, "_vllm_sink_hook", None)
    if hook is not None:
        return hook
    hook = SinkRunnerHook(runner, geometry)
    frames = hook.frames

    def make_update(orig):
        def _update_states(scheduler_output, *args, **kwargs):
            hook.before_update_states(scheduler_output)
            result = orig(scheduler_output, *args, **kwargs)
            hook.after_update_states(scheduler_output)
            return result
        return _update_states

    def make_prepare(orig):
        def _prepare_inputs(scheduler_output, *args, **kwargs):
            result = orig(scheduler_output, *args, **kwargs)
            frames.after_prepare_inputs(scheduler_output)
            return result
        return _prepare_inputs

    wrap_once(runner, "_update_states", make_update)
    wrap_once(runner, "_prepare_inputs", make_prepare)
    runner._vllm_sink_hook = hook
    sampler.attach(runner)
    return hook


# ---------------------------------------------------------------------- KV-cache specs
def sink_specs(runner, specs: dict, attach_hook=None) -> dict:
    """Turn every layer's ``FullAttentionSpec`` into a ``SinkWindowSpec``, refusing what
    the policy cannot serve exactly, and attach the runner hook (``attach``, or the given
    runner's: ``runner_v2.attach``)."""
    from vllm_sink.patches.spec import SinkWindowSpec

    geometry = SinkConfig.geometry_from_additional_config(runner.vllm_config.additional_config)
    config = SinkConfig.from_additional_config(runner.vllm_config.additional_config)
    refusals.check_geometry(geometry)
    out = {}
    for name, spec in specs.items():
        if isinstance(spec, SinkWindowSpec):
            out[name] = spec
            continue
        refusals.check_layer_spec(name, spec)
        out[name] = SinkWindowSpec.from_full(spec, geometry, config.kept_pages)
    if out:
        if attach_hook is None:
            hook = attach(runner, geometry)
            refusals.check_partial_sink_kernel(hook.S, hook.B, kernel_blocks_per_page(block_table(runner)),
                                               geometry.sink_cap)
        else:  # the V2 runner's (it checks the kernel's blocks once its block tables exist)
            attach_hook(runner, geometry)
        # The runner's per-sequence token rows hold compacted sequences (built that size
        # by ``_runner_init``; vLLM builds its InputBatch again once the KV cache exists).
        assert runner.max_model_len <= row_tokens(runner.vllm_config), runner.max_model_len
    return out


def install() -> None:
    """Wrap ``GPUModelRunner.get_kv_cache_spec`` (idempotent). The wrap returns vLLM's own
    specs untouched unless the engine is configured with the sink policy."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(orig):
        def get_kv_cache_spec(self):
            specs = orig(self)
            cfg = SinkConfig.from_additional_config(self.vllm_config.additional_config)
            if cfg is None or not cfg.enabled:
                return specs
            return sink_specs(self, specs)
        return get_kv_cache_spec

    wrap_once(GPUModelRunner, "get_kv_cache_spec", make)
    wrap_once(GPUModelRunner, "__init__", _runner_init)


def row_tokens(vllm_config) -> int | None:
    """Tokens in one row of a sink engine's worker (the compacted block-table row's
    length in tokens); ``None`` for other engines."""
    geometry = SinkConfig.geometry_from_additional_config(vllm_config.additional_config)
    if geometry is None:
        return None
    return min(vllm_config.model_config.max_model_len, geometry.widest.row_capacity * geometry.block_size)


def _runner_init(orig):
    def __init__(self, vllm_config, *args, **kwargs):
        """The runner of a sink engine sizes its per-sequence token buffers (its
        ``InputBatch``, built here) by :func:`row_tokens`, not by the stream cap: vLLM
        builds it with the model length the config has while the runner is built. The
        config keeps the stream cap (the scheduler, in this process too, reads it)."""
        tokens = row_tokens(vllm_config)
        if tokens is None:
            return orig(self, vllm_config, *args, **kwargs)
        # A worker started outside the front end's environment (Ray's) limits its arenas
        # here; one that inherited the limit (or the user's value) keeps it.
        allocator.limit_arenas()
        model_config = vllm_config.model_config
        cap = model_config.max_model_len
        model_config.max_model_len = tokens
        try:
            return orig(self, vllm_config, *args, **kwargs)
        finally:
            model_config.max_model_len = cap
    return __init__
