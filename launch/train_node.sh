#!/usr/bin/env bash
# All GPUs of one node: one torchrun process per GPU pair (DDP across the pairs, the two
# towers inside each pair), or with --parallel towers one process per GPU (a tower each, the
# pairs on a data x tower mesh), or with --parallel hybrid one process per GPU (the
# convolutions data-parallel, fc6-fc8 split across all of them). Every training flag goes through "$@"; nothing about the
# recipe is set here (--batch-size is the global batch unless --per-process-batch).
#
#   launch/train_node.sh --data /data/ilsvrc12 --out runs/node        # 8 GPUs -> 4 processes
#   NGPU=4 launch/train_node.sh --data /data/ilsvrc12                 # GPUs 0-3 -> 2 processes
#   launch/train_node.sh --parallel towers --data /data/ilsvrc12      # 8 GPUs -> 8 processes
#   launch/train_node.sh --parallel hybrid --data /data/ilsvrc12      # 8 GPUs -> 8 processes
#   launch/train_node.sh --single-device --data /data/ilsvrc12        # one process per GPU
#   DRY_RUN=1 launch/train_node.sh --data /data/ilsvrc12              # print, run nothing
#
# Environment: NGPU (default: the entries of CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`),
# TORCHRUN (default torchrun), DRY_RUN=1. See docs/scaling.md.
set -euo pipefail

LAUNCH_NAME=train_node.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ -z ${NGPU:-} && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
    NGPU=${#visible[@]}
fi
[[ -n ${NGPU:-} ]] || gpus_from_nvidia_smi NGPU
processes_for NGPU "$NGPU" "$@"

launch "${TORCHRUN:-torchrun}" --standalone --nproc-per-node "$NPROC" -m split_alexnet.train "$@"
