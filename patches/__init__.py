"""Every binding of vllm-sink to vLLM internals, one module per vLLM component.

Pinned to vLLM 0.26.0. Upgrading vLLM means editing this package and nothing else:

* ``engine_args``:   EngineArgs (CLI flags, config folding, refusals), LLM.__init__ kwargs
* ``kv_cache_spec``: our KV-cache spec + manager, through KVCacheSpecRegistry; the
  admission hook on KVCacheManager.allocate_slots
* ``model_runner``:  V1 GPUModelRunner (compacted rows, frame positions, rotations)
* ``sessions``:      KVCacheManager.free/get_computed_blocks, Scheduler.schedule (kept
  streams resumed through vLLM's prefix-hit path)
* ``sampler``:       V1 GPUModelRunner._sample/_bookkeeping_sync (seeded sampling across
  prefill chunks on the CPU)
* ``chat_tokens``:  BaseRenderer._tokenize_prompt (a re-sent history tokenised once, by
  segment between special tokens, with sessions on)
* ``chat_sink``:    OnlineRenderer.preprocess_chat (with ``sink_tokens="system"``, a chat
  request's sink is its rendered system prompt, set as its own sink)
* ``detokenizer``:  FastIncrementalDetokenizer.__init__ (the front end's detokeniser primed
  with the prompt's last tokens, not the whole re-sent history)
* ``input_processor``: InputProcessor._validate_params (a request's own sink checked in
  the front end)
* ``vllm_config``:   VllmConfig.use_v2_model_runner (sink engines get the V1 runner)
* ``worker``:        Worker.get_kv_cache_spec (refuses the V2 runner)

``install()`` runs in every vLLM process through the ``vllm.general_plugins`` entry point
and is idempotent. The wraps pass through untouched unless the engine's
``additional_config`` carries the sink policy.
"""

from __future__ import annotations

VLLM_VERSION = "0.26.0"


def install() -> None:
    import vllm
    from vllm.logger import init_logger

    if not vllm.__version__.startswith(VLLM_VERSION):
        init_logger(__name__).warning(
            "vllm-sink is pinned to vLLM %s; found %s. Its patches may not fit.",
            VLLM_VERSION,
            vllm.__version__,
        )
    from vllm_sink.patches import frontend, scheduler, worker

    frontend.install()
    scheduler.install()
    worker.install()
