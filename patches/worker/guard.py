"""Guard on the worker: the sink policy runs on vLLM's V1 model runner only (phase 1).

Binds to: ``vllm.v1.worker.gpu_worker.Worker.get_kv_cache_spec`` (inherited by
``vllm.v1.worker.cpu_worker.CPUWorker``), and ``Worker.model_runner``.

On the GPU, vLLM 0.26 picks its V2 model runner by default for dense models; the plugin
makes sink engines pick V1 (``patches.frontend.vllm_config``). If a worker still ends up on another
runner, it refuses to start rather than serve without the policy.
"""

from __future__ import annotations

from vllm_sink.config import SinkConfig
from vllm_sink.patches import refusals
from vllm_sink.patches.bindings import wrap_once


def install() -> None:
    from vllm.v1.worker.gpu_worker import Worker

    def make(orig):
        def get_kv_cache_spec(self):
            cfg = SinkConfig.from_additional_config(self.vllm_config.additional_config)
            if cfg is not None and cfg.enabled:
                refusals.check_runner(self.model_runner)
            return orig(self)
        return get_kv_cache_spec

    wrap_once(Worker, "get_kv_cache_spec", make)
