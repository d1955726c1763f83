"""`%shapes --graph`'s work: the data flow of a trace as a graph (results/graph.py holds it and
draws its text tree): module calls and shape-changing ops as nodes, the tensors between them as
edges with their shapes, containers as boxes, runs of identical blocks folded into one (×12).
Laid out by Graphviz's dot; drawn as SVG in the theme's colours.
Plain data in and out: no tensors, no modules, no IPython."""
from __future__ import annotations

import html
import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F

from .errors import TorchMagicError
from .results import ShapeFailure, ShapeRow
from .results.graph import Box, Edge, FlowGraph, Node, repeat_mark

# Ops that are layers in their own right, drawn even where they keep the shape (relu, dropout, softmax).
LAYER_OPS = frozenset(n for n, f in vars(F).items() if callable(f) and not n.startswith("_")
                      and getattr(f, "__module__", "") == F.__name__)
MAX_DRAWN = 600  # nodes: beyond this a drawing is no longer readable (and dot slow): --depth folds it
GET_DOT = ("Graphviz's dot program draws the graph and is not installed: apt-get install graphviz "
           "(conda install graphviz, brew install graphviz on a Mac), or pip install graphviz-pure; "
           "print() shows the text tree without it")


# ---------------------------------------------------------------- the graph from the trace


