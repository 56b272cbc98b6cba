"""The sink page writer: its Triton kernel (run by Triton's interpreter on the CPU, the same
kernel the GPU compiles) writes what the torch path writes, into every layer's cache, for
vLLM's GPU cache layouts, both rotary styles, partial rotary, partial pages and copies."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_sink.page_writer import PageWriter, write_pages_torch
from vllm_sink.rotary import RotationTable, rotate

pytest.importorskip("triton")


def _caches(layers, blocks, heads, B, D, dtype, layout):
    """Layer caches as vLLM's GPU runner sees them: a logical [N, H, B, 2D] view of memory
    laid out NHD ([N, B, H, 2D]) or HND; separate allocations per layer."""
    out = []
    for _ in range(layers):
        if layout == "NHD":
            mem = torch.randn(blocks, B, heads, 2 * D).to(dtype)
            out.append(mem.permute(0, 2, 1, 3))
        else:
            out.append(torch.randn(blocks, heads, B, 2 * D).to(dtype))
    return out


def test_torch_path_is_rotate_scattered():
    """The reference path is exactly: rotate each source page, write it at its block."""
    caches = _caches(3, 10, 2, 4, 8, torch.float32, "NHD")
    keys = [c[..., :8] for c in caches]
    table = RotationTable.from_freqs(1.0 / (10000 ** (torch.arange(0, 8, 2) / 8)), 64, 8, True)
    cos, sin = table.angles_of(torch.tensor([5, -7]))
    src = torch.randn(2, 3, 2, 2, 4, 8)
    ids = torch.tensor([[1, 4], [7, 2]])
    write_pages_torch(keys, ids, src, cos, sin, 8, True)
    for r in range(2):
        for layer in range(3):
            for p in range(2):
                want = rotate(src[r, layer, p], cos[r], sin[r], 8, True)
                assert torch.equal(keys[layer][ids[r, p]], want)


SCRIPT = r"""
import numpy as np, torch, itertools
from vllm_sink.page_writer import PageWriter
from vllm_sink.rotary import RotationTable
torch.manual_seed(0)
fails = []
for layout, neox, rot, T, dtype in itertools.product(("NHD", "HND"), (True, False), (16, 8, 0), (4, 3),
                                                      (torch.float32, torch.float16)):
    L, N, H, B, D, R, P = 3, 12, 2, 4, 16, 3, 2
    def caches():
        g = torch.Generator().manual_seed(1)
        out = []
        for _ in range(L):
            if layout == "NHD":
                out.append(torch.randn(N, B, H, 2 * D, generator=g).to(dtype).permute(0, 2, 1, 3))
            else:
                out.append(torch.randn(N, H, B, 2 * D, generator=g).to(dtype))
        return out
    a, b = caches(), caches()
    table = RotationTable.from_freqs(1.0 / (10000 ** (torch.arange(0, max(rot, 2), 2) / max(rot, 2))), 64, max(rot, 2), neox)
    deltas = np.array([3, -11, 0])
    # Each stream's source lies in its own allocation (the kernel reads it where it is).
    sources = [torch.randn(L, P, H, T, D).to(dtype) for _ in range(R)]
    ids = np.array([[1, 5], [9, 0], [3, 11]])
    for cs, use in ((a, False), (b, True)):
        views = [c[..., :D] for c in cs]
        PageWriter(views, table, use_triton=use).write(ids, sources, deltas, rot, neox)
    for x, y in zip(a, b):
        err = (x.float() - y.float()).abs().max().item()
        tol = 1e-6 if dtype == torch.float32 else 2e-3
        if err > tol:
            fails.append((layout, neox, rot, T, str(dtype), err))
print("FAILS", fails)
"""


def test_triton_kernel_matches_torch_path():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FAILS []" in out.stdout, out.stdout[-3000:]


def test_torch_writer_rotates_each_stream_by_its_delta():
    """``PageWriter.write`` (torch path): page ``p`` of stream ``r`` lands at
    ``dst_ids[r, p]`` in every layer, rotated from its source by ``deltas[r]`` positions."""
    import numpy as np

    caches = _caches(2, 9, 2, 4, 8, torch.float32, "HND")
    keys = [c[..., :8] for c in caches]
    table = RotationTable.from_freqs(1.0 / (10000 ** (torch.arange(0, 8, 2) / 8)), 64, 8, True)
    sources = [torch.randn(2, 1, 2, 4, 8) for _ in range(3)]
    ids, deltas = np.array([[4], [0], [7]]), np.array([9, -3, 0])
    PageWriter(keys, table, use_triton=False).write(ids, sources, deltas, 8, True)
    for r in range(3):
        cos, sin = table.angles(int(deltas[r]))
        for layer in range(2):
            assert torch.allclose(keys[layer][ids[r, 0]], rotate(sources[r][layer, 0], cos, sin, 8, True))


def test_writer_refuses_mismatched_layers():
    a = torch.zeros(4, 2, 4, 16)
    b = torch.zeros(4, 2, 4, 8)
    with pytest.raises(ValueError, match="differ"):
        PageWriter([a[..., :8], b], use_triton=False)
