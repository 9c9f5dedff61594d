# shellcheck shell=bash
# Launch logic shared by slurm/pretrain.sh and the slurm/finetune_<task>.sh scripts (sourced from the batch script, not run).
#
#   glscl_launch TRAIN_SCRIPT OUTPUT_DIR [ARGS...]
#
# 1. Log to OUTPUT_DIR/slurm-<jobid>.out (appended across requeues: the job id does not change).
# 2. Rendezvous: MASTER_ADDR = address of the allocation's first node, MASTER_PORT = 20000 + jobid % 20000,
#    WORLD_SIZE = SLURM_NTASKS; per task RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID (DeepSpeed's
#    init_distributed reads only these names, never SLURM's).
# 3. `srun` one python process per task on every node (no pdsh/ssh), in the background, so the batch shell's
#    traps run while training does.
# 4. Signals to the batch shell (`--signal=B:USR1@T`, `scancel --batch -s USR1`, SIGTERM) are forwarded to srun
#    as SIGUSR1; srun hands it to every task on every node. The trainer agrees on the stop across ranks, finishes
#    the step, saves a checkpoint on all ranks and exits with status 75 (GLSCL_EXIT_STOPPED).
# 5. Exit status of the tasks: 0 = finished -> job ends; 75 = stopped after a save -> `scontrol requeue` when the
#    stop came from SIGUSR1, a new checkpoint was written during this job, and fewer than MAX_REQUEUES restarts
#    happened; anything else (2 = bad config or input, 3 = diverged, other = crash) -> the job fails and is NOT
#    requeued.
#    After SIGTERM (scancel, or preemption without a user signal) the job is not requeued by us: scancel means stop,
#    and a preempting SLURM with PreemptMode=REQUEUE requeues the job itself.
#
# Tunables (environment at submission; sbatch exports it): PYTHON (default: python on PATH), MAX_REQUEUES
# (default 100), TASK_EXIT_WAIT (seconds srun waits for the other tasks once one has exited before killing them,
# so a crashed rank does not leave the others blocked in a collective; default 300), GLSCL_REPO (repo root;
# default: the directory sbatch was run from).

GLSCL_EXIT_STOPPED=75   # EX_TEMPFAIL: "try again later"; must match train/pretrain.py

glscl_log() { echo "[$(date -u +%Y-%m-%dT%H:%M:%SZ) glscl-slurm] $*"; }
glscl_die() { echo "[glscl-slurm] error: $*" >&2; exit 2; }

_glscl_on_signal() {   # $1 = USR1 | TERM
    GLSCL_TRAPPED=1
    if [ "$1" = TERM ]; then GLSCL_GOT_TERM=1; fi
    GLSCL_STOP=${GLSCL_STOP:-$1}
    if [ -n "${GLSCL_SRUN_PID:-}" ]; then
        glscl_log "batch shell got SIG$1: forwarding SIGUSR1 to srun (pid $GLSCL_SRUN_PID) -> every task saves and stops"
        kill -USR1 "$GLSCL_SRUN_PID" 2>/dev/null
    else
        glscl_log "batch shell got SIG$1 before the tasks started"
    fi
}

_glscl_latest() { cat "$1/checkpoints/latest" 2>/dev/null || true; }

