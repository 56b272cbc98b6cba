"""Kept sink streams, scheduler side: keep a finished stream's pages, resume a request from them.

Binds to vLLM 0.26.0 (``vllm/v1/core``):
  KVCacheManager.free(request)                wrapped: a sink stream that finished normally
                                              (stopped or length-capped) is kept, not freed
  KVCacheManager.get_computed_blocks(request) wrapped: a waiting request whose prompt extends
                                              a kept stream's history gets its pages as
                                              computed blocks (vLLM's prefix-hit path)
  Scheduler.schedule()                        wrapped: the step's decisions ride on the
                                              ``SchedulerOutput`` (``vllm_sink.step_meta``)
  Request: request_id, status, _all_token_ids (a list, or our TokenTail), prompt_token_ids, num_computed_tokens,
    skip_reading_prefix_cache, prompt_embeds, lora_request, cache_salt; RequestStatus.FINISHED_STOPPED / FINISHED_LENGTH_CAPPED
  StreamingSinkManager (ours, ``kv_cache_spec``): add_local_computed_blocks (adoption),
    get_num_blocks_to_allocate (kept streams released under pool pressure)

The scheduler decides; the worker executes (``model_runner``): each step's
:class:`~vllm_sink.step_meta.StepMeta` says which finished requests were kept (the worker keeps their
frame state, pristine sink copies and row), which waiting requests resume which kept stream
(the worker hands that state to them) and which kept streams were released (the worker
drops their state). Every wrap passes through untouched unless the engine runs the sink
policy with sessions on. The rule for *where* a request resumes is
``vllm_sink.sessions.resume_point``.

Invariants: a kept stream's pages are allocated (ref count 1, owned by the kept stream) and
belong to no request; adopting hands them to exactly one request; releasing frees them; a
kept stream is released before any admitted stream could be starved (``release_for``).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.logger import init_logger

from vllm_sink.block_row import held_pages
from vllm_sink.metrics import SINK_STATS
from vllm_sink.patches.scheduler.manager import sink_manager_of
from vllm_sink.patches.bindings import wrap_once
from vllm_sink.policy import cdiv
from vllm_sink.sessions import KeptStream, KeptStreams
from vllm_sink.step_meta import META_ATTR
from vllm_sink.token_tail import TokenTail

logger = init_logger("vllm." + __name__)

@dataclass
class _Handle:
    blocks: list  # the manager's row (KVCacheBlock, null blocks for evicted pages)
    first_live: int  # its first window page's logical index


class SchedulerSessions:
    """The kept streams of one ``StreamingSinkManager`` and the step's decisions."""

    def __init__(self, manager, max_pages: int):
        self.manager = manager
        self.geometry = manager.geometry
        self.kept = KeptStreams(self.geometry, max_pages)
        # Waiting request id -> (kept stream id, resume token): found by get_computed_blocks,
        # adopted when the request is allocated in the same scheduling pass.
        self.pending: dict[str, tuple[str, int]] = {}

    @property
    def meta(self):
        """The step's decisions (the manager's ``StepMeta``)."""
        return self.manager.meta

    # ------------------------------------------------------------------ finish
    def keep(self, request) -> bool:
        """Keep a finished request's pages and state (``False``: nothing to keep)."""
        m, B = self.manager, self.geometry.block_size
        rid = request.request_id
        blocks = m.req_to_blocks.get(rid)
        computed = request.num_computed_tokens
        if not blocks or computed <= 0 or request.prompt_embeds is not None:
            return False  # (a prompt of embeddings has no token ids to match)
        g = m.geometry_of(rid)
        n = cdiv(computed, B)
        tail = [b for b in blocks[n:] if not b.is_null]  # slots of tokens never computed
        del blocks[n:]
        pages = len(held_pages(blocks))
        first_live = m.first_live_block.get(rid, g.sink_pages)
        m.pop_blocks_for_free(rid)  # the request's bookkeeping; its pages stay allocated
        if tail:
            m.block_pool.free_blocks(reversed(tail))
        history = request._all_token_ids  # a TokenTail once the stream is long: kept as it is
        stream = KeptStream(key=rid, tokens=history if isinstance(history, TokenTail) else tuple(history),
                            computed=computed,
                            window_start=g.window_start(computed - 1), pages=pages,
                            handle=_Handle(blocks, first_live), scope=_scope(request, g.sink_tokens),
                            sink_tokens=g.sink_tokens)
        self.meta.kept.append(rid)
        for released in self.kept.keep(stream):
            self._release(released)
            SINK_STATS.kept_released_over_cap += 1
        self._count()
        m._publish(force=True)  # as a freed request's pages are (the front end reads it)
        return True

    def _release(self, stream: KeptStream) -> None:
        self.manager.block_pool.free_blocks(reversed(held_pages(stream.handle.blocks)))
        self.meta.released.append(stream.key)
        self._count()

    def release_for(self, needed: int) -> None:
        """Release kept streams, least recently used first (never one a request is about to
        adopt), until ``needed`` pages are free or none is left to release."""
        pool = self.manager.block_pool
        adopting = {key for key, _ in self.pending.values()}
        while pool.get_num_free_blocks() < needed:
            stream = self.kept.release_lru(exclude=adopting)
            if stream is None:
                break
            self._release(stream)
            SINK_STATS.kept_released_for_pressure += 1

    # ------------------------------------------------------------------ resume
    def lookup(self, request) -> tuple[list, int] | None:
        """The kept pages and resume token for a waiting request, or ``None``."""
        if request.skip_reading_prefix_cache or not len(self.kept):
            return None
        sink = self.manager.sink_geometry(request).sink_tokens
        stream, a, why = self.kept.best_match(request.prompt_token_ids, _scope(request, sink))
        if stream is None:
            if why != "no_kept_stream":
                SINK_STATS.resume_fallbacks[why] = SINK_STATS.resume_fallbacks.get(why, 0) + 1
            return None
        self.pending[request.request_id] = (stream.key, a)
        return stream.handle.blocks[: cdiv(a, self.geometry.block_size)], a

    def pending_pages(self, request_id: str) -> int:
        """Pages a waiting request will adopt instead of allocating."""
        if request_id not in self.pending:
            return 0
        key, a = self.pending[request_id]
        stream = self.kept.get(key)
        if stream is None:
            return 0
        return sum(not b.is_null for b in stream.handle.blocks[: cdiv(a, self.geometry.block_size)])

    def adopt(self, request_id: str, blocks: list) -> None:
        """Hand the pending kept stream's pages to ``request_id`` (its row becomes
        ``blocks``, the kept row cut at the resume token); the rest are freed."""
        m = self.manager
        key, a = self.pending.pop(request_id)
        stream = self.kept.take(key)
        handle: _Handle = stream.handle
        rest = [b for b in handle.blocks[len(blocks):] if not b.is_null]
        if rest:
            m.block_pool.free_blocks(reversed(rest))
        m.req_to_blocks[request_id].extend(blocks)
        m.num_cached_block[request_id] = len(blocks)
        live = sum(not b.is_null for b in blocks)
        m.live[request_id] = live
        m.set_first_live(request_id, handle.first_live)
        SINK_STATS.observe_live(request_id, live)
        self.meta.resumed[request_id] = key
        self.meta.first_live[request_id] = handle.first_live
        SINK_STATS.resumes += 1
        SINK_STATS.tokens_reused += a
        self._count()

    def _count(self) -> None:
        SINK_STATS.kept_streams, SINK_STATS.kept_pages = len(self.kept), self.kept.pages

    def compact_resumed(self, output, meta) -> None:
        """Compact the rows of this step's resumed requests in ``output`` (vLLM ships a new
        request's whole row, null pages included, which a sink row's block table has no
        room for: the worker's rows hold live pages only)."""
        self.pending.clear()
        null = self.manager._null_block.block_id
        for new in output.scheduled_new_reqs:
            if new.req_id in meta.resumed:
                s = self.manager.geometry_of(new.req_id).sink_pages
                ids = new.block_ids[0]
                ids[s:] = [b for b in ids[s:] if b != null]


