"""The StreamingLLM eviction rule and position arithmetic, as pure functions.

Notation (the contract, README.md): page (vLLM block) size ``B``, sink tokens ``S`` (any
count, not only whole pages: the paper's default is 4), held in ``s = ceil(S / B)`` sink
pages, ``r = S mod B``, window ``W`` tokens, and a step that computes tokens ``[a, b)`` of
one sequence.

* **Window start.** ``w0 = max(S, floor((a - W + 1 - r) / B) * B + r)``, so ``w0 = S (mod
  B)``. Query ``t`` in ``[a, b)`` sees the sink ``[0, S)`` and the window ``[w0, t]``.
  Pages ``[s, ceil(w0 / B))`` are evicted. With whole sink pages (``r = 0``) this is
  ``max(S, floor((a - W + 1) / B) * B)``.
* **Partial sink page** (``r > 0``). The last sink page keeps the sink in slots ``[0, r)``;
  its slots ``[r, B)`` hold window tokens: at first its own tokens ``[S, s * B)``, and after
  each eviction the tokens ``[w0, ceil(w0 / B) * B)``, which already sit in those slots of
  the page holding ``w0``: that page becomes the last sink page (its slots ``[0, r)`` are
  rewritten with the sink) and the old last sink page is freed instead. Nothing is copied.
  The sequence is then, in cache order, exactly ``[0, S) + [w0, t]``: the compacted index
  of window token ``p`` is ``p - (w0 - S)`` in both cases.
* **Contract positions.** Sink token ``j`` sits at ``j``, window token ``p`` at
  ``S + (p - w0)``, query ``t`` at ``S + (t - w0)``.
* **Frame positions** (how the plugin realises them on a post-RoPE paged cache). Every
  token ``t`` the model computes is given position ``t - base``; ``base`` is constant over
  an *epoch*. Window keys are written once and never touched while the epoch lasts, since
  only position differences matter to RoPE: ``(t - base) - (p - base) = t - p``. The sink
  keys are re-anchored from a pristine copy (written at positions ``0 .. S-1``) by the
  angle ``w0 - S - base`` so that the query-to-sink distance is the contract's
  ``S + t - w0 - j``.
* **Epochs.** The model's rotary table has ``P`` rows (``max_position_embeddings``, times the
  linear factor), so every frame position must stay ``< P``. When a step would reach ``P``,
  a new epoch starts at ``base' = w0 - S`` (frame position of window token ``w0`` becomes
  ``S``, the contract's value) and the cached window keys are rotated once by
  ``-(base' - base)``.

Invariants (checked by ``tests/unit``): before the first eviction ``w0 == S`` and
``base == 0``, so positions equal vanilla vLLM's; every frame position of a step is in
``[0, P)`` when ``S + W + B + C <= P`` (``C`` = the step's token count); the sink angle is
in ``[0, P)``; once the window has moved (``w0 > S``), a step writes no token into the page
holding ``w0`` (``a >= ceil(w0 / B) * B``, since ``W >= B``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def window_start(a, sink_tokens, window: int, block_size: int):
    """``w0``: first token of the window for a step that starts at token ``a``.

    Always ``= sink_tokens (mod block_size)`` and ``>= sink_tokens``; never above ``a``.
    Numbers, or numpy arrays (``a`` and ``sink_tokens``, element by element: the worker
    plans a whole batch at once, :func:`plan_steps`).
    """
    r = sink_tokens % block_size
    w0 = ((a - window + 1 - r) // block_size) * block_size + r
    if isinstance(w0, int):
        return max(sink_tokens, w0)
    import numpy as np

    return np.maximum(sink_tokens, w0)


def first_step_at(w0, window: int):
    """The inverse of :func:`window_start`: the first token ``a`` a step starts at whose
    window start is ``w0`` (for ``w0 > S``, ``w0 = S mod B``): ``w0 + W - 1``. A step
    starting below it has a window start at least a page lower. Numbers or numpy arrays."""
    return w0 + window - 1


def sink_page_count(sink_tokens: int, block_size: int) -> int:
    """``s``: pages that hold the sink (the last one partly, if ``S`` is not a multiple)."""
    return cdiv(sink_tokens, block_size)


def evicted_pages(a: int, sink_tokens: int, window: int, block_size: int) -> range:
    """Logical page indices that no step starting at ``>= a`` needs (the page holding
    ``w0`` too when the sink page is partial: that page becomes the sink page, and the old
    sink page is freed in its place)."""
    w0 = window_start(a, sink_tokens, window, block_size)
    return range(sink_page_count(sink_tokens, block_size), cdiv(w0, block_size))


@dataclass(frozen=True)
class RowTransition:
    """How a sequence's row of pages changes when its window start moves.

    The row is the sequence's live pages in cache order: its ``s`` sink pages (logical blocks
    ``0 .. s-1``), then the window's pages, logical blocks ``first ..`` on. After the move
    the window's pages start at logical block ``last = ceil(w0 / B)``: logical blocks
    ``[first, last)`` leave the row. With a partial sink page (``swap_sink``), the page of
    logical block ``last - 1`` (it holds ``w0``, and the window's first tokens in its slots
    ``[r, B)``) stays, in place of the last sink page, and the old last sink page leaves
    instead: still ``last - first`` pages leave.

    The scheduler's manager (which frees the pages) and the worker (which compacts its block
    table row) both apply the transition :func:`row_transition` gives them, each to its own
    copy of the row; :meth:`apply` is the rule on a plain list (``row[i]`` = page of row
    position ``i``).
    """

    first: int
    last: int
    swap_sink: bool

    @property
    def leaving(self) -> int:
        return self.last - self.first

    def apply(self, row: list, sink_pages: int) -> tuple[list, list]:
        """``(new row, pages that leave)`` for ``row``, whose position ``sink_pages`` holds
        logical block ``first``."""
        s, d = sink_pages, self.leaving
        if len(row) < s + d:
            raise ValueError(f"row of {len(row)} pages has no logical block {self.last - 1}")
        row = list(row)
        leaving = row[s : s + d]
        if self.swap_sink:
            leaving[-1], row[s - 1] = row[s - 1], row[s + d - 1]
        return row[:s] + row[s + d :], leaving


def window_moves(first, w0, block_size: int):
    """Whether pages leave a row whose window pages start at logical block ``first`` when
    the window starts at ``w0`` (element-wise on numpy arrays: the worker asks for a whole
    batch at once)."""
    return cdiv(w0, block_size) > first


def row_transition(first: int, w0: int, sink_tokens: int, block_size: int) -> RowTransition | None:
    """The row transition for a window that now starts at ``w0``, from a row whose window
    pages start at logical block ``first`` (``None`` if no page leaves)."""
    if not window_moves(first, w0, block_size):
        return None
    return RowTransition(first=first, last=cdiv(w0, block_size), swap_sink=sink_tokens % block_size != 0)


def next_move_at(first: int, sink_tokens: int, window: int, block_size: int) -> int:
    """The fewest processed tokens ``a`` at which pages leave a row whose window pages start
    at logical block ``first``: ``row_transition(first, window_start(a, ...))`` is ``None``
    for every ``a`` below it and not ``None`` at it (the window start moves past page
    ``first`` once ``a - W + 1`` reaches its last slot; ``w0`` is ``r`` mod ``B``). The
    scheduler's manager asks once per move, not once per step."""
    # The row's pages leave once the window start is past page ``first``: at the first
    # window start ``= r (mod B)`` in page ``first + 1`` (``r = 0``) or in page ``first``.
    r = sink_tokens % block_size
    return first_step_at(first * block_size + (r or block_size), window)


