"""A report of a whole file: every plot its content supports, an ``index.html`` that shows them, a
markdown summary (like seed 003's analysis report) and the statistics as JSON.

File names come from site paths and labels, which the file's writer chose: they are reduced to
``[A-Za-z0-9._-]`` so that a label such as ``../x`` cannot leave the output directory. Every text
from the file is escaped for where it goes (:mod:`attnformat.text`): HTML-escaped in the page, so
that a label such as ``<s>`` cannot break it; markdown-escaped in ``summary.md``, so that a
description holding a newline cannot open a heading or load a remote image there.

Why the report draws the way it does (measured on MiniLM-shaped files, see
``benchmarks/bench_viewer.py``): nearly all of its time is Matplotlib laying out and rasterising
figures, which holds one core per figure. So plots are drawn by several processes at once: this
one and ``workers - 1`` helpers. Helpers are forked by the report's own fork server
(``forkserver``; ``spawn`` where there is none, as on Windows), never by a plain ``fork`` of this
process, which is unsafe from a process that may hold threads (TensorStore's, torch's). The
server is a fresh, single-threaded interpreter that imports every module a plot needs once, so a
helper starts with them imported instead of spending seconds of CPU (measured) importing xarray,
Matplotlib and zarr again as a ``spawn``ed helper does. Each helper opens the file once (a tree is never sent between
processes: an opened store may hold file descriptors that mean nothing elsewhere), without
validating it again (this process validates it before any plot is handed out), and reads every site
that fits in :data:`PRELOAD_BYTES` into memory once, so plots of one site share one read; this
process does the same. The statistics are computed once,
here, while the helpers draw, and serve the findings, ``stats.json`` and ``summary.md``. Grids of maps,
heatmaps and the rollout are drawn with ``compact=True`` (:func:`attnformat.viewer.output.compact_panels`): the
same layout, labels and colorbar as the plot functions' default, as plain artists of one canvas
instead of one Axes per panel with Matplotlib ticks, about a third of the CPU for a 12-head grid
(measured). PNG files
are rasterised once (no trial draw for a tight crop), by a renderer that lays out and rasterises
each text once per process (:func:`_text_renderer`: token labels repeat from figure to figure),
and written by a plain PNG encoder (:func:`_png_bytes`: one row filter, fast zlib). The fork
server draws one small figure before forking (:func:`_warm_up`), so helpers start warm. Grids
of maps are drawn first and single plots last (:func:`_drawing_order`), so that no process waits
long for another's last item.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import io
import json
import math
import multiprocessing
import os
import re
import signal
import struct
import threading
import warnings
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from attnformat.engines import Location
from attnformat.errors import AttnFormatError
from attnformat.reading import source_of
from attnformat.text import for_html, for_markdown, markdown_code, markdown_fence
from attnformat.viewer import catalog
from attnformat.viewer.output import close_figure, figure_of, save_figure, save_options
from attnformat.viewer.selection import labels_of, open_source, site_name, sites_of
from attnformat.viewer.statistics import format_summary, reusing_statistics, statistics_summary, top_pairs

#: At most this many plots of one kind per site (e.g. one per layer, per time step, per node).
MAX_PER_KIND = 8
REPORT_DPI = 90
#: Each drawing process reads sites whose arrays hold at most this many bytes in all into memory
#: once, so that plots of the same site do not read (and decompress) the same maps again.
PRELOAD_BYTES = 256 * 2**20
#: zlib level of the report's PNG files: level 1 encodes several times faster than Matplotlib's
#: default 6 for files about a quarter larger (PNG stays lossless either way).
PNG_COMPRESS_LEVEL = 1
#: PNG filter type 2 ("Up": each byte minus the one above it) on every row after the first.
_PNG_UP = 2
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_name(text: str, *, max_length: int = 100) -> str:
    """A file name made of ``[A-Za-z0-9._-]`` only, never starting with a dot, never empty.

    Examples
    --------
    >>> safe_file_name("../x"), safe_file_name("<s>"), safe_file_name("encoder/self-heatmap")
    ('x', 's', 'encoder_self-heatmap')
    """
    name = _UNSAFE.sub("_", str(text))
    name = re.sub(r"\.{2,}", "_", name)  # no ".." anywhere, even where it is harmless
    name = re.sub(r"_{2,}", "_", name).strip("._-")
    return name[:max_length].rstrip("._-") or "plot"


@dataclass
class ReportItem:
    """One plot of the report: where it goes, what it shows, and which plot kind draws it.

    ``kind`` and ``options`` are what :func:`attnformat.viewer.plot` is called with; they are plain
    values, so that another process can draw the plot from its own copy of the file.
    """

    section: str
    caption: str
    stem: str
    kind: str
    options: dict
    file: str = ""
    error: str = ""
    source: xr.DataTree | None = field(default=None, repr=False, compare=False)

    def draw(self, source=None):
        """Draw the plot from ``source`` (by default the tree it was planned from).

        Returns the Axes or Figure of the plot kind.
        """
        return catalog.plot(self.source if source is None else source, self.kind, **self.options)


@dataclass
class _Plan:
    source: xr.DataTree
    items: list = field(default_factory=list)
    stems: dict = field(default_factory=dict)

    def add(self, section, caption, stem_parts, kind, options):
        stem = "-".join(safe_file_name(p) for p in stem_parts if str(p))
        count = self.stems.get(stem, 0)
        self.stems[stem] = count + 1
        if count:
            stem = f"{stem}-{count + 1}"
        self.items.append(ReportItem(section, caption, stem, kind, options, source=self.source))


def _values(site, dim) -> list:
    if dim not in site.sizes:
        return [None]
    values = site.coords[dim].values.tolist() if dim in site.coords else list(range(site.sizes[dim]))
    return values[:MAX_PER_KIND]


def _plan_site(plan: _Plan, tree, site) -> None:
    name = site_name(site)
    kinds = catalog.PLOT_KINDS
    applies = {kind: entry.applies(site) for kind, entry in kinds.items() if entry.scope == "site"}
    # Kinds that say which of their plots a report shows (top-k and statistics sites' kinds, see PlotKind.report).
    for kind, entry in kinds.items():
        if entry.scope == "site" and entry.report is not None and applies[kind]:
            for caption, parts, options in entry.report(site):
                plan.add(name, caption, [name, kind, *parts], kind,
                         {"site": name, **{key: value for key, value in options.items() if value is not None}})
    layers = _values(site, "layer")
    main = catalog.main_variable(site)
    if main is None:
        return
    main_dims = site[main].dims
    signed = [v for v in ("logits", "bias") if v in site.data_vars and v != main]
    step = site.coords["step"].values[-1].item() if "step" in main_dims and "step" in site.coords else None

    def add(kind, caption, parts, **options):
        plan.add(name, caption, [name, kind, *parts], kind, {"site": name, **options})

    if applies["heatmap"]:
        for layer in layers:
            add("heatmap", f"layer {layer}: {main}, mean over heads", [f"layer{layer}"], layer=layer, step=step, variable=main)
            for variable in signed:
                add("heatmap", f"layer {layer}: {variable}, mean over heads", [variable, f"layer{layer}"],
                    layer=layer, step=step, variable=variable)
        for sample in _values(site, "sample")[1:]:
            add("heatmap", f"sample {sample}, layer {layers[0]}", [f"sample{sample}"], sample=sample, layer=layers[0],
                variable=main)
    if applies["head-grid"]:
        for layer in layers:
            add("head-grid", f"layer {layer}: every head", [f"layer{layer}"], layer=layer, step=step, variable=main)
    if applies["step-comparison"]:
        for layer in layers:
            add("step-comparison", f"layer {layer}: every training step, mean over heads", [f"layer{layer}"], layer=layer,
                variable=main)
    if applies["layer-comparison"] and len(layers) > 1:
        add("layer-comparison", "every layer, mean over heads", [], step=step, variable=main)
    if applies["group-map"]:
        variable = "logits" if "logits" in site.data_vars else "weights"
        for layer in layers:
            add("group-map", f"layer {layer}: {variable} per group, mean over heads", [f"layer{layer}"],
                layer=layer, variable=variable)
            if applies["head-grid"]:
                add("head-grid", f"layer {layer}: {variable} per group, every head", ["groups", f"layer{layer}"],
                    layer=layer, variable=variable, by_group=True, origin="lower")
            add("group-bars", f"layer {layer}: last query group's {variable} per key group, per head",
                [f"layer{layer}"], layer=layer, variable=variable)
    if applies["top-edges"]:
        for time in _values(site, "time") if "time" in main_dims else [None]:
            for layer in layers:
                add("top-edges", f"layer {layer}, time {time}: top 20 edges" if time is not None else f"layer {layer}: top 20 edges",
                    [f"layer{layer}", f"time{time}" if time is not None else ""], layer=layer, time=time)
    if applies["temporal"]:
        for node in _values(site, "node"):
            label = labels_of(site, "node")[_values(site, "node").index(node)] if "node" in site.sizes else node
            add("temporal", f"node {label}: time x time attention", ["node", label], node=node)
    if applies["node-link"]:
        for layer in layers:
            add("node-link", f"layer {layer}: graph, mean over heads", [f"layer{layer}"], layer=layer)
    if applies["attention-vs-distance"]:
        for layer in layers:
            for kind, caption in (("pairwise-overview", "logits, bias, weights, distance"),
                                  ("attention-vs-distance", "attention vs distance, local/global"),
                                  ("distance-statistics", "attention and bias vs distance"),
                                  ("query-profiles", "query profiles")):
                if applies[kind]:
                    add(kind, f"layer {layer}, head 0{f', step {step}' if step is not None else ''}: {caption}",
                        [f"layer{layer}", f"step{step}" if step is not None else ""], layer=layer, step=step)
    if applies["image-overlay"]:
        query_label = labels_of(site, "query")[0]
        for layer in layers:
            add("image-overlay", f"layer {layer}: query {query_label} over the image, mean over heads",
                [f"layer{layer}", "query", query_label], layer=layer)
            add("image-grid", f"layer {layer}: query {query_label}, every head", ["heads", f"layer{layer}"], layer=layer, over="head")
        add("image-grid", f"query {query_label}, every layer, mean over heads", ["layers"], over="layer")
    if applies["stats"]:
        add("stats", "max, mean and entropy per map, by layer", [], variable=main)
    if applies["top-pairs"]:
        add("top-pairs", f"layer {layers[0]}: top 10 query -> key pairs, mean over heads", [f"layer{layers[0]}"],
            layer=layers[0], step=step, variable=main)
    if applies["rollout"] and len(layers) > 1:
        add("rollout", "attention rollout over every layer", [], step=step)


def plan_report(source) -> list[ReportItem]:
    """Every plot the file's content supports, in the order the report shows them (nothing drawn).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer.report import plan_report
    >>> [item.stem for item in plan_report(attnformat.example_path("encoder-decoder"))][:2]
    ['flow-layer0', 'flow-layer1']
    """
    tree = open_source(source)
    plan = _Plan(tree)
    if catalog.PLOT_KINDS["flow"].applies(tree):
        for layer in _values(sites_of(tree)[0], "layer"):
            plan.add("encoder -> decoder", f"layer {layer}: encoder self, decoder self, cross", ["flow", f"layer{layer}"],
                     "flow", {"layer": layer})
    for site in sites_of(tree):
        _plan_site(plan, tree, site)
    return plan.items


# -- drawing one plot ---------------------------------------------------------------------------------


def save_png(drawn, path, *, dpi: float = REPORT_DPI) -> Path:
    """Save a figure as PNG, rasterising it once: what :func:`~attnformat.viewer.save_figure` writes.

    The crop follows :func:`~attnformat.viewer.output.save_options` (rcParams ``savefig.bbox``):
    the whole canvas, or with ``"tight"`` what is drawn plus ``savefig.pad_inches``, found in the
    pixels of the one rendering instead of by a second, trial draw. Opaque images are stored as RGB
    at zlib level :data:`PNG_COMPRESS_LEVEL` (:func:`_png_bytes`). What this cannot reproduce exactly (a transparent or
    overridden ``savefig`` background, an explicit crop box, a drawing that reaches the canvas edge
    under ``"tight"``) is saved by ``save_figure`` instead.

    Parameters
    ----------
    drawn : matplotlib.axes.Axes or matplotlib.figure.Figure
        What a plot function returned; its figure is not closed.
    path : str or os.PathLike
        Destination (``.png``).
    dpi : float, default REPORT_DPI
        Resolution.

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> import tempfile, pathlib, matplotlib.pyplot as plt
    >>> from PIL import Image
    >>> figure = plt.figure(figsize=(2, 1))
    >>> _ = figure.text(0.5, 0.5, "attention")
    >>> with Image.open(save_png(figure, pathlib.Path(tempfile.mkdtemp()) / "t.png", dpi=50)) as image:
    ...     image.size, image.mode
    ((100, 50), 'RGB')
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    figure = figure_of(drawn)
    bbox = save_options(dpi)["bbox_inches"]
    plain = (not matplotlib.rcParams["savefig.transparent"] and figure.patch.get_visible()
             and matplotlib.rcParams["savefig.facecolor"] == "auto" and matplotlib.rcParams["savefig.edgecolor"] == "auto"
             and isinstance(bbox, str) and bbox in ("tight", "standard") and not isinstance(dpi, str))
    if not plain:
        return save_figure(figure, path, dpi=dpi, close=False)
    figure.set_dpi(dpi)
    original = figure.canvas
    # Plain Agg (pyplot's non-interactive canvas, or none yet): drawn by a canvas whose renderer
    # keeps the texts it lays out (_text_renderer); an interactive Agg canvas is left as it is.
    if type(original) is FigureCanvasAgg or not isinstance(original, FigureCanvasAgg):
        renderer = _text_renderer()
        canvas = _canvas_class(renderer)(figure) if renderer is not None else FigureCanvasAgg(figure)
    else:
        canvas = original
    try:
        canvas.draw()
        pixels = np.asarray(canvas.buffer_rgba())
    finally:
        figure.set_canvas(original)  # the caller's figure keeps its own canvas
    if bbox == "tight":
        pixels = _drawn_part(pixels, figure, round(matplotlib.rcParams["savefig.pad_inches"] * dpi))
        if pixels is None:
            return save_figure(figure, path, dpi=dpi, close=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(pixels, dpi, {"Software": f"Matplotlib version{matplotlib.__version__}, https://matplotlib.org/"},
                                alpha=pixels[..., 3].min() < 255))
    return path


