"""`%device`'s output: the devices this process sees (DeviceReport) and what a move did (MoveReport)."""
from __future__ import annotations

from dataclasses import dataclass

from .. import render
from .base import Result


@dataclass
class CudaInfo:
    index: int
    name: str
    capability: str
    used: int
    reserved: int
    total: int
    current: bool
    allocated: int = 0  # by torch's caching allocator in this process


@dataclass(repr=False)
class DeviceReport(Result):
    torch_version: str
    cpu_threads: int
    cpu_interop_threads: int
    cuda: list[CudaInfo]
    cuda_note: str  # why there is no CUDA; "" where it cannot exist (macOS)
    mps: str  # "" where it cannot exist (anywhere but macOS)
    selected: str
    default_dtype: str
    default_device: str

    def _rows(self) -> list[list[str]]:
        rows = [["cpu", f"{self.cpu_threads} threads ({self.cpu_interop_threads} inter-op)", "available"]]
        for c in self.cuda:
            mem = (f"{render.nbytes(c.used)} used / {render.nbytes(c.total)} "
                   f"(torch allocated {render.nbytes(c.allocated)}, reserved {render.nbytes(c.reserved)})")
            rows.append([f"cuda:{c.index}", f"{c.name}, capability {c.capability}, {mem}",
                         "current" if c.current else "available"])
        if not self.cuda and self.cuda_note:
            rows.append(["cuda", self.cuda_note, "not available"])
        if self.mps:
            rows.append(["mps", "Apple GPU", self.mps])
        return rows

    def _footer(self) -> list[str]:
        return [
            f"selected device: {self.selected}",
            f"default dtype: {self.default_dtype}   default device: {self.default_device}   torch {self.torch_version}",
        ]

    def to_text(self) -> str:
        return "\n".join([render.text_table(["device", "details", "status"], self._rows()), *self._footer()])

    def _repr_html_(self) -> str:
        return render.html_block("devices", [render.html_table(["device", "details", "status"], self._rows())],
                                 self._footer())


@dataclass(repr=False)
class MoveReport(Result):
    device: str
    moved: list[tuple[str, str]]  # (name, what happened)

    def to_text(self) -> str:
        lines = [f"selected {self.device} (bound to `device`)"]
        lines += [f"  {name}: {what}" for name, what in self.moved]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        table = render.html_table(["name", "moved"], [list(m) for m in self.moved]) if self.moved else ""
        return render.html_block(f"selected {self.device} (bound to `device`)", [table])