def page_bound(sink_pages: int, window: int, block_size: int, in_flight: int) -> int:
    """The most pages one running sequence holds: ``s + ceil((W - 1 + C) / B) + 1`` with
    ``C`` the tokens of the sequence in flight (the window's ``W - 1`` earlier tokens and
    the ``C`` in flight span at most that many pages past the sink). Never above the
    contract's ``s + ceil((W + C) / B) + 1``."""
    return sink_pages + cdiv(window - 1 + in_flight, block_size) + 1


def live_pages(a: int, b: int, sink_tokens: int, window: int, block_size: int) -> int:
    """Pages a sequence holds while a step computes ``[a, b)`` (sink pages included)."""
    s = sink_page_count(sink_tokens, block_size)
    w0 = window_start(a, sink_tokens, window, block_size)
    sink_held = min(s, cdiv(b, block_size))
    return sink_held + max(0, cdiv(b, block_size) - cdiv(w0, block_size))


def contract_positions(
    a: int, b: int, sink_tokens: int, window: int, block_size: int
) -> tuple[list[int], list[int], list[int]]:
    """(visible key tokens of the last query, their positions, query positions) per the
    contract, for a step ``[a, b)``. Used by tests and the reference; O(W)."""
    S = sink_tokens
    w0 = window_start(a, S, window, block_size)
    t_last = b - 1
    keys = list(range(min(S, b))) + list(range(max(w0, S), t_last + 1))
    key_pos = [j if j < S else S + (j - w0) for j in keys]
    q_pos = [t if t < S else S + (t - w0) for t in range(a, b)]
    return keys, key_pos, q_pos


