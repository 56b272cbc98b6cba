"""Pool pressure: with a KV pool that holds only two streams' bounded footprints, six
concurrent long streams are admitted two at a time (each admitted stream can always grow to
its footprint), none is preempted (so none is recomputed from token 0), and every stream's
output equals its output on an unpressured server, token for token."""

from __future__ import annotations

import threading
import time

import pytest

from serverlib import MODEL_NAME, SINK_ADDITIONAL_CONFIG, Server

PAGE_BYTES = 2 * 16 * 3 * 64 * 4 * 30  # B=16, 3 KV heads, head 64, float32, 30 layers
FOOTPRINT = 1 + -(-(256 - 1 + 32) // 16) + 1  # s + ceil((W - 1 + C)/B) + 1 = 20 pages
POOL_PAGES = 2 * FOOTPRINT + 10  # room for two streams, not three
N_STREAMS, MAX_TOKENS = 6, 160


def _prompts():
    from transformers import AutoTokenizer

    from vllm_sink import assets

    tok = AutoTokenizer.from_pretrained(assets.model_dir())
    ids = tok(assets.play_text("macbeth"))["input_ids"]
    return [ids[2000 * i : 2000 * i + 300 + 20 * i] for i in range(N_STREAMS)]


def _run_all(server: Server, prompts, watch=None):
    client = server.client(timeout=900)
    outputs = [None] * len(prompts)

    def one(i):
        out = client.completions.create(
            model=MODEL_NAME, prompt=prompts[i], max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        outputs[i] = list(out.choices[0].token_ids)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if watch is not None:
            watch(server.metrics())
        time.sleep(0.5)
    return outputs


@pytest.fixture(scope="module")
def unpressured(tmp_path_factory):
    prompts = _prompts()
    srv = Server([], tmp_path_factory.mktemp("unpressured") / "server.log")
    try:
        return prompts, _run_all(srv, prompts)
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def pressured(tmp_path_factory, unpressured):
    # Configured through stock --additional-config (the unpressured one through the flags):
    # equal outputs also show both routes give the same settings.
    srv = Server(["--kv-cache-memory-bytes", str(POOL_PAGES * PAGE_BYTES)], tmp_path_factory.mktemp("pressured") / "server.log", sink_args=SINK_ADDITIONAL_CONFIG)
    yield srv
    srv.stop()


def test_pool_pressure_same_outputs_no_preemption(unpressured, pressured):
    prompts, expected = unpressured
    m0 = pressured.metrics()
    assert m0["vllm_sink:kv_pool_pages"] < 3 * FOOTPRINT
    seen = {"running": 0, "waiting": 0}

    def watch(m):
        seen["running"] = max(seen["running"], m.get("vllm:num_requests_running", 0))
        seen["waiting"] = max(seen["waiting"], m.get("vllm:num_requests_waiting", 0))

    got = _run_all(pressured, prompts, watch)
    m1 = pressured.wait_idle()
    print(f"\npool {m0['vllm_sink:kv_pool_pages']:.0f} pages, footprint {FOOTPRINT}; at most "
          f"{seen['running']:.0f} running, {seen['waiting']:.0f} waiting; preemptions "
          f"{m1['vllm:num_preemptions_total']:.0f}")
    assert all(len(o) == MAX_TOKENS for o in got)
    assert got == expected
    assert m1["vllm:num_preemptions_total"] == 0  # no stream recomputed from token 0
    assert seen["waiting"] > 0 and seen["running"] <= 2  # the pool was the limit
    assert pressured.free_or_kept(m1) == pressured.free_or_kept(m0)
