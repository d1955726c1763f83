"""%summary through a real shell: the notes' counts, tied and frozen weights, the output column from
%shapes' trace, a failing forward in one line, and the model left as it was."""
import gc
import weakref

from snapshot import diff, snapshot


def test_summary_counts_the_notes_network(notes):
    s = notes.run("%summary net")
    assert s.total == 13570 and s.trainable == 13570 and s.frozen == 0
    assert s.row("conv1").params == 60 and s.row("fc1").params == 13510
    text = notes.text(s)
    assert "13,570" in text and "13,510" in text
    assert "13,570" in notes.html(s)


def test_summary_with_input_and_promises(notes):
    notes.run("bn_net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(),"
              " nn.Linear(4 * 30 * 30, 2))\n"
              "bn_net.train(); bn_net[1].eval()")
    model = notes.ns["bn_net"]
    before = snapshot(model)
    s = notes.run("%summary bn_net 2,1,32,32")
    assert s.row("4").output == "[2, 2]" and s.flops > 0
    assert diff(before, snapshot(model)) == []


def test_summary_tied_weights_counted_once(shell):
    shell.run("import torch.nn as nn\n"
              "class Tied(nn.Module):\n"
              "    def __init__(self):\n"
              "        super().__init__()\n"
              "        self.embed = nn.Embedding(100, 16)\n"
              "        self.head = nn.Linear(16, 100, bias=False)\n"
              "        self.head.weight = self.embed.weight\n"
              "    def forward(self, ids):\n"
              "        return self.head(self.embed(ids))\n"
              "tied = Tied()")
    s = shell.run("%summary tied")
    assert s.total == 1600
    assert s.row("head").params == 0 and "tied to embed.weight" in s.row("head").note
    import torchinfo
    assert torchinfo.summary(shell.ns["tied"], verbose=0).total_params == 3200  # what we correct


def test_summary_frozen_and_no_model_kept_alive(notes):
    notes.run("for p in net.conv1.parameters(): p.requires_grad_(False)")
    s = notes.run("%summary net 1,1,32,32")
    assert s.row("conv1").trainable == "frozen" and s.frozen == 60 and s.trainable == 13510
    from torchinfo import torchinfo as ti
    assert "Net" not in ti._cached_forward_pass
    ref = weakref.ref(notes.ns["net"])
    notes.run("del net\noptimizer = None")
    notes.ip.displayhook.flush()
    gc.collect()
    assert ref() is None


def test_summary_with_input_uses_the_shapes_trace(shell):
    """torchinfo's own forward fails on these (a dict key named x, a dataclass output) or changes the
    model; the output column comes from %shapes' trace, which also counts the calls."""
    shell.run("import dataclasses, torch, torch.nn as nn\n"
              "@dataclasses.dataclass\n"
              "class Out:\n"
              "    logits: torch.Tensor\n"
              "class Masked(nn.Module):\n"
              "    def __init__(self):\n"
              "        super().__init__()\n"
              "        self.proj, self.spare = nn.Linear(8, 8), nn.Linear(2, 2)\n"
              "    def forward(self, x, mask):\n"
              "        return Out(self.proj(self.proj(x)) * mask)\n"
              "model = Masked()\n"
              "batch = {'x': torch.randn(4, 8), 'mask': torch.ones(4, 8)}")
    for name in ("model", "torch.compile(model, backend='eager')"):
        s = shell.run(f"%summary {name} batch")
        proj = next(r for r in s.rows if r.name.endswith("proj"))
        spare = next(r for r in s.rows if r.name.endswith("spare"))
        assert s.rows[0].output == "logits [4, 8]" and proj.output == "[4, 8]"  # a dataclass: its tensor fields
        assert proj.note == "called 2x (weights shared)" and spare.note == "not called by forward" and not spare.output
        assert s.total == 78 and s.flops == 2 * 2 * 4 * 8 * 8


def test_summary_failing_forward_is_one_line(notes):
    notes.run("net.fc1 = nn.Linear(1344, 10)")
    before = snapshot(notes.ns["net"])
    message = notes.usage_error("%summary net 1,1,32,32")
    assert "fc1 (Linear)" in message and "[1, 1350]" in message and "%shapes net" in message
    assert diff(before, snapshot(notes.ns["net"])) == []
