"""Worker side: executes the scheduler's decisions inside vLLM's V1 model runner (compacted
rows, frame positions, the re-anchored sink, epochs, sampling).

* ``runner``:      GPUModelRunner (get_kv_cache_spec, __init__; per instance _update_states
  and _prepare_inputs, around the hook)
* ``hook``:        the per-runner hook that plans each step (the scheme is told there)
* ``streams``:     the worker's state of every stream, by slot
* ``input_batch``: InputBatch token rows in compacted coordinates (add_request and
  _make_prompt_token_ids_cpu_tensor, per instance)
* ``block_table``: BlockTable rows in compacted coordinates
* ``kv_writes``:   KV-cache writes (epochs, sink re-anchoring) and their host staging
* ``positions``:   after _prepare_inputs: frame positions, the discard mask
* ``steady``:      the steps that plan no row (small quiet batches, the steady batch)
* ``sampler``:     GPUModelRunner._sample/_bookkeeping_sync (seeded sampling across prefill chunks)
* ``probes``:      the model's rotary embedding and attention backend
* ``guard``:       Worker.get_kv_cache_spec (refuses a runner the policy does not bind)
"""

from __future__ import annotations


def install() -> None:
    from vllm_sink.patches.worker import guard, runner, runner_v2

    runner.install()
    runner_v2.install()
    guard.install()
