"""Pure re-rotation of keys, and the in-place rotation on each KV layout (no engine).

The CPU layout is checked against vLLM's own cache-write op (``cpu_attn_reshape_and_cache``),
so a change in how vLLM lays out K on the CPU fails here, not silently in a stream.
"""

import pytest
import torch

from vllm_sink.rotary import RotationTable, key_view, rotate, rotate_blocks_, value_view, write_rotated_

HEAD = 64


def _reference_rope(x, pos, inv_freq, rotary_dim, neox):
    """Rotary embedding applied directly at absolute positions, float64."""
    x = x.to(torch.float64)
    ang = torch.outer(pos.to(torch.float64), inv_freq.to(torch.float64))  # [n, rd/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if neox:
        h = rotary_dim // 2
        x1, x2 = rot[..., :h], rot[..., h:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
    return torch.cat([out, rest], -1)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [HEAD, HEAD // 2])  # full and partial rotary
def test_rotation_composes_with_rope(neox, rotary_dim):
    """R(delta) . RoPE(q) == RoPE(q + delta), for both rotary styles and partial rotary."""
    torch.manual_seed(0)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    table = RotationTable.from_freqs(inv_freq, 1024, rotary_dim, neox)
    k = torch.randn(5, 3, HEAD, dtype=torch.float64)
    pos = torch.tensor([0, 7, 100, 300, 511])
    for delta in (1, 37, -200, 500):
        if (pos + delta).min() < 0:
            continue
        cos, sin = table.angles(delta)
        got = rotate(_reference_rope(k, pos, inv_freq, rotary_dim, neox).float(), cos, sin, rotary_dim, neox)
        want = _reference_rope(k, pos + delta, inv_freq, rotary_dim, neox)
        assert torch.allclose(got.double(), want, atol=2e-5), delta
        if rotary_dim < HEAD:  # the channels past rotary_dim are untouched
            assert torch.equal(got[..., rotary_dim:], k[..., rotary_dim:].float())


def test_negative_rotation_inverts_and_table_is_normalised():
    inv_freq = 1.0 / (1e5 ** (torch.arange(0, HEAD, 2, dtype=torch.float64) / HEAD))
    t = torch.arange(256, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    mscale = 1.3  # YaRN-style cache scaled by mscale: not a rotation, must be divided out
    table = RotationTable(torch.cat([freqs.cos(), freqs.sin()], -1) * mscale, HEAD, True)
    k = torch.randn(4, 2, HEAD)
    for d in (1, 100, 255):
        c1, s1 = table.angles(d)
        c2, s2 = table.angles(-d)
        back = rotate(rotate(k, c1, s1, HEAD, True), c2, s2, HEAD, True)
        assert torch.allclose(back, k, atol=1e-5)
        assert torch.allclose(rotate(k, c1, s1, HEAD, True).norm(dim=-1), k.norm(dim=-1), atol=1e-4)
    with pytest.raises(ValueError):
        table.angles(256)


def test_batched_angles_equal_one_at_a_time():
    """``angles_of`` (a tensor of deltas, as the runner re-anchors many sinks at once) gives
    each delta's own (cos, sin), signs and zero included; ``check`` refuses what the table
    does not hold."""
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, HEAD, 2, dtype=torch.float64) / HEAD))
    table = RotationTable.from_freqs(inv_freq, 512, HEAD, True)
    deltas = [0, 5, -5, 300, -511, 511]
    cos, sin = table.angles_of(torch.tensor(deltas))
    for i, d in enumerate(deltas):
        c, s = table.angles(d)
        assert torch.equal(cos[i], c) and torch.equal(sin[i], s), d
    table.check(*deltas)
    with pytest.raises(ValueError):
        table.check(3, -512)


def _logical_keys(n_blocks, H, B):
    return torch.randn(n_blocks, H, B, HEAD)