class _Flow:
    """The trace's rows turned into nodes, boxes and edges."""

    def __init__(self, rows: list[ShapeRow], depth: int | None):
        self.rows = rows
        self.depth = depth
        self.kids: dict[int, list[int]] = {}
        for r in rows:
            self.kids.setdefault(r.parent, []).append(r.id)
        self.end = self._ends()
        self.alias: dict[int, int] = {}  # a row of a folded block -> the same row in the run's first block
        self.repeat: dict[int, tuple[int, int]] = {}  # first block of a run -> (how many, its last block)
        self._fold()
        tops = self.kids.get(-1, [])
        # %shapes: the model's own call is the whole picture, not a box in it
        self.root = tops[0] if len(tops) == 1 and rows[tops[0]].kind == "module" and depth != 0 else None
        self.kind: dict[int, str] = {}  # row -> node | box | through (an op drawn as an edge) | none
        self.through: dict[int, str | None] = {}  # an op drawn as an edge -> the node its input came from
        self.nodes: dict[int, Node] = {}
        self.boxes: dict[int, Box] = {}
        self.edges: dict[tuple[str, str, str], Edge] = {}
        self.inputs: dict[str, Node] = {}
        self.outs: list[Node] = []

    def _ends(self) -> list[int]:
        """One past the last row of each row's subtree (a call's rows follow it, in call order)."""
        end = [r.id + 1 for r in self.rows]
        for r in reversed(self.rows):
            if r.parent >= 0:
                end[r.parent] = max(end[r.parent], end[r.id])
        return end

    def _fold(self):
        """Runs of consecutive identical calls, each fed by the one before, become their first block."""
        sig: dict[int, int] = {}
        for r in reversed(self.rows):
            sig[r.id] = hash((r.kind, r.cls, r.params, r.inputs, r.outputs, r.status,
                              tuple(sig[k] for k in self.kids.get(r.id, ()))))
        for siblings in self.kids.values():
            run: list[int] = []
            for k in siblings + [None]:
                if k is not None and run and sig[k] == sig[run[-1]] and self.rows[k].kind == "module" \
                        and any(run[-1] in chain for chain, _, _ in self.rows[k].sources):
                    run.append(k)
                    continue
                if len(run) > 1 and self._up(run[0]) == run[0]:  # (a run inside a folded block is folded with it)
                    first = run[0]
                    self.repeat[first] = (len(run), run[-1])
                    for m in run[1:]:
                        for offset in range(self.end[m] - m):
                            self.alias[m + offset] = first + offset
                run = [k] if k is not None and self.rows[k].kind == "module" else []

    def visible(self, rid: int) -> bool:
        return self.depth is None or self.rows[rid].depth <= self.depth

    def classify(self):
        """Which rows are nodes, boxes, or neither, in call order (a row's sources come before it)."""
        for r in self.rows:
            if self._up(r.id) != r.id or not self.visible(r.id):
                continue
            if r.parent >= 0 and self.kind.get(self._up(r.parent)) != "box":
                continue  # inside a call drawn closed
            if r.kind == "op":
                self._op(r)
            else:
                self.kind[r.id] = "box" if self._opens(r) else "node"

    def _up(self, rid: int) -> int:
        while rid in self.alias:
            rid = self.alias[rid]
        return rid

    def _opens(self, r: ShapeRow) -> bool:
        """Drawn as a box: a call of other modules (one made of tensor ops alone, like an activation
        or a norm written out, is one node), above --depth; the model's own call whenever it has calls."""
        kids = self.kids.get(r.id, [])
        if r.id == self.root:
            return bool(kids)
        return (self.depth is None or r.depth < self.depth) and any(self.rows[k].kind == "module" for k in kids)

    def _op(self, r: ShapeRow):
        found = [s for s in (self.resolve(chain) for chain, _, _ in r.sources) if s is not None]
        if not found and r.status == "ok":
            self.kind[r.id] = "none"  # made from parameters or constants alone: not part of the flow
            return
        first_shape = next((shape for chain, shape, _ in r.sources if self.resolve(chain)), "")
        dtypes = {d for _, _, d in r.sources}
        keep = (r.status != "ok" or len(set(found)) > 1 or r.outputs != first_shape or r.name in LAYER_OPS
                or (r.dtype and r.dtype not in dtypes))
        self.kind[r.id] = "node" if keep else "through"
        if not keep:
            self.through[r.id] = found[0]

    def resolve(self, chain: tuple[int, ...]) -> str | None:
        """The node a tensor came from: the outermost producer drawn closed, looking inside boxes."""
        if chain[0] < 0:
            return f"in{-chain[0]}"
        for rid in chain:
            rid = self._up(rid)
            while rid >= 0 and rid not in self.kind:  # hidden below --depth, or inside a closed node
                rid = self._up(self.rows[rid].parent)
            kind = self.kind.get(rid)
            if kind == "box":
                continue
            if kind == "node":
                return f"r{rid}"
            if kind == "through":
                return self.through[rid]
            return None
        return None

    def build(self, trace) -> FlowGraph:
        self.classify()
        box_of = self._box_of()
        for r in self.rows:
            kind = self.kind.get(r.id)
            if kind == "box" and r.id != self.root:
                count = self.repeat.get(r.id, (1, r.id))
                self.boxes[r.id] = Box(f"r{r.id}", self._fold_name(r), r.cls, box_of(r.id), count[0],
                                       "open" if r.status != "ok" else "ok")
            elif kind == "node":
                count = self.repeat.get(r.id, (1, r.id))
                shape = r.outputs if r.status == "ok" else ("✗ raised" if r.status == "failed" else "…")
                self.nodes[r.id] = Node(f"r{r.id}", self._fold_name(r), r.cls, r.kind, shape, box_of(r.id),
                                        "failed" if self._failed(r) else "ok", count[0])
        for rid in self.nodes:
            for chain, shape, dtype in self.rows[rid].sources:
                self._edge(chain, f"r{rid}", shape, dtype)
        self._outputs()
        nodes = [*self.inputs.values(), *(self.nodes[k] for k in sorted(self.nodes)), *self.outs]
        self._dtypes()
        return FlowGraph(trace.model, nodes, list(self.edges.values()), [self.boxes[k] for k in sorted(self.boxes)],
                         trace.failure, trace.mode, self.depth)

    def _failed(self, r: ShapeRow) -> bool:
        """Failed, or holding the failed call inside (drawn closed at this depth)."""
        return r.status == "failed" or any(self.rows[k].status == "failed" for k in range(r.id, self.end[r.id]))

    def _fold_name(self, r: ShapeRow) -> str:
        count = self.repeat.get(r.id)
        return f"{r.name} … {self.rows[count[1]].name}" if count else r.name

    def _box_of(self):
        def box_of(rid: int) -> str:
            parent = self.rows[rid].parent
            while parent >= 0:
                parent = self._up(parent)
                if self.kind.get(parent) == "box" and parent != self.root:
                    return f"r{parent}"
                parent = self.rows[parent].parent
            return ""
        return box_of

    def _edge(self, chain, target: str, shape: str, dtype: str):
        source = self.resolve(chain)
        if source is None or source == target:
            return
        if source.startswith("in") and source not in self.inputs:
            self.inputs[source] = Node(source, "input", "input", "input", shape)
        self.edges.setdefault((source, target, shape), Edge(source, target, shape, dtype))

    def _outputs(self):
        """What the top-level calls returned that no later call used: the outputs."""
        used = {k for r in self.rows for chain, _, _ in r.sources for k in chain}
        for top in self.kids.get(-1, []):
            r = self.rows[top]
            if top in used or r.status != "ok":
                continue
            target = f"out{len(self.outs) + 1}"
            before = len(self.edges)
            if r.kind == "op":
                self._edge((top,), target, r.outputs, r.dtype)
            for chain, shape, dtype in r.results:
                self._edge(chain, target, shape, dtype)
            if len(self.edges) > before:
                shapes = ", ".join(e.shape for e in list(self.edges.values())[before:])
                self.outs.append(Node(target, "output", "output", "output", shapes))

    def _dtypes(self):
        """A dtype is shown on an input's first edge and where it changes: on an edge whose dtype is
        not one its source received."""
        received: dict[str, set[str]] = {}
        for e in self.edges.values():
            received.setdefault(e.target, set()).add(e.dtype)
        labelled = set()
        for e in self.edges.values():
            if e.source.startswith("in"):  # an input's dtype, on its first edge
                e.dtype = "" if e.source in labelled else e.dtype
                labelled.add(e.source)
            elif e.dtype in received.get(e.source, {e.dtype}):
                e.dtype = ""


