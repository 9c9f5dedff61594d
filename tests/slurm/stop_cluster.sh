#!/bin/bash
# Stop what start_cluster.sh ROOT started: cancel every job, wait for them to leave, then the daemons by pid file,
# then any process still carrying this cluster's SLURM_CONF (a job step or slurmstepd that outlived its job).
# Only processes belonging to this ROOT are touched.
ROOT=${1:?usage: stop_cluster.sh ROOT}
export SLURM_CONF="$ROOT/etc/slurm.conf"
if [ -f "$ROOT/run/slurmctld.pid" ] && kill -0 "$(cat "$ROOT/run/slurmctld.pid")" 2>/dev/null; then
  # plain scancel: pending jobs go at once, running ones get TERM then KILL after KillWait
  squeue -h -o %i | sort -u | xargs -r scancel >/dev/null 2>&1 || true
  for _ in $(seq 1 80); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.25; done
fi
for f in "$ROOT"/run/slurmd-*.pid "$ROOT"/run/slurmctld.pid; do
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null && echo "stopped $(basename "$f" .pid) (pid $pid)"
done
# Leftovers: processes whose environment names this cluster's config (job tasks, slurmstepd). gVisor-like sandboxes
# do not reap zombies, so state Z counts as gone.
sleep 0.5
for env in /proc/[0-9]*/environ; do
  pid=${env#/proc/}; pid=${pid%/environ}
  { [ "$pid" = "$$" ] || [ "$pid" = "$PPID" ]; } && continue
  if { tr '\0' '\n' < "$env"; } 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF"; then
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)
    [ -n "$state" ] && [ "$state" != Z ] && kill -9 "$pid" 2>/dev/null && echo "killed leftover pid $pid"
  fi
done
exit 0
