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
# System packages, only when this runs as root on a machine with apt (skip with ECOMRAY_APT=0):
#  - fonts-wqy-microhei: Chinese glyphs for the plots (opinion reports, run reports); without it plots render
#    Chinese as boxes, with one warning;
#  - chromium + chromium-driver: the browser tests of the playground and the run report; without them those
#    tests skip.
apt_install() {  # apt_install PACKAGE... ; refreshes the package lists once if the first try fails
  apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1; } \
    || echo "ecomray: could not apt-get install $* (continuing without)"
}
if [ "${ECOMRAY_APT:-1}" != 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  fc-list :lang=zh 2>/dev/null | grep -q . || apt_install fonts-wqy-microhei
  { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || apt_install chromium chromium-driver
fi
echo "ecomray: environment ready in .venv"
