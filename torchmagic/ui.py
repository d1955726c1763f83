"""Front-end detection and the ipywidgets controls of %%trainstep."""
from __future__ import annotations

import math
import sys
from typing import Callable

from .errors import TorchMagicError
from .results import StepResult


def has_widget_frontend(shell) -> bool:
    """A Jupyter kernel (the only place a widget can render) with ipywidgets importable."""
    if shell is None or getattr(shell, "kernel", None) is None:
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


class TrainStepPanel:
    """The last step's result, a log-scale learning-rate slider and a Step button that runs the
    cell body again at the slider's rate. Errors in a step are shown, never swallowed."""

    def __init__(self, result: StepResult, step: Callable[[float], StepResult], shell):
        import ipywidgets as w

        self.result = result
        self._step = step
        self._shell = shell
        lr = result.lrs[0] if result.lrs and result.lrs[0] > 0 else 1e-3
        exponent = math.log10(lr)
        self.slider = w.FloatLogSlider(value=lr, base=10, min=min(-6.0, math.floor(exponent) - 1),
                                       max=max(0.0, math.ceil(exponent) + 1), step=0.1,
                                       description="lr", readout_format=".2e")
        self.button = w.Button(description="Step", tooltip="run the cell again at this learning rate")
        self.output = w.Output()
        self.button.on_click(self._on_click)
        self.widget = w.VBox([w.HBox([self.slider, self.button]), self.output])
        with self.output:
            self._show(result)

    def _show(self, result: StepResult):
        from IPython.display import display

        display(result)

    def click(self):
        """Press Step (what the button does, callable from code and tests)."""
        self._on_click(self.button)

    def _on_click(self, _button):
        with self.output:
            try:
                result = self._step(self.slider.value)
            except TorchMagicError as e:
                print(f"UsageError: {e}", file=sys.stderr)
                return
            except Exception:
                self._shell.showtraceback()
                return
            self.output.clear_output(wait=True)
            self.result = result
            self._show(result)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def __repr__(self):
        return repr(self.result)
