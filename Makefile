# Every target bootstraps .venv on first use; a fresh machine needs only Python >= 3.10 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test lint type bench docs clean

help:
	@echo "make install   create $(VENV) and install fastcheckpoint[dev] in editable mode"
	@echo "make demo      run an agent loop, kill it with SIGKILL, resume it from its checkpoint"
	@echo "make test      run the test suite (PYTEST_ARGS='-k file' to select)"
	@echo "make lint      ruff check"
	@echo "make type      mypy --strict"
	@echo "make bench     quick benchmark run"
	@echo "make docs      build the documentation site into site/"
	@echo "make clean     remove $(VENV), caches, build output and demo data"

# The stamp is rebuilt whenever pyproject.toml changes (new dependency, new extra).
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || { \
		$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
			|| { echo "fastcheckpoint needs Python >= 3.10; point PYTHON at one, e.g. make PYTHON=python3.12 test" >&2; exit 1; }; \
		echo "$(PYTHON) -m venv $(VENV)"; $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -U pip
	$(BIN)/pip install -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python examples/agent_demo.py

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .

type: $(VENV)/.installed
	$(BIN)/mypy

bench: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m benchmarks --quick

docs: $(VENV)/.installed
	$(BIN)/pip install -q mkdocs-material
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) build dist site .mypy_cache .ruff_cache .pytest_cache .hypothesis .fastcheckpoint-demo
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name '*.egg-info' -type d -prune -exec rm -rf {} +
