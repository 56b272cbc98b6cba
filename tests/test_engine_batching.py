"""Must-show 4: continuous batching. Eight requests of different lengths, most of them
evicting, run concurrently and give the same greedy tokens as each run alone."""

import pytest
from vllm import SamplingParams

from vllm_sink.metrics import SINK_STATS

PROMPT_LENS = [40, 150, 300, 520, 700, 950, 1200, 1500]
MAX_TOKENS = [24, 8, 40, 16, 32, 12, 20, 28]


@pytest.mark.engine("sink16")
def test_batched_equals_alone(llm, hamlet_ids):
    prompts = [hamlet_ids[3000 * i : 3000 * i + n] for i, n in enumerate(PROMPT_LENS)]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS]
    evicted0 = SINK_STATS.pages_evicted
    batched = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert SINK_STATS.pages_evicted > evicted0
    for prompt, p, out in zip(prompts, params, batched):
        alone = llm.generate([{"prompt_token_ids": prompt}], p, use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == list(alone.outputs[0].token_ids), len(prompt)
        assert len(out.outputs[0].token_ids) == p.max_tokens
