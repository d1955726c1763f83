"""The magics: parse the line, look up names in the user namespace, call one core function,
return its result. Only this module and ui.py import IPython.

Each magic imports the core modules it uses when it first runs, so that `%load_ext torchmagic`
imports this module alone (python bench/startup.py measures it)."""
from __future__ import annotations

import functools
import math
import re
import sys
import weakref
from typing import TYPE_CHECKING

import torch
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import display
from torch import nn
from traitlets import Bool, Enum, Int, TraitError, observe, validate

from .compat import running_cell_number
from .errors import TorchMagicError, one_line
from .parsing import AMP_DTYPES, SHAPE_MODES, SHARDS, looks_like_shape, parse_shape, split_line

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell


def usage_errors(func):
    """TorchMagicError -> UsageError: one line, no traceback (IPython shows a traceback for subclasses).
    A line (or a cell) ending in `;` shows nothing, on every IPython: 7.34 hands the `;` to the magic
    and displays what it returns, and 8+ silences only magics marked output_can_be_silenced."""

    @functools.wraps(func)
    def wrapper(self, line, *cell):
        __tracebackhide__ = True  # noqa: F841  IPython hides this frame in tracebacks of the user's code
        is_cell = bool(cell) and cell[0] is not None  # IPython 7.34 calls a line_cell magic's line form with cell=None
        quiet = (cell[0] if is_cell else line).rstrip().endswith(";")
        if quiet and not is_cell:
            line = line.rstrip()[:-1]
        try:
            result = func(self, line, *cell)
        except TorchMagicError as e:
            raise UsageError(one_line(str(e))) from None
        return None if quiet else result

    return wrapper


def with_article(noun: str) -> str:
    """'Tensor' -> 'a Tensor', 'int' -> 'an int': the type in a sentence."""
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


