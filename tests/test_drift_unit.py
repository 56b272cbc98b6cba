"""The drift benchmark's arithmetic (benchmarks/drift.py): the stream length that puts the
last window on the same text as the first, and the window statistics. No engine."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import drift  # noqa: E402


def test_last_window_is_the_same_text_as_the_first():
    for e, period, at_least in ((1040, 61105, 1_000_000), (64, 700, 5_000), (2048, 10_000, 12_000)):
        n = drift.stream_length(e, period, at_least, span=300)
        assert n >= at_least
        last_start = n - 300  # first token of the last window
        assert (last_start - e) % period == 0 and last_start > e
        # The smallest such length.
        assert n - period < at_least or n - period - 300 <= e


def test_compare_reads_the_windows_it_names():
    rng = np.random.default_rng(0)
    n, e, span = 5_000, 401, 1_000
    lp32 = rng.normal(-3, 1, n - 1)
    noise = rng.normal(0, 0.01, n - 1)
    noise[-span:] *= 3  # a stream whose error grows at the end
    res = drift.compare(lp32 + noise, lp32, e, span=span)
    assert res["first"]["start"] == e and res["last"]["start"] == n - span
    assert abs(res["first"]["mean"] - 0.01 * np.sqrt(2 / np.pi)) < 1e-3
    assert 2.5 < res["last_over_first"] < 3.5 and not res["no_drift"]
    # Token by token: the growth is many standard errors away from zero.
    growth = res["paired"]
    assert growth["mean_diff"] > 10 * growth["sem"] > 0
    assert abs(growth["mean_diff"] - 0.02 * np.sqrt(2 / np.pi)) < 2e-3
    assert len(res["buckets"]) == (n - 1 - (e - 1)) // span
    # The same error in the last window as in the first: no drift, exactly at the bound.
    same, lp = noise.copy(), lp32.copy()
    same[-span:], lp[-span:] = noise[e - 1 : e - 1 + span], lp32[e - 1 : e - 1 + span]
    flat = drift.compare(lp + same, lp, e, span=span)
    assert flat["last_over_first"] == 1.0 and flat["no_drift"]
    assert flat["paired"]["mean_diff"] == 0.0 and flat["paired"]["correlation"] > 0.999


def test_every_loop_reports_the_same_text_window():
    rng = np.random.default_rng(1)
    e, period, span = 101, 700, 200
    n = drift.stream_length(e, period, 3_000, span=span)
    lp32 = rng.normal(-3, 1, n - 1)
    noise = np.abs(rng.normal(0, 0.01, n - 1))
    noise[e - 1 : e - 1 + span] = 0.001  # loop 0 is cleaner than every later loop
    res = drift.compare(lp32 + noise, lp32, e, span=span, period=period)
    starts = [w["start"] for w in res["loops"]]
    assert starts[0] == e and starts[-1] == res["last"]["start"]
    assert all(b - a == period for a, b in zip(starts, starts[1:]))
    assert res["loops"][-1]["mean"] == res["last"]["mean"]
    # Loop 0 differs from the rest (another trajectory), the loops after it do not: no drift.
    assert res["last_over_first"] > 5 and res["no_drift"] and 0.8 < res["last_over_loop1"] < 1.25
    assert res["steady_min"] <= res["loops"][-1]["mean"] <= res["steady_max"]
    # An error that grows loop after loop is drift, against loop 1 as against loop 0.
    grows = noise * np.linspace(1, 3, n - 1)
    res = drift.compare(lp32 + grows, lp32, e, span=span, period=period)
    assert not res["no_drift"] and res["last_over_loop1"] > 1.5


def test_loops_of_whole_epoch_cycles_put_the_last_window_in_phase():
    """The drift run's geometry (4 sink + W, 1,024-token steps, 8,192 rotary positions):
    the last window matches the windows of loops 1.. step by step, never loop 0 (which
    starts before the first epoch start)."""
    from vllm_sink.policy import epoch_cycle, stream_plans

    for window, cycle in ((1024, 6144), (1008, 7168)):
        g = dict(sink_tokens=4, window=window, block_size=16, rope_limit=8192)
        plans = stream_plans(4 * 8192, 1024, **g)
        assert epoch_cycle(plans) == cycle
        period = 61_105 // cycle * cycle
        e = next(a for a, plan in plans if plan.w0 > 4)
        n = drift.stream_length(e, period, 1_000_000)
        plans = stream_plans(n, 1024, **g)
        last = n - drift.SPAN
        assert drift.aligned(plans, e + period, last, drift.SPAN, window, 1024)
        assert drift.aligned(plans, e + 5 * period, last, drift.SPAN, window, 1024)
        assert not drift.aligned(plans, e, last, drift.SPAN, window, 1024)
        # A text period that is a whole number of steps but not of epoch cycles: out of phase.
        assert not drift.aligned(stream_plans(e + 3 * 59 * 1024 + drift.SPAN, 1024, **g),
                                 e + 59 * 1024, e + 3 * 59 * 1024, drift.SPAN, window, 1024)


def test_tokens_that_see_rerotated_keys():
    """``sees_rerotated`` against a direct simulation: every epoch start rotates the cached
    window keys ``[w0, a)`` once more; a query sees a re-rotated key if any window key it
    sees (``[w0, q]``, the sink excluded) has been rotated."""
    from vllm_sink.policy import stream_plans

    S, W, B, P, chunk, n = 4, 256, 16, 1024, 64, 6_000
    plans = stream_plans(n, chunk, sink_tokens=S, window=W, block_size=B, rope_limit=P)
    got = drift.sees_rerotated(plans, n)
    rotations = np.zeros(n, dtype=int)
    want = np.zeros(n, dtype=bool)
    for a, plan in plans:
        if plan.window_shift:
            rotations[plan.w0 : a] += 1
        for q in range(a, min(a + chunk, n)):
            want[q] = bool(rotations[max(plan.w0, S) : q + 1].any())
    assert np.array_equal(got, want)
    # Both kinds occur, and none before the first epoch start.
    first_epoch = next(a for a, plan in plans if plan.window_shift)
    assert not got[:first_epoch].any() and got.any() and (~got[first_epoch:]).any()
    # The split of a window's error: the two parts' means and sizes.
    err = np.where(got, 2.0, 1.0)
    split = drift.split_stats(err, got)
    assert split["fresh"] == dict(tokens=int((~got).sum()), mean=1.0)
    assert split["rerotated"] == dict(tokens=int(got.sum()), mean=2.0)
