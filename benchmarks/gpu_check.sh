#!/usr/bin/env bash
# One GPU check: the whole test suite on the GPU (compiled kernels on CUDA tensors), then the
# benchmark tables (op suites, then the end-to-end Glow suite). Everything lands under $OUT
# (the device tool's result folder; runs/gpu_check when unset):
#   device.txt   nvidia-smi's name, driver and memory of the card, torch and triton versions
#   tests.log    pytest's output, one line per test as it ends (-v: a run cut short by its
#                timeout still names what failed), then the failures' tracebacks
#   bench.log    the op tables              glow.log   the Glow tables
#   bench-<device>.json / .md  every number, with versions (op suites; glow/ for the Glow suite)
# Eight files: the device tool brings back at most 8 files from $OUT
# (tests/test_bench_cli.py counts them).
# Exit status: 0 only when the tests and every table run passed; otherwise 1 (the logs say
# which part failed).
#
# Run from the repository root on the GPU machine:  bash benchmarks/gpu_check.sh
# Python: the README's .venv (make env TORCH=torch) when it exists and sees a GPU, else
# $PYTHON or python3. It installs nothing from the network: fastflow is laid out in a
# temporary site folder that comes first on PYTHONPATH (so the checkout is what runs, even
# with a .venv from another path), and the peers (normflows, FrEIA) come from .whl/ if that
# folder was carried along (fill it here with: bash benchmarks/fetch_wheels.sh).
# Knobs: TEST_TIMEOUT (s, default 200), BENCH_TIMEOUT (130), GLOW_TIMEOUT (200),
# GLOW_ARGS (extra run.py options for the Glow suite, e.g. "--no-compile"), BUDGET (560):
# the whole script's seconds. The device tool allows 600 s per command, so each part's
# timeout is also cut to what is left of BUDGET, and a part with under 30 s left is skipped
# (said in its log): a slow first part cannot take the later tables down with it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  if .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PY=.venv/bin/python
  else
    echo "gpu_check: .venv's torch sees no GPU (CPU build?); using $PY. Set up a CUDA one with: make env TORCH=torch"
  fi
fi
echo "gpu_check: python $PY"
SITE=$(mktemp -d /tmp/fastflow-site.XXXX)
trap 'rm -rf "$SITE"' EXIT
cp -r fastflow "$SITE/"
rm -rf "$SITE/fastflow/kernels"  # a checkout's fastflow/kernels -> ../kernels link came along
cp -r kernels "$SITE/fastflow/kernels"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl || echo "peer wheels did not install"
fi
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET FASTFLOW_BACKEND

status=0
BUDGET=${BUDGET:-560}
# seconds for the next part: its own timeout, cut to what is left of BUDGET
part_timeout() {
  local left=$((BUDGET - SECONDS))
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt" || status=1
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: no usable CUDA torch"; exit 1; }

# Tests: xdist spreads kernel compilation over the CPU cores when it is installed.
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
# pytest-timeout (in the GPU image): a test that hangs (a stuck process group, a kernel
# that never returns) fails alone after 90 s instead of taking the whole part's budget
PER_TEST=""
$PY -c "import pytest_timeout" 2>/dev/null && PER_TEST="--timeout 90"
timeout "$(part_timeout "${TEST_TIMEOUT:-200}")" $PY -m pytest -v -rfE --durations=25 -p no:cacheprovider $XDIST $PER_TEST tests > "$OUT/tests.log" 2>&1
rc=$?
grep -E "(FAILED|ERROR) " "$OUT/tests.log" | head -n 40
tail -n 30 "$OUT/tests.log"
echo "tests exit: $rc" | tee -a "$OUT/tests.log"
[ "$rc" -eq 0 ] || status=1

t=$(part_timeout "${BENCH_TIMEOUT:-130}")
if [ "$t" -lt 30 ]; then
  echo "gpu_check: op tables skipped, ${t} s left of BUDGET=$BUDGET" | tee "$OUT/bench.log"; rc=1
else
  timeout "$t" $PY benchmarks/run.py --out "$OUT" --reps 30 --suites coupling,channel_mix,gaussian,tarflow_head 2>&1 | tee "$OUT/bench.log" | tail -n 80
  rc=${PIPESTATUS[0]}
fi
echo "bench exit: $rc" | tee -a "$OUT/bench.log"
[ "$rc" -eq 0 ] || status=1

t=$(part_timeout "${GLOW_TIMEOUT:-200}")
if [ "$t" -lt 30 ]; then
  echo "gpu_check: Glow tables skipped, ${t} s left of BUDGET=$BUDGET" | tee "$OUT/glow.log"; rc=1
else
  # shellcheck disable=SC2086
  timeout "$t" $PY benchmarks/run.py --out "$OUT/glow" --reps 20 --suites glow ${GLOW_ARGS:-} 2>&1 | tee "$OUT/glow.log" | tail -n 80
  rc=${PIPESTATUS[0]}
fi
echo "glow exit: $rc" | tee -a "$OUT/glow.log"
[ "$rc" -eq 0 ] || status=1

echo "gpu_check: $([ $status -eq 0 ] && echo passed || echo FAILED)"
exit $status
