"""The worker's token rows in compacted coordinates: what a sink stream's row holds, as pure
functions (numpy only).

vLLM's model runner keeps, per running sequence, a row of token ids indexed by token
position (``InputBatch.token_ids_cpu``), from which it gathers each step's input ids. Indexed
by absolute position, that row must be as long as the longest stream, and it fills as the
stream goes. A sink stream only ever reads what it attends to: the sink and the window.
So the worker sees each sink stream as its *compacted* sequence (DESIGN.md, phase 2)::

    tokens[0:S] ++ tokens[S + off:]          off = w0 - S  (0 before the first eviction)

Token ``t`` of the stream sits at compacted index ``c = t`` if ``t < S`` and ``c = t - off``
otherwise; every step ``[a, b)`` has ``off = 0`` or ``a >= S`` (the window moves only once
``a >= S + W``), so its tokens sit at ``[a - off, b - off)``. That is also their index in the
compacted block-table row and in the compacted sequence the attention kernels see
(``seq_len = b - off``). Its length never exceeds ``S + W + B + C`` (``C``: tokens in
flight), so a row of ``SinkGeometry.row_capacity * B`` tokens holds any sink stream,
whatever its length.

Invariants (``tests/unit/test_token_rows.py``):

* a row at offset ``off`` holds, at index ``c``, token ``held_token(c, S, off)``; moving the
  window from ``off`` to ``off' >= off`` shifts the window part left by ``off' - off``
  (:func:`shift_row`) and keeps the sink part;
* a prompt token is held at ``c`` iff :func:`held_prompt_mask` says so: sampling penalties
  that read a row's prompt see the sink and the prompt tokens still in the window.
"""

from __future__ import annotations

import numpy as np


def held_token(c, sink_tokens, off):
    """The stream token at compacted index ``c`` of a row at offset ``off`` (numpy-aware)."""
    c = np.asarray(c)
    return np.where(c < sink_tokens, c, c + off)


def shift_row(row: np.ndarray, length: int, sink_tokens: int, by: int) -> int:
    """Move a row's window part ``[S + by, length)`` to ``[S, length - by)`` in place (the
    window start moved ``by`` tokens further); returns the new length. What lies past the
    row's end (a long prompt not yet written) is not there to move: the caller writes it
    when it is scheduled."""
    if by < 0:
        raise ValueError(f"a row's offset never decreases (by {by})")
    if by == 0:
        return length
    end = min(length, len(row))
    if end > sink_tokens + by:
        row[sink_tokens : end - by] = row[sink_tokens + by : end].copy()
    return length - by


def held_prompt_mask(width: int, sink_tokens, off, prompt_len) -> np.ndarray:
    """``[rows, width]``: whether index ``c`` of each row holds a prompt token (sink tokens
    and window tokens below ``prompt_len``). ``sink_tokens``, ``off``, ``prompt_len``: one
    entry per row."""
    c = np.arange(width)[None, :]
    S = np.asarray(sink_tokens)[:, None]
    t = np.where(c < S, c, c + np.asarray(off)[:, None])
    return t < np.asarray(prompt_len)[:, None]


def held_prompt_width(sink_tokens, off, prompt_len, capacity: int) -> int:
    """Columns that hold every row's held prompt tokens (at least 1, at most ``capacity``)."""
    S, off, P = (np.asarray(x, dtype=np.int64) for x in (sink_tokens, off, prompt_len))
    ends = np.maximum(np.minimum(S, P), P - off)
    return int(min(max(int(ends.max(initial=1)), 1), capacity))


def output_keep(row_tokens: int, min_tokens: int) -> int:
    """How many of a stream's latest output ids the worker keeps (its sampler reads them:
    penalties, and ``min_tokens``, which counts them): a row's worth, and ``min_tokens``."""
    return max(row_tokens, min_tokens + 1)


def release_at(off, prompt_len, trimmed, row_tokens: int):
    """The row length (``num_tokens_no_spec``, compacted) from which a stream may have output
    ids to release: where the output ids the worker keeps (the stream's length
    ``row_len + off``, less its prompt and the ``trimmed`` ids already released) reach twice
    :func:`output_keep` at ``min_tokens = 0`` (numbers or numpy arrays)."""
    return 2 * output_keep(row_tokens, 0) + prompt_len + trimmed - off


def release_due(row_len, off, prompt_len, trimmed, row_tokens: int):
    """Whether a stream may have output ids to release (:func:`release_at`; numbers or numpy
    arrays: the worker asks for one row, or a whole batch at once)."""
    return row_len >= release_at(off, prompt_len, trimmed, row_tokens)
