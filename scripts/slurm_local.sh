#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests and local multi-task runs.
#
#   scripts/slurm_local.sh start    install (Debian, as root) if missing, start munged/slurmctld/slurmd,
#                                   wait for the node to be idle. stdout is eval-able: "# started" or
#                                   "# already running", then `export SLURM_CONF=...` as the last line
#   scripts/slurm_local.sh stop     cancel this cluster's jobs, stop the daemons it started (by pid file)
#   scripts/slurm_local.sh status   sinfo; exit 0 when running, 3 when not
#
# All three are idempotent. State (slurm.conf, spool, logs, pid files) lives in
# $SLURM_LOCAL_DIR, default ${AIAYN_OUTPUT_DIR:-<repo>/outputs}/slurm.
# Other knobs: SLURM_LOCAL_TIMEOUT (seconds to wait for the node, default 60),
# SLURM_LOCAL_PARTITION (default "debug").
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${SLURM_LOCAL_DIR:-${AIAYN_OUTPUT_DIR:-$REPO/outputs}/slurm}"
TIMEOUT="${SLURM_LOCAL_TIMEOUT:-60}"
PARTITION="${SLURM_LOCAL_PARTITION:-debug}"
PACKAGES=(slurmctld slurmd slurm-client munge)
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { echo "slurm_local: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Absolute state paths (the folder is created by `start` only).
set_paths() {
    if [[ -d "$DIR" ]]; then DIR="$(cd "$DIR" && pwd)"; fi
    CONF="$DIR/slurm.conf"
    CTLD_PID="$DIR/slurmctld.pid"
    SLURMD_PID="$DIR/slurmd.pid"
    MUNGED_PID="$DIR/munged.pid" # only present when this script started munged
    LOGDIR="$DIR/log"
    export SLURM_CONF="$CONF"
}

# pid_alive FILE NAME: the pid in FILE is a live process called NAME (guards against recycled pids).
pid_alive() {
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(tr -dc 0-9 <"$1")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]]
}

node_state() { sinfo -h -N -o %T 2>/dev/null | head -n 1 || true; } # empty while slurmctld does not answer

running() {
    [[ -f "$CONF" ]] && pid_alive "$CTLD_PID" slurmctld && pid_alive "$SLURMD_PID" slurmd &&
        [[ -n "$(node_state)" ]]
}

