"""User-facing settings: CLI flags, ``LLM(...)`` keywords, config folding and refusals.

Binds to (``vllm/engine/arg_utils.py``, ``vllm/entrypoints/llm.py``):
  EngineArgs.add_cli_args(parser)         wrapped: adds --kv-policy, --sink-pages, --sink-tokens,
                                          --kv-window, --max-stream-len
  EngineArgs.from_cli_args(args)          wrapped: stock code keeps only dataclass fields and
                                          would drop our flags; we fold them into
                                          additional_config (and into the arguments'
                                          additional_config, which the API servers of
                                          --api-server-count N are built from)
  EngineArgs.create_engine_config(...)    wrapped: validates, refuses what the policy cannot
                                          serve, sets max_model_len to
                                          the stream cap, resolves the window, stores the
                                          resolved settings in additional_config["vllm_sink"]
  LLM.__init__(model, **kwargs)           wrapped: pops kv_policy/sink_pages/kv_window/
                                          max_stream_len into additional_config
  os.environ["MALLOC_ARENA_MAX"]          exported for the engine core and workers vLLM
                                          starts (vllm_sink.allocator), unless the user set it
  envs._is_envs_cache_enabled,            lifted while VLLM_ALLOW_LONG_MAX_MODEL_LEN is set
  envs.disable/enable_envs_cache          for create_engine_config (the cache an engine
                                          already running in the process took)

Every wrap passes through untouched when no sink setting is given.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from vllm.logger import init_logger

from vllm_sink import allocator
from vllm_sink.config import CONFIG_KEY, GEOMETRY_KEY, SINK_FROM_SYSTEM, USER_KEYS, SinkConfig
from vllm_sink.patches.bindings import behaves, holds, wrap_once
from vllm_sink.patches import refusals
from vllm_sink.patches.frontend import detokenizer, metrics
from vllm_sink.policy import SinkGeometry, max_step_tokens

# Under the "vllm" logger tree, so that vLLM's logging configuration shows our lines.
logger = init_logger("vllm." + __name__)


def _sink_tokens_arg(value: str):
    """``--sink-tokens``: a count of tokens, or ``system``."""
    if value == SINK_FROM_SYSTEM:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a number of tokens nor {SINK_FROM_SYSTEM!r}"
        ) from None


CLI_FLAGS = {
    "kv_policy": dict(
        choices=["full", "sink"],
        help="KV-cache policy. 'full' (default): vanilla vLLM. 'sink': StreamingLLM "
        "(attention sinks): keep the first --sink-pages pages and the last --kv-window "
        "tokens of every sequence, with cache-relative positions, so a request can stream "
        "far past the model's context in constant KV memory.",
    ),
    "sink_pages": dict(
        type=int,
        help="[--kv-policy sink] KV pages (blocks) pinned at the start of every sequence "
        "as the attention sink. Default 1.",
    ),
    "sink_tokens": dict(
        type=_sink_tokens_arg,
        help="[--kv-policy sink] The attention sink in tokens instead of pages, any count "
        "up to --kv-window (the paper uses 4). Give this or --sink-pages, not both. "
        "'system': each chat request's sink is its own rendered system prompt (first "
        "message), up to --max-sink-tokens (default min(1024, --kv-window)), so its "
        "instructions are never evicted; other requests get --sink-pages pages (default 1).",
    ),
    "kv_window": dict(
        type=int,
        help="[--kv-policy sink] Recent tokens kept per sequence, a multiple of the block "
        "size. Default: half the model's rotary positions (ALiBi models: half its "
        "context), at most 4096.",
    ),
    "max_stream_len": dict(
        type=int,
        help="[--kv-policy sink] Optional cap on one request's prompt + output tokens. "
        "Default: none (a stream runs until EOS, a stop condition, max_tokens or the client "
        "going away; at most 2**31 - 1 tokens).",
    ),
    "kv_sessions": dict(
        action=argparse.BooleanOptionalAction,
        help="[--kv-policy sink] Keep finished streams so that a request whose prompt "
        "extends one's history (a chat's next turn) prefills only what is new. Kept streams "
        "give way to new requests when the KV pool runs short. Default on; --no-kv-sessions "
        "turns it off.",
    ),
    "max_sink_tokens": dict(
        type=int,
        help="[--kv-policy sink] The largest sink a request may ask for itself "
        "(vllm_xargs / SamplingParams.extra_args {\"sink_tokens\": n}), and with "
        "--sink-tokens system the largest system prompt. Default: the engine's sink; with "
        "--sink-tokens system, min(1024, --kv-window).",
    ),
    "kv_session_pages": dict(
        type=int,
        help="[--kv-sessions] Most KV pages kept streams may hold (default: no cap).",
    ),
}


def _split_user_settings(additional_config: dict | None) -> tuple[dict, dict]:
    """(our user-facing keys, the rest) of an ``additional_config``."""
    ours, rest = {}, {}
    for key, value in (additional_config or {}).items():
        (ours if key in USER_KEYS else rest)[key] = value
    return ours, rest


@contextlib.contextmanager
def _env(**values: str):
    """Environment variables set for vLLM while the block runs. vLLM caches its variables
    once an engine has started (``vllm.envs.enable_envs_cache``), so a second engine in
    the process would read the first one's values: the cache is lifted meanwhile and
    taken again, from the restored environment, after."""
    from vllm import envs

    cached = envs._is_envs_cache_enabled()
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    if cached:
        envs.disable_envs_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if cached:
            envs.enable_envs_cache()


# EngineArgs fields that sink_engine_config sets for vLLM (restored after the call).
SINK_OVERRIDES = ("additional_config", "max_model_len", "disable_cascade_attn")


def sink_engine_config(args, orig_create, *a, **kw):
    """``create_engine_config`` for an engine configured with the sink policy."""
    ours, rest = _split_user_settings(args.additional_config)
    cfg = SinkConfig.from_user(ours)
    if not cfg.enabled:
        args.additional_config = rest
        return orig_create(args, *a, **kw)

    refusals.check_engine_args(args)
    user_max_model_len = args.max_model_len
    if isinstance(user_max_model_len, str):
        from vllm.utils.argparse_utils import human_readable_int

        user_max_model_len = human_readable_int(user_max_model_len)
    if user_max_model_len is not None and user_max_model_len <= 0:
        user_max_model_len = None
    if holds("vllm.engine.arg_utils", "EngineArgs.disable_cascade_attn"):  # (0.32.0 has no cascade attention)
        args.disable_cascade_attn = True
    args.max_model_len = cfg.stream_cap
    # Marks the config as a sink engine's while vLLM builds it (the V1 model runner is
    # chosen from it: patches.frontend.vllm_config); replaced by the resolved settings below.
    args.additional_config = {**rest, CONFIG_KEY: {"policy": cfg.policy}}
    with _env(VLLM_ALLOW_LONG_MAX_MODEL_LEN="1"):
        vllm_config = orig_create(args, *a, **kw)

    refusals.check_model(vllm_config.model_config)
    block_size = vllm_config.cache_config.block_size
    rope_limit, context = refusals.position_limits(vllm_config.model_config)
    resolved = cfg.resolve(
        block_size=block_size, rope_limit=rope_limit, user_max_model_len=user_max_model_len,
        context=context,
    )
    sched = vllm_config.scheduler_config
    step_cap = max_step_tokens(resolved.max_sink_tokens, resolved.window, block_size, rope_limit)
    if behaves("lone_request_uncapped"):
        # The threshold does not cap a request alone in the batch: the step budget itself
        # bounds what one sequence computes.
        if sched.max_num_batched_tokens > step_cap:
            sched.max_num_batched_tokens = step_cap
            if sched.max_num_scheduled_tokens is not None:
                sched.max_num_scheduled_tokens = min(sched.max_num_scheduled_tokens, step_cap)
            logger.info(
                "vllm-sink: a step computes at most %d tokens (max_num_batched_tokens), so "
                "that sink + window + step fit the model's %d rotary positions",
                step_cap,
                rope_limit,
            )
        step_tokens = sched.max_num_batched_tokens
    else:
        step = sched.long_prefill_token_threshold or sched.max_num_batched_tokens
        if min(step, sched.max_num_batched_tokens) > step_cap:
            sched.long_prefill_token_threshold = step_cap
            logger.info(
                "vllm-sink: one sequence computes at most %d tokens per step (long prefill "
                "threshold), so that sink + window + step fit the model's %d rotary positions",
                step_cap,
                rope_limit,
            )
        step_tokens = sched.max_num_batched_tokens
        if 0 < sched.long_prefill_token_threshold < step_tokens:
            step_tokens = sched.long_prefill_token_threshold
    geometry = SinkGeometry(
        block_size=block_size,
        sink_tokens=resolved.sink_tokens,
        kv_window=resolved.window,
        step_tokens=step_tokens,
        concurrent_steps=vllm_config.max_concurrent_batches,
        rope_limit=rope_limit,
        max_sink_tokens=resolved.max_sink_tokens,
    )
    vllm_config.additional_config[CONFIG_KEY] = {**resolved.to_dict(), GEOMETRY_KEY: geometry.to_dict()}
    detokenizer.activate()
    served = vllm_config.model_config.served_model_name
    api_server = metrics.is_api_server_worker(args)
    metrics.export(served if isinstance(served, str) else served[0],
                   api_server_rank=args._api_process_rank if api_server else None)
    if api_server:  # the process that started the engine has logged the settings
        logger.info(
            "vllm-sink: API server %d of %d: kv_policy=sink, requests up to %s tokens",
            args._api_process_rank + 1,
            args._api_process_count,
            vllm_config.model_config.max_model_len,
        )
        return vllm_config
    arenas, chosen = allocator.limit_arenas()
    logger.info(
        "vllm-sink: %s=%s for this engine's processes (%s): glibc's per-thread arenas "
        "would otherwise grow the engine core's and the worker's memory a little every "
        "decode step of a long stream",
        allocator.ENV,
        arenas,
        "set by vllm-sink; export it yourself to choose another value, 0 for glibc's default"
        if chosen else "the value in your environment",
    )
    row_tokens = geometry.widest.row_capacity * block_size
    logger.info(
        "vllm-sink: kv_policy=sink, sink %d tokens in %d page(s), window %d tokens, block "
        "size %d, %s; each running stream's worker token row holds %d tokens (sink + window "
        "+ steps in flight), whatever its length",
        resolved.sink_tokens,
        resolved.sink_pages,
        resolved.window,
        block_size,
        "no stream cap" if resolved.max_stream_len is None else f"stream cap {resolved.max_stream_len} tokens",
        row_tokens,
    )
    if resolved.system_sink:
        logger.info(
            "vllm-sink: sink_tokens=system: each chat request's sink is its rendered system "
            "prompt (first message), up to %d tokens (max_sink_tokens); other requests have "
            "the %d-token sink",
            resolved.max_sink_tokens,
            resolved.sink_tokens,
        )
    return vllm_config


def _pop_user_kwargs(kwargs: dict) -> dict:
    return {k: kwargs.pop(k) for k in list(kwargs) if k in USER_KEYS}


def install() -> None:
    """Install the wraps (idempotent)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.llm import LLM

    def wrap_add_cli_args(orig_add):
        def add_cli_args(parser):
            parser = orig_add(parser)
            existing = {a.dest for a in parser._actions}
            group = parser.add_argument_group(
                title="vllm-sink", description="StreamingLLM attention-sink KV policy."
            )
            for dest, spec in CLI_FLAGS.items():
                if dest not in existing:
                    group.add_argument("--" + dest.replace("_", "-"), dest=dest, default=None, **spec)
            return parser
        return add_cli_args

    def wrap_from_cli_args(orig_from):
        def from_cli_args(cls, args: argparse.Namespace):
            engine_args = orig_from(cls, args)
            ours = {k: getattr(args, k) for k in USER_KEYS if getattr(args, k, None) is not None}
            if ours:
                merged = dict(engine_args.additional_config or {})
                merged.update(ours)
                engine_args.additional_config = merged
                # Through the stock --additional-config, for the API servers that
                # --api-server-count N starts with these arguments: they build their engine
                # arguments before vLLM loads the plugin in them.
                args.additional_config = merged
            return engine_args
        return from_cli_args

    def wrap_create_engine_config(orig_create):
        def create_engine_config(self, *a, **kw):
            ours, _ = _split_user_settings(self.additional_config)
            if not ours:
                return orig_create(self, *a, **kw)
            # The engine is built from the user's settings with ours folded in; the arguments
            # keep the user's settings, so a second call builds the same engine.
            kept = {name: getattr(self, name) for name in SINK_OVERRIDES}
            try:
                return sink_engine_config(self, orig_create, *a, **kw)
            finally:
                for name, value in kept.items():
                    setattr(self, name, value)
        return create_engine_config

    def wrap_llm_init(orig_llm_init):
        def llm_init(self, model, *a, **kwargs):
            ours = _pop_user_kwargs(kwargs)
            if ours:
                merged = dict(kwargs.get("additional_config") or {})
                merged.update(ours)
                kwargs["additional_config"] = merged
            return orig_llm_init(self, model, *a, **kwargs)
        return llm_init

    wrap_once(EngineArgs, "add_cli_args", wrap_add_cli_args)
    wrap_once(EngineArgs, "from_cli_args", wrap_from_cli_args)
    wrap_once(EngineArgs, "create_engine_config", wrap_create_engine_config)
    wrap_once(LLM, "__init__", wrap_llm_init)

