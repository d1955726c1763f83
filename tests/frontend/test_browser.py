"""Level 3: JupyterLab and Notebook 7 in a real browser (Debian's headless Chromium, driven by
Playwright). One `jupyter lab` server serves both. A user's flow: open the example, Run All from
the menu, read the %shapes table, drag the learning-rate slider with the mouse, click Step; then
the kernel itself is asked whether the rate and the step count changed.

Run in its own pytest process (`make frontend-browser`): Playwright's event loop must not outlive
this module. Screenshots go to artifacts/frontend/ (always on failure);
TORCHMAGIC_UPDATE_SCREENSHOTS=1 also rewrites the README's images in docs/images/.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from frontend_support import ARTIFACTS, BIN, DOCS_IMAGES, NOTEBOOK, Kernel, need

CHROMIUM = Path(os.environ.get("TORCHMAGIC_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
UPDATE_SCREENSHOTS = os.environ.get("TORCHMAGIC_UPDATE_SCREENSHOTS") == "1"
TIMEOUT_MS = 120_000  # two cores shared with other jobs: generous, never a timing assertion

# Transformers models at a tiny size (a real forward) and at full size (on the meta device: no memory),
# built from their configs with random weights: nothing is downloaded.
TRANSFORMERS = "transformers.ipynb"
TRANSFORMER_CELLS = [
    "%load_ext torchmagic\n"
    "import torch, transformers\n"
    "from transformers import AutoConfig, AutoModel, AutoModelForCausalLM\n"
    "transformers.logging.set_verbosity_error()\n\n"
    "def build(kind, **tiny):\n"
    "    cls = AutoModel if kind == 'bert' else AutoModelForCausalLM\n"
    "    config = AutoConfig.for_model(kind, **tiny)\n"
    "    if tiny:\n"
    "        return cls.from_config(config)\n"
    "    with torch.device('meta'):\n"
    "        return cls.from_config(config)\n\n"
    "llama = build('llama', hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,\n"
    "              num_key_value_heads=2, vocab_size=128)\n"
    "gpt2 = build('gpt2', n_embd=64, n_layer=2, n_head=4, vocab_size=128)\n"
    "bert = build('bert', hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,\n"
    "             vocab_size=128)\n"
    "llama_7b, gpt2_small, bert_base = build('llama'), build('gpt2'), build('bert')\n"
    "ids = torch.randint(0, 128, (1, 16))",
    *[f"%{magic} {model} ids" for model in ("llama", "gpt2", "bert", "llama_7b", "gpt2_small", "bert_base")
      for magic in ("shapes", "summary")],
]


class Server:
    """A `jupyter lab` server on 127.0.0.1 with a random token, serving a folder of its own."""

    def __init__(self, root: Path, log: Path):
        self.root = root
        self.token = secrets.token_hex(16)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(BIN / "jupyter-lab"), "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
                   "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
                   f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--ServerApp.terminals_enabled=False"]
        if os.geteuid() == 0:
            command.append("--allow-root")
        self.log = log
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def api(self, path: str, method: str = "GET", body: dict | None = None):
        request = urllib.request.Request(self.url + path, method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text else None

    def wait_ready(self, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"jupyter lab exited ({self.process.returncode}):\n{self.log.read_text()}")
            try:
                self.api("/api/status")
                return
            except OSError:
                if time.monotonic() > deadline:
                    log = self.log.read_text()
                    raise AssertionError(f"jupyter lab did not answer within {timeout}s:\n{log}") from None
                time.sleep(0.3)

    def idle_session(self, path: str, timeout: float = 120) -> dict:
        """The notebook's session once its kernel exists and is idle. (Lab's toolbar says idle before
        a kernel exists, so the page cannot tell.)"""
        deadline = time.monotonic() + timeout
        while True:
            sessions = [s for s in self.api("/api/sessions") if s["path"] == path]
            if sessions and sessions[0]["kernel"]["execution_state"] == "idle":
                return sessions[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no idle kernel for {path} within {timeout}s: {sessions}")
            time.sleep(0.5)

    def stop(self):
        """Stop this server (its own process group), whatever state it is in."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory, jupyter_home):
    need(shutil.which(str(BIN / "jupyter-lab")) is not None,
         "jupyter lab is not installed: make frontend-browser installs it")
    root = tmp_path_factory.mktemp("lab-root")
    for front_end in ("lab", "notebook"):  # a copy each: two sessions, and the repository's file untouched
        (root / front_end).mkdir()
        shutil.copy(NOTEBOOK, root / front_end / NOTEBOOK.name)
        write_notebook(root / front_end / TRANSFORMERS, TRANSFORMER_CELLS)
    # No "would you like news?" toast over the notebook.
    settings = Path(os.environ["JUPYTER_CONFIG_DIR"]) / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = Server(root, ARTIFACTS / "jupyter-lab.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(server):
    need(CHROMIUM.exists(), f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need(False, "playwright is not installed: make frontend-browser installs it")
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()
    finally:
        playwright.stop()


@pytest.fixture
def page(browser, request):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is None or report.failed:
        page.screenshot(path=ARTIFACTS / f"{request.node.name}-failure.png", full_page=True)
    context.close()


def set_theme(server: Server, theme: str):
    server.api("/lab/api/settings/@jupyterlab/apputils-extension:themes", "PUT",
               {"raw": json.dumps({"theme": theme})})


def menu(page, top: str, *items: str):
    """Click through the menu bar, as a user does: e.g. Run > Run All Cells."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{top}$")).click()
    for item in items:
        page.locator(".lm-Menu:visible .lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$")).click()


def attach_kernel(server: Server, session: dict) -> Kernel:
    """A second client of the notebook's own kernel, to ask Python what the browser did."""
    connection = Path(os.environ["JUPYTER_RUNTIME_DIR"]) / f"kernel-{session['kernel']['id']}.json"
    return Kernel.attach(connection)


def run_the_example(page, server: Server, url: str, path: str, name: str):
    from playwright.sync_api import expect  # auto-waiting checks: outputs render a moment after they arrive

    page.goto(f"{server.url}{url}?token={server.token}")
    session = server.idle_session(path)
    page.locator(".jp-Notebook .jp-Cell").first.wait_for()

    menu(page, "Run", "Run All Cells")

    # The %shapes table: the notes' question answered (6 x 15 x 15 = 1350 into fc1).
    table = page.locator(".jp-OutputArea-output .tm-result table", has_text="[1, 6, 30, 30]").first
    table.wait_for()
    table.scroll_into_view_if_needed()  # JupyterLab renders only the cells near the viewport
    expect(table).to_contain_text("[1, 1350]")
    # A 28x28 input: the failing call stands out (the error colour of the theme).
    failed = page.locator(".jp-OutputArea-output .tm-result", has_text="failed on input").first
    failed.locator("tr.tm-fail", has_text="fc1").wait_for()

    # The %%trainstep widget: the result of step 1, a learning-rate slider, a Step button.
    widget = page.locator(".jp-OutputArea-output .widget-vbox", has=page.locator(".widget-slider")).first
    widget.get_by_text("step 1").first.wait_for()
    # The notes' first step moves fc1's weights by 40% of their norm: flagged, with what to do.
    expect(widget.locator(".tm-warn").first).to_contain_text("may have blown up")
    slider = widget.locator(".widget-slider", has=page.locator(".widget-label", has_text=re.compile(r"^lr"))).first
    readout = slider.locator(".widget-readout")
    slider.scroll_into_view_if_needed()
    expect(readout).to_have_text(re.compile(r"\d"))  # the readout renders a moment after the slider
    assert float(readout.inner_text()) == pytest.approx(0.01)

    kernel = attach_kernel(server, session)
    try:
        kernel.run("_steps = []\n_hook = optimizer.register_step_post_hook(lambda *a: _steps.append(1))")
        assert kernel.value("optimizer.param_groups[0]['lr']") == pytest.approx(0.01)

        # Drag the slider's handle to the left with the mouse: a lower rate.
        handle = slider.locator(".noUi-handle")
        handle.scroll_into_view_if_needed()
        box = handle.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x - 10, y, steps=4)
        page.mouse.move(x - 20, y, steps=4)
        page.mouse.up()
        page.wait_for_function("(el) => el.textContent.trim() !== '1.00e-2'", arg=readout.element_handle())
        chosen = float(readout.inner_text())
        assert chosen < 0.01

        widget.get_by_role("button", name="Step", exact=True).click()
        widget.get_by_text("step 2").first.wait_for()
        widget.locator("svg", has_text="loss before the step").wait_for()  # two steps: the history plot

        # Python itself: the optimizer runs at the dragged rate and took one step.
        assert kernel.value("optimizer.param_groups[0]['lr']") == pytest.approx(chosen, rel=0.01)
        assert kernel.value("len(_steps)") == 1

        # A rate far too high: the step is flagged, with what to do about it.
        kernel.run("[p for p in Out.values() if type(p).__name__ == 'TrainStepPanel'][-1].set_rates([1.0])")
        expect(readout).to_have_text("1.00e+0")
        widget.get_by_role("button", name="Step", exact=True).click()
        widget.get_by_text("step 3").first.wait_for()
        expect(widget.locator(".tm-warn").first).to_contain_text("step 3 may have blown up")
        expect(widget.locator(".tm-warn").first).to_contain_text("Undo takes this step back")
        assert widget.locator("tr.tm-warn").count() >= 1  # the parameters that moved too far stand out
    finally:
        kernel.close()

    page.screenshot(path=ARTIFACTS / f"{name}.png")
    return table, failed, widget


BIG_MODEL = ("big = nn.Sequential(*[nn.Sequential(*[nn.Sequential(nn.Linear(8, 8 + k), nn.ReLU(), nn.Linear(8 + k, 8)) "
             "for k in range(10 * i, 10 * i + 10)]) for i in range(4)])\n%shapes big 1,8")  # no two blocks alike


def readme_screenshot(page, content, name: str):
    """The cell around `content` (its input and output), cut off right of the content: an image
    for the README, written only when asked (TORCHMAGIC_UPDATE_SCREENSHOTS=1)."""
    if not UPDATE_SCREENSHOTS:
        return
    page.locator(".jp-NotebookPanel:visible .jp-Cell").first.click()  # no cell of the picture is the active one
    cell = content.locator("xpath=ancestor::div[contains(concat(' ', @class, ' '), ' jp-Cell ')]").first
    cell.scroll_into_view_if_needed()
    box, inner = cell.bounding_box(), content.bounding_box()
    right = max(inner["x"] + inner["width"], box["x"] + 560)
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=DOCS_IMAGES / name, clip={"x": box["x"], "y": box["y"], "height": box["height"],
                                                   "width": min(box["width"], right - box["x"] + 24)})


