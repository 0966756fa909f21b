"""The explorer page in headless Chromium, opened from disk with the network off.

Every number the page shows is checked against the file's own values, read independently with
``attnformat.open`` (xarray), within the quantization error the page states
(``attnExplorer.quantization.max_error``) plus the rounding of the printed digits. Pointer events
are real (selenium ActionChains), not synthetic DOM events. One browser serves every test of a
worker (``browser`` fixture, conftest.py); each page is generated once per module.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr

import attnformat
from attnformat.cli import main as cli_main
from attnformat.examples import _root, softmax
from browser import mismatches, rounding_of, shown_number, token_labels, token_weights

LAYERS, HEADS = 3, 4
#: Labels a hostile or careless tokenizer may produce: markup, a script end tag, entities, the
#: characters JSON allows but JavaScript source did not (U+2028), astral code points.
LABELS = ["The", "<img src=x onerror=window.__pwned=1>", "cat", "</script><script>window.__pwned=1</script>",
          "&amp;", "sat\u2028on", "\"quoted\"", "the", "mat", "\U0001F600", "<!--", "end"]

HOSTILE_SITE = "enc</script><img src=x onerror=window.__pwned=1>"


def hostile_tree() -> xr.DataTree:
    """One dense self-attention site: 3 layers x 4 heads x 12 tokens with hostile labels, weights
    (softmax) and logits (signed)."""
    rng = np.random.default_rng(11)
    n = len(LABELS)
    logits = rng.normal(scale=2.0, size=(LAYERS, HEADS, n, n))
    dims = ("layer", "head", "query", "key")
    labels = np.array(LABELS, dtype=object)
    site = xr.Dataset(
        {"weights": (dims, softmax(logits).astype(np.float32)), "logits": (dims, logits.astype(np.float32))},
        coords={"layer": np.arange(LAYERS), "head": np.arange(HEADS),
                "query_label": ("query", labels), "key_label": ("key", labels)},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0})
    # A site whose path is markup too (its "/" make it nested): the site selector must show it as text.
    return xr.DataTree.from_dict({"/": _root("labels that try to run script"), "/encoder/self": site,
                                  f"/{HOSTILE_SITE}": site.isel(layer=[0], head=[0])})


def view_page(source, out, *options) -> str:
    """``attnformat view SOURCE -o OUT [OPTIONS]`` (the command line, in this process); the page's path."""
    assert cli_main(["view", str(source), "-o", str(out), *options]) == 0
    return str(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``{name: (attention file, page)}`` for the hostile-label file and the examples used here."""
    folder = tmp_path_factory.mktemp("explorer-pages")
    hostile = folder / "hostile.attn.zarr"
    attnformat.save(hostile_tree(), hostile)
    out = {"hostile": (hostile, view_page(hostile, folder / "hostile.html"))}
    for name in ("encoder-decoder", "image", "edge", "topk", "statistics", "steps", "padded-batch"):
        path = attnformat.example_path(name)
        options = ("--sample", "0,1") if name == "padded-batch" else ()
        out[name] = (path, view_page(path, folder / f"{name}.html", *options))
    return out


def site_values(path, site: str, variable: str = "weights", **selection) -> np.ndarray:
    """The file's values, read with attnformat.open (xarray), by position."""
    array = attnformat.open(path)[site][variable]
    return np.asarray(array.isel(**selection).values, dtype=np.float64)


def tolerance(browser) -> float:
    """The quantization error the page states for the map it shows now."""
    error = browser.js("return window.attnExplorer.quantization.max_error;")
    assert isinstance(error, (int, float)) and 0 <= error < 0.01, f"page states max_error={error!r}"
    return float(error)


def state(browser) -> dict:
    return browser.js("return JSON.parse(JSON.stringify(window.attnExplorer.state));")


def assert_clean(page, *, origin=None):
    """No request left the page, no console error, and no label ran script."""
    assert page.left_page(origin) == [], f"requests left the page: {page.left_page(origin)}"
    assert page.console_errors() == [], f"console errors: {page.console_errors()}"
    assert page.browser.js("return typeof window.__pwned;") == "undefined", "a label ran script"


def hover_token(browser, side: str, index: int) -> None:
    browser.hover(browser.find(f'span.af-token[data-side="{side}"][data-index="{index}"]'))


def check_rows(browser, truth: np.ndarray, *, queries=None, keys=()) -> None:
    """Hover query tokens (then key tokens) and compare every highlighted weight with the file's
    row (column) of ``truth`` (query x key)."""
    error = tolerance(browser)
    for q in (range(truth.shape[0]) if queries is None else queries):
        hover_token(browser, "query", q)
        bad = mismatches(token_weights(browser, "key"), truth[q], error)
        assert not bad, f"query {q}: {bad[:5]}"
    for k in keys:
        hover_token(browser, "key", k)
        bad = mismatches(token_weights(browser, "query"), truth[:, k], error)
        assert not bad, f"key {k}: {bad[:5]}"


def choose(browser, css: str, value, **expected) -> None:
    """Pick ``value`` in a selector as a user would and wait until the page shows the new state."""
    browser.select(css, value)
    browser.js_async("window.attnExplorer.setState({}).then(() => null)")  # resolves after the pending render
    browser.wait_for("const s = window.attnExplorer.state; return Object.entries(arguments[0]).every(([k, v]) => String(s[k]) === String(v));",
                     expected)


def open_hostile(browser, html):
    """Open the hostile-label page on its encoder/self site (the hostile site name sorts first)."""
    page = browser.open_file(html)
    choose(browser, "#af-site", "encoder/self", site="encoder/self")
    return page


def test_token_view_hover_matches_file_and_labels_stay_text(browser, files):
    path, html = files["hostile"]
    page = open_hostile(browser, html)
    assert state(browser)["view"] == "token"
    assert token_labels(browser, "query") == LABELS
    assert token_labels(browser, "key") == LABELS
    # The markup in labels is text: no element was made from it.
    assert browser.js("return document.querySelectorAll('img[src=\"x\"], span.af-token img, span.af-token script').length;") == 0
    shown = state(browser)
    layer, head = int(shown["layer"]), int(shown["head"])
    truth = site_values(path, "encoder/self", layer=layer, head=head)
    check_rows(browser, truth, keys=range(len(LABELS)))
    sites = browser.js("return Array.from(document.querySelectorAll('#af-site option')).map(o => [o.value, o.textContent]);")
    assert any(value == HOSTILE_SITE and HOSTILE_SITE in text for value, text in sites), sites
    choose(browser, "#af-site", HOSTILE_SITE, site=HOSTILE_SITE)
    assert token_labels(browser, "query") == LABELS
    assert_clean(page)


def test_lock_layer_head_and_head_mean(browser, files):
    path, html = files["hostile"]
    page = open_hostile(browser, html)
    weights = site_values(path, "encoder/self")  # layer, head, query, key
    browser.click(browser.find('span.af-token[data-side="query"][data-index="3"]'))
    assert state(browser)["locked"] == {"side": "query", "index": 3}
    hover_token(browser, "query", 7)  # locked: hovering elsewhere changes nothing
    hover_token(browser, "key", 1)
    layer, head = int(state(browser)["layer"]), int(state(browser)["head"])
    assert not mismatches(token_weights(browser, "key"), weights[layer, head, 3], tolerance(browser))

    choose(browser, "#af-layer", 2, layer=2)
    choose(browser, "#af-head", 1, head=1)
    assert state(browser)["locked"] == {"side": "query", "index": 3}
    bad = mismatches(token_weights(browser, "key"), weights[2, 1, 3], tolerance(browser))
    assert not bad, f"locked query 3 at layer 2 head 1: {bad[:5]}"

    browser.click(browser.find('span.af-token[data-side="query"][data-index="3"]'))  # unlock
    assert not state(browser)["locked"]
    check_rows(browser, weights[2, 1], queries=(0, 5, 11), keys=(4,))

    choose(browser, "#af-head", "mean", head="mean")
    check_rows(browser, np.nanmean(weights[2], axis=0), queries=range(len(LABELS)), keys=(0, 9))
    choose(browser, "#af-layer", 0, layer=0)
    check_rows(browser, np.nanmean(weights[0], axis=0), queries=(1, 6))

    # "all heads": beside each key, one cell per head with that head's weight for the hovered query.
    browser.click(browser.find("#af-all-heads"))
    browser.wait_for("return window.attnExplorer.state.allHeads === true && document.querySelector('span.af-head-cell');")
    maps = payload_site(browser, "encoder/self")["maps"]
    hover_token(browser, "query", 2)
    cells = browser.wait_for(
        "const rows = Array.from(document.querySelectorAll('span.af-token[data-side=\"key\"]')).map(t => "
        "Array.from(t.parentElement.querySelectorAll('span.af-head-cell')).map(c => [Number(t.dataset.index), Number(c.dataset.head), "
        "c.getAttribute('data-weight')])).flat();"
        "return rows.length && rows.every(r => r[2] !== null) ? rows : null;")
    assert len(cells) == HEADS * len(LABELS)
    for key, head, text in cells:
        bound = maps[f"weights/s0/t0/l0/h{head}"]["max_error"]
        assert abs(shown_number(text) - weights[0, head, 2, key]) <= bound + rounding_of(text) + 1e-12, (key, head, text)
    assert_clean(page)


TOOLTIP = re.compile(r"^(?P<query>.*) \u2192 (?P<key>.*): (?P<value>\S+)", re.S)


def tooltip_samples(browser, canvas, points: int = 6) -> list[tuple[str, str, str]]:
    """Hover a grid of points over the matrix canvas; the (query label, key label, value text) each
    tooltip shows."""
    rect = canvas.rect
    seen = []
    for fy in np.linspace(0.04, 0.96, points):
        for fx in np.linspace(0.04, 0.96, points):
            browser.hover_at(canvas, fx * rect["width"], fy * rect["height"])
            text = browser.js("const t = document.getElementById('af-tooltip'); return t ? t.textContent : '';")
            match = TOOLTIP.match(text or "")
            if match:
                seen.append((match["query"], match["key"], match["value"]))
    return seen


def test_matrix_view_tooltips_match_file(browser, files):
    path, html = files["hostile"]
    page = open_hostile(browser, html)
    browser.click(browser.find('button.af-tab[data-view="matrix"]'))
    browser.wait_for("return window.attnExplorer.state.view === 'matrix' && document.getElementById('af-matrix');")
    choose(browser, "#af-layer", 1, layer=1)
    choose(browser, "#af-head", 2, head=2)
    truth = site_values(path, "encoder/self", layer=1, head=2)
    error = tolerance(browser)
    samples = tooltip_samples(browser, browser.find("canvas#af-matrix"))
    cells = set()
    for query, key, text in samples:
        q, k = LABELS.index(query), LABELS.index(key)
        cells.add((q, k))
        assert abs(shown_number(text) - truth[q, k]) <= error + rounding_of(text) + 1e-12, (query, key, text, truth[q, k])
    assert len(cells) >= 12, f"tooltips named only {len(cells)} cells: {samples[:5]}"
    colorbar = browser.find("#af-colorbar").text
    assert colorbar.strip(), "colour bar shows no range"
    assert_clean(page)


def test_cross_attention_uses_key_site_labels(browser, files):
    path, html = files["encoder-decoder"]
    page = browser.open_file(html)
    tree = attnformat.open(path)
    choose(browser, "#af-site", "decoder/cross", site="decoder/cross")
    assert token_labels(browser, "query") == [str(v) for v in tree["decoder/cross"]["query_label"].values]
    assert token_labels(browser, "key") == [str(v) for v in tree["encoder/self"]["key_label"].values]
    # Token groups (modalities) are marked: a group label before the first token of each run, per side.
    for side, groups in (("query", tree["decoder/cross"]["query_group"].values), ("key", tree["encoder/self"]["key_group"].values)):
        runs = [(i, str(g)) for i, g in enumerate(groups) if i == 0 or groups[i - 1] != g]
        marked = browser.js(
            "const out = []; let label = null;"
            "for (const e of document.querySelectorAll('span.af-token[data-side=\"' + arguments[0] + '\"], .af-group-label')) {"
            "  if (e.classList.contains('af-group-label')) { if (e.parentElement.contains(document.querySelector("
            "      'span.af-token[data-side=\"' + arguments[0] + '\"]'))) label = e.dataset.group; }"
            "  else if (label !== null) { out.push([Number(e.dataset.index), label]); label = null; } }"
            "return out;", side)
        assert marked == [list(run) for run in runs], (side, marked, runs)
    layer, head = int(state(browser)["layer"]), int(state(browser)["head"])
    truth = site_values(path, "decoder/cross", layer=layer, head=head)
    check_rows(browser, truth, keys=(0, truth.shape[1] - 1))
    assert_clean(page)


def test_overview_click_opens_layer_and_head(browser, files):
    path, html = files["hostile"]
    page = open_hostile(browser, html)
    browser.click(browser.find('button.af-tab[data-view="overview"]'))
    browser.wait_for("return document.querySelector('#af-overview [data-layer][data-head]');")
    # Each cell shows its head's summary: mean over query rows of the row entropy (nats), of the
    # weight on the first key (sink) and of the row maximum, computed here with numpy.
    weights = site_values(path, "encoder/self")
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(weights > 0, weights * np.log(weights), 0.0), axis=-1).mean(axis=-1)
    expected = {"entropy": entropy, "sink": weights[..., 0].mean(axis=-1), "max": weights.max(axis=-1).mean(axis=-1)}
    cells = attribute_rows(browser, "#af-overview [data-layer][data-head]", ("layer", "head", "entropy", "sink", "max"))
    assert len([c for c in cells if c["head"] != "mean"]) == LAYERS * HEADS
    for cell in cells:
        if cell["head"] == "mean":
            continue
        layer, head = int(cell["layer"]), int(cell["head"])
        for name, truth in expected.items():
            assert abs(shown_number(cell[name]) - truth[layer, head]) <= 1e-5 * abs(truth[layer, head]) + rounding_of(cell[name]), \
                (layer, head, name, cell[name], truth[layer, head])
    browser.click(browser.find('#af-overview [data-layer="2"][data-head="3"]'))
    browser.wait_for("const s = window.attnExplorer.state; return s.view === 'token' && String(s.layer) === '2' && String(s.head) === '3';")
    check_rows(browser, site_values(path, "encoder/self", layer=2, head=3), queries=(0, 4))
    assert_clean(page)


