"""Mistakes users make, as a table: each gives exactly one UsageError line that names the problem
and says what to do, shows no traceback, and changes nothing (model, optimizer, namespace, globals).
Then hypothesis: any text as a shape, as a magic line, as a device."""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError
from snapshot import diff, snapshot
from support import requires_cuda

from torchmagic.errors import TorchMagicError
from torchmagic.parsing import MAX_INPUT_ELEMENTS, looks_like_shape, parse_shape, split_line

EXTRA = '''
other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
text = "hello"
def bad_input():
    raise ValueError("first line\\nsecond line")
'''

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
STEP = "%%trainstep net optimizer\n"
LOSS = "criterion(net(input), y)"

# (id, what the user typed, a fragment the message must contain); pytest.param where marks are needed.
MISTAKES = [
    # %shapes: names and kinds
    ("shapes-nothing", "%shapes", "give the model"),
    ("shapes-unknown-model", "%shapes nosuch 1,1,32,32", "'nosuch' is not defined"),
    ("shapes-unknown-input", "%shapes net nosuch", "'nosuch' is not defined"),
    ("shapes-tensor-as-model", "%shapes input 1,1,32,32", "is a Tensor, not a torch.nn.Module"),
    ("shapes-int-as-model", "%shapes 3 1,1,32,32", "is an int"),
    ("shapes-class-as-model", "%shapes Net 1,1,32,32", "is a type"),
    ("shapes-optimizer-as-model", "%shapes optimizer 1,1,32,32", "is a SGD"),
    ("shapes-package-as-model", "%shapes torch.nn 1,1,32,32", "is a module"),
    ("shapes-no-input", "%shapes net", "give an input"),
    ("shapes-dict-int-keys", "%shapes net {1: input}", "keys must be strings"),
    # %shapes: malformed shape text
    ("shape-empty-size", "%shapes net 1,,3", "has an empty size"),
    ("shape-negative", "%shapes net -1,3", "is not a positive size"),
    ("shape-negative-later", "%shapes net 1,1,32,32 -2,3", "is not a positive size"),
    ("shape-zero", "%shapes net 0,3", "is not a positive size"),
    ("shape-fraction", "%shapes net 1.5,3", "is not a whole number"),
    ("shape-exponent", "%shapes net 1e12,1e12", "is not a whole number"),
    ("shape-too-many-elements", "%shapes net 1000000000000,1000000000000", "too many to allocate"),
    ("shape-just-over-limit", f"%shapes net {MAX_INPUT_ELEMENTS + 1}", "too many to allocate"),
    ("shape-5000-digits", "%shapes net " + "9" * 5000, "too large to allocate"),
    ("shape-x-separated", "%shapes net 1x1x32x32", "is not a whole number"),
    ("shape-open-bracket", "%shapes net (1,1,32,32", "unbalanced brackets"),
    ("shape-open-list", "%shapes net [1, 1, 32, 32", "unbalanced brackets"),
    ("shape-extra-close", "%shapes net 1,1,32,32)", "is not a whole number"),
    ("shape-call-unclosed", "%shapes net torch.randn(1,1,32,32", "unbalanced brackets"),
    ("shape-semicolon", "%shapes net 1;1", "not a valid Python expression"),
    # expressions
    ("expr-syntax", "%shapes net x.", "not a valid Python expression"),
    ("expr-raises", "%shapes net 1/0", "raised ZeroDivisionError"),
    ("expr-multiline-error", "%shapes net bad_input()", "raised ValueError: first line / second line"),
    ("expr-emoji", "%shapes net 1,1,32,32 🙂", "not a valid Python expression"),
    ("unicode-unknown-name", "%shapes ネット 1,1,32,32", "'ネット' is not defined"),
    ("very-long-name", "%shapes net " + "x" * 20000, "characters) is not defined: define it"),
    ("very-long-model-name", "%summary " + "m" * 5000, "characters) is not defined: define it"),
    # options
    ("option-unknown", "%shapes net 1,1,32,32 --bogus", "unrecognized arguments: --bogus"),
    ("option-mode-unknown", "%shapes --mode quantum net 1,1,32,32", "--mode"),
    ("option-depth-not-int", "%shapes net 1,1,32,32 --depth x", "invalid int value"),
    ("option-depth-missing", "%shapes net 1,1,32,32 --depth", "expected one argument"),
    ("option-depth-negative", "%shapes net --depth -1 1,1,32,32", "--depth -1 is negative"),
    ("option-model-missing", "%shapes --depth 1", "give the model"),
    # %summary
    ("summary-nothing", "%summary", "give the model"),
    ("summary-unknown", "%summary nosuch", "'nosuch' is not defined"),
    ("summary-tensor", "%summary input", "is a Tensor"),
    ("summary-bad-shape", "%summary net 1,,3", "has an empty size"),
    ("summary-wrong-input", "%summary net 2,3", "the forward failed in conv1 (Conv2d)"),
    ("summary-depth-negative", "%summary net --depth -2", "--depth -2 is negative"),
    # %device
    ("device-unknown", "%device tpu", "unknown device 'tpu'"),
    ("device-malformed-index", "%device cuda:abc", "unknown device"),
    ("device-meta", "%device meta net", "unsupported device 'meta'"),
    pytest.param("device-cuda-missing", "%device cuda net", "CUDA is not available", marks=CPU_ONLY),
    pytest.param("device-cuda-index-missing", "%device cuda:7", "CUDA is not available", marks=CPU_ONLY),
    pytest.param("device-cuda-index-beyond", "%device cuda:99 net", "there is no cuda:99", marks=requires_cuda),
    ("device-mps-missing", "%device mps", "MPS is"),
    ("device-unknown-name", "%device cpu nosuch", "'nosuch' is not defined"),
    ("device-string", "%device cpu text", "cannot move 'text' (a str)"),
    ("device-one-unknown-of-several", "%device auto net optimizer nosuch", "'nosuch' is not defined"),
    pytest.param("device-cuda-one-unknown", "%device cuda net optimizer nosuch", "'nosuch' is not defined",
                 marks=requires_cuda),
    ("device-option-unknown", "%device cpu net --bogus", "unrecognized arguments"),
    # %%trainstep: the line
    ("step-nothing", "%%trainstep\n" + LOSS, "required: model, optimizer"),
    ("step-no-optimizer", "%%trainstep net\n" + LOSS, "required: optimizer"),
    ("step-unknown-model", "%%trainstep nosuch optimizer\n" + LOSS, "'nosuch' is not defined"),
    ("step-unknown-optimizer", "%%trainstep net nosuch\n" + LOSS, "'nosuch' is not defined"),
    ("step-tensor-as-model", "%%trainstep input optimizer\n" + LOSS, "is a Tensor"),
    ("step-model-as-optimizer", "%%trainstep net net\n" + LOSS, "not a torch.optim.Optimizer"),
    ("step-class-as-optimizer", "%%trainstep net torch.optim.SGD\n" + LOSS, "not a torch.optim.Optimizer"),
    ("step-foreign-optimizer", "%%trainstep net other\n" + LOSS, "holds none of net's parameters"),
    ("step-parameterless-model", "%%trainstep criterion optimizer\n" + LOSS, "holds none of criterion's parameters"),
    ("step-lr-negative", "%%trainstep net optimizer --lr -1\n" + LOSS,
     "--lr -1: give positive learning rates, e.g. --lr 0.01"),
    ("step-lr-zero", "%%trainstep net optimizer --lr 0\n" + LOSS, "--lr 0: give positive learning rates"),
    ("step-lr-inf", "%%trainstep net optimizer --lr inf\n" + LOSS, "--lr inf: give positive learning rates"),
    ("step-lr-nan", "%%trainstep net optimizer --lr nan\n" + LOSS, "--lr nan: give positive learning rates"),
    ("step-lr-text", "%%trainstep net optimizer --lr abc\n" + LOSS, "--lr abc: give positive learning rates"),
    ("step-lr-one-bad-of-two", "%%trainstep net optimizer --lr 0.01,-1\n" + LOSS, "--lr 0.01,-1: give positive"),
    ("step-option-unknown", "%%trainstep net optimizer --bogus\n" + LOSS, "unrecognized arguments"),
    # %%trainstep: the body
    ("step-empty-body", "%%trainstep net optimizer", "the cell body is empty"),
    ("step-comment-only", STEP + "# the loss goes here", "the cell is empty"),
    ("step-ends-in-assignment", STEP + "loss = " + LOSS, "must be the loss expression"),
    ("step-unicode-assignment", STEP + "損失 = " + LOSS, "must be the loss expression"),
    ("step-syntax-error", STEP + "criterion(net(input), y", "syntax error on line 1"),
    ("step-return", STEP + "return " + LOSS, "must be the loss expression"),
    ("step-item", STEP + LOSS + ".item()", "not loss.item()"),
    ("step-none", STEP + "None", "gave None"),
    ("step-string", STEP + '"loss"', "is a str"),
    ("step-not-scalar", STEP + "net(input) - y", "not a single number"),
    ("step-detached", STEP + LOSS + ".detach()", "does not require grad"),
    ("step-no-grad", STEP + "with torch.no_grad():\n    loss = " + LOSS + "\nloss", "does not require grad"),
    # %memory plan and %%trainstep --plan
    ("plan-nothing", "%memory plan", "give the model and its input"),
    ("plan-no-input", "%memory plan net", "give an input after the model"),
    ("plan-unknown-optimizer", "%memory plan net 8,1,32,32 --optimizer adamx",
     "--optimizer adamx: not adamw, adam or sgd"),
    ("plan-model-as-optimizer", "%memory plan net 8,1,32,32 --optimizer net", "is Net, not an optimizer"),
    ("plan-foreign-optimizer", "%memory plan net 8,1,32,32 --optimizer other", "holds none of the model's trainable"),
    ("plan-lbfgs", "%memory plan net 8,1,32,32 --optimizer torch.optim.LBFGS(net.parameters())",
     "LBFGS steps with a closure"),
    ("plan-budget-not-a-size", "%memory plan net 8,1,32,32 --budget 24gigs", "--budget 24gigs is not a size"),
    ("plan-budget-zero", "%memory plan net 8,1,32,32 --budget 0GB", "--budget 0GB is not a size"),
    ("plan-dtype-int", "%memory plan net 8,1,32,32 --dtype int8", "--dtype int8: give float32, bfloat16 or float16"),
    ("plan-amp-unknown", "%memory plan net 8,1,32,32 --amp fp8", "invalid choice: 'fp8'"),
    ("plan-device-unknown", "%memory plan net 8,1,32,32 --device tpu", "--device tpu"),
    pytest.param("plan-device-cuda", "%memory plan net 8,1,32,32 --device cuda", "no CUDA device here", marks=CPU_ONLY),
    ("plan-devices-without-shard", "%memory plan net 8,1,32,32 --devices 4", "--shard ddp, fsdp or zero2"),
    ("plan-shard-without-devices", "%memory plan net 8,1,32,32 --shard fsdp", "give how many"),
    ("plan-nothing-to-checkpoint", "%memory plan net 8,1,32,32 --checkpointing", "no repeated blocks"),
    ("plan-forward-fails", "%memory plan net 8,1,28,28", "net's forward failed on fake tensors: RuntimeError:"),
    ("plan-option-elsewhere", "%memory on --budget 3GB", "--budget is for %memory plan MODEL INPUT: use it there"),
    ("step-plan-with-lr", "%%trainstep net optimizer --plan --lr 0.1\n" + LOSS, "--plan takes no --lr"),
    ("step-budget-without-plan", "%%trainstep net optimizer --budget 1GB\n" + LOSS, "--budget goes with --plan"),
    ("step-plan-reads-values", "%%trainstep net optimizer --plan\nloss = " + LOSS + "\nprint(loss.item())\nloss",
     "the cell reads a tensor's values"),
]

