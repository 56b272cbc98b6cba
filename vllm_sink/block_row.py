"""A sequence's pages by logical block, holding only the pages it still has: what the
scheduler's KV manager keeps per sink stream.

vLLM's KV managers keep, per request, a list of pages indexed by logical block number
(``req_to_blocks``); a page that has left an attention window is replaced by the shared
null page, so the list grows by one entry per ``B`` tokens for the whole life of the
stream. A sink stream's list is always ``sink pages ++ null * k ++ live pages``: the pages
that left the window are a run right after the sink. :class:`BlockRow` stores that run as
a count, so it holds ``s + live`` entries however long the stream, and reads as the list
vLLM expects:

* ``len()`` counts every logical block; ``[i]``, ``[a:b]`` take logical block numbers and
  give the null page inside the run;
* setting the first live entry to the null page moves it into the run (eviction, in the
  order a window moves); setting an entry inside the run to anything but the null page is
  refused (a page never comes back);
* ``extend``/``append`` add blocks at the end (nulls right after the sink join the run, as
  when a resumed stream adopts a kept row); ``del row[n:]`` cuts the end;
* iterating yields the null page for each block of the run (what vLLM's frees read once,
  at the end of a stream); ``held()`` gives the pages only.

Invariants: ``len(self) == len(head) + skipped + len(live)``; ``len(head) <= head_size``,
and ``skipped == 0`` and ``live == []`` while ``len(head) < head_size``; ``live`` never
starts with the null page once ``len(head) == head_size`` (a leading null joins the run).
"""

from __future__ import annotations

from collections.abc import Iterable


class BlockRow:
    """Blocks ``head ++ [null] * skipped ++ live`` (``head``: the first ``head_size``)."""

    __slots__ = ("head", "skipped", "live", "head_size", "null")

    def __init__(self, blocks: Iterable = (), head_size: int = 0, null=None):
        if head_size < 0:
            raise ValueError(f"head_size must be >= 0 (got {head_size})")
        self.head: list = []
        self.skipped = 0
        self.live: list = []
        self.head_size = head_size
        self.null = null
        self.extend(blocks)

    # ------------------------------------------------------------------ growing
    def append(self, block) -> None:
        self.extend((block,))

    def extend(self, blocks: Iterable) -> None:
        for block in blocks:
            if len(self.head) < self.head_size:
                self.head.append(block)
            elif block is self.null and not self.live:
                self.skipped += 1
            else:
                self.live.append(block)

    def _settle(self) -> None:
        """Move leading nulls of ``live`` into the run."""
        i = 0
        while i < len(self.live) and self.live[i] is self.null:
            i += 1
        if i:
            del self.live[:i]
            self.skipped += i

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.head) + self.skipped + len(self.live)

    def __bool__(self) -> bool:
        return len(self) > 0

    @property
    def live_start(self) -> int:
        """Logical block number of the first entry of ``live``."""
        return len(self.head) + self.skipped

    def _index(self, i: int) -> int:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"block {i} of {n}")
        return i

    def _at(self, i: int):
        if i < len(self.head):
            return self.head[i]
        if i < self.live_start:
            return self.null
        return self.live[i - self.live_start]

    def __getitem__(self, item):
        if not isinstance(item, slice):
            return self._at(self._index(item))
        start, stop, step = item.indices(len(self))
        if step != 1:
            raise IndexError("a BlockRow slices with step 1 only")
        if stop <= start:
            return []
        h, ls = len(self.head), self.live_start
        out = self.head[start:min(stop, h)]
        if stop > h and start < ls:
            out += [self.null] * (min(stop, ls) - max(start, h))
        if stop > ls:
            out += self.live[max(start, ls) - ls : stop - ls]
        return out

    def __iter__(self):
        yield from self.head
        for _ in range(self.skipped):
            yield self.null
        yield from self.live

    def __reversed__(self):
        yield from reversed(self.live)
        for _ in range(self.skipped):
            yield self.null
        yield from reversed(self.head)

    def held(self) -> list:
        """The pages the row holds (no null page), in logical order."""
        return [b for b in self.head if b is not self.null] + [b for b in self.live if b is not self.null]

    # ------------------------------------------------------------------ changing
    def __setitem__(self, item, value) -> None:
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            values = list(value)
            if step != 1 or len(values) != max(0, stop - start):
                raise IndexError("a BlockRow assigns a slice of the same length, step 1")
            for i, v in zip(range(start, stop), values):
                self[i] = v
            return
        i = self._index(item)
        if i < len(self.head):
            self.head[i] = value
        elif i < self.live_start:
            if value is not self.null:
                raise IndexError(f"block {i} left the row: it cannot hold a page again")
        else:
            self.live[i - self.live_start] = value
            if value is self.null and i == self.live_start:
                self._settle()

    def __delitem__(self, item) -> None:
        """``del row[n:]`` only: cut the row at logical block ``n``."""
        if not isinstance(item, slice) or item.step not in (None, 1) or item.stop not in (None, len(self)):
            raise IndexError("a BlockRow deletes a suffix only (del row[n:])")
        n = item.indices(len(self))[0]
        h, ls = len(self.head), self.live_start
        if n >= ls:
            del self.live[n - ls :]
        elif n >= h:
            self.live.clear()
            self.skipped = n - h
        else:
            del self.head[n:]
            self.skipped = 0
            self.live.clear()

    def __repr__(self) -> str:
        return f"BlockRow(len={len(self)}, head={len(self.head)}, skipped={self.skipped}, live={len(self.live)})"


def held_pages(blocks) -> list:
    """The pages of a row, without the null page: a ``BlockRow``'s ``held()``, or the blocks
    of a plain list of vLLM blocks whose ``is_null`` is false."""
    return blocks.held() if isinstance(blocks, BlockRow) else [b for b in blocks if not b.is_null]
