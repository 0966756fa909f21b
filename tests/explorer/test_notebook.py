"""Jupyter display: the viewer's figures show once per cell, and ``explore`` shows the page inline.

Cells run in IPython's own shell (``InteractiveShell``) with ``%matplotlib inline``, in a child
process so that the inline backend and IPython's singletons never leak into other tests. The
shell's display hook publishes the cell's value as ipykernel's does (an ``execute_result`` with
every format), instead of printing ``Out[n]:`` text as the terminal shell does: that is what a
notebook receives. Everything else (the display formatters, matplotlib-inline's
``flush_figures`` at the end of each cell, ``display()``) is IPython's and matplotlib's own code.
"""

from __future__ import annotations

import base64
import html
import html.parser
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import zlib

import numpy as np
import xarray as xr
import zarr

import attnformat

NOTEBOOK = textwrap.dedent('''
    import json, sys
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    outputs = []

    class Publisher(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
            outputs.append({"kind": "display_data", "data": dict(data)})

    class ResultHook(DisplayHook):
        # as ipykernel's ZMQShellDisplayHook: the cell's value goes to the notebook as execute_result
        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            outputs.append({"kind": "execute_result", "data": dict(format_dict)})

        def finish_displayhook(self):
            pass

    class Shell(InteractiveShell):
        displayhook_class = ResultHook
        display_pub_class = Publisher

        def enable_gui(self, gui=None):  # a kernel's event loop integration: nothing to do inline
            pass

    shell = Shell.instance()
    assert shell.run_cell("%matplotlib inline").success
    cells = json.loads(sys.stdin.read())
    results = []
    for cell in cells:
        outputs.clear()
        result = shell.run_cell(cell, store_history=True)
        if not result.success:
            raise SystemExit(f"cell failed: {cell!r}: {result.error_in_exec or result.error_before_exec!r}")
        results.append([{"kind": o["kind"], "mimes": sorted(o["data"]),
                         "text": o["data"].get("text/plain", ""), "html": o["data"].get("text/html", ""),
                         "png": o["data"].get("image/png", "")} for o in outputs])
    print(json.dumps(results))
''')


def run_notebook(cells: list[str]) -> list[list[dict]]:
    """The outputs a notebook shows for each cell (in order), from a fresh IPython shell (its
    profile and history in a temporary directory, not the user's ~/.ipython)."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([sys.executable, "-c", NOTEBOOK], input=json.dumps(cells), capture_output=True, text=True,
                              timeout=600, env={**os.environ, "IPYTHONDIR": profile})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def images(outputs: list[dict]) -> int:
    return sum("image/png" in output["mimes"] for output in outputs)


def test_each_plot_shows_exactly_once_and_no_repr_text():
    path = str(attnformat.example_path("dense"))
    cells = [
        f"from attnformat.viewer import heatmap, head_grid, image_overlay\npath = {path!r}",
        "heatmap(path, layer=0, head=1)",              # an Axes as the cell's value
        "head_grid(path, layer=0)",                    # a Figure as the cell's value
        "ax = heatmap(path, layer=1, head=0)",         # no value: the backend shows it
        "fig = head_grid(path, layer=1)",
        "fig",                                         # shown again later, as Matplotlib does
        "ax",
        "grid = head_grid(path, layer=0)\ndisplay(grid)",  # displayed mid-cell: not again at the end
        "import matplotlib.pyplot as plt\nplt.plot([1, 2]);",  # plain Matplotlib: unchanged
    ]
    shown = run_notebook(cells)
    assert [images(outputs) for outputs in shown] == [0, 1, 1, 1, 1, 1, 1, 1, 1]
    texts = [output["text"] for outputs in shown for output in outputs if output["mimes"] == ["text/plain"]]
    assert not any(text.startswith("<Axes") or "Figure size" in text for text in texts), texts
    # The pictures are the figures: head_grid of layer 0 is wider than one heatmap.
    widths = [_png_width(output["png"]) for outputs in shown[1:3] for output in outputs if output["png"]]
    assert widths[1] > widths[0]


def _png_width(data: str) -> int:
    raw = base64.b64decode(data)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(raw[16:20], "big")


class _Elements(html.parser.HTMLParser):
    """Top-level elements of an HTML fragment, with their attributes (unescaped by the parser)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs)))


def _hostile_file(tmp_path):
    label = '"><script>window.pwned=1</script><img src=x onerror="window.pwned=2">\'&amp;'
    labels = np.array([["[CLS]", label, "cat", "[SEP]"]], dtype=object)
    rng = np.random.default_rng(5)
    weights = rng.random((1, 2, 3, 4, 4)).astype(np.float32)
    weights /= weights.sum(axis=-1, keepdims=True)
    site = xr.Dataset({"weights": (("sample", "layer", "head", "query", "key"), weights)},
                      coords={"layer": [0, 1], "head": [0, 1, 2], "query_label": (("sample", "query"), labels),
                              "key_label": (("sample", "key"), labels)},
                      attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key",
                             "attention_type": "self", "causal": 0})
    root = xr.Dataset(attrs={"attnformat": "attnformat", "attnformat_version": "1.2.0", "producer": "test",
                             "completeness": "complete", "model_framework": "numpy", "model_name": "random"})
    path = tmp_path / "hostile.attn.zarr"
    attnformat.save(xr.DataTree.from_dict({"/": root, "/encoder/self": site}), path)
    return path, label


