#!/usr/bin/env bash
# `make gpu-check`: one script for a machine with one H100/H200, under 5 minutes.
# Builds the CUDA kernels, runs the `gpu` tests, runs the kernel benchmark, prints its table last.
# Works with the machine's own Python (torch >= 2.6, no network, none of our other pins): it
# imports only torch, pytest and ninja, and installs the last two from wheels brought along in
# build/gpu-wheels (made here by `make gpu-wheels`) when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY - <<'PYEOF'
import torch, sys
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE'}")
sys.exit(0 if torch.cuda.is_available() else 3)
PYEOF
for mod in pytest ninja; do
  $PY -c "import $mod" 2>/dev/null || $PY -m pip install --quiet --no-index --find-links build/gpu-wheels "$mod"
done
export PATH="$($PY -c 'import ninja, os; print(ninja.BIN_DIR)' 2>/dev/null || echo /usr/bin):$PATH"
echo "== build (CUDA and CPU kernels)"
time timeout 240 $PY -m model.kernels.build --cuda --cpu
echo "== gpu tests"
timeout 120 $PY -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider
echo "== benchmark"
timeout 150 $PY bench/bench_kernels.py --device cuda
