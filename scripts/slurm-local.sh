#!/usr/bin/env bash
# scripts/slurm-local.sh — a real one-node Slurm cluster on localhost (Debian 12, as root).
#
# Usage (as root):
#   bash scripts/slurm-local.sh          # install (if needed), configure, start; wait until idle
#   bash scripts/slurm-local.sh start    # same as above
#   bash scripts/slurm-local.sh status   # show daemons and node state
#   bash scripts/slurm-local.sh stop     # stop slurmd, slurmctld and munged
#   make slurm-local                     # same as `start`
#
# What it does (idempotent; a second run with the daemons up just checks and exits 0):
#   1. apt-get update + apt-get install -y --no-install-recommends
#      slurmctld slurmd slurm-client munge   (skipped when already installed; ~10 s)
#   2. writes /etc/slurm/slurm.conf for one node (this host, 127.0.0.1): SlurmUser=root,
#      munge auth, proctrack/linuxproc + task/none (no cgroups needed), select/cons_tres
#      (CR_Core, or CR_CPU when cores have several threads), the node line from `slurmd -C`
#      with RealMemory ~5% under the real value, one default partition `debug`,
#      no accounting (accounting_storage/none; finished jobs logged by jobcomp/filetxt).
#      State, spool, pid and log files live under $SLURM_LOCAL_DIR (/tmp/dist_ast-slurm).
#      An /etc/slurm/slurm.conf not written by this script is never overwritten
#      (set SLURM_LOCAL_FORCE=1 to back it up and replace it).
#   3. starts munged (as user munge), slurmctld and slurmd (they daemonize), restarting
#      the Slurm daemons when the config changed, and waits until the node is idle
#      (SLURM_LOCAL_TIMEOUT seconds, default 60; on timeout it prints the log tails and
#      exits 1).
#   Exit 0: Slurm is running and the node is idle. Non-zero: a message says what failed.
#
# Environment:
#   SLURM_LOCAL_DIR      state/spool/log folder       (default /tmp/dist_ast-slurm)
#   SLURM_LOCAL_TIMEOUT  seconds to wait for idle     (default 60)
#   SLURM_LOCAL_FORCE=1  replace a foreign /etc/slurm/slurm.conf (a backup is kept)
#
# Notes: the cluster has no accounting (no sacct); jobs are forgotten by slurmctld a few
# seconds after they end (MinJobAge=4) and their final state is then in
# $SLURM_LOCAL_DIR/log/jobcomp.txt. `scontrol requeue <id>` holds the job ~2 min;
# `scontrol update jobid=<id> StartTime=now` releases it. No systemd is used or needed.
set -euo pipefail

CMD=${1:-start}
DIR=${SLURM_LOCAL_DIR:-/tmp/dist_ast-slurm}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
CONF=/etc/slurm/slurm.conf
MARKER="# written by dist_ast scripts/slurm-local.sh"
PKGS=(slurmctld slurmd slurm-client munge)

log() { printf '[slurm-local] %s\n' "$*" >&2; }
die() { printf '[slurm-local] ERROR: %s\n' "$*" >&2; exit 1; }

# pid from a pidfile if that process is alive and has the expected name
alive_pid() {  # alive_pid <pidfile> <comm>
    local pid
    [[ -r $1 ]] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] || return 1
    echo "$pid"
}

