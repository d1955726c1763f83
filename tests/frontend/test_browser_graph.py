"""`%shapes --graph` in JupyterLab and Notebook 7 (Debian's headless Chromium, driven by Playwright,
at 1280x900): the notes' Net, its 28x28 failure, a ResNet-style CNN and one transformer block
(Hugging Face's GPT-2 block, built from a config with random weights), in the light and the dark
theme. Each drawing fits the output column (no horizontal scrolling), its text is readable on the
theme's background and the failing call is in the theme's error colour.

Screenshots go to artifacts/frontend/graph-*.png; TORCHMAGIC_UPDATE_SCREENSHOTS=1 also rewrites the
README's two in docs/images/. Run in its own pytest process (`make frontend-browser`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from frontend_support import ARTIFACTS, BIN, DOCS_IMAGES, ROOT, need, need_module
from test_browser import TIMEOUT_MS, UPDATE_SCREENSHOTS, Server, browser, menu, set_theme  # noqa: F401  (browser: a fixture)

NOTEBOOK = "graphs.ipynb"
SETUP = """\
import os
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from transformers import GPT2Config, GPT2Model
from transformers.utils import logging
import zoo
%load_ext torchmagic
logging.set_verbosity_error()
torch.manual_seed(0)
net = zoo.Net()
cnn = zoo.ResNet(blocks=(2, 1, 1, 1), width=8, classes=10)
gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=100, n_positions=32)).eval()
block = gpt2.h[0]"""
# (name, the cell, a text of its drawing)
CELLS = [
    ("net", "%shapes net 1,1,32,32 --graph", "max_pool2d"),
    ("failure", "%shapes net 1,1,28,28 --graph", "expects in_features=1350"),
    ("resnet", "%shapes cnn 2,3,64,64 --graph", "downsample"),
    ("transformer", "%shapes block 1,8,64 --graph", "scaled_dot_product_attention"),
]
README = {("failure", "light"): "graph-failure-jupyterlab.png",
          ("transformer", "dark"): "graph-transformer-jupyterlab-dark.png"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, jupyter_home):
    need(shutil.which(str(BIN / "jupyter-lab")) is not None,
         "jupyter lab is not installed: make frontend-browser installs it")
    from torchmagic.graph import find_dot

    need(find_dot() is not None, "Graphviz's dot is not installed (apt-get install graphviz)")
    need_module("transformers")
    nbformat = pytest.importorskip("nbformat")
    root = tmp_path_factory.mktemp("graph-root")
    cells = [nbformat.v4.new_code_cell(SETUP)] + [nbformat.v4.new_code_cell(code) for _, code, _ in CELLS]
    kernel = {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}}
    for front_end in ("lab", "notebook"):
        (root / front_end).mkdir()
        nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata=kernel), root / front_end / NOTEBOOK)
        shutil.copy(ROOT / "tests" / "zoo.py", root / front_end)  # the models, beside the notebook
    settings = Path(os.environ["JUPYTER_CONFIG_DIR"]) / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = Server(root, ARTIFACTS / "jupyter-lab-graph.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def page(browser, request):  # noqa: F811
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is None or report.failed:
        page.screenshot(path=ARTIFACTS / f"{request.node.name}-failure.png", full_page=True)
    context.close()


def run_all(page, server: Server, url: str, path: str) -> dict:
    """Open the notebook, Run All from the menu; each drawing's output element, by name."""
    page.goto(f"{server.url}{url}?token={server.token}")
    server.idle_session(path)
    page.locator(".jp-Notebook .jp-Cell").first.wait_for()
    menu(page, "Run", "Run All Cells")
    outputs = {}
    for name, _, text in CELLS:
        output = page.locator(".jp-OutputArea-output", has=page.locator("svg.tm-graph", has_text=text)).first
        output.scroll_into_view_if_needed()  # JupyterLab renders only the cells near the viewport
        output.locator("svg.tm-graph").wait_for()
        outputs[name] = output
    return outputs


def check_fits(output):
    """The drawing is no wider than the output column: nothing scrolls sideways."""
    sizes = output.evaluate("""(el) => {
        const svg = el.querySelector('svg.tm-graph').getBoundingClientRect();
        return {svg: svg.width, column: el.clientWidth, scroll: el.scrollWidth};
    }""")
    assert sizes["svg"] <= sizes["column"] + 1 and sizes["scroll"] <= sizes["column"] + 1, sizes
    return sizes


