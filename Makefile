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

.PHONY: venv demo demo-data ablation test clean-runs

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

# What MGSC and MLTC add over ITC+ITM+MLM: the demo trained 3 ways x 3 seeds (9 x 80 steps, ~40 min on 2 cores)
# -> runs/ablation (ablation.json, ablation.png, a Markdown table). Finished runs are reused, crashed ones resumed.
ablation: demo-data
	$(RUN_ENV) $(PY) train/ablation.py

test: $(STAMP)
	$(RUN_ENV) $(PY) -m pytest tests -q

clean-runs:
	rm -rf runs/demo
