"""Step 2 of the sink policy, after vLLM prepared the step's inputs: the model gets frame
positions, and the rows whose sampled token is thrown away are the compacted rows'.

Binds to (``vllm/v1/worker/gpu_model_runner.py``; the CPU runner subclasses it):
  GPUModelRunner._prepare_inputs(scheduler_output, num_scheduled_tokens)  wrapped per instance
    (``runner.attach``; relied on: positions, seq_lens, optimistic_seq_lens_cpu, the slot
    mapping and the input ids come from input_batch.num_computed_tokens_cpu and
    token_ids_cpu; req_indices.np holds the step's row of each token; the rows to discard
    from ``requests[r].num_tokens < seq_lens``, recomputed here: discard_request_mask)
  GPUModelRunner: positions (the persistent buffer CUDA graphs read), optimistic_seq_lens_cpu,
    req_indices, discard_request_mask (``np``, ``copy_to_gpu``), input_batch.num_reqs and
    num_tokens_no_spec
  SchedulerOutput.total_num_scheduled_tokens
"""

from __future__ import annotations

import numpy as np

from vllm_sink.patches.worker import steady as fast
from vllm_sink.patches.worker.kv_writes import HostStager


class FramePositions:
    """The step's frame offset of each row and their application to vLLM's positions.

    ``offsets[row]`` is the row's ``slot offset - base`` for this step (0 for a row not
    scheduled), set after ``_update_states`` by the hook (``hook.SinkRunnerHook``) or one
    of its fast paths (``steady``), and ``any_offset`` whether any is not 0. Invariant:
    both describe the batch as ``_update_states`` left it, whose rows vLLM's
    ``_prepare_inputs`` then reads (vLLM reorders rows inside ``_update_states`` only).
    """

    def __init__(self, runner, stager: HostStager):
        self.runner, self.stager = runner, stager
        self.offsets = np.zeros(0, dtype=np.int64)
        self.any_offset = False

    def after_prepare_inputs(self, scheduler_output) -> None:
        """vLLM computed the step's positions as compacted indices (``a - off`` on); the
        model gets frame positions, ``t - base = c + (off - base)``. ``seq_lens`` and the
        slot mapping are already the compacted row's. vLLM decides which rows' sampled
        tokens to throw away (a prompt chunk that is not the last) by comparing ``seq_lens``
        with the request state's token count, which is absolute: the rows' compacted count
        (``num_tokens_no_spec``) is the one to compare with."""
        r = self.runner
        num_reqs = r.input_batch.num_reqs
        seq_lens, tokens = r.optimistic_seq_lens_cpu.numpy(), r.input_batch.num_tokens_no_spec
        mask = r.discard_request_mask.np
        if num_reqs <= fast.SMALL_BATCH:  # (in Python numbers: cheaper than numpy on so few rows)
            changed = False
            for row in range(num_reqs):
                discard = bool(seq_lens[row] < tokens[row])
                if discard != mask[row]:
                    mask[row], changed = discard, True
        else:
            discard = seq_lens[:num_reqs] < tokens[:num_reqs]
            changed = bool((discard != mask[:num_reqs]).any())
            mask[:num_reqs] = discard
        if changed:
            r.discard_request_mask.copy_to_gpu(num_reqs)
        if not self.any_offset:
            return
        T = scheduler_output.total_num_scheduled_tokens
        # Per token, from the host copy of the step's row indices (the rows are as
        # ``after_update_states`` left them: vLLM reorders them inside ``_update_states``).
        r.positions[:T].add_(self.stager.put(self.offsets[r.req_indices.np[:T]]))