#: Entries kept by each of the text caches of :func:`_text_renderer` (emptied when full).
_TEXT_CACHE_ENTRIES = 200_000
#: The renderer class of :func:`_text_renderer`, once built and checked (None: not usable here).
_TEXT_RENDERER = {}


@functools.cache
def _canvas_class(renderer_class):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    class _Canvas(FigureCanvasAgg):
        """Matplotlib's Agg canvas, drawing with ``renderer_class``."""

        def get_renderer(self):
            width, height = self.get_width_height(physical=True)
            key = width, height, self.figure.dpi
            if getattr(self, "_renderer_key", None) != key:
                self.renderer = renderer_class(width, height, self.figure.dpi)
                self._renderer_key = key
            return self.renderer

    return _Canvas


def _text_renderer():
    """A :class:`~matplotlib.backends.backend_agg.RendererAgg` that lays out and rasterises each
    text once per process, or None where it would not draw the same pixels as Matplotlib's.

    Why: a report draws the same token labels again and again, at the same places of figures of
    the same layout (six heatmaps, six head grids), and Matplotlib's Agg renderer starts afresh
    for each figure: it finds the font, shapes the string (about 0.6 ms for a short label,
    measured) and rasterises each glyph, for every text of every figure, and measures each text
    again for every new renderer. Text was about a third of the CPU time of a head grid. Here
    the shaped glyphs are kept per (font, size, dpi, string, hinting, features, language), each
    glyph's FreeType bitmap per (font, size, dpi, glyph, rotation, position in 1/64 pixel, hinting,
    antialiasing) and the text extents per (font, size, dpi, string, hinting): everything those
    results depend on, so a cached result is the one FreeType would give again. The bitmaps are
    still blended onto the canvas one by one, by Agg, as Matplotlib does.

    The class mirrors Matplotlib's own ``draw_text`` (FreeType private calls that may change
    between releases), so it is checked once per process against ``RendererAgg`` on sample texts
    (rotated and not, at fractional positions); if anything differs, or the calls are missing,
    None is returned and the report draws with Matplotlib's renderer.
    """
    if "class" not in _TEXT_RENDERER:
        try:
            renderer_class = _text_renderer_class()
            _TEXT_RENDERER["class"] = renderer_class if _draws_like_agg(renderer_class) else None
        except Exception:  # noqa: BLE001 - any difference in Matplotlib's internals: draw as Matplotlib does
            _TEXT_RENDERER["class"] = None
    return _TEXT_RENDERER["class"]


