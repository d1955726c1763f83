"""Fault injection: an exception or a KeyboardInterrupt at every stage a magic passes through.

One model carries a switch (`FAULT`) that raises at a chosen stage: inside the model's forward,
in a neighbour module of a hooked one, in the user's own forward hook, in backward (a custom
autograd Function, a tensor hook), in `optimizer.step()` after it has updated some parameters
(torch's steps are not atomic), and in the widget's Step callback; plus NaN in the loss and NaN
in the gradients only. After each: the state DESIGN.md promises (nothing changed), the
KeyboardInterrupt reached the user, no hook left behind, a message that names what happened, the
magic still works once the fault is gone, and no tensor of the failed cell is kept alive.

IPython itself keeps the last traceback (sys.last_traceback, its formatter's .tb, the last
ExecutionResult), and with it the failed cell's frames and tensors: snapshot.clear_last_error
drops those before the weakref checks, so that what remains alive is torchmagic's doing.
"""
from __future__ import annotations

import linecache
import os
import re
import weakref
from dataclasses import dataclass

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from snapshot import clear_last_error, collectable, diff, snapshot
from support import Shell, start_inprocess_kernel

os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # the in-process kernel imports debugpy

FAULTY = '''
import signal
import weakref
import torch
import torch.nn as nn
torch.manual_seed(0)
FAULT = {"stage": None, "exc": None, "refs": [], "at": None, "seen": 0}

def due(stage):
    """Whether the switch points at this stage now: every time, or only the FAULT["at"]-th time
    (one step of a --steps run)."""
    if FAULT["stage"] != stage:
        return False
    FAULT["seen"] += 1
    return FAULT["at"] is None or FAULT["seen"] == FAULT["at"]

def fire(stage, tensor=None):
    """Raise FAULT["exc"] when the switch points at this stage; remember the tensor at hand."""
    if due(stage):
        if tensor is not None:
            FAULT["refs"].append(weakref.ref(tensor))
        raise FAULT["exc"](f"injected at {stage}")

def track(t):
    FAULT["refs"].append(weakref.ref(t))
    return t

class Boom(nn.Module):
    def forward(self, x):
        fire("neighbour", x)
        return x

class Grad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        fire("backward", g)
        return g * float("nan") if due("nan_grads") else g

class Faulty(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), Boom())
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.drop(self.features(x))
        fire("forward", x)
        if x.requires_grad:
            x = Grad.apply(x)
            x.register_hook(lambda g: fire("tensor_hook", g))
        return self.head(x)

class PartialSGD(torch.optim.Optimizer):
    """SGD updating parameters one by one with a step counter, as torch's own loops do."""
    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for i, p in enumerate(p for g in self.param_groups for p in g["params"] if p.grad is not None):
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1
            p.add_(p.grad, alpha=-self.param_groups[0]["lr"])
            if i == 1:
                fire("step")
                if due("sigint"):  # Ctrl-C while optimizer.step() runs (Python's handler runs right here)
                    signal.raise_signal(signal.SIGINT)

model = Faulty().train()
model.features[0].register_forward_hook(lambda m, i, o: fire("user_hook", o))
opt = PartialSGD(model.parameters(), lr=0.1)
x = torch.randn(4, 8)
y = torch.randn(4, 2)
model(x).sum().backward()  # the user's loop ran: optimizer state and .grad exist
opt.step()
model(x).sum().backward()

def make_input():
    fire("input")
    return torch.randn(4, 8)
'''

STEP_CELL = '%%trainstep model opt\ntrack(((model(x) - y) ** 2).mean() * (float("nan") if due("nan_loss") else 1))'


@dataclass(frozen=True)
class Fault:
    magic: str  # the cell the user runs
    stage: str
    exc: str  # "Exception" or "KeyboardInterrupt"
    module: str = ""  # the module a %shapes failure must name
    xfail: str = ""

    @property
    def id(self):
        return f"{self.magic.split()[0]}-{self.stage}-{self.exc}"


