"""vllm-sink: StreamingLLM (attention sinks, arXiv 2309.17453) as a vLLM plugin.

    from vllm_sink import LLM             # vLLM's LLM, with the kv_policy keywords
    llm = LLM(model, kv_policy="sink", sink_pages=1, kv_window=1024)

or ``vllm serve MODEL --kv-policy sink``, or, with vLLM's own ``LLM``,
``LLM(model, additional_config={"kv_policy": "sink", ...})``.

Importing this package does not touch vLLM (the policy runs and is tested without it):
vLLM loads the plugin in each of its processes through the ``vllm.general_plugins`` entry
point, which calls :func:`register`. ``vllm_sink.LLM`` registers it first, so that the
``kv_policy`` keywords reach vLLM's ``LLM`` before vLLM has loaded any plugin.

The policy itself lives in ``vllm_sink.policy`` (eviction rule, positions, epochs),
``vllm_sink.rotary`` (pure re-rotation) and ``vllm_sink.config`` (settings); every binding to
vLLM is in ``vllm_sink.patches``.
"""

from vllm_sink.config import SinkConfig, SinkConfigError

__version__ = "0.1.0"
__all__ = ["LLM", "SinkConfig", "SinkConfigError", "register"]


def register() -> None:
    """vLLM ``general_plugins`` entry point: runs in every vLLM process (idempotent)."""
    from vllm_sink import patches

    patches.install()


def __getattr__(name: str):
    if name == "LLM":
        register()
        from vllm import LLM

        return LLM
    raise AttributeError(f"module 'vllm_sink' has no attribute {name!r}")
