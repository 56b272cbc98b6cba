"""``vllm_sink.token_tail``: a sequence of which only the head and the last tokens are held,
checked against a plain list on random appends; released positions refuse to answer; the
digest of the released tokens equals the digest of the same tokens of a full sequence."""

from __future__ import annotations

import random

import pytest

from vllm_sink.token_tail import TokenTail, digest_of


@pytest.mark.parametrize("keep,head", [(1, 0), (16, 4), (100, 16), (7, 0)])
def test_matches_a_list_where_held(keep, head):
    rng = random.Random(keep * 31 + head)
    full = [rng.randrange(50_000) for _ in range(rng.randrange(0, 40))]
    t = TokenTail(full, keep=keep, head=head)
    for _ in range(300):
        if rng.random() < 0.7:
            x = rng.randrange(50_000)
            full.append(x)
            t.append(x)
        else:
            xs = [rng.randrange(50_000) for _ in range(rng.randrange(0, 3 * keep))]
            full.extend(xs)
            t.extend(xs)
        n = len(full)
        assert len(t) == n == len(t.head) + t.released + len(t.tail)
        assert len(t.tail) < 2 * keep
        assert len(t.tail) >= min(keep, n - len(t.head))  # at least the last ``keep`` are held
        assert t.head == full[:head]
        assert t.tail == full[t.tail_start:]
        assert t.released_digest() == digest_of(full[len(t.head):t.tail_start])
        if n:
            assert t[-1] == full[-1] and t[n - 1] == full[-1]
            i = rng.randrange(n)
            if i < len(t.head) or i >= t.tail_start:
                assert t[i] == full[i] and t[i - n] == full[i]
            else:
                with pytest.raises(IndexError, match="released"):
                    t[i]
            a = rng.randrange(n + 1)
            b = rng.randrange(a, n + 1)
            touches_released = a < t.tail_start and b > len(t.head) and t.released and a < b
            touches_released = touches_released and not (b <= len(t.head))
            if touches_released:
                with pytest.raises(IndexError):
                    t[a:b]
            else:
                assert t[a:b] == full[a:b]
        assert t.copy() == (full if not t.released else full[t.tail_start:])
        if t.released:
            with pytest.raises(IndexError):
                list(t)
        else:
            assert list(t) == full
    with pytest.raises(IndexError):
        t[len(full)]


def test_released_digest_tells_histories_apart():
    a = TokenTail(range(1000), keep=10, head=4)
    b = TokenTail(list(range(500)) + [7] + list(range(501, 1000)), keep=10, head=4)
    assert a.released and a.released == b.released and len(a) == len(b)
    assert a.released_digest() != b.released_digest()
    assert a.released_digest() == digest_of(list(range(4, a.tail_start)))


def test_deleting_reaches_only_held_last_tokens():
    t = TokenTail(range(100), keep=10, head=4)
    assert t.released
    with pytest.raises(IndexError, match="released"):
        del t[t.tail_start - 1:]
    with pytest.raises(IndexError, match="last tokens only"):
        del t[t.tail_start:len(t) - 1]
    del t[len(t) - 3:]
    assert len(t) == 97 and t[-1] == 96 and len(t) == len(t.head) + t.released + len(t.tail)
    u = TokenTail(range(6), keep=10, head=4)
    del u[2:]
    assert len(u) == 2 and list(u) == [0, 1]
    rng = random.Random(5)
    for keep, head in [(1, 0), (16, 4), (7, 2)]:
        full = [rng.randrange(50_000) for _ in range(rng.randrange(1, 200))]
        t = TokenTail(full, keep=keep, head=head)
        a = rng.randrange(t.tail_start if t.released else 0, len(full) + 1)
        del full[a:]
        del t[a:]
        assert len(t) == len(full) == len(t.head) + t.released + len(t.tail)
        assert t.head == full[:head] and t.tail == full[t.tail_start:]
        xs = [rng.randrange(50_000) for _ in range(3 * keep)]  # appending goes on as before
        full.extend(xs)
        t.extend(xs)
        assert t.tail == full[t.tail_start:] and t[-1] == full[-1]


def test_bad_arguments():
    with pytest.raises(ValueError):
        TokenTail(keep=0)
    with pytest.raises(ValueError):
        TokenTail(head=-1)
