"""Readable at real scale: tables that fit the terminal, condensed values with the full ones kept,
totals on containers, and the small things a learner trips on (hints, explanations, plots)."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import zoo
from snapshot import diff, snapshot

from torchmagic import plot, render, tracing

WIDE = '''
import torch
from torch import nn

class Cache:  # what a key/value cache looks like to %shapes: a class named *Cache with a length
    def __init__(self, layers):
        self.layers = [None] * layers
    def __len__(self):
        return len(self.layers)
    def get_seq_length(self):
        return 0

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_projection_with_a_long_name = nn.Linear(64, 64)
    def forward(self, hidden_states, cache=None, attention_mask=None, position_ids=None, use_cache=True):
        return self.attention_projection_with_a_long_name(hidden_states)

class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
    def forward(self, x):
        cache = Cache(len(self.blocks))
        for block in self.blocks:
            x = block(x, cache, None, position_ids=torch.arange(x.shape[1])[None], use_cache=True)
        return x, x.sum(), None

wide = Wide()
x = torch.randn(2, 16, 64)
'''


def lines(text: str) -> list[str]:
    return text.splitlines()


def test_text_fits_the_configured_width_and_print_shows_everything(shell):
    shell.run(WIDE)
    t = shell.run("%shapes wide x")
    assert max(map(len, lines(shell.text(t)))) > 80  # the default width where none is known: 120
    assert max(map(len, lines(shell.text(t)))) <= 120
    shell.run("%config TorchMagics.text_width = 80")
    shown = shell.text(t)
    assert max(map(len, lines(shown))) <= 80, shown
    row = next(line for line in lines(shown) if line.startswith("  blocks.0 "))
    assert "[2, 16…, 16]" in row  # a long value elided in the middle, its ends kept
    assert re.search(r"^    attentio…ng_name +Linear ", shown, re.M)  # names are cut only after values
    full = str(t)  # print(t): every name and every value whole
    assert "    blocks.0.attention_projection_with_a_long_name  Linear" in full
    assert "[2, 16, 64], Cache, None, position_ids=[1, 16], use_cache=True" in full and max(map(len, lines(full))) > 80
    shell.run("%config TorchMagics.text_width = 0")
    assert max(map(len, lines(shell.text(t)))) <= 120


def test_values_are_condensed_and_the_full_ones_kept(shell):
    shell.run(WIDE)
    t = shell.run("%shapes wide x")
    block = t.row("blocks.0")
    # None arguments left out, a cache with its size, keywords only where they hold a shape
    assert block.inputs == "[2, 16, 64], Cache (3 layers), position_ids=[1, 16]"
    assert block.full_inputs == "[2, 16, 64], Cache, None, position_ids=[1, 16], use_cache=True"
    # a 0-d tensor reads as a scalar; positional Nones of an output stay (their place means something)
    assert t.row("wide").outputs == "([2, 16, 64], scalar, None)"
    assert t.row("wide").full_outputs == "([2, 16, 64], [], None)"


def test_model_outputs_show_their_tensor_fields():
    @dataclasses.dataclass
    class Output:
        loss: torch.Tensor | None = None
        logits: torch.Tensor | None = None
        hidden_states: tuple | None = None
        note: str = "x"

    out = Output(loss=torch.tensor(2.0), logits=torch.ones(1, 16, 128))
    assert tracing.describe(out) == "loss scalar, logits [1, 16, 128]"
    assert tracing.describe(out, full=True) == "Output(loss=[], logits=[1, 16, 128], hidden_states=None, note='x')"
    assert tracing.describe(Output()) == "Output"  # nothing with a shape: its name


def test_transformers_outputs_and_caches_read_short():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128)
    model = transformers.AutoModelForCausalLM.from_config(config)
    t = tracing.trace_shapes(model, [torch.randint(0, 128, (1, 16))], name="gpt2")
    assert t.row("gpt2").outputs == "logits [1, 16, 128], cache DynamicCache (2 layers)"
    assert t.row("gpt2").full_outputs.startswith("CausalLMOutputWithCrossAttentions(loss=None, logits=[1, 16, 128]")
    assert t.row("transformer.h.0").inputs.startswith("[1, 16, 64], DynamicCache (2 layers), ")
    assert "None" not in t.row("transformer").inputs and "use_cache" not in t.row("transformer.h.0").inputs


def test_elide_keeps_whole_items_where_it_can():
    value = "[1, 16, 64], DynamicCache (2 layers), position_ids=[1, 16], cache_position=[16]"
    assert render.elide(value, 200) == value
    assert render.elide(value, 40) == "[1, 16, 64], …, cache_position=[16]"
    assert render.elide(value, 16) == "[1, 16, 64], …"
    assert render.elide("abcdefghijklmnopqrstuvwxyz", 9) == "abcd…wxyz"
    assert render.elide("      post_attention_layernorm", 16) == "      post_…norm"  # the indentation stays


def test_fit_cuts_values_before_names():
    assert render.fit([10, 10, 40, 40, 8], 120, [{2, 3}, {0, 1}]) == [10, 10, 40, 40, 8]
    assert render.fit([10, 10, 40, 40, 8], 80, [{2, 3}, {0, 1}]) == [10, 10, 22, 22, 8]
    # the narrow one keeps its width
    assert render.fit([10, 10, 20, 40, 8], 80, [{2, 3}, {0, 1}]) == [10, 10, 20, 24, 8]
    assert render.fit([30, 30, 40, 40, 8], 80, [{2, 3}, {0, 1}]) == [20, 20, 12, 12, 8]


def test_containers_show_their_totals_and_depth_1_says_where_the_parameters_are(shell):
    shell.ns["gpt"] = zoo.tiny_gpt()
    s = shell.run("%summary gpt --depth 1")
    text = shell.text(s)
    total = sum(p.numel() for p in shell.ns["gpt"].parameters())  # the tied head once
    h = sum(p.numel() for p in shell.ns["gpt"].h.parameters())
    assert re.search(rf"^  h +ModuleList +{h:,}$", text, re.M), text
    assert re.search(rf"^gpt +GPT +{total:,}$", text, re.M), text
    assert re.search(r"^  lm_head +Linear +note", text.replace("weight tied to wte.weight", "note"), re.M), text
    t = shell.run("%shapes gpt 2,16")
    assert t.row("gpt").total_params == total == t.params and t.row("h.0").total_params == h // len(shell.ns["gpt"].h)


def test_summary_folds_identical_blocks_with_their_total(shell):
    with torch.device("meta"):
        shell.ns["gpt"] = zoo.GPT()
    s = shell.run("%summary gpt")
    text = shell.text(s)
    assert re.search(r"^    0–11 +GPTBlock ×12 +85\.1 M$", text, re.M), text
    assert "7 of 114 rows, repeated blocks folded: print() the result shows every row in full" in text
    assert "85,054,464" in str(s) or "7,087,872" in str(s)


def test_attention_is_mentioned_only_when_the_forward_has_it(notes, shell):
    assert "attention" not in notes.text(notes.run("%summary net 1,1,32,32"))
    assert "attention" not in notes.text(notes.run("%shapes net 1,1,32,32"))
    shell.ns["gpt"] = zoo.tiny_gpt()
    assert "FLOPs: " in shell.text(shell.run("%summary gpt 2,16"))
    assert "(attention included)" in shell.text(shell.run("%summary gpt 2,16"))


def test_space_separated_shapes_get_a_hint(notes):
    before = snapshot(notes.ns["net"])
    message = notes.usage_error("%shapes net 1, 1, 32, 32")
    assert message == "the spaces in '1, 1, 32, 32' make 4 inputs: write one shape without spaces, e.g. 1,1,32,32"
    assert "make 2 inputs" in notes.usage_error("%summary net 1,1, 32,32")
    assert diff(before, snapshot(notes.ns["net"])) == []


def test_freeze_of_an_unknown_submodule_lists_the_ones_that_exist(notes):
    before = snapshot(notes.ns["net"])
    assert notes.usage_error("%freeze net.conv2") == ("net.conv2 is not a submodule of net: "
                                                      "give one of net.conv1, net.fc1")
    assert diff(before, snapshot(notes.ns["net"])) == []


def test_trainstep_forward_error_is_explained_then_the_users_frames(notes, capsys):
    notes.run("big = torch.randn(1, 1, 28, 28)")
    before = snapshot(notes.ns["net"])
    err = notes.error("%%trainstep net optimizer\nout = net(big)\ncriterion(out, y)\n")
    assert type(err) is RuntimeError and "1014" in str(err)
    shown = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert "why: net.fc1 (Linear) expects in_features=1350 but received [1, 1014]" in shown
    assert "fix: use nn.Linear(1014, 10) or nn.LazyLinear(10)" in shown
    traceback = shown[shown.index("Traceback"):]
    assert shown.index("why:") < shown.index("Traceback")
    assert "out = net(big)" in traceback and "x = self.fc1(x)" in traceback
    # IPython 7.34 shows its own frames too
    assert "torch/nn/modules" not in traceback and "torchmagic" not in traceback
    assert diff(before, snapshot(notes.ns["net"])) == []


def test_plots_use_a_log_axis_across_decades_and_no_made_up_range():
    spread = plot.line_svg([([1, 2, 3, 4], [0.197, 3.1, 4e4, 1.1e12], "loss")], x_label="step", y_label="loss")
    assert "loss (log)" in spread and ">0.197<" in spread and ">1.1e+12<" in spread
    near = plot.line_svg([([1, 2, 3], [2.1, 2.0, 1.9], "loss")], y_label="loss")
    assert "(log)" not in near
    one = plot.line_svg([([1], [0.5], "loss")], x_label="step")
    assert one.count('text-anchor="middle" fill="currentColor">1<') == 1 and ">0<" not in one and ">2<" not in one
    assert all(c not in spread for c in ("#1f77b4", "#d62728"))  # low contrast on a dark theme


def test_sweep_plot_is_log_scale_when_the_losses_spread(notes):
    r = notes.run("%%trainstep net optimizer --sweep 1e-4:1 --no-widget\nout = net(input)\ncriterion(out, y)\n")
    spread = plot.wide_range([p.loss_after for p in r.points] + [r.loss_before])
    assert ("loss (log)" in notes.html(r)) == spread


def test_memory_chart_has_axes(shell):
    shell.run("%memory on")
    shell.run("import torch\na = torch.ones(64 * 2**20 // 4)")
    shell.run("b = torch.ones(64 * 2**20 // 4)")
    html = shell.html(shell.run("%memory"))
    svg = html[html.index("<svg"):html.index("</svg>")]
    assert ">cell</text>" in svg and ">RSS</text>" in svg  # the axes say what they measure
    assert re.search(r">\d+\.\d (MB|GB)</text>", svg), svg  # values in bytes
    shell.run("%memory off")