def payload_site(browser, name: str) -> dict:
    """The page's own description of a site (to read the error bound it states next to a value)."""
    return browser.js("return JSON.parse(document.getElementById('af-data').textContent).sites"
                      ".find(s => s.name === arguments[0]);", name)


def open_view(browser, view: str, ready_css: str) -> None:
    browser.click(browser.find(f'button.af-tab[data-view="{view}"]'))
    browser.wait_for("return window.attnExplorer.state.view === arguments[0] && document.querySelector(arguments[1]);", view, ready_css)


def attribute_rows(browser, css: str, names) -> list[dict]:
    return browser.js("return Array.from(document.querySelectorAll(arguments[0])).map(e => Object.fromEntries("
                      "arguments[1].map(n => [n, e.getAttribute('data-' + n)])));", css, list(names))


def test_image_view_patches_match_file(browser, files):
    path, html = files["image"]
    page = browser.open_file(html)
    open_view(browser, "image", "#af-image .af-patch")
    site = attnformat.open(path)["encoder/self"]
    rows, cols = site["key_patch_row"].values, site["key_patch_col"].values
    for query in (None, 5):
        if query is not None:
            browser.select("#af-image-query", query)
            browser.wait_for("return document.querySelector('#af-image').dataset.query === arguments[0];", str(query))
        shown = state(browser)
        q = int(browser.find("#af-image").get_attribute("data-query"))
        truth = site_values(path, "encoder/self", layer=int(shown["layer"]), head=int(shown["head"]))[q]
        patches = attribute_rows(browser, "#af-image .af-patch", ("row", "col", "key", "weight"))
        assert len(patches) == int((rows >= 0).sum()), "one patch per key on the grid"
        error = tolerance(browser)
        for patch in patches:
            k = int(patch["key"])
            assert (int(patch["row"]), int(patch["col"])) == (rows[k], cols[k])
            assert abs(shown_number(patch["weight"]) - truth[k]) <= error + rounding_of(patch["weight"]) + 1e-12, (q, patch, truth[k])
    assert_clean(page)


