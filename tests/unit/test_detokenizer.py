"""The front end's detokeniser primed with the prompt's last tokens (``patches/detokenizer.py``):
every generated token's text equals vLLM's (primed with the whole prompt), on real text with
multi-byte characters and at every kind of cut; the wrap replaces the stream only once a
sink engine's configuration was built in the process. No engine."""

from __future__ import annotations

import random

import pytest

from vllm_sink.patches.frontend import detokenizer
from vllm_sink.patches.frontend.detokenizer import PRIME_MAX, PRIME_MIN, prompt_suffix

# Real text with characters of 2, 3 and 4 UTF-8 bytes, which byte-level BPE splits into
# several tokens (a cut can fall inside one).
EXTRA = " café naïve — “quoted” 日本語のテキスト 🙂🎭 über straße "


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from vllm_sink import assets

    return AutoTokenizer.from_pretrained(assets.model_dir())


@pytest.fixture(scope="module")
def ids(tok):
    from vllm_sink import assets

    words = assets.play_text("hamlet").split()[:3000]
    for i in range(0, len(words), 97):
        words[i] += EXTRA
    return tok(" ".join(words), add_special_tokens=False)["input_ids"]


def _steps(backend, prime: list[int], continuation: list[int]) -> list[str | None]:
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(ids=prime, skip_special_tokens=True)
    return [stream.step(backend, t) for t in continuation]


def test_suffix_rule(tok, ids):
    backend = tok.backend_tokenizer
    assert prompt_suffix(backend, ids[:PRIME_MAX]) is None  # short prompts keep vLLM's priming
    cut_inside = whole = 0
    for end in range(PRIME_MAX + 1, 4000, 7):
        suffix = prompt_suffix(backend, ids[:end])
        if suffix is None:  # the prompt ends inside a character: vLLM's priming is kept
            assert all("\ufffd" in backend.decode(ids[end - n:end]) for n in range(PRIME_MIN, PRIME_MAX + 1))
            whole += 1
            continue
        assert PRIME_MIN <= len(suffix) <= PRIME_MAX
        assert list(suffix) == ids[end - len(suffix):end]
        assert "\ufffd" not in backend.decode(list(suffix), skip_special_tokens=False)
        cut_inside += len(suffix) > PRIME_MIN
    assert cut_inside > 0  # some suffixes would have started inside a character
    assert whole < 40  # of 568 cuts


def test_same_text_as_whole_prompt_priming(tok, ids):
    """At 400 cuts of real text (many inside multi-byte characters), the next 24 tokens
    (the text's own, then random ids, then the byte pieces of an emoji) decode to the same
    pieces whether the stream was primed with the whole prompt or with the suffix."""
    backend = tok.backend_tokenizer
    rng = random.Random(0)
    emoji = tok("🙂🎭", add_special_tokens=False)["input_ids"]
    compared = 0
    for end in sorted(rng.sample(range(PRIME_MAX + 1, len(ids) - 16), 400)):
        prompt = ids[:end]
        cont = ids[end:end + 16] + [rng.randrange(len(tok)) for _ in range(4)] + emoji
        suffix = prompt_suffix(backend, prompt) or prompt
        assert _steps(backend, list(suffix), cont) == _steps(backend, prompt, cont), end
        compared += len(cont)
    assert compared >= 400 * 20


