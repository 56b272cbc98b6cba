"""Kept pages in vLLM's queue of free pages: parked with their contents, in the queue's
least-recently-used order beside the prefix cache's pages.

Binds to (reads and calls only):
  vllm.v1.core.block_pool.BlockPool: free_block_queue, touch
  vllm.v1.core.kv_cache_utils.FreeKVCacheBlockQueue: append_n, prepend_n, remove
  vllm.v1.core.kv_cache_utils.KVCacheBlock: ref_cnt, block_hash, is_null

vLLM takes free pages from the queue's front and puts a finished request's cached pages at
its back (``BlockPool.free_blocks``), pages nobody can find at its front. A page parked here
has ref count 0 and keeps its contents until vLLM takes it; the caller (``manager``) learns
that from the pages vLLM hands out.
"""

from __future__ import annotations


def park(block_pool, pages: list) -> None:
    """Put ``pages`` (row order; ref count 1: only their stream holds them; no hash) in the
    free queue at its back, as vLLM places a finished request's cached pages, their contents
    kept. (``free_blocks`` would put pages without a hash at the front, to be reused first.)"""
    for b in pages:
        assert b.ref_cnt == 1 and b.block_hash is None and not b.is_null, b
        b.ref_cnt = 0
    block_pool.free_block_queue.append_n(list(reversed(pages)))


def discard(block_pool, pages: list) -> None:
    """Move parked ``pages`` (ref count 0, in the queue) to its front: nobody can find them
    any more, so they are reused first (where ``free_blocks`` puts such pages)."""
    queue = block_pool.free_block_queue
    for b in pages:
        queue.remove(b)
    queue.prepend_n(list(reversed(pages)))


def take_back(block_pool, pages: list) -> None:
    """Take parked ``pages`` out of the queue (ref count 1: allocated again), as vLLM takes
    a prefix hit's pages (``touch``)."""
    block_pool.touch(pages)
