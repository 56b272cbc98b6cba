"""The runner's per-sequence token rows (its ``InputBatch``) in compacted coordinates: each
sink stream's row holds ``tokens[0:S] ++ tokens[w0:]`` (``vllm_sink.token_rows``), so
every per-sequence buffer is the size of sink + window + the steps in flight, whatever the
stream's length. The output ids the runner keeps for its sampler are cut to what penalties
and ``min_tokens`` read (``token_rows.output_keep``).

Binds to:
  vllm.v1.worker.gpu_input_batch.InputBatch: add_request(request) and
    _make_prompt_token_ids_cpu_tensor() (wrapped per instance), req_ids, num_reqs,
    token_ids_cpu, is_token_ids, num_tokens_no_spec, num_computed_tokens_cpu,
    num_prompt_tokens, req_prompt_embeds, vocab_size
  GPUModelRunner.input_batch (vLLM builds it again once the KV cache exists) and
    requests[req_id] (CachedRequestState: req_id, num_prompt_tokens, prompt_token_ids,
    prompt_is_token_ids, prompt_embeds, output_token_ids, sampling_params.min_tokens)
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_sink.patches.bindings import wrap_once
from vllm_sink.patches.worker.streams import StreamTable
from vllm_sink.token_rows import held_prompt_mask, held_prompt_width, output_keep, release_due, shift_row


class TokenRows:
    """The token rows, computed-token counts and kept output ids of the sink streams in
    the runner's current ``InputBatch``.

    Invariant: the row of a stream whose slot has token offset ``off``
    (``streams.token_off``) holds ``tokens[0:S] ++ tokens[S + off:]`` up to the row's
    length (``num_tokens_no_spec``, also compacted), with every token the coming forward
    reads; its request state keeps its output ids from ``streams.out_trimmed`` on. The
    InputBatch's ``add_request`` and ``_make_prompt_token_ids_cpu_tensor`` are wrapped
    (``bind``) so that vLLM's own writes keep it.
    """

    def __init__(self, runner, streams: StreamTable, device: torch.device):
        self.runner, self.streams, self.device = runner, streams, device

    def bind(self) -> None:
        """Bind to the runner's current ``InputBatch`` (vLLM builds a new one once the KV
        cache's block sizes are known): its rows hold compacted sequences."""
        ib = self.runner.input_batch
        if getattr(ib, "_vllm_sink_rows", None) is self:
            return
        rows = self

        def make_add(orig_add):
            def add_request(request):
                return rows.add_request(orig_add, request)
            return add_request

        def make_prompt(orig_prompt):
            def _make_prompt_token_ids_cpu_tensor():
                return rows.held_prompt_tensor(orig_prompt)
            return _make_prompt_token_ids_cpu_tensor

        wrap_once(ib, "add_request", make_add)
        wrap_once(ib, "_make_prompt_token_ids_cpu_tensor", make_prompt)
        ib._vllm_sink_rows = self

    def tokens(self, request, trimmed: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids ``[start, end)`` of a request's stream and whether each is a token id
        (not a prompt embedding), from its prompt and the output ids the runner keeps."""
        P = request.num_prompt_tokens
        ids = np.zeros(max(0, end - start), dtype=np.int64)
        is_tok = np.ones(len(ids), dtype=bool)
        p0, p1 = min(start, P), min(end, P)
        if p1 > p0:
            if request.prompt_token_ids is not None:
                ids[: p1 - p0] = request.prompt_token_ids[p0:p1]
                if request.prompt_is_token_ids is not None:
                    is_tok[: p1 - p0] = request.prompt_is_token_ids[p0:p1]
            else:
                is_tok[: p1 - p0] = False
        o0, o1 = max(start, P) - P - trimmed, max(end, P) - P - trimmed
        if o1 > o0:
            assert o0 >= 0, f"output ids {o0 + trimmed}.. of {request.req_id} were released"
            ids[max(start, P) - start :] = request.output_token_ids[o0:o1]
        return ids, is_tok

    def add_request(self, orig_add, request) -> int:
        """``InputBatch.add_request`` for a sink stream: vLLM's bookkeeping as is, its token
        row written in compacted coordinates (``vllm_sink.token_rows``) at the row's offset
        (0 for a new request; a stream vLLM adds back after a step without tokens keeps its
        own), up to the row's end. A long prompt's later tokens are written when scheduled
        (``compact``). vLLM's own writes, at absolute positions, land in a scratch
        row."""
        ib = self.runner.input_batch
        table = self.streams
        slot = table.slot_of.get(request.req_id)
        off = int(table.token_off[slot]) if slot is not None else 0
        trimmed = int(table.out_trimmed[slot]) if slot is not None else 0
        P = request.num_prompt_tokens
        N = P + trimmed + len(request.output_token_ids)
        width = ib.token_ids_cpu.shape[1]
        rows, real = ib.token_ids_cpu.shape[0], (ib.token_ids_cpu, ib.is_token_ids)
        need = P + len(request.output_token_ids)
        if need > width:  # vLLM writes the whole prompt and the kept outputs at [0, need)
            scratch = np.zeros(need, dtype=ib.token_ids_cpu.dtype), np.zeros(need, dtype=bool)
            ib.token_ids_cpu, ib.is_token_ids = (
                np.lib.stride_tricks.as_strided(x, shape=(rows, need), strides=(0, x.strides[0])) for x in scratch)
        try:
            idx = orig_add(request)
        finally:
            ib.token_ids_cpu, ib.is_token_ids = real
        ids_row, tok_row = ib.token_ids_cpu[idx], ib.is_token_ids[idx]
        if off:
            S = int(table.sink[slot])
            ids_row[:S], tok_row[:S] = table.sink_ids[slot]
            end = min(N - off, width)
            if end > S:
                ids_row[S:end], tok_row[S:end] = self.tokens(request, trimmed, S + off, end + off)
        else:
            end = min(N, width)
            ids_row[:end], tok_row[:end] = self.tokens(request, trimmed, 0, end)
        ib.num_tokens_no_spec[idx] = N - off
        return idx

    def compact(self, rows, rids, slots, a, b, offs, loud) -> None:
        """Present each scheduled stream to vLLM's runner as its compacted sequence for the
        step ``[a, b)`` at offset ``offs`` (``w0 - S``): for the ``loud`` rows (indices into
        ``rows``: those planned this step), shift the token rows whose window moved and
        write the step's prompt tokens; for every row, set its computed-token count to
        ``a - off``. vLLM then gathers input ids, positions, ``seq_lens`` and the slot
        mapping at compacted indices, which are the compacted block-table row's; only the
        positions need the frame offset (``after_prepare_inputs``). Also releases output ids
        the sampler no longer needs (``token_rows.output_keep``)."""
        ib = self.runner.input_batch
        table = self.streams
        P = ib.num_prompt_tokens[rows]
        if len(loud):
            self.move_tokens(rows[loud], rids, slots[loud], a[loud], b[loud], offs[loud], P[loud])
        ib.num_computed_tokens_cpu[rows] = a - offs
        due = release_due(ib.num_tokens_no_spec[rows], offs, P, table.out_trimmed[slots], ib.token_ids_cpu.shape[1])
        for i in np.flatnonzero(due).tolist():
            self.release_outputs(rids[rows[i]], int(slots[i]))

    def release_outputs(self, rid: str, slot: int) -> None:
        """Release the output ids of ``rid`` that its sampler no longer reads, once it keeps
        twice what it needs (``token_rows.output_keep``)."""
        request = self.runner.requests[rid]
        outs = request.output_token_ids
        min_tokens = request.sampling_params.min_tokens if request.sampling_params else 0
        keep = output_keep(self.runner.input_batch.token_ids_cpu.shape[1], min_tokens)
        if len(outs) >= 2 * keep:  # one more is sampled this step
            drop = len(outs) - keep
            del outs[:drop]
            self.streams.out_trimmed[slot] += drop

    def move_tokens(self, rows, rids, slots, a, b, offs, P) -> None:
        """Shift the token rows whose offset changed and write the step's prompt tokens."""
        ib = self.runner.input_batch
        table = self.streams
        width = ib.token_ids_cpu.shape[1]
        moved = np.flatnonzero(offs != table.token_off[slots])
        for i in moved.tolist():
            row, slot, off = int(rows[i]), int(slots[i]), int(offs[i])
            S = int(table.sink[slot])
            old = int(table.token_off[slot])
            by = off - old
            if slot not in table.sink_ids:
                table.sink_ids[slot] = (ib.token_ids_cpu[row, :S].copy(), ib.is_token_ids[row, :S].copy())
            length = int(ib.num_tokens_no_spec[row])
            # What the row holds for sure: the tokens before this step (a prompt's later
            # tokens are written when scheduled), or every token once it decodes.
            start = int(a[i])
            held = min(width, (start if start < int(P[i]) else length + old) - old)
            shift_row(ib.is_token_ids[row], length, S, by)
            ib.num_tokens_no_spec[row] = shift_row(ib.token_ids_cpu[row], length, S, by)
            # A row written from token 0 whose window moved past what it held (a resumed
            # request's first step): the window before the step comes from the stream.
            lo, hi = max(S, held - by), start - off
            if hi > lo:
                request = self.runner.requests[rids[row]]
                ids, is_tok = self.tokens(request, int(table.out_trimmed[slot]), lo + off, hi + off)
                ib.token_ids_cpu[row, lo:hi] = ids
                ib.is_token_ids[row, lo:hi] = is_tok
        table.token_off[slots] = offs
        for i in np.flatnonzero(a < P).tolist():
            row, rid, off = int(rows[i]), rids[rows[i]], int(offs[i])
            end = min(int(b[i]), int(P[i]))
            request = self.runner.requests[rid]
            ids, is_tok = self.tokens(request, int(table.out_trimmed[slots[i]]), int(a[i]), end)
            ib.token_ids_cpu[row, a[i] - off : end - off] = ids
            ib.is_token_ids[row, a[i] - off : end - off] = is_tok
            if off and request.prompt_embeds is not None and row in ib.req_prompt_embeds:
                # vLLM reads a prompt's embeddings at the row's computed-token count.
                ib.req_prompt_embeds[row] = request.prompt_embeds[off:]

    def held_prompt_tensor(self, orig_prompt):
        """``InputBatch._make_prompt_token_ids_cpu_tensor`` (the prompt ids that repetition
        penalties read) over compacted rows: the prompt tokens each stream still holds (its
        sink and the prompt tokens in its window), the rest padded as vLLM pads."""
        ib = self.runner.input_batch
        table = self.streams
        n = ib.num_reqs
        slots = [table.slot_of.get(rid) for rid in ib.req_ids[:n]]
        S = np.array([table.sink[s] if s is not None else 0 for s in slots], dtype=np.int64)
        off = np.array([table.token_off[s] if s is not None else 0 for s in slots], dtype=np.int64)
        P = ib.num_prompt_tokens[:n].astype(np.int64)
        width = held_prompt_width(S, off, P, ib.token_ids_cpu.shape[1])
        out = torch.empty((n, width), dtype=torch.int64, pin_memory=self.device.type == "cuda")
        arr = out.numpy()
        arr[:] = ib.token_ids_cpu[:n, :width]
        arr[~held_prompt_mask(width, S, off, P)] = ib.vocab_size
        return out