SHAPES = "%shapes model 4,8"
SUMMARY = "%summary model 4,8"
FAULTS = [
    *(Fault(magic, stage, exc, module)
      for magic in (SHAPES, SUMMARY, "%shapes model make_input()")
      for stage, module in (("forward", "model"), ("neighbour", "features.2"), ("user_hook", "features.0"),
                            ("input", ""))
      for exc in ("Exception", "KeyboardInterrupt")
      if (stage == "input") == ("make_input" in magic)),
    *(Fault(STEP_CELL, stage, exc)
      for stage in ("forward", "neighbour", "user_hook", "backward", "tensor_hook", "step")
      for exc in ("Exception", "KeyboardInterrupt")),
]


def _params(faults):
    return [pytest.param(f, id=f.id, marks=[pytest.mark.xfail(strict=True, reason=f.xfail)] if f.xfail else [])
            for f in faults]


def _arm(shell, fault_stage, exc, at=None):
    shell.run(f'FAULT.update(stage={fault_stage!r}, exc={exc}, at={at}, seen=0); FAULT["refs"].clear()')


def _alive(shell) -> list[str]:
    """Tensors the failed cell made that something still holds, IPython's own references dropped."""
    refs = list(shell.ns["FAULT"]["refs"])
    clear_last_error(shell.ip)
    import gc

    gc.collect()
    return [repr(r()) [:60] for r in refs if r() is not None]


@pytest.mark.parametrize("fault", _params(FAULTS))
def test_fault(shell, fault):
    shell.run(FAULTY)
    model, opt = shell.ns["model"], shell.ns["opt"]
    before = snapshot(model, opt)
    _arm(shell, fault.stage, fault.exc)
    result = shell.ip.run_cell(fault.magic, store_history=True)
    error = result.error_in_exec or result.error_before_exec
    after = snapshot(model, opt)

    if fault.exc == "KeyboardInterrupt":
        assert type(error) is KeyboardInterrupt and str(error) == f"injected at {fault.stage}", repr(error)
    elif fault.stage == "input":
        assert type(error) is UsageError and "make_input()" in str(error) and "injected at input" in str(error)
    elif fault.magic == SHAPES:
        trace = result.result
        assert error is None and not trace.ok, repr(error)
        assert trace.failure.module == fault.module and f"injected at {fault.stage}" in trace.failure.error
        assert f"injected at {fault.stage}" in shell.text(trace)
    elif fault.magic == SUMMARY:
        assert type(error) is UsageError and "\n" not in str(error), repr(error)
        assert fault.module in str(error) and f"injected at {fault.stage}" in str(error)
    else:  # %%trainstep: the user's exception, with its traceback starting in the user's code
        assert type(error) is Exception and str(error) == f"injected at {fault.stage}", repr(error)
        frames = _frames(error.__traceback__)
        assert "torchmagic" not in frames[0] and frames[-1].endswith(":fire"), frames
    del result, error
    assert diff(before, after) == []  # parameters, grads, buffers, modes, hooks (also global), RNG, optimizer
    assert _alive(shell) == []

    _arm(shell, None, None)  # the fault is gone: the magic works again, nothing was left switched
    after_fix = shell.ip.run_cell(fault.magic, store_history=True)
    assert after_fix.success, after_fix.error_in_exec


def _frames(tb) -> list[str]:
    out = []
    while tb is not None:
        out.append(f"{tb.tb_frame.f_code.co_filename}:{tb.tb_frame.f_code.co_name}")
        tb = tb.tb_next
    return out


@pytest.mark.parametrize("stage, says", [("nan_loss", "the loss is nan"),
                                         ("nan_grads", "non-finite gradients in features.0.weight")])
def test_nan_skips_the_step(shell, stage, says):
    """A NaN loss, or a finite loss with NaN gradients only: no step, nothing changed, a message."""
    shell.run(FAULTY + "\nfor p in model.parameters():\n    p.grad = None\n")
    model, opt = shell.ns["model"], shell.ns["opt"]
    before = snapshot(model, opt)
    _arm(shell, stage, None)
    step = shell.run(STEP_CELL)
    assert step.skipped and says in step.skipped and "no step taken" in step.skipped, step.skipped
    assert says in shell.text(step)
    assert diff(before, snapshot(model, opt)) == []
    del step
    assert _alive(shell) == []


# ---------------------------------------------------------------- a stop at step k of --steps N

