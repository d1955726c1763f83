"""`%shapes --graph`'s output: the data flow as nodes, edges and boxes (FlowGraph), shown as an SVG
drawing in a notebook (graph.py lays it out with Graphviz and draws it) and as a text tree in the
terminal."""
from __future__ import annotations

import html
from dataclasses import dataclass, field

from .. import render
from ..errors import TorchMagicError
from .base import Result, named
from .shapes import ShapeFailure


@dataclass
class Node:
    id: str  # "r12" (row 12 of the trace), "in1" (the first input), "out1"
    name: str  # conv1, view, "h.0 … h.11", input
    cls: str  # Conv2d, op, input, output
    kind: str  # module | op | input | output
    shape: str  # what it outputs
    box: str = ""  # the id of the box it sits in ("": none)
    status: str = "ok"  # ok | failed
    repeat: int = 1  # a folded run of identical blocks: how many


@dataclass
class Edge:
    source: str
    target: str
    shape: str
    dtype: str = ""  # where the dtype changes (and at the inputs); "" elsewhere


@dataclass
class Box:
    """A module call drawn open: its calls inside it."""

    id: str
    name: str
    cls: str
    box: str = ""  # the box around this one
    repeat: int = 1
    status: str = "ok"  # ok | open (the failure is inside it)


@dataclass(repr=False)
class FlowGraph(Result):
    model: str
    nodes: list[Node]
    edges: list[Edge]
    boxes: list[Box] = field(default_factory=list)
    failure: ShapeFailure | None = None
    mode: str = "real"
    depth: int | None = None
    notes: list[str] = field(default_factory=list)

    def node(self, name: str) -> Node:
        """The first node with this (qualified) name."""
        return named(self.nodes, name)

    def into(self, name: str) -> list[Edge]:
        """The edges into the node with this name."""
        target = self.node(name).id
        return [e for e in self.edges if e.target == target]

    def _title(self) -> str:
        folded = sum(n.repeat > 1 for n in self.nodes) + sum(b.repeat > 1 for b in self.boxes)
        what = f"{len(self.nodes)} nodes, {len(self.edges)} edges"
        what += f", {folded} run{'s' if folded > 1 else ''} of repeated blocks folded" if folded else ""
        return f"{self.model}: data flow, {what} ({self.mode} mode{', failed' if self.failure else ''})"

    def _notes(self) -> list[str]:
        return [*self.notes,
                *([f"--depth {self.depth}: deeper calls are inside their boxes"] if self.depth is not None else [])]

    # ------------------------------------------------------------ text

    def to_text(self) -> str:
        """A tree of the flow: boxes as headings, each node with its output shape and, where its
        input is not the line above, where it comes from."""
        names = {n.id: n.name for n in self.nodes}
        boxes = {b.id: b for b in self.boxes}
        sources: dict[str, list[str]] = {}
        for e in self.edges:
            sources.setdefault(e.target, []).append(names[e.source])
        cells: list[list[str]] = []
        open_boxes: list = []
        previous = None
        for n in self.nodes:
            chain: list = []
            b = n.box
            while b:
                chain.insert(0, b)
                b = boxes[b].box
            while open_boxes and open_boxes != chain[:len(open_boxes)]:
                open_boxes.pop()
            for b in chain[len(open_boxes):]:
                box = boxes[b]
                cells.append(["  " * len(open_boxes) + box.name, box.cls + repeat_mark(box.repeat), "", ""])
                open_boxes.append(b)
            came = sources.get(n.id, [])
            origin = "" if came == [previous] else ", ".join(dict.fromkeys(came))
            mark = "✗ " if n.status == "failed" else ""
            cls = "" if n.kind in ("op", "input", "output") else n.cls + repeat_mark(n.repeat)
            cells.append(["  " * len(chain) + mark + n.name, cls, origin, n.shape])
            previous = n.name
        parts = [self._title(), render.text_table(["node", "class", "from", "output"], cells)]
        if self.failure:
            parts += ["", *self.failure.lines()]
        return "\n".join(parts + self._notes())

    # ------------------------------------------------------------ drawing

    def svg(self) -> str:
        """The graph as an SVG document (colours from the page: currentColor and the theme's variables)."""
        from ..graph import draw, layout

        return draw(self, layout(self))

    def save(self, path: str) -> str:
        """Write the drawing to a .svg file; returns the path."""
        if not str(path).endswith(".svg"):
            raise TorchMagicError(f"{path!r}: give a file name ending in .svg, e.g. t.graph().save('net.svg')")
        text = self.svg()
        with open(path, "w", encoding="utf-8") as f:
            f.write('<?xml version="1.0" encoding="UTF-8"?>\n' + text)
        return str(path)

    def _repr_html_(self) -> str:
        try:
            picture = f'<div class="tm-graph-view">{self.svg()}</div>'
        except TorchMagicError as e:  # no dot, or too big to draw: the text tree, and how to get the picture
            picture = f'<pre class="tm-graph-text">{html.escape(self.to_text())}</pre>'
            return render.html_block(self._title(), [picture], [str(e)])
        return render.html_block(self._title(), [picture], self._notes())  # the failure's why and fix are drawn


def repeat_mark(repeat: int) -> str:
    """' ×12' after a folded run of 12 identical blocks, '' after one."""
    return f" ×{repeat}" if repeat > 1 else ""
