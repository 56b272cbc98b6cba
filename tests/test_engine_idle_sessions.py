"""Fifty idle conversations: bounded while kept, released least recently used first, in one
order with the prefix cache's pages.

Sessions and prefix caching are on (the defaults). Fifty conversations, each past the
window, finish and wait for their next turn: each kept stream holds at most a decoding
stream's page bound (its sink page and its window's pages, not its history), and the pool
accounts for every page (kept pages wait in vLLM's free queue: free + kept == pool). A
batch of long new streams then needs more than the other free pages: the pages vLLM takes
go least recently used first, kept streams and cached pages alike (a short prompt cached
before the conversations goes before any of them; one cached after the first ten
outlives the oldest of them), kept streams give way least recently used first, no
running stream is preempted, and a released conversation's next turn is served by a full
prefill with the same answer as a fresh engine would give (the greedy tokens and logprobs
of the same prompt with prompt logprobs, which is never resumed).
"""

import pytest
import torch
from vllm import SamplingParams

from engine_helpers import free_or_kept, scheduler_of
from tolerances import F32_MAX_ABS

from vllm_sink.metrics import SINK_STATS

N_CONV, PROMPT, BATCH = 50, 400, 10


@pytest.mark.engine("sink16_sessions_pool2200")
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
    assert manager.enable_caching and total == pool.num_gpu_blocks - 1

    def cached_pages():
        return {b.block_id for b in pool.free_block_queue.get_all_free_blocks() if b.block_hash is not None}

    def cached_tokens(prompt):
        return llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, temperature=0),
                            use_tqdm=False)[0].num_cached_tokens

    # Two short prompts inside the window (10 full pages each), cached as in vLLM: one before
    # the conversations, one after the first ten.
    shorts = {"before": hamlet_ids[30000:30160], "after": hamlet_ids[31000:31160]}
    short_pages = {}
    batch = {}  # kept stream key -> the batch it finished in (least recently used first)
    for start in range(0, N_CONV, BATCH):  # five batches: a least-recently-used order by batch
        for name, when in (("before", 0), ("after", BATCH)):
            if start == when:
                cached0 = cached_pages()
                llm.generate([{"prompt_token_ids": shorts[name]}], params, use_tqdm=False)
                short_pages[name] = cached_pages() - cached0
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
    assert sum(pages) == sessions.kept.pages == sessions.held_pages() == SINK_STATS.kept_pages
    # Kept pages wait in vLLM's free queue; the published free pages are the others.
    assert pool.get_num_free_blocks() == total and SINK_STATS.free_pages + sessions.kept.pages == total
    print(f"\n{N_CONV} idle conversations: {sum(pages)} pages kept (at most {max(pages)} each, bound "
          f"{g.decode_live_pages}), {SINK_STATS.free_pages} free of {total}")

    assert all(len(short_pages[name]) == 10 for name in shorts)
    kept_first = {b.block_id for key in order if batch[key] == 0
                  for b in sessions.kept.get(key).handle.blocks if not b.is_null}
    assert not (short_pages["before"] | short_pages["after"]) & set(sessions.owner_of)

    # Pressure: 16 long streams at once need more than the free pages that nobody kept.
    released0 = SINK_STATS.kept_released_for_pressure
    taken = []  # the pages vLLM takes from the free queue, in order
    get_new_blocks = pool.get_new_blocks
    pool.get_new_blocks = lambda n: (lambda got: (taken.extend(b.block_id for b in got), got)[1])(get_new_blocks(n))
    try:
        long_params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        longs = [hamlet_ids[41000 + 500 * j : 41000 + 500 * j + 450] for j in range(16)]
        llm.generate([{"prompt_token_ids": p} for p in longs], long_params, use_tqdm=False)
    finally:
        del pool.get_new_blocks
    released = [key for key in order if key not in sessions.kept]
    assert released and SINK_STATS.kept_released_for_pressure - released0 == len(released)
    # Least recently used first: exactly the oldest conversations went.
    assert released == order[: len(released)], "not released least recently used first"
    # One order with the cached pages: the prompt cached before the conversations went
    # before any of their kept pages, and the one cached after the first ten outlived
    # their oldest (kept streams outside that order would outlive every cached page).
    first_kept = next(i for i, page in enumerate(taken) if page in kept_first)
    assert short_pages["before"] <= set(taken[:first_kept])
    assert not short_pages["after"] & set(taken[:first_kept])
    assert cached_tokens(shorts["before"]) == 0
    assert cached_tokens(shorts["after"]) >= 144  # (all 10 pages but the last prompt token's)
    print(f"16 long streams: {len(taken)} pages taken, {len(released)} kept conversations released, "
          f"{len(order) - len(released)} still kept; the prompt cached before them evicted first "
          f"(its last page taken {max(taken.index(p) for p in short_pages['before'])}th, the first kept page "
          f"{first_kept}th); the one cached after the first ten: "
          f"{len(short_pages['after'] & set(taken))} of its 10 pages taken")
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
