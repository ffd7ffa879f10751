#!/usr/bin/env bash
# One-GPU smoke job: is this node's GPU stack usable by cifar_dist?
#
#   cd /path/to/cifar_dist && sbatch slurm/smoke_gpu.sh [DATA_DIR]
#
# Runs, in order, and stops at the first failure:
#   1. nvidia-smi and TensorFlow's view of the GPU (must list exactly one)
#   2. pytest -m gpu  (the GPU tests; they skip where no GPU is visible, so step 1 guards)
#   3. a short training run: configs/smoke.cfg on one GPU (XLA, about a minute),
#      into $SLURM_SUBMIT_DIR/runs/smoke_gpu_<job id>
# Without DATA_DIR the run trains on the real CIFAR-10 sample shipped in the package
# (configs/smoke.cfg: no data, no network); with it, on the first 2,048 training and 512
# test images of the CIFAR-10 copy there (a folder holding cifar-10-batches-py/, or
# cifar-10-python.tar.gz). SMOKE_ALLOW_CPU=1 skips step 1 and lets steps 2-3 run on a
# CPU node (to check this script on the local SLURM of slurm/setup_local_slurm.sh). Site knobs (partition, account, CIFAR_DIST_MODULES,
# CIFAR_DIST_VENV, PYTHON) as in slurm/train.sh.
#
#SBATCH --job-name=cifar_dist_smoke_gpu
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=00:30:00
#SBATCH --output=slurm-%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=my_project

set -uo pipefail

[ -n "${SLURM_JOB_ID:-}" ] || { echo "slurm/smoke_gpu.sh: error: submit it with sbatch" >&2; exit 2; }
cd "${SLURM_SUBMIT_DIR:-.}" || exit 2
if [ -n "${CIFAR_DIST_MODULES:-}" ]; then
    # shellcheck disable=SC2086
    module load $CIFAR_DIST_MODULES || exit 2
fi
if [ -n "${CIFAR_DIST_VENV:-}" ]; then
    # shellcheck disable=SC1091
    source "$CIFAR_DIST_VENV/bin/activate" || exit 2
fi
PYTHON=${PYTHON:-python3}
[ -d "$PWD/cifar_dist" ] && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}

step() { echo; echo "=== smoke_gpu: $* ($(date -u +%T))"; }
die() { echo "smoke_gpu: FAILED: $*" >&2; exit 1; }

step "1/3 GPU visible (job $SLURM_JOB_ID on $(hostname -s), CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})"
if [ "${SMOKE_ALLOW_CPU:-0}" = 1 ]; then
    echo "smoke_gpu: SMOKE_ALLOW_CPU=1: not checking for a GPU"
else
    nvidia-smi || die "nvidia-smi failed: no GPU or no driver on this node"
    "$PYTHON" - <<'EOF' || die "TensorFlow does not see exactly one GPU (CUDA/cuDNN install?)"
import sys
import tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
print("tensorflow", tf.__version__, "built with CUDA:", tf.test.is_built_with_cuda(), "GPUs:", gpus)
sys.exit(0 if len(gpus) == 1 else 1)
EOF
fi

step "2/3 pytest -m gpu"
"$PYTHON" -m pytest -m gpu -q -p no:cacheprovider
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "smoke_gpu: no test is marked gpu yet (pytest exit 5): nothing to run"
elif [ "$rc" -ne 0 ]; then
    die "pytest -m gpu failed (exit $rc)"
fi

step "3/3 smoke training run on one GPU"
DATA_DIR=${1:-}
if [ -z "$DATA_DIR" ]; then
    data_flags=()  # configs/smoke.cfg: --dataset=sample
    echo "smoke_gpu: no DATA_DIR given: training on the CIFAR-10 sample shipped with cifar_dist"
elif [ -e "$DATA_DIR" ]; then
    data_flags=(--dataset=cifar10 --data_dir="$DATA_DIR" --train_subset=2048 --test_subset=512)
else
    die "DATA_DIR $DATA_DIR not found (leave it out to train on the shipped sample)"
fi
model_dir="$PWD/runs/smoke_gpu_$SLURM_JOB_ID"
srun "$PYTHON" -m cifar_dist.main --flagfile=configs/smoke.cfg "${data_flags[@]}" \
    --strategy=one_device --model_dir="$model_dir" || die "smoke training run failed"
[ -f "$model_dir/metrics.json" ] || die "no $model_dir/metrics.json"
echo "smoke_gpu: OK ($model_dir/metrics.json)"
