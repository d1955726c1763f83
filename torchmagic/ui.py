"""Front-end detection and the ipywidgets panel of %%trainstep. Only plain, long-standing widget
APIs (FloatLogSlider, Button, HTML, Output, HBox/VBox, Layout, on_click), so ipywidgets 7 and 8 both work."""
from __future__ import annotations

import datetime
import html
import math
import time
from typing import Callable

from .errors import TorchMagicError, one_line
from .plot import line_svg, wide_range
from .results import Result, StepResult, SweepResult
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


DECADES_BELOW, DECADES_ABOVE = 3, 2  # the slider's range around the current rate (log10)


def slider_range(lr: float) -> tuple[float, float]:
    """A few decades around the rate, on whole decades."""
    exponent = math.log10(lr)
    return math.floor(exponent - DECADES_BELOW), math.ceil(exponent + DECADES_ABOVE)


def history_svg(history: list[tuple[int, float, float]]) -> str:
    """The loss before each step (log scale when it spans decades) and, when it changed, the
    learning rate of group 0, over this optimizer's steps. Nothing before there are two steps."""
    if len(history) < 2:
        return ""
    steps = [h[0] for h in history]
    losses = [h[1] for h in history]
    plots = [line_svg([(steps, losses, "loss before the step")], x_label="step", y_label="loss", height=150,
                      log_y=wide_range(losses), x_format=lambda x: f"{x:.0f}")]
    if len({h[2] for h in history}) > 1:
        plots.append(line_svg([(steps, [h[2] for h in history], "lr")], x_label="step", y_label="lr", log_y=True,
                              height=110, x_format=lambda x: f"{x:.0f}"))
    return f"<div>{'<br>'.join(plots)}</div>"


def _center(slider, lr: float):
    """The slider's range around this rate (min never above max on the way: ipywidgets refuses that)."""
    lo, hi = slider_range(lr)
    if lo > slider.max:
        slider.max, slider.min = hi, lo
    else:
        slider.min, slider.max = lo, hi


def _users_traceback(tb):
    """The traceback from the first frame that is not torchmagic's: what the cell form shows."""
    while tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith(__package__ + "."):
        tb = tb.tb_next
    return tb


