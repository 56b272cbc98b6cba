"""What users send, past the window, through the stock OpenAI client and `vllm serve
--kv-policy sink` (one server for the module): seeded sampling with prompts prefilled in many
chunks, n > 1, stop strings and stop token ids, min_tokens, logprobs and top_logprobs, echo
with prompt logprobs, penalties and logit_bias, structured output, beam search, a storm of
aborted streams, and prefix caching (on, as in vLLM). Every prompt but the prefix-caching
test's short ones is longer than sink + window (16 + 256 tokens; the model is shrunk to 512
positions), and every test ends with the pool's free pages back at their value
before it (``/metrics``) and the server healthy (the module's autouse fixture).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from serverlib import MODEL_NAME

SEEDED_PROMPT = list(range(1000, 1300))  # 300 tokens: 10 prefill steps of 32 tokens


@pytest.fixture(scope="module")
def hamlet_tokens():
    from transformers import AutoTokenizer

    from vllm_sink import assets

    tok = AutoTokenizer.from_pretrained(assets.model_dir())
    return tok, tok(assets.play_text("hamlet"))["input_ids"]


@pytest.fixture(autouse=True)
def pages_come_back(server):
    """Each request's pages return to the pool and the server stays up."""
    free0 = server.free_or_kept(server.wait_idle())
    yield
    assert server.healthy()
    m = server.wait_idle()
    assert server.free_or_kept(m) == free0 == m["vllm_sink:kv_pool_pages"]


def _complete(server, **kwargs):
    extra = kwargs.pop("extra_body", {})
    return server.client(timeout=900).completions.create(
        model=MODEL_NAME, extra_body={"return_token_ids": True, **extra}, **kwargs
    )


def test_seeded_sampling_chunked_prompts(server):
    """The request that used to kill the engine: a 300-token prompt (10 prefill steps),
    temperature 0.8, a seed. The same seed gives the same text; so with a 1,500-token prompt
    and with n=4."""
    texts = [_complete(server, prompt=SEEDED_PROMPT, max_tokens=20, temperature=0.8, seed=7) for _ in range(2)]
    for out in texts:
        assert out.usage.completion_tokens == 20
    assert texts[0].choices[0].text == texts[1].choices[0].text
    other = _complete(server, prompt=SEEDED_PROMPT, max_tokens=20, temperature=0.8, seed=8)
    assert other.choices[0].text != texts[0].choices[0].text

    long_prompt = [1000 + (i * 7) % 3000 for i in range(1500)]  # 3x the 512 positions
    long_runs = [_complete(server, prompt=long_prompt, max_tokens=20, temperature=0.8, seed=7).choices[0].text for _ in range(2)]
    assert long_runs[0] == long_runs[1]

    four = [_complete(server, prompt=SEEDED_PROMPT, max_tokens=20, temperature=0.8, seed=7, n=4) for _ in range(2)]
    assert [len(o.choices) for o in four] == [4, 4]
    assert [c.text for c in four[0].choices] == [c.text for c in four[1].choices]
    assert four[0].usage.completion_tokens == 80


def test_parallel_sampling(server, hamlet_tokens):
    _, ids = hamlet_tokens
    out = _complete(server, prompt=ids[:400], max_tokens=40, temperature=1.0, n=4, extra_body={"ignore_eos": True})
    assert len(out.choices) == 4 and out.usage.completion_tokens == 160
    assert len({c.text for c in out.choices}) > 1
    assert all(len(c.token_ids) == 40 for c in out.choices)


