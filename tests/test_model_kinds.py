"""Kinds of models that other tools stumble on: lazy layers, TorchScript, pruned weights, inputs
written as tuples, distribution outputs, a 0-d input, grouped convolutions, learned positions with
an offset, grouped matmul (mixture of experts), tied weights, ops that fake tensors cannot run.
Each through the magics as a user types them, with the model left as it was."""
import pytest
import torch
import zoo
from snapshot import by_check, diff, snapshot
from torch import nn
from torch.nn.modules import module as nn_module
from torch.nn.parameter import is_lazy


def bind(shell, **values):
    shell.ns.update(values)


# ---------------------------------------------------------------- lazy layers


def test_summary_of_lazy_layers_says_they_are_uninitialized(shell):
    model = zoo.lazy_mlp()
    bind(shell, model=model)
    before = snapshot(model)
    s = shell.run("%summary model")
    assert s.total == 0
    assert [r.note for r in s.rows if r.cls == "LazyLinear"] == ["lazy: uninitialized until its first forward"] * 2
    assert "4 parameter tensors of lazy layers uninitialized, not counted" in shell.text(s)
    shell.html(s)
    assert diff(before, snapshot(model)) == []


@pytest.mark.parametrize("magic", ["%shapes", "%summary"])
def test_lazy_layers_get_their_shapes_from_a_copy(shell, magic):
    model = zoo.lazy_cnn()
    bind(shell, model=model)
    before = snapshot(model)
    result = shell.run(f"{magic} model 2,3,8,8")
    rows = {r.name: r for r in result.rows}
    assert rows["3"].output if magic == "%summary" else rows["3"].outputs == "[2, 2]"
    if magic == "%shapes":
        assert (rows["0"].cls, rows["0"].outputs, rows["0"].params) == ("LazyConv2d", "[2, 4, 6, 6]", 4 * 3 * 9 + 4)
        assert rows["3"].params == 144 * 2 + 2 and "traced a copy" in shell.text(result)
    else:
        assert rows["0"].note == "lazy: uninitialized, 112 after its first forward" and result.total == 0
    assert all(is_lazy(p) for p in model.parameters()) and type(model[0]) is nn.LazyConv2d
    assert diff(before, snapshot(model)) == []


def test_lazy_layers_in_fake_mode_is_one_line(shell):
    bind(shell, model=zoo.lazy_mlp())
    assert "use --mode real (it runs on a copy" in shell.usage_error("%shapes model 2,4 --mode fake")


# ---------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_modules(shell, how):
    plain = zoo.mlp((8, 16, 2))
    model = torch.jit.script(plain) if how == "script" else torch.jit.trace(plain, torch.randn(1, 8))
    bind(shell, model=model)
    before = snapshot(model)
    s = shell.run("%summary model")
    assert s.total == 8 * 16 + 16 + 16 * 2 + 2 and [r.cls for r in s.rows] == ["Sequential", "Linear", "ReLU", "Linear"]
    t = shell.run("%shapes model 4,8")
    assert t.ok and [(r.cls, r.outputs) for r in t.rows] == [("Sequential", "[4, 2]")]
    assert "its layers run inside compiled code" in shell.text(t) and "TorchScript" in t.why
    with_input = shell.run("%summary model 4,8")
    assert with_input.rows[0].output == "[4, 2]"
    assert with_input.rows[1].note == "inside TorchScript: no hook sees this call"
    assert "use --mode real" in shell.usage_error("%shapes model 4,8 --mode fake")
    assert diff(before, snapshot(model)) == []


def test_a_scripted_layer_inside_a_plain_model(shell):
    bind(shell, model=zoo.PartlyScripted())
    t = shell.run("%shapes model 4,8")
    assert [(r.name, r.cls, r.outputs) for r in t.rows] == [
        ("model", "PartlyScripted", "[4, 2]"), ("fc1", "Linear", "[4, 16]"), ("fc2", "Linear", "[4, 2]")]
    assert shell.run("%summary model").total == 8 * 16 + 16 + 16 * 2 + 2


# ---------------------------------------------------------------- pruning, torchinfo's own failure, inputs


def test_pruned_weights_count_what_their_mask_keeps(shell):
    model = zoo.pruned_mlp()
    bind(shell, model=model)
    s = shell.run("%summary model")
    assert s.rows[1].params == 8 * 16 // 2 + 16 and s.total == 8 * 16 // 2 + 16 + 16 * 2 + 2
    assert "0.weight 64 of 128" in shell.text(s)
    assert shell.run("%shapes model 2,8").ok


def test_a_tensor_kernel_size_attribute(shell):
    bind(shell, model=zoo.TensorKernelSize())
    assert shell.run("%summary model").total == 4 * 3 + 4  # torchinfo itself raises on it
    assert shell.run("%summary model 1,1,10").rows[1].output == "[1, 4, 10]"


@pytest.mark.parametrize("line, inputs", [
    ("%shapes model (x1,)", "[3, 8]"),
    ("%shapes model (x1, mask)", "[3, 8], [3, 4]"),
    ("%shapes model [x1, mask]", "[3, 8], [3, 4]"),
    ("%shapes model x1 mask", "[3, 8], [3, 4]"),
    ("%shapes model {'x': x1, 'mask': mask}", "x=[3, 8], mask=[3, 4]"),
    ("%shapes model 3,8", "[3, 8]"),
    ("%shapes model (3, 8)", "[3, 8]"),
    ("%shapes model [3,8]", "[3, 8]"),
])
def test_tuple_expressions_are_inputs_and_shapes_still_work(shell, line, inputs):
    bind(shell, model=zoo.Masked(), x1=torch.randn(3, 8), mask=torch.ones(3, 4))
    t = shell.run(line)
    assert t.ok and t.rows[0].inputs == inputs