@dataclass
class FrameState:
    """Position state of one sequence, kept by the worker between steps.

    ``base``: the epoch base (frame position = absolute token index - base).
    ``sink_angle``: the rotation, in positions, currently applied to the sink keys relative
    to their pristine copy. ``epochs``: how many epochs have started after the first.
    """

    base: int = 0
    sink_angle: int = 0
    epochs: int = 0


@dataclass(frozen=True)
class StepPlan:
    """What the worker must do before the forward of step ``[a, b)`` of one sequence.

    * ``w0``: window start; the compacted block-table row is ``[sink pages] + pages from
      ceil(w0 / B)``.
    * ``slot_offset = w0 - S``: subtract from absolute token indices to get the index in the
      compacted sequence (for slot mapping and ``seq_lens``).
    * ``base``: subtract from absolute token indices to get frame (RoPE) positions.
    * ``window_shift``: if not 0, rotate the cached window keys ``[w0, a)`` by this many
      positions (always negative) because a new epoch starts.
    * ``sink_angle``: target rotation of the sink keys from pristine; rotate if it differs
      from ``FrameState.sink_angle``.
    """

    w0: int
    slot_offset: int
    base: int
    window_shift: int
    sink_angle: int


def plan_step(
    a: int,
    b: int,
    state: FrameState,
    *,
    sink_tokens: int,
    window: int,
    block_size: int,
    rope_limit: int,
) -> StepPlan:
    """Plan one step ``[a, b)`` from the sequence's ``state`` (not mutated).

    Raises ``ValueError`` if the step cannot be served within ``rope_limit`` frame
    positions, which config validation rules out in advance (``S + W + B + C <= P``).
    """
    if b <= a:
        raise ValueError(f"empty step [{a}, {b})")
    S = sink_tokens
    w0 = window_start(a, S, window, block_size)
    base = state.base
    window_shift = 0
    if b - 1 - base >= rope_limit:
        new_base = w0 - S
        if b - 1 - new_base >= rope_limit:
            raise ValueError(
                f"step [{a}, {b}) spans {b - w0} window tokens + {S} sink tokens, more "
                f"than the model's {rope_limit} rotary positions"
            )
        window_shift = base - new_base
        base = new_base
    return StepPlan(
        w0=w0,
        slot_offset=w0 - S,
        base=base,
        window_shift=window_shift,
        sink_angle=w0 - S - base,
    )


@dataclass(frozen=True)
class StepPlans:
    """:class:`StepPlan` for a batch of sequences: one numpy array per field, one entry per
    sequence (``int64``)."""

    w0: "np.ndarray"
    slot_offset: "np.ndarray"
    base: "np.ndarray"
    window_shift: "np.ndarray"
    sink_angle: "np.ndarray"

    def __getitem__(self, i: int) -> StepPlan:
        return StepPlan(w0=int(self.w0[i]), slot_offset=int(self.slot_offset[i]), base=int(self.base[i]),
                        window_shift=int(self.window_shift[i]), sink_angle=int(self.sink_angle[i]))


def plan_steps(a, b, base, *, sink_tokens: int, window: int, block_size: int, rope_limit: int) -> StepPlans:
    """:func:`plan_step` for many sequences at once: ``a``, ``b`` and each sequence's epoch
    ``base`` are integer arrays of one length (``sink_tokens`` one number, or one per
    sequence: sequences may have sinks of their own); entry ``i`` of the result equals
    ``plan_step(a[i], b[i], FrameState(base=base[i]), ...)`` (the worker's per-step plan for
    a whole batch, without a Python loop over its rows). Raises ``ValueError`` as
    :func:`plan_step` does, for the first sequence that cannot be served."""
    import numpy as np

    a, b, base = (np.asarray(x, dtype=np.int64) for x in (a, b, base))
    S, B = np.asarray(sink_tokens, dtype=np.int64), block_size
    if (b <= a).any():
        i = int(np.flatnonzero(b <= a)[0])
        raise ValueError(f"empty step [{a[i]}, {b[i]})")
    w0 = window_start(a, S, window, B)
    new_epoch = b - 1 - base >= rope_limit
    new_base = np.where(new_epoch, w0 - S, base)
    if (b - 1 - new_base >= rope_limit).any():
        i = int(np.flatnonzero(b - 1 - new_base >= rope_limit)[0])
        plan_step(int(a[i]), int(b[i]), FrameState(base=int(base[i])), sink_tokens=int(np.broadcast_to(S, a.shape)[i]),
                  window=window, block_size=B, rope_limit=rope_limit)  # raises, with the message
    return StepPlans(w0=w0, slot_offset=w0 - S, base=new_base, window_shift=base - new_base,
                     sink_angle=w0 - S - new_base)


