# Every target installs what it needs into .venv first. The CPU build of torch is installed
# before anything else, so that no dependency pulls the multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0+cpu
BIN := $(VENV)/bin

.PHONY: demo test lint unit zoo compat wheel clean frontend frontend-kernel frontend-terminal frontend-browser screenshots gpu-wheels gpu-wheels-check

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test,lint]"
	touch $@

# The reference notes replayed with the magics in the real `ipython` program.
demo: $(BIN)/.installed
	$(BIN)/ipython --simple-prompt --no-banner --no-confirm-exit --colors=nocolor < examples/pytorch_basics.ipy

# Everything CI runs.
test: lint unit zoo frontend-kernel frontend-terminal frontend-browser compat wheel

# ruff (pyflakes, pycodestyle, bugbear, import order; [tool.ruff] in pyproject.toml) over the package,
# the benchmarks and the tests; mypy over the package. Both pinned in the `lint` extra.
lint: $(BIN)/.installed
	$(BIN)/ruff check torchmagic bench tests
	$(BIN)/mypy

# With the zoo extra (transformers) installed, so that the unit tests that build a Hugging Face model
# run here rather than skip; the old-stack venv (compat) has no transformers, and skips them.
unit: $(BIN)/.zoo-installed $(BIN)/.graphviz-installed
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q tests --ignore=tests/frontend --ignore=tests/models

# Every causal-LM architecture of the pinned transformers (the `zoo` extra), built from a tiny config
# with random weights, offline, through the magics; prints the pass table.
$(BIN)/.zoo-installed: $(BIN)/.installed
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test,lint,zoo]"
	touch $@

zoo: $(BIN)/.zoo-installed
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q tests/models

# Graphviz's dot lays out `%shapes --graph` (Debian's graphviz, installed with apt-get when missing).
$(BIN)/.graphviz-installed: $(BIN)/.installed
	@command -v dot >/dev/null || { \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
		$$sudo apt-get update -q && \
		$$sudo apt-get install -y -q --no-install-recommends graphviz; }
	touch $@

# Front ends, for real (Debian's chromium and tmux are installed with apt-get when missing): each tier in its own pytest process (Playwright's event loop must not meet
# the kernel tests). A missing program (tmux, chromium) fails here rather than skipping.
FRONTEND_PYTEST := TORCHMAGIC_FRONTENDS=required $(BIN)/python -m pytest -q

$(BIN)/.frontend-installed: $(BIN)/.installed tests/frontend/requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check -r tests/frontend/requirements.txt
	@command -v chromium >/dev/null && command -v tmux >/dev/null || { \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
		$$sudo apt-get update -q && \
		$$sudo apt-get install -y -q --no-install-recommends chromium chromium-driver tmux; }
	touch $@

frontend: frontend-kernel frontend-terminal frontend-browser

frontend-kernel: $(BIN)/.frontend-installed
	$(FRONTEND_PYTEST) tests/frontend/test_kernel.py

frontend-terminal: $(BIN)/.frontend-installed
	$(FRONTEND_PYTEST) tests/frontend/test_terminal.py

# JupyterLab and Notebook 7 in Debian's chromium (apt-get install chromium); screenshots in artifacts/frontend/.
frontend-browser: $(BIN)/.frontend-installed $(BIN)/.graphviz-installed
	$(FRONTEND_PYTEST) tests/frontend/test_browser.py tests/frontend/test_browser_graph.py

# The same, rewriting the README's screenshots in docs/images/.
screenshots: $(BIN)/.frontend-installed $(BIN)/.graphviz-installed
	TORCHMAGIC_UPDATE_SCREENSHOTS=1 $(FRONTEND_PYTEST) tests/frontend/test_browser.py tests/frontend/test_browser_graph.py

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
	$(CBIN)/python -m pytest -q tests --ignore=tests/frontend --ignore=tests/models

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
	rm -rf $(VENV) $(COMPAT_VENV) $(WHEEL_VENV) build dist *.egg-info .whl .venv-gpucheck

# Wheels for a GPU machine that has torch (and pytest, numpy) but not IPython, ipywidgets or
# torchinfo, for Python 3.12 on x86-64 Linux; see "Checking the GPU paths" in README.md.
GPU_WHEELS := ipython==9.18.1 ipython-pygments-lexers==1.1.1 pygments==2.21.0 jedi==0.20.1 parso==0.8.7 \
	matplotlib-inline==0.2.2 pexpect==4.9.0 ptyprocess==0.7.0 prompt-toolkit==3.0.53 wcwidth==0.9.4 \
	stack-data==0.6.3 executing==2.3.0 asttokens==3.0.2 pure-eval==0.2.4 traitlets==5.16.1 psutil==7.2.2 \
	ipywidgets==8.1.9 comm==0.2.3 widgetsnbextension==4.0.16 jupyterlab-widgets==3.0.17 torchinfo==1.8.0 \
	hypothesis==6.155.7 attrs==26.1.0 sortedcontainers==2.4.0

gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

# The wheels are complete: a Python with only torch, pytest and numpy runs the GPU check with them.
gpu-wheels-check: gpu-wheels
	rm -rf .venv-gpucheck /tmp/torchmagic-site
	$(PYTHON) -m venv .venv-gpucheck
	.venv-gpucheck/bin/python -m pip install -q --disable-pip-version-check "$(TORCH)" pytest numpy
	.venv-gpucheck/bin/python -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
		--target /tmp/torchmagic-site .whl/*.whl
	PYTHONPATH=/tmp/torchmagic-site:. .venv-gpucheck/bin/python bench/gpu_check.py
