"""The plain-PyTorch StreamingLLM reference (``tests/reference.py``) for the paper's model
families (GPT-NeoX/Pythia, Falcon, and with ALiBi positions MPT and BLOOM), today's
(Qwen2, Qwen3, Gemma, Phi-2, GPT-J, Mistral without its sliding window, and Llama with
Llama 3 rope scaling, which ``ReferenceLlama`` itself covers) and mixtures of experts with
ordinary attention (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE: ``_SparseMoE``'s router and
experts behind each family's attention).

Each class is one family's layers written from its Hugging Face definition, on the weights
under their Hugging Face names; the streaming (visible set, positions, pre-RoPE cache,
attention) is ``reference.StreamingReference``'s, shared by all. Like ``reference.py`` this
imports neither vLLM nor vllm_sink. ``reference_for(model_dir)`` picks the class from the
config's ``architectures``.

ALiBi (MPT, BLOOM): keys carry no position; the score of query ``t`` for key ``j`` gets
``slope_h * (pos(j) - pos(t))`` with the contract's cache positions (sink token ``j`` at
``j``, window token ``p`` at ``S + p - w0``, the query at ``S + t - w0``), or, with
``alibi_positions="absolute"`` (the negative check), the tokens' absolute indices.
"""

from __future__ import annotations

from pathlib import Path

import math

import torch
import torch.nn.functional as F

from reference import ReferenceLlama, StreamingReference, layer_norm, rope_inv_freq, rope_params

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact (erf)
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class ReferenceQwen3(ReferenceLlama):
    """Llama with an RMSNorm over each query and key head before RoPE."""

    def qk(self, p, h):
        q, k = super().qk(p, h)
        return self._norm(q, self.w[p + "self_attn.q_norm.weight"]), self._norm(k, self.w[p + "self_attn.k_norm.weight"])


class ReferenceMistral(ReferenceLlama):
    """Mistral is Llama's math without the sliding window (``sliding_window: null``) and
    without the Mistral-format position-dependent query scale (``llama_4_scaling``, which
    vLLM's Mistral applies); the reference implements neither."""

    def __init__(self, model_dir, dtype=torch.float32):
        super().__init__(model_dir, dtype)
        if self.cfg.get("sliding_window") is not None or self.cfg.get("llama_4_scaling"):
            raise NotImplementedError("the reference implements Mistral without sliding_window or llama_4_scaling")


class ReferenceQwen2(ReferenceLlama):
    """Llama with biases on the q, k and v projections (none on ``o_proj`` or the MLP):
    ``linear`` adds each saved bias, before RoPE, so the cache holds ``W_k h + b_k`` and the
    key bias rotates with its key. A Qwen2 checkpoint always has them (vLLM's and
    transformers' Qwen2 build them whatever the config says): missing ones are an error
    here, not a silent Llama."""

    def __init__(self, model_dir, dtype=torch.float32):
        super().__init__(model_dir, dtype)
        if self.cfg.get("use_sliding_window") or self.cfg.get("qk_norm"):
            raise NotImplementedError("the reference implements Qwen2 without sliding window or qk_norm")
        missing = [name for i in range(self.n_layers) for n in "qkv"
                   if (name := f"model.layers.{i}.self_attn.{n}_proj.bias") not in self.w]
        if missing:
            raise ValueError(f"a Qwen2 checkpoint without its q/k/v biases: {missing[:3]}")


class ReferenceGemma(ReferenceLlama):
    """Llama with RMSNorm scaled by ``1 + w``, embeddings times ``sqrt(hidden)`` (rounded to
    the dtype, as Gemma does), tied head, and a tanh-GELU gate."""

    def _norm(self, x, weight):
        return super()._norm(x, 1.0 + weight)

    def _act(self, gate):
        return ACTIVATIONS[self.cfg.get("hidden_activation") or self.cfg["hidden_act"]](gate)

    def embed(self, ids):
        return super().embed(ids) * torch.tensor(self.hidden ** 0.5, dtype=self.dtype)


