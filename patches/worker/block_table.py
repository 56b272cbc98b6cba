"""The block-table row of each sink stream, in compacted coordinates: ``[sink pages] +
pages from ceil(w0 / B)``, ordered, no ring (``vllm_sink.block_row``).

Binds to:
  vllm.v1.worker.gpu_input_batch.InputBatch.block_table (``block_tables``: one per KV-cache
    group, one group only: ``refusals.check_one_kv_cache_group``)
  vllm.v1.worker.block_table.BlockTable: block_table.np, num_blocks_per_row, and on vLLM
    0.26.0 blocks_per_kv_block (0.32.0's rows hold pages: ``kernel_blocks_per_page``)
  GPUModelRunner.requests[req_id].block_ids (the request's KV block ids, cut in place as the
    row is compacted)
"""

from __future__ import annotations

import numpy as np

from vllm_sink.patches import bindings, refusals
from vllm_sink.patches.worker.streams import StreamTable
from vllm_sink.policy import cdiv, row_transition


def block_table(runner):
    """The runner's block table (its one KV-cache group's): on the V2 runner, the host copy
    of its rows that the sink policy keeps (``runner_v2.PageRows``)."""
    pages = getattr(runner, "_vllm_sink_pages", None)
    if pages is not None:
        return pages
    tables = runner.input_batch.block_table.block_tables
    refusals.check_one_kv_cache_group(len(tables))
    return tables[0]


def kernel_blocks_per_page(bt) -> int:
    """How many entries of a block-table row one KV page takes: vLLM 0.26.0's rows hold
    kernel blocks (``blocks_per_kv_block`` per page); 0.32.0's hold pages, which vLLM maps
    to kernel blocks when it builds the attention metadata."""
    if bindings.holds("vllm.v1.worker.block_table", "BlockTable.blocks_per_kv_block"):
        return bt.blocks_per_kv_block
    return 1


class BlockRows:
    """The block-table rows of the sink streams, and their requests' block ids.

    Invariant: a stream's row (and its request's ``block_ids``) is its sink pages, then its
    window pages from logical page ``streams.first_live`` of its slot on; the scheduler's
    manager applies the same ``row_transition`` to its copy, so the pages that leave the
    row are the ones it frees. At a stream's first move, the pages the manager replaced by
    private copies (``StepMeta.private``) are replaced in its row too, after the transition. With a partial sink page (``S mod B = r > 0``) the page that
    takes over keeps its window slots and gets its sink slots ``[0, r)`` written from the
    pristine copy ``kv.keep_partial_sink`` took (``kv_writes.KvWrites.reanchor``).
    """

    def __init__(self, runner, streams: StreamTable, kv, block_size: int):
        self.runner, self.streams, self.kv, self.B = runner, streams, kv, block_size
        # This step's private copies (``StepMeta.private``): request id -> [(old, new)].
        self.private: dict[str, list[tuple[int, int]]] = {}

    def adopt(self, rid: str, first_live: int) -> None:
        """A resumed request's row: the scheduler ships it compacted (its sink pages, then
        its held window pages, from logical page ``first_live``, cut at the resume token),
        so both sides apply the same row transitions from here."""
        self.streams.first_live[self.streams.slot_of[rid]] = first_live

    def move(self, row: int, rid: str, slot: int, w0: int) -> None:
        """Compact the row of a sequence whose window start moved to ``w0``."""
        table = self.streams
        S = int(table.sink[slot])
        s, r = cdiv(S, self.B), S % self.B
        move = row_transition(int(table.first_live[slot]), w0, S, self.B)
        block_ids = self.block_ids(rid)
        if move.swap_sink and slot not in table.pristine_partial:
            # The old partial sink page leaves; its sink slots [0, r) are first kept, as
            # written, for re-anchoring in the page that replaces it.
            self.kv.keep_partial_sink(slot, block_ids[s - 1], r)
        block_ids[:], _ = move.apply(block_ids, s)
        pairs = self.private.pop(rid, None)
        if pairs:  # its first move: its pages that others may read are its own copies now
            swap = dict(pairs)
            block_ids[:] = [swap.get(b, b) for b in block_ids]
        self.write_row(row, block_ids)
        table.first_live[slot] = move.last

    def block_ids(self, rid: str) -> list[int]:
        """The request's KV block ids (its row, in pages), changed in place as it moves."""
        return self.runner.requests[rid].block_ids[0]

    def write_row(self, row: int, block_ids: list[int]) -> None:
        """Write a request's KV block ids into its block-table row (in kernel blocks: each
        KV block is ``kernel_blocks_per_page`` consecutive kernel blocks), zeroing the rest
        of what the row held."""
        bt = block_table(self.runner)
        bpk = kernel_blocks_per_page(bt)
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
