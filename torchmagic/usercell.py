"""The user's %%trainstep cell as code torchmagic can run: compiled into a loss function (every
statement but the last runs, the last expression is the loss), run again aside in a copy of the
namespace (--eval, Try, --sweep), and its errors shown with the user's frames alone.

No IPython here: `compile_loss` and `compile_cell` take the shell for its cell transformer and
compile cache, and the running cell's number (compat.running_cell_number) to name the cell in
tracebacks; `user_call` takes the function that displays a result."""
from __future__ import annotations

import ast
import functools
import os
import sys

import torch

from .errors import TorchMagicError


def compile_loss(shell, cell: str, number: int | None):
    """(body, evaluate): body() runs the cell in the user's namespace and returns its last
    expression; evaluate() runs it in a copy of the namespace, so that rerunning the cell does not
    rebind the user's variables. body.filename names the cell in tracebacks."""
    source = shell.transform_cell(cell)
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
    filename = shell.compile.cache(source, number)
    head = compile(ast.Module(body=tree.body[:-1], type_ignores=[]), filename, "exec")
    tail = compile(ast.Expression(body=tree.body[-1].value), filename, "eval")
    ns = shell.user_ns
    body = functools.partial(_run_body, head, tail, ns)
    body.filename = filename  # type: ignore[attr-defined]
    evaluate = functools.partial(_run_body_aside, head, tail, ns)
    return body, evaluate


def compile_cell(shell, cell: str, number: int | None):
    """(code, filename): the whole cell compiled to run as it is (%%shapes traces it)."""
    source = shell.transform_cell(cell)
    filename = shell.compile.cache(source, number)
    try:
        return compile(source, filename, "exec"), filename
    except SyntaxError as e:
        raise TorchMagicError(f"the cell has a syntax error on line {e.lineno}: {e.msg}") from None


def run_in(body, ns: dict):
    """The compiled cell run in another namespace `ns` (one that binds a stand-in, for --plan)."""
    head, tail, _ = body.args
    return _run_body(head, tail, ns)


def _run_body(head, tail, ns):
    exec(head, ns)
    return eval(tail, ns)


def _run_body_aside(head, tail, ns):
    return _run_body(head, tail, dict(ns))


def user_call(show, filename, ns, fn, *args):
    """Run a step action. An error from the user's cell keeps only the user's frames; a forward that
    failed on a shape is explained first (shown with `show`), as %shapes would explain it."""
    __tracebackhide__ = True  # noqa: F841
    try:
        return fn(*args)
    except (TorchMagicError, KeyboardInterrupt):
        raise
    except Exception as e:
        from . import tracing
        from .results import ExplainedError

        failure = tracing.explain_traceback(e, tracing.namespace_names(ns))
        if failure is not None:
            show(ExplainedError(failure))
        raise users_own(e, filename) from None


def users_own(error: BaseException, filename: str) -> BaseException:
    """The error with its traceback cut to the frames of the user's cell `filename` (see _user_frames)."""
    return error.with_traceback(_user_frames(error.__traceback__, filename))


_NOT_USERS = tuple(os.path.dirname(str(m.__file__)) + os.sep for m in (torch, sys.modules[__package__]))


def _user_frames(tb, filename):
    """The traceback from the first frame of the user's cell on, without the frames of torch and
    torchmagic in between or at the end: the user's own code, down to the line that failed."""
    start = tb
    while start is not None and start.tb_frame.f_code.co_filename != filename:
        start = start.tb_next
    if start is None:
        return tb
    last = start
    while last.tb_next is not None:
        following = last.tb_next
        while following is not None and following.tb_frame.f_code.co_filename.startswith(_NOT_USERS):
            following = following.tb_next
        last.tb_next = following
        if following is None:
            break
        last = following
    return start
