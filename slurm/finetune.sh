#!/bin/bash
# TEMPLATE for the per-task fine-tuning scripts (copy to slurm/finetune_<task>.sh and fill in the three FILL-IN
# lines). Launch, rendezvous, logging, preemption and requeue are shared with slurm/pretrain.sh (slurm/common.sh);
# read the header there for submission examples and the signal/requeue behaviour.
#
#   CONFIG=... DS_CONFIG=... OUTPUT_DIR=... sbatch [--nodes=N --gpus-per-node=G --ntasks-per-node=G] \
#       slurm/finetune_<task>.sh [dotted.key=value ...]
#
# Contract for TASK_SCRIPT (what train/pretrain.py does): accepts --deepspeed_config/--config/--output_dir plus
# overrides; reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* (train/distributed.py); resumes from
# OUTPUT_DIR/checkpoints/latest; on SIGUSR1/SIGTERM saves on all ranks and exits 75; exits 0 when done.
#SBATCH --job-name=glscl-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%x-%j.out

TASK_SCRIPT=${TASK_SCRIPT:-train/finetune_TASK.py}               # FILL-IN: the task's entry point
CONFIG=${CONFIG:-train/configs/finetune_TASK.yaml}               # FILL-IN: its default run config
DS_CONFIG=${DS_CONFIG:-ds_configs/zero1_bf16.json}               # FILL-IN: its default DeepSpeed config
OUTPUT_DIR=${OUTPUT_DIR:-runs/$(basename "$CONFIG" .yaml)}

GLSCL_REPO=${GLSCL_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/common.sh
source "$GLSCL_REPO/slurm/common.sh" || { echo "error: $GLSCL_REPO/slurm/common.sh not found (submit from the repo root)" >&2; exit 2; }

glscl_launch "$TASK_SCRIPT" "$OUTPUT_DIR" \
    --deepspeed_config "$DS_CONFIG" --config "$CONFIG" --output_dir "$OUTPUT_DIR" "$@"
