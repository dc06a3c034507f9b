#!/usr/bin/env bash
# Make Megatron-LM's own tools/preprocess_data.py runnable here, offline, as the preprocess bench's baseline.
#
#   tools/bench/megatron_env.sh MEGATRON_LM_DIR     (make megatron-env MEGATRON_LM=DIR)
#
# MEGATRON_LM_DIR is a Megatron-LM checkout (or an exported tree) outside this repository; its source is not
# changed. What is made, beside the project:
#   .venv-megatron/       Megatron's imports for the script: torch 2.13.0 (the local CPU wheel), numpy,
#                         packaging, transformers and tokenizers at this project's locked versions, and triton
#                         (megatron.training.arguments imports a MoE module that imports triton; never used on CPU)
#   .venv-megatron/shim/  sitecustomize.py: Megatron-LM's HEAD asks for Python >= 3.12 only for typing.override,
#                         which the shim supplies on 3.11 (typing_extensions.override)
# Idempotent: a step is skipped when done. The bench passes HF_HUB_OFFLINE=1 and runs the script in a folder
# holding ./gpt2/ (the GPT-2 BPE files this project ships), the name Megatron's GPT2BPETokenizer loads.
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=${1:?usage: tools/bench/megatron_env.sh MEGATRON_LM_DIR}
VENV=${MEGATRON_VENV:-.venv-megatron}
PY=${PYTHON:-python3}
PIP="$VENV/bin/pip --disable-pip-version-check -q"
[ -f "$SRC/tools/preprocess_data.py" ] && [ -d "$SRC/megatron/core" ] \
  || { echo "megatron_env: $SRC is not a Megatron-LM tree (no tools/preprocess_data.py, megatron/core)" >&2; exit 2; }
step() { printf '\033[1m[megatron-env]\033[0m %s\n' "$*"; }
lock() { grep -E "^$1==" requirements.lock; }
if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$VENV/.stamp" ]; then
  step "installing torch==2.13.0 (CPU wheel) first, then Megatron's imports for preprocess_data.py"
  $PIP install torch==2.13.0 2>&1 | { grep -v '^WARNING: Location' || true; }
  $PIP install "$(lock numpy)" "$(lock packaging)" "$(lock transformers)" "$(lock tokenizers)" \
    typing_extensions triton 2>&1 | { grep -v '^WARNING: Location' || true; }
  touch "$VENV/.stamp"
fi
mkdir -p "$VENV/shim"
cat > "$VENV/shim/sitecustomize.py" <<'PY'
# written by tools/bench/megatron_env.sh: Megatron-LM asks for Python >= 3.12 for typing.override alone
import typing

if not hasattr(typing, "override"):
    import typing_extensions

    typing.override = typing_extensions.override
PY
if ! log=$(HF_HUB_OFFLINE=1 PYTHONPATH="$VENV/shim" "$VENV/bin/python" "$SRC/tools/preprocess_data.py" --help 2>&1); then
  printf '%s\n' "$log" | tail -20 >&2
  echo "megatron_env: $SRC/tools/preprocess_data.py does not start in $VENV (above: its last lines)" >&2
  exit 1
fi
step "ready: $VENV runs $SRC/tools/preprocess_data.py"
