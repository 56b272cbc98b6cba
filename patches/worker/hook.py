"""The sink policy inside vLLM's V1 model runner: compacted rows, frame positions, rotations.

``SinkRunnerHook`` runs before and after the runner's ``_update_states`` and after its
``_prepare_inputs`` (``runner.attach``); it plans each step and owns one collaborator per
job:

* ``streams.StreamTable``: the worker's state of every stream, by slot;
* ``input_batch.TokenRows``: the InputBatch's token rows and the kept output ids;
* ``block_table.BlockRows``: the block-table rows and the requests' block ids;
* ``kv_writes.KvWrites``: epochs and the sink's re-anchoring in the KV cache;
* ``positions.FramePositions``: frame positions and the discard mask (step 2 below);
* ``steady.FastPaths``: the steps that plan no row.

Binds to (``vllm/v1/worker/gpu_model_runner.py``; the CPU runner subclasses it):
  GPUModelRunner._update_states(scheduler_output)  wrapped per instance (``runner.attach``)
  GPUModelRunner._update_streaming_request (relied on: a streaming-input session's next chunk
    comes as a NewRequestData under the id the runner still holds, its block_ids the row
    the scheduler ships (``StepMeta.continued``); the runner keeps the request's state)
  GPUModelRunner: input_batch (req_ids, num_reqs, num_computed_tokens_cpu,
    num_prompt_tokens), requests[req_id] (block_ids), use_async_scheduling, get_model(),
    device, vllm_config (model_config.uses_alibi)
  SchedulerOutput: scheduled_new_reqs (req_id, num_computed_tokens), scheduled_cached_reqs
    (req_ids, resumed_req_ids, all_token_ids, num_output_tokens), finished_req_ids,
    num_scheduled_tokens

The runner sees each sink stream as its compacted sequence ``tokens[0:S] ++ tokens[w0:]``
(``vllm_sink.token_rows``): its token row, its computed-token count and its block-table row
are in compacted coordinates, so every per-sequence buffer is the size of sink + window +
the steps in flight, whatever the stream's length. The output ids the runner keeps for its
sampler are cut to what penalties and ``min_tokens`` read (``token_rows.output_keep``).

Per step and per sequence (``vllm_sink.policy.plan_step``):
  1. after ``_update_states``: drop the evicted pages from the request's block ids and its
     block-table row, so the row is ``[sink pages] + pages from ceil(w0 / B)`` (ordered, no
     ring); with a partial sink page (``S mod B = r > 0``), the page holding ``w0``, whose
     slots ``[r, B)`` are the first window tokens, becomes the last sink page and the old one
     leaves instead (nothing is copied: the sink's ``r`` slots are rewritten in it from
     their pristine copy); shift the token row by as many tokens as the window moved, write
     the step's prompt tokens into it, and set the computed-token count to ``a - (w0 - S)``;
     then, before the forward, rotate the window keys once if an epoch starts and re-anchor
     the sink keys (and, in a new partial sink page, write the sink values) from their
     pristine copy;
  2. after ``_prepare_inputs``: vLLM built the slot mapping, ``seq_lens`` and positions from
     the compacted count, so the attention kernels of every backend see an ordinary short
     sequence; the positions become frame positions (``t - base``: plus ``w0 - S - base``),
     in the runner's persistent buffer, so CUDA graphs see it too.
A row that decodes within its ``quiet_end`` (``vllm_sink.policy.quiet_end``: its window
start and epoch stay as last planned) is not planned again: only step 1's computed-token
count and output release are carried out for it; the step plans the other rows. A step of
at most ``steady.SMALL_BATCH`` rows that are all quiet is carried out in Python numbers
(numpy's per-call cost exceeds the work on so few rows). A step in which the batch is the one
the last planned step left, unchanged, every row decoding one token within its ``quiet_end``
and releasing nothing, costs one subtraction over the batch (``steady.SteadyBatch``): the
steady state of a long generation, where the host's time per step counts.

ALiBi models (MPT, BLOOM; no rotary table: ``SinkRunnerHook.table is None``): keys carry no
position and the attention kernel biases each key by its index in the compacted row
(``refusals.check_alibi_backend``), which *is* the contract's cache position. So nothing
rotates: no epoch ever starts (``policy.NO_ROTARY_LIMIT``; frame positions stay ``t``, and
the model ignores them), whole sink pages are never rewritten, and only a partial sink page
that takes over from the old one gets the sink's ``r`` pristine keys and values copied into
its slots ``[0, r)``.
"""

