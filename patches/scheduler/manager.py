"""Our KV-cache manager for ``patches.spec.SinkWindowSpec``, registered through vLLM's spec
registry: the sink pages pinned, the pages that leave the window evicted at once, admission
by each stream's bounded footprint.

Binds to:
  vllm.v1.core.single_type_kv_cache_manager.FullAttentionManager (subclassed; overrides
    get_num_blocks_to_allocate, add_local_computed_blocks, allocate_new_blocks,
    remove_skipped_blocks, pop_blocks_for_free, free, new_step_starts,
    get_num_common_prefix_blocks (0.26.0: 0.32.0 removed cascade attention); reads req_to_blocks (a sink stream's entry is a
    ``BlockRow``, read by vLLM through len(), [i], [a:b], extend, iteration and reversed()),
    num_cached_block, block_pool.null_block/free_blocks/get_num_free_blocks/num_gpu_blocks/
    get_new_blocks (kept pages wait in its free queue: ``free_queue``),
    dcp_world_size, pcp_world_size; passes max_admission_blocks_per_request)
  vllm.v1.core.single_type_kv_cache_manager.register_all_kvcache_specs
  vllm.v1.kv_cache_spec_registry.KVCacheSpecRegistry.register
  vllm.v1.kv_cache_interface.FullAttentionSpec (the uniform base of our spec)
  vllm.v1.request.Request (``note_request``): request_id, status (RequestStatus.WAITING: a
    streaming-input session's next chunk is scheduled from the waiting queue while its
    request still holds its pages: it is admitted again), num_prompt_tokens, max_tokens,
    num_computed_tokens, sampling_params.extra_args (its token lists: ``request_tail``)

Workers hand the spec out instead of ``FullAttentionSpec`` (``patches.worker``), and the
engine core picks :class:`StreamingSinkManager` for it through the registry. Importing this
module registers the pair, so unpickling the spec in the engine core is enough to make it
resolvable. The wraps that call into the manager are ``patches.scheduler.hooks``.
"""

from __future__ import annotations

