"""`%memory plan` / `%%trainstep --plan`'s output: a training step's memory by phase and kind (MemoryPlan)."""
from __future__ import annotations

import html
from dataclasses import dataclass, field

from .. import render
from .base import Result


@dataclass
class PlanModule:
    name: str  # qualified name; the model is its own name
    cls: str
    depth: int
    saved: int  # bytes of activations its forward (its submodules included) leaves alive for backward
    own: int  # of which made by its own code, outside its submodules


PLAN_KINDS = ("parameters", "buffers", "gradients", "optimizer state", "gathered parameters", "activations",
              "temporaries", "inputs", "DDP buckets")
_PLAN_COLORS = {"parameters": "#1f77b4", "buffers": "#aec7e8", "gradients": "#ff7f0e", "optimizer state": "#2ca02c",
                "activations": "#d62728", "temporaries": "#9467bd", "inputs": "#8c564b", "DDP buckets": "#e377c2",
                "gathered parameters": "#17becf"}
_PLAN_SHORT = {"parameters": "params", "optimizer state": "optim state", "temporaries": "temps",
               "gathered parameters": "gathered"}

MODULE_COLUMNS = ["module", "class", "saved"]  # activations saved for backward, by module
MODULE_NUMERIC = render.places(MODULE_COLUMNS, ("saved",))


