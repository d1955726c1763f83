"""%memory through a real shell: IPython's own cell events drive it (`run_cell`), its line after
each cell is a real display, and the tensors measured are really allocated. CUDA cases: test_cuda.py."""
import dataclasses
import gc

import pytest
import torch
from IPython.utils.capture import capture_output

from torchmagic import memory
from torchmagic.results import CellMemory, MemoryHistory

MB = 1 << 20


@pytest.fixture(autouse=True)
def _settled():
    """Memory freed by earlier tests' garbage must not land inside a measured cell."""
    gc.collect()
    yield


def cell(shell, code):
    """Run a cell as the user would; return its result and the text of what it displayed."""
    with capture_output() as out:
        result = shell.ip.run_cell(code, store_history=True)
    return result, [o.data["text/plain"] for o in out.outputs]


def handlers(shell):
    return [len(shell.ip.events.callbacks[e]) for e in ("pre_run_cell", "post_run_cell")]


def test_on_and_off_register_and_remove_handlers(shell):
    base = handlers(shell)
    on = shell.run("%memory on")
    assert "memory reporting on" in shell.text(on) and "RSS" in shell.text(on)
    assert handlers(shell) == [n + 1 for n in base]
    assert "already on" in shell.text(shell.run("%memory on"))
    assert handlers(shell) == [n + 1 for n in base]
    assert "memory reporting off" in shell.text(shell.run("%memory off"))
    assert handlers(shell) == base
    assert "was not on" in shell.text(shell.run("%memory off"))


def test_unload_removes_handlers_and_reload_works(shell):
    base = handlers(shell)
    shell.run("%memory on")
    shell.ip.run_line_magic("unload_ext", "torchmagic")
    assert handlers(shell) == base
    _, shown = cell(shell, "import torch; a = torch.ones(64 * 2**20 // 4)")
    assert shown == []  # nothing reports after unloading
    shell.ip.run_line_magic("load_ext", "torchmagic")
    shell.run("%memory on")
    _, shown = cell(shell, "b = torch.ones(64 * 2**20 // 4)")
    assert len(shown) == 1 and "RSS +" in shown[0]


def test_allocation_is_reported_after_the_cell(shell):
    shell.run("import torch")
    shell.run("%memory on")
    _, shown = cell(shell, "x = torch.ones(100 * 2**20 // 4)")  # 100 MB, written so really resident
    assert len(shown) == 1 and shown[0].startswith("memory, cell")
    record = shell.run("%memory").records[-1]
    assert 90 * MB <= record.rss_change <= 140 * MB
    _, shown = cell(shell, "del x")
    assert len(shown) == 1 and "RSS -" in shown[0]


def test_quiet_cells_show_nothing_but_are_kept(shell):
    shell.run("%memory on")
    _, shown = cell(shell, "a = 1")
    assert shown == []
    history = shell.run("%memory")
    assert [r.source for r in history.records] == ["a = 1"]
    shell.run("%config TorchMagics.memory_min_change = 0")
    _, shown = cell(shell, "b = 2")
    assert len(shown) == 1


def test_peak_during_the_cell(shell):
    shell.run("import torch")
    shell.run("%memory on")
    cell(shell, "s = torch.ones(200 * 2**20 // 4).sum()")  # 200 MB, freed before the cell ends
    record = shell.run("%memory").records[-1]
    assert abs(record.rss_change) < 50 * MB
    if record.rss_peak_kind == "cell":
        assert record.rss_peak - record.rss_before >= 180 * MB
    else:  # only the process's lifetime peak exists here: a cell's peak is shown when it rose
        assert record.rss_peak is None or record.rss_peak >= record.rss_before


def test_records_hold_no_tensors_and_keep_none_alive(shell):
    shell.run("import torch, weakref")
    shell.run("%memory on")
    cell(shell, "t = torch.ones(32 * 2**20 // 4); r = weakref.ref(t)")
    cell(shell, "del t")
    gc.collect()
    assert shell.ns["r"]() is None
    for record in shell.run("%memory").records:
        for f in dataclasses.fields(record):
            assert isinstance(getattr(record, f.name), (int, float, str, bool, type(None))), f.name


FAILING = '''
import torch, weakref
def load_batch():
    batch = torch.ones(64 * 2**20 // 4)
    global ref
    ref = weakref.ref(batch)
    raise ValueError("bad batch")
load_batch()
'''


