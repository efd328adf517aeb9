# shellcheck shell=bash
# slurm/common.sh: what the job scripts share. Sourced by them inside the batch job (it is not a
# job script of its own); each script calls one function with its default config:
#
#   epsdist_train   DEFAULT_CONFIG [args]   slurm/train_voc.sh, train_coco.sh  -> epsdist/train.py
#   epsdist_segment DEFAULT_CONFIG [args]   slurm/train_seg.sh                 -> epsdist/segment.py
#   epsdist_infer   DEFAULT_CONFIG [args]   slurm/pseudo_masks.sh              -> epsdist/infer.py
#
# Site settings come from the environment of the `sbatch` command (sbatch passes it on to the
# job), each with a default:
#
#   EPSDIST_ROOT          the epsdist checkout; default: $SLURM_SUBMIT_DIR (run `sbatch` from the
#                         repository root), else the folder above the submitted script
#   EPSDIST_PYTHON        the Python that has epsdist installed; default:
#                         $EPSDIST_ROOT/.venv/bin/python if it exists (what `make test` builds),
#                         else python3 on the PATH
#   EPSDIST_SETUP         shell code run before the launch, e.g.
#                         'module load cuda/12.4' or 'source ~/miniforge3/bin/activate eps'
#   EPSDIST_CONFIG        the recipe (default per script: configs/voc_eps.yaml,
#                         configs/coco_eps.yaml, configs/voc_seg.yaml)
#   EPSDIST_RUN_DIR       -> run.dir            (default: the config's, relative to EPSDIST_ROOT)
#   EPSDIST_TRAIN_SHARDS  -> data.train_shards  (default: the config's)
#   EPSDIST_VAL_SHARDS    -> data.val_shards    (segment only; default: the config's)
#   EPSDIST_WEIGHTS       -> model.weights      (default: the config's)
#   EPSDIST_MASTER_PORT   rendezvous port; default 29500 + SLURM_JOB_ID mod 10000
#   EPSDIST_MAX_RESTARTS  stop requeueing after this many restarts (default 100)
#   OMP_NUM_THREADS       default 1 per rank (as torchrun does)
#   NCCL_*, GLOO_*, TORCH_NCCL_*: passed through; defaults below
# and for the pseudo-masks (epsdist_infer; its config is the stage-1 recipe, for infer.*):
#   EPSDIST_CHECKPOINT    -> --checkpoint  (default: RUN/export/model.pt, RUN = EPSDIST_RUN_DIR,
#                                           else the config's run.dir)
#   EPSDIST_SHARDS        -> --shards      (default: the config's data.train_shards)
#   EPSDIST_OUT           -> --out         (default: RUN with a trailing _eps replaced by _pseudo,
#                                           else RUN_pseudo: runs/voc_eps -> runs/voc_pseudo, whose
#                                           shards/ configs/voc_seg.yaml trains on)
#   EPSDIST_INFER_ARGS    more infer.py arguments, split on spaces, e.g. "--cams --panels 20"
#
# Arguments to the job script are passed to the Python entry point after the ones above, so
# they win: `sbatch slurm/train_coco.sh train.max_iters=1000 run.dir=/scratch/me/coco`.
#
# Signals. The scripts ask for `--signal=B:USR1@120`: 120 s before the time limit Slurm sends
# SIGUSR1 to this batch shell (and only to it). The shell forwards it once to the ranks through
# srun, waits for srun to return, and then requeues the job with `scontrol requeue` (the job was
# submitted with --requeue). The trainers (train.py, segment.py) checkpoint at the next
# iteration and exit with status 75; the requeued job starts again with `--resume auto` and
# continues from the newest checkpoint of run.dir. infer.py has no handler: the signal ends its
# ranks at once (every output file is written under a temporary name and renamed, so nothing is
# left half-written) and the requeued job skips the images whose masks exist. The shell also
# requeues when the Python exits with status 75 (EX_TEMPFAIL: "checkpoint written, stopped
# early, run me again"). A preemption or `scontrol requeue` from outside is Slurm's own requeue:
# nothing to do here, the restarted job resumes the same way.

EPSDIST_EXIT_REQUEUE=75

