# Two commands: `make run` and `make test`. Both create the virtual environment on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint db-up db-down db-reset clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m worker run

test: $(STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check worker tests

db-up: $(STAMP)
	$(BIN)/python -m worker db up

db-down: $(STAMP)
	$(BIN)/python -m worker db down

db-reset: $(STAMP)
	$(BIN)/python -m worker db reset

clean:
	rm -rf $(VENV) .pytest_cache
