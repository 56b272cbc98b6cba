"""The scheduler's record of one sink stream: everything ``StreamingSinkManager`` knows about
a request besides its row of pages (vLLM's ``req_to_blocks``).

Binds to nothing in vLLM (plain data; ``vllm_sink.policy.SinkGeometry`` for the numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_sink.policy import SinkGeometry


@dataclass(slots=True)
class SinkStream:
    """One request's sink, window and admission state, as the manager keeps it.

    Invariants (kept by ``patches.scheduler.manager.StreamingSinkManager``):
      * one record per request id that the manager has sized, allocated or handed a kept
        stream to; opened in one place (``StreamingSinkManager._open``) and dropped in one
        place (``StreamingSinkManager.pop_blocks_for_free``, which every free and every kept
        stream goes through);
      * ``geometry`` is fixed for the record's life: the engine's geometry with the
        request's own sink, decided when the request is first sized;
      * ``sink_pages <= first_live``; the row's blocks ``[sink_pages, first_live)`` have been
        evicted (null), and no page leaves the row while the processed tokens stay below
        ``move_at`` (0: not known yet, ask the policy);
      * ``admitted`` once the request holds pages (allocated or adopted), never reset;
        ``live`` then counts the row's non-null blocks and never exceeds
        ``geometry.max_live_pages``;
      * ``footprint`` is the pages admission reserves for the request (see the manager); it
        only shrinks while ``settled_prompt`` (the prompt length at which it reached the
        decode bound) matches the request's prompt;
      * ``readmitting``: an admitted streaming-input session whose next chunk waits to be
        admitted again; ``continuing`` its row (first window page, page ids) before that
        chunk's step, until the step that schedules the chunk ships it to the worker.
      * prefix caching: ``clean_until`` tokens were computed attending to every token
        before them (their steps' window start was the sink's end), so the full pages below
        it are functions of the token prefix alone and may be cached by hash; it is frozen
        at the first step whose window moved. ``private`` once the window first moved: from
        then on every page of the row is the request's alone and unhashed (the manager
        copied the pages others could find or hold, ``StreamingSinkManager._take_private``),
        so the worker may rewrite them (re-anchoring, epochs).
    """

    geometry: SinkGeometry
    first_live: int  # logical block of its first window page (the sink's page count at first)
    footprint: int  # pages reserved for it by admission
    live: int = 0  # non-null pages it holds
    admitted: bool = False  # holds pages (allocated or adopted)
    move_at: int = 0  # processed tokens below which no page leaves its row
    settled_prompt: int | None = None  # prompt length once its footprint is the decode bound
    readmitting: bool = False  # a waiting session's next chunk, to be admitted again
    continuing: tuple[int, list[int]] | None = None  # (first_live, page ids) before the chunk
    clean_until: int = 0  # tokens computed before any eviction (their full pages are cacheable)
    private: bool = False  # its window moved: its pages are its own, unhashed
    unowned: int = 0  # held pages found in the prefix cache, not yet its own copies
    step_start: int = 0  # the token its step being scheduled starts at (its computed tokens)
