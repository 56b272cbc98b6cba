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
