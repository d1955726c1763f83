"""%shapes --graph through a real shell: the graph's nodes and edges checked against the trace it
was drawn from, skip connections and residual adds as edges, folded blocks, the failing call, the
SVG, the text tree, and a one-line message where Graphviz is missing."""
import itertools
import re

import pytest
import torch
import zoo
from snapshot import diff, snapshot

from torchmagic.graph import find_dot

needs_dot = pytest.mark.skipif(find_dot() is None, reason="Graphviz's dot is not installed (apt-get install graphviz)")


def names(graph, kind=None):
    return [n.name for n in graph.nodes if kind is None or n.kind == kind]


def edge(graph, source: str, target: str):
    ids = {n.id: n.name for n in graph.nodes}
    found = [e for e in graph.edges if ids[e.source] == source and ids[e.target] == target]
    assert found, f"no edge {source} -> {target} among {[(ids[e.source], ids[e.target]) for e in graph.edges]}"
    return found[0]


def test_notes_net_is_a_chain_with_shapes_on_its_edges(notes):
    before = snapshot(notes.ns["net"])
    g = notes.run("%shapes net 1,1,32,32 --graph")
    assert diff(before, snapshot(notes.ns["net"])) == []
    assert names(g) == ["input", "conv1", "relu", "max_pool2d", "relu", "view", "fc1", "output"]
    chain = [(e.source, e.target, e.shape) for e in g.edges]
    ids = [n.id for n in g.nodes]
    assert [(s, t) for s, t, _ in chain] == list(itertools.pairwise(ids))
    assert [shape for _, _, shape in chain] == ["[1, 1, 32, 32]", "[1, 6, 30, 30]", "[1, 6, 30, 30]", "[1, 6, 15, 15]",
                                                "[1, 6, 15, 15]", "[1, 1350]", "[1, 10]"]
    assert g.edges[0].dtype == "float32" and all(e.dtype == "" for e in g.edges[1:])  # the dtype never changes
    assert g.node("input").kind == "input" and g.node("output").kind == "output" and g.node("fc1").cls == "Linear"
    text = notes.text(g)
    assert re.search(r"^view\s+\[1, 1350\]$", text, re.M) and re.search(r"^fc1\s+Linear\s+\[1, 10\]$", text, re.M)


def test_graph_of_a_kept_result_is_the_same(notes):
    t = notes.run("t = %shapes net 1,1,32,32\nt")
    # the table: the module calls and the ops that change a shape (max_pool2d, view); the relu's only with --ops
    assert [r.kind for r in t.rows] == ["module", "module", "op", "op", "module"]
    g = notes.run("t.graph()")
    assert names(g) == names(notes.run("%shapes net 1,1,32,32 --graph"))
    assert names(notes.run("%shapes net 1,1,32,32 --graph --depth 0")) == ["input", "net", "output"]


def test_every_call_and_shape_changing_op_is_a_node_and_every_tensor_between_them_an_edge(shell):
    shell.ns["m"] = zoo.ResNet(blocks=(2, 1, 1, 1), width=8, classes=10)
    t = shell.run("%shapes m 2,3,64,64 --ops")
    g = t.graph()
    drawn = {n.name for n in g.nodes} | {b.name for b in g.boxes}
    for row in t.flow[1:]:  # every call below the model's own
        if row.kind == "module":
            assert row.name in drawn, row.name
        elif row.sources and row.outputs != row.sources[0][1]:
            assert row.name in drawn, row.name  # flatten
    # every edge carries the shape its target received, and every node but the input receives one
    by_id = {n.id: n for n in g.nodes}
    for e in g.edges:
        target = by_id[e.target]
        if target.kind == "module":  # node r12 is the trace's row 12
            assert e.shape in t.flow[int(target.id[1:])].inputs, (target.name, e.shape)
    assert all(any(e.target == n.id for e in g.edges) for n in g.nodes if n.kind != "input")
    # a bottleneck's residual add joins its last BatchNorm and the skip from the block before
    adds = [n for n in g.nodes if n.name == "add"]
    assert len(adds) == 5
    into = {(by_id[e.source].name, e.shape) for e in g.edges if e.target == adds[1].id}
    assert into == {("layer1.1.bn3", "[2, 32, 16, 16]"), ("layer1.0.relu", "[2, 32, 16, 16]")}  # the skip
    into = {by_id[e.source].name for e in g.edges if e.target == adds[0].id}
    assert into == {"layer1.0.bn3", "layer1.0.downsample.1"}  # the projection shortcut
    assert [b.name for b in g.boxes][:4] == ["layer1", "layer1.0", "layer1.0.downsample", "layer1.1"]


def test_transformer_blocks_fold_and_show_their_residual_adds(shell):
    shell.ns["gpt"] = zoo.GPT(vocab=100, ctx=16, d=32, layers=3, heads=4)
    g = shell.run("%shapes gpt 2,16 --graph")
    block = g.boxes[0]
    assert (block.name, block.cls, block.repeat) == ("h.0 … h.2", "GPTBlock", 3)
    assert sum(n.name == "h.0.ln_1" for n in g.nodes) == 1 and not any(n.name.startswith("h.1") for n in g.nodes)
    first, second = [n for n in g.nodes if n.name == "add" and n.box == block.id]
    by_id = {n.id: n.name for n in g.nodes}
    assert {by_id[e.source] for e in g.edges if e.target == first.id} == {"add", "h.0.c_proj"}  # x + attn(x)
    assert {by_id[e.source] for e in g.edges if e.target == second.id} == {"add", "h.0.mlp.2"}  # x + mlp(x)
    assert edge(g, "add", "ln_f").shape == "[2, 16, 32]"  # the last block's output leaves the run
    assert edge(g, "input", "wte").dtype == "int64" and edge(g, "wte", "add").dtype == "float32"
    assert "h.0 … h.2" in shell.text(g) and "GPTBlock ×3" in shell.text(g)


