# Two commands for a newcomer: `make run` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck check mock clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall when the project's metadata changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,fast]'
	touch $(STAMP)

## run: set up .venv and start the gateway on 127.0.0.1:8080 (built-in mock upstream without an API key)
run: $(STAMP)
	$(PY) -m gateway serve

## mock: run the mock upstream alone on port 8081
mock: $(STAMP)
	$(PY) -m gateway mock-upstream --port 8081

## test: lint, type-check and run the whole test suite (asyncio debug mode on, with coverage)
test: $(STAMP) lint typecheck
	PYTHONASYNCIODEBUG=1 $(PY) -m pytest --cov --cov-report=term:skip-covered $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway tests
	$(VENV)/bin/ruff format --check gateway tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .coverage
