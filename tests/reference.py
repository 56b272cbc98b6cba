"""An independent, plain-PyTorch implementation of StreamingLLM, for Llama models here and
for the other families in ``tests/reference_families.py``.

It does not import vLLM or vllm_sink. It follows the paper's semantics directly, the way
the research code does: keys are cached *before* RoPE, and at every step the visible keys
get their positions re-assigned within the cache and are rotated afresh.

The contract (the sink policy's, as vllm_sink.policy implements it): a step computes tokens ``[a, b)``; the window starts at
``w0 = max(S, floor((a - W + 1 - r) / B) * B + r)`` with ``r = S mod B`` (0 for whole sink
pages); query ``t`` sees the sink ``[0, S)`` and the
window ``[w0, t]``; sink token ``j`` sits at position ``j``, window token ``p`` at
``S + (p - w0)`` and query ``t`` at ``S + (t - w0)``. ``window=None`` is dense attention.

:class:`StreamingReference` is that contract, family-agnostic: the visible set, the
positions, the pre-RoPE cache and the attention over it. A family subclass gives the
architecture (``embed``, ``layer``, ``head``), calling ``attend(i, q, k, v)`` for the
attention of layer ``i`` with its pre-RoPE queries, keys and values; ``scores`` positions
them (RoPE here; ALiBi families override it with a bias on the key-query distance, in the
same contract positions).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def contract_w0(a: int, sink_tokens: int, window: int, block_size: int) -> int:
    """The contract's window start: page-aligned, shifted by the sink's offset in its last
    page (``w0 = S mod B``), never before the sink's end."""
    r = sink_tokens % block_size
    return max(sink_tokens, math.floor((a - window + 1 - r) / block_size) * block_size + r)