def build_graph(trace, depth: int | None = None) -> FlowGraph:
    """The graph of a ShapeTrace (its `flow` rows), down to `depth` (None: every level)."""
    if depth is not None and depth < 0:
        raise TorchMagicError(f"depth {depth} is negative: give 0 (the model alone) or more, e.g. depth=2")
    return _Flow(trace.flow, depth).build(trace)


# ---------------------------------------------------------------- layout (Graphviz's dot)

CHAR = 7.2  # px per character of the 12 px monospace font the drawing uses
SMALL = 6.0  # px per character at 10 px (edge labels, ops, box titles)
LINE = 15


@dataclass
class Placed:
    """Where dot put things, in px, y downwards."""

    width: float
    height: float
    nodes: dict[str, tuple[float, float, float, float]]  # id -> centre x, y, width, height
    boxes: dict[str, tuple[float, float, float, float]]  # id -> x, y, width, height
    edges: list[tuple[Edge, list[tuple[float, float]], tuple[float, float] | None, tuple[float, float] | None]]
    note: tuple[float, float, float, float] | None = None  # the failure's explanation


def _short(graph: FlowGraph) -> dict[str, str]:
    """Names inside a box without the box's own prefix: `q_proj` in the box `layers.0.self_attn`."""
    names = {b.id: b.name for b in graph.boxes}
    short = {}
    items: list[Box | Node] = [*graph.boxes, *graph.nodes]
    for item in items:
        prefix = names.get(item.box, "").split(" … ")[0] + "."
        short[item.id] = item.name[len(prefix):] if prefix != "." and item.name.startswith(prefix) else item.name
    return short


def _label(n: Node, name: str) -> tuple[list[str], float]:
    """The lines of a node's label and its width in px."""
    if n.kind in ("op", "input", "output"):
        return [name], len(name) * SMALL + 18
    lines = [name, n.cls + repeat_mark(n.repeat)]
    return lines, max(len(lines[0]) * CHAR, len(lines[1]) * SMALL) + 20


