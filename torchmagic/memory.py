"""Per-cell memory accounting: what a cell left allocated and its peak, on CUDA, MPS and the CPU.

No IPython here: `CellReporter` (what `%memory on` turns on) registers `CellMeter.begin()` /
`CellMeter.end()` on the shell's pre_run_cell / post_run_cell events, and magics.py hands it
IPython's display. A record holds numbers and strings only, never a tensor.

What can be measured honestly:
- CUDA: torch's caching allocator counts every byte it hands out; the peak is
  `max_memory_allocated` after `reset_peak_memory_stats` at the cell's start. Nothing is
  asked of CUDA before the user's own code has initialised it (that would create a context).
- MPS: `torch.mps.current_allocated_memory()` before and after; torch keeps no MPS peak.
- CPU: the process's resident set size (RSS), which also counts Python objects, libraries and
  freed memory the allocator has not returned. On Linux the kernel's high-water mark (VmHWM) can
  be reset per cell (/proc/self/clear_refs), which gives the true peak RSS during the cell.
  Elsewhere only `ru_maxrss` exists, which never goes down: a cell's peak is then known only
  when the cell raised the process's peak.
"""
from __future__ import annotations

import collections
import gc
import itertools
import os
import resource
import sys
from typing import Callable

import torch
from torch import nn

from .render import nbytes
from .results import CellMemory, MemoryHistory, MemoryRelease, MemoryStatus


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_built() and mps.is_available())


class _ProcFile:
    """An open /proc/self file, re-read in place: about 1 µs instead of 10 for open+read+close."""

    def __init__(self, name: str, mode: int):
        self.fd = os.open(f"/proc/self/{name}", mode)

    def read(self) -> bytes:
        return os.pread(self.fd, 4096, 0)

    def close(self):
        os.close(self.fd)


class ResidentSize:
    """The process's resident set size now, and its peak since the last reset where the OS allows it."""

    def __init__(self):
        self._statm = self._status = self._clear = None
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        try:
            self._statm = _ProcFile("statm", os.O_RDONLY)
            self._status = _ProcFile("status", os.O_RDONLY)
            self._clear = _ProcFile("clear_refs", os.O_WRONLY)
            os.write(self._clear.fd, b"5")  # 5: reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        except OSError:
            if self._clear is not None:
                self._clear.close()
                self._clear = None
        # "cell": the peak is reset at each cell's start; "process": ru_maxrss, which only grows.
        self.peak_kind = "cell" if self._clear is not None else "process"

    def close(self):
        for f in (self._statm, self._status, self._clear):
            if f is not None:
                f.close()
        self._statm = self._status = self._clear = None

    def now(self) -> int | None:
        if self._statm is not None:
            return int(self._statm.read().split()[1]) * self.page
        return _psutil_rss()

    def reset_peak(self):
        if self._clear is not None:
            os.write(self._clear.fd, b"5")

    def peak(self) -> int:
        if self._clear is not None:
            data = self._status.read()
            start = data.index(b"VmHWM:") + 6
            return int(data[start:data.index(b"kB", start)]) * 1024
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


def _psutil_rss() -> int | None:
    try:
        import psutil  # optional: the only portable way to read the current RSS outside Linux
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


class CellMeter:
    """Measures one cell at a time: begin() at the cell's start, end() after it."""

    def __init__(self):
        self.rss = ResidentSize()
        self.mps = _mps_available()
        self._started = False
        self._device = ""
        self._dev_before = None
        self._rss_before = None
        self._rss_peak_before = 0

    def close(self):
        self.rss.close()

    def describe(self) -> list[str]:
        """What this meter measures here, in words, for `%memory on`."""
        if torch.cuda.is_available():
            dev = "CUDA: allocated by torch after each cell and its peak during the cell"
        elif self.mps:
            dev = "MPS: allocated by torch after each cell (torch keeps no MPS peak)"
        else:
            dev = "no GPU: CPU only"
        if self.rss.peak_kind == "cell":
            cpu = "CPU: the process's resident size (RSS) after each cell and its peak during the cell"
        else:
            cpu = ("CPU: the process's resident size (RSS); this OS keeps only the process's lifetime peak, "
                   "so a cell's peak shows only when it raised that")
        return [dev, cpu]

    def begin(self, prefer: str | None = None):
        self._device, self._dev_before = "", None
        if torch.cuda.is_initialized():  # never create a CUDA context the user has not
            index = _cuda_index(prefer)
            torch.cuda.reset_peak_memory_stats(index)
            self._device, self._dev_before = f"cuda:{index}", torch.cuda.memory_allocated(index)
        elif self.mps:
            self._device, self._dev_before = "mps", torch.mps.current_allocated_memory()
        self._rss_before = self.rss.now()
        if self.rss.peak_kind == "cell":
            self.rss.reset_peak()
        else:
            self._rss_peak_before = self.rss.peak()
        self._started = True

    def end(self, cell: int | None, source: str, error: BaseException | None = None) -> CellMemory | None:
        """The record of the cell begun last, or None when no cell was begun (e.g. an empty cell)."""
        if not self._started:
            return None
        self._started = False
        device, dev_before, dev_after, dev_peak = self._device, self._dev_before, None, None
        if device.startswith("cuda") or (not device and torch.cuda.is_initialized()):
            index = int(device[5:]) if device else torch.cuda.current_device()
            device = f"cuda:{index}"
            dev_before = dev_before or 0  # CUDA was initialised during the cell: it held nothing before
            dev_after = torch.cuda.memory_allocated(index)
            dev_peak = torch.cuda.max_memory_allocated(index)
        elif device == "mps":
            dev_after = torch.mps.current_allocated_memory()
        rss_after = self.rss.now()
        rss_peak = self.rss.peak()
        if self.rss.peak_kind == "process" and rss_peak <= self._rss_peak_before:
            rss_peak = None  # the cell did not raise the lifetime peak: its own peak is unknown
        held_count, held_bytes = tensors_held_by(error) if error is not None else (0, 0)
        first = source.lstrip().partition("\n")[0].rstrip()
        return CellMemory(
            cell=cell, source=first[:60], failed=error is not None, device=device,
            dev_before=dev_before, dev_after=dev_after, dev_peak=dev_peak,
            rss_before=self._rss_before, rss_after=rss_after, rss_peak=rss_peak, rss_peak_kind=self.rss.peak_kind,
            held_tensors=held_count, held_bytes=held_bytes,
        )