# Names the cell's own statements bind before the mistake can be seen (the body has to run to
# show the loss was computed under no_grad): the user's code ran, as in any cell that fails late.
BOUND_BY_THE_CELL = {"step-no-grad": {"loss"}}

# Messages that are IPython's own (raised before torchmagic runs): one line, but worded by IPython.
IPYTHON_WORDING = {"step-empty-body"}
ADVICE = re.compile(r"\b(use|give|define|check|write|put|name|close|create|compute|end|reduce|see|fix|shows)\b|e\.g\.")
HISTORY = re.compile(r"^(_+\d*|_i+\d*|_ih|_oh|_dh|In|Out|exit|quit|get_ipython)$")


def _namespace(ns: dict) -> dict:
    return {k: id(v) for k, v in ns.items() if not HISTORY.match(k)}


@pytest.fixture
def user(notes):
    notes.run(EXTRA)
    return notes


def _row_id(row):
    return row.values[0] if hasattr(row, "values") else row[0]


@pytest.mark.parametrize("case, cell, says", MISTAKES, ids=[_row_id(r) for r in MISTAKES])
def test_mistake(user, capsys, case, cell, says):
    magics = user.ip.magics_manager.registry["TorchMagics"]
    net, optimizer = user.ns["net"], user.ns["optimizer"]
    before, names, selected = snapshot(net, optimizer), _namespace(user.ns), magics.selected_device
    capsys.readouterr()

    message = user.usage_error(cell)  # exactly a UsageError, one line

    shown = capsys.readouterr()
    assert shown.err == f"UsageError: {message}\n" and shown.out == "", shown  # no traceback, nothing else
    assert says in message, message
    assert case in IPYTHON_WORDING or ADVICE.search(message), f"no advice in {message!r}"
    assert len(message) < 400, message
    assert diff(before, snapshot(net, optimizer), versions=True) == []
    now = {k: v for k, v in _namespace(user.ns).items() if k not in BOUND_BY_THE_CELL.get(case, ())}
    assert now == names and magics.selected_device == selected


