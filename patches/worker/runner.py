"""The sink policy inside vLLM's V1 model runner: compacted rows, frame positions, rotations.

Binds to vLLM 0.26.0 (``vllm/v1/worker/gpu_model_runner.py``; the CPU runner subclasses it):
  GPUModelRunner.__init__(vllm_config, device)              wrapped: built with the model
    length of a compacted row (``row_tokens``), so its InputBatch is that size; limits
    glibc's arenas where the worker did not inherit the limit (vllm_sink.allocator)
  GPUModelRunner.get_kv_cache_spec()                        wrapped: our spec, attach
  GPUModelRunner._update_states(scheduler_output)           wrapped per instance
  GPUModelRunner._update_streaming_request (relied on: a streaming-input session's next chunk
    comes as a NewRequestData under the id the runner still holds, its block_ids the row
    the scheduler ships (``StepMeta.continued``); the runner keeps the request's state)
  GPUModelRunner._prepare_inputs(scheduler_output, num_scheduled_tokens)  wrapped per instance
    (relied on: positions, seq_lens, optimistic_seq_lens_cpu, the slot mapping and the input
    ids come from input_batch.num_computed_tokens_cpu and token_ids_cpu; req_indices.np holds
    the step's row of each token; the rows to discard
    from ``requests[r].num_tokens < seq_lens``, recomputed here: discard_request_mask)
  GPUModelRunner.execute_model: both run inside ``synchronize_input_prep()`` (relied on: the
    pinned host buffer of ``_HostStager`` is reused only after the previous step's copies)
  GPUModelRunner: input_batch, requests[req_id] (block_ids, prompt_token_ids,
    prompt_is_token_ids, prompt_embeds, output_token_ids, sampling_params), positions,
    optimistic_seq_lens_cpu, req_indices, kv_caches, get_model(), update_max_model_len
  vllm.v1.worker.gpu_input_batch.InputBatch: add_request and
    _make_prompt_token_ids_cpu_tensor (wrapped per instance), token_ids_cpu, is_token_ids,
    num_tokens_no_spec, num_computed_tokens_cpu, num_prompt_tokens, req_prompt_embeds,
    vocab_size, block_table
  vllm.v1.worker.block_table.BlockTable: block_table.np, num_blocks_per_row,
    blocks_per_kv_block
  vllm.model_executor.layers.rotary_embedding.base.RotaryEmbeddingBase

Only runners of engines configured with the sink policy are touched: ``attach`` wraps the
two methods on the runner *instance*, and two of its InputBatch's.

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
at most ``SMALL_BATCH`` rows that are all quiet is carried out in Python numbers (numpy's
per-call cost exceeds the work on so few rows). A step in which the batch is the one the last
planned step left, unchanged, every row decoding one token within its ``quiet_end`` and
releasing nothing, costs one subtraction over the batch (``_SteadyBatch``): the steady state of
a long generation, where the host's time per step counts.

ALiBi models (MPT, BLOOM; no rotary table: ``SinkRunnerHook.table is None``): keys carry no
position and the attention kernel biases each key by its index in the compacted row
(``refusals.check_alibi_backend``), which *is* the contract's cache position. So nothing
rotates: no epoch ever starts (``policy.NO_ROTARY_LIMIT``; frame positions stay ``t``, and
the model ignores them), whole sink pages are never rewritten, and only a partial sink page
that takes over from the old one gets the sink's ``r`` pristine keys and values copied into
its slots ``[0, r)``.
"""

from __future__ import annotations

import types
from itertools import repeat

import numpy as np
import torch
from vllm.logger import init_logger

from vllm_sink import allocator
from vllm_sink.config import SinkConfig
from vllm_sink.patches import refusals
from vllm_sink.patches.worker import probes, sampler
from vllm_sink.patches.bindings import wrap_once
from vllm_sink.step_meta import META_ATTR as STEP_META
from vllm_sink.metrics import SINK_STATS
from vllm_sink.invariants import ROW_LOG
from vllm_sink.page_writer import PageWriter
from vllm_sink.policy import SinkGeometry, cdiv, plan_steps, quiet_end, row_transition, window_moves
from vllm_sink.rotary import RotationTable, key_view, rotate, rotate_blocks_, value_view
from vllm_sink.token_rows import (held_prompt_mask, held_prompt_width, output_keep, release_at, release_due,
                                  shift_row)

# Under the "vllm" logger tree, so that vLLM's logging configuration shows our lines.
logger = init_logger("vllm." + __name__)

# Batches of at most this many rows take their quiet steps in Python numbers, not numpy.
SMALL_BATCH = 8
# Steps of a batch left as the last planned step left it take the steady path (``_SteadyBatch``).
STEADY = True