def _cuda_index(prefer: str | None) -> int:
    if prefer and prefer.startswith("cuda:"):
        index = int(prefer[5:])
        if index < torch.cuda.device_count():
            return index
    return torch.cuda.current_device()


# ---------------------------------------------------------------- memory kept alive by an error


def _tracebacks(error: BaseException | None):
    """The tracebacks of an exception and of its causes and contexts."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if error.__traceback__ is not None:
            yield error.__traceback__
        error = error.__cause__ or error.__context__


def _frames(error: BaseException | None) -> list:
    frames = []
    for tb in _tracebacks(error):
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
    return frames


def _tensors_in(value):
    """Tensors in a value: itself, or directly inside a list, tuple or dict."""
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, (list, tuple)):
        return ()
    # A huge list of numbers is not worth the wait.
    return [v for v in itertools.islice(value, 10_000) if isinstance(v, torch.Tensor)]


def _namespace_storages(namespace: dict) -> set:
    """Storages the namespace keeps alive anyway: its tensors, and its models' and optimizers'."""
    keys: set = set()
    for value in list(namespace.values()):
        if isinstance(value, nn.Module):
            tensors = [*value.parameters(), *value.buffers(),
                       *(p.grad for p in value.parameters() if p.grad is not None)]
        elif isinstance(value, torch.optim.Optimizer):
            tensors = [t for state in value.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        else:
            tensors = _tensors_in(value)
        keys.update(_storage(t)[0] for t in tensors)
    return keys


def tensors_held_by(error: BaseException | None) -> tuple[int, int]:
    """How many tensors, and how many bytes of their storage, only the traceback of a failed call
    keeps alive.

    Counts the local variables of every function frame in the traceback (and tensors directly in a
    list, tuple or dict there), each storage once, leaving out what the namespaces of those frames
    hold anyway (their tensors, models and optimizers). Some may be referenced elsewhere too."""
    frames = _frames(error)
    namespaces = {id(f.f_globals): f.f_globals for f in frames}
    known = set().union(*(_namespace_storages(ns) for ns in namespaces.values())) if frames else set()
    storages: dict[tuple, int] = {}
    for frame in frames:
        if frame.f_locals is frame.f_globals:  # a cell's own top level is the namespace
            continue
        for value in list(frame.f_locals.values()):
            if id(value) in namespaces:  # e.g. a function handed the user's namespace
                continue
            for t in _tensors_in(value):
                key, size = _storage(t)
                if key is not None and key not in known:
                    storages[key] = size
    return len(storages), sum(storages.values())


def _storage(t: torch.Tensor) -> tuple[tuple | None, int]:
    try:
        s = t.untyped_storage()
        return (str(t.device), s.data_ptr()), s.nbytes()
    except Exception:  # tensor subclasses and fake tensors may have no real storage
        return None, 0


def _clear_frames(tb):
    """traceback.clear_frames, and also the snapshot of locals that reading f_locals leaves on a
    function's frame before Python 3.13 (the traceback printer reads it, and frame.clear() keeps it)."""
    while tb is not None:
        frame = tb.tb_frame
        snapshot = frame.f_locals
        try:
            frame.clear()
        except RuntimeError:  # a frame still executing keeps its locals
            tb = tb.tb_next
            continue
        if type(snapshot) is dict and snapshot is not frame.f_globals:
            snapshot.clear()
        tb = tb.tb_next


def _allocated() -> tuple[str, int | None]:
    if torch.cuda.is_initialized():
        index = torch.cuda.current_device()
        return f"cuda:{index}", torch.cuda.memory_allocated(index)
    if _mps_available():
        return "mps", torch.mps.current_allocated_memory()
    return "", None


