"""Every binding of vllm-sink to vLLM internals, by side; installed as ``vllm_sink.patches``.

* ``bindings``:  the table of every vLLM symbol the plugin wraps, overrides, subclasses,
  calls or reads, with the vLLM versions it holds for; ``wrap_once``, the one way the plugin
  replaces a vLLM attribute (only what the table lists); the version check
* ``frontend/``: the API server and ``LLM`` process (settings and flags, the runner choice,
  a request's own sink, chat tokenising, the system prompt as the sink, the detokeniser)
* ``scheduler/``: the engine core, which decides (the KV-cache manager that frees the pages
  leaving the window, admission, kept sessions, the per-step decisions for the workers)
* ``worker/``: the model runner, which executes those decisions (compacted rows, frame
  positions, the re-anchored sink, epochs, sampling)
* ``spec``: the KV-cache spec both sides share; ``refusals``: the start-up checks

Upgrading vLLM means editing this package and nothing else. ``install()`` runs in every vLLM
process through the ``vllm.general_plugins`` entry point and is idempotent: it refuses a vLLM
version the table does not record (``SinkConfigError``, naming the supported ones), then
installs each side. The wraps pass through untouched unless the engine's
``additional_config`` carries the sink policy.
"""

from __future__ import annotations


def install() -> None:
    """Refuse a vLLM version the bindings table does not record (``SinkConfigError``), then
    install each side's bindings."""
    import vllm

    from vllm_sink.patches import bindings

    bindings.check_version(vllm.__version__)
    from vllm_sink.patches import frontend, scheduler, worker

    frontend.install()
    scheduler.install()
    worker.install()
