# phivault — `make run` installs and serves on the embedded default; `make test` runs
# everything CI runs. Python 3.11+ and (for tests) root or sudo for Debian packages.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
LINT_PATHS := $(wildcard src tests bench scripts)

.PHONY: install run test test-long audit lint typecheck clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==0.13.8
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -r requirements/dev.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

run: install
	$(BIN)/phivault serve

lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

typecheck: install
	$(BIN)/mypy src tests $(wildcard bench/*.py scripts/*.py)

# Bytecode is compiled ahead of time: with PYTHONDONTWRITEBYTECODE set (as on some CI
# machines) every process would otherwise recompile every module, and the suite starts
# hundreds of phivault processes.
# One pytest-xdist worker per CPU, a test file per worker at a time (module fixtures are
# built once): much of the suite waits on the servers it starts, so two workers on two
# cores finish well before one. PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= auto
PYTEST_PARALLEL := $(if $(filter 0,$(PYTEST_WORKERS)),-p no:xdist,-n $(PYTEST_WORKERS) --dist loadfile)

test: install lint typecheck
	bash scripts/install-test-deps.sh
	$(BIN)/python -m compileall -q src tests
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) --durations=20

test-long: install
	bash scripts/install-test-deps.sh
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) -m long

# Known vulnerabilities in the locked dependencies (pip-audit). Needs PyPI's per-version
# advisory API or OSV, which not every network reaches; kept out of `make test` for that.
audit: install
	$(BIN)/python -m pytest -m network tests/security/test_static.py

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
