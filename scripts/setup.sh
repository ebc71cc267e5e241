#!/usr/bin/env bash
# Set up sparse_linear_attn on a fresh machine: bash scripts/setup.sh [EXTRAS]   (default: test)
# EXTRAS is one extras name or a comma list, e.g. `bench` or `bench,real,test`.
# Where no GPU is present the CPU build torch==2.13.0 goes in first: a bare `torch` requirement
# would otherwise pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
py="${PYTHON:-python3}"
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
  "$py" -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
"$py" -m pip install -q --disable-pip-version-check -e ".[${extras}]"
