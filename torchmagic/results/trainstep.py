"""`%%trainstep`'s output: one step (StepResult), its undoing (UndoResult) and a learning-rate sweep
(SweepResult)."""
from __future__ import annotations

import html
from dataclasses import dataclass, field

from .. import render
from .base import Result, html_line, named, num


@dataclass
class ParamStep:
    """What one step did to one parameter tensor."""

    name: str  # "conv1.weight"
    shape: list[int]
    group: int  # index of its param group
    lr: float
    grad_norm: float
    param_norm: float  # before the step
    update_norm: float  # |after - before|

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def ratio(self) -> float:
        """update/parameter norm; about 1e-3 is typical of steady training."""
        return self.update_norm / self.param_norm if self.param_norm else float("nan")


# A step "blows up" when the loss rises this much from one step to the next, or when an update moves a
# parameter by this fraction of its norm (steady training moves about 1e-3 a step).
BLOWUP_LOSS = 10.0
BLOWUP_RATIO = 0.1


@dataclass(repr=False)
class StepResult(Result):
    model: str
    loss: float  # before the step
    grad_norm: float  # over all parameters
    lrs: list[float]  # per param group
    step: int  # this optimizer's steps taken with %%trainstep in this session (every panel of it counts the same)
    skipped: str = ""  # why no step was taken (non-finite loss, gradients or update)
    notes: list[str] = field(default_factory=list)
    params: list[ParamStep] = field(default_factory=list)
    param_norm: float = float("nan")
    update_norm: float = float("nan")
    loss_after: float | None = None  # --eval / preview: the loss after the step on the same batch
    preview: bool = False  # the step was tried and undone
    previous_loss: float | None = None  # the loss before the step before this one
    undoable: bool = False  # an Undo button can take this step back

    @property
    def stepped(self) -> bool:
        return not self.skipped

    def row(self, name: str) -> ParamStep:
        return named(self.params, name)

    @property
    def uniform_lr(self) -> bool:
        return len({r.lr for r in self.params}) <= 1

    @property
    def has_updates(self) -> bool:
        """False after a step with --no-undo, which keeps no copy to measure the update against."""
        return not self.params or any(r.update_norm == r.update_norm for r in self.params)

    @property
    def columns(self) -> list[str]:
        lr = [] if self.uniform_lr else ["lr"]
        updates = ["update norm", "update/param"] if self.has_updates else []
        return ["parameter", "shape", *lr, "grad norm", "param norm", *updates]

    @property
    def _numeric(self) -> set[int]:
        return render.places(self.columns, ("lr", "grad norm", "param norm", "update norm", "update/param"))

    def blown_up(self) -> list[ParamStep]:
        """The parameters this step moved by more than BLOWUP_RATIO of their norm."""
        return [r for r in self.params if r.ratio > BLOWUP_RATIO] if self.stepped else []

    def warning(self) -> str:
        """What looks like a step that blew up, and what to do; "" when nothing does."""
        if not self.stepped or self.preview:
            return ""
        what = []
        rose = [(self.previous_loss, self.loss)] if self.previous_loss else []
        rose += [(self.loss, self.loss_after)] if self.loss_after is not None else []
        for before, after in rose:
            if before > 0 and after >= BLOWUP_LOSS * before:
                what.append(f"the loss rose {after / before:.3g}x ({before:.4g} -> {after:.4g})")
                break
        big = sorted(self.blown_up(), key=lambda r: -r.ratio)
        if big:
            names = ", ".join(r.name for r in big[:3]) + (f" and {len(big) - 3} more" if len(big) > 3 else "")
            what.append(f"update/param up to {big[0].ratio:.2g} in {names} (above {BLOWUP_RATIO:g}; steady training "
                        f"moves about 1e-3 a step)")
        if not what:
            return ""
        lower = ", ".join(num(lr / 10) for lr in self.lrs)
        advice = f"Undo takes this step back; then try a lower rate, e.g. lr {lower}" if self.undoable else \
            f"Try a lower rate, e.g. --lr {lower}"
        return f"step {self.step} may have blown up: {'; '.join(what)}. {advice}"

    def _title(self) -> str:
        if self.preview and self.stepped:
            rates = ", ".join(num(lr) for lr in self.lrs)
            return f"{self.model}: preview of one step at lr {rates} (undone: nothing changed)"
        return f"{self.model}: step {self.step}" if self.stepped else f"{self.model}: no step taken"

    def _summary(self) -> str:
        loss = f"loss: {self.loss:.6g}"
        if self.loss_after is not None and self.stepped:
            loss += f" -> {self.loss_after:.6g} after the step (same batch, {self.loss_after - self.loss:+.3g})"
        parts = [loss, f"grad norm: {num(self.grad_norm)}"]
        if self.stepped and self.params and self.has_updates:
            parts.append(f"update norm: {num(self.update_norm)}")
        parts.append("lr: " + ", ".join(num(lr) for lr in self.lrs))
        return "  ·  ".join(parts)

    def _cells(self) -> list[list[str]]:
        lr, updates = not self.uniform_lr, self.has_updates
        return [[r.name, "[" + ", ".join(map(str, r.shape)) + "]", *([num(r.lr)] if lr else []), num(r.grad_norm),
                 num(r.param_norm),
                 *([num(r.update_norm), f"{r.ratio:.2e}" if r.ratio == r.ratio else "-"] if updates else [])]
                for r in self.params]

    def _lines(self) -> list[str]:
        return [self._title(), self._summary(), *filter(None, [self.skipped, self.warning()])]

    def to_text(self) -> str:
        parts = self._lines()
        if self.params and self.stepped:
            parts.append(render.text_table(self.columns, self._cells(), self._numeric, width=render.text_width(),
                                           squeeze={0}))
        return "\n".join(parts + self.notes)

    def _repr_html_(self) -> str:
        table = []
        if self.params and self.stepped:
            big = {id(r) for r in self.blown_up()}
            classes = ["tm-warn" if id(r) in big else "" for r in self.params]
            table = [render.html_table(self.columns, self._cells(), self._numeric, classes)]
        errors = [self.skipped] if self.skipped else []
        warning = [f'<div class="tm-warn">{html.escape(self.warning())}</div>'] if self.warning() else []
        return render.html_block(self._title(), [html_line(self._summary()), *warning, *table], self.notes, errors)