def _text_renderer_class():
    from matplotlib.backends.backend_agg import RendererAgg, get_hinting_flag
    from matplotlib.font_manager import fontManager, get_font
    from matplotlib.ft2font import RenderMode

    layouts, glyphs, extents = {}, {}, {}

    def font_of(prop):
        # The font object itself is part of every key (held, so its id is never reused): it
        # stands for the files, rcParams and thread that Matplotlib's own lookup resolved.
        return get_font(fontManager._find_fonts_by_props(prop))

    def remember(cache, key, value):
        if len(cache) >= _TEXT_CACHE_ENTRIES:
            cache.clear()
        cache[key] = value
        return value

    class _TextRenderer(RendererAgg):
        def get_text_width_height_descent(self, s, prop, ismath):
            if ismath:
                return super().get_text_width_height_descent(s, prop, ismath)
            font, size, flags = font_of(prop), prop.get_size_in_points(), get_hinting_flag()
            key = (font, size, self.dpi, s, flags)
            found = extents.get(key)
            if found is None:
                font.clear()
                font.set_size(size, self.dpi)
                font.set_text(s, 0.0, flags=flags)
                width, height = font.get_width_height()
                found = remember(extents, key, (width / 64.0, height / 64.0, font.get_descent() / 64.0))
            return found

        def draw_text(self, gc, x, y, s, prop, angle, ismath=False, mtext=None):
            if ismath:
                return super().draw_text(gc, x, y, s, prop, angle, ismath=ismath, mtext=mtext)
            features = mtext.get_fontfeatures() if mtext is not None else None
            language = mtext.get_language() if mtext is not None else None
            font, size, flags = font_of(prop), prop.get_size_in_points(), get_hinting_flag()
            key = (font, size, self.dpi, s, flags, tuple(features) if features is not None else None,
                   language if isinstance(language, (str, type(None))) else tuple(map(tuple, language)))
            items = layouts.get(key)
            if items is None:
                font.clear()
                font.set_size(size, self.dpi)
                items = remember(layouts, key, [(item.ft_object, item.glyph_index, item.x, item.y) for item in
                                                font._layout(s, flags=flags, features=features, language=language)])
            cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            matrix = (0x10000 * np.array([[cos, -sin], [sin, cos]])).round().astype(int)  # Matplotlib's, at extend 1, slant 0
            rotation = tuple(matrix.ravel().tolist())
            antialiased = bool(gc.get_antialiased())
            height = int(self.height)
            for ft_object, glyph_index, dx, dy in items:  # dy is upwards
                position = (round(0x40 * (x + dx * cos - dy * sin)), round(0x40 * (self.height - y + dx * sin + dy * cos)))
                key = (ft_object, size, self.dpi, glyph_index, rotation, position, flags, antialiased)
                found = glyphs.get(key)
                if found is None:
                    ft_object.set_size(size, self.dpi)
                    ft_object._set_transform(matrix, list(position))
                    bitmap = ft_object._render_glyph(glyph_index, flags, RenderMode.NORMAL if antialiased else RenderMode.MONO)
                    buffer = bitmap.buffer
                    if not antialiased:
                        buffer *= 0xff
                    found = remember(glyphs, key, (buffer, bitmap.left, bitmap.top))
                buffer, left, top = found
                self._renderer.draw_text_image(buffer, left, height - top + buffer.shape[0], 0, gc)

    return _TextRenderer


