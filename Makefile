# Every target installs what it needs into .venv first. The CPU build of torch is installed
# before anything else, so that no dependency pulls the multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0+cpu
BIN := $(VENV)/bin

.PHONY: demo test unit compat wheel clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

# The reference notes replayed with the magics in the real `ipython` program.
demo: $(BIN)/.installed
	$(BIN)/ipython --simple-prompt --no-banner --no-confirm-exit --colors=nocolor < examples/pytorch_basics.ipy

# Everything CI runs.
test: unit compat wheel

unit: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

# The oldest supported stack, as on Google Colab: Python 3.11, IPython 7.34.0, ipywidgets 7.7.1 and
# every other declared lower bound (.ci/minimums.py reads them from pyproject.toml), plus Colab's
# ipykernel. The shell-level tests run a second time there; the browser tier does not.
COMPAT_PYTHON ?= python3.11
COMPAT_VENV ?= .venv-compat
COMPAT_EXTRA ?= ipykernel==6.17.1
CBIN := $(COMPAT_VENV)/bin

$(CBIN)/.installed: pyproject.toml .ci/minimums.py
	rm -rf $(COMPAT_VENV)
	$(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(CBIN)/python -m pip install -q --disable-pip-version-check --no-compile "$(TORCH)"
	$(CBIN)/python -m pip install -q --disable-pip-version-check --no-compile -e ".[test]" \
		$$($(CBIN)/python .ci/minimums.py) $(COMPAT_EXTRA)
	touch $@

compat: $(CBIN)/.installed
	$(CBIN)/python -m pytest -q tests --ignore=tests/frontend

# The package as a user gets it: wheel and sdist built, the wheel installed into a fresh venv with
# nothing but its declared dependencies, then a smoke test in the real `ipython` program.
# (--no-compile: byte-compiling all of torch at install time costs more than it saves here.)
WHEEL_VENV ?= .venv-wheel

wheel: $(BIN)/.installed
	rm -rf dist $(WHEEL_VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check build
	$(BIN)/python -m build -q --outdir dist .
	ls dist
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-compile "$(TORCH)"
	$(WHEEL_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-compile dist/torchmagic-*.whl
	.ci/wheel-smoke $(WHEEL_VENV)

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(WHEEL_VENV) build dist *.egg-info