def test_the_table_is_large_enough():
    assert len(MISTAKES) >= 40


# ---------------------------------------------------------------- hypothesis

SHAPEISH = st.text(alphabet=st.sampled_from(list("0123456789,,,  ()[]{}-+._xeE'\"１２，") + ["\t", "٣", "²"]),
                   max_size=40)


@given(st.one_of(st.text(max_size=60), SHAPEISH))
@example("9" * 5000)  # int() refuses more than 4300 digits
@example("1," * 3000 + "1")
@example("１，３，３２，３２")  # full-width, as a Japanese input method types it
@example("²,3")
@settings(max_examples=600, deadline=None)
def test_any_text_is_a_shape_or_a_usage_error(text):
    try:
        shape = parse_shape(text)
    except TorchMagicError as e:
        assert "\n" not in str(e)
        return
    assert shape and all(isinstance(d, int) and d > 0 for d in shape)
    numel = 1
    for d in shape:
        numel *= d
    assert numel <= MAX_INPUT_ELEMENTS


@given(st.lists(st.integers(1, 64), min_size=1, max_size=5), st.sampled_from(["{}", "({})", "[{}]", "{},"]),
       st.sampled_from([",", ", ", " ,"]))
def test_every_shape_written_out_reads_back(dims, frame, comma):
    assert parse_shape(frame.format(comma.join(map(str, dims)))) == tuple(dims)


