"""Chat prompts tokenised by segment (``patches/chat_tokens.py``): the ids equal the plain
tokenizer's on real SmolLM2 chat renders and on edge cases, a re-sent history tokenises only
its new pieces, the cache keeps to its bound, a tokenizer the property does not hold for is
refused, and vLLM's renderer goes through the wrap (sink + sessions only). No engine."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_sink.patches.frontend.chat_tokens import _ENTRY_OVERHEAD, SegmentTokenizer

PLAIN = {"add_special_tokens": False}
CHAT = {"add_special_tokens": False, "truncation": True, "max_length": 1_048_577}  # vLLM's chat kwargs


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from vllm_sink import assets

    return AutoTokenizer.from_pretrained(assets.model_dir())


@pytest.fixture(scope="module")
def chat(tok):
    """A long real chat: Hamlet user turns, short replies; ``render(n)``: its first ``n``
    user/assistant pairs and the last user turn, rendered as vLLM renders them."""
    from vllm_sink import assets

    words = assets.play_text("hamlet").split()
    msgs = [{"role": "system", "content": "You are a patient reader."}]
    for t in range(60):
        s = (t * 97) % (len(words) - 120)
        msgs.append({"role": "user", "content": " ".join(words[s:s + 40 + t % 80])})
        msgs.append({"role": "assistant", "content": f" Reply {t}: the cat and so of" + " ok" * (t % 5)})

    def render(n: int, last: str = "And then?") -> str:
        return tok.apply_chat_template(msgs[:1 + 2 * n] + [{"role": "user", "content": last}],
                                       tokenize=False, add_generation_prompt=True)
    return render


def plain(tok, text, special=False):
    return tok(text, add_special_tokens=special).input_ids


def seg_of(tok, max_bytes=1 << 26) -> SegmentTokenizer:
    seg = SegmentTokenizer(tok, max_bytes, verify=0)
    assert seg.enabled
    return seg


def test_real_chat_turns_match_and_reuse(tok, chat):
    seg = seg_of(tok)
    for n in (0, 1, 2, 10, 30, 59):
        text = chat(n)
        misses = seg.misses
        assert seg.encode(text, CHAT) == plain(tok, text)
        if n == 59:  # the turn after 30: only the pieces of turns 31..59 are new
            assert seg.misses - misses <= 2 * (59 - 30) + 2
    # The same history again: nothing to tokenise.
    misses = seg.misses
    assert seg.encode(chat(59), CHAT) == plain(tok, chat(59))
    assert seg.misses == misses


def test_add_special_tokens_and_last_turn_variants(tok, chat):
    seg = seg_of(tok)
    for last in ("", " ", "日本語 🙂 héllo\u00a0wörld", "<|im_end|>typed by the user<|im_start|>", "\n\n  \t"):
        text = chat(5, last)
        for special in (False, True):
            assert seg.encode(text, {"add_special_tokens": special}) == plain(tok, text, special)


@pytest.mark.parametrize("text", [
    "",
    "no special tokens at all, just text\nover two lines  ",
    "<|im_start|><|im_end|><|im_start|>",                      # added tokens adjacent
    "<|im_start|>",
    "a   <|im_end|>   b",                                      # boundary inside whitespace
    "\n\n<|im_start|>\n\n<|im_end|>\n",
    "  <|im_start|>  ",
    "<<|im_start|>>",
    "<|im_end|",                                               # a partial added token
    "<|im_start|im_end|>",
    "日本語<|im_end|>🙂<|endoftext|>héllo  wörld\u2028x",        # unicode on both sides
    "x" * 5000 + "<|im_end|>" + " y" * 3000,
    "<jupyter_start><jupyter_text>text<jupyter_code>code<empty_output>",
])
def test_edge_cases(tok, text):
    seg = seg_of(tok)
    for _ in range(2):  # a cold pass, then all pieces from the cache
        assert seg.encode(text, PLAIN) == plain(tok, text)
        assert seg.encode(text, {"add_special_tokens": True}) == plain(tok, text, True)


def test_cache_bound(tok, chat):
    bound = 6_000
    seg = seg_of(tok, bound)
    for n in (10, 20, 40, 59):
        text = chat(n)
        assert seg.encode(text, CHAT) == plain(tok, text)
        assert 0 < seg.bytes <= bound
    assert len(seg) < 2 * 59  # evicted, least recently used first: the newest pieces stay
    assert all(piece in chat(59) for piece in seg._cache)
    assert seg.bytes == sum(sys.getsizeof(k) + sys.getsizeof(v) + _ENTRY_OVERHEAD for k, v in seg._cache.items())
    # A piece larger than the whole bound is tokenised, not kept.
    big = "word " * 5000
    assert seg.encode(big, PLAIN) == plain(tok, big)
    assert big not in seg._cache and seg.bytes <= bound


def test_truncation_and_unknown_kwargs_fall_back(tok, chat):
    seg = seg_of(tok)
    text = chat(3)
    n = len(plain(tok, text))
    assert seg.encode(text, {"add_special_tokens": False, "truncation": True, "max_length": n}) == plain(tok, text)
    assert seg.encode(text, {"add_special_tokens": False, "truncation": True, "max_length": n - 1}) is None
    assert seg.encode(text, {"add_special_tokens": False, "return_offsets_mapping": True}) is None


def test_first_requests_verified(tok, chat):
    seg = SegmentTokenizer(tok, 1 << 26, verify=2)
    text = chat(4)
    assert seg.encode(text, CHAT) == plain(tok, text)
    assert seg.verify_left == 1 and seg.enabled
    # A cache entry gone wrong is caught while requests are still verified: off, plain path.
    piece = next(p for p in seg._cache if len(seg._cache[p]) > 3)
    seg._cache[piece] = seg._cache[piece][::-1]
    assert seg.encode(text, CHAT) is None
    assert not seg.enabled and len(seg) == 0
    assert seg.encode(text, CHAT) is None


def test_refused_where_segments_differ():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "▁a": 1, "a": 2, "▁b": 3, "b": 4}

    def make(scheme, **token_flags):
        tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
        tk.add_special_tokens([AddedToken("<s>", special=True, normalized=False, **token_flags)])
        return PreTrainedTokenizerFast(tokenizer_object=tk)

    assert SegmentTokenizer(make("always"), 1 << 20).enabled
    # SentencePiece-style "first": only the text's first piece gets "▁" (the probe sees it).
    first = make("first")
    assert first("a b<s>a b", add_special_tokens=False).input_ids == [1, 3, 5, 2, 3]
    assert not SegmentTokenizer(first, 1 << 20).enabled
    # Added tokens that eat whitespace are not split exactly by a plain match: refused.
    assert not SegmentTokenizer(make("always", rstrip=True), 1 << 20).enabled


def test_threads(tok, chat):
    seg = seg_of(tok, 40_000)
    texts = [chat(n) for n in range(0, 60, 3)]
    want = [plain(tok, t) for t in texts]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda t: seg.encode(t, CHAT), texts * 3)) == want * 3


# ----------------------------------------------------------------- the wrap, in vLLM's renderer
@pytest.fixture(scope="module")
def renderers():
    """vLLM's own renderers (as the API server builds them) for sink + sessions, and sink
    without sessions."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.renderers.registry import renderer_from_config

    from vllm_sink import assets

    out = {}
    for name, sessions in (("sessions", True), ("no_sessions", False)):
        cfg = EngineArgs(model=str(assets.model_dir()), additional_config={
            "kv_policy": "sink", "kv_window": 1024, "kv_sessions": sessions}).create_engine_config()
        out[name] = renderer_from_config(cfg)
    yield out
    for r in out.values():
        r.shutdown()


