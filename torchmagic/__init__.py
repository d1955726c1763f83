"""torchmagic: IPython magics for PyTorch. `%load_ext torchmagic`."""

__version__ = "0.1.0"  # the one place: pyproject.toml reads it from here
__all__ = ["__version__", "load_ipython_extension", "unload_ipython_extension"]

_loaded: dict = {}  # id(shell) -> TorchMagics instance


def load_ipython_extension(ipython):
    from .magics import TorchMagics  # imported here so that `import torchmagic` stays cheap

    magics = TorchMagics(ipython)
    ipython.register_magics(magics)  # also makes it configurable: %config TorchMagics.widgets = False
    _loaded[id(ipython)] = magics


def unload_ipython_extension(ipython):
    magics = _loaded.pop(id(ipython), None)
    if magics is None:
        return
    magics.close()  # event handlers (%memory) go with the magics
    table = ipython.magics_manager.magics
    for kind, names in magics.magics.items():
        for name in names:
            table[kind].pop(name, None)
    ipython.magics_manager.registry.pop(type(magics).__name__, None)
    ipython.configurables[:] = [c for c in ipython.configurables if c is not magics]
