# Two commands for a fresh machine:  `make run` starts the bot, `make test` runs the tests.
# Both create .venv from pyproject.toml on first use (Python 3.11+ must be on PATH as python3).
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: run test bench bench-compare bench-soak clean
BENCH_STAMP := $(VENV)/.installed-bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/slackbot

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The benchmarks need the `bench` extra (Bolt, aiohttp, matplotlib); the bot and the tests do not.
$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(VENV)/bin/python benchmarks/bench_conversations.py

bench-compare: $(BENCH_STAMP)
	$(VENV)/bin/python benchmarks/compare.py

bench-soak: $(BENCH_STAMP)
	$(VENV)/bin/python benchmarks/soak.py

clean:
	rm -rf $(VENV)
