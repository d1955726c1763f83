"""Models whose state is easy to damage, and the magic invocations run against them.

Adding a magic to the state-safety matrix is one `MagicCase` line in MAGICS; adding a model is
one `ZooModel` entry in ZOO. Each zoo entry is the code a user would type in a cell: it binds
`model` (what the magics receive), `opt` (its optimizer), and whatever its INPUT names.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import pytest

PRELUDE = """
import dataclasses, collections
import torch
import torch.nn as nn
torch.manual_seed(0)
"""


@dataclass(frozen=True)
class ZooModel:
    id: str
    setup: str  # defines model, opt and the names INPUT uses
    input: str  # INPUT of %shapes / %summary: a shape or an expression
    call: str  # one forward call, as a user writes it
    loss: str  # the %%trainstep body; its last line is the loss
    # magic id (a glob: "trainstep*") -> text the UsageError must contain: refused by that magic, safely.
    refused: dict = field(default_factory=dict)
    # magic id (a glob) -> reason: the code cannot handle this pair yet (strict xfail).
    xfail: dict = field(default_factory=dict)

    def refusal(self, magic_id: str) -> str:
        return next((v for k, v in self.refused.items() if fnmatch.fnmatchcase(magic_id, k)), "")

    def gap(self, magic_id: str) -> str:
        return next((v for k, v in self.xfail.items() if fnmatch.fnmatchcase(magic_id, k)), "")


def _opt(params: str = "model.parameters()") -> str:
    return f"opt = torch.optim.SGD({params}, lr=0.1, momentum=0.9)\n"


_CNN = "nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))"
_MLP = "nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))"

ZOO = [
    ZooModel("bn_train", f"model = {_CNN}.train()\n" + _opt(), "2,3,8,8", "model(torch.randn(2, 3, 8, 8))",
             "model(torch.randn(2, 3, 8, 8)).pow(2).mean()"),
    # The parent trains, its BatchNorm is frozen in eval mode (fine-tuning): tools that restore only the
    # root's mode bring the BatchNorm back in train mode.
    ZooModel("eval_bn_child", f"model = {_CNN}.train()\nmodel[1].eval()\n" + _opt(), "2,3,8,8",
             "model(torch.randn(2, 3, 8, 8))", "model(torch.randn(2, 3, 8, 8)).pow(2).mean()"),
    ZooModel("dropout_train", "model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 2)).train()\n"
             + _opt(), "4,8", "model(torch.randn(4, 8))", "model(torch.randn(4, 8)).pow(2).mean()"),
    ZooModel("frozen_layer", f"model = {_MLP}\nmodel[0].requires_grad_(False)\n" + _opt(), "4,8",
             "model(torch.randn(4, 8))", "model(torch.randn(4, 8)).pow(2).mean()"),
    # .grad already accumulated and momentum state in the optimizer, as after a step of the user's loop.
    ZooModel("existing_grads", f"model = {_MLP}\n" + _opt()
             + "model(torch.randn(4, 8)).sum().backward()\nopt.step()\nmodel(torch.randn(4, 8)).sum().backward()\n",
             "4,8", "model(torch.randn(4, 8))", "model(torch.randn(4, 8)).pow(2).mean()"),
    ZooModel("shared_module", """
class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        self.head.weight = nn.Parameter(torch.randn(2, 8))
    def forward(self, x):
        return self.head(self.block(torch.relu(self.block(x))))
model = Twice()
""" + _opt(), "4,8", "model(torch.randn(4, 8))", "model(torch.randn(4, 8)).pow(2).mean()"),
    ZooModel("dict_input", """
class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 4)
    def forward(self, x, mask):
        return self.proj(x) * mask
model = Masked()
batch = {"x": torch.randn(4, 8), "mask": torch.ones(4, 4)}
""" + _opt(), "batch", "model(**batch)", "model(**batch).pow(2).mean()"),
    ZooModel("tuple_output", """
class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 2)
    def forward(self, x):
        return self.a(x), self.b(x)
model = Two()
""" + _opt(), "4,8", "model(torch.randn(4, 8))", "a, b = model(torch.randn(4, 8))\na.sum() + b.pow(2).sum()"),
    ZooModel("dict_output", """
class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 2)
    def forward(self, x):
        return {"logits": self.a(x), "aux": self.b(x)}
model = Heads()
""" + _opt(), "4,8", "model(torch.randn(4, 8))",
             "out = model(torch.randn(4, 8))\nout['logits'].sum() + out['aux'].pow(2).sum()"),
    ZooModel("dataclass_output", """
@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor
class WithOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 4)
    def forward(self, x):
        h = self.a(x)
        return Output(logits=h.softmax(-1), hidden=h)
model = WithOutput()
""" + _opt(), "4,8", "model(torch.randn(4, 8))", "model(torch.randn(4, 8)).hidden.pow(2).mean()"),
    ZooModel("namedtuple_output", """
Pair = collections.namedtuple("Pair", "mean logvar")
class Gaussian(nn.Module):
    def __init__(self):
        super().__init__()
        self.mu, self.lv = nn.Linear(8, 2), nn.Linear(8, 2)
    def forward(self, x):
        return Pair(self.mu(x), self.lv(x))
model = Gaussian()
""" + _opt(), "4,8", "model(torch.randn(4, 8))",
             "out = model(torch.randn(4, 8))\nout.mean.pow(2).mean() + out.logvar.exp().mean()"),
    ZooModel("embedding_ids", "model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 3))\n" + _opt(),
             "2,5", "model(torch.randint(0, 50, (2, 5)))", "model(torch.randint(0, 50, (2, 5))).pow(2).mean()"),
    # The user's own hooks on modules and parameters must survive, and keep firing as before.
    ZooModel("user_hooks", f"""
