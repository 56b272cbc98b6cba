"""What binds the sink policy to vLLM's V2 model runner (``vllm/v1/worker/gpu/``): its
request states, block tables and positions, in the compacted coordinates the V1 binding uses
(``patches.worker.hook``, ``vllm_sink.token_rows``).

Binds to (``vllm/v1/worker/gpu/model_runner.py``; the CPU runner subclasses it):
  GPUModelRunner.__init__(vllm_config, device)   wrapped: built with the model length of a
    compacted row, so its request states (``all_token_ids``) and block tables are that size
  GPUModelRunner.get_kv_cache_spec()             wrapped: our spec, attach
  GPUModelRunner.update_requests(scheduler_output)  wrapped per instance: the step's plan,
    after vLLM added the new requests and set the scheduled ones' computed-token counts
  GPUModelRunner.prepare_attn(input_batch)       wrapped per instance: frame positions, once
    vLLM computed the slot mapping from the compacted ones
  GPUModelRunner.sample(hidden_states, input_batch, grammar_output)  wrapped per instance:
    the sampler reads the stream's own positions (``min_tokens``, seeded sampling)
  GPUModelRunner: req_states (RequestState: req_id_to_index, index_to_req_id, add_request
    (wrapped per instance), all_token_ids, num_computed_tokens(_np), num_computed_prefill_tokens,
    prefill_len, prompt_len, total_len), block_tables (BlockTables: append_block_ids,
    blocks_per_kv_block, block_tables, num_kv_cache_groups), kv_caches, attn_groups
  InputBatch (V2's): req_ids, num_scheduled_tokens, num_tokens, positions

How a V2 runner holds a stream: its request state's token row ``all_token_ids[idx]``, its
counts (computed tokens, prefill and prompt lengths, total length) and its block-table row
are all in compacted coordinates (``c = t - off`` past the sink, ``off = w0 - S``), so vLLM's
own kernels gather input ids, positions, ``seq_lens`` and the slot mapping of an ordinary
short sequence. The scheduler sends absolute counts every step; the hook turns them into
compacted ones after vLLM wrote them (``update_requests``). The V2 runner advances its
computed-token counts and writes the sampled tokens on the device: only a row whose offset
changes (its window moved) or whose prompt is still coming is written from the host.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from vllm.logger import init_logger

from vllm_sink.config import SinkConfigError
from vllm_sink.metrics import SINK_STATS
from vllm_sink.patches import bindings, refusals
from vllm_sink.patches.bindings import wrap_once
from vllm_sink.patches.worker.block_table import BlockRows
from vllm_sink.patches.worker.hook import SinkRunnerHook
from vllm_sink.policy import SinkGeometry
from vllm_sink.step_meta import META_ATTR as STEP_META

logger = init_logger("vllm." + __name__)


def is_v2_runner(runner) -> bool:
    """Whether ``runner`` is vLLM's V2 model runner (or a subclass: the CPU one)."""
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    except ImportError:  # pragma: no cover (a vLLM without the V2 runner)
        return False
    return isinstance(runner, GPUModelRunner)


class PageRows:
    """The host copy of the V2 runner's block-table rows of the sink streams, in pages (the
    runner keeps its rows on the device only). ``block_table.np[idx]`` and
    ``num_blocks_per_row[idx]`` are the row of request state ``idx`` as the device holds it
    once the step's staged writes are applied; ``ids[idx]`` the same row as a list.
    Invariant: every write to a row goes through ``set``, ``extend`` or ``write``, which
    stage the same ids to the runner's ``BlockTables``."""

    blocks_per_kv_block = 1  # (the rows hold pages; vLLM expands them to kernel blocks)

    def __init__(self, block_tables):
        refusals.check_one_kv_cache_group(block_tables.num_kv_cache_groups)
        self.tables = block_tables
        # vLLM 0.26.0's rows hold kernel blocks (``blocks_per_kv_block`` per page); 0.32.0's
        # hold pages, mapped to kernel blocks when the attention metadata is built.
        self.kernel_per_page = (block_tables.blocks_per_kv_block[0] if bindings.holds(
            "vllm.v1.worker.gpu.block_table", "BlockTables.blocks_per_kv_block") else 1)
        width = block_tables.block_tables[0].gpu.shape[1] // self.kernel_per_page
        self.block_table = SimpleNamespace(np=np.zeros((block_tables.max_num_reqs, width), dtype=np.int64))
        self.num_blocks_per_row = np.zeros(block_tables.max_num_reqs, dtype=np.int64)
        self.ids: dict[int, list[int]] = {}

    def _mirror(self, idx: int) -> None:
        ids = self.ids[idx]
        row = self.block_table.np[idx]
        row[: len(ids)] = ids
        row[len(ids) :] = 0
        self.num_blocks_per_row[idx] = len(ids)

    def set(self, idx: int, ids) -> None:
        """A new request's row, as vLLM wrote it (``add_requests``)."""
        self.ids[idx] = list(ids)
        self._mirror(idx)

    def extend(self, idx: int, ids) -> None:
        """Pages vLLM appended to a running request's row (``update_requests``)."""
        row = self.ids[idx]
        n = len(row)
        row.extend(ids)
        self.block_table.np[idx, n : len(row)] = ids
        self.num_blocks_per_row[idx] = len(row)

    def write(self, idx: int, ids: list[int]) -> None:
        """Rewrite a row (its window moved): host copy and the runner's staged write."""
        if ids is not self.ids.get(idx):
            self.ids[idx] = list(ids)
        self._mirror(idx)
        self.tables.append_block_ids(idx, (list(ids),), overwrite=True)


