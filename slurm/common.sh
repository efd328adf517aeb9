# shellcheck shell=bash
# slurm/common.sh: what slurm/train_voc.sh and slurm/train_coco.sh share. Sourced by them inside
# the batch job (it is not a job script of its own). Site settings come from the environment of
# the `sbatch` command (sbatch passes it on to the job), each with a default:
#
#   EPSDIST_ROOT          the epsdist checkout; default: $SLURM_SUBMIT_DIR (run `sbatch` from the
#                         repository root), else the folder above the submitted script
#   EPSDIST_PYTHON        the Python that has epsdist installed; default:
#                         $EPSDIST_ROOT/.venv/bin/python if it exists (what `make test` builds),
#                         else python3 on the PATH
#   EPSDIST_SETUP         shell code run before the launch, e.g.
#                         'module load cuda/12.4' or 'source ~/miniforge3/bin/activate eps'
#   EPSDIST_CONFIG        the recipe (default per script: configs/voc_eps.yaml, configs/coco_eps.yaml)
#   EPSDIST_RUN_DIR       -> run.dir            (default: the config's, relative to EPSDIST_ROOT)
#   EPSDIST_TRAIN_SHARDS  -> data.train_shards  (default: the config's)
#   EPSDIST_WEIGHTS       -> model.weights      (default: the config's)
#   EPSDIST_MASTER_PORT   rendezvous port; default 29500 + SLURM_JOB_ID mod 10000
#   EPSDIST_MAX_RESTARTS  stop requeueing after this many restarts (default 100)
#   OMP_NUM_THREADS       default 1 per rank (as torchrun does)
#   NCCL_*, GLOO_*, TORCH_NCCL_*: passed through; defaults below
#
# Arguments to the job script are passed to epsdist/train.py after the overrides above, so they
# win: `sbatch slurm/train_coco.sh train.max_iters=1000 run.dir=/scratch/me/coco`.
#
# Signals. The scripts ask for `--signal=B:USR1@120`: 120 s before the time limit Slurm sends
# SIGUSR1 to this batch shell (and only to it). The shell forwards it once to the trainer's
# ranks through srun, waits for srun to return, and then requeues the job with
# `scontrol requeue` (the job was submitted with --requeue); the requeued job starts again with
# `--resume auto` and continues from the newest checkpoint of run.dir. It also requeues when the
# trainer exits with status 75 (EX_TEMPFAIL: "checkpoint written, stopped early, run me again").
# A preemption or `scontrol requeue` from outside is Slurm's own requeue: nothing to do here,
# the restarted job resumes the same way.

EPSDIST_EXIT_REQUEUE=75

epsdist_log() { printf '[epsdist %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
epsdist_die() { epsdist_log "error: $*" >&2; exit 2; }

# epsdist_train DEFAULT_CONFIG [trainer arguments...]: everything after the #SBATCH lines.
epsdist_train() {
    local default_config=$1; shift
    [[ -n ${SLURM_JOB_ID:-} ]] ||
        epsdist_die "not inside a Slurm job: submit with sbatch (or run inside salloc)"
    cd "$EPSDIST_ROOT" || epsdist_die "cannot cd to EPSDIST_ROOT=$EPSDIST_ROOT"
    [[ -f epsdist/train.py ]] || epsdist_die "$EPSDIST_ROOT is not an epsdist checkout:" \
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

    local -a overrides=()
    [[ -z ${EPSDIST_RUN_DIR:-} ]] || overrides+=("run.dir=$EPSDIST_RUN_DIR")
    [[ -z ${EPSDIST_TRAIN_SHARDS:-} ]] || overrides+=("data.train_shards=$EPSDIST_TRAIN_SHARDS")
    [[ -z ${EPSDIST_WEIGHTS:-} ]] || overrides+=("model.weights=$EPSDIST_WEIGHTS")

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

    # Options (--resume none, --stop-after N, ...) go before every key=value override: the
    # trainer's argparse takes its overrides as one positional list. The arguments' overrides
    # come after the ones from the environment, so they win.
    local -a options=() user=()
    local a
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z_][A-Za-z0-9_.]*= ]]; then user+=("$a"); else options+=("$a"); fi
    done
    local -a cmd=("$py" -u epsdist/train.py --config "$config" --resume auto "${options[@]}"
                  "${overrides[@]}" "${user[@]}")
    epsdist_log "srun: ${cmd[*]}"

    # One task per GPU; each task gets its rank from Slurm. --kill-on-bad-exit: one failed rank
    # ends the step at once instead of leaving the others waiting for a collective timeout.
    _EPSDIST_SIGNALLED=0
    _EPSDIST_SRUN_PID=
    trap _epsdist_on_usr1 USR1
    # shellcheck disable=SC2016  # expanded by each task's bash, not here
    srun --kill-on-bad-exit=1 bash -c '
        export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
        echo "[epsdist] rank $RANK/$WORLD_SIZE local_rank $LOCAL_RANK" \
             "on ${SLURMD_NODENAME:-$(hostname)} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}"
        exec "$@"' epsdist-task "${cmd[@]}" &
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
    epsdist_log "trainer exited with status $rc"

    if ((rc == 0)); then
        return 0
    fi
    if ((rc == EPSDIST_EXIT_REQUEUE || _EPSDIST_SIGNALLED)); then
        if ((restarts >= ${EPSDIST_MAX_RESTARTS:-100})); then
            epsdist_die "not requeueing: $restarts restarts already (EPSDIST_MAX_RESTARTS)"
        fi
        epsdist_log "requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint"
        if scontrol requeue "$SLURM_JOB_ID"; then
            # Slurm now ends this job and queues it again; nothing left to do here.
            exit 0
        fi
        epsdist_log "scontrol requeue failed (job submitted with --no-requeue?): submit the same" \
            "command again, it resumes from the checkpoint" >&2
    fi
    return "$rc"
}

_epsdist_on_usr1() {
    epsdist_log "SIGUSR1 (time limit or preemption near): asking the trainer to checkpoint and stop"
    _EPSDIST_SIGNALLED=1
    if [[ -n $_EPSDIST_SRUN_PID ]]; then
        kill -USR1 "$_EPSDIST_SRUN_PID" 2>/dev/null || true
    fi
}
