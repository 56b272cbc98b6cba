"""Copy on write for the sink manager: the step that first moves a stream's window replaces
each page it keeps that another request can find (cached by hash) or holds by a private copy.

Reads vLLM 0.26.0's ``KVCacheBlock`` (block_id, block_hash, ref_cnt, is_null) and takes pages
with ``BlockPool.get_new_blocks`` (both listed in ``patches.bindings``).

:class:`CopyOnWrite` is a part of ``manager.StreamingSinkManager``, kept apart for size; it
uses the manager's ``req_to_blocks``, ``block_pool``, ``channel``, ``sessions``,
``_stream`` and ``free_pages``.
"""

from __future__ import annotations

from vllm_sink.metrics import SINK_STATS


class CopyOnWrite:
    def _take_private(self, request_id: str, move) -> None:
        """The step that moves ``request_id``'s window for the first time (decided when it is
        scheduled, at the step's start, as the worker moves the row; ``move`` is that row
        transition, whose leaving pages the manager frees once they are processed). From
        this step on the worker may rewrite its pages (the sink re-anchored, a page taking
        over as the partial sink page, epochs), and the pages it computes depend on what its
        window held. Each page of its row that stays and that another request can find
        (cached by hash) or holds is replaced by a private copy (copy on write: the worker
        copies it, ``StepMeta.copies``, and swaps it in its row, ``StepMeta.private``); the
        shared page is released, and stays cached for the others."""
        blocks = self.req_to_blocks[request_id]
        s = self._stream(request_id).geometry.sink_pages
        # The pages that stay (with a partial sink page, the page taking over as the sink
        # page stays and is written; the old one leaves) ...
        if move is None:  # (no page leaves at this step; the sink is re-anchored)
            staying = {id(b) for b in blocks}
        else:
            staying = {id(b) for b in move.apply(blocks[:s] + blocks[move.first:], s)[0]}
        # ... that another request can find or holds.
        shared = [i for i, b in enumerate(blocks) if id(b) in staying and self._shared(b)]
        if shared:
            self.channel.private(request_id, self._copy_pages(blocks, shared))

    def _copy_pages(self, row, positions: list[int]) -> list[tuple[int, int]]:
        """Replace the pages at ``positions`` of ``row`` by fresh pages and release the old
        ones (they stay cached for the others); returns the ``(old, new)`` page ids the
        worker copies before the step writes any page.

        A page only this request holds goes back to the pool (cached) before its copy is
        taken, so the copy needs no free page: the pool's free count does not move, and
        when the pool has no other free page the fresh page is that page itself, its hash
        dropped (nothing to copy). A page others hold too is copied into a free page, which
        admission reserved when they found it (``SinkStream.unowned``)."""
        pairs = []
        for i in sorted(positions, key=lambda i: row[i].ref_cnt > 1):
            old = row[i]
            if old.ref_cnt == 1:
                self.free_pages([old])
                row[i] = self._new_page()
            else:
                row[i] = self._new_page()
                self.free_pages([old])
            if row[i] is not old:
                pairs.append((old.block_id, row[i].block_id))
        SINK_STATS.pages_copied += len(pairs)
        return pairs

    def _new_page(self):
        """A page from the free queue (a kept stream it belonged to gives way)."""
        page = self.block_pool.get_new_blocks(1)[0]
        if self.sessions is not None:
            self.sessions.reclaim([page])
        return page

    @staticmethod
    def _shared(block) -> bool:
        """Whether another request can find ``block`` (cached by hash) or holds it."""
        return not block.is_null and (block.block_hash is not None or block.ref_cnt > 1)
