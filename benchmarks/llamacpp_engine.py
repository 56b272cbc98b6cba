"""llama.cpp's side of benchmarks/llamacpp_shift.py: the GGUF it loads (``gguf_for``) and its
worker (``llamacpp_worker``: llama-cpp-python's low-level bindings, the context-shift loop of
llama.cpp's own ``llama-cli``), run in a subprocess of its own through benchmarks/workers.py."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from quiet_cpu import best_run, cpu_snap, measure, others_cores
from workers import Progress

N_KEEP_PAGES_BLOCK = 16  # vLLM block size = tokens per sink page


def gguf_for(kind: str) -> Path:
    """The GGUF llama.cpp loads for the weights ``kind`` (converted once, cached)."""
    from vllm_sink import assets

    if kind == "q4_1":
        return assets.gguf_path()
    out = assets.model_dir().parent / f"{assets.MODEL_NAME}.{kind.upper()}.gguf"
    if out.exists():
        return out
    import gguf
    import numpy as np

    # The HF model vLLM loads was made by dequantizing this GGUF to float32 and casting to
    # bfloat16 (round to nearest even); do exactly that, in llama.cpp's tensor layout.
    def bf16_bits(a):
        u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)

    reader = gguf.GGUFReader(str(assets.gguf_path()))
    tmp = out.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if kind == "f32" else gguf.LlamaFileType.MOSTLY_BF16)
    for t in reader.tensors:
        bits = bf16_bits(gguf.quants.dequantize(t.data, t.tensor_type))
        if kind == "f32":
            writer.add_tensor(t.name, (bits.astype(np.uint32) << 16).view(np.float32))
        else:
            writer.add_tensor(t.name, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)
    return out


def llamacpp_worker(task: dict) -> dict:
    import ctypes

    import llama_cpp
    import llama_cpp.llama_cpp as ll

    a = task["args"]
    log_lines: list[str] = []
    capture = [True]  # keep the lines while the model loads and contexts are made

    @ll.llama_log_callback
    def on_log(level, text, user_data):  # llama.cpp's log: to stderr unless --quiet
        line = text.decode(errors="replace") if text else ""
        if capture[0]:
            log_lines.append(line)
        if not a["quiet"] or level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
            sys.stderr.write(line)

    ll.llama_log_set(on_log, ctypes.c_void_p())
    ll.llama_backend_init()
    weights = task["weights"]
    path = task["gguf"]
    kv_type = {"f32": ll.GGML_TYPE_F32, "f16": ll.GGML_TYPE_F16}[task["kv_type"]]
    threads = a["threads"]
    n_keep = a["sink_pages"] * N_KEEP_PAGES_BLOCK
    n_ctx = n_keep + a["window"]

    t = time.perf_counter()
    mparams = ll.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = ll.llama_model_load_from_file(path.encode(), mparams)
    assert model, f"llama.cpp could not load {path}"
    load_s = time.perf_counter() - t

    sampler = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    ll.llama_sampler_chain_add(sampler, ll.llama_sampler_init_greedy())
    progress = Progress()

    def make_ctx(n_seq: int):
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq
        cp.n_seq_max = n_seq
        cp.kv_unified = False  # one KV stream of n_ctx cells per sequence
        cp.n_batch = cp.n_ubatch = 512
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = kv_type
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_AUTO
        log_lines.clear()
        capture[0] = True
        ctx = ll.llama_init_from_model(model, cp)
        assert ctx, "llama.cpp could not create the context"
        info = dict(n_ctx=ll.llama_n_ctx(ctx), n_ctx_seq=ll.llama_n_ctx_seq(ctx), n_seq_max=n_seq,
                    n_batch=cp.n_batch, n_ubatch=cp.n_ubatch, kv_unified=False,
                    type_k=task["kv_type"], type_v=task["kv_type"],
                    log=[ln.strip() for ln in log_lines if ln.startswith("llama_context:") and any(
                        k in ln for k in ("n_ctx_seq ", "flash_attn", "kv_unified", "n_seq_max"))
                         or "KV buffer size" in ln or "Flash Attention" in ln][:8])
        log_lines.clear()
        capture[0] = False
        assert info["n_ctx_seq"] >= n_ctx, info
        return ctx, info

    def run(ctx, prompts: list[list[int]], gen: int, report: bool, watch=None) -> dict:
        mem = ll.llama_get_memory(ctx)
        ll.llama_memory_clear(mem, True)
        n_seq = len(prompts)
        batch = ll.llama_batch_init(512, 0, 1)
        n_past = [0] * n_seq
        shifts = [0] * n_seq
        max_cached = [0] * n_seq

        def shift(s: int) -> None:
            # llama.cpp's tools/completion, "infinite text generation via context shifting"
            n_left = n_past[s] - n_keep
            n_discard = n_left // 2
            ll.llama_memory_seq_rm(mem, s, n_keep, n_keep + n_discard)
            ll.llama_memory_seq_add(mem, s, n_keep + n_discard, n_past[s], -n_discard)
            n_past[s] -= n_discard
            shifts[s] += 1

        def decode(entries) -> None:  # entries: (token, seq, want_logits)
            for i, (tok, s, want) in enumerate(entries):
                batch.token[i] = tok
                batch.pos[i] = n_past[s]
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = s
                batch.logits[i] = want
                n_past[s] += 1
                max_cached[s] = max(max_cached[s], n_past[s])
            batch.n_tokens = len(entries)
            rc = ll.llama_decode(ctx, batch)
            assert rc == 0, f"llama_decode returned {rc}"

        out = [[] for _ in range(n_seq)]
        t0 = time.perf_counter()
        # Prompts, one sequence at a time, in chunks that the shift rule can always make room
        # for (a prompt longer than the cache streams through it, like the generation does).
        cap = (n_ctx - n_keep) // 2 - 1
        for s, p in enumerate(prompts):
            if watch is not None:
                watch.check()
            i = 0
            while i < len(p):
                take = min(cap, len(p) - i)
                if n_past[s] + take >= n_ctx:
                    shift(s)
                decode([(tok, s, int(j == take - 1)) for j, tok in enumerate(p[i:i + take])])
                i += take
            out[s].append(ll.llama_sampler_sample(sampler, ctx, -1))
        if report:
            progress.add(n_seq)
        t1 = time.perf_counter()
        snap_a = cpu_snap()
        # Decoding: all sequences in one batch per step, each shifted on its own.
        for _ in range(gen - 1):
            if watch is not None:
                watch.check()
            for s in range(n_seq):
                if n_past[s] + 1 >= n_ctx:
                    shift(s)
            decode([(out[s][-1], s, 1) for s in range(n_seq)])
            for s in range(n_seq):
                out[s].append(ll.llama_sampler_sample(sampler, ctx, s))
            if report:
                progress.add(n_seq)
        t2 = time.perf_counter()
        snap_b = cpu_snap()
        cached = []
        for s in range(n_seq):
            lo, hi = ll.llama_memory_seq_pos_min(mem, s), ll.llama_memory_seq_pos_max(mem, s)
            assert hi + 1 == n_past[s] and lo == 0, (s, lo, hi, n_past[s])
            cached.append(hi - lo + 1)
        ll.llama_batch_free(batch)
        decode_tokens = (gen - 1) * n_seq
        return dict(
            streams=n_seq,
            generated_tokens=gen * n_seq,
            decode_tokens=decode_tokens,
            decode_s=t2 - t1,
            decode_tok_s=decode_tokens / (t2 - t1),
            others_cpu_cores=others_cores(snap_a, snap_b),
            prompt_phase_s=t1 - t0,
            total_s=t2 - t0,
            end_to_end_tok_s=gen * n_seq / (t2 - t0),
            shifts_per_stream=shifts,
            shifts_total=sum(shifts),
            max_cached_tokens_per_stream=max(max_cached),
            cached_tokens_at_end=cached,
            can_shift=bool(ll.llama_memory_can_shift(mem)),
            output_ids=out,
        )

    scenarios, warmup_ids = {}, None
    for n in task["streams"]:
        ctx, info = make_ctx(n)
        w = run(ctx, task["warmup_prompts"][:n], a["warmup_tokens"], report=False)
        warmup_ids = warmup_ids or w["output_ids"][0]
        runs = []
        for _ in range(a["repeats"]):
            progress.run_total = 0
            runs.append(measure(lambda w: run(ctx, task["prompts"][:n], a["gen_tokens"], True, w), a, progress))
        res = best_run(runs)
        res["context"] = info
        scenarios[str(n)] = res
        ll.llama_free(ctx)
    progress.flush()
    system_info = ll.llama_print_system_info().decode().strip()
    ll.llama_sampler_free(sampler)
    ll.llama_model_free(model)
    return dict(
        engine=f"llama.cpp ({weights})",
        weights=weights,
        gguf=os.path.basename(path),
        load_s=load_s,
        warmup_ids=warmup_ids,
        threads=threads,
        versions={"llama_cpp_python": llama_cpp.__version__},
        system_info=system_info,
        settings=dict(weights=weights, kv_cache_type=task["kv_type"], n_ctx_per_seq=n_ctx, n_keep=n_keep,
                      n_discard="(n_past - n_keep) / 2", shift_when="n_past + n_new >= n_ctx",
                      n_threads=threads, n_threads_batch=threads, kv_unified=False,
                      sampler="greedy (llama_sampler_init_greedy)", flash_attn_type="auto"),
        scenarios=scenarios,
    )