@dataclass(repr=False)
class MemoryPlan(Result):
    """`%memory plan` / `%%trainstep --plan`: a training step's memory, planned on fake tensors.
    Byte counts are per device; `peak` is the most bytes alive at once during the step."""

    model: str
    target: str  # the device planned for, in words
    optimizer: str
    dtype: str
    amp: str  # "" or the autocast dtype
    batch: int | None
    parameters: int
    buffers: int
    gradients: int
    optimizer_state: int
    activations: int  # saved for backward when the forward ends
    inputs: int
    peak: int
    peak_phase: str
    peak_parts: dict[str, int]  # what is alive at the peak, by kind
    phases: dict[str, dict[str, int]]  # phase -> its own peak by kind ("total" too)
    modules: list[PlanModule] = field(default_factory=list)
    loss: str = ""
    checkpointed: list[str] = field(default_factory=list)
    budget: int | None = None
    budget_source: str = ""
    largest_batch: int | None = None
    search: str = ""  # how the largest batch was found
    devices: int = 1
    shard: str = ""
    assumptions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.peak <= self.budget

    @property
    def headroom(self) -> int | None:
        """Bytes to spare under the budget (negative: over it by that much)."""
        return None if self.budget is None else self.budget - self.peak

    def _title(self) -> str:
        what = [f"batch {self.batch:,}" if self.batch is not None else "", self.dtype,
                f"autocast {self.amp}" if self.amp else "", self.optimizer, self.target]
        if self.devices > 1:
            what.append(f"{self.shard.upper() if self.shard != 'zero2' else 'ZeRO-2'} over {self.devices} devices, per "
                        f"device")
        return f"{self.model}: a training step's memory, planned on fake tensors ({', '.join(w for w in what if w)})"

    def _verdict(self) -> str:
        line = f"peak {render.nbytes(self.peak)} in {self.peak_phase}"
        if self.budget is not None:
            source = f" ({self.budget_source})" if self.budget_source else ""
            if self.fits:
                line += (f"; budget {render.nbytes(self.budget)}{source}: fits, "
                         f"{render.nbytes(self.budget - self.peak)} to spare")
            else:
                line += (f"; budget {render.nbytes(self.budget)}{source}: does not fit, "
                         f"{render.nbytes(self.peak - self.budget)} over")
        if self.largest_batch is not None:
            line += (f"; largest batch that fits: {self.largest_batch:,}" if self.largest_batch
                     else "; not even batch 1 fits")
        return line

    def _parts(self) -> str:
        parts = [("parameters", self.parameters), ("buffers", self.buffers), ("gradients", self.gradients),
                 ("optimizer state", self.optimizer_state), ("activations", self.activations), ("inputs", self.inputs)]
        text = " · ".join(f"{k} {render.nbytes(v)}" for k, v in parts if v or k != "buffers")
        return text.replace("activations", "activations saved for backward", 1)

    def _lines(self) -> list[str]:
        lines = [self._verdict(), self._parts()]
        if self.checkpointed:
            lines.append(f"activation checkpointing: {len(self.checkpointed)} blocks ({span(self.checkpointed)})")
        return lines

    def _phase_table(self):
        kinds = [k for k in PLAN_KINDS if any(p.get(k) for p in self.phases.values())]
        columns = ["phase", "peak", *[_PLAN_SHORT.get(k, k) for k in kinds]]
        rows = [[phase + (" ◀" if phase == self.peak_phase else ""), render.nbytes(parts["total"]),
                 *[render.nbytes(parts.get(k, 0)) for k in kinds]] for phase, parts in self.phases.items()]
        return columns, rows, render.places(columns, set(columns) - {"phase"})

    def _module_cells(self, rows: list[PlanModule]) -> list[list[str]]:
        return [["  " * r.depth + r.name, r.cls, render.nbytes(r.saved)] for r in rows]

    def _notes(self) -> list[str]:
        out = []
        if self.loss:
            out.append(f"loss: {self.loss}")
        if self.search:
            out.append(f"largest batch: {self.search}")
        return out + self.assumptions + self.notes

    def to_text(self) -> str:
        columns, rows, numeric = self._phase_table()
        out = [self._title(), *self._lines(), render.text_table(columns, rows, numeric)]
        if self.modules:
            cells = self._module_cells(self.modules)
            folded = render.fold(cells, [""] * len(cells), limit=24)
            shown = [cells[i] for i in folded[0]] if folded else cells
            out += ["", "activations saved for backward, by module",
                    render.text_table(MODULE_COLUMNS, shown, MODULE_NUMERIC)]
            if folded:
                out.append(f"({len(shown)} of {len(cells)} rows, up to depth {folded[1]}: .modules has all)")
        return "\n".join(out + self._notes())

    def _repr_html_(self) -> str:
        columns, rows, numeric = self._phase_table()
        parts = [f"<div>{html.escape(line)}</div>" for line in self._lines()]
        parts += [self.chart_svg(), render.html_table(columns, rows, numeric)]
        if self.modules:
            table = render.html_table(MODULE_COLUMNS, self._module_cells(self.modules), MODULE_NUMERIC)
            parts.append(f"<details><summary>activations saved for backward, by module</summary>{table}</details>")
        return render.html_block(self._title(), parts, self._notes())

    def chart_svg(self, width: int = 440) -> str:
        """One stacked bar per phase (its peak, by kind), and the budget as a dashed line."""
        bar, gap, left, top = 16, 8, 96, 16
        kinds = [k for k in PLAN_KINDS if any(p.get(k) for p in self.phases.values())]
        scale_to = max([p["total"] for p in self.phases.values()] + [self.budget or 0, 1])
        span = width - left - 8
        height = top + len(self.phases) * (bar + gap) + 16
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
               f'style="font:10px sans-serif"><title>peak memory of each phase, by kind</title>']
        for i, (phase, parts) in enumerate(self.phases.items()):
            y = top + i * (bar + gap)
            out.append(f'<text x="{left - 4}" y="{y + bar - 4}" text-anchor="end" fill="currentColor">'
                       f'{html.escape(phase)}</text>')
            x = float(left)
            for k in kinds:
                w = span * parts.get(k, 0) / scale_to
                if w > 0:
                    out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar}" fill="{_PLAN_COLORS[k]}">'
                               f'<title>{k}: {render.nbytes(parts.get(k, 0))}</title></rect>')
                    x += w
        if self.budget:
            bx = left + span * self.budget / scale_to
            out.append(f'<line x1="{bx:.1f}" x2="{bx:.1f}" y1="{top - 4}" y2="{height - 16}" stroke="currentColor" '
                       f'stroke-dasharray="4 3"/><text x="{bx:.1f}" y="{top - 6}" text-anchor="end" '
                       f'fill="currentColor">budget {render.nbytes(self.budget)}</text>')
        legend_x = 0
        for k in kinds:
            out.append(f'<rect x="{legend_x}" y="{height - 10}" width="8" height="8" fill="{_PLAN_COLORS[k]}"/>'
                       f'<text x="{legend_x + 10}" y="{height - 3}" fill="currentColor">{_PLAN_SHORT.get(k, k)}</text>')
            legend_x += 16 + 6 * len(_PLAN_SHORT.get(k, k))
        out.append("</svg>")
        return "".join(out)


def span(names: list[str]) -> str:
    """['layers.0', ..., 'layers.31'] -> 'layers.0 … layers.31'."""
    return names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}"
