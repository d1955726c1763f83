"""Fixtures of the front-end tests: fresh Jupyter and IPython folders, a copy of examples/ to run
in, a real kernel."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
from frontend_support import EXAMPLES, ROOT, Kernel, need_module


@pytest.fixture(scope="session", autouse=True)
def jupyter_home(tmp_path_factory):
    """Fresh Jupyter and IPython folders, so no user profile, extension or kernelspec takes part; the
    `python3` kernel is this environment's Python, importing this checkout's torchmagic."""
    home = tmp_path_factory.mktemp("jupyter-home")
    env = {
        "JUPYTER_CONFIG_DIR": home / "config",
        "JUPYTER_DATA_DIR": home / "data",
        "JUPYTER_RUNTIME_DIR": home / "runtime",
        "IPYTHONDIR": home / "ipython",
    }
    saved = {k: os.environ.get(k) for k in [*env, "PYTHONPATH", "JUPYTER_PLATFORM_DIRS"]}
    for key, path in env.items():
        path.mkdir()
        os.environ[key] = str(path)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved["PYTHONPATH"]]))
    os.environ.pop("JUPYTER_PLATFORM_DIRS", None)
    spec = env["JUPYTER_DATA_DIR"] / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python"}))
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def workdir(tmp_path):
    """A copy of examples/ to run in, so a run never rewrites the repository's notebook."""
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    return tmp_path / "examples"


@pytest.fixture
def kernel(workdir):
    need_module("jupyter_client")
    need_module("ipykernel")
    k = Kernel.start(workdir)
    try:
        yield k
    finally:
        k.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item, so fixtures can tell a failed test (screenshots)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
