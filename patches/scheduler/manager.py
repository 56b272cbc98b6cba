"""Our KV-cache spec and its manager, registered through vLLM's spec registry.

Binds to vLLM 0.26.0:
  vllm.v1.kv_cache_interface.FullAttentionSpec           (subclassed)
  vllm.v1.core.single_type_kv_cache_manager.FullAttentionManager (subclassed)
  vllm.v1.core.single_type_kv_cache_manager.register_all_kvcache_specs
  vllm.v1.kv_cache_spec_registry.KVCacheSpecRegistry.register
  vllm.v1.core.kv_cache_manager.KVCacheManager.allocate_slots (wrapped: tells our manager each
    request's prompt length, max length and progress, for admission)
  vllm.v1.request.RequestStatus.WAITING (a streaming-input session's next chunk is scheduled
    from the waiting queue while its request still holds its pages: it is admitted again)
  vllm.v1.request.Request: _all_token_ids, _output_token_ids and their ConstantList views
    all_token_ids, output_token_ids (replaced, for a sink stream, by ``TokenTail``s: read by
    vLLM's scheduler through len(), [-1], append/extend and copy() only), resumable,
    structured_output_request, sampling_params.repetition_detection
  vllm.v1.utils.ConstantList
  SingleTypeKVCacheManager: req_to_blocks (a sink stream's entry is a ``BlockRow``, read by
  vLLM through len(), [i], [a:b], extend, iteration and reversed()), _null_block,
  block_pool.free_blocks, _max_admission_blocks_per_request, remove_skipped_blocks,
  allocate_new_blocks, free

The spec is what makes a layer "sink-managed": workers hand it out instead of
``FullAttentionSpec`` (see ``patches.worker.guard``), and the engine core picks
:class:`StreamingSinkManager` for it through the registry. Importing this module registers
the pair, so unpickling the spec in the engine core is enough to make it resolvable.
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
from vllm_sink.patches.bindings import wrap_once
from vllm_sink.patches.spec import SinkWindowSpec
from vllm_sink.patches import refusals
from vllm_sink.step_meta import StepMeta
from vllm_sink.policy import SinkGeometry, cdiv, next_move_at
from vllm_sink.token_tail import TokenTail


class StreamingSinkManager(FullAttentionManager):
    """Pins each sequence's first ``sink_pages`` pages and frees every page that has
    left the window, at once.

    Invariants:
      * ``req_to_blocks[r][i]`` is the page of logical block ``i``; evicted blocks hold the
        null block (so the row is indexed by absolute block number, as vLLM expects). The
        row is a ``vllm_sink.block_row.BlockRow``: the evicted blocks, a run right after the
        sink, are a count, so it holds ``s + live`` entries however long the stream.
      * after ``remove_skipped_blocks(r, p)``, blocks ``[s, ceil(w0(p) / B))`` are null,
        where ``w0`` is ``vllm_sink.policy.window_start``. With a partial sink page
        (``S mod B > 0``), the page holding ``w0`` (its slots from ``w0`` on are the
        window's first tokens) moves to block ``s - 1`` as the new sink page and the old
        sink page is freed in its place, as the worker does (``patches.worker.runner``).
      * ``live[r]`` counts the non-null blocks of ``r``; it never exceeds
        ``geometry_of(r).max_live_pages``.
      * each request has one sink size for its whole life (``geometries[r]``: the engine's
        geometry with the request's own sink, ``vllm_sink.config.request_sink_tokens``),
        decided here when it is first allocated and shipped to the worker with the step
        that schedules it (``take_step_meta``).
      * no block is shared between requests (prefix caching is off), so
        ``get_num_common_prefix_blocks`` is 0 and cascade attention never runs.
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
    """

    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        kwargs["max_admission_blocks_per_request"] = kv_cache_spec.max_live_pages
        super().__init__(kv_cache_spec, **kwargs)
        refusals.check_context_parallel(self.dcp_world_size, self.pcp_world_size)
        self.geometry = kv_cache_spec.geometry
        self.geometries: dict[str, SinkGeometry] = {}  # request id -> its geometry (own sink)
        self.live: dict[str, int] = {}
        # request id -> footprint in pages (see the class invariants); unknown: the maximum.
        self.footprints: dict[str, int] = {}
        self.first_live_block: dict[str, int] = {}
        # request id -> processed tokens below which no page leaves its row (``next_move_at``
        # of its ``first_live_block``): the steps between two moves cost one lookup.
        self.move_at: dict[str, int] = {}
        # Requests whose footprint no longer changes -> their prompt length then (a
        # streaming-input session's prompt grows: its footprint changes again).
        self.settled: dict[str, int] = {}
        # Requests that hold pages and are scheduled again from the waiting queue (a
        # streaming-input session's next chunk): admitted again before they allocate.
        self.readmitting: set[str] = set()
        # Readmitted sessions -> (first window page, row of live page ids) before this
        # step's transition: what the worker holds, shipped with the step that schedules it.
        self.continuing_rows: dict[str, tuple[int, list[int]]] = {}
        self.check_rows = ROW_LOG.enabled()  # read once, not per allocation
        # Kept streams (finished streams held for resumption), if sessions are on.
        self.sessions = None
        if kv_cache_spec.kept_pages:
            from vllm_sink.patches.scheduler.sessions import SchedulerSessions

            self.sessions = SchedulerSessions(self, kv_cache_spec.kept_pages)
        self.meta = StepMeta()  # this step's decisions for the worker (``take_step_meta``)
        SINK_STATS.role = "engine"
        SINK_STATS.pool_pages = self.block_pool.num_gpu_blocks - 1
        SINK_STATS.max_live_pages_allowed = self.geometry.widest.max_live_pages
        self._publish(force=True)

    def _publish(self, force: bool) -> None:
        SINK_STATS.free_pages = self.block_pool.get_num_free_blocks()
        SINK_STATS.publish(force)

    def new_step_starts(self) -> None:
        super().new_step_starts()
        self._publish(force=False)

    def free(self, request_id: str) -> None:
        super().free(request_id)
        self._publish(force=True)

    def geometry_of(self, request_id: str) -> SinkGeometry:
        return self.geometries.get(request_id, self.geometry)

    def sink_geometry(self, request) -> SinkGeometry:
        """The geometry of ``request``'s own sink (``vllm_sink.config.request_sink_tokens``)."""
        params = getattr(request, "sampling_params", None)  # (None: a pooling request)
        return self.geometry.with_sink(request_sink_tokens(params.extra_args if params else None, self.geometry))

    def note_request(self, request) -> None:
        """Record the sink and footprint of ``request`` (called before each of its
        allocations)."""
        rid = request.request_id
        if rid in self.live and getattr(request, "status", None) == RequestStatus.WAITING:
            self.readmitting.add(rid)  # a streaming-input session's next chunk
            s = self.geometry_of(rid).sink_pages
            self.continuing_rows[rid] = (self.first_live_block.get(rid, s), self._held_ids(rid))
        if self.settled.get(rid) == request.num_prompt_tokens:  # decoding: its footprint is final
            return
        g = self.geometries.get(rid)
        if g is None:
            g = self.geometries[rid] = self.sink_geometry(request)
            hold_tail(request, g)
            if rid not in self.req_to_blocks:  # (before any page: vLLM extends it from here)
                self.req_to_blocks[rid] = BlockRow((), g.sink_pages, self._null_block)
        # Decoding, once the last prefill chunk has settled (frees lag the in-flight steps).
        decoding = request.num_computed_tokens >= request.num_prompt_tokens + g.concurrent_steps
        bound = g.decode_live_pages if decoding else g.max_live_pages
        whole = cdiv(request.num_prompt_tokens + request.max_tokens, self.block_size)
        self.footprints[rid] = min(bound, whole)
        if decoding:
            self.settled[rid] = request.num_prompt_tokens

    def outstanding_pages(self, exclude: str | None = None) -> int:
        """Pages admitted sequences (but ``exclude``) may still claim, up to their footprints."""
        widest = self.geometry.widest.max_live_pages
        return sum(
            max(0, self.footprints.get(rid, widest) - live)
            for rid, live in self.live.items()
            if rid != exclude
        )

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, *args, **kwargs):
        needed = super().get_num_blocks_to_allocate(
            request_id, num_tokens, new_computed_blocks, *args, **kwargs
        )
        held = self.live.get(request_id, 0)
        if request_id in self.live and request_id not in self.readmitting:
            return needed  # admitted and running: its reservation covers it
        footprint = self.footprints.get(request_id, self.geometry.widest.max_live_pages)
        # A resuming request adopts kept pages: they are part of its footprint, not new.
        adopted = self.sessions.pending_pages(request_id) if self.sessions is not None else 0
        # A readmitted streaming-input session already holds ``held`` of its footprint.
        total = max(needed, footprint - adopted - held) + self.outstanding_pages(exclude=request_id)
        if self.sessions is not None:
            self.sessions.release_for(total)  # kept streams give way to admission
        return total

    def add_local_computed_blocks(self, request_id, new_computed_blocks, num_local_computed_tokens,
                                  num_external_computed_tokens):
        """A resuming request adopts its kept stream's pages (``patches.scheduler.sessions``); with
        prefix caching off there are no other computed blocks."""
        if self.sessions is not None and request_id in self.sessions.pending:
            self.sessions.adopt(request_id, list(new_computed_blocks))
            return
        super().add_local_computed_blocks(request_id, new_computed_blocks, num_local_computed_tokens,
                                          num_external_computed_tokens)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        new_blocks = super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        self.readmitting.discard(request_id)  # admitted: its reservation covers it again
        if new_blocks or request_id not in self.live:  # (most decode steps allocate nothing)
            live = self.live.get(request_id, 0) + len(new_blocks)
            self.live[request_id] = live
            SINK_STATS.observe_live(request_id, live)
        return new_blocks

    def set_first_live(self, request_id: str, first: int) -> None:
        """The logical block at which ``request_id``'s window pages now start (its row
        moved, or it adopted a kept stream's row)."""
        self.first_live_block[request_id] = first
        self.move_at.pop(request_id, None)

    def remove_skipped_blocks(self, request_id, processed_computed_tokens, num_prompt_tokens=None):
        del num_prompt_tokens
        if processed_computed_tokens < self.move_at.get(request_id, 0):
            # No page leaves before ``next_move_at`` (asked once per move, not per step).
            if self.check_rows:
                ROW_LOG.record_manager(request_id, processed_computed_tokens, self._held_ids(request_id))
            return
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return
        g = self.geometry_of(request_id)
        s = g.sink_pages
        first = self.first_live_block.get(request_id, s)
        move = g.row_transition(first, g.window_start(processed_computed_tokens))
        if move is not None:
            # Blocks up to the window start hold settled tokens, so they are allocated.
            assert move.last <= len(blocks), (request_id, move, len(blocks))
            live = blocks[:s] + blocks[move.first :]
            row, leaving = move.apply(live, s)
            blocks[:s] = row[:s]
            for i in range(move.first, move.last):
                blocks[i] = self._null_block
            self.first_live_block[request_id] = first = move.last
            assert not any(blk.is_null for blk in leaving), "a page left the row twice"
            # Tail-first, like vLLM's own frees, so the oldest pages are reused last.
            self.block_pool.free_blocks(reversed(leaving))
            self.live[request_id] = self.live.get(request_id, 0) - len(leaving)
            SINK_STATS.observe_live(request_id, self.live[request_id])
            SINK_STATS.pages_evicted += len(leaving)
            SINK_STATS.tokens_evicted += len(leaving) * self.block_size
        self.move_at[request_id] = next_move_at(first, g.sink_tokens, g.kv_window, self.block_size)
        if self.check_rows:
            ROW_LOG.record_manager(request_id, processed_computed_tokens, self._held_ids(request_id))

    def _held_ids(self, request_id: str) -> list[int]:
        """Ids of the pages ``request_id`` holds (sink, then live), in logical order."""
        return [b.block_id for b in held_pages(self.req_to_blocks.get(request_id, ()))]

    def pop_blocks_for_free(self, request_id):
        self.live.pop(request_id, None)
        self.footprints.pop(request_id, None)
        self.first_live_block.pop(request_id, None)
        self.move_at.pop(request_id, None)
        self.geometries.pop(request_id, None)
        self.settled.pop(request_id, None)
        self.readmitting.discard(request_id)
        self.continuing_rows.pop(request_id, None)
        SINK_STATS.forget(request_id)
        return super().pop_blocks_for_free(request_id)

    def get_num_common_prefix_blocks(self, running_request_id: str) -> int:
        return 0

    def take_step_meta(self, output) -> StepMeta:
        """This step's decisions for the worker (kept, resumed, continued and released
        streams; the sinks of new requests whose sink is their own), taken once the step is
        scheduled."""
        meta, self.meta = self.meta, StepMeta()
        for new in output.scheduled_new_reqs:
            g = self.geometry_of(new.req_id)
            if g.sink_tokens != self.geometry.sink_tokens:
                meta.sink_tokens[new.req_id] = g.sink_tokens
            held = self.continuing_rows.pop(new.req_id, None)
            if held is not None:
                meta.continued[new.req_id] = self.continued_row(new, g.sink_pages, *held)
        if self.sessions is not None:
            self.sessions.compact_resumed(output, meta)
        return meta

    def continued_row(self, new, sink_pages: int, first_live: int, row: list[int]) -> int:
        """Ship a streaming-input session's next chunk with the row it held before this
        step (``row``: sink pages, then live pages from logical page ``first_live``) plus
        the pages allocated for the chunk; vLLM ships the manager's whole row, null pages
        included and this step's transition applied, which the worker applies itself."""
        ids = new.block_ids[0]
        added = ids[first_live + len(row) - sink_pages:]
        assert self._null_block.block_id not in added, (new.req_id, first_live, row, ids)
        ids[:] = row + added
        return first_live


def hold_tail(request, g: SinkGeometry) -> None:
    """Keep, of a sink stream's token ids in the engine core, what is still read: its sink,
    its last ``row_capacity * B`` tokens (what the worker's row holds; the stop checks read
    the last one) and the count and digest of the rest (``vllm_sink.token_tail``), so that
    the ``Request`` does not grow with the stream. Requests whose whole history vLLM reads
    keep their lists: streaming-input sessions (their chunks are spliced in by absolute
    position), structured outputs (a grammar may replay the history), prompt embeddings."""
    if (getattr(request, "resumable", False) or getattr(request, "structured_output_request", None) is not None
            or getattr(request, "prompt_token_ids", None) is None
            or type(getattr(request, "_all_token_ids", None)) is not list):  # (held already, or no Request)
        return
    from vllm.v1.utils import ConstantList

    keep = g.row_capacity * g.block_size
    repetition = getattr(request.sampling_params, "repetition_detection", None)
    if repetition is not None:  # reads the last max_pattern_size * min_count outputs
        keep = max(keep, repetition.max_pattern_size * repetition.min_count)
    request._all_token_ids = TokenTail(request._all_token_ids, keep=keep, head=max(g.sink_tokens, 1))
    request._output_token_ids = TokenTail(request._output_token_ids, keep=keep)
    request.all_token_ids = ConstantList(request._all_token_ids)
    request.output_token_ids = ConstantList(request._output_token_ids)


# The attribute of vLLM's KVCacheManager that caches its StreamingSinkManager (or None).
_SINK_MANAGER = "_vllm_sink_manager"


def sink_manager_of(kv_cache_manager) -> StreamingSinkManager | None:
    """The ``StreamingSinkManager`` of vLLM's ``KVCacheManager`` (``None``: the engine runs
    no sink policy), found once and kept on it: the wraps ask for every request on every
    step, and a manager's single-type managers never change."""
    manager = kv_cache_manager.__dict__.get(_SINK_MANAGER, False)
    if manager is False:
        manager = next((m for m in kv_cache_manager.coordinator.single_type_managers
                        if isinstance(m, StreamingSinkManager)), None)
        setattr(kv_cache_manager, _SINK_MANAGER, manager)
    return manager


def install_admission_hook() -> None:
    """Wrap ``KVCacheManager.allocate_slots`` (idempotent): before each allocation, our
    manager (if the engine has one) learns the request's footprint. Engines without the
    sink policy have no ``StreamingSinkManager`` and pass straight through."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    def make(orig):
        def allocate_slots(self, request, *args, **kwargs):
            manager = sink_manager_of(self)
            if manager is not None:
                manager.note_request(request)
            return orig(self, request, *args, **kwargs)
        return allocate_slots

    wrap_once(KVCacheManager, "allocate_slots", make)


def register() -> None:
    """Register the spec/manager pair (idempotent). The built-ins go first: registering
    into an empty registry would stop ``FullAttentionSpec`` from resolving."""
    register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(
        SinkWindowSpec, StreamingSinkManager, uniform_type_base_spec=FullAttentionSpec
    )


register()
