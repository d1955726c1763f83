"""Front-end detection and the ipywidgets panel of %%trainstep. Only plain, long-standing widget
APIs (FloatLogSlider, Button, HTML, Output, HBox/VBox, on_click), so ipywidgets 7 and 8 both work."""
from __future__ import annotations

import math
import sys
from typing import Callable

from .errors import TorchMagicError
from .plot import line_svg
from .results import Result
from .training import StepSession


def has_widget_frontend(shell) -> bool:
    """A Jupyter kernel (the only place a widget can render) with ipywidgets importable."""
    if shell is None or getattr(shell, "kernel", None) is None:
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def _slider_range(lr: float) -> tuple[float, float]:
    exponent = math.log10(lr)
    return min(-6.0, math.floor(exponent) - 1), max(0.0, math.ceil(exponent) + 1)


def history_svg(history: list[tuple[int, float, float]]) -> str:
    """Loss before each step, and the learning rate of group 0, over the steps of this session."""
    if not history:
        return ""
    steps = [h[0] for h in history]
    loss = line_svg([(steps, [h[1] for h in history], "loss before the step")], x_label="step", height=150)
    lr = line_svg([(steps, [h[2] for h in history], "lr")], x_label="step", log_y=True, height=110)
    return f"<div>{loss}<br>{lr}</div>"


class TrainStepPanel:
    """A log-scale learning-rate slider per param group, Step (the cell again at the sliders'
    rates), Try (one step previewed with the loss after it, then undone), Undo (back to exactly
    before the last step), the loss/lr history of this optimizer, and the latest result.

    `call(fn, *args)` runs a session action so that errors in the user's cell show the user's
    frames only. Errors are shown in the panel, never swallowed: a mistake as one line, an error
    in the user's code with its traceback (shell.showtraceback)."""

    def __init__(self, session: StepSession, shell, result: Result, call: Callable = None):
        import ipywidgets as w

        self.session = session
        self.result = result
        self.error = ""  # the last action's error: a mistake's message, or the name of the exception
        self._shell = shell
        self._call = call or (lambda fn, *args: fn(*args))
        names, lrs = session.group_names, session.lrs
        self.sliders = []
        for name, lr in zip(names, lrs):
            lo, hi = _slider_range(lr if lr > 0 else 1e-3)
            label = "lr" if len(lrs) == 1 else f"lr {name}"
            self.sliders.append(w.FloatLogSlider(value=lr if lr > 0 else 1e-3, base=10, min=lo, max=hi, step=0.05,
                                                 description=label, readout_format=".2e"))
        self.slider = self.sliders[0]
        self.button = w.Button(description="Step", tooltip="run the cell again and step at the sliders' rates")
        self.try_button = w.Button(description="Try", tooltip="preview the loss after one step at these rates, then undo it")
        self.undo_button = w.Button(description="Undo", tooltip="back to exactly before the last step")
        self.plot = w.HTML()
        self.output = w.Output()
        self.button.on_click(lambda _: self._run(self._step))
        self.try_button.on_click(lambda _: self._run(self._try))
        self.undo_button.on_click(lambda _: self._run(self._undo))
        buttons = w.HBox([self.button, self.try_button, self.undo_button])
        self.widget = w.VBox([*self.sliders, buttons, self.plot, self.output])
        suggestion = getattr(result, "suggestion", None)
        if suggestion:
            self.set_rates([suggestion * lr / lrs[0] if lrs[0] else suggestion for lr in lrs])
        self._refresh()
        self._show(result)

    # what the buttons do (callable from code and tests)

    def click(self):
        """Press Step."""
        self.button.click()

    @property
    def rates(self) -> list[float]:
        return [s.value for s in self.sliders]

    def set_rates(self, lrs: list[float]):
        for slider, lr in zip(self.sliders, lrs):
            if lr > 0:
                exponent = math.log10(lr)
                slider.min, slider.max = min(slider.min, math.floor(exponent)), max(slider.max, math.ceil(exponent))
                slider.value = lr

    def _step(self):
        return self._call(self.session.step, self.rates)

    def _try(self):
        return self._call(self.session.preview, self.rates)

    def _undo(self):
        result = self._call(self.session.undo)
        self.set_rates(self.session.lrs)
        return result

    def _run(self, action):
        with self.output:
            try:
                result = action()
            except TorchMagicError as e:
                print(f"UsageError: {e}", file=sys.stderr)
                self.error = str(e)
                return
            except BaseException:  # the user's error (or Ctrl-C): shown with its traceback, not swallowed
                self._shell.showtraceback()
                self.error = f"{sys.exc_info()[0].__name__}"
                return
            finally:
                self._refresh()
            self.error = ""
            self.result = result
            self._show(result)

    def _refresh(self):
        ledger = self.session.ledger_if_alive  # None once the model or optimizer is gone
        self.undo_button.disabled = ledger is None or ledger.undo is None
        if ledger is not None:
            self.plot.value = history_svg(ledger.history)

    def _show(self, result):
        from IPython.display import display

        self.output.clear_output(wait=True)
        with self.output:
            display(result)

    # display: the widget where it can render, the result as text everywhere else

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {
            "text/plain": self.result.to_text(),
            "application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0,
                                                         "model_id": self.widget.model_id},
        }

    def __repr__(self):
        return self.result.to_text()