model = {_MLP}
seen = []
model[0].register_forward_hook(lambda m, i, o: None)
model[0].register_forward_pre_hook(lambda m, i: None)
model[2].register_full_backward_hook(lambda m, gi, go: None)
model[2].weight.register_hook(lambda g: None)
model[2].bias.register_post_accumulate_grad_hook(lambda p: None)
""" + _opt(), "4,8", "model(torch.randn(4, 8))", "model(torch.randn(4, 8)).pow(2).mean()"),
    # No data at all: shapes work, anything that needs values is refused.
    ZooModel("meta_model", f"""
with torch.device("meta"):
    model = {_CNN}
""" + _opt(), "2,3,8,8", "model(torch.randn(2, 3, 8, 8, device='meta'))",
             "model(torch.randn(2, 3, 8, 8, device='meta')).pow(2).mean()",
             refused={"trainstep*": "meta", "device_move": "meta", "shapes_real": "use --mode meta"}),
    ZooModel("compiled", f"inner = {_CNN}.train()\nmodel = torch.compile(inner, backend='eager')\n" + _opt(),
             "2,3,8,8", "model(torch.randn(2, 3, 8, 8))", "model(torch.randn(2, 3, 8, 8)).pow(2).mean()",
             xfail={"trainstep_sweep": "--sweep runs the user's cell, which calls the compiled wrapper: dynamo "
                                       "compiles it and tags its parameters (_dynamo_static_input_type), as the cell "
                                       "run by hand does (or not, when dynamo reuses a graph compiled earlier in the "
                                       "process: hence not strict); the matrix has no by-hand form of a sweep to "
                                       "compare"}),
    ZooModel("data_parallel", f"model = nn.DataParallel({_CNN}.train())\n" + _opt(), "2,3,8,8",
             "model(torch.randn(2, 3, 8, 8))", "model(torch.randn(2, 3, 8, 8)).pow(2).mean()"),
]


STEP = "step"  # `hand` of %%trainstep: grads set to None, the body, backward, optimizer.step()


@dataclass(frozen=True)
class MagicCase:
    id: str
    code: str  # {input}, {call} and {loss} are filled from the zoo entry
    # "" : the magic must change nothing. Otherwise it exists to change the model, and must change it
    # exactly as this does on deep copies of model and opt: Python code ({call}, {loss} filled in),
    # or STEP, or f"{STEP} x3" for three steps.
    hand: str = ""
    needs: str = ""  # the feature this case waits for: a strict xfail until it exists
    # Writes the parameters and puts the same values back (e.g. --sweep): only their autograd
    # versions may change, which a pending backward of the user's would notice.
    restores_in_place: bool = False

    def cell(self, z: ZooModel) -> str:
        return self.code.format(input=z.input, call=z.call, loss=z.loss)


MAGICS = [
    MagicCase("device_report", "%device"),
    MagicCase("device_move", "%device cpu model opt"),
    MagicCase("shapes", "%shapes model {input}"),
    MagicCase("summary", "%summary model"),
    MagicCase("summary_input", "%summary model {input}"),
    MagicCase("trainstep", "%%trainstep model opt\n{loss}", hand=STEP),
    MagicCase("shapes_real", "%shapes --mode real model {input}"),
    MagicCase("shapes_fake", "%shapes --mode fake model {input}"),
    MagicCase("shapes_meta", "%shapes --mode meta model {input}"),
    MagicCase("shapes_auto", "%shapes --mode auto model {input}"),
    MagicCase("shapes_cell", "%%shapes\n{call}", hand="{call}"),  # the cell runs for real
    MagicCase("shapes_cell_ops", "%%shapes --ops\n{call}", hand="{call}"),
    MagicCase("freeze", "%freeze model", hand="model.requires_grad_(False)"),
    MagicCase("unfreeze", "%unfreeze model", hand="model.requires_grad_(True)"),
    MagicCase("trainstep_eval", "%%trainstep model opt --eval\n{loss}", hand=STEP),
    MagicCase("trainstep_steps", "%%trainstep model opt --steps 3\n{loss}", hand=f"{STEP} x3"),
    MagicCase("trainstep_no_undo", "%%trainstep model opt --no-undo\n{loss}", hand=STEP),
    MagicCase("trainstep_steps_no_undo", "%%trainstep model opt --steps 3 --no-undo\n{loss}", hand=f"{STEP} x3"),
    MagicCase("trainstep_sweep", "%%trainstep model opt --sweep 1e-4:1e-1\n{loss}", restores_in_place=True),
    MagicCase("memory", "%memory"),
    MagicCase("memory_on", "%memory on"),
    MagicCase("memory_plan", "%memory plan model {input}"),
    MagicCase("memory_plan_cell", "%%trainstep model opt --plan\n{loss}"),
]


def known_gap(magic: MagicCase, zoo: ZooModel) -> str:
    """Why this pair cannot pass yet ("" when it must pass)."""
    return f"needs {magic.needs}" if magic.needs else zoo.gap(magic.id)


def matrix_params():
    """magic x model pytest params, strict-xfail where a feature or a fix is still missing. A magic
    that does not exist yet runs on the first model only: its XPASS says the feature arrived, and
    clearing `needs` then runs it on the whole zoo."""
    return [pytest.param(m, z, id=f"{m.id}-{z.id}",
                         marks=[pytest.mark.xfail(strict="hence not strict" not in known_gap(m, z),
                                                  reason=known_gap(m, z))]
                         if known_gap(m, z) else [])
            for m in MAGICS for z in (ZOO[:1] if m.needs else ZOO)]