class _StreamTable:
    """Worker-side state of every sequence: one slot per sequence, numpy arrays indexed by
    slot, so that a step is planned for the whole batch at once (``plan_steps``) and only the
    rows whose window moves take a Python path.

    Per slot: ``sink`` (the sequence's sink in tokens: the engine's, or its own), ``base``
    (epoch base: frame position = token index - base), ``sink_angle`` (rotation now applied
    to the sink keys, relative to their pristine copy), ``first_live`` (logical block held at
    row position ``ceil(sink / B)``), ``slot_offset`` (``w0 - S`` of its last planned step),
    ``quiet_end`` (a later step ``[a, b)`` with ``b <= quiet_end`` plans the same and is not
    planned again: ``policy.quiet_end``; 0 while its prompt is prefilled, before its first
    step, and whenever its state is reset or handed over); ``token_off``, the offset of the
    sequence's token row (it holds ``tokens[0:S] ++ tokens[S + token_off:]``,
    ``vllm_sink.token_rows``), ``out_trimmed``, how many of its first output ids the runner's
    request state no longer keeps, and ``sink_ids``, its sink token ids once its window has
    moved; on the device, the pristine sink keys ``[L, whole sink pages, H, B, D]`` and, with
    a partial sink page, its first ``r`` keys and values ``[L, 1, H, r, D]``.
    """

    def __init__(self, sink_tokens: int, block_size: int, capacity: int = 64):
        self.sink_tokens, self.block_size = sink_tokens, block_size
        self.slot_of: dict[str, int] = {}
        # Streaming-input sessions whose next chunk starts this step (``before_update_states``).
        self.continuing: set[str] = set()
        self.kept: dict[str, int] = {}  # kept stream id -> slot (``patches.scheduler.sessions``)
        self.free: list[int] = []
        self.pristine: dict[int, torch.Tensor] = {}
        self.pristine_partial: dict[int, torch.Tensor] = {}
        self.pristine_partial_values: dict[int, torch.Tensor] = {}
        self.sink_ids: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.capacity = 0
        self.sink = self.base = self.sink_angle = self.first_live = self.slot_offset = None
        self.token_off = self.out_trimmed = self.quiet_end = None
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        def grown(old, fill):
            new = np.full(capacity, fill, dtype=np.int64)
            if old is not None:
                new[: len(old)] = old
            return new

        self.sink = grown(self.sink, self.sink_tokens)
        self.base = grown(self.base, 0)
        self.sink_angle = grown(self.sink_angle, 0)
        self.first_live = grown(self.first_live, cdiv(self.sink_tokens, self.block_size))
        self.slot_offset = grown(self.slot_offset, 0)
        self.token_off = grown(self.token_off, 0)
        self.out_trimmed = grown(self.out_trimmed, 0)
        self.quiet_end = grown(self.quiet_end, 0)
        self.capacity = capacity

    def slot(self, rid: str) -> int:
        """The slot of ``rid``, a fresh one (with the engine's sink) for a sequence not seen
        before."""
        slot = self.slot_of.get(rid)
        if slot is None:
            if not self.free:
                self.free = list(range(2 * self.capacity - 1, self.capacity - 1, -1))
                self._grow(2 * self.capacity)
            slot = self.slot_of[rid] = self.free.pop()
            self.sink[slot] = self.sink_tokens
            self._clear(slot)
        return slot

    def start(self, rid: str, sink_tokens: int) -> None:
        """A new sequence, with its sink (the scheduler's decision)."""
        slot = self.slot(rid)
        self.sink[slot] = sink_tokens
        self._clear(slot)

    def _clear(self, slot: int) -> None:
        self.base[slot] = self.sink_angle[slot] = self.slot_offset[slot] = 0
        self.token_off[slot] = self.out_trimmed[slot] = 0
        self.first_live[slot] = cdiv(int(self.sink[slot]), self.block_size)
        self.quiet_end[slot] = 0
        self.sink_ids.pop(slot, None)
        self.pristine.pop(slot, None)
        self.pristine_partial.pop(slot, None)
        self.pristine_partial_values.pop(slot, None)

    def reset(self, rid: str) -> None:
        """A sequence restarts from token 0 in fresh pages, with its sink (resumed after a
        preemption: vLLM recomputes it). Admission never preempts a sink stream
        (``kv_cache_spec.StreamingSinkManager``); one whose output ids this runner released
        could not be recomputed, and stops the engine rather than run on wrong tokens (with
        asynchronous scheduling the scheduler hands them back: ``before_update_states``)."""
        slot = self.slot(rid)
        if self.out_trimmed[slot]:
            raise RuntimeError(f"vllm-sink: stream {rid} was preempted after {int(self.out_trimmed[slot])} "
                               "of its output ids were released; sink streams are never preempted")
        self._clear(slot)

    def drop(self, rid: str) -> None:
        slot = self.slot_of.pop(rid, None)
        if slot is not None:
            self._clear(slot)
            self.free.append(slot)

    def keep(self, rid: str) -> None:
        """A finished sequence's state is kept (the scheduler kept its pages), under its id."""
        slot = self.slot_of.pop(rid, None)
        if slot is not None:
            self.kept[rid] = slot

    def resume(self, rid: str, key: str) -> int:
        """``rid`` takes over the kept state ``key`` (the scheduler handed it the pages)."""
        slot = self.kept.pop(key)
        self.slot_of[rid] = slot
        self.quiet_end[slot] = 0
        # The new request's token row was written from its own prompt, from token 0.
        self.token_off[slot] = self.out_trimmed[slot] = 0
        self.sink_ids.pop(slot, None)
        if slot in self.pristine or slot in self.pristine_partial:
            # The sink is rewritten at the first step: the row the scheduler hands over
            # may name an earlier sink page than the one this state last wrote.
            self.sink_angle[slot] = -1
        return slot

    def release(self, key: str) -> None:
        slot = self.kept.pop(key, None)
        if slot is not None:
            self._clear(slot)
            self.free.append(slot)

    def __len__(self) -> int:
        return len(self.slot_of)


