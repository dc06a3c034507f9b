#!/usr/bin/env bash
# Wheels that travel to a GPU machine for tools/gpu_check.py (`make gpu-wheels`): what gpu_check imports
# beyond what such a machine has (Python 3.12, torch with CUDA, transformers, safetensors, grpcio,
# protobuf, numpy), at the versions of requirements.lock, for CPython 3.12 on x86-64 Linux, into .whl/.
# There: pip install --no-index --no-deps .whl/*.whl && python tools/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${GPU_PYTHON:-3.12}
mkdir -p .whl
pins=()
for dist in megatron-core prometheus_client psutil outlines_core; do
  pin=$(grep -i -E "^${dist}==" requirements.lock || true)
  [ -n "$pin" ] || { echo "gpu-wheels: $dist is not in requirements.lock" >&2; exit 2; }
  pins+=("$pin")
done
"$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --implementation cp -d .whl "${pins[@]}"
size=$(du -sm .whl | cut -f1)
ls -1 .whl
echo "gpu-wheels: ${size} MiB in .whl (at most 64 MiB travel)"
[ "$size" -le 64 ] || { echo "gpu-wheels: .whl is over 64 MiB" >&2; exit 1; }
