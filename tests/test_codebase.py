"""Rules of the codebase, checked by reading the source: the core imports no IPython, and torch's
private API is touched in two modules only."""
import ast
import subprocess
import sys
from pathlib import Path

import tomllib

import torchmagic

PACKAGE = Path(torchmagic.__file__).parent
FRONT = {"torchmagic.magics", "torchmagic.ui"}  # the only modules that may import IPython and ipywidgets
PRIVATE_API = {"torchmagic.fake", "torchmagic.torchapi"}  # the only modules that may use torch's private names


def modules() -> dict[str, ast.Module]:
    """Every module of the package, by dotted name, parsed."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def imported(tree: ast.Module) -> set[str]:
    """Every module the source imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def core() -> list[str]:
    return [name for name in modules() if name not in FRONT]


def test_the_core_is_found_without_a_list():
    found = set(core())
    assert {"torchmagic.memory", "torchmagic.finetune", "torchmagic.plot", "torchmagic.compat",
            "torchmagic.results.trainstep", "torchmagic.training", "torchmagic.usercell"} <= found
    assert not found & FRONT


def test_core_does_not_import_ipython():
    code = "import sys\n" + "".join(f"import {m}\n" for m in core()) + \
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('IPython', 'ipywidgets')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_core_names_no_ipython_even_inside_functions():
    tops = {m: {n.split(".")[0] for n in imported(tree)} for m, tree in modules().items() if m not in FRONT}
    assert {m: sorted(t & {"IPython", "ipywidgets"}) for m, t in tops.items() if t & {"IPython", "ipywidgets"}} == {}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def ours(trees) -> set[str]:
    """The underscore names the package defines itself: functions, classes, variables, and the
    attributes it sets on its own objects (self.x, cls.x)."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                names.add(node.attr)
    return names


def foreign_private(tree: ast.Module, own: set[str]) -> list[str]:
    """What the source reaches of another library's private API: `x._name` where the package does
    not define _name, and imports from modules with a private part (torch.utils._pytree)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if any(map(_private, node.module.split("."))) or any(_private(a.name) for a in node.names):
                found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if any(map(_private, a.name.split(".")))]
    return found


def test_torch_private_api_is_used_in_fake_and_torchapi_alone():
    trees = modules()
    own = ours(trees.values())
    found = {m: foreign_private(tree, own) for m, tree in trees.items() if m not in PRIVATE_API}
    assert {m: f for m, f in found.items() if f} == {}


def test_the_private_api_check_finds_what_it_looks_for():
    source = ("import torch\nfrom torch.utils._pytree import tree_leaves\nimport torch.utils._pytree\n"
              "class A:\n    def f(self, m, p):\n        self._mine = m._theirs\n"
              "        return p._version, torch._foreach_norm([p]), self._mine\n")
    tree = ast.parse(source)
    found = " | ".join(foreign_private(tree, ours([tree])))
    for what in ("from torch.utils._pytree", "import torch.utils._pytree", "m._theirs", "p._version",
                 "torch._foreach_norm"):
        assert what in found
    assert "_mine" not in found


def test_version_is_written_once_and_the_package_is_typed():
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "torchmagic.__version__"}
    assert (PACKAGE / "py.typed").exists() and "py.typed" in project["tool"]["setuptools"]["package-data"]["torchmagic"]


def test_every_name_in_all_exists():
    import importlib

    for name in ("torchmagic", "torchmagic.results"):
        module = importlib.import_module(name)
        assert module.__all__ and all(hasattr(module, n) for n in module.__all__)
