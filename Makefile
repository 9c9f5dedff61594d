# Quick start:  make demo   (venv + demo shards + a short real pretraining on CPU -> runs/demo)
#               make test   (venv + the whole test suite)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.stamp

# CPU runs: DeepSpeed's CPU accelerator, no run-time op compiles (gloo replaces the shm op; a torch AdamW
# replaces fused_adam), and Hugging Face never reaches for the network.
RUN_ENV := DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_SKIP_SHM_OP=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
           TOKENIZERS_PARALLELISM=false PATH="$(CURDIR)/$(VENV)/bin:$$PATH"

.PHONY: venv demo simla-demo semmim-demo demo-data ablation finetune-demo simla-finetune-demo test clean-runs

venv: $(STAMP)

# An existing .venv is reused; pip only installs what requirements.txt adds or changes.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

demo-data: $(STAMP)
	$(PY) datasets/demo_data.py --out data/demo

demo: demo-data
	$(RUN_ENV) deepspeed train/pretrain.py --deepspeed_config ds_configs/cpu_demo.json \
		--config train/configs/demo.yaml --output_dir runs/demo
	@echo "run written to runs/demo (metrics.jsonl, eval.json, tensorboard/, checkpoints/)"; cat runs/demo/eval.json

# SIMLA (single-stream BERT; ITA + ITM + XMM + PSL) on the same demo shards -> runs/simla_demo
simla-demo: demo-data
	$(RUN_ENV) deepspeed train/pretrain.py --deepspeed_config ds_configs/cpu_demo.json \
		--config train/configs/simla_demo.yaml --output_dir runs/simla_demo
	@echo "run written to runs/simla_demo"; cat runs/simla_demo/eval.json

# SemMIM (ITC + ITM + MLM + semantics-enhanced cross-modal MIM; our reconstruction) on the demo shards -> runs/semmim_demo
semmim-demo: demo-data
	$(RUN_ENV) deepspeed train/pretrain.py --deepspeed_config ds_configs/cpu_demo.json \
		--config train/configs/semmim_demo.yaml --output_dir runs/semmim_demo
	@echo "run written to runs/semmim_demo"; cat runs/semmim_demo/eval.json

# What MGSC, MLTC and SemMIM add over ITC+ITM+MLM: the demo trained 5 ways x 3 seeds (15 x 80 steps on 2 cores:
# 31 min for the nine without SemMIM on 2026-11-30, ~75 min for the six SemMIM runs on a 3x slower day; README)
# -> runs/ablation (ablation.json, ablation.png, a Markdown table). Finished runs are reused, crashed ones resumed.
ablation: demo-data
	$(RUN_ENV) $(PY) train/ablation.py

# Fine-tuning on every task's demo set, from the `make demo` checkpoint (run first if missing): image retrieval
# (COCO Karpathy layout), video retrieval (MSRVTT layout), VQAv2 (official JSON), NLVR2 (jsonl), SNLI-VE (jsonl),
# RefCOCO+ grounding (ALBEF layout + dets.json), a few epochs each -> runs/finetune_demo
FT := runs/finetune_demo
finetune-demo: $(STAMP)
	test -f runs/demo/checkpoints/latest || $(MAKE) demo
	$(PY) datasets/task_demo.py --out data/demo_tasks
	mkdir -p $(FT)
	$(RUN_ENV) $(PY) train/convert_checkpoint.py to-finetune runs/demo $(FT)/init.safetensors
	$(RUN_ENV) deepspeed train/finetune_retrieval.py --deepspeed_config ds_configs/cpu_demo.json \
		--config train/configs/finetune/demo_coco_retrieval.yaml --init $(FT)/init.safetensors --output_dir $(FT)/coco_retrieval
	$(RUN_ENV) deepspeed train/finetune_video_retrieval.py --deepspeed_config ds_configs/cpu_demo.json \
		--config train/configs/finetune/demo_msrvtt_retrieval.yaml --init $(FT)/init.safetensors --output_dir $(FT)/msrvtt_retrieval
	$(RUN_ENV) deepspeed train/finetune_vqa.py --deepspeed_config ds_configs/cpu_demo.json \
		--config train/configs/finetune/demo_vqa.yaml --init $(FT)/init.safetensors --output_dir $(FT)/vqa
	$(RUN_ENV) deepspeed train/finetune_nlvr2.py --deepspeed_config ds_configs/cpu_demo.json \
		--config train/configs/finetune/demo_nlvr2.yaml --init $(FT)/init.safetensors --output_dir $(FT)/nlvr2
	$(RUN_ENV) deepspeed train/finetune_snli_ve.py --deepspeed_config ds_configs/cpu_demo.json \
		--config train/configs/finetune/demo_snli_ve.yaml --init $(FT)/init.safetensors --output_dir $(FT)/snli_ve
	$(RUN_ENV) deepspeed train/finetune_grounding.py --deepspeed_config ds_configs/cpu_demo.json \
		--config train/configs/finetune/demo_grounding.yaml --init $(FT)/init.safetensors --output_dir $(FT)/grounding
	@for t in coco_retrieval msrvtt_retrieval vqa nlvr2 snli_ve grounding; do \
		echo "== $$t: $(FT)/$$t/eval.json"; cat $(FT)/$$t/eval.json; done

# The same task demos from the `make simla-demo` checkpoint (single-stream BERT; NLVR2 needs the two-image fusion the
# family does not have). The task configs are shared; only the LR multipliers name this family's modules.
SFT := runs/simla_finetune_demo
SIMLA_FT = $(RUN_ENV) deepspeed train/finetune_$(1).py --deepspeed_config ds_configs/cpu_demo.json \
	--config train/configs/finetune/demo_$(2).yaml --init $(SFT)/init.safetensors --output_dir $(SFT)/$(2) \
	"train.lr_multipliers=$(3)"
SIMLA_PAIR_LR := {itm_head.: 5.0, itc.: 5.0}
simla-finetune-demo: $(STAMP)
	test -f runs/simla_demo/checkpoints/latest || $(MAKE) simla-demo
	$(PY) datasets/task_demo.py --out data/demo_tasks
	mkdir -p $(SFT)
	$(RUN_ENV) $(PY) train/convert_checkpoint.py to-finetune runs/simla_demo $(SFT)/init.safetensors
	$(call SIMLA_FT,retrieval,coco_retrieval,$(SIMLA_PAIR_LR))
	$(call SIMLA_FT,video_retrieval,msrvtt_retrieval,$(SIMLA_PAIR_LR))
	$(call SIMLA_FT,vqa,vqa,{head.: 20.0})
	$(call SIMLA_FT,snli_ve,snli_ve,{head.: 20.0})
	$(call SIMLA_FT,grounding,grounding,$(SIMLA_PAIR_LR))
	@for t in coco_retrieval msrvtt_retrieval vqa snli_ve grounding; do \
		echo "== $$t: $(SFT)/$$t/eval.json"; cat $(SFT)/$$t/eval.json; done

test: $(STAMP)
	$(RUN_ENV) $(PY) -m pytest tests -q --durations=15   # the slowest tests, for the CI log

clean-runs:
	rm -rf runs/demo runs/simla_demo runs/semmim_demo runs/finetune_demo runs/simla_finetune_demo
