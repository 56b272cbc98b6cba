"""What the engine benchmarks share: model shapes with dummy weights, the engine settings of a
sink-against-vanilla comparison, and the timing of decode steps.

* ``LLAMA3_8B`` / ``LLAMA32_1B``: hand-written configs of the real models' shapes;
  :func:`model_dir` writes one into a directory that vLLM loads with ``load_format="dummy"``
  (random weights of the real size, no weight files), alone or beside a tokenizer's files
  (a server needs a tokenizer);
* :func:`policy_kwargs` / :func:`engine_kwargs`: the ``LLM(...)`` keywords of either side;
* :func:`decode_step_ms` (one request, steps timed one by one) and :func:`decode_phase`
  (a batch, pipelined and synced), with :class:`Timers` for the host-side pieces.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_hidden_layers": 32, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192, "rope_theta": 500000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}
# Llama-3.2-1B's shape (16 layers of 2,048, 32 query and 8 KV heads of 64, tied embeddings).
LLAMA32_1B = dict(LLAMA3_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                  tie_word_embeddings=True)
# What model_dir copies from a tokenizer directory (those present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt")


def model_dir(config: dict = LLAMA3_8B, tokenizer_dir: Path | None = None) -> Path:
    """A directory holding ``config`` (to load with dummy weights); with ``tokenizer_dir``
    (e.g. the SmolLM2 tokenizer's, ``vllm_sink.assets.model_dir()``) a directory of its own
    with that tokenizer's files beside the config, for a server."""
    name = "vllm-sink-llama3-8b-shape" if tokenizer_dir is None else "vllm-sink-serve-8b-shape"
    d = Path(tempfile.gettempdir()) / name
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / f).exists():
                shutil.copy(Path(tokenizer_dir) / f, d / f)
    return d


def policy_kwargs(policy: str, window: int, max_len: int) -> dict:
    """The only settings in which the two sides of a comparison differ."""
    if policy == "sink":
        return dict(kv_policy="sink", sink_pages=1, kv_window=window, max_stream_len=max_len)
    return dict(max_model_len=max_len)


def engine_kwargs(policy: str, window: int, max_len: int, max_num_seqs: int, extra: dict | None = None) -> dict:
    """The GPU speed runs' engine: dummy weights, bf16, no prefix caching."""
    kw = dict(load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, block_size=16,
              max_num_seqs=max_num_seqs, gpu_memory_utilization=0.85, enable_prefix_caching=False)
    kw.update(policy_kwargs(policy, window, max_len))
    kw.update(extra or {})
    return kw


def cpu_name() -> str:
    from quiet_cpu import machine

    m = machine()
    return f"{m.get('cpu', m['machine'])} ({m['cpu_count']} cores)"


# --------------------------------------------------------------------------- decode timing
def decode_step_ms(engine, sync) -> dict:
    """Step ``engine`` (an ``LLMEngine`` with one request added) until it finishes; the
    median and mean time of the steps after its first token (pure decode steps), each step
    timed with ``sync`` after it."""
    step_times, counts = [], {}
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step()
        sync()
        dt = time.perf_counter() - t
        decoded = False
        for o in outs:
            n = len(o.outputs[0].token_ids) if o.outputs else 0
            if n > counts.get(o.request_id, 0):
                decoded = counts.get(o.request_id, 0) >= 1
                counts[o.request_id] = n
        if decoded:
            step_times.append(dt)
    step_times.sort()
    return dict(batch=1, steps=len(step_times),
                decode_ms_median=1000 * step_times[len(step_times) // 2],
                decode_ms_p10=1000 * step_times[len(step_times) // 10],
                decode_ms_mean=1000 * sum(step_times) / len(step_times))


class Timers:
    """Accumulated host seconds per labelled function, reset per measurement."""

    def __init__(self):
        self.total: dict[str, float] = {}

    def wrap(self, obj, name: str, label: str) -> None:
        orig = getattr(obj, name)
        total = self.total

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                total[label] = total.get(label, 0.0) + time.perf_counter() - t

        setattr(obj, name, timed)

    def take(self) -> dict[str, float]:
        out = dict(self.total)
        self.total.clear()
        return out


def decode_phase(engine, batch: int, prompt_len: int, decode: int, prompt, sync, tag: str,
                 timers: Timers | None = None) -> dict:
    """Add ``batch`` requests, step until each has its first token, then time the decode
    phase: pipelined (free stepping) and, in a second round, synced per step. ``timers``
    are read over the pipelined decode phase only."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=decode + 1, temperature=0, ignore_eos=True)
    out = {}
    for mode in ("pipelined", "synced"):
        ids = [f"{tag}-{mode}-{i}" for i in range(batch)]
        for rid in ids:
            engine.add_request(rid, prompt(prompt_len), params)
        counts: dict[str, int] = {}
        while len([r for r in ids if counts.get(r, 0) >= 1]) < batch:
            for o in engine.step():
                counts[o.request_id] = len(o.outputs[0].token_ids)
        sync()
        if timers is not None:
            timers.take()
        gc0 = gc.get_stats()
        steps, times = 0, []
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            outs = engine.step()
            if mode == "synced":
                sync()
                times.append(time.perf_counter() - t)
            steps += 1
        sync()
        wall = time.perf_counter() - t0
        collections = [g["collections"] - g0["collections"] for g, g0 in zip(gc.get_stats(), gc0)]
        generated = decode  # each request decodes max_tokens - 1 tokens after its first
        if mode == "pipelined":
            out["pipelined_ms"] = 1000 * wall / generated
            out["engine_steps"] = steps
            if timers is not None:
                out["host_ms_per_step"] = {k: 1000 * v / steps for k, v in timers.take().items()}
        else:
            times.sort()
            out["synced_ms"] = 1000 * times[len(times) // 2]
            if timers is not None:  # host work and the device in series: no waits in the timers
                out["host_ms_per_step_synced"] = {k: 1000 * v / steps for k, v in timers.take().items()}
        out[f"gc_collections_{mode}"] = collections
        del outs
    return out