def rope_params(cfg: dict) -> dict:
    """The config's RoPE parameters (``rope_parameters``, or the older ``rope_scaling`` and
    ``rope_theta``), with ``rope_type`` and ``rope_theta`` always present."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return rope


def rope_inv_freq(rotary_dim: int, rope: dict) -> torch.Tensor:
    """Inverse frequencies (float64) of the ``rotary_dim // 2`` rotated pairs: plain RoPE,
    or Llama 3's (``rope_type: llama3``: long wavelengths divided by ``factor``, a smooth
    ramp between ``original / low_freq_factor`` and ``original / high_freq_factor``)."""
    inv = 1.0 / (rope["rope_theta"] ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    kind = rope["rope_type"]
    if kind == "default":
        return inv
    if kind != "llama3":
        raise NotImplementedError(f"the reference implements plain and llama3 RoPE, not {kind!r}")
    factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    ramp = (1 - smooth) * inv / factor + smooth * inv
    return torch.where(wavelen > old / lo, inv / factor, torch.where(wavelen < old / hi, inv, ramp))


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, neox: bool) -> torch.Tensor:
    """x: [n, heads, head_dim] rotated at ``positions`` [n] on its first ``2 * len(inv_freq)``
    channels (partial rotary leaves the rest), pairs ``(i, i + half)`` (neox, rotate-half) or
    ``(2i, 2i + 1)`` (GPT-J, interleaved); angles in float64."""
    ang = torch.outer(positions.to(torch.float64), inv_freq)
    cos = ang.cos().to(x.dtype)[:, None, :]
    sin = ang.sin().to(x.dtype)[:, None, :]
    rot, rest = x[..., : 2 * inv_freq.numel()], x[..., 2 * inv_freq.numel():]
    if neox:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1)


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def layer_norm(x, weight, bias, eps):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)


class StreamingReference:
    """The contract's streaming attention over a pre-RoPE cache, for any family.

    A subclass sets ``n_layers``, ``n_heads``, ``n_kv``, ``head_dim``, ``inv_freq`` (its
    length fixes the rotary channels) and ``neox``, and implements
    ``embed(ids)``, ``layer(i, x, attend)`` and ``head(x)`` from the weights ``self.w``
    (the model's Hugging Face names, in ``dtype``)."""

    neox = True
    # Finished runs kept so that a later run sharing their first passes (the same tokens,
    # steps and contract) starts after them (0: none kept). See :meth:`stream_logits`.
    keep_runs = 0

    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32):
        model_dir = Path(model_dir)
        self.cfg = json.loads((model_dir / "config.json").read_text())
        self.dtype = dtype
        w = load_file(str(model_dir / "model.safetensors"))
        self.w = {k: v.to(dtype) for k, v in w.items()}

    def linear(self, x, name: str):
        """``x @ W.T (+ b)`` for the weights ``name.weight`` (and ``name.bias`` if saved)."""
        y = x @ self.w[name + ".weight"].T
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def heads(self, x, n: int):
        return x.view(x.shape[0], n, self.head_dim)

    def scores(self, q, k, q_pos, key_pos, q_abs, key_abs):
        """Attention logits ``[n_heads, queries, keys]`` of the pre-RoPE queries ``q`` and
        visible keys ``k``, at the contract's positions ``q_pos`` and ``key_pos`` (``q_abs``,
        ``key_abs``: the tokens' absolute indices, for families that want them)."""
        kk = rope(k, key_pos, self.inv_freq, self.neox).repeat_interleave(self.n_heads // self.n_kv, dim=1)
        qq = rope(q, q_pos, self.inv_freq, self.neox)
        return torch.einsum("qhd,khd->hqk", qq, kk) / math.sqrt(self.head_dim)

    # ------------------------------------------------------------------ streaming
    @torch.no_grad()
    def stream_logprobs(self, tokens: list[int], steps: list[tuple[int, int]], **contract) -> torch.Tensor:
        """Run ``tokens`` through the given steps ``[(a, b), ...]`` (contiguous from 0; the
        keywords ``sink_tokens``, ``window``, ``block_size`` of :meth:`stream_logits`) and
        return ``lp[t] = log p(tokens[t + 1] | the tokens visible to query t)`` for every
        computed query ``t`` with a next token (length ``len(tokens) - 1``, NaN where no
        step computed ``t``)."""
        out = torch.full((len(tokens) - 1,), float("nan"), dtype=torch.float64)
        for a, b, logits in self.stream_logits(tokens, steps, **contract):
            logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
            for t in range(a, min(b, len(tokens) - 1)):
                out[t] = logp[t - a, tokens[t + 1]]
        return out

    @torch.no_grad()
    def stream_logits(self, tokens: list[int], steps: list[tuple[int, int]], *,
                      sink_tokens: int, window: int | None, block_size: int):
        """The same run, yielding ``(a, b, logits)`` per step: the next-token logits of
        queries ``a..b-1`` (``[b - a, vocab]``, in the reference's dtype).

        Steps are computed in passes of :func:`fused_steps`: steps that follow one another
        with the same window start see, query by query, the same keys at the same positions
        whether they run one by one or in one pass (the causal mask ``j <= t`` does the
        rest), so a run of decode steps costs one pass per page, not one per token.

        With ``keep_runs`` set, a run whose first passes are those of a kept run (same
        contract, same passes, same tokens up to their end, and cache rows that no later
        pass of the kept run rewrote) takes those passes' keys and values and final hidden
        states from it instead of computing them again: the same computation on the same
        inputs, so the same bits, less the work."""
        S, B = sink_tokens, block_size
        # Pre-RoPE keys and values of every token seen so far, per layer (row t: token t;
        # rows at and past the step's end are not read).
        n = max((b for _, b in steps), default=0)
        k_cache = [torch.zeros(n, self.n_kv, self.head_dim, dtype=self.dtype) for _ in range(self.n_layers)]
        v_cache = [torch.zeros(n, self.n_kv, self.head_dim, dtype=self.dtype) for _ in range(self.n_layers)]
        ids = torch.tensor(tokens)
        rep = self.n_heads // self.n_kv
        passes = fused_steps(steps, S, window, B)
        contract = (S, window, B)
        kept, done = self._kept_prefix(contract, tokens, passes)
        if done:
            end = passes[done - 1][1]
            for i in range(self.n_layers):
                k_cache[i][:end] = kept["k"][i][:end]
                v_cache[i][:end] = kept["v"][i][:end]
        xs = []
        for j, (a, b, w0, parts) in enumerate(passes):
            if j < done:
                x = kept["x"][j]
                xs.append(x)
                logits = self.head(x)
                for sa, sb in parts:
                    yield sa, sb, logits[sa - a : sb - a]
                continue
            if window is None:
                keys_idx = torch.arange(0, b)
                key_pos = keys_idx.clone()
                q_pos = torch.arange(a, b)
            else:
                keys_idx = torch.cat([torch.arange(0, min(S, b)), torch.arange(min(max(w0, S), b), b)])
                key_pos = torch.where(keys_idx < S, keys_idx, S + keys_idx - w0)
                q_pos = S + torch.arange(a, b) - w0
            # Query t sees key j iff j <= t (the visible set is shared by the step).
            mask = keys_idx[None, :] <= torch.arange(a, b)[:, None]

            def attend(i, q, k, v):
                """Layer ``i``'s attention output ``[b - a, n_heads * head_dim]`` from its
                pre-RoPE ``q`` [b - a, n_heads, head_dim], ``k`` and ``v`` [b - a, n_kv,
                head_dim]; ``k`` and ``v`` join the cache."""
                # Written at ``a``: a step may start before the tokens computed so far (a
                # resumed stream computes its last partial page again).
                k_cache[i][a:b] = k
                v_cache[i][a:b] = v
                vv = v_cache[i][keys_idx].repeat_interleave(rep, dim=1)
                scores = self.scores(q, k_cache[i][keys_idx], q_pos, key_pos, torch.arange(a, b), keys_idx)
                scores = scores.masked_fill(~mask[None], float("-inf"))
                return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).reshape(b - a, -1)

            x = self.embed(ids[a:b])
            for i in range(self.n_layers):
                x = self.layer(i, x, attend)
            xs.append(x)
            logits = self.head(x)
            for sa, sb in parts:
                yield sa, sb, logits[sa - a : sb - a]
        if self.keep_runs:
            runs = self.__dict__.setdefault("_runs", [])
            runs.append(dict(contract=contract, tokens=tuple(tokens), passes=passes, x=xs, k=k_cache, v=v_cache))
            del runs[: -self.keep_runs]

    def _kept_prefix(self, contract, tokens, passes) -> tuple[dict | None, int]:
        """The kept run sharing the most first passes with this one, and how many."""
        best, best_m = None, 0
        for run in self.__dict__.get("_runs", []):
            if run["contract"] != contract:
                continue
            theirs = run["passes"]
            m = 0
            while m < min(len(passes), len(theirs)) and passes[m] == theirs[m]:
                m += 1
            # Their rows [0, end) must hold what their pass m - 1 left there: no later pass
            # of theirs wrote below its end (a resumed stream's step starts before it).
            while m and any(a < theirs[m - 1][1] for a, _, _, _ in theirs[m:]):
                m -= 1
            while m and tuple(tokens[: passes[m - 1][1]]) != run["tokens"][: passes[m - 1][1]]:
                m -= 1
            if m > best_m:
                best, best_m = run, m
        return best, best_m


