"""Pure RoPE re-rotation of cached keys, and the KV-cache layouts it works on.

RoPE rotates each pair of a key's first ``rotary_dim`` channels by ``position * freq``;
rotations compose, so a key written at position ``q`` is moved to ``q + delta`` by
rotating it once more by ``delta * freq``. :class:`RotationTable` holds the pure
``cos/sin(delta * freq)`` for every integer ``delta`` in ``(-P, P)``, taken from the model's
own rotary module (so linear and Llama-3 scaling are honoured) and normalised to unit
length (YaRN's ``mscale`` is not a rotation).

Key layouts, each given as a *logical* view ``[num_blocks, num_kv_heads, block_size,
head_size]`` over the backend's cache tensor (no copy, so in-place writes reach the cache):

* ``cpu``: vLLM's CPU backend (ISA ``vec``/``vec16``): tensor ``[N, H, B, 2*D]`` read as
  ``[N, H, 2B, D]``; the first ``B*D`` elements of each (block, head) are K stored
  transposed (``[D, B]``), the next ``B*D`` are V, plain.
* ``paged``: GPU FlashAttention (FA2/FA3) and Triton: vLLM hands the runner a *logical*
  ``[N, H, B, 2*D]`` view of each layer's cache, K = ``[..., :D]``, V = ``[..., D:]``,
  whatever the physical order: NHD (the default, memory ``[N, B, H, 2*D]``, seen through a
  permuted view) or HND (``VLLM_KV_CACHE_LAYOUT=HND``, memory as written).
"""

from __future__ import annotations

import numpy as np
import torch

KV_LAYOUTS = ("cpu", "paged")


class RotationTable:
    """``cos``/``sin`` of ``delta * freq`` for integer ``delta`` in ``(-P, P)``, float32.

    Built from a rotary cache ``[P, rotary_dim]`` laid out as ``[cos | sin]`` per row (vLLM's
    ``_compute_cos_sin_cache()`` layout), before any cast to the model dtype.
    """

    def __init__(self, cos_sin_cache: torch.Tensor, rotary_dim: int, is_neox_style: bool):
        cache = cos_sin_cache.detach().to(torch.float64)
        if cache.dim() != 2 or cache.shape[1] != rotary_dim:
            raise ValueError(
                f"rotary cache of shape {tuple(cache.shape)} does not match "
                f"rotary_dim={rotary_dim}"
            )
        half = rotary_dim // 2
        cos, sin = cache[:, :half], cache[:, half:]
        norm = torch.sqrt(cos * cos + sin * sin)
        self.cos = (cos / norm).to(torch.float32)
        self.sin = (sin / norm).to(torch.float32)
        self.limit = cache.shape[0]
        self.rotary_dim = rotary_dim
        self.is_neox_style = is_neox_style
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_freqs(
        cls, inv_freq: torch.Tensor, limit: int, rotary_dim: int, is_neox_style: bool
    ) -> "RotationTable":
        """Table from inverse frequencies, angles in float64 (used by tests)."""
        t = torch.arange(limit, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq.to(torch.float64))
        return cls(torch.cat([freqs.cos(), freqs.sin()], dim=-1), rotary_dim, is_neox_style)

    def check(self, *deltas: int) -> None:
        """Refuse rotations the table does not hold."""
        for delta in deltas:
            if not -self.limit < delta < self.limit:
                raise ValueError(f"rotation by {delta} outside the table (+-{self.limit})")

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The table ``(cos, sin)``, each ``[limit, rotary_dim // 2]`` float32 contiguous, on
        ``device`` (copied there once): row ``|delta|`` rotates by ``delta``, with ``sin``
        negated for a negative ``delta``."""
        if device not in self._on_device:
            self._on_device[device] = (self.cos.to(device).contiguous(), self.sin.to(device).contiguous())
        return self._on_device[device]

    def check_all(self, deltas) -> None:
        """:meth:`check` for an integer array of deltas at once."""
        deltas = np.asarray(deltas)
        if len(deltas) and int(np.abs(deltas).max()) >= self.limit:
            self.check(*deltas.tolist())

    def angles_of(self, deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of shape ``[len(deltas), rotary_dim // 2]`` for a tensor of deltas
        (already ``check``-ed), on the deltas' device: no host round trip. The table is
        copied to each device once."""
        cos, sin = self.on(deltas.device)
        idx = deltas.abs()
        # sin(0) = 0, so the sign of a zero delta does not matter.
        return cos[idx], sin[idx] * deltas.sign().to(sin.dtype)[:, None]

    def angles(self, delta: int, device: torch.device | None = None):
        """(cos, sin) of shape ``[rotary_dim // 2]`` rotating by ``delta`` positions."""
        self.check(delta)
        cos, sin = self.cos[abs(delta)], self.sin[abs(delta)]
        if delta < 0:
            sin = -sin
        if device is not None:
            cos, sin = cos.to(device), sin.to(device)
        return cos, sin


def rotate(
    keys: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_dim: int,
    is_neox_style: bool,
) -> torch.Tensor:
    """Return ``keys[..., head_size]`` rotated by the angles ``(cos, sin)[rotary_dim // 2]``.

    Channels past ``rotary_dim`` (partial rotary) are returned unchanged. Computed in
    float32, returned in the keys' dtype.
    """
    x = keys.to(torch.float32)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if is_neox_style:
        half = rotary_dim // 2
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1).to(keys.dtype)


