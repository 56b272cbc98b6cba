"""The pure policy: window start, page bound, frame positions and epochs (no engine)."""

import random

import pytest

from vllm_sink.policy import (
    FrameState,
    apply_plan,
    cdiv,
    contract_positions,
    evicted_pages,
    live_pages,
    max_step_tokens,
    page_bound,
    epoch_cycle,
    plan_step,
    step_phase,
    stream_plans,
    window_start,
)


@pytest.mark.parametrize(
    "a,S,W,B,expected",
    [
        (0, 16, 256, 16, 16),  # nothing evicted yet: w0 = S
        (255, 16, 256, 16, 16),
        (256 + 16 + 15, 16, 256, 16, 32),  # first eviction: floor((287-255)/16)*16 = 32
        (1000, 16, 256, 16, 736),  # floor(745/16)*16 = 736
        (1000, 0, 256, 16, 736),
        (10, 0, 256, 16, 0),  # window only, before the window fills
        (5000, 64, 256, 32, 4736),
        # A sink of 4 tokens (partial page): w0 = 4 (mod 16).
        (0, 4, 256, 16, 4),
        (259, 4, 256, 16, 4),  # floor((259-255-4)/16)*16 + 4 = 4: nothing evicted yet
        (275, 4, 256, 16, 20),  # first eviction: tokens [4, 20) leave
        (1000, 4, 256, 16, 740),  # floor(741/16)*16 + 4
    ],
)
def test_window_start_matches_contract(a, S, W, B, expected):
    assert window_start(a, S, W, B) == expected


def test_window_start_properties():
    rng = random.Random(0)
    for _ in range(4000):
        B = rng.choice([1, 8, 16, 32, 128])
        S = rng.randint(0, 3 * B)
        W = B * rng.randint(max(cdiv(S, B), 1), 20)
        a = rng.randint(0, 50_000)
        w0 = window_start(a, S, W, B)
        assert w0 % B == S % B and S <= w0 <= max(a, S)
        # The window [w0, a] holds at least W tokens once it can (no token of the last
        # W is evicted) and fewer than W + B.
        if w0 > S:
            assert a - w0 + 1 >= W
            assert a - w0 + 1 < W + B
            # No token of the step lands in the page holding w0 (with a partial sink
            # page, that page becomes the sink page: its head is rewritten with the sink).
            assert a >= cdiv(w0, B) * B
        assert list(evicted_pages(a, S, W, B)) == list(range(cdiv(S, B), cdiv(w0, B)))


def test_page_bound_holds_for_every_step():
    """Live pages of a step never exceed the contract's s + ceil((W + C) / B) + 1."""
    rng = random.Random(1)
    for _ in range(500):
        B = rng.choice([16, 32])
        S = rng.choice([0, 1, 4, B, B + 3, 2 * B])
        s = cdiv(S, B)
        W = B * rng.randint(max(s, 1), 16)
        C = rng.randint(1, 200)
        a = 0
        while a < 3000:
            n = rng.randint(1, C)
            assert live_pages(a, a + n, S, W, B) <= page_bound(s, W, B, n)
            a += n


def test_contract_positions_example():
    keys, key_pos, q_pos = contract_positions(1000, 1001, 16, 256, 16)
    w0 = 736
    assert keys[:16] == list(range(16)) and keys[16] == w0 and keys[-1] == 1000
    assert key_pos[:16] == list(range(16)) and key_pos[16] == 16
    assert q_pos == [16 + 1000 - w0] and key_pos[-1] == q_pos[-1]


def _simulate(S, W, B, P, steps, seed=0, max_step=None):
    """Run plan_step over a random stream; yield (a, b, plan, state) after each step."""
    rng = random.Random(seed)
    state = FrameState()
    a = 0
    max_step = max_step or max_step_tokens(S, W, B, P)
    for _ in range(steps):
        n = rng.randint(1, max_step)
        plan = plan_step(a, a + n, state, sink_tokens=S, window=W, block_size=B, rope_limit=P)
        prev_base = state.base
        apply_plan(state, plan)
        yield a, a + n, plan, prev_base, state
        a += n