class BlockRowsV2(BlockRows):
    """``BlockRows`` over the V2 runner: rows are request-state indices, the row's ids are
    ``PageRows.ids`` (the V1 runner's are its request's ``block_ids``)."""

    def __init__(self, runner, streams, kv, block_size: int):
        super().__init__(runner, streams, kv, block_size)
        self.pages: PageRows | None = None

    def block_ids(self, rid: str) -> list[int]:
        return self.pages.ids[self.runner.req_states.req_id_to_index[rid]]

    def write_row(self, row: int, block_ids: list[int]) -> None:
        self.pages.write(row, block_ids)


class SinkRunnerHookV2(SinkRunnerHook):
    """The sink policy inside vLLM's V2 model runner: the same stream table, plan, block-row
    transitions and KV writes as on the V1 runner (``SinkRunnerHook``), over the V2 runner's
    request states (rows are request-state indices).

    Invariant: after ``after_update_requests``, every scheduled request's state is its
    stream's compacted sequence for the step: counts ``c = t - off`` (``off`` its slot
    offset), token row ``tokens[0:S] ++ tokens[S + off:]`` up to what the step reads, and
    block-table row (``PageRows``); ``frames`` holds each scheduled request's frame offset
    and epoch base for ``prepare_attn`` and ``sample``.
    """

    def __init__(self, runner, geometry: SinkGeometry):
        super().__init__(runner, geometry)
        self.block_rows = BlockRowsV2(runner, self.streams, self.kv, self.B)
        # Request id -> its prefill token ids (the prompt, or the stream so far: released
        # once it is computed), their number, and its prompt length.
        self.prefill: dict[str, list[int]] = {}
        self.prefill_len: dict[str, int] = {}
        self.prompt_len: dict[str, int] = {}
        self.frame_of: dict[str, tuple[int, int]] = {}
        self.row_of: dict[str, int] = {}  # request id -> its request-state index (its row)

    # ------------------------------------------------------------------ binding
    def attach_tables(self) -> None:
        """Once the runner has its block tables (``initialize_kv_cache``)."""
        if self.block_rows.pages is not None:
            return
        pages = PageRows(self.runner.block_tables)
        refusals.check_partial_sink_kernel(self.S, self.B, pages.kernel_per_page, self.geometry.sink_cap)
        self.block_rows.pages = pages
        self.runner._vllm_sink_pages = pages

    def add_request(self, orig, req_id, prompt_len, all_token_ids, num_computed_tokens, max_tokens):
        """``RequestState.add_request``: a prompt longer than the token row is written up to
        the row's end (its later tokens when scheduled), with the counts the sampler's
        staged writes then read clipped to it (they are set to compacted ones before the
        step: ``after_update_requests``)."""
        rs = self.runner.req_states
        width = rs.all_token_ids.gpu.shape[1]
        self.prefill[req_id] = all_token_ids
        self.prefill_len[req_id] = len(all_token_ids)
        self.prompt_len[req_id] = prompt_len
        if len(all_token_ids) > width:
            all_token_ids = all_token_ids[:width]
        return orig(req_id, min(prompt_len, width), all_token_ids, num_computed_tokens, max_tokens)

    # ------------------------------------------------------------------ the step
    def after_update_requests(self, scheduler_output) -> None:
        self.attach_tables()
        rs = self.runner.req_states
        pages = self.block_rows.pages
        table = self.streams
        self.stager.reset()
        meta = getattr(scheduler_output, STEP_META, None)
        if meta and meta.continued:
            raise SinkConfigError("streaming-input sessions (AsyncLLM.generate fed StreamingInput) run on "
                                  "vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER")
        kept = set(meta.kept) if meta else ()
        gone = set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())
        for rid in gone:
            if rid in kept:
                table.keep(rid)
            else:
                table.drop(rid)
            pages.ids.pop(self.row_of.pop(rid, -1), None)  # (before a new request takes the row)
            self.prefill.pop(rid, None)
            self.prefill_len.pop(rid, None)
            self.prompt_len.pop(rid, None)
            self.frame_of.pop(rid, None)
        SINK_STATS.publish(force=bool(scheduler_output.finished_req_ids))
        resumed = meta.resumed if meta else {}
        for new in scheduler_output.scheduled_new_reqs:
            idx = self.row_of[new.req_id] = rs.req_id_to_index[new.req_id]
            pages.set(idx, new.block_ids[0])
            if new.req_id in resumed:
                table.resume(new.req_id, resumed[new.req_id])
                self.block_rows.adopt(new.req_id, meta.first_live[new.req_id])
            else:
                table.start(new.req_id, meta.sink_tokens.get(new.req_id, self.S) if meta else self.S)
        cached = scheduler_output.scheduled_cached_reqs
        for rid, new_ids in zip(cached.req_ids, cached.new_block_ids):
            if new_ids is not None and new_ids[0]:
                pages.extend(rs.req_id_to_index[rid], new_ids[0])
        for key in meta.released if meta else ():
            table.release(key)
        if meta and meta.copies:  # before any page is written this step
            self.kv.copy_pages(meta.copies)
            self.block_rows.private = dict(meta.private)

        sched = scheduler_output.num_scheduled_tokens
        self.frame_of.clear()
        if not sched:
            return
        rids = list(sched)
        rows = np.fromiter(map(rs.req_id_to_index.__getitem__, rids), dtype=np.int64, count=len(rids))
        n = np.fromiter(map(sched.__getitem__, rids), dtype=np.int64, count=len(rids))
        slots = np.fromiter(map(table.slot, rids), dtype=np.int64, count=len(rids))
        a = rs.num_computed_tokens_np[rows].astype(np.int64)  # absolute: vLLM wrote the scheduler's
        b = a + n
        P = np.fromiter(map(self.prefill_len.__getitem__, rids), dtype=np.int64, count=len(rids))
        offs = table.slot_offset[slots].copy()
        loud = np.flatnonzero(b > table.quiet_end[slots])
        if len(loud):
            offs[loud] = self._plan(rows[loud], rs.index_to_req_id, slots[loud], a[loud], b[loud], P[loud])
        self._compact(rids, rows, slots, a, b, P, offs)
        base = table.base[slots]
        self.frame_of.update(zip(rids, zip((offs - base).tolist(), base.tolist())))
        assert not self.block_rows.private, f"private copies for rows that did not move: {self.block_rows.private}"

    def _compact(self, rids, rows, slots, a, b, P, offs) -> None:
        """Present each scheduled request to vLLM's kernels as its compacted sequence at
        offset ``offs``: shift the token rows whose offset changed, write a prompt's
        scheduled tokens that the row does not hold yet, and set the counts."""
        rs = self.runner.req_states
        table = self.streams
        tokens = rs.all_token_ids.gpu
        width = tokens.shape[1]
        old = table.token_off[slots]
        c_a = a - offs
        prefill_c = np.maximum(P - offs, 0)
        prompt_c = np.maximum(np.fromiter((self.prompt_len[r] for r in rids), dtype=np.int64, count=len(rids)) - offs, 0)
        rs.num_computed_tokens_np[rows] = c_a
        changed = (rs.prefill_len.np[rows] != prefill_c).any() or (rs.prompt_len.np[rows] != prompt_c).any()
        rs.prefill_len.np[rows] = prefill_c
        rs.prompt_len.np[rows] = prompt_c
        rs.num_computed_prefill_tokens[rows] = np.minimum(c_a, prefill_c)
        if changed:
            rs.prefill_len.copy_to_uva()
            rs.prompt_len.copy_to_uva()
        moved = offs != old
        prefilling = a < P
        write = moved | (prefilling & ((offs > 0) | (P > width)))
        for i in np.flatnonzero(write).tolist():
            idx, off, S = int(rows[i]), int(offs[i]), int(table.sink[slots[i]])
            by = off - int(old[i])
            if by and width > S + by:
                tokens[idx, S : width - by] = tokens[idx, S + by : width].clone()
            rs.num_computed_tokens.stage_write_elem(idx, int(c_a[i]))
            if prefilling[i]:
                end = min(int(b[i]) + 1, int(P[i]), off + width)
                rs.all_token_ids.stage_write(idx, int(a[i]) - off, self.prefill[rids[i]][int(a[i]) : end])
                rs.total_len.stage_write_elem(idx, min(int(P[i]) - off, width))
            else:
                rs.total_len.stage_write_elem(idx, int(a[i]) + 1 - off)
        table.token_off[slots] = offs
        if write.any():
            rs.all_token_ids.apply_write()
            rs.num_computed_tokens.apply_write()
            rs.total_len.apply_write()
        # A prompt is held only while it is coming: released at the step that ends it.
        for i in np.flatnonzero(prefilling & (b >= P)).tolist():
            self.prefill.pop(rids[i], None)

    # ------------------------------------------------------------------ positions
    def _per_token(self, input_batch, which: int):
        values = [self.frame_of.get(rid, (0, 0))[which] for rid in input_batch.req_ids]
        if not any(values):
            return None
        return np.repeat(np.asarray(values, dtype=np.int64), input_batch.num_scheduled_tokens)

    def frame_positions(self, input_batch) -> None:
        """vLLM computed the step's positions (and from them the slot mapping) as compacted
        indices; the model gets frame positions, ``t - base = c + (off - base)``."""
        offsets = self._per_token(input_batch, 0)
        if offsets is not None:
            input_batch.positions[: input_batch.num_tokens].add_(self.stager.put(offsets))

    def stream_positions(self, input_batch) -> None:
        """Before sampling: the positions become the stream's own (``t``), which the
        sampler reads for ``min_tokens`` and seeded sampling, as in vanilla vLLM."""
        bases = self._per_token(input_batch, 1)
        if bases is not None:
            input_batch.positions[: input_batch.num_tokens].add_(self.stager.put(bases))


