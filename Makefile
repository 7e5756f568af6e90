# dtrain: the two commands of the README, and a few more.
#   make run    set up if needed, then train on the embedded default with 2 ranks under horovodrun
#   make test   set up if needed, then lint, type-check and run the whole test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 2
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test lint unit bench clean

setup:
	@bash launch/setup.sh

run: setup
	@$(PY) -m dtrain --dry-run $(ARGS) > /dev/null  # bad flags: one line and exit 2, before any rank starts
	$(VENV)/bin/horovodrun -np $(NP) -H localhost:$(NP) --gloo $(PY) -m dtrain $(ARGS)

lint: setup
	$(VENV)/bin/ruff check dtrain tests launch benchmarks
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

unit: setup
	$(VENV)/bin/pytest -m unit $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
