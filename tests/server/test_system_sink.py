"""The system prompt as the sink (``--sink-tokens system``), through a real ``vllm serve`` (one
server for the module: engine sink one page of 16 tokens for other requests, W=256, system
prompts up to 64 tokens, the model shrunk to 512 positions).

How a chat request's sink is shown: the same prompt token ids sent as a Completions request
with ``vllm_xargs={"sink_tokens": n}`` (n = the length of the rendered system prompt, computed
here with the model's own tokenizer and chat template) gives the same greedy tokens, and the
same prompt and generated logprobs within 1e-4 nats; the same Completions request with the
engine's sink (16) differs past the window. Every request here asks for ``prompt_logprobs``,
so it is prefilled from token 0 (never resumed from a kept stream) in the same 32-token steps:
the chat and its Completions twin compute the same thing.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests

from serverlib import MODEL_NAME, Server

B, S, W, CAP = 16, 16, 256, 64
GEN = 16
TOL = 1e-4
SINK_ARGS = ["--kv-policy", "sink", "--sink-tokens", "system", "--kv-window", str(W), "--max-stream-len", "8192",
             "--max-sink-tokens", str(CAP)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server([], tmp_path_factory.mktemp("server") / "server.log", sink_args=SINK_ARGS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from vllm_sink import assets

    return AutoTokenizer.from_pretrained(assets.model_dir())


@pytest.fixture(scope="module")
def words():
    from vllm_sink import assets

    return assets.play_text("othello").split()


def _text(words, start: int, n: int) -> str:
    return " ".join(words[start : start + n])


# Two system prompts of different lengths (a partial third page, a partial second page) and one
# over the cap.
SYS_A = ("You are Iago's reader. Read the play aloud, line by line, keep every speaker's name, never "
         "summarise, and answer questions about the plot in one short sentence.")
SYS_B = "You are Cassio. Read the lines you are given, slowly."
SYS_LONG = " ".join(["You are a reader of the play; keep every name, every line, every word."] * 8)


def _common(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _rendered_first(tok, messages, prompt_ids) -> int:
    """The tokens of the prompt that the first message rendered alone (no generation prompt)
    produces as a prefix: the sink the server should have chosen."""
    text = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=False)
    return _common(tok(text, add_special_tokens=False).input_ids, prompt_ids)


def _post(server, path: str, body: dict, ok: bool = True) -> requests.Response:
    r = requests.post(server.url + path, json={"model": MODEL_NAME, **body}, timeout=600)
    if ok:
        assert r.status_code == 200, r.text
    return r


def _prompt_lps(prompt_ids, prompt_logprobs) -> list[float]:
    return [d[str(t)]["logprob"] for t, d in zip(prompt_ids[1:], prompt_logprobs[1:])]


def _chat(server, messages, **extra) -> dict:
    """A greedy chat turn prefilled from token 0: prompt ids, prompt logprobs, generated
    tokens and their logprobs."""
    r = _post(server, "/v1/chat/completions", dict(
        messages=messages, max_tokens=GEN, temperature=0, logprobs=True, return_token_ids=True, prompt_logprobs=0,
        **extra)).json()
    c = r["choices"][0]
    return dict(prompt=r["prompt_token_ids"], prompt_lps=_prompt_lps(r["prompt_token_ids"], r["prompt_logprobs"]),
                tokens=c["token_ids"], lps=[x["logprob"] for x in c["logprobs"]["content"]])


def _completion(server, prompt_ids, sink: int | None) -> dict:
    """The same prompt token ids as a Completions request, with the given sink (``None``:
    the engine's)."""
    extra = {} if sink is None else {"vllm_xargs": {"sink_tokens": sink}}
    r = _post(server, "/v1/completions", dict(
        prompt=prompt_ids, max_tokens=GEN, temperature=0, logprobs=0, return_token_ids=True, prompt_logprobs=0,
        **extra)).json()
    c = r["choices"][0]
    assert c["prompt_token_ids"] == prompt_ids
    return dict(prompt=prompt_ids, prompt_lps=_prompt_lps(prompt_ids, c["prompt_logprobs"]), tokens=c["token_ids"],
                lps=c["logprobs"]["token_logprobs"])


def _max_diff(a: dict, b: dict) -> float:
    pairs = list(zip(a["prompt_lps"], b["prompt_lps"])) + list(zip(a["lps"], b["lps"]))
    assert len(pairs) == len(a["prompt_lps"]) + len(a["lps"])
    return max(abs(x - y) for x, y in pairs)


def _assert_sink(server, tok, messages, got: dict, want_sink: int | None = None) -> int:
    """``got`` (a chat turn) ran with its rendered first message as the sink: it equals the
    Completions request of its prompt ids with that sink, and differs from the engine's sink.
    Returns the sink."""
    n = _rendered_first(tok, messages, got["prompt"])
    if want_sink is not None:
        assert n == want_sink
    assert S < n <= CAP and len(got["prompt"]) > n + W + 2 * B  # past the window
    twin = _completion(server, got["prompt"], n)
    assert got["tokens"] == twin["tokens"]
    assert _max_diff(got, twin) <= TOL, _max_diff(got, twin)
    default = _completion(server, got["prompt"], None)
    assert _max_diff(got, default) > 100 * TOL  # the comparison can fail: the engine's sink differs
    return n


def _pool_whole(server):
    assert server.healthy()
    m = server.wait_idle()
    assert m["vllm_sink:free_kv_pages"] + m.get("vllm_sink:kept_session_pages", 0) == m["vllm_sink:kv_pool_pages"], m


@pytest.fixture(autouse=True)
def pool_whole_after(server):
    yield
    _pool_whole(server)


# ---------------------------------------------------------------------------- (a)
def test_the_system_prompt_is_the_sink(server, tok, words):
    """A chat of several turns past the window (and the model's 512 positions) keeps its
    system prompt as its sink; a request that names its own sink keeps that one."""
    system = {"role": "system", "content": SYS_A}
    msgs = [system, {"role": "user", "content": _text(words, 1000, 150)},
            {"role": "assistant", "content": "Thus far the first scene."},
            {"role": "user", "content": _text(words, 1150, 150)},
            {"role": "assistant", "content": "And so it goes on."},
            {"role": "user", "content": _text(words, 1300, 120)}]
    got = _chat(server, msgs)
    assert len(got["prompt"]) > 512
    n = _assert_sink(server, tok, msgs, got)
    print(f"\nsystem prompt sink: {n} tokens of a {len(got['prompt'])}-token prompt")

    # The request's own vllm_xargs sink wins over its system prompt: here the engine's 16.
    own = _chat(server, msgs, vllm_xargs={"sink_tokens": S})
    twin = _completion(server, own["prompt"], None)
    assert own["tokens"] == twin["tokens"] and _max_diff(own, twin) <= TOL
    assert _max_diff(own, got) > 100 * TOL


# ---------------------------------------------------------------------------- (b)
def test_system_prompts_of_different_lengths_in_one_batch(server, tok, words):
    """Two chats with system prompts of different lengths, sent at once, run in one batch
    (both running together, seen on /metrics); each has its own system prompt as its sink."""
    convs = [[{"role": "system", "content": SYS_A}, {"role": "user", "content": _text(words, 3000, 400)}],
             [{"role": "system", "content": SYS_B}, {"role": "user", "content": _text(words, 4000, 400)}]]
    out: list = [None, None]
    running, done = [], threading.Event()

    def watch():
        while not done.is_set():
            running.append(server.metrics().get("vllm:num_requests_running", 0))
            time.sleep(0.2)

    def send(i):
        out[i] = _chat(server, convs[i])

    watcher = threading.Thread(target=watch)
    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert max(running) >= 2, running
    sinks = [_assert_sink(server, tok, conv, got) for conv, got in zip(convs, out)]
    print(f"\ntwo system prompts in one batch: sinks {sinks} tokens")
    assert sinks[0] != sinks[1] and sinks[0] % B and sinks[1] % B


# ---------------------------------------------------------------------------- (c)
def test_a_system_prompt_over_the_cap_is_a_400(server, tok, words):
    """A system prompt longer than --max-sink-tokens is refused with HTTP 400 naming its
    size, the cap and the fix (Chat Completions and the Responses API's ``instructions``);
    the server keeps serving."""
    msgs = [{"role": "system", "content": SYS_LONG}, {"role": "user", "content": _text(words, 500, 20)}]
    n = len(tok(tok.apply_chat_template(msgs[:1], tokenize=False), add_special_tokens=False).input_ids)
    assert n > CAP
    for stream in (False, True):
        r = _post(server, "/v1/chat/completions", dict(messages=msgs, max_tokens=4, stream=stream), ok=False)
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert f"the system prompt has {n} tokens" in message and f"{CAP} tokens" in message, message
        assert "shorten the system prompt" in message and "--max-sink-tokens" in message, message
    r = _post(server, "/v1/responses", dict(instructions=SYS_LONG, input=_text(words, 500, 20), max_output_tokens=4),
              ok=False)
    assert r.status_code == 400 and f"has {n} tokens" in r.json()["error"]["message"], r.text
    # A request that names its own sink is not measured: served.
    _post(server, "/v1/chat/completions", dict(messages=msgs, max_tokens=4, vllm_xargs={"sink_tokens": S}))
    # The server keeps serving system-sink chats.
    got = _post(server, "/v1/chat/completions", dict(
        messages=[{"role": "system", "content": SYS_B}, {"role": "user", "content": _text(words, 520, 20)}],
        max_tokens=4)).json()
    assert got["choices"][0]["message"]["content"]


# ---------------------------------------------------------------------------- (d)
def test_a_chat_without_a_system_message(server, tok, words):
    """No system message: the first message, as the chat template renders it alone, is the
    sink (SmolLM2's template puts its default system prompt before it). A first message that
    is not a system prompt and is over the cap keeps the engine's sink (no 400)."""
    msgs = [{"role": "user", "content": _text(words, 2000, 12)},
            {"role": "assistant", "content": "Go on."},
            {"role": "user", "content": _text(words, 2012, 420)}]
    got = _chat(server, msgs)
    text = tok.apply_chat_template(msgs[:1], tokenize=False)
    assert text.startswith("<|im_start|>system\n")  # the template's default system prompt
    n = _assert_sink(server, tok, msgs, got)
    print(f"\nfirst user message as the sink: {n} tokens")

    long_first = [{"role": "user", "content": _text(words, 2500, 420)}]
    got = _chat(server, long_first)
    assert _rendered_first(tok, long_first, got["prompt"]) > CAP
    twin = _completion(server, got["prompt"], None)
    assert got["tokens"] == twin["tokens"] and _max_diff(got, twin) <= TOL


# ---------------------------------------------------------------------------- (e)
def test_sessions_resume_across_turns(server, tok, words):
    """Turns of a system-sink chat resume the kept stream of the previous turn once it has
    passed the window (the same sink: kept streams resume only for requests of their own
    sink); before that, a turn finds the previous one's pages in the prefix cache, as in
    vLLM. A turn that names another sink does not resume."""
    client = server.client(timeout=600)
    msgs = [{"role": "system", "content": SYS_B}]
    resumes, reused, history = [], [], []
    for turn in range(4):
        msgs.append({"role": "user", "content": _text(words, 6000 + 100 * turn, 100)})
        m0 = server.wait_idle()
        r = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=GEN, temperature=0)
        m1 = server.wait_idle()
        resumes.append(m1.get("vllm_sink:session_resumes_total", 0) - m0.get("vllm_sink:session_resumes_total", 0))
        reused.append(m1.get("vllm_sink:session_tokens_reused_total", 0)
                      - m0.get("vllm_sink:session_tokens_reused_total", 0))
        history.append(r.usage.prompt_tokens + r.usage.completion_tokens)
        msgs.append({"role": "assistant", "content": r.choices[0].message.content})
    print(f"\nsystem-sink chat: resumes per turn {resumes}, tokens reused {reused}, "
          f"history after each turn {history}, last prompt {r.usage.prompt_tokens} tokens")
    assert r.usage.prompt_tokens > S + W + 2 * B  # past the window
    # (the system sink is at most CAP tokens: a history over CAP + W + B has moved its window)
    past = [h > CAP + W + B for h in history[:-1]]
    assert resumes[0] == 0 and any(past) and not all(past), (history, resumes)
    for i, was_past in enumerate(past, 1):
        if was_past:
            assert resumes[i] == 1 and reused[i] > 100, (i, resumes, reused)
        elif history[i - 1] < S + W - B:  # inside the window: freed, found in the prefix cache
            assert resumes[i] == 0, (i, resumes, history)
    # The next turn with another sink than its system prompt's does not resume the kept stream.
    msgs.append({"role": "user", "content": _text(words, 6400, 20)})
    m0 = server.wait_idle()
    client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=4, temperature=0,
                                   extra_body={"vllm_xargs": {"sink_tokens": S}})
    m1 = server.wait_idle()
    assert m1.get("vllm_sink:session_resumes_total", 0) == m0.get("vllm_sink:session_resumes_total", 0)
