# Every target installs what it needs into .venv first. The CPU build of torch is installed
# before anything else, so that no dependency pulls the multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0+cpu
BIN := $(VENV)/bin

.PHONY: demo test unit clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

# The reference notes replayed with the magics in the real `ipython` program.
demo: $(BIN)/.installed
	$(BIN)/ipython --simple-prompt --no-banner --no-confirm-exit --colors=nocolor < examples/pytorch_basics.ipy

# Everything CI runs.
test: unit

unit: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build dist *.egg-info
