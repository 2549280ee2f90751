#!/usr/bin/env bash
# One GPU check in under 6 minutes: the whole test suite on the GPU (compiled kernels on
# CUDA tensors), then the benchmark tables. Everything lands under $OUT (the device tool's
# result folder; benchmarks/results when unset):
#   device.txt   nvidia-smi's name, driver and memory of the card
#   tests.log    pytest's output            tests.xml  the same as JUnit XML
#   bench.log    the printed tables         bench-<device>.json  every number, with versions
#
# Run from the repository root on the GPU machine:  bash benchmarks/gpu_check.sh
# It installs nothing from the network: fastflow is laid out in a temporary site folder, and
# the peers (normflows, FrEIA) come from .whl/ if that folder was carried along
# (fill it here with: bash benchmarks/fetch_wheels.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=$(mktemp -d /tmp/fastflow-site.XXXX)
cp -r fastflow "$SITE/"
cp -r kernels "$SITE/fastflow/kernels"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl || echo "peer wheels did not install"
fi
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET FASTFLOW_BACKEND

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"

# Tests: xdist spreads kernel compilation over the CPU cores when it is installed.
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
timeout 200 $PY -m pytest -q -p no:cacheprovider $XDIST --junitxml="$OUT/tests.xml" tests 2>&1 | tee "$OUT/tests.log" | tail -n 25
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"

timeout 270 $PY benchmarks/run.py --out "$OUT" --reps 30 2>&1 | tee "$OUT/bench.log" | tail -n 80
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"
