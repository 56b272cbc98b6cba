"""Pool pressure: with a KV pool that holds only two streams' bounded footprints, six
concurrent long streams are admitted two at a time (each admitted stream can always grow to
its footprint), none is preempted (so none is recomputed from token 0), and every stream's
output equals its output on an unpressured server, token for token.

The pressured server sets no stream cap (the default): a request for 100 million tokens is
served until its client goes away, streamed or not, and gives its pages back then."""

from __future__ import annotations

import threading
import time

import pytest

from serverlib import MODEL_NAME, SINK_ADDITIONAL_CONFIG, Server

PAGE_BYTES = 2 * 16 * 3 * 64 * 4 * 30  # B=16, 3 KV heads, head 64, float32, 30 layers
FOOTPRINT = 1 + -(-(256 - 1 + 32) // 16) + 1  # s + ceil((W - 1 + C)/B) + 1 = 20 pages
POOL_PAGES = 2 * FOOTPRINT + 10  # room for two streams, not three
N_STREAMS, MAX_TOKENS = 6, 40


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
def unpressured(shared_server):
    """The outputs of the session's default server (a pool of hundreds of pages)."""
    prompts = _prompts()
    return prompts, _run_all(shared_server, prompts)


@pytest.fixture(scope="module")
def pressured(tmp_path_factory, unpressured):
    # Configured through stock --additional-config (the unpressured one through the flags,
    # with a stream cap of 8192): equal outputs also show both routes give the same settings.
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


def test_no_stream_cap(pressured):
    """No cap set: a streamed completion asking for 100 million tokens runs past the window
    until the client stops reading; the server then aborts it and its pages return. The same
    request without streaming is accepted too: it runs until its client goes away."""
    import requests

    server = pressured
    assert "no stream cap" in server.log()
    m0 = server.wait_idle()
    body = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=100_000_000, temperature=0)
    stream = server.client(timeout=900).completions.create(**body, stream=True, extra_body={"ignore_eos": True})
    texts = []
    for chunk in stream:
        texts.append(chunk.choices[0].text)
        if len(texts) >= 300:  # past the window (4 + 300 tokens: it moves from token 288)
            break
    stream.close()
    m1 = server.wait_idle()
    assert len(texts) == 300 and all(t is not None for t in texts)
    assert m1["vllm_sink:pages_evicted_total"] > m0["vllm_sink:pages_evicted_total"]
    assert server.free_or_kept(m1) == server.free_or_kept(m0)

    seen = []

    def watch():
        for _ in range(24):
            m = server.metrics()
            seen.append((m.get("vllm:num_requests_running", 0), m.get("vllm:generation_tokens_total", 0)))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with pytest.raises(requests.exceptions.ReadTimeout):  # the client gives up, the request is aborted
        requests.post(server.url + "/v1/completions", json={**body, "ignore_eos": True}, timeout=10)
    watcher.join()
    m2 = server.wait_idle()
    running = [r for r, _ in seen]
    generated = [g for _, g in seen]
    assert max(running) == 1 and generated[-1] > generated[0] + 50  # accepted, and generating
    assert server.free_or_kept(m2) == server.free_or_kept(m0)
    assert server.healthy()
    print(f"\nno cap: streamed {len(texts)} tokens, then aborted; unstreamed request generated "
          f"{generated[-1] - generated[0]:.0f} tokens before its client left; pages back")
