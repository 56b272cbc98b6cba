"""The KV-cache spec of a sink-managed layer, shared by both sides.

Binds to: ``vllm.v1.kv_cache_interface.FullAttentionSpec`` (subclassed).

Workers hand it out instead of ``FullAttentionSpec`` (``patches.worker``); the engine
core picks :class:`~vllm_sink.patches.scheduler.manager.StreamingSinkManager` for it through
vLLM's ``KVCacheSpecRegistry`` (``patches.scheduler.manager.register``). It is pickled from
the workers to the engine core, where the plugin has registered the pair at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_sink.policy import SinkGeometry, cdiv


@dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(FullAttentionSpec):
    """Full attention whose sequences keep only the sink + the last ``kv_window`` tokens.

    ``geometry`` (``vllm_sink.policy.SinkGeometry``) carries every number of the policy,
    resolved once at start-up: sink, window, per-sequence step, steps in flight, and the
    page bounds derived from them. Its ``block_size`` is the spec's.
    """

    geometry: SinkGeometry
    # Pages that finished streams may keep for resumption (0: sessions off; see
    # ``patches.scheduler.sessions``).
    kept_pages: int = 0

    @property
    def max_live_pages(self) -> int:
        """Pages one running sequence may hold: ``s + ceil((W - 1 + C) / B) + 1`` (``s``
        of the largest sink a request may have)."""
        return self.geometry.widest.max_live_pages

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # A sequence never holds more pages than its whole length (the stream cap) needs.
        cap = cdiv(vllm_config.model_config.max_model_len, self.block_size)
        return min(self.max_live_pages, cap) * self.page_size_bytes

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        # The worker's compacted row, before it is compacted again in a step, also holds
        # the pages allocated for the step in flight.
        return min(cdiv(max_len, self.block_size), self.geometry.widest.row_capacity)

    @classmethod
    def merge(cls, specs):
        assert all(isinstance(s, SinkWindowSpec) for s in specs), (
            "every layer of a sink-managed KV cache group must be SinkWindowSpec"
        )
        geometries = {(s.geometry, s.kept_pages) for s in specs}
        assert len(geometries) == 1, f"layers disagree on the sink geometry: {geometries}"
        geometry, kept_pages = geometries.pop()
        return cls.from_full(FullAttentionSpec.merge(specs), geometry, kept_pages)

    @classmethod
    def from_full(cls, spec: FullAttentionSpec, geometry: SinkGeometry, kept_pages: int = 0) -> "SinkWindowSpec":
        """This spec with every ``FullAttentionSpec`` field of ``spec`` and ``geometry``."""
        if geometry.block_size != spec.block_size:
            raise ValueError(f"sink geometry for {geometry.block_size}-token pages, spec has {spec.block_size}")
        base = {f.name: getattr(spec, f.name) for f in fields(FullAttentionSpec)}
        return cls(**base, geometry=geometry, kept_pages=kept_pages)
