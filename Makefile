# The two commands a new user needs are `make run` and `make test`; both install first.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
CONFIG ?= config.yaml
PYTEST_ARGS ?=

.PHONY: install run test lint format typecheck check bench clean

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

bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
