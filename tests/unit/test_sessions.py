"""Kept streams (vllm_sink.sessions): the resume rule and the LRU index, without vLLM."""

import random

import pytest

from vllm_sink.policy import SinkGeometry, contract_positions
from vllm_sink.sessions import (
    DIVERGES_BEFORE_WINDOW,
    DIVERGES_IN_SINK,
    NO_MATCH,
    SHARED_PREFIX_ONLY,
    KeptStream,
    KeptStreams,
    common_prefix_len,
    history_match,
    resume_point,
)
from vllm_sink.token_tail import TokenTail


def geometry(S=16, W=64, B=16, C=32):
    return SinkGeometry(block_size=B, sink_tokens=S, kv_window=W, step_tokens=C, concurrent_steps=1,
                        rope_limit=4096)


def test_common_prefix_len():
    a = list(range(2000))
    assert common_prefix_len(a, a) == 2000
    assert common_prefix_len(a, a[:700]) == 700
    b = a[:1300] + [-1] + a[1301:]
    assert common_prefix_len(a, b) == 1300
    assert common_prefix_len(a, [5]) == 0 and common_prefix_len([], a) == 0


def run(g, n, chunk):
    """A stream of n tokens computed chunk tokens a step: its last step's start."""
    return max(range(0, n, chunk))


@pytest.mark.parametrize("S,B", [(16, 16), (4, 16), (0, 16), (20, 8)])
def test_a_resumed_step_sees_only_held_tokens(S, B):
    """Whatever the kept stream and the new prompt, a resumed step at ``a`` sees only tokens
    the kept stream still holds (the sink, and its window from its last window start on) or
    tokens it computes itself (``>= a``): never an evicted one."""
    g = geometry(S=S, B=B)
    rng = random.Random(S * 100 + B)
    resumed = 0
    for _ in range(400):
        n = rng.randrange(1, 600)
        tokens = [rng.randrange(1000) for _ in range(n)]
        computed = n - 1  # the last sampled token's KV is never computed
        if computed < 1:
            continue
        last = run(g, computed, rng.choice([1, 16, 32]))
        kept_w0 = g.window_start(last)
        # The next turn: the history (maybe edited somewhere) plus new tokens.
        prompt = list(tokens)
        if rng.random() < 0.5:
            prompt[rng.randrange(len(prompt))] = -1
        prompt += [rng.randrange(1000) for _ in range(rng.randrange(1, 50))]
        a, why = resume_point(g, tokens, computed, kept_w0, prompt)
        if not a:
            assert why in (NO_MATCH, DIVERGES_IN_SINK, DIVERGES_BEFORE_WINDOW, SHARED_PREFIX_ONLY)
            continue
        resumed += 1
        assert max(S, 1) <= a <= computed and a < len(prompt) and 2 * a >= computed
        assert prompt[:a] == tokens[:a]
        keys, _, _ = contract_positions(a, min(a + g.step_tokens, len(prompt)), S, g.kv_window, B)
        for t in keys:
            assert t < S or t >= a or t >= kept_w0, (t, a, kept_w0)
    assert resumed > 50


@pytest.mark.parametrize("S,B", [(16, 16), (4, 16), (0, 16)])
def test_a_history_held_as_a_tail_decides_the_same(S, B):
    """The engine core holds a long stream's history as a TokenTail (its sink as the head,
    its last row of tokens, the digest of the rest): every resume decision, and its reason,
    is the one the whole history gives, for prompts that repeat it, extend it, or diverge in
    the sink, in the released middle, or in the held tail."""
    g = geometry(S=S, B=B)
    keep = g.row_capacity * B
    rng = random.Random(S + B)
    outcomes = set()
    for _ in range(300):
        n = rng.randrange(2, 6 * keep)
        tokens = [rng.randrange(1000) for _ in range(n)]
        held = TokenTail(tokens, keep=keep, head=max(S, 1))
        computed = n - 1
        kept_w0 = g.window_start(run(g, computed, rng.choice([1, 16, 32])))
        prompt = list(tokens[: rng.randrange(1, n + 1)]) if rng.random() < 0.2 else list(tokens)
        if rng.random() < 0.6:
            prompt[rng.randrange(len(prompt))] = -1
        prompt += [rng.randrange(1000) for _ in range(rng.randrange(0, 40))]
        if not prompt:
            continue
        whole = resume_point(g, tokens, computed, kept_w0, prompt)
        assert resume_point(g, held, computed, kept_w0, prompt) == whole
        m = common_prefix_len(tokens, prompt)
        if not held.released or m >= held.tail_start:
            assert history_match(held, prompt) == m
        outcomes.add((held.released > 0, whole[1]))
    # Both kinds of history, and every outcome, were seen.
    assert {(True, ""), (True, DIVERGES_BEFORE_WINDOW), (False, "")} <= outcomes


