#!/usr/bin/env bash
# GPU check for one CUDA machine (an H100/H200 with torch preinstalled, nothing else). A few minutes:
#   1. pip install -e . --no-deps --no-build-isolation   (offline there: the machine's own
#                                         setuptools; later steps import this checkout through
#                                         PYTHONPATH even if the install fails)
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
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
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

step install 300 "$PYTHON" -m pip install -e . --no-deps --no-build-isolation -q
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    step pytest_gpu 300 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider
else  # pytest is not preinstalled there and the machine is offline: the same checks inline
    echo "pytest not installed: running the GPU checks without it" | tee -a "$OUT/ran.txt"
    step gpu_checks_no_pytest 300 "$PYTHON" - <<'PY'
import torch, torch.nn.functional as F
from split_alexnet import SplitAlexNet, place
from split_alexnet.training.optim import build_optimizer
from split_alexnet.network.parallelize import autocast_context, grad_scaler, parallelize, to_input_format
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(0)
ref = SplitAlexNet(10).eval()
x = torch.randn(4, 3, 227, 227, generator=torch.Generator().manual_seed(0)) * 60
with torch.no_grad():
    want = ref.collapse("cpu").eval()(x)
    for devs in (("cuda:0", "cuda:0"), ("cuda:0", "cpu"), ("cpu", "cuda:0")):
        net = place(ref.collapse("cpu").split(), devs).eval()
        torch.testing.assert_close(net(x).cpu(), want, rtol=1e-4, atol=1e-4)
        print("ok: towers on", devs)
    coll = ref.collapse("cuda:0").eval()
    torch.testing.assert_close(coll(x.cuda()).cpu(), want, rtol=1e-4, atol=1e-4)
    print("ok: collapsed on cuda:0")
    parallelize(coll, "cuda:0", channels_last=True)
    torch.testing.assert_close(coll(to_input_format(x.cuda(), True)).cpu(), want, rtol=1e-4, atol=1e-4)
    with autocast_context("cuda:0", "bf16"):
        err = ((coll(x.cuda()).float().cpu() - want).abs().max() / want.abs().max()).item()
    assert err < 5e-2, err
    print(f"ok: channels_last; bf16 rel. err {err:.4f}")
net = place(ref.collapse("cpu").split(), ("cuda:0", "cuda:0")).train()
opt, scaler = build_optimizer(net), grad_scaler("cuda:0", "fp16")
with autocast_context(net.devices, "fp16"):
    loss = F.cross_entropy(net(x.cuda()), torch.arange(4, device="cuda:0"))
scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
assert torch.isfinite(loss)
print("ok: fp16 train step with GradScaler")
PY
fi
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
