# `make demo` and `make test` each do the whole set-up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

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
	$(VENV)/bin/mypy
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

# Optional, not part of `make test`: one venv per peer library (idempotent; a peer that fails to
# install is recorded in benchmarks/.envs/STATUS and skipped), then the side-by-side tables.
bench: setup
	bash benchmarks/envs.sh
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache runs