epsdist_log() { printf '[epsdist %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
epsdist_die() { epsdist_log "error: $*" >&2; exit 2; }

# epsdist_train DEFAULT_CONFIG [trainer arguments...]: everything after the #SBATCH lines.
epsdist_train() { _epsdist_job train "$@"; }
# epsdist_segment DEFAULT_CONFIG [segment.py arguments...]: the same for the segmentation stage.
epsdist_segment() { _epsdist_job segment "$@"; }
# epsdist_infer DEFAULT_CONFIG [infer.py arguments...]: pseudo-masks (no --resume: a rerun skips
# the images already done).
epsdist_infer() { _epsdist_job infer "$@"; }

# _epsdist_job STAGE DEFAULT_CONFIG [arguments...]: STAGE is train, segment or infer.
_epsdist_job() {
    local stage=$1 default_config=$2; shift 2
    local entry what
    case $stage in
        train) entry=epsdist/train.py what=trainer ;;
        segment) entry=epsdist/segment.py what=trainer ;;
        infer) entry=epsdist/infer.py what="pseudo-mask inference" ;;
        *) epsdist_die "unknown stage $stage" ;;
    esac
    [[ -n ${SLURM_JOB_ID:-} ]] ||
        epsdist_die "not inside a Slurm job: submit with sbatch (or run inside salloc)"
    cd "$EPSDIST_ROOT" || epsdist_die "cannot cd to EPSDIST_ROOT=$EPSDIST_ROOT"
    [[ -f $entry ]] || epsdist_die "$EPSDIST_ROOT is not an epsdist checkout:" \
        "set EPSDIST_ROOT or run sbatch from the repository root"

    if [[ -n ${EPSDIST_SETUP:-} ]]; then
        epsdist_log "EPSDIST_SETUP: $EPSDIST_SETUP"
        eval "$EPSDIST_SETUP"
    fi
    local py=${EPSDIST_PYTHON:-}
    if [[ -z $py ]]; then
        py=python3
        if [[ -x $EPSDIST_ROOT/.venv/bin/python ]]; then py=$EPSDIST_ROOT/.venv/bin/python; fi
    fi
    command -v "$py" >/dev/null 2>&1 || epsdist_die "EPSDIST_PYTHON=$py: not found"
    local config=${EPSDIST_CONFIG:-$default_config}
    [[ -f $config ]] ||
        epsdist_die "EPSDIST_CONFIG=$config: no such file (relative paths start at $EPSDIST_ROOT)"

    # infer.py: EPSDIST_INFER_ARGS come first, so the script's own arguments win
    if [[ $stage == infer && -n ${EPSDIST_INFER_ARGS:-} ]]; then
        local -a infer_args
        read -r -a infer_args <<<"$EPSDIST_INFER_ARGS"
        set -- "${infer_args[@]}" "$@"
    fi
    # Options (--resume none, --stop-after N, ...) go before every key=value override (infer.py
    # takes its overrides as one positional list after the options). The arguments' overrides
    # come after the ones from the environment, so they win.
    local -a options=() user=()
    local a
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z_][A-Za-z0-9_.]*= ]]; then user+=("$a"); else options+=("$a"); fi
    done

    local -a overrides=() fixed=()
    case $stage in
        train | segment)
            [[ -z ${EPSDIST_RUN_DIR:-} ]] || overrides+=("run.dir=$EPSDIST_RUN_DIR")
            [[ -z ${EPSDIST_TRAIN_SHARDS:-} ]] ||
                overrides+=("data.train_shards=$EPSDIST_TRAIN_SHARDS")
            if [[ $stage == segment && -n ${EPSDIST_VAL_SHARDS:-} ]]; then
                overrides+=("data.val_shards=$EPSDIST_VAL_SHARDS")
            fi
            [[ -z ${EPSDIST_WEIGHTS:-} ]] || overrides+=("model.weights=$EPSDIST_WEIGHTS")
            fixed=(--resume auto)
            ;;
        infer)
            _epsdist_infer_paths "$py" "$config" "${user[@]}"
            fixed=(--checkpoint "$_EPSDIST_CHECKPOINT" --shards "$_EPSDIST_SHARDS"
                   --out "$_EPSDIST_OUT")
            ;;
    esac

    # Rendezvous: rank 0 runs on the first node of the allocation.
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    MASTER_PORT=${EPSDIST_MASTER_PORT:-$((29500 + SLURM_JOB_ID % 10000))}
    export MASTER_ADDR MASTER_PORT
    # RANK/LOCAL_RANK/WORLD_SIZE are set per task below; stale ones from the submitting shell
    # (e.g. sbatch called from inside a torchrun job) must not leak into the tasks.
    unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE

    export PYTHONUNBUFFERED=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    # NCCL (GPU ranks). Report problems, not chatter (NCCL_DEBUG=INFO to see rings/transports);
    # a failed collective aborts the rank instead of hanging until the timeout.
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # Site-specific, left to the environment of `sbatch` (documented in README):
    #   NCCL_SOCKET_IFNAME=ib0 (or =^lo,docker0)  the interface NCCL bootstraps over
    #   GLOO_SOCKET_IFNAME=...                    the same for gloo (CPU ranks)
    #   NCCL_IB_HCA=mlx5_0,mlx5_1 / NCCL_IB_DISABLE=1 (no InfiniBand) / NCCL_NET_GDR_LEVEL=...
    # Slurm >= 22.05: srun no longer inherits --cpus-per-task from the job; give the tasks the
    # CPUs the job asked for (data-loader workers run on them).
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
    # Triton's compile cache on node-local disk, not a shared home directory.
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/epsdist-triton-$(id -u)}

    local restarts=${SLURM_RESTART_COUNT:-0}
    local gpus=${SLURM_GPUS_ON_NODE:-0}
    local per_node=${SLURM_NTASKS_PER_NODE:-}
    epsdist_log "job $SLURM_JOB_ID (restart $restarts) on $SLURM_JOB_NODELIST:" \
        "WORLD_SIZE=$SLURM_NTASKS" \
        "tasks/node=${per_node:-?} GPUs/node=$gpus cpus/task=${SLURM_CPUS_PER_TASK:-?}" \
        "MASTER=$MASTER_ADDR:$MASTER_PORT"
    if [[ $gpus != 0 && -n $per_node && ${per_node%%(*} != "$gpus" ]]; then
        epsdist_log "warning: $per_node tasks per node but $gpus GPUs per node:" \
            "ask for one task per GPU" \
            "(--ntasks-per-node=N --gres=gpu:N)" >&2
    fi
    epsdist_log "python $py, config $config, in $PWD"

    local -a cmd=("$py" -u "$entry" --config "$config" "${fixed[@]}" "${options[@]}"
                  "${overrides[@]}" "${user[@]}")
    epsdist_log "srun: ${cmd[*]}"

    # One task per GPU; each task gets its rank from Slurm. --kill-on-bad-exit: one failed rank
    # ends the step at once instead of leaving the others waiting for a collective timeout.
    # A rank that stops early (status 75) has passed the checkpoint's last barrier, but the
    # others may still be closing their logs: with --kill-on-bad-exit, its 75 would make srun
    # kill them and report their signal (143) instead of 75. So each task's shell turns 75 into
    # 0 and leaves a mark in this directory (it exists on this node only; rank 0 runs here).
    # Removed on exit, also when Slurm ends the job (SIGTERM: scancel, requeue, time limit).
    _EPSDIST_STOPPED_DIR=$(mktemp -d "${TMPDIR:-/tmp}/epsdist-$SLURM_JOB_ID.XXXXXX") ||
        epsdist_die "cannot make a temporary directory in ${TMPDIR:-/tmp}"
    trap 'rm -rf -- "$_EPSDIST_STOPPED_DIR"' EXIT
    trap 'exit 143' TERM
    export EPSDIST_STOPPED_DIR=$_EPSDIST_STOPPED_DIR
    _EPSDIST_SIGNALLED=0
    _EPSDIST_SRUN_PID=
    _EPSDIST_STAGE=$stage
    trap _epsdist_on_usr1 USR1
    # srun passes a signal to every process of the step: the task's shell traps USR1 so that it
    # outlives it (the Python it starts gets the default disposition back and its own copy).
    # shellcheck disable=SC2016  # expanded by each task's bash, not here
    srun --kill-on-bad-exit=1 bash -c '
        export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
        echo "[epsdist] rank $RANK/$WORLD_SIZE local_rank $LOCAL_RANK" \
             "on ${SLURMD_NODENAME:-$(hostname)} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}"
        trap : USR1
        "$@"
        rc=$?
        if ((rc == 75)); then
            { : >"$EPSDIST_STOPPED_DIR/rank$RANK"; } 2>/dev/null
            exit 0
        fi
        exit "$rc"' epsdist-task "${cmd[@]}" &
    _EPSDIST_SRUN_PID=$!
    local rc
    while :; do
        rc=0
        wait "$_EPSDIST_SRUN_PID" || rc=$?
        # a trapped signal interrupts `wait` (status > 128) while srun still runs: wait again
        if ((rc > 128)) && kill -0 "$_EPSDIST_SRUN_PID" 2>/dev/null; then continue; fi
        break
    done
    trap - USR1
    if ((rc == 0)) && [[ -n $(ls -A "$_EPSDIST_STOPPED_DIR") ]]; then rc=$EPSDIST_EXIT_REQUEUE; fi
    if ((rc == EPSDIST_EXIT_REQUEUE)); then
        epsdist_log "$what exited with status $rc (stopped early, checkpoint written)"
    else
        epsdist_log "$what exited with status $rc"
    fi

    if ((rc == 0)); then
        return 0
    fi
    if ((rc == EPSDIST_EXIT_REQUEUE || _EPSDIST_SIGNALLED)); then
        if ((restarts >= ${EPSDIST_MAX_RESTARTS:-100})); then
            epsdist_die "not requeueing: $restarts restarts already (EPSDIST_MAX_RESTARTS)"
        fi
        if [[ $stage == infer ]]; then
            epsdist_log "requeueing job $SLURM_JOB_ID; it skips the images already done"
        else
            epsdist_log "requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint"
        fi
        if scontrol requeue "$SLURM_JOB_ID"; then
            # Slurm now ends this job and queues it again; nothing left to do here.
            exit 0
        fi
        epsdist_log "scontrol requeue failed (job submitted with --no-requeue?): submit the same" \
            "command again, it resumes from the checkpoint" >&2
    fi
    return "$rc"
}

