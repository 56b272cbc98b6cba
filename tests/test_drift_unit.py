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
    assert len(res["buckets"]) == (n - 1 - (e - 1)) // span
    # The same error in the last window as in the first: no drift, exactly at the bound.
    same, lp = noise.copy(), lp32.copy()
    same[-span:], lp[-span:] = noise[e - 1 : e - 1 + span], lp32[e - 1 : e - 1 + span]
    flat = drift.compare(lp + same, lp, e, span=span)
    assert flat["last_over_first"] == 1.0 and flat["no_drift"]
