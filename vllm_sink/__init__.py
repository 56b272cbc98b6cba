"""vllm-sink: StreamingLLM (attention sinks, arXiv 2309.17453) as a vLLM plugin.

    import vllm_sink                      # enables LLM(..., kv_policy="sink")
    llm = LLM(model, kv_policy="sink", sink_pages=1, kv_window=1024)

or ``vllm serve MODEL --kv-policy sink``, or, without the import,
``LLM(model, additional_config={"kv_policy": "sink", ...})``.

The policy itself lives in ``vllm_sink.policy`` (eviction rule, positions, epochs),
``vllm_sink.rotary`` (pure re-rotation) and ``vllm_sink.config`` (settings); every binding to
vLLM is in ``vllm_sink.patches``.
"""

from vllm_sink.config import SinkConfig, SinkConfigError

__version__ = "0.1.0"
__all__ = ["SinkConfig", "SinkConfigError", "register"]


def register() -> None:
    """vLLM ``general_plugins`` entry point: runs in every vLLM process."""
    from vllm_sink import patches

    patches.install()


register()
