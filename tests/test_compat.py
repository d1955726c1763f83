"""The surface that differs between the supported stacks (IPython 7.34 + ipywidgets 7.7 as on
Colab, IPython 9 + ipywidgets 8), checked the same way on whichever stack runs the tests: help,
the one-line UsageError, result display, tracebacks into the user's cell, and the %%trainstep
widgets over a real kernel's wire protocol (Output capture, slider, Step button)."""
from __future__ import annotations

import json
import os
import queue
import re
import sys
import traceback

import pytest
from support import NET_SOURCE

import torchmagic

ANSI = re.compile(r"\x1b\[[0-9;]*[a-zA-Z]")


def plain(text: str) -> str:
    return ANSI.sub("", text)


# ---------------------------------------------------------------- the shell


def test_every_magic_shows_its_usage_as_help(shell, capsys):
    magics = torchmagic._loaded[id(shell.ip)].magics
    names = [("%", n) for n in magics["line"]] + [("%%", n) for n in magics["cell"]]
    assert ("%", "shapes") in names and ("%%", "trainstep") in names
    for prefix, name in names:
        shell.run(f"{prefix}{name}?")
        help_text = plain(capsys.readouterr().out)
        assert f"{prefix}{name} " in help_text, (name, help_text)  # the usage line magic_arguments builds
        assert "positional arguments" in help_text or "options" in help_text, (name, help_text)


@pytest.mark.parametrize("line", [
    "%shapes",
    "%shapes no_such_model 1,1,32,32",
    "%shapes net --bogus",
    "%summary",
    "%device nowhere",
    "%%trainstep net\ncriterion(net(input), y)",
])
def test_usage_error_is_one_line_on_stderr(notes, capsys, line):
    capsys.readouterr()
    message = notes.usage_error(line)  # exactly UsageError, one line
    seen = capsys.readouterr()
    assert seen.err.splitlines() == [f"UsageError: {message}"]
    assert "Traceback" not in seen.out


def test_results_display_as_text_and_html_and_semicolon_silences(notes, capsys):
    capsys.readouterr()
    notes.run("%shapes net 1,1,32,32")
    out = plain(capsys.readouterr().out)
    assert "Out[" in out and "[1, 6, 30, 30]" in out
    notes.run("%shapes net 1,1,32,32;")
    notes.run("t = %shapes net 1,1,32,32")
    weight = notes.ns["net"].fc1.weight.clone()
    notes.run("%%trainstep net optimizer\ncriterion(net(input), y);")  # silenced, and it still steps
    assert capsys.readouterr().out == ""
    assert not notes.ns["net"].fc1.weight.equal(weight)
    t = notes.ns["t"]
    assert notes.text(t) == repr(t) and "<table>" in notes.html(t)


def test_trainstep_traceback_starts_in_the_users_cell(notes, capsys):
    """The user's error shows their cell under its own prompt number (IPython 7.34 and 8 count the
    running cell after running it, recent IPython 9 before) and none of torchmagic's frames."""
    result = notes.ip.run_cell("%%trainstep net optimizer\nout = net(input)\ncriterion(out.view(3, 3), y)\n",
                               store_history=True)
    err = result.error_in_exec
    assert isinstance(err, RuntimeError)
    user_frames = [f for f in traceback.extract_tb(err.__traceback__) if f.line == "criterion(out.view(3, 3), y)"]
    assert len(user_frames) == 1
    assert user_frames[0].filename.startswith(f"<ipython-input-{result.execution_count}-")
    shown = plain(capsys.readouterr().out)
    assert "criterion(out.view(3, 3), y)" in shown
    assert "torchmagic" + os.sep not in shown  # no frame of the package


# ---------------------------------------------------------------- a real kernel

# Kernel-side, ipywidgets 7 and 8 send the same protocol messages, but they build them differently
# (_ipython_display_ vs _repr_mimebundle_, kernel parent headers for Output capture), so the test
# reads what a front end would receive.


