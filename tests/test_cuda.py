"""The CUDA paths, through a real shell on a real GPU. Every test here skips without CUDA;
`python bench/gpu_check.py` runs them (and the GPU benchmarks) on a machine with one."""
import gc
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from IPython.utils.capture import capture_output
from snapshot import diff, snapshot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MB = 1 << 20

BIG = '''
import torch
from torch import nn
torch.manual_seed(0)
big = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(8)])      # 8 x 64 MB of float32 weights
big_opt = torch.optim.Adam(big.parameters(), lr=1e-4)
big(torch.randn(2, 4096)).sum().backward()
big_opt.step()                                                         # Adam moments exist
'''


@pytest.fixture(autouse=True)
def _settled():
    """Memory freed by earlier tests' garbage must not land inside a measured cell."""
    gc.collect()
    torch.cuda.empty_cache()
    yield


def count_syncs(fn) -> int:
    """Host synchronisations CUDA reports while fn runs (torch's sync debug mode warns on each)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_cuda_report_names_every_gpu(shell):
    report = shell.run("%device")
    assert len(report.cuda) == torch.cuda.device_count()
    for c in report.cuda:
        props = torch.cuda.get_device_properties(c.index)
        assert c.name == props.name and c.capability == f"{props.major}.{props.minor}"
        assert c.total == props.total_memory and 0 < c.used <= c.total
        assert c.reserved >= c.allocated >= 0
    assert [c.current for c in report.cuda] == [i == torch.cuda.current_device() for i in range(len(report.cuda))]
    text = shell.text(report)
    assert report.cuda[0].name in text and "capability" in text and "current" in text


def test_cuda_select_and_mistakes(shell):
    shell.run("%device cuda")
    assert shell.ns["device"] == torch.device("cuda", torch.cuda.current_device())
    n = torch.cuda.device_count()
    assert f"there is no cuda:{n}" in shell.usage_error(f"%device cuda:{n}")


def test_cuda_moves_keep_parameters_and_adam_state(notes):
    notes.run("optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)")
    notes.run("optimizer.zero_grad(); criterion(net(input), y).backward(); optimizer.step()")
    net, opt = notes.ns["net"], notes.ns["optimizer"]
    params = list(net.parameters())
    for target in ["cuda", "cpu", "cuda"]:
        moments = {id(p): opt.state[p]["exp_avg"].cpu().clone() for p in params}
        notes.run(f"%device {target} net optimizer input y")
        device = notes.ns["device"]
        assert all(a is b for a, b in zip(net.parameters(), params, strict=True))
        assert all(a is b for a, b in zip((p for g in opt.param_groups for p in g["params"]), params, strict=True))
        for p in params:
            state = opt.state[p]
            assert p.device == device and p.grad.device == device
            assert state["exp_avg"].device == device and state["exp_avg_sq"].device == device
            assert state["step"].device.type == "cpu"  # torch keeps a non-capturable step on the CPU
            assert torch.equal(state["exp_avg"].cpu(), moments[id(p)])
        assert notes.ns["input"].device == device and notes.ns["y"].device == device
        before = params[0].detach().clone()
        step = notes.run("%%trainstep net optimizer\ncriterion(net(input), y)")
        assert step.stepped and not torch.equal(before, params[0])
        notes.run("optimizer.zero_grad(); criterion(net(input), y).backward(); optimizer.step()")


def test_cuda_out_of_memory_move_is_undone(shell):
    shell.run(BIG)
    big, opt = shell.ns["big"], shell.ns["big_opt"]
    params = list(big.parameters())
    before = snapshot(big)
    state = {id(p): dict(s) for p, s in opt.state.items()}
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    filler = torch.empty(free - 300 * MB, dtype=torch.uint8, device="cuda")  # room for about 4 of 8 layers
    try:
        allocated = torch.cuda.memory_allocated()
        message = shell.usage_error("%device cuda big big_opt")
        assert "ran out of memory while moving 'big'" in message and "the move was undone" in message
        assert torch.cuda.memory_allocated() == allocated  # the layers moved before the failure are freed
    finally:
        del filler
        torch.cuda.empty_cache()
    assert all(a is b for a, b in zip(big.parameters(), params, strict=True))
    assert all(p.device.type == "cpu" for p in big.parameters())
    assert {id(p): dict(s) for p, s in opt.state.items()} == state
    assert diff(before, snapshot(big)) == []
    shell.run("%device cuda big big_opt")  # with the memory back, the same move succeeds
    assert all(p.is_cuda for p in big.parameters())
    assert all(s["exp_avg"].is_cuda for s in opt.state.values())


def test_cuda_memory_reports_allocation_and_peak(shell):
    shell.run("import torch; torch.zeros(1, device='cuda')")
    shell.run("%memory on")
    with capture_output() as out:
        shell.run("x = torch.ones(256 * 2**20 // 4, device='cuda')")
    device = f"cuda:{torch.cuda.current_device()}"
    assert f"{device} +256.0 MB" in out.outputs[0].data["text/plain"]
    shell.run("s = torch.ones(512 * 2**20 // 4, device='cuda').sum()")
    first, second = shell.run("%memory").records[-2:]
    assert first.device == device and first.dev_change == 256 * MB
    assert second.dev_change < MB and second.dev_peak - second.dev_before >= 512 * MB
    shell.run("del x, s")


def test_cuda_memory_release_frees_failed_cell_tensors(shell):
    shell.run("import torch; torch.zeros(1, device='cuda')")
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    shell.error("def load():\n    batch = torch.ones(256 * 2**20 // 4, device='cuda')\n"
                "    raise ValueError('bad')\nload()")
    assert torch.cuda.memory_allocated() - start >= 256 * MB  # kept alive by the traceback
    released = shell.run("%memory release")
    assert torch.cuda.memory_allocated() - start < MB
    assert released.dev_before - released.dev_after >= 256 * MB


def test_cuda_meter_creates_no_context():
    """%memory on must not initialise CUDA; a cell that does is measured from zero."""
    code = (
        "import torch\n"
        "from torchmagic import memory\n"
        "m = memory.CellMeter(); m.begin(); r = m.end(1, 'nothing')\n"
        "assert not torch.cuda.is_initialized() and r.device == ''\n"
        "m.begin(); x = torch.ones(64 * 2**20 // 4, device='cuda'); r = m.end(2, 'x')\n"
        "assert r.device.startswith('cuda') and r.dev_change == 64 * 2**20, r\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "ok", out.stderr


def _shapes_memory(shell, line):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    result = shell.ip.run_cell(line, store_history=True)
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - start, torch.cuda.memory_allocated() - start


def test_cuda_shapes_real_mode_allocates_only_activations(shell):
    shell.run(BIG + "big.cuda()")
    result, peak, left = _shapes_memory(shell, "%shapes big 64,4096")
    assert result.success and result.result.ok
    assert peak < 32 * MB  # activations are 1 MB a layer; the 512 MB of weights are not copied
    assert left == 0


def test_cuda_shapes_fake_mode_allocates_nothing(shell):
    shell.run(BIG + "big.cuda()")
    result, peak, left = _shapes_memory(shell, "%shapes big 64,4096 --mode fake")
    if result.error_in_exec is not None and "--mode" in str(result.error_in_exec):
        pytest.skip(f"%shapes has no --mode fake here: {result.error_in_exec}")
    assert result.success and result.result.ok
    assert peak == 0 and left == 0


def test_cuda_trainstep_synchronises_once_per_step(notes):
    notes.run("%device cuda net optimizer input y")
    cell = "%%trainstep net optimizer\ncriterion(net(input), y)"
    notes.run(cell)  # warm-up: kernels, allocator
    assert count_syncs(lambda: notes.run(cell)) <= 1


def test_cuda_sync_counter_counts(notes):
    """The instrument itself: a hand-written step that reads the loss synchronises exactly once."""
    notes.run("%device cuda net optimizer input y")
    step = "optimizer.zero_grad(); loss = criterion(net(input), y); loss.backward(); optimizer.step(); loss.item()"
    notes.run(step)
    assert count_syncs(lambda: notes.run(step)) == 1