STEPS = 3
RUN_CELL = STEP_CELL.replace("%%trainstep model opt", f"%%trainstep model opt --steps {STEPS}")


def _run_values(shell) -> dict:
    """The values a step changes (hooks aside: they are compared on the same objects elsewhere)."""
    values = _values(snapshot(shell.ns["model"], shell.ns["opt"]))
    values.pop("hooks")
    return values


def _after_steps(shell, j: int) -> dict:
    """The values after j single steps from the same start (FAULTY again: the same values)."""
    shell.run(FAULTY)
    for _ in range(j):
        shell.run(STEP_CELL)
    return _run_values(shell)


def _kept(stage: str, k: int) -> int:
    """How many of the run's steps a fault at step k leaves."""
    if stage == "sigint":
        return k  # Ctrl-C is held while optimizer.step() runs: that step is kept, the run stops
    if stage == "step":  # raised from inside optimizer.step(): only the last step has copies of its own
        return k - 1 if k == STEPS else 0
    return k - 1


@pytest.mark.parametrize("k", range(1, STEPS + 1))
@pytest.mark.parametrize("stage, exc", [("forward", "Exception"), ("backward", "KeyboardInterrupt"),
                                        ("step", "Exception"), ("step", "KeyboardInterrupt"), ("sigint", None),
                                        ("nan_loss", None), ("nan_grads", None)])
def test_a_stop_at_step_k_of_a_run(shell, stage, exc, k):
    """--steps N: an error, Ctrl-C or a non-finite value at step k leaves the steps before k, whole,
    and nothing of step k; Ctrl-C while optimizer.step() runs lets that step finish first; an error
    from inside optimizer.step() (it may have updated some parameters) undoes the whole run, except
    at the last step, whose own copies undo it alone. Never half a step; the step count follows.
    An undo but the last step's leaves the gradients None (as zero_grad() does), not those from before."""
    kept = _kept(stage, k)
    expected = _after_steps(shell, kept)
    if k < STEPS and kept < k:
        expected["grads"] = dict.fromkeys(expected["grads"])
    shell.run(FAULTY)
    _arm(shell, stage, exc, at=k)
    result = shell.ip.run_cell(RUN_CELL, store_history=True)
    error = result.error_in_exec or result.error_before_exec
    if stage.startswith("nan"):
        assert error is None and result.result.skipped, repr(error)
        assert f"stopped at step {k} of {STEPS}" in result.result.notes
    elif stage == "sigint":
        assert type(error) is KeyboardInterrupt, repr(error)
    else:
        assert type(error).__name__ == exc and str(error) == f"injected at {stage}", repr(error)
    del result, error
    assert diff(expected, _run_values(shell)) == []
    assert _alive(shell) == []
    _arm(shell, None, None)
    assert shell.run(STEP_CELL).step == kept + 1


# ---------------------------------------------------------------- the widget's Step button

@pytest.fixture(scope="module")
def _kernel_manager():
    """A real in-process ipykernel, started once for this module."""
    from ipykernel.inprocess.ipkernel import InProcessInteractiveShell

    InteractiveShell.clear_instance()
    manager = start_inprocess_kernel()
    manager.kernel.shell.run_line_magic("load_ext", "torchmagic")
    yield manager
    manager.kernel.shell.run_line_magic("unload_ext", "torchmagic")
    manager.shutdown_kernel()
    InProcessInteractiveShell.clear_instance()
    InteractiveShell.clear_instance()


@pytest.fixture
def kernel(_kernel_manager):
    """The kernel's shell (it has a kernel, so %%trainstep returns its widget panel), namespace emptied."""
    ip = _kernel_manager.kernel.shell
    ip.reset(new_session=False)
    return Shell(ip)