def release(errors: list[BaseException | None]) -> MemoryRelease:
    """Free what failed calls keep alive: clear the local variables of their frames (so every holder
    of the traceback, the debugger's included, lets go of them), forget Python's record of the last
    error, collect garbage and hand cached GPU memory back to the driver."""
    sys_errors = [getattr(sys, n, None) for n in ("last_value", "last_exc")]
    errors = [e for e in [*errors, *sys_errors] if e is not None]
    unique = list({id(e): e for e in errors}.values())
    count, held = 0, 0
    for e in unique:
        c, b = tensors_held_by(e)
        count, held = count + c, held + b
    rss = ResidentSize()
    try:
        device, dev_before = _allocated()
        rss_before = rss.now()
        for e in unique:
            for tb in _tracebacks(e):
                _clear_frames(tb)
        for name in ("last_type", "last_value", "last_traceback", "last_exc"):
            if hasattr(sys, name):
                delattr(sys, name)
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        elif _mps_available():
            torch.mps.empty_cache()
        _, dev_after = _allocated()
        rss_after = rss.now()
    finally:
        rss.close()
    return MemoryRelease(held_tensors=count, held_bytes=held, device=device, dev_before=dev_before,
                         dev_after=dev_after, rss_before=rss_before, rss_after=rss_after)


class CellReporter:
    """`%memory on`'s wiring: a CellMeter around every cell through the shell's pre_run_cell and
    post_run_cell events, the history of what it measured, and a line after each cell that changed
    memory by `threshold()` bytes or more, shown with `show` (IPython's display). `threshold()` and
    `device()` (the device %device selected) are read at each cell: the config can change them."""

    def __init__(self, shell, show: Callable[[object], None], threshold: Callable[[], int],
                 device: Callable[[], str | None]):
        self.shell, self.show, self.threshold, self.device = shell, show, threshold, device
        self.meter: CellMeter | None = None
        self.history: collections.deque = collections.deque(maxlen=1000)

    def start(self) -> MemoryStatus:
        if self.meter is not None:
            return MemoryStatus("memory reporting is already on", self.meter.describe())
        self.meter = CellMeter()
        self.shell.events.register("pre_run_cell", self._pre)
        self.shell.events.register("post_run_cell", self._post)
        return MemoryStatus(f"memory reporting on: a line after each cell that changes memory by "
                            f"{nbytes(self.threshold())} or more",
                            [*self.meter.describe(), "%memory shows the history, %memory off stops"])

    def stop(self) -> bool:
        """Unregister the handlers; False when reporting was not on."""
        if self.meter is None:
            return False
        for event, handler in (("pre_run_cell", self._pre), ("post_run_cell", self._post)):
            if handler in self.shell.events.callbacks[event]:
                self.shell.events.unregister(event, handler)
        self.meter.close()
        self.meter = None
        return True

    def off(self) -> MemoryStatus:
        was_on = self.stop()
        return MemoryStatus("memory reporting off" if was_on else "memory reporting was not on",
                            [f"{len(self.history)} cells in the history: %memory shows them"])

    def clear(self) -> MemoryStatus:
        self.history.clear()
        return MemoryStatus("memory history cleared")

    def _pre(self, info=None):
        try:
            self.meter.begin(prefer=self.device())
        except Exception as e:  # a failing handler would print a traceback before every cell
            self._failed(e)

    def _post(self, result=None):
        if self.meter is None:
            return
        source = getattr(getattr(result, "info", None), "raw_cell", None) or ""
        try:
            record = self.meter.end(getattr(result, "execution_count", None), source,
                                    getattr(result, "error_in_exec", None))
        except Exception as e:
            self._failed(e)
            return
        if record is None or source.lstrip().startswith("%memory"):
            return  # an empty cell, or %memory itself
        self.history.append(record)
        if record.notable(self.threshold()):
            self.show(record)

    def _failed(self, error: Exception):
        self.stop()
        self.show(MemoryStatus(f"%memory turned itself off: measuring failed with {type(error).__name__}: {error}"))

    def report(self) -> MemoryHistory:
        notes = [] if self.history else ["nothing measured yet: %memory on starts measuring every cell"]
        count, size = tensors_held_by(getattr(sys, "last_value", None))
        if count:
            notes.append(f"the last error keeps {count} tensor{'s' if count != 1 else ''} ({nbytes(size)}) alive "
                         f"in its traceback: %memory release frees them")
        measures = self.meter.describe() if self.meter is not None else []
        return MemoryHistory(list(self.history), on=self.meter is not None, measures=measures, notes=notes)

    def release(self) -> MemoryRelease:
        last = getattr(self.shell, "last_execution_result", None)
        tb_printer = getattr(self.shell, "InteractiveTB", None)
        if tb_printer is not None and getattr(tb_printer, "tb", None) is not None:
            del tb_printer.tb  # IPython's traceback printer keeps the last traceback for %debug
        return release([getattr(last, "error_in_exec", None)])
