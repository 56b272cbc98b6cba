"""The ``vllm_sink:`` series on the API server's ``/metrics``.

Binds to (``vllm/engine/arg_utils.py``, ``vllm/v1/metrics/prometheus.py``):
  EngineArgs._api_process_count,         read: an API server that ``vllm serve
  EngineArgs._api_process_rank           --api-server-count N`` started (rank >= 0 of N > 1)
                                         reads the directory its parent made for the engine
  PROMETHEUS_MULTIPROC_DIR               (Prometheus's variable, which vLLM sets for N > 1)

The engine processes publish their counters into a directory (``VLLMSINK_METRICS_DIR``,
``vllm_sink.metrics``), made once per engine by the process that starts the engine's
processes (they inherit it); the API servers of ``--api-server-count N`` start after it and
inherit it too. One API server serves them through ``SinkCollector`` at every scrape. With
several, vLLM serves ``/metrics`` from Prometheus's multiprocess files only (a fresh registry
per scrape, which no collector joins): the first API server copies the published counters
into such files (``MultiprocessMirror``), and every API server serves them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time

from vllm.logger import init_logger

from vllm_sink.config import SinkConfigError
from vllm_sink.metrics import (COUNTERS, GAUGES, LABELLED_COUNTERS, METRICS_DIR_ENV, SinkCollector,
                               read_published)

logger = init_logger("vllm." + __name__)

# How often the mirror copies (a few small files read: cheap; scrapes lag by at most this).
MIRROR_INTERVAL_S = 0.1

_collector: SinkCollector | None = None
_mirror: "MultiprocessMirror | None" = None


def is_api_server_worker(engine_args) -> bool:
    """Whether this process is one of the API servers of ``--api-server-count N`` (N > 1):
    the engine is its parent's, already running."""
    return engine_args._api_process_count > 1 and engine_args._api_process_rank >= 0


def export(model_name: str, *, api_server_rank: int | None = None) -> str:
    """Serve the engine processes' counters on this process's ``/metrics``; returns their
    directory. ``api_server_rank``: this process is that API server of several
    (``is_api_server_worker``), whose parent made the directory; otherwise a new one is
    made, which the engine processes started from here inherit (``VLLMSINK_METRICS_DIR``)."""
    global _collector, _mirror
    from prometheus_client import REGISTRY

    labels = {"model_name": model_name}
    if api_server_rank is not None:
        directory = os.environ.get(METRICS_DIR_ENV)
        if not directory or not os.path.isdir(directory):
            raise SinkConfigError(
                f"vllm-sink: this API server found no {METRICS_DIR_ENV} from the process that "
                "started it; start the server with `vllm serve`, which makes it"
            )
        if api_server_rank == 0 and os.environ.get("PROMETHEUS_MULTIPROC_DIR") and _mirror is None:
            _mirror = MultiprocessMirror(directory, labels)
            _mirror.start()
    else:
        directory = tempfile.mkdtemp(prefix="vllm-sink-metrics-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        os.environ[METRICS_DIR_ENV] = directory
        # vLLM's Ray executor copies only VLLM_* variables (and those named here) to its workers.
        copied = [v for v in os.environ.get("VLLM_RAY_EXTRA_ENV_VARS_TO_COPY", "").split(",") if v]
        if METRICS_DIR_ENV not in copied:
            os.environ["VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"] = ",".join(copied + [METRICS_DIR_ENV])
    if _collector is None:
        _collector = SinkCollector(directory, labels)
        REGISTRY.register(_collector)
    else:
        _collector.directory = directory
        _collector.labels = labels
    return directory


class MultiprocessMirror:
    """The published counters, copied into Prometheus multiprocess metrics (files under
    ``PROMETHEUS_MULTIPROC_DIR``) every ``MIRROR_INTERVAL_S`` by one process, so that
    every API server's scrape serves the same ``vllm_sink:`` series as ``SinkCollector``
    would. Counters advance by what the engine processes added since the last copy; gauges
    take the latest value."""

    def __init__(self, directory: str, labels: dict[str, str]):
        from prometheus_client import Counter, Gauge

        self.directory = directory
        names, self.values = list(labels), list(labels.values())
        # registry=None: only the multiprocess files carry them (no clash with SinkCollector).
        self.counters = {key: Counter(f"vllm_sink:{key}", doc, names, registry=None)
                         for key, doc in COUNTERS.items()}
        self.labelled = {key: Counter(f"vllm_sink:{key}", doc, names + ["reason"], registry=None)
                         for key, doc in LABELLED_COUNTERS.items()}
        self.gauges = {key: Gauge(f"vllm_sink:{key}", doc, names, registry=None, multiprocess_mode="mostrecent")
                       for key, doc in GAUGES.items()}
        for counter in self.counters.values():
            counter.labels(*self.values)  # served at 0 from the start
        self.copied: dict[str, float] = {}

    def sync(self) -> None:
        published = read_published(self.directory)
        for key, value in published.items():
            name = key.split(":", 1)[0]
            if name in self.counters or name in self.labelled:
                delta = value - self.copied.get(key, 0)
                if delta > 0:
                    if name in self.counters:
                        self.counters[name].labels(*self.values).inc(delta)
                    else:
                        self.labelled[name].labels(*self.values, key.split(":", 1)[1]).inc(delta)
                    self.copied[key] = value
            elif name in self.gauges:
                self.gauges[name].labels(*self.values).set(value)

    def start(self) -> None:
        def run():
            while True:
                try:
                    self.sync()
                except Exception:  # (a failed copy must not stop the thread: the next one retries)
                    logger.exception("vllm-sink: copying the sink counters for /metrics failed")
                time.sleep(MIRROR_INTERVAL_S)

        threading.Thread(target=run, name="vllm-sink-metrics", daemon=True).start()
