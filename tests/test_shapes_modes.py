"""%shapes in real, fake and meta mode: same shapes as a real run on every model of the zoo, the
mode auto picks and why, large models without compute, wrappers, FLOPs, and the promises."""
import re
import warnings

import pytest
import torch
import zoo
from snapshot import diff, snapshot
from torch import nn


def rows(t):
    return [(r.name, r.cls, r.inputs, r.outputs, r.dtype, r.params) for r in t.rows]


def bind(shell, **values):
    shell.ns.update(values)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_fake_and_meta_give_the_real_shapes(shell, name):
    build, shape, _ = zoo.ZOO[name]
    torch.manual_seed(0)
    model = build()
    with torch.device("meta"):
        on_meta = build()
    bind(shell, model=model, on_meta=on_meta)
    dims = ",".join(map(str, shape))
    before = snapshot(model)
    real = shell.run(f"%shapes model {dims} --mode real")
    assert real.ok and real.mode == "real" and len(real.rows) > 1
    for mode in ("fake", "meta"):
        t = shell.run(f"%shapes model {dims} --mode {mode}")
        assert t.ok and t.mode == mode
        assert rows(t) == rows(real), mode
        assert t.flops == real.flops
        # Meta tensors take the math path of attention, which makes more intermediate tensors.
        assert t.activation_bytes == real.activation_bytes or mode == "meta"
    built_on_meta = shell.run(f"%shapes on_meta {dims}")
    assert built_on_meta.mode == "meta" and rows(built_on_meta)[1:] == rows(real)[1:]
    assert diff(before, snapshot(model)) == []


def test_nested_outputs_are_described(shell):
    bind(shell, model=zoo.Heads())
    t = shell.run("%shapes model 2,12 --mode fake")
    assert t.row("split").outputs == "([2, 8], [2, 4])"
    assert t.row("named").inputs == "{a: [2, 8], b: [2, 4]}"
    # condensed: a namedtuple's or dataclass's fields by name, None ones left out; the result keeps the full form
    assert t.row("named").outputs == "logits [2, 8], features [2, 12]"
    assert t.row("named").full_outputs == "Pair(logits=[2, 8], features=[2, 12])"
    assert t.row("model").outputs == "logits [2, 8], extras {features: [2, 12], both: ([2, 8], [2, 4])}"
    assert t.row("model").full_outputs == "Output(logits=[2, 8], extras={features: [2, 12], both: ([2, 8], [2, 4])})"


def test_auto_picks_real_for_small_and_fake_for_large(shell):
    bind(shell, net=zoo.Net(), cnn=zoo.SmallCNN())
    small = shell.run("%shapes net 1,1,32,32")
    assert small.mode == "real" and "small model" in shell.text(small)
    big_input = shell.run("%shapes cnn 16,3,256,256")
    assert big_input.mode == "fake" and "input elements" in big_input.why


def test_config_sets_the_default_mode(shell):
    bind(shell, net=zoo.Net())
    shell.run("%config TorchMagics.shape_mode = 'fake'")
    assert shell.run("%shapes net 1,1,32,32").mode == "fake"
    assert shell.run("%shapes net 1,1,32,32 --mode real").mode == "real"


def test_mode_errors_are_one_line(shell):
    with torch.device("meta"):
        bind(shell, on_meta=zoo.Net())
    assert "--mode meta or --mode fake" in shell.usage_error("%shapes on_meta 1,1,32,32 --mode real")
    assert "invalid choice" in shell.usage_error("%shapes on_meta 1,1,32,32 --mode fast")