def attach(runner, geometry: SinkGeometry) -> SinkRunnerHookV2:
    """Wrap ``update_requests``, ``prepare_attn`` and ``sample`` of this V2 runner instance,
    and its request states' ``add_request``, around a new hook (idempotent)."""
    hook = getattr(runner, "_vllm_sink_hook", None)
    if hook is not None:
        return hook
    hook = SinkRunnerHookV2(runner, geometry)

    def make_update(orig):
        def update_requests(scheduler_output, *args, **kwargs):
            result = orig(scheduler_output, *args, **kwargs)
            hook.after_update_requests(scheduler_output)
            return result
        return update_requests

    def make_prepare_attn(orig):
        def prepare_attn(input_batch, *args, **kwargs):
            result = orig(input_batch, *args, **kwargs)
            hook.frame_positions(input_batch)
            return result
        return prepare_attn

    def make_sample(orig):
        def sample(hidden_states, input_batch, *args, **kwargs):
            hook.stream_positions(input_batch)
            return orig(hidden_states, input_batch, *args, **kwargs)
        return sample

    def make_add(orig):
        def add_request(req_id, prompt_len, all_token_ids, num_computed_tokens, max_tokens):
            return hook.add_request(orig, req_id, prompt_len, all_token_ids, num_computed_tokens, max_tokens)
        return add_request

    wrap_once(runner, "update_requests", make_update)
    wrap_once(runner, "prepare_attn", make_prepare_attn)
    wrap_once(runner, "sample", make_sample)
    wrap_once(runner.req_states, "add_request", make_add)
    runner._vllm_sink_hook = hook
    return hook


def install() -> None:
    """Wrap the V2 runner's ``get_kv_cache_spec`` and ``__init__`` (idempotent); both leave
    engines without the sink policy untouched."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from vllm_sink.patches.worker import runner as v1

    def make(orig):
        def get_kv_cache_spec(self):
            specs = orig(self)
            cfg = v1.SinkConfig.from_additional_config(self.vllm_config.additional_config)
            if cfg is None or not cfg.enabled:
                return specs
            return v1.sink_specs(self, specs, attach_hook=attach)
        return get_kv_cache_spec

    wrap_once(GPUModelRunner, "get_kv_cache_spec", make)
    wrap_once(GPUModelRunner, "__init__", v1._runner_init)
