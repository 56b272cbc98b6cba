"""The steps that plan no row, carried out without the general path's numpy work: the
host's time per step counts most in the steady state of a long generation.

* a step of at most ``SMALL_BATCH`` rows that all decode within their ``quiet_end``
  (``vllm_sink.policy.quiet_end``) is carried out in Python numbers (numpy's per-call cost
  exceeds the work on so few rows): ``FastPaths.quiet_small_batch``;
* a step in which the batch is the one the last planned step left, unchanged, every row
  decoding one token within its ``quiet_end`` and releasing nothing, costs one subtraction
  over the batch (``SteadyBatch``): ``FastPaths.steady_step``.

Binds to:
  SchedulerOutput: num_scheduled_tokens, total_num_scheduled_tokens, scheduled_new_reqs,
    finished_req_ids, scheduled_cached_reqs (resumed_req_ids, all_token_ids)
  vllm.v1.worker.gpu_input_batch.InputBatch: num_reqs, num_computed_tokens_cpu,
    num_tokens_no_spec, num_prompt_tokens, token_ids_cpu
  GPUModelRunner: input_batch, requests[req_id].block_ids (with ``ROW_LOG`` on)
"""

from __future__ import annotations

import numpy as np

from vllm_sink.invariants import ROW_LOG
from vllm_sink.token_rows import release_at, release_due

# Batches of at most this many rows take their quiet steps in Python numbers, not numpy
# (and ``positions`` recomputes their discard mask so).
SMALL_BATCH = 8
# Steps of a batch left as the last planned step left it take the steady path (``SteadyBatch``).
STEADY = True


class SteadyBatch:
    """What a step needs of a batch that stays as the last planned step left it.

    Built at the end of a planned step in which every row of the batch was scheduled, from
    the table as that step left it: the rows' request ids in order, and per row its slot
    offset, its ``quiet_end`` (a step ``[a, a + 1)`` is quiet iff ``a < quiet``), the row
    length at which output ids become due for release (``token_rows.release_at``), and the
    step's frame offsets.

    Invariant: it is used for a later step only when nothing has changed the batch or its
    streams' state since it was built: no request added, finished, resumed or moved to
    another row, no scheduler decision for the worker (``StepMeta``), no output ids handed
    back by the scheduler, every row scheduled for exactly one token, every row quiet and
    none due for release. Then the general path would plan no row, move no token, release
    nothing and set these same frame offsets, and the step is ``computed -= offs``. Any
    other step takes the general path, which builds it again (or drops it)."""

    __slots__ = ("rids", "offs", "quiet", "release_at", "frame", "any_offset")

    def __init__(self, rids: list[str], offs, quiet, release_at, frame, any_offset: bool):
        self.rids, self.offs, self.quiet, self.release_at = rids, offs, quiet, release_at
        self.frame, self.any_offset = frame, any_offset


class FastPaths:
    """The hook's two fast paths (module docstring) and the batch the last planned step left.

    Invariant: each either carries out the whole step exactly as the general path
    (``hook.SinkRunnerHook.after_update_states``) would, computed-token counts, output
    releases and frame offsets (``positions.FramePositions``) included, and returns True;
    or changes nothing and returns False. ``last`` is the ``SteadyBatch`` of the last
    planned step, while no other step came between; ``steady_steps`` counts the steps the
    steady path carried out (tests check that it is used).
    """

    def __init__(self, runner, streams, frames, token_rows, check_rows: bool):
        self.runner, self.streams, self.frames, self.token_rows = runner, streams, frames, token_rows
        self.check_rows = check_rows
        self.last: SteadyBatch | None = None
        self.steady_steps = 0

    def remember(self, rids: list[str], slots, offs, frame, any_offset: bool) -> None:
        """Keep the batch a planned step in which every row was scheduled left (``rids``,
        ``slots`` and ``offs`` per row of the batch, in order), for the steady path."""
        ib = self.runner.input_batch
        table = self.streams
        num_reqs = ib.num_reqs
        due_at = release_at(offs, ib.num_prompt_tokens[:num_reqs], table.out_trimmed[slots],
                            ib.token_ids_cpu.shape[1])
        self.last = SteadyBatch(list(rids), offs.astype(ib.num_computed_tokens_cpu.dtype),
                                table.quiet_end[slots], due_at, frame, any_offset)

    def steady_step(self, scheduler_output, meta, rids: list[str]) -> bool:
        """Carry out this step from the last planned step's batch if its invariant holds
        (``SteadyBatch``); returns False, having changed nothing but forgotten that batch,
        otherwise."""
        steady, self.last = self.last, None
        if steady is None or not STEADY:
            return False
        so = scheduler_output
        cached = so.scheduled_cached_reqs
        if (so.total_num_scheduled_tokens != len(rids) or so.scheduled_new_reqs or so.finished_req_ids
                or cached.resumed_req_ids or getattr(cached, "all_token_ids", None) or meta
                or rids != steady.rids):
            return False
        ib = self.runner.input_batch
        computed = ib.num_computed_tokens_cpu[: len(rids)]
        late = computed >= steady.quiet
        due = ib.num_tokens_no_spec[: len(rids)] >= steady.release_at
        if np.count_nonzero(late) or np.count_nonzero(due):
            return False
        computed -= steady.offs
        frames = self.frames
        frames.offsets, frames.any_offset = steady.frame, steady.any_offset
        self.steady_steps += 1
        self.last = steady
        return True

    def quiet_small_batch(self, rids, sched) -> bool:
        """A quiet step (every row decodes within its ``quiet_end``) of a batch of at most
        ``SMALL_BATCH`` rows, carried out in Python numbers, which cost less than numpy's
        per-call overhead on so few rows: the same effect as the general path for a quiet
        step (``input_batch.TokenRows.compact`` with no loud row). Returns False, having
        changed nothing, if any row is not quiet."""
        table = self.streams
        ib = self.runner.input_batch
        ncc = ib.num_computed_tokens_cpu
        todo = []
        for row, rid in enumerate(rids):
            n = sched.get(rid, 0)
            slot = table.slot_of.get(rid)
            if n and (slot is None or int(ncc[row]) + n > table.quiet_end[slot]):
                return False
            todo.append((row, slot, n))
        frames = self.frames
        frame = frames.offsets = np.zeros(len(rids), dtype=np.int64)
        width = ib.token_ids_cpu.shape[1]
        any_offset = False
        for row, slot, n in todo:
            if not n:
                continue
            if self.check_rows:
                ROW_LOG.record_worker(rids[row], int(ncc[row]), self.runner.requests[rids[row]].block_ids[0])
            off = int(table.slot_offset[slot])
            ncc[row] -= off
            frame[row] = shift = off - int(table.base[slot])
            any_offset |= shift != 0
            if release_due(int(ib.num_tokens_no_spec[row]), off, int(ib.num_prompt_tokens[row]),
                           int(table.out_trimmed[slot]), width):
                self.token_rows.release_outputs(rids[row], slot)
        frames.any_offset = any_offset
        return True