class _SparseMoE(ReferenceLlama):
    """A Llama-shaped layer whose MLP is a mixture of experts (mixed into a family's
    attention: Mistral's, Qwen2's, Qwen3's, OLMoE's). The router is a linear map to one logit
    per expert; softmax over all experts; the ``top_k`` largest probabilities are kept (and
    divided by their sum where the family renormalises them, ``renormalize``); the output is
    the sum of the kept experts' SwiGLU MLPs (``gate``, ``up``, ``down``) weighted by them,
    plus a family's shared expert. Every expert is computed on every token and an expert not
    kept gets weight 0: the same sum as computing only the kept ones."""

    block = "mlp"  # the sparse block's name in a layer
    expert_weights = ("gate_proj", "up_proj", "down_proj")  # gate, up, down of one expert

    def __init__(self, model_dir, dtype=torch.float32):
        super().__init__(model_dir, dtype)
        c = self.cfg
        self.n_experts = c.get("num_experts") or c["num_local_experts"]
        self.top_k = c["num_experts_per_tok"]

    def renormalize(self) -> bool:
        return bool(self.cfg.get("norm_topk_prob", False))

    def sparse(self, i: int) -> bool:
        """Layer ``i``'s MLP is the mixture (else a dense MLP)."""
        return True

    def route(self, h, p):
        """``[tokens, experts]``: each kept expert's weight (0 for the others)."""
        probs = torch.softmax(self.linear(h, p + "gate").float(), dim=-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        if self.renormalize():
            top = top / top.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(1, idx, top).to(self.dtype)

    def shared(self, h, p):
        """A shared expert's contribution (none here)."""
        return 0

    def moe(self, h, p):
        weights = self.route(h, p)
        out = self.shared(h, p)
        for e in range(self.n_experts):
            g, u, d = (f"{p}experts.{e}.{n}" for n in self.expert_weights)
            out = out + weights[:, e:e + 1] * self.swiglu(h, g, u, d)
        return out

    def mlp(self, i, h, p):
        return self.moe(h, p + self.block + ".") if self.sparse(i) else super().mlp(i, h, p)


class _QwenSparseStep:
    """Qwen2-MoE / Qwen3-MoE: layer ``i`` is sparse unless listed in ``mlp_only_layers``
    or off the ``decoder_sparse_step`` (then a dense MLP of ``intermediate_size``)."""

    def sparse(self, i):
        c = self.cfg
        return i not in (c.get("mlp_only_layers") or []) and self.n_experts > 0 and (i + 1) % c.get("decoder_sparse_step", 1) == 0


class ReferenceMixtral(_SparseMoE, ReferenceMistral):
    """Mixtral: Mistral's attention (no sliding window), every layer a mixture whose top-k
    weights are always renormalised to sum to 1 (``block_sparse_moe``; experts ``w1`` gate,
    ``w3`` up, ``w2`` down)."""

    block = "block_sparse_moe"
    expert_weights = ("w1", "w3", "w2")

    def renormalize(self):
        return True


class ReferenceQwen3Moe(_QwenSparseStep, _SparseMoE, ReferenceQwen3):
    """Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm), top-k weights renormalised where
    ``norm_topk_prob`` says so."""

    def __init__(self, model_dir, dtype=torch.float32):
        super().__init__(model_dir, dtype)
        if self.cfg.get("use_sliding_window") or self.cfg.get("shared_expert_intermediate_size"):
            raise NotImplementedError("the reference implements Qwen3-MoE without sliding window or shared expert")


class ReferenceQwen2Moe(_QwenSparseStep, _SparseMoE, ReferenceQwen2):
    """Qwen2-MoE: Qwen2's attention (q/k/v biases), top-k weights renormalised where
    ``norm_topk_prob`` says so, plus a shared expert (``shared_expert``, a SwiGLU MLP of
    ``shared_expert_intermediate_size``) scaled by ``sigmoid(shared_expert_gate(h))``,
    one scalar per token."""

    def shared(self, h, p):
        if p + "shared_expert_gate.weight" not in self.w:
            return 0
        gate = torch.sigmoid(self.linear(h, p + "shared_expert_gate"))
        return gate * self.swiglu(h, *(f"{p}shared_expert.{n}" for n in self.expert_weights))


class ReferenceOlmoe(_SparseMoE):
    """OLMoE: Llama's attention with an RMSNorm over the whole query projection and one over
    the whole key projection (all heads together, not per head) before RoPE; every layer a
    mixture, top-k weights renormalised where ``norm_topk_prob`` says so (OLMoE-1B-7B: not).
    The reference implements OLMoE without ``clip_qkv``."""

    def __init__(self, model_dir, dtype=torch.float32):
        super().__init__(model_dir, dtype)
        if self.cfg.get("clip_qkv") is not None:
            raise NotImplementedError("the reference implements OLMoE without clip_qkv")

    def qk(self, p, h):
        q = self._norm(self.linear(h, p + "self_attn.q_proj"), self.w[p + "self_attn.q_norm.weight"])
        k = self._norm(self.linear(h, p + "self_attn.k_proj"), self.w[p + "self_attn.k_norm.weight"])
        return self.heads(q, self.n_heads), self.heads(k, self.n_kv)


class _LayerNormFamily(StreamingReference):
    """Shared pieces of the LayerNorm families: heads, partial rotary, activation."""

    def _setup(self, *, layers, heads, hidden, eps, act, kv_heads=None, partial=None):
        self.n_layers, self.n_heads, self.hidden = layers, heads, hidden
        self.n_kv = kv_heads or heads
        self.head_dim = hidden // heads
        rope = rope_params(self.cfg)
        if partial is None:
            partial = rope.get("partial_rotary_factor", 1.0)
        self.inv_freq = rope_inv_freq(int(self.head_dim * partial), rope)
        self.eps = eps
        self.act = ACTIVATIONS[act]

    def ln(self, x, name):
        return layer_norm(x, self.w[name + ".weight"], self.w.get(name + ".bias"), self.eps)

    def mlp(self, h, fc_in, fc_out):
        return self.linear(self.act(self.linear(h, fc_in)), fc_out)


class ReferenceGPTNeoX(_LayerNormFamily):
    """GPT-NeoX / Pythia: LayerNorm, fused qkv laid out per head ``[heads, 3, head_dim]``,
    partial rotary (``partial_rotary_factor``, formerly ``rotary_pct``), parallel or
    sequential residual, untied ``embed_out``."""

    def __init__(self, model_dir, dtype=torch.float32):
        super().__init__(model_dir, dtype)
        c = self.cfg
        self._setup(layers=c["num_hidden_layers"], heads=c["num_attention_heads"], hidden=c["hidden_size"],
                    eps=c["layer_norm_eps"], act=c["hidden_act"],
                    partial=rope_params(c).get("partial_rotary_factor", c.get("rotary_pct", 1.0)))
        self.parallel = c.get("use_parallel_residual", True)

    def embed(self, ids):
        return self.w["gpt_neox.embed_in.weight"][ids]

    def layer(self, i, x, attend):
        p = f"gpt_neox.layers.{i}."
        qkv = self.linear(self.ln(x, p + "input_layernorm"), p + "attention.query_key_value")
        q, k, v = qkv.view(len(x), self.n_heads, 3, self.head_dim).unbind(2)
        attn = self.linear(attend(i, q, k, v), p + "attention.dense")

        def ffn(h):
            return self.mlp(self.ln(h, p + "post_attention_layernorm"), p + "mlp.dense_h_to_4h", p + "mlp.dense_4h_to_h")

        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + attn + ffn(x)
        x = x + attn  # sequential: then + mlp(ln2(x + attn))
        return x + ffn(x)

    def head(self, x):
        return self.ln(x, "gpt_neox.final_layer_norm") @ self.w["embed_out.weight"].T


class ReferenceFalcon(_LayerNormFamily):
    """Falcon with RoPE: fused qkv in one of three layouts (7B's multi-query ``[q heads, k,
    v]``; 40B's ``new_decoder_architecture``, per KV group ``[its q heads, k, v]``; else per
    head ``[q, k, v]``), attention and MLP in parallel off one LayerNorm (7B) or two
    (``ln_attn``, ``ln_mlp``: 40B), or sequential; tied head. ALiBi Falcons are not covered
    here (the plugin serves them as it serves MPT and BLOOM; no test)."""

    def __init__(self, model_dir, dtype=torch.float32):
        super().__init__(model_dir, dtype)
        c = self.cfg
        if c.get("alibi"):
            raise NotImplementedError("the reference implements RoPE Falcons only")
        self.new_arch = c.get("new_decoder_architecture", False)
        kv = c.get("num_kv_heads") if self.new_arch else (1 if c.get("multi_query", True) else None)
        self._setup(layers=c["num_hidden_layers"], heads=c["num_attention_heads"], hidden=c["hidden_size"],
                    kv_heads=kv, eps=c["layer_norm_epsilon"], act=c.get("activation", "gelu"))
        self.parallel = c.get("parallel_attn", True)
        self.two_norms = self.new_arch and (c.get("num_ln_in_parallel_attn") or 2) == 2
        if "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["transformer.word_embeddings.weight"]

    def embed(self, ids):
        return self.w["transformer.word_embeddings.weight"][ids]

    def _split(self, qkv):
        n, hd, heads, kv = len(qkv), self.head_dim, self.n_heads, self.n_kv
        if self.new_arch:
            g = qkv.view(n, kv, heads // kv + 2, hd)
            return g[:, :, :-2].reshape(n, heads, hd), g[:, :, -2], g[:, :, -1]
        if kv == 1:
            q, k, v = qkv.split([heads * hd, hd, hd], dim=-1)
            return q.reshape(n, heads, hd), k.view(n, 1, hd), v.view(n, 1, hd)
        return qkv.view(n, heads, 3, hd).unbind(2)

    def layer(self, i, x, attend):
        p = f"transformer.h.{i}."
        if self.two_norms:
            h_attn, h_mlp = self.ln(x, p + "ln_attn"), self.ln(x, p + "ln_mlp")
        else:
            h_attn = h_mlp = self.ln(x, p + "input_layernorm")
        q, k, v = self._split(self.linear(h_attn, p + "self_attention.query_key_value"))
        attn = self.linear(attend(i, q, k, v), p + "self_attention.dense")
        if self.parallel or self.new_arch:
            return x + attn + self.mlp(h_mlp, p + "mlp.dense_h_to_4h", p + "mlp.dense_4h_to_h")
        x = x + attn  # sequential
        return x + self.mlp(self.ln(x, p + "post_attention_layernorm"), p + "mlp.dense_h_to_4h", p + "mlp.dense_4h_to_h")

    def head(self, x):
        return self.ln(x, "transformer.ln_f") @ self.w["lm_head.weight"].T


class ReferencePhi(_LayerNormFamily):
    """Phi-1/1.5/2: one LayerNorm feeding attention and MLP in parallel, biased q/k/v and
    ``dense``, partial rotary (``partial_rotary_factor``), ``fc1``-GELU-``fc2``, a final
    LayerNorm and a biased, untied head."""

    def __init__(self, model_dir, dtype=torch.float32):
        super().__init__(model_dir, dtype)
        c = self.cfg
        if c.get("qk_layernorm"):
            raise NotImplementedError("the reference implements Phi without qk_layernorm")
        self._setup(layers=c["num_hidden_layers"], heads=c["num_attention_heads"], hidden=c["hidden_size"],
                    kv_heads=c.get("num_key_value_heads"), eps=c["layer_norm_eps"], act=c["hidden_act"],
                    partial=rope_params(c).get("partial_rotary_factor", c.get("partial_rotary_factor", 0.5)))

    def embed(self, ids):
        return self.w["model.embed_tokens.weight"][ids]

    def layer(self, i, x, attend):
        p = f"model.layers.{i}."
        h = self.ln(x, p + "input_layernorm")
        q = self.heads(self.linear(h, p + "self_attn.q_proj"), self.n_heads)
        k = self.heads(self.linear(h, p + "self_attn.k_proj"), self.n_kv)
        v = self.heads(self.linear(h, p + "self_attn.v_proj"), self.n_kv)
        attn = self.linear(attend(i, q, k, v), p + "self_attn.dense")
        return x + attn + self.mlp(h, p + "mlp.fc1", p + "mlp.fc2")

    def head(self, x):
        return self.linear(self.ln(x, "model.final_layernorm"), "lm_head")


class ReferenceGPTJ(_LayerNormFamily):
    """GPT-J: interleaved (GPT-J style) rotary on the first ``rotary_dim`` channels, one
    LayerNorm feeding attention and MLP in parallel, unbiased q/k/v/out, biased head."""

    neox = False

    def __init__(self, model_dir, dtype=torch.float32):
        super().__init__(model_dir, dtype)
        c = self.cfg
        heads, hidden = c["n_head"], c["n_embd"]
        self._setup(layers=c["n_layer"], heads=heads, hidden=hidden, eps=c["layer_norm_epsilon"],
                    act=c["activation_function"], partial=(c.get("rotary_dim") or hidden // heads) / (hidden // heads))

    def embed(self, ids):
        return self.w["transformer.wte.weight"][ids]

    def layer(self, i, x, attend):
        p = f"transformer.h.{i}."
        h = self.ln(x, p + "ln_1")
        q, k, v = (self.heads(self.linear(h, p + f"attn.{n}_proj"), self.n_heads) for n in "qkv")
        attn = self.linear(attend(i, q, k, v), p + "attn.out_proj")
        return x + attn + self.mlp(h, p + "mlp.fc_in", p + "mlp.fc_out")

    def head(self, x):
        return self.linear(self.ln(x, "transformer.ln_f"), "lm_head")


def mpt_alibi_slopes(n_heads: int, bias_max: float = 8.0) -> torch.Tensor:
    """MPT's slopes (transformers' ``build_mpt_alibi_tensor``, vLLM's ``mpt._get_alibi_slopes``):
    ``2^-(k * bias_max / n2)`` for ``k = 1..n2``, ``n2`` the next power of two; with fewer
    heads, the odd-indexed slopes then the even ones, the first ``n_heads``."""
    n2 = 2 ** math.ceil(math.log2(n_heads))
    slopes = 1.0 / torch.pow(2, torch.arange(1, n2 + 1, dtype=torch.float32) * (bias_max / n2))
    return torch.cat([slopes[1::2], slopes[::2]])[:n_heads] if n2 != n_heads else slopes


def bloom_alibi_slopes(n_heads: int) -> torch.Tensor:
    """BLOOM's slopes (the ALiBi paper's): for ``n`` the largest power of two ``<= n_heads``,
    ``(2^(-8/n))^k``, ``k = 1..n``; the remaining heads take the odd powers of
    ``2^(-8/(2n))`` (``k = 1, 3, 5, ...``)."""
    n = 2 ** math.floor(math.log2(n_heads))
    slopes = torch.pow(torch.tensor(2 ** (-8 / n), dtype=torch.float32), torch.arange(1, n + 1))
    if n != n_heads:
        extra = torch.tensor(2 ** (-8 / (2 * n)), dtype=torch.float32)
        slopes = torch.cat([slopes, torch.pow(extra, torch.arange(1, 1 + 2 * min(n, n_heads - n), 2))])
    return slopes


class _AlibiFamily(_LayerNormFamily):
    """Families positioned by ALiBi: no rotary channels; ``scores`` adds ``slope_h *
    (key position - query position)`` (the contract's cache positions, or the absolute
    token indices with ``alibi_positions="absolute"``)."""

    def __init__(self, model_dir, dtype=torch.float32, alibi_positions: str = "cache"):
        super().__init__(model_dir, dtype)
        if alibi_positions not in ("cache", "absolute"):
            raise ValueError(f"alibi_positions={alibi_positions!r}: 'cache' or 'absolute'")
        self.absolute = alibi_positions == "absolute"

    def _setup_alibi(self, slopes, **kw):
        self._setup(partial=0.0, **kw)  # no rotary channels
        self.slopes = slopes.to(self.dtype)

    def scores(self, q, k, q_pos, key_pos, q_abs, key_abs):
        if self.absolute:
            q_pos, key_pos = q_abs, key_abs
        s = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(self.n_heads // self.n_kv, dim=1))
        distance = (key_pos[None, :] - q_pos[:, None]).to(self.dtype)
        return s / math.sqrt(self.head_dim) + self.slopes[:, None, None] * distance[None]


class ReferenceMPT(_AlibiFamily):
    """MPT: LayerNorms (bias only if saved: ``no_bias`` configs have none), fused ``Wqkv``
    laid out ``[q heads, k heads, v heads]`` and clamped to ``clip_qkv``, sequential
    residual, exact GELU, tied head; MPT's ALiBi slopes (``alibi_bias_max``). The reference
    implements neither ``qk_ln`` nor a ``softmax_scale`` (transformers' MPT ignores the first;
    vLLM's the second)."""

    def __init__(self, model_dir, dtype=torch.float32, alibi_positions: str = "cache"):
        super().__init__(model_dir, dtype, alibi_positions)
        c, attn = self.cfg, self.cfg.get("attn_config") or {}
        if attn.get("qk_ln") or attn.get("softmax_scale") or not attn.get("alibi", False):
            raise NotImplementedError("the reference implements ALiBi MPT without qk_ln or softmax_scale")
        self._setup_alibi(mpt_alibi_slopes(c["n_heads"], attn.get("alibi_bias_max", 8)), layers=c["n_layers"],
                          heads=c["n_heads"], hidden=c["d_model"], eps=c.get("layer_norm_epsilon", 1e-5), act="gelu")
        self.clip = attn.get("clip_qkv")

    def embed(self, ids):
        return self.w["transformer.wte.weight"][ids]

    def layer(self, i, x, attend):
        p = f"transformer.blocks.{i}."
        qkv = self.linear(self.ln(x, p + "norm_1"), p + "attn.Wqkv")
        if self.clip:
            qkv = qkv.clamp(-self.clip, self.clip)
        q, k, v = (self.heads(t, self.n_heads) for t in qkv.chunk(3, dim=-1))
        x = x + self.linear(attend(i, q, k, v), p + "attn.out_proj")
        return x + self.mlp(self.ln(x, p + "norm_2"), p + "ffn.up_proj", p + "ffn.down_proj")

    def head(self, x):
        return self.ln(x, "transformer.norm_f") @ self.w["transformer.wte.weight"].T


class ReferenceBloom(_AlibiFamily):
    """BLOOM: a LayerNorm on the word embeddings, fused ``query_key_value`` laid out per head
    ``[heads, 3, head_dim]``, residual from before the LayerNorms (or after them:
    ``apply_residual_connection_post_layernorm``), tied head; the ALiBi paper's slopes.

    ``gelu``: transformers' BLOOM computes the tanh approximation (``"tanh"``, the default:
    the reference is transformers' model), vLLM's BLOOM the exact erf GELU (``"exact"``: what
    the engine computes, for comparing the engine)."""

    def __init__(self, model_dir, dtype=torch.float32, alibi_positions: str = "cache", gelu: str = "tanh"):
        super().__init__(model_dir, dtype, alibi_positions)
        c = self.cfg
        self._setup_alibi(bloom_alibi_slopes(c["n_head"]), layers=c["n_layer"], heads=c["n_head"],
                          hidden=c["hidden_size"], eps=c["layer_norm_epsilon"],
                          act={"tanh": "gelu_pytorch_tanh", "exact": "gelu"}[gelu])
        self.post_ln_residual = c.get("apply_residual_connection_post_layernorm", False)
        if "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["transformer.word_embeddings.weight"]

    def embed(self, ids):
        return self.ln(self.w["transformer.word_embeddings.weight"][ids], "transformer.word_embeddings_layernorm")

    def layer(self, i, x, attend):
        p = f"transformer.h.{i}."
        h = self.ln(x, p + "input_layernorm")
        q, k, v = self.linear(h, p + "self_attention.query_key_value").view(len(x), self.n_heads, 3, self.head_dim).unbind(2)
        x = self.linear(attend(i, q, k, v), p + "self_attention.dense") + (h if self.post_ln_residual else x)
        h = self.ln(x, p + "post_attention_layernorm")
        return self.mlp(h, p + "mlp.dense_h_to_4h", p + "mlp.dense_4h_to_h") + (h if self.post_ln_residual else x)

    def head(self, x):
        return self.ln(x, "transformer.ln_f") @ self.w["lm_head.weight"].T


FAMILIES = {
    "LlamaForCausalLM": ReferenceLlama,
    "MistralForCausalLM": ReferenceMistral,
    "Qwen2ForCausalLM": ReferenceQwen2,
    "Qwen3ForCausalLM": ReferenceQwen3,
    "GemmaForCausalLM": ReferenceGemma,
    "GPTNeoXForCausalLM": ReferenceGPTNeoX,
    "FalconForCausalLM": ReferenceFalcon,
    "PhiForCausalLM": ReferencePhi,
    "GPTJForCausalLM": ReferenceGPTJ,
    "MptForCausalLM": ReferenceMPT,
    "BloomForCausalLM": ReferenceBloom,
    "MixtralForCausalLM": ReferenceMixtral,
    "Qwen3MoeForCausalLM": ReferenceQwen3Moe,
    "Qwen2MoeForCausalLM": ReferenceQwen2Moe,
    "OlmoeForCausalLM": ReferenceOlmoe,
}


def reference_for(model_dir: str | Path, dtype: torch.dtype = torch.float32, **options) -> StreamingReference:
    """The reference of the model's family (its config's ``architectures[0]``); ``options``
    go to its class (ALiBi families: ``alibi_positions``; BLOOM: ``gelu``)."""
    import json

    arch = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
    if arch not in FAMILIES:
        raise NotImplementedError(f"no reference for {arch}")
    return FAMILIES[arch](model_dir, dtype, **options)
