# Two commands for a newcomer: `make run` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-min test-python test-js test-seams lint typecheck check mock clean faults bench soak

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall when the project's metadata changes.
$(STAMP): pyproject.toml clients/python/pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,fast]' -e './clients/python[http]'
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
	$(MAKE) --no-print-directory test-js

## test-seams: the end-to-end tests again with every dependency shortcut's public-API fallback
## forced (--upstream-body pull, --client-frames standard; gateway/io/seams/__init__.py); CI runs it
SEAM_TESTS := tests/io tests/e2e/test_streams.py tests/e2e/test_resume.py
test-seams: $(STAMP)
	GATEWAY_TEST_UPSTREAM_BODY=pull GATEWAY_TEST_CLIENT_FRAMES=standard PYTHONASYNCIODEBUG=1 \
		$(PY) -m pytest $(SEAM_TESTS) $(PYTEST_ARGS)

## test-min: the test suite against the oldest dependency releases pyproject.toml allows
## (tests/min-versions.txt), in a venv of its own (.venv-min); CI runs it after `make test`.
## It and test-python leave out the `repo` tests (docs, deployment, packaging, the page), which
## check the repository's files rather than the code on another interpreter or release, and the
## `pure` tests of gateway/core, which import no dependency but orjson (keeps CI under 30 min)
test-min:
	$(PYTHON) -m venv .venv-min
	.venv-min/bin/python -m pip install --quiet -c tests/min-versions.txt -e '.[test,fast]' -e './clients/python[http]'
	PYTHONASYNCIODEBUG=1 .venv-min/bin/python -m pytest -m "not repo and not pure" $(PYTEST_ARGS)

## test-python: the test suite on another interpreter, e.g. `make test-python PYTHON=python3.13`,
## in a venv of its own (.venv-python3.13); CI runs it on 3.12 and 3.13 where it finds them
test-python:
	$(PYTHON) -m venv .venv-$(notdir $(PYTHON))
	.venv-$(notdir $(PYTHON))/bin/python -m pip install --quiet -e '.[test,fast]' -e './clients/python[http]'
	PYTHONASYNCIODEBUG=1 .venv-$(notdir $(PYTHON))/bin/python -m pytest -m "not repo and not pure" $(PYTEST_ARGS)

clients/js/node_modules/.package-lock.json: clients/js/package-lock.json
	cd clients/js && npm ci --no-audit --no-fund

## test-js: the JavaScript client's tests against a real gateway (Node 20+)
test-js: $(STAMP) clients/js/node_modules/.package-lock.json
	node --test clients/js/test/

## faults: the full fault-injection suite (docs/reliability.md); rewrites the table in that file
faults: $(STAMP)
	$(PY) -m tests.faults --full --markdown docs/reliability.md

## soak: the gateway (with Redis) under sustained mixed load for SOAK_MINUTES (default 5): RSS,
## fds, tasks, upstream connections, retained bytes and Redis keys sampled to a CSV, then judged
## (flat memory, everything back at idle; docs/reliability.md "Memory"). CI runs it as is.
## SOAK_ARGS="--csv soak.csv --retention 120" passes more.
SOAK_MINUTES ?= 5
soak: $(STAMP)
	$(PY) -m tests.soak --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

## bench: performance benchmark (issue 4): gateway on core 0, mock + Node load on core 1; prints
## the table and writes bench/results/<date>.md. BENCH_QUICK=1 runs each scenario briefly;
## BENCH_ARGS="--only throughput,cancel --repeats 3" picks scenarios.
bench: $(STAMP)
	cd bench && npm ci --no-audit --no-fund --silent
	$(VENV)/bin/py-spy --version >/dev/null 2>&1 || $(PY) -m pip install --quiet py-spy
	BENCH_QUICK=$(BENCH_QUICK) $(PY) bench/run.py $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway tests clients/python
	$(VENV)/bin/ruff format --check gateway tests clients/python
	$(VENV)/bin/lint-imports --no-cache

typecheck: $(STAMP)
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict clients/python/gateway_client

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .coverage
