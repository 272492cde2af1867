# The two set-up commands of the README: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast test-ucx lint docs reference install system-deps

$(BIN)/flexemr: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,bench,ray,parquet,ucx]"
	touch $@

install: $(BIN)/flexemr

demo: install
	$(BIN)/flexemr demo

# Two workers (pytest-xdist), each given whole files: a module's cluster fixture starts once, and one
# worker's tests run while the other's wait on processes and sockets.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

# Debian binaries of a few tests: redis-server (the Redis baselines) and promtool (checks /metrics).
# As root with apt-get (CI, a fresh container) they are installed; otherwise, or if apt-get fails,
# those tests skip and say why.
system-deps:
	@missing=""; for binary in redis-server promtool; do \
	  command -v $$binary >/dev/null || missing="$$missing $$binary"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing redis-server and prometheus (promtool) with apt-get"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends redis-server prometheus >/dev/null; } \
	  || echo "apt-get failed: the tests that need$$missing skip"; \
	elif [ -n "$$missing" ]; then \
	  echo "not installed:$$missing (Debian: apt-get install redis-server prometheus); the tests that need them skip"; \
	fi

test: install system-deps
	$(PYTEST)

# Leaves out the slow multi-process tests (marked `slow`); CI and `make test` run them all.
test-fast: install system-deps
	$(PYTEST) -m "not slow"

# Only the UCX transport's tests (also in `make test`; `make install` has the `ucx` extra: 68 MB of
# wheels, about 260 MB installed, no GPU needed; without it tests/transport/test_ucx*.py skip).
test-ucx: install system-deps
	$(PYTEST) tests/transport/test_ucx.py tests/transport/test_ucx_faults.py tests/transport/test_ucx_stream.py

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

# The docs site (MkDocs, Material theme) into site/, failing on any broken link or anchor.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Rewrites docs/reference/{config,cli}.md from the config dataclasses and the argument parsers.
reference: install
	$(BIN)/python -m flexemr.cli.reference
