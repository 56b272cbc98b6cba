"""The API server's per-turn cost for a long chat re-sent whole, stage by stage; no engine.

    python benchmarks/chat_frontend.py                 # SmolLM2, ~166K-token history (593 turns)
    python benchmarks/chat_frontend.py --turns 50      # a shorter history

Builds what ``vllm serve --kv-policy sink --kv-sessions`` builds in its API server for
SmolLM2 (the renderer, vLLM's OnlineRenderer, InputProcessor, OutputProcessor and the
msgpack encoder to the engine core) and drives one chat's last turns through it as the
server does: JSON body -> ``ChatCompletionRequest`` (pydantic) -> ``render_chat`` (messages
parsed, chat template, tokenisation, checks) -> ``process_inputs`` -> output-processor state
-> msgpack. The engine core's decode and ``Request`` construction (block hashes) run in
another process; they are timed too, apart. Each stage is timed ``before`` (vLLM's
tokenisation: the segment cache off, ``VLLMSINK_TOKEN_CACHE_MB=0``) and ``after`` (the
cache on); every timed turn follows the turn before it, as in a chat, and the ids of both
are checked equal. The last row: the first turn after start-up (empty cache; the cache
also checks its first requests against the plain tokenizer, so that turn tokenises twice).
Wall-clock times: on a shared machine, compare the mins. Prints a table; writes JSON to
``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

from workers import provenance

RESULTS = Path(__file__).parent / "results"
STAGES = ("json_decode", "pydantic", "parse_messages", "chat_template", "tokenize", "render_other",
          "process_inputs", "output_state", "msgpack_encode")
CORE_STAGES = ("core_decode", "core_request")
TIMES: dict[str, float] = {}  # the current turn's stage times (the instrumented steps add to it)


def conversation(turns: int, words_per_turn: int) -> list[dict]:
    from vllm_sink import assets

    words = assets.play_text("hamlet").split()
    msgs = [{"role": "system", "content": "You are a patient reader."}]
    for t in range(turns):
        s = (t * words_per_turn) % (len(words) - words_per_turn)
        msgs.append({"role": "user", "content": " ".join(words[s:s + words_per_turn])})
        msgs.append({"role": "assistant", "content": " the cat and so of" * 7})
    return msgs


def build(cache_on: bool):
    """A fresh API-server front end (renderer first use decides the cache)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.renderers.online_renderer import OnlineRenderer
    from vllm.renderers.params import ChatParams
    from vllm.renderers.registry import renderer_from_config
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.output_processor import OutputProcessor
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from vllm_sink import assets
    from vllm_sink.patches.frontend import chat_tokens

    chat_tokens.install()  # the plugin does it too; idempotent
    os.environ["VLLMSINK_TOKEN_CACHE_MB"] = str(chat_tokens.DEFAULT_MAX_MB if cache_on else 0)
    cfg = EngineArgs(model=str(assets.model_dir()),
                     additional_config={"kv_policy": "sink", "kv_window": 1024, "kv_sessions": True}
                     ).create_engine_config()
    renderer = renderer_from_config(cfg)
    renderer.warmup(ChatParams())  # as the API server does at start-up
    online = OnlineRenderer(cfg.model_config, renderer, request_logger=None, chat_template=None,
                            chat_template_content_format="auto")
    hash_fn = get_hash_fn_by_name(cfg.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    block_hasher = (get_request_block_hasher(cfg.cache_config.block_size, hash_fn)
                    if cfg.cache_config.enable_prefix_caching else None)
    return dict(cfg=cfg, renderer=renderer, online=online, inputs=InputProcessor(cfg, renderer),
                outputs=OutputProcessor(renderer.tokenizer, log_stats=False), encoder=MsgpackEncoder(),
                decoder=MsgpackDecoder(EngineCoreRequest), block_hasher=block_hasher)


def instrument(fe, times: dict = TIMES):
    """Time the renderer's sub-steps (instance attributes and the module's parse function)."""
    import vllm.renderers.hf as hf

    renderer = fe["renderer"]

    def timed(name, fn):
        async def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                times[name] = times.get(name, 0.0) + time.perf_counter() - t
        return run

    if not getattr(hf.parse_chat_messages_async, "_timed", False):
        orig = hf.parse_chat_messages_async
        hf.parse_chat_messages_async = timed("parse_messages", orig)
        hf.parse_chat_messages_async._timed = True
    renderer._apply_chat_template_async = timed("chat_template", renderer._apply_chat_template_async)
    renderer._tokenize_prompt_async = timed("tokenize", renderer._tokenize_prompt_async)


async def one_turn(fe, body: bytes, n: int, times: dict) -> list[int]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.v1.engine.output_processor import RequestOutputCollector
    from vllm.v1.request import Request

    def lap(name, t0):
        t1 = time.perf_counter()
        times[name] = times.get(name, 0.0) + t1 - t0
        return t1

    t = time.perf_counter()
    obj = json.loads(body)
    t = lap("json_decode", t)
    request = ChatCompletionRequest.model_validate(obj)
    t = lap("pydantic", t)
    before = sum(times.get(k, 0.0) for k in ("parse_messages", "chat_template", "tokenize"))
    _, (engine_input,) = await fe["online"].render_chat(request)
    inner = sum(times.get(k, 0.0) for k in ("parse_messages", "chat_template", "tokenize")) - before
    t1 = time.perf_counter()
    times["render_other"] = times.get("render_other", 0.0) + (t1 - t) - inner
    t = t1
    params = request.to_sampling_params(request.max_completion_tokens or 16, {})
    core = fe["inputs"].process_inputs(f"chatcmpl-{n}", engine_input, params, supported_tasks=("generate",))
    fe["inputs"].assign_request_id(core)
    t = lap("process_inputs", t)
    fe["outputs"].add_request(core, engine_input.get("prompt"), None, 0,
                              RequestOutputCollector(params.output_kind, core.request_id))
    t = lap("output_state", t)
    frames = fe["encoder"].encode(core)
    t = lap("msgpack_encode", t)
    fe["outputs"].abort_requests([core.request_id], internal=True)
    # Engine core process, for reference (not the API server).
    t = time.perf_counter()
    got = fe["decoder"].decode(frames)
    t = lap("core_decode", t)
    Request.from_engine_core_request(got, fe["block_hasher"])
    lap("core_request", t)
    return list(engine_input["prompt_token_ids"])


def run(fe, msgs: list[dict], timed_turns: int, warmup_turns: int) -> tuple[list[dict], list[dict], list[list[int]]]:
    """The chat's last ``warmup_turns + timed_turns`` turns, in order: the warm-up turns
    (the first one meets an empty cache, as after a restart; they pass the cache's
    first-request checks) then the timed ones. Rows: each turn's stages in seconds."""
    warm, rows, ids = [], [], []
    n = warmup_turns + timed_turns
    ends = [len(msgs) - 2 * k for k in range(n - 1, -1, -1)]  # each ends on a user turn
    loop = asyncio.new_event_loop()
    for i, end in enumerate(ends):
        payload = {"model": "m", "messages": msgs[:end], "max_completion_tokens": 16, "stream": True}
        TIMES.clear()
        got = loop.run_until_complete(one_turn(fe, json.dumps(payload).encode(), i, TIMES))
        row = {"messages": end, "prompt_tokens": len(got), **{k: TIMES.get(k, 0.0) for k in STAGES + CORE_STAGES}}
        (rows if i >= warmup_turns else warm).append(row)
        if i >= warmup_turns:
            ids.append(got)
    loop.close()
    return warm, rows, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=593, help="user/assistant pairs in the history (593: ~166K tokens)")
    ap.add_argument("--words", type=int, default=150, help="words per user turn")
    ap.add_argument("--timed-turns", type=int, default=5, help="consecutive last turns timed (median and min reported)")
    ap.add_argument("--warmup-turns", type=int, default=4,
                    help="untimed turns first (the cache checks its first 3 requests against the plain tokenizer)")
    ap.add_argument("--out", type=Path, default=RESULTS / "chat_frontend.json")
    args = ap.parse_args()

    msgs = conversation(args.turns, args.words) + [{"role": "user", "content": "And then?"}]
    result = {"turns": args.turns, "timed_turns": args.timed_turns, "warmup_turns": args.warmup_turns,
              "cpu_count": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0], "modes": {}}
    all_ids = {}
    for mode in ("before", "after"):
        fe = build(cache_on=mode == "after")
        instrument(fe)
        warm, rows, all_ids[mode] = run(fe, msgs, args.timed_turns, args.warmup_turns)
        summary = {}
        for stat, fn in (("median", statistics.median), ("min", min)):
            summary[stat] = {k: fn(r[k] for r in rows) for k in STAGES + CORE_STAGES}
            summary[stat]["front_end_total"] = fn(sum(r[k] for k in STAGES) for r in rows)
        result["prefix_caching"] = fe["cfg"].cache_config.enable_prefix_caching
        result["modes"][mode] = {**summary, "prompt_tokens": rows[-1]["prompt_tokens"],
                                 "first_turn_tokenize": warm[0]["tokenize"] if warm else None,
                                 "turns": rows, "warmup": warm}
        fe["renderer"].shutdown()
    assert all_ids["before"] == all_ids["after"], "token ids differ"
    result["same_ids"] = True

    b, a = result["modes"]["before"], result["modes"]["after"]
    print(f"\n{b['prompt_tokens']} prompt tokens; {args.timed_turns} consecutive turns, each after the one "
          f"before; ms, median (min); {os.cpu_count()} CPUs, load {result['load_avg_1m_at_start']:.1f}\n")
    print("| stage | before | after |\n|---|---:|---:|")
    for k in STAGES + ("front_end_total",) + CORE_STAGES:
        label = f"({k}, engine core)" if k in CORE_STAGES else k
        cell = lambda m: f"{1e3 * m['median'][k]:.1f} ({1e3 * m['min'][k]:.1f})"  # noqa: E731
        print(f"| {label} | {cell(b)} | {cell(a)} |")
    if a["first_turn_tokenize"] is not None:
        print(f"| tokenize, first turn (empty cache, checked against the plain tokenizer) | "
              f"{1e3 * b['first_turn_tokenize']:.1f} | {1e3 * a['first_turn_tokenize']:.1f} |")
    print("\ntoken ids: identical before and after")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(provenance(__file__), **result), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
