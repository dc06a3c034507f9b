#!/usr/bin/env bash
# One-shot, idempotent set-up used by `make setup` (and so by `make demo` and `make test`).
#   1. .venv with torch==2.13.0 first (the local CPU wheel: pip must never pull a CUDA build),
#   2. the exact versions of requirements.lock, then megastack itself (editable),
#   3. system packages the deployment tests use (Debian's prometheus), when we are root.
# Each step is skipped when its stamp is newer than its inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
PIP="$VENV/bin/pip --disable-pip-version-check -q"

step() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PY" -m venv "$VENV"
fi

if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  step "installing torch==2.13.0 (CPU wheel) first"
  $PIP install torch==2.13.0 2>&1 | { grep -v '^WARNING: Location' || true; }
  "$VENV/bin/python" -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
fi

if [ ! -f "$VENV/.lock-stamp" ] || [ requirements.lock -nt "$VENV/.lock-stamp" ] || [ pyproject.toml -nt "$VENV/.lock-stamp" ]; then
  step "installing requirements.lock"
  # a failing pip stops the set-up (pipefail); only the index-location warnings are filtered out
  $PIP install -r requirements.lock 2>&1 | { grep -v '^WARNING: Location' || true; }
  $PIP install --no-deps --no-build-isolation -e . --config-settings editable_mode=compat 2>&1 | { grep -v '^WARNING: Location' || true; }
  "$VENV/bin/python" -c 'import torch, megatron.core, grpc, ray, lm_eval, flask_restful, flask_sock, websocket' 
  touch "$VENV/.lock-stamp"
fi

if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "installing Debian package prometheus (deployment tests scrape the services with it)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
      || echo "[setup] warning: could not install prometheus; its tests will be skipped" >&2
  else
    echo "[setup] note: prometheus/promtool not installed (needs root + apt-get); its tests will be skipped" >&2
  fi
fi

if ! command -v cc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "installing Debian package gcc (textgen's CPU decode kernel, llm/thin_linear.c, is compiled on first use)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null \
      || echo "[setup] warning: could not install gcc; textgen decodes with PyTorch's matmuls" >&2
  else
    echo "[setup] note: no C compiler (needs root + apt-get); textgen decodes with PyTorch's matmuls" >&2
  fi
fi

step "generating protobuf code"
"$VENV/bin/python" tools/gen_protos.py

step "preparing the default model (models/smollm2-135m-instruct)"
"$VENV/bin/megastack" models prepare
