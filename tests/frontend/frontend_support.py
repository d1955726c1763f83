"""What the front-end tests share: paths, a kernel driven over the Jupyter protocol as a browser
drives it, a terminal under tmux, and the rule that a missing program fails under `make`.

These tests start real programs (ipykernel, ipython, tmux, jupyter lab, chromium). The Makefile
runs each tier in its own pytest process with TORCHMAGIC_FRONTENDS=required: there a missing
program is a failure. Elsewhere (a plain `pytest tests`) a missing program skips its tests.
"""
from __future__ import annotations

import ast
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
NOTEBOOK = EXAMPLES / "pytorch_basics.ipynb"
ARTIFACTS = ROOT / "artifacts" / "frontend"  # kept by CI; git-ignored
DOCS_IMAGES = ROOT / "docs" / "images"  # README screenshots, rewritten with TORCHMAGIC_UPDATE_SCREENSHOTS=1
REQUIRED = os.environ.get("TORCHMAGIC_FRONTENDS") == "required"
BIN = Path(sys.executable).parent  # the environment running the tests: its ipython, jupyter, kernel

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def need(ok: bool, what: str) -> None:
    """A missing program: a failure where the front ends are required, else a skip."""
    if not ok:
        if REQUIRED:
            pytest.fail(f"{what} (TORCHMAGIC_FRONTENDS=required)", pytrace=False)
        pytest.skip(what)


def need_module(name: str):
    try:
        return __import__(name)
    except ImportError:
        need(False, f"Python package {name} is not installed: make frontend-kernel installs it")


class KernelError(AssertionError):
    pass


class Reply:
    """What one request produced: its shell reply and every iopub message it caused."""

    def __init__(self, reply: dict | None, messages: list[dict]):
        self.reply = reply
        self.messages = messages

    @property
    def content(self) -> dict:
        return self.reply["content"] if self.reply else {}

    def of(self, msg_type: str) -> list[dict]:
        return [m["content"] for m in self.messages if m["msg_type"] == msg_type]

    def stream(self, name: str) -> str:
        return "".join(c["text"] for c in self.of("stream") if c["name"] == name)

    def outputs(self, mime: str) -> list:
        return [c["data"][mime] for c in self.of("display_data") + self.of("execute_result") if mime in c["data"]]


