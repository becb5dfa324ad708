#!/usr/bin/env bash
# Create .venv (if missing) and install ecomray with a CPU build of PyTorch.
# ECOMRAY_TORCH overrides the torch requirement (e.g. a CUDA build on GPU machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# A bare `torch` requirement can pull a multi-GB CUDA build: install the CPU build first.
# (On this project's machines `torch==2.13.0` resolves to a local CPU wheel; elsewhere pass e.g.
# ECOMRAY_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".)
.venv/bin/python -m pip install -q ${ECOMRAY_TORCH:-torch==2.13.0}
.venv/bin/python -m pip install -q -e ".[dev${ECOMRAY_EXTRAS:+,$ECOMRAY_EXTRAS}]"
echo "ecomray: environment ready in .venv"
