"""Plain-data result objects, one module per magic. They hold strings and numbers only (never tensors
or modules), so keeping a result never keeps a model or its memory alive. Each renders itself: text in
the terminal (`_repr_pretty_`, `repr`), HTML in Jupyter (`_repr_html_`); base.py holds what they share.

    shapes.py     %shapes           ShapeTrace, ShapeRow, ShapeFailure, ExplainedError
    graph.py      %shapes --graph   FlowGraph, Node, Edge, Box
    summary.py    %summary          ParamSummary, ParamRow
    device.py     %device           DeviceReport, CudaInfo, MoveReport
    trainstep.py  %%trainstep       StepResult, ParamStep, UndoResult, SweepResult, SweepPoint
    memory.py     %memory           CellMemory, MemoryHistory, MemoryRelease, MemoryStatus
    plan.py       %memory plan      MemoryPlan, PlanModule
    freeze.py     %freeze/unfreeze  FreezeReport, FreezeRow
"""
from .base import Result
from .device import CudaInfo, DeviceReport, MoveReport
from .freeze import FreezeReport, FreezeRow
from .graph import Box, Edge, FlowGraph, Node
from .memory import CellMemory, MemoryHistory, MemoryRelease, MemoryStatus
from .plan import PLAN_KINDS, MemoryPlan, PlanModule, span
from .shapes import ExplainedError, ShapeFailure, ShapeRow, ShapeTrace
from .summary import ParamRow, ParamSummary
from .trainstep import BLOWUP_LOSS, BLOWUP_RATIO, ParamStep, StepResult, SweepPoint, SweepResult, UndoResult

__all__ = [
    "BLOWUP_LOSS", "BLOWUP_RATIO", "PLAN_KINDS", "Box", "CellMemory", "CudaInfo", "DeviceReport", "Edge",
    "ExplainedError", "FlowGraph", "FreezeReport", "FreezeRow", "MemoryHistory", "MemoryPlan", "MemoryRelease",
    "MemoryStatus", "MoveReport", "Node", "ParamRow", "ParamStep", "ParamSummary", "PlanModule", "Result",
    "ShapeFailure", "ShapeRow", "ShapeTrace", "StepResult", "SweepPoint", "SweepResult", "UndoResult", "span",
]