def _draws_like_agg(renderer_class) -> bool:
    """Whether ``renderer_class`` draws and measures sample texts exactly as ``RendererAgg`` does."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    samples = [("[CLS] attention", 0.0, 3.3, 20.7), ("##ing tokens", 90.0, 40.45, 70.1), ("Ag|query", 0.0, 5.61, 45.9),
               ("head 3", 33.0, 60.2, 30.25)]
    results = []
    for cls in (RendererAgg, renderer_class):
        renderer = cls(100, 90, 90)
        pixels = []
        for _ in range(2):  # twice: the second time from the caches
            gc = renderer.new_gc()
            renderer.clear()
            for text, angle, x, y in samples:
                prop = FontProperties(size=7.0)
                renderer.draw_text(gc, x, y, text, prop, angle)
                pixels.append(renderer.get_text_width_height_descent(text, prop, False))
            pixels.append(np.asarray(renderer.buffer_rgba()).copy())
            gc.restore()
        results.append(pixels)
    return all(np.array_equal(a, b) for a, b in zip(*results)) and results[1][-1].any()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bytes(rgba: np.ndarray, dpi: float, text: dict, *, alpha: bool = True) -> bytes:
    """An 8-bit PNG file of ``rgba`` (``(height, width, 4)`` bytes, rows of any stride): RGBA, or
    RGB without the alpha channel when ``alpha`` is False.

    Why not Pillow: its encoder tries every PNG filter on every row and keeps the best, which
    costs more than the compression itself (about 0.09 s for a 20 x 16 inch grid at 90 dpi,
    measured; 0.07 s even at zlib level 0). Rows of a map figure mostly repeat the row above (a
    map cell spans several pixel rows; margins are blank), so the "Up" filter alone makes most of
    each row zero: the file is as small as Pillow's in about half the time (measured). The RGB
    bytes are copied out of the RGBA rendering once, as 3-byte items (a byte-wise copy of an
    ``[..., :3]`` view takes twice as long, measured), and filtered in place by one numpy
    subtraction (modulo 256, as PNG defines it). The pixels decode exactly as given: PNG is
    lossless whichever filter is used.

    Examples
    --------
    >>> import io
    >>> from PIL import Image
    >>> rgba = np.arange(32, dtype=np.uint8).reshape(2, 4, 4)
    >>> with Image.open(io.BytesIO(_png_bytes(rgba, 72, {"Software": "test"}, alpha=False))) as image:
    ...     np.array_equal(np.asarray(image), rgba[..., :3]), image.mode, round(image.info["dpi"][0]), image.info["Software"]
    (True, 'RGB', 72, 'test')
    >>> with Image.open(io.BytesIO(_png_bytes(rgba, 72, {}))) as image:
    ...     np.array_equal(np.asarray(image), rgba), image.mode
    (True, 'RGBA')
    """
    height, width, _ = rgba.shape
    channels = 4 if alpha else 3
    row = 1 + width * channels  # each row starts with its filter type
    filtered = np.empty((height, row), dtype=np.uint8)
    body = np.ndarray((height, width * channels), dtype=np.uint8, buffer=filtered, offset=1, strides=(row, 1))
    if alpha:
        body.reshape(height, width, 4)[...] = rgba
    else:
        rgb = np.dtype({"names": ["rgb"], "formats": ["V3"], "offsets": [0], "itemsize": 4})
        items = np.ndarray((height, width), dtype="V3", buffer=filtered, offset=1, strides=(row, 3))
        items[...] = rgba.view(rgb)["rgb"][..., 0]  # the rendering's rows are contiguous RGBA: a view
    filtered[0, 0] = 0  # the first row has no row above it: stored as it is
    filtered[1:, 0] = _PNG_UP
    # Output and input overlap: numpy then reads from a copy, so each row is filtered against the original row above.
    np.subtract(body[1:], body[:-1], out=body[1:])  # uint8 arithmetic wraps modulo 256
    header = struct.pack(">IIBBBBB", width, height, 8, 6 if alpha else 2, 0, 0, 0)
    per_metre = int(dpi / 0.0254 + 0.5)  # what Pillow and Matplotlib store for the dpi
    chunks = [_png_chunk(b"IHDR", header)]
    chunks += [_png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")) for key, value in text.items()]
    chunks += [_png_chunk(b"pHYs", struct.pack(">IIB", per_metre, per_metre, 1)),
               _png_chunk(b"IDAT", zlib.compress(filtered, PNG_COMPRESS_LEVEL)), _png_chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def _drawn_part(pixels: np.ndarray, figure, pad: int) -> np.ndarray | None:
    """The drawn part of a rendering with ``pad`` pixels of background around it; None when the
    drawing may go on past the canvas (it touches an edge) or the background is not the face colour."""
    background = pixels[0, 0]
    expected = np.round(np.asarray(matplotlib.colors.to_rgba(figure.get_facecolor())) * 255)
    if background[3] != 255 or np.abs(background.astype(float) - expected).max() > 1:
        return None
    # One 32-bit comparison per pixel instead of four byte comparisons and a reduction over them:
    # about a twentieth of the time (0.3 s on a 20 x 16 inch grid at 90 dpi, measured).
    packed = np.ascontiguousarray(pixels).view(np.uint32)[..., 0]
    drawn = packed != packed[0, 0]
    rows, cols = np.flatnonzero(drawn.any(axis=1)), np.flatnonzero(drawn.any(axis=0))
    height, width = drawn.shape
    if not rows.size or rows[0] == 0 or cols[0] == 0 or rows[-1] == height - 1 or cols[-1] == width - 1:
        return None
    top, bottom, left, right = rows[0] - pad, rows[-1] + 1 + pad, cols[0] - pad, cols[-1] + 1 + pad
    if top >= 0 and left >= 0 and bottom <= height and right <= width:
        return pixels[top:bottom, left:right]  # a view: the PNG encoder reads it in place
    out = np.empty((bottom - top, right - left, 4), dtype=pixels.dtype)
    out[...] = background  # where the pad reaches past the canvas, as savefig pads it
    inside = pixels[max(top, 0):min(bottom, height), max(left, 0):min(right, width)]
    out[max(-top, 0):max(-top, 0) + inside.shape[0], max(-left, 0):max(-left, 0) + inside.shape[1]] = inside
    return out


def _draw_and_save(tree, kind: str, options: dict, path: Path, dpi: float) -> str:
    """Draw one plot and save it; returns the file name.

    Kinds that can draw their panels on one canvas (``compact``, the grids of maps) do so here:
    the same figure for a file in about a third of the time (see :func:`attnformat.viewer.head_grid`).
    """
    if "compact" in catalog.PLOT_KINDS[kind].parameters and "compact" not in options:
        options = {**options, "compact": True}
    drawn = catalog.plot(tree, kind, **options)
    try:
        return save_png(drawn, path, dpi=dpi).name
    finally:
        close_figure(drawn)


def _outcome(draw: Callable, tree, kind: str, options: dict, path: Path, dpi: float) -> tuple[str, str]:
    """``(file name, "")`` for a saved plot, ``("", message)`` for one the file cannot give."""
    try:
        return draw(tree, kind, options, path, dpi), ""
    except AttnFormatError as error:  # noted in the report; the other plots still get drawn
        return "", str(error)


# -- drawing every plot, on several processes -----------------------------------------------------------


def default_workers() -> int:
    """How many processes draw a report by default: the CPUs this process may run on.

    Examples
    --------
    >>> default_workers() >= 1
    True
    """
    if hasattr(os, "process_cpu_count"):  # Python 3.13+
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):  # CPUs this process may use (containers, taskset)
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _preloaded(tree, budget: int = PRELOAD_BYTES):
    """``tree`` with every site that fits in ``budget`` (in all) read into memory, in place."""
    left = budget
    for site in sites_of(tree):
        size = site.dataset.nbytes
        if size <= left:
            site.load()
            left -= size
    return tree


#: The tree a drawing process draws from (set once per process by :func:`_start_worker`).
_WORKER_TREE = {}


def _start_worker(location: Location, style: dict) -> None:
    # Ctrl-C reaches the whole process group: the report's own process stops the helpers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    matplotlib.use("Agg", force=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        matplotlib.rcParams.update(style)  # drawn in the caller's style, as by the caller's process
    # The file is opened again here, never sent as a tree: an opened store may hold file
    # descriptors that mean nothing in another process. The caller's process validates it.
    from attnformat.reading import open as open_tree

    try:
        _WORKER_TREE["tree"] = _preloaded(open_tree(location))
    except AttnFormatError as error:  # the caller's process reports it, once
        _WORKER_TREE["error"] = str(error)


def _worker_ready() -> bool:
    return "tree" in _WORKER_TREE


def _draw_in_worker(draw: Callable, kind: str, options: dict, path: str, dpi: float) -> tuple[str, str]:
    if "tree" not in _WORKER_TREE:
        return "", _WORKER_TREE["error"]
    return _outcome(draw, _WORKER_TREE["tree"], kind, options, Path(path), dpi)


#: What every drawing process needs before its first plot, imported once by the fork server.
#: ``attnformat.engines.zarr`` opens the file in each helper (it is imported on first open).
_PRELOAD = ("numpy", "matplotlib", "matplotlib.pyplot", "matplotlib.backends.backend_agg", "PIL.Image",
            "PIL.PngImagePlugin", "xarray", "zarr", "attnformat.reading", "attnformat.engines.zarr",
            "attnformat.viewer.report", "matplotlib.textpath", "attnformat.viewer.display")


def _preload_modules() -> list[str]:
    """:data:`_PRELOAD`, ``dask.array`` where installed, the module of every plot kind (the
    catalog imports them on first use), and last :mod:`attnformat.viewer._report_warmup`, which
    draws one small figure in the fork server (:func:`_warm_up`).

    Why ``dask.array``: xarray imports it (when installed) the first time it builds a variable,
    to recognise dask arrays, so each helper opening the file spent about a second of CPU (with
    SciPy's FFT modules, measured) importing it before its first plot.
    """
    kinds = {f"attnformat.viewer.{entry.target.partition(':')[0]}" for entry in catalog.PLOT_KINDS.values()
             if isinstance(entry.target, str)}
    optional = [name for name in ("dask.array",) if importlib.util.find_spec(name.partition(".")[0]) is not None]
    return [*_PRELOAD, *optional, *sorted(kinds), "attnformat.viewer._report_warmup"]


def _warm_up() -> None:
    """Draw a small grid of maps with a colorbar, unseen, and encode it as the report does.

    Run once by the fork server (importing :mod:`attnformat.viewer._report_warmup`), so that each
    helper it forks starts with what Matplotlib loads on a process's first figure (the font file,
    font and colormap lookups, the text renderer's check of :func:`_text_renderer`, the labels
    used on every map) instead of loading it again: a helper's first head grid took about 0.27 s
    more CPU than its next ones (measured on MiniLM-shaped files), and a small figure drawn in the
    server made a fresh helper's first figure about 0.1 s cheaper (measured).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from attnformat.viewer.colors import labelled_colorbar
    from attnformat.viewer.output import MapPanel, compact_panels, layout_maps

    labels = ("[CLS]", "query", "key", "the", "[SEP]")
    panels = [MapPanel(5, 5, labels, labels, title=f"head {head}") for head in range(2)]
    layout = layout_maps(panels, ncols=2)
    figure = Figure(figsize=layout.figsize, dpi=REPORT_DPI)
    values = np.eye(5)
    canvas, mappable = compact_panels(figure, layout, panels, [(values, labels, labels, "key", "query")] * 2, count=2,
                                      steps=lambda values: (1, 1), cmap="viridis", norm=Normalize(0.0, 1.0))
    labelled_colorbar(mappable, ax=canvas, label="weights (softmax)", values=values,
                      cax=figure.add_axes(layout.colorbar_rect(2)))
    renderer = _text_renderer()
    drawing = (_canvas_class(renderer) if renderer is not None else FigureCanvasAgg)(figure)
    drawing.draw()
    _png_bytes(np.asarray(drawing.buffer_rgba()), REPORT_DPI, {}, alpha=False)