def test_graph_view_edges_match_file(browser, files):
    path, html = files["edge"]
    page = browser.open_file(html)
    open_view(browser, "graph", "#af-graph path.af-edge")
    site = attnformat.open(path)["gat"]
    choose(browser, "#af-layer", 1, layer=1)
    choose(browser, "#af-head", 1, head=1)
    browser.wait_for("return document.querySelector('#af-graph path.af-edge');")
    truth = site_values(path, "gat", layer=1, head=1)
    error = payload_site(browser, "gat")["extras"]["edges"]["values"]["weights/s0/t0/l1"]["max_error"]
    edges = attribute_rows(browser, "#af-graph path.af-edge", ("edge", "source", "target", "weight"))
    assert sorted(int(e["edge"]) for e in edges) == list(range(truth.size))
    for edge in edges:
        i = int(edge["edge"])
        assert (int(edge["source"]), int(edge["target"])) == (site["source"].values[i], site["target"].values[i])
        assert abs(shown_number(edge["weight"]) - truth[i]) <= error + rounding_of(edge["weight"]) + 1e-12, (edge, truth[i])
    labels = browser.js("return Array.from(document.querySelectorAll('#af-graph g.af-node')).sort((a, b) => a.dataset.node - b.dataset.node)"
                        ".map(g => g.querySelector('text.af-node-label').textContent);")
    assert labels == [str(v) for v in site["node_label"].values]
    assert_clean(page)


