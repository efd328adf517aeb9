#!/usr/bin/env bash
# A throw-away two-node Slurm cluster on this machine, for CI and for trying the sbatch scripts.
#
#   sudo tests/slurm/local_slurm.sh start     # install (if missing) and start; idempotent
#   export SLURM_CONF=/tmp/epsdist-slurm/slurm.conf     (printed by start)
#   sbatch --wait --nodes=2 --ntasks-per-node=1 --gres=gpu:1 --cpus-per-task=1 slurm/train_coco.sh ...
#   sudo tests/slurm/local_slurm.sh stop      # cancel its jobs, stop its daemons, clean up
#   tests/slurm/local_slurm.sh status
#
# What start does (root only):
#   * installs Debian's slurmctld, slurmd, slurm-client and munge (--no-install-recommends)
#     when they are missing, running `apt-get update` once if the first install fails;
#   * runs its own munged (own key, own socket) as the munge user, one slurmctld and two slurmd
#     daemons (`slurmd -D -N node1`, `-N node2`, each with its own port) on 127.0.0.1, so a job
#     gets a real two-node allocation; every daemon is started with setsid, its output appended
#     to a log, its PID written to a PID file;
#   * gives each fake node two fake GPUs (character devices made with mknod, listed in
#     gres.conf), so `--gres=gpu:N` jobs schedule: they see CUDA_VISIBLE_DEVICES but no GPU;
#   * adds one line `127.0.0.1 node1 node2  # epsdist-local-slurm` to /etc/hosts (the node
#     names must resolve: MASTER_ADDR is the first node's name).
# stop cancels the cluster's jobs, stops only the daemons named in its PID files (after
# checking that each PID still runs the program it started), removes only its own /etc/hosts
# line and deletes the state directory. Nothing is stopped by name.
#
# Environment: EPSDIST_SLURM_DIR (state directory, default /tmp/epsdist-slurm),
# EPSDIST_SLURM_PORT (slurmctld port, default 16817; the nodes use the next two),
# EPSDIST_SLURM_CPUS (CPUs each fake node advertises, default 2), EPSDIST_SLURM_GPUS (fake
# GPUs per node, default 2).
set -euo pipefail

STATE=${EPSDIST_SLURM_DIR:-/tmp/epsdist-slurm}
PORT=${EPSDIST_SLURM_PORT:-16817}
CPUS=${EPSDIST_SLURM_CPUS:-2}
GPUS=${EPSDIST_SLURM_GPUS:-2}
NODES=(node1 node2)
MARK="# epsdist-local-slurm"
CONF=$STATE/slurm.conf
PKGS=(slurmctld slurmd slurm-client munge)

log() { printf 'local_slurm: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() {
    [[ $(id -u) == 0 ]] || die "must run as root (installs packages, starts daemons, edits /etc/hosts)"
}

have_slurm() {
    local c
    for c in slurmctld slurmd sbatch srun scontrol sinfo squeue scancel munged mungekey munge unmunge; do
        command -v "$c" >/dev/null 2>&1 || return 1
    done
}

install_packages() {
    have_slurm && return 0
    command -v apt-get >/dev/null 2>&1 || die "Slurm is not installed and there is no apt-get"
    log "installing ${PKGS[*]}"
    export DEBIAN_FRONTEND=noninteractive
    local apt_log=${TMPDIR:-/tmp}/epsdist-slurm-apt.log
    if ! apt-get install -y -q --no-install-recommends "${PKGS[@]}" >"$apt_log" 2>&1; then
        # a fresh machine may have no (or stale) package lists
        log "apt-get install failed; running apt-get update once and retrying"
        apt-get update -q >>"$apt_log" 2>&1 || true
        if ! apt-get install -y -q --no-install-recommends "${PKGS[@]}" >>"$apt_log" 2>&1; then
            tail -n 20 "$apt_log" >&2
            die "apt-get install ${PKGS[*]} failed (log: $apt_log)"
        fi
    fi
    have_slurm || die "packages installed but the Slurm/munge commands are still missing"
}

# ---------------------------------------------------------------- daemons, by PID file