def test_failed_cell_memory_is_named_and_released(shell):
    shell.run("%memory on")
    result, shown = cell(shell, FAILING)
    assert isinstance(result.error_in_exec, ValueError)
    assert len(shown) == 1 and "the error keeps 1 tensor (64.0 MB) alive" in shown[0] and "%memory release" in shown[0]
    gc.collect()
    assert shell.ns["ref"]() is not None  # IPython keeps the failed cell's frames
    history = shell.run("%memory")
    assert history.records[-1].failed and "the last error keeps 1 tensor (64.0 MB)" in shell.text(history)
    released = shell.run("%memory release")
    assert "released the last error's frames: 1 tensor (64.0 MB)" in shell.text(released)
    assert shell.ns["ref"]() is None
    assert "load_batch" in shell.ns  # the user's namespace is untouched
    assert "keeps" not in shell.text(shell.run("%memory"))
    assert "no error's frames held tensors" in shell.text(shell.run("%memory release"))


def test_only_what_the_error_alone_holds_is_counted(shell):
    """The input the failed call was given stays in the namespace: releasing would not free it."""
    shell.run("import torch\nbatch = torch.ones(16 * 2**20 // 4)\nnet = torch.nn.Linear(1024, 1024)")
    shell.run("%memory on")
    _, shown = cell(shell, "def step(x, model):\n    tmp = model(x.view(-1, 1024)) * 2\n"
                           "    raise ValueError('nan')\nstep(batch, net)")
    assert "the error keeps 1 tensor (16.0 MB) alive" in shown[0]  # tmp only, not batch nor the weights
    _, shown = cell(shell, "%device cpu batch nothing_here")  # a magic's own error holds nothing
    assert not any("keeps" in line for line in shown)


def test_release_without_memory_on(shell):
    """Releasing works whether or not %memory is on: the error happened either way."""
    shell.error(FAILING)
    assert shell.ns["ref"]() is not None
    shell.run("%memory release")
    assert shell.ns["ref"]() is None


def test_history_table_and_chart(shell):
    shell.run("import torch")
    empty = shell.run("%memory")
    assert isinstance(empty, MemoryHistory) and "nothing measured yet" in shell.text(empty)
    shell.run("%memory on")
    cell(shell, "x = torch.ones(16 * 2**20 // 4)")
    cell(shell, "y = 1")
    history = shell.run("%memory")
    text = shell.text(history)
    assert "2 cells measured, reporting on" in text
    assert text.splitlines()[1].split()[:2] == ["cell", "code"] and "x = torch.ones" in text
    html = shell.html(history)
    assert "<svg" in html and "<polyline" in html and "<table>" in html
    shell.run("%memory clear")
    assert shell.run("%memory").records == []


def test_memory_magic_cells_are_not_recorded(shell):
    shell.run("%memory on")
    shell.run("%memory")
    shell.run("a = 1")
    assert [r.source for r in shell.run("%memory").records] == ["a = 1"]


def test_html_line_after_cell(shell):
    shell.run("import torch")
    shell.run("%memory on")
    with capture_output() as out:  # 64 MB: above glibc's largest mmap threshold (32 MB), so fresh pages
        shell.ip.run_cell("z = torch.ones(64 * 2**20 // 4)", store_history=True)
    html = out.outputs[0].data["text/html"]
    assert html.startswith("<div") and "RSS +" in html


@pytest.mark.parametrize("line", ["%memory bogus", "%memory on off"])
def test_mistakes_are_one_line(shell, line):
    base = handlers(shell)
    message = shell.usage_error(line)
    assert message.startswith("%memory:") and "%memory?" in message
    assert handlers(shell) == base


def test_meter_alone_without_ipython():
    """The core is plain Python: begin/end around any code."""
    meter = memory.CellMeter()
    try:
        meter.begin()
        keep = torch.ones(64 * MB // 4)  # above glibc's largest mmap threshold: never reuses freed heap pages
        record = meter.end(7, "keep = torch.ones(...)")
    finally:
        meter.close()
    assert isinstance(record, CellMemory) and record.cell == 7 and not record.failed
    assert record.rss_change >= 56 * MB and record.notable(MB)
    assert meter.end(8, "") is None  # no cell was begun
    del keep


def test_line_belongs_to_its_cell_in_a_real_kernel():
    """In a notebook the line is a display output of the very cell it measures."""
    from pathlib import Path

    import nbclient
    import nbformat

    nb = nbformat.v4.new_notebook()
    sources = ["%load_ext torchmagic\n%memory on", "import torch\nx = torch.ones(64 * 2**20 // 4)", "y = 1", "%memory"]
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    root = Path(__file__).resolve().parents[1]  # the kernel imports the checkout's torchmagic
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(root)}}).execute()
    on, alloc, quiet, history = (c.outputs for c in nb.cells)
    assert [o.output_type for o in alloc] == ["display_data"]
    assert "RSS +" in alloc[0].data["text/plain"] and alloc[0].data["text/html"].startswith("<div")
    assert quiet == []
    assert "<svg" in history[0].data["text/html"] and "2 cells measured" in history[0].data["text/plain"]