def test_renderer_goes_through_the_wrap(renderers, chat):
    import asyncio

    from vllm.renderers.base import BaseRenderer
    from vllm.renderers.params import ChatParams

    from vllm_sink import patches
    from vllm_sink.patches.frontend import chat_tokens

    patches.install()
    fn = BaseRenderer._tokenize_prompt
    assert fn._vllm_sink and not getattr(fn.__wrapped__, "_vllm_sink", False)
    patches.install()
    assert BaseRenderer._tokenize_prompt is fn  # idempotent

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <3 日本語"},
            {"role": "assistant", "content": " Hello!"}, {"role": "user", "content": "And then?"}]
    params = ChatParams(chat_template_content_format="string",
                        chat_template_kwargs={"add_generation_prompt": True})
    for name, r in renderers.items():
        tok = r.get_tokenizer()
        for turn in (2, 4):
            _, (sync_prompt,) = r.render_chat([msgs[:turn]], params)
            _, (async_prompt,) = asyncio.run(r.render_chat_async([msgs[:turn]], params))
            text = tok.apply_chat_template(msgs[:turn], tokenize=False, add_generation_prompt=True)
            want = tok(text, add_special_tokens=False).input_ids
            assert sync_prompt["prompt_token_ids"] == async_prompt["prompt_token_ids"] == want
        (cmpl,) = r.render_cmpl([{"prompt": "a text <|im_end|> prompt"}])
        assert cmpl["prompt_token_ids"] == tok("a text <|im_end|> prompt").input_ids
        seg = chat_tokens.segments_of(r)
        if name == "sessions":
            assert seg is not None and seg.enabled and len(seg) > 0
        else:
            assert seg is None


def test_post_processor_special_tokens():
    """A tokenizer that adds BOS/EOS (``add_special_tokens=True``, Completions' default), with
    an added token that begins another (matched leftmost-longest, as tokenizers does)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "<s>": 3, "</s>": 4, "<sep>": 5, "<sep>a": 6}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<s>", "</s>", "<sep>", "<sep>a")])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 3), ("</s>", 4)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tk)
    seg = SegmentTokenizer(hf, 1 << 20, verify=0)
    assert seg.enabled and seg._specials == ((3,), (4,))
    assert hf("<sep>a b", add_special_tokens=False).input_ids == [6, 2]
    for text in ("a b<sep>b a", "", "<sep>", "a  <sep><sep> c", "<sep>a<sep>ab<sep><sep>a"):
        for special in (False, True):
            assert seg.encode(text, {"add_special_tokens": special}) == hf(text, add_special_tokens=special).input_ids


def test_active_only_with_sessions(renderers, tok, monkeypatch):
    """Sink + sessions: on; the bound at 0, sink without sessions, or vanilla vLLM: off."""
    from types import SimpleNamespace

    from vllm_sink.patches.frontend.chat_tokens import segments_of

    def fake(additional_config):
        return SimpleNamespace(config=SimpleNamespace(additional_config=additional_config), tokenizer=tok)

    on = renderers["sessions"].config.additional_config
    assert segments_of(fake(on)) is not None
    assert segments_of(fake(renderers["no_sessions"].config.additional_config)) is None
    assert segments_of(fake({})) is None and segments_of(fake(None)) is None
    monkeypatch.setenv("VLLMSINK_TOKEN_CACHE_MB", "0")
    assert segments_of(fake(on)) is None