def test_explore_shows_the_page_inline_in_a_sandboxed_frame(tmp_path):
    path, label = _hostile_file(tmp_path)
    shown = run_notebook([f"from attnformat.viewer.explorer.notebook import explore\nexplore({str(path)!r})"])
    (result,) = shown[0]
    assert result["kind"] == "execute_result" and "text/html" in result["mimes"]
    parser = _Elements()
    parser.feed(result["html"])
    assert [tag for tag, _ in parser.found] == ["iframe"]  # the labels stayed inside the attribute
    frame = parser.found[0][1]
    assert frame["sandbox"] == "allow-scripts"
    page = frame["srcdoc"]
    assert page.startswith("<!DOCTYPE html>") and "http://" not in page and "https://" not in page
    # The page's data are the file's own values, within the stated quantization error.
    payload = json.loads(re.search(r'<script type="application/json" id="af-data">(.*?)</script>', page, re.S).group(1))
    (site,) = payload["sites"]
    assert site["query_labels"][0][1] == label
    truth = np.asarray(zarr.open_group(str(path), mode="r")["encoder/self/weights"][...], dtype=np.float64)
    encoded = site["maps"]["weights/s0/t0/l1/h2"]
    raw = base64.b64decode(encoded["q"])
    raw = zlib.decompress(raw) if encoded.get("compression") == "deflate" else raw
    codes = np.frombuffer(raw, np.uint8).reshape(encoded["rows"], encoded["cols"])
    decoded = encoded["offset"] + encoded["scale"] * codes
    assert np.abs(decoded - truth[0, 1, 2]).max() <= encoded["max_error"] * (1 + 1e-9)
    assert "window.pwned=1</script>" not in result["html"]  # escaped: &lt;/script&gt;...


def test_explore_frame_runs_offline_in_chromium(tmp_path, browser):
    """The notebook's HTML, as Jupyter puts it in an output cell, in real Chromium with the
    network off: the page inside the frame renders, its values are the file's, no label ran."""
    from attnformat.viewer.explorer.notebook import explore

    path, _ = _hostile_file(tmp_path)
    notebook = tmp_path / "notebook.html"
    notebook.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body><div class='output'>"
                        + explore(path, height=500)._repr_html_() + "</div></body></html>", encoding="utf-8")
    page = browser.open_file(notebook, wait=False)
    driver = browser.driver
    try:
        driver.switch_to.frame(driver.find_element("css selector", "iframe"))
        browser.wait_ready()
        browser.set_state(layer=1, head=2)
        truth = np.asarray(zarr.open_group(str(path), mode="r")["encoder/self/weights"][...], dtype=np.float64)
        error = browser.js("return window.attnExplorer.quantization.max_error;")
        shown = browser.js("return [0,1,2,3].map(q => [0,1,2,3].map(k => window.attnExplorer.valueAt(q, k)));")
        assert np.abs(np.asarray(shown, dtype=np.float64) - truth[0, 1, 2]).max() <= error * (1 + 1e-9)
        assert browser.js("return window.pwned === undefined;")
    finally:
        driver.switch_to.default_content()
    assert browser.js("return window.pwned === undefined;")
    assert page.refresh_logs().left_page() == []
    assert page.console_errors() == []


def test_a_server_shows_its_live_page_inline(tmp_path, browser):
    """``serve(path)`` as a cell's value: the served page in a frame, reading maps from the server."""
    from attnformat.viewer.explorer.server import serve

    path, _ = _hostile_file(tmp_path)
    truth = np.asarray(zarr.open_group(str(path), mode="r")["encoder/self/weights"][...], dtype=np.float64)
    with serve(path) as server:
        output = server._repr_html_()
        parser = _Elements()
        parser.feed(output)
        assert parser.found[0] == ("iframe", {"src": server.url, "title": "attnformat explorer",
                                              "style": parser.found[0][1]["style"]})
        notebook = tmp_path / "served-notebook.html"
        notebook.write_text(f"<!DOCTYPE html><html><body><div class='output'>{output}</div></body></html>", encoding="utf-8")
        page = browser.open_url(notebook.resolve().as_uri(), wait=False)
        driver = browser.driver
        try:
            driver.switch_to.frame(driver.find_element("css selector", "iframe"))
            browser.wait_ready()
            browser.set_state(layer=0, head=1)
            error = browser.js("return window.attnExplorer.quantization.max_error;")
            shown = browser.js_async("window.attnExplorer.setState({}).then(() => [0,1,2,3].map(q => [0,1,2,3].map("
                                     "k => window.attnExplorer.valueAt(q, k))))")
            assert np.abs(np.asarray(shown, dtype=np.float64) - truth[0, 0, 1]).max() <= error * (1 + 1e-9)
        finally:
            driver.switch_to.default_content()
        assert page.refresh_logs().left_page(allowed_origin=server.url.rstrip("/")) == []
        assert page.console_errors() == []
    assert "closed" in server._repr_html_()
