"""Settings and their validation (no engine)."""

import pytest

from vllm_sink.config import SinkConfig, SinkConfigError


def test_defaults_are_vanilla():
    cfg = SinkConfig.from_user({})
    assert cfg.policy == "full" and not cfg.enabled


def test_default_window_fits_context():
    cfg = SinkConfig.from_user({"kv_policy": "sink"}).resolve(block_size=16, rope_limit=8192)
    assert cfg.window == 4096 and cfg.sink_pages == 1
    small = SinkConfig.from_user({"kv_policy": "sink"}).resolve(block_size=16, rope_limit=512)
    assert small.window == 256


@pytest.mark.parametrize(
    "settings,resolve,message",
    [
        ({"kv_policy": "bogus"}, None, "is not a KV policy"),
        ({"kv_policy": "sink", "sink_pages": -1}, None, "negative"),
        ({"kv_policy": "sink", "sink_tokens": -4}, None, "negative"),
        ({"kv_policy": "sink", "sink_tokens": 4, "sink_pages": 1}, None, "not both"),
        ({"kv_policy": "sink", "sink_tokens": 100, "kv_window": 64}, dict(block_size=16, rope_limit=8192), "larger than the window"),
        ({"kv_policy": "sink", "kv_window": 0}, None, "must be positive"),
        ({"kv_policy": "sink", "kv_window": "big"}, None, "must be an integer"),
        ({"kv_policy": "sink", "sink_size": 4}, None, "unknown vllm-sink setting"),
        ({"kv_policy": "sink", "kv_window": 8}, dict(block_size=16, rope_limit=8192), "smaller than one page"),
        ({"kv_policy": "sink", "kv_window": 100}, dict(block_size=16, rope_limit=8192), "not a multiple"),
        ({"kv_policy": "sink", "sink_pages": 5, "kv_window": 64}, dict(block_size=16, rope_limit=8192), "larger than the window"),
        ({"kv_policy": "sink", "kv_window": 8192}, dict(block_size=16, rope_limit=8192), "rotary positions"),
        ({"kv_policy": "sink", "max_stream_len": 100}, dict(block_size=16, rope_limit=8192), "max_stream_len"),
        ({"kv_policy": "sink", "kv_window": 1024}, dict(block_size=16, rope_limit=8192, user_max_model_len=512), "max-model-len"),
        ({"kv_policy": "sink", "kv_sessions": "yes"}, None, "kv_sessions must be true or false"),
        ({"kv_policy": "sink", "kv_sessions": True, "kv_session_pages": 0}, None, "positive number of pages"),
        ({"kv_policy": "sink", "kv_sessions": False, "kv_session_pages": 100}, None, "add kv_sessions=True"),
        ({"kv_sessions": True}, None, "only apply with kv_policy='sink'"),
    ],
)
def test_invalid_settings_name_the_fix(settings, resolve, message):
    with pytest.raises(SinkConfigError, match=message):
        cfg = SinkConfig.from_user(settings)
        if resolve is not None:
            cfg.resolve(**resolve)


@pytest.mark.parametrize("settings,pages,tokens", [
    ({"kv_policy": "sink"}, 1, 16),
    ({"kv_policy": "sink", "sink_pages": 2}, 2, 32),
    ({"kv_policy": "sink", "sink_tokens": 4}, 1, 4),
    ({"kv_policy": "sink", "sink_tokens": 20}, 2, 20),
    ({"kv_policy": "sink", "sink_tokens": 0}, 0, 0),
])
def test_sink_in_tokens_or_pages(settings, pages, tokens):
    cfg = SinkConfig.from_user(settings).resolve(block_size=16, rope_limit=8192)
    assert (cfg.sink_pages, cfg.sink_tokens) == (pages, tokens)


def test_roundtrip_through_additional_config():
    cfg = SinkConfig.from_user({"kv_policy": "sink", "kv_window": 512}).resolve(block_size=16, rope_limit=8192)
    again = SinkConfig.from_additional_config({"vllm_sink": cfg.to_dict()})
    assert again == cfg
    assert SinkConfig.from_additional_config({}) is None


def test_sessions_settings_resolve_to_a_page_cap():
    """Sessions are on with the sink policy unless turned off; kept streams may hold the
    given pages (no cap: as many as the pool has, released whenever a new request needs
    them)."""
    resolve = dict(block_size=16, rope_limit=8192)
    assert SinkConfig.from_user({"kv_policy": "sink", "kv_sessions": False}).resolve(**resolve).kept_pages == 0
    on = SinkConfig.from_user({"kv_policy": "sink"}).resolve(**resolve)
    assert on.sessions and on.kept_pages >= 1 << 40
    capped = SinkConfig.from_user({"kv_policy": "sink", "kv_session_pages": 300})
    assert capped.resolve(**resolve).kept_pages == 300
    again = SinkConfig.from_additional_config({"vllm_sink": capped.resolve(**resolve).to_dict()})
    assert again.kept_pages == 300


