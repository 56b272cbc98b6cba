"""The engine core's ``Request`` of a sink stream holds the tail of its token ids, not all.

Binds to:
  vllm.v1.request.Request: _all_token_ids, _output_token_ids and their ConstantList views
    all_token_ids, output_token_ids (replaced, for a sink stream, by ``TokenTail``s: read by
    vLLM's scheduler through len(), [-1], append/extend and copy() only), resumable,
    structured_output_request, prompt_token_ids, sampling_params.repetition_detection
  vllm.v1.utils.ConstantList

Called by ``manager.StreamingSinkManager.note_request`` when it first sizes a request.
"""

from __future__ import annotations

from vllm_sink.policy import SinkGeometry
from vllm_sink.token_tail import TokenTail


def hold_tail(request, g: SinkGeometry) -> None:
    """Keep, of a sink stream's token ids in the engine core, what is still read: its sink,
    its last ``row_capacity * B`` tokens (what the worker's row holds; the stop checks read
    the last one) and the count and digest of the rest (``vllm_sink.token_tail``), so that
    the ``Request`` does not grow with the stream. Requests whose whole history vLLM reads
    keep their lists: streaming-input sessions (their chunks are spliced in by absolute
    position), structured outputs (a grammar may replay the history), prompt embeddings."""
    if (getattr(request, "resumable", False) or getattr(request, "structured_output_request", None) is not None
            or getattr(request, "prompt_token_ids", None) is None
            or type(getattr(request, "_all_token_ids", None)) is not list):  # (held already, or no Request)
        return
    from vllm.v1.utils import ConstantList

    keep = g.row_capacity * g.block_size
    repetition = getattr(request.sampling_params, "repetition_detection", None)
    if repetition is not None:  # reads the last max_pattern_size * min_count outputs
        keep = max(keep, repetition.max_pattern_size * repetition.min_count)
    request._all_token_ids = TokenTail(request._all_token_ids, keep=keep, head=max(g.sink_tokens, 1))
    request._output_token_ids = TokenTail(request._output_token_ids, keep=keep)
    request.all_token_ids = ConstantList(request._all_token_ids)
    request.output_token_ids = ConstantList(request._output_token_ids)
