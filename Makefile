# Every target bootstraps its virtualenv on first use; a fresh machine needs only
# Python >= 3.10 and make. `make demo` uses .venv-demo with the library alone (anyio, msgspec);
# every other target uses .venv with the [dev] extra.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_VENV ?= .venv-demo
PYTEST_ARGS ?=
# pytest-xdist workers for make test (0 runs the suite in this process, in order).
TEST_WORKERS ?= 2
DEMO_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test lint type soak bench docs clean

help:
	@echo "make install   create $(VENV) and install fastcheckpoint[dev] in editable mode"
	@echo "make demo      run an agent loop, kill it with SIGKILL, resume it from its checkpoint"
	@echo "               (in $(DEMO_VENV), which holds the library and nothing else)"
	@echo "make test      run the test suite on TEST_WORKERS=2 processes (PYTEST_ARGS='-k file'"
	@echo "               to select, TEST_WORKERS=0 for one process)"
	@echo "make lint      ruff check"
	@echo "make type      mypy --strict"
	@echo "make soak      the reliability suite at ten times its size (about 10 minutes)"
	@echo "make bench     quick benchmark run"
	@echo "make docs      build the documentation site into site/"
	@echo "make clean     remove $(VENV), $(DEMO_VENV), caches, build output and demo data"

# $(call new-venv,DIR): create the virtualenv DIR unless it exists, after checking $(PYTHON).
define new-venv
@test -x $(1)/bin/python || { \
		$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
			|| { echo "fastcheckpoint needs Python >= 3.10; point PYTHON at one, e.g. make PYTHON=python3.12 $(or $(MAKECMDGOALS),test)" >&2; exit 1; }; \
		echo "$(PYTHON) -m venv $(1)"; $(PYTHON) -m venv $(1); }
endef

# The stamps are rebuilt whenever pyproject.toml changes (new dependency, new extra).
$(VENV)/.installed: pyproject.toml
	$(call new-venv,$(VENV))
	$(BIN)/python -m pip install -U pip
	$(BIN)/pip install -e '.[dev]'
	@touch $@

# Editable, so the demo always runs the code in this checkout.
$(DEMO_VENV)/.installed: pyproject.toml
	$(call new-venv,$(DEMO_VENV))
	$(DEMO_VENV)/bin/python -m pip install -e .
	@touch $@

install: $(VENV)/.installed

demo: $(DEMO_VENV)/.installed
	$(DEMO_VENV)/bin/python examples/agent_demo.py $(DEMO_ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .

type: $(VENV)/.installed
	$(BIN)/mypy

soak: $(VENV)/.installed
	FC_RELIABILITY_SCALE=10 $(BIN)/python -m pytest tests/reliability -q

bench: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m benchmarks --quick

docs: $(VENV)/.installed
	$(BIN)/pip install -q mkdocs-material 'mkdocstrings[python]'
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) $(DEMO_VENV) build dist site .mypy_cache .ruff_cache .pytest_cache .hypothesis .fastcheckpoint-demo
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name '*.egg-info' -type d -prune -exec rm -rf {} +