def _note_lines(failure: ShapeFailure) -> list[str]:
    lines = []
    for text in failure.lines()[1:]:
        lines += textwrap.wrap(text.strip(), 46, subsequent_indent="  ")
    return lines


def _dot_source(graph: FlowGraph) -> str:
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    short = _short(graph)
    out = ['digraph flow {',
           'graph [rankdir=TB, nodesep=0.3, ranksep=0.32, newrank=true, fontname="Courier", fontsize=10];',
           'node [shape=box, fixedsize=true, label=""];', 'edge [fontname="Courier", fontsize=10, arrowsize=0.7];']
    inside: dict[str, list[str]] = {}
    for n in graph.nodes:
        _, width = _label(n, short[n.id])
        height = 22 if n.kind in ("op", "input", "output") else 34
        inside.setdefault(n.box, []).append(f"{q(n.id)} [width={width / 72:.3f}, height={height / 72:.3f}];")
    failed = next((n for n in graph.nodes if n.status == "failed"), None)
    if failed is not None and graph.failure is not None:
        lines = _note_lines(graph.failure)
        width = max(len(s) for s in lines) * SMALL + 16
        inside.setdefault(failed.box, []).append(
            f'"note" [width={width / 72:.3f}, height={(len(lines) * LINE + 10) / 72:.3f}];'
            f'{{rank=same; {q(failed.id)}; "note"}}')
    kids: dict[str, list[Box]] = {}
    for b in graph.boxes:
        kids.setdefault(b.box, []).append(b)

    def emit(box_id: str):
        out.extend(inside.get(box_id, []))
        for b in kids.get(box_id, []):
            title = short[b.id] + "  " + b.cls + repeat_mark(b.repeat)
            out.append(f'subgraph {q("cluster_" + b.id)} {{ label={q(title)}; labeljust=l; margin=10;')
            emit(b.id)
            out.append("}")

    emit("")
    for e in graph.edges:
        label = e.shape + (f" {e.dtype}" if e.dtype else "")
        out.append(f"{q(e.source)} -> {q(e.target)} [label={q(label)}];")
    if failed is not None and graph.failure is not None:
        out.append(f'{q(failed.id)} -> "note" [style=dashed, arrowhead=none, constraint=false];')
    out.append("}")
    return "\n".join(out)


def _points(text: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in (p.split(",")[-2:] for p in text.split())]


def find_dot() -> str | None:
    """Graphviz's dot, or graphviz-pure's port of it (a pip package: its program lands beside this
    Python, which a notebook kernel may not have on its PATH)."""
    scripts = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    for name in ("dot", "graphviz-pure"):
        found = shutil.which(name) or next(filter(None, (shutil.which(name, path=p) for p in scripts)), None)
        if found:
            return found
    return None