# _epsdist_infer_paths PYTHON CONFIG [key=value...]: sets _EPSDIST_CHECKPOINT, _EPSDIST_SHARDS
# and _EPSDIST_OUT from EPSDIST_CHECKPOINT / EPSDIST_SHARDS / EPSDIST_OUT, else from the config's
# run.dir (EPSDIST_RUN_DIR, else run.dir= among the arguments, else the config's) and
# data.train_shards; checks that the checkpoint and the shards are there.
_epsdist_infer_paths() {
    local py=$1 config=$2; shift 2
    local -a keys=()
    [[ -z ${EPSDIST_RUN_DIR:-} ]] || keys+=("run.dir=$EPSDIST_RUN_DIR")
    local resolved
    # shellcheck disable=SC2016
    resolved=$("$py" -c '
import sys
from epsdist.config import load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except Exception as e:
    sys.exit(f"{type(e).__name__}: {e}")
print(cfg.run.dir)
print(cfg.data.train_shards)' "$config" "$@" "${keys[@]}") ||
        epsdist_die "cannot read run.dir and data.train_shards from $config"
    local run_dir=${resolved%%$'\n'*} train_shards=${resolved#*$'\n'}
    run_dir=${run_dir%/}
    _EPSDIST_CHECKPOINT=${EPSDIST_CHECKPOINT:-$run_dir/export/model.pt}
    _EPSDIST_SHARDS=${EPSDIST_SHARDS:-$train_shards}
    _EPSDIST_OUT=${EPSDIST_OUT:-${run_dir%_eps}_pseudo}
    [[ -f $_EPSDIST_CHECKPOINT ]] || epsdist_die "checkpoint $_EPSDIST_CHECKPOINT: no such file" \
        "(the export/model.pt that slurm/train_voc.sh or train_coco.sh writes at the end of" \
        "training; set EPSDIST_CHECKPOINT or EPSDIST_RUN_DIR)"
    [[ -d $_EPSDIST_SHARDS ]] || epsdist_die "shards $_EPSDIST_SHARDS: no such directory" \
        "(set EPSDIST_SHARDS)"
    epsdist_log "pseudo-masks of $_EPSDIST_SHARDS with $_EPSDIST_CHECKPOINT -> $_EPSDIST_OUT"
}

_epsdist_on_usr1() {
    if [[ ${_EPSDIST_STAGE:-} == infer ]]; then
        epsdist_log "SIGUSR1 (time limit or preemption near): stopping the pseudo-mask" \
            "inference (no checkpoint needed: a rerun skips the images already done)"
    else
        epsdist_log "SIGUSR1 (time limit or preemption near): asking the trainer to checkpoint" \
            "and stop"
    fi
    _EPSDIST_SIGNALLED=1
    if [[ -n $_EPSDIST_SRUN_PID ]]; then
        kill -USR1 "$_EPSDIST_SRUN_PID" 2>/dev/null || true
    fi
}