@pytest.mark.parametrize("S,B,W,P", [(16, 16, 256, 512), (64, 32, 256, 512), (0, 16, 128, 300), (16, 16, 4096, 8192), (4, 16, 256, 512), (20, 16, 128, 400)])
def test_frame_positions_realise_contract_distances(S, B, W, P):
    for a, b, plan, prev_base, state in _simulate(S, W, B, P, 400):
        w0 = plan.w0
        # Frame positions stay inside the rotary table.
        assert 0 <= a - plan.base and b - 1 - plan.base < P
        assert 0 <= plan.sink_angle < P
        # Query-to-key distances equal the contract's, for window and sink keys.
        for t in (a, b - 1):
            q_frame = t - plan.base
            q_contract = S + (t - w0)
            for p in (w0, (w0 + t) // 2, t):
                if p >= S:
                    assert q_frame - (p - plan.base) == q_contract - (S + p - w0)
            for j in range(0, S, max(1, S // 3)):
                sink_frame = j + plan.sink_angle  # pristine position j, rotated
                assert q_frame - sink_frame == q_contract - j
        # An epoch moves every cached window key by -(new base - old base).
        assert plan.window_shift == prev_base - plan.base
        # Compacted index of token t: t - slot_offset = S + t - w0.
        assert plan.slot_offset == w0 - S


def test_before_first_eviction_positions_are_vanilla():
    for a, b, plan, _, _ in _simulate(16, 256, 16, 8192, 30, seed=3):
        if window_start(a, 16, 256, 16) == 16:
            assert plan.base == 0 and plan.slot_offset == 0 and plan.sink_angle == 0


def test_epochs_are_rare_and_keys_rotated_at_most_once():
    """With P well above S + W + 2C every key is re-rotated at most once in its life."""
    S, B, W, P = 16, 16, 256, 2048
    last_epoch_at = None
    epochs = 0
    for a, b, plan, _, _ in _simulate(S, W, B, P, 2000, seed=5, max_step=64):
        if plan.window_shift:
            epochs += 1
            if last_epoch_at is not None:
                # Keys cached at the last epoch ([w0, a) then) have left the window.
                assert plan.w0 >= last_epoch_at
            last_epoch_at = a
    assert epochs > 3


def test_stream_plans_repeat_with_the_epoch_cycle():
    """Fixed-size steps: after the first epoch start the plans repeat, relative to each step's
    first token, every ``epoch_cycle`` tokens from the second epoch start; the first epoch
    (base 0) is longer."""
    S, W, B, P, C = 4, 1024, 16, 8192, 1024
    plans = stream_plans(40 * C + 7, C, sink_tokens=S, window=W, block_size=B, rope_limit=P)
    assert [a for a, _ in plans] == list(range(0, 40 * C + 7, C))
    state = FrameState()
    for a, plan in plans:  # the same plans as step-by-step planning
        assert plan == plan_step(a, min(a + C, 40 * C + 7), state, sink_tokens=S, window=W, block_size=B, rope_limit=P)
        apply_plan(state, plan)
    cycle = epoch_cycle(plans)
    starts = [a for a, plan in plans if plan.window_shift]
    assert cycle == 6 * C and starts[0] == 8 * C  # 8 steps at base 0, then 6 per epoch
    phase = {a: step_phase(a, plan) for a, plan in plans}
    assert all(phase[a] == phase[a + cycle] for a in phase if starts[1] <= a and a + cycle < 39 * C)
    assert phase[starts[0]] != phase[starts[1]]  # the first start shifts by more (from base 0)
    assert phase[2 * C] != phase[2 * C + cycle]  # the first epoch is not in the cycle
    with pytest.raises(ValueError, match="too few"):
        epoch_cycle(plans[:10])


def test_plan_refuses_step_larger_than_positions():
    with pytest.raises(ValueError, match="rotary positions"):
        plan_step(0, 600, FrameState(), sink_tokens=16, window=256, block_size=16, rope_limit=512)


def test_cdiv():
    assert cdiv(0, 16) == 0 and cdiv(1, 16) == 1 and cdiv(16, 16) == 1 and cdiv(17, 16) == 2


def test_policy_imports_without_vllm():
    """The policy (and the package) import where vLLM is absent: importing them installs
    nothing; vLLM loads the plugin through its entry point."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['vllm'] = None\n"  # any 'import vllm' now fails
        "import vllm_sink, vllm_sink.policy, vllm_sink.config, vllm_sink.metrics\n"
        "assert not [m for m in sys.modules if m.startswith('vllm.') or m.startswith('vllm_sink.patches')]\n"
        "print(vllm_sink.policy.window_start(1000, 4, 256, 16))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["740"]


@pytest.mark.parametrize("S,B", [(16, 16), (32, 16), (20, 16), (4, 16), (0, 16)])
def test_row_transition_matches_a_direct_simulation(S, B):
    """Pages are named by the logical block they were allocated for. After any sequence of
    window moves the row is: the sink's whole pages, then (partial sink) the page of the
    block holding w0, then the pages from ceil(w0 / B); every other page has left, once."""
    from vllm_sink.policy import row_transition, sink_page_count

    s, W = sink_page_count(S, B), 64
    allocated = 400 // B + 2
    row, first, gone = list(range(allocated)), s, []
    for a in range(0, 400, 7):
        w0 = window_start(a, S, W, B)
        move = row_transition(first, w0, S, B)
        if move is None:
            assert cdiv(w0, B) <= first
            continue
        assert (move.first, move.last, move.swap_sink) == (first, cdiv(w0, B), S % B != 0)
        row, leaving = move.apply(row, s)
        gone += leaving
        first = move.last
        last = cdiv(w0, B)
        sink = list(range(S // B)) + ([last - 1] if S % B else [])
        assert row == sink + list(range(last, allocated))
        assert len(leaving) == move.leaving
    assert first > s + 3  # the window moved many pages
    assert len(gone) == len(set(gone)) and not set(gone) & set(row)
    assert sorted(gone + row) == list(range(allocated))
    with pytest.raises(ValueError):
        row_transition(first, window_start(10_000, S, W, B), S, B).apply(row, s)


def test_geometry_resolves_every_bound_once():
    from vllm_sink.policy import SinkGeometry

    g = SinkGeometry(block_size=16, sink_tokens=20, kv_window=256, step_tokens=64, concurrent_steps=2, rope_limit=512)
    assert (g.sink_pages, g.partial_slots, g.in_flight_tokens) == (2, 4, 128)
    assert g.max_live_pages == 2 + cdiv(255 + 128, 16) + 1 == page_bound(2, 256, 16, 128)
    assert g.decode_live_pages == 2 + cdiv(255 + 2, 16) + 1
    # Never above the contract's s + ceil((W + C) / B) + 1.
    assert g.max_live_pages <= 2 + cdiv(256 + 128, 16) + 1
    assert g.window_start(1000) == window_start(1000, 20, 256, 16)
    assert SinkGeometry(**g.to_dict()) == g
    with pytest.raises(ValueError, match="exceed the 512 rotary positions"):
        SinkGeometry(block_size=16, sink_tokens=20, kv_window=256, step_tokens=300, concurrent_steps=1, rope_limit=512)


@pytest.mark.parametrize("S,B,W,P", [(16, 16, 64, 160), (4, 16, 64, 120), (0, 16, 48, 100), (20, 8, 40, 90)])
def test_plan_steps_equals_plan_step_row_by_row(S, B, W, P):
    """The worker's batched plan is the per-sequence plan, entry by entry, across epochs."""
    import random

    np = pytest.importorskip("numpy")
    from vllm_sink.policy import plan_steps

    rng = random.Random(S * 1000 + B)
    C = P - S - W - B
    states = [FrameState() for _ in range(40)]
    pos = [rng.randrange(0, 50) for _ in states]
    for _ in range(60):
        n = [rng.randrange(1, C + 1) for _ in states]
        a = np.array(pos)
        plans = plan_steps(a, a + np.array(n), np.array([st.base for st in states]),
                           sink_tokens=S, window=W, block_size=B, rope_limit=P)
        for i, st in enumerate(states):
            one = plan_step(pos[i], pos[i] + n[i], st, sink_tokens=S, window=W, block_size=B, rope_limit=P)
            assert plans[i] == one
            apply_plan(st, one)
            pos[i] += n[i]
    assert sum(st.epochs for st in states) > 0


@pytest.mark.parametrize("S,B,W,P", [(16, 16, 64, 160), (4, 16, 64, 120), (0, 16, 48, 100), (20, 8, 40, 90)])
@pytest.mark.parametrize("step", [1, 5])
def test_quiet_end_is_where_the_plan_first_changes(S, B, W, P, step):
    """Every step that ends by ``quiet_end`` of the last planned step plans exactly what that
    step planned (the worker skips planning it); for one-token steps (decoding), the first
    one past it changes the window start or starts an epoch: no step that could be skipped
    is planned."""
    from vllm_sink.policy import quiet_end

    state, a, planned, end, checked = FrameState(), 0, None, 0, {"quiet": 0, "edge": 0}
    while state.epochs < 3:
        b = a + step
        plan = plan_step(a, b, state, sink_tokens=S, window=W, block_size=B, rope_limit=P)
        if planned is not None and b <= end:
            assert (plan.w0, plan.base, plan.slot_offset, plan.sink_angle, plan.window_shift) == (
                planned.w0, planned.base, planned.slot_offset, planned.sink_angle, 0)
            checked["quiet"] += 1
        else:
            if planned is not None and step == 1:  # the first step past quiet_end
                assert plan.w0 != planned.w0 or plan.window_shift, (a, b, end)
                checked["edge"] += 1
            planned = plan
            end = int(quiet_end(plan.w0, plan.base, window=W, block_size=B, rope_limit=P))
        apply_plan(state, plan)
        a = b
    assert checked["quiet"] > 2 * checked["edge"]
    assert checked["edge"] > 10 if step == 1 else checked["quiet"] > 10


def test_plan_steps_refuses_like_plan_step():
    np = pytest.importorskip("numpy")
    from vllm_sink.policy import plan_steps

    with pytest.raises(ValueError, match="rotary positions"):
        plan_steps(np.array([0, 0]), np.array([10, 600]), np.array([0, 0]),
                   sink_tokens=16, window=256, block_size=16, rope_limit=512)


@pytest.mark.parametrize("S,B,W", [(16, 16, 64), (4, 16, 64), (0, 16, 48), (20, 8, 40), (33, 16, 17)])
def test_next_move_at_is_the_first_token_count_that_moves_pages(S, B, W):
    """For every row state ``first`` a stream passes through, no page leaves below
    ``next_move_at`` and pages leave at it (the manager skips the steps below it)."""
    from vllm_sink.policy import next_move_at, row_transition

    first, checked = cdiv(S, B), 0
    for a in range(0, 40 * B + W):
        move = row_transition(first, window_start(a, S, W, B), S, B)
        at = next_move_at(first, S, W, B)
        assert (move is not None) == (a >= at), (a, first, at)
        if move is not None:
            assert a == at  # met exactly when it is due: the previous token counts were below
            first, checked = move.last, checked + 1
    assert checked >= 30
