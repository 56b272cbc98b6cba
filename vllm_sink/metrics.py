"""Counters of the sink policy, and their export to Prometheus.

Each vLLM process counts what it does: the engine core's manager counts evicted pages and
the pages each sequence holds; the worker counts epochs and sink re-anchorings.
``SINK_STATS`` is the process-local singleton (with an in-process engine core,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, a script reads the engine-side numbers directly).

For ``/metrics``, each process publishes a JSON snapshot of its counters into a directory
named by ``VLLMSINK_METRICS_DIR`` (not ``VLLM_*``, which vLLM warns about as unknown;
made by the front end when the sink policy is
configured, inherited by the processes it spawns), and the API server's
:class:`SinkCollector` adds them up at every scrape. This needs no change to vLLM's own
metrics. (With several API servers, vLLM serves ``/metrics`` from Prometheus's multiprocess
files, and the first API server copies the sums into them: ``patches/frontend/metrics.py``.)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

METRICS_DIR_ENV = "VLLMSINK_METRICS_DIR"
PUBLISH_INTERVAL_S = 1.0  # (a snapshot is a file write: kept off most steps)

COUNTERS = {
    "pages_evicted": "KV pages freed because they left the window.",
    "tokens_evicted": "Tokens whose KV was freed because they left the window.",
    "epochs": "Epochs started: the window's cached keys re-rotated once to a new position base.",
    "sink_rotations": "Sink re-anchorings: sink keys rewritten from their pristine copy.",
    "pages_copied": "Pages a stream copied for itself when its window first moved, because other "
    "requests could find them in the prefix cache or held them (copy on write).",
    "session_resumes": "Requests that resumed a kept stream (kv_sessions): only their new tokens were prefilled.",
    "session_tokens_reused": "Prompt tokens not prefilled again because a kept stream held them.",
    "sessions_released_under_pressure": "Kept streams released so that a new request could be admitted.",
    "sessions_released_over_cap": "Kept streams released to keep kept streams within kv_session_pages.",
}
# Counters with a ``reason`` label: snapshot keys ``<name>:<reason>``.
LABELLED_COUNTERS = {
    "session_fallbacks": "Requests that matched a kept stream but could not resume it exactly "
    "(prefilled from token 0), by reason.",
}
GAUGES = {
    "running_kv_pages": "KV pages held by running sequences (sink policy).",
    "free_kv_pages": "Free pages in the KV pool.",
    "kv_pool_pages": "Pages in the KV pool.",
    "max_pages_per_sequence": "The bound on pages one sequence holds (s + ceil((W-1+C)/B) + 1, C its tokens in flight).",
    "kept_sessions": "Finished streams kept for resumption (kv_sessions).",
    "kept_session_pages": "KV pages held by kept streams.",
}


@dataclass
class SinkStats:
    role: str = "process"
    pages_evicted: int = 0
    tokens_evicted: int = 0
    epochs: int = 0
    sink_rotations: int = 0
    pages_copied: int = 0
    pool_pages: int = 0
    free_pages: int | None = None
    max_live_pages_allowed: int = 0
    # Kept sessions (engine side): resumes, tokens not prefilled again, fallbacks by
    # reason, kept streams and their pages, releases under pool pressure.
    resumes: int = 0
    tokens_reused: int = 0
    resume_fallbacks: dict[str, int] = field(default_factory=dict)
    kept_streams: int = 0
    kept_pages: int = 0
    kept_released_for_pressure: int = 0
    kept_released_over_cap: int = 0
    # Live pages per running request, and the peak seen per request over its life.
    live_pages: dict[str, int] = field(default_factory=dict)
    peak_live_pages: dict[str, int] = field(default_factory=dict)
    finished_peaks: dict[str, int] = field(default_factory=dict)
    _last_publish: float = 0.0

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
        snap = {
            "pages_evicted": self.pages_evicted,
            "tokens_evicted": self.tokens_evicted,
            "epochs": self.epochs,
            "sink_rotations": self.sink_rotations,
            "pages_copied": self.pages_copied,
            "running_kv_pages": sum(self.live_pages.values()),
        }
        if self.role == "engine":
            snap.update(
                kv_pool_pages=self.pool_pages,
                free_kv_pages=self.free_pages,
                max_pages_per_sequence=self.max_live_pages_allowed,
                session_resumes=self.resumes,
                session_tokens_reused=self.tokens_reused,
                sessions_released_under_pressure=self.kept_released_for_pressure,
                sessions_released_over_cap=self.kept_released_over_cap,
                kept_sessions=self.kept_streams,
                kept_session_pages=self.kept_pages,
            )
            for reason, n in self.resume_fallbacks.items():
                snap[f"session_fallbacks:{reason}"] = n
        return snap

    def publish(self, force: bool = False) -> None:
        """Write the snapshot for the API server (throttled unless ``force``)."""
        now = time.monotonic()  # (called every step: the clock first, the environment after)
        if not force and now - self._last_publish < PUBLISH_INTERVAL_S:
            return
        self._last_publish = now
        directory = os.environ.get(METRICS_DIR_ENV)
        if not directory:
            return
        path = Path(directory) / f"{self.role}-{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot()))
            tmp.replace(path)
        except OSError:  # the directory went away with the server; nothing to report to
            pass


SINK_STATS = SinkStats()


# Gauges that bound one sequence, the same in every engine: the largest, not the sum.
PER_SEQUENCE_GAUGES = frozenset({"max_pages_per_sequence"})


def read_published(directory: str | os.PathLike) -> dict:
    """Add up the snapshots of every process: counters and pool gauges are summed (over the
    engines of ``--data-parallel-size N`` too), a per-sequence bound is the largest."""
    total: dict[str, float] = {}
    for path in Path(directory).glob("*.json"):
        try:
            snap = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for key, value in snap.items():
            if value is not None:
                if key in PER_SEQUENCE_GAUGES:
                    total[key] = max(total.get(key, value), value)
                else:
                    total[key] = total.get(key, 0) + value
    return total


class SinkCollector:
    """Prometheus collector for the API server: ``vllm_sink:*`` series from the published
    snapshots."""

    def __init__(self, directory: str | os.PathLike, labels: dict[str, str] | None = None):
        self.directory = directory
        self.labels = labels or {}

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        values = read_published(self.directory)
        names, label_values = list(self.labels), list(self.labels.values())
        for key, doc in COUNTERS.items():
            family = CounterMetricFamily(f"vllm_sink:{key}", doc, labels=names)
            family.add_metric(label_values, values.get(key, 0))
            yield family
        for key, doc in LABELLED_COUNTERS.items():
            family = CounterMetricFamily(f"vllm_sink:{key}", doc, labels=names + ["reason"])
            for name, value in values.items():
                if name.startswith(key + ":"):
                    family.add_metric(label_values + [name.split(":", 1)[1]], value)
            yield family
        for key, doc in GAUGES.items():
            if key in values:
                family = GaugeMetricFamily(f"vllm_sink:{key}", doc, labels=names)
                family.add_metric(label_values, values[key])
                yield family
