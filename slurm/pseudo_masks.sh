#!/bin/bash
# Pseudo-masks (epsdist/infer.py) of a trained stage-1 model: one task per GPU, srun-launched;
# the images are split across the tasks.
#
#   cd /path/to/epsdist && sbatch slurm/pseudo_masks.sh [infer.py arguments / key=value ...]
#   EPSDIST_INFER_ARGS="--cams --panels 20" sbatch -p gpu -A myproject slurm/pseudo_masks.sh
#   EPSDIST_CONFIG=configs/coco_eps.yaml sbatch --nodes=2 slurm/pseudo_masks.sh
#
# Resources below are defaults: options on the sbatch command line override them (so do
# SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ... in the environment). Keep
# --ntasks-per-node equal to the GPUs per node. No partition or account is set here: pass
# -p/--partition and -A/--account (or SBATCH_PARTITION / SBATCH_ACCOUNT) where your site needs them.
#
# What it runs: epsdist/infer.py --config CONFIG --checkpoint CKPT --shards SHARDS --out OUT
# [EPSDIST_INFER_ARGS] [arguments], from the environment of `sbatch` (details in slurm/common.sh):
#   EPSDIST_CONFIG      the stage-1 recipe, for its infer.* settings (default configs/voc_eps.yaml)
#   EPSDIST_CHECKPOINT  default RUN/export/model.pt, RUN = EPSDIST_RUN_DIR else the config's run.dir
#   EPSDIST_SHARDS      default the config's data.train_shards (shards/voc_train_aug)
#   EPSDIST_OUT         default RUN with _eps replaced by _pseudo (runs/voc_pseudo: its shards/ are
#                       what configs/voc_seg.yaml trains on)
#   EPSDIST_INFER_ARGS  e.g. "--cams --panels 20"
#   and EPSDIST_ROOT, EPSDIST_PYTHON, EPSDIST_SETUP, EPSDIST_MASTER_PORT, EPSDIST_MAX_RESTARTS,
#   NCCL_* / GLOO_* as for the training scripts. Writes OUT/masks, OUT/shards, OUT/report.json
#   (when the shards have ground truth), OUT/cams and OUT/panels on request.
#
# Time limits and preemption: infer.py keeps no state but its output files (each written under
# a temporary name and renamed) and skips the images whose masks exist. 120 s before the limit
# Slurm sends SIGUSR1 to this script, which passes it to the ranks (infer.py has no handler for
# it: they stop at once) and requeues the job; the requeued, preempted or resubmitted job
# continues with the images not done yet. The log is appended across restarts.
#
#SBATCH --job-name=eps-pseudo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
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

epsdist_infer configs/voc_eps.yaml "$@"