glscl_launch() {
    local script=${1:?glscl_launch TRAIN_SCRIPT OUTPUT_DIR [ARGS...]} out=${2:?glscl_launch: OUTPUT_DIR missing}
    shift 2
    [ -n "${SLURM_JOB_ID:-}" ] || glscl_die "no SLURM_JOB_ID: submit this script with sbatch"
    GLSCL_REPO=${GLSCL_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$GLSCL_REPO" || glscl_die "cannot cd to GLSCL_REPO=$GLSCL_REPO"
    [ -f "$script" ] || glscl_die "$GLSCL_REPO/$script not found (submit from the repo root, or set GLSCL_REPO)"
    PYTHON=${PYTHON:-python}
    command -v "$PYTHON" >/dev/null || glscl_die "PYTHON=$PYTHON not found (activate the venv or set PYTHON=...)"
    MAX_REQUEUES=${MAX_REQUEUES:-100}
    TASK_EXIT_WAIT=${TASK_EXIT_WAIT:-300}

    mkdir -p "$out" || glscl_die "cannot create OUTPUT_DIR=$out"
    local log="$out/slurm-$SLURM_JOB_ID.out"
    echo "[glscl-slurm] job $SLURM_JOB_ID: log continues in $log"
    exec >>"$log" 2>&1

    # One task per GPU: each task sees all of its node's GPUs and picks LOCAL_RANK (train/distributed.py).
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ -n "${SLURM_NTASKS_PER_NODE:-}" ] \
            && [ "$SLURM_GPUS_ON_NODE" != "$SLURM_NTASKS_PER_NODE" ]; then
        glscl_die "--ntasks-per-node=$SLURM_NTASKS_PER_NODE but $SLURM_GPUS_ON_NODE GPUs per node; use one task per GPU"
    fi

    local first addr
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    # NodeAddr is the node's name on most clusters, an IP where names do not resolve (e.g. the test cluster).
    addr=$(scontrol show node "$first" -o 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    export MASTER_ADDR=${addr:-$first}
    export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
    export WORLD_SIZE=$SLURM_NTASKS
    unset RANK LOCAL_RANK   # set per task below; values exported from the submitting shell would be wrong
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

    local before restarts=${SLURM_RESTART_COUNT:-0}
    before=$(_glscl_latest "$out")
    glscl_log "job $SLURM_JOB_ID restart $restarts: $SLURM_NNODES node(s) [$SLURM_JOB_NODELIST], $SLURM_NTASKS task(s)," \
              "rendezvous $MASTER_ADDR:$MASTER_PORT, latest checkpoint: ${before:-none}"
    glscl_log "command: $PYTHON -u $script $*"

    GLSCL_STOP="" GLSCL_GOT_TERM="" GLSCL_SRUN_PID="" GLSCL_TRAPPED=0
    trap '_glscl_on_signal USR1' USR1
    trap '_glscl_on_signal TERM' TERM
    # bash -c maps SLURM's per-task ids (known only inside the task) and then execs python, so signals from
    # srun/slurmstepd reach the trainer itself.
    # shellcheck disable=SC2016   # expanded by the task's bash, not here
    srun --kill-on-bad-exit=0 --wait="$TASK_EXIT_WAIT" --export=ALL bash -c '
        export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
        echo "[glscl-slurm] task rank $RANK/$WORLD_SIZE local $LOCAL_RANK on ${SLURMD_NODENAME:-$(hostname)}"
        exec "$@"' glscl-task "$PYTHON" -u "$script" "$@" &
    GLSCL_SRUN_PID=$!
    if [ -n "$GLSCL_STOP" ]; then kill -USR1 "$GLSCL_SRUN_PID" 2>/dev/null; fi
    local rc
    while :; do   # a trapped signal interrupts `wait`; keep waiting for srun itself
        GLSCL_TRAPPED=0
        wait "$GLSCL_SRUN_PID"
        rc=$?
        [ "$GLSCL_TRAPPED" = 1 ] || break
    done
    trap - USR1 TERM

    local after
    after=$(_glscl_latest "$out")
    if [ "$rc" = 0 ]; then
        glscl_log "training finished (latest checkpoint: ${after:-none})"
        exit 0
    fi
    if [ "$rc" != "$GLSCL_EXIT_STOPPED" ]; then
        glscl_log "training exited with status $rc: crash, not requeueing (latest checkpoint: ${after:-none})"
        exit "$rc"
    fi
    glscl_log "training stopped after saving (latest checkpoint: ${after:-none}; signal: ${GLSCL_STOP:-USR1 to the tasks})"
    if [ -n "$GLSCL_GOT_TERM" ]; then
        glscl_log "SIGTERM (scancel or preemption): not requeueing ourselves; resubmit to resume from ${after:-scratch}"
        exit "$rc"
    fi
    if [ -z "$after" ] || [ "$after" = "$before" ]; then
        glscl_log "no new checkpoint during this job: not requeueing (that could loop); the signal lead time" \
                  "may exceed the time the job needs to reach its first step"
        exit "$rc"
    fi
    if [ "$restarts" -ge "$MAX_REQUEUES" ]; then
        glscl_log "already requeued $restarts times (MAX_REQUEUES=$MAX_REQUEUES): not requeueing"
        exit "$rc"
    fi
    glscl_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1))); it resumes from $after"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        glscl_log "scontrol requeue failed (job submitted with --no-requeue?): resubmit to resume from $after"
        exit "$rc"
    fi
    exit 0
}
