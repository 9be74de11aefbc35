# Two commands on a fresh machine: `make demo` (set up, run the main job) and `make test` (set up, run the tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup bwrap espeak kb-corpus demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps bfcl-eval==2026.3.23  # BFCL's data (evals/bfcl.py); its deps are provider SDKs
	$(BIN)/python -m fleetlm.engine.kernels  # our CPU kernels, compiled once per machine into the fleet home
	touch $(STAMP)

setup: $(STAMP) bwrap espeak

# bubblewrap isolates the code that `fleet eval --bench humaneval` runs (fleetlm.sandbox); installed as root.
bwrap:
	@command -v bwrap >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	else echo "warning: bubblewrap is missing and we are not root; sandboxed tests will be skipped" >&2; fi; }

# espeak-ng: the speech fallback when the Piper voice cannot load (fleetlm.voice.tts); installed as root.
espeak:
	@command -v espeak-ng >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; \
	else echo "warning: espeak-ng is missing and we are not root; its fallback tests will be skipped" >&2; fi; }

# The knowledge base's labelled retrieval set is cut from Debian's HTML manual (fleetlm.rag.labelled), read by
# bench/retrieval.py; not part of `make test` (those tests skip without it). Installed as root.
kb-corpus:
	@test -f /usr/share/doc/python3.11/html/library/copy.html || { if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc >/dev/null; \
	else echo "error: python3.11-doc is missing; run as root: apt-get install python3.11-doc" >&2; exit 1; fi; }

# The demo's fleet: the three catalog models (pulled once, verified), each measured on both engines once per
# machine (`fleet demo --prepare`, what the gateway's first start would otherwise do), then the demo itself.
DEMO_MODELS := smollm2-135m-instruct qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct

demo: $(STAMP) bwrap
	$(BIN)/fleet models pull $(DEMO_MODELS)
	$(BIN)/fleet demo --prepare
	$(BIN)/fleet demo

test: $(STAMP) bwrap espeak
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) build *.egg-info
