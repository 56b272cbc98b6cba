"""The system prompt as the sink: each chat request's sink is its own rendered first message.

With ``sink_tokens="system"`` (``--sink-tokens system``) a chat request keeps its system prompt
(its first message) as its attention sink, so the instructions are never evicted however far
the conversation streams. The front end measures the sink here, where a chat request's
messages and its final prompt token ids meet, and hands it to the engine as the request's
own sink (``vllm_xargs["sink_tokens"]``, the per-request sink that ``input_processor`` checks
and the scheduler and worker execute); requests of different sinks run in one batch.

The sink of a request is the number of tokens of its prompt that the rendering of its first
message alone produces as a prefix: the first message is rendered with the request's own chat
template and options (tools included, so a template that writes the tools into the system
block gets them in the sink) but without a generation prompt or a continued final message,
tokenised like the prompt (through ``chat_tokens``' segment cache: the system prompt's pieces
are usually cached), and compared token by token with the full prompt's ids. The common
prefix is the sink, so a template that adds a BOS or a date still gives a prefix of the real
prompt. A template that renders no system message of its own for the first message (e.g. it
folds it into the first user turn) gives the shorter common prefix.

* The request gave ``vllm_xargs={"sink_tokens": n}`` itself: its value wins, nothing is
  rendered.
* The first message is over ``max_sink_tokens``: a system (or developer) message is refused,
  ``SinkConfigError`` (a ``ValueError``: vLLM's handler answers HTTP 400) naming its size, the
  cap and the fix; any other first message (a chat without a system prompt whose first user
  message is long) keeps the engine's sink.
* A chat without a system message: its first message is the sink (as the template renders it
  alone: SmolLM2's adds its default system prompt before it).

Binds to (``vllm/renderers/online_renderer.py``):
  OnlineRenderer.preprocess_chat(request, messages, default_template,
      default_template_content_format, default_template_kwargs, tool_dicts=None, parser=None,
      *, skip_mm_cache=False) -> (conversations, [engine_input])     wrapped: the one place
      where Chat Completions (``OpenAIServingChat.render_chat_request`` ->
      ``OnlineRenderer.render_chat``; Anthropic ``/v1/messages`` converts to it) and the
      Responses API (``OpenAIServingResponses._make_request`` / ``_render_next_turn``; the
      ``instructions`` are its system message) render a conversation, before the caller builds
      the sampling params from the same request object (``request.to_sampling_params`` reads
      ``request.vllm_xargs`` into ``SamplingParams.extra_args``). Not covered: the batch
      endpoint ``/v1/chat/completions/batch`` (it builds its sampling params from other
      request objects: those requests keep the engine's sink) and gpt-oss (Harmony) prompts
      (not a sink-policy architecture).
  OnlineRenderer: renderer (BaseRenderer), model_config (multimodal_config, enable_prompt_embeds)
  ChatCompletionRequest / ResponsesRequest: build_chat_params(template, content_format),
    build_tok_params(model_config), vllm_xargs, mm_processor_kwargs
  ChatParams.with_defaults(...), dataclasses.replace(chat_params, chat_template_kwargs=...)
  BaseRenderer: config (VllmConfig.additional_config), tokenizer,
    render_messages_async(messages, chat_params) -> (conversation, prompt),
    tokenize_prompt_async(prompt, tok_params) -> {"prompt_token_ids": ...}
  vllm.renderers.merge_kwargs, vllm.utils.mistral.is_mistral_tokenizer

Active only when the engine's resolved settings carry the sink policy with
``sink_tokens="system"`` (``SinkConfig.sink_from``); every other engine passes straight
through. ``install()`` is idempotent.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm.logger import init_logger

from vllm_sink.config import REQUEST_SINK_KEY, SinkConfig, SinkConfigError
from vllm_sink.patches.bindings import holds, wrap_once

logger = init_logger("vllm." + __name__)

ATTR = "_vllm_sink_system_cap"  # on the OnlineRenderer: the cap (int), or None (pass through)
SYSTEM_ROLES = ("system", "developer")


def system_sink_cap(online_renderer) -> int | None:
    """The largest system-prompt sink of the engine behind ``online_renderer``, or ``None``
    if its engine does not take chat sinks from the system prompt."""
    cap = online_renderer.__dict__.get(ATTR, False)
    if cap is False:
        try:
            additional = online_renderer.renderer.config.additional_config
            cfg = SinkConfig.from_additional_config(additional)
            geometry = SinkConfig.geometry_from_additional_config(additional)
        except Exception:  # a malformed config is the engine's to refuse, not ours
            cfg = geometry = None
        cap = geometry.sink_cap if cfg is not None and cfg.enabled and cfg.system_sink and geometry else None
        setattr(online_renderer, ATTR, cap)
    return cap


def common_prefix(a, b) -> int:
    n, m = 0, min(len(a), len(b))
    while n < m and a[n] == b[n]:
        n += 1
    return n


def _role(message) -> str | None:
    return message.get("role") if isinstance(message, dict) else getattr(message, "role", None)


def too_long_message(role: str, n: int, cap: int) -> str:
    what = "system prompt" if role == "system" else f"first message ({role})"
    return (
        f"the {what} has {n} tokens, more than this server's largest sink of {cap} tokens "
        f"(--sink-tokens system keeps the system prompt as the attention sink, so that it is "
        f"never evicted); shorten the {what} to at most {cap} tokens, or start the server "
        f"with a larger --max-sink-tokens"
    )


async def first_message_ids(online_renderer, request, messages, default_template, default_template_content_format,
                            default_template_kwargs, tool_dicts) -> list[int]:
    """The token ids of ``messages[0]`` rendered alone, with the chat params and tokenize
    params ``OnlineRenderer.preprocess_chat`` gives the whole conversation (vLLM's own
    lines, to the generation prompt, which is left off)."""
    from vllm.renderers import merge_kwargs
    from vllm.utils.mistral import is_mistral_tokenizer

    renderer = online_renderer.renderer
    model_config = online_renderer.model_config
    mm_config = model_config.multimodal_config
    default_template_kwargs = merge_kwargs(
        default_template_kwargs,
        dict(tools=tool_dicts,
             tokenize=is_mistral_tokenizer(renderer.tokenizer) or model_config.enable_prompt_embeds),
    )
    chat_params = request.build_chat_params(default_template, default_template_content_format).with_defaults(
        default_template_kwargs,
        default_media_io_kwargs=(mm_config.media_io_kwargs if mm_config else None),
        default_mm_processor_kwargs=getattr(request, "mm_processor_kwargs", None),
    )
    changes: dict[str, Any] = dict(
        chat_template_kwargs={**chat_params.chat_template_kwargs, "add_generation_prompt": False,
                              "continue_final_message": False})
    if holds("vllm.renderers.params", "ChatParams.return_assistant_tokens_mask"):  # vLLM 0.26.0
        changes["return_assistant_tokens_mask"] = False
    chat_params = dataclasses.replace(chat_params, **changes)
    _, prompt = await renderer.render_messages_async(list(messages[:1]), chat_params)
    tokens = await renderer.tokenize_prompt_async(prompt, request.build_tok_params(model_config))
    return list(tokens.get("prompt_token_ids") or ())


async def request_sink(online_renderer, cap: int, request, messages, engine_inputs, template_args) -> int | None:
    """The sink of a chat request (``None``: the engine's), or :class:`SinkConfigError`."""
    if not messages or len(engine_inputs) != 1:
        return None
    prompt_ids = engine_inputs[0].get("prompt_token_ids")
    if not prompt_ids:
        return None
    first = await first_message_ids(online_renderer, request, messages, *template_args)
    n = common_prefix(first, prompt_ids)
    if n == 0:
        return None
    if n > cap:
        role = _role(messages[0]) or "first"
        if role in SYSTEM_ROLES:
            raise SinkConfigError(too_long_message(role, n, cap))
        return None  # a long first user message: the engine's sink (documented)
    return n


def install() -> None:
    """Wrap ``OnlineRenderer.preprocess_chat`` (idempotent); servers whose engine does not
    take chat sinks from the system prompt, and requests that give their own sink, pass
    straight through."""
    from vllm.renderers.online_renderer import OnlineRenderer

    wrap_once(OnlineRenderer, "preprocess_chat", _preprocess_chat)


def _preprocess_chat(orig):
    async def preprocess_chat(self, request: Any, messages, default_template, default_template_content_format,
                              default_template_kwargs, tool_dicts=None, parser=None, **kwargs):
        out = await orig(self, request, messages, default_template, default_template_content_format,
                         default_template_kwargs, tool_dicts, parser, **kwargs)
        cap = system_sink_cap(self)
        xargs = getattr(request, "vllm_xargs", False)
        if cap is None or xargs is False or (xargs and REQUEST_SINK_KEY in xargs):
            return out
        n = await request_sink(self, cap, request, messages, out[1],
                               (default_template, default_template_content_format, default_template_kwargs, tool_dicts))
        if n is not None:
            # A new dict: the request's may be shared (vLLM copies requests shallowly).
            request.vllm_xargs = {**(xargs or {}), REQUEST_SINK_KEY: n}
        return out
    return preprocess_chat
