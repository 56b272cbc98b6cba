"""Fifty idle conversations: bounded while kept, released least recently used first.

Sessions are on by default. Fifty conversations, each past the window, finish and wait
for their next turn: each kept stream holds at most a decoding stream's page bound
(its sink page and its window's pages, not its history), and the pool accounts for every
page (free + kept == pool). A batch of long new streams then needs more than the free
pages: kept streams give way, least recently used first, no running stream is preempted,
and a released conversation's next turn is served by a full prefill with the same answer as
a fresh engine would give (the greedy tokens and logprobs of the same prompt with prompt
logprobs, which is never resumed).
"""

import pytest
import torch
from vllm import SamplingParams

from engine_helpers import free_or_kept, scheduler_of
from tolerances import F32_MAX_ABS

from vllm_sink.metrics import SINK_STATS

N_CONV, PROMPT, BATCH = 50, 400, 10


@pytest.mark.engine("sink16_sessions_pool1000")
def test_fifty_idle_conversations_are_bounded_and_give_way_lru(llm, hamlet_ids):
    sched = scheduler_of(llm)
    manager = sched.kv_cache_manager.coordinator.single_type_managers[0]
    sessions, g = manager.sessions, manager.geometry
    pool = manager.block_pool
    preempted = []
    orig = sched._preempt_request
    sched._preempt_request = lambda request, *a, **k: (preempted.append(request.request_id), orig(request, *a, **k))[1]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    total = free_or_kept(llm)
    batch = {}  # kept stream key -> the batch it finished in (least recently used first)
    for start in range(0, N_CONV, BATCH):  # five batches: a least-recently-used order by batch
        prompts = [hamlet_ids[i * 410 : i * 410 + PROMPT] for i in range(start, start + BATCH)]
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        batch.update({key: start // BATCH for key in sessions.kept.keys() if key not in batch})
    order = sessions.kept.keys()
    assert len(order) == N_CONV and SINK_STATS.kept_streams == N_CONV
    assert [batch[key] for key in order] == sorted(batch[key] for key in order)
    histories = {key: list(sessions.kept.get(key).tokens) for key in order}
    assert all(len(h) == PROMPT + 8 for h in histories.values())
    pages = [sessions.kept.get(key).pages for key in order]
    # Each holds its sink page and its last step's window, not its 408-token history.
    assert max(pages) <= g.decode_live_pages < (PROMPT + 8) // g.block_size, (max(pages), g.decode_live_pages)
    assert sum(pages) == sessions.kept.pages == SINK_STATS.kept_pages
    assert pool.get_num_free_blocks() + sessions.kept.pages == total
    print(f"\n{N_CONV} idle conversations: {sum(pages)} pages kept (at most {max(pages)} each, bound "
          f"{g.decode_live_pages}), {pool.get_num_free_blocks()} free of {total}")

    # Pressure: 16 long streams at once need more than the free pages.
    released0 = SINK_STATS.kept_released_for_pressure
    long_params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    longs = [hamlet_ids[41000 + 500 * j : 41000 + 500 * j + 450] for j in range(16)]
    llm.generate([{"prompt_token_ids": p} for p in longs], long_params, use_tqdm=False)
    released = [key for key in order if key not in sessions.kept]
    assert released and SINK_STATS.kept_released_for_pressure - released0 == len(released)
    # Least recently used first: exactly the oldest conversations went.
    assert released == order[: len(released)], "not released least recently used first"
    print(f"16 long streams: {len(released)} kept conversations released, {len(order) - len(released)} still kept")
    assert not preempted, preempted

    # A released conversation's next turn: a full prefill, the same answer as a fresh prefill.
    prompt = histories[released[0]] + hamlet_ids[50000:50040]
    resumes0 = SINK_STATS.resumes
    check = SamplingParams(max_tokens=8, temperature=0, logprobs=0, ignore_eos=True)
    got = llm.generate([{"prompt_token_ids": prompt}], check, use_tqdm=False)[0].outputs[0]
    assert SINK_STATS.resumes == resumes0
    scored = SamplingParams(max_tokens=8, temperature=0, logprobs=0, prompt_logprobs=0, ignore_eos=True)
    fresh = llm.generate([{"prompt_token_ids": prompt}], scored, use_tqdm=False)[0].outputs[0]
    assert list(got.token_ids) == list(fresh.token_ids)
    diff = torch.tensor([a[t].logprob - b[t].logprob for a, b, t in zip(got.logprobs, fresh.logprobs, got.token_ids)])
    assert diff.abs().max().item() <= F32_MAX_ABS
    assert free_or_kept(llm) == total