def quiet_end(w0, base, *, window: int, block_size: int, rope_limit: int):
    """After a step planned with window start ``w0`` and epoch base ``base``, the end of the
    steps that plan the same: any later step ``[a, b)`` with ``b <= quiet_end`` has the same
    window start (it moves once ``a`` reaches ``w0 + B + W - 1``: ``w0`` is ``r`` mod ``B``)
    and starts no epoch (``b - 1 - base < P``), so the same slot offset and sink angle, and
    no page leaves. Numbers or numpy arrays (the worker's steps that change nothing skip
    the plan: ``patches/worker``)."""
    import numpy as np

    return np.minimum(first_step_at(w0 + block_size, window), base + rope_limit)


def apply_plan(state: FrameState, plan: StepPlan) -> None:
    """Record in ``state`` that ``plan``'s rotations have been carried out."""
    if plan.window_shift:
        state.epochs += 1
    state.base = plan.base
    state.sink_angle = plan.sink_angle


# ``rope_limit`` of a model without rotary positions (ALiBi: keys carry no position, the
# kernel biases by index in the cache): no step ever reaches it, so no epoch ever starts.
NO_ROTARY_LIMIT = 1 << 62


def max_step_tokens(sink_tokens: int, window: int, block_size: int, rope_limit: int) -> int:
    """The largest per-sequence step ``C`` with ``S + W + B + C <= P``."""
    return rope_limit - sink_tokens - window - block_size