show_logs() {
    local f
    for f in "$LOGDIR"/slurmctld.log "$LOGDIR"/slurmd.log "$LOGDIR"/munged.log "$LOGDIR"/apt.log; do
        [[ -s "$f" ]] || continue
        echo "----- tail of $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

fail() {
    log "error: $*"
    show_logs
    exit 1
}

installed() {
    local b
    for b in slurmctld slurmd sbatch srun sinfo scontrol munged munge unmunge; do
        command -v "$b" >/dev/null 2>&1 || return 1
    done
}

install_packages() {
    installed && return 0
    if [[ "$(id -u)" != 0 ]]; then
        die "SLURM is not installed and installing it needs root: run this script as root, or" \
            "'sudo apt-get install ${PACKAGES[*]}' first"
    fi
    command -v apt-get >/dev/null || die "SLURM is not installed and apt-get is missing (Debian/Ubuntu only)"
    local t0=$SECONDS apt=(apt-get -q -y -o DPkg::Lock::Timeout=600)
    log "installing ${PACKAGES[*]} with apt (log: $LOGDIR/apt.log)"
    export DEBIAN_FRONTEND=noninteractive
    "${apt[@]}" update >>"$LOGDIR/apt.log" 2>&1 </dev/null 9>&- || fail "apt-get update failed"
    local t1=$SECONDS
    "${apt[@]}" install --no-install-recommends "${PACKAGES[@]}" >>"$LOGDIR/apt.log" 2>&1 </dev/null 9>&- ||
        fail "apt-get install ${PACKAGES[*]} failed"
    installed || fail "packages installed but the SLURM/munge binaries are still not on PATH"
    log "installed in $((SECONDS - t0)) s (apt-get update $((t1 - t0)) s, install $((SECONDS - t1)) s)"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    munge_ok && return 0 # a munged is already serving (ours from an earlier start, or the system's)
    [[ "$(id -u)" == 0 ]] || die "munged is not running and starting it needs root"
    local key=/etc/munge/munge.key i
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge
    install -d -o munge -g munge -m 0755 /run/munge /var/log/munge
    if [[ ! -s "$key" ]]; then
        (umask 0277 && head -c 1024 /dev/urandom >"$key")
        chown munge:munge "$key"
        chmod 0400 "$key"
        log "created $key"
    fi
    # --force: take over a stale socket left by a munged that died.
    runuser -u munge -- /usr/sbin/munged --force >>"$LOGDIR/munged.log" 2>&1 </dev/null 9>&- ||
        fail "munged did not start"
    for ((i = 0; i < 50; i++)); do
        if munge_ok; then
            cp /run/munge/munged.pid "$MUNGED_PID" 2>/dev/null || true
            return 0
        fi
        sleep 0.2
    done
    fail "munged started but 'munge -n | unmunge' does not succeed"
}

write_conf() {
    local host cpus avail mem
    host="$(hostname -s)"
    cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"  # nproc obeys OMP_NUM_THREADS (tests set 1)
    avail="$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)"
    mem=$((avail * 9 / 10)) # a bit under what is free: slurmd drains a node that has less than RealMemory
    ((mem > 0)) || mem=1
    cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: a single-node cluster on $host.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Requeue: JobRequeue=1 lets batch jobs be requeued (sbatch --requeue, scontrol requeue, as submitit does
# on its preemption signal). A requeued job is held for cred_expire+1 s (default 120 s; 5 is the minimum),
# then started by the next scheduling pass (sched_interval, default 60 s): it runs again ~8 s later.
# KillWait: seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or times out.
JobRequeue=1
KillWait=5
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=2,bf_interval=2
# MinJobAge: seconds a finished job's record stays visible to scontrol (no accounting database here). The stage
# graph's tests read the prepare job's start/end times after the whole graph ended, which takes well over the
# default 300 s on a loaded 2-core machine.
MinJobAge=7200
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start() {
    mkdir -p "$DIR"
    set_paths
    mkdir -p "$LOGDIR" "$DIR/state" "$DIR/spool"
    exec 9>"$DIR/.lock"
    flock -w 900 9 || die "another slurm_local.sh holds $DIR/.lock"
    if running; then
        log "already running ($(node_state)); nothing to do"
        echo "# already running"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    install_packages
    start_munge
    local host state pid
    host="$(hostname -s)"
    if ! pid_alive "$CTLD_PID" slurmctld && ! pid_alive "$SLURMD_PID" slurmd; then
        for pid in $(command -v pgrep >/dev/null && pgrep -x slurmctld; pgrep -x slurmd 2>/dev/null); do
            die "a slurmctld/slurmd not started from $DIR is running (pid $pid," \
                "$(tr '\0' ' ' <"/proc/$pid/cmdline")): stop it first, it holds the SLURM ports"
        done
        write_conf # only while nothing runs from it
    fi
    if ! pid_alive "$CTLD_PID" slurmctld; then
        slurmctld -f "$CONF" </dev/null 9>&- || fail "slurmctld did not start"
    fi
    if ! pid_alive "$SLURMD_PID" slurmd; then
        slurmd -f "$CONF" -N "$host" </dev/null 9>&- || fail "slurmd did not start"
    fi
    local deadline=$((SECONDS + TIMEOUT))
    while :; do
        state="$(node_state)"
        case "$state" in
        idle | mixed | allocated) break ;;
        drain* | down | fail*) [[ "$state" == down ]] || fail "node $host is $state: $(sinfo -h -R)" ;;
        esac
        if ((SECONDS >= deadline)); then
            fail "node $host not idle after ${TIMEOUT}s (state: '${state:-no answer}')"
        fi
        sleep 0.5
        for pid in "$CTLD_PID:slurmctld" "$SLURMD_PID:slurmd"; do
            pid_alive "${pid%%:*}" "${pid##*:}" || fail "${pid##*:} exited while starting"
        done
    done
    log "node $host is $state; partition $PARTITION; logs in $LOGDIR"
    echo "# started"
    echo "export SLURM_CONF=$CONF"
}

kill_pidfile() { # kill_pidfile FILE NAME: TERM, wait up to 10 s, then KILL
    local pid i
    pid_alive "$1" "$2" || {
        rm -f "$1"
        return 0
    }
    pid="$(tr -dc 0-9 <"$1")"
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$1"
    log "stopped $2 (pid $pid)"
}

stop() {
    set_paths
    [[ -d "$DIR" ]] || {
        log "nothing to stop in $DIR"
        return 0
    }
    exec 9>"$DIR/.lock"
    flock -w 900 9 || die "another slurm_local.sh holds $DIR/.lock"
    if running; then
        local jobs
        jobs="$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')"
        if [[ -n "${jobs// /}" ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            log "cancelled jobs: $jobs"
        fi
    fi
    kill_pidfile "$SLURMD_PID" slurmd
    kill_pidfile "$CTLD_PID" slurmctld
    if [[ -f "$MUNGED_PID" ]]; then kill_pidfile "$MUNGED_PID" munged; fi
    return 0
}

status() {
    set_paths
    if running; then
        sinfo
        echo "slurmctld pid $(cat "$CTLD_PID"), slurmd pid $(cat "$SLURMD_PID"); export SLURM_CONF=$CONF"
        return 0
    fi
    echo "not running (state folder: $DIR)"
    return 3
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
*)
    echo "usage: $0 {start|stop|status}" >&2
    exit 2
    ;;
esac
