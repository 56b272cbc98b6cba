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

Binds to (``vllm/v1/engine/detokenizer.py``):
  FastIncrementalDetokenizer.__init__(tokenizer, request)   wrapped: its ``stream`` (a
    ``tokenizers.decoders.DecodeStream(ids=prompt_token_ids, skip_special_tokens=...)``) is
    replaced by one primed with the suffix
  FastIncrementalDetokenizer: tokenizer (the ``tokenizers.Tokenizer``), skip_special_tokens
  EngineCoreRequest.prompt_token_ids

A streamed request (``RequestOutputKind.DELTA``: ``stream=True`` through the OpenAI API)
also keeps bounded state here. vLLM's detokeniser keeps every output id (``token_ids``) and
the whole text (``output_text``) for the request's life, though a streamed request only
reads the ids not yet sent and the text's end: the text not yet sent (the stop strings'
hold-back) and, for the stop-string search, the ``max stop length`` characters before the
new text. Its ``token_ids`` become a ``vllm_sink.token_tail.TokenTail`` (counts every id,
holds the last ``IDS_KEEP`` or more) and, after each streamed piece, the text before what the
stop-string search can still read is cut (in batches of ``TEXT_SLACK`` characters), its
offsets shifted with it: the pieces, the stop strings found and where the text is cut at
them are the same as vLLM's (``tests/unit/test_detokenizer.py``). Requests that are not
streamed keep everything (their response is the whole text), as do requests with a slow
(Python) detokeniser.

Binds also to:
  BaseIncrementalDetokenizer.get_next_output_text(finished, delta)   wrapped
  BaseIncrementalDetokenizer: token_ids, output_text, stop, _last_output_text_offset
  SamplingParams.output_kind, RequestOutputKind.DELTA

Active in a process that built a sink engine's configuration (``activate``, called by
``engine_args``: the API server, an ``LLM``); elsewhere the wraps pass straight through.
The generated text is the same either way (``tests/unit/test_detokenizer.py`` checks it
token by token against vLLM's priming on real text).
"""

from __future__ import annotations

from collections.abc import Sequence

from vllm_sink.patches.bindings import wrap_once
from vllm_sink.token_tail import TokenTail

PRIME_MIN, PRIME_MAX = 4, 24
IDS_KEEP = 1024  # output ids a streamed request's detokeniser holds (at least; vLLM reads
# the ids not yet sent, fewer than the server's --stream-interval)
TEXT_SLACK = 4096  # characters of text cut at once (so each cut is amortised)
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


def bound_streamed(detok, request) -> None:
    """Make a streamed request's detokeniser keep bounded state (see the module docstring):
    its ids a ``TokenTail``, its text cut after each piece (``trim_text``)."""
    from vllm.sampling_params import RequestOutputKind

    params = request.sampling_params
    if params is None or params.output_kind != RequestOutputKind.DELTA:
        return
    detok.token_ids = TokenTail(detok.token_ids, keep=IDS_KEEP)
    detok._vllm_sink_keep_chars = max((len(s) for s in detok.stop), default=0)


def trim_text(detok) -> None:
    """Cut a streamed request's text before what is still read: the text not yet sent and
    the longest stop string's length before it (the stop-string search reads no further
    back); offsets into the text shift with it."""
    keep = getattr(detok, "_vllm_sink_keep_chars", None)
    if keep is None:
        return
    cut = detok._last_output_text_offset - keep
    if cut >= TEXT_SLACK:
        detok.output_text = detok.output_text[cut:]
        detok._last_output_text_offset -= cut


def install() -> None:
    """Wrap ``FastIncrementalDetokenizer.__init__`` and
    ``BaseIncrementalDetokenizer.get_next_output_text`` (idempotent)."""
    from vllm.v1.engine.detokenizer import BaseIncrementalDetokenizer, FastIncrementalDetokenizer

    def make(orig):
        def __init__(self, tokenizer, request):
            orig(self, tokenizer, request)
            prompt = request.prompt_token_ids
            if not _active:
                return
            bound_streamed(self, request)
            if prompt is None:
                return
            suffix = prompt_suffix(self.tokenizer, prompt)
            if suffix is not None:
                import tokenizers

                self.stream = tokenizers.decoders.DecodeStream(
                    ids=list(suffix), skip_special_tokens=self.skip_special_tokens)
        return __init__

    def make_next(orig):
        def get_next_output_text(self, finished, delta):
            text = orig(self, finished, delta)
            if delta:
                trim_text(self)
            return text
        return get_next_output_text

    wrap_once(FastIncrementalDetokenizer, "__init__", make)
    wrap_once(BaseIncrementalDetokenizer, "get_next_output_text", make_next)