# ----------------------------------------------------------------- sink_tokens="system"
def test_system_sink_resolves_to_the_default_sink_and_a_cap():
    """``sink_tokens="system"``: chat requests take their system prompt as the sink, up to
    ``max_sink_tokens`` (default min(1024, window), within the model's positions); every
    other request has ``sink_pages`` pages. The resolved ``sink_tokens`` is that int, the mode
    is ``sink_from``."""
    resolve = dict(block_size=16, rope_limit=8192)
    cfg = SinkConfig.from_user({"kv_policy": "sink", "sink_tokens": "system"})
    assert cfg.system_sink and cfg.sink_from is None
    r = cfg.resolve(**resolve)
    assert (r.sink_tokens, r.sink_pages, r.max_sink_tokens, r.sink_from, r.window) == (16, 1, 1024, "system", 4096)
    assert isinstance(r.sink_tokens, int) and r.system_sink
    # The cap is at most the window, and leaves the model's positions a page a step.
    assert SinkConfig.from_user({"kv_policy": "sink", "sink_tokens": "system", "kv_window": 256}).resolve(
        **resolve).max_sink_tokens == 256
    small = SinkConfig.from_user({"kv_policy": "sink", "sink_tokens": "system"}).resolve(block_size=16, rope_limit=512)
    assert (small.window, small.max_sink_tokens) == (256, 512 - 256 - 32)
    capped = SinkConfig.from_user({"kv_policy": "sink", "sink_tokens": "system", "kv_window": 1024},
                                  ).resolve(block_size=16, rope_limit=8192, user_max_model_len=1536)
    assert capped.max_sink_tokens == 512
    # sink_pages gives the other requests' sink; max_sink_tokens the cap.
    r = SinkConfig.from_user({"kv_policy": "sink", "sink_tokens": "system", "sink_pages": 2,
                              "max_sink_tokens": 64}).resolve(**resolve)
    assert (r.sink_tokens, r.sink_pages, r.max_sink_tokens, r.sink_from) == (32, 2, 64, "system")
    # Round trip through additional_config, as every process reads it.
    again = SinkConfig.from_additional_config({"vllm_sink": r.to_dict()})
    assert again == r and again.system_sink and again.sink_tokens == 32
    # Integer sinks are not system sinks.
    plain = SinkConfig.from_user({"kv_policy": "sink", "sink_tokens": 4}).resolve(**resolve)
    assert plain.sink_from is None and not plain.system_sink and plain.max_sink_tokens == 4


@pytest.mark.parametrize(
    "settings,resolve,message",
    [
        ({"kv_policy": "sink", "sink_tokens": "System"}, None, "sink_tokens must be an integer"),
        ({"kv_policy": "sink", "sink_tokens": "4"}, None, "must be an integer"),
        ({"kv_policy": "sink", "sink_tokens": "system", "sink_pages": -1}, None, "negative"),
        ({"kv_policy": "sink", "sink_tokens": "system", "sink_pages": 4, "max_sink_tokens": 32},
         dict(block_size=16, rope_limit=8192), "below the engine's sink"),
        ({"kv_policy": "sink", "sink_tokens": "system", "kv_window": 256, "max_sink_tokens": 512},
         dict(block_size=16, rope_limit=8192), "larger than the window"),
        ({"kv_policy": "sink", "sink_tokens": "system", "kv_window": 256, "max_sink_tokens": 256},
         dict(block_size=16, rope_limit=512), "rotary positions"),
        ({"sink_tokens": "system"}, None, "only apply with kv_policy='sink'"),
    ],
)
def test_invalid_system_sink_settings_name_the_fix(settings, resolve, message):
    with pytest.raises(SinkConfigError, match=message):
        cfg = SinkConfig.from_user(settings)
        if resolve is not None:
            cfg.resolve(**resolve)


def test_cli_sink_tokens_takes_a_count_or_system():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from serve_parser import serve_parser

    from vllm_sink import patches

    patches.install()
    parser = serve_parser()
    (flag,) = [a for a in parser._actions if a.dest == "sink_tokens"]
    assert "'system'" in flag.help
    for value, want in (("system", "system"), ("4", 4)):
        args = parser.parse_args(["--model", "m", "--kv-policy", "sink", "--sink-tokens", value, "--max-sink-tokens", "64"])
        assert AsyncEngineArgs.from_cli_args(args).additional_config == {
            "kv_policy": "sink", "sink_tokens": want, "max_sink_tokens": 64}
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--kv-policy", "sink", "--sink-tokens", "prompt"])