@dataclass(repr=False)
class UndoResult(Result):
    model: str
    step: int  # the step that was undone
    loss: float  # its loss before the step
    lrs: list[float]
    undone: StepResult | None = None  # that step's result, when it is known (the panel's)

    def to_text(self) -> str:
        return (f"{self.model}: undid step {self.step}: parameters, buffers, optimizer state, grads and RNG are as "
                f"before it (lr: {', '.join(num(lr) for lr in self.lrs)})")

    def _repr_html_(self) -> str:
        undone = [f"<details><summary>the step that was undone</summary>{self.undone._repr_html_()}</details>"] \
            if self.undone is not None else []
        return render.html_block(self.to_text(), undone)


SWEEP_COLUMNS = ["lr", "loss after", "change", ""]
SWEEP_NUMERIC = render.places(SWEEP_COLUMNS, ("lr", "loss after", "change"))


@dataclass
class SweepPoint:
    rate: float
    loss_after: float


@dataclass(repr=False)
class SweepResult(Result):
    model: str
    loss_before: float
    points: list[SweepPoint]
    suggestion: float | None
    reason: str
    notes: list[str] = field(default_factory=list)

    def _title(self) -> str:
        return (f"{self.model}: {len(self.points)} learning rates from {self.points[0].rate:.2g} to "
                f"{self.points[-1].rate:.2g}, one step each from the same weights on the same batch (all undone)")

    def _cells(self) -> list[list[str]]:
        best = min((p.loss_after for p in self.points if p.loss_after == p.loss_after), default=None)
        return [[f"{p.rate:.3g}", f"{p.loss_after:.6g}", f"{p.loss_after - self.loss_before:+.3g}",
                 "lowest" if p.loss_after == best else ""] for p in self.points]

    def _advice(self) -> list[str]:
        head = f"suggested lr: {self.suggestion:.2g}" if self.suggestion is not None else "no suggestion"
        return [f"loss before the step: {self.loss_before:.6g}", f"{head}: {self.reason}"]

    def to_text(self) -> str:
        table = render.text_table(SWEEP_COLUMNS, self._cells(), SWEEP_NUMERIC)
        return "\n".join([self._title(), table, *self._advice(), *self.notes])

    def _repr_html_(self) -> str:
        from ..plot import line_svg

        svg = line_svg([([p.rate for p in self.points], [p.loss_after for p in self.points], "loss after one step")],
                       log_x=True, x_label="learning rate", y_label="loss", hline=(self.loss_before, "loss before"),
                       vline=self.suggestion)
        table = render.html_table(SWEEP_COLUMNS, self._cells(), SWEEP_NUMERIC)
        return render.html_block(self._title(), [svg, *map(html_line, self._advice()),
                                                 f"<details><summary>every rate</summary>{table}</details>"],
                                                 self.notes)