# start_daemon NAME USER CMD...: setsid, stdin from /dev/null, output appended to the log.
start_daemon() {
    local name=$1 user=$2; shift 2
    local -a run=("$@")
    if [[ $user != root ]]; then
        run=(setpriv --reuid="$user" --regid="$user" --init-groups -- "$@")
    fi
    setsid "${run[@]}" </dev/null >>"$STATE/log/$name.out" 2>&1 &
    local pid=$!
    echo "$pid" >"$STATE/pids/$name.pid"
    readlink -f "$1" >"$STATE/pids/$name.prog"  # what the PID must be running when we stop it
}

# the PID in pids/NAME.pid if that process is alive and still runs the program we started
daemon_pid() {
    local name=$1 pid prog exe
    [[ -f $STATE/pids/$name.pid ]] || return 1
    pid=$(<"$STATE/pids/$name.pid"); prog=$(<"$STATE/pids/$name.prog")
    [[ $pid =~ ^[0-9]+$ ]] && [[ -d /proc/$pid ]] || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    [[ ${exe% (deleted)} == "$prog" ]] || return 1
    echo "$pid"
}

# whether the process started as NAME is still there (while starting: it may not have exec'd yet)
alive() { [[ -f $STATE/pids/$1.pid ]] && kill -0 "$(<"$STATE/pids/$1.pid")" 2>/dev/null; }

# stop_daemons NAME...: SIGTERM to each (only a PID that still runs the program we started),
# wait up to 10 s for all of them, then SIGKILL whatever is left.
stop_daemons() {
    local name pid i left
    local -a pids=()
    for name in "$@"; do
        if pid=$(daemon_pid "$name"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for ((i = 0; i < 100; i++)); do
        left=0
        for pid in "${pids[@]}"; do [[ -d /proc/$pid ]] && left=1; done
        ((left)) || break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        if [[ -d /proc/$pid ]]; then
            log "pid $pid ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for name in "$@"; do rm -f "$STATE/pids/$name.pid" "$STATE/pids/$name.prog"; done
}

all_daemons() { echo munged slurmctld "${NODES[@]/#/slurmd-}"; }

running() {
    local d
    [[ -f $CONF ]] || return 1
    for d in $(all_daemons); do daemon_pid "$d" >/dev/null || return 1; done
    SLURM_CONF=$CONF timeout 10 scontrol ping 2>/dev/null | grep -q UP
}

# ---------------------------------------------------------------- /etc/hosts

add_hosts_line() {
    local n missing=0
    for n in "${NODES[@]}"; do getent hosts "$n" >/dev/null || missing=1; done
    grep -q -- "$MARK\$" /etc/hosts && return 0
    ((missing)) || return 0
    # append in place (/etc/hosts may be a bind mount that cannot be renamed over)
    printf '127.0.0.1 %s  %s\n' "${NODES[*]}" "$MARK" >>/etc/hosts
}

remove_hosts_line() {
    grep -q -- "$MARK\$" /etc/hosts 2>/dev/null || return 0
    local tmp
    tmp=$(mktemp)
    grep -v -- "$MARK\$" /etc/hosts >"$tmp" || true
    cat "$tmp" >/etc/hosts          # rewrite in place, keeping the file (and any mount) as it is
    rm -f "$tmp"
}

# ---------------------------------------------------------------- configuration

write_config() {
    local host i g
    host=$(hostname -s)
    cat >"$CONF" <<EOF
# Generated by tests/slurm/local_slurm.sh: a throw-away cluster, deleted by 'stop'.
ClusterName=epsdistci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=5
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=60
SlurmdTimeout=120
JobRequeue=1
NodeName=DEFAULT CPUs=$CPUS Gres=gpu:$GPUS State=UNKNOWN
EOF
    : >"$STATE/gres.conf"
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[$i]} NodeAddr=127.0.0.1 NodeHostname=$host Port=$((PORT + 1 + i))" >>"$CONF"
        for ((g = 0; g < GPUS; g++)); do
            # a character device (/dev/null's numbers): gres.conf accepts no plain file
            mknod "$STATE/dev/${NODES[$i]}-gpu$g" c 1 3
            echo "NodeName=${NODES[$i]} Name=gpu File=$STATE/dev/${NODES[$i]}-gpu$g" >>"$STATE/gres.conf"
        done
    done
    local IFS=,
    echo "PartitionName=ci Nodes=${NODES[*]} Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
    # slurmd looks for gres.conf beside slurm.conf
}

