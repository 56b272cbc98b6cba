"""A sequence of token ids of which only the last ones are held: what the engine core keeps of
a sink stream.

A sink stream's engine-core state must not grow with its length. vLLM's ``Request`` keeps
every token id (``_all_token_ids``, ``_output_token_ids``); for a sink stream the engine core
only still reads the last ones (the stop checks read the last token; the worker is sent at
most a row's worth, ``vllm_sink.token_rows``), the count of all of them, and, for a kept
stream that a later request may resume, whether a prompt repeats its history
(``vllm_sink.sessions``). :class:`TokenTail` keeps exactly that:

* ``len()`` counts every token appended; ``[i]`` and ``[a:b]`` take absolute positions and
  raise ``IndexError`` if they reach a released one (never a silent wrong answer); ``del
  t[a:]`` drops held last tokens;
  ``copy()`` gives the held tokens after the head; iterating all of it is refused once
  tokens were released;
* the first ``head`` tokens (a stream's sink) are held for good, the rest down to the last
  ``keep``; tokens are released in batches (when ``2 * keep`` are held past the head), so an
  append costs O(1) amortised;
* a digest of the released tokens (blake2b of their int64 bytes, updated as they leave):
  ``digest_of(tokens[:released_end])`` of a full sequence equals it exactly when the
  released tokens match.

Invariants: ``len(self) == head_len + released + len(tail)`` (kept as a count: the
scheduler asks on every step); after any append,
``len(tail) < 2 * keep`` (``keep`` >= 1); the held tokens are ``tokens[:head_len]`` and
``tokens[len(self) - len(tail):]``.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Sequence


def digest_of(tokens: Sequence[int]) -> bytes:
    """The digest :class:`TokenTail` keeps of its released tokens, for a full sequence."""
    h = hashlib.blake2b(digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class TokenTail:
    """Token ids of which the first ``head`` and the last ``keep`` (at least) are held."""

    __slots__ = ("head", "tail", "released", "keep", "_hash", "_n", "_cap")

    def __init__(self, tokens: Iterable[int] = (), keep: int = 1024, head: int = 0):
        if keep < 1 or head < 0:
            raise ValueError(f"keep must be >= 1 and head >= 0 (got {keep}, {head})")
        tokens = list(tokens)
        self.head: list[int] = tokens[:head]
        self.tail: list[int] = tokens[head:]
        self.released = 0
        self.keep = keep
        self._cap = 2 * keep  # the tail is trimmed when it holds this many
        self._n = len(tokens)  # len(self): read on every step by the scheduler, kept as a number
        self._hash = hashlib.blake2b(digest_size=16)
        self._trim()

    # ------------------------------------------------------------------ growing
    def append(self, token: int) -> None:
        tail = self.tail
        tail.append(token)
        self._n += 1
        if len(tail) >= self._cap:
            self._trim()

    def extend(self, tokens: Iterable[int]) -> None:
        tail = self.tail
        before = len(tail)
        tail.extend(tokens)
        self._n += len(tail) - before
        if len(tail) >= self._cap:
            self._trim()

    def _trim(self) -> None:
        if len(self.tail) < self._cap:
            return
        cut = len(self.tail) - self.keep
        self._hash.update(array("q", self.tail[:cut]).tobytes())
        del self.tail[:cut]
        self.released += cut

    # ------------------------------------------------------------------ reading
    @property
    def tail_start(self) -> int:
        """Absolute position of the first held token after the head."""
        return len(self.head) + self.released

    def released_digest(self) -> bytes:
        """Digest of the released tokens, ``tokens[len(head):tail_start]``."""
        return self._hash.copy().digest()

    def __len__(self) -> int:
        return self._n

    def _at(self, i: int) -> int:
        n = self._n
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"token {i} of {n}")
        if i < len(self.head):
            return self.head[i]
        if i < self.tail_start:
            raise IndexError(f"token {i} was released (held: the first {len(self.head)} and "
                             f"from {self.tail_start} of {n})")
        return self.tail[i - self.tail_start]

    def __getitem__(self, item):
        if not isinstance(item, slice):
            if -len(self.tail) <= item < 0:  # (the stop checks read the last token)
                return self.tail[item]
            return self._at(item)
        start, stop, step = item.indices(len(self))
        if step != 1:
            raise IndexError("a TokenTail slices with step 1 only")
        if stop <= start:
            return []
        if start < len(self.head):
            if stop <= len(self.head):
                return self.head[start:stop]
            return self.head[start:] + self[len(self.head):stop]
        self._at(start)  # raises if released
        return self.tail[start - self.tail_start : stop - self.tail_start]

    def __delitem__(self, item) -> None:
        """``del t[a:]``: drop the last tokens (vLLM's detokenizer drops the tokens generated
        after the one that completed a stop string); they must all be held."""
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise IndexError("a TokenTail deletes its last tokens only: del t[a:]")
        start, stop, _ = item.indices(self._n)
        if stop != self._n:
            raise IndexError(f"a TokenTail deletes its last tokens only (asked for [{start}:{stop}] of {self._n})")
        if start >= stop:
            return
        if start < self.tail_start:
            if self.released:
                raise IndexError(f"token {start} was released: only tokens from {self.tail_start} can be deleted")
            del self.head[start:]
            self.tail.clear()
        else:
            del self.tail[start - self.tail_start :]
        self._n = start

    def copy(self) -> list[int]:
        """The held tokens after the head (all of them while nothing was released)."""
        return (self.head + self.tail) if not self.released else list(self.tail)

    def __iter__(self):
        if self.released:
            raise IndexError(f"{self.released} tokens were released: iterate a slice of the held ones")
        yield from self.head
        yield from self.tail

    def __repr__(self) -> str:
        return (f"TokenTail(len={len(self)}, head={len(self.head)}, released={self.released}, "
                f"tail={len(self.tail)}, keep={self.keep})")
