"""``vllm serve --kv-policy sink``: the stock OpenAI server, driven by the openai client.

The server runs SmolLM2 with ``--max-model-len 512`` and the model shrunk to 512 rotary
positions; with the sink policy (W=256) requests run far past both.
"""

from __future__ import annotations

import asyncio
import json
import math
import os

import pytest
import requests

from serverlib import API_SERVERS, MODEL_NAME, PAGE


def _hamlet(chars: int) -> str:
    from vllm_sink import assets

    return assets.play_text("hamlet")[:chars]


def test_api_key_still_enforced(server):
    r = requests.post(server.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 401


def test_flags_reach_the_engine(server):
    """Stock from_cli_args would drop --kv-policy & co.; the startup log and the metrics
    show they arrived."""
    log = server.log()
    assert f"vllm-sink: kv_policy=sink, sink {PAGE} tokens in 1 page(s), window 256 tokens" in log
    assert "stream cap 8192 tokens" in log
    m = server.metrics()
    assert m["vllm_sink:max_pages_per_sequence"] == 1 + math.ceil((256 - 1 + 32) / PAGE) + 1


def test_every_api_server_applies_the_policy(server):
    """The shared server runs ``--api-server-count 2``: each API server process (started
    with the parsed arguments before vLLM loads the plugin in it) reports the sink's length
    limit (the stream cap, not ``--max-model-len 512``) and serves the ``vllm_sink:``
    series. Requests and scrapes go to either process (one listening socket); enough of them
    reach both."""
    import re

    log = server.log()
    ranks = set(re.findall(rf"vllm-sink: API server (\d+) of {API_SERVERS}: kv_policy=sink, requests up to 8192 tokens", log))
    assert ranks == {str(i + 1) for i in range(API_SERVERS)}, ranks
    for _ in range(8):
        r = requests.get(server.url + "/v1/models", headers=server.headers(), timeout=30)
        assert r.status_code == 200
        assert r.json()["data"][0]["max_model_len"] == 8192, r.json()
        m = server.metrics()
        assert m["vllm_sink:max_pages_per_sequence"] == 1 + math.ceil((256 - 1 + 32) / PAGE) + 1
        assert sum(1 for name in m if name.startswith("vllm_sink:")) >= 8, sorted(m)


def _reference_ppl(prompt_ids, output_ids):
    """Perplexity of the generated tokens under the model, scored by the plain-PyTorch
    reference with the same sink policy (S=B=PAGE, W=256), decode steps of one token."""
    import torch

    from reference import ReferenceLlama, chunked_steps
    from vllm_sink import assets

    ref = ReferenceLlama(assets.model_dir())
    tokens = list(prompt_ids) + list(output_ids)
    lps = ref.stream_logprobs(tokens, chunked_steps(len(prompt_ids), 32, len(tokens) + 1), sink_tokens=PAGE, window=256, block_size=PAGE)
    gen = lps[len(prompt_ids) - 1 :]
    gen = gen[~torch.isnan(gen)]
    return math.exp(-gen.mean().item())


def test_completion_far_past_context(server):
    """A completion of prompt + output = 1,700 tokens (over 3x --max-model-len and the
    model's positions) succeeds, and the text stays coherent: its perplexity under the model
    stays bounded."""
    from transformers import AutoTokenizer

    from vllm_sink import assets

    tok = AutoTokenizer.from_pretrained(assets.model_dir())
    prompt = tok(_hamlet(9000))["input_ids"][:1500]
    before = server.metrics()
    out = server.client(timeout=900).completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=200, temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True}
    )
    assert out.usage.prompt_tokens == 1500 and out.usage.completion_tokens == 200
    assert out.choices[0].finish_reason == "length"
    after = server.wait_idle()
    evicted = after["vllm_sink:pages_evicted_total"] - before["vllm_sink:pages_evicted_total"]
    # 1,700 tokens through a 16 + 256 token cache: about (1700 - 272) / 16 pages evicted
    # (B = PAGE: 32 on vLLM 0.32.0, about half as many pages).
    assert (1700 - 272 - 136) // PAGE <= evicted <= (1700 - 272 + 88) // PAGE, evicted
    assert after["vllm_sink:tokens_evicted_total"] - before["vllm_sink:tokens_evicted_total"] == PAGE * evicted
    assert after["vllm_sink:epochs_total"] - before["vllm_sink:epochs_total"] >= 5  # (6 measured)
    # One re-anchoring per step that moves the window (a 32-token prefill step moves it 2 pages).
    assert after["vllm_sink:sink_rotations_total"] - before["vllm_sink:sink_rotations_total"] >= evicted // 2
    ppl = _reference_ppl(prompt, list(out.choices[0].token_ids))
    print(f"\n1,700 tokens past 512 positions; reference PPL of the 200 generated tokens {ppl:.2f}; "
          f"{evicted} pages evicted, {after['vllm_sink:epochs_total'] - before['vllm_sink:epochs_total']} epochs")
    assert ppl < 20


