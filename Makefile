# lorastack: `make run` serves on the embedded default; `make test` runs lint, types and the suite.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3
TORCH_VERSION := 2.13.0
PYTEST_ARGS ?=

.PHONY: install run test lint typecheck fmt migrate openapi bench clean

# Reinstall only when pyproject.toml changes, so a second `make run`/`make test` starts fast.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (torch pinned to $(TORCH_VERSION): never a CUDA download here)"
	$(PY) -m pip install -q --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[worker,dev]'
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/lorastack serve $(ARGS)

test: install lint typecheck
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check lorafile lorastack service workers tests bench migrations examples
	$(VENV)/bin/ruff format --check lorafile lorastack service workers tests bench migrations examples

typecheck: install
	$(VENV)/bin/mypy

fmt: install
	$(VENV)/bin/ruff check --fix lorafile lorastack service workers tests bench migrations examples
	$(VENV)/bin/ruff format lorafile lorastack service workers tests bench migrations examples

migrate: install
	$(VENV)/bin/lorastack migrate

openapi: install
	$(PY) -m service.openapi > openapi/openapi.json

bench: install
	@for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
