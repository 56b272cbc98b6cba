"""The published counters as /metrics adds them up: summed over the processes (and the
engines of --data-parallel-size N), a per-sequence bound taken once."""

import json

from vllm_sink.metrics import SinkCollector, SinkStats, read_published


def _publish(directory, name, **values):
    (directory / f"{name}.json").write_text(json.dumps(values))


def test_two_engines_add_up_and_the_sequence_bound_is_not_doubled(tmp_path):
    _publish(tmp_path, "engine-1", pages_evicted=5, free_kv_pages=300, kv_pool_pages=363, max_pages_per_sequence=20)
    _publish(tmp_path, "engine-2", pages_evicted=7, free_kv_pages=350, kv_pool_pages=363, max_pages_per_sequence=20)
    _publish(tmp_path, "worker-3", epochs=2, sink_rotations=9)
    (tmp_path / "engine-4.tmp").write_text("{half a snapshot")  # (a write in progress is not read)
    total = read_published(tmp_path)
    assert total == dict(pages_evicted=12, free_kv_pages=650, kv_pool_pages=726, max_pages_per_sequence=20,
                         epochs=2, sink_rotations=9)


def test_collector_serves_every_counter_and_the_published_gauges(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLMSINK_METRICS_DIR", str(tmp_path))
    stats = SinkStats(role="engine", pages_evicted=3, pool_pages=10, free_pages=4)
    stats.publish(force=True)
    series = {s.name: s.value for family in SinkCollector(tmp_path, {"model_name": "m"}).collect()
              for s in family.samples}
    assert series["vllm_sink:pages_evicted_total"] == 3
    assert series["vllm_sink:kv_pool_pages"] == 10 and series["vllm_sink:free_kv_pages"] == 4
    assert series["vllm_sink:epochs_total"] == 0  # a counter nothing published yet is served at 0
