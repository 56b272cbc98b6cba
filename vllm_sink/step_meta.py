"""The scheduler's decisions of one step, shipped to the worker on the ``SchedulerOutput``.

The scheduler side decides and ships (``vllm_sink.patches.scheduler.channel``);
the worker (``vllm_sink.patches.worker.hook``) executes, in this order: ``kept`` (finished
request ids whose state is kept under the same id), ``resumed`` (new request id -> kept
stream id: the request takes that state), ``continued`` (a streaming-input session's next
chunk, scheduled as a new request under its own id: its state goes on), ``released`` (kept
stream ids whose state is dropped). A resumed or continued request's row is shipped
compacted (sink pages, then its held window pages, then the pages allocated for the step),
with the logical index of its first window page (``first_live``, ``continued``), as it was
before the step's own transition, which the worker applies as for any running stream.
``sink_tokens``: the sink of each new request of the step whose sink is its own
(not the engine's): the worker plans, compacts and re-anchors its row with that sink.
With prefix caching, pages other requests can find (cached by hash) or hold are never
written: ``copies`` are ``(old, new)`` page ids the worker copies (every layer's keys and
values) before the step writes any page; ``private``: a request whose window moves for the
first time this step, and the copies it takes (also in ``copies``): its row takes each new
page in place of the old one, after the step's row transition. (A resumed request's row is
shipped with its copy already in place.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The attribute of vLLM's SchedulerOutput that carries a step's StepMeta.
META_ATTR = "vllm_sink_step"


@dataclass
class StepMeta:
    kept: list[str] = field(default_factory=list)
    resumed: dict[str, str] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)
    # Resumed request id -> the logical index of its first window page (its row, as shipped
    # in ``NewRequestData.block_ids``, is compacted: sink pages, then held window pages).
    first_live: dict[str, int] = field(default_factory=dict)
    sink_tokens: dict[str, int] = field(default_factory=dict)
    # Continued streaming-input session id -> the logical index of its first window page.
    continued: dict[str, int] = field(default_factory=dict)
    # (shared page id, its private copy's page id), to copy first (copy on write).
    copies: list[tuple[int, int]] = field(default_factory=list)
    # Request id -> the copies its row takes at its first move.
    private: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.kept or self.resumed or self.released or self.sink_tokens or self.continued
                    or self.copies)
