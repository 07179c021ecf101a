# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, never run on its own): error lines, the
# command line as text, the processes for a GPU count, DRY_RUN, and the checkout on PYTHONPATH.
#
# A script sets LAUNCH_NAME (its own name, for error lines) and then sources this file. Found
# by each script next to itself; sbatch runs a copy of its script from a spool folder, so
# train_multinode.slurm looks in $SLURM_SUBMIT_DIR/launch/ too (see docs/scaling.md).

: "${LAUNCH_NAME:=launch}"

die() {  # one error line on stderr, exit 2
    echo "$LAUNCH_NAME: error: $*" >&2
    exit 2
}

show() {  # the command as one line, quoting only what needs it
    local out="" a safe='^[-A-Za-z0-9_./:=,@%+]+$'
    for a in "$@"; do
        if [[ $a =~ $safe ]]; then out+="$a "; else out+="$(printf '%q' "$a") "; fi
    done
    printf '%s\n' "${out% }"
}

gpus_from_nvidia_smi() {  # gpus_from_nvidia_smi VAR: VAR = the GPUs `nvidia-smi -L` lists
    command -v nvidia-smi > /dev/null || die "no nvidia-smi on this machine: set $1 to the number of GPUs to use"
    printf -v "$1" '%s' "$(nvidia-smi -L | grep -c '^GPU ' || true)"
}

# processes_for NAME COUNT ARGS...: NPROC = processes for COUNT GPUs, one per GPU pair (the two
# towers), or one per GPU with --single-device, --parallel towers (a process per tower: the
# pairs are ranks 2k, 2k+1) or --parallel hybrid (K processes) among ARGS; dies on a count
# that does not split.
processes_for() {
    local name=$1 count=$2 per=2 a prev=
    shift 2
    for a in "$@"; do
        [[ $a == --single-device || $a == --parallel=towers || $a == --parallel=hybrid ]] && per=1
        [[ $prev == --parallel && ( $a == towers || $a == hybrid ) ]] && per=1
        prev=$a
    done
    [[ $count =~ ^[0-9]+$ ]] || die "$name must be a whole number of GPUs (got '$count')"
    if (( count < per )); then
        die "$name=$count: need at least $per GPU(s) per process"
    fi
    if (( count % per )); then
        die "$name=$count is odd: every process needs a pair of GPUs for the two towers; use an even $name, or --single-device for one GPU per process"
    fi
    if (( per == 1 )) && [[ " $* " == *" --parallel towers "* || " $* " == *" --parallel=towers "* ]] && (( count % 2 )); then
        die "$name=$count is odd: --parallel towers puts the two towers of a pair on two GPUs; use an even $name"
    fi
    # shellcheck disable=SC2034  # NPROC is read by the script that sources this file
    NPROC=$((count / per))
}

launch() {  # launch CMD...: print it (DRY_RUN=1) or replace this shell with it
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        show "$@"
        exit 0
    fi
    exec "$@"
}

# The checkout this file belongs to goes first on PYTHONPATH, so a clone runs without install.
LAUNCH_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$LAUNCH_REPO${PYTHONPATH:+:$PYTHONPATH}"
