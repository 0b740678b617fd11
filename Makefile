# aiayn — the two commands a newcomer runs: `make train` and `make test`.
# Both create/refresh the virtual environment first when it is missing or older than pyproject.toml.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

# Generated files (shards, checkpoints, logs, compiled ops) all land under $(AIAYN_OUTPUT_DIR).
export AIAYN_OUTPUT_DIR ?= $(CURDIR)/outputs
export CORPORA_DIR ?= $(abspath $(CURDIR)/../shared/data)
# Ops DeepSpeed compiles on demand (e.g. strategy.cpu_shm_comm=true) are cached per virtual environment.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export WANDB_DIR ?= $(AIAYN_OUTPUT_DIR)
export DS_ACCELERATOR ?= cpu

.PHONY: setup train test lint bench clean

setup: $(STAMP)

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/aiayn train $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=25 -n 2 --dist loadfile $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The peer of bench/vs_fairseq.py, in a venv of its own (about 3 minutes to build once).
FAIRSEQ_VENV ?= $(AIAYN_OUTPUT_DIR)/fairseq-venv

$(FAIRSEQ_VENV)/bin/fairseq-train:
	$(PYTHON) -m venv $(FAIRSEQ_VENV)
	$(FAIRSEQ_VENV)/bin/pip install --quiet --upgrade pip
	$(FAIRSEQ_VENV)/bin/pip install --quiet torch==2.13.0
	$(FAIRSEQ_VENV)/bin/pip install --quiet fairseq-fixed==0.12.3.1

# Issue 6's table, each in bench/<name>.json: training tokens/s side by side with fairseq (ARGS to vs_fairseq.py,
# e.g. "--models small --rounds 2"), beam-4 decoding side by side with fairseq-generate, and where an update's time
# goes (MFU, profile, padding). About an hour on 2 cores, most of it fairseq.
bench: $(STAMP) $(FAIRSEQ_VENV)/bin/fairseq-train
	$(BIN)/python bench/vs_fairseq.py --fairseq-venv $(FAIRSEQ_VENV) $(ARGS)
	$(BIN)/python bench/decode_vs_fairseq.py --fairseq-venv $(FAIRSEQ_VENV)
	$(BIN)/python bench/step_profile.py

clean:
	rm -rf $(VENV) outputs
