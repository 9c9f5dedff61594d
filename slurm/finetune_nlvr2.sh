#!/bin/bash
# Fine-tune on NLVR2: train/finetune_nlvr2.py under SLURM, with pretraining's launch, rendezvous, logging,
# preemption and requeue (slurm/common.sh; its header has submission examples and the signal/requeue behaviour).
#
#   INIT=pretrained.safetensors [CONFIG=... DS_CONFIG=... OUTPUT_DIR=...] sbatch [--nodes=N --gpus-per-node=G \
#       --ntasks-per-node=G] slurm/finetune_nlvr2.sh [dotted.key=value ...]
#
# INIT: `python train/convert_checkpoint.py to-finetune RUN OUT.safetensors` output (or a DeepSpeed run dir); it is
# read by every requeued run too, but a run that has checkpoints resumes from them instead. Add --eval_only to
# evaluate INIT without training.
#SBATCH --job-name=glscl-ft-nlvr2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%x-%j.out

CONFIG=${CONFIG:-train/configs/finetune/nlvr2.yaml}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2_bf16.json}
OUTPUT_DIR=${OUTPUT_DIR:-runs/$(basename "$CONFIG" .yaml)}

GLSCL_REPO=${GLSCL_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/common.sh
source "$GLSCL_REPO/slurm/common.sh" || { echo "error: $GLSCL_REPO/slurm/common.sh not found (submit from the repo root)" >&2; exit 2; }

glscl_launch train/finetune_nlvr2.py "$OUTPUT_DIR" \
    --deepspeed_config "$DS_CONFIG" --config "$CONFIG" --output_dir "$OUTPUT_DIR" ${INIT:+--init "$INIT"} "$@"
