"""The per-step channel from the scheduler to the worker: the only thing the worker learns
from the scheduler side, besides vLLM's own ``SchedulerOutput``.

Binds to:
  vllm.v1.core.sched.output.SchedulerOutput: scheduled_new_reqs (read); carries the step's
    ``vllm_sink.step_meta.StepMeta`` as the attribute ``META_ATTR`` (set by ``ship``)
  vllm.v1.core.sched.output.NewRequestData: req_id, block_ids (a resumed or continued
    request's row is rewritten in place, compacted)

Through the step the scheduler side records its decisions here as it makes them (the
manager and ``sessions.SchedulerSessions``: kept, resumed, released streams); once the step
is scheduled, :meth:`StepChannel.take` adds what the step's new requests need (their own
sinks, a continued streaming-input session's row) and hands the whole as one ``StepMeta``,
which ``ship`` puts on the ``SchedulerOutput``. ``vllm_sink.step_meta`` says what each field
means to the worker.
"""

from __future__ import annotations

from collections.abc import Mapping

from vllm_sink.patches.scheduler.stream import SinkStream
from vllm_sink.policy import SinkGeometry
from vllm_sink.step_meta import META_ATTR, StepMeta


class StepChannel:
    """This step's decisions for the worker, collected as they are made.

    Invariant: a decision recorded during a step ships with that step's output, and only
    with it (``take`` starts the next step's ``StepMeta``).
    """

    def __init__(self, geometry: SinkGeometry, null_block_id: int) -> None:
        self.geometry = geometry  # the engine's (a request without a record has this one)
        self.null_block_id = null_block_id
        self.meta = StepMeta()

    def kept(self, request_id: str) -> None:
        """A finished request's state is kept under its id."""
        self.meta.kept.append(request_id)

    def released(self, key: str) -> None:
        """A kept stream's state is dropped."""
        self.meta.released.append(key)

    def resumed(self, request_id: str, key: str, first_live: int) -> None:
        """A new request takes kept stream ``key``'s state; its first window page is the
        logical page ``first_live``."""
        self.meta.resumed[request_id] = key
        self.meta.first_live[request_id] = first_live

    def copied(self, pairs: list[tuple[int, int]]) -> None:
        """Pages to copy before the step writes any: ``(old, new)`` page ids."""
        self.meta.copies.extend(pairs)

    def private(self, request_id: str, pairs: list[tuple[int, int]]) -> None:
        """``request_id``'s window moves for the first time: its row takes private copies of
        shared pages, ``(old, new)`` page ids."""
        self.copied(pairs)
        self.meta.private.setdefault(request_id, []).extend(pairs)

    def take(self, output, streams: Mapping[str, SinkStream]) -> StepMeta:
        """This step's decisions, once it is scheduled: the sinks of new requests whose sink
        is their own, continued sessions' rows, resumed requests' rows compacted."""
        meta, self.meta = self.meta, StepMeta()
        for new in output.scheduled_new_reqs:
            stream = streams.get(new.req_id)
            if stream is None:  # (the engine's sink, no row held before the step)
                continue
            if stream.geometry.sink_tokens != self.geometry.sink_tokens:
                meta.sink_tokens[new.req_id] = stream.geometry.sink_tokens
            held, stream.continuing = stream.continuing, None
            if held is not None:
                meta.continued[new.req_id] = self.continued_row(new, stream.geometry.sink_pages, *held)
        for new in output.scheduled_new_reqs:
            if new.req_id in meta.resumed:
                stream = streams.get(new.req_id)
                self.compact_resumed(new, (stream.geometry if stream is not None else self.geometry).sink_pages)
        return meta

    def continued_row(self, new, sink_pages: int, first_live: int, row: list[int]) -> int:
        """Ship a streaming-input session's next chunk with the row it held before this
        step (``row``: sink pages, then live pages from logical page ``first_live``) plus
        the pages allocated for the chunk; vLLM ships the manager's whole row, null pages
        included and this step's transition applied, which the worker applies itself."""
        ids = new.block_ids[0]
        added = ids[first_live + len(row) - sink_pages:]
        assert self.null_block_id not in added, (new.req_id, first_live, row, ids)
        ids[:] = row + added
        return first_live

    def compact_resumed(self, new, sink_pages: int) -> None:
        """Compact a resumed request's row (vLLM ships a new request's whole row, null pages
        included, which a sink row's block table has no room for: the worker's rows hold
        live pages only)."""
        ids = new.block_ids[0]
        ids[sink_pages:] = [b for b in ids[sink_pages:] if b != self.null_block_id]


def ship(output, meta: StepMeta) -> None:
    """Put ``meta`` on the step's ``SchedulerOutput`` (the worker reads it there)."""
    setattr(output, META_ATTR, meta)
