"""Prompt logprobs of very long streams, as arrays, without vLLM's per-token objects.

Binds to vLLM 0.26.0 (``vllm/v1/engine``):
  LLMEngine.engine_core: EngineCoreClient.get_output() -> EngineCoreOutputs   wrapped per instance
  EngineCoreOutput.request_id, .new_prompt_logprobs_tensors (LogprobsTensors: column 0 of
    ``logprobs`` is the prompt token's own logprob, as ``Sampler.gather_logprobs`` lays it out)
  InprocClient.engine_core.scheduler.requests[id].num_computed_tokens   (progress, in-process only)

vLLM's output processor turns prompt logprobs into one Python container per token, which is
fine for a chat prompt and costs gigabytes for a stream of millions of tokens. The tap takes
the engine core's tensor (one float per token) before the output processor sees it. Used by
``benchmarks/ppl.py``; active only on the engine it is attached to, and only while attached.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from vllm_sink.patches.bindings import wrap_once


class PromptLogprobTap:
    """While attached to ``llm`` (a ``vllm.LLM``), collects each finished prompt's logprobs
    as a float32 array ``lp`` with ``lp[t] = log p(prompt[t + 1] | prompt[:t + 1])``
    (length ``len(prompt) - 1``), keyed by the engine's request id, and removes them from
    the outputs (so ``RequestOutput.prompt_logprobs`` comes back empty).

    ``on_step(computed)`` is called after every engine step with the tokens computed so
    far of the requests still running (in-process engines), or ``None`` otherwise.
    """

    def __init__(self, llm, on_step: Callable[[int | None], None] | None = None):
        self.client = llm.llm_engine.engine_core
        self.arrays: dict[str, np.ndarray] = {}
        self.on_step = on_step
        self._orig = self.client.get_output
        self.client.get_output = self._get_output

    def _computed(self) -> int | None:
        core = getattr(self.client, "engine_core", None)
        scheduler = getattr(core, "scheduler", None)
        if scheduler is None:
            return None
        return sum(r.num_computed_tokens for r in scheduler.requests.values())

    def _get_output(self):
        outputs = self._orig()
        for out in outputs.outputs:
            tensors = out.new_prompt_logprobs_tensors
            if tensors is not None:
                self.arrays[out.request_id] = tensors.logprobs[:, 0].float().numpy().copy()
                out.new_prompt_logprobs_tensors = None
        if self.on_step is not None:
            self.on_step(self._computed())
        return outputs

    def close(self) -> None:
        """Detach (idempotent)."""
        if self.client.get_output == self._get_output:
            del self.client.get_output  # the instance attribute; the class method remains
        self.on_step = None

    def __enter__(self) -> "PromptLogprobTap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------
# vLLM 0.26.0's GPUModelRunner._get_prompt_logprobs_dict converts the request's *whole*
# prompt (a Python list) to a device tensor at every step of a prompt-logprob request
# (``async_tensor_h2d(request.prompt_token_ids, ...)``): O(prompt) per step, 0.7 s a step
# at 1.2M tokens. Binds to: vllm.v1.worker.gpu_model_runner.async_tensor_h2d (module global).
_LONG_LIST = 1 << 16


def install_prompt_tensor_cache() -> None:
    """Make that conversion once per prompt (idempotent): lists longer than 65,536
    elements that come back (the same list object, same length) reuse their device tensor.
    The cache holds a reference to each list, so an id is never reused while cached; it
    keeps the last four. Opt-in, for long prompt-logprob streams (``benchmarks/ppl.py``)."""
    from vllm.v1.worker import gpu_model_runner as gmr

    def make(orig):
        cache: list[tuple[list, int, object, object, torch.Tensor]] = []

        def async_tensor_h2d(data, device, dtype=None):
            if not isinstance(data, list) or len(data) < _LONG_LIST:
                return orig(data, device, dtype)
            for lst, n, dev, dt, tensor in cache:
                if lst is data and n == len(data) and dev == device and dt == dtype:
                    return tensor
            tensor = orig(data, device, dtype)
            cache.append((data, len(data), device, dtype, tensor))
            del cache[:-4]
            return tensor
        return async_tensor_h2d

    wrap_once(gmr, "async_tensor_h2d", make)
