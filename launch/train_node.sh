#!/usr/bin/env bash
# All GPUs of one node: one torchrun process per GPU pair (DDP across the pairs, the two
# towers inside each pair). Every training flag goes through "$@"; nothing about the recipe
# is set here (--batch-size is the global batch unless --per-process-batch).
#
#   launch/train_node.sh --data /data/ilsvrc12 --out runs/node        # 8 GPUs -> 4 processes
#   NGPU=4 launch/train_node.sh --data /data/ilsvrc12                 # GPUs 0-3 -> 2 processes
#   launch/train_node.sh --single-device --data /data/ilsvrc12        # one process per GPU
#   DRY_RUN=1 launch/train_node.sh --data /data/ilsvrc12              # print, run nothing
#
# Environment: NGPU (default: the entries of CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`),
# TORCHRUN (default torchrun), DRY_RUN=1. See docs/scaling.md.
set -euo pipefail

die() { echo "train_node.sh: error: $*" >&2; exit 2; }
show() {  # the command as one line, quoting only what needs it
    local out="" a safe='^[-A-Za-z0-9_./:=,@%+]+$'
    for a in "$@"; do
        if [[ $a =~ $safe ]]; then out+="$a "; else out+="$(printf '%q' "$a") "; fi
    done
    printf '%s\n' "${out% }"
}

if [[ -z ${NGPU:-} ]]; then
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
        NGPU=${#visible[@]}
    elif command -v nvidia-smi > /dev/null; then
        NGPU=$(nvidia-smi -L | grep -c '^GPU ' || true)
    else
        die "no nvidia-smi on this machine: set NGPU to the number of GPUs to use"
    fi
fi
[[ $NGPU =~ ^[0-9]+$ ]] || die "NGPU must be a whole number of GPUs (got '$NGPU')"

per=2  # GPUs per process: a tower pair, or one GPU with --single-device
for a in "$@"; do [[ $a == --single-device ]] && per=1; done
if (( NGPU < per )); then
    die "NGPU=$NGPU: need at least $per GPU(s) per process"
fi
if (( NGPU % per )); then
    die "NGPU=$NGPU is odd: every process needs a pair of GPUs for the two towers; use an even NGPU, or --single-device for one GPU per process"
fi

TORCHRUN=${TORCHRUN:-torchrun}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
cmd=("$TORCHRUN" --standalone --nproc-per-node "$((NGPU / per))" -m split_alexnet.train "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
    show "${cmd[@]}"
    exit 0
fi
exec "${cmd[@]}"
