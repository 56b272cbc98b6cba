"""The worker's state of every sink stream, by slot (``StreamTable``).

Binds to nothing in vLLM. The hook (``patches.worker.hook``) opens, resets, keeps and
drops slots from the scheduler's output and plans each step from the table; its
collaborators update the columns they own (named in the class docstring).
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_sink.policy import cdiv


class StreamTable:
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

    Who writes what, besides the table's own methods: the hook (``hook.SinkRunnerHook``)
    ``base``, ``sink_angle``, ``slot_offset``, ``quiet_end`` and the ``out_trimmed`` the
    scheduler hands back; the block-table rows (``block_table.BlockRows``) ``first_live``;
    the token rows (``input_batch.TokenRows``) ``token_off``, ``sink_ids`` and the outputs
    they release (``out_trimmed``); the KV writes (``kv_writes.KvWrites``) the pristine
    copies. Invariant: a slot's columns describe the rows its request holds in the runner's
    InputBatch and block table as the last step planned for it left them; a cleared slot
    (``_clear``) describes a sequence at token 0 in fresh pages.
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
        (``patches.scheduler.manager.StreamingSinkManager``); one whose output ids this runner released
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