@pytest.mark.parametrize("stage, exc", [
    (s, e) for s in ("forward", "user_hook", "backward", "step") for e in ("Exception", "KeyboardInterrupt")
] + [("nan_loss", None), ("nan_grads", None)])
def test_fault_in_widget_step(kernel, stage, exc):
    """Step pressed again after a good step, and this time the cell fails: the state is the one
    after the good step, and the error is shown in the panel through the shell's showtraceback
    (sys.last_value). A KeyboardInterrupt too: ipywidgets' Output shows whatever ends its block,
    and a button callback has no cell above it to interrupt."""
    import sys

    kernel.run(FAULTY)
    panel = kernel.run(STEP_CELL)
    assert type(panel).__name__ == "TrainStepPanel" and panel.result.stepped
    model, opt = kernel.ns["model"], kernel.ns["opt"]
    before = snapshot(model, opt)
    _arm(kernel, stage, exc)
    sys.last_value = None
    panel.click()
    if stage.startswith("nan"):
        assert panel.result.skipped and "no step taken" in panel.result.skipped
    else:
        assert type(sys.last_value).__name__ == exc and str(sys.last_value) == f"injected at {stage}"
    assert diff(before, snapshot(model, opt)) == []
    assert _alive(kernel) == []
    _arm(kernel, None, None)
    panel.click()
    assert panel.result.stepped and diff(before, snapshot(model, opt)) != []


def test_widget_panel_does_not_keep_the_model(kernel):
    """Out and the widget registry keep the panel; it holds the model and optimizer weakly, and a
    click after they are gone is one line."""
    import weakref

    from snapshot import collectable

    kernel.run(FAULTY)
    panel = kernel.run(STEP_CELL)
    ref = weakref.ref(kernel.ns["model"])
    assert collectable(kernel.ip, ["model", "opt", "FAULT"], ref) == []
    panel.click()
    assert "was deleted or its name rebound: run the %%trainstep cell again" in panel.error
    assert panel.undo_button.disabled


# ---------------------------------------------------------------- Ctrl-C at every line

SWEEP_MODEL = '''
import torch
import torch.nn as nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 8), nn.BatchNorm1d(8),
                      nn.Linear(8, 2)).train()
model[4].eval()
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
x, y = torch.randn(4, 8), torch.randn(4, 2)
'''
SWEEPS = {
    "shapes": ("line", "shapes", "model 4,8", None),
    "summary": ("line", "summary", "model 4,8", None),
    "trainstep": ("cell", "trainstep", "model opt", "((model(x) - y) ** 2).mean()"),
    "trainstep_steps": ("cell", "trainstep", "model opt --steps 3", "((model(x) - y) ** 2).mean()"),
}


def _run_magic(ip, kind, name, line, cell):
    return ip.run_line_magic(name, line) if kind == "line" else ip.run_cell_magic(name, line, cell)


def _torchmagic_lines(ip, magic) -> list[tuple[str, int]]:
    """The lines of torchmagic's own code that this magic runs, in order."""
    import sys

    import torchmagic

    package, seen = os.path.dirname(torchmagic.__file__), {}

    def trace(frame, event, arg):
        if event == "line" and frame.f_code.co_filename.startswith(package):
            seen.setdefault((frame.f_code.co_filename, frame.f_lineno), None)
        return trace

    sys.settrace(trace)
    try:
        _run_magic(ip, *magic)
    finally:
        sys.settrace(None)
    return list(seen)


def _ctrl_c_at(ip, magic, target):
    """Run the magic and press Ctrl-C (a real SIGINT, handled by Python's own handler) when it
    reaches `target`. Returns what came out of the magic."""
    import ctypes
    import signal
    import sys

    raise_in_c = getattr(ctypes.CDLL(None), "raise")

    fired = []

    def trace(frame, event, arg):
        if event == "line" and (frame.f_code.co_filename, frame.f_lineno) == target:
            fired.append(True)
            # Tracing ends here, so that the signal is handled where Python really checks for
            # signals (a call, a loop's jump back), not at the start of a line as a tracer would.
            sys.settrace(None)
            while frame is not None:
                frame.f_trace = None
                frame = frame.f_back
            raise_in_c(signal.SIGINT)  # os.kill and signal.raise_signal would handle it right here
            return None
        return trace

    sys.settrace(trace)
    try:
        _run_magic(ip, *magic)
        return None if fired else "not reached"
    except BaseException as e:  # noqa: B036  the interrupt is what we are looking for
        return e
    finally:
        sys.settrace(None)


