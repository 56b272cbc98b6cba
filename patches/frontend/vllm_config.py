"""Which model runner a sink engine gets: vLLM's V1 runner, in every process.

Binds to (``vllm/config/vllm.py``):
  VllmConfig.use_v2_model_runner   (property, wrapped)

vLLM 0.26 picks its V2 model runner by default for dense models on the GPU, from this
property; the worker builds its runner from it, and the scheduler and
``max_concurrent_batches`` read it too. The sink policy's bindings are on the V1 runner
(``patches.worker``), so the property answers ``False`` for a config that carries the
sink policy in ``additional_config`` (the plugin stores it there before vLLM builds the rest of
the config, see ``patches.frontend.engine_args``). The config is pickled to the engine core and every
worker, and the plugin is loaded in each of them, so all processes agree, whether the engine
is made by ``LLM(...)``, ``vllm serve`` or ``AsyncLLM``: no environment variable is needed.
An explicit ``VLLM_USE_V2_MODEL_RUNNER=1`` with the sink policy is refused at start-up
(``patches.frontend.engine_args``). Configs without the sink policy get vLLM's own answer.
"""

from __future__ import annotations

import os

from vllm_sink.config import CONFIG_KEY
from vllm_sink.patches.bindings import wrap_once


def wants_v1_runner(additional_config) -> bool:
    """Whether a config's ``additional_config`` carries the sink policy."""
    cfg = (additional_config or {}).get(CONFIG_KEY) if isinstance(additional_config, dict) else None
    return bool(cfg) and cfg.get("policy") == "sink"


def install() -> None:
    """Wrap ``VllmConfig.use_v2_model_runner`` (idempotent)."""
    from vllm.config import VllmConfig

    def make(orig):
        def use_v2_model_runner(self) -> bool:
            if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None and wants_v1_runner(
                    getattr(self, "additional_config", None)):
                return False
            return orig(self)
        return use_v2_model_runner

    wrap_once(VllmConfig, "use_v2_model_runner", make)
