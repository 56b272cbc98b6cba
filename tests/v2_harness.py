"""vLLM's V2 model runner on the CPU, for the tests: its Triton kernels run in Triton's
interpreter (``TRITON_INTERPRET=1``).

vLLM builds the V2 runner only where Triton has an active backend (``HAS_TRITON``), and a
CPU build of vLLM asks for Triton's CPU backend, which the CPU wheels do not ship. ``enable``
registers the interpreter under that name, before vLLM is imported, in a process of its own
(vLLM's V1 runner would then pick Triton kernels of its own too): the V2 runner's input
preparation, block tables, slot mappings and sampler run as on the GPU, one interpreted
kernel launch at a time. Two kernels that read the whole vocabulary for every scored token
(the sampler's log-softmax at the scored ids, and the rank of the sampled id) take about
0.35 s per token interpreted: ``enable`` computes both with torch instead (same values: the
log-softmax in float32, the rank as the count of logits at least the sampled one's). The
plugin's own code, and the rest of vLLM's, runs as it is.
"""

from __future__ import annotations

import os
import sys


def enable() -> None:
    if "vllm" in sys.modules:
        raise RuntimeError("v2_harness.enable() must run before vLLM is imported")
    os.environ["TRITON_INTERPRET"] = "1"
    # No device is visible: vLLM then accepts a Triton without an active GPU driver.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from triton.backends import backends

    backends.setdefault("cpu", backends["nvidia"])
    from vllm.v1.worker.gpu.sample import logprob

    logprob.compute_token_logprobs = _token_logprobs
    logprob._ranks_kernel = _Ranks()


def _token_logprobs(logits, token_ids):
    """``logprob.compute_token_logprobs`` in torch: float32 log-softmax at ``token_ids``."""
    import torch

    return torch.log_softmax(logits.float(), dim=-1).gather(1, token_ids.long())


class _Ranks:
    """``logprob._ranks_kernel[grid](out, logits, stride, token_ids, vocab_size, BLOCK_SIZE=)``
    in torch: how many logits are at least the sampled token's."""

    def __getitem__(self, grid):
        return self

    def __call__(self, out, logits, stride, token_ids, vocab_size, **_):
        x = logits[:, :vocab_size].gather(1, token_ids.long().view(-1, 1))
        out.copy_((logits[:, :vocab_size] >= x).sum(dim=1))
