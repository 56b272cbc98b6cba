"""Chat sessions under the inputs clients really send, through the stock OpenAI client and
`vllm serve --kv-policy sink --kv-sessions --no-enable-prefix-caching` (one server for the
module; without prefix caching every finished turn is kept, inside the window too): edited messages
inside and before the window and in the sink, concurrent turns of one conversation, a client
that drops a resumed turn mid-stream, the Responses API's ``previous_response_id``, a
conversation whose kept state was released, conversations sharing a system prompt, and
requests of another ``cache_salt``. Every test ends with the server healthy and the pool
whole: each page is free or held by a kept stream (``/metrics``).

The reference answer of a prompt is the same request with ``prompt_logprobs``: such a request
is always prefilled from token 0, whatever is kept. While a conversation has not passed the
window (nothing evicted), a resumed turn computes what a full prefill computes, so the greedy
tokens are equal and their logprobs agree to float32 noise; a turn that falls back is a full
prefill itself (equal tokens and logprobs). docs/sessions.md has the table these tests check.
"""

from __future__ import annotations

import re
import threading

import pytest

from serverlib import MODEL_NAME, Server
from tolerances import F32_MAX_ABS

from vllm_sink.policy import window_start

B, S, W = 16, 16, 256  # serverlib.SINK_FLAGS: one sink page of 16 tokens, window 256
CAP = 24  # --kv-session-pages: one long conversation (18 pages) and a short one (8) do not both fit
GEN = 16
# Without prefix caching, kept streams serve every turn, inside the window too (with it, a
# turn inside the window is freed and found in the prefix cache, as in vLLM:
# test_chat_sessions.py, test_request_features.py).
SERVER_EXTRA_ARGS = ["--kv-sessions", "--kv-session-pages", str(CAP), "--enable-prompt-tokens-details",
                     "--no-enable-prefix-caching"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # vLLM keeps Responses (for previous_response_id) only with its store on.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_RESPONSES_API_STORE", "1")
        srv = Server(SERVER_EXTRA_ARGS, tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def words():
    from vllm_sink import assets

    return assets.play_text("othello").split()


@pytest.fixture(autouse=True)
def pool_whole_after(server):
    yield
    _pool_whole(server)


# ---------------------------------------------------------------------------- helpers
def _text(words, start: int, n: int) -> str:
    return " ".join(words[start : start + n])


def _metrics(server) -> dict[str, float]:
    """The session series of /metrics; ``fallback:<reason>`` per reason label."""
    import requests

    out: dict[str, float] = {}
    for line in requests.get(server.url + "/metrics", timeout=10).text.splitlines():
        m = re.match(r"^(vllm_sink:[a-z_]+|vllm:generation_tokens_total)(\{[^}]*\})?\s+(\S+)$", line)
        if not m:
            continue
        name = m.group(1)
        reason = re.search(r'reason="([^"]*)"', m.group(2) or "")
        if reason:
            name = "fallback:" + reason.group(1)
        out[name] = out.get(name, 0.0) + float(m.group(3))
    return out


def _delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _fallbacks(before: dict, after: dict) -> dict[str, float]:
    return {k[len("fallback:"):]: _delta(before, after, k) for k in after
            if k.startswith("fallback:") and _delta(before, after, k)}


def _pool_whole(server) -> dict[str, float]:
    """Idle server: every page is free or held by a kept stream."""
    assert server.healthy()
    server.wait_idle()
    m = _metrics(server)
    assert m["vllm_sink:free_kv_pages"] + m["vllm_sink:kept_session_pages"] == m["vllm_sink:kv_pool_pages"], m
    assert m["vllm_sink:kept_session_pages"] <= CAP
    return m


def _chat(server, messages, max_tokens: int = GEN, **extra) -> dict:
    """A greedy chat turn: its text, generated token ids and logprobs, prompt token ids and
    usage."""
    r = server.client(timeout=600).chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0, logprobs=True,
        extra_body={"return_token_ids": True, **extra},
    )
    c = r.choices[0]
    return dict(text=c.message.content, tokens=list(c.token_ids), lps=[x.logprob for x in c.logprobs.content],
                prompt=list(r.prompt_token_ids), usage=r.usage)


def _full_prefill(server, messages, max_tokens: int = GEN) -> dict:
    """The reference: the same turn prefilled from token 0 (prompt logprobs never resume)."""
    return _chat(server, messages, max_tokens, prompt_logprobs=0)


def _assert_same_answer(got: dict, ref: dict):
    assert got["prompt"] == ref["prompt"]
    assert got["tokens"] == ref["tokens"], (got["text"], ref["text"])
    assert max(abs(a - b) for a, b in zip(got["lps"], ref["lps"])) <= F32_MAX_ABS


def _common(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _turn(server, messages, **extra):
    """A turn and what the engine did for it: (answer, metrics before, metrics after)."""
    before = _metrics(server)
    out = _chat(server, messages, **extra)
    server.wait_idle()
    return out, before, _metrics(server)


# ---------------------------------------------------------------------------- 1a
def test_edit_inside_the_window_resumes_where_the_prompts_part(server, words):
    """A short conversation (nothing evicted yet): the client edits its last user message.
    The turn resumes the kept stream at the first edited token, and its answer is the full
    prefill's. Sending the same turn again (regenerate) resumes at its last prompt token and
    gives the same answer."""
    msgs = [{"role": "system", "content": "Iago reads the play aloud."},
            {"role": "user", "content": _text(words, 3000, 40)}]
    first = _chat(server, msgs)
    msgs += [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": _text(words, 3040, 20)}]
    second, m0, m1 = _turn(server, msgs)
    history = second["prompt"] + second["tokens"]
    assert _delta(m0, m1, "vllm_sink:session_resumes_total") == 1  # the plain next turn

    edited = msgs[:-1] + [{"role": "user", "content": "Nay, " + _text(words, 3041, 19)}]
    got, m1, m2 = _turn(server, edited)
    part = _common(history, got["prompt"])
    assert S <= part < len(second["prompt"]) and len(history) < S + W  # inside the window, past the sink
    assert _delta(m1, m2, "vllm_sink:session_resumes_total") == 1
    assert _delta(m1, m2, "vllm_sink:session_tokens_reused_total") == part
    assert not _fallbacks(m1, m2)
    # The stock client sees the reused tokens as cached (--enable-prompt-tokens-details).
    assert got["usage"].prompt_tokens_details.cached_tokens == part
    _assert_same_answer(got, _full_prefill(server, edited))

    again, m2, m3 = _turn(server, edited)  # regenerate: the same prompt again
    assert _delta(m2, m3, "vllm_sink:session_resumes_total") == 1
    assert _delta(m2, m3, "vllm_sink:session_tokens_reused_total") == len(got["prompt"]) - 1
    assert again["tokens"] == got["tokens"]


# ---------------------------------------------------------------------------- 1b
def test_edit_before_the_window_or_in_the_sink_falls_back(server, words):
    """A conversation past the window (pages evicted): an edit the kept window cannot serve
    exactly (the step at the edit would attend to tokens the stream no longer holds) is
    prefilled from token 0 and counted ``diverges_before_window``: the client's last message
    edited, the first message edited. An edited system prompt parts from the history inside
    the sink: ``diverges_in_sink``. Every answer is the full prefill's."""
    system = {"role": "system", "content": "Cassio reads the play aloud, line by line, to a patient audience."}
    msgs = [system, {"role": "user", "content": _text(words, 6000, 150)}]
    first = _chat(server, msgs)
    msgs += [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": _text(words, 6150, 20)}]
    second, m0, m1 = _turn(server, msgs)
    assert _delta(m0, m1, "vllm_sink:session_resumes_total") == 1
    assert _delta(m0, m1, "vllm_sink:pages_evicted_total") > 0  # past the window
    history = second["prompt"] + second["tokens"]
    kept_w0 = window_start(len(history) - 2, S, W, B)  # the kept stream's last step started at computed - 1

    cases = [
        ("last message edited", msgs[:-1] + [{"role": "user", "content": "Nay, " + _text(words, 6151, 19)}],
         "diverges_before_window"),
        ("first message edited", [system, {"role": "user", "content": "Nay, " + _text(words, 6001, 149)}] + msgs[2:],
         "diverges_before_window"),
        ("system prompt edited", [{"role": "system", "content": "Roderigo reads the play aloud."}] + msgs[1:],
         "diverges_in_sink"),
    ]
    for name, edited, reason in cases:
        got, before, after = _turn(server, edited)
        part = _common(history, got["prompt"])
        if reason == "diverges_in_sink":
            assert part < S, name
        else:
            assert S <= part and window_start(part, S, W, B) < kept_w0, name
        assert _delta(before, after, "vllm_sink:session_resumes_total") == 0, name
        assert _fallbacks(before, after) == {reason: 1}, name
        _assert_same_answer(got, _full_prefill(server, edited))


# ---------------------------------------------------------------------------- 2
def test_concurrent_turns_of_one_conversation(server, words):
    """Three requests extending the same kept history at once: exactly one adopts the kept
    state (resuming at the history's end), the others are prefilled from token 0; every
    answer is the full prefill's, and the pool is whole afterwards."""
    msgs = [{"role": "system", "content": "Desdemona reads the play aloud."},
            {"role": "user", "content": _text(words, 9000, 40)}]
    first = _chat(server, msgs)
    history = first["prompt"] + first["tokens"]
    msgs.append({"role": "assistant", "content": first["text"]})
    turns = [msgs + [{"role": "user", "content": _text(words, 9040 + 20 * i, 20)}] for i in range(3)]
    server.wait_idle()
    before = _metrics(server)
    answers: list = [None] * len(turns)
    errors: list = []

    def one(i):
        try:
            answers[i] = _chat(server, turns[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(turns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    server.wait_idle()
    after = _metrics(server)
    assert _delta(before, after, "vllm_sink:session_resumes_total") == 1
    assert _delta(before, after, "vllm_sink:session_tokens_reused_total") == len(history) - 1
    assert all(a["prompt"][: len(history)] == history for a in answers)
    for turn, got in zip(turns, answers):
        _assert_same_answer(got, _full_prefill(server, turn))


# ---------------------------------------------------------------------------- 3
def test_client_drops_a_resumed_turn(server, words):
    """A resumed turn, streamed, dropped by its client after a few chunks: the request is
    aborted and its pages (the adopted ones included) go back to the pool, not kept (only
    streams that finish normally are). The conversation's next try is prefilled from token 0
    and answered correctly."""
    msgs = [{"role": "system", "content": "Emilia reads the play aloud."},
            {"role": "user", "content": _text(words, 12000, 40)}]
    first = _chat(server, msgs)
    msgs += [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": _text(words, 12040, 20)}]
    m0 = _pool_whole(server)
    stream = server.client(timeout=600).chat.completions.create(
        model=MODEL_NAME, messages=msgs, max_tokens=200, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    for n, _ in enumerate(stream):
        if n == 3:
            break
    stream.close()
    m1 = _pool_whole(server)
    assert _delta(m0, m1, "vllm_sink:session_resumes_total") == 1  # it had resumed
    assert _delta(m0, m1, "vllm:generation_tokens_total") < 100  # stopped early: aborted
    # The adopted state went with the aborted request: one kept stream fewer.
    assert _delta(m0, m1, "vllm_sink:kept_sessions") == -1

    retry, m1, m2 = _turn(server, msgs)
    assert _delta(m1, m2, "vllm_sink:session_resumes_total") == 0
    assert _delta(m1, m2, "vllm_sink:session_tokens_reused_total") == 0
    _assert_same_answer(retry, _full_prefill(server, msgs))


# ---------------------------------------------------------------------------- 4
def test_responses_previous_response_id(server, words):
    """The Responses API with the stock client's ``previous_response_id`` (vLLM's response
    store on): vLLM rebuilds the conversation from its stored messages and the previous
    output, whose rendering extends the previous stream's tokens, so the next response
    resumes at the history's end. Instructions do not carry over from a previous response
    (OpenAI's rule): a response that adds them changes the system message (fallback
    ``diverges_in_sink``); one that repeats them resumes again."""
    client = server.client(timeout=600)

    def respond(text, **kwargs):
        before = _metrics(server)
        r = client.responses.create(model=MODEL_NAME, input=text, max_output_tokens=GEN, temperature=0, **kwargs)
        server.wait_idle()
        return r, before, _metrics(server)

    r1, _, _ = respond(_text(words, 15000, 20))
    r2, m1, m2 = respond(_text(words, 15020, 10), previous_response_id=r1.id)
    assert _delta(m1, m2, "vllm_sink:session_resumes_total") == 1
    # Resumed at the end of r1's stream: its prompt and output, less the last output token.
    assert _delta(m1, m2, "vllm_sink:session_tokens_reused_total") == r1.usage.total_tokens - 1
    assert r2.usage.input_tokens_details.cached_tokens == r1.usage.total_tokens - 1
    same = [{"role": "user", "content": _text(words, 15000, 20)}, {"role": "assistant", "content": r1.output_text},
            {"role": "user", "content": _text(words, 15020, 10)}]
    ref = _full_prefill(server, same)
    assert r2.usage.input_tokens == len(ref["prompt"]) and r2.output_text == ref["text"]

    instructions = "Othello reads the play aloud."
    r3, m2, m3 = respond(_text(words, 15030, 10), previous_response_id=r2.id, instructions=instructions)
    assert _delta(m2, m3, "vllm_sink:session_resumes_total") == 0
    assert _fallbacks(m2, m3) == {"diverges_in_sink": 1}
    r4, m3, m4 = respond(_text(words, 15040, 10), previous_response_id=r3.id, instructions=instructions)
    assert _delta(m3, m4, "vllm_sink:session_resumes_total") == 1
    assert _delta(m3, m4, "vllm_sink:session_tokens_reused_total") == r3.usage.total_tokens - 1
    same = [{"role": "system", "content": instructions}] + same + [
        {"role": "assistant", "content": r2.output_text}, {"role": "user", "content": _text(words, 15030, 10)},
        {"role": "assistant", "content": r3.output_text}, {"role": "user", "content": _text(words, 15040, 10)}]
    ref = _full_prefill(server, same)
    assert r4.usage.input_tokens == len(ref["prompt"]) and r4.output_text == ref["text"]
    assert r4.usage.total_tokens < S + W  # nothing evicted: the resumed answer is the full prefill's


# ---------------------------------------------------------------------------- 5
def test_released_conversation_is_prefilled_again(server, words):
    """With --kv-session-pages 24, keeping a long conversation (18 pages) releases the
    least recently used kept streams, a short conversation among them. That conversation's
    next turn resumes nothing: it is prefilled from token 0, correctly."""
    short = [{"role": "system", "content": "Bianca reads the play aloud."},
             {"role": "user", "content": _text(words, 18000, 40)}]
    first = _chat(server, short)
    long = [{"role": "system", "content": "Gratiano reads the play aloud, line by line, to a patient audience."},
            {"role": "user", "content": _text(words, 18100, 150)}]
    _, _, m1 = _turn(server, long)
    # Only the long conversation is kept: the short one was pushed out by the cap.
    assert m1["vllm_sink:kept_sessions"] == 1

    short += [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": _text(words, 18040, 20)}]
    got, m1, m2 = _turn(server, short)
    assert _delta(m1, m2, "vllm_sink:session_resumes_total") == 0
    assert _delta(m1, m2, "vllm_sink:session_tokens_reused_total") == 0
    # Counted as a fallback against the long conversation, whose first tokens (the chat
    # template's) are the same; its reason says only that the prompts part inside the sink.
    assert _fallbacks(m1, m2) == {"diverges_in_sink": 1}
    _assert_same_answer(got, _full_prefill(server, short))


# ---------------------------------------------------------------------------- whose state it is
def test_conversations_sharing_a_system_prompt_keep_their_state(server, words):
    """Two users, one system prompt (longer than the sink). User B's first turn may reuse
    the shared prefix, but user A's next turn should still resume A's whole history."""
    system = {"role": "system", "content": "Lodovico reads the play aloud, line by line, to a patient audience of students."}
    a_msgs = [system, {"role": "user", "content": _text(words, 21000, 40)}]
    a1 = _chat(server, a_msgs)
    a_history = a1["prompt"] + a1["tokens"]
    b_msgs = [system, {"role": "user", "content": _text(words, 22000, 40)}]
    b1, m0, m1 = _turn(server, b_msgs)
    _assert_same_answer(b1, _full_prefill(server, b_msgs))
    assert _delta(m0, m1, "vllm_sink:session_resumes_total") == 0
    assert _fallbacks(m0, m1) == {"shared_prefix_only": 1}
    a_msgs += [{"role": "assistant", "content": a1["text"]}, {"role": "user", "content": _text(words, 21040, 20)}]
    a2, m2, m3 = _turn(server, a_msgs)
    _assert_same_answer(a2, _full_prefill(server, a_msgs))
    assert _delta(m2, m3, "vllm_sink:session_tokens_reused_total") == len(a_history) - 1


def test_cache_salt_keeps_tenants_apart(server, words):
    """vLLM's ``cache_salt`` keeps tenants' cached KV apart (its prefix cache hashes it).
    A request of another salt must not resume a stream kept for the first one."""
    msgs = [{"role": "system", "content": "Montano reads the play aloud."},
            {"role": "user", "content": _text(words, 24000, 40)}]
    first = _chat(server, msgs, cache_salt="tenant-one")
    msgs += [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": _text(words, 24040, 20)}]
    got, m0, m1 = _turn(server, msgs, cache_salt="tenant-two")
    _assert_same_answer(got, _full_prefill(server, msgs))
    assert _delta(m0, m1, "vllm_sink:session_resumes_total") == 0