def run_counting_allocations(shell, line):
    """The magic's result and the bytes of CPU tensor memory allocated while it ran (torch profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = shell.run(line)
    return result, sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


def test_resnet50_at_batch_16_allocates_no_activations(shell):
    torch.manual_seed(0)
    model = zoo.resnet50()
    bind(shell, model=model)
    before = snapshot(model)
    t, allocated = run_counting_allocations(shell, "%shapes model 16,3,224,224")
    assert t.mode == "fake" and t.ok
    assert t.rows[-1].name == "fc" and t.rows[-1].outputs == "[16, 1000]"
    assert t.row("layer4").outputs == "[16, 2048, 7, 7]"
    assert t.params == 25_557_032
    assert 125e9 < t.flops < 135e9  # 4.1 G multiply-adds per image, 2 FLOPs each
    assert t.activation_bytes > 1e9 and allocated < 1e6  # a real forward would allocate > 1 GB
    assert diff(before, snapshot(model)) == []


def test_gpt2_small_with_real_weights_at_seq_1024(shell):
    torch.manual_seed(0)
    gpt = zoo.GPT()
    bind(shell, gpt=gpt)
    before = snapshot(gpt)
    t, allocated = run_counting_allocations(shell, "%shapes gpt 1,1024")
    assert t.mode == "fake" and t.ok and allocated < 1e6
    assert t.row("h.11").outputs == "[1, 1024, 768]" and t.row("lm_head").outputs == "[1, 1024, 50257]"
    assert t.params == 124_439_808  # the head is tied to wte: counted once
    # 2 FLOPs per parameter and token, plus causal attention counted by FlopCounterMode's formula.
    attention = 12 * 4 * 1024 * 1024 * 768
    assert t.flops == pytest.approx(2 * 1024 * (124_439_808 - 1024 * 768) + attention, rel=0.02)
    assert diff(before, snapshot(gpt)) == []


def test_llama_7b_on_meta(shell):
    with torch.device("meta"):
        llama = zoo.Llama()
    bind(shell, llama=llama)
    before = snapshot(llama)
    t = shell.run("%shapes llama 1,2048")
    assert t.mode == "meta" and t.ok and t.params == 6_738_415_616
    assert t.row("lm_head").outputs == "[1, 2048, 32000]"
    # 350+ calls: the result keeps every row; its display folds the 32 identical layers into one row
    # with their total, and says how to see all.
    assert len(t.rows) > 350 and t.hidden == 0
    text = shell.text(t)
    folded = r"^  layers\.0–31 +LlamaLayer ×32 +\[1, 2048, 4096\] +\[1, 2048, 4096\] +6\.48 B "
    assert re.search(folded, text, re.M), text
    assert re.search(r"^llama +Llama +.* 6,738,415,616 ", str(t), re.M)  # print(): every count in full
    assert "5 of 388 rows, repeated blocks folded: print() the result shows every row in full" in text
    assert "params: 6,738,415,616 (25.1 GB)" in text
    assert len(text.splitlines()) < 60 and len(str(t).splitlines()) > 350
    assert 27e12 < t.flops < 31e12
    full = shell.run("%shapes llama 1,16 --depth 3")
    assert full.hidden == 0 and full.row("layers.31.mlp.down_proj").outputs == "[1, 16, 4096]"
    assert diff(before, snapshot(llama)) == []


def test_model_with_fake_cuda_parameters_traces_on_this_machine(shell):
    from torch._subclasses.fake_tensor import FakeTensorMode

    net = zoo.Net()
    with FakeTensorMode():  # torch's init functions cannot run on fake CUDA tensors here: swap them in after
        for m in net.modules():
            for k, p in m._parameters.items():
                m._parameters[k] = nn.Parameter(torch.empty(p.shape, device="cuda"))
    assert net.fc1.weight.device.type == "cuda"
    bind(shell, net=net)
    t = shell.run("%shapes net 1,1,32,32")
    assert t.mode == "fake" and t.ok and t.row("fc1").outputs == "[1, 10]"
    # A CPU input to a CUDA model is caught (fake convolutions do not check devices: Linear does).
    shell.run("import torch; x = torch.zeros(1, 1, 32, 32)")
    bad = shell.run("%shapes net x --mode fake")
    assert not bad.ok and bad.failure.module in ("conv1", "fc1")
    assert "on cuda:0 but its input is on cpu" in bad.failure.explanation


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_model_in_fake_mode_allocates_no_cuda_memory(shell):
    net = zoo.resnet50().cuda()
    bind(shell, net=net)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    t = shell.run("%shapes net 16,3,224,224")
    assert t.mode == "fake" and t.ok and "cuda" in t.why
    assert torch.cuda.max_memory_allocated() == start


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = self.fc(x)
        return x[x > 0]  # the output shape depends on the values


def test_data_dependent_op_falls_back_to_real_in_auto(shell):
    model = DataDependent()
    bind(shell, model=model, big=torch.randn(300_000, 4))
    before = snapshot(model)
    t = shell.run("%shapes model big")
    assert t.ok and t.mode == "real" and "ran a real forward instead" in shell.text(t)
    asked = shell.run("%shapes model 2,4 --mode fake")
    assert not asked.ok and "fake tensors do not have" in asked.failure.explanation
    assert asked.failure.fix == "use --mode real"
    with torch.device("meta"):
        bind(shell, on_meta=DataDependent())
    cannot = shell.run("%shapes on_meta 2,4")
    assert not cannot.ok and cannot.mode == "meta" and "load real weights" in cannot.failure.fix
    assert diff(before, snapshot(model)) == []


def test_wrappers_are_unwrapped(shell):
    net = zoo.Net()
    bind(shell, net=net, compiled=torch.compile(net), parallel=nn.DataParallel(net))
    t = shell.run("%shapes compiled 1,1,32,32")
    assert [r.name for r in t.rows if r.kind == "module"] == ["compiled", "conv1", "fc1"]
    assert "torch.compile'd" in shell.text(t)
    p = shell.run("%shapes parallel 1,1,32,32")
    assert p.rows[0].name == "parallel.module" and "DataParallel" in shell.text(p)


class CompilesInForward(nn.Module):
    """A model that compiles a part of itself the first time its forward runs."""

    def __init__(self):
        super().__init__()
        self.inner, self.compiled = zoo.Net(), None

    def forward(self, x):
        if self.compiled is None:
            self.compiled = torch.compile(self.inner, backend="eager")
        return self.compiled(x)


@pytest.mark.parametrize("mode", ["real", "fake"])
def test_compiled_parts_run_as_written_and_dynamo_never_traces_the_counter(shell, mode):
    """The FLOP counter's dispatch handler is not wrapped in torch's dynamo switch (that wrapper
    imports torch._dynamo on first use); dynamo must still skip it and what it calls while a
    compiled part runs, or it would compile torchmagic's own frames."""
    from torch._dynamo.utils import counters

    part = nn.Sequential(nn.Linear(1350, 1350), torch.compile(nn.Linear(1350, 10), backend="eager"))
    bind(shell, in_forward=CompilesInForward(), part=part, plain=zoo.Net())
    before = {k: dict(v) for k, v in counters.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that global module hooks fire twice for a compiled module
        t = shell.run(f"%shapes in_forward 1,1,32,32 --mode {mode}")
        p = shell.run(f"%shapes part 1,1350 --mode {mode}")
    assert {k: dict(v) for k, v in counters.items()} == before
    plain = shell.run(f"%shapes plain 1,1,32,32 --mode {mode}")
    assert t.ok and t.flops == plain.flops and t.rows[-1].outputs == "[1, 10]"
    assert p.ok and p.flops == 2 * 1350 * (1350 + 10) and p.rows[0].outputs == "[1, 10]"


def test_fake_stand_ins_kept_between_traces_follow_the_model(shell):
    """Fake mode keeps each tensor's stand-in for the next trace; one whose tensor changed its
    metadata (p.data = ..., a new dtype) is made again, and a model deleted takes its stand-ins along."""
    import gc
    import weakref

    from torchmagic import fake

    net = zoo.Net()
    bind(shell, net=net)
    assert shell.run("%shapes net 1,1,32,32 --mode fake").rows[-1].inputs == "[1, 1350]"
    kept = fake._KEPT.made[id(net.fc1.weight)][2]
    shell.run("%shapes net 1,1,32,32 --mode fake")
    assert fake._KEPT.made[id(net.fc1.weight)][2] is kept  # the second trace reused it
    net.fc1.weight.data = torch.zeros(10, 1014)
    net.conv1.bias.data = net.conv1.bias.data.double().float()  # same metadata, another tensor: reused or not, the same
    t = shell.run("%shapes net 1,1,28,28 --mode fake")
    assert t.ok and t.rows[-1].inputs == "[1, 1014]" and t.rows[-1].params == 10 * 1014 + 10
    net.half()
    assert shell.run("%shapes net 1,1,28,28 --mode fake").rows[-1].dtype == "float16"
    net.float()
    x = torch.zeros(1, 1, 28, 28)
    bind(shell, x=x)
    assert shell.run("%shapes net x --mode fake").ok
    x.resize_(1, 1, 32, 32)
    assert shell.run("%shapes net x --mode fake").rows[0].inputs == "[1, 1, 32, 32]"
    ids = [id(p) for p in net.parameters()]
    ref = weakref.ref(net.fc1.weight)
    shell.ns.pop("net")
    del net, t
    gc.collect()
    assert ref() is None and not set(ids) & set(fake._KEPT.made)


def test_dtensor_parameters_get_a_clear_message(shell):
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        net = zoo.Net()
        net.fc1.weight = nn.Parameter(distribute_tensor(net.fc1.weight.detach(), mesh))
        bind(shell, net=net)
        message = shell.usage_error("%shapes net 1,1,32,32")
        assert "DTensors" in message and "fc1.weight" in message and "meta device" in message
    finally:
        dist.destroy_process_group()


class Interrupting(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = self.bn(x)
        torch.randn(3)  # moves the RNG
        raise KeyboardInterrupt


@pytest.mark.parametrize("mode", ["real", "fake", "meta"])
def test_promises_hold_on_interrupt_in_every_mode(shell, mode):
    model = Interrupting()
    model.fc.weight.grad = torch.ones(4, 4)
    bind(shell, model=model)
    before = snapshot(model)
    err = shell.error(f"%shapes model 3,4 --mode {mode}")
    assert type(err) is KeyboardInterrupt
    assert diff(before, snapshot(model)) == []


@pytest.mark.parametrize("mode", ["real", "fake", "meta"])
def test_promises_hold_on_failure_in_every_mode(shell, mode):
    model = zoo.SmallCNN()
    model.head = nn.Linear(33, 10)
    model.train()
    model.features[1].eval()
    bind(shell, model=model)
    before = snapshot(model)
    t = shell.run(f"%shapes model 4,3,32,32 --mode {mode} --ops")
    assert not t.ok and t.failure.module == "head"
    assert diff(before, snapshot(model)) == []


def test_ops_rows_show_the_view(notes):
    t = notes.run("%shapes net 1,1,32,32 --ops")
    ops = [(r.name, r.inputs, r.outputs) for r in t.rows if r.kind == "op"]
    assert ("view", "[1, 6, 15, 15], 1, -1", "[1, 1350]") in ops
    assert [r.name for r in t.rows if r.kind == "op"] == ["relu", "max_pool2d", "relu", "view"]
    assert "3 module calls and 4 ops" in notes.text(t)
    # without --ops: the ops that change a shape, not the relu's
    assert [r.name for r in notes.run("%shapes net 1,1,32,32").rows] == ["net", "conv1", "max_pool2d", "view", "fc1"]


def test_flops_column_and_totals(notes):
    t = notes.run("%shapes net 1,1,32,32")
    assert t.row("conv1").flops == 2 * 6 * 9 * 30 * 30  # 2 FLOPs per multiply-add
    assert t.row("fc1").flops == 2 * 1350 * 10 and t.flops == t.row("net").flops
    text = notes.text(t)
    assert "flops" in text.splitlines()[1] and "FLOPs: 124 K" in text and "activations:" in text


def test_summary_counts_attention_flops(shell):
    with torch.device("meta"):
        block = zoo.Attention(d=768, heads=12)
    bind(shell, block=block)
    s = shell.run("%summary block 1,1024,768")
    # q, k, v and out projections: 4 * 2 * 1024 * 768^2; attention scores and weighted sum: 2 * 2 * 1024^2 * 768
    assert s.flops == pytest.approx(8 * 1024 * 768**2 + 4 * 1024**2 * 768, rel=0.01)
    assert "FLOPs: 8.05 G" in shell.text(s)


class NoBool(nn.Sequential):
    def __bool__(self):
        raise AssertionError("bool() called on a module")


@pytest.mark.parametrize("mode", ["real", "fake", "meta"])
def test_no_bool_on_modules_and_no_reference_kept(shell, mode):
    import gc
    import weakref

    model = NoBool(nn.Linear(3, 3), NoBool())
    bind(shell, model=model)
    t = shell.run(f"%shapes model 2,3 --mode {mode} --ops")
    assert t.ok and [r.name for r in t.rows] == ["model", "0", "1"]
    alive = weakref.ref(model)
    del model
    shell.ns.pop("model")
    gc.collect()
    assert alive() is None  # the result and torchmagic keep no reference to the model