def test_a_malformed_shape_is_still_a_shape_error(shell):
    bind(shell, model=zoo.Masked())
    assert "'1x8' in '1x8' is not a whole number" in shell.usage_error("%shapes model 1x8")


# ---------------------------------------------------------------- outputs and layers


def test_distribution_output_scalar_input_and_grouped_conv(shell):
    bind(shell, head=zoo.GaussianHead(), scalar=zoo.ScalarInput(), t=torch.tensor(0.5), grouped=zoo.grouped_conv())
    for mode in ("real", "fake", "meta"):
        d = shell.run(f"%shapes head 2,8 --mode {mode}")
        assert d.ok and d.rows[0].outputs == "Normal" and d.row("mu").outputs == "[2, 2]"
        g = shell.run(f"%shapes grouped 1,4,8,8 --mode {mode}")
        assert g.ok and g.rows[0].outputs == "[1, 8, 4, 4]"
    assert shell.run("%summary head 2,8").rows[0].output == "Normal"
    s = shell.run("%shapes scalar t")
    assert s.ok and s.rows[0].inputs == "scalar" and s.rows[0].full_inputs == "[]" and s.rows[0].outputs == "[1, 5]"
    assert shell.run("%summary grouped").total == (8 * 2 * 9 + 8) + (8 * 1 * 9 + 8)


# ---------------------------------------------------------------- fake mode's limits are not the model's


def test_learned_positions_with_an_offset_trace_in_fake_mode(shell):
    model = zoo.OffsetDecoder(vocab=100, positions=8)
    bind(shell, model=model, ids=torch.randint(0, 100, (2, 8)), bad=torch.tensor([[1, 2, 100]]))
    real = shell.run("%shapes model ids --mode real")
    for mode in ("fake", "meta"):
        t = shell.run(f"%shapes model ids --mode {mode}")
        assert t.ok and [(r.name, r.outputs) for r in t.rows] == [(r.name, r.outputs) for r in real.rows]
        wrong = shell.run(f"%shapes model bad --mode {mode}")  # a token id outside the vocabulary is still caught
        assert wrong.failure.module == "tokens" and "ids must be 0..99" in wrong.failure.explanation


def test_grouped_matmul_traces_in_fake_and_meta_mode(shell):
    model = zoo.GroupedExperts()
    bind(shell, model=model)
    before = snapshot(model)
    real = shell.run("%shapes model 2,5,8 --mode real --ops")
    for mode in ("fake", "meta"):
        t = shell.run(f"%shapes model 2,5,8 --mode {mode} --ops")
        assert t.ok and [(r.name, r.outputs) for r in t.rows] == [(r.name, r.outputs) for r in real.rows]
    assert diff(before, snapshot(model)) == []


@torch.library.custom_op("torchmagic_tests::double", mutates_args=())
def double(x: torch.Tensor) -> torch.Tensor:
    return x * 2  # no fake kernel registered: fake and meta tensors cannot run it


class CustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(double(x))


def test_an_op_fake_tensors_cannot_run_is_not_blamed_on_the_model(shell):
    bind(shell, model=CustomOp())
    for mode in ("fake", "meta"):
        f = shell.run(f"%shapes model 2,4 --mode {mode}").failure
        assert f.explanation == (f"model calls torchmagic_tests.double.default, which {mode} tensors cannot run "
                                 "(a real forward runs it)")
        assert f.fix == "use --mode real"
    big = shell.run("%shapes model 300000,4")  # auto picks fake for a large input, then falls back
    assert big.ok and big.mode == "real" and "ran a real forward instead" in shell.text(big)


def test_a_real_shape_error_keeps_its_explanation_in_fake_mode(shell):
    bind(shell, net=zoo.Net(fc_in=1344))
    f = shell.run("%shapes net 1,1,32,32 --mode fake").failure
    assert f.explanation.startswith("fc1 (Linear) expects in_features=1344 but received [1, 1350]")


# ---------------------------------------------------------------- tied weights and global state


def test_freeze_except_a_tied_head(shell):
    model = zoo.tiny_gpt()  # lm_head.weight is wte.weight
    bind(shell, model=model)
    r = shell.run("%freeze model --except lm_head")
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    assert trainable == {"wte.weight", "lm_head.weight"}
    assert "lm_head.weight is shared with wte.weight" in shell.text(r)
    assert ("lm_head", "yes") in [(row.name, row.trainable) for row in r.rows]
    shell.run("%unfreeze model")
    r = shell.run("%freeze model.lm_head")
    assert not model.wte.weight.requires_grad and r.matched == 1
    assert "lm_head.weight is shared with wte.weight: one tensor, so both change together" in shell.text(r)


def test_no_global_hook_entry_is_left_behind(shell):
    model = zoo.Net()
    bind(shell, model=model)
    before = snapshot(model)
    for line in ("%shapes model 1,1,32,32", "%shapes model 1,1,32,32 --mode fake", "%summary model 1,1,32,32"):
        shell.run(line)
    assert diff(before, snapshot(model)) == []
    assert not nn_module._global_forward_hooks_with_kwargs


def test_the_snapshot_sees_a_leftover_with_kwargs_entry():
    before = snapshot()
    handle = nn_module.register_module_forward_hook(lambda *a: None, with_kwargs=True)
    handle.remove()  # torch leaves the with_kwargs entry behind
    try:
        assert by_check(before, snapshot())["global hooks"] == ["global_hooks[_global_forward_hooks_with_kwargs]"]
    finally:
        nn_module._global_forward_hooks_with_kwargs.pop(handle.id, None)
