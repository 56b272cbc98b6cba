"""Counters of the sink policy, kept in the process that does the work.

The engine core's manager counts evicted pages and the live pages of each sequence; the
worker counts epochs and sink re-anchorings. ``SINK_STATS`` is a process-local singleton:
with an in-process engine core (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) a script can read
the engine-side numbers directly; workers report theirs through ``collective_rpc``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SinkStats:
    pages_evicted: int = 0
    tokens_evicted: int = 0
    epochs: int = 0
    sink_rotations: int = 0
    pool_pages: int = 0
    max_live_pages_allowed: int = 0
    # Live pages per running request, and the peak seen per request over its life.
    live_pages: dict[str, int] = field(default_factory=dict)
    peak_live_pages: dict[str, int] = field(default_factory=dict)
    finished_peaks: dict[str, int] = field(default_factory=dict)

    def observe_live(self, request_id: str, live: int) -> None:
        self.live_pages[request_id] = live
        if live > self.peak_live_pages.get(request_id, 0):
            self.peak_live_pages[request_id] = live

    def forget(self, request_id: str) -> None:
        self.live_pages.pop(request_id, None)
        peak = self.peak_live_pages.pop(request_id, None)
        if peak is not None:
            self.finished_peaks[request_id] = peak
            if len(self.finished_peaks) > 10_000:  # keep memory bounded
                self.finished_peaks.pop(next(iter(self.finished_peaks)))

    def snapshot(self) -> dict:
        return {
            "pages_evicted": self.pages_evicted,
            "tokens_evicted": self.tokens_evicted,
            "epochs": self.epochs,
            "sink_rotations": self.sink_rotations,
            "pool_pages": self.pool_pages,
            "max_live_pages_allowed": self.max_live_pages_allowed,
            "running_live_pages": sum(self.live_pages.values()),
        }


SINK_STATS = SinkStats()
