"""The plain-PyTorch StreamingLLM reference (``tests/reference.py``) for the paper's model
families (GPT-NeoX/Pythia, Falcon) and today's (Qwen3, Gemma, Phi-2, GPT-J, and Llama with
Llama 3 rope scaling, which ``ReferenceLlama`` itself covers).

Each class is one family's layers written from its Hugging Face definition, on the weights
under their Hugging Face names; the streaming (visible set, positions, pre-RoPE cache,
attention) is ``reference.StreamingReference``'s, shared by all. Like ``reference.py`` this
imports neither vLLM nor vllm_sink. ``reference_for(model_dir)`` picks the class from the
config's ``architectures``.
"""

from __future__ import annotations

from pathlib import Path

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


class ReferenceGemma(ReferenceLlama):
    """Llama with RMSNorm scaled by ``1 + w``, embeddings times ``sqrt(hidden)`` (rounded to
    the dtype, as Gemma does), tied head, and a tanh-GELU gate."""

    def _norm(self, x, weight):
        return super()._norm(x, 1.0 + weight)

    def _act(self, gate):
        return ACTIVATIONS[self.cfg.get("hidden_activation") or self.cfg["hidden_act"]](gate)

    def embed(self, ids):
        return super().embed(ids) * torch.tensor(self.hidden ** 0.5, dtype=self.dtype)


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
    (``ln_attn``, ``ln_mlp``: 40B), or sequential; tied head. ALiBi Falcons are refused."""

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


FAMILIES = {
    "LlamaForCausalLM": ReferenceLlama,
    "MistralForCausalLM": ReferenceLlama,
    "Qwen3ForCausalLM": ReferenceQwen3,
    "GemmaForCausalLM": ReferenceGemma,
    "GPTNeoXForCausalLM": ReferenceGPTNeoX,
    "FalconForCausalLM": ReferenceFalcon,
    "PhiForCausalLM": ReferencePhi,
    "GPTJForCausalLM": ReferenceGPTJ,
}


def reference_for(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> StreamingReference:
    """The reference of the model's family (its config's ``architectures[0]``)."""
    import json

    arch = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
    if arch not in FAMILIES:
        raise NotImplementedError(f"no reference for {arch}")
    return FAMILIES[arch](model_dir, dtype)
