"""The worker's compacted token rows (``vllm_sink.token_rows``), against a brute-force model
of a stream: every row index holds the token the design says, whatever the stream's length,
in a row of fixed size."""

import numpy as np
import pytest

from vllm_sink.policy import SinkGeometry
from vllm_sink.token_rows import (
    held_prompt_mask,
    held_prompt_width,
    held_token,
    output_keep,
    release_at,
    release_due,
    shift_row,
)


def _stream(geometry: SinkGeometry, total: int, prompt: int, chunk: int):
    """Run a stream through a fixed-size row as the worker does: shift the row when the
    window moves, write each step's prompt tokens, append each sampled token. Yields
    ``(row, length, off)`` after every step; token ``t``'s id is ``1000 + t``."""
    S, B = geometry.sink_tokens, geometry.block_size
    width = geometry.widest.row_capacity * B
    row = np.zeros(width, dtype=np.int64)
    length, off, a = prompt, 0, 0  # the row's count: the prompt (written as scheduled)
    row[: min(prompt, width)] = 1000 + np.arange(min(prompt, width))
    while a < total:
        n = min(chunk, prompt - a) if a < prompt else 1
        plan = geometry.plan_step(a, a + n, _state())
        new_off = plan.slot_offset
        length = shift_row(row, length, S, new_off - off)
        off = new_off
        if a < prompt:
            row[a - off : a + n - off] = 1000 + np.arange(a, a + n)
        a += n
        if a >= prompt:  # the step's sampled token (the next one) is appended
            assert length < width, (length, width)
            row[length] = 1000 + a
            length += 1
        yield row, length, off, a


def _state():
    from vllm_sink.policy import FrameState

    return FrameState()


@pytest.mark.parametrize("S, B, W, chunk", [(16, 16, 256, 64), (20, 16, 256, 64), (4, 16, 128, 48), (0, 16, 128, 64)])
def test_row_holds_sink_and_window_for_a_long_stream(S, B, W, chunk):
    g = SinkGeometry(block_size=B, sink_tokens=S, kv_window=W, step_tokens=chunk, concurrent_steps=1,
                     rope_limit=1 << 40)
    width = g.row_capacity * B
    assert width < 2 * (S + W + 4 * chunk + 3 * B)  # bounded by the geometry, not the stream
    prompt = 3 * width + 5  # longer than the row: written as it is scheduled
    checked = 0
    for row, length, off, a in _stream(g, 20 * W + prompt, prompt, chunk):
        assert length <= width or a < prompt  # a long prompt's count runs past the row until it is computed
        # Every index up to the row's count holds the token the design says; the window of
        # the next step is inside.
        c = np.arange(min(length, width))
        held = held_token(c, S, off)
        written = a + 1 if a >= prompt else a  # computed tokens, and the sampled one
        known = held < written
        assert (row[c][known] == 1000 + held[known]).all()
        if off:  # the sink, then every token from the window start on
            assert known.sum() == S + written - (S + off)
        checked += 1
    assert checked > 20 * W and off > 19 * W  # the window moved far; the row never grew


def test_held_token():
    assert (held_token(np.array([0, 3, 4, 9]), 4, 100) == [0, 3, 104, 109]).all()


def test_shift_row_moves_only_the_window():
    row = np.arange(20)
    assert shift_row(row, 20, 4, 6) == 14
    assert list(row[:14]) == [0, 1, 2, 3] + list(range(10, 20))
    row = np.arange(8)
    assert shift_row(row, 12, 2, 3) == 9  # a count past the row's end (a long prompt)
    assert list(row[:5]) == [0, 1, 5, 6, 7]
    with pytest.raises(ValueError):
        shift_row(row, 8, 2, -1)


def test_held_prompt_mask_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        rows = 5
        S = rng.integers(0, 40, rows)
        off = rng.integers(0, 300, rows) * (rng.random(rows) < 0.7)
        P = rng.integers(1, 600, rows)
        width = held_prompt_width(S, off, P, 512)
        mask = held_prompt_mask(width, S, off, P)
        for i in range(rows):
            for c in range(width):
                t = c if c < S[i] else c + off[i]
                assert mask[i, c] == (t < P[i])
            # every held prompt token fits in the width (or the width is the row's)
            held = [c for c in range(512) if (c if c < S[i] else c + off[i]) < P[i]]
            assert not held or max(held) < width or width == 512


def test_output_keep():
    assert output_keep(560, 0) == 560
    assert output_keep(560, 5000) == 5001


def test_release_due_counts_the_kept_output_ids():
    """Output ids are released once the kept ones (the stream's length, less the prompt and
    those released) reach twice a row's worth; numbers and arrays agree."""
    width = 560
    # length = row_len + off = 100 + 1200; kept = 1300 - 180 - trimmed
    assert release_due(100, 1200, 180, 0, width)  # 1120 kept
    assert not release_due(100, 1200, 180, 1, width)  # 1119 kept
    assert not release_due(1120, 0, 0, 1, width)
    rows = np.array([100, 100, 1120]), np.array([1200, 1200, 0]), np.array([180, 180, 0]), np.array([0, 1, 1])
    assert release_due(*rows, width).tolist() == [True, False, False]
    # The threshold the worker's steady steps compare the row length with: the first length due.
    assert release_at(1200, 180, 0, width) == 100 and release_at(1200, 180, 1, width) == 101
    assert release_at(*rows[1:], width).tolist() == [100, 101, 1121]
