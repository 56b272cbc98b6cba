"""The scheduler side's wraps on vLLM: where the engine core calls into our manager, its
kept streams and the per-step channel.

Binds to (``vllm/v1/core``):
  KVCacheManager.allocate_slots(request, ...) wrapped: before each allocation the manager
                                              learns the request's sink and footprint
                                              (``StreamingSinkManager.note_request``)
  KVCacheManager.free(request)                wrapped: a sink stream that finished normally
                                              (stopped or length-capped) is kept, not freed
                                              (``SchedulerSessions.keep``)
  KVCacheManager.get_computed_blocks(request) wrapped: a waiting request whose prompt extends
                                              a kept stream's history gets its pages as
                                              computed blocks (vLLM's prefix-hit path;
                                              ``SchedulerSessions.lookup``)
  KVCacheManager.coordinator.single_type_managers, create_kv_cache_blocks
  Scheduler.schedule()                        wrapped: the step's decisions ride on the
                                              ``SchedulerOutput`` (``channel``)
  Scheduler.kv_cache_manager
  vllm.v1.request.RequestStatus.FINISHED_STOPPED / FINISHED_LENGTH_CAPPED

Every wrap passes straight through unless the engine runs the sink policy (its KV cache
manager has a ``StreamingSinkManager``) and, for ``free``/``get_computed_blocks``, keeps
sessions.
"""

from __future__ import annotations

from vllm_sink.patches.bindings import wrap_once
from vllm_sink.patches.scheduler.channel import ship
from vllm_sink.patches.scheduler.manager import StreamingSinkManager
from vllm_sink.patches.scheduler.sessions import SchedulerSessions

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


def _sessions_of(kv_cache_manager) -> SchedulerSessions | None:
    manager = sink_manager_of(kv_cache_manager)
    return None if manager is None else manager.sessions


def plain_prefill(output) -> None:
    """vLLM's V2 model runner reads a new request's tokens from ``prefill_token_ids``, which
    vLLM's scheduler sets to the request's own token list; a sink stream's is a
    ``TokenTail`` (``request_tail``), which holds its sink and last tokens only. A new sink
    stream's prefill is its prompt (vLLM preempts no sink stream, and streaming-input sessions
    keep their lists), so the runner gets the prompt's list."""
    for new in output.scheduled_new_reqs:
        ids = new.prefill_token_ids
        if ids is None or type(ids) is list:
            continue
        if new.prompt_token_ids is None or len(ids) != len(new.prompt_token_ids):
            raise RuntimeError(f"vllm-sink: request {new.req_id} is scheduled anew past its prompt "
                               f"({len(ids)} tokens, prompt {len(new.prompt_token_ids or ())})")
        new.prefill_token_ids = new.prompt_token_ids


def install() -> None:
    """Wrap ``KVCacheManager.allocate_slots``/``free``/``get_computed_blocks`` and
    ``Scheduler.schedule`` (idempotent)."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import RequestStatus

    keep_statuses = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)

    def allocate_slots(orig):
        def allocate_slots(self, request, *args, **kwargs):
            manager = sink_manager_of(self)
            if manager is not None:
                manager.note_request(request)
            return orig(self, request, *args, **kwargs)
        return allocate_slots

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
                ship(output, manager.take_step_meta(output))
                plain_prefill(output)
            return output
        return schedule

    wrap_once(KVCacheManager, "allocate_slots", allocate_slots)
    wrap_once(KVCacheManager, "free", free)
    wrap_once(KVCacheManager, "get_computed_blocks", get_computed_blocks)
    wrap_once(Scheduler, "schedule", schedule)