from vllm.v1.core.single_type_kv_cache_manager import (
    FullAttentionManager,
    register_all_kvcache_specs,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry
from vllm.v1.request import RequestStatus

from vllm_sink.block_row import BlockRow, held_pages
from vllm_sink.config import request_sink_tokens
from vllm_sink.invariants import ROW_LOG
from vllm_sink.metrics import SINK_STATS
from vllm_sink.patches import refusals
from vllm_sink.patches.scheduler import free_queue
from vllm_sink.patches.scheduler.channel import StepChannel
from vllm_sink.patches.scheduler.copy_on_write import CopyOnWrite
from vllm_sink.patches.scheduler.request_tail import hold_tail
from vllm_sink.patches.scheduler.sessions import SchedulerSessions
from vllm_sink.patches.scheduler.stream import SinkStream
from vllm_sink.patches.spec import SinkWindowSpec
from vllm_sink.policy import SinkGeometry, cdiv, next_move_at
from vllm_sink.step_meta import StepMeta


class StreamingSinkManager(CopyOnWrite, FullAttentionManager):
    """Pins each sequence's first ``sink_pages`` pages and evicts every page that has left
    the window, at once.

    Invariants:
      * ``req_to_blocks[r][i]`` is the page of logical block ``i``; evicted blocks hold the
        null block (so the row is indexed by absolute block number, as vLLM expects). The
        row is a ``vllm_sink.block_row.BlockRow``: the evicted blocks, a run right after the
        sink, are a count, so it holds ``s + live`` entries however long the stream.
      * ``streams[r]`` (a :class:`~vllm_sink.patches.scheduler.stream.SinkStream`) is all
        the manager knows of ``r`` besides its row: opened by ``_open`` (``note_request``,
        the first time ``r`` is allocated), dropped by ``pop_blocks_for_free`` only.
      * after ``remove_skipped_blocks(r, p)``, blocks ``[s, ceil(w0(p) / B))`` are null,
        where ``w0`` is ``vllm_sink.policy.window_start``. With a partial sink page
        (``S mod B > 0``), the page holding ``w0`` (its slots from ``w0`` on are the
        window's first tokens) moves to block ``s - 1`` as the new sink page and the old
        sink page is freed in its place, as the worker does (``patches.worker``).
      * ``streams[r].live`` counts the non-null blocks of ``r``; it never exceeds
        ``geometry_of(r).max_live_pages``.
      * each request has one sink size for its whole life (``streams[r].geometry``: the
        engine's geometry with the request's own sink,
        ``vllm_sink.config.request_sink_tokens``), decided here when it is first allocated
        and shipped to the worker with the step that schedules it (``channel``).
      * with prefix caching, pages are shared only as long as nobody writes them: a request
        caches (by hash) only the pages it computed before its window first moved
        (``cache_blocks``, ``SinkStream.clean_until``), and at the step its window first
        moves it replaces each page it keeps that others can find or hold by a private copy
        (``_take_private``); a resumed request copies a shared page it writes into
        (``attach``). ``get_num_common_prefix_blocks`` is 0: cascade attention never runs.
      * admission reserves each sequence's whole footprint: a request is admitted only if
        the free pages cover its footprint plus what every admitted sequence may still grow
        by (``footprint - live``). Admitted sequences can then always grow, so vLLM never
        preempts one (a preempted stream would be recomputed from token 0). A footprint is
        the contract's bound for the sequence's phase (prefill chunks in flight, or decode
        tokens), and never more than its whole length (prompt + max_tokens) needs; it only
        shrinks over a sequence's life, so reservations stay valid.
      * a streaming-input session (vLLM's ``StreamingInput``: one request id whose prompt
        grows by a chunk at a time) keeps its pages while it waits for input; its next chunk
        prefills again, so its footprint grows back to the prefill bound and the chunk is
        admitted like a new request (``readmitting``): only if the growth fits beside what
        every other admitted stream may still claim (otherwise it waits, holding its pages;
        nothing is preempted).

    Kept streams (``sessions``, a ``SchedulerSessions`` built here when the spec keeps
    pages) reach the manager through its kept-stream interface only
    (``sessions.PageOwner``): ``geometry``, ``sink_geometry``, ``in_prefix_cache``, ``detach``,
    ``attach``, ``park``, ``discard``, ``take_back``, ``publish``. The step's decisions for the worker go
    through ``channel`` (``channel.StepChannel``; ``take_step_meta``).
    """

    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        kwargs["max_admission_blocks_per_request"] = kv_cache_spec.max_live_pages
        super().__init__(kv_cache_spec, **kwargs)
        refusals.check_context_parallel(self.dcp_world_size, self.pcp_world_size)
        self.geometry = kv_cache_spec.geometry
        self.streams: dict[str, SinkStream] = {}  # request id -> its record
        self.check_rows = ROW_LOG.enabled()  # read once, not per allocation
        self.channel = StepChannel(self.geometry, self.block_pool.null_block.block_id)
        # Kept streams (finished streams held for resumption), if sessions are on.
        self.sessions = None
        if kv_cache_spec.kept_pages:
            self.sessions = SchedulerSessions(self, self.channel, kv_cache_spec.kept_pages)
        SINK_STATS.role = "engine"
        SINK_STATS.pool_pages = self.block_pool.num_gpu_blocks - 1
        SINK_STATS.max_live_pages_allowed = self.geometry.widest.max_live_pages
        self.publish()

    # ------------------------------------------------------------------ records
    def _open(self, request_id: str, geometry: SinkGeometry) -> SinkStream:
        """The one place a request's record is created (unknown footprint: the widest)."""
        stream = self.streams[request_id] = SinkStream(
            geometry, first_live=geometry.sink_pages, footprint=self.geometry.widest.max_live_pages)
        return stream

    def _stream(self, request_id: str) -> SinkStream:
        """``request_id``'s record, opened with the engine's geometry if it has none (a
        request allocated without ``note_request``, as when the manager is driven directly)."""
        stream = self.streams.get(request_id)
        return stream if stream is not None else self._open(request_id, self.geometry)

    def _hold(self, request_id: str, stream: SinkStream, live: int) -> None:
        """``request_id`` now holds ``live`` pages (and so is admitted)."""
        stream.live, stream.admitted = live, True
        SINK_STATS.observe_live(request_id, live)

    def geometry_of(self, request_id: str) -> SinkGeometry:
        stream = self.streams.get(request_id)
        return self.geometry if stream is None else stream.geometry

    def sink_geometry(self, request) -> SinkGeometry:
        """The geometry of ``request``'s own sink (``vllm_sink.config.request_sink_tokens``)."""
        params = getattr(request, "sampling_params", None)  # (None: a pooling request)
        return self.geometry.with_sink(request_sink_tokens(params.extra_args if params else None, self.geometry))

    # ------------------------------------------------------------------ admission
    def note_request(self, request) -> None:
        """Record the sink and footprint of ``request`` (called before each of its
        allocations)."""
        rid = request.request_id
        stream = self.streams.get(rid)
        if stream is None:
            stream = self._open(rid, self.sink_geometry(request))
            hold_tail(request, stream.geometry)
            if rid not in self.req_to_blocks:  # (before any page: vLLM extends it from here)
                self.req_to_blocks[rid] = BlockRow((), stream.geometry.sink_pages, self.block_pool.null_block)
        elif stream.admitted and getattr(request, "status", None) == RequestStatus.WAITING:
            stream.readmitting = True  # a streaming-input session's next chunk
            stream.continuing = (stream.first_live, self._held_ids(rid))
        stream.step_start = request.num_computed_tokens
        if stream.settled_prompt == request.num_prompt_tokens:  # decoding: its footprint is final
            return
        g = stream.geometry
        # Decoding, once the last prefill chunk has settled (frees lag the in-flight steps).
        decoding = request.num_computed_tokens >= request.num_prompt_tokens + g.concurrent_steps
        bound = g.decode_live_pages if decoding else g.max_live_pages
        whole = cdiv(request.num_prompt_tokens + request.max_tokens, self.block_size)
        stream.footprint = min(bound, whole)
        if decoding:
            stream.settled_prompt = request.num_prompt_tokens

    def outstanding_pages(self, exclude: str | None = None) -> int:
        """Pages admitted sequences (but ``exclude``) may still claim, up to their footprints."""
        return sum(
            max(0, stream.footprint - stream.live + stream.unowned)
            for rid, stream in self.streams.items()
            if stream.admitted and rid != exclude
        )

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, *args, **kwargs):
        needed = super().get_num_blocks_to_allocate(
            request_id, num_tokens, new_computed_blocks, *args, **kwargs
        )
        stream = self.streams.get(request_id)
        if stream is not None and stream.admitted and not stream.readmitting:
            return needed  # admitted and running: its reservation covers it
        footprint = self.geometry.widest.max_live_pages if stream is None else stream.footprint
        # A readmitted streaming-input session already holds ``held`` of its footprint. A
        # resuming request adopts kept pages: part of its footprint, not new, but taken out
        # of the free queue (where kept pages wait) all the same, so they count in full.
        held = 0 if stream is None else stream.live
        return max(needed, footprint - held) + self.outstanding_pages(exclude=request_id)

    # ------------------------------------------------------------------ pages
    def add_local_computed_blocks(self, request_id, new_computed_blocks, num_local_computed_tokens,
                                  num_external_computed_tokens):
        """A resuming request adopts its kept stream's pages (``sessions.SchedulerSessions.adopt``);
        other computed blocks are prefix-cache hits, held and shared until the window first
        moves."""
        if self.sessions is not None and self.sessions.is_pending(request_id):
            self.sessions.adopt(request_id, list(new_computed_blocks))
            return
        super().add_local_computed_blocks(request_id, new_computed_blocks, num_local_computed_tokens,
                                          num_external_computed_tokens)
        if new_computed_blocks:  # prefix-cache hits: held, shared until the window first moves
            stream = self._stream(request_id)
            stream.unowned += len(new_computed_blocks)
            stream.clean_until = max(stream.clean_until, num_local_computed_tokens)
            stream.step_start = num_local_computed_tokens
            self._hold(request_id, stream, stream.live + len(new_computed_blocks))

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        new_blocks = super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        if new_blocks and self.sessions is not None:
            self.sessions.reclaim(new_blocks)  # (a kept stream whose page was taken gives way)
        stream = self._stream(request_id)
        stream.readmitting = False  # admitted: its reservation covers it again
        if new_blocks or not stream.admitted:  # (most decode steps allocate nothing)
            self._hold(request_id, stream, stream.live + len(new_blocks))
        if not stream.private:
            g = stream.geometry
            w0 = g.window_start(stream.step_start)
            if w0 > g.sink_tokens:  # the step moves its window, for the first time
                move = g.row_transition(stream.first_live, w0)
                self._take_private(request_id, move)
                stream.private, stream.unowned = True, 0
                if self.check_rows and move is None:  # (its row moved at this count already)
                    ROW_LOG.record_manager(request_id, stream.step_start, self._held_ids(request_id))
        return new_blocks

    def remove_skipped_blocks(self, request_id, processed_computed_tokens, num_prompt_tokens=None):
        del num_prompt_tokens
        stream = self.streams.get(request_id)
        if stream is not None and processed_computed_tokens < stream.move_at:
            # No page leaves before ``next_move_at`` (asked once per move, not per step).
            if self.check_rows:
                ROW_LOG.record_manager(request_id, processed_computed_tokens, self._held_ids(request_id))
            return
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return
        stream = self._stream(request_id)
        g = stream.geometry
        s = g.sink_pages
        first = stream.first_live
        move = g.row_transition(first, g.window_start(processed_computed_tokens))
        if move is not None:
            # Blocks up to the window start hold settled tokens, so they are allocated.
            assert move.last <= len(blocks), (request_id, move, len(blocks))
            live = blocks[:s] + blocks[move.first :]
            row, leaving = move.apply(live, s)
            blocks[:s] = row[:s]
            for i in range(move.first, move.last):
                blocks[i] = self.block_pool.null_block
            stream.first_live = first = move.last
            assert not any(blk.is_null for blk in leaving), "a page left the row twice"
            # Tail-first, like vLLM's own frees, so the oldest pages are reused last.
            self.block_pool.free_blocks(reversed(leaving))
            self._hold(request_id, stream, stream.live - len(leaving))
            SINK_STATS.pages_evicted += len(leaving)
            SINK_STATS.tokens_evicted += len(leaving) * self.block_size
        stream.move_at = next_move_at(first, g.sink_tokens, g.kv_window, self.block_size)
        if self.check_rows:
            ROW_LOG.record_manager(request_id, processed_computed_tokens, self._held_ids(request_id))

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:
        """Cache (by hash) only the full pages a request computed before its window first
        moved: the tokens of a step whose window start is the sink's end attend to every
        token before them, as in vLLM without the policy (the contract), so those pages are
        functions of the token prefix alone. Later pages depend on what the window held."""
        stream = self.streams.get(request.request_id)
        if stream is None:
            return super().cache_blocks(request, num_tokens, *args, **kwargs)
        if not stream.private:  # (the step's window start is the sink's end)
            stream.clean_until = max(stream.clean_until, num_tokens)
        elif request._block_hasher is not None:
            # No page of it is cached from here: stop hashing its tokens (the hashes would
            # grow with the stream), and keep only the hashes of its cacheable pages.
            request._block_hasher = None
            del request.block_hashes[stream.clean_until // self.block_size:]
        super().cache_blocks(request, min(num_tokens, stream.clean_until), *args, **kwargs)

    def _held_ids(self, request_id: str) -> list[int]:
        """Ids of the pages ``request_id`` holds (sink, then live), in logical order."""
        return [b.block_id for b in held_pages(self.req_to_blocks.get(request_id, ()))]

    def pop_blocks_for_free(self, request_id):
        self.streams.pop(request_id, None)  # the one place a record is dropped
        SINK_STATS.forget(request_id)
        return super().pop_blocks_for_free(request_id)

    def free(self, request_id: str) -> None:
        super().free(request_id)
        self.publish()

    def new_step_starts(self) -> None:
        super().new_step_starts()
        self._publish(force=False)

    def get_num_common_prefix_blocks(self, running_request_id: str) -> int:
        return 0

    def take_step_meta(self, output) -> StepMeta:
        """This step's decisions for the worker (``channel.StepChannel.take``), taken once the
        step is scheduled."""
        meta = self.channel.take(output, self.streams)
        if self.sessions is not None:
            self.sessions.end_step()
        return meta

    # ------------------------------------------------------------------ kept-stream interface
    def in_prefix_cache(self, request_id: str) -> bool:
        stream = self.streams.get(request_id)
        return self.enable_caching and stream is not None and not stream.private

    def detach(self, request_id: str, computed: int) -> tuple[list, int, SinkGeometry] | None:
        """Take ``request_id``'s row away (``None``: it holds none, or a page another request
        can find or holds), cut after its ``computed`` tokens: the pages of tokens never
        computed go back to the pool, the rest stay allocated and pass to the caller with the
        row, each the row's alone. The request's record is dropped. Returns (row, logical
        index of its first window page, its geometry)."""
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return None
        n = cdiv(computed, self.block_size)
        if any(self._shared(b) for b in blocks[:n]):
            # Its window moved for the first time at its last step: the pages leaving at that
            # step are still in its row (the next step would free them), and they are the
            # prefix cache's (clean, hashed). Freed as vLLM frees it; its clean pages stay
            # cached, so its next turn finds most of its history by hash.
            return None
        stream = self._stream(request_id)
        tail = [b for b in blocks[n:] if not b.is_null]  # slots of tokens never computed
        del blocks[n:]
        self.pop_blocks_for_free(request_id)  # the request's bookkeeping; its pages stay allocated
        if tail:
            self.free_pages(tail)
        return blocks, stream.first_live, stream.geometry

    def attach(self, request_id: str, blocks: list, first_live: int, computed: int) -> None:
        """Give ``request_id`` (sized, holding nothing yet) the allocated row ``blocks``,
        whose first window page is the logical page ``first_live``, as its first ``computed``
        tokens. A row whose window has moved is the request's own (unhashed); one that never
        moved was computed before any eviction (its pages may be cached and shared)."""
        page = computed // self.block_size
        if computed % self.block_size and page < len(blocks) and self._shared(blocks[page]):
            # The request writes into the page holding its resume token (after it): a page
            # others can find or hold is replaced by a private copy first.
            blocks = list(blocks)
            self.channel.copied(self._copy_pages(blocks, [page]))
        self.req_to_blocks[request_id].extend(blocks)
        self.num_cached_block[request_id] = len(blocks)
        stream = self._stream(request_id)
        stream.first_live, stream.move_at = first_live, 0
        stream.step_start = computed
        stream.private = first_live > stream.geometry.sink_pages
        stream.clean_until = 0 if stream.private else computed
        self._hold(request_id, stream, sum(not b.is_null for b in blocks))

    def free_pages(self, pages: list) -> None:
        """Return ``pages`` (in row order) to the pool, tail first, as vLLM's frees do."""
        self.block_pool.free_blocks(reversed(pages))

    def park(self, pages: list) -> None:
        free_queue.park(self.block_pool, pages)

    def discard(self, pages: list) -> None:
        free_queue.discard(self.block_pool, pages)

    def take_back(self, pages: list) -> None:
        free_queue.take_back(self.block_pool, pages)

    def publish(self) -> None:
        """Publish the pool's counters now (the front end reads them)."""
        self._publish(force=True)

    def _publish(self, force: bool) -> None:
        # Free pages (vLLM's count, cached ones included) less the kept streams' parked ones.
        kept = self.sessions.held_pages() if self.sessions is not None else 0
        SINK_STATS.free_pages = self.block_pool.get_num_free_blocks() - kept
        SINK_STATS.publish(force)


def register() -> None:
    """Register the spec/manager pair (idempotent). The built-ins go first: registering
    into an empty registry would stop ``FullAttentionSpec`` from resolving."""
    register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(
        SinkWindowSpec, StreamingSinkManager, uniform_type_base_spec=FullAttentionSpec
    )


register()
