#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the tests marked `slurm` (tests/test_slurm.py) and for trying
# the README's cluster commands by hand:
#
#   bash scripts/slurm_local.sh start     # install slurm-wlm + munge when missing, write slurm.conf, start the daemons
#   bash scripts/slurm_local.sh status    # sinfo
#   bash scripts/slurm_local.sh stop      # stop the daemons by their pid files
#
# Needs root (apt-get, /etc/slurm, /run). No systemd: munged runs as the munge user, slurmctld and slurmd as root,
# each started by hand and stopped by its pid file. One node named after this host with its CPUs and a share of
# its memory; DefMemPerCPU lets two jobs run side by side. No accounting database (no sacct: submitit only warns).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
RUN=/run/slurm
SPOOL_CTLD=/var/spool/slurmctld
SPOOL_D=/var/spool/slurmd
LOG=/var/log/slurm

need_root() {
    if [ "$(id -u)" != 0 ]; then echo "slurm_local.sh: must run as root (apt-get, /etc/slurm, /run)" >&2; exit 1; fi
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    echo "slurm_local.sh: installing slurm-wlm and munge (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    # RealMemory must not exceed what slurmd measures, or the node is drained; keep a margin for the OS
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$(( mem * 9 / 10 ))
    mkdir -p /etc/slurm
    cat > "$CONF" <<EOF
# written by rtda's scripts/slurm_local.sh: a one-node cluster for tests
ClusterName=rtda-local
SlurmctldHost=${host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$(( mem / cpus / 2 ))
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=${LOG}/jobcomp.log
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldPidFile=${RUN}/slurmctld.pid
SlurmdPidFile=${RUN}/slurmd.pid
SlurmctldLogFile=${LOG}/slurmctld.log
SlurmdLogFile=${LOG}/slurmd.log
StateSaveLocation=${SPOOL_CTLD}
SlurmdSpoolDir=${SPOOL_D}
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=300
Waittime=0
NodeName=${host} CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

alive() {  # alive PIDFILE NAME: the daemon NAME whose pid the file holds is running (not a zombie left by a kill
    # that this machine's init has not reaped, not another process that took the pid)
    local pid
    [ -f "$1" ] || return 1
    pid=$(cat "$1")
    [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != "Z" ]
}

start() {
    need_root
    install_packages
    mkdir -p "$RUN" "$SPOOL_CTLD" "$SPOOL_D" "$LOG" /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null; then mungekey --create --force; else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    write_conf
    if ! alive /run/munge/munged.pid munged; then
        rm -f /run/munge/munged.pid
        su -s /bin/sh munge -c "/usr/sbin/munged --force --pid-file=/run/munge/munged.pid"
    fi
    if ! alive "$RUN/slurmctld.pid" slurmctld; then rm -f "$RUN/slurmctld.pid"; /usr/sbin/slurmctld; fi
    if ! alive "$RUN/slurmd.pid" slurmd; then rm -f "$RUN/slurmd.pid"; /usr/sbin/slurmd; fi
    local deadline=$((SECONDS + 90))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if timeout 5 sinfo -h -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
            sinfo
            return 0
        fi
        sleep 1
    done
    echo "slurm_local.sh: the node did not come up; see $LOG/slurmctld.log and $LOG/slurmd.log" >&2
    sinfo -R >&2 || true
    exit 1
}

stop() {
    need_root
    for entry in "$RUN/slurmd.pid:slurmd" "$RUN/slurmctld.pid:slurmctld" "/run/munge/munged.pid:munged"; do
        pidfile=${entry%%:*}
        if alive "$pidfile" "${entry##*:}"; then
            pid=$(cat "$pidfile")
            kill "$pid"
            for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        fi
        rm -f "$pidfile"
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo; squeue ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