class _SteadyBatch:
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


class _HostStager:
    """Index arrays to the device without a stream synchronisation.

    A copy from pageable host memory makes the host wait for the GPU to finish all queued
    work, which would serialise vLLM's asynchronous scheduling (the next step is prepared
    while the GPU runs this one). Arrays are staged in one pinned buffer and copied with
    ``non_blocking=True``. Regions are handed out from the start of the buffer at each
    step (``reset``): the runner's ``synchronize_input_prep`` waits, before the next
    step's preparation, for the copies queued during this one.
    """

    def __init__(self, device: torch.device, capacity: int = 1 << 14):
        self.device = device
        self.pinned = device.type == "cuda"
        self.buf = self._alloc(capacity)
        self._retired: torch.Tensor | None = None
        self.used = 0

    def _alloc(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.int64, pin_memory=self.pinned)

    def reset(self) -> None:
        self.used = 0

    def put(self, values) -> torch.Tensor:
        arr = np.asarray(values, dtype=np.int64).reshape(-1)
        if not self.pinned:
            return torch.from_numpy(arr.copy()).to(self.device)
        n = len(arr)
        if self.used + n > len(self.buf):
            # Grow; the old buffer stays alive for the copies already queued from it.
            self._retired = self.buf
            self.buf = self._alloc(max(2 * len(self.buf), self.used + n))
        host = self.buf[self.used : self.used + n]
        host.numpy()[:] = arr
        self.used += n
        return host.to(self.device, non_blocking=True)