try:  # where processes can receive file descriptors (Linux, macOS): forkserver
    from multiprocessing import forkserver as _forkserver
    from multiprocessing import popen_forkserver as _popen_forkserver
    from multiprocessing import process as _process
    from multiprocessing import spawn as _spawn
    from multiprocessing import util as _util
    from multiprocessing.context import ForkServerContext as _ForkServerContext
    from multiprocessing.context import reduction as _reduction
    from multiprocessing.context import set_spawning_popen as _set_spawning_popen
except ImportError:  # Windows: helpers are spawned
    _popen_forkserver = None

if _popen_forkserver is not None:
    #: The report's own fork server (see :func:`_forkserver_context`); started on first use.
    _SERVER = _forkserver.ForkServer()

    class _Popen(_popen_forkserver.Popen):
        """The standard library's forkserver Popen, asking the report's server instead of the
        interpreter's shared one."""

        def _launch(self, process_obj):
            prep_data = _spawn.get_preparation_data(process_obj._name)
            buf = io.BytesIO()
            _set_spawning_popen(self)
            try:
                _reduction.dump(prep_data, buf)
                _reduction.dump(process_obj, buf)
            finally:
                _set_spawning_popen(None)
            self.sentinel, w = _SERVER.connect_to_new_process(self._fds)
            parent_w = os.dup(w)  # the child watches this pipe to see its parent go
            self.finalizer = _util.Finalize(self, _util.close_fds, (parent_w, self.sentinel))
            with open(w, "wb", closefd=True) as stream:
                stream.write(buf.getbuffer())
            self.pid = _forkserver.read_signed(self.sentinel)

    class _Process(_process.BaseProcess):
        _start_method = "forkserver"

        @staticmethod
        def _Popen(process_obj):
            return _Popen(process_obj)

    class _Context(_ForkServerContext):
        Process = _Process


