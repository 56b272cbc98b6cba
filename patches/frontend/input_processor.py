"""A request's own sink, checked where vLLM checks a request's parameters.

Binds to (``vllm/v1/engine/input_processor.py``):
  InputProcessor._validate_params(params, supported_tasks)   wrapped: a request of a sink
    engine that asks for its own sink (``SamplingParams.extra_args["sink_tokens"]``; HTTP
    ``vllm_xargs``) gets it checked here, in the front end (``LLM`` raises, the API server
    answers HTTP 400), before it reaches the engine core
  InputProcessor.process_inputs(..., resumable)              wrapped: a streaming-input
    session's chunk (``AsyncLLM.generate`` fed ``StreamingInput``: ``resumable=True``) is
    refused in the front end when the sink engine runs on vLLM's V2 model runner, whose
    binding does not carry such sessions (the caller gets the error; the engine serves on)
  InputProcessor.vllm_config (additional_config, use_v2_model_runner)

The value is read again, as checked, by the scheduler's manager
(``patches.scheduler.manager.StreamingSinkManager.sink_geometry``), which decides the request's sink.
"""

from __future__ import annotations

from vllm_sink.config import REQUEST_SINK_KEY, SinkConfig, SinkConfigError, request_sink_tokens
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

    def make_process(orig):
        def process_inputs(self, *args, **kwargs):
            if kwargs.get("resumable") or len(args) > 10 and args[10]:
                check_streaming_input(self.vllm_config)
            return orig(self, *args, **kwargs)
        return process_inputs

    wrap_once(InputProcessor, "_validate_params", make)
    wrap_once(InputProcessor, "process_inputs", make_process)


def check_streaming_input(vllm_config) -> None:
    """A streaming-input session on a sink engine runs on vLLM's V1 model runner only."""
    cfg = SinkConfig.from_additional_config(vllm_config.additional_config)
    if cfg is not None and cfg.enabled and vllm_config.use_v2_model_runner:
        raise SinkConfigError(
            "streaming-input sessions (AsyncLLM.generate fed StreamingInput) are served with the "
            "sink KV policy on vLLM's V1 model runner only; unset VLLM_USE_V2_MODEL_RUNNER"
        )