def test_streamed_chat_far_past_context(server):
    client = server.client()
    messages = [{"role": "user", "content": "Retell the first scene of Hamlet.\n" + _hamlet(1500)}]
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=300, temperature=0, stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert usage is not None and usage.completion_tokens == 300  # (more than the window)
    assert usage.prompt_tokens + usage.completion_tokens > 512
    # The conversation keeps growing and keeps being answered.
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "Go on."}]
    again = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=32, temperature=0)
    assert again.usage.prompt_tokens > 700 and again.usage.completion_tokens == 32


async def _stream(client, i, disconnect):
    stream = await client.completions.create(
        model=MODEL_NAME, prompt=_hamlet(200 + 40 * i), max_tokens=48, temperature=0, stream=True
    )
    n = 0
    async for _ in stream:
        n += 1
        if disconnect and n == 8:
            await stream.close()  # the client goes away mid-stream
            return "disconnected"
    return n


def test_32_concurrent_streams_a_third_disconnecting(server):
    import openai

    free0 = server.free_or_kept(server.wait_idle())

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)
        tasks = [_stream(client, i, disconnect=(i % 3 == 0)) for i in range(32)]
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert results.count("disconnected") == 11
    assert all(r == 48 for r in results if r != "disconnected")
    m = server.wait_idle()
    assert server.free_or_kept(m) == free0
    assert server.healthy()
    ok = server.client().completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4)
    assert ok.usage.completion_tokens == 4


BAD_REQUESTS = [
    # (name, path, body (dict or raw str), expected status)
    ("malformed JSON", "/v1/completions", '{"model": "smol", "prompt": ', 400),
    ("negative max_tokens", "/v1/completions", {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": -5}, 400),
    ("absurd max_tokens", "/v1/completions", {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 10**12}, 400),
    ("max_tokens past the stream cap", "/v1/completions", {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 9000}, 400),
    ("prompt past the stream cap", "/v1/completions", {"model": MODEL_NAME, "prompt": [17] * 9000, "max_tokens": 4}, 400),
    ("invalid token ids", "/v1/completions", {"model": MODEL_NAME, "prompt": [1, 999999999], "max_tokens": 4}, 400),
    ("negative token id", "/v1/completions", {"model": MODEL_NAME, "prompt": [-3], "max_tokens": 4}, 400),
    ("empty prompt", "/v1/completions", {"model": MODEL_NAME, "prompt": "", "max_tokens": 4}, 400),
    ("empty chat", "/v1/chat/completions", {"model": MODEL_NAME, "messages": [], "max_tokens": 4}, 400),
    ("unknown model", "/v1/completions", {"model": "nope", "prompt": "Hi", "max_tokens": 4}, 404),
    ("wrong type", "/v1/completions", {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": "many"}, 400),
]


def bad_request_table(server) -> list[tuple[str, int, str]]:
    rows = []
    for name, path, body, _ in BAD_REQUESTS:
        data = body if isinstance(body, str) else json.dumps(body)
        headers = {"Content-Type": "application/json", **server.headers()}
        r = requests.post(server.url + path, data=data, headers=headers, timeout=120)
        try:
            message = r.json().get("error", {}).get("message", r.text)
        except ValueError:
            message = r.text
        rows.append((name, r.status_code, " ".join(str(message).split())[:220]))
    return rows


def test_bad_requests_get_clear_errors_and_the_engine_survives(server):
    free0 = server.free_or_kept(server.wait_idle())
    rows = bad_request_table(server)
    print("\n| request | status | message |\n|---|---|---|")
    for name, status, message in rows:
        print(f"| {name} | {status} | {message} |")
    for (name, status, message), (_, _, _, expected) in zip(rows, BAD_REQUESTS):
        assert status == expected, (name, status, message)
        assert message
    assert server.healthy()
    assert server.free_or_kept(server.wait_idle()) == free0
    ok = server.client().completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4)
    assert ok.usage.completion_tokens == 4


def test_vllm_bench_serve_zero_failures(server):
    """vLLM's own load client, random dataset, input + output (700) past --max-model-len."""
    import re
    import subprocess

    from serverlib import VENV_BIN
    from vllm_sink import assets

    cmd = [str(VENV_BIN / "vllm"), "bench", "serve", "--backend", "openai", "--base-url", server.url,
           "--model", MODEL_NAME, "--tokenizer", str(assets.model_dir()), "--dataset-name", "random",
           "--random-input-len", "600", "--random-output-len", "100", "--num-prompts", "8", "--ignore-eos"]
    env = dict(os.environ, OPENAI_API_KEY=server.api_key)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    out = proc.stdout
    table = out[out.find("============ Serving Benchmark Result"):]
    print("\n" + table)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"Successful requests:\s+8\b", out)
    assert re.search(r"Failed requests:\s+0\b", out)
    assert re.search(r"Total input tokens:\s+4800\b", out)
    assert server.healthy()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--kv-policy", "sink", "--kv-window", "100"], "not a multiple of block_size"),
        (["--sink-pages", "2"], "only apply with kv_policy='sink'"),
    ],
)
def test_invalid_flags_fail_at_startup(flags, message):
    """Bad flag combinations stop `vllm serve` before any engine starts, naming the fix."""
    import subprocess

    from serverlib import VENV_BIN
    from vllm_sink import assets

    proc = subprocess.run(
        [str(VENV_BIN / "vllm"), "serve", str(assets.model_dir()), "--dtype", "float32", "--block-size", str(PAGE), *flags],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