def test_topk_and_statistics_views_match_file(browser, files):
    path, html = files["topk"]
    page = browser.open_file(html)
    choose(browser, "#af-site", "decoder/self_topk", site="decoder/self_topk")
    open_view(browser, "topk", "#af-topk span.af-topk-cell")
    choose(browser, "#af-layer", 1, layer=1)
    head = int(state(browser)["head"])
    topk = attnformat.open(path)["decoder/self_topk"]
    weights = np.asarray(topk["weights"].isel(layer=1, head=head).values, np.float64)
    keys = np.asarray(topk["key_index"].isel(layer=1, head=head).values)
    bound = payload_site(browser, "decoder/self_topk")["extras"]["topk"]["rows"][f"s0/t0/l1/h{head}"]["weights"]["max_error"]
    cells = attribute_rows(browser, "#af-topk span.af-topk-cell", ("query", "rank", "key", "weight"))
    assert len(cells) == weights.size
    for cell in cells:
        q, r = int(cell["query"]), int(cell["rank"])
        assert int(cell["key"]) == keys[q, r], cell
        if keys[q, r] >= 0:
            assert abs(shown_number(cell["weight"]) - weights[q, r]) <= bound + rounding_of(cell["weight"]) + 1e-12, (cell, weights[q, r])
    assert_clean(page)

    path, html = files["statistics"]
    page = browser.open_file(html)
    open_view(browser, "statistics", "#af-statistics rect.af-statistics-bar")
    choose(browser, "#af-layer", 2, layer=2)
    choose(browser, "#af-head", 3, head=3)
    stats = attnformat.open(path)["decoder/self_stats"]
    rows = payload_site(browser, "decoder/self_stats")["extras"]["statistics"]["rows"]["s0/t0/l2/h3"]
    bars = attribute_rows(browser, "#af-statistics rect.af-statistics-bar", ("query", "statistic", "value"))
    assert {bar["statistic"] for bar in bars} >= {"entropy", "max_weight", "sink_weight"}
    for bar in bars:
        truth = float(stats[bar["statistic"]].isel(layer=2, head=3).values[int(bar["query"])])
        bound = rows[bar["statistic"]]["max_error"]
        assert abs(shown_number(bar["value"]) - truth) <= bound + rounding_of(bar["value"]) + 1e-12, (bar, truth)
    top = attribute_rows(browser, '#af-statistics tr.af-statistics-row[data-statistic="top_key"]', ("query", "value"))
    assert [int(t["value"]) for t in sorted(top, key=lambda t: int(t["query"]))] == stats["top_key"].isel(layer=2, head=3).values.tolist()
    assert_clean(page)


