#!/usr/bin/env bash
# Multi-node training under SLURM: one MultiWorkerMirroredStrategy worker per task.
#
#   cd /path/to/cifar_dist          # submit from the repository root
#   sbatch slurm/train.sh --flagfile=configs/smoke.cfg \
#       --data_dir=/shared/cifar --model_dir=/shared/runs/exp1
#   sbatch slurm/train.sh            # the seed recipe (the defaults) into runs/slurm-<job id>
#
# Flags after the script name go to `python -m cifar_dist.main`, behind
# `--strategy=multi_worker --cluster=slurm --model_dir=$SLURM_SUBMIT_DIR/runs/slurm-<job id>`
# (every task agrees on the job id, and a requeued job keeps it, so it resumes there; a
# --model_dir of yours, or one in a flagfile, comes later and wins). sbatch options on the command line override
# the #SBATCH lines below (e.g. `sbatch --nodes=4 slurm/train.sh ...`).
#
# Site knobs (edit here, or set in the environment you submit from; sbatch passes it on):
#   #SBATCH --partition / --account   uncomment below
#   CIFAR_DIST_MODULES="cuda/12.3 cudnn"   `module load` these first
#   CIFAR_DIST_VENV=/path/to/venv         activate this virtual environment
#   PYTHON=python3                        the interpreter (default python3)
#   CIFAR_DIST_MAX_REQUEUES=20            stop requeueing after this many restarts
#   NCCL_SOCKET_IFNAME / NCCL_IB_HCA      the usual NCCL network knobs, if your site needs them
#
# Layout: one task per node, each task driving ALL of its node's GPUs as local replicas
# (MultiWorkerMirroredStrategy runs all-reduce inside the node and across nodes; NCCL on
# GPUs). That is the simplest layout, not the only one: with --ntasks-per-node=N
# --gpus-per-task=1 each task keeps the GPU SLURM bound to it, and with several tasks per
# node sharing the node's GPUs each takes its own slice (cifar_dist's own SLURM resolver,
# not TensorFlow's SlurmClusterResolver; BUILD_NOTES.md, "GPU binding and rank order
# under SLURM").
#
# Pre-emption and time limits: `--signal=USR1@120` (no "B:") makes SLURM send SIGUSR1 to
# the training tasks themselves 120 s before the time limit. Each task then finishes
# its step, every task agrees to stop, the chief writes a checkpoint, and all exit 75.
# This script sees srun exit 75 and requeues the job (`scontrol requeue`); the next run
# resumes from model_dir/checkpoints. With "B:USR1@120" only this batch shell would get
# the signal: the shell is blocked in `srun` and bash runs traps only after srun returns,
# so the tasks would be killed at the time limit without a checkpoint.
# When the scheduler pre-empts the job (PreemptMode=REQUEUE) the tasks get SIGTERM, save
# and exit 75 the same way, and SLURM requeues the job itself.
# A lost node (a crashed or unreachable node, a task killed by the OOM killer): the other
# tasks exit 3 ("lost contact with another worker") and this script requeues the job as
# after a stop (exit 3, or a task killed by a signal: srun exits 128+N), so it resumes from
# the newest checkpoint. --requeue also lets SLURM itself restart a job whose node failed.
# A job that still ends failed prints its model_dir and the command that resumes it.
# model_dir must be on a filesystem every node sees.
#
#SBATCH --job-name=cifar_dist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-task=4
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=my_project

set -uo pipefail

# The exit statuses are defined once, in cifar_dist/errors.py (its table and EXIT_*
# constants); a shell script cannot import them, so these repeat EXIT_PEER_LOST,
# EXIT_STOPPED and EXIT_STOPPED_EARLY (2 bad input and 4 diverged are named in messages).
PEER_LOST=3  # another worker died or stalled: restart every task, they resume
STOPPED=75  # stopped by a signal after saving a checkpoint: requeue to resume
STOPPED_EARLY=76  # stopped by a signal before any checkpoint existed

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "slurm/train.sh: error: submit it with sbatch (sbatch slurm/train.sh [FLAGS])" >&2
    exit 2
fi
cd "${SLURM_SUBMIT_DIR:-.}" || exit 2

if [ -n "${CIFAR_DIST_MODULES:-}" ]; then
    # shellcheck disable=SC2086
    module load $CIFAR_DIST_MODULES || { echo "slurm/train.sh: error: module load $CIFAR_DIST_MODULES failed" >&2; exit 2; }
fi
if [ -n "${CIFAR_DIST_VENV:-}" ]; then
    # shellcheck disable=SC1091
    source "$CIFAR_DIST_VENV/bin/activate" || { echo "slurm/train.sh: error: cannot activate $CIFAR_DIST_VENV" >&2; exit 2; }