class SinkRunnerHook:
    """Per-runner state and the two wraps. One instance per model runner."""

    def __init__(self, runner, geometry: SinkGeometry):
        self.runner = runner
        self.geometry = g = geometry
        # Short names for the hot path (vllm_sink.policy's notation).
        self.B, self.S, self.W = g.block_size, g.sink_tokens, g.kv_window
        self.streams = _StreamTable(self.S, self.B)
        # The rotary table, or None for an ALiBi model (nothing rotates: module docstring).
        self.table: RotationTable | None = None
        if runner.vllm_config.model_config.uses_alibi:
            refusals.check_alibi_backend(probes.attention_backend(runner))
        else:
            self.table = probes.rotary_table(runner.get_model())
            refusals.check_rotary_limit(self.table.limit, g.rope_limit)
        self.rope_limit = g.rope_limit
        self._layout: str | None = None
        self._keys: list[torch.Tensor] | None = None
        self._values: list[torch.Tensor] | None = None
        mc = runner.vllm_config.model_config
        self.num_kv_heads = mc.get_num_kv_heads(runner.vllm_config.parallel_config)
        self.head_size = mc.get_head_size()
        # This step's frame offset of each row (``slot offset - base``), planned after
        # ``_update_states`` and read in ``_prepare_inputs``, and whether any is not 0.
        self.frame_offsets = np.zeros(0, dtype=np.int64)
        self.any_offset = False
        # The batch as the last planned step left it, while it stays so (``_SteadyBatch``),
        # and how many steps it carried out (tests check that it is used).
        self._steady: _SteadyBatch | None = None
        self.steady_steps = 0
        self._writers: tuple[PageWriter, PageWriter] | None = None
        self.check_rows = ROW_LOG.enabled()  # read once, not per row per step
        self.device = runner.device if isinstance(getattr(runner, "device", None), torch.device) else torch.device("cpu")
        self.stager = _HostStager(self.device)
        if SINK_STATS.role == "process":
            SINK_STATS.role = "worker"
        logger.info(
            "vllm-sink worker: sink %d tokens, window %d tokens, %s",
            self.S,
            self.W,
            f"{self.rope_limit} rotary positions" if self.table else "ALiBi (no rotation)",
        )

    # ------------------------------------------------------------------ helpers
    def keys(self) -> list[torch.Tensor]:
        """Logical key views of every layer's cache, built once the cache exists."""
        if self._keys is None:
            self._layout = probes.kv_layout(self.runner)
            self._keys = [
                key_view(kv, self._layout, self.num_kv_heads, self.head_size)
                for kv in self.runner.kv_caches
            ]
        return self._keys

    def values(self) -> list[torch.Tensor]:
        """Logical value views of every layer's cache (for the partial sink page's tail)."""
        if self._values is None:
            self.keys()
            self._values = [
                value_view(kv, self._layout, self.num_kv_heads, self.head_size)
                for kv in self.runner.kv_caches
            ]
        return self._values

    def _block_table(self):
        tables = self.runner.input_batch.block_table.block_tables
        refusals.check_one_kv_cache_group(len(tables))
        return tables[0]

    def writers(self) -> tuple[PageWriter, PageWriter]:
        """Sink page writers for the keys and the values of every layer (one kernel launch
        per step on CUDA; ``vllm_sink.page_writer``)."""
        if self._writers is None:
            put = self.stager.put
            self._writers = (PageWriter(self.keys(), self.table, put), PageWriter(self.values(), None, put))
        return self._writers

    # ------------------------------------------------------------------ step 1
    def before_update_states(self, scheduler_output) -> None:
        """vLLM's streaming-input sessions (``AsyncLLM.generate`` fed an async generator of
        ``StreamingInput``): a session's next chunk is scheduled as a *new* request under
        the id whose state the runner still holds, past token 0. The scheduler decides that
        the stream goes on (``StepMeta.continued``) and ships its row as this runner holds
        it (sink pages, then its window pages from ``first_live``, before this step's
        transition, as for any running stream) plus the pages allocated for the chunk."""
        table = self.streams
        self._bind_batch()
        # A stream resumed after a preemption restarts from token 0: its row is written
        # from there when vLLM adds it back (``_add_request``).
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
                self._adopt_row(new.req_id, meta.first_live[new.req_id])
            elif new.req_id in table.continuing:
                # A streaming-input session's next chunk: its state (sink, frame base, sink
                # rotation, pristine sink, first window page) and its row go on.
                table.quiet_end[table.slot_of[new.req_id]] = 0
            elif new.num_computed_tokens:
                # Prefix caching and KV connectors are refused: only a resume (whose
                # decision rides on the scheduler output) or a streaming-input session's
                # next chunk starts past token 0.
                raise RuntimeError(f"vllm-sink: request {new.req_id} starts at token "
                                   f"{new.num_computed_tokens} without a session resume")
            else:
                table.start(new.req_id, meta.sink_tokens.get(new.req_id, self.S) if meta else self.S)
        for key in meta.released if meta else ():
            table.release(key)

        ib = self.runner.input_batch
        num_reqs = ib.num_reqs
        self.stager.reset()
        rids = ib.req_ids[:num_reqs]
        steady, self._steady = self._steady, None
        if steady is not None and STEADY and self._steady_step(steady, scheduler_output, meta, rids):
            self._steady = steady
            return
        self.any_offset = False
        if not num_reqs:
            return
        sched = scheduler_output.num_scheduled_tokens
        if num_reqs <= SMALL_BATCH and self._quiet_small_batch(rids, sched):
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
            offs[loud] = self._plan(rows[loud], rids, slots[loud], a[loud], b[loud])
        if self.check_rows:
            for i, row in enumerate(rows.tolist()):
                ROW_LOG.record_worker(rids[row], int(a[i]), self.runner.requests[rids[row]].block_ids[0])
        self._compact_tokens(rows, rids, slots, a, b, offs, loud)
        frame = self.frame_offsets = np.zeros(num_reqs, dtype=np.int64)
        frame[rows] = offs - table.base[slots]
        self.any_offset = bool(frame.any())
        if len(rows) == num_reqs:  # (its steps change no row: ``ROW_LOG`` records none)
            due_at = release_at(offs, ib.num_prompt_tokens[:num_reqs], table.out_trimmed[slots],
                                ib.token_ids_cpu.shape[1])
            self._steady = _SteadyBatch(list(rids), offs.astype(ib.num_computed_tokens_cpu.dtype),
                                        table.quiet_end[slots], due_at, frame, self.any_offset)

    def _steady_step(self, steady: _SteadyBatch, scheduler_output, meta, rids: list[str]) -> bool:
        """Carry out this step from ``steady`` if its invariant holds (``_SteadyBatch``);
        returns False, having changed nothing, otherwise."""
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
        self.frame_offsets, self.any_offset = steady.frame, steady.any_offset
        self.steady_steps += 1
        return True

    def _quiet_small_batch(self, rids, sched) -> bool:
        """A quiet step (every row decodes within its ``quiet_end``) of a batch of at most
        ``SMALL_BATCH`` rows, carried out in Python numbers, which cost less than numpy's
        per-call overhead on so few rows: the same effect as the general path for a quiet
        step (``_compact_tokens`` with no loud row). Returns False, having changed nothing,
        if any row is not quiet."""
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
        frame = self.frame_offsets = np.zeros(len(rids), dtype=np.int64)
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
                self._release_outputs(rids[row], slot)
        self.any_offset = any_offset
        return True

    def _plan(self, rows, rids, slots, a, b) -> np.ndarray:
        """Plan the step ``[a, b)`` of the given rows and carry out what it asks (compaction,
        epochs, re-anchoring); returns the rows' slot offsets."""
        table = self.streams
        sinks = table.sink[slots]
        plans = plan_steps(a, b, table.base[slots], sink_tokens=sinks, window=self.W,
                           block_size=self.B, rope_limit=self.rope_limit)
        moving = np.flatnonzero(window_moves(table.first_live[slots], plans.w0, self.B))
        for i in moving.tolist():
            self._move(int(rows[i]), rids[rows[i]], int(slots[i]), int(plans.w0[i]))
        for i in np.flatnonzero(plans.window_shift).tolist():
            self._epoch(int(rows[i]), int(sinks[i]), int(plans.window_shift[i]))
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
                self._reanchor(sink, rows[idx], slots[idx], table.sink_angle[slots[idx]], plans.sink_angle[idx])
        table.base[slots] = plans.base
        table.sink_angle[slots] = plans.sink_angle
        table.slot_offset[slots] = plans.slot_offset
        # Quiet steps follow once the prompt is in (later steps decode).
        ends = quiet_end(plans.w0, plans.base, window=self.W, block_size=self.B, rope_limit=self.rope_limit)
        table.quiet_end[slots] = np.where(b >= self.runner.input_batch.num_prompt_tokens[rows], ends, 0)
        return plans.slot_offset

    # ------------------------------------------------------------------ token rows
    def _bind_batch(self) -> None:
        """Bind this hook to the runner's current ``InputBatch`` (vLLM builds a new one once
        the KV cache's block sizes are known): its rows hold compacted sequences."""
        ib = self.runner.input_batch
        if getattr(ib, "_vllm_sink_rows", None) is self:
            return
        orig_add = ib.add_request
        orig_prompt = ib._make_prompt_token_ids_cpu_tensor
        hook = self

        def add_request(batch, request):
            return hook._add_request(orig_add, request)

        def _make_prompt_token_ids_cpu_tensor(batch):
            return hook._held_prompt_tensor(orig_prompt)

        ib.add_request = types.MethodType(add_request, ib)
        ib._make_prompt_token_ids_cpu_tensor = types.MethodType(_make_prompt_token_ids_cpu_tensor, ib)
        ib._vllm_sink_rows = self

    def _tokens(self, request, trimmed: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids ``[start, end)`` of a request's stream and whether each is a token id
        (not a prompt embedding), from its prompt and the output ids the runner keeps."""
        P = request.num_prompt_tokens
        ids = np.zeros(max(0, end - start), dtype=np.int64)
        is_tok = np.ones(len(ids), dtype=bool)
        p0, p1 = min(start, P), min(end, P)
        if p1 > p0:
            if request.prompt_token_ids is not None:
                ids[: p1 - p0] = request.prompt_token_ids[p0:p1]
                if request.prompt_is_token_ids is not None:
                    is_tok[: p1 - p0] = request.prompt_is_token_ids[p0:p1]
            else:
                is_tok[: p1 - p0] = False
        o0, o1 = max(start, P) - P - trimmed, max(end, P) - P - trimmed
        if o1 > o0:
            assert o0 >= 0, f"output ids {o0 + trimmed}.. of {request.req_id} were released"
            ids[max(start, P) - start :] = request.output_token_ids[o0:o1]
        return ids, is_tok

    def _add_request(self, orig_add, request) -> int:
        """``InputBatch.add_request`` for a sink stream: vLLM's bookkeeping as is, its token
        row written in compacted coordinates (``vllm_sink.token_rows``) at the row's offset
        (0 for a new request; a stream vLLM adds back after a step without tokens keeps its
        own), up to the row's end. A long prompt's later tokens are written when scheduled
        (``_compact_tokens``). vLLM's own writes, at absolute positions, land in a scratch
        row."""
        ib = self.runner.input_batch
        table = self.streams
        slot = table.slot_of.get(request.req_id)
        off = int(table.token_off[slot]) if slot is not None else 0
        trimmed = int(table.out_trimmed[slot]) if slot is not None else 0
        P = request.num_prompt_tokens
        N = P + trimmed + len(request.output_token_ids)
        width = ib.token_ids_cpu.shape[1]
        rows, real = ib.token_ids_cpu.shape[0], (ib.token_ids_cpu, ib.is_token_ids)
        need = P + len(request.output_token_ids)
        if need > width:  # vLLM writes the whole prompt and the kept outputs at [0, need)
            scratch = np.zeros(need, dtype=ib.token_ids_cpu.dtype), np.zeros(need, dtype=bool)
            ib.token_ids_cpu, ib.is_token_ids = (
                np.lib.stride_tricks.as_strided(x, shape=(rows, need), strides=(0, x.strides[0])) for x in scratch)
        try:
            idx = orig_add(request)
        finally:
            ib.token_ids_cpu, ib.is_token_ids = real
        ids_row, tok_row = ib.token_ids_cpu[idx], ib.is_token_ids[idx]
        if off:
            S = int(table.sink[slot])
            ids_row[:S], tok_row[:S] = table.sink_ids[slot]
            end = min(N - off, width)
            if end > S:
                ids_row[S:end], tok_row[S:end] = self._tokens(request, trimmed, S + off, end + off)
        else:
            end = min(N, width)
            ids_row[:end], tok_row[:end] = self._tokens(request, trimmed, 0, end)
        ib.num_tokens_no_spec[idx] = N - off
        return idx

    def _compact_tokens(self, rows, rids, slots, a, b, offs, loud) -> None:
        """Present each scheduled stream to vLLM's runner as its compacted sequence for the
        step ``[a, b)`` at offset ``offs`` (``w0 - S``): for the ``loud`` rows (indices into
        ``rows``: those planned this step), shift the token rows whose window moved and
        write the step's prompt tokens; for every row, set its computed-token count to
        ``a - off``. vLLM then gathers input ids, positions, ``seq_lens`` and the slot
        mapping at compacted indices, which are the compacted block-table row's; only the
        positions need the frame offset (``after_prepare_inputs``). Also releases output ids
        the sampler no longer needs (``token_rows.output_keep``)."""
        ib = self.runner.input_batch
        table = self.streams
        P = ib.num_prompt_tokens[rows]
        if len(loud):
            self._move_tokens(rows[loud], rids, slots[loud], a[loud], b[loud], offs[loud], P[loud])
        ib.num_computed_tokens_cpu[rows] = a - offs
        due = release_due(ib.num_tokens_no_spec[rows], offs, P, table.out_trimmed[slots], ib.token_ids_cpu.shape[1])
        for i in np.flatnonzero(due).tolist():
            self._release_outputs(rids[rows[i]], int(slots[i]))

    def _release_outputs(self, rid: str, slot: int) -> None:
        """Release the output ids of ``rid`` that its sampler no longer reads, once it keeps
        twice what it needs (``token_rows.output_keep``)."""
        request = self.runner.requests[rid]
        outs = request.output_token_ids
        min_tokens = request.sampling_params.min_tokens if request.sampling_params else 0
        keep = output_keep(self.runner.input_batch.token_ids_cpu.shape[1], min_tokens)
        if len(outs) >= 2 * keep:  # one more is sampled this step
            drop = len(outs) - keep
            del outs[:drop]
            self.streams.out_trimmed[slot] += drop

    def _move_tokens(self, rows, rids, slots, a, b, offs, P) -> None:
        """Shift the token rows whose offset changed and write the step's prompt tokens."""
        ib = self.runner.input_batch
        table = self.streams
        width = ib.token_ids_cpu.shape[1]
        moved = np.flatnonzero(offs != table.token_off[slots])
        for i in moved.tolist():
            row, slot, off = int(rows[i]), int(slots[i]), int(offs[i])
            S = int(table.sink[slot])
            old = int(table.token_off[slot])
            by = off - old
            if slot not in table.sink_ids:
                table.sink_ids[slot] = (ib.token_ids_cpu[row, :S].copy(), ib.is_token_ids[row, :S].copy())
            length = int(ib.num_tokens_no_spec[row])
            # What the row holds for sure: the tokens before this step (a prompt's later
            # tokens are written when scheduled), or every token once it decodes.
            start = int(a[i])
            held = min(width, (start if start < int(P[i]) else length + old) - old)
            shift_row(ib.is_token_ids[row], length, S, by)
            ib.num_tokens_no_spec[row] = shift_row(ib.token_ids_cpu[row], length, S, by)
            # A row written from token 0 whose window moved past what it held (a resumed
            # request's first step): the window before the step comes from the stream.
            lo, hi = max(S, held - by), start - off
            if hi > lo:
                request = self.runner.requests[rids[row]]
                ids, is_tok = self._tokens(request, int(table.out_trimmed[slot]), lo + off, hi + off)
                ib.token_ids_cpu[row, lo:hi] = ids
                ib.is_token_ids[row, lo:hi] = is_tok
        table.token_off[slots] = offs
        for i in np.flatnonzero(a < P).tolist():
            row, rid, off = int(rows[i]), rids[rows[i]], int(offs[i])
            end = min(int(b[i]), int(P[i]))
            request = self.runner.requests[rid]
            ids, is_tok = self._tokens(request, int(table.out_trimmed[slots[i]]), int(a[i]), end)
            ib.token_ids_cpu[row, a[i] - off : end - off] = ids
            ib.is_token_ids[row, a[i] - off : end - off] = is_tok
            if off and request.prompt_embeds is not None and row in ib.req_prompt_embeds:
                # vLLM reads a prompt's embeddings at the row's computed-token count.
                ib.req_prompt_embeds[row] = request.prompt_embeds[off:]

    def _held_prompt_tensor(self, orig_prompt):
        """``InputBatch._make_prompt_token_ids_cpu_tensor`` (the prompt ids that repetition
        penalties read) over compacted rows: the prompt tokens each stream still holds (its
        sink and the prompt tokens in its window), the rest padded as vLLM pads."""
        ib = self.runner.input_batch
        table = self.streams
        n = ib.num_reqs
        slots = [table.slot_of.get(rid) for rid in ib.req_ids[:n]]
        S = np.array([table.sink[s] if s is not None else 0 for s in slots], dtype=np.int64)
        off = np.array([table.token_off[s] if s is not None else 0 for s in slots], dtype=np.int64)
        P = ib.num_prompt_tokens[:n].astype(np.int64)
        width = held_prompt_width(S, off, P, ib.token_ids_cpu.shape[1])
        out = torch.empty((n, width), dtype=torch.int64, pin_memory=self.device.type == "cuda")
        arr = out.numpy()
        arr[:] = ib.token_ids_cpu[:n, :width]
        arr[~held_prompt_mask(width, S, off, P)] = ib.vocab_size
        return out

    def _adopt_row(self, rid: str, first_live: int) -> None:
        """A resumed request's row: the scheduler ships it compacted (its sink pages, then
        its held window pages, from logical page ``first_live``, cut at the resume token),
        so both sides apply the same row transitions from here."""
        self.streams.first_live[self.streams.slot_of[rid]] = first_live

    def _move(self, row: int, rid: str, slot: int, w0: int) -> None:
        """Compact the row of a sequence whose window start moved to ``w0``."""
        table = self.streams
        S = int(table.sink[slot])
        s, r = cdiv(S, self.B), S % self.B
        move = row_transition(int(table.first_live[slot]), w0, S, self.B)
        block_ids = self.runner.requests[rid].block_ids[0]
        if move.swap_sink and slot not in table.pristine_partial:
            # The old partial sink page leaves; its sink slots [0, r) are first kept, as
            # written, for re-anchoring in the page that replaces it.
            old_sink = block_ids[s - 1]
            table.pristine_partial[slot] = torch.stack([k[old_sink, :, :r] for k in self.keys()])[:, None]
            table.pristine_partial_values[slot] = torch.stack([v[old_sink, :, :r] for v in self.values()])[:, None]
        block_ids[:], _ = move.apply(block_ids, s)
        self._write_row(row, block_ids)
        table.first_live[slot] = move.last

    def _write_row(self, row: int, block_ids: list[int]) -> None:
        """Write a request's KV block ids into its block-table row (in kernel blocks: each
        KV block is ``blocks_per_kv_block`` consecutive kernel blocks), zeroing the rest of
        what the row held."""
        bt = self._block_table()
        bpk = bt.blocks_per_kv_block
        count = int(bt.num_blocks_per_row[row])
        ids = np.asarray(block_ids, dtype=np.int64)
        if bpk > 1:
            ids = (ids[:, None] * bpk + np.arange(bpk)[None, :]).reshape(-1)
        n = len(ids)
        assert n <= count, (n, count)
        table = bt.block_table.np
        table[row, :n] = ids
        table[row, n:count] = 0
        bt.num_blocks_per_row[row] = n

    def _angles(self, deltas: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``[len(deltas), rotary_dim // 2]`` on the device."""
        self.table.check(*deltas)
        return self.table.angles_of(self.stager.put(deltas))

    def _epoch(self, row: int, sink: int, shift: int) -> None:
        """Re-rotate the window keys of ``row`` (whose sink is ``sink`` tokens) by ``shift``
        positions (an epoch starts)."""
        assert self.table is not None, "an epoch started for a model without rotary positions"
        bt = self._block_table()
        count = int(bt.num_blocks_per_row[row])
        s, r = cdiv(sink, self.B), sink % self.B
        window_ids = self.stager.put(bt.block_table.np[row, s * bt.blocks_per_kv_block : count])
        cos, sin = self._angles([shift])
        cos, sin = cos[0], sin[0]
        rd, neox = self.table.rotary_dim, self.table.is_neox_style
        part = int(bt.block_table.np[row, s - 1]) if r else None  # the partial sink page
        for k in self.keys():
            rotate_blocks_(k, window_ids, cos, sin, rd, neox)
            if part is not None:  # window tokens in the partial sink page's tail
                k[part, :, r:] = rotate(k[part, :, r:], cos, sin, rd, neox)
        SINK_STATS.epochs += 1

    def _reanchor(self, sink: int, rows: np.ndarray, slots: np.ndarray, old_angles: np.ndarray,
                  new_angles: np.ndarray) -> None:
        """Rewrite the sink keys of the given rows (whose sinks are ``sink`` tokens) as their
        pristine keys rotated by their new angles: one write for every row and layer (a
        stream's window start moves every B tokens). With a partial sink page (a new page
        whenever the window moved), its ``r`` sink values are written with the keys. Without
        a rotary table (ALiBi) only that partial page is written, its ``r`` keys copied as
        they are."""
        table = self.streams
        bt = self._block_table()
        block_table = bt.block_table.np
        rotating = self.table is not None
        s, r = cdiv(sink, self.B), sink % self.B
        nw = (sink // self.B) * bt.blocks_per_kv_block if rotating else 0
        slots_l = slots.tolist()
        if nw:
            for i, slot in enumerate(slots_l):
                if slot not in table.pristine:
                    # The sink slots still hold the keys as written at positions 0..S-1.
                    assert old_angles[i] == 0, "sink keys moved before their pristine copy was taken"
                    ids = self.stager.put(block_table[rows[i], :nw])
                    table.pristine[slot] = torch.stack([k[ids] for k in self.keys()])  # [L, nw, H, B, D]
        # A partial sink page's are taken when the window first moves (it moves first).
        assert not r or all(slot in table.pristine_partial for slot in slots_l)
        rd, neox = (self.table.rotary_dim, self.table.is_neox_style) if rotating else (0, True)
        if rotating:
            self.table.check_all(new_angles)
        key_writer, value_writer = self.writers()
        if nw:
            key_writer.write(block_table[rows, :nw], [table.pristine[slot] for slot in slots_l], new_angles, rd, neox)
        if r:
            part_ids = block_table[rows, s - 1 : s]
            key_writer.write(part_ids, [table.pristine_partial[slot] for slot in slots_l], new_angles, rd, neox)
            value_writer.write(part_ids, [table.pristine_partial_values[slot] for slot in slots_l], new_angles,
                               0, neox)
        if rotating:
            SINK_STATS.sink_rotations += len(slots_l)

    # ------------------------------------------------------------------ step 2
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
        if num_reqs <= SMALL_BATCH:  # (in Python numbers: cheaper than numpy on so few rows)
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
        r.positions[:T].add_(self.stager.put(self.frame_offsets[r.req_indices.np[:T]]))


def attach(runner, geometry: SinkGeometry) -> SinkRunnerHook:
    """Wrap ``_update_states`` and ``_prepare_inputs`` of this runner instance (idempotent)."""
    hook = getattr(runner, "_vllm_sink_hook", None)
    if hook is not None:
        return hook
    hook = SinkRunnerHook(runner, geometry)
    orig_update = runner._update_states
    orig_prepare = runner._prepare_inputs

    def _update_states(self, scheduler_output, *args, **kwargs):
        hook.before_update_states(scheduler_output)
        result = orig_update(scheduler_output, *args, **kwargs)
        hook.after_update_states(scheduler_output)
        return result

    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        result = orig_prepare(scheduler_output, *args, **kwargs)
        hook.after_prepare_inputs(scheduler_output)
        return result

    runner._update_states = types.MethodType(_update_states, runner)
    runner._prepare_inputs = types.MethodType(_prepare_inputs, runner)
    runner._vllm_sink_hook = hook
    sampler.attach(runner)
    return hook


# ---------------------------------------------------------------------- KV-cache specs
def sink_specs(runner, specs: dict) -> dict:
    """Turn every layer's ``FullAttentionSpec`` into a ``SinkWindowSpec``, refusing what
    the policy cannot serve exactly, and attach the runner hook."""
    from vllm_sink.patches.spec import SinkWindowSpec

    geometry = SinkConfig.geometry_from_additional_config(runner.vllm_config.additional_config)
    config = SinkConfig.from_additional_config(runner.vllm_config.additional_config)
    refusals.check_geometry(geometry)
    out = {}
    for name, spec in specs.items():
        if isinstance(spec, SinkWindowSpec):
            out[name] = spec
            continue
        refusals.check_layer_spec(name, spec)
        out[name] = SinkWindowSpec.from_full(spec, geometry, config.kept_pages)
    if out:
        hook = attach(runner, geometry)
        refusals.check_partial_sink_kernel(hook.S, hook.B, hook._block_table().blocks_per_kv_block,
                                           geometry.sink_cap)
        # The runner's per-sequence token rows hold compacted sequences (built that size
        # by ``_runner_init``; vLLM builds its InputBatch again once the KV cache exists).
        assert runner.max_model_len <= row_tokens(runner.vllm_config), runner.max_model_len
    return out


def install() -> None:
    """Wrap ``GPUModelRunner.get_kv_cache_spec`` (idempotent). The wrap returns vLLM's own
    specs untouched unless the engine is configured with the sink policy."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(orig):
        def get_kv_cache_spec(self):
            specs = orig(self)
            cfg = SinkConfig.from_additional_config(self.vllm_config.additional_config)
            if cfg is None or not cfg.enabled:
                return specs
            return sink_specs(self, specs)
        return get_kv_cache_spec

    wrap_once(GPUModelRunner, "get_kv_cache_spec", make)
    wrap_once(GPUModelRunner, "__init__", _runner_init)


def row_tokens(vllm_config) -> int | None:
    """Tokens in one row of a sink engine's worker (the compacted block-table row's
    length in tokens); ``None`` for other engines."""
    geometry = SinkConfig.geometry_from_additional_config(vllm_config.additional_config)
    if geometry is None:
        return None
    return min(vllm_config.model_config.max_model_len, geometry.widest.row_capacity * geometry.block_size)


def _runner_init(orig):
    def __init__(self, vllm_config, *args, **kwargs):
        """The runner of a sink engine sizes its per-sequence token buffers (its
        ``InputBatch``, built here) by :func:`row_tokens`, not by the stream cap: vLLM
        builds it with the model length the config has while the runner is built. The
        config keeps the stream cap (the scheduler, in this process too, reads it)."""
        tokens = row_tokens(vllm_config)
        if tokens is None:
            return orig(self, vllm_config, *args, **kwargs)
        # A worker started outside the front end's environment (Ray's) limits its arenas
        # here; one that inherited the limit (or the user's value) keeps it.
        allocator.limit_arenas()
        model_config = vllm_config.model_config
        cap = model_config.max_model_len
        model_config.max_model_len = tokens
        try:
            return orig(self, vllm_config, *args, **kwargs)
        finally:
            model_config.max_model_len = cap
    return __init__
