"""The extension itself through a real shell: loading and unloading, help, configuration, and what
loading imports."""
import subprocess
import sys

import torch
from support import NET_SOURCE

MAGICS = {"line": {"device", "shapes", "summary"}, "cell": {"trainstep"}}


def test_load_unload_load(shell):
    table = shell.ip.magics_manager.magics
    assert MAGICS["line"] <= set(table["line"]) and MAGICS["cell"] <= set(table["cell"])
    shell.run("%unload_ext torchmagic")
    assert not (MAGICS["line"] & set(table["line"])) and not (MAGICS["cell"] & set(table["cell"]))
    assert not any(type(c).__name__ == "TorchMagics" for c in shell.ip.configurables)
    shell.run("%load_ext torchmagic")
    assert MAGICS["line"] <= set(table["line"])
    assert shell.run("%device").cpu_threads == torch.get_num_threads()


def test_help_shows_options(shell):
    doc = shell.ip.find_line_magic("shapes").__doc__
    assert "--depth" in doc and "1,1,32,32" in doc
    assert "--lr" in shell.ip.find_cell_magic("trainstep").__doc__


def test_config_trait(shell):
    shell.run("%config TorchMagics.widgets = False")
    magics = next(c for c in shell.ip.configurables if type(c).__name__ == "TorchMagics")
    assert magics.widgets is False


_FIRST_ANSWER = """
import sys, torch
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
ip.run_line_magic("load_ext", "torchmagic")
print(sorted(m for m in sys.modules if m.startswith("torchmagic")))
ip.run_cell(NET_SOURCE)
t = ip.run_line_magic("shapes", "net 1,1,32,32")
print(t.mode, t.flops, "torch._dynamo" in sys.modules, "sympy" in sys.modules)
"""


def test_load_ext_and_the_first_shapes_import_only_what_they_use():
    """%load_ext imports the magics alone; a real forward's FLOPs come without torch's compiler stack
    (torch._dynamo and sympy: a second or more in a fresh kernel; torch's optimizers import it, so
    the network is defined without one here)."""
    source = "\n".join(line for line in NET_SOURCE.splitlines() if "optim" not in line)
    code = f"NET_SOURCE = {source!r}\n{_FIRST_ANSWER}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == str(["torchmagic", "torchmagic.compat", "torchmagic.errors", "torchmagic.magics",
                          "torchmagic.parsing", "torchmagic.render"])
    assert out[1] == "real 124200 False False"
