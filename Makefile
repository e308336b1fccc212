# embedrl: two commands set everything up on a fresh machine (see README.md).
#   make demo   - the whole method end to end on the synthetic world (CPU)
#   make test   - the test suite (offline, CPU)
#   make lint   - ruff check + format check
# Each target creates .venv if it is missing and installs the project into it with pinned versions.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.embedrl-installed
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PYTEST_ARGS ?=

.PHONY: demo test lint format venv clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(BIN)/embedrl demo

test: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks scripts
	$(BIN)/ruff format src tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist src/*.egg-info
