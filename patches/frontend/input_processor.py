"""A request's own sink, checked where vLLM checks a request's parameters.

Binds to (``vllm/v1/engine/input_processor.py``):
  InputProcessor._validate_params(params, supported_tasks)   wrapped: a request of a sink
    engine that asks for its own sink (``SamplingParams.extra_args["sink_tokens"]``; HTTP
    ``vllm_xargs``) gets it checked here, in the front end (``LLM`` raises, the API server
    answers HTTP 400), before it reaches the engine core
  InputProcessor.vllm_config

The value is read again, as checked, by the scheduler's manager
(``patches.scheduler.manager.StreamingSinkManager.sink_geometry``), which decides the request's sink.
"""

from __future__ import annotations

from vllm_sink.config import REQUEST_SINK_KEY, SinkConfig, request_sink_tokens
from vllm_sink.patches.bindings import wrap_once


def install() -> None:
    """Wrap ``InputProcessor._validate_params`` (idempotent); engines without the sink
    policy, and requests that do not ask for their own sink, pass straight through."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    def make(orig):
        def _validate_params(self, params, *args, **kwargs):
            result = orig(self, params, *args, **kwargs)  # (0.32.0 returns the watermarking decision)
            extra = params.extra_args if isinstance(params, SamplingParams) else None
            if extra and REQUEST_SINK_KEY in extra:
                geometry = SinkConfig.geometry_from_additional_config(self.vllm_config.additional_config)
                if geometry is not None:
                    request_sink_tokens(extra, geometry)
            return result
        return _validate_params

    wrap_once(InputProcessor, "_validate_params", make)
