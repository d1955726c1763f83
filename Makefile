# Every target installs what it needs into .venv first. The CPU build of torch is installed
# before anything else, so that no dependency pulls the multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0+cpu
BIN := $(VENV)/bin

.PHONY: demo test unit clean frontend frontend-kernel frontend-terminal frontend-browser screenshots

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

# The reference notes replayed with the magics in the real `ipython` program.
demo: $(BIN)/.installed
	$(BIN)/ipython --simple-prompt --no-banner --no-confirm-exit --colors=nocolor < examples/pytorch_basics.ipy

# Everything CI runs.
test: unit frontend-kernel frontend-terminal frontend-browser

unit: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests --ignore=tests/frontend

# Front ends, for real: each tier in its own pytest process (Playwright's event loop must not meet
# the kernel tests). A missing program (tmux, chromium) fails here rather than skipping.
FRONTEND_PYTEST := TORCHMAGIC_FRONTENDS=required $(BIN)/python -m pytest -q

$(BIN)/.frontend-installed: $(BIN)/.installed tests/frontend/requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check -r tests/frontend/requirements.txt
	touch $@

frontend: frontend-kernel frontend-terminal frontend-browser

frontend-kernel: $(BIN)/.frontend-installed
	$(FRONTEND_PYTEST) tests/frontend/test_kernel.py

frontend-terminal: $(BIN)/.frontend-installed
	$(FRONTEND_PYTEST) tests/frontend/test_terminal.py

# JupyterLab and Notebook 7 in Debian's chromium (apt-get install chromium); screenshots in artifacts/frontend/.
frontend-browser: $(BIN)/.frontend-installed
	$(FRONTEND_PYTEST) tests/frontend/test_browser.py

# The same, rewriting the README's screenshots in docs/images/.
screenshots: $(BIN)/.frontend-installed
	TORCHMAGIC_UPDATE_SCREENSHOTS=1 $(FRONTEND_PYTEST) tests/frontend/test_browser.py

clean:
	rm -rf $(VENV) build dist *.egg-info
