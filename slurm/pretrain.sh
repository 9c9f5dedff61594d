#!/bin/bash
# GLSCL pretraining on SLURM: one task per GPU on N nodes, launched by srun (no pdsh/ssh), checkpoint + requeue
# before the time limit, resume from the latest checkpoint after a requeue.
#
# Submit from the repo root, with the venv active (or PYTHON=/path/to/venv/bin/python):
#   sbatch slurm/pretrain.sh
#   CONFIG=train/configs/glscl_14m.yaml DS_CONFIG=ds_configs/zero2_bf16.json OUTPUT_DIR=runs/glscl_14m \
#       sbatch --nodes=4 --gpus-per-node=4 --ntasks-per-node=4 --time=12:00:00 slurm/pretrain.sh train.lr=2e-4
# - Environment: CONFIG (run YAML), DS_CONFIG (DeepSpeed JSON), OUTPUT_DIR (default runs/<config name>; logs go to
#   OUTPUT_DIR/slurm-<jobid>.out), PYTHON, MAX_REQUEUES, TASK_EXIT_WAIT (see slurm/common.sh).
# - Arguments after the script go to train/pretrain.py unchanged: dotted overrides, --max_steps N.
# - sbatch flags on the command line win over the #SBATCH lines below: --nodes, --gpus-per-node, --time,
#   --partition, --account ... Keep --ntasks-per-node equal to the GPUs per node (checked at start).
#   On a machine without GPUs (CPU runs, tests) use --gpus-per-node=0 and DS_ACCELERATOR=cpu.
#
# Preemption / time limit: SLURM sends SIGUSR1 to this batch shell 5 minutes before the limit (--signal=B:USR1@300;
# raise it if a checkpoint takes longer to write). The shell forwards it to srun, every rank finishes its step, the
# stop is agreed across ranks, all ranks write the checkpoint, python exits 75, and the job runs
# `scontrol requeue` on itself; the requeued job (same id, log appended) resumes at the same step and data position.
# By hand: `scancel --batch --signal=USR1 <jobid>`. SIGTERM (scancel, preemption) also saves when the step ends
# within SLURM's KillWait/GraceTime, but does not requeue. A crash (any other status) never requeues.
#SBATCH --job-name=glscl-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%x-%j.out

CONFIG=${CONFIG:-train/configs/glscl_4m.yaml}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2_bf16.json}
OUTPUT_DIR=${OUTPUT_DIR:-runs/$(basename "$CONFIG" .yaml)}

GLSCL_REPO=${GLSCL_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/common.sh
source "$GLSCL_REPO/slurm/common.sh" || { echo "error: $GLSCL_REPO/slurm/common.sh not found (submit from the repo root)" >&2; exit 2; }

glscl_launch train/pretrain.py "$OUTPUT_DIR" \
    --deepspeed_config "$DS_CONFIG" --config "$CONFIG" --output_dir "$OUTPUT_DIR" "$@"
