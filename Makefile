# make help: list targets. Every target creates .venv first if it is missing.
PY      := .venv/bin/python
VENV_OK := .venv/.installed

.DEFAULT_GOAL := help
.PHONY: help install smoke train test test-fast lint format bench tensorboard clean clean-logs

help: ## show this help
	@awk 'BEGIN{FS=":.*## "} /^[a-zA-Z_-]+:.*## /{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV_OK): pyproject.toml
	python3 -m venv .venv
	# torch first, pinned to the CPU wheel on local disk; the rest must not pull another torch
	.venv/bin/pip install -q "torch==2.13.0" || .venv/bin/pip install -q "torch>=2.4,<2.15"
	.venv/bin/pip install -q -e ".[dev]"
	# encodec without its deps: it requires torchaudio, which pulls a CUDA torch; its model code needs only
	# torch, einops and numpy (mmsuite.tokenizers.audio.import_encodec covers the missing torchaudio)
	.venv/bin/pip install -q --no-deps "encodec==0.1.1"
	touch $(VENV_OK)

install: $(VENV_OK) ## create .venv and install mmsuite with its dev tools

smoke: $(VENV_OK) ## one-minute first run: m4_pose at its smoke sizes, building the tiny data and tokenizer it lacks
	$(PY) train.py experiment=m4_pose debug=smoke $(ARGS)

train: $(VENV_OK) ## the main job: m4_pose (builds the toy world, image tokenizer and pair shards it lacks; ARGS=...)
	$(PY) train.py experiment=m4_pose $(ARGS)

test: $(VENV_OK) ## all tests (unit + CLI)
	$(PY) -m pytest tests -q -n 2 --dist loadfile $(ARGS)

test-fast: $(VENV_OK) ## unit tests only
	$(PY) -m pytest tests/unit -q $(ARGS)

lint: $(VENV_OK) ## ruff lint + format check
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: $(VENV_OK) ## ruff format + autofix
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

bench: $(VENV_OK) ## benchmarks -> benchmarks/results/*.json + a table
	$(PY) -m benchmarks.run $(ARGS)

tensorboard: $(VENV_OK) ## tensorboard over logs/
	.venv/bin/tensorboard --logdir logs

clean-logs: ## delete logs/
	rm -rf logs

clean: ## delete .venv, caches, logs and data
	rm -rf .venv .pytest_cache .ruff_cache logs data
