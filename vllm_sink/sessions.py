"""Kept streams: resuming a sink stream from its held state (a chat's next turn).

A chat client re-sends the whole conversation every turn. With the sink policy the state a
finished stream leaves behind is small (its sink pages, its window pages, its frame state),
so it can be kept; a later request whose prompt extends the stream's token history then
prefills only what is new, from that state, exactly as if the stream had never stopped.

This module is the pure part, usable without vLLM:

* :func:`resume_point`: from which token a prompt can resume a kept stream *exactly*, or why
  it cannot (the decision; the engine's scheduler side carries it out);
* :class:`KeptStreams`: the index of kept streams, least recently used first, within a cap
  on the pages they may hold.

**The resume rule.** A kept stream computed the KV of ``tokens[:computed]``; its last step
started at a token whose window start was ``window_start``, so it holds the sink pages and
the pages from ``window_start``'s page on. A new prompt matching ``tokens`` for its first
``m`` tokens resumes at the largest ``a`` with

* ``a <= min(m, computed, len(prompt) - 1)``: only tokens the stream computed and the prompt
  repeats are reused, and at least one prompt token is computed (for its logits); ``a``
  may fall inside a page (the request adopts that page and fills the rest of it);
* ``a >= S`` past the sink (``a > 0`` for a window-only stream): the sink is complete;
* ``window_start(a) >= window_start``: the step at ``a`` sees only tokens the stream still
  holds (a window that would reach back into evicted pages cannot be served exactly);
* ``2 a >= computed``: the prompt reuses at least half of what the stream computed.
  Resuming hands the stream's pages to the request, so a new conversation that shares only
  a system prompt with a kept one must not take that conversation's state to save the few
  tokens they share (an edited last message, a regenerated reply reuse nearly all of it).

A kept stream resumes only for requests of its *scope*: what its KV depends on besides
the token ids (the LoRA adapter, the cache salt that keeps tenants apart).

Otherwise the request is prefilled from token 0 (a *fallback*, with its reason). A resumed
step is any other step of the stream: same positions, same eviction, same rotations.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from vllm_sink.policy import SinkGeometry
from vllm_sink.token_tail import TokenTail, digest_of

# Fallback reasons, as metrics labels.
NO_MATCH = "no_kept_stream"
DIVERGES_IN_SINK = "diverges_in_sink"
DIVERGES_BEFORE_WINDOW = "diverges_before_window"
SHARED_PREFIX_ONLY = "shared_prefix_only"


def common_prefix_len(a: Sequence[int], b: Sequence[int], chunk: int = 512) -> int:
    """Length of the longest common prefix of two token sequences (chunked slice compares:
    C-speed list equality over each chunk, a Python scan only inside the first chunk that
    differs)."""
    n = min(len(a), len(b))
    i = 0
    while i < n:
        j = min(i + chunk, n)
        if list(a[i:j]) != list(b[i:j]):
            while a[i] == b[i]:
                i += 1
            return i
        i = j
    return n


def history_match(tokens: Sequence[int] | TokenTail, prompt: Sequence[int]) -> int:
    """Length of the common prefix of a stream's history and ``prompt``. A history the engine
    core holds as a :class:`~vllm_sink.token_tail.TokenTail` (its head, the digest of the
    released tokens, its tail) gives the exact length whenever the prompt repeats the
    released tokens, and otherwise the length of the common prefix within its head, a lower
    bound that the resume rule turns into the same decision (the released tokens lie before
    the stream's last window, so no resume can reach past them)."""
    if not isinstance(tokens, TokenTail) or not tokens.released:
        return common_prefix_len(tokens, prompt)  # (a TokenTail that released nothing slices as a list)
    h, end = len(tokens.head), tokens.tail_start
    m = common_prefix_len(tokens.head, prompt)
    if m < h or len(prompt) < end or digest_of(prompt[h:end]) != tokens.released_digest():
        return m
    return end + common_prefix_len(tokens.tail, prompt[end:])


def resume_point(geometry: SinkGeometry, tokens: Sequence[int] | TokenTail, computed: int, window_start: int,
                 prompt: Sequence[int]) -> tuple[int, str]:
    """``(a, "")``: resume at token ``a`` (the rule in the module docstring), or ``(0, reason)``."""
    S = geometry.sink_tokens
    a = min(history_match(tokens, prompt), computed, len(prompt) - 1)
    if a < max(S, 1):
        return 0, DIVERGES_IN_SINK if a < S else NO_MATCH
    if geometry.window_start(a) < window_start:
        return 0, DIVERGES_BEFORE_WINDOW
    if 2 * a < computed:
        return 0, SHARED_PREFIX_ONLY
    return a, ""


@dataclass
class KeptStream:
    """A finished stream's state, held for resumption. ``tokens``: its token history (the
    KV of ``tokens[:computed]`` is held); ``window_start``: the window start of its last
    step; ``pages``: the KV pages it holds; ``handle``: what the engine needs to hand the
    state over (its page list, for instance); ``scope``: what its KV depends on besides the
    token ids (only a request of the same scope resumes it)."""

    key: str
    tokens: tuple[int, ...] | TokenTail  # (a TokenTail: the engine core released its middle)
    computed: int
    window_start: int
    pages: int
    handle: object = None
    scope: tuple = ()
    sink_tokens: int | None = None  # its own sink (None: the geometry's)


class KeptStreams:
    """Kept streams, least recently used first, holding at most ``max_pages`` pages.

    Invariants: ``pages`` is the sum of the kept streams' pages and never exceeds
    ``max_pages`` after :meth:`keep` returns; a stream is either kept here or was handed
    back by :meth:`keep` (over the cap), :meth:`take` or :meth:`release_lru` (its pages
    are the caller's to free)."""

    def __init__(self, geometry: SinkGeometry, max_pages: int):
        self.geometry = geometry
        self.max_pages = max_pages
        self.pages = 0
        self._kept: OrderedDict[str, KeptStream] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, key: str) -> bool:
        return key in self._kept

    def keep(self, stream: KeptStream) -> list[KeptStream]:
        """Keep ``stream`` (most recently used); return the streams released to stay within
        the cap (``stream`` itself if it alone is over it)."""
        if stream.pages > self.max_pages:
            return [stream]
        self._kept[stream.key] = stream
        self.pages += stream.pages
        released = []
        while self.pages > self.max_pages:
            released.append(self.release_lru())
        return released

    def best_match(self, prompt: Sequence[int], scope: tuple = ()) -> tuple[KeptStream | None, int, str]:
        """The kept stream of ``scope`` that ``prompt`` resumes furthest into:
        ``(stream, a, "")``, or ``(None, 0, reason)`` (the reason of the longest match)."""
        best: tuple[KeptStream | None, int, str] = (None, 0, NO_MATCH)
        best_match_len = 0
        for stream in self._kept.values():
            if stream.scope != scope or not prompt or not stream.tokens or stream.tokens[0] != prompt[0]:
                continue
            g = self.geometry if stream.sink_tokens is None else self.geometry.with_sink(stream.sink_tokens)
            a, why = resume_point(g, stream.tokens, stream.computed, stream.window_start, prompt)
            if a > best[1]:
                best = (stream, a, "")
            elif not best[1] and why != NO_MATCH:
                m = history_match(stream.tokens, prompt)
                if m > best_match_len:
                    best, best_match_len = (None, 0, why), m
        return best

    def get(self, key: str) -> KeptStream | None:
        return self._kept.get(key)

    def keys(self) -> list[str]:
        """The kept streams' keys, least recently used first."""
        return list(self._kept)

    def take(self, key: str) -> KeptStream:
        """Hand a kept stream over (to the request resuming it)."""
        stream = self._kept.pop(key)
        self.pages -= stream.pages
        return stream

    def release_lru(self) -> KeptStream | None:
        """Release the least recently used kept stream (``None`` if there is none)."""
        key = next(iter(self._kept), None)
        return None if key is None else self.take(key)