def _gpu_cache(layout, keys, values):
    """A cache the way vLLM builds it for FLASH_ATTN/TRITON_ATTN: memory in the physical
    order, handed to the runner as a logical [N, H, B, 2D] (permuted) view."""
    logical = torch.cat([keys, values], -1)
    if layout == "NHD":  # memory [N, B, H, 2D]
        memory = logical.permute(0, 2, 1, 3).contiguous()
        return memory, memory.permute(0, 2, 1, 3)
    memory = logical.contiguous()  # HND: memory as the logical order
    return memory, memory


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_gpu_layouts_view_and_rotate_in_place(layout):
    torch.manual_seed(1)
    N, H, B = 6, 3, 16
    keys, values = _logical_keys(N, H, B), _logical_keys(N, H, B)
    memory, cache = _gpu_cache(layout, keys, values)
    view = key_view(cache, "paged", H, HEAD)
    assert torch.equal(view, keys)
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, HEAD, 2, dtype=torch.float64) / HEAD))
    table = RotationTable.from_freqs(inv_freq, 512, HEAD, True)
    cos, sin = table.angles(-77)
    blocks = torch.tensor([1, 4])
    rotate_blocks_(view, blocks, cos, sin, HEAD, True)
    # Read back through the physical memory: the writes landed in the cache itself.
    _, reread = (memory, memory.permute(0, 2, 1, 3)) if layout == "NHD" else (memory, memory)
    phys_keys = reread[..., :HEAD]
    assert torch.allclose(phys_keys[blocks], rotate(keys[blocks], cos, sin, HEAD, True))
    untouched = torch.tensor([0, 2, 3, 5])
    assert torch.equal(phys_keys[untouched], keys[untouched])
    assert torch.equal(reread[..., HEAD:], values)  # values never change
    # Writing R . pristine is one rotation from the original (no accumulation).
    pristine = keys[blocks].clone()
    c2, s2 = table.angles(300)
    write_rotated_(view, blocks, pristine, c2, s2, HEAD, True)
    assert torch.allclose(reread[..., :HEAD][blocks], rotate(pristine, c2, s2, HEAD, True))


@pytest.mark.parametrize("B", [16, 32])
def test_cpu_layout_matches_vllm_cache_write(B):
    """Our CPU key view reads exactly what vLLM's CPU kernel wrote (K transposed), and an
    in-place rotation through the view changes only the keys of the chosen blocks."""
    from vllm import _custom_ops as ops  # the real vLLM CPU op

    torch.manual_seed(2)
    N, H = 5, 3
    cache = torch.zeros(N, H, B, 2 * HEAD)
    kv = cache.view(N, H, 2 * B, HEAD)
    key_cache, value_cache = kv.chunk(2, dim=2)
    n_tok = N * B
    k = torch.randn(n_tok, H, HEAD)
    v = torch.randn(n_tok, H, HEAD)
    slots = torch.randperm(n_tok)  # scatter tokens over all slots
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, "vec")
    view = key_view(cache, "cpu", H, HEAD)
    blk, off = slots // B, slots % B
    assert torch.equal(view[blk, :, off, :], k)
    assert torch.equal(value_view(cache, "cpu", H, HEAD)[blk, :, off, :], v)
    inv_freq = 1.0 / (1e5 ** (torch.arange(0, HEAD, 2, dtype=torch.float64) / HEAD))
    table = RotationTable.from_freqs(inv_freq, 512, HEAD, True)
    cos, sin = table.angles(123)
    v_before = value_cache.clone()
    rotate_blocks_(view, torch.tensor([0, 3]), cos, sin, HEAD, True)
    view2 = key_view(cache, "cpu", H, HEAD)
    for t in range(n_tok):
        want = rotate(k[t], cos, sin, HEAD, True) if blk[t] in (0, 3) else k[t]
        assert torch.allclose(view2[blk[t], :, off[t], :], want, atol=1e-6)
    assert torch.equal(value_cache, v_before)


@pytest.mark.parametrize("layout", ["cpu", "paged"])
def test_partial_sink_page_head_write(layout):
    """What the worker does when the page holding the window start becomes the partial sink
    page: the sink's keys and values go into slots [0, r) of several blocks at once, through
    the logical views with a block index tensor; the window slots [r, B) and every other
    block stay as they were."""
    torch.manual_seed(3)
    N, H, B, r = 5, 3, 16, 4
    cache = torch.randn(N, H, B, 2 * HEAD)
    before = cache.clone()
    ids = torch.tensor([3, 1])
    k, v = key_view(cache, layout, H, HEAD), value_view(cache, layout, H, HEAD)
    k_old, v_old = k.clone(), v.clone()
    sink_k, sink_v = torch.randn(2, H, r, HEAD), torch.randn(2, H, r, HEAD)
    k[ids, :, :r] = sink_k
    v[ids, :, :r] = sink_v
    k, v = key_view(cache, layout, H, HEAD), value_view(cache, layout, H, HEAD)
    assert torch.equal(k[ids, :, :r], sink_k) and torch.equal(v[ids, :, :r], sink_v)
    assert torch.equal(k[ids, :, r:], k_old[ids, :, r:]) and torch.equal(v[ids, :, r:], v_old[ids, :, r:])
    for other in (0, 2, 4):
        assert torch.equal(cache[other], before[other])