def test_step_slider_shows_that_steps_map(browser, files):
    from selenium.webdriver.common.keys import Keys

    path, html = files["steps"]
    page = browser.open_file(html)
    assert int(state(browser)["step"]) == 0
    for step in (1, 2):  # the keyboard, as a user moves a slider (the page may redraw it after each change)
        browser.find("input[type=range]#af-step").send_keys(Keys.ARROW_RIGHT)
        browser.wait_for("return String(window.attnExplorer.state.step) === arguments[0];", str(step))
    browser.js_async("window.attnExplorer.setState({}).then(() => null)")
    shown = state(browser)
    truth = site_values(path, "trunk/iga", step=2, layer=int(shown["layer"]), head=int(shown["head"]))
    check_rows(browser, truth, queries=(0, 3, 9))
    assert_clean(page)


def test_padding_is_shown_as_no_value(browser, files):
    path, html = files["padded-batch"]
    page = browser.open_file(html)
    site = attnformat.open(path)["encoder/self"]
    choose(browser, "#af-sample", 1, sample=1)
    labels = [str(v) for v in site["query_label"].values[1]]
    assert token_labels(browser, "query") == labels
    assert token_labels(browser, "key") == [str(v) for v in site["key_label"].values[1]]
    shown = state(browser)
    weights = site_values(path, "encoder/self", sample=1, layer=int(shown["layer"]), head=int(shown["head"]))
    # The file stores 0 where a padded key was masked out; that is no attention, not a weight of 0.
    keep = site["key_mask"].values[1].astype(bool)
    truth = np.where(keep[None, :] & site["query_mask"].values[1].astype(bool)[:, None], weights, np.nan)
    check_rows(browser, truth, keys=range(len(labels)))  # padded tokens too: they show no value
    assert_clean(page)


