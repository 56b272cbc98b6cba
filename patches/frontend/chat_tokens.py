"""Chat prompts tokenised by segment: a re-sent history costs the front end its new turn only.

A chat client re-sends the whole conversation every turn; with kept sessions the engine
prefills only the new turn, but the API server would still tokenise the whole rendered
history (0.4 s at 164K tokens). HF fast tokenizers split a text at its added tokens before
normalising and pre-tokenising, and tokenise the pieces between them independently; so the
text is split at its added tokens here, each piece between two of them is looked up in an
LRU cache (bounded in bytes) and only the pieces not in it are tokenised. The ids are the
plain tokenizer's, one for one: the property is checked per tokenizer on a probe text at
first use, and the first requests are tokenised both ways and compared; on any difference,
or a tokenizer whose added tokens strip whitespace or match normalised text, the cache is
off for that tokenizer (logged) and vLLM's own path runs.

Binds to (``vllm/renderers/base.py``):
  BaseRenderer._tokenize_prompt(prompt, params)   wrapped: a text prompt's ids come from
                                                  the segment cache; Chat Completions,
                                                  Completions (text prompts), Responses and
                                                  /tokenize all go through it (its async twin
                                                  ``_tokenize_prompt_async`` is
                                                  ``make_async(self._tokenize_prompt)``, bound
                                                  in ``BaseRenderer.__init__``: the wrap is in
                                                  place before the API server builds its
                                                  renderer, as plugins load first)
  BaseRenderer: config (VllmConfig.additional_config), get_tokenizer(), _wants_offsets(),
    _build_tokens_prompt(token_ids, prompt)
  TokenizeParams.get_encode_kwargs() -> {add_special_tokens, truncation, max_length}
  The tokenizer: transformers 5 ``TokenizersBackend`` (vLLM's cached, thread-pooled HF
    tokenizer): backend_tokenizer.get_added_tokens_decoder() / .encode_special_tokens,
    ``__call__(list[str], add_special_tokens=...)["input_ids"]``

Passes through untouched unless the engine runs the sink policy with sessions on, and for
requests wanting token offsets; a text whose ids would exceed ``max_length`` is tokenised by
vLLM's own path (its truncation rules). ``VLLMSINK_TOKEN_CACHE_MB`` sets the bound (default
256; 0 turns the cache off).
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections import OrderedDict

from vllm.logger import init_logger

from vllm_sink.patches.bindings import wrap_once

logger = init_logger("vllm." + __name__)

ATTR = "_vllm_sink_segments"  # on the renderer: its SegmentTokenizer, or None (pass through)
DEFAULT_MAX_MB = 256
VERIFY_REQUESTS = 3  # requests tokenised both ways per tokenizer before the cache is trusted
_ENTRY_OVERHEAD = 120  # bytes per cache entry beyond its key and id tuple (dict slot, links)

# Probe text: plain text, added tokens adjacent and apart, whitespace and unicode on both
# sides of a boundary, a leading space, text that only looks like an added token.
_PROBE_PARTS = (" Hello  world,\n\n  tabs\tand  spaces  ", "a b", "héllo wörld 日本語 🙂 ", "\n", "",
                "  ", "<|not a token|> <", ">\n\t ", "x", "  \u00a0 y", " 1234 5678")


class SegmentTokenizer:
    """Tokenises text piece by piece between the tokenizer's added tokens, with an LRU cache
    of pieces (``max_bytes``: keys plus ids, estimated). ``encode`` returns the plain
    tokenizer's ids, or ``None`` where it cannot tell them (the caller tokenises)."""

    def __init__(self, tokenizer, max_bytes: int, verify: int = VERIFY_REQUESTS):
        self.tokenizer = tokenizer
        self.max_bytes = max_bytes
        self.verify_left = verify
        self.enabled = False
        self.bytes = 0
        self.hits = self.misses = 0
        self._cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()
        backend = getattr(tokenizer, "backend_tokenizer", None)
        why = self._unsupported(backend)
        if why:
            logger.info("vllm-sink: chat token cache off for this tokenizer: %s", why)
            return
        added = backend.get_added_tokens_decoder()
        self._added = {t.content: i for i, t in sorted(added.items()) if t.content}
        contents = sorted(self._added, key=len, reverse=True)  # leftmost-longest, as tokenizers
        self._split = re.compile("(" + "|".join(map(re.escape, contents)) + ")").split if contents else None
        self._ints = list(range(max(len(tokenizer), max(self._added.values(), default=0) + 1)))
        self._specials = self._special_tokens_around()
        if self._specials is None:
            why = "its post-processor's special tokens are not a fixed prefix and suffix"
        else:
            why = self._probe()
        if why:
            logger.warning("vllm-sink: chat token cache off for this tokenizer: %s", why)
            return
        self.enabled = True

    # ----------------------------------------------------------------- checks
    @staticmethod
    def _unsupported(backend) -> str | None:
        if backend is None or not hasattr(backend, "get_added_tokens_decoder"):
            return "not an HF fast tokenizer"
        if getattr(backend, "encode_special_tokens", False):
            return "it splits special tokens as text"
        for token in backend.get_added_tokens_decoder().values():
            if token.lstrip or token.rstrip or token.single_word:
                return f"added token {token.content!r} strips whitespace or matches single words"
            if token.normalized and backend.normalizer is not None:
                return f"added token {token.content!r} matches normalised text"
        kinds = {}
        for token in backend.get_added_tokens_decoder().values():
            kinds.setdefault(token.normalized, []).append(token.content)
        if any(a in b or b in a for a in kinds.get(True, ()) for b in kinds.get(False, ())):
            return "its normalised and raw added tokens overlap (matched in two passes)"
        return None

    def _plain(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]

    def _special_tokens_around(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """The ids ``add_special_tokens=True`` puts before and after a text's."""
        text = "probe text"
        plain = self._plain([text])[0]
        full = self._plain([text], add_special_tokens=True)[0]
        for i in range(len(full) - len(plain) + 1):
            if full[i:i + len(plain)] == plain:
                return tuple(full[:i]), tuple(full[i + len(plain):])
        return None

    def _probe(self) -> str | None:
        tokens = list(self._added)
        parts = []
        for i, part in enumerate(_PROBE_PARTS):
            parts.append(part)
            if tokens:
                parts.append(tokens[i % len(tokens)])
                parts.append(tokens[(3 * i + 1) % len(tokens)] if i % 2 else "")
        text = "".join(parts)
        for special in (False, True):
            got = self._encode(text, special, cache=False)
            if got != self._plain([text], add_special_tokens=special)[0]:
                return f"tokenising by segment differs from the whole text (add_special_tokens={special})"
        return None

    # ----------------------------------------------------------------- encode
    def _encode(self, text: str, add_special_tokens: bool, cache: bool = True) -> list[int]:
        parts = self._split(text) if self._split is not None else [text]
        pieces = parts[0::2]
        with self._lock:
            got = {}
            for piece in pieces:
                if piece and piece not in got:
                    ids = self._cache.get(piece) if cache else None
                    if ids is not None:
                        self._cache.move_to_end(piece)
                    got[piece] = ids
        missing = [p for p, ids in got.items() if ids is None]
        if missing:
            ints, n = self._ints, len(self._ints)
            for piece, ids in zip(missing, self._plain(missing)):
                # Kept as the table's int objects (8 bytes a token, not 36).
                got[piece] = tuple([ints[i] for i in ids] if max(ids, default=0) < n else ids)
            if cache:
                self._store(missing, got)
        with self._lock:
            self.hits += len(got) - len(missing)
            self.misses += len(missing)
        prefix, suffix = self._specials if add_special_tokens else ((), ())
        out = list(prefix)
        added = self._added
        for i, part in enumerate(parts):
            if i & 1:
                out.append(added[part])
            elif part:
                out.extend(got[part])
        out.extend(suffix)
        return out

    def _store(self, missing: list[str], got: dict) -> None:
        with self._lock:
            for piece in missing:
                ids = got[piece]
                size = sys.getsizeof(piece) + sys.getsizeof(ids) + _ENTRY_OVERHEAD
                if size > self.max_bytes or piece in self._cache:
                    continue
                self._cache[piece] = ids
                self.bytes += size
            while self.bytes > self.max_bytes:
                piece, ids = self._cache.popitem(last=False)
                self.bytes -= sys.getsizeof(piece) + sys.getsizeof(ids) + _ENTRY_OVERHEAD

    def encode(self, text: str, kwargs: dict) -> list[int] | None:
        """The ids of ``tokenizer(text, **kwargs)``, or ``None`` (tokenise it plainly)."""
        if not self.enabled or kwargs.keys() - {"add_special_tokens", "truncation", "max_length"}:
            return None
        special = bool(kwargs.get("add_special_tokens", True))
        ids = self._encode(text, special)
        max_length = kwargs.get("max_length")
        if kwargs.get("truncation") and max_length is not None and len(ids) > max_length:
            return None  # vLLM's own truncation rules apply
        if self.verify_left > 0:
            with self._lock:
                self.verify_left -= 1
            if ids != self._plain([text], add_special_tokens=special)[0]:
                self.enabled = False
                self.clear()
                logger.warning("vllm-sink: chat token cache off: tokenising a request by "
                               "segment differed from the whole text")
                return None
        return ids

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._cache)