@given(st.text(max_size=80))
@settings(max_examples=600, deadline=None)
def test_any_line_splits_or_is_a_usage_error(line):
    try:
        tokens = split_line(line)
    except TorchMagicError:
        return
    assert all(t and not t.isspace() for t in tokens)
    looks = [looks_like_shape(t) for t in tokens]  # never raises
    assert all(isinstance(v, bool) for v in looks)


@given(st.one_of(st.text(max_size=30), st.from_regex(r"(cuda|cpu|mps|meta|xla|auto)(:-?[0-9]{0,25})?", fullmatch=True)))
@settings(max_examples=300, deadline=None)
def test_any_device_text_is_a_device_or_a_usage_error(text):
    from torchmagic.devices import resolve_device

    try:
        device = resolve_device(text)
    except TorchMagicError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(device, torch.device)


@given(SHAPEISH)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_shape_text_through_the_magic(notes, text):
    """%shapes net <text>: a trace (perhaps of a failing forward) or one UsageError line; never
    another exception, and the model unchanged either way."""
    net = notes.ns["net"]
    before = snapshot(net)
    result = notes.ip.run_cell(f"%shapes net {text}", store_history=False)
    error = result.error_in_exec or result.error_before_exec
    if error is not None:
        assert type(error) is UsageError and "\n" not in str(error), repr(error)
    else:
        assert type(result.result).__name__ == "ShapeTrace"
    assert diff(before, snapshot(net)) == []
