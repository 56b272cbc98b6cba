"""Seeded sampling with the sink policy on the CPU, prompts prefilled in many chunks.

vLLM samples every row of a step, also the rows of prefill chunks that are not the prompt's
last, and rewinds their generators by offset, which a CPU generator cannot do: without the
plugin's rewind by state (``vllm_sink.patches.worker.sampler``) the first such request kills the
engine. The test checks more than survival: the tokens drawn are exactly those that the
request's own seeded generator gives when it draws once per generated token, against the
independent reference's logits (so no draw was spent on a discarded chunk). The same
check with the generator advanced by the discarded chunks' draws disagrees, which shows
the comparison can fail.
"""

import pytest
import torch

from reference import chunked_steps

PROMPT = 600  # 10 chunks of <= 64 tokens; past the window (16 + 256), so pages are evicted
GEN = 12
SEED = 1234
CHUNK = 64  # the "sink16" engine's long_prefill_token_threshold


def _sample(llm, prompt, seed, n=1):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=GEN, temperature=1.0, seed=seed, n=n, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": list(prompt)}], params, use_tqdm=False)[0]
    return [list(c.token_ids) for c in out.outputs]


def _replay(logits_rows, skip_draws: int) -> list[int]:
    """What vLLM's CPU sampler draws from the request's seeded generator (temperature 1,
    no top-k/top-p): ``argmax(softmax(logits) / q)`` with ``q ~ Exp(1)`` from the generator,
    after ``skip_draws`` draws spent elsewhere."""
    g = torch.Generator().manual_seed(SEED)
    vocab = logits_rows[0].shape[-1]
    for _ in range(skip_draws):
        torch.empty(vocab, dtype=torch.float32).exponential_(generator=g)
    out = []
    for logits in logits_rows:
        probs = logits.to(torch.float32).softmax(dim=-1, dtype=torch.float32)
        q = torch.empty(vocab, dtype=torch.float32).exponential_(generator=g)
        out.append(int((probs / q).argmax()))
    return out


@pytest.mark.engine("sink16")
def test_seeded_sampling_keeps_its_sequence_across_chunks(llm, hamlet_ids, reference):
    prompt = hamlet_ids[:PROMPT]
    first = _sample(llm, prompt, SEED)[0]
    assert _sample(llm, prompt, SEED)[0] == first, "the same seed gave another text"
    assert _sample(llm, prompt, SEED + 1)[0] != first

    tokens = list(prompt) + first
    steps = chunked_steps(PROMPT, CHUNK, len(tokens))
    rows = {}
    for a, b, logits in reference.stream_logits(tokens, steps, sink_tokens=16, window=256, block_size=16):
        for t in range(a, b):
            if t >= PROMPT - 1:
                rows[t] = logits[t - a]
    logits_rows = [rows[t] for t in range(PROMPT - 1, PROMPT - 1 + GEN)]
    discarded = len([s for s in steps if s[1] < PROMPT])
    assert discarded == 9
    assert first == _replay(logits_rows, 0)
    # Had the discarded chunks' draws been kept, the tokens would be these:
    assert first != _replay(logits_rows, discarded)


@pytest.mark.engine("sink16")
def test_seeded_parallel_sampling_and_mixed_batches(llm, hamlet_ids):
    """n=4 with a seed, and a seeded chunked prompt batched with a greedy one: served, the
    pages come back, the seeded request repeats its text when it runs alone again."""
    from vllm import SamplingParams

    from engine_helpers import free_or_kept

    free0 = free_or_kept(llm)
    prompt = hamlet_ids[:PROMPT]
    four = _sample(llm, prompt, SEED, n=4)
    assert len(four) == 4 and all(len(c) == GEN for c in four)
    assert four == _sample(llm, prompt, SEED, n=4)
    outs = llm.generate(
        [{"prompt_token_ids": prompt}, {"prompt_token_ids": hamlet_ids[PROMPT : 2 * PROMPT]}],
        [SamplingParams(max_tokens=GEN, temperature=1.0, seed=SEED, ignore_eos=True),
         SamplingParams(max_tokens=GEN, temperature=0, ignore_eos=True)],
        use_tqdm=False,
    )
    assert [len(o.outputs[0].token_ids) for o in outs] == [GEN, GEN]
    assert free_or_kept(llm) == free0
