#!/usr/bin/env bash
# The GPU runs behind benchmarks/results/throughput.json and drift.json, in parts
# that each take under 10 minutes on one GPU (H200 timings, 2026-11-30):
#   bash benchmarks/gpu_speed.sh recompute   # re-computation vs sink, batch 1 and 64, same-run ceiling, decode steps pipelined and synced,
#                                            # both on vLLM's V1 model runner (~4.5 min)
#   bash benchmarks/gpu_speed.sh budget      # 32K-token streams in a fixed KV pool, sink vs dense (~3 min)
#   bash benchmarks/gpu_speed.sh overhead    # short non-evicting requests, and latency against position (~5.5 min)
#   bash benchmarks/gpu_speed.sh drift       # 1M tokens in bf16 (FA3) vs fp32 (TRITON_ATTN) (~2 min)
# Needs vLLM (CUDA) importable and, for drift, the model GGUF at $GGUF and the token arrays
# under $VLLM_SINK_HOME/tokens (see ppl.py). Results go to $RESULTS (default benchmarks/results);
# throughput parts merge into throughput.json (each part's two sides come from one run).
set -euo pipefail
GGUF=${GGUF:-/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf}
RESULTS=${RESULTS:-benchmarks/results}
tp() { python3 benchmarks/throughput.py --out "$RESULTS/throughput.json" "$@"; }

case "${1:?part: recompute, budget, overhead or drift}" in
recompute) tp --parts recompute --vanilla-runner v1 ;;
budget) tp --parts budget ;;
overhead) tp --parts overhead,latency ;;
drift) python3 benchmarks/drift.py --gguf "$GGUF" --out "$RESULTS/drift.json" ;;
*) echo "unknown part $1" >&2; exit 2 ;;
esac
