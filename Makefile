# Quick start: `make demo` runs the main job, `make test` runs the tests. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick schema lock clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ehr-alerts rules check
	$(BIN)/ehr-alerts replay examples/stream

# The review page's browser test drives Debian's Chromium (never a Playwright browser download).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && echo sudo)

$(CHROMIUM):
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/ehr-alerts rules check
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_engine.py
	$(BIN)/python bench/bench_stream.py
	$(BIN)/python bench/bench_backfill.py
	$(BIN)/python bench/bench_growth.py
	$(BIN)/python bench/bench_cds.py
	$(BIN)/python bench/bench_cds.py --cold-chart
	$(BIN)/python bench/bench_isolation.py
	$(BIN)/python bench/bench_review.py

# Every benchmark in its --quick mode (a smoke check; writes bench/results/*-quick.json).
bench-quick: $(STAMP)
	$(BIN)/python bench/bench_engine.py --quick
	$(BIN)/python bench/bench_stream.py --quick
	$(BIN)/python bench/bench_backfill.py --quick
	$(BIN)/python bench/bench_growth.py --quick
	$(BIN)/python bench/bench_cds.py --quick
	$(BIN)/python bench/bench_cds.py --cold-chart --quick
	$(BIN)/python bench/bench_isolation.py --quick
	$(BIN)/python bench/bench_review.py --quick

schema: $(STAMP)
	$(BIN)/ehr-alerts rules schema > rules/rule.schema.json

# Re-pin constraints.txt to what is installed in .venv (run after changing dependencies, then test).
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e ' > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
