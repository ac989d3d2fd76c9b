# Squall: `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv system-deps test lint demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Real peers the integration tests start on loopback (util-linux `logger` for syslog input).
system-deps:
	@command -v logger >/dev/null || { \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bsdutils) \
		|| { echo "cannot install util-linux logger" >&2; exit 1; }; }

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: venv system-deps lint
	$(BIN)/pytest -q -p no:cacheprovider

demo: venv
	$(BIN)/squall demo

bench: venv
	@set -e; for b in bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