class Kernel:
    """A real ipykernel driven over the Jupyter messaging protocol, the way a notebook front end
    drives it: execute requests, and comm messages to widget models."""

    def __init__(self, client, manager=None, timeout: float = 120):
        self.client, self.manager, self.timeout = client, manager, timeout
        self.client.start_channels()
        self.client.wait_for_ready(timeout=timeout)
        self.widgets: dict[str, dict] = {}  # comm id -> the widget model's state, as the kernel opened it

    @classmethod
    def start(cls, cwd: Path) -> "Kernel":
        """A new kernel of the `python3` kernelspec."""
        from jupyter_client.manager import KernelManager

        manager = KernelManager(kernel_name="python3")
        manager.start_kernel(cwd=str(cwd))
        return cls(manager.client(), manager)

    @classmethod
    def attach(cls, connection_file: Path) -> "Kernel":
        """Another client of a running kernel (one a notebook server started)."""
        from jupyter_client.blocking import BlockingKernelClient

        client = BlockingKernelClient()
        client.load_connection_file(str(connection_file))
        return cls(client)

    def close(self):
        self.client.stop_channels()
        if self.manager is not None:
            self.manager.shutdown_kernel(now=True)

    def _collect(self, msg_id: str, with_reply: bool = True) -> Reply:
        """iopub messages of this request until the kernel is idle again, then its shell reply."""
        messages, deadline = [], time.monotonic() + self.timeout
        while True:
            try:
                msg = self.client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                got = [m["msg_type"] for m in messages]
                raise KernelError(f"no idle status within {self.timeout}s; got {got}") from None
            if msg["msg_type"] == "comm_open" and msg["content"].get("target_name") == "jupyter.widget":
                self.widgets[msg["content"]["comm_id"]] = msg["content"]["data"]["state"]
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
            messages.append(msg)
        reply = None
        while with_reply:
            reply = self.client.get_shell_msg(timeout=self.timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        return Reply(reply, messages)

    def execute(self, code: str) -> Reply:
        return self._collect(self.client.execute(code, store_history=True))

    def run(self, code: str) -> Reply:
        """Execute; fail the test on an error reply."""
        reply = self.execute(code)
        if reply.content.get("status") != "ok":
            raise KernelError(f"{code!r} failed: {reply.content.get('ename')}: {reply.content.get('evalue')}\n"
                              f"{reply.stream('stderr')}")
        return reply

    def value(self, expression: str):
        """A Python literal computed in the kernel (its repr, read back with literal_eval)."""
        reply = self.execute_expressions({"v": expression})["v"]
        if reply["status"] != "ok":
            raise KernelError(f"{expression!r}: {reply['ename']}: {reply['evalue']}")
        return ast.literal_eval(reply["data"]["text/plain"])

    def execute_expressions(self, expressions: dict[str, str]) -> dict:
        msg_id = self.client.execute("", silent=True, user_expressions=expressions)
        return self._collect(msg_id).content["user_expressions"]

    def widget(self, model: str, description: str) -> str:
        """The comm id of the (last opened) widget of this model class whose description is this
        (or starts with it, when it ends with "*")."""
        def matches(text):
            return text.startswith(description[:-1]) if description.endswith("*") else text == description

        found = [cid for cid, s in self.widgets.items()
                 if s.get("_model_name") == model and matches(str(s.get("description", "")))]
        if not found:
            models = [s.get("_model_name") for s in self.widgets.values()]
            raise KernelError(f"no {model} {description!r} among {models}")
        return found[-1]

    def comm(self, comm_id: str, data: dict) -> Reply:
        """A comm message from the 'front end' to a widget model; the iopub messages it caused."""
        msg = self.client.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
        self.client.shell_channel.send(msg)
        return self._collect(msg["header"]["msg_id"], with_reply=False)

    def set_widget(self, comm_id: str, **state) -> Reply:
        """What a browser sends when the user moves a control."""
        return self.comm(comm_id, {"method": "update", "state": state, "buffer_paths": []})

    def click(self, comm_id: str) -> Reply:
        """What a browser sends when the user clicks a button."""
        return self.comm(comm_id, {"method": "custom", "content": {"event": "click"}})




class Terminal:
    """A program in a tmux pane: keys in (send-keys), the screen out (capture-pane), as a person
    at a terminal sees it. Its own tmux server (-L), so nothing of a user's tmux takes part."""

    def __init__(self, command: list[str], env: dict[str, str], width: int = 160, height: int = 50):
        need(shutil.which("tmux") is not None, "tmux is not installed (apt-get install tmux)")
        self.socket = f"torchmagic-test-{uuid.uuid4().hex[:8]}"
        self.last_screen = ""
        env_args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
        self.tmux("-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height),
                  *env_args, shlex.join(command))

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def screen(self) -> str:
        """Everything shown so far, scrollback included, wrapped lines joined."""
        self.last_screen = self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "t")
        return self.last_screen

    def type(self, text: str) -> None:
        """Type a line and press Enter."""
        if text:
            self.tmux("send-keys", "-t", "t", "-l", text)
        self.tmux("send-keys", "-t", "t", "Enter")

    def paste(self, text: str) -> None:
        """Paste as a terminal does (bracketed paste), then press Enter."""
        self.tmux("set-buffer", "--", text)
        self.tmux("paste-buffer", "-p", "-t", "t")
        self.tmux("send-keys", "-t", "t", "Enter")

    def wait_for(self, pattern: str, timeout: float = 60) -> str:
        """Wait until the screen matches the regex; the screen."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if re.search(pattern, screen, re.M):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on the screen after {timeout}s:\n{screen}")
            time.sleep(0.2)

    def wait_exit(self, timeout: float = 30) -> None:
        """Wait until the program has ended (its tmux session closes with it)."""
        deadline = time.monotonic() + timeout
        has_session = ["tmux", "-L", self.socket, "has-session", "-t", "t"]
        while subprocess.run(has_session, capture_output=True).returncode == 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"the program did not exit within {timeout}s:\n{self.screen()}")
            time.sleep(0.2)

    def close(self):
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)