def test_wrap_primes_with_suffix_once_active(tok, ids, monkeypatch):
    from vllm.sampling_params import SamplingParams
    from vllm.tokenizers import get_tokenizer
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer, IncrementalDetokenizer

    from vllm_sink import assets

    detokenizer.install()
    vtok = get_tokenizer(str(assets.model_dir()))
    prompt = ids[:5000]
    cont = ids[5000:5040]

    def request():
        return EngineCoreRequest(request_id="r", prompt_token_ids=prompt, mm_features=None,
                                 sampling_params=SamplingParams(max_tokens=64), pooling_params=None,
                                 arrival_time=0.0, lora_request=None, cache_salt=None, data_parallel_rank=None)

    monkeypatch.setattr(detokenizer, "_active", False)
    plain = IncrementalDetokenizer.from_new_request(vtok, request())
    assert isinstance(plain, FastIncrementalDetokenizer)
    expected = [plain.decode_next(t) for t in cont]

    import tokenizers

    real, primes = tokenizers.decoders.DecodeStream, []

    def recording(ids=None, **kwargs):
        primes.append(list(ids))
        return real(ids=ids, **kwargs)

    monkeypatch.setattr(tokenizers.decoders, "DecodeStream", recording)
    monkeypatch.setattr(detokenizer, "_active", True)
    primed = IncrementalDetokenizer.from_new_request(vtok, request())
    assert len(primes[0]) == 5000  # vLLM's own priming, replaced by the suffix
    assert primes[-1] == list(prompt_suffix(vtok._tokenizer, prompt)) and len(primes[-1]) <= PRIME_MAX
    # The suffix-primed stream decodes the prompt's last tokens only: the first step's text
    # is the same, its cost no longer the prompt's length.
    assert [primed.decode_next(t) for t in cont] == expected
    assert "".join(expected) == tok.decode(cont)


@pytest.mark.parametrize("stop,include", [(None, False), (["LATE", "\n\n", "ō"], False), (["LATE"], True)])
def test_streamed_request_keeps_bounded_state_with_the_same_pieces(tok, ids, monkeypatch, stop, include):
    """A streamed request (``DELTA``) through the bounded detokeniser: every piece, the stop
    string found and the finished text's end are vLLM's, token by token over 3,000 tokens of
    real text, while it holds at most ``2 x IDS_KEEP`` ids and the text not yet sent plus
    ``TEXT_SLACK`` + the longest stop string of characters (the wraps made to cut often)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.tokenizers import get_tokenizer
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer

    from vllm_sink import assets
    from vllm_sink.token_tail import TokenTail

    detokenizer.install()
    monkeypatch.setattr(detokenizer, "IDS_KEEP", 50)
    monkeypatch.setattr(detokenizer, "TEXT_SLACK", 64)
    vtok = get_tokenizer(str(assets.model_dir()))
    prompt, cont = ids[:40], ids[40:3040]
    if stop:  # "LATE": a phrase of the text far in (found after many cuts), once
        text = tok.decode(cont)
        late = next(text[i:i + 9] for i in range(len(text) * 3 // 4, len(text)) if text.count(text[i:i + 9]) == 1)
        stop = [late if s == "LATE" else s for s in stop]

    def run(active: bool):
        monkeypatch.setattr(detokenizer, "_active", active)
        params = SamplingParams(max_tokens=4000, stop=stop, include_stop_str_in_output=include,
                                output_kind=RequestOutputKind.DELTA)
        req = EngineCoreRequest(request_id="r", prompt_token_ids=prompt, mm_features=None,
                                sampling_params=params, pooling_params=None, arrival_time=0.0,
                                lora_request=None, cache_salt=None, data_parallel_rank=None)
        d = IncrementalDetokenizer.from_new_request(vtok, req)
        pieces, held, found = [], 0, None
        for i in range(0, len(cont), 3):  # three ids per engine step
            found = d.update(cont[i:i + 3], False)
            pieces.append(d.get_next_output_text(found is not None, True))
            held = max(held, d._last_output_text_offset)  # the sent text still kept
            if found is not None:
                break
        else:
            pieces.append(d.get_next_output_text(True, True))
        return pieces, found, d, held

    expected, found, plain, _ = run(False)
    got, found2, bounded, held = run(True)
    assert got == expected and found2 == found
    assert isinstance(bounded.token_ids, TokenTail) and bounded.num_output_tokens() == plain.num_output_tokens()
    assert len(bounded.token_ids.tail) < 2 * 50
    longest = max((len(s) for s in stop or ()), default=0)
    assert held < 64 + longest + 3 * 8  # sent text kept: below the slack, the stop length and a step's piece
    assert len(plain.output_text) > 1000 or found is not None
    if stop:
        assert found is not None and len(plain.output_text) > 5000  # found after many cuts