def test_hugging_face_block_from_a_config(shell):
    pytest.importorskip("transformers", reason="transformers is not installed (tests/frontend/requirements.txt has it)")
    shell.run("import torch\nfrom transformers import GPT2Config, GPT2Model\n"
              "hf = GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=100, n_positions=16)).eval()\n"
              "ids = torch.zeros(1, 8, dtype=torch.long)")
    g = shell.run("%shapes hf ids --graph")
    assert [b.name for b in g.boxes] == ["h.0", "h.0.attn", "h.0.mlp"]
    residual = [n for n in g.nodes if n.name == "add" and n.box == g.boxes[0].id]
    assert len(residual) == 2
    by_id = {n.id: n.name for n in g.nodes}
    assert {by_id[e.source] for e in g.edges if e.target == residual[0].id} == {"drop", "h.0.attn.resid_dropout"}
    assert g.node("output").shape == "[1, 8, 32]"


def test_llama_7b_on_meta_folds_its_32_layers(shell):
    with torch.device("meta"):
        shell.ns["llama"] = zoo.Llama()
    g = shell.run("%shapes llama 1,2048 --graph")
    assert g.boxes[0].repeat == 32 and g.boxes[0].name == "layers.0 … layers.31"
    assert len(g.nodes) < 40 and "meta mode" in shell.text(g)


@needs_dot
def test_failing_call_is_red_with_the_why_and_fix(notes):
    g = notes.run("%shapes net 1,1,28,28 --graph")
    assert g.node("fc1").status == "failed" and [n.status for n in g.nodes].count("failed") == 1
    assert names(g)[-1] == "fc1"  # nothing after it ran: no output
    assert edge(g, "view", "fc1").shape == "[1, 1014]"
    html = notes.html(g)
    assert '<g class="node failed">' in html and "<svg" in html
    assert "expects in_features=1350" in html and "fix: use nn.Linear(1014, 10)" in html
    text = notes.text(g)
    assert "✗ fc1" in text and "why: fc1 (Linear) expects in_features=1350" in text


def test_cell_graph(notes):
    g = notes.run("%%shapes --graph\nout = net(input)\nloss = criterion(out, y)\n")
    assert [b.name for b in g.boxes] == ["net"]
    assert names(g, "input") == ["input", "input"] and names(g, "output") == ["output"]
    assert edge(g, "net.fc1", "criterion").shape == "[1, 10]"
    assert edge(g, "criterion", "output").shape == "[]"


@needs_dot
def test_svg_follows_the_theme_and_fits_the_column(notes, tmp_path):
    g = notes.run("%shapes net 1,1,32,32 --graph")
    svg = g.svg()
    assert svg.startswith("<svg") and 'style="max-width:100%;height:auto"' in svg and "viewBox" in svg
    assert "currentColor" in svg and "var(--jp-error-color1" in svg and "#000" not in svg
    assert svg.count('<g class="edge">') == len(g.edges) and "[1, 1350]" in svg
    path = tmp_path / "net.svg"
    notes.ns["path"] = str(path)
    assert notes.run("t = _\nt.save(path)") == str(path)
    assert path.read_text().startswith('<?xml version="1.0" encoding="UTF-8"?>\n<svg')
    with pytest.raises(Exception, match="ending in .svg"):
        g.save(str(tmp_path / "net.png"))


def test_without_graphviz_one_line_says_how_to_get_it(notes, monkeypatch, tmp_path):
    g = notes.run("%shapes net 1,1,32,32 --graph")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    monkeypatch.setattr("sysconfig.get_path", lambda name: str(tmp_path))
    html = notes.html(g)
    assert "apt-get install graphviz" in html and "<svg" not in html and "[1, 1350]" in html
    notes.ns["g"] = g
    err = notes.error("g.save('net.svg')")
    assert "apt-get install graphviz" in str(err) and "\n" not in str(err)


def test_graph_options_are_checked(notes):
    assert "--depth -1 is negative" in notes.usage_error("%shapes net 1,1,32,32 --graph --depth -1")
    assert "%%shapes traces the cell" in notes.usage_error("%%shapes net --graph\nnet(input)\n")


def test_outputs_inside_a_dataclass_tuple_and_dict(shell):
    shell.ns["heads"] = zoo.Heads()
    g = shell.run("%shapes heads 2,12 --graph")
    into = sorted((e.source, e.shape) for e in g.into("output"))
    ids = {n.name: n.id for n in g.nodes}
    assert into == sorted([(ids["body"], "[2, 8]"), (ids["named"], "[2, 12]"), (ids["split"], "[2, 8]"),
                           (ids["split"], "[2, 4]")])


def test_a_large_models_kept_result_says_how_to_draw_it(shell):
    shell.run("import torch\nbig = torch.nn.Sequential(torch.nn.Linear(1000, 1001), torch.nn.ReLU())")
    shell.run("t = %shapes big 1,1000")  # over a million parameters: the ops between modules cost time, skipped
    err = shell.error("t.graph()")
    assert "%shapes big INPUT --graph records them" in str(err) and "\n" not in str(err)
    g = shell.run("%shapes big 1,1000 --graph")
    assert names(g) == ["input", "0", "1", "output"]