def test_jupyterlab(page, server):
    set_theme(server, "JupyterLab Light")
    shapes, failed, widget = run_the_example(page, server, f"/lab/tree/lab/{NOTEBOOK.name}", f"lab/{NOTEBOOK.name}",
                                             "jupyterlab")
    readme_screenshot(page, shapes, "shapes-jupyterlab.png")
    readme_screenshot(page, failed, "shapes-failure-jupyterlab.png")
    readme_screenshot(page, widget, "trainstep-jupyterlab.png")

    # A model with hundreds of module calls, typed into a new cell: a short table, a row count,
    # and every row one click away in a box that scrolls.
    page.locator(".jp-Notebook .jp-Cell").last.locator(".jp-InputPrompt").click()
    page.keyboard.press("Escape")
    page.keyboard.press("b")
    page.keyboard.press("Enter")
    page.keyboard.insert_text(BIG_MODEL)
    page.keyboard.press("Shift+Enter")
    big = page.locator(".jp-OutputArea-output .tm-result", has_text="of 165 rows").first
    big.wait_for()
    assert big.locator("tr:visible").count() == 1 + 45
    big.locator("summary").click()
    scroll = big.locator(".tm-scroll")
    scroll.wait_for()
    assert scroll.evaluate("(el) => el.scrollHeight > el.clientHeight"), "the full table should scroll in its box"
    page.screenshot(path=ARTIFACTS / "jupyterlab-big-model.png")

    # The dark theme, chosen from the menu: the tables follow it.
    menu(page, "Settings", "Theme", "JupyterLab Dark")
    page.wait_for_function("document.body.dataset.jpThemeLight === 'false' && "
                           "getComputedStyle(document.body).getPropertyValue('--jp-layout-color0').trim() !== 'white'")
    check_contrast(shapes)
    check_contrast(failed, "tr.tm-fail td")
    check_contrast(big)
    page.screenshot(path=ARTIFACTS / "jupyterlab-dark.png")
    readme_screenshot(page, shapes, "shapes-jupyterlab-dark.png")
    check_contrast(widget, "svg text")  # the history plot's labels
    check_contrast(widget, ".tm-warn")
    readme_screenshot(page, widget, "trainstep-jupyterlab-dark.png")