def _forkserver_context():
    """A ``forkserver`` context of the report's own, or None where there is none (Windows).

    Its server is private to this module: the standard library keeps one server and one preload
    list per interpreter, and setting that list (or starting that server first) would change the
    caller's own ``forkserver`` processes. Ours is started on first use, single-threaded, before
    any thread of ours, imports :func:`_preload_modules` once, and forks one helper per request:
    each helper starts with every module a plot needs already imported, instead of importing
    them again as a ``spawn``ed helper does (seconds of CPU each, measured). It lives as long as
    this process, so later reports start their helpers at once. A helper still imports the
    caller's ``__main__`` again (as under ``spawn``), which is why the guard is needed.
    """
    if _popen_forkserver is None:
        return None
    _SERVER.set_forkserver_preload(_preload_modules())  # read when the server starts, once
    return _Context()


def _pool(helpers: int, location: Location) -> ProcessPoolExecutor:
    style = {key: value for key, value in matplotlib.rcParams.items() if key not in ("backend", "interactive")}
    mp_context = _forkserver_context() or multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=helpers, mp_context=mp_context,
                               initializer=_start_worker, initargs=(location, style))


#: Plot kinds that draw a grid of maps: several times the work of one map (a 12-head grid takes
#: about three times as long as one heatmap, measured).
_GRID_KINDS = frozenset({"head-grid", "layer-comparison", "step-comparison", "image-grid", "flow"})
#: Plot kinds drawn from the per-map statistics that the report computes for its summary.
_REUSING_KINDS = frozenset({"stats"})


def _drawing_order(items) -> list[int]:
    """The order to draw ``items`` in (indices), so that the processes finish together.

    Helpers take items from the front of this order and the report's own process from the back;
    whoever finds nothing left waits for the others' last items. So the grids of maps (the long
    items) go to both ends and single plots to the middle: the last items drawn are short ones,
    instead of a process waiting seconds for another's last two 12-head grids (measured: 5.6 s of
    a 31 s report on two processes in the order of the page). The box plots (:data:`_REUSING_KINDS`)
    go last of all: the report's own process takes them first, right after computing the summary's
    statistics, and draws them from those (:func:`~attnformat.viewer.statistics.reusing_statistics`)
    instead of a helper computing every map's statistics again. Items of one weight keep the
    page's order. The files written do not depend on the order.

    Parameters
    ----------
    items : list of ReportItem
        The planned plots (:func:`plan_report`).

    Returns
    -------
    list of int

    Examples
    --------
    >>> items = [ReportItem("s", "", f"p{i}", kind, {}) for i, kind in enumerate(["heatmap", "head-grid", "stats", "head-grid"])]
    >>> _drawing_order(items)
    [1, 0, 3, 2]
    """
    long = [index for index, item in enumerate(items) if item.kind in _GRID_KINDS]
    short = [index for index, item in enumerate(items) if item.kind not in _GRID_KINDS | _REUSING_KINDS]
    reusing = [index for index, item in enumerate(items) if item.kind in _REUSING_KINDS]
    front, back = long[0::2], long[1::2]
    return front + short + back[::-1] + reusing[::-1]


class _Drawing:
    """Every item drawn once: by this process and ``workers - 1`` helper processes.

    A dispatching thread feeds the helpers from the front of the list, a few items ahead; this
    process draws from the back, so it draws while the helpers start and nothing is drawn twice
    (items are handed out, never cancelled: Python 3.11's pool hangs when a cancelled item meets a
    broken pool). Failures:

    * an :class:`AttnFormatError` in a plot: noted on the item, the others still draw;
    * any other exception: raised here, once the helpers have stopped;
    * a helper that dies while drawing (a crash, the OOM killer): the pool breaks; this process
      draws the items no helper had, and each item a helper had is drawn again alone in a fresh
      helper, so that the one that kills its helper again is noted as not drawn;
    * helpers that cannot start at all (a script without the ``if __name__ == "__main__":``
      guard, which each helper process runs again): a warning, and this process draws the rest.
    """

    def __init__(self, tree, items, out_dir: Path, dpi: float, bar, *, draw: Callable = _draw_and_save, steal: bool = True):
        # ``draw`` (a module-level function, so that helpers can import it) and ``steal`` (False:
        # this process only hands out items) let tests decide which process draws what.
        self.tree, self.items, self.dpi, self.bar, self.draw, self.steal = tree, items, dpi, bar, draw, steal
        self.paths = [out_dir / f"{item.stem}.png" for item in items]
        self.lock = threading.Lock()
        self.queue = collections.deque(_drawing_order(items))
        self.stop = threading.Event()
        self.broken: list[int] = []
        self.failure: BaseException | None = None

    def finish(self, index: int, outcome: tuple[str, str]) -> None:
        self.items[index].file, self.items[index].error = outcome
        with self.lock:  # the dispatching thread finishes items too
            self.bar.update(1)

    def here(self, index: int) -> None:
        item = self.items[index]
        self.finish(index, _outcome(self.draw, self.tree, item.kind, item.options, self.paths[index], self.dpi))

    def submit(self, pool, index: int):
        item = self.items[index]
        return pool.submit(_draw_in_worker, self.draw, item.kind, item.options, str(self.paths[index]), self.dpi)

    def run(self, pool: ProcessPoolExecutor | None, helpers: int, location: Location | None,
            meanwhile: Callable[[], None]) -> None:
        """Draw every item, with ``helpers`` processes of ``pool`` when there is one; ``meanwhile``
        runs in this process while they draw. The pool is shut down on return."""
        if pool is None:
            meanwhile()
            while self.queue:
                self.here(self.queue.popleft())
            return
        dispatcher = threading.Thread(target=self.dispatch, args=(pool, helpers), name="attnformat-report", daemon=True)
        try:
            dispatcher.start()
            meanwhile()
            while self.steal and not self.stop.is_set():
                try:
                    index = self.queue.pop()
                except IndexError:
                    break
                self.here(index)
        except BaseException:
            self.stop.set()  # hand out nothing more; the helpers finish what they have
            raise
        finally:
            dispatcher.join()
            pool.shutdown(wait=True)  # nothing is pending: no cancelling (3.11 hangs on a cancelled item in a broken pool)
        if self.failure is not None:
            raise self.failure
        while self.queue:  # left over when the pool broke and this process stopped drawing first
            self.here(self.queue.pop())
        if self.broken:
            self.isolate(sorted(self.broken), location)

    def dispatch(self, pool, helpers: int) -> None:
        """Keep each helper one item ahead; stop handing out items once anything fails."""
        running = set()
        index_of = {}
        try:
            while True:
                while not self.stop.is_set() and len(running) < 2 * helpers:
                    try:
                        index = self.queue.popleft()
                    except IndexError:
                        break
                    try:
                        future = self.submit(pool, index)
                    except BrokenProcessPool:  # a helper died before this item was handed out
                        # Drawn alone in a fresh helper by isolate(), which also says so when
                        # helpers cannot start at all (they die importing an unguarded script).
                        self.broken.append(index)
                        self.stop.set()
                        break
                    running.add(future)
                    index_of[future] = index
                if not running:
                    return
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    error = future.exception()
                    if isinstance(error, BrokenProcessPool):
                        self.broken.append(index_of[future])
                        self.stop.set()
                    elif error is not None:
                        self.failure = self.failure or error
                        self.stop.set()
                    else:
                        self.finish(index_of[future], future.result())
        except BaseException as error:  # noqa: BLE001 - raised again by run(), in the caller's thread
            self.failure = self.failure or error
            self.stop.set()

    def isolate(self, indices, location: Location) -> None:
        """Draw each item alone in a helper, so that a helper's death names the plot that caused it."""
        pool = _pool(1, location)
        try:
            error = pool.submit(_worker_ready).exception()
            if error is not None:
                warnings.warn(f"drawing the rest of the report in this process: helper processes cannot start ({error})",
                              RuntimeWarning, stacklevel=4)
                for index in indices:
                    self.here(index)
                return
            for index in indices:
                try:
                    self.finish(index, self.submit(pool, index).result())
                except BrokenProcessPool as error:
                    self.finish(index, ("", f"the process drawing this plot stopped ({error})"))
                    pool.shutdown(wait=True)
                    pool = _pool(1, location)
        finally:
            pool.shutdown(wait=True)


