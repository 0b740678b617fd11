# aiayn — the two commands a newcomer runs: `make train` and `make test`.
# Both create/refresh the virtual environment first when it is missing or older than pyproject.toml.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=

# `make setup`: torch first (the build below), then this project with the exact versions of constraints.txt (pip -c;
# pyproject.toml itself declares ranges, so that `pip install .` fits into an existing environment and its torch).
CONSTRAINTS := constraints.txt

# The torch build `make setup` installs. auto: cu128 where `nvidia-smi -L` lists a GPU, else cpu. cpu: the pin as
# pip's configuration resolves it (on the development host a local +cpu wheel). A CUDA tag of PyTorch's wheel index
# (cu126, cu128, ...): that build from https://download.pytorch.org/whl/<tag>, e.g. `make setup TORCH=cu126`.
# The stamp names version and build, so choosing another build reinstalls torch.
TORCH ?= auto
TORCH_VERSION := 2.13.0
# (the torch== line of constraints.txt: tests/test_install.py checks that the two agree)
ifeq ($(TORCH),auto)
  TORCH_BUILD := $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU ' && echo cu128 || echo cpu)
  TORCH_WHY := TORCH=auto and nvidia-smi -L lists $(if $(filter cpu,$(TORCH_BUILD)),no GPU,a GPU)
else
  TORCH_BUILD := $(TORCH)
  TORCH_WHY := TORCH=$(TORCH) given
endif
ifeq ($(TORCH_BUILD),cpu)
  TORCH_INSTALL = $(BIN)/pip install --quiet torch==$(TORCH_VERSION)
else
  TORCH_INSTALL = $(BIN)/pip install --quiet --index-url https://download.pytorch.org/whl/$(TORCH_BUILD) \
	torch==$(TORCH_VERSION)+$(TORCH_BUILD)
endif
STAMP := $(VENV)/.installed-torch-$(TORCH_VERSION)-$(TORCH_BUILD)
# A venv set up for another build: its torch goes first (a +cu wheel would otherwise satisfy the cpu pin).
OTHER_STAMPS = $(filter-out $(STAMP),$(wildcard $(VENV)/.installed-torch-*))

# Generated files (shards, checkpoints, logs, compiled ops) all land under $(AIAYN_OUTPUT_DIR).
export AIAYN_OUTPUT_DIR ?= $(CURDIR)/outputs
export CORPORA_DIR ?= $(abspath $(CURDIR)/../shared/data)
# Ops DeepSpeed compiles on demand (e.g. strategy.cpu_shm_comm=true) are cached per virtual environment.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export WANDB_DIR ?= $(AIAYN_OUTPUT_DIR)

.PHONY: setup train test lint bench bench-gpu clean constraints

setup: $(STAMP)

# torch first, pinned to the chosen build (TORCH above), so that the project's dependencies do not pick one.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@echo "make setup: torch $(TORCH_VERSION), $(TORCH_BUILD) build ($(TORCH_WHY); TORCH=cpu|cu126|cu128 chooses)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(OTHER_STAMPS),$(BIN)/pip uninstall --quiet --yes torch && rm -f $(OTHER_STAMPS))
	$(TORCH_INSTALL)
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
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
	$(FAIRSEQ_VENV)/bin/pip install --quiet torch==$(TORCH_VERSION)
	$(FAIRSEQ_VENV)/bin/pip install --quiet fairseq-fixed==0.12.3.1

# Issue 6's table, each in bench/<name>.json: training tokens/s side by side with fairseq (ARGS to vs_fairseq.py,
# e.g. "--models small --rounds 2"), beam-4 decoding side by side with fairseq-generate, and where an update's time
# goes (MFU, profile, padding). About an hour on 2 cores, most of it fairseq.
bench: $(STAMP) $(FAIRSEQ_VENV)/bin/fairseq-train
	$(BIN)/python bench/vs_fairseq.py --fairseq-venv $(FAIRSEQ_VENV) $(ARGS)
	$(BIN)/python bench/decode_vs_fairseq.py --fairseq-venv $(FAIRSEQ_VENV)
	$(BIN)/python bench/step_profile.py

# Issue 17's GPU step: this project's training step (compiled, eager, plain kernels), a plain torch.nn.Transformer peer
# and a short `aiayn train`, base and big, tokens/s, MFU and memory -> bench/gpu_step.json. Needs a CUDA GPU.
bench-gpu: $(STAMP)
	$(BIN)/python bench/gpu_step.py $(ARGS)

# constraints.txt again from the venv, after a dependency in pyproject.toml changed and `make setup` installed it.
constraints: $(STAMP)
	$(BIN)/python scripts/constraints.py

clean:
	rm -rf $(VENV) outputs
