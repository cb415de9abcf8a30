# Two commands: `make run` and `make test`. Both create the virtual environment on first use.
# `make types` regenerates types/database.types.ts from the migrations (see README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# postgres-meta (the type generator) and its dependencies, as pinned in package-lock.json.
NODE_STAMP := node_modules/.installed

.PHONY: install run test lint types db-up db-down db-reset clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[local,test]'
	touch $(STAMP)

$(NODE_STAMP): package.json package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund
	touch $(NODE_STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m worker run

test: $(STAMP) $(NODE_STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check worker tests

types: $(STAMP) $(NODE_STAMP)
	$(BIN)/python -m worker.typegen --output types/database.types.ts

db-up: $(STAMP)
	$(BIN)/python -m worker db up

db-down: $(STAMP)
	$(BIN)/python -m worker db down

db-reset: $(STAMP)
	$(BIN)/python -m worker db reset

clean:
	rm -rf $(VENV) .pytest_cache

# Benchmarks on the local stack (see bench/README.md): writes bench/results/report.json and
# report.png. `.venv/bin/python -m bench --quick` is the ~1-minute smoke version.
.PHONY: bench
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet 'procrastinate>=3' matplotlib psutil
	$(BIN)/python -m bench
