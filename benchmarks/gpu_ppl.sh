#!/usr/bin/env bash
# The GPU runs of benchmarks/ppl.py behind benchmarks/results/ppl.json, in parts that
# each take under 10 minutes on one GPU:
#   bash benchmarks/gpu_ppl.sh long       # the 38-play corpus, and Hamlet, looped to 4M tokens, sink policy
#   bash benchmarks/gpu_ppl.sh compare    # dense, window, sink, recompute on 100K tokens
#   bash benchmarks/gpu_ppl.sh ablation   # sink sizes 0..16 tokens and window sizes
#                                         # (or ablation-sink, ablation-window: one half)
# Needs vLLM (CUDA) importable, the model GGUF at $GGUF and the token arrays under
# $VLLM_SINK_HOME/tokens (see ppl.py's stream_tokens); results are merged into $OUT_JSON.
set -euo pipefail
GGUF=${GGUF:-/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT_JSON=${OUT_JSON:-benchmarks/results/ppl.json}
ppl() { python3 benchmarks/ppl.py --gguf "$GGUF" --out "$OUT_JSON" "$@"; }

case "${1:?part: long, compare, ablation, ablation-sink or ablation-window}" in
long)
  # W = 4096 (the default for SmolLM2's 8,192 positions), 4 sink tokens, 2,048-token steps.
  ppl --name long-4M --policies sink --tokens 4000000 --window 4096 --sink-tokens 4 \
      --chunk 2048 --bucket 100000
  # One play looped: every 100K-token window holds the same text, so PPL per window
  # measures drift with position rather than the difficulty of each play.
  ppl --name long-4M-hamlet --policies sink --text hamlet --tokens 4000000 --window 4096 \
      --sink-tokens 4 --chunk 2048 --bucket 100000
  ;;
compare)
  # The paper's Table 1 shape: 4 sink + W=1024 window vs re-computation over the same 1,028-token cache.
  # Four engines in one process: 20% of the GPU each, and eager (on vLLM 0.26.0 the third
  # engine's CUDA-graph capture in one process fails an assert in PyTorch's caching allocator).
  ppl --name compare-100K --policies dense,sink,window,recompute --tokens 100000 \
      --window 1024 --sink-tokens 4 --chunk 64 --bucket 10000 --gpu-memory-utilization 0.2 --eager
  ;;
ablation|ablation-sink|ablation-window)
  if [ "$1" != ablation-window ]; then
    for s in 0 1 2 4 8 16; do
      pol=sink; [ "$s" = 0 ] && pol=window
      ppl --name "ablation-sink-$s" --policies "$pol" --tokens 100000 --window 1024 \
          --sink-tokens "$s" --chunk 256 --eager --bucket 10000
    done
  fi
  if [ "$1" != ablation-sink ]; then
    for w in 256 512 2048 4096; do
      ppl --name "ablation-window-$w" --policies sink,window --tokens 100000 --window "$w" \
          --sink-tokens 4 --chunk 256 --eager --bucket 10000 --gpu-memory-utilization 0.2
    done
  fi
  ;;
esac
