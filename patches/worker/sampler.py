"""Seeded sampling across prefill chunks, on devices whose generators have no offset.

Binds to (``vllm/v1/worker/gpu_model_runner.py``; the CPU runner inherits both):
  GPUModelRunner._sample(logits, spec_decode_metadata)      wrapped per instance
  GPUModelRunner._bookkeeping_sync(scheduler_output, ...)   wrapped per instance
  GPUModelRunner: discard_request_mask (rows whose sampled token is thrown away: a prefill
    chunk that is not the prompt's last), input_batch.generators (row -> torch.Generator,
    the same dict the sampler reads), input_batch.num_reqs

vLLM samples every row of a step, the rows of unfinished prefill chunks too, and then
rewinds their per-request generators with ``gen.set_offset(gen.get_offset() - 4)``, so that
a seeded request draws the same numbers however its prompt is chunked. A CPU generator has
no offset (``RuntimeError: CPU Generator does not use offset``): on the CPU, the first
seeded prompt that takes more than one step kills the engine. The sink policy caps each
sequence's step (``long_prefill_token_threshold``), which makes such prompts common.

Here the same rewind is done by state: before sampling, the state of every offset-less
generator of a discarded row is saved; after sampling it is restored, and the generator is
hidden from ``_bookkeeping_sync`` while it runs, so vLLM's own rewind never touches it.
CUDA generators are left to vLLM. Only runners of sink engines are wrapped
(``vllm_sink.patches.worker.runner.attach``), per instance through ``bindings.wrap_once``.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_sink.patches.bindings import wrap_once


def _discarded_offsetless(runner) -> dict[int, torch.Generator]:
    """Row -> generator, for the rows whose sampled token this step throws away and whose
    generator cannot rewind by offset (any device but CUDA)."""
    generators = runner.input_batch.generators
    if not generators:
        return {}
    num_reqs = runner.input_batch.num_reqs
    rows = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
    found = {}
    for row in rows.tolist():
        gen = generators.get(row)
        if gen is not None and gen.device.type != "cuda":
            found[row] = gen
    return found


def attach(runner) -> None:
    """Wrap ``_sample`` and ``_bookkeeping_sync`` of this runner instance (idempotent:
    ``bindings.wrap_once``)."""

    def make_sample(orig_sample):
        def _sample(*args, **kwargs):
            saved = {row: gen.get_state() for row, gen in _discarded_offsetless(runner).items()}
            try:
                return orig_sample(*args, **kwargs)
            finally:
                generators = runner.input_batch.generators
                for row, state in saved.items():
                    generators[row].set_state(state)
        return _sample

    def make_bookkeeping(orig_bookkeeping):
        def _bookkeeping_sync(*args, **kwargs):
            hidden = _discarded_offsetless(runner)
            generators = runner.input_batch.generators
            for row in hidden:
                del generators[row]
            try:
                return orig_bookkeeping(*args, **kwargs)
            finally:
                generators.update(hidden)
        return _bookkeeping_sync

    wrap_once(runner, "_sample", make_sample)
    wrap_once(runner, "_bookkeeping_sync", make_bookkeeping)
