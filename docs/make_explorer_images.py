"""Screenshots of the interactive explorer, one per view, for the README.

Each page is made with ``attnformat view`` from an example file (MiniLM-shaped attention from
docs/make_images.py, the ViT-on-digits seed file from tests/viewer/seed_files.py), opened from disk in the browser tests' headless Chromium (network off) and
captured after a real hover or click, so the pictures show what a user sees.

Run: ``python docs/make_explorer_images.py`` (writes docs/explorer_<view>.png for token, matrix,
overview, image, graph, topk, statistics and steps; needs Debian's chromium and chromedriver).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent / "tests" / "explorer"))
sys.path.insert(0, str(DOCS))
sys.path.insert(0, str(DOCS.parent / "tests" / "viewer"))

import attnformat  # noqa: E402
from attnformat.cli import main as cli  # noqa: E402
from browser import Browser  # noqa: E402
from make_images import minilm_shaped  # noqa: E402
from seed_files import vit_digits  # noqa: E402

WIDTH, HEIGHT = 1200, 820


def page_of(source: Path, folder: Path) -> Path:
    out = folder / (Path(source).name.split(".")[0] + ".html")
    if cli(["view", str(source), "-o", str(out)]) != 0:
        raise SystemExit(f"attnformat view {source} failed")
    return out


def show(browser: Browser, view: str, css: str, **state) -> None:
    """Set the state (site first, it changes what the selectors offer), open a tab, wait for it."""
    if "site" in state:
        browser.set_state(site=state.pop("site"))
    if state:
        browser.set_state(**state)
    browser.click(browser.find(f'button.af-tab[data-view="{view}"]'))
    browser.wait_for("return window.attnExplorer.state.view === arguments[0] && document.querySelector(arguments[1]);", view, css)
    browser.js_async("window.attnExplorer.setState({}).then(() => null)")


def shot(browser: Browser, name: str) -> Path:
    path = DOCS / f"explorer_{name}.png"
    browser.js("window.scrollTo(0, 0);")
    browser.screenshot(path)
    print(f"wrote {path}")
    return path


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="explorer-images-") as folder:
        return draw(Path(folder))


def draw(folder: Path) -> int:
    minilm = folder / "minilm-shaped.attn.zarr"
    attnformat.save(minilm_shaped(), minilm)
    browser = Browser(width=WIDTH, height=HEIGHT)
    try:
        browser.open_file(page_of(minilm, folder))
        browser.set_state(layer=2, head=4)
        browser.hover(browser.find('span.af-token[data-side="query"][data-index="4"]'))
        shot(browser, "token")

        show(browser, "matrix", "canvas#af-matrix", layer=2, head=4)
        canvas = browser.find("canvas#af-matrix")
        rect = canvas.rect
        browser.hover_at(canvas, rect["width"] * 0.45, rect["height"] * 0.4)
        shot(browser, "matrix")

        show(browser, "overview", "#af-overview [data-layer][data-head]")
        browser.hover(browser.find('#af-overview [data-layer="3"][data-head="5"]'))
        shot(browser, "overview")

        digits, _ = vit_digits(folder / "vit-digits.attn.zarr")  # a ViT on 28x28 digits: a picture worth showing
        browser.open_file(page_of(digits, folder))
        show(browser, "image", "#af-image .af-patch", layer=1, head=2)
        shot(browser, "image")

        browser.open_file(page_of(attnformat.example_path("edge"), folder))
        show(browser, "graph", "#af-graph path.af-edge")
        browser.click(browser.find('#af-graph g.af-node[data-node="1"] circle'))
        browser.wait_for("return document.querySelector('#af-graph-incoming tr.af-incoming');")
        shot(browser, "graph")

        browser.open_file(page_of(attnformat.example_path("topk"), folder))
        show(browser, "topk", "#af-topk span.af-topk-cell", site="decoder/self_topk")
        shot(browser, "topk")

        browser.open_file(page_of(attnformat.example_path("statistics"), folder))
        show(browser, "statistics", "#af-statistics rect.af-statistics-bar")
        shot(browser, "statistics")

        browser.open_file(page_of(attnformat.example_path("steps"), folder))
        show(browser, "matrix", "canvas#af-matrix", step=2)
        shot(browser, "steps")
    finally:
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
