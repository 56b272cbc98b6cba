"""KV-cache writes of the sink policy: the window keys' rotation when an epoch starts, the
sink keys' re-anchoring (and a new partial sink page's sink values) from their pristine
copies, and the staging of the index arrays those writes read on the device.

Binds to (``vllm/v1/worker/gpu_model_runner.py``; the CPU runner subclasses it):
  GPUModelRunner.kv_caches (each layer's cache, read through ``vllm_sink.rotary``'s
    ``key_view``/``value_view`` in the layout ``probes.kv_layout`` finds)
  GPUModelRunner.execute_model: ``_update_states`` and ``_prepare_inputs`` both run inside
    ``synchronize_input_prep()`` (relied on: the pinned host buffer of ``HostStager`` is
    reused only after the previous step's copies)
and the block-table row (``block_table.block_table``) whose pages they write.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_sink.metrics import SINK_STATS
from vllm_sink.page_writer import PageWriter
from vllm_sink.patches.worker import probes
from vllm_sink.patches.worker.block_table import block_table, kernel_blocks_per_page
from vllm_sink.patches.worker.streams import StreamTable
from vllm_sink.policy import cdiv
from vllm_sink.rotary import RotationTable, key_view, rotate, rotate_blocks_, value_view


class HostStager:
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


class KvWrites:
    """The KV cache as the sink policy writes it: every layer's key and value views, the
    sink page writers, and the writes of a step (epochs, re-anchoring).

    ``rotary`` is the model's rotation table, or None for an ALiBi model, whose keys carry
    no position: then no epoch ever starts and only a partial sink page that takes over
    from the old one is written (its ``r`` pristine keys and values, copied as they are).
    Invariants: the sink slots of a stream's row hold its pristine sink keys rotated by
    ``streams.sink_angle`` of its slot once ``reanchor`` wrote them; a stream's pristine
    copies (``streams.pristine``, ``pristine_partial``, ``pristine_partial_values``) are
    taken before its sink keys first move, and kept until its slot is cleared. The views
    and writers are built on first use, once the KV cache exists.
    """

    def __init__(self, runner, rotary: RotationTable | None, streams: StreamTable, stager: HostStager,
                 block_size: int):
        self.runner, self.rotary, self.streams, self.stager, self.B = runner, rotary, streams, stager, block_size
        mc = runner.vllm_config.model_config
        self.num_kv_heads = mc.get_num_kv_heads(runner.vllm_config.parallel_config)
        self.head_size = mc.get_head_size()
        self._layout: str | None = None
        self._keys: list[torch.Tensor] | None = None
        self._values: list[torch.Tensor] | None = None
        self._writers: tuple[PageWriter, PageWriter] | None = None

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

    def writers(self) -> tuple[PageWriter, PageWriter]:
        """Sink page writers for the keys and the values of every layer (one kernel launch
        per step on CUDA; ``vllm_sink.page_writer``)."""
        if self._writers is None:
            put = self.stager.put
            self._writers = (PageWriter(self.keys(), self.rotary, put), PageWriter(self.values(), None, put))
        return self._writers

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole pages, ``old -> new`` (every layer's keys and values): a stream's
        private copies of pages other requests may read (``StepMeta.private``). The block
        is the first dimension of every layer's cache in each layout."""
        src = self.stager.put([old for old, _ in pairs])
        dst = self.stager.put([new for _, new in pairs])
        for kv in self.runner.kv_caches:
            kv[dst] = kv[src]

    def keep_partial_sink(self, slot: int, page: int, r: int) -> None:
        """Keep the sink slots ``[0, r)`` of the partial sink page ``page``, as written, for
        re-anchoring in the page that replaces it (the old one leaves the row)."""
        streams = self.streams
        streams.pristine_partial[slot] = torch.stack([k[page, :, :r] for k in self.keys()])[:, None]
        streams.pristine_partial_values[slot] = torch.stack([v[page, :, :r] for v in self.values()])[:, None]

    def angles(self, deltas: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``[len(deltas), rotary_dim // 2]`` on the device."""
        self.rotary.check(*deltas)
        return self.rotary.angles_of(self.stager.put(deltas))

    def epoch(self, row: int, sink: int, shift: int) -> None:
        """Re-rotate the window keys of ``row`` (whose sink is ``sink`` tokens) by ``shift``
        positions (an epoch starts)."""
        assert self.rotary is not None, "an epoch started for a model without rotary positions"
        bt = block_table(self.runner)
        count = int(bt.num_blocks_per_row[row])
        s, r = cdiv(sink, self.B), sink % self.B
        window_ids = self.stager.put(bt.block_table.np[row, s * kernel_blocks_per_page(bt) : count])
        cos, sin = self.angles([shift])
        cos, sin = cos[0], sin[0]
        rd, neox = self.rotary.rotary_dim, self.rotary.is_neox_style
        part = int(bt.block_table.np[row, s - 1]) if r else None  # the partial sink page
        for k in self.keys():
            rotate_blocks_(k, window_ids, cos, sin, rd, neox)
            if part is not None:  # window tokens in the partial sink page's tail
                k[part, :, r:] = rotate(k[part, :, r:], cos, sin, rd, neox)
        SINK_STATS.epochs += 1

    def reanchor(self, sink: int, rows: np.ndarray, slots: np.ndarray, old_angles: np.ndarray,
                 new_angles: np.ndarray) -> None:
        """Rewrite the sink keys of the given rows (whose sinks are ``sink`` tokens) as their
        pristine keys rotated by their new angles: one write for every row and layer (a
        stream's window start moves every B tokens). With a partial sink page (a new page
        whenever the window moved), its ``r`` sink values are written with the keys. Without
        a rotary table (ALiBi) only that partial page is written, its ``r`` keys copied as
        they are."""
        table = self.streams
        bt = block_table(self.runner)
        pages = bt.block_table.np
        rotating = self.rotary is not None
        s, r = cdiv(sink, self.B), sink % self.B
        nw = (sink // self.B) * kernel_blocks_per_page(bt) if rotating else 0
        slots_l = slots.tolist()
        if nw:
            for i, slot in enumerate(slots_l):
                if slot not in table.pristine:
                    # The sink slots still hold the keys as written at positions 0..S-1.
                    assert old_angles[i] == 0, "sink keys moved before their pristine copy was taken"
                    ids = self.stager.put(pages[rows[i], :nw])
                    table.pristine[slot] = torch.stack([k[ids] for k in self.keys()])  # [L, nw, H, B, D]
        # A partial sink page's are taken when the window first moves (it moves first).
        assert not r or all(slot in table.pristine_partial for slot in slots_l)
        rd, neox = (self.rotary.rotary_dim, self.rotary.is_neox_style) if rotating else (0, True)
        if rotating:
            self.rotary.check_all(new_angles)
        key_writer, value_writer = self.writers()
        if nw:
            key_writer.write(pages[rows, :nw], [table.pristine[slot] for slot in slots_l], new_angles, rd, neox)
        if r:
            part_ids = pages[rows, s - 1 : s]
            key_writer.write(part_ids, [table.pristine_partial[slot] for slot in slots_l], new_angles, rd, neox)
            value_writer.write(part_ids, [table.pristine_partial_values[slot] for slot in slots_l], new_angles,
                               0, neox)
        if rotating:
            SINK_STATS.sink_rotations += len(slots_l)
