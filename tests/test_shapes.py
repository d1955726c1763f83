"""%shapes through a real shell: rows per call, inputs of every kind, failures, and the promises."""

from snapshot import diff, snapshot


def test_notes_network_rows(notes):
    t = notes.run("%shapes net 1,1,32,32")
    # The ops that make 1350 = 6 x 15 x 15 are rows too; the relu's (same shape in and out) are not.
    assert [(r.name, r.kind) for r in t.rows] == [("net", "module"), ("conv1", "module"), ("max_pool2d", "op"),
                                                  ("view", "op"), ("fc1", "module")]
    assert t.row("view").inputs == "[1, 6, 15, 15], 1, -1" and t.row("view").outputs == "[1, 1350]"
    assert "2 elementwise ops (same shape in and out) not shown: --ops shows them" in t.notes
    assert t.row("conv1").inputs == "[1, 1, 32, 32]" and t.row("conv1").outputs == "[1, 6, 30, 30]"
    assert t.row("fc1").inputs == "[1, 1350]" and t.row("fc1").outputs == "[1, 10]"
    assert t.row("fc1").params == 13510 and t.ok
    text = notes.text(t)
    assert "conv1" in text and "[1, 6, 30, 30]" in text and "13,510" in text
    html = notes.html(t)
    assert "<table>" in html and "[1, 6, 30, 30]" in html


def test_shape_forms_and_expressions_agree(notes):
    a = notes.run("%shapes net 1,1,32,32")
    b = notes.run("%shapes net (1, 1, 32, 32)")
    c = notes.run("%shapes net input")
    d = notes.run("%shapes net torch.zeros(1, 1, 32, 32)")
    outputs = [[r.outputs for r in t.rows] for t in (a, b, c, d)]
    assert outputs[0] == outputs[1] == outputs[2] == outputs[3]


def test_promises_hold(notes):
    before = snapshot(notes.ns["net"])
    notes.run("%shapes net 1,1,32,32")
    assert diff(before, snapshot(notes.ns["net"])) == []


def test_failure_names_module(notes):
    notes.run("net.fc1 = nn.Linear(1344, 10)")
    before = snapshot(notes.ns["net"])
    t = notes.run("%shapes net 1,1,32,32")
    assert not t.ok and t.failure.module == "fc1"
    assert t.failure.inputs == "[1, 1350]"
    assert "1350" in t.failure.error
    assert [r.status for r in t.rows] == ["open", "ok", "ok", "ok", "failed"]
    assert notes.text(t).startswith("net: fc1 (Linear) failed; 3 module calls and 2 ops traced up to it (real mode)")
    assert diff(before, snapshot(notes.ns["net"])) == []
