# Set-up and entry points. `make train` and `make test` are the README's two commands: each one
# creates .venv on a fresh machine with scripts/install.sh (torch at its pin, DeepSpeed built
# against it without build isolation, the project editable with the dev extras; the Dockerfile
# runs the same script) and then does its job.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/tiny.yaml
PYTEST_ARGS ?=

.PHONY: install train test lint clean

$(BIN)/.installed: pyproject.toml Makefile scripts/install.sh
	$(PYTHON) -m venv $(VENV)
	scripts/install.sh $(BIN)/python --editable --extras dev  # dev pulls [train,k8s]: everything
	touch $@

install: $(BIN)/.installed

train: $(BIN)/.installed
	$(BIN)/mla train $(CONFIG)

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff (format check over the tree, lint on the product code) and mypy (configured in
# pyproject.toml); `make test` runs it first. `ruff format .` fixes the formatting.
lint: $(BIN)/.installed
	$(BIN)/ruff format --check --quiet mla workers orchestrator benchmarks tests
	$(BIN)/ruff check --quiet mla workers orchestrator benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs
