#!/usr/bin/env bash
# A real one-node SLURM on this machine for the SLURM lane of the tests (tests/test_slurm.py): munge, slurmctld
# and slurmd from Debian's packages, one partition (`debug`) over this node, no GPUs, no accounting database.
#
#   bash .ci/slurm-up.sh          # as root: installs what is missing, writes the config, (re)starts the daemons
#   bash .ci/slurm-down.sh        # cancels every job, stops the daemons by their pid files
#
# Idempotent: a second run stops the daemons it started before (pid files in $WSI_SLURM_DIR) and starts them
# again on a fresh controller state. Why no slurmdbd: the workflow's profile (configs/slurm/config.yaml) asks the
# SLURM executor plugin for its `squeue` status check, which needs only slurmctld keeping finished jobs for
# MinJobAge (300 s); the plugin's `sacct` check misses cancelled jobs (state "CANCELLED by <uid>") and waits
# for them forever, so a site with accounting uses squeue too (README, HPC). Processes are tracked by process
# group (proctrack/pgid): with proctrack/linuxproc, a job's Snakemake reparented to init when scancel ended its
# batch shell escaped SLURM's SIGKILL and lived on; KillWait=10 s bounds how long a cancelled job may linger.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${WSI_SLURM_DIR:-/var/lib/wsi-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by wsi .ci/slurm-up.sh"

if [ "$(id -u)" != 0 ]; then
    echo "slurm-up: run as root (it installs packages and starts munged, slurmctld and slurmd)" >&2
    exit 2
fi
if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "slurm-up: $CONF exists and was not written by this script; refusing to replace a site's SLURM" >&2
    exit 2
fi

# Debian bookworm: SLURM 22.05 and munge 0.5; only what is missing (a second run installs nothing)
missing=()
{ command -v slurmctld && command -v slurmd && command -v sbatch; } >/dev/null || missing+=(slurm-wlm)
command -v munged >/dev/null || missing+=(munge)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

bash .ci/slurm-down.sh --quiet           # whatever a previous run left, stopped by pid first

mkdir -p "$DIR"/{ctld,spool,log,munge}
chown munge:munge "$DIR/munge"
chmod 0755 "$DIR/munge"
[ -s /etc/munge/munge.key ] || { mungekey --create --force && chown munge:munge /etc/munge/munge.key; }
runuser -u munge -- /usr/sbin/munged --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
# the clients (sbatch, srun, slurmd) look for munge's socket at its default place
mkdir -p /run/munge && chown munge:munge /run/munge
ln -sfn "$DIR/munge/munge.socket" /run/munge/munge.socket.2

# This node as slurmd sees it (CPUs, sockets, cores), with less memory than the machine has, so that
# requests beyond a node are refused as on a real cluster (the tests check the workflow says so first).
node=$(slurmd -C | head -n 1)
mem_total=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
real_mem=$(( mem_total * 3 / 4 < 16000 ? mem_total * 3 / 4 : 16000 ))
node=$(sed -E "s/RealMemory=[0-9]+/RealMemory=$real_mem/" <<<"$node")
host=$(hostname -s)
mkdir -p /etc/slurm
cat >"$CONF" <<EOF
$MARK: a one-node test cluster; do not edit by hand
ClusterName=wsi-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/pgid
KillWait=10
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
ReturnToService=2
MpiDefault=none
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

slurmctld -c -i
slurmd
# the node is usable once the controller sees it idle (seconds)
for _ in $(seq 60); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 1
done
if [ "$state" != idle ]; then
    echo "slurm-up: node $host is '${state:-not answering}' after 60 s; see $DIR/log/" >&2
    tail -n 20 "$DIR"/log/*.log >&2 || true
    exit 1
fi
out=$(cd /tmp && timeout 60 srun -N1 -n1 --mem=100 hostname)
echo "slurm-up: cluster wsi-ci up (node $host: ${node#NodeName=}; a test job ran on $out)"
