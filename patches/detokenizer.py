"""The front end's incremental detokeniser primed with the prompt's last tokens, not all of it.

vLLM 0.26 primes each request's ``tokenizers`` ``DecodeStream`` with the *whole* prompt; the
stream's first step then decodes all of it (about 35 ms for 120K tokens on a 2-core CPU),
on the API server's event loop, while the first token waits to be sent. For a chat that
re-sends its history every turn, resumed by the engine in O(new turn), that decode is work
per turn that grows with the history. The text of a generated token depends only on the
tokens just before it, so the stream is primed with the prompt's last tokens instead: the
shortest suffix of 4 to 24 tokens that decodes without a replacement character (a suffix
that starts inside a multi-byte character is skipped), the rule vLLM used before its
native priming; a prompt whose every such suffix decodes with one keeps vLLM's priming.

Binds to vLLM 0.26.0 (``vllm/v1/engine/detokenizer.py``):
  FastIncrementalDetokenizer.__init__(tokenizer, request)   wrapped: its ``stream`` (a
    ``tokenizers.decoders.DecodeStream(ids=prompt_token_ids, skip_special_tokens=...)``) is
    replaced by one primed with the suffix
  FastIncrementalDetokenizer: tokenizer (the ``tokenizers.Tokenizer``), skip_special_tokens
  EngineCoreRequest.prompt_token_ids

Active in a process that built a sink engine's configuration (``activate``, called by
``engine_args``: the API server, an ``LLM``); elsewhere the wrap passes straight through.
The generated text is the same either way (``tests/unit/test_detokenizer.py`` checks it
token by token against vLLM's priming on real text).
"""

from __future__ import annotations

from collections.abc import Sequence

from vllm_sink.patches.wrapping import wrap_once

PRIME_MIN, PRIME_MAX = 4, 24
_active = False


def activate() -> None:
    """Prime with prompt suffixes in this process (a sink engine's configuration was built)."""
    global _active
    _active = True


def prompt_suffix(tokenizer, prompt: Sequence[int]) -> Sequence[int] | None:
    """The shortest suffix of ``PRIME_MIN``..``PRIME_MAX`` tokens of ``prompt`` that decodes
    without a replacement character; ``None``: keep the whole prompt (it is no longer than
    ``PRIME_MAX`` tokens, or every such suffix decodes with one)."""
    if len(prompt) <= PRIME_MAX:
        return None
    for n in range(PRIME_MIN, PRIME_MAX + 1):
        suffix = prompt[-n:]
        if "\ufffd" not in tokenizer.decode(list(suffix), skip_special_tokens=False):
            return suffix
    return None


def install() -> None:
    """Wrap ``FastIncrementalDetokenizer.__init__`` (idempotent)."""
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer

    def make(orig):
        def __init__(self, tokenizer, request):
            orig(self, tokenizer, request)
            prompt = request.prompt_token_ids
            if not _active or prompt is None:
                return
            suffix = prompt_suffix(self.tokenizer, prompt)
            if suffix is not None:
                import tokenizers

                self.stream = tokenizers.decoders.DecodeStream(
                    ids=list(suffix), skip_special_tokens=self.skip_special_tokens)
        return __init__

    wrap_once(FastIncrementalDetokenizer, "__init__", make)
