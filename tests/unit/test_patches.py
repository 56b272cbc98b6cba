"""The bindings themselves: idempotent install, flags that reach the engine config, and the
spec/manager registration (no engine)."""

import pytest


def test_install_is_idempotent():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.llm import LLM
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from vllm_sink import patches

    patches.install()
    before = (EngineArgs.create_engine_config, LLM.__init__, GPUModelRunner.get_kv_cache_spec, Worker.get_kv_cache_spec)
    patches.install()
    after = (EngineArgs.create_engine_config, LLM.__init__, GPUModelRunner.get_kv_cache_spec, Worker.get_kv_cache_spec)
    assert before == after
    for fn in after:
        assert fn._vllm_sink and not getattr(fn.__wrapped__, "_vllm_sink", False)


def test_cli_flags_reach_additional_config():
    """Stock from_cli_args keeps only dataclass fields; ours must fold the flags in."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from serve_parser import serve_parser

    parser = serve_parser()
    help_text = parser.format_help()
    for flag in ("--kv-policy", "--sink-pages", "--kv-window", "--max-stream-len"):
        assert flag in help_text
    args = parser.parse_args(["--model", "m", "--kv-policy", "sink", "--sink-pages", "2", "--kv-window", "512", "--additional-config", '{"other": 1}'])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config == {"other": 1, "kv_policy": "sink", "sink_pages": 2, "kv_window": 512}
    plain = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m"]))
    assert "kv_policy" not in (plain.additional_config or {})


def test_spec_registered_with_its_manager():
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm_sink.patches.scheduler.manager import StreamingSinkManager
    from vllm_sink.patches.spec import SinkWindowSpec
    from vllm_sink.policy import SinkGeometry

    g = SinkGeometry(block_size=16, sink_tokens=16, kv_window=256, step_tokens=64, concurrent_steps=1, rope_limit=8192)
    spec = SinkWindowSpec(block_size=16, num_kv_heads=3, head_size=64, dtype=torch.float32, geometry=g)
    assert KVCacheSpecRegistry.get_manager_class(spec) is StreamingSinkManager
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(spec) is FullAttentionSpec
    # Built-ins still resolve (registering into an empty registry would break them).
    full = FullAttentionSpec(block_size=16, num_kv_heads=3, head_size=64, dtype=torch.float32)
    assert KVCacheSpecRegistry.get_manager_class(full).__name__ == "FullAttentionManager"
    # The contract's page bound, and a merge that keeps our fields.
    assert spec.max_live_pages == 1 + (255 + 64 + 15) // 16 + 1
    merged = SinkWindowSpec.merge([spec, spec])
    assert merged == spec
    with pytest.raises(AssertionError):
        SinkWindowSpec.merge([spec, SinkWindowSpec(block_size=16, num_kv_heads=3, head_size=64, dtype=torch.float32, geometry=SinkGeometry(**{**g.to_dict(), "sink_tokens": 32}))])
    with pytest.raises(ValueError, match="16-token pages"):
        SinkWindowSpec.from_full(FullAttentionSpec(block_size=32, num_kv_heads=3, head_size=64, dtype=torch.float32), g)


@pytest.mark.parametrize("S", [16, 4])
def test_manager_frees_pages_leaving_the_window(S):
    """StreamingSinkManager on vLLM's real BlockPool: sink pinned, pages [s, ceil(w0/B))
    freed. With a 4-token sink the page holding w0 becomes the sink page (its slots from w0
    on are the window's first tokens) and the old sink page is freed in its place."""
    import torch
    from vllm.v1.core.block_pool import BlockPool

    from vllm_sink.patches.scheduler.manager import StreamingSinkManager
    from vllm_sink.patches.spec import SinkWindowSpec
    from vllm_sink.policy import SinkGeometry
    from vllm_sink.policy import cdiv, window_start

    B, s, W = 16, 1, 64
    g = SinkGeometry(block_size=B, sink_tokens=S, kv_window=W, step_tokens=16, concurrent_steps=1, rope_limit=8192)
    spec = SinkWindowSpec(block_size=B, num_kv_heads=1, head_size=8, dtype=torch.float32, geometry=g)
    pool = BlockPool(num_gpu_blocks=64, enable_caching=False, hash_block_size=B)
    mgr = StreamingSinkManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0, scheduler_block_size=B)
    free0 = pool.get_num_free_blocks()
    a, moves = 0, 0
    while a < 600:
        before = list(mgr.req_to_blocks.get("r", []))
        mgr.remove_skipped_blocks("r", a)
        w0 = window_start(a, S, W, B)
        if before and S % B and cdiv(w0, B) > cdiv(window_start(a - 16, S, W, B), B):
            # The page that held w0 is now the sink page; the old sink page went back.
            assert mgr.req_to_blocks["r"][s - 1] is before[cdiv(w0, B) - 1]
            assert before[s - 1].ref_cnt == 0
            moves += 1
        elif before:
            assert mgr.req_to_blocks["r"][s - 1] is before[s - 1]
        mgr.allocate_new_blocks("r", a + 16, a + 16)
        blocks = mgr.req_to_blocks["r"]
        assert not blocks[0].is_null  # the sink stays
        assert all(b.is_null for b in blocks[s : cdiv(w0, B)])
        assert all(not b.is_null for b in blocks[cdiv(w0, B) :])
        assert sum(not b.is_null for b in blocks) <= spec.max_live_pages
        a += 16
    assert moves == (0 if S % B == 0 else (cdiv(window_start(a - 16, S, W, B), B) - s))
    mgr.free("r")
    assert pool.get_num_free_blocks() == free0
    assert mgr.get_num_common_prefix_blocks("r") == 0


