#!/usr/bin/env bash
# On a lent GPU machine (no network): install the build tools carried as wheels in .whl/
# if the image lacks them, build aimdo there (never carry an extension built elsewhere),
# then run what is asked, writing logs under $OUT. Set AIMDO_COMMIT to the commit sent.
#
#   bash benchmarks/gpu_machine.sh suite              # the whole suite on the cuda backend
#   bash benchmarks/gpu_machine.sh streaming [ARGS]   # python -m benchmarks.streaming ARGS
#   bash benchmarks/gpu_machine.sh host_overhead [ARGS]  # ... benchmarks.host_overhead ARGS
#   bash benchmarks/gpu_machine.sh python ARGS        # any other python command
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/aimdo-out}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-build-isolation --no-deps . >"$out/build.log" 2>&1 ||
  { tail -40 "$out/build.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The .git that travels with the tree may be older than the tree: name the commit with
# AIMDO_COMMIT (benchmarks/_common.py records it).
echo "commit: ${AIMDO_COMMIT:-unknown (set AIMDO_COMMIT)}"
what="${1:-suite}"
shift || true
case "$what" in
  suite)
    AIMDO_BACKEND=cuda python3 -m pytest -n 4 -q -rfE -p no:benchmark -p no:cacheprovider tests \
      "$@" 2>&1 | tee "$out/cuda-suite.log" | tail -25
    ;;
  streaming)
    PYTHONUNBUFFERED=1 python3 -m benchmarks.streaming --out "$out/streaming.json" "$@" 2>&1 |
      tee "$out/streaming.log"
    ;;
  host_overhead)
    PYTHONUNBUFFERED=1 python3 -m benchmarks.host_overhead --backend cuda \
      --out "$out/host_overhead.json" "$@" 2>&1 | tee "$out/host_overhead.log"
    ;;
  python)
    PYTHONUNBUFFERED=1 python3 "$@" 2>&1 | tee "$out/python.log"
    ;;
  *)
    echo "unknown: $what" >&2
    exit 2
    ;;
esac