def _top_pairs_rows(tree) -> dict:
    rows = {}
    for site in sites_of(tree):
        if "weights" in site.data_vars and site.attrs.get("layout") == "dense":
            try:
                rows[site_name(site)] = top_pairs(site, k=5)
            except AttnFormatError:
                continue
    return rows


def findings(summary: dict, quote: Callable[[str], str] = str) -> list[str]:
    """Short observations per site from the statistics: the most focused and most spread heads,
    the strongest sink, and the local/global ratio with what "local" meant there (seed 003's
    report lists such findings).

    Parameters
    ----------
    summary : dict
        The result of :func:`~attnformat.viewer.statistics_summary`.
    quote : callable, default str
        Applied to the texts that come from the file (site names, the locality description), e.g.
        :func:`attnformat.text.for_markdown` for a markdown page.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import statistics_summary
    >>> findings(statistics_summary(attnformat.example_path("frames")))[0].startswith("blocks: most focused head")
    True
    """
    lines = []
    for name, entries in summary["sites"].items():
        site = quote(name)
        heads = [(entry["layer"], head) for entry in entries for head in entry.get("heads", [])]
        measured = [(layer, head) for layer, head in heads if head["entropy"] is not None]
        if measured:
            focused = min(measured, key=lambda pair: pair[1]["entropy"])
            spread = max(measured, key=lambda pair: pair[1]["entropy"])
            lines.append(f"{site}: most focused head is layer {focused[0]} head {focused[1]['head']} "
                         f"(entropy {focused[1]['entropy']:.3f}), most spread layer {spread[0]} head {spread[1]['head']} "
                         f"(entropy {spread[1]['entropy']:.3f})")
        sinks = [(layer, head) for layer, head in heads if head["sink_score"] is not None]
        if sinks:
            layer, head = max(sinks, key=lambda pair: pair[1]["sink_score"])
            lines.append(f"{site}: strongest attention sink on the first key is layer {layer} head {head['head']} "
                         f"(sink score {head['sink_score']:.3f})")
        ratios = [entry["local_global_ratio"] for entry in entries if entry.get("local_global_ratio") is not None]
        if ratios:
            # What "local" meant (a distance threshold, patch adjacency, a token window) changes what
            # the ratio says; statistics_summary states it per site.
            meaning = ((summary.get("locality") or {}).get(name) or entries[0].get("locality") or {}).get("description")
            lines.append(f"{site}: local/global attention ratio per layer from {min(ratios):.2f} to {max(ratios):.2f}"
                         + (f" (local: {quote(meaning)})" if meaning else ""))
    return lines


def _write_markdown(path: Path, source: str, tree, items, summary, pairs) -> None:
    # Everything from the file goes through for_markdown (or into a code span or block that it
    # cannot close), so that no label, name or description becomes a heading, link, image or tag.
    title = os.path.basename(source.rstrip("/")) or source
    lines = [f"# Attention report: {for_markdown(title)}", "", f"- source: {markdown_code(source)}"]
    for key in ("model_name", "model_framework", "description"):
        if key in tree.root.attrs:
            lines.append(f"- {key}: {for_markdown(tree.root.attrs[key])}")
    drawn = [i for i in items if i.file]
    lines += [f"- plots: {len(drawn)}" + (f" ({len(items) - len(drawn)} not drawn)" if len(drawn) < len(items) else ""), "",
              "## Statistics per site and layer", "", markdown_fence(format_summary(summary)), ""]
    observed = findings(summary, quote=for_markdown)
    if observed:
        lines += ["## Findings", ""] + [f"- {line}" for line in observed] + [""]
    for site, rows in pairs.items():
        lines += [f"## Top query -> key pairs: {for_markdown(site)} (first layer, mean over heads)", "",
                  "| query | key | weight |", "|---|---|---|"]
        lines += [f"| {for_markdown(r['query_label'])} | {for_markdown(r['key_label'])} | {r['value']:.4f} |" for r in rows]
        lines.append("")
    lines += ["## Plots", ""]
    for item in items:
        if item.file:  # file names are safe_file_name()s: [A-Za-z0-9._-] only
            lines.append(f"- **{for_markdown(item.section)}**: {for_markdown(item.caption)}: [{item.file}]({item.file})")
        else:
            lines.append(f"- **{for_markdown(item.section)}**: {for_markdown(item.caption)}: not drawn ({for_markdown(item.error)})")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _explorer_page(tree, out_dir: Path) -> tuple[str, str]:
    """``(file name, "")`` of the interactive explorer page written beside the report, ``("", reason)``
    when the file cannot give one, ``("", "")`` where :mod:`attnformat.viewer.explorer` is not installed."""
    try:
        from attnformat.viewer.explorer import write_page
    except ImportError:
        return "", ""
    try:
        return write_page(tree, out_dir / "explorer.html").name, ""
    except AttnFormatError as error:  # noted in the page; the plots are the report's main content
        return "", str(error)


