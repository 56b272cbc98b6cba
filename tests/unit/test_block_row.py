"""BlockRow reads and changes as the plain list of pages vLLM keeps per request, while it
holds only the sink and the live pages."""

import random

import pytest

from vllm_sink.block_row import BlockRow

NULL = "null"


class Page:
    def __init__(self, i):
        self.i = i

    def __repr__(self):
        return f"P{self.i}"


def _check(row: BlockRow, model: list, slices: bool = True) -> None:
    assert len(row) == len(model)
    assert list(row) == model
    assert list(reversed(row)) == model[::-1]
    assert row.held() == [b for b in model if b is not NULL]
    n = len(model)
    for i in list(range(-n, n)):
        assert row[i] is model[i]
    for a in range(0, n + 2, 3) if slices else ():
        for b in range(a, n + 3, 5):
            assert row[a:b] == model[a:b]
    assert row[:] == model
    # Invariants of the module docstring.
    assert len(row.head) <= row.head_size
    if len(row.head) < row.head_size:
        assert row.skipped == 0 and row.live == []
    assert not (row.live and row.live[0] is NULL)


@pytest.mark.parametrize("head_size", [0, 1, 2])
def test_a_stream_evicting_reads_as_the_list_and_holds_only_its_pages(head_size):
    """A sink stream's life: pages appended, the oldest window page nulled as the window
    moves (in vLLM's order), the sink pages swapped (a partial sink's re-anchoring), the
    end cut: the row reads as vLLM's list throughout and holds only sink and live pages."""
    rng = random.Random(head_size)
    model: list = []
    row = BlockRow((), head_size, NULL)
    nxt = 0
    first_live = head_size
    most_held = 0
    for step in range(400):
        k = rng.randrange(1, 4)
        new = [Page(nxt + j) for j in range(k)]
        nxt += k
        model.extend(new)
        row.extend(new)
        # The window keeps the last 6 blocks: null the ones before it, oldest first.
        while len(model) - first_live > 6:
            model[first_live] = NULL
            row[first_live] = NULL
            first_live += 1
        if head_size and step % 37 == 5:  # the sink page replaced by a window page
            swap = [Page(10_000 + step + j) for j in range(head_size)]
            model[:head_size] = swap
            row[:head_size] = swap
        _check(row, model, slices=step % 40 == 0)
        most_held = max(most_held, len(row.head) + len(row.live))
    assert row.skipped == len(model) - head_size - len(row.live) > 100
    assert most_held <= head_size + 6 + 3
    del model[len(model) - 2:]
    del row[len(row) - 2:]
    _check(row, model)


def test_a_kept_row_cut_and_adopted_with_its_run():
    """A kept stream's row cut at a resume point and adopted by the next request (a list
    with the run of nulls, as vLLM's prefix-hit path hands it): same list, run counted."""
    pages = [Page(i) for i in range(30)]
    model = pages[:2] + [NULL] * 20 + pages[22:]
    row = BlockRow(model, 2, NULL)
    assert (len(row.head), row.skipped, len(row.live)) == (2, 20, 8)
    _check(row, model)
    for n in (25, 22, 10, 1, 0):
        cut_model, cut = model[:n], BlockRow(model, 2, NULL)
        del cut[n:]
        _check(cut, cut_model)
        adopted = BlockRow((), 2, NULL)
        adopted.extend(cut_model)
        _check(adopted, cut_model)
        more = [Page(100 + i) for i in range(3)]
        adopted.extend(more)
        _check(adopted, cut_model + more)


def test_refusals():
    """A page cannot come back into the run; only suffixes are deleted; slices step 1."""
    p = [Page(i) for i in range(6)]
    row = BlockRow([p[0], NULL, NULL, p[3], p[4]], 1, NULL)
    row[1] = NULL  # null over null: nothing changes
    with pytest.raises(IndexError, match="left the row"):
        row[2] = p[5]
    with pytest.raises(IndexError, match="suffix"):
        del row[1:2]
    with pytest.raises(IndexError, match="step 1"):
        row[::2]
    with pytest.raises(IndexError):
        row[5]
    _check(row, [p[0], NULL, NULL, p[3], p[4]])
