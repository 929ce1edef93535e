# `make demo` and `make test` each do the whole set-up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format bench gpu-check clean

setup: $(STAMP)

# The venv sees system site-packages so that a torch the user already has (CUDA, ROCm, a
# nightly) is kept; torch==2.13.0 (CPU) is installed only where no torch is importable.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,cli]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/hypergradients run weight-decay

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

# The one formatter (configured in pyproject.toml); `make test` checks that it has been applied.
format: setup
	$(VENV)/bin/ruff format src tests benchmarks

# Optional, not part of `make test`: one venv per peer library (idempotent; a peer that fails to
# install is recorded in benchmarks/.envs/STATUS and skipped), then the side-by-side tables.
bench: setup
	bash benchmarks/envs.sh
	$(PY) benchmarks/run.py

# Optional, not part of `make test` (its CPU dry run is): every hypergradient method, an LSTM through
# cuDNN, the main job and one round of each experiment's config=full on CUDA against the CPU, under
# 10 minutes on one GPU; a table on stdout and runs/gpu_check.json. Without CUDA it says so and exits 0.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache runs
