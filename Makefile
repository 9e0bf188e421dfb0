# The two commands a new user needs are `make run` and `make test`; both install first.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
CONFIG ?= config.yaml
PYTEST_ARGS ?=

.PHONY: install run test lint format typecheck check bench coverage mutate clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "chatvault needs Python >= 3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

run: install
	$(BIN)/chatvault serve --config $(CONFIG)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check daemon chatvault_cli tests bench
	$(BIN)/ruff format --check daemon chatvault_cli tests bench

format: install
	$(BIN)/ruff format daemon chatvault_cli tests bench
	$(BIN)/ruff check --fix daemon chatvault_cli tests bench

typecheck: install
	$(BIN)/mypy

# What CI runs.
check: lint typecheck test

# The whole suite under coverage, daemons and CLI subprocesses included (pyproject's
# [tool.coverage.run]); about 10 minutes on two busy cores. docs/testing.md has the figure.
coverage: install
	rm -f .coverage .coverage.*
	$(BIN)/python -m coverage run -m pytest -p no:cacheprovider $(PYTEST_ARGS)
	$(BIN)/python -m coverage combine -q
	$(BIN)/python -m coverage report

# Mutation testing of the money and admission modules (pyproject's [tool.mutmut]); not
# part of `make test`. Resumes an interrupted run; `rm -rf mutants` starts afresh.
# MUTATE_CHILDREN: parallel test processes (mutmut defaults to every core).
MUTATE_CHILDREN ?= 2
mutate: install
	$(BIN)/mutmut run --max-children $(MUTATE_CHILDREN)
	$(BIN)/python -m tests.mutation_report

bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache mutants .coverage .coverage.*