def test_notebook7(page, server):
    set_theme(server, "JupyterLab Light")
    shapes, failed, widget = run_the_example(page, server, f"/notebooks/notebook/{NOTEBOOK.name}",
                                     f"notebook/{NOTEBOOK.name}", "notebook7")
    check_contrast(shapes)
    readme_screenshot(page, widget, "trainstep-notebook7.png")


def check_contrast(output, cell: str = "td"):
    """The table's text is readable on the page's background (WCAG contrast of at least 4.5 for
    text, 3 for the bold text of a failing row)."""
    ratio = output.evaluate("""(el, cell) => {
        const rgb = (c) => c.match(/[\\d.]+/g).slice(0, 3).map(Number);
        const lum = ([r, g, b]) => [r, g, b]
            .map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
                                   .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
        const td = el.querySelector(cell);
        let bg = td, color = getComputedStyle(td).color;
        while (bg && getComputedStyle(bg).backgroundColor.match(/rgba\\(.*, 0\\)|transparent/)) bg = bg.parentElement;
        const [a, b] = [lum(rgb(color)), lum(rgb(bg ? getComputedStyle(bg).backgroundColor : 'rgb(255,255,255)'))];
        return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    }""", cell)
    least = 4.5 if cell in ("td", "svg text") else 3
    assert ratio >= least, f"{cell} text contrast {ratio:.2f} on its background"