class Kernel:
    """An ipykernel of this very Python, driven over the Jupyter protocol."""

    def __init__(self, tmp_path):
        from jupyter_client import KernelManager
        from jupyter_client.kernelspec import KernelSpecManager

        # A kernelspec of our own, so that no python3 kernelspec installed on the machine is used.
        spec = tmp_path / "kernels" / "torchmagic-test"
        spec.mkdir(parents=True)
        spec.joinpath("kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "torchmagic test", "language": "python"}))
        ksm = KernelSpecManager(kernel_dirs=[str(spec.parent)], ensure_native_kernel=False)
        self.km = KernelManager(kernel_name="torchmagic-test", kernel_spec_manager=ksm)
        # Its own IPython profile: no startup file or history database of this machine is shared.
        env = {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython"), "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
        self.km.start_kernel(cwd=str(_repo_root()), env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)

    def execute(self, code: str):
        """Run a cell; return its reply and the iopub messages it caused."""
        msg_id = self.kc.execute(code)
        reply = self.kc.get_shell_msg(timeout=120)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=120)
        return reply, self._iopub(msg_id)

    def comm_msg(self, comm_id: str, data: dict):
        """What a front end sends when the user moves a slider or clicks a button."""
        msg = self.kc.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
        self.kc.shell_channel.send(msg)
        return msg["header"]["msg_id"], self._iopub(msg["header"]["msg_id"])

    def _iopub(self, parent_id: str) -> list[dict]:
        msgs = []
        while True:
            try:
                m = self.kc.get_iopub_msg(timeout=120)
            except queue.Empty:
                raise AssertionError(f"the kernel went quiet; got {[x['msg_type'] for x in msgs]}") from None
            if m["parent_header"].get("msg_id") != parent_id:
                continue
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                return msgs
            if m["msg_type"] not in ("status", "execute_input"):
                msgs.append(m)

    def stop(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    k = Kernel(tmp_path_factory.mktemp("kernel"))
    try:
        # As in the shell tests: an ipywidgets 8 option that ipywidgets 7 would silently drop fails.
        reply, _ = k.execute("import warnings\nwarnings.filterwarnings('error', 'Passing unrecognized arguments', "
                             "DeprecationWarning)\n%load_ext torchmagic\n" + NET_SOURCE)
        assert reply["content"]["status"] == "ok", reply["content"]
        yield k
    finally:
        k.stop()


def _texts(msgs, kind):
    return [m["content"]["data"]["text/plain"] for m in msgs if m["msg_type"] == kind]


def test_kernel_help_usage_error_and_html_result(kernel):
    reply, _ = kernel.execute("%shapes?")
    pages = [p for p in reply["content"].get("payload", []) if p.get("source") == "page"]
    assert pages and "%shapes [--depth DEPTH]" in plain(pages[0]["data"]["text/plain"])

    _, msgs = kernel.execute("%shapes")
    stderr = "".join(m["content"]["text"] for m in msgs
                     if m["msg_type"] == "stream" and m["content"]["name"] == "stderr")
    assert stderr.startswith("UsageError: ") and stderr.count("\n") == 1, stderr
    assert not [m for m in msgs if m["msg_type"] == "error"]

    _, msgs = kernel.execute("%shapes net 1,1,32,32")
    results = [m["content"]["data"] for m in msgs if m["msg_type"] == "execute_result"]
    assert len(results) == 1, [(m["msg_type"], m["content"]) for m in msgs]
    result = results[0]
    assert "<table>" in result["text/html"] and "[1, 6, 30, 30]" in result["text/plain"]


def _output_capture(msgs, parent_id):
    """The Output widget's msg_id updates around the displayed results: what a front end uses to
    route the displays into the widget."""
    updates = [m["content"]["data"]["state"]["msg_id"] for m in msgs
               if m["msg_type"] == "comm_msg" and "msg_id" in m["content"]["data"].get("state", {})]
    return bool(updates) and set(updates[0::2]) == {parent_id} and set(updates[1::2]) == {""}


def test_trainstep_widgets_over_the_wire(kernel):
    reply, msgs = kernel.execute("%%trainstep net optimizer\nout = net(input)\ncriterion(out, y)\n")
    assert reply["content"]["status"] == "ok", reply["content"]
    parent_id = reply["parent_header"]["msg_id"]
    models = {m["content"]["comm_id"]: m["content"]["data"]["state"] for m in msgs if m["msg_type"] == "comm_open"}
    views = [m["content"]["data"] for m in msgs if m["msg_type"] in ("display_data", "execute_result")
             and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]]
    assert len(views) == 1 and views[0]["application/vnd.jupyter.widget-view+json"]["model_id"] in models

    [slider] = [(cid, s) for cid, s in models.items() if s["_model_name"] == "FloatLogSliderModel"]
    [button] = [cid for cid, s in models.items() if s["_model_name"] == "ButtonModel" and s["description"] == "Step"]
    assert any(s["_model_name"] == "OutputModel" for s in models.values())
    state = slider[1]
    assert state["value"] == pytest.approx(0.01) and state["min"] < -2 < state["max"]
    assert state["readout_format"] == ".2e"
    # The first step's result is displayed inside the Output widget.
    assert _output_capture(msgs, parent_id)
    assert any("step 1" in t for t in _texts(msgs, "display_data"))

    # The user drags the slider to 1e-3 and presses Step.
    kernel.comm_msg(slider[0], {"method": "update", "state": {"value": 1e-3}, "buffer_paths": []})
    click_id, msgs = kernel.comm_msg(button, {"method": "custom", "content": {"event": "click"}})
    assert _output_capture(msgs, click_id)
    [shown] = [t for t in _texts(msgs, "display_data") if "step 2" in t]
    assert "lr: 0.001" in shown

    # An error in the user's cell during a click is shown in the Output, not swallowed.
    kernel.execute("good_criterion, criterion = criterion, None")
    click_id, msgs = kernel.comm_msg(button, {"method": "custom", "content": {"event": "click"}})
    assert _output_capture(msgs, click_id)
    [error] = [m["content"] for m in msgs if m["msg_type"] == "error"]
    assert error["ename"] == "TypeError"
    kernel.execute("criterion = good_criterion")
