"""Settings of the KV policy, and their validation.

The settings travel inside vLLM's ``VllmConfig.additional_config["vllm_sink"]`` (pickled to
the engine core and every worker). Users give them as ``LLM(kv_policy="sink", ...)`` (with
``from vllm_sink import LLM``), as ``vllm serve --kv-policy sink ...``, or through stock
``additional_config={"kv_policy": "sink", ...}``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from vllm_sink.policy import SinkGeometry, cdiv, max_step_tokens

CONFIG_KEY = "vllm_sink"
GEOMETRY_KEY = "geometry"  # the resolved SinkGeometry, beside the settings
POLICIES = ("full", "sink")
# A stream with no cap set (``max_stream_len=None``, the default) runs until EOS, a stop
# condition, ``max_tokens`` or the client going away; vLLM still needs a model length, and
# its runner counts a request's tokens in int32: the longest stream is 2**31 - 1 tokens
# (eight months at 100 tokens a second). Nothing is sized by it.
NO_STREAM_CAP = (1 << 31) - 1
DEFAULT_WINDOW_CAP = 4096
# sink_tokens="system": each chat request's sink is its rendered first message (its system
# prompt), up to max_sink_tokens, by default this many tokens (at most the window, and what
# the model's positions leave room for).
SINK_FROM_SYSTEM = "system"
DEFAULT_SYSTEM_SINK_CAP = 1024

# User-facing names (LLM kwargs, additional_config keys, CLI flags without "--").
USER_KEYS = {
    "kv_policy": "policy",
    "sink_pages": "sink_pages",
    "sink_tokens": "sink_tokens",
    "kv_window": "window",
    "max_stream_len": "max_stream_len",
    "kv_sessions": "sessions",
    "kv_session_pages": "session_pages",
    "max_sink_tokens": "max_sink_tokens",
}
# A request's own sink size, in its sampling parameters' ``extra_args`` (HTTP: ``vllm_xargs``).
REQUEST_SINK_KEY = "sink_tokens"


class SinkConfigError(ValueError):
    """A setting the sink policy cannot serve; the message names the fix."""


@dataclass(frozen=True)
class SinkConfig:
    """``policy``: "full" (vanilla vLLM) or "sink". ``sink_pages``: pages pinned at the
    start of every sequence. ``sink_tokens``: the sink in tokens instead (any count, e.g.
    the paper's 4; ``None``: ``sink_pages`` whole pages). ``window``: recent tokens kept
    (None: chosen from the model's context at start-up). ``max_stream_len``: an optional
    per-request length cap (prompt + output; ``None``: no cap, see ``NO_STREAM_CAP``). ``sessions``: keep finished streams so that a
    request extending one's token history resumes from it (``vllm_sink.sessions``; on by
    default);
    ``session_pages``: the most pages kept streams may hold (``None``: as many as the pool
    has free; kept streams always give way to new requests). ``max_sink_tokens``: the
    largest sink a request may ask for itself (``SamplingParams(extra_args={"sink_tokens":
    n})``, HTTP ``vllm_xargs``; ``None``: the engine's sink, the most a request may ask).
    ``sink_tokens="system"``: each chat request's sink is its own rendered system prompt (its
    first message), up to ``max_sink_tokens`` (default ``min(1024, window)``, within what the
    model's positions leave room for); every other request (Completions, token ids) has the
    engine's sink of ``sink_pages`` pages. After :meth:`resolve`, both sink fields are set:
    ``sink_tokens`` is the engine's sink in tokens (an int, also with "system"),
    ``sink_pages = ceil(sink_tokens / block_size)``, ``max_sink_tokens >= sink_tokens``, and
    ``sink_from`` is ``"system"`` for the system-prompt sinks (``None`` otherwise).
    """

    policy: str = "full"
    sink_pages: int = 1
    window: int | None = None
    max_stream_len: int | None = None
    sink_tokens: int | str | None = None
    sessions: bool = True
    session_pages: int | None = None
    max_sink_tokens: int | None = None
    sink_from: str | None = None  # resolved: "system" when sink_tokens="system" was given

    @property
    def system_sink(self) -> bool:
        """Each chat request's sink is its rendered first message (``sink_tokens="system"``)."""
        return self.sink_from == SINK_FROM_SYSTEM or self.sink_tokens == SINK_FROM_SYSTEM

    @property
    def enabled(self) -> bool:
        return self.policy == "sink"

    @property
    def stream_cap(self) -> int:
        """The most tokens (prompt + output) of one request: ``max_stream_len``, or
        ``NO_STREAM_CAP`` without one."""
        return NO_STREAM_CAP if self.max_stream_len is None else self.max_stream_len

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_user(cls, values: Mapping[str, Any]) -> "SinkConfig":
        """From user-facing keys (``kv_policy``, ``sink_pages``, ``kv_window``,
        ``max_stream_len``); unknown keys are an error, never ignored."""
        kwargs = {}
        for key, value in values.items():
            if key not in USER_KEYS:
                raise SinkConfigError(
                    f"unknown vllm-sink setting {key!r}; valid settings are "
                    f"{sorted(USER_KEYS)}"
                )
            if value is not None:
                kwargs[USER_KEYS[key]] = value
        policy = kwargs.get("policy", "full")
        extra = sorted(k for k, v in values.items() if k != "kv_policy" and v is not None)
        if policy != "sink" and policy in POLICIES and extra:
            raise SinkConfigError(
                f"{extra} only apply with kv_policy='sink' (kv_policy is {policy!r}); add "
                "kv_policy='sink' (--kv-policy sink) or drop them"
            )
        if "sink_pages" in kwargs and "sink_tokens" in kwargs and kwargs["sink_tokens"] != SINK_FROM_SYSTEM:
            raise SinkConfigError(
                "give the sink size once: sink_pages (whole pages) or sink_tokens (tokens), "
                f"not both (got sink_pages={kwargs['sink_pages']}, "
                f"sink_tokens={kwargs['sink_tokens']})"
            )
        return cls(**kwargs).checked()

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None):
        """The resolved settings stored by the plugin, or ``None`` if absent."""
        if not additional_config or CONFIG_KEY not in additional_config:
            return None
        raw = dict(additional_config[CONFIG_KEY])
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def geometry_from_additional_config(additional_config: Mapping[str, Any] | None) -> SinkGeometry | None:
        """The geometry resolved at start-up (``None`` if the engine has no sink policy)."""
        raw = (additional_config or {}).get(CONFIG_KEY) or {}
        return SinkGeometry(**raw[GEOMETRY_KEY]) if GEOMETRY_KEY in raw else None

    # ----------------------------------------------------------------- validation
    def checked(self) -> "SinkConfig":
        """Checks that need no model: types and ranges."""
        if self.policy not in POLICIES:
            raise SinkConfigError(
                f"kv_policy={self.policy!r} is not a KV policy; use one of {POLICIES}"
            )
        for name in ("sink_pages", "max_stream_len", "sink_tokens"):
            value = getattr(self, name)
            if name == "sink_tokens" and value in (None, SINK_FROM_SYSTEM):
                continue
            if name == "max_stream_len" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                also = f' (or "{SINK_FROM_SYSTEM}": each chat request\'s system prompt)' if name == "sink_tokens" else ""
                raise SinkConfigError(f"{name} must be an integer{also}, got {value!r}")
        if self.sink_from not in (None, SINK_FROM_SYSTEM):
            raise SinkConfigError(f"sink_from={self.sink_from!r} is not a sink source; use None or {SINK_FROM_SYSTEM!r}")
        if isinstance(self.sink_tokens, int) and self.sink_tokens < 0:
            raise SinkConfigError(
                f"sink_tokens={self.sink_tokens} is negative; use 0 (window only) or more"
            )
        if self.window is not None and (
            not isinstance(self.window, int) or isinstance(self.window, bool)
        ):
            raise SinkConfigError(f"kv_window must be an integer, got {self.window!r}")
        if self.sink_pages < 0:
            raise SinkConfigError(
                f"sink_pages={self.sink_pages} is negative; use 0 (window only) or more"
            )
        if self.window is not None and self.window <= 0:
            raise SinkConfigError(f"kv_window={self.window} must be positive")
        if self.max_stream_len is not None and not 0 < self.max_stream_len <= NO_STREAM_CAP:
            raise SinkConfigError(
                f"max_stream_len={self.max_stream_len} must be from 1 to {NO_STREAM_CAP} (vLLM counts a "
                "request's tokens in int32); leave it unset for no cap")
        if not isinstance(self.sessions, bool):
            raise SinkConfigError(f"kv_sessions must be true or false, got {self.sessions!r}")
        if self.session_pages is not None and (
            not isinstance(self.session_pages, int) or isinstance(self.session_pages, bool)
            or self.session_pages < 1
        ):
            raise SinkConfigError(
                f"kv_session_pages must be a positive number of pages, got {self.session_pages!r}"
            )
        if self.max_sink_tokens is not None and (
            not isinstance(self.max_sink_tokens, int) or isinstance(self.max_sink_tokens, bool)
            or self.max_sink_tokens < 0
        ):
            raise SinkConfigError(f"max_sink_tokens must be a number of tokens (0 or more), got {self.max_sink_tokens!r}")
        if self.session_pages is not None and not self.sessions:
            raise SinkConfigError("kv_session_pages caps kept sessions; add kv_sessions=True or drop it")
        return self

    @property
    def kept_pages(self) -> int:
        """Pages kept streams may hold (0: sessions off)."""
        if not self.sessions:
            return 0
        return self.session_pages or (1 << 62)

    def resolve(
        self,
        *,
        block_size: int,
        rope_limit: int,
        user_max_model_len: int | None = None,
        context: int | None = None,
    ) -> "SinkConfig":
        """Fill the default window and check the settings against the model.

        ``rope_limit``: rows of the model's rotary table (``max_position_embeddings``
        times a linear factor; ``policy.NO_ROTARY_LIMIT`` for ALiBi models). ``context``:
        the positions the default window is half of (at most 4096); ``rope_limit`` if
        ``None`` (ALiBi models give their trained context). The per-sequence step size is
        clamped by the caller to ``policy.max_step_tokens`` (see
        ``vllm_sink.patches.frontend.engine_args``).
        """
        B = block_size
        system = self.system_sink
        S = self.sink_pages * B if self.sink_tokens in (None, SINK_FROM_SYSTEM) else self.sink_tokens
        s = cdiv(S, B)
        window = self.window
        if window is None:
            window = min(DEFAULT_WINDOW_CAP, ((context or rope_limit) // 2) // B * B)
            if user_max_model_len is not None:
                window = min(window, (user_max_model_len - S) // B * B)
        if window < B:
            raise SinkConfigError(
                f"kv_window={window} is smaller than one page (block_size={B}); use "
                f"kv_window >= {B} or a smaller block_size"
            )
        if window % B:
            raise SinkConfigError(
                f"kv_window={window} is not a multiple of block_size={B}; use "
                f"kv_window={window // B * B} or {cdiv(window, B) * B}"
            )
        cap = self.max_sink_tokens
        if cap is None and system:
            # The largest default that fits: the window, the model's positions (leaving a
            # page a step), --max-model-len and the stream cap; never below the engine's sink
            # (the checks below then name the fix).
            room = [DEFAULT_SYSTEM_SINK_CAP, window, rope_limit - window - 2 * B, self.stream_cap - window]
            if user_max_model_len is not None:
                room.append(user_max_model_len - window)
            cap = max(S, min(room))
        elif cap is None:
            cap = S
        if cap < S:
            raise SinkConfigError(
                f"max_sink_tokens={cap} is below the engine's sink ({S} tokens); raise "
                "max_sink_tokens or use a smaller sink_pages / sink_tokens"
            )
        if cap > window:
            raise SinkConfigError(
                f"the sink ({cap} tokens) is larger than the window "
                f"({window} tokens); use a smaller sink (sink_pages / sink_tokens / "
                "max_sink_tokens) or a larger kv_window"
            )
        if max_step_tokens(cap, window, B, rope_limit) < 1:
            raise SinkConfigError(
                f"sink + window + one page = {cap + window + B} tokens do not fit in the "
                f"model's {rope_limit} rotary positions; use kv_window <= "
                f"{(rope_limit - cap - 2 * B) // B * B}"
            )
        if user_max_model_len is not None and cap + window > user_max_model_len:
            raise SinkConfigError(
                f"sink + window = {cap + window} tokens exceed --max-model-len="
                f"{user_max_model_len}; with the sink policy max_model_len bounds the "
                f"attended context: raise it or lower kv_window"
            )
        if self.stream_cap < cap + window:
            raise SinkConfigError(
                f"max_stream_len={self.max_stream_len} is shorter than sink + window "
                f"({cap + window}); raise max_stream_len"
            )
        return SinkConfig(
            policy=self.policy,
            sink_pages=s,
            sink_tokens=S,
            window=window,
            max_stream_len=self.max_stream_len,
            sessions=self.sessions,
            session_pages=self.session_pages,
            max_sink_tokens=cap,
            sink_from=SINK_FROM_SYSTEM if system else None,
        )


def request_sink_tokens(extra_args: Mapping[str, Any] | None, geometry: SinkGeometry) -> int:
    """The sink of a request whose sampling parameters carry ``extra_args``: its own
    ``sink_tokens`` if it asks for one, else the engine's. Raises :class:`SinkConfigError`
    (the front end answers HTTP 400) for a value the engine cannot serve."""
    if not extra_args or REQUEST_SINK_KEY not in extra_args:
        return geometry.sink_tokens
    n = extra_args[REQUEST_SINK_KEY]
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= geometry.sink_cap:
        raise SinkConfigError(
            f"sink_tokens={n!r} (this request's own sink) must be a whole number of tokens from 0 "
            f"to {geometry.sink_cap}; start the engine with a larger max_sink_tokens "
            "(--max-sink-tokens) to allow larger sinks"
        )
    return n
