# ppml: `make run` serves on the embedded default; `make test` runs every check CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run worker services lint typecheck test bench openapi clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml (CPU build here; see README for GPUs).
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

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

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

test: install services lint typecheck
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
