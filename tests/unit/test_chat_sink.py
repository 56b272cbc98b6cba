"""The system prompt as the sink, in vLLM's own chat rendering (``patches/chat_sink.py``): with
``sink_tokens="system"`` a chat request's ``vllm_xargs["sink_tokens"]`` becomes the length of
its rendered first message (the prefix of its prompt ids), an explicit one wins, a system
prompt over the cap is refused with the fix, and other engines pass through. No engine: the
renderers are built from engine configs, as the API server builds them."""

from __future__ import annotations

import asyncio

import pytest

from vllm_sink.config import SinkConfigError

CAP = 64
SYSTEM = {"role": "system", "content": "You are a careful reader of Shakespeare. Answer in one short sentence."}


@pytest.fixture(scope="module")
def online():
    """OnlineRenderers of a system-sink engine and of a plain sink engine."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.renderers.online_renderer import OnlineRenderer
    from vllm.renderers.registry import renderer_from_config

    from vllm_sink import assets, patches

    patches.install()
    out, renderers = {}, []
    for name, sink in (("system", {"sink_tokens": "system", "max_sink_tokens": CAP}), ("plain", {"sink_pages": 1})):
        cfg = EngineArgs(model=str(assets.model_dir()), block_size=16, additional_config={
            "kv_policy": "sink", "kv_window": 1024, **sink}).create_engine_config()
        r = renderer_from_config(cfg)
        renderers.append(r)
        out[name] = OnlineRenderer(cfg.model_config, r, request_logger=None, chat_template=None,
                                   chat_template_content_format="auto")
    yield out
    for r in renderers:
        r.shutdown()


def _chat(online, messages, **kw):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    req = ChatCompletionRequest(model="m", messages=messages, **kw)
    _, (engine_input,) = asyncio.run(online.preprocess_chat(
        req, req.messages, default_template=None, default_template_content_format="auto", default_template_kwargs={}))
    return req, engine_input["prompt_token_ids"]


def _prefix(tok, messages, prompt_ids) -> int:
    ids = tok(tok.apply_chat_template(messages[:1], tokenize=False), add_special_tokens=False).input_ids
    n = 0
    while n < len(ids) and ids[n] == prompt_ids[n]:
        n += 1
    return n


def test_the_sink_is_the_rendered_first_message(online):
    from vllm.renderers.online_renderer import OnlineRenderer

    fn = OnlineRenderer.preprocess_chat
    assert fn._vllm_sink and not getattr(fn.__wrapped__, "_vllm_sink", False)
    from vllm_sink import patches

    patches.install()
    assert OnlineRenderer.preprocess_chat is fn  # idempotent

    r = online["system"]
    tok = r.renderer.get_tokenizer()
    msgs = [SYSTEM, {"role": "user", "content": "Who is Hamlet?"}, {"role": "assistant", "content": "A prince."},
            {"role": "user", "content": "And Ophelia?"}]
    req, ids = _chat(r, msgs)
    n = req.vllm_xargs["sink_tokens"]
    text = tok.apply_chat_template(msgs[:1], tokenize=False)
    assert n == len(tok(text, add_special_tokens=False).input_ids) == _prefix(tok, msgs, ids) == 19
    assert tok.decode(ids[:n]) == text  # the system block, to its end-of-turn newline
    # The same first message, a later turn: the same sink (kept streams resume for it).
    assert _chat(r, msgs[:2])[0].vllm_xargs == {"sink_tokens": n}
    # No system message: the first message as the template renders it alone (SmolLM2 puts
    # its default system prompt first).
    req, ids = _chat(r, msgs[1:])
    assert req.vllm_xargs["sink_tokens"] == _prefix(tok, msgs[1:], ids) > 19
    # Other vllm_xargs are kept; an explicit sink wins (nothing measured).
    assert _chat(r, msgs, vllm_xargs={"other": 1})[0].vllm_xargs == {"other": 1, "sink_tokens": n}
    assert _chat(r, msgs, vllm_xargs={"sink_tokens": 3})[0].vllm_xargs == {"sink_tokens": 3}
    # A first user message over the cap keeps the engine's sink.
    assert _chat(r, [{"role": "user", "content": "word " * 100}])[0].vllm_xargs is None
    # The plain sink engine: untouched.
    assert _chat(online["plain"], msgs)[0].vllm_xargs is None


def test_a_system_prompt_over_the_cap_names_the_fix(online):
    msgs = [{"role": "system", "content": "word " * 100}, {"role": "user", "content": "Hi"}]
    with pytest.raises(SinkConfigError, match=rf"the system prompt has 106 tokens, .* {CAP} tokens.*"
                                              r"shorten the system prompt .* --max-sink-tokens"):
        _chat(online["system"], msgs)
    # A request that names its own sink is served.
    assert _chat(online["system"], msgs, vllm_xargs={"sink_tokens": 16})[0].vllm_xargs == {"sink_tokens": 16}


def test_responses_requests_take_their_instructions(online):
    """The Responses API renders through the same path: ``instructions`` are the system
    message."""
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.openai.responses.utils import construct_input_messages

    r = online["system"]
    req = ResponsesRequest(model="m", instructions=SYSTEM["content"], input="Who is Hamlet?")
    messages = construct_input_messages(request_instructions=req.instructions, request_input=req.input)
    asyncio.run(r.preprocess_chat(req, messages, default_template=None, default_template_content_format="auto",
                                  default_template_kwargs={}))
    assert req.vllm_xargs == {"sink_tokens": 19}
    assert req.to_sampling_params(16, {}).extra_args == {"sink_tokens": 19}