from __future__ import annotations

from itertools import repeat

import numpy as np
import torch
from vllm.logger import init_logger

from vllm_sink.invariants import ROW_LOG
from vllm_sink.metrics import SINK_STATS
from vllm_sink.patches import refusals
from vllm_sink.patches.worker import probes, steady
from vllm_sink.patches.worker.block_table import BlockRows
from vllm_sink.patches.worker.input_batch import TokenRows
from vllm_sink.patches.worker.kv_writes import HostStager, KvWrites
from vllm_sink.patches.worker.positions import FramePositions
from vllm_sink.patches.worker.streams import StreamTable
from vllm_sink.policy import SinkGeometry, plan_steps, quiet_end, window_moves
from vllm_sink.rotary import RotationTable
from vllm_sink.step_meta import META_ATTR as STEP_META

# Under the "vllm" logger tree, so that vLLM's logging configuration shows our lines.
logger = init_logger("vllm." + __name__)


class SinkRunnerHook:
    """Per-runner state, the step's planning and the collaborators that carry it out. One
    instance per model runner (``runner.attach``).

    Invariant: after ``after_update_states``, every scheduled row of the batch is its
    stream's compacted sequence for the step (token row, computed-token count, block-table
    row), its KV cache holds its sink keys at the planned angle, and ``frames`` holds the
    step's frame offsets; the stream table describes each stream as this step left it.
    """

    def __init__(self, runner, geometry: SinkGeometry):
        self.runner = runner
        self.geometry = g = geometry
        # Short names for the hot path (vllm_sink.policy's notation).
        self.B, self.S, self.W = g.block_size, g.sink_tokens, g.kv_window
        self.streams = StreamTable(self.S, self.B)
        # The rotary table, or None for an ALiBi model (nothing rotates: module docstring).
        self.table: RotationTable | None = None
        if runner.vllm_config.model_config.uses_alibi:
            refusals.check_alibi_backend(probes.attention_backend(runner))
        else:
            self.table = probes.rotary_table(runner.get_model())
            refusals.check_rotary_limit(self.table.limit, g.rope_limit)
        self.rope_limit = g.rope_limit
        self.check_rows = ROW_LOG.enabled()  # read once, not per row per step
        device = getattr(runner, "device", None)
        self.device = device if isinstance(device, torch.device) else torch.device("cpu")
        self.stager = HostStager(self.device)
        self.kv = KvWrites(runner, self.table, self.streams, self.stager, self.B)
        self.block_rows = BlockRows(runner, self.streams, self.kv, self.B)
        self.token_rows = TokenRows(runner, self.streams, self.device)
        # This step's frame offset of each row, planned here and read in ``_prepare_inputs``.
        self.frames = FramePositions(runner, self.stager)
        self.fast = steady.FastPaths(runner, self.streams, self.frames, self.token_rows, self.check_rows)
        if SINK_STATS.role == "process":
            SINK_STATS.role = "worker"
        logger.info(
            "vllm-sink worker: sink %d tokens, window %d tokens, %s",
            self.S,
            self.W,
            f"{self.rope_limit} rotary positions" if self.table else "ALiBi (no rotation)",
        )

    # ------------------------------------------------------------------ step 1
    def before_update_states(self, scheduler_output) -> None:
        """vLLM's streaming-input sessions (``AsyncLLM.generate`` fed an async generator of
        ``StreamingInput``): a session's next chunk is scheduled as a *new* request under
        the id whose state the runner still holds, past token 0. The scheduler decides that
        the stream goes on (``StepMeta.continued``) and ships its row as this runner holds
        it (sink pages, then its window pages from ``first_live``, before this step's
        transition, as for any running stream) plus the pages allocated for the chunk."""
        table = self.streams
        self.token_rows.bind()
        # A stream resumed after a preemption restarts from token 0: its row is written
        # from there when vLLM adds it back (``TokenRows.add_request``).
        cached = scheduler_output.scheduled_cached_reqs
        if getattr(self.runner, "use_async_scheduling", False):
            # With asynchronous scheduling, a stream not scheduled in the previous step gets
            # its output ids back from the scheduler (``all_token_ids``: all of them, or the
            # last ones the engine core holds, ``TokenTail``), in place of the ones this
            # runner kept (``_update_states`` takes the last ``num_output_tokens`` of them).
            for i, rid in enumerate(cached.req_ids):
                ids = cached.all_token_ids.get(rid)
                slot = table.slot_of.get(rid)
                if ids is not None and slot is not None:
                    table.out_trimmed[slot] = max(0, cached.num_output_tokens[i] - len(ids))
        for rid in cached.resumed_req_ids:
            table.reset(rid)
        table.continuing.clear()
        meta = getattr(scheduler_output, STEP_META, None)
        for rid, first_live in meta.continued.items() if meta else ():
            if rid in scheduler_output.finished_req_ids:
                continue
            slot = table.slot_of.get(rid)
            if slot is None or rid not in self.runner.requests:
                raise RuntimeError(f"vllm-sink: streaming-input session {rid} continues, but this "
                                   "runner holds no state for it")
            # Both sides hold the same row (the scheduler's manager applies the same
            # transitions, ``row_transition``): checked, not repaired.
            assert int(table.first_live[slot]) == first_live, (rid, int(table.first_live[slot]), first_live)
            table.continuing.add(rid)
            # vLLM folds the outputs into the chunk's prompt (the whole stream so far).
            table.out_trimmed[slot] = 0

    def after_update_states(self, scheduler_output) -> None:
        """Plan the step for every scheduled row at once, then carry out what it asks: the
        rows whose window moved are compacted (and the pages that left are the ones the
        scheduler's manager freed: both apply ``row_transition``), epochs rotate the window,
        moved sinks are re-anchored in one write for all rows and layers."""
        table = self.streams
        # This step's index arrays go to the device from the start of the pinned buffer (the
        # previous step's copies from it are done: ``synchronize_input_prep``); every write
        # of the step stages after this, the page copies included.
        self.stager.reset()
        # The scheduler's session decisions (``patches.scheduler.sessions``): keep, resume, release.
        meta = getattr(scheduler_output, STEP_META, None)
        kept = set(meta.kept) if meta else ()
        for rid in scheduler_output.finished_req_ids:
            if rid in kept:
                table.keep(rid)
            else:
                table.drop(rid)
        SINK_STATS.publish(force=bool(scheduler_output.finished_req_ids))
        resumed = meta.resumed if meta else {}
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id in resumed:
                table.resume(new.req_id, resumed[new.req_id])
                self.block_rows.adopt(new.req_id, meta.first_live[new.req_id])
            elif new.req_id in table.continuing:
                # A streaming-input session's next chunk: its state (sink, frame base, sink
                # rotation, pristine sink, first window page) and its row go on.
                table.quiet_end[table.slot_of[new.req_id]] = 0
            else:  # (past token 0: prefix-cache hits, computed before any eviction)
                table.start(new.req_id, meta.sink_tokens.get(new.req_id, self.S) if meta else self.S)
        for key in meta.released if meta else ():
            table.release(key)
        if meta and meta.copies:  # before any page is written this step
            self.kv.copy_pages(meta.copies)
            self.block_rows.private = dict(meta.private)

        ib = self.runner.input_batch
        num_reqs = ib.num_reqs
        rids = ib.req_ids[:num_reqs]
        fast, frames = self.fast, self.frames
        if fast.last is not None and fast.steady_step(scheduler_output, meta, rids):
            return
        frames.any_offset = False
        if not num_reqs:
            return
        sched = scheduler_output.num_scheduled_tokens
        if num_reqs <= steady.SMALL_BATCH and fast.quiet_small_batch(rids, sched):
            return
        n = np.fromiter(map(sched.get, rids, repeat(0, num_reqs)), dtype=np.int64, count=num_reqs)
        rows = np.flatnonzero(n)
        if not len(rows):
            return
        names = rids if len(rows) == num_reqs else [rids[row] for row in rows.tolist()]
        try:  # (every scheduled row has its slot: added above, or by ``reset``)
            slots = np.fromiter(map(table.slot_of.__getitem__, names), dtype=np.int64, count=len(rows))
        except KeyError:
            slots = np.fromiter(map(table.slot, names), dtype=np.int64, count=len(rows))
        a = ib.num_computed_tokens_cpu[rows].astype(np.int64)
        b = a + n[rows]
        # Rows that decode within their ``quiet_end`` keep the plan the table holds
        # (``policy.quiet_end``): no page leaves, no epoch, nothing to re-anchor. Only the
        # others ("loud") are planned and carried out.
        offs = table.slot_offset[slots]
        loud = np.flatnonzero(b > table.quiet_end[slots])
        if len(loud):
            offs[loud] = self._plan(rows[loud], rids, slots[loud], a[loud], b[loud], ib.num_prompt_tokens[rows[loud]])
        if self.check_rows:
            for i, row in enumerate(rows.tolist()):
                ROW_LOG.record_worker(rids[row], int(a[i]), self.runner.requests[rids[row]].block_ids[0])
        self.token_rows.compact(rows, rids, slots, a, b, offs, loud)
        frame = frames.offsets = np.zeros(num_reqs, dtype=np.int64)
        frame[rows] = offs - table.base[slots]
        frames.any_offset = bool(frame.any())
        if len(rows) == num_reqs:  # (its steps change no row: ``ROW_LOG`` records none)
            fast.remember(rids, slots, offs, frame, frames.any_offset)
        assert not self.block_rows.private, f"private copies for rows that did not move: {self.block_rows.private}"

    def _plan(self, rows, rids, slots, a, b, prompt_lens) -> np.ndarray:
        """Plan the step ``[a, b)`` of the given rows (``rids[row]`` names a row's request;
        ``prompt_lens`` are the rows' prompt lengths) and carry out what it asks (compaction,
        epochs, re-anchoring); returns the rows' slot offsets."""
        table = self.streams
        sinks = table.sink[slots]
        plans = plan_steps(a, b, table.base[slots], sink_tokens=sinks, window=self.W,
                           block_size=self.B, rope_limit=self.rope_limit)
        moving = np.flatnonzero(window_moves(table.first_live[slots], plans.w0, self.B))
        for i in moving.tolist():
            self.block_rows.move(int(rows[i]), rids[rows[i]], int(slots[i]), int(plans.w0[i]))
        for i in np.flatnonzero(plans.window_shift).tolist():
            self.kv.epoch(int(rows[i]), int(sinks[i]), int(plans.window_shift[i]))
        if self.table is None:  # ALiBi: the sink keys never change
            anchor = np.zeros(len(rows), dtype=bool)
        else:
            anchor = plans.sink_angle != table.sink_angle[slots]
        anchor[moving] |= sinks[moving] % self.B != 0  # a new partial sink page: its sink slots are empty
        anchor &= sinks > 0
        if anchor.any():
            # One write per sink size of the step (one, unless requests bring their own).
            for sink in np.unique(sinks[anchor]).tolist():
                idx = np.flatnonzero(anchor & (sinks == sink))
                self.kv.reanchor(sink, rows[idx], slots[idx], table.sink_angle[slots[idx]], plans.sink_angle[idx])
        table.base[slots] = plans.base
        table.sink_angle[slots] = plans.sink_angle
        table.slot_offset[slots] = plans.slot_offset
        # Quiet steps follow once the prompt is in (later steps decode).
        ends = quiet_end(plans.w0, plans.base, window=self.W, block_size=self.B, rope_limit=self.rope_limit)
        table.quiet_end[slots] = np.where(b >= prompt_lens, ends, 0)
        return plans.slot_offset
