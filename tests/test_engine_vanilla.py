"""Before the first eviction the plugin's output is vanilla vLLM's."""

import pytest
from vllm import SamplingParams

from vllm_sink.policy import window_start

# sink16: S=16, W=256, B=16. The first eviction happens at the step starting at
# a = 287 (w0 = 32); these requests end before that.
PROMPT_LENS = [20, 90, 150, 200]
MAX_TOKENS = 60


def _greedy(llm, prompts):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [
        (list(o.outputs[0].token_ids), [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
        for o in outs
    ]


def _prompts(hamlet_ids):
    return [hamlet_ids[1000 * i : 1000 * i + n] for i, n in enumerate(PROMPT_LENS)]


@pytest.mark.engine("sink16")
def test_sink_engine_runs_the_short_requests(memo, hamlet_ids):
    prompts = _prompts(hamlet_ids)
    assert all(window_start(len(p) + MAX_TOKENS - 1, 16, 256, 16) == 16 for p in prompts)
    sink = memo.get("sink16", "vanilla-compare", lambda e: _greedy(e, prompts))
    assert [len(ids) for ids, _ in sink] == [MAX_TOKENS] * len(prompts)


@pytest.mark.engine("vanilla16")
def test_same_greedy_tokens_as_vanilla_before_eviction(llm, memo, hamlet_ids):
    prompts = _prompts(hamlet_ids)
    vanilla = _greedy(llm, prompts)
    sink = memo.get("sink16", "vanilla-compare", lambda e: _greedy(e, prompts))
    for (v_ids, v_lp), (s_ids, s_lp) in zip(vanilla, sink):
        assert s_ids == v_ids
        # Same kernels, same positions and slots: the log-probs agree to rounding.
        assert max(abs(a - b) for a, b in zip(v_lp, s_lp)) < 1e-5


@pytest.mark.engine("vanilla16")
def test_full_policy_leaves_vllm_untouched(llm):
    """kv_policy "full" (the default) keeps vLLM's own spec, manager and config."""
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from engine_helpers import scheduler_of

    scheduler = scheduler_of(llm)
    group = scheduler.kv_cache_config.kv_cache_groups[0]
    assert type(group.kv_cache_spec) is FullAttentionSpec
    assert type(scheduler.kv_cache_manager.coordinator.single_type_managers[0]) is FullAttentionManager
    assert "vllm_sink" not in llm.llm_engine.vllm_config.additional_config
    assert llm.llm_engine.vllm_config.model_config.max_model_len == 4096