def test_stop_strings_stop_token_ids_and_min_tokens(server, hamlet_tokens):
    """Stop strings, stop token ids and ``min_tokens`` against the greedy reply. Each request
    has its own ``cache_salt``: the same prompt must not resume another's kept stream (a
    resumed request computes its last prompt token in a step of its own, whose window, past
    the window's first move, differs from a fresh prefill's chunk: a correct but different
    greedy reply, docs/sessions.md)."""
    tok, ids = hamlet_tokens
    salts = iter(range(100))

    def salted(server, extra_body=None, **kwargs):
        return _complete(server, extra_body={**(extra_body or {}), "cache_salt": f"stop-test-{next(salts)}"}, **kwargs)

    prompt = ids[:400]
    full = salted(server, prompt=prompt, max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
    gen = list(full.choices[0].token_ids)
    text = full.choices[0].text
    assert len(gen) == 60

    # A stop string taken from the greedy text: the reply ends just before it.
    stop = text[len(text) // 2 : len(text) // 2 + 6]
    cut = salted(server, prompt=prompt, max_tokens=60, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert text.startswith(cut.choices[0].text) and stop not in cut.choices[0].text
    assert cut.choices[0].text == text[: text.find(stop)]

    # A stop token id taken from the greedy tokens: generation ends at its first occurrence.
    stop_id = gen[10]
    first = gen.index(stop_id)
    by_id = salted(server, prompt=prompt, max_tokens=60, temperature=0, extra_body={"stop_token_ids": [stop_id]})
    assert by_id.choices[0].finish_reason == "stop"
    assert by_id.choices[0].stop_reason == stop_id
    assert list(by_id.choices[0].token_ids) == gen[: first + 1]

    # min_tokens: the stop token cannot be generated before 30 tokens (vLLM masks it), so
    # the reply follows the greedy one up to its first occurrence, then goes on.
    late = salted(server, prompt=prompt, max_tokens=60, temperature=0, extra_body={"stop_token_ids": [stop_id], "min_tokens": 30})
    late_ids = list(late.choices[0].token_ids)
    assert late_ids[:first] == gen[:first]
    assert stop_id not in late_ids[:30] and len(late_ids) >= 30


def test_logprobs_top_logprobs_and_echo(server, hamlet_tokens):
    _, ids = hamlet_tokens
    prompt = ids[:400]
    out = _complete(server, prompt=prompt, max_tokens=30, temperature=0, logprobs=5, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 30 and len(lp.top_logprobs) == 30
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) >= 5
        assert max(top.values()) == pytest.approx(value, abs=1e-5)  # greedy: the best one

    # Chat logprobs / top_logprobs.
    chat = server.client(timeout=900).chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Summarise:\n" + _text(hamlet_tokens, 1800)}],
        max_tokens=12, temperature=0, logprobs=True, top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert chat.usage.prompt_tokens > 272

    # Echo with prompt logprobs: a logprob for every prompt token but the first.
    echo = _complete(server, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
    values = echo.choices[0].logprobs.token_logprobs
    assert len(values) == 401 and values[0] is None
    assert all(v is not None and v <= 0 for v in values[1:])


def _text(hamlet_tokens, chars):
    tok, ids = hamlet_tokens
    return tok.decode(ids[: chars // 3])


def test_penalties_and_logit_bias(server, hamlet_tokens):
    _, ids = hamlet_tokens
    prompt = ids[:400]
    plain = _complete(server, prompt=prompt, max_tokens=80, temperature=0, extra_body={"ignore_eos": True})
    penalised = _complete(
        server, prompt=prompt, max_tokens=80, temperature=0, frequency_penalty=1.0, presence_penalty=1.0,
        extra_body={"ignore_eos": True, "repetition_penalty": 1.5},
    )
    assert penalised.usage.completion_tokens == 80
    assert list(penalised.choices[0].token_ids) != list(plain.choices[0].token_ids)
    # Penalties apply to the generated tokens: with a strong repetition penalty the reply
    # repeats fewer of its own tokens.
    assert len(set(penalised.choices[0].token_ids)) >= len(set(plain.choices[0].token_ids))

    # logit_bias: a +100 bias makes one token win every step, past the window and past
    # --max-model-len (400 + 120 tokens).
    biased = _complete(server, prompt=prompt, max_tokens=120, temperature=0, logit_bias={"1234": 100}, extra_body={"ignore_eos": True})
    assert list(biased.choices[0].token_ids) == [1234] * 120


def test_structured_output(server, hamlet_tokens):
    """Structured output (vLLM's ``structured_outputs``: a regex for a JSON answer, and a
    choice) on prompts past the window: the grammar follows the generated tokens, which
    the window never evicts from the request."""
    pattern = r'\{"verdict": "(yes|no)", "acts": [1-5]\}'
    chat = server.client(timeout=900).chat.completions.create(
        model=MODEL_NAME, temperature=0, max_tokens=40,
        messages=[{"role": "user", "content": "Is this Hamlet? How many acts? Answer in JSON.\n" + _text(hamlet_tokens, 1800)}],
        extra_body={"structured_outputs": {"regex": pattern}},
    )
    assert chat.usage.prompt_tokens > 272
    assert chat.choices[0].finish_reason == "stop", chat.choices[0].message.content
    value = json.loads(chat.choices[0].message.content)
    assert value["verdict"] in ("yes", "no") and value["acts"] in (1, 2, 3, 4, 5)
    choice = _complete(server, prompt=hamlet_tokens[1][:400], max_tokens=8, temperature=0,
                       extra_body={"structured_outputs": {"choice": ["comedy", "tragedy"]}})
    assert choice.choices[0].text in ("comedy", "tragedy")


def test_beam_search(server, hamlet_tokens):
    _, ids = hamlet_tokens
    out = _complete(server, prompt=ids[:300], max_tokens=4, n=2, temperature=0, extra_body={"use_beam_search": True, "ignore_eos": True})
    assert len(out.choices) == 2
    assert all(c.text for c in out.choices) and out.choices[0].text != out.choices[1].text


def test_prefix_caching_shares_a_prefix_exactly(server, hamlet_tokens):
    """Three requests share a 200-token prefix (a system prompt). The first stays inside the
    window and caches the prefix's pages; the second finds them and streams 320 tokens, past
    the window (its window moves: it copies the shared pages it keeps); the third
    arrives while the second holds the prefix and finds it too. The short ones give the
    tokens and logprobs of the same prompt under a ``cache_salt`` of its own, which finds
    nothing (the usage's cached tokens)."""
    import threading

    _, ids = hamlet_tokens
    prefix = ids[20000:20200]
    prompts = [prefix + ids[21000 + 100 * i:21020 + 100 * i] for i in range(3)]

    def run(prompt, salt=None, max_tokens=8):
        out = _complete(server, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0,
                        extra_body={"ignore_eos": True, **({"cache_salt": salt} if salt else {})})
        cached = out.usage.prompt_tokens_details.cached_tokens or 0
        return out.choices[0].token_ids, out.choices[0].logprobs.token_logprobs, cached

    copied0 = server.metrics().get("vllm_sink:pages_copied_total", 0)
    first = run(prompts[0])
    long_cached, started = [], threading.Event()

    def long_stream():
        stream = server.client(timeout=900).completions.create(
            model=MODEL_NAME, prompt=prompts[1], max_tokens=320, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        for chunk in stream:
            started.set()
            if chunk.usage is not None:
                long_cached.append(chunk.usage.prompt_tokens_details.cached_tokens or 0)

    t = threading.Thread(target=long_stream)
    t.start()
    assert started.wait(600)  # its prefill is done: it holds the prefix's pages
    third = run(prompts[2])
    t.join()
    copied = server.metrics().get("vllm_sink:pages_copied_total", 0) - copied0
    found = [first, third]
    cold = [run(p, salt=f"cold-{i}") for i, p in enumerate((prompts[0], prompts[2]))]
    print(f"\nprefix caching through the server: cached tokens {first[2]}, {long_cached}, {third[2]}; "
          f"under new salts {[c[2] for c in cold]}; {copied:.0f} pages copied")
    assert copied > 0  # the long stream's window moved: it took private copies
    assert long_cached[0] >= 192 and third[2] >= 192 and all(c[2] == 0 for c in cold)
    for (tokens, lps, _), (cold_tokens, cold_lps, _) in zip(found, cold):
        assert tokens == cold_tokens
        assert max(abs(a - b) for a, b in zip(lps, cold_lps)) <= 1e-4


async def _aborted_stream(client, prompt, after_chunks):
    stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=400, temperature=0, stream=True)
    n = 0
    async for _ in stream:
        if n >= after_chunks:
            break
        n += 1
    await stream.close()  # the client goes away mid-stream
    return n


def test_storm_of_aborted_streams(server, hamlet_tokens):
    """24 streams opened at once (16 run, the rest wait) and dropped after 0 to 12 chunks:
    every page comes back (the autouse fixture), the server keeps serving."""
    import openai

    _, ids = hamlet_tokens

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0, timeout=900)
        tasks = [_aborted_stream(client, ids[100 * i : 100 * i + 300], i % 13) for i in range(24)]
        return await asyncio.gather(*tasks)

    counts = asyncio.run(main())
    assert counts == [i % 13 for i in range(24)]
    after = _complete(server, prompt=ids[:300], max_tokens=4, temperature=0)
    assert after.usage.completion_tokens == 4