def _write_html(path: Path, source: str, items, pairs, explorer: tuple[str, str] = ("", "")) -> None:
    escape = for_html
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>Attention report: {escape(source)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}figure{display:inline-block;margin:1em;"
             "vertical-align:top;max-width:680px}img{max-width:100%;border:1px solid #ddd}figcaption{font-size:90%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}</style></head><body>",
             f"<h1>Attention report</h1><p>Source: <code>{escape(source)}</code>. "
             "<a href=\"summary.md\">Summary (markdown)</a>, <a href=\"stats.json\">statistics (JSON)</a>.</p>"]
    page, reason = explorer
    if page:  # a safe name the report chose ("explorer.html")
        parts.append(f"<p><a href=\"{escape(page)}\">Interactive explorer (token view, matrix view, zoom; opens offline)</a></p>")
    elif reason:
        parts.append(f"<p>Interactive explorer not written: {escape(reason)}</p>")
    for site, rows in pairs.items():
        parts.append(f"<h3>Top pairs: {escape(site)}</h3><table><tr><th>query</th><th>key</th><th>weight</th></tr>")
        parts += [f"<tr><td>{escape(r['query_label'])}</td><td>{escape(r['key_label'])}</td><td>{r['value']:.4f}</td></tr>"
                  for r in rows]
        parts.append("</table>")
    section = None
    for item in items:
        if item.section != section:
            section = item.section
            parts.append(f"<h2>{escape(section)}</h2>")
        if item.file:
            parts.append(f"<figure><img src=\"{escape(item.file)}\" alt=\"{escape(item.caption)}\" "
                         f"loading=\"lazy\"><figcaption>{escape(item.caption)}</figcaption></figure>")
        else:
            parts.append(f"<p>Not drawn: {escape(item.caption)}: {escape(item.error)}</p>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def report(source, out_dir, *, progress: bool | None = None, dpi: float = REPORT_DPI, workers: int | None = None,
           storage_options=None, scheduler=None) -> Path:
    """Render every plot a file supports into ``out_dir`` with ``index.html``, ``summary.md`` and ``stats.json``,
    and the interactive explorer page ``explorer.html`` (:func:`attnformat.viewer.explorer.write_page`,
    linked from ``index.html``) where that module is installed.

    Plots are drawn by ``workers`` processes at once (this one included); the files written are
    the same for any number of workers. Helper processes are forked by a fork server of the
    report's own (started by the first report, kept for later ones; ``spawn`` where there is
    none), so, as with any :mod:`multiprocessing` code, a script that calls ``report`` must do so
    under ``if __name__ == "__main__":`` (each helper imports the script again); where helpers cannot
    start, a warning says so and this process draws every plot. A plot the file cannot give (an
    :class:`~attnformat.AttnFormatError`) is listed as not drawn with the reason; so is a plot
    whose drawing process dies (it is tried once more on its own first).

    Parameters
    ----------
    source : str, os.PathLike or xarray.DataTree
        Path, URL or tree. A tree is drawn by this process alone, as it is (it may hold changes
        that its file does not, or arrays that only this process can read): give the path to draw
        on several processes.
    out_dir : str or os.PathLike
        Directory to write into (created if needed).
    progress : bool, optional
        Show a progress bar (tqdm) on stderr: True always, False never, None (default) only when
        stderr is a terminal.
    dpi : float, default REPORT_DPI
        Resolution of the PNG files.
    workers : int, optional
        How many processes draw, this one included; 1 draws everything here. By default
        :func:`default_workers` (the CPUs this process may use), at most one per plot.
    storage_options : dict, optional
        fsspec options for a URL, as for :func:`attnformat.open`.
    scheduler : str or dask.distributed.Client, optional
        Where the statistics are computed, as for :func:`attnformat.viewer.statistics_summary`:
        threads (default), ``"processes"``, ``"synchronous"``, a dask.distributed Client or a
        scheduler address.

    Returns
    -------
    pathlib.Path
        The path of ``index.html``.

    Raises
    ------
    attnformat.AttnFormatError
        For a file that cannot be read or breaks the spec, or ``workers`` below 1.

    Examples
    --------
    >>> import attnformat, tempfile
    >>> from attnformat.viewer import report
    >>> report(attnformat.example_path("frames"), tempfile.mkdtemp(), progress=False, workers=1).name
    'index.html'
    """
    if workers is None:
        workers = default_workers()
    elif isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise AttnFormatError(f"report: workers must be a whole number of processes, 1 or more, not {workers!r}")
    # A tree the caller gave is drawn here, as it is (it may hold changes, or arrays tied to this
    # process); a file is opened again by each helper and read into memory where small.
    location = None if isinstance(source, xr.DataTree) else Location.of(source, storage_options)
    helpers = int(workers) - 1 if location is not None else 0
    pool = _pool(helpers, location) if helpers > 0 else None
    try:
        for _ in range(helpers):  # start them now: they open the file while this process validates
            try:
                pool.submit(_worker_ready)
            except BrokenProcessPool:  # one died at once: drawing finds the pool broken and says why
                break
        tree = open_source(source if location is None else location)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        items = plan_report(tree)
        computed = {}

        def statistics() -> None:  # once, while the helpers draw; findings, stats.json and summary.md share it
            if location is not None:
                _preloaded(tree)
            computed["summary"] = statistics_summary(tree, scheduler=scheduler, progress=False)  # the report's bar is shown
            computed["pairs"] = _top_pairs_rows(tree)
            computed["explorer"] = _explorer_page(tree, out_dir)

        with tqdm(total=len(items), desc="attnformat report", unit="plot",
                  disable=None if progress is None else not progress) as bar, reusing_statistics():
            _Drawing(tree, items, out_dir, dpi, bar).run(pool, helpers, location, statistics)
    finally:
        if pool is not None:  # on an error before drawing; helpers still starting exit by themselves
            pool.shutdown(wait=False)
    summary, pairs = computed["summary"], computed["pairs"]
    (out_dir / "stats.json").write_text(json.dumps(summary, indent=2, allow_nan=False), encoding="utf-8")
    name = source_of(tree)
    _write_markdown(out_dir / "summary.md", name, tree, items, summary, pairs)
    index = out_dir / "index.html"
    _write_html(index, name, items, pairs, computed["explorer"])
    return index


__all__ = ["ReportItem", "default_workers", "findings", "plan_report", "report", "safe_file_name", "save_png"]