@dataclass(frozen=True)
class SinkGeometry:
    """Every number the policy derives from the settings and the engine, resolved once at
    start-up (``vllm_sink.patches.frontend.engine_args``), carried to every process in the engine's
    config and by the KV-cache spec, and read by the scheduler's manager, the worker and the
    metrics alike.

    ``block_size`` (``B``), ``sink_tokens`` (``S``), ``kv_window`` (``W``): the settings.
    ``step_tokens`` (``C``): the most tokens of one sequence computed in one step.
    ``concurrent_steps``: steps of one sequence scheduled before the earliest has settled
    (1; 2 with asynchronous scheduling): the manager frees pages on settled tokens.
    ``rope_limit`` (``P``): rows of the model's rotary table; ``S + W + B + C <= P``
    (``NO_ROTARY_LIMIT`` for ALiBi models: no epochs).
    ``max_sink_tokens``: the largest sink a request may ask for (its own sink, e.g. its system
    prompt: :meth:`with_sink`); ``None``: ``sink_tokens``, the engine's sink for every
    request. The engine-wide bounds (:attr:`widest`) are those of the largest sink.
    """

    block_size: int
    sink_tokens: int
    kv_window: int
    step_tokens: int
    concurrent_steps: int
    rope_limit: int
    max_sink_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.sink_cap < self.sink_tokens:
            raise ValueError(f"max_sink_tokens {self.max_sink_tokens} is below the sink {self.sink_tokens}")
        if self.sink_cap + self.kv_window + self.block_size + self.step_tokens > self.rope_limit:
            raise ValueError(
                f"sink {self.sink_cap} + window {self.kv_window} + one page "
                f"{self.block_size} + one step {self.step_tokens} tokens exceed the "
                f"{self.rope_limit} rotary positions"
            )

    @property
    def sink_cap(self) -> int:
        """The largest sink of any request (``max_sink_tokens``, else ``sink_tokens``)."""
        return self.sink_tokens if self.max_sink_tokens is None else self.max_sink_tokens

    def with_sink(self, sink_tokens: int) -> "SinkGeometry":
        """This geometry for a request whose sink is ``sink_tokens`` tokens (``0 ..
        sink_cap``): every per-sequence rule of the policy then uses that sink."""
        if sink_tokens == self.sink_tokens:
            return self
        if not 0 <= sink_tokens <= self.sink_cap:
            raise ValueError(f"a sink of {sink_tokens} tokens is outside 0 .. {self.sink_cap}")
        return replace(self, sink_tokens=sink_tokens, max_sink_tokens=self.sink_cap)

    @property
    def widest(self) -> "SinkGeometry":
        """The geometry of the largest sink: the engine-wide page bounds."""
        return self.with_sink(self.sink_cap)

    @property
    def sink_pages(self) -> int:
        """``s``: pages holding the sink, the last one partly if ``partial_slots``."""
        return sink_page_count(self.sink_tokens, self.block_size)

    @property
    def partial_slots(self) -> int:
        """``r = S mod B``: sink slots of a partial last sink page (0: whole pages)."""
        return self.sink_tokens % self.block_size

    @property
    def in_flight_tokens(self) -> int:
        """Tokens of one sequence scheduled but not settled, at most."""
        return self.concurrent_steps * self.step_tokens

    def page_bound(self, in_flight: int) -> int:
        return page_bound(self.sink_pages, self.kv_window, self.block_size, in_flight)

    @property
    def max_live_pages(self) -> int:
        """Pages one running sequence may hold (prefill chunks in flight)."""
        return self.page_bound(self.in_flight_tokens)

    @property
    def decode_live_pages(self) -> int:
        """Pages one decoding sequence may hold (one token a step in flight)."""
        return self.page_bound(self.concurrent_steps)

    @property
    def row_capacity(self) -> int:
        """Pages a worker's block-table row may hold before it is compacted in a step:
        the live pages plus those allocated for the step in flight."""
        return self.max_live_pages + cdiv(self.in_flight_tokens, self.block_size) + 1

    def window_start(self, a: int) -> int:
        return window_start(a, self.sink_tokens, self.kv_window, self.block_size)

    def row_transition(self, first: int, w0: int) -> "RowTransition | None":
        return row_transition(first, w0, self.sink_tokens, self.block_size)

    def plan_step(self, a: int, b: int, state: "FrameState") -> "StepPlan":
        return plan_step(a, b, state, sink_tokens=self.sink_tokens, window=self.kv_window,
                         block_size=self.block_size, rope_limit=self.rope_limit)

    def plan_steps(self, a, b, base) -> "StepPlans":
        return plan_steps(a, b, base, sink_tokens=self.sink_tokens, window=self.kv_window,
                          block_size=self.block_size, rope_limit=self.rope_limit)

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def stream_plans(
    n_tokens: int, chunk: int, *, sink_tokens: int, window: int, block_size: int, rope_limit: int
) -> list[tuple[int, StepPlan]]:
    """``(a, plan)`` for every step of one stream of ``n_tokens`` computed ``chunk`` tokens a
    step from token 0 (the last step may be shorter), as the worker plans them."""
    state, plans = FrameState(), []
    for a in range(0, n_tokens, chunk):
        plan = plan_step(a, min(a + chunk, n_tokens), state, sink_tokens=sink_tokens,
                         window=window, block_size=block_size, rope_limit=rope_limit)
        apply_plan(state, plan)
        plans.append((a, plan))
    return plans


def step_phase(a: int, plan: StepPlan) -> tuple[int, int, int, int]:
    """What step ``[a, b)`` computes, relative to ``a``: window start, frame base, epoch shift
    and sink angle. Two steps with the same phase over the same tokens (and the same for the
    steps that wrote their visible keys) compute the same numbers: nothing about a step
    depends on how far into the stream it is."""
    return (plan.w0 - a, plan.base - a, plan.window_shift, plan.sink_angle)


def epoch_cycle(plans: list[tuple[int, StepPlan]]) -> int:
    """Tokens between epoch starts once the stream is steady (from the second epoch start on,
    epochs repeat with this period). Needs at least three epoch starts."""
    starts = [a for a, plan in plans if plan.window_shift]
    if len(starts) < 3:
        raise ValueError(f"{len(starts)} epoch starts: too few to measure the epoch cycle")
    gaps = {b - a for a, b in zip(starts[1:], starts[2:])}
    if len(gaps) != 1:
        raise ValueError(f"epoch starts are not periodic: gaps {sorted(gaps)}")
    return gaps.pop()
