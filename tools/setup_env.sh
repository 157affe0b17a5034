#!/usr/bin/env bash
# Create .venv with torch + torchvision as a matching PyPI pair and the package installed with
# its test extra. Safe to rerun: an existing, working .venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch, torchvision; from torchvision.ops import nms; nms(torch.zeros(1, 4), torch.zeros(1), 0.5)" >/dev/null 2>&1; then
  python -m pip install -q --upgrade pip
  # One resolver call so pip picks a torch that matches torchvision (not the local CPU wheel).
  python -m pip install -q torchvision torch
fi
python -m pip install -q -e ".[test]"