def max_cache_bytes() -> int:
    return int(float(os.environ.get("VLLMSINK_TOKEN_CACHE_MB", DEFAULT_MAX_MB)) * 2**20)


_make_lock = threading.Lock()


def segments_of(renderer) -> SegmentTokenizer | None:
    """The renderer's segment tokenizer, made at first use; ``None``: pass through (no sink
    policy with sessions, the cache turned off, or a tokenizer it cannot serve exactly)."""
    seg = renderer.__dict__.get(ATTR, False)
    if seg is not False:
        return seg
    with _make_lock:
        seg = renderer.__dict__.get(ATTR, False)
        if seg is False:
            seg = _make(renderer)
            setattr(renderer, ATTR, seg)
    return seg


def _make(renderer) -> SegmentTokenizer | None:
    from vllm_sink.config import SinkConfig

    try:
        cfg = SinkConfig.from_additional_config(renderer.config.additional_config)
    except Exception:  # a malformed config is the engine's to refuse, not ours
        cfg = None
    max_bytes = max_cache_bytes()
    if cfg is None or not cfg.enabled or not cfg.sessions or max_bytes <= 0 or renderer.tokenizer is None:
        return None
    seg = SegmentTokenizer(renderer.tokenizer, max_bytes)
    if seg.enabled:
        logger.info("vllm-sink: chat prompts tokenised by segment (cache bound %d MiB)", max_bytes >> 20)
    return seg if seg.enabled else None


def install() -> None:
    """Wrap ``BaseRenderer._tokenize_prompt`` (idempotent); renderers of engines without
    the sink policy and sessions pass straight through."""
    from vllm.renderers.base import BaseRenderer

    def tokenize_prompt(orig):
        def _tokenize_prompt(self, prompt, params):
            seg = segments_of(self)
            if seg is None or self._wants_offsets(prompt, params):
                return orig(self, prompt, params)
            ids = seg.encode(prompt["prompt"], params.get_encode_kwargs())
            if ids is None:
                return orig(self, prompt, params)
            return self._build_tokens_prompt(ids, prompt)
        return _tokenize_prompt

    wrap_once(BaseRenderer, "_tokenize_prompt", tokenize_prompt)