stop_pidfile() {  # stop_pidfile <pidfile> <comm>
    local pid i
    pid=$(alive_pid "$1" "$2") || return 0
    log "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "$2 (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

show_logs() {
    local f
    for f in "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" /var/log/munge/munged.log; do
        [[ -r $f ]] || continue
        printf -- '----- last lines of %s -----\n' "$f" >&2
        tail -n 25 "$f" >&2 || true
    done
}

stop_all() {
    stop_pidfile "$DIR/run/slurmd.pid" slurmd
    stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
    stop_pidfile /run/munge/munged.pid munged
    log "stopped"
}

status() {
    local p
    for p in "$DIR/run/slurmctld.pid slurmctld" "$DIR/run/slurmd.pid slurmd" \
        "/run/munge/munged.pid munged"; do
        set -- $p
        if pid=$(alive_pid "$1" "$2"); then echo "$2: running (pid $pid)"; else echo "$2: not running"; fi
    done
    if command -v sinfo >/dev/null 2>&1; then sinfo 2>&1 || true; fi
}

install_packages() {
    local missing=() p
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        log "packages already installed: ${PKGS[*]}"
        return
    fi
    command -v apt-get >/dev/null || die "apt-get not found: this script needs Debian (12)"
    log "installing ${missing[*]} (apt-get)"
    local t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed (is a Debian mirror reachable?)"
    apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null ||
        die "apt-get install ${PKGS[*]} failed"
    log "installed in $((SECONDS - t0)) s"
}

setup_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already running"
        return
    fi
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged || { show_logs; die "munged failed to start"; }
    local i
    for i in $(seq 1 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    show_logs
    die "munged started but munge -n | unmunge fails"
}

# print the wanted slurm.conf on stdout
render_conf() {
    local host node threads real mem sel
    host=$(hostname -s)
    [[ -n $host ]] || die "hostname -s is empty"
    node=$(slurmd -C 2>/dev/null | head -n 1)
    [[ $node == NodeName=* ]] || die "slurmd -C gave no node line: '$node'"
    real=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    threads=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$node")
    [[ -n $real ]] || die "no RealMemory in: $node"
    mem=$((real * 95 / 100))
    ((mem > 0)) || mem=1
    node=$(sed "s/RealMemory=[0-9]*/RealMemory=$mem/" <<<"$node")
    if [[ ${threads:-1} -gt 1 ]]; then sel=CR_CPU; else sel=CR_Core; fi
    cat <<EOF
$MARKER — a one-node dev cluster on localhost.
# Edit the script, not this file; it is rewritten when it differs.
ClusterName=dist_ast
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=${sel}
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=4
KillWait=30
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=${DIR}/log/jobcomp.txt
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/run/slurmctld.pid
SlurmdPidFile=${DIR}/run/slurmd.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
${node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

write_conf() {  # sets CONF_CHANGED=1 when the file was (re)written
    CONF_CHANGED=0
    local want
    want=$(render_conf)
    install -d -m 0755 /etc/slurm "$DIR" "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log"
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        if [[ ${SLURM_LOCAL_FORCE:-0} != 1 ]]; then
            die "$CONF exists and was not written by this script; not touching it" \
                "(set SLURM_LOCAL_FORCE=1 to back it up and replace it)"
        fi
        cp -a "$CONF" "$CONF.bak.$(date +%s)"
        log "backed up the existing $CONF"
    fi
    if [[ -e $CONF ]] && [[ $(cat "$CONF") == "$want" ]]; then
        return
    fi
    printf '%s\n' "$want" >"$CONF.tmp"
    chmod 0644 "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    CONF_CHANGED=1
    log "wrote $CONF"
}

start_slurm() {
    if ((CONF_CHANGED)); then
        # daemons running with an older config: restart them
        stop_pidfile "$DIR/run/slurmd.pid" slurmd
        stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
    fi
    if alive_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null; then
        log "slurmctld already running"
    else
        log "starting slurmctld"
        slurmctld || { show_logs; die "slurmctld failed to start"; }
    fi
    if alive_pid "$DIR/run/slurmd.pid" slurmd >/dev/null; then
        log "slurmd already running"
    else
        log "starting slurmd"
        slurmd || { show_logs; die "slurmd failed to start"; }
    fi
}

wait_idle() {
    local node state t0=$SECONDS resumed=0
    node=$(hostname -s)
    while :; do
        state=$(sinfo -h -n "$node" -o '%T' 2>/dev/null | head -n 1 || true)
        case $state in
            idle | mixed | allocated | completing)
                log "node $node is $state"
                # prove the whole chain (munge, slurmctld, slurmd, step launch) once
                if timeout 30 srun -N 1 -n 1 -t 1 -J slurm-local-check true; then return; fi
                show_logs
                die "node $node is $state but 'srun -n 1 true' failed"
                ;;
            drain* | down* | fail*)
                if ((!resumed)); then
                    log "node $node is $state; resuming it"
                    scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
                    resumed=1
                fi
                ;;
        esac
        if ((SECONDS - t0 >= TIMEOUT)); then
            show_logs
            sinfo -N -l >&2 2>&1 || true
            die "node $node not idle after ${TIMEOUT} s (state: '${state:-no answer from slurmctld}')"
        fi
        sleep 0.5
    done
}

usage() {
    local node
    node=$(hostname -s)
    cat <<EOF

Slurm is running: one node '$node' ($(sinfo -h -n "$node" -o '%c CPUs, %m MB'), partition 'debug').
  sinfo; squeue                          # cluster and queue
  srun -n 2 hostname                     # a 2-task job step
  sbatch --wait -n 2 job.sh              # batch job; exits with the job's exit code
  scontrol requeue <id>; scontrol update jobid=<id> StartTime=now   # requeue now
  logs:  $DIR/log/{slurmctld,slurmd}.log   finished jobs: $DIR/log/jobcomp.txt
  stop:  bash scripts/slurm-local.sh stop
EOF
}

[[ $CMD == -h || $CMD == --help || $CMD == help ]] && { sed -n '2,36p' "$0"; exit 0; }
[[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts daemons)"

case $CMD in
    start)
        t0=$SECONDS
        install_packages
        setup_munge
        write_conf
        start_slurm
        wait_idle
        log "ready in $((SECONDS - t0)) s"
        usage
        ;;
    stop)
        if command -v scontrol >/dev/null; then stop_all; else log "slurm is not installed"; fi
        ;;
    status) status ;;
    *) die "unknown command '$CMD' (start | stop | status)" ;;
esac
