"""Worker side: executes the scheduler's decisions inside vLLM's V1 model runner (compacted
rows, frame positions, the re-anchored sink, epochs, sampling).

* ``runner``:  GPUModelRunner (get_kv_cache_spec, __init__, per-instance _update_states and
  _prepare_inputs, InputBatch rows)
* ``sampler``: GPUModelRunner._sample/_bookkeeping_sync (seeded sampling across prefill chunks)
* ``guard``:   Worker.get_kv_cache_spec (refuses a runner the policy does not bind)
"""

from __future__ import annotations


def install() -> None:
    from vllm_sink.patches.worker import guard, runner

    runner.install()
    guard.install()
