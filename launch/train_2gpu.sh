#!/usr/bin/env bash
# One process, one GPU pair: the paper's layout (tower 0 on the first GPU, tower 1 on the
# second). Every training flag goes through "$@"; nothing about the recipe is set here.
#
#   launch/train_2gpu.sh --data /data/ilsvrc12 --out runs/alexnet
#   GPUS=2,3 launch/train_2gpu.sh --data /data/ilsvrc12 --out runs/b
#   DRY_RUN=1 launch/train_2gpu.sh --data /data/ilsvrc12     # print the command, run nothing
#
# Environment: GPUS (two GPU indices, default 0,1; 0,0 puts both towers on one GPU),
# PYTHON (default python), DRY_RUN=1. See docs/scaling.md.
set -euo pipefail

die() { echo "train_2gpu.sh: error: $*" >&2; exit 2; }
show() {  # the command as one line, quoting only what needs it
    local out="" a safe='^[-A-Za-z0-9_./:=,@%+]+$'
    for a in "$@"; do
        if [[ $a =~ $safe ]]; then out+="$a "; else out+="$(printf '%q' "$a") "; fi
    done
    printf '%s\n' "${out% }"
}

GPUS=${GPUS:-0,1}
PYTHON=${PYTHON:-python}
[[ $GPUS =~ ^[0-9]+,[0-9]+$ ]] || die "GPUS must name two GPU indices such as 0,1 (got '$GPUS')"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
cmd=("$PYTHON" -m split_alexnet.train --gpus "$GPUS" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
    show "${cmd[@]}"
    exit 0
fi
exec "${cmd[@]}"
