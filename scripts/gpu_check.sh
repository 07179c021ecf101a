#!/usr/bin/env bash
# GPU check for a lent H100/H200 (torch preinstalled there, nothing else). A few minutes:
#   1. pip install -e . --no-deps
#   2. python -m pytest -m gpu -q        (towers on cuda:0,cuda:0 and cuda:0+cpu, collapsed on
#                                         cuda:0, fast paths on CUDA, the bench on CUDA)
#   3. python -m split_alexnet.bench model --json $OUT/bench_gpu.json  (all layouts, fp32 and
#                                         the fast paths, median of 20 steps at batch 128)
#   4. python -m split_alexnet.bench lrn --quick                         (LRN implementations)
# Every step runs even if an earlier one failed; a summary says which failed. Results and
# logs go under $OUT (default ./gpu_check_out). Exit status: the number of failed steps.
#
#   scripts/gpu_check.sh
#   OUT=/tmp/out BENCH_ARGS="--batch-size 256" scripts/gpu_check.sh
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT=${OUT:-$PWD/gpu_check_out}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
failed=()

step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, record failure, go on
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*" | tee -a "$OUT/ran.txt"
    local t0=$SECONDS rc
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/ran.txt"
    [[ $rc == 0 ]] || failed+=("$name (exit $rc)")
}

{
    echo "date: $(date -u +%FT%TZ)"
    "$PYTHON" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda); [print(f"cuda:{i}", torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]'
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null
} 2>&1 | tee "$OUT/machine.txt"

step install 300 "$PYTHON" -m pip install -e . --no-deps -q
step pytest_gpu 300 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
step bench_model 420 "$PYTHON" -m split_alexnet.bench model --json "$OUT/bench_gpu.json" ${BENCH_ARGS:-}
step bench_lrn 180 "$PYTHON" -m split_alexnet.bench lrn --quick --json "$OUT/bench_lrn_gpu.json"

echo
echo "ran:"; cat "$OUT/ran.txt"
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
else
    echo "all steps passed; results in $OUT"
fi
exit "${#failed[@]}"
