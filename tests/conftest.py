"""A fresh real IPython shell per test, with torchmagic loaded, and the reference notes' network."""
from __future__ import annotations

import atexit

import pytest
from IPython.core.interactiveshell import InteractiveShell
from snapshot import young_heap_only  # noqa: F401  (autouse: every test module collects only its own objects)
from support import NET_SOURCE, Shell
from traitlets.config import Config


@pytest.fixture
def shell():
    InteractiveShell.clear_instance()
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    ip = InteractiveShell.instance(config=config)
    ip.display_formatter.active_types = ["text/plain", "text/html"]
    ip.run_line_magic("load_ext", "torchmagic")
    yield Shell(ip)
    ip.run_line_magic("unload_ext", "torchmagic")
    ip.reset(new_session=False)
    # Each shell registers its own exit work (a reset and a full garbage collection) with atexit:
    # hundreds of test shells would spend minutes on it after the last test. This one is done.
    atexit.unregister(ip.atexit_operations)
    # The shell put its namespace in sys.modules["__main__"] and keeps what was there before: the
    # previous test's namespace, and through it that test's shell. Unrestored, every shell of the
    # session stays alive and each garbage collection scans them all (teardowns grew to 0.2 s).
    ip.restore_sys_module_state()
    InteractiveShell.clear_instance()


@pytest.fixture
def notes(shell):
    """The shell with the reference notes' Net, input, target, criterion and SGD optimizer defined."""
    shell.run(NET_SOURCE)
    return shell


def pytest_terminal_summary(terminalreporter):
    """The state-safety matrix and the Ctrl-C sweep, when they ran."""
    import sys

    for name in ("test_safety_matrix", "test_faults", "test_transformers_zoo"):
        module = sys.modules.get(name)
        for line in module.report() if module is not None else []:
            terminalreporter.write_line(line)