def test_admitting_reserves_the_bounded_footprint():
    """Requests are admitted only while every admitted stream can still grow to its
    footprint, so growing streams never run out of pages (never preempted)."""
    import torch
    from vllm.v1.core.block_pool import BlockPool

    from vllm_sink.patches.scheduler.manager import StreamingSinkManager
    from vllm_sink.patches.spec import SinkWindowSpec
    from vllm_sink.policy import SinkGeometry

    B = 16
    g = SinkGeometry(block_size=B, sink_tokens=16, kv_window=64, step_tokens=16, concurrent_steps=1, rope_limit=8192)
    spec = SinkWindowSpec(block_size=B, num_kv_heads=1, head_size=8, dtype=torch.float32, geometry=g)
    footprint = spec.max_live_pages  # 1 + ceil(79/16) + 1 = 7
    pool = BlockPool(num_gpu_blocks=31, enable_caching=False, hash_block_size=B)  # 30 usable
    mgr = StreamingSinkManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0, scheduler_block_size=B)
    admitted, pos = [], {}
    for i in range(10):
        rid = f"r{i}"
        if mgr.get_num_blocks_to_allocate(rid, 16, [], 0, 0, 16) <= pool.get_num_free_blocks():
            mgr.allocate_new_blocks(rid, 16, 16)
            admitted.append(rid)
            pos[rid] = 16
    assert len(admitted) == 30 // footprint == 4
    # Every admitted stream now grows far past its window: allocation always fits.
    for _ in range(60):
        for rid in admitted:
            mgr.remove_skipped_blocks(rid, pos[rid])
            need = mgr.get_num_blocks_to_allocate(rid, pos[rid] + 16, [], pos[rid], pos[rid], pos[rid] + 16)
            assert need <= pool.get_num_free_blocks()
            mgr.allocate_new_blocks(rid, pos[rid] + 16, pos[rid] + 16)
            pos[rid] += 16
    for rid in admitted:
        mgr.free(rid)
    assert pool.get_num_free_blocks() == 30


