"""The head-padded SmolLM2 (``padded_model.pad_heads``: 12 query / 4 KV heads instead of
9 / 3, so that tensor parallelism 2 can split it) computes the same function as the
original, checked with the plain-PyTorch reference (no engine) on real text streamed past
the window (sink 16, W=256, 64-token chunks: pages evicted).

Measured: the reference gives bit-identical logprobs for both models, in float64 and in
float32 (it computes heads one by one and the added terms are exact zeros); the bounds
below leave room for BLAS kernels that sum in another order for other matrix shapes (vLLM's
CPU engine, TP=1, float32: max 1.9e-5 between the two models over 600 tokens). A padding
that gets the GQA mapping wrong (the new KV head put first: query heads 0-2 then attend
with the zero head) is 8.6 nats/token off, so the check sees the head order.
"""

import json

import pytest
import torch

from padded_model import pad_heads
from reference import ReferenceLlama, chunked_steps

N, CHUNK, S, W, B = 600, 64, 16, 256, 16


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from vllm_sink import assets

    src = assets.model_dir()
    return src, pad_heads(src, tmp_path_factory.mktemp("padded") / "model")


def _stream(ref, ids):
    return ref.stream_logprobs(ids, chunked_steps(len(ids), CHUNK, len(ids)), sink_tokens=S, window=W, block_size=B)


def test_padded_layout(dirs):
    from safetensors.torch import load_file

    src, dst = dirs
    cfg0, cfg = (json.loads((d / "config.json").read_text()) for d in (src, dst))
    assert (cfg0["num_attention_heads"], cfg0["num_key_value_heads"]) == (9, 3)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (12, 4, 64)
    assert {k: v for k, v in cfg.items() if "head" not in k} == {k: v for k, v in cfg0.items() if "head" not in k}
    w0, w = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    assert set(w) == set(w0)
    for name, t in w.items():
        if name.endswith("q_proj.weight"):
            assert t.shape == (768, 576) and torch.equal(t[:576], w0[name]) and not t[576:].any()
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            assert t.shape == (256, 576) and torch.equal(t[:192], w0[name]) and not t[192:].any()
        elif name.endswith("o_proj.weight"):
            assert t.shape == (576, 768) and torch.equal(t[:, :576], w0[name]) and not t[:, 576:].any()
        else:
            assert torch.equal(t, w0[name]), name
    # Tensor parallelism 2 gives rank r query heads 6r..6r+5 and KV heads 2r, 2r+1: each
    # rank's query heads h map to its own KV heads h // 3.
    assert all(h // 3 in (2 * (h // 6), 2 * (h // 6) + 1) for h in range(12))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_padded_model_same_logprobs(dirs, hamlet_ids, dtype, tol):
    src, dst = dirs
    ids = hamlet_ids[:N]
    orig = _stream(ReferenceLlama(src, dtype), ids)
    padded_ref = ReferenceLlama(dst, dtype)
    padded = _stream(padded_ref, ids)
    assert not orig.isnan().any() and not padded.isnan().any()
    d = (padded - orig).abs()
    print(f"\n{dtype}: padded vs original, {len(d)} tokens: max {d.max().item():.3g}, mean {d.mean().item():.3g}")
    assert d.max().item() < tol

    if dtype == torch.float64:
        # The wrong GQA mapping: the zero KV head first, the original three after it.
        for i in range(padded_ref.n_layers):
            for p in ("k_proj", "v_proj"):
                key = f"model.layers.{i}.self_attn.{p}.weight"
                padded_ref.w[key] = torch.roll(padded_ref.w[key], 64, dims=0)
        wrong = (_stream(padded_ref, ids) - orig).abs()
        print(f"wrong head order: mean {wrong.mean().item():.3g} nats/token")
        assert wrong.mean().item() > 0.1
