#!/bin/bash
# Stage 1 (EPS classifier) on PASCAL VOC 2012 (train_aug): one task per GPU, srun-launched.
#
#   cd /path/to/epsdist && sbatch slurm/train_voc.sh [key=value ...]
#   sbatch -p gpu -A myproject --gres=gpu:8 --ntasks-per-node=8 slurm/train_voc.sh train.lr=0.02
#
# Resources below are defaults: options on the sbatch command line override them (so do
# SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ... in the environment). Keep
# --ntasks-per-node equal to the GPUs per node. No partition or account is set here: pass
# -p/--partition and -A/--account (or SBATCH_PARTITION / SBATCH_ACCOUNT) where your site needs them.
# Any GPU count trains the recipe's train.global_batch_size (8) images per step: each GPU takes
# its share (which must divide: else a config error names both numbers); set
# train.micro_batch_size=N to cap the per-GPU batch (gradient accumulation).
#
# Site settings, from the environment of `sbatch` (details in slurm/common.sh):
#   EPSDIST_ROOT (default: the submit directory), EPSDIST_PYTHON (default: .venv/bin/python
#   of the checkout, else python3), EPSDIST_SETUP ('module load ...'), EPSDIST_CONFIG (default
#   configs/voc_eps.yaml), EPSDIST_RUN_DIR, EPSDIST_TRAIN_SHARDS, EPSDIST_WEIGHTS,
#   EPSDIST_MASTER_PORT, EPSDIST_MAX_RESTARTS, NCCL_* / GLOO_* variables.
#
# Time limits and preemption: 120 s before the limit Slurm sends SIGUSR1 to this script, which
# has the trainer checkpoint and stop, then requeues the job; every start uses --resume auto, so
# a requeued or preempted job continues from the newest checkpoint in run.dir. The log is
# appended across restarts.
#
#SBATCH --job-name=eps-voc
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# sbatch runs a copy of this file from a spool directory: find the checkout from the submit
# directory, or else from the path the job was submitted with.
EPSDIST_ROOT=${EPSDIST_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f $EPSDIST_ROOT/slurm/common.sh && -n ${SLURM_JOB_ID:-} ]]; then
    _cmd=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Command=[^ ]*' || true)
    _cmd=${_cmd#Command=}
    [[ -z $_cmd || $_cmd == /* ]] || _cmd=${SLURM_SUBMIT_DIR:-$PWD}/$_cmd
    if [[ -n $_cmd ]] && _dir=$(cd "$(dirname "$_cmd")/.." 2>/dev/null && pwd); then
        EPSDIST_ROOT=$_dir
    fi
fi
if [[ ! -f $EPSDIST_ROOT/slurm/common.sh ]]; then
    echo "epsdist: no checkout at $EPSDIST_ROOT: run sbatch from the repository root" \
         "or set EPSDIST_ROOT" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$EPSDIST_ROOT/slurm/common.sh"

epsdist_train configs/voc_eps.yaml "$@"