def contrast(output, selector: str) -> float:
    """WCAG contrast of an SVG element's fill against the page's background behind it."""
    return output.evaluate("""(el, selector) => {
        const rgb = (c) => c.match(/[\\d.]+/g).slice(0, 3).map(Number);
        const lum = ([r, g, b]) => [r, g, b]
            .map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
                                   .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
        const text = el.querySelector(selector);
        let bg = el;
        while (bg && getComputedStyle(bg).backgroundColor.match(/rgba\\(.*, 0\\)|transparent/)) bg = bg.parentElement;
        const back = rgb(bg ? getComputedStyle(bg).backgroundColor : 'rgb(255,255,255)');
        const alpha = Number(getComputedStyle(text).fillOpacity);  // a dimmed text is blended into the background
        const fill = rgb(getComputedStyle(text).fill).map((v, i) => v * alpha + back[i] * (1 - alpha));
        const [a, b] = [lum(fill), lum(back)];
        return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    }""", selector)


def shoot(page, output, name: str, theme: str):
    """The output, as a person sees it at 1280x900: its top in view."""
    output.evaluate("(el) => el.scrollIntoView({block: 'start'})")
    page.screenshot(path=ARTIFACTS / f"graph-{name}-{theme}.png")
    readme = README.get((name, theme))
    if UPDATE_SCREENSHOTS and readme:  # the output in view, cut off right of the drawing and its note
        box, drawing = output.bounding_box(), output.locator("svg.tm-graph").bounding_box()
        panel = page.locator(".jp-Notebook").first.bounding_box()  # the status bar below it is not the output's
        top = max(box["y"], panel["y"])
        width = min(box["width"], max(drawing["x"] + drawing["width"] - box["x"] + 24, 560))
        height = min(box["y"] + box["height"], panel["y"] + panel["height"]) - top
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=DOCS_IMAGES / readme, clip={"x": box["x"], "y": top, "width": width, "height": height})


def check_drawings(page, outputs: dict, theme: str):
    for name, output in outputs.items():
        sizes = check_fits(output)
        assert sizes["svg"] > 150, sizes  # drawn, not collapsed
        assert contrast(output, ".node text") >= 4.5, f"{name}: node text unreadable in {theme}"
        assert contrast(output, ".edge text") >= 3, f"{name}: shape labels unreadable in {theme}"
        shoot(page, output, name, theme)
    failed = outputs["failure"].locator(".node.failed text").first
    assert failed.text_content() == "fc1"
    assert contrast(outputs["failure"], ".node.failed text") >= 3, f"the failing call is hard to read in {theme}"
    error = page.evaluate("getComputedStyle(document.body).getPropertyValue('--jp-error-color1').trim()")
    assert error and failed.evaluate("(el) => getComputedStyle(el).fill") == page.evaluate(
        "(c) => { const d = document.createElement('div'); d.style.color = c; document.body.appendChild(d);"
        " const v = getComputedStyle(d).color; d.remove(); return v; }", error)
    note = outputs["failure"].locator(".note").first
    lines = note.evaluate("(el) => [...el.querySelectorAll('text')].map(t => t.textContent).join(' ')")
    assert "fix: use nn.Linear(1014, 10)" in lines
    # the residual stream: the block's two adds each join the stream and a sublayer
    text = outputs["transformer"].inner_text()
    assert text.count("add") >= 2 and "[1, 8, 64]" in text


def test_jupyterlab_light_and_dark(page, server):
    set_theme(server, "JupyterLab Light")
    outputs = run_all(page, server, f"/lab/tree/lab/{NOTEBOOK}", f"lab/{NOTEBOOK}")
    check_drawings(page, outputs, "light")
    menu(page, "Settings", "Theme", "JupyterLab Dark")
    page.wait_for_function("document.body.dataset.jpThemeLight === 'false' && "
                           "getComputedStyle(document.body).getPropertyValue('--jp-layout-color0').trim() !== 'white'")
    check_drawings(page, outputs, "dark")


def test_notebook7(page, server):
    set_theme(server, "JupyterLab Light")
    outputs = run_all(page, server, f"/notebooks/notebook/{NOTEBOOK}", f"notebook/{NOTEBOOK}")
    for output in outputs.values():
        check_fits(output)
    outputs["resnet"].evaluate("(el) => el.scrollIntoView({block: 'start'})")
    page.screenshot(path=ARTIFACTS / "graph-resnet-notebook7.png")