def test_matrix_marks_causal_mask(browser, files):
    path, html = files["encoder-decoder"]
    page = browser.open_file(html)
    choose(browser, "#af-site", "decoder/self", site="decoder/self")
    open_view(browser, "matrix", "canvas#af-matrix")
    shown = state(browser)
    truth = site_values(path, "decoder/self", layer=int(shown["layer"]), head=int(shown["head"]))
    error = tolerance(browser)
    canvas = browser.find("canvas#af-matrix")
    rect = canvas.rect
    seen = {"mask": 0, "value": 0}
    for fy in np.linspace(0.05, 0.95, 5):
        for fx in np.linspace(0.05, 0.95, 5):
            browser.hover_at(canvas, fx * rect["width"], fy * rect["height"])
            tip = browser.js("const t = document.getElementById('af-tooltip');"
                             "return t && t.hasAttribute('data-q') && t.style.display !== 'none' ? "
                             "[Number(t.dataset.q), Number(t.dataset.k), t.dataset.value, t.textContent] : null;")
            if not tip:
                continue
            q, k, value, text = tip
            if k > q:  # above the diagonal of a causal site: the mask, said so, not attention
                assert "causal mask" in text and truth[q, k] == 0, (q, k, text)
                seen["mask"] += 1
            else:
                assert abs(shown_number(value) - truth[q, k]) <= error + rounding_of(value) + 1e-12, (q, k, value)
                seen["value"] += 1
    assert seen["mask"] and seen["value"], seen
    assert_clean(page)
