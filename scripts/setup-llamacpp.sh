#!/usr/bin/env bash
# Installs llama-cpp-python, BUILT FROM SOURCE (PyPI's sdist, which vendors llama.cpp), into
# vllm-sink's virtual environment (.venv, or $VLLM_SINK_VENV), for
# benchmarks/llamacpp_shift.py (vllm-sink vs llama.cpp's context shift on the CPU).
#
#   * the build is native (-march=native through GGML_NATIVE, OpenMP threads, the CPU backend
#     only), like a local user's `pip install llama-cpp-python`; the multimodal library
#     (mtmd/llava, which the benchmark does not use) is skipped to save compile time;
#   * it compiles with $CMAKE_BUILD_PARALLEL_LEVEL jobs (default 2); on 2 cores this takes
#     several minutes, so the log goes to $LLAMACPP_LOG (default build/setup-llamacpp.log);
#   * idempotent: a second run finds the version installed and returns in seconds.
#
# Run scripts/setup.sh first (the venv, vLLM, the model).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_SINK_VENV:-.venv}
PY="$VENV/bin/python"
VERSION=${LLAMACPP_PYTHON_VERSION:-0.3.36}
LOG=${LLAMACPP_LOG:-build/setup-llamacpp.log}

if [ ! -x "$PY" ]; then
  echo "[setup-llamacpp] no virtual environment at $VENV: run scripts/setup.sh first" >&2
  exit 1
fi

if "$PY" - "$VERSION" <<'EOF' 2>/dev/null
import sys, importlib.metadata as m
sys.exit(0 if m.version("llama_cpp_python") == sys.argv[1] else 1)
EOF
then
  echo "[setup-llamacpp] llama-cpp-python $VERSION already installed in $VENV"
else
  mkdir -p "$(dirname "$LOG")"
  echo "[setup-llamacpp] building llama-cpp-python $VERSION from source (log: $LOG)"
  start=$(date +%s)
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
  export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_NATIVE=ON}"
  if ! "$PY" -m pip install --disable-pip-version-check --no-cache-dir -v \
      --no-binary llama-cpp-python "llama-cpp-python==$VERSION" >"$LOG" 2>&1; then
    tail -40 "$LOG" >&2
    echo "[setup-llamacpp] build failed; full log in $LOG" >&2
    exit 1
  fi
  echo "[setup-llamacpp] built and installed in $(( $(date +%s) - start )) s"
fi

# Check that the low-level bindings load and expose what the benchmark's shift loop uses.
"$PY" - <<'EOF'
import llama_cpp
import llama_cpp.llama_cpp as ll
need = ["llama_decode", "llama_batch_init", "llama_get_memory", "llama_memory_seq_rm",
        "llama_memory_seq_add", "llama_memory_seq_pos_max"]
missing = [n for n in need if not hasattr(ll, n)]
assert not missing, f"llama-cpp-python lacks {missing}"
print(f"[setup-llamacpp] llama-cpp-python {llama_cpp.__version__}: "
      f"{ll.llama_print_system_info().decode().strip()}")
EOF