def write_notebook(path: Path, cells: list[str]):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, path)


def widths(output) -> dict:
    """How wide a result is in px: its output area (scrollWidth, clientWidth), each of its boxes
    that may scroll sideways, and its widest table as laid out."""
    return output.evaluate("""(el) => {
        const area = el.closest('.jp-OutputArea-output');
        const tables = [...el.querySelectorAll('table')].map(t => t.scrollWidth);
        return {area: [area.scrollWidth, area.clientWidth],
                boxes: [...el.querySelectorAll('.tm-fit')].map(b => [b.scrollWidth, b.clientWidth]),
                table: Math.max(0, ...tables)};
    }""")


@pytest.mark.parametrize("front_end", ["lab", "notebook"])
def test_transformer_tables_fit_the_output_column(page, server, front_end):
    """%shapes and %summary of Llama, GPT-2 and BERT, tiny and full-size, at 1280x900: no output
    area and no table box scrolls sideways. The widths go to artifacts/frontend/widths-*.json."""
    from playwright.sync_api import expect

    set_theme(server, "JupyterLab Light")
    url = f"/lab/tree/lab/{TRANSFORMERS}" if front_end == "lab" else f"/notebooks/notebook/{TRANSFORMERS}"
    page.goto(f"{server.url}{url}?token={server.token}")
    server.idle_session(f"{front_end}/{TRANSFORMERS}")
    notebook = page.locator(".jp-NotebookPanel:visible").first  # JupyterLab keeps the example open in a tab too
    notebook.locator(".jp-Cell").first.wait_for()
    menu(page, "Run", "Run All Cells")
    measured, cells = {}, notebook.locator(".jp-CodeCell")
    for i, source in enumerate(TRANSFORMER_CELLS[1:], start=1):
        cell = cells.nth(i)
        cell.scroll_into_view_if_needed()  # JupyterLab renders only the cells near the viewport
        result = cell.locator(".jp-OutputArea-output .tm-result").first
        result.wait_for()
        result.scroll_into_view_if_needed()
        expect(result.locator(".tm-title")).not_to_be_empty()
        measured[source] = widths(result)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"widths-{front_end}.json").write_text(json.dumps(measured, indent=1))
    page.screenshot(path=ARTIFACTS / f"transformers-{front_end}.png")
    for source, w in measured.items():
        (scroll, client) = w["area"]
        assert scroll <= client, f"{source}: its output is {scroll} px wide in a {client} px column"
        for box_scroll, box_client in w["boxes"]:
            assert box_scroll <= box_client, f"{source}: a table of {box_scroll} px scrolls in {box_client} px"
    if front_end != "lab":
        return
    # A transformer's table for the README: GPT-2 small, its twelve blocks folded into one row.
    shapes = cells.nth(TRANSFORMER_CELLS.index("%shapes gpt2_small ids")).locator(".tm-result").first
    expect(shapes).to_contain_text("h.0–11")
    expect(shapes).to_contain_text("GPT2Block ×12")
    hover = shapes.locator("td", has_text="h.0–11").first.get_attribute("title")
    assert hover == "transformer.h.0 … transformer.h.11", hover  # the full names on hover
    readme_screenshot(page, shapes, "shapes-transformer-jupyterlab.png")
    menu(page, "Settings", "Theme", "JupyterLab Dark")
    page.wait_for_function("document.body.dataset.jpThemeLight === 'false' && "
                           "getComputedStyle(document.body).getPropertyValue('--jp-layout-color0').trim() !== 'white'")
    check_contrast(shapes)
    readme_screenshot(page, shapes, "shapes-transformer-jupyterlab-dark.png")