class TrainStepPanel:
    """A log-scale learning-rate slider per param group, Step (the cell again at the sliders'
    rates), Try (one step previewed with the loss after it, then undone), Undo (back to exactly
    before the last step), the latest result, then the plots: a sweep's (kept when Step is
    clicked) and the loss over this optimizer's steps.

    While an action runs its buttons are disabled and the panel says so; a click made meanwhile
    does nothing. `call(fn, *args)` runs a session action so that errors in the user's cell show
    the user's frames only. An error replaces the result and looks as in the cell: a mistake as
    one UsageError line, an error in the user's code with its traceback (shell.showtraceback).
    Every panel of one optimizer shows its step numbers; a panel whose result is out of date
    (another panel or cell stepped since) says so."""

    def __init__(self, session: StepSession, shell, result: Result, call: Callable | None = None):
        import ipywidgets as w

        self.session = session
        self.result = result
        self.error = ""  # the last action's error: a mistake's message, or the name of the exception
        self.busy = ""  # what runs now ("" when idle)
        self._shell = shell
        self._call = call or (lambda fn, *args: fn(*args))
        self._busy_until: datetime.datetime | None = None  # on the front end's clock: clicks sent before are stale
        names, lrs = session.group_names, session.lrs
        self.sliders = []
        for name, lr in zip(names, lrs, strict=True):
            lr = lr if lr > 0 else 1e-3
            lo, hi = slider_range(lr)
            label = "lr" if len(lrs) == 1 else f"lr {name}"
            self.sliders.append(w.FloatLogSlider(value=lr, base=10, min=lo, max=hi, step=0.02, description=label,
                                                 readout_format=".2e", layout=w.Layout(width="560px")))
        self.slider = self.sliders[0]
        self.button = w.Button(description="Step", tooltip="run the cell again and step at the sliders' rates")
        self.try_button = w.Button(description="Try",
                                   tooltip="preview the loss after one step at these rates, then undo it")
        self.undo_button = w.Button(description="Undo", tooltip="back to exactly before the last step")
        self.status = w.HTML()
        self.output = w.Output()
        self.pinned = w.Output()  # a sweep's plot and suggestion, kept when Step is clicked
        self.plot = w.HTML()
        self.button.on_click(lambda _: self._run(self._step, "stepping"))
        self.try_button.on_click(lambda _: self._run(self._try, "trying one step"))
        self.undo_button.on_click(lambda _: self._run(self._undo, "undoing the last step"))
        buttons = w.HBox([self.button, self.try_button, self.undo_button, self.status])
        self.widget = w.VBox([*self.sliders, buttons, self.output, self.pinned, self.plot])
        session.ledger.watch(self._refresh)
        self._shown = session.ledger.version  # the ledger's version that the shown result belongs to
        self.sweep = result if isinstance(result, SweepResult) else None  # shown above the history, kept
        if self.sweep is not None:
            suggestion = self.sweep.suggestion
            if suggestion:
                self.set_rates([suggestion * lr / lrs[0] if lrs[0] else suggestion for lr in lrs])
            self._show(self.sweep, self.pinned)
        else:
            self._show(result)
        self._refresh()

    # what the buttons do (callable from code and tests)

    def click(self):
        """Press Step."""
        self.button.click()

    @property
    def rates(self) -> list[float]:
        return [s.value for s in self.sliders]

    def set_rates(self, lrs: list[float]):
        for slider, lr in zip(self.sliders, lrs, strict=False):
            if lr > 0:
                _center(slider, lr)
                slider.value = lr

    def _step(self):
        return self._call(self.session.step, self.rates)

    def _try(self):
        return self._call(self.session.preview, self.rates)

    def _undo(self):
        result = self._call(self.session.undo)  # the sliders keep their rates: they are the next step's
        if isinstance(self.result, StepResult) and self.result.step == result.step and not self.result.preview:
            result.undone = self.result
        return result

    def _run(self, action, doing: str):
        sent = self._click_sent()
        if self.busy or (sent and self._busy_until and sent < self._busy_until):
            return  # clicked while busy (here, or on the front end before it heard so): never a second step
        self.busy = doing
        self._refresh()
        started = time.monotonic()
        try:
            self.output.clear_output(wait=True)  # the stale result goes when what replaces it arrives
            with self.output:
                try:
                    result = action()
                except TorchMagicError as e:
                    from IPython.core.error import UsageError

                    self._shell.show_usage_error(UsageError(one_line(str(e))))
                    self.error = str(e)
                    return
                except BaseException as e:  # the user's error (or Ctrl-C): shown with its traceback, not swallowed
                    self._shell.showtraceback((type(e), e, _users_traceback(e.__traceback__)))
                    self.error = type(e).__name__
                    return
            self.error = ""
            self.result = result
            self._show(result)
        finally:
            if sent:
                self._busy_until = sent + datetime.timedelta(seconds=time.monotonic() - started)
            for slider in self.sliders:  # the range follows the rate: a few decades around it
                _center(slider, slider.value)
            self.busy = ""
            ledger = self.session.ledger_if_alive
            self._shown = ledger.version if ledger is not None else self._shown
            self._refresh()

    def _click_sent(self) -> datetime.datetime | None:
        """When the front end sent the click being handled, by its own clock (None when this is no
        click message). Clicks queue in the kernel while an action runs: one sent before the last
        action's start plus its duration was made while the panel was busy."""
        kernel = getattr(self._shell, "kernel", None)
        get_parent = getattr(kernel, "get_parent", None)
        parent = get_parent("shell") if get_parent is not None else getattr(kernel, "_parent_header", {})
        header = (parent or {}).get("header") or {}
        if header.get("msg_type") != "comm_msg":
            return None
        date = header.get("date")
        if isinstance(date, str):
            try:
                date = datetime.datetime.fromisoformat(date.replace("Z", "+00:00"))
            except ValueError:
                return None
        return date if isinstance(date, datetime.datetime) else None

    def _refresh(self):
        """Buttons, status line and history after anything changed (here, or in another panel or
        cell of this optimizer)."""
        ledger = self.session.ledger_if_alive  # None once the model or optimizer is gone
        gone = "the model or optimizer of this panel is gone: run the %%trainstep cell again"
        blocked = gone if ledger is None else self.session.undo_blocked()
        for b in (self.button, self.try_button):
            b.disabled = bool(self.busy) or ledger is None
        self.undo_button.disabled = bool(self.busy) or bool(blocked)
        self.undo_button.tooltip = f"Undo is off: {blocked}" if blocked else "back to exactly before the last step"
        if self.busy:
            line = f'<span class="tm-busy">⏳ {html.escape(self.busy)}…</span>'
        elif ledger is not None and ledger.version != self._shown:
            line = (f"out of date: this optimizer is at step {ledger.count} now (another %%trainstep cell or panel "
                    f"changed it); the result below is older. Step continues from there")
            line = f"<b>{html.escape(line)}</b>"
        else:
            line = html.escape(f"Undo is off: {blocked}") if blocked else ""
        self.status.value = f'<span style="font-size:12px;opacity:0.85">{line}</span>'
        if ledger is not None:
            self.plot.value = history_svg(ledger.history)

    def _show(self, result, where=None):
        from IPython.display import display

        where = where or self.output
        where.clear_output(wait=True)
        with where:
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
