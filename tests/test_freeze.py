"""%freeze / %unfreeze and param groups for fine-tuning (the notes' last section)."""
import pytest
import torch
from snapshot import diff, snapshot

from torchmagic.errors import TorchMagicError
from torchmagic.finetune import param_groups

RESNETISH = '''
import torch
import torch.nn as nn
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))
class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.layers = nn.Sequential(Block(), Block())
        self.fc = nn.Linear(4, 5)
    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))
model = Backbone()
'''


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_a_submodule(notes):
    r = notes.run("%freeze net.conv1")
    net = notes.ns["net"]
    assert trainable(net) == {"fc1.weight", "fc1.bias"}
    assert r.changed == ["conv1.weight", "conv1.bias"] and r.frozen == 60 and r.trainable == 13510 and r.total == 13570
    assert [(row.name, row.trainable) for row in r.rows] == [("conv1", "frozen"), ("fc1", "yes")]
    text = notes.text(r)
    assert "froze 2 parameter tensors" in text and "frozen: 60" in text
    assert "tm-dim" in notes.html(r)
    again = notes.run("%freeze net conv1")
    assert again.changed == [] and "2 more selected were frozen already" in notes.text(again)


def test_patterns_except_and_unfreeze(shell):
    shell.run(RESNETISH)
    model = shell.ns["model"]
    r = shell.run("%freeze model --except fc")
    assert trainable(model) == {"fc.weight", "fc.bias"} and r.matched == 10
    assert any("BatchNorm" in n and ".eval()" in n for n in r.notes)
    shell.run("%unfreeze model layers.1")
    assert trainable(model) == {"fc.weight", "fc.bias", "layers.1.conv.weight", "layers.1.conv.bias",
                                "layers.1.bn.weight", "layers.1.bn.bias"}
    r = shell.run("%freeze model.layers '*.bias'")  # relative to a submodule, with a wildcard
    assert "layers.1.conv.bias" not in trainable(model) and "fc.bias" in trainable(model)
    assert [(row.name, row.trainable) for row in r.rows] == [("stem", "frozen"), ("layers", "partly"), ("fc", "yes")]
    shell.run("%unfreeze model")
    assert trainable(model) == {n for n, _ in model.named_parameters()}


def test_summary_marks_frozen_layers(notes):
    notes.run("%freeze net.conv1")
    s = notes.run("%summary net")
    assert s.row("conv1").trainable == "frozen" and s.row("fc1").trainable == "yes" and s.frozen == 60
    assert "frozen" in notes.text(s)


def test_mistakes_are_one_line_and_change_nothing(notes):
    before = snapshot(notes.ns["net"])
    assert "'conv9' matches no parameter" in notes.usage_error("%freeze net conv9")
    assert "conv1" in notes.usage_error("%freeze net conv9")  # names what exists
    assert "give the model" in notes.usage_error("%freeze")
    assert "has no parameters" in notes.usage_error("%freeze criterion")
    assert "not a torch.nn.Module" in notes.usage_error("%unfreeze y")
    assert "matches no parameter" in notes.usage_error("%freeze net --except nothing_here")
    assert diff(before, snapshot(notes.ns["net"])) == []


def test_param_groups_give_pretrained_parts_a_lower_rate(shell):
    shell.run(RESNETISH)
    model = shell.ns["model"]
    groups = param_groups(model, lr=0.01, new="fc")
    assert [g["name"] for g in groups] == ["pretrained", "new"] and [g["lr"] for g in groups] == [0.001, 0.01]
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert [id(p) for p in groups[1]["params"]] == [id(model.fc.weight), id(model.fc.bias)]
    opt = torch.optim.AdamW(groups)
    assert [g["lr"] for g in opt.param_groups] == [0.001, 0.01]
    with pytest.raises(TorchMagicError, match="every parameter"):
        param_groups(model, lr=0.01, new="*")
    with pytest.raises(TorchMagicError, match="matches no parameter"):
        param_groups(model, lr=0.01, new="head")


def test_freeze_then_trainstep_with_groups(shell):
    """The notes' recipe: freeze early layers, lower rate for pretrained ones, train the head."""
    shell.run(RESNETISH + "x = torch.randn(2, 3, 8, 8)\ntarget = torch.tensor([1, 3])\n"
              "from torchmagic.finetune import param_groups\n"
              "optimizer = torch.optim.SGD(param_groups(model, lr=0.1, new='fc'), momentum=0.9)")
    shell.run("%freeze model.stem")
    stem = shell.ns["model"].stem.weight.detach().clone()
    r = shell.run("%%trainstep model optimizer\ntorch.nn.functional.cross_entropy(model(x), target)\n")
    assert torch.equal(stem, shell.ns["model"].stem.weight)
    assert r.row("layers.0.conv.weight").lr == pytest.approx(0.01) and r.row("fc.weight").lr == 0.1
    assert "stem.weight" not in [row.name for row in r.params]
