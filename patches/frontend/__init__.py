"""Front-end side: the API server and the ``LLM`` process (settings, requests, chat, outputs).

* ``engine_args``:     EngineArgs (CLI flags, config folding, start-up refusals), LLM.__init__
* ``vllm_config``:     VllmConfig.use_v2_model_runner (sink engines get the V1 runner)
* ``input_processor``: InputProcessor._validate_params (a request's own sink)
* ``chat_tokens``:     BaseRenderer._tokenize_prompt (a re-sent history tokenised by segment)
* ``chat_sink``:       OnlineRenderer.preprocess_chat (the system prompt as the sink)
* ``detokenizer``:     FastIncrementalDetokenizer.__init__ (primed with the prompt's tail)
* ``metrics``:         the ``vllm_sink:`` series on every API server's /metrics
"""

from __future__ import annotations


def install() -> None:
    from vllm_sink.patches.frontend import (chat_sink, chat_tokens, detokenizer, engine_args, input_processor,
                                            vllm_config)

    vllm_config.install()
    engine_args.install()
    input_processor.install()
    chat_tokens.install()
    chat_sink.install()
    detokenizer.install()
