"""%memory plan and %%trainstep --plan through a real shell. The plans are checked against the same
step run for real under bench/plan.py's tracker of tensor storages, against arithmetic a user can
do by hand, and against the promise that nothing of the user's changes (also in the safety matrix;
mistakes in the options are rows of test_bad_inputs.py's table)."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from snapshot import diff, snapshot

from torchmagic import plan
from torchmagic.results import MemoryPlan

NET_PARAM_BYTES = 13_570 * 4


@pytest.fixture(scope="module")
def bench():
    """bench/plan.py: the models and the measured step."""
    spec = importlib.util.spec_from_file_location("bench_plan", Path(__file__).parents[1] / "bench" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_of_the_notes_net(notes):
    p = notes.run("%memory plan net 64,1,32,32")
    assert isinstance(p, MemoryPlan)
    assert p.parameters == NET_PARAM_BYTES and p.gradients == NET_PARAM_BYTES
    # AdamW: exp_avg and exp_avg_sq per parameter, and a float32 step count per parameter tensor
    assert p.optimizer == "AdamW" and p.optimizer_state == 2 * NET_PARAM_BYTES + 4 * 4
    assert p.batch == 64 and p.inputs == 64 * 32 * 32 * 4 and p.dtype == "float32"
    assert p.peak_phase == "backward" and set(p.phases) == set(plan.PHASES)
    assert p.peak == p.phases["backward"]["total"] == sum(p.peak_parts.values())
    assert p.budget is None and p.fits is None and p.largest_batch is None
    text, html = notes.text(p), notes.html(p)
    assert "peak 4.4 MB in backward" in text and "activations saved for backward" in text
    assert "<svg" in html and "<table>" in html and "optimizer step" in html


@pytest.mark.parametrize("name", ["Net", "MLP 784-1024-1024-10"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("amp", [False, True])
def test_plan_equals_the_step_run_for_real(shell, bench, name, optimizer, amp):
    model, x = bench.build(name)
    shell.ns.update(m=model, x=x)
    p = shell.run(f"%memory plan m x --optimizer {optimizer}" + (" --amp bf16" if amp else ""))
    real = bench.measure(model, x, getattr(torch.optim, plan.OPTIMIZERS[optimizer])(model.parameters()), amp=amp)
    assert (p.peak, p.activations) == (real["peak"], real["activations"])


def test_checkpointing_plan_equals_the_real_step_and_leaves_grads_alone(shell, bench):
    """Checkpointed blocks run their forward again in backward: on the stand-ins, never on the
    user's parameters (which would get gradients)."""
    pytest.importorskip("transformers")
    model, x = bench.build("GPT-2 tiny")
    model(x).logits.sum().backward()  # the user's own gradients, which must stay as they are
    shell.ns.update(gpt=model, ids=x)
    before = snapshot(model)
    full = shell.run("%memory plan gpt ids")
    p = shell.run("%memory plan gpt ids --checkpointing")
    assert diff(before, snapshot(model)) == []
    assert p.checkpointed == ["transformer.h.0", "transformer.h.1"] and p.activations < full.activations / 2
    assert "labels = the input ids" in p.loss
    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.AdamW(model.parameters())
    with plan.checkpointed([b for _, b in plan.repeated_blocks(model)]):
        real = bench.measure(model, x, optimizer, amp=False, checkpointing=True)
    # transformers reads the positions of a real input to see that attention needs no mask; on fake
    # tensors it cannot, and builds one: the plan may be high by at most a float mask per layer
    batch, seq = x.shape
    assert 0 <= p.peak - real["peak"] <= 2 * batch * seq * seq * 4


def test_budget_says_whether_it_fits_and_the_largest_batch(notes):
    p = notes.run("%memory plan net 1,1,32,32 --optimizer sgd --budget 1MB")
    assert p.fits and p.headroom == 2**20 - p.peak and "fits" in notes.text(p)
    best = p.largest_batch
    at, above = (notes.run(f"%memory plan net {b},1,32,32 --optimizer sgd") for b in (best, best + 1))
    assert at.peak <= 2**20 < above.peak
    over = notes.run(f"%memory plan net {best + 1},1,32,32 --optimizer sgd --budget 1MB")
    assert not over.fits and over.headroom == 2**20 - above.peak and "does not fit" in notes.text(over)
    assert "to fit: the largest part at the peak is" in notes.text(over)
    tiny = notes.run("%memory plan net 1,1,32,32 --budget 1KB")
    assert tiny.largest_batch == 0 and "not even batch 1 fits" in notes.text(tiny)


def test_device_cpu_budget_is_the_machines_memory(notes):
    p = notes.run("%memory plan net 8,1,32,32 --device cpu")
    assert p.budget > 2**20 and p.budget_source == "this machine's total RAM" and p.largest_batch > 8


def test_largest_batch_search_is_exact_on_lines_and_kinks():
    for budget in (10, 999, 12_345):
        for peak in (lambda b: 7 + 3 * b, lambda b: max(500 + b, 5 * b), lambda b: 2 + b + (40 if b > 9 else 0)):
            truth = max([b for b in range(1, 5000) if peak(b) <= budget], default=0)
            assert plan.largest_batch(peak, budget, limit=4999)[0] == truth


