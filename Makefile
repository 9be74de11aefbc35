# Two commands on a fresh machine: `make demo` (set up, run the main job) and `make test` (set up, run the tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup bwrap demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m fleetlm.engine.kernels  # our CPU kernels, compiled once per machine into the fleet home
	touch $(STAMP)

setup: $(STAMP) bwrap

# bubblewrap isolates the code that `fleet eval --bench humaneval` runs (fleetlm.sandbox); installed as root.
bwrap:
	@command -v bwrap >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	else echo "warning: bubblewrap is missing and we are not root; sandboxed tests will be skipped" >&2; fi; }

demo: $(STAMP)
	$(BIN)/fleet demo

test: $(STAMP) bwrap
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) build *.egg-info
