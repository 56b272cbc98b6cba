"""Scheduler side: the engine core decides (which pages leave, which page becomes the sink
page, what is kept for a session) and ships each step's decisions to the workers
(``vllm_sink.step_meta.StepMeta``).

* ``manager``:  StreamingSinkManager (registered for ``patches.spec.SinkWindowSpec`` through
  vLLM's KVCacheSpecRegistry) and the admission hook on KVCacheManager.allocate_slots
* ``sessions``: kept streams resumed through vLLM's prefix-hit path (KVCacheManager.free,
  get_computed_blocks, Scheduler.schedule)
"""

from __future__ import annotations


def install() -> None:
    from vllm_sink.patches.scheduler import manager, sessions

    manager.register()
    manager.install_admission_hook()
    sessions.install()
