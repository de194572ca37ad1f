# Everything a fresh machine needs: `make pipeline` runs the main job, `make test` runs the tests.
# Each target creates the virtual environment in $(VENV) and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
SYSPY ?= python3
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup pipeline test test-fast lint format bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(SYSPY) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

pipeline: setup
	$(VENV)/bin/rlhfkit pipeline --output runs/pipeline

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy src/rlhfkit

test: lint
	$(PY) -m pytest -q

# the suite without the slow, browser and multi-process tests (under a minute)
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not browser and not distributed"

format: setup
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

bench: setup
	$(PY) bench/side_by_side.py
