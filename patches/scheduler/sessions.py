"""Kept sink streams, scheduler side: keep a finished stream's pages, resume a request from them.

Binds to (reads only; the wraps that call in here are ``patches.scheduler.hooks``):
  vllm.v1.request.Request: request_id, _all_token_ids (a list, or our TokenTail),
    prompt_token_ids, num_computed_tokens, skip_reading_prefix_cache, prompt_embeds,
    lora_request, cache_salt
  vllm.v1.core.kv_cache_utils.KVCacheBlock: is_null (the rows handed over by the owner)

:class:`SchedulerSessions` is the collaborator of one ``StreamingSinkManager``, which builds
it when sessions are on, and it reaches the manager only through :class:`PageOwner`, the
manager's kept-stream interface. The scheduler decides; the worker executes: each decision
goes to the worker through the step's ``channel.StepChannel`` (which finished requests were
kept, which waiting requests resume which kept stream, which kept streams were released).
The rule for *where* a request resumes is ``vllm_sink.sessions.resume_point``.

**One pool, one eviction order.** A kept stream's pages wait in vLLM's queue of free pages
beside the cached pages of finished requests (prefix caching), each placed at the
most-recently-used end when its stream finished: vLLM takes free pages from the
least-recently-used end, so kept streams and cached pages give way to new requests in one
least-recently-used order. When vLLM hands out a page of a kept stream, the stream is
released (``reclaim``): its other pages become plain free pages, reused first.

Invariants: a kept stream's pages have ref count 0, sit in the free queue, carry no hash
(a kept stream's window moved, so its pages are its own: never shared, never cached) and
belong to no request; ``owner_of`` maps each of them to its stream, and to nothing else;
adopting takes them out of the queue for exactly one request; admission counts them as
free, so a kept stream never keeps an admitted stream from growing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from vllm_sink.block_row import held_pages
from vllm_sink.metrics import SINK_STATS
from vllm_sink.patches.scheduler.channel import StepChannel
from vllm_sink.policy import SinkGeometry, cdiv
from vllm_sink.sessions import KeptStream, KeptStreams
from vllm_sink.token_tail import TokenTail


class PageOwner(Protocol):
    """What sessions need of the manager that owns the pages (``StreamingSinkManager``)."""

    geometry: SinkGeometry  # the engine's

    def sink_geometry(self, request) -> SinkGeometry:
        """The geometry ``request`` would get (its own sink)."""

    def in_prefix_cache(self, request_id: str) -> bool:
        """Whether prefix caching holds all ``request_id`` computed that another request
        could resume from: prefix caching is on and its window never moved, so its full
        pages are cached by hash and freeing it keeps them findable (as vanilla vLLM does)."""

    def detach(self, request_id: str, computed: int) -> tuple[list, int, SinkGeometry] | None:
        """Take ``request_id``'s row, cut after its ``computed`` tokens, away from the manager
        (its pages stay allocated, now the caller's alone): (row, first window page,
        geometry); ``None`` when it holds no page, or one that another request can find or
        holds (not kept: freed as vLLM frees it)."""

    def attach(self, request_id: str, blocks: list, first_live: int, computed: int) -> None:
        """Give ``request_id`` the row ``blocks`` (already allocated) as computed blocks, its
        first ``computed`` tokens."""

    def park(self, pages: list) -> None:
        """Put ``pages`` (allocated, held by nobody else) in the free queue at its
        most-recently-used end, their contents kept (a kept stream's pages)."""

    def discard(self, pages: list) -> None:
        """Move parked ``pages`` to the free queue's least-recently-used end (reused first)."""

    def take_back(self, pages: list) -> None:
        """Take parked ``pages`` out of the free queue (allocated again, ref count 1)."""

    def publish(self) -> None:
        """Publish the pool's counters now (the front end reads them)."""


@dataclass
class _Handle:
    blocks: list  # the manager's row (KVCacheBlock, null blocks for evicted pages)
    first_live: int  # its first window page's logical index


class SchedulerSessions:
    """The kept streams of one ``StreamingSinkManager``.

    Called by the manager: ``is_pending``, ``reclaim``, ``adopt``,
    ``end_step``; by the wraps (``patches.scheduler.hooks``): ``keep``, ``lookup``.
    """

    def __init__(self, owner: PageOwner, channel: StepChannel, max_pages: int):
        self.owner = owner
        self.channel = channel
        self.geometry = owner.geometry
        self.kept = KeptStreams(self.geometry, max_pages)
        # Waiting request id -> (kept stream id, resume token): found by get_computed_blocks,
        # adopted when the request is allocated in the same scheduling pass.
        self.pending: dict[str, tuple[str, int]] = {}
        # Page id -> the kept stream whose page it is (the pages parked in the free queue).
        self.owner_of: dict[int, str] = {}

    # ------------------------------------------------------------------ finish
    def keep(self, request) -> bool:
        """Keep a finished request's pages and state (``False``: nothing to keep, or nothing
        the prefix cache does not keep: a stream whose window never moved is freed as vLLM
        frees it, its full pages cached by hash, so prefix lookups find them)."""
        rid = request.request_id
        computed = request.num_computed_tokens
        if computed <= 0 or request.prompt_embeds is not None:
            return False  # (a prompt of embeddings has no token ids to match)
        if self.owner.in_prefix_cache(rid):
            return False  # (the next turn finds its pages by hash, as in vanilla vLLM)
        detached = self.owner.detach(rid, computed)
        if detached is None:
            return False
        blocks, first_live, g = detached
        history = request._all_token_ids  # a TokenTail once the stream is long: kept as it is
        stream = KeptStream(key=rid, tokens=history if isinstance(history, TokenTail) else tuple(history),
                            computed=computed,
                            window_start=g.window_start(computed - 1), pages=len(held_pages(blocks)),
                            handle=_Handle(blocks, first_live), scope=_scope(request, g.sink_tokens),
                            sink_tokens=g.sink_tokens)
        self.channel.kept(rid)
        pages = held_pages(blocks)
        self.owner.park(pages)  # free, at the most recently used end, their contents kept
        for b in pages:
            self.owner_of[b.block_id] = rid
        for released in self.kept.keep(stream):
            self._release(released)
            SINK_STATS.kept_released_over_cap += 1
        self._count()
        self.owner.publish()  # as a freed request's pages are (the front end reads it)
        return True

    def _release(self, stream: KeptStream) -> None:
        """Forget ``stream`` (taken out of ``kept``): its pages still in the free queue move
        to the front, to be reused first, as vLLM frees pages nobody can find."""
        pages = self._unpark(stream.handle)
        self.owner.discard([b for b in pages if b.ref_cnt == 0])
        self.channel.released(stream.key)
        self._count()

    def _unpark(self, handle: _Handle) -> list:
        """Drop a kept stream's pages from ``owner_of``; returns them."""
        pages = held_pages(handle.blocks)
        for b in pages:
            del self.owner_of[b.block_id]
        return pages

    def reclaim(self, blocks) -> None:
        """vLLM handed out ``blocks`` from the free queue: a kept stream one of them belongs
        to is released (the least recently used of what the queue held: the stream gives
        way, as a cached page does)."""
        if not self.owner_of:
            return
        for b in blocks:
            key = self.owner_of.get(b.block_id)
            if key is not None:
                self._release(self.kept.take(key))
                SINK_STATS.kept_released_for_pressure += 1

    def release_all(self) -> None:
        """Release every kept stream (its pages become plain free pages)."""
        for key in self.kept.keys():
            self._release(self.kept.take(key))
        self.owner.publish()

    # ------------------------------------------------------------------ resume
    def lookup(self, request) -> tuple[list, int] | None:
        """The kept pages and resume token for a waiting request, or ``None``."""
        if request.skip_reading_prefix_cache or not len(self.kept):
            return None
        sink = self.owner.sink_geometry(request).sink_tokens
        stream, a, why = self.kept.best_match(request.prompt_token_ids, _scope(request, sink))
        if stream is None:
            if why != "no_kept_stream":
                SINK_STATS.resume_fallbacks[why] = SINK_STATS.resume_fallbacks.get(why, 0) + 1
            return None
        self.pending[request.request_id] = (stream.key, a)
        return stream.handle.blocks[: cdiv(a, self.geometry.block_size)], a

    def is_pending(self, request_id: str) -> bool:
        """Whether ``request_id`` resumes a kept stream in this scheduling pass."""
        return request_id in self.pending

    def adopt(self, request_id: str, blocks: list) -> None:
        """Hand the pending kept stream's pages to ``request_id`` (its row becomes
        ``blocks``, the kept row cut at the resume token); the rest are freed."""
        key, a = self.pending.pop(request_id)
        handle: _Handle = self.kept.take(key).handle
        self._unpark(handle)
        self.owner.take_back(held_pages(blocks))
        rest = [b for b in handle.blocks[len(blocks):] if not b.is_null]
        if rest:
            self.owner.discard(rest)
        self.owner.attach(request_id, blocks, handle.first_live, a)
        self.channel.resumed(request_id, key, handle.first_live)
        SINK_STATS.resumes += 1
        SINK_STATS.tokens_reused += a
        self._count()

    def end_step(self) -> None:
        """The step is scheduled: lookups not adopted in it are dropped."""
        self.pending.clear()

    def held_pages(self) -> int:
        """The pages the kept streams hold (parked in the free queue; each is one stream's)."""
        return len(self.owner_of)

    def _count(self) -> None:
        SINK_STATS.kept_streams, SINK_STATS.kept_pages = len(self.kept), self.held_pages()


def _scope(request, sink_tokens: int) -> tuple:
    """What a request's KV depends on besides its token ids: its LoRA adapter and its cache
    salt (vLLM's prefix cache hashes both in, for the same reasons), and its sink size."""
    lora = request.lora_request
    return (lora.lora_name if lora is not None else None, request.cache_salt, sink_tokens)
