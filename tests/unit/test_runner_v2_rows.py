"""The V2 runner binding's block-table rows (``patches/worker/runner_v2.py``), without an
engine: its host copy of the rows (``PageRows``) and a window's move through it
(``BlockRowsV2``), against a stand-in for vLLM's ``BlockTables`` that records the staged
writes the runner would apply."""

from types import SimpleNamespace

import numpy as np
import torch

from vllm_sink.patches.worker.runner_v2 import BlockRowsV2, PageRows
from vllm_sink.patches.worker.streams import StreamTable


class StagedTables:
    """vLLM's ``BlockTables`` (one KV-cache group, one kernel block per page): the rows as
    the device holds them once the staged writes are applied."""

    def __init__(self, reqs: int = 4, width: int = 8):
        self.num_kv_cache_groups, self.max_num_reqs = 1, reqs
        self.blocks_per_kv_block = [1]
        self.block_tables = [SimpleNamespace(gpu=torch.zeros(reqs, width, dtype=torch.int32))]
        self.rows = np.zeros((reqs, width), dtype=np.int64)
        self.counts = np.zeros(reqs, dtype=np.int64)

    def append_block_ids(self, req_index, new_block_ids, overwrite):
        start = 0 if overwrite else self.counts[req_index]
        ids = new_block_ids[0]
        self.rows[req_index, start : start + len(ids)] = ids
        self.counts[req_index] = start + len(ids)


def _device_row(tables, idx):
    return tables.rows[idx, : tables.counts[idx]].tolist()


def test_page_rows_mirror_the_runners_rows():
    tables = StagedTables()
    pages = PageRows(tables)
    assert pages.block_table.np.shape == (4, 8) and pages.blocks_per_kv_block == 1
    # vLLM writes a new request's row and appends to it; the host copy follows.
    tables.append_block_ids(2, ([7, 8, 9],), overwrite=True)
    pages.set(2, [7, 8, 9])
    tables.append_block_ids(2, ([10],), overwrite=False)
    pages.extend(2, [10])
    assert pages.ids[2] == [7, 8, 9, 10] == _device_row(tables, 2)
    assert pages.block_table.np[2, :5].tolist() == [7, 8, 9, 10, 0] and pages.num_blocks_per_row[2] == 4
    # A rewrite goes to both, the rest of the host row zeroed.
    pages.write(2, [7, 10])
    assert pages.ids[2] == [7, 10] == _device_row(tables, 2)
    assert pages.block_table.np[2, :4].tolist() == [7, 10, 0, 0] and pages.num_blocks_per_row[2] == 2


def test_a_moving_window_rewrites_the_row_as_the_scheduler_does():
    """S=16 (one sink page), B=16: a row of logical pages 0..4 whose window moves to
    w0=48 keeps its sink page and the pages from ceil(48/16)=3 on, on the device too."""
    tables = StagedTables()
    pages = PageRows(tables)
    streams = StreamTable(sink_tokens=16, block_size=16)
    runner = SimpleNamespace(req_states=SimpleNamespace(req_id_to_index={"r": 1}))
    rows = BlockRowsV2(runner, streams, kv=None, block_size=16)
    rows.pages = pages
    slot = streams.slot("r")
    tables.append_block_ids(1, ([100, 101, 102, 103, 104],), overwrite=True)
    pages.set(1, [100, 101, 102, 103, 104])
    assert streams.first_live[slot] == 1
    rows.move(1, "r", slot, 48)
    assert pages.ids[1] == [100, 103, 104] == _device_row(tables, 1)
    assert streams.first_live[slot] == 3
    # Its first move with private copies of shared pages (prefix caching): the copies
    # replace the shared ids after the transition.
    rows.private["r"] = [(104, 200)]
    rows.move(1, "r", slot, 64)
    assert pages.ids[1] == [100, 200] == _device_row(tables, 1)