def layout(graph: FlowGraph) -> Placed:
    """Positions from Graphviz's dot (as JSON); a one-line TorchMagicError without it."""
    dot = find_dot()
    if dot is None:
        raise TorchMagicError(GET_DOT)
    if len(graph.nodes) > MAX_DRAWN:
        raise TorchMagicError(f"{len(graph.nodes)} nodes are too many to draw legibly: a smaller --depth "
                              f"(e.g. --depth 2) draws the blocks closed")
    try:
        done = subprocess.run([dot, "-Tjson"], input=_dot_source(graph), capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise TorchMagicError("Graphviz's dot took over 2 minutes on this graph: a smaller --depth draws it") from None
    if done.returncode != 0:
        raise TorchMagicError(f"Graphviz's dot failed: "
                              f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    data = json.loads(done.stdout)
    height = float(data["bb"].split(",")[3])

    def flip(p):
        return p[0], height - p[1]

    names, nodes, boxes, note = {}, {}, {}, None
    for obj in data.get("objects", []):
        if "bb" in obj and obj.get("name", "").startswith("cluster_"):
            x0, y0, x1, y1 = (float(v) for v in obj["bb"].split(","))
            boxes[obj["name"][len("cluster_"):]] = (x0, height - y1, x1 - x0, y1 - y0)
        elif "pos" in obj:
            names[obj["_gvid"]] = obj["name"]
            x, y = flip(_points(obj["pos"])[0])
            placed = (x, y, float(obj["width"]) * 72, float(obj["height"]) * 72)
            if obj["name"] == "note":
                note = placed
            else:
                nodes[obj["name"]] = placed
    by_ends = {(e.source, e.target, e.shape + (f" {e.dtype}" if e.dtype else "")): e for e in graph.edges}
    edges = []
    for obj in data.get("edges", []):
        edge = by_ends.get((names.get(obj["tail"], ""), names.get(obj["head"], ""), obj.get("label", "")))
        if edge is None:
            continue
        parts = obj["pos"].split()
        tip = next((flip(_points(p)[0]) for p in parts if p.startswith("e,")), None)
        spline = [flip(p) for p in _points(" ".join(p for p in parts if p[:2] not in ("e,", "s,")))]
        label = flip(_points(obj["lp"])[0]) if "lp" in obj else None
        edges.append((edge, spline, tip, label))
    return Placed(float(data["bb"].split(",")[2]), height, nodes, boxes, edges, note)


# ---------------------------------------------------------------- SVG

# Colours follow the page: currentColor (the output's text colour, light or dark), the theme's error
# and brand colours where JupyterLab, Notebook 7 or VS Code define them, fixed ones elsewhere.
_SVG_STYLE = (
    ".tm-graph{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,'DejaVu Sans Mono','Liberation Mono',monospace;"
    "font-size:12px}"
    ".tm-graph text{fill:currentColor;dominant-baseline:central}"
    ".tm-graph .small{font-size:10px}"
    ".tm-graph .dim{fill-opacity:.72}"
    ".tm-graph .node rect{fill:currentColor;fill-opacity:.07;stroke:currentColor;stroke-opacity:.6}"
    ".tm-graph .op rect{fill-opacity:.03;stroke-opacity:.45}"
    ".tm-graph .io rect{fill:var(--jp-brand-color1,var(--vscode-textLink-foreground,#1976d2));fill-opacity:.16;"
    "stroke:var(--jp-brand-color1,var(--vscode-textLink-foreground,#1976d2));stroke-opacity:.9}"
    ".tm-graph .box>rect{fill:currentColor;fill-opacity:.025;stroke:currentColor;stroke-opacity:.35;stroke-dasharray:4 "
    "3}"
    ".tm-graph .repeat>rect{stroke-dasharray:none;stroke-width:2;stroke-opacity:.5}"
    ".tm-graph .edge path{fill:none;stroke:currentColor;stroke-opacity:.55;stroke-width:1.2}"
    ".tm-graph .edge polygon{fill:currentColor;fill-opacity:.55}"
    ".tm-graph .edge text{fill-opacity:.85}"
    ".tm-graph .failed rect,.tm-graph .note rect{stroke:var(--jp-error-color1,var(--vscode-errorForeground,#d32f2f));"
    "stroke-opacity:1;stroke-width:2;fill:var(--jp-error-color1,var(--vscode-errorForeground,#d32f2f));fill-opacity:.12}"
    ".tm-graph .note rect{stroke-dasharray:4 3;stroke-width:1;fill-opacity:.06}"
    ".tm-graph .failed text,.tm-graph .note text{fill:var(--jp-error-color1,var(--vscode-errorForeground,#d32f2f));"
    "fill-opacity:1;font-weight:bold}"
    ".tm-graph .note text{font-weight:normal}"
    ".tm-graph .bold{font-weight:bold}"
    ".tm-graph .note line{stroke:var(--jp-error-color1,var(--vscode-errorForeground,#d32f2f))}"
)


def _text(x: float, y: float, text: str, cls: str = "", anchor: str = "middle") -> str:
    klass = f' class="{cls}"' if cls else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{klass}>{html.escape(text)}</text>'


def draw(graph: FlowGraph, placed: Placed) -> str:
    pad = 4
    width, height = placed.width + 2 * pad, placed.height + 2 * pad
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="tm-graph" viewBox="{-pad} {-pad} {width:.0f} {height:.0f}" '
           f'width="{width:.0f}" height="{height:.0f}" style="max-width:100%;height:auto" role="img">',
           f"<title>{html.escape(graph._title())}</title><style>{_SVG_STYLE}</style>"]
    boxes, short = {b.id: b for b in graph.boxes}, _short(graph)
    for box_id, (x, y, w, h) in placed.boxes.items():
        b, name = boxes[box_id], short[box_id]
        cls = "box repeat" if b.repeat > 1 else "box"
        out.append(f'<g class="{cls}"><rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="6"/>'
                   + _text(x + 6, y + 9, name, "small bold", "start")
                   + _text(x + 6 + (len(name) + 2) * SMALL, y + 9, b.cls + repeat_mark(b.repeat), "small dim", "start")
                   + "</g>")
    for edge, spline, tip, label in placed.edges:
        path = f"M{spline[0][0]:.1f},{spline[0][1]:.1f}" + "".join(
            f"C{a[0]:.1f},{a[1]:.1f} {b[0]:.1f},{b[1]:.1f} {c[0]:.1f},{c[1]:.1f}"
            for a, b, c in zip(spline[1::3], spline[2::3], spline[3::3], strict=False))
        parts = [f'<g class="edge"><path d="{path}"/>']
        if tip is not None:
            parts.append(_arrow(spline[-1], tip))
        if label is not None:
            parts.append(_text(label[0], label[1], edge.shape + (f" {edge.dtype}" if edge.dtype else ""), "small"))
        out.append("".join(parts) + "</g>")
    for n in graph.nodes:
        x, y, w, h = placed.nodes[n.id]
        kind = {"input": "node io", "output": "node io", "op": "node op"}.get(n.kind, "node")
        cls = kind + (" failed" if n.status == "failed" else "")
        lines, _ = _label(n, short[n.id])
        rx = h / 2 if n.kind != "module" else 4
        parts = [f'<g class="{cls}"><rect x="{x - w / 2:.1f}" y="{y - h / 2:.1f}" width="{w:.1f}" height="{h:.1f}" '
                 f'rx="{rx:.1f}"/>']
        if len(lines) == 1:
            parts.append(_text(x, y, lines[0], "small"))
        else:
            parts.append(_text(x, y - 7, lines[0]) + _text(x, y + 8, lines[1], "small dim"))
        out.append("".join(parts) + "</g>")
    if placed.note is not None and graph.failure is not None:
        x, y, w, h = placed.note
        lines = _note_lines(graph.failure)
        top = y - h / 2
        fx, fy, fw, _ = next(placed.nodes[n.id] for n in graph.nodes if n.status == "failed")
        start, end = (fx + fw / 2, x - w / 2) if x > fx else (fx - fw / 2, x + w / 2)
        out.append(f'<g class="note"><line x1="{start:.1f}" y1="{fy:.1f}" x2="{end:.1f}" y2="{fy:.1f}" '
                   f'stroke-dasharray="4 3"/><rect x="{x - w / 2:.1f}" y="{top:.1f}" width="{w:.1f}" height="{h:.1f}" '
                   f'rx="4"/>'
                   + "".join(_text(x - w / 2 + 8, top + 5 + LINE * (i + 0.5), s, "small", "start")
                             for i, s in enumerate(lines))
                   + "</g>")
    out.append("</svg>")
    return "".join(out)


def _arrow(start: tuple[float, float], tip: tuple[float, float]) -> str:
    (x0, y0), (x1, y1) = start, tip
    dx, dy = x1 - x0, y1 - y0
    length = (dx * dx + dy * dy) ** 0.5 or 1
    ux, uy = dx / length, dy / length
    half = 3.5
    a = (x0 - uy * half, y0 + ux * half)
    b = (x0 + uy * half, y0 - ux * half)
    return f'<polygon points="{x1:.1f},{y1:.1f} {a[0]:.1f},{a[1]:.1f} {b[0]:.1f},{b[1]:.1f}"/>'
