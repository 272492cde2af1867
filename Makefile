# The two set-up commands of the README: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint docs reference install

$(BIN)/flexemr: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,bench,ray,parquet]"
	touch $@

install: $(BIN)/flexemr

demo: install
	$(BIN)/flexemr demo

# Two workers (pytest-xdist), each given whole files: a module's cluster fixture starts once, and one
# worker's tests run while the other's wait on processes and sockets.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: install
	$(PYTEST)

# Leaves out the slow multi-process tests (marked `slow`); CI and `make test` run them all.
test-fast: install
	$(PYTEST) -m "not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

# The docs site (MkDocs, Material theme) into site/, failing on any broken link or anchor.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Rewrites docs/reference/{config,cli}.md from the config dataclasses and the argument parsers.
reference: install
	$(BIN)/python -m flexemr.cli.reference
