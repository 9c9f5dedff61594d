#!/bin/bash
# Start a throwaway SLURM cluster of two "nodes" on 127.0.0.1 for the tests (Debian slurm-wlm 22.05).
#   usage: start_cluster.sh ROOT          (ports from CTLD_PORT, NODE1_PORT, NODE2_PORT; defaults 16817/17001/17002)
# Everything (config, state, logs, pid files) lives under ROOT; stop_cluster.sh ROOT stops the daemons by pid.
# auth/none + cred/none: no munge daemon needed. Two slurmd with -N node1/node2 so the node names never depend
# on this machine's hostname. Clients find the cluster through SLURM_CONF=ROOT/etc/slurm.conf only.
set -euo pipefail
ROOT=${1:?usage: start_cluster.sh ROOT}
CTLD_PORT=${CTLD_PORT:-16817}
NODE1_PORT=${NODE1_PORT:-17001}
NODE2_PORT=${NODE2_PORT:-17002}
NCPU=$(nproc)
MEM_MB=$(( $(awk '/^MemTotal:/{print $2}' /proc/meminfo) / 1024 / 4 ))   # per fake node; must be <= real memory
mkdir -p "$ROOT"/{etc,state,spool/node1,spool/node2,log,run}
cat > "$ROOT/etc/slurm.conf" <<CONF
ClusterName=glscltest
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$NODE1_PORT CPUs=$NCPU RealMemory=$MEM_MB State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$NODE2_PORT CPUs=$NCPU RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$ROOT/etc/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N node1
slurmd -f "$SLURM_CONF" -N node2
for _ in $(seq 1 120); do
  if [ "$(sinfo -h -t idle -o '%D' 2>/dev/null)" = 2 ]; then echo "SLURM up: SLURM_CONF=$SLURM_CONF"; exit 0; fi
  sleep 0.25
done
echo "SLURM did not come up within 30 s; logs in $ROOT/log" >&2
exit 1
