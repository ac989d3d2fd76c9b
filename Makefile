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

# Real peers the integration tests start on loopback: util-linux `logger` (syslog input),
# rsyslog (syslog forwarding), Alertmanager (alerts), nats-server (scale-out), iproute2 and
# ethtool (the packet-level bridge between namespaces).
SYSTEM_TOOLS := logger:bsdutils rsyslogd:rsyslog prometheus-alertmanager:prometheus-alertmanager \
	nats-server:nats-server ip:iproute2 ethtool:ethtool
system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do \
		command -v $${t%%:*} >/dev/null || PATH="$$PATH:/usr/sbin:/sbin" command -v $${t%%:*} >/dev/null \
			|| missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			-o Dpkg::Options::=--force-confold $$missing >/dev/null) \
		|| { echo "cannot install:$$missing (needs root and the Debian archive)" >&2; exit 1; }; fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: venv system-deps lint
	$(BIN)/pytest -q -p no:cacheprovider

# The demo starts a private rsyslogd and Alertmanager when they are installed; without
# them (no root, no Debian archive) it still runs, with the archive and the alert log.
demo: venv
	@$(MAKE) --no-print-directory system-deps || echo "demo: continuing without rsyslog/Alertmanager"
	$(BIN)/squall demo

bench: venv
	@set -e; for b in bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