def key_view(kv_cache: torch.Tensor, layout: str, num_kv_heads: int, head_size: int):
    """Logical ``[num_blocks, num_kv_heads, block_size, head_size]`` view of the keys."""
    if layout == "cpu":
        n, h, b, two_d = kv_cache.shape
        if h != num_kv_heads or two_d != 2 * head_size:
            raise ValueError(f"unexpected CPU KV cache shape {tuple(kv_cache.shape)}")
        flat = kv_cache.view(n, h, 2, b * head_size)[:, :, 0, :]
        return flat.unflatten(-1, (head_size, b)).transpose(-1, -2)
    if layout == "paged":
        n, h, b, two_d = kv_cache.shape
        if h != num_kv_heads or two_d != 2 * head_size:
            raise ValueError(f"unexpected paged KV cache shape {tuple(kv_cache.shape)}")
        return kv_cache[..., :head_size]
    raise ValueError(f"unknown KV layout {layout!r}; expected one of {KV_LAYOUTS}")


def value_view(kv_cache: torch.Tensor, layout: str, num_kv_heads: int, head_size: int):
    """Logical ``[num_blocks, num_kv_heads, block_size, head_size]`` view of the values."""
    if layout == "cpu":
        n, h, b, two_d = kv_cache.shape
        if h != num_kv_heads or two_d != 2 * head_size:
            raise ValueError(f"unexpected CPU KV cache shape {tuple(kv_cache.shape)}")
        return kv_cache.view(n, h, 2, b * head_size)[:, :, 1, :].unflatten(-1, (b, head_size))
    if layout == "paged":
        n, h, b, two_d = kv_cache.shape
        if h != num_kv_heads or two_d != 2 * head_size:
            raise ValueError(f"unexpected paged KV cache shape {tuple(kv_cache.shape)}")
        return kv_cache[..., head_size:]
    raise ValueError(f"unknown KV layout {layout!r}; expected one of {KV_LAYOUTS}")


def rotate_blocks_(
    keys: torch.Tensor,
    block_ids: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_dim: int,
    is_neox_style: bool,
) -> None:
    """Rotate, in place, every key of the given blocks of a logical key view."""
    if block_ids.numel() == 0:
        return
    keys[block_ids] = rotate(keys[block_ids], cos, sin, rotary_dim, is_neox_style)


def write_rotated_(
    keys: torch.Tensor,
    block_ids: torch.Tensor,
    pristine: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_dim: int,
    is_neox_style: bool,
) -> None:
    """``keys[block_ids] = R(angle) . pristine``: one rotation from the original, so
    re-anchoring the sink never accumulates error."""
    keys[block_ids] = rotate(pristine, cos, sin, rotary_dim, is_neox_style)