start_munge() {
    install -d -o munge -g munge -m 0755 "$STATE/munge"
    mungekey --create --keyfile="$STATE/munge/munge.key" >/dev/null 2>&1 \
        || dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$STATE/munge/munge.key"
    chmod 0600 "$STATE/munge/munge.key"
    start_daemon munged munge "$(command -v munged)" --foreground --force \
        --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
        --pid-file="$STATE/munge/munged.pid" --seed-file="$STATE/munge/munged.seed" \
        --log-file="$STATE/munge/munged.log"
    local i
    for ((i = 0; i < 100; i++)); do
        if munge -n -S "$STATE/munge/munge.socket" 2>/dev/null |
            unmunge -S "$STATE/munge/munge.socket" >/dev/null 2>&1; then
            return 0
        fi
        alive munged || break
        sleep 0.1
    done
    tail -n 20 "$STATE/log/munged.out" "$STATE/munge/munged.log" >&2 2>/dev/null || true
    die "munged did not come up"
}

wait_nodes_idle() {
    local i out=""
    for ((i = 0; i < 120; i++)); do
        out=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %T' 2>/dev/null || true)
        if [[ $(grep -c ' idle$' <<<"$out") == "${#NODES[@]}" ]]; then return 0; fi
        sleep 0.5
    done
    log "nodes did not become idle: $out"
    tail -n 30 "$STATE"/log/*.log >&2 2>/dev/null || true
    return 1
}

# ---------------------------------------------------------------- commands

cmd_start() {
    need_root
    install_packages
    if running; then
        log "already running (state in $STATE)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    if [[ -d $STATE ]]; then cmd_stop quiet; fi
    [[ -e $STATE ]] && die "$STATE exists and was not made by this script; set EPSDIST_SLURM_DIR"
    local t0=$SECONDS i
    install -d -m 0755 "$STATE"
    touch "$STATE/.epsdist-local-slurm"
    install -d -m 0755 "$STATE/pids" "$STATE/log" "$STATE/run" "$STATE/ctld" "$STATE/dev"
    local n
    for n in "${NODES[@]}"; do install -d -m 0755 "$STATE/spool/$n"; done
    add_hosts_line
    write_config
    start_munge
    start_daemon slurmctld root "$(command -v slurmctld)" -D -i -f "$CONF"
    for ((i = 0; i < 100; i++)); do
        SLURM_CONF=$CONF timeout 5 scontrol ping 2>/dev/null | grep -q UP && break
        alive slurmctld || break
        sleep 0.2
    done
    if ! alive slurmctld; then
        tail -n 30 "$STATE/log/slurmctld.out" "$STATE/log/slurmctld.log" >&2 || true
        cmd_stop quiet
        die "slurmctld exited"
    fi
    for n in "${NODES[@]}"; do
        start_daemon "slurmd-$n" root "$(command -v slurmd)" -D -N "$n" -f "$CONF"
    done
    if ! wait_nodes_idle; then cmd_stop quiet; die "the fake nodes did not register"; fi
    log "up in $((SECONDS - t0)) s: nodes ${NODES[*]} ($GPUS fake GPUs, $CPUS CPUs each), state in $STATE"
    echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
    local quiet=${1:-}
    need_root
    if [[ -f $CONF ]] && daemon_pid slurmctld >/dev/null; then
        # cancel this cluster's jobs first so that no job step outlives its slurmd
        local ids i
        ids=$(SLURM_CONF=$CONF timeout 10 squeue -h -o %i 2>/dev/null || true)
        if [[ -n $ids ]]; then
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF timeout 10 scancel $ids 2>/dev/null || true
            for ((i = 0; i < 60; i++)); do
                [[ -z $(SLURM_CONF=$CONF timeout 10 squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_daemons "${NODES[@]/#/slurmd-}" slurmctld
    stop_daemons munged
    remove_hosts_line
    rm -f "${TMPDIR:-/tmp}/epsdist-slurm-apt.log"
    # delete the state directory only if this script made it
    if [[ -f $STATE/.epsdist-local-slurm ]]; then
        rm -rf -- "$STATE"
    fi
    [[ -n $quiet ]] || log "stopped; removed $STATE"
}

cmd_status() {
    local d pid
    for d in $(all_daemons); do
        if pid=$(daemon_pid "$d"); then echo "$d: running (pid $pid)"; else echo "$d: not running"; fi
    done
    if running; then SLURM_CONF=$CONF sinfo -N; echo "export SLURM_CONF=$CONF"; else return 1; fi
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
