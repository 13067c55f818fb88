# ppml: `make run` serves on the embedded default; `make test` runs every check CI runs.
SHELL := /bin/bash
# pyproject.toml requires Python 3.11 exactly: python3.11 when it is on the PATH.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || echo python3)
VENV := .venv
BIN := $(VENV)/bin
# `make run` installs the runtime dependencies only; the dev tools come with `make test`.
RUNTIME_STAMP := $(VENV)/.runtime-stamp
DEV_STAMP := $(VENV)/.dev-stamp
# Where torch comes from. Empty: PyPI, whose Linux wheel pulls the CUDA libraries (GBs);
# CPU-only Linux: make run TORCH_INDEX=https://download.pytorch.org/whl/cpu (docs/operations.md, "Installing PyTorch").
TORCH_INDEX ?=
TORCH_PIN := $(shell sed -n 's/^ *"\(torch==[^"]*\)".*/\1/p' pyproject.toml)
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-dev python-version run worker services browser lint typecheck test \
	bench openapi clean

install: $(RUNTIME_STAMP)

install-dev: $(DEV_STAMP)

# Checks the interpreter that makes the virtualenv, and the virtualenv's own (an old .venv).
python-version:
	@for py in $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)); do \
	  if ! "$$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then \
	    echo "ppml needs Python 3.11 (pyproject.toml: requires-python >=3.11,<3.12);" \
	      "$$py is $$("$$py" -V 2>/dev/null || echo "not found")." >&2; \
	    echo "Install Python 3.11 (e.g. apt install python3.11-venv, or pyenv) and run" \
	      "make PYTHON=/path/to/python3.11 ..., after rm -rf $(VENV) if it was made by another" \
	      "version." >&2; \
	    exit 1; \
	  fi; \
	done

$(RUNTIME_STAMP): pyproject.toml | python-version
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install -q --index-url $(TORCH_INDEX) '$(TORCH_PIN)')
	$(BIN)/python -m pip install -q -e .
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

run: install
	@echo "Starting ppml on http://$(HOST):$(PORT) (API + embedded worker, SQLite, serverless broker)."
	@echo "Admin token: \$$PPML_ADMIN_TOKEN if set, else generated into ./.ppml/admin_token"
	$(BIN)/ppml serve --host $(HOST) --port $(PORT)

worker: install
	$(BIN)/ppml worker

# Start the local PostgreSQL and Redis the integration tests use, when they are down.
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
	@for i in $$(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && exit 0; sleep 1; done; echo "PostgreSQL or Redis did not come up" >&2; exit 1

# The browser tests drive Debian's chromium (Playwright's own download is not used).
browser:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install-dev
	$(BIN)/mypy

test: install-dev services browser lint typecheck
	# pytest exits 5 when it collected no tests: that is a failure too.
	# Two workers (the CI machines have two cores); a module stays on one worker, so its
	# module-scoped fixtures (a trained model, a server) are built once.
	$(BIN)/pytest -q -n 2 --dist loadfile; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Each benchmark prints a table and writes JSON under bench/results/ (several minutes in all).
bench: install services
	$(BIN)/python bench/admission.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/predict.py
	$(BIN)/python bench/dp_step.py
	$(BIN)/python bench/federated_round.py

openapi: install
	$(BIN)/python -m api.openapi > openapi.json

clean:
	rm -rf $(VENV) .ppml .pytest_cache .mypy_cache .ruff_cache .hypothesis
