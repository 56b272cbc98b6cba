"""A chat through the stock OpenAI client against `vllm serve --kv-policy sink` (sessions are
on by default; the session's shared server): the client re-sends the whole conversation
each turn, and the server resumes each turn from the stream the previous one left (only the
new turn is prefilled), past the window and the model's 512 positions. Kept conversations'
pages are accounted for in /metrics."""

from __future__ import annotations

import pytest


@pytest.mark.every_vllm
def test_chat_turns_resume(server):
    """Each turn reuses the history: from the prefix cache while the conversation is inside
    the window (its turns are freed as in vLLM, their pages cached), from its kept stream
    once it has passed it (only the new turn is prefilled)."""
    from vllm_sink import assets

    words = assets.play_text("hamlet").split()
    client = server.client()
    messages = [{"role": "system", "content": "You are a patient reader of Shakespeare."}]
    m0 = server.metrics()
    resumed, cached, history = [], [], []
    for turn in range(6):
        messages.append({"role": "user", "content": " ".join(words[turn * 60 : (turn + 1) * 60])})
        before = server.metrics().get("vllm_sink:session_resumes_total", 0)
        reply = client.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        resumed.append(server.metrics()["vllm_sink:session_resumes_total"] - before)
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        history.append(reply.usage.prompt_tokens + reply.usage.completion_tokens)
    m = server.wait_idle()
    usage = reply.usage
    print(f"\nsessions over HTTP: resumes per turn {resumed}, cached tokens per turn {cached}, "
          f"last prompt {usage.prompt_tokens} tokens, "
          f"reused {m['vllm_sink:session_tokens_reused_total'] - m0.get('vllm_sink:session_tokens_reused_total', 0):.0f}, "
          f"kept {m['vllm_sink:kept_sessions']:.0f} ({m['vllm_sink:kept_session_pages']:.0f} pages)")
    assert usage.prompt_tokens > 512  # past the model's positions and the window
    from serverlib import PAGE

    S, W, B = PAGE, 256, PAGE  # serverlib.SINK_FLAGS (one sink page)
    assert resumed[0] == 0
    for i in range(1, 6):
        if history[i - 1] > S + W + B:  # its window moved: the kept stream
            assert resumed[i] == 1 and cached[i] >= history[i - 1] - 2 * B, (i, resumed, cached, history)
        elif history[i - 1] < S + W - B:  # inside the window: the prefix cache, as in vLLM
            assert resumed[i] == 0 and cached[i] >= history[i - 1] // 2, (i, resumed, cached, history)
    assert resumed[-1] == 1 and sum(cached[1:]) > 5 * 300
    # Every page is free or held by a kept conversation.
    assert m["vllm_sink:kept_sessions"] >= 1
    assert m["vllm_sink:free_kv_pages"] + m["vllm_sink:kept_session_pages"] == m["vllm_sink:kv_pool_pages"]