def test_resume_point_reasons():
    g = geometry()
    tokens = list(range(1, 401))
    w0 = g.window_start(398)
    assert resume_point(g, tokens, 399, w0, tokens + [7, 8]) == (399, "")
    assert resume_point(g, tokens, 399, w0, [0] + tokens[1:]) == (0, DIVERGES_IN_SINK)
    edited = tokens[:100] + [0] + tokens[101:]
    assert resume_point(g, tokens, 399, w0, edited) == (0, DIVERGES_BEFORE_WINDOW)
    # An edit inside the last page: resume before it, in the same window.
    late = tokens[:390] + [0] + tokens[391:]
    assert resume_point(g, tokens, 399, w0, late) == (390, "")


def test_a_shared_system_prompt_does_not_take_another_conversation():
    """A new conversation sharing only its opening (a system prompt) with a kept one, whose
    window has not moved, does not resume it (that would hand the kept conversation's pages
    to the newcomer for the few tokens they share); an edited last message does."""
    g = geometry(W=256)
    system, history = list(range(1, 29)), list(range(1, 107))
    w0 = g.window_start(104)
    assert w0 == g.sink_tokens  # nothing evicted yet: the window check alone would allow it
    assert resume_point(g, history, 105, w0, system + [999] * 80) == (0, SHARED_PREFIX_ONLY)
    assert resume_point(g, history, 105, w0, history[:90] + [999] * 20) == (90, "")


def test_kept_streams_match_only_their_scope():
    """A stream kept for one LoRA adapter or cache salt resumes only requests of the same."""
    kept = KeptStreams(geometry(), max_pages=100)
    kept.keep(KeptStream("a", tuple(range(1, 301)), 299, 224, pages=6, scope=("adapter-x", None)))
    prompt = list(range(1, 301)) + [7]
    assert kept.best_match(prompt)[0] is None
    assert kept.best_match(prompt, ("adapter-x", "tenant-2"))[0] is None
    assert kept.best_match(prompt, ("adapter-x", None))[1] == 299


def test_kept_streams_lru_and_cap():
    g = geometry()
    kept = KeptStreams(g, max_pages=20)
    for i in range(3):
        assert kept.keep(KeptStream(f"s{i}", tuple(range(i, i + 300)), 299, 224, pages=6)) == []
    assert kept.pages == 18 and len(kept) == 3
    released = kept.keep(KeptStream("s3", tuple(range(3, 303)), 299, 224, pages=6))
    assert [s.key for s in released] == ["s0"] and kept.pages == 18
    assert kept.keys() == ["s1", "s2", "s3"]  # least recently used first
    assert [s.key for s in kept.keep(KeptStream("big", (1,), 0, 0, pages=21))] == ["big"]
    stream, a, why = kept.best_match(list(range(2, 302)) + [9])
    assert stream.key == "s2" and a == 299 and why == ""
    assert kept.take("s2").pages == 6 and kept.pages == 12 and "s2" not in kept
    assert kept.best_match([5000, 1]) == (None, 0, NO_MATCH)
    assert kept.release_lru().key == "s1" and kept.release_lru().key == "s3" and kept.release_lru() is None
    assert kept.pages == 0
