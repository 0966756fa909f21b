"""``attnformat serve`` in headless Chromium: the page of a file too large to embed, its maps
fetched one window per request from a server on 127.0.0.1 (started and stopped by the test).

Hovered weights, switched layers and zoomed windows are compared with the file's values read
independently (``attnformat.open``), within the quantization error the page states; the page may
talk to 127.0.0.1 only (the browser cannot reach anything else, and every request is recorded).
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

import attnformat
from attnformat.viewer.explorer.server import serve
from browser import mismatches, rounding_of, shown_number, token_weights

LAYERS, HEADS, TOKENS = 8, 2, 1024


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """``(path, served page URL, server)``: an 8-layer x 2-head x 1024-token float32 file (32 MiB
    of maps, more than a page embeds) written map by map, and its server."""
    path = tmp_path_factory.mktemp("explorer-serve") / "long.attn.zarr"
    rng = np.random.default_rng(1024)
    labels = [f"w{i}" for i in range(TOKENS)]
    with attnformat.Writer(path, model_name="synthetic") as writer:
        site = writer.create_site("encoder/self", sizes={"layer": LAYERS, "head": HEADS, "query": TOKENS, "key": TOKENS},
                                  coords={"query_label": ("query", labels), "key_label": ("key", labels)},
                                  attrs={"attention_type": "self", "causal": 0})
        for layer in range(LAYERS):
            logits = rng.normal(scale=3.0, size=(HEADS, TOKENS, TOKENS)).astype(np.float32)
            weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
            site.write("weights", weights / weights.sum(axis=-1, keepdims=True), layer=layer)
    server = serve(path, host="127.0.0.1", port=0)
    try:
        yield path, server.url, server
    finally:
        server.close()


def served_weights(browser, page, side: str, index: int, truth_row, error, timeout: float = 20) -> list[str]:
    """The mismatches between the weights shown on ``side`` and ``truth_row`` once the page has
    them: a served page whose map came back pooled fetches the hovered token's row (column) at
    full resolution, so wait (up to ``timeout`` s) until every token shows a weight that matches,
    and return what is still wrong then. The bound is the server's for that row (0 when it sent
    the exact float32 values: then only the 6 printed digits may differ), else the page's ``error``."""
    window = {"q0": index, "q1": index + 1} if side == "key" else {"k0": index, "k1": index + 1}
    limit = time.monotonic() + timeout
    while True:
        try:
            bound = window_error(page, **window)
        except AssertionError:
            bound = error
        bad = mismatches(token_weights(browser, side), truth_row, bound)
        if not bad or time.monotonic() > limit:
            return bad
        time.sleep(0.05)


def file_map(path, layer, head) -> np.ndarray:
    return np.asarray(attnformat.open(path)["encoder/self"]["weights"].isel(layer=layer, head=head).values, np.float64)


def origin(url: str) -> str:
    return url.rstrip("/")


def window_error(page, **window) -> float:
    """The quantization error of a window the page fetched (a zoom, a token's row): the server's
    own statement in its answer to the page's last ``/api/map`` request for that window."""
    def matches(url):
        asked = {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}
        return all(asked.get(name) == str(value) for name, value in window.items())

    urls = [r for r in page.refresh_logs().requests if "/api/map" in r and matches(r)]
    assert urls, f"the page fetched no window {window}: {page.requests}"
    with urllib.request.urlopen(urls[-1]) as answer:
        body = json.load(answer)
    # An exact answer (a token's row) carries the stored float32 values: only the printed digits round.
    return 0.0 if "f32" in body else float(body["max_error"])


def wait_state(browser, **expected):
    browser.js_async("window.attnExplorer.setState({}).then(() => null)")
    browser.wait_for("const s = window.attnExplorer.state; return Object.entries(arguments[0]).every(([k, v]) => String(s[k]) === String(v));",
                     expected)


def test_served_page_hover_and_layer_switch(browser, large):
    path, url, _ = large
    page = browser.open_url(url)
    assert url.startswith("http://127.0.0.1:")
    state = browser.js("return JSON.parse(JSON.stringify(window.attnExplorer.state));")
    error = browser.js("return window.attnExplorer.quantization.max_error;")
    truth = file_map(path, int(state["layer"]), int(state["head"]))
    for q in (0, 517, TOKENS - 1):
        browser.hover(browser.find(f'span.af-token[data-side="query"][data-index="{q}"]'))
        bad = served_weights(browser, page, "key", q, truth[q], error)
        assert not bad, f"query {q}: {bad[:5]}"

    browser.select("#af-layer", "6")
    browser.select("#af-head", "1")
    wait_state(browser, layer=6, head=1)
    truth = file_map(path, 6, 1)
    error = browser.js("return window.attnExplorer.quantization.max_error;")
    browser.hover(browser.find('span.af-token[data-side="query"][data-index="900"]'))
    bad = served_weights(browser, page, "key", 900, truth[900], error)
    assert not bad, f"layer 6 head 1 query 900: {bad[:5]}"
    browser.hover(browser.find('span.af-token[data-side="key"][data-index="33"]'))
    bad = served_weights(browser, page, "query", 33, truth[:, 33], error)
    assert not bad, f"layer 6 head 1 key 33: {bad[:5]}"
    # The maps came from the server, one request each, and nothing else went anywhere.
    requests = page.refresh_logs().requests
    assert any("/api/map" in r and "layer=6" in r for r in requests), requests
    assert page.left_page(origin(url)) == [], page.left_page(origin(url))
    assert page.console_errors() == []


