"""The magics: parse the line, look up names in the user namespace, call one core function,
return its result. Only this module and ui.py import IPython."""
from __future__ import annotations

import ast
import functools
import weakref

import torch
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from torch import nn
from traitlets import Bool

from . import devices, summary, tracing, training, ui
from .errors import TorchMagicError
from .inputs import ShapeSpec, build_call
from .parsing import looks_like_shape, parse_shape, split_line


def usage_errors(func):
    """TorchMagicError -> UsageError: one line, no traceback (IPython shows a traceback for subclasses)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        __tracebackhide__ = True  # noqa: F841  IPython hides this frame in tracebacks of the user's code
        try:
            return func(*args, **kwargs)
        except TorchMagicError as e:
            raise UsageError(one_line(str(e))) from None

    return wrapper


def one_line(message: str, longest: int = 80) -> str:
    """A message fit for one line: lines joined, and any very long word (a pasted name or shape)
    elided in the middle, so that the advice at the end stays in view."""
    words = " / ".join(line.strip() for line in message.splitlines() if line.strip()).split(" ")
    return " ".join(w if len(w) <= longest else f"{w[:longest // 2]}…{w[-12:]} ({len(w):,} characters)"
                    for w in words)


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


@magics_class
class TorchMagics(Magics):
    widgets = Bool(True, help="Show ipywidgets controls in a Jupyter kernel (False: text results only).").tag(config=True)

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self.selected_device: str | None = None
        self._steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------ helpers

    def _parse(self, magic, line: str):
        cell_only = magic.__name__ in self.magics["cell"] and magic.__name__ not in self.magics["line"]
        name = ("%%" if cell_only else "%") + magic.__name__
        tokens = split_line(line)
        try:
            try:
                args = magic.parser.parse_intermixed_args(tokens)  # options may come between model and input
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
            raise TorchMagicError(f"{expr!r} is {_a(type(value).__name__)}, not a torch.nn.Module: "
                                  f"give the model (an nn.Module such as net = Net()) first")
        return value

    def _inputs(self, texts: list[str]) -> list:
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
        """
        args = self._parse(self.device, line)
        if args.target is None:
            return devices.device_report(self.selected_device)
        target = devices.resolve_device(args.target)
        bindings, report = devices.move_objects(self.shell.user_ns, args.names, target)
        self.shell.user_ns.update(bindings)
        self.shell.user_ns["device"] = target
        self.selected_device = str(target)
        return report

    # ------------------------------------------------------------ %shapes

    @magic_arguments()
    @argument("model", help="the model: a name or expression from your namespace")
    @argument("inputs", nargs="*", help="one or more inputs: a shape like 1,3,32,32 (a tensor is made on the "
                                        "model's device and dtype) or an expression (tensor, tuple, dict of kwargs)")
    @argument("--depth", type=int, default=None, help="show module calls up to this nesting depth (model = 0)")
    @line_magic
    @usage_errors
    def shapes(self, line):
        """Input and output shapes of every module call in one forward pass.

            %shapes net 1,1,32,32
            %shapes model tokens            # any tensor, tuple or dict of kwargs in your namespace
            t = %shapes net 1,1,32,32       # keep the result: t.rows, t.failure
        """
        if not line.strip():
            raise TorchMagicError("give the model and its input, e.g. %shapes net 1,1,32,32")
        args = self._parse(self.shapes, line)
        model = self._module(args.model)
        call_args, call_kwargs = build_call(model, self._inputs(args.inputs))
        return tracing.trace_shapes(model, call_args, call_kwargs, name=args.model, depth=args.depth)

    # ------------------------------------------------------------ %summary

    @magic_arguments()
    @argument("model", help="the model: a name or expression from your namespace")
    @argument("inputs", nargs="*", help="optional input (shape or expression) for output shapes and mult-adds")
    @argument("--depth", type=int, default=None, help="show modules up to this nesting depth (model = 0)")
    @line_magic
    @usage_errors
    def summary(self, line):
        """Parameters per layer, trainable and frozen, totals (tied weights counted once).

            %summary net
            %summary net 1,1,32,32          # with output shapes and mult-adds
        """
        if not line.strip():
            raise TorchMagicError("give the model, e.g. %summary net")
        args = self._parse(self.summary, line)
        model = self._module(args.model)
        call_args, call_kwargs = build_call(model, self._inputs(args.inputs)) if args.inputs else (None, None)
        return summary.param_summary(model, name=args.model, args=call_args, kwargs=call_kwargs, depth=args.depth)

    # ------------------------------------------------------------ %%trainstep

    @magic_arguments()
    @argument("model", help="the model being trained")
    @argument("optimizer", help="its optimizer")
    @argument("--lr", type=float, default=None, help="set this learning rate on every param group first")
    @argument("--no-widget", action="store_true", help="text result only, also in a notebook")
    @cell_magic
    @usage_errors
    def trainstep(self, line, cell):
        """One safe optimizer step: zero_grad, the cell (its last expression is the loss), backward, step.

            %%trainstep net optimizer
            out = net(input)
            criterion(out, y)

        A NaN/inf loss, a bad loss or an error in the cell changes nothing. In a notebook a
        learning-rate slider and a Step button run the cell again.
        """
        __tracebackhide__ = True  # noqa: F841
        args = self._parse(self.trainstep, line)
        model = self._module(args.model)
        optimizer = self._eval(args.optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TorchMagicError(f"{args.optimizer!r} is {_a(type(optimizer).__name__)}, not a torch.optim.Optimizer: "
                                  f"give %%trainstep MODEL OPTIMIZER, e.g. %%trainstep net optimizer")
        if args.lr is not None and not args.lr > 0:
            raise TorchMagicError(f"--lr {args.lr} is not a positive learning rate, e.g. --lr 0.01")
        training.check_pair(model, optimizer, args.model, args.optimizer)
        body = self._loss_body(cell)

        def step(lr):
            __tracebackhide__ = True  # noqa: F841
            return self._step(model, optimizer, body, args.model, lr)

        result = step(args.lr)
        if self.widgets and not args.no_widget and ui.has_widget_frontend(self.shell):
            return ui.TrainStepPanel(result, step, self.shell)
        return result

    def _loss_body(self, cell: str):
        """Compile the cell: all but the last statement run, the last expression is the loss."""
        source = self.shell.transform_cell(cell)
        try:
            tree = ast.parse(source)
        except SyntaxError as e:
            raise TorchMagicError(f"the cell has a syntax error on line {e.lineno}: {e.msg}; fix it and run the "
                                  f"cell again") from None
        if not tree.body:
            raise TorchMagicError("the cell is empty: compute the loss in it, its last line being the loss, "
                                  "e.g. criterion(net(x), y)")
        if not isinstance(tree.body[-1], ast.Expr):
            raise TorchMagicError("the cell's last line must be the loss expression, e.g. `loss` or "
                                  "`criterion(out, y)`, not a statement")
        # IPython has already counted this cell, so the cell's own number is one less.
        filename = self.shell.compile.cache(source, max(self.shell.execution_count - 1, 0))
        head = compile(ast.Module(body=tree.body[:-1], type_ignores=[]), filename, "exec")
        tail = compile(ast.Expression(body=tree.body[-1].value), filename, "eval")
        ns = self.shell.user_ns
        body = functools.partial(_run_body, head, tail, ns)
        body.filename = filename
        return body

    def _step(self, model, optimizer, body, name, lr):
        __tracebackhide__ = True  # noqa: F841  IPython hides this frame in tracebacks of the user's code
        number = self._steps.get(optimizer, 0) + 1
        try:
            result = training.run_step(model, optimizer, body, model_name=name, step_number=number, lr=lr)
        except (TorchMagicError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise e.with_traceback(_user_frames(e.__traceback__, body.filename)) from None
        if result.stepped:
            self._steps[optimizer] = number
        return result


def _run_body(head, tail, ns):
    exec(head, ns)
    return eval(tail, ns)


def _user_frames(tb, filename):
    """The traceback from the first frame of the user's cell on: torchmagic's frames are not the user's."""
    start = tb
    while start is not None and start.tb_frame.f_code.co_filename != filename:
        start = start.tb_next
    return start or tb
