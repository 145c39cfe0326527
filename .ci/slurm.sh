#!/usr/bin/env bash
# A throwaway single-node SLURM cluster for CI and local tests (Debian/Ubuntu, run as root).
#
#   .ci/slurm.sh install   apt-get install slurm-wlm + munge (nothing from pip)
#   .ci/slurm.sh start     write /etc/slurm/{slurm,gres,cgroup}.conf, start munged, slurmctld,
#                          slurmd; wait until `sinfo` shows the node up (idempotent)
#   .ci/slurm.sh stop      kill the daemons recorded in the PID file (idempotent)
#   .ci/slurm.sh restart   stop, then start (applies a changed config)
#   .ci/slurm.sh status    print the PID file and `sinfo`
#
# The config goes to the DEFAULT path (/etc/slurm/slurm.conf) because the SLURM executor's
# jobstep plugin strips SLURM_* variables (SLURM_CONF included) before its inner `srun`.
# One fake `gpu` GRES backed by /dev/null lets tests check that GPU rules ask SLURM for a GPU.
# Finished jobs are kept by slurmctld for MinJobAge seconds (so `squeue`/`scontrol show job`
# see them) and appended to the jobcomp/filetxt log at JobCompLoc (there is no slurmdbd, so
# `sacct` does not work).
#
# Environment: SAEFLOW_SLURM_DIR (state, logs, PIDs; default /var/tmp/saeflow-slurm),
# SAEFLOW_SLURM_CPUS (declared node CPUs, default 4), SAEFLOW_SLURM_MEM_MB (declared memory,
# default max(MemTotal, 64 GiB)), SAEFLOW_SLURM_PARTITION (default: main).
set -euo pipefail

STATE_DIR="${SAEFLOW_SLURM_DIR:-/var/tmp/saeflow-slurm}"
PID_FILE="$STATE_DIR/pids"
CONF_DIR=/etc/slurm
PARTITION="${SAEFLOW_SLURM_PARTITION:-main}"
# Declared CPUs may exceed the real ones (SlurmdParameters=config_overrides), so that the slurm
# profile's cpus_per_gpu=4 fits on a 2-vCPU CI runner.
CPUS="${SAEFLOW_SLURM_CPUS:-4}"
NODE="$(hostname -s)"
START_TIMEOUT_S="${SAEFLOW_SLURM_START_TIMEOUT:-60}"

log() { echo "slurm.sh: $*" >&2; }

need_root() {
    if [[ $(id -u) -ne 0 ]]; then
        log "must run as root (daemons and /etc/slurm)"
        exit 1
    fi
}

pid_alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

recorded_pid() { # name -> pid from the PID file, or nothing
    [[ -f "$PID_FILE" ]] && awk -v n="$1" '$1 == n {print $2}' "$PID_FILE" || true
}

node_up() { # responding and schedulable (a busy node counts: `start` must not kill its jobs)
    [[ "$(sinfo -h -n "$NODE" -o %t 2>/dev/null | head -1)" =~ ^(idle|mix|alloc|comp)$ ]]
}

cmd_install() {
    need_root
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v munged >/dev/null && command -v sbatch >/dev/null; then
        log "slurm and munge already installed: $(slurmctld -V)"
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends slurm-wlm munge
    # Under systemd the packages may start their own daemons; this script runs its own.
    if [[ -d /run/systemd/system ]]; then
        systemctl disable --now slurmd slurmctld munge >/dev/null 2>&1 || true
    fi
    log "installed $(slurmctld -V)"
}

