# Two commands for a newcomer: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch==2.13.0 CPU build lies in /opt/wheels on the dev machines; elsewhere pip takes it from PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: setup run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(FIND_LINKS) -e '.[test]'
	touch $(STAMP)

# Embedded defaults: SQLite, SQLAlchemy broker on SQLite, file store under ./var.
# Migrates, registers the demo generator, serves the API with one worker, and runs a
# real dome-to-spire edit through the API (see `palimpsest up --help`).
run: setup
	$(BIN)/palimpsest up

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var
