# embedrl: two commands set everything up on a fresh machine (see README.md).
#   make demo   - the whole method end to end on the synthetic world (CPU)
#   make test   - the test suite (offline, CPU)
#   make lint   - ruff check + format check
#   make perception-backbone - rebuild the shipped perception-pretrained tiny backbone (~20 min on 2 cores)
#   make instruct-backbone   - rebuild the shipped instruct-stage tiny backbone from it (~20 min on 2 cores)
# Each target creates .venv if it is missing and installs the project into it with pinned versions.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.embedrl-installed
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PYTEST_ARGS ?=

.PHONY: demo test lint format venv clean perception-backbone instruct-backbone

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

PERCEPTION_DIR := src/embedrl/resources/backbones/tiny-qwen3-vl-perception
perception-backbone: $(STAMP)
	$(OFFLINE) $(BIN)/embedrl backbone tiny --out runs/perception/tiny
	$(OFFLINE) $(BIN)/embedrl backbone pretrain --backbone runs/perception/tiny --out runs/perception/pretrain
	rm -rf $(PERCEPTION_DIR) && mkdir -p $(dir $(PERCEPTION_DIR))
	cp -r runs/perception/pretrain/final $(PERCEPTION_DIR)

INSTRUCT_DIR := src/embedrl/resources/backbones/tiny-qwen3-vl-instruct
instruct-backbone: $(STAMP)
	$(OFFLINE) $(BIN)/embedrl backbone pretrain --config configs/backbone_pretrain-instruct.yaml
	rm -rf $(INSTRUCT_DIR) && mkdir -p $(dir $(INSTRUCT_DIR))
	cp -r runs/instruct/pretrain/final $(INSTRUCT_DIR)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist src/*.egg-info