def _values(snap: dict) -> dict:
    """The snapshot without identities: what a completed step may legitimately have replaced."""
    out = {k: v for k, v in snap.items() if k not in ("params", "grads", "buffers", "optimizer", "attributes")}
    for key in ("params", "grads", "buffers"):
        out[key] = {n: (None if v is None else v[1:]) for n, v in snap[key].items()}
    out["optimizer"] = {k: (v[1:] if isinstance(v, tuple) else v) for k, v in snap["optimizer"]["state"].items()}
    return out


SAMPLE = 40  # lines per magic in the default run
SWEPT: dict[str, tuple[int, int, int, int]] = {}  # magic -> (lines, lines tried, reached, lines that broke a promise)


@pytest.mark.parametrize("which", ["shapes", "summary", "trainstep", "trainstep_steps"])
def test_ctrl_c_at_every_line(shell, which):
    """A real Ctrl-C delivered at each line of torchmagic's code the magic runs, one run per line:
    the KeyboardInterrupt comes out of the magic, the state is as before (for %%trainstep: as
    before, or as after the whole step: never half a step; with --steps 3, as after 0 to 3 whole
    steps), and nothing keeps the model alive.
    Bare `try:` / `finally:` / `else:` lines are skipped: Python handles a signal at a call or a
    loop's jump back, never there, while a tracer would raise it at the start of any line.

    By default about SAMPLE lines per magic, every k-th in the order they run (the same lines on
    every run, spread over the whole magic); TORCHMAGIC_SWEEP_ALL=1 runs every line (minutes)."""
    magic = SWEEPS[which]
    shell.run(SWEEP_MODEL)
    _run_magic(shell.ip, *magic)  # the first run in a process imports the modules the magic uses: once
    shell.run(SWEEP_MODEL)
    lines = _torchmagic_lines(shell.ip, magic)
    completed = []  # the state after each whole step
    shell.run(SWEEP_MODEL)
    for _ in range(3 if which == "trainstep_steps" else 1):
        _run_magic(shell.ip, *SWEEPS["trainstep"])
        completed.append(_values(snapshot(shell.ns["model"], shell.ns["opt"])))
    lines = [t for t in lines if not re.match(r"(try|finally|else)\s*:", linecache.getline(*t).strip())]
    total = len(lines)
    if not os.environ.get("TORCHMAGIC_SWEEP_ALL"):  # every k-th line, the same ones on every run
        lines = lines[::max(1, -(-total // SAMPLE))]
    broken, reached = [], 0
    for target in lines:
        shell.run(SWEEP_MODEL)  # the same values again, in new objects
        model, opt = shell.ns["model"], shell.ns["opt"]
        before = snapshot(model, opt)
        error = _ctrl_c_at(shell.ip, magic, target)
        after = snapshot(model, opt)
        ref = weakref.ref(model)
        del model, opt
        where = f"{os.path.basename(target[0])}:{target[1]}"
        if error == "not reached":  # this run took another branch (e.g. after an earlier run's damage)
            continue
        reached += 1
        if type(error) is not KeyboardInterrupt:
            broken.append(f"{where}: {type(error).__name__} came out, not KeyboardInterrupt")
        elif diff(before, after) and not (which.startswith("trainstep") and
                                          any(diff(c, _values(after)) == [] for c in completed)):
            broken.append(f"{where}: {diff(before, after)[:3]}")
        del error
        kept = collectable(shell.ip, ["model", "opt"], ref)
        if kept:
            broken.append(f"{where}: the model is kept alive afterwards ({kept[0]})")
    SWEPT[which.replace("trainstep", "%trainstep").replace("_steps", " --steps 3")] = (total, len(lines), reached,
                                                                                      len(broken))
    assert reached > min(30, len(lines) // 2) and broken == [], (f"{len(broken)} of {reached} lines: "
                                                                 + "; ".join(broken[:12]))


def report() -> list[str]:
    """The Ctrl-C sweep's numbers, for the test session's summary."""
    every = ("every line" if os.environ.get("TORCHMAGIC_SWEEP_ALL")
             else "a sample; TORCHMAGIC_SWEEP_ALL=1 for every line")
    return [f"Ctrl-C sweep, %{m}: {tried} of {n} lines of torchmagic tried ({every}), {reached} reached, "
            f"{bad} broke a promise" for m, (n, tried, reached, bad) in SWEPT.items()]