def test_llama_7b_on_meta(shell):
    """6.7B parameters in bfloat16 with AdamW: 54 GB of model states before any activation, planned
    on a machine with less memory than that, without allocating any of it."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        shell.ns["llama"] = transformers.LlamaForCausalLM(config)
    p = shell.run("%memory plan llama 1,2048 --dtype bfloat16")
    assert p.parameters == 6_738_415_616 * 2 and p.gradients == p.parameters
    assert p.optimizer_state >= 2 * p.parameters and p.activations > 8 * 2**30
    assert p.target == "cuda" and p.peak_phase == "optimizer step"  # foreach AdamW's full-size temporary
    assert p.peak > 60 * 2**30


def test_ddp_adds_its_gradient_buckets(notes):
    one = notes.run("%memory plan net 64,1,32,32")
    ddp = notes.run("%memory plan net 64,1,32,32 --devices 8 --shard ddp")
    assert ddp.peak == one.peak + NET_PARAM_BYTES
    assert all(parts["DDP buckets"] == NET_PARAM_BYTES for parts in ddp.phases.values())
    assert "gradient_as_bucket_view" in " ".join(ddp.assumptions)


def test_fsdp_and_zero2_shard_model_states_on_a_fake_process_group(shell, bench):
    pytest.importorskip("transformers")
    model, x = bench.build("Llama tiny")
    shell.ns.update(llama=model, ids=x)
    one = shell.run("%memory plan llama ids")
    fsdp = shell.run("%memory plan llama ids --devices 4 --shard fsdp")
    zero2 = shell.run("%memory plan llama ids --devices 4 --shard zero2")
    assert not torch.distributed.is_initialized()
    for p in (fsdp, zero2):
        assert one.parameters / 4 <= p.parameters <= one.parameters / 4 + 4 * 1024  # shards are padded
        assert one.optimizer_state / 4 <= p.optimizer_state <= one.optimizer_state / 4 + 8 * 1024
        assert "fake process group of 4 ranks" in p.assumptions[0]
    # ZeRO-2 keeps each block's gathered parameters from its forward to its backward; FSDP frees them
    assert zero2.phases["backward"]["gathered parameters"] > fsdp.phases["backward"].get("gathered parameters", 0)
    assert fsdp.activations == zero2.activations == one.activations
    assert fsdp.modules[0].cls == "LlamaForCausalLM"  # the user's class, not the one fully_shard made


def test_fsdp_refused_when_a_process_group_exists(notes):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        message = notes.usage_error("%memory plan net 8,1,32,32 --devices 2 --shard fsdp")
    finally:
        dist.destroy_process_group()
    assert "--shard fsdp" in message and "fresh kernel" in message


def test_trainstep_plan_runs_the_users_cell_and_changes_nothing(notes):
    net, optimizer = notes.ns["net"], notes.ns["optimizer"]
    net(notes.ns["input"]).sum().backward()  # existing grads
    before = snapshot(net, optimizer)
    p = notes.run("%%trainstep net optimizer --plan\nout = net(input)\ncriterion(out, y)")
    assert diff(before, snapshot(net, optimizer)) == [] and "out" not in notes.ns
    assert p.optimizer == "SGD" and p.optimizer_state == 0 and p.loss == "your cell's last line"


def test_trainstep_plan_matches_the_real_cell(notes, bench):
    net, optimizer, y = notes.ns["net"], notes.ns["optimizer"], notes.ns["y"]
    cell = ("with torch.autocast('cpu', dtype=torch.bfloat16):\n    out = net(torch.randn(16, 1, 32, 32))\n"
            "(out.float() - y).pow(2).mean()")
    p = notes.run("%%trainstep net optimizer --plan\n" + cell)
    twin, twin_opt = copy.deepcopy((net, optimizer))
    tracker = bench.Storages()
    for t in [*twin.parameters(), y]:  # what the cell reads (y, not input)
        tracker.add(t)
    ns = {"torch": torch, "net": twin, "y": y}
    with tracker.active():
        exec(cell.rsplit("\n", 1)[0], ns)
        loss = eval(cell.rsplit("\n", 1)[1], ns)
        loss.backward()
        del loss
        twin_opt.step()
    assert p.peak == tracker.peak and p.inputs == y.numel() * 4


def test_trainstep_plan_of_a_cell_that_steps_itself(notes):
    net, optimizer = notes.ns["net"], notes.ns["optimizer"]
    before = snapshot(net, optimizer)
    p = notes.run("%%trainstep net optimizer --plan\noptimizer.zero_grad()\nloss = criterion(net(input), y)\n"
                  "loss.backward()\noptimizer.step()\nloss")
    assert diff(before, snapshot(net, optimizer)) == [] and p.gradients == NET_PARAM_BYTES


def test_trainstep_plan_error_in_the_cell_is_the_users(notes, capsys):
    error = notes.error("%%trainstep net optimizer --plan\nout = net(input)\ncriterion(out, yy)")
    assert isinstance(error, NameError)
    shown = capsys.readouterr().out
    assert "criterion(out, yy)" in shown and "plan.py" not in shown and "magics.py" not in shown


def test_a_dtype_the_device_lacks():
    assert "capability 7.5" in plan.dtype_missing("cuda", torch.bfloat16, (7, 5))
    assert plan.dtype_missing("cuda", torch.bfloat16, (8, 0)) == ""
    assert "no float64" in plan.dtype_missing("mps", torch.float64)


def test_a_forward_that_reads_values(shell):
    shell.run("import torch\nfrom torch import nn\nclass Gate(nn.Module):\n    def __init__(self):\n"
              "        super().__init__()\n        self.fc = nn.Linear(4, 4)\n    def forward(self, x):\n"
              "        return self.fc(x) if x.sum().item() > 0 else x\ngate = Gate()")
    assert "reads tensor values" in shell.usage_error("%memory plan gate 2,4")


def test_eval_mode_is_planned_as_it_is_and_said(notes):
    notes.run("net.eval()")
    p = notes.run("%memory plan net 8,1,32,32")
    assert any("eval mode" in n for n in p.notes) and not notes.ns["net"].training