@magics_class
class TorchMagics(Magics):
    shell: InteractiveShell  # set by IPython: these magics are always registered with a shell
    widgets = Bool(True,
                   help="Show ipywidgets controls in a Jupyter kernel (False: text results only).").tag(config=True)
    memory_min_change = Int(1 << 20, help="With %memory on, show a line after a cell only when it changed or "
                                          "peaked memory by at least this many bytes (0: after every cell)."
                            ).tag(config=True)
    shape_mode = Enum(list(SHAPE_MODES), "auto", help="How %shapes runs the forward: auto, real, fake (no compute, "
                      "no memory) or meta (models built on the meta device).").tag(config=True)
    text_width = Int(0, help="Width of text tables in characters (0: the terminal's width, or 120 where it is "
                            "unknown). Long values are elided in the middle to fit; print() a result shows them "
                            "whole.").tag(config=True)

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self.selected_device: str | None = None
        self._ledgers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> StepLedger
        self._memory = None  # a memory.CellReporter from the first %memory on
        self._configure_width()

    @validate("memory_min_change", "text_width")
    def _not_negative(self, proposal):
        """A negative value is refused and the old one kept; %config shows the message in one line."""
        value, name = proposal["value"], proposal["trait"].name
        if value < 0:
            what, example = {
                "memory_min_change": ("a number of bytes, 0 or more (0: a line after every cell)", 1 << 20),
                "text_width": ("a width in characters, or 0 for the terminal's width", 100),
            }[name]
            raise TraitError(f"TorchMagics.{name} = {value} is negative: give {what}, "
                             f"e.g. %config TorchMagics.{name} = {example}")
        return value

    @observe("text_width")
    def _configure_width(self, change=None):
        from . import render

        # A terminal shell has imported its module (and prompt_toolkit): importing it here would cost a kernel 80 ms.
        terminal = sys.modules.get("IPython.terminal.interactiveshell")
        render.configure(width=self.text_width,
                         terminal=terminal is not None and isinstance(self.shell, terminal.TerminalInteractiveShell))

    def close(self):
        """Called when the extension is unloaded: remove the event handlers this instance registered."""
        if self._memory is not None:
            self._memory.stop()

    def _memory_reporter(self):
        if self._memory is None:
            from .memory import CellReporter

            self._memory = CellReporter(self.shell, display, lambda: self.memory_min_change,
                                        lambda: self.selected_device)
        return self._memory

    # ------------------------------------------------------------ helpers

    def _parse(self, magic, line: str):
        cell_only = magic.__name__ in self.magics["cell"] and magic.__name__ not in self.magics["line"]
        name = ("%%" if cell_only else "%") + magic.__name__
        tokens = split_line(line)
        try:
            try:  # options may come between model and input; intermixed parsing costs more, so only with options
                options = any(t[:1] == "-" for t in tokens)
                args = magic.parser.parse_intermixed_args(tokens) if options else magic.parser.parse_args(tokens)
            except TypeError:  # argparse cannot intermix this parser's arguments
                args = magic.parser.parse_args(tokens)
        except UsageError as e:
            for t in tokens:
                if t[:1] == "-" and t[1:2].isdigit():
                    parse_shape(t)  # a negative size, read as an option: raise the message about sizes
            raise TorchMagicError(f"{name}: {e}; see {name}? for usage") from None
        if isinstance(getattr(args, "depth", None), int) and args.depth < 0:
            raise TorchMagicError(f"--depth {args.depth} is negative: give 0 (the model alone) or more, e.g. --depth 2")
        if isinstance(getattr(args, "lr", None), float) and not 0 < args.lr < float("inf"):
            raise TorchMagicError(f"--lr {args.lr} is not a positive learning rate, e.g. --lr 0.01")
        return args

    def _eval(self, expr: str):
        try:
            return eval(expr, self.shell.user_global_ns, self.shell.user_ns)
        except NameError as e:
            raise TorchMagicError(f"{e}: define it first, or check the spelling") from None
        except SyntaxError:
            raise TorchMagicError(f"{expr!r} is not a valid Python expression: check it, or write a shape "
                                  f"as whole numbers and commas, e.g. 1,3,32,32") from None
        except Exception as e:
            raise TorchMagicError(f"evaluating {expr!r} raised {type(e).__name__}: {e}; "
                                  f"check it in a cell of its own first") from None

    def _module(self, expr: str) -> nn.Module:
        value = self._eval(expr)
        if not isinstance(value, nn.Module):
            raise TorchMagicError(f"{expr!r} is {with_article(type(value).__name__)}, not a torch.nn.Module: "
                                  f"give the model (an nn.Module such as net = Net()) first")
        return value

    def _inputs(self, texts: list[str]) -> list:
        from .inputs import ShapeSpec

        return [ShapeSpec(parse_shape(t)) if looks_like_shape(t) else self._eval(t) for t in texts]

    # ------------------------------------------------------------ %device

    @magic_arguments()
    @argument("target", nargs="?", help="cpu, cuda, cuda:N, mps or auto. Without it: a report of every device.")
    @argument("names", nargs="*", help="models, optimizers and tensors to move there (tensor names are rebound; "
                                       "optimizer state follows its parameters)")
    @line_magic
    @usage_errors
    def device(self, line):
        """Report the devices, or select one (binds `device`) and move objects to it.

            %device                      # CPU threads, CUDA devices and memory, MPS, defaults
            %device auto                 # the best available; binds `device`
            %device cuda net opt x y     # move a model, its optimizer state and tensors

        Parameters keep their identity (the optimizer still holds them). A move that fails
        part-way, e.g. out of memory, is undone: everything stays where it was.
        """
        from . import devices

        args = self._parse(self.device, line)
        if args.target is None:
            return devices.device_report(self.selected_device)
        target = devices.resolve_device(args.target)
        bindings, report = devices.move_objects(self.shell.user_ns, args.names, target)
        self.shell.user_ns.update(bindings)
        self.shell.user_ns["device"] = target
        self.selected_device = str(target)
        return report

    # ------------------------------------------------------------ %memory

    @magic_arguments()
    @argument("action", nargs="?", choices=["on", "off", "release", "clear", "plan"],
              help="on: a line after each cell; off: stop; release: free what the last error keeps alive; "
                   "clear: forget the history; plan MODEL INPUT: plan a training step's memory. "
                   "Without it: the history.")
    @argument("plan_args", nargs="*", metavar="MODEL INPUT", help="for plan: the model, and its input as a shape "
                                                                 "(64,3,32,32) or an expression")
    @argument("--optimizer", default=None, metavar="NAME", help="plan: adamw (default), adam, sgd, or your optimizer's "
                                                               "name (its class, param groups and settings)")
    @argument("--dtype", default=None,
              help="plan: the parameters' dtype, float32, bfloat16 or float16 (default: the model's)")
    @argument("--amp", default=None, choices=list(AMP_DTYPES), help="plan: the forward under autocast in bf16 or fp16")
    @argument("--device", default=None,
              help="plan: for this device (cuda, cuda:N, cpu); its total memory is the budget")
    @argument("--budget", default=None,
              help="plan: the memory to fit in, e.g. 24GB (GB: 2**30 bytes); says whether the "
                   "step fits and the largest batch that does")
    @argument("--checkpointing", action="store_true", help="plan: activation checkpointing of the repeated blocks")
    @argument("--devices", type=int, default=1, metavar="N", help="plan: per device, on N devices (with --shard)")
    @argument("--shard", default=None, choices=list(SHARDS), help="plan: ddp (replicated), fsdp or zero2 (sharded)")
    @line_magic
    @usage_errors
    def memory(self, line):
        """Memory per cell: what each cell left allocated and its peak (CUDA, MPS, and the process's RSS);
        and, before training, a plan of a training step's memory on fake tensors.

            %memory on        # after each cell that changed memory: change, now, peak
            %memory           # the history as a table (a small chart in a notebook)
            %memory release   # free the tensors a failed cell's traceback keeps alive
            %memory off       # stop (%memory clear forgets the history)

            %memory plan net 64,1,32,32                                # where a step's memory goes, its peak
            %memory plan llama 1,2048 --dtype bfloat16 --budget 80GB   # fits? the largest batch that does
            %memory plan llama 1,4096 --dtype bfloat16 --devices 64 --shard fsdp --budget 80GB

        Cells that change memory by less than TorchMagics.memory_min_change (1 MB) show nothing
        but are kept in the history. With CUDA, the peak counter (torch.cuda.max_memory_allocated)
        is reset at each cell's start. After %memory release, %debug has nothing to inspect.
        A plan computes nothing and allocates no activation; the model, optimizer and RNG stay as
        they were. %%trainstep MODEL OPT --plan plans your own cell.
        """
        args = self._parse(self.memory, line)
        action = args.action
        if action == "plan":
            return self._memory_plan(args)
        given = [o for o, v in (("--optimizer", args.optimizer), ("--dtype", args.dtype), ("--amp", args.amp),
                                ("--device", args.device), ("--budget", args.budget), ("--shard", args.shard),
                                ("--checkpointing", args.checkpointing), ("--devices", args.devices != 1)) if v]
        if args.plan_args:  # as argparse says it when there is no place for them
            raise TorchMagicError(f"%memory: unrecognized arguments: {' '.join(args.plan_args)}; "
                                  f"see %memory? for usage")
        if given:
            raise TorchMagicError(f"%memory: {given[0]} is for %memory plan MODEL INPUT: use it there; "
                                  f"see %memory? for usage")
        reporter = self._memory_reporter()
        actions = {"on": reporter.start, "off": reporter.off, "clear": reporter.clear, "release": reporter.release}
        return actions.get(action, reporter.report)()

    def _memory_plan(self, args):
        from . import plan

        if not args.plan_args:
            raise TorchMagicError("give the model and its input, e.g. %memory plan net 64,1,32,32")
        model = self._module(args.plan_args[0])
        name = args.optimizer or "adamw"
        optimizer = None
        if name.lower() not in plan.OPTIMIZERS:
            if name.isidentifier() and name not in self.shell.user_ns:
                raise TorchMagicError(f"--optimizer {name}: not adamw, adam or sgd, and no such name in your "
                                      f"namespace: give one of those or the name of your optimizer")
            optimizer = self._eval(name)
        return plan.plan_memory(model, self._inputs(args.plan_args[1:]), name=args.plan_args[0], optimizer=optimizer,
                                optimizer_name=name, dtype=args.dtype, amp=args.amp, device=args.device,
                                budget=args.budget, checkpointing=args.checkpointing, devices=args.devices,
                                shard=args.shard)

    # ------------------------------------------------------------ %shapes

    @magic_arguments()
    @argument("model", nargs="?", help="the model: a name or expression from your namespace")
    @argument("inputs", nargs="*", help="one or more inputs: a shape like 1,3,32,32 (a tensor is made on the "
                                        "model's device and dtype) or an expression (tensor, tuple, dict of kwargs)")
    @argument("--depth", type=int, default=None, help="show module calls up to this nesting depth (model = 0)")
    @argument("--mode", choices=SHAPE_MODES, default=None,
              help="auto (default: %%config TorchMagics.shape_mode), real, fake (fake tensors: no compute, no "
                   "memory, any device) or meta (for models built on the meta device)")
    @argument("--ops", action="store_true", help="also show the tensor operations between modules "
                                                 "(view, flatten, cat, matmul, ...) in your forward or cell")
    @argument("--graph", action="store_true", help="draw the data flow: module calls and shape-changing ops as "
                                                   "nodes, shapes on the edges, boxes down to --depth, repeated "
                                                   "blocks folded (SVG in a notebook, a text tree in a terminal)")
    @line_cell_magic
    @usage_errors
    def shapes(self, line, cell=None):
        """Input and output shapes of every module call in one forward pass, FLOPs and memory;
        when the forward fails, what the failing module expected and the fix.

            %shapes net 1,1,32,32
            %shapes model tokens            # any tensor, tuple or dict of kwargs in your namespace
            %shapes llama 1,4096 --mode meta
            t = %shapes net 1,1,32,32       # keep the result: t.rows, t.failure, t.graph()
            %shapes net 1,1,32,32 --graph   # the data flow drawn; .save("net.svg") writes it

        As a cell magic, every module call the cell makes (the cell runs for real):

            %%shapes --ops
            out = net(input)
            loss = criterion(out, y)
        """
        __tracebackhide__ = True  # noqa: F841
        from . import tracing

        if cell is not None:
            return self._shapes_cell(line, cell)
        if not line.strip():
            raise TorchMagicError("give the model and its input, e.g. %shapes net 1,1,32,32")
        args = self._parse(self.shapes, line)
        if args.model is None:  # optional in the parser only for the %%shapes cell form
            raise TorchMagicError("give the model and its input, e.g. %shapes net 1,1,32,32")
        model = self._module(args.model)
        _check_spaced_shape(args.inputs)
        trace = tracing.trace_shapes(model, self._inputs(args.inputs), name=args.model,
                                     mode=args.mode or self.shape_mode,
                                     depth=args.depth, ops=args.ops, graph=args.graph)
        return trace.graph(depth=args.depth) if args.graph else trace

    def _shapes_cell(self, line, cell):
        """Errors in the cell are the user's: the table of what ran shows first, then the traceback."""
        __tracebackhide__ = True  # noqa: F841
        from . import tracing, usercell

        args = self._parse(self.shapes, line)
        if args.model or args.mode:
            raise TorchMagicError("%%shapes traces the cell as it runs, with --ops and --depth only; "
                                  "for one model call use %shapes MODEL INPUT")
        code, filename = usercell.compile_cell(self.shell, cell, running_cell_number(self.shell))
        ns = self.shell.user_ns
        trace, error = tracing.trace_cell(lambda: exec(code, ns), lambda: tracing.namespace_names(ns),
                                          ops=args.ops, depth=args.depth)
        shown = trace.graph(depth=args.depth) if args.graph else trace
        if error is None:
            return shown
        if trace.rows:
            display(shown)
        raise usercell.users_own(error, filename) from None

    # ------------------------------------------------------------ %summary

    @magic_arguments()
    @argument("model", help="the model: a name or expression from your namespace")
    @argument("inputs", nargs="*",
              help="optional input for output shapes and FLOPs: a shape like 1,1,32,32 or an expression")
    @argument("--depth", type=int, default=None, help="show modules up to this nesting depth (model = 0)")
    @line_magic
    @usage_errors
    def summary(self, line):
        """Parameters per layer, trainable and frozen, totals (tied weights counted once).

            %summary net
            %summary net 1,1,32,32          # with each layer's output shape and the FLOPs
        """
        from . import summary

        if not line.strip():
            raise TorchMagicError("give the model, e.g. %summary net")
        args = self._parse(self.summary, line)
        model = self._module(args.model)
        _check_spaced_shape(args.inputs)
        return summary.param_summary(model, name=args.model, values=self._inputs(args.inputs), depth=args.depth)

    # ------------------------------------------------------------ %%trainstep

    @magic_arguments()
    @argument("model", help="the model being trained")
    @argument("optimizer", help="its optimizer")
    @argument("--lr", default=None, help="set this learning rate first: one for every param group, "
                                         "or one per group separated by commas (0.001,0.01)")
    @argument("--eval", action="store_true", help="also the loss after the step on the same batch: the cell runs "
                                                  "again without grad, with the same dropout masks; BatchNorm "
                                                  "statistics are not updated twice (with --steps: after the last)")
    @argument("--steps", type=int, default=1, metavar="N", help="take N steps, with a progress bar")
    @argument("--sweep", default=None, metavar="LO:HI", help="try rates from LO to HI, each one step from the same "
                                                           "weights, show the loss after it and suggest a rate; "
                                                           "nothing is changed")
    @argument("--points", type=int, default=None, metavar="K",
              help="how many rates --sweep tries (default: 3 per decade)")
    @argument("--no-widget", action="store_true", help="text result only, also in a notebook")
    @argument("--no-undo", action="store_true", help="keep no copy of the parameters and optimizer state: a step costs "
                                                 "about what the loop by hand does, but there is no Undo and no "
                                                 "update norms, a failed step leaves the gradients None, and an "
                                                 "error raised inside optimizer.step() itself leaves that step "
                                                 "part-applied")
    @argument("--plan", action="store_true", help="plan the step's memory instead: the cell runs on fake tensors "
                                                  "(your loss, autocast and optimizer); nothing is changed")
    @argument("--budget", default=None, help="with --plan: the memory to fit in, e.g. 24GB")
    @cell_magic
    @usage_errors
    def trainstep(self, line, cell):
        """One safe optimizer step: zero_grad, the cell (its last expression is the loss), backward, step.

            %%trainstep net optimizer
            out = net(input)
            criterion(out, y)

        Shows per parameter the gradient, parameter and update norms and the learning rate. A
        NaN/inf loss or gradient, a bad loss or an error in the cell changes nothing. In a notebook,
        a learning-rate slider per param group, Step, Try (preview, then undone) and Undo.
        """
        __tracebackhide__ = True  # noqa: F841
        from . import training, transaction, ui, usercell

        args = self._parse(self.trainstep, line)
        model = self._module(args.model)
        optimizer = self._eval(args.optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TorchMagicError(f"{args.optimizer!r} is {with_article(type(optimizer).__name__)}, not a "
                                  f"torch.optim.Optimizer: "
                                  f"give %%trainstep MODEL OPTIMIZER, e.g. %%trainstep net optimizer")
        if args.plan:
            return self._trainstep_plan(args, model, optimizer, cell)
        if args.budget is not None:
            raise TorchMagicError("--budget goes with --plan: use %%trainstep MODEL OPT --plan --budget 24GB")
        lrs = _parse_rates(args.lr, "--lr", "--lr 0.01") if args.lr is not None else None
        if args.steps < 1:
            raise TorchMagicError(f"--steps {args.steps}: give a number of steps of at least 1, e.g. --steps 10")
        rates = self._sweep_rates(args) if args.sweep is not None else None
        if rates is not None and args.no_undo:
            raise TorchMagicError("--sweep puts everything back after each rate, which needs the copies --no-undo "
                                  "leaves out: drop --no-undo")
        transaction.check_pair(model, optimizer, args.model, args.optimizer)
        if lrs is not None and len(lrs) not in (1, len(optimizer.param_groups)):
            raise TorchMagicError(f"--lr gives {len(lrs)} rates for {len(optimizer.param_groups)} param groups: "
                                  f"give one, or one per group")
        body, evaluate = usercell.compile_loss(self.shell, cell, running_cell_number(self.shell))
        widget = self.widgets and not args.no_widget and ui.has_widget_frontend(self.shell)
        session = training.StepSession(model, optimizer, body, evaluate, model_name=args.model, ledgers=self._ledgers,
                                       keep_undo=widget, copies=not args.no_undo)
        call = functools.partial(usercell.user_call, display, body.filename, self.shell.user_ns)
        if rates is not None:
            result = call(session.sweep, rates)
        elif args.steps > 1:
            from tqdm.auto import tqdm

            result = call(session.steps, args.steps, lrs, args.eval, functools.partial(tqdm, desc="%%trainstep"))
        else:
            result = call(session.step, lrs, args.eval)
        return ui.TrainStepPanel(session, self.shell, result, call) if widget else result

    def _trainstep_plan(self, args, model, optimizer, cell):
        """The cell runs in a copy of the namespace in which the optimizer's name is its stand-in."""
        __tracebackhide__ = True  # noqa: F841
        from . import plan, usercell

        if args.lr is not None or args.steps != 1 or args.eval or args.sweep is not None:
            raise TorchMagicError("--plan takes no --lr, --steps, --eval or --sweep: it plans one step of the cell; "
                                  "give --plan alone, or with --budget")
        if not args.optimizer.isidentifier():
            raise TorchMagicError(f"--plan binds the optimizer's name to a stand-in while the cell runs: give it by "
                                  f"name, e.g. opt = {args.optimizer} first, then %%trainstep {args.model} opt --plan")
        body, _ = usercell.compile_loss(self.shell, cell, running_cell_number(self.shell))
        cell_ns = {}  # kept until the planned step ends: the cell's variables live through backward, as they do

        def run(stand_in):
            cell_ns.update(self.shell.user_ns)
            cell_ns[args.optimizer] = stand_in
            return usercell.run_in(body, cell_ns)

        planned = functools.partial(plan.plan_cell, name=args.model, budget=args.budget)
        return usercell.user_call(display, body.filename, self.shell.user_ns, planned, model, optimizer, run)

    def _sweep_rates(self, args) -> list[float]:
        from . import training

        if args.lr is not None or args.steps != 1 or args.eval:
            raise TorchMagicError("--sweep takes no --lr, --steps or --eval: it tries every rate from LO to HI itself")
        lo, hi = _parse_rates(args.sweep, "--sweep", "--sweep 1e-5:1", sep=":")
        if not lo < hi:
            raise TorchMagicError(f"--sweep {args.sweep}: LO must be below HI, e.g. --sweep 1e-5:1")
        points = args.points or max(5, min(25, round(3 * math.log10(hi / lo)) + 1))
        if not 2 <= points <= 200:
            raise TorchMagicError(f"--points {points}: give between 2 and 200 rates")
        return training.sweep_rates(lo, hi, points)

    # ------------------------------------------------------------ %freeze / %unfreeze

    @magic_arguments()
    @argument("target", help="the model, or one of its submodules (net.conv1, net.layers[0])")
    @argument("patterns", nargs="*", help="parameter or module names inside it, wildcards allowed "
                                          "(conv1, 'layer*', '*.bias'); none: everything")
    @argument("--except", dest="exclude", action="append", default=[], metavar="PATTERN",
              help="leave these alone (repeatable), e.g. %%freeze net --except fc1")
    @line_magic
    @usage_errors
    def freeze(self, line):
        """Freeze parameters (requires_grad=False) for fine-tuning; report what is trainable.

            %freeze net.conv1               # a submodule
            %freeze net conv1 '*.bias'      # names or patterns inside the model
            %freeze net --except fc1        # everything but the new head
        """
        return self._set_trainable(self.freeze, line, trainable=False)

    @magic_arguments()
    @argument("target", help="the model, or one of its submodules (net.conv1, net.layers[0])")
    @argument("patterns", nargs="*", help="parameter or module names inside it, wildcards allowed; none: everything")
    @argument("--except", dest="exclude", action="append", default=[], metavar="PATTERN",
              help="leave these alone (repeatable)")
    @line_magic
    @usage_errors
    def unfreeze(self, line):
        """Unfreeze parameters (requires_grad=True); report what is trainable.

            %unfreeze net.fc1
            %unfreeze net                   # everything
        """
        return self._set_trainable(self.unfreeze, line, trainable=True)

    def _set_trainable(self, magic, line, *, trainable):
        from . import finetune

        name = magic.__name__
        if not line.strip():
            raise TorchMagicError(f"give the model or submodule, e.g. %{name} net.conv1 or %{name} net conv1")
        args = self._parse(magic, line)
        model, model_name, prefix = self._model_and_prefix(args.target)

        def scoped(names):  # relative to the submodule given; quotes are optional ('*.bias')
            return [f"{prefix}.{n}" if prefix else n for n in (n.strip("'\"") for n in names)]

        inside, exclude = scoped(args.patterns) or ([prefix] if prefix else []), scoped(args.exclude)
        return finetune.set_trainable(model, model_name, inside, trainable=trainable, exclude=exclude)

    def _model_and_prefix(self, expr: str):
        """`net.conv1` -> (net, "net", "conv1"), so that the report counts the whole model."""
        match = re.match(r"[A-Za-z_]\w*", expr)
        root = match.group() if match else ""  # the name the expression starts with
        try:
            module = self._module(expr)
        except TorchMagicError:
            parent = self.shell.user_ns.get(root) if root else None
            if not isinstance(parent, nn.Module) or root == expr:
                raise
            names = [f"{root}.{n}" for n, _ in parent.named_modules() if n and n.count(".") < 2]
            shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
            raise TorchMagicError(f"{expr} is not a submodule of {root}: "
                                  + (f"give one of {shown}" if names else f"{root} has no submodules")) from None
        if root and root != expr:
            parent = self.shell.user_ns.get(root)
            if isinstance(parent, nn.Module):
                for qual, m in parent.named_modules(remove_duplicate=False):
                    if m is module and qual:
                        return parent, root, qual
        return module, expr, ""


def _parse_rates(text: str, option: str, example: str, sep: str = ",") -> list[float]:
    try:
        values = [float(v) for v in text.split(sep)]
    except ValueError:
        values = []
    if not values or not all(v > 0 and math.isfinite(v) for v in values) or (sep == ":" and len(values) != 2):
        raise TorchMagicError(f"{option} {text}: give positive learning rates, e.g. {example}")
    return values


def _check_spaced_shape(texts: list[str]):
    """`1, 1, 32, 32` is four inputs: say so, instead of the forward's complaint about arguments."""
    if len(texts) > 1 and any(t.endswith(",") or t.startswith(",") for t in texts) and \
            all(looks_like_shape(t) for t in texts):
        joined = ",".join(t.strip(",") for t in texts)
        raise TorchMagicError(f"the spaces in {' '.join(texts)!r} make {len(texts)} inputs: write one shape without "
                              f"spaces, e.g. {joined}")
