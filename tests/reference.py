"""An independent, plain-PyTorch implementation of StreamingLLM for Llama models.

It does not import vLLM or vllm_sink. It follows the paper's semantics directly, the way
the research code does: keys are cached *before* RoPE, and at every step the visible keys
get their positions re-assigned within the cache and are rotated afresh.

The contract (MISSION.md): a step computes tokens ``[a, b)``; the window starts at
``w0 = max(S, floor((a - W + 1 - r) / B) * B + r)`` with ``r = S mod B`` (0 for whole sink
pages); query ``t`` sees the sink ``[0, S)`` and the
window ``[w0, t]``; sink token ``j`` sits at position ``j``, window token ``p`` at
``S + (p - w0)`` and query ``t`` at ``S + (t - w0)``. ``window=None`` is dense attention.
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


class ReferenceLlama:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32):
        model_dir = Path(model_dir)
        cfg = json.loads((model_dir / "config.json").read_text())
        self.n_layers = cfg["num_hidden_layers"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv = cfg["num_key_value_heads"]
        self.hidden = cfg["hidden_size"]
        self.head_dim = cfg.get("head_dim") or self.hidden // self.n_heads
        self.eps = cfg["rms_norm_eps"]
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError("the reference implements plain RoPE only")
        self.inv_freq = 1.0 / (
            theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        )
        self.dtype = dtype
        w = load_file(str(model_dir / "model.safetensors"))
        self.w = {k: v.to(dtype) for k, v in w.items()}
        if "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]

    # ------------------------------------------------------------------ pieces
    def _norm(self, x, weight):
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * weight

    def _rope(self, x, positions):
        """x: [n, heads, head_dim]; positions: [n] (int). Neox (rotate-half) style."""
        ang = torch.outer(positions.to(torch.float64), self.inv_freq)
        cos = ang.cos().to(self.dtype)[:, None, :]
        sin = ang.sin().to(self.dtype)[:, None, :]
        half = self.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    # ------------------------------------------------------------------ streaming
    @torch.no_grad()
    def stream_logprobs(
        self,
        tokens: list[int],
        steps: list[tuple[int, int]],
        *,
        sink_tokens: int,
        window: int | None,
        block_size: int,
    ) -> torch.Tensor:
        """Run ``tokens`` through the given steps ``[(a, b), ...]`` (contiguous from 0) and
        return ``lp[t] = log p(tokens[t + 1] | the tokens visible to query t)`` for every
        computed query ``t`` with a next token (length ``len(tokens) - 1``, NaN where no
        step computed ``t``)."""
        out = torch.full((len(tokens) - 1,), float("nan"), dtype=torch.float64)
        for a, b, logits in self.stream_logits(
            tokens, steps, sink_tokens=sink_tokens, window=window, block_size=block_size
        ):
            logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
            for t in range(a, min(b, len(tokens) - 1)):
                out[t] = logp[t - a, tokens[t + 1]]
        return out

    @torch.no_grad()
    def stream_logits(
        self,
        tokens: list[int],
        steps: list[tuple[int, int]],
        *,
        sink_tokens: int,
        window: int | None,
        block_size: int,
    ):
        """The same run, yielding ``(a, b, logits)`` per step: the next-token logits of
        queries ``a..b-1`` (``[b - a, vocab]``, in the reference's dtype)."""
        S, B = sink_tokens, block_size
        L = self.n_layers
        # Pre-RoPE keys and values of every token seen so far, per layer.
        k_cache = [torch.empty(0, self.n_kv, self.head_dim, dtype=self.dtype) for _ in range(L)]
        v_cache = [torch.empty(0, self.n_kv, self.head_dim, dtype=self.dtype) for _ in range(L)]
        ids = torch.tensor(tokens)
        rep = self.n_heads // self.n_kv
        for a, b in steps:
            if window is None:
                w0 = S
                keys_idx = torch.arange(0, b)
                key_pos = keys_idx.clone()
                q_pos = torch.arange(a, b)
            else:
                w0 = contract_w0(a, S, window, B)
                keys_idx = torch.cat([torch.arange(0, min(S, b)), torch.arange(min(max(w0, S), b), b)])
                key_pos = torch.where(keys_idx < S, keys_idx, S + keys_idx - w0)
                q_pos = S + torch.arange(a, b) - w0
            # Query t sees key j iff j <= t (the visible set is shared by the step).
            mask = keys_idx[None, :] <= torch.arange(a, b)[:, None]
            x = self.w["model.embed_tokens.weight"][ids[a:b]]
            for i in range(L):
                p = f"model.layers.{i}."
                h = self._norm(x, self.w[p + "input_layernorm.weight"])
                q = (h @ self.w[p + "self_attn.q_proj.weight"].T).view(-1, self.n_heads, self.head_dim)
                k = (h @ self.w[p + "self_attn.k_proj.weight"].T).view(-1, self.n_kv, self.head_dim)
                v = (h @ self.w[p + "self_attn.v_proj.weight"].T).view(-1, self.n_kv, self.head_dim)
                k_cache[i] = torch.cat([k_cache[i], k])
                v_cache[i] = torch.cat([v_cache[i], v])
                kk = self._rope(k_cache[i][keys_idx], key_pos)
                vv = v_cache[i][keys_idx]
                qq = self._rope(q, q_pos)
                kk = kk.repeat_interleave(rep, dim=1)
                vv = vv.repeat_interleave(rep, dim=1)
                scores = torch.einsum("qhd,khd->hqk", qq, kk) / math.sqrt(self.head_dim)
                scores = scores.masked_fill(~mask[None], float("-inf"))
                attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).reshape(b - a, -1)
                x = x + attn @ self.w[p + "self_attn.o_proj.weight"].T
                h = self._norm(x, self.w[p + "post_attention_layernorm.weight"])
                gate = h @ self.w[p + "mlp.gate_proj.weight"].T
                up = h @ self.w[p + "mlp.up_proj.weight"].T
                x = x + (torch.nn.functional.silu(gate) * up) @ self.w[p + "mlp.down_proj.weight"].T
            yield a, b, self._norm(x, self.w["model.norm.weight"]) @ self.w["lm_head.weight"].T


def chunked_steps(n_prompt: int, chunk: int, n_total: int) -> list[tuple[int, int]]:
    """vLLM's schedule for one request alone: prompt chunks of ``chunk`` tokens, then one
    token per decode step up to ``n_total`` tokens (the last token is never fed)."""
    steps = [(a, min(a + chunk, n_prompt)) for a in range(0, n_prompt, chunk)]
    steps += [(t, t + 1) for t in range(n_prompt, n_total - 1)]
    return steps
