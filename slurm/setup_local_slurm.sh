#!/usr/bin/env bash
# Install and start a single-node SLURM on THIS machine (Debian/Ubuntu, as root), for tests.
#
#   sudo bash slurm/setup_local_slurm.sh        # prints one line; exit 0 = ready
#
# What it does (see slurm/README.md, "A local SLURM"):
#   1. apt-get install slurm-wlm munge (apt-get update first when the package is unknown)
#   2. a munge key (1024 random bytes, munge:munge, mode 400) and munged
#   3. /etc/slurm/slurm.conf: one node (this host, as `slurmd -C` measures it), one
#      partition "debug", no cgroups (proctrack/linuxproc, task/none), no accounting
#   4. slurmctld and slurmd, then waits until the node is idle
# (and, only if this host's name does not resolve, a 127.0.1.1 line in /etc/hosts)
# It is idempotent: when slurmctld already answers with our config it does nothing.
# It never touches a SLURM it did not configure: an /etc/slurm/slurm.conf without our
# marker line stops it. Exit status: 0 ready; 1 something failed (one line says what).
# Logs: /var/log/slurm/slurmctld.log and slurmd.log.
set -uo pipefail

MARKER="# written by cifar_dist slurm/setup_local_slurm.sh"
CONF=/etc/slurm/slurm.conf
PARTITION=debug
WAIT_SECONDS=${SETUP_SLURM_WAIT_SECONDS:-60}

fail() { echo "setup_local_slurm: FAILED: $*" >&2; exit 1; }
say() { echo "setup_local_slurm: $*"; }

[ "$(id -u)" = 0 ] || fail "must run as root (it installs packages and starts daemons)"
[ "$(uname -s)" = Linux ] || fail "needs Linux"

node_state() { sinfo -h -p "$PARTITION" -o %T 2>/dev/null | head -n1; }
ours() { [ -f "$CONF" ] && grep -qxF "$MARKER" "$CONF"; }
running() { pgrep -x "$1" >/dev/null 2>&1; }

# --- already up with our config: nothing to do
if ours && running slurmctld && running slurmd && scontrol ping >/dev/null 2>&1; then
    case "$(node_state)" in
        idle*|mix*|alloc*) say "already running ($CONF, partition $PARTITION is $(node_state))"; exit 0 ;;
    esac
fi
if [ -f "$CONF" ] && ! ours; then
    fail "$CONF exists and was not written by this script: not touching another SLURM"
fi

# --- 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || fail "apt-get not found: install slurm-wlm and munge by hand"
    export DEBIAN_FRONTEND=noninteractive
    log=$(mktemp /tmp/setup_local_slurm.XXXXXX.log)
    if ! apt-get install -y -q slurm-wlm munge >"$log" 2>&1; then
        # a fresh machine often has no package lists yet
        apt-get update -q >>"$log" 2>&1 || fail "apt-get update failed (see $log)"
        apt-get install -y -q slurm-wlm munge >>"$log" 2>&1 \
            || fail "apt-get install slurm-wlm munge failed (see $log)"
    fi
    rm -f "$log"
fi
for tool in slurmctld slurmd munged sbatch srun scontrol sinfo; do
    command -v "$tool" >/dev/null || fail "$tool is missing after installing slurm-wlm and munge"
done

# --- 2. munge
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none \
        || fail "cannot write /etc/munge/munge.key"
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null \
    || fail "no 'munge' user (the munge package should create it)"
chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key && chmod 755 /run/munge
if ! running munged; then
    (runuser -u munge -- munged 2>/dev/null || munged --force) \
        || fail "munged does not start (see /var/log/munge/munged.log)"
fi
for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || fail "munge does not work (munge -n | unmunge)"

# --- 3. slurm.conf (rewritten each time it is ours, so a changed machine is picked up)
host=$(hostname -s)
if ! getent hosts "$host" >/dev/null; then
    # slurmd and slurmctld find each other by this name
    echo "127.0.1.1 $host" >>/etc/hosts 2>/dev/null && getent hosts "$host" >/dev/null \
        || fail "hostname $host does not resolve and /etc/hosts cannot be changed"
    say "added '127.0.1.1 $host' to /etc/hosts (the host name did not resolve)"
fi
# slurmd -C prints this node as slurmd sees it: a config slurmd will not reject.
nodeline=$(slurmd -C 2>/dev/null | grep '^NodeName=' | head -n1)
[ -n "$nodeline" ] || nodeline="NodeName=$host CPUs=$(nproc) RealMemory=1000"
nodeline=$(echo "$nodeline" | sed -E "s/^NodeName=[^ ]+/NodeName=$host/")
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
cat >"$CONF" <<EOF
$MARKER
# A single-node SLURM for tests: no cgroups, no accounting database. Safe to delete.
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# keep finished jobs visible to scontrol for 10 minutes (there is no sacct here)
MinJobAge=600
KillWait=30
$nodeline State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF

# --- 4. daemons
if running slurmctld && running slurmd; then
    scontrol reconfigure >/dev/null 2>&1 || true
else
    running slurmctld || slurmctld || fail "slurmctld does not start (see /var/log/slurm/slurmctld.log)"
    running slurmd || slurmd || fail "slurmd does not start (see /var/log/slurm/slurmd.log)"
fi
state=""
for _ in $(seq $((WAIT_SECONDS * 2))); do
    state=$(node_state)
    case "$state" in
        idle*|mix*|alloc*) say "ready: node $host in partition $PARTITION is $state ($CONF)"; exit 0 ;;
        down*|drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
fail "node $host is '${state:-unknown}' after ${WAIT_SECONDS} s (see /var/log/slurm/slurmd.log)"