write_config() {
    local mem_mb
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    # Like CPUS: declared memory may exceed the real one (memory is not a consumable here), so
    # that the slurm profile's GPU rules (mem_mb=16000) are accepted on a small runner.
    mem_mb="${SAEFLOW_SLURM_MEM_MB:-$((mem_mb > 65536 ? mem_mb : 65536))}"
    mkdir -p "$CONF_DIR" "$STATE_DIR"/{ctld,spool,log}
    cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by .ci/slurm.sh: a single-node test cluster. Do not use in production.
ClusterName=saeflow
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE_DIR/log/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmdTimeout=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb Gres=gpu:1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$CONF_DIR/gres.conf" <<EOF
# One fake GPU so that --gpus=1 / --gres=gpu:1 requests are scheduled and recorded.
AutoDetect=off
NodeName=$NODE Name=gpu File=/dev/null
EOF
    cat >"$CONF_DIR/cgroup.conf" <<EOF
# No cgroup plugin is used (proctrack/linuxproc, task/none); present so slurmd finds one.
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
}

start_daemon() { # name binary args... : start in the foreground of a new session, record PID
    local name=$1
    shift
    local pid
    pid=$(recorded_pid "$name")
    if pid_alive "$pid"; then
        return 0
    fi
    setsid "$@" >"$STATE_DIR/log/$name.out" 2>&1 </dev/null &
    pid=$!
    { grep -v "^$name " "$PID_FILE" 2>/dev/null || true; } >"$PID_FILE.tmp"
    echo "$name $pid" >>"$PID_FILE.tmp"
    mv "$PID_FILE.tmp" "$PID_FILE"
    log "started $name (pid $pid)"
}

cmd_start() {
    need_root
    local t0=$SECONDS
    mkdir -p "$STATE_DIR/log"
    if pid_alive "$(recorded_pid slurmctld)" && pid_alive "$(recorded_pid slurmd)" && node_up; then
        log "already running: $(sinfo -h -o '%P %t %N')"
        return 0
    fi
    # Half-started or stale: stop what this script started and begin from a clean state.
    cmd_stop
    write_config

    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown root:root /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown root:root /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    start_daemon munged munged --foreground --force
    for _ in $(seq 50); do
        munge -n </dev/null >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n </dev/null | unmunge >/dev/null

    # -i: ignore state from an earlier run of this script (a clean, empty cluster).
    start_daemon slurmctld slurmctld -D -i
    start_daemon slurmd slurmd -D

    local deadline=$((SECONDS + START_TIMEOUT_S))
    until node_up; do
        if ((SECONDS > deadline)) || ! pid_alive "$(recorded_pid slurmctld)" ||
            ! pid_alive "$(recorded_pid slurmd)"; then
            log "node $NODE not up (a daemon died or ${START_TIMEOUT_S}s passed):"
            sinfo -N -l >&2 || true
            tail -n 20 "$STATE_DIR"/log/*.log >&2 || true
            exit 1
        fi
        # A node restarted with a new config may come up DOWN/DRAIN: bring it back.
        if [[ "$(sinfo -h -n "$NODE" -o %t 2>/dev/null)" =~ down|drain ]]; then
            scontrol update nodename="$NODE" state=resume 2>/dev/null || true
        fi
        sleep 0.5
    done
    log "cluster up in $((SECONDS - t0))s: $(sinfo -h -o '%P %a %D %t %N %G')"
}

cmd_stop() {
    need_root
    local name pid pids=()
    for name in slurmd slurmctld munged; do
        pid=$(recorded_pid "$name")
        if pid_alive "$pid"; then
            kill "$pid"
            pids+=("$pid")
            log "stopping $name (pid $pid)"
        fi
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do
            pid_alive "$pid" || break
            sleep 0.1
        done
        if pid_alive "$pid"; then
            kill -9 "$pid"
        fi
    done
    rm -f "$PID_FILE"
}

cmd_status() {
    [[ -f "$PID_FILE" ]] && cat "$PID_FILE"
    sinfo
}

case "${1:-}" in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
restart)
    cmd_stop
    cmd_start
    ;;
status) cmd_status ;;
*)
    echo "usage: $0 install|start|stop|restart|status" >&2
    exit 2
    ;;
esac