TOOLTIP = re.compile(r"^(?P<query>w\d+) \u2192 (?P<key>w\d+): (?P<value>[^\s;,]+)(?P<rest>.*)$", re.S)
BLOCK = re.compile(r"block of (\d+)\s*[×x]\s*(\d+),?\s*(mean|max)")


def check_tooltips(browser, canvas, truth, error, window) -> int:
    """Hover a grid over the canvas and check every tooltip against ``truth`` (pooled blocks
    against the block's mean or max); returns how many cells inside ``window`` were checked."""
    (q0, q1), (k0, k1) = window
    rect = canvas.rect
    checked = 0
    for fy in np.linspace(0.05, 0.95, 5):
        for fx in np.linspace(0.05, 0.95, 5):
            browser.hover_at(canvas, fx * rect["width"], fy * rect["height"])
            text = browser.js("const t = document.getElementById('af-tooltip'); return t ? t.textContent : '';") or ""
            match = TOOLTIP.match(text)
            if not match:
                continue
            q, k = int(match["query"][1:]), int(match["key"][1:])
            assert q0 <= q < q1 and k0 <= k < k1, f"tooltip {text!r} outside the window {window}"
            block = BLOCK.search(match["rest"])
            if block:
                a, b, how = int(block[1]), int(block[2]), block[3]
                cells = truth[q:q + a, k:k + b]  # pooled: the labels are the block's first query and key
                expected = np.nanmax(cells) if how == "max" else np.nanmean(cells)
            else:
                expected = truth[q, k]
            value = shown_number(match["value"])
            assert abs(value - expected) <= error + rounding_of(match["value"]) + 1e-9, (text, expected)
            checked += 1
    return checked


def test_served_matrix_zoom_window_matches_file(browser, large):
    path, url, _ = large
    page = browser.open_url(url)
    browser.click(browser.find('button.af-tab[data-view="matrix"]'))
    browser.wait_for("return window.attnExplorer.state.view === 'matrix' && document.getElementById('af-matrix');")
    browser.select("#af-layer", "3")
    wait_state(browser, layer=3)
    head = int(browser.js("return window.attnExplorer.state.head;"))
    truth = file_map(path, 3, head)
    canvas = browser.find("canvas#af-matrix")
    error = browser.js("return window.attnExplorer.quantization.max_error;")
    assert check_tooltips(browser, canvas, truth, error, ((0, TOKENS), (0, TOKENS))) >= 5

    # Zoom as a user does: drag a box over the canvas; the page fetches that window from the server.
    from selenium.webdriver.common.action_chains import ActionChains

    rect = canvas.rect
    ActionChains(browser.driver, duration=0).move_to_element_with_offset(canvas, int(rect["width"] * 0.05), int(rect["height"] * 0.1)) \
        .click_and_hold().move_by_offset(int(rect["width"] * 0.06), int(rect["height"] * 0.06)).release().perform()
    zoom = browser.wait_for("return window.attnExplorer.state.zoom;")
    browser.js_async("window.attnExplorer.setState({}).then(() => null)")
    assert zoom["q1"] - zoom["q0"] < TOKENS and zoom["k1"] - zoom["k0"] < TOKENS, zoom
    error = window_error(page, q0=zoom["q0"], k0=zoom["k0"])
    window = ((zoom["q0"], zoom["q1"]), (zoom["k0"], zoom["k1"]))
    assert check_tooltips(browser, browser.find("canvas#af-matrix"), truth, error, window) >= 5

    window = {"q0": 600, "q1": 664, "k0": 100, "k1": 164}
    browser.js_async("window.attnExplorer.setState({zoom: arguments[0]}).then(() => null)", window)
    error = window_error(page, q0=600, q1=664, k0=100, k1=164)
    assert check_tooltips(browser, browser.find("canvas#af-matrix"), truth, error, ((600, 664), (100, 164))) >= 5
    assert page.left_page(origin(url)) == [], page.left_page(origin(url))
    assert page.console_errors() == []
