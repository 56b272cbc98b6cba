"""Scheduler side: the engine core decides (which pages are evicted, which page becomes the
sink page, what is kept for a session) and ships each step's decisions to the workers.

Modules, each depending only on those listed before it (no cycle; nothing here imports
``patches.worker`` or ``patches.frontend``):

* ``stream``:       SinkStream, the manager's record of one request (no vLLM)
* ``channel``:      StepChannel, the step's decisions shipped on the SchedulerOutput as a
  ``vllm_sink.step_meta.StepMeta``: all the worker learns from the scheduler side
* ``request_tail``: hold_tail, a sink stream's Request keeps only the tail of its token ids
* ``free_queue``:   park, discard, take_back: kept pages in vLLM's queue of free pages
* ``copy_on_write``: CopyOnWrite, the manager's private copies of shared pages
* ``sessions``:     SchedulerSessions, kept streams resumed through vLLM's prefix-hit path;
  reaches the manager through its kept-stream interface (``sessions.PageOwner``)
* ``manager``:      StreamingSinkManager (registered for ``patches.spec.SinkWindowSpec``
  through vLLM's KVCacheSpecRegistry); builds its StepChannel and SchedulerSessions
* ``hooks``:        the wraps on KVCacheManager.allocate_slots/free/get_computed_blocks and
  Scheduler.schedule
"""

from __future__ import annotations


def install() -> None:
    from vllm_sink.patches.scheduler import hooks, manager

    manager.register()
    hooks.install()
