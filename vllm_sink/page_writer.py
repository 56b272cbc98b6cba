"""Writing the sink into every layer's paged KV cache at once: ``R(angle) . pristine``.

Re-anchoring the sink (``DESIGN.md``: the sink keys are rewritten from their pristine copy,
rotated by the stream's new angle, each time its window moves) touches the same pages of
every layer. :class:`PageWriter` does it for a whole step, every stream and every layer:

    dst[l][dst_ids[r, p], :, :T, :] = rotate(sources[r][l, p], cos[r], sin[r])

for ``r`` over the streams, ``l`` over the layers and ``p`` over each stream's pages, where
``dst[l]`` is layer ``l``'s logical ``[num_blocks, heads, block_size, head_size]`` view
(``vllm_sink.rotary.key_view`` / ``value_view``), ``sources[r]`` is stream ``r``'s pristine
copy ``[L, P, heads, T, head_size]`` (contiguous) and ``cos``/``sin`` rotate by ``deltas[r]``
positions (``vllm_sink.rotary.RotationTable``). ``rotary_dim = 0`` copies (the sink's values).

Two implementations, one result:

* ``torch``: the sources stacked, the angles looked up, the rotation over all layers at once,
  then one scatter per layer (any device);
* ``triton``: one kernel launch for all streams, layers, pages and heads (CUDA), after one
  host-to-device copy of the step's integers (page ids, the sources' addresses, the deltas):
  the kernel reads each source where it lies (no stacking) and looks its angles up in the
  rotary table itself. The layers' caches are separate allocations with one shape, dtype and
  stride; the kernel addresses layer ``l`` as the first layer's pointer plus ``offset[l]``
  elements.

The host cost of the torch path grows with the number of layers (a scatter is some tens of
microseconds of dispatch); the kernel's is one copy and one launch.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from vllm_sink.rotary import RotationTable, rotate


def write_pages_torch(dst: list[torch.Tensor], dst_ids: torch.Tensor, src: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, rotary_dim: int, is_neox_style: bool) -> None:
    """The reference implementation (see the module docstring for the arguments)."""
    R, L, P, H, T, D = src.shape
    if R == 0:
        return
    if rotary_dim:
        out = rotate(src, cos[:, None, None, None, None, :], sin[:, None, None, None, None, :], rotary_dim,
                     is_neox_style)
    else:
        out = src
    ids = dst_ids.reshape(-1)
    for layer, view in enumerate(dst):
        block = out[:, layer].flatten(0, 1).to(view.dtype)  # [R * P, H, T, D]
        if T == view.shape[2]:
            view.index_copy_(0, ids, block)
        else:
            view[ids, :, :T] = block


WRITER_ENV = "VLLMSINK_PAGE_WRITER"
_KERNEL = None


def _kernel():
    """The Triton kernel, compiled on first use (Triton is imported only then)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def write_pages(dst0, layer_off, dst_ids, src_ptrs, deltas, cos_t, sin_t, L, P, H, T,
                    s_blk, s_head, s_tok, s_dim,
                    D: tl.constexpr, ROT: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        r = tl.program_id(0)
        layer = tl.program_id(1)
        ph = tl.program_id(2)
        p = ph // H
        h = ph % H
        blk = tl.load(dst_ids + r * P + p).to(tl.int64)
        out_base = dst0 + tl.load(layer_off + layer) + blk * s_blk + h * s_head
        # Stream r's source, [L, P, H, T, D] contiguous, where it lies.
        src = tl.load(src_ptrs + r).to(tl.pointer_type(dst0.dtype.element_ty))
        in_base = src + ((layer.to(tl.int64) * P + p) * H + h) * T * D
        t = tl.arange(0, BLOCK_T)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        inside = (t < T) & (d < D)
        x = tl.load(in_base + t * D + d, mask=inside, other=0.0).to(tl.float32)
        if ROT > 0:
            rot = d < ROT
            if NEOX:
                first = d < HALF
                freq = tl.where(first, d, d - HALF)
                partner = tl.where(first, d + HALF, d - HALF)
            else:
                first = (d % 2) == 0
                freq = d // 2
                partner = tl.where(first, d + 1, d - 1)
            sign = tl.where(first, -1.0, 1.0)
            xp = tl.load(in_base + t * D + partner, mask=inside & rot, other=0.0).to(tl.float32)
            # The rotation by delta: row |delta| of the table, sin negated for delta < 0.
            delta = tl.load(deltas + r).to(tl.int64)
            row = tl.where(delta < 0, -delta, delta) * HALF
            c = tl.load(cos_t + row + freq, mask=rot, other=1.0)
            s = tl.load(sin_t + row + freq, mask=rot, other=0.0) * tl.where(delta < 0, -1.0, 1.0)
            x = tl.where(rot, x * c + sign * xp * s, x)
        tl.store(out_base + t * s_tok + d * s_dim, x.to(dst0.dtype.element_ty), mask=inside)

    _KERNEL = write_pages
    return _KERNEL


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class PageWriter:
    """Writes sink pages into a fixed list of layer views (see the module docstring).

    ``table``: the model's rotary table (``None``: only copies, ``rotary_dim = 0``).
    ``put``: moves a host int64 array to the views' device (the runner passes its pinned
    stager, so that the copy does not synchronise); by default a plain copy.
    ``use_triton``: ``None`` picks the kernel on CUDA when Triton imports, the torch path
    elsewhere, unless ``VLLMSINK_PAGE_WRITER`` says ``torch`` or ``triton``; ``True`` or
    ``False`` forces one (tests compare the two). The views must share shape, dtype and
    strides, and lie in one device's memory."""

    def __init__(self, dst: list[torch.Tensor], table: RotationTable | None = None,
                 put: Callable[[np.ndarray], torch.Tensor] | None = None, use_triton: bool | None = None):
        self.dst = dst
        first = dst[0]
        self.device = first.device
        for v in dst[1:]:
            if v.shape != first.shape or v.stride() != first.stride() or v.dtype != first.dtype:
                raise ValueError("layer caches differ in shape, stride or dtype")
        self.table = table
        self.put = put or (lambda a: torch.from_numpy(np.array(a, dtype=np.int64).reshape(-1)).to(self.device))
        if use_triton is None:
            choice = os.environ.get(WRITER_ENV, "auto")
            if choice not in ("auto", "torch", "triton"):
                raise ValueError(f"{WRITER_ENV}={choice!r}: expected auto, torch or triton")
            use_triton = choice == "triton" or (
                choice == "auto" and first.device.type == "cuda" and _triton_importable())
        self.use_triton = use_triton
        if use_triton:
            size = first.element_size()
            offsets = []
            for v in dst:
                delta = v.data_ptr() - first.data_ptr()
                if delta % size:
                    raise ValueError("layer caches are not aligned to their element size")
                offsets.append(delta // size)
            self.layer_off = torch.tensor(offsets, dtype=torch.int64, device=first.device)

    def write(self, dst_ids: np.ndarray, sources: list[torch.Tensor], deltas: np.ndarray, rotary_dim: int,
              is_neox_style: bool) -> None:
        """``dst_ids``: ``[R, P]`` page ids (host); ``sources``: ``R`` tensors ``[L, P, H, T,
        D]`` on the device, contiguous, of the caches' dtype; ``deltas``: ``[R]`` rotations in
        positions (host, within the table; not read when ``rotary_dim`` is 0)."""
        R = len(sources)
        if R == 0:
            return
        L, P, H, T, D = sources[0].shape
        dst_ids = np.asarray(dst_ids, dtype=np.int64).reshape(R, P)
        if rotary_dim and self.table is None:
            raise ValueError("a rotation needs the rotary table")
        if not self.use_triton:
            ids = self.put(dst_ids).view(R, P)
            if rotary_dim:
                cos, sin = self.table.angles_of(self.put(deltas))
            else:
                cos = sin = torch.zeros(R, 1, device=self.device)
            write_pages_torch(self.dst, ids, torch.stack(sources), cos, sin, rotary_dim, is_neox_style)
            return
        first = self.dst[0]
        shape = sources[0].shape
        for src in sources:
            if src.shape != shape or src.dtype != first.dtype or not src.is_contiguous():
                raise ValueError(f"sources must be contiguous {tuple(shape)} of {first.dtype}")
        ints = np.empty(R * P + 2 * R, dtype=np.int64)
        ints[: R * P] = dst_ids.reshape(-1)
        ints[R * P : R * P + R] = [src.data_ptr() for src in sources]
        ints[R * P + R :] = deltas if rotary_dim else 0
        dev = self.put(ints)
        ids, ptrs, dlt = dev[: R * P], dev[R * P : R * P + R], dev[R * P + R :]
        cos_t, sin_t = self.table.on(self.device) if rotary_dim else (dlt, dlt)  # (not read without rotation)
        _kernel()[(R, L, P * H)](
            first, self.layer_off, ids, ptrs, dlt, cos_t, sin_t, L, P, H, T, *first.stride(),
            D=D, ROT=rotary_dim, HALF=rotary_dim // 2, NEOX=bool(is_neox_style),
            BLOCK_T=_next_pow2(T), BLOCK_D=_next_pow2(D),
        )


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