fi
PYTHON=${PYTHON:-python3}
# Run from a checkout without installing: the batch script itself is a copy in SLURM's
# spool folder, so find the package from the submit directory.
if [ -d "$PWD/cifar_dist" ]; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# The cluster comes from SLURM (--cluster=slurm); a TF_CONFIG exported in the submitting
# shell would only contradict it.
unset TF_CONFIG
# Since SLURM 22.05 srun no longer inherits --cpus-per-task from sbatch.
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
export PYTHONUNBUFFERED=1

echo "slurm/train.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
     "${SLURM_NTASKS:-?} task(s), $(date -u +%FT%TZ)"

# --kill-on-bad-exit=0: when a task exits 75 after a stop, the others may still be
# finishing the (collective) checkpoint; killing them then could lose it. A crashed task
# is noticed by its peers instead (connection reset, or --collective_timeout), so the step
# still ends. --label prefixes every output line with the task number.
MODEL_DIR="$PWD/runs/slurm-$SLURM_JOB_ID"
srun --kill-on-bad-exit=0 --label "$PYTHON" -m cifar_dist.main \
    --strategy=multi_worker --cluster=slurm --model_dir="$MODEL_DIR" "$@"
rc=$?

# The model_dir the run used: ours, unless a --model_dir in the flags (or in a flagfile
# named there) came later and won, as it does for absl.
flag_value() {  # flag_value NAME ARGS...: the last --NAME=V / --NAME V among ARGS
    local name=$1 value="" prev=""; shift
    for arg in "$@"; do
        case "$arg" in --"$name"=*) value=${arg#--"$name"=} ;; esac
        [ "$prev" = "--$name" ] && value=$arg
        prev=$arg
    done
    printf '%s' "$value"
}
used_dir=$MODEL_DIR
flagfile=$(flag_value flagfile "$@")
if [ -n "$flagfile" ] && [ -f "$flagfile" ]; then
    in_file=$(sed -n 's/^[[:space:]]*--model_dir=//p' "$flagfile" | tail -n1)
    [ -n "$in_file" ] && used_dir=$in_file
fi
in_args=$(flag_value model_dir "$@")
[ -n "$in_args" ] && used_dir=$in_args
case "$used_dir" in /*) ;; *) used_dir="$PWD/$used_dir" ;; esac

resume_hint() {  # what to type to resume this job in a new one (a new job id)
    local cmd="cd $(printf '%q' "$PWD") && sbatch slurm/train.sh"
    for arg in "$@"; do cmd+=" $(printf '%q' "$arg")"; done
    echo "slurm/train.sh: the checkpoints are in $used_dir; to resume there, submit:" >&2
    echo "slurm/train.sh:   $cmd --model_dir=$(printf '%q' "$used_dir")" >&2
}

# Requeue (the job keeps its id and model_dir, and resumes) after a stop by a signal (75,
# 76), and after a lost task (3 from the survivors, or srun's 128+N when a task was killed
# by signal N: the OOM killer, a crashed node), at most CIFAR_DIST_MAX_REQUEUES times.
why=""
if [ "$rc" -eq "$STOPPED" ] || [ "$rc" -eq "$STOPPED_EARLY" ]; then
    why="stopped by a signal (exit $rc)"
elif [ "$rc" -eq "$PEER_LOST" ]; then
    why="a task lost contact with another (exit $rc: a node crashed or was cut off)"
elif [ "$rc" -gt 128 ]; then
    why="a task was killed by signal $((rc - 128)) (exit $rc: the OOM killer, a crashed node)"
fi
if [ -n "$why" ]; then
    restarts=${SLURM_RESTART_COUNT:-0}
    if [ "$restarts" -ge "${CIFAR_DIST_MAX_REQUEUES:-20}" ]; then
        echo "slurm/train.sh: $why but already requeued $restarts times (CIFAR_DIST_MAX_REQUEUES): not requeueing" >&2
        resume_hint "$@"
    else
        echo "slurm/train.sh: $why: requeueing job $SLURM_JOB_ID to resume"
        if ! scontrol requeue "$SLURM_JOB_ID"; then
            echo "slurm/train.sh: scontrol requeue failed" >&2
            resume_hint "$@"
        fi
    fi
elif [ "$rc" -ne 0 ]; then
    echo "slurm/train.sh: training failed with exit status $rc (2 bad input, 3 a worker lost or never started, 4 diverged; see the task lines above)" >&2
    [ "$rc" -ne 2 ] && resume_hint "$@"
else
    echo "slurm/train.sh: done $(date -u +%FT%TZ)"
fi
exit "$rc"