def fused_steps(steps: list[tuple[int, int]], sink_tokens: int, window: int | None, block_size: int,
                max_tokens: int = 256) -> list[tuple[int, int, int | None, list[tuple[int, int]]]]:
    """The steps grouped into passes ``(a, b, w0, [(a_i, b_i), ...])``: a pass joins steps
    that follow one another (each starts where the last ended) and have the same window
    start ``w0`` (``None`` for dense attention), up to ``max_tokens`` queries."""
    passes: list = []
    for a, b in steps:
        w0 = None if window is None else contract_w0(a, sink_tokens, window, block_size)
        last = passes[-1] if passes else None
        if last is not None and last[1] == a and last[2] == w0 and b - last[0] <= max_tokens:
            passes[-1] = (last[0], b, w0, last[3] + [(a, b)])
        else:
            passes.append((a, b, w0, [(a, b)]))
    return passes


class ReferenceLlama(StreamingReference):
    """Llama (also Mistral without sliding window, SmolLM2; Llama 3 rope scaling); Qwen3 and
    Gemma in ``reference_families`` are small variations of it."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32):
        super().__init__(model_dir, dtype)
        cfg = self.cfg
        self.n_layers = cfg["num_hidden_layers"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads") or self.n_heads
        self.hidden = cfg["hidden_size"]
        self.head_dim = cfg.get("head_dim") or self.hidden // self.n_heads
        self.eps = cfg["rms_norm_eps"]
        self.inv_freq = rope_inv_freq(self.head_dim, rope_params(cfg))
        if "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]

    def _norm(self, x, weight):
        return rms_norm(x, weight, self.eps)

    def _act(self, gate):
        return torch.nn.functional.silu(gate)

    def qk(self, p, h):
        """Layer prefix ``p``'s pre-RoPE queries and keys of ``h``."""
        q = self.heads(self.linear(h, p + "self_attn.q_proj"), self.n_heads)
        k = self.heads(self.linear(h, p + "self_attn.k_proj"), self.n_kv)
        return q, k

    def embed(self, ids):
        return self.w["model.embed_tokens.weight"][ids]

    def layer(self, i, x, attend):
        p = f"model.layers.{i}."
        h = self._norm(x, self.w[p + "input_layernorm.weight"])
        q, k = self.qk(p, h)
        v = self.heads(self.linear(h, p + "self_attn.v_proj"), self.n_kv)
        x = x + self.linear(attend(i, q, k, v), p + "self_attn.o_proj")
        h = self._norm(x, self.w[p + "post_attention_layernorm.weight"])
        return x + self.mlp(i, h, p)

    def mlp(self, i, h, p):
        """Layer ``i``'s (prefix ``p``) MLP of ``h``: a gated one (SwiGLU)."""
        return self.swiglu(h, p + "mlp.gate_proj", p + "mlp.up_proj", p + "mlp.down_proj")

    def swiglu(self, h, gate, up, down):
        return self.linear(self._act(self.linear(h, gate)) * self.linear(h, up), down)

    def head(self, x):
        return self._norm(x, self.w["model.norm.weight"]) @ self.w["lm_head.weight"].T


def chunked_steps(n_prompt: int, chunk: int, n_total: int) -> list[tuple[int, int]]:
    """vLLM's schedule for one request alone: prompt chunks of ``chunk`` tokens, then one
    token per decode step up to ``n_total`` tokens (the last token is never fed)."""
    steps = [(a, min(a + chunk, n_prompt)) for a in range(0, n_prompt, chunk)]
    steps += [(t, t + 1) for t in range(n_prompt, n_total - 1)]
    return steps