def test_footprint_follows_request_length_and_phase():
    """Short requests reserve only what their whole length needs; a decoding stream only
    the decode bound; so many short requests run at once (no throughput lost to admitting them)."""
    from types import SimpleNamespace

    import torch
    from vllm.v1.core.block_pool import BlockPool

    from vllm_sink.patches.scheduler.manager import StreamingSinkManager
    from vllm_sink.patches.spec import SinkWindowSpec
    from vllm_sink.policy import SinkGeometry

    B = 16
    # 512-token chunks, two steps in flight (asynchronous scheduling).
    g = SinkGeometry(block_size=B, sink_tokens=16, kv_window=256, step_tokens=512, concurrent_steps=2, rope_limit=8192)
    spec = SinkWindowSpec(block_size=B, num_kv_heads=1, head_size=8, dtype=torch.float32, geometry=g)
    pool = BlockPool(num_gpu_blocks=401, enable_caching=False, hash_block_size=B)
    mgr = StreamingSinkManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0, scheduler_block_size=B)
    assert spec.max_live_pages == 1 + -(-(255 + 1024) // 16) + 1  # 82
    short = SimpleNamespace(request_id="short", num_prompt_tokens=40, max_tokens=24, num_computed_tokens=0)
    mgr.note_request(short)
    assert mgr.streams["short"].footprint == 4  # ceil(64 / 16), not 82
    long_ = SimpleNamespace(request_id="long", num_prompt_tokens=5000, max_tokens=10_000, num_computed_tokens=0)
    mgr.note_request(long_)
    assert mgr.streams["long"].footprint == 82  # prefilling with 1024-token chunks in flight
    long_.num_computed_tokens = 5002
    mgr.note_request(long_)
    assert mgr.streams["long"].footprint == 1 + -(-(255 + 2) // 16) + 1  # 19 once decoding
    # 100 short requests fit in a 400-page pool at once.
    admitted = 0
    for i in range(100):
        r = SimpleNamespace(request_id=f"s{i}", num_prompt_tokens=40, max_tokens=24, num_computed_tokens=0)
        mgr.note_request(r)
        if mgr.get_num_blocks_to_allocate(r.request_id, 40, [], 0, 0, 40) <= pool.get_num_free_blocks():
            mgr.allocate_new_blocks(r.request_id, 40, 40)
            admitted += 1
    assert admitted == 100


def test_sink_engines_get_the_v1_model_runner(monkeypatch):
    """On the GPU vLLM 0.26 picks its V2 runner for dense models; a sink engine's config
    answers V1 in every process (it travels in additional_config), with no environment
    variable; a vanilla config keeps vLLM's own answer. The GPU's choice is simulated by
    making vLLM's own rule answer V2, which it does not on this CPU (no Triton). An explicit
    ``VLLM_USE_V2_MODEL_RUNNER`` is vLLM's own switch and is honoured (the policy also binds
    to the V2 runner: ``tests/test_engine_v2_runner.py``)."""
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

    from vllm_sink import assets
    from vllm_sink.config import CONFIG_KEY

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    model = str(assets.model_dir())
    sink = EngineArgs(model=model, dtype="float32", additional_config={"kv_policy": "sink", "kv_window": 256}).create_engine_config()
    vanilla = EngineArgs(model=model, dtype="float32", max_model_len=1024).create_engine_config()
    assert sink.additional_config[CONFIG_KEY]["policy"] == "sink"
    vllms_rule = VllmConfig.use_v2_model_runner.fget.__wrapped__
    if hasattr(VllmConfig, "_is_default_v2_model_runner_model"):  # vLLM 0.26.0's rule
        monkeypatch.setattr(VllmConfig, "_is_default_v2_model_runner_model", lambda self: True)
    else:  # 0.32.0's: V2 unless a feature it does not support is on
        monkeypatch.setattr(VllmConfig, "_get_v2_model_runner_unsupported_features", lambda self: [])
    monkeypatch.setattr("vllm.config.vllm.HAS_TRITON", True)
    assert vllms_rule(sink) and vllms_rule(vanilla)  # what vLLM alone would pick: V2
    assert vanilla.use_v2_model_runner
    assert not sink.use_v2_model_runner
    # Where vLLM's own switch is set, a sink config gets vLLM's answer (which reads the
    # switch through vllm.envs, cached once an engine has started in this process).
    for value in ("1", "0"):
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", value)
        assert sink.use_v2_model_runner == vllms_rule(sink)


def test_create_engine_config_is_idempotent():
    """Building the config twice from the same arguments builds the same sink engine (the
    arguments keep the user's settings)."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_sink import assets
    from vllm_sink.config import CONFIG_KEY, NO_STREAM_CAP

    args = EngineArgs(model=str(assets.model_dir()), dtype="float32", max_model_len=2048,
                      additional_config={"kv_policy": "sink", "kv_window": 256, "other": 1})
    first, second = args.create_engine_config(), args.create_engine_config()
    assert args.additional_config == {"kv_policy": "sink", "kv_window": 256, "other": 1}
    assert args.max_model_len == 2048
    for cfg in (first, second):
        assert cfg.additional_config[CONFIG_KEY]["geometry"]["kv_window"] == 256
        assert cfg.additional_config["other"] == 1
        assert cfg.model_config.max_model_len == NO_STREAM_CAP  # no stream cap set
        assert cfg.cache_config.enable_prefix_caching  # on, as vLLM's default
    assert first.additional_config == second.additional_config


def test_engine_config_with_vllm_env_cache_taken():
    """Once an engine has started, vLLM caches its environment variables; a sink engine
    built next in the same process still gets VLLM_ALLOW_LONG_MAX_MODEL_LEN for its config
    (the stream cap is past the model's positions), and the cache is taken again after."""
    from vllm import envs
    from vllm.engine.arg_utils import EngineArgs

    from vllm_sink import assets
    from vllm_sink.config import NO_STREAM_CAP

    envs.enable_envs_cache()  # what a running engine leaves behind
    try:
        assert not envs.VLLM_ALLOW_LONG_MAX_MODEL_LEN
        cfg = EngineArgs(model=str(assets.model_dir()), dtype="float32",
                         additional_config={"kv_policy": "sink", "kv_window": 256}).create_engine_config()
        assert cfg.model_config.max_model_len == NO_STREAM_CAP
        assert envs._is_envs_cache_enabled() and not envs.VLLM_ALLOW_LONG_MAX_MODEL_LEN
    finally:
        envs.disable_envs_cache()


def test_rotary_embeddings_are_an_allow_list():
    """vLLM's plain RoPE is served; any other rotary class, a subclass too, is refused at
    start-up with its name (an unknown rotation could not be re-positioned exactly)."""
    import torch
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    from vllm_sink import SinkConfigError
    from vllm_sink.patches.worker.probes import rotary_table

    class CustomRotaryEmbedding(RotaryEmbedding):
        pass

    from vllm.config import VllmConfig, set_current_vllm_config

    args = dict(head_size=64, rotary_dim=64, max_position_embeddings=128, base=10000.0, is_neox_style=True, dtype=torch.float32)
    with set_current_vllm_config(VllmConfig()):  # vLLM's custom ops are built inside one
        plain = torch.nn.ModuleList([RotaryEmbedding(**args)])
        custom = torch.nn.ModuleList([CustomRotaryEmbedding(**args)])
    assert rotary_table(plain).limit == 128
    with pytest.raises(SinkConfigError, match="not \\['CustomRotaryEmbedding'\\]"):
        rotary_table(custom)
    with pytest.raises(SinkConfigError, match="has none"):
        rotary_table(torch.nn.Linear(2, 2))


def test_partial_sinks_need_the_kv_block_size_in_the_kernel():
    """A sink ending inside a page (the engine's, or a request's own under max_sink_tokens)
    is refused where the attention kernel splits KV pages into smaller blocks."""
    from vllm_sink.config import SinkConfigError
    from vllm_sink.patches.refusals import check_partial_sink_kernel

    check_partial_sink_kernel(16, 16, 2)  # whole pages, no own sinks: fine
    check_partial_sink_kernel(20, 16, 1, 40)  # one kernel block per page: anything goes
    with pytest.raises(SinkConfigError, match="sink_pages"):
        check_partial_sink_kernel(20, 16, 2)
    with pytest.raises(SinkConfigError, match="drop max_sink_tokens"):
        check_partial_sink_kernel(16, 16, 2, 40)


def test_streaming_input_is_refused_in_the_front_end_on_the_v2_runner():
    """A streaming-input session's chunk (``resumable=True``) on a sink engine that runs on
    vLLM's V2 model runner is refused where vLLM processes the request's inputs, so the
    caller gets the error and the engine serves on; on V1, or without the sink policy, it
    passes."""
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_sink import SinkConfigError, assets
    from vllm_sink.patches.frontend.input_processor import check_streaming_input

    model = str(assets.model_dir())
    sink = EngineArgs(model=model, dtype="float32", additional_config={"kv_policy": "sink", "kv_window": 256}).create_engine_config()
    on = lambda cfg, v2: SimpleNamespace(additional_config=cfg.additional_config, use_v2_model_runner=v2)  # noqa: E731
    with pytest.raises(SinkConfigError, match="unset VLLM_USE_V2_MODEL_RUNNER"):
        InputProcessor.process_inputs(SimpleNamespace(vllm_config=on(sink, True)), "r", {"prompt_token_ids": [1]},
                                      SamplingParams(), ("generate",), resumable=True)
    check_streaming_input(on(sink, False))
    check_streaming_input(SimpleNamespace(additional_config={}, use_v2_model_runner=True))