def _scope(request, sink_tokens: int) -> tuple:
    """What a request's KV depends on besides its token ids: its LoRA adapter and its cache
    salt (vLLM's prefix cache hashes both in, for the same reasons), and its sink size."""
    lora = request.lora_request
    return (lora.lora_name if lora is not None else None, request.cache_salt, sink_tokens)


def _sessions_of(kv_cache_manager) -> SchedulerSessions | None:
    manager = sink_manager_of(kv_cache_manager)
    return None if manager is None else manager.sessions


def install() -> None:
    """Wrap ``KVCacheManager.free``/``get_computed_blocks`` and ``Scheduler.schedule``
    (idempotent); engines without kept sessions pass straight through."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import RequestStatus

    keep_statuses = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)

    def free(orig):
        def free(self, request):
            sessions = _sessions_of(self)
            if sessions is not None and request.status in keep_statuses and sessions.keep(request):
                return
            return orig(self, request)
        return free

    def get_computed_blocks(orig):
        def get_computed_blocks(self, request):
            sessions = _sessions_of(self)
            hit = sessions.lookup(request) if sessions is not None else None
            if hit is None:
                return orig(self, request)
            blocks, a = hit
            return self.create_kv_cache_blocks((list(blocks),)), a, 0
        return get_computed_blocks

    def schedule(orig):
        def schedule(self, *args, **kwargs):
            output = orig(self, *args, **kwargs)
            manager = sink_manager_of(self.kv_cache_manager)
            if manager is not None:
                setattr(output, META_ATTR, manager.take_step_meta(output))
            return output
        return schedule

    wrap_once(KVCacheManager, "free", free)
    wrap_once(KVCacheManager, "get_computed_blocks", get_computed_blocks)
    wrap_once(Scheduler, "schedule", schedule)
