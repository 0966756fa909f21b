"""Figures and files: new Axes or grids of Axes sized to their labels, and saving to PNG, SVG or PDF.

Why figures size themselves here: a map with 29 token labels drawn in a default 6.4 x 4.8 inch
panel stacks the labels on top of each other. The size a map needs is plain arithmetic on what it
shows: one label pitch (:func:`label_pitch`) per row and column, room for the longest label on the
left and below, a line for each title, room for the colorbar. :func:`layout_maps` does that
arithmetic once, before anything is drawn (no trial draws: rendering speed matters for reports),
and says how many labels to skip when the figure would grow past :data:`MAX_FIGSIZE` or past a
``figsize`` the user gave (which always wins).
"""

from __future__ import annotations

import math
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.artist
import matplotlib.figure
import numpy as np

from attnformat.errors import AttnFormatError

#: Output formats by suffix.
FORMATS = ("png", "svg", "pdf")
#: Matplotlib settings for saved files. ``svg.fonttype: none`` keeps labels as ``<text>``
#: elements that stay editable in a vector editor (seed 004).
SAVE_RC = {"svg.fonttype": "none", "pdf.fonttype": 42}

#: Font size (points) of token tick labels on maps.
TICK_FONTSIZE = 7.0
#: Font size (points) of panel titles.
TITLE_FONTSIZE = 9.0
#: Font size (points) of figure titles (suptitles).
SUPTITLE_FONTSIZE = 11.0
#: Font size (points) of the legend that says what missing cells mean.
LEGEND_FONTSIZE = 8.0
#: Inches below the maps for that legend (two lines of it: the patch row and its padding).
LEGEND_BAND = (LEGEND_FONTSIZE * 2.6 + 8) / 72
#: Figures never size themselves past this (inches, width x height); past it, labels are thinned.
MAX_FIGSIZE = (20.0, 16.0)
#: One map panel never sizes itself past this many inches in either direction.
MAX_PANEL = 8.0
#: Nor below this (a 3-token map still gets a readable panel).
MIN_PANEL = 2.4
#: Height of one line of text, in font sizes (DejaVu Sans' ascent plus descent is 1.164).
LINE_HEIGHT = 1.2
#: Distance between neighbouring label centres, in font sizes: a line plus a small gap.
LABEL_PITCH = 1.3
#: Width of one character, in font sizes: above DejaVu Sans' average (0.52 for identifiers like
#: ``agentview_image_3``) so that sizes err on the roomy side; wide (CJK) characters count 1.0.
CHAR_WIDTH = 0.62
#: Constrained layout's padding around every Axes (inches; rcParams default 3 points a side).
_AXES_PAD = 2 * 3 / 72


def _pyplot():
    # Imported late so that importing the viewer never picks a GUI backend as a side effect.
    import matplotlib.pyplot as plt

    return plt


def font_points(size) -> float:
    """A Matplotlib font size (``"medium"``, ``11``) in points, relative to rcParams ``font.size``.

    Examples
    --------
    >>> font_points(9), font_points("medium") == matplotlib.rcParams["font.size"]
    (9.0, True)
    """
    from matplotlib.font_manager import FontProperties

    return float(FontProperties(size=size).get_size_in_points())


def text_width(text: str, fontsize: float) -> float:
    """Estimated width in inches of ``text`` set at ``fontsize`` points (arithmetic, no drawing).

    Errs on the wide side for Latin text; East Asian wide characters count one em.

    Examples
    --------
    >>> round(text_width("agentview_image_3", 7.0), 3)
    1.025
    """
    text = str(text)
    if text.isascii():
        return len(text) * CHAR_WIDTH * fontsize / 72
    ems = sum(1.0 if unicodedata.east_asian_width(c) in "WF" else CHAR_WIDTH for c in text)
    return ems * fontsize / 72


def longest_label(labels, fontsize: float = TICK_FONTSIZE) -> float:
    """Width in inches of the widest of ``labels`` (0 for none).

    Examples
    --------
    >>> round(longest_label(["a", "abc"], 72 / 0.62), 6)
    3.0
    """
    return max((text_width(label, fontsize) for label in labels), default=0.0)


def label_pitch(fontsize: float = TICK_FONTSIZE) -> float:
    """Inches between neighbouring tick labels so that they do not touch.

    Examples
    --------
    >>> round(label_pitch(7.0), 4)
    0.1264
    """
    return LABEL_PITCH * fontsize / 72


def tick_step(count: int, length: float, fontsize: float = TICK_FONTSIZE) -> int:
    """Show every ``tick_step``-th of ``count`` labels along ``length`` inches so that none overlap.

    Examples
    --------
    >>> tick_step(29, 4.0), tick_step(100, 4.0), tick_step(0, 1.0)
    (1, 4, 1)
    """
    if count <= 1 or length <= 0:
        return 1
    return max(1, math.ceil(count * label_pitch(fontsize) / length - 1e-9))


def thinned_label(name: str, step: int) -> str:
    """An axis label that says when only every ``step``-th tick label is shown (see :func:`tick_step`).

    Parameters
    ----------
    name : str
        The axis label (an empty one stays empty).
    step : int
        Every how many ticks a label is shown.

    Returns
    -------
    str

    Examples
    --------
    >>> thinned_label("query", 1), thinned_label("query", 3)
    ('query', 'query (every 3rd label)')
    """
    return name if step <= 1 or not name else f"{name} (every {ordinal(step)} label)"


def ordinal(number: int) -> str:
    """``2nd``, ``3rd``, ``11th``.

    Examples
    --------
    >>> [ordinal(n) for n in (1, 2, 3, 4, 11, 22)]
    ['1st', '2nd', '3rd', '4th', '11th', '22nd']
    """
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


@dataclass(frozen=True)
class MapPanel:
    """What one map panel shows, for sizing: its map shape and the tick labels drawn on each axis.

    ``query_labels``/``key_labels`` are the labels drawn on this panel (empty when the panel leaves
    them to a neighbour); ``ylabel``/``xlabel`` say whether it has an axis label.
    """

    rows: int
    cols: int
    query_labels: tuple = ()
    key_labels: tuple = ()
    ylabel: bool = True
    xlabel: bool = True
    title: str = ""


@dataclass(frozen=True)
class MapLayout:
    """The result of :func:`layout_maps`: the figure size and the size of every map panel (inches).

    Examples
    --------
    >>> layout = layout_maps([MapPanel(29, 29, tuple("x" * 29), tuple("y" * 29))])
    >>> layout.steps(29, 29)
    (1, 1)
    """

    figsize: tuple[float, float]
    panel: tuple[float, float]
    nrows: int
    ncols: int
    #: Inches left of the first column, below the last row and above the first row of panels
    #: (labels, titles, legend and padding), for placing a single panel without a layout engine.
    margins: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: Per grid column, the inches its query labels and y axis label take left of its panels.
    lefts: tuple = ()
    #: Per grid row, the inches its key labels and x axis label take below its panels.
    belows: tuple = ()
    #: Per grid row, the inches its panel titles take above its panels.
    aboves: tuple = ()
    #: Inches at the top taken by the figure title, and at the bottom by the legend.
    suptitle_band: float = 0.0
    legend_band: float = 0.0

    def panel_rect(self) -> tuple[float, float, float, float]:
        """``[left, bottom, width, height]`` in figure fractions of the first panel (single-panel figures)."""
        width, height = self.figsize
        left, bottom, _ = self.margins
        return (left / width, bottom / height, self.panel[0] / width, self.panel[1] / height)

    def panel_rects(self, count: int | None = None) -> list[tuple[float, float, float, float]]:
        """``[left, bottom, width, height]`` in figure fractions of every panel, in reading order.

        The same arithmetic that sized the figure places the panels: from the left, per grid
        column, its label band, half the Axes padding, the panel, half the padding; from the top,
        the figure title, then per grid row its title band, the panel and its label band. So every
        label lands in the room reserved for it, and no layout engine has to measure anything.

        Examples
        --------
        >>> layout = layout_maps([MapPanel(10, 10, ("abc",) * 10, ("abc",) * 10)] * 2, ncols=2)
        >>> first, second = layout.panel_rects()
        >>> first[1] == second[1] and first[0] + first[2] < second[0]
        True
        """
        width, height = self.figsize
        panel_w, panel_h = self.panel
        count = self.nrows * self.ncols if count is None else count
        lefts = self.lefts or (self.margins[0] - _AXES_PAD / 2 - 0.05,) + (0.0,) * (self.ncols - 1)
        aboves = self.aboves or (0.0,) * self.nrows
        belows = self.belows or (0.0,) * self.nrows
        xs, x = [], 0.05
        for column in range(self.ncols):
            x += lefts[column] + _AXES_PAD / 2
            xs.append(x)
            x += panel_w + _AXES_PAD / 2
        tops, y = [], height - 0.05 - self.suptitle_band
        for row in range(self.nrows):
            y -= aboves[row] + _AXES_PAD / 2
            tops.append(y)
            y -= panel_h + _AXES_PAD / 2 + belows[row]
        rects = []
        for index in range(count):
            row, column = divmod(index, self.ncols)
            rects.append((xs[column] / width, (tops[row] - panel_h) / height, panel_w / width, panel_h / height))
        return rects

    def colorbar_rect(self, count: int | None = None, shrink: float = 0.8) -> tuple[float, float, float, float]:
        """``[left, bottom, width, height]`` in figure fractions of a colorbar right of all panels.

        It starts 0.2 inch right of the rightmost panel, spans ``shrink`` of the panels' height
        (centred on it), and is as thick as the colorbar band of :func:`layout_maps` allows.

        Examples
        --------
        >>> layout = layout_maps([MapPanel(10, 10)] * 2, ncols=2)
        >>> layout.colorbar_rect()[0] > layout.panel_rects()[1][0] + layout.panel_rects()[1][2]
        True
        """
        rects = self.panel_rects(count)
        right = max(left + w for left, _, w, _ in rects)
        top = max(bottom + h for _, bottom, _, h in rects)
        bottom = min(b for _, b, _, _ in rects)
        width, height = self.figsize
        thick = min(max(self.panel[1] / 20, 0.12), 0.22) / width
        span = (top - bottom) * shrink
        return (right + 0.2 / width, bottom + (top - bottom - span) / 2, thick, span)

    def steps(self, rows: int, cols: int, fontsize: float = TICK_FONTSIZE) -> tuple[int, int]:
        """``(query step, key step)``: every how many labels fit a panel of this layout."""
        return tick_step(rows, self.panel[1], fontsize), tick_step(cols, self.panel[0], fontsize)


def _label_band(labels, axis_label: bool) -> float:
    """Inches taken beside a map by tick labels, ticks and an axis label."""
    band = 0.0
    if len(labels):
        ticks = (matplotlib.rcParams["xtick.major.size"] + matplotlib.rcParams["xtick.major.pad"]) / 72
        band += longest_label(labels) + ticks
    if axis_label:
        band += (font_points(matplotlib.rcParams["axes.labelsize"]) * LINE_HEIGHT + matplotlib.rcParams["axes.labelpad"]) / 72
    return band


def _colorbar_band(height: float) -> float:
    """Inches right of the maps taken by a shared colorbar: pad, bar, tick labels, label."""
    tick_points = font_points(matplotlib.rcParams["ytick.labelsize"])
    label_points = font_points(matplotlib.rcParams["axes.labelsize"])
    return 0.3 + height / 20 + 0.1 + 7 * CHAR_WIDTH * tick_points / 72 + (label_points * LINE_HEIGHT + 6) / 72


def layout_maps(panels, *, ncols: int = 4, figsize=None, colorbar: bool = True, suptitle: str = "",
                legend: bool | str = False) -> MapLayout:
    """Size a figure of map panels (rows of ``ncols``) so that no tick label overlaps another.

    Each panel gets one :func:`label_pitch` per map row and column (at least :data:`MIN_PANEL`,
    at most :data:`MAX_PANEL` inches); each grid column gets room for the widest query labels drawn
    in it, each grid row for the longest key labels (drawn rotated) and its panels' titles; then a
    colorbar and a figure title. When that passes :data:`MAX_FIGSIZE`, panels shrink to fit and
    :meth:`MapLayout.steps` says how many labels to skip. A given ``figsize`` is used as it is and
    panels get what is left of it.

    Parameters
    ----------
    panels : list of MapPanel
        The panels in reading order.
    ncols : int
        Panels per row.
    figsize : (float, float), optional
        The user's figure size, used as given.
    colorbar : bool
        Leave room right of the panels for one shared colorbar.
    suptitle : str
        The figure title, if any (the figure is at least as wide as it).
    legend : bool or str
        Leave a line below the panels for a legend (the "not captured" patch); given its text, the
        figure is also at least as wide as the legend.

    Examples
    --------
    >>> labels = tuple(f"agentview_image_{i}" for i in range(29))
    >>> layout = layout_maps([MapPanel(29, 29, labels, labels)] * 3, ncols=3)
    >>> layout.steps(29, 29), layout.figsize[0] < MAX_FIGSIZE[0]
    ((1, 1), True)
    >>> layout_maps([MapPanel(100, 100, labels, labels)], figsize=(5, 4)).figsize
    (5.0, 4.0)
    """
    panels = list(panels)
    count = max(1, len(panels))
    ncols = max(1, min(int(ncols), count))
    nrows = math.ceil(count / ncols)
    pitch = label_pitch()
    rows = max((p.rows for p in panels), default=1)
    cols = max((p.cols for p in panels), default=1)
    # A panel is at least as wide as its title (centred over it), so titles never run into neighbours.
    title_w = max((text_width(line, TITLE_FONTSIZE) + 0.1 for p in panels for line in p.title.split("\n") if line),
                  default=0.0)
    want_w = min(MAX_PANEL, max(MIN_PANEL, cols * pitch, title_w))
    want_h = min(MAX_PANEL, max(MIN_PANEL, rows * pitch))

    left = [0.0] * ncols  # per grid column: query labels and the y axis label
    below = [0.0] * nrows  # per grid row: key labels and the x axis label
    above = [0.0] * nrows  # per grid row: panel titles
    for index, panel in enumerate(panels):
        row, column = divmod(index, ncols)
        left[column] = max(left[column], _label_band(panel.query_labels, panel.ylabel))
        below[row] = max(below[row], _label_band(panel.key_labels, panel.xlabel))
        if panel.title:
            lines = panel.title.count("\n") + 1
            above[row] = max(above[row], (lines * TITLE_FONTSIZE * LINE_HEIGHT + matplotlib.rcParams["axes.titlepad"]) / 72)
    fixed_w = sum(left) + ncols * _AXES_PAD + 0.1
    fixed_h = sum(below) + sum(above) + nrows * _AXES_PAD + 0.1
    top = above[0] + _AXES_PAD / 2 + 0.05
    bottom = below[-1] + _AXES_PAD / 2 + 0.05
    # A figure title of several lines takes a line each (and is as wide as its longest line).
    suptitle_lines = str(suptitle).split("\n") if suptitle else []
    suptitle_band = (SUPTITLE_FONTSIZE * LINE_HEIGHT * len(suptitle_lines) + 8) / 72 if suptitle else 0.0
    fixed_h += suptitle_band
    top += suptitle_band
    if legend:
        fixed_h += LEGEND_BAND
        bottom += LEGEND_BAND
    margins = (left[0] + _AXES_PAD / 2 + 0.05, bottom, top)
    bands = dict(lefts=tuple(left), belows=tuple(below), aboves=tuple(above),
                 suptitle_band=suptitle_band,
                 legend_band=LEGEND_BAND if legend else 0.0)

    if figsize is not None:
        width, height = (float(v) for v in figsize)
        band = _colorbar_band(height) if colorbar else 0.0
        panel_w = max(0.3, (width - fixed_w - band) / ncols)
        panel_h = max(0.3, (height - fixed_h) / nrows)
        return MapLayout((width, height), (panel_w, panel_h), nrows, ncols, margins, **bands)

    panel_h = min(want_h, max(MIN_PANEL / 2, (MAX_FIGSIZE[1] - fixed_h) / nrows))
    height = fixed_h + nrows * panel_h
    band = _colorbar_band(height) if colorbar else 0.0
    panel_w = min(want_w, max(MIN_PANEL / 2, (MAX_FIGSIZE[0] - fixed_w - band) / ncols))
    width = fixed_w + band + ncols * panel_w
    # A figure title or a legend longer than the panels widens the figure (up to the maximum).
    texts = [longest_label(suptitle_lines, SUPTITLE_FONTSIZE) + 0.2] if suptitle else []
    texts += [text_width(legend, LEGEND_FONTSIZE) + 0.6] if isinstance(legend, str) and legend else []
    if texts:
        width = min(max(width, *texts), max(width, MAX_FIGSIZE[0]))
        panel_w = (width - fixed_w - band) / ncols
    return MapLayout((round(width, 2), round(height, 2)), (panel_w, panel_h), nrows, ncols, margins, **bands)


def new_figure(figsize, *, layout: str | None = "constrained") -> matplotlib.figure.Figure:
    """A new pyplot figure of ``figsize`` inches laid out by ``layout`` (constrained by default).

    Examples
    --------
    >>> new_figure((3.0, 2.0)).get_size_inches().tolist()
    [3.0, 2.0]
    """
    from attnformat.viewer.display import ViewerFigure  # shown exactly once in Jupyter (see viewer/display.py)

    return _pyplot().figure(figsize=figsize, layout=layout, FigureClass=ViewerFigure)


def axes_or_new(ax=None, figsize=None):
    """``ax`` itself, or the Axes of a new constrained-layout figure (``figsize`` inches, default 6.4 x 5.2).

    Examples
    --------
    >>> ax = axes_or_new()
    >>> axes_or_new(ax) is ax
    True
    """
    if ax is not None:
        return ax
    # Constrained layout keeps every label on the canvas, so files need no cropping to be whole.
    figure = new_figure(figsize if figsize is not None else (6.4, 5.2))
    return figure.add_subplot()


def grid(count: int, *, ncols: int = 4, panel_size=(3.6, 3.2), figure=None, figsize=None):
    """A figure with ``count`` Axes in rows of ``ncols`` (no empty Axes left over).

    Returns ``(figure, list_of_axes)``. The figure is ``figsize`` inches when given (the user's
    size wins), else ``panel_size`` per panel.

    Examples
    --------
    >>> figure, axes = grid(6, ncols=4)
    >>> len(axes), axes[5].get_subplotspec().rowspan.start
    (6, 1)
    >>> grid(2, figsize=(5, 2))[0].get_size_inches().tolist()
    [5.0, 2.0]
    """
    ncols = max(1, min(ncols, count))
    nrows = math.ceil(count / ncols)
    if figure is None:
        size = figsize if figsize is not None else (panel_size[0] * ncols, panel_size[1] * nrows)
        figure = new_figure(size)
    axes = [figure.add_subplot(nrows, ncols, i + 1) for i in range(count)]
    return figure, axes


def placed_grid(layout: MapLayout, count: int, *, colorbar: bool = True):
    """A figure of ``count`` map Axes (and a colorbar's) placed where ``layout`` computed, no layout engine.

    Returns ``(figure, list_of_axes, colorbar_axes or None)``. The Axes are subplots of a
    ``nrows x ncols`` grid (so ``get_subplotspec`` says where each sits) moved to the rectangles of
    :meth:`MapLayout.panel_rects`. Why not constrained layout: it measures every tick label of
    every Axes twice per draw, more than half the time of drawing a 12-head grid, to find margins
    that :func:`layout_maps` already worked out from the same labels.

    Examples
    --------
    >>> layout = layout_maps([MapPanel(5, 5, tuple("abcde"), tuple("abcde"))] * 3, ncols=2)
    >>> figure, axes, bar = placed_grid(layout, 3)
    >>> len(axes), figure.get_layout_engine() is None, axes[2].get_subplotspec().rowspan.start
    (3, True, 1)
    """
    figure = new_figure(layout.figsize, layout=None)
    gridspec = figure.add_gridspec(layout.nrows, layout.ncols)
    axes = []
    for index, rect in enumerate(layout.panel_rects(count)):
        ax = figure.add_subplot(gridspec[divmod(index, layout.ncols)])
        ax.set_position(rect)
        axes.append(ax)
    colorbar_axes = figure.add_axes(layout.colorbar_rect(count)) if colorbar else None
    return figure, axes, colorbar_axes


def _text_extent(labels, fontsize: float) -> float:
    """Inches taken along its length by the longest of ``labels`` set at ``fontsize`` points.

    Measured with the font (no drawing) for the few labels the arithmetic estimate says are the
    longest, so an axis label sits as close to its tick labels as Matplotlib's own placement puts it.
    """
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    # Ties in the estimate are broken by the text itself: a set's order depends on the hash seed,
    # and the figure must not (the same file drew different PNG bytes under different seeds).
    labels = sorted({str(label) for label in labels}, key=lambda text: (-text_width(text, fontsize), text))[:4]
    if not labels:
        return 0.0
    measure, font = TextToPath(), FontProperties(size=fontsize)
    return max(measure.get_text_width_height_descent(text, font, ismath=False)[0] for text in labels) / 72


class _LabelStrip(matplotlib.artist.Artist):
    """The tick labels along one panel edge, drawn once and repeated at the same place of other panels.

    Every panel of a grid row shows the same query labels (every column the same key labels), and
    each text costs Matplotlib its own glyph layout and rasterising (about a millisecond, measured),
    whatever it says. On a raster canvas the strip is drawn once and its pixels copied to the other
    panels, shifted by whole pixels; elsewhere (SVG, PDF) each copy is drawn as text, so it stays
    text. The strip draws before the other texts (zorder), over figure background only.
    """

    def __init__(self, axes, texts):
        super().__init__()
        self.texts, self.offsets = list(texts), []
        for text in self.texts:  # placed in the canvas' data coordinates (inches), never clipped
            text.set_figure(axes.figure)
            text.set_transform(axes.transData)
            text.set_clip_on(False)
        self.set_zorder(2.9)

    def _shifted(self, renderer, dx, dy, draw=False):
        """Window extents of the texts moved by ``(dx, dy)`` inches (drawn there when ``draw``)."""
        extents = []
        for text in self.texts:
            x, y = text.get_position()
            text.set_position((x + dx, y + dy))
            try:
                if draw:
                    text.draw(renderer)
                extents.append(text.get_window_extent(renderer))
            finally:
                text.set_position((x, y))
        return extents

    def get_window_extent(self, renderer=None):
        from matplotlib.transforms import Bbox

        renderer = renderer or self.figure.canvas.get_renderer()
        extents = [e for dx, dy in [(0.0, 0.0), *self.offsets] for e in self._shifted(renderer, dx, dy)]
        return Bbox.union(extents) if extents else Bbox.null()

    def draw(self, renderer):
        from matplotlib.transforms import Bbox

        if not self.get_visible() or not self.texts:
            return
        for text in self.texts:
            text.draw(renderer)
        if not self.offsets:
            return
        if not (hasattr(renderer, "copy_from_bbox") and hasattr(renderer, "restore_region")):
            for dx, dy in self.offsets:
                self._shifted(renderer, dx, dy, draw=True)
            return
        box = Bbox.union([text.get_window_extent(renderer) for text in self.texts])
        x0, y0 = math.floor(box.x0) - 1, math.floor(box.y0) - 1
        x1, y1 = math.ceil(box.x1) + 1, math.ceil(box.y1) + 1
        region = renderer.copy_from_bbox(Bbox([[x0, y0], [x1, y1]]))
        left, top = region.get_extents()[:2]  # pixel rows count down from the top here
        dpi = self.figure.dpi
        for dx, dy in self.offsets:
            renderer.restore_region(region, xy=(left + round(dx * dpi), top - round(dy * dpi)))


def compact_panels(figure, layout: MapLayout, panels, maps, *, count: int, steps, cmap, norm, origin: str = "upper",
                   missing_text: str = "not captured", rects=None):
    """Draw map panels on one canvas Axes covering the figure (the plots' ``compact=True``).

    What Matplotlib builds for one Axes per panel (a Tick object per label, each with two lines
    and two texts, and every Axes measuring its tick labels at each draw) is most of the time of
    drawing a 12-head grid (measured). Here each panel is one image on the canvas, its frame a
    rectangle, its tick marks one line collection and each shown label one text, placed with the
    rcParams Matplotlib itself uses (tick size and pad, label pad, title pad) in the rectangles
    :meth:`MapLayout.panel_rects` computed; labels repeated along a grid row or column are drawn
    once (:class:`_LabelStrip`).

    Parameters
    ----------
    figure : matplotlib.figure.Figure
        A figure of ``layout.figsize`` without a layout engine.
    layout : MapLayout
        Where the panels go (:func:`layout_maps` of ``panels``).
    panels : list of MapPanel
        Which labels, axis labels and title each panel shows.
    maps : list of tuple
        Per panel ``(values, query_labels, key_labels, xlabel, ylabel)``: the 2-D map drawn as it
        is (NaN and +/-inf masked, shown in the colormap's "bad" colour), all its labels, axis names.
    count : int
        How many panels.
    steps : callable
        ``steps(values) -> (query step, key step)``: every how many labels are shown.
    cmap, norm : matplotlib.colors.Colormap, matplotlib.colors.Normalize
        The shared colour scale.
    origin : {"upper", "lower"}
        Where the first query is drawn.
    missing_text : str
        What a panel without any finite value reads.
    rects : list of (float, float, float, float), optional
        ``[left, bottom, width, height]`` (figure fractions) of each panel; by default
        :meth:`MapLayout.panel_rects`.

    Returns
    -------
    (matplotlib.axes.Axes, matplotlib.cm.ScalarMappable)
        The canvas, and what a colorbar of the panels should show.

    Examples
    --------
    >>> import numpy as np
    >>> from matplotlib.colors import Normalize
    >>> labels = tuple("abcd")
    >>> panels = [MapPanel(4, 4, labels, labels, title=f"head {h}") for h in range(2)]
    >>> layout = layout_maps(panels, ncols=2)
    >>> maps = [(np.eye(4), labels, labels, "key", "query")] * 2
    >>> canvas, mappable = compact_panels(new_figure(layout.figsize, layout=None), layout, panels, maps, count=2,
    ...                                   steps=lambda values: (1, 1), cmap="viridis", norm=Normalize(0, 1))
    >>> len(canvas.images), sorted({t.get_text() for t in canvas.texts})
    (2, ['head 0', 'head 1', 'key', 'query'])
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Rectangle
    from matplotlib.text import Text

    rc = matplotlib.rcParams
    width, height = layout.figsize
    canvas = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    canvas.set_axis_off()
    canvas.set_autoscale_on(False)
    canvas.set_xlim(0.0, width)
    canvas.set_ylim(0.0, height)
    tick = rc["xtick.major.size"] / 72
    gap = (rc["xtick.major.size"] + rc["xtick.major.pad"]) / 72
    label_size = font_points(rc["axes.labelsize"])
    label_pad = rc["axes.labelpad"] / 72
    segments, image, strips, extents = [], None, {}, {}
    for rect, panel, (values, query_labels, key_labels, xlabel, ylabel) in zip(rects or layout.panel_rects(count), panels, maps):
        x0, y0, w, h = rect[0] * width, rect[1] * height, rect[2] * width, rect[3] * height
        values = np.asarray(values)
        rows, cols = values.shape[-2:]
        query_labels = query_labels if panel.query_labels and len(query_labels) == rows else ()
        key_labels = key_labels if panel.key_labels and len(key_labels) == cols else ()
        query_step, key_step = steps(values)
        finite = np.isfinite(np.asarray(values, dtype=np.float64))
        if values.size and not finite.any():
            canvas.add_patch(Rectangle((x0, y0), w, h, facecolor="white", edgecolor="none", zorder=1))
            canvas.text(x0 + w / 2, y0 + h / 2, missing_text, ha="center", va="center", fontsize=TITLE_FONTSIZE,
                        color="0.35", style="italic")
        else:
            # masked only where needed: a masked array costs Matplotlib several copies per draw
            shown = values if finite.all() else np.ma.masked_invalid(values)
            image = canvas.imshow(shown, cmap=cmap, norm=norm, aspect="auto", origin=origin, interpolation="nearest",
                                  extent=(x0, x0 + w, y0, y0 + h))
        canvas.add_patch(Rectangle((x0, y0), w, h, fill=False, linewidth=rc["axes.linewidth"],
                                   edgecolor=rc["axes.edgecolor"], zorder=2.5))
        below = left = 0.0
        if len(key_labels):
            shown = list(range(0, cols, key_step))
            xs = [x0 + (index + 0.5) * w / cols for index in shown]
            segments += [((x, y0), (x, y0 - tick)) for x in xs]
            texts = [str(key_labels[index]) for index in shown]
            strip, first = strips.get(("key", tuple(texts), cols, w), (None, None))
            if strip is None:
                strip = canvas.add_artist(_LabelStrip(canvas, (
                    Text(x, y0 - gap, text, rotation=90, ha="center", va="top", fontsize=TICK_FONTSIZE)
                    for x, text in zip(xs, texts))))
                strips[("key", tuple(texts), cols, w)] = (strip, (x0, y0))
                extents["key", tuple(texts)] = _text_extent(texts, TICK_FONTSIZE)
            else:
                strip.offsets.append((x0 - first[0], y0 - first[1]))
            below = gap + extents["key", tuple(texts)]
        if len(query_labels):
            shown = list(range(0, rows, query_step))
            ys = [y0 + h - (index + 0.5) * h / rows if origin == "upper" else y0 + (index + 0.5) * h / rows
                  for index in shown]
            segments += [((x0, y), (x0 - tick, y)) for y in ys]
            texts = [str(query_labels[index]) for index in shown]
            strip, first = strips.get(("query", tuple(texts), rows, h), (None, None))
            if strip is None:
                strip = canvas.add_artist(_LabelStrip(canvas, (
                    Text(x0 - gap, y, text, ha="right", va="center_baseline", fontsize=TICK_FONTSIZE)
                    for y, text in zip(ys, texts))))
                strips[("query", tuple(texts), rows, h)] = (strip, (x0, y0))
                extents["query", tuple(texts)] = _text_extent(texts, TICK_FONTSIZE)
            else:
                strip.offsets.append((x0 - first[0], y0 - first[1]))
            left = gap + extents["query", tuple(texts)]
        # Axis labels, titles: shrunk (never rewritten) when a user figsize leaves a panel narrower than they are.
        if panel.xlabel and xlabel:
            text = thinned_label(xlabel, key_step if len(key_labels) else 1)
            size = min(label_size, max(4.0, label_size * w / max(text_width(text, label_size), 1e-9)))
            canvas.text(x0 + w / 2, y0 - below - label_pad, text, ha="center", va="top", fontsize=size)
        if panel.ylabel and ylabel:
            text = thinned_label(ylabel, query_step if len(query_labels) else 1)
            size = min(label_size, max(4.0, label_size * h / max(text_width(text, label_size), 1e-9)))
            canvas.text(x0 - left - label_pad, y0 + h / 2, text, rotation=90, ha="right", va="center", fontsize=size)
        if panel.title:
            size = TITLE_FONTSIZE
            needed = text_width(panel.title, size)
            if needed > w + 0.05 > 0:
                size = max(6.0, size * (w + 0.05) / needed)
            canvas.text(x0 + w / 2, y0 + h + rc["axes.titlepad"] / 72, panel.title, ha="center", va="baseline",
                        fontsize=size)
    if segments:
        canvas.add_collection(LineCollection(segments, linewidths=rc["xtick.major.width"], colors=rc["xtick.color"],
                                             zorder=2.5), autolim=False)
    return canvas, image if image is not None else ScalarMappable(norm=norm, cmap=cmap)


def figure_of(drawn):
    """The Figure of an Axes, or the Figure itself.

    Examples
    --------
    >>> figure, axes = grid(1)
    >>> figure_of(axes[0]) is figure_of(figure) is figure
    True
    """
    return drawn if isinstance(drawn, matplotlib.figure.Figure) else drawn.figure


def close_figure(drawn) -> None:
    """Release an Axes' or a Figure's figure (pyplot keeps every figure it made until closed).

    Examples
    --------
    >>> figure, axes = grid(1)
    >>> close_figure(axes[0])
    """
    _pyplot().close(figure_of(drawn))


def save_options(dpi=None, bbox_inches=None) -> dict:
    """The ``dpi`` and ``bbox_inches`` :func:`save_figure` passes to ``savefig``.

    The rule: a value given to the call wins; otherwise the user's rcParams decide, exactly as for
    ``plt.savefig``: ``savefig.dpi`` (seed 004 sets 300; Matplotlib's default ``"figure"`` is the
    figure's own dpi) and ``savefig.bbox`` (``"tight"`` crops to what is drawn, as seed 004 sets
    it; ``"standard"``, which Matplotlib stores as None like its default, keeps the whole canvas,
    ``figsize`` x ``dpi`` pixels). Nothing is lost at the canvas edge either way, since every
    viewer figure is laid out by constrained layout or placed by the arithmetic of :func:`layout_maps`.

    Parameters
    ----------
    dpi : float or "figure", optional
        Resolution given by the caller.
    bbox_inches : "tight", "standard" or matplotlib.transforms.Bbox, optional
        Cropping given by the caller.

    Examples
    --------
    >>> import matplotlib
    >>> with matplotlib.rc_context({"savefig.dpi": 300, "savefig.bbox": "tight"}):
    ...     save_options(), save_options(dpi=72, bbox_inches="standard")
    ({'dpi': 300.0, 'bbox_inches': 'tight'}, {'dpi': 72, 'bbox_inches': 'standard'})
    >>> with matplotlib.rc_context({"savefig.bbox": "standard"}):
    ...     save_options()["bbox_inches"]
    'standard'
    """
    if dpi is None:
        dpi = matplotlib.rcParams["savefig.dpi"]
    if bbox_inches is None:
        bbox_inches = matplotlib.rcParams["savefig.bbox"] or "standard"
    return {"dpi": dpi, "bbox_inches": bbox_inches}


def save_figure(drawn, path: str | os.PathLike, *, dpi: float | str | None = None, bbox_inches=None,
                close: bool = True) -> Path:
    """Save an Axes' or a Figure's figure; the suffix picks PNG, SVG (text as ``<text>``) or PDF.

    Parameters
    ----------
    drawn : matplotlib.axes.Axes or matplotlib.figure.Figure
        What a plot function returned.
    path : str or os.PathLike
        Destination; ``.png``, ``.svg`` or ``.pdf``.
    dpi : float or "figure", optional
        Resolution. By default rcParams ``savefig.dpi`` (so ``plt.rcParams["savefig.dpi"] = 300``
        is honoured; Matplotlib's own default ``"figure"`` is the figure's dpi). A given value wins.
    bbox_inches : "tight", "standard" or matplotlib.transforms.Bbox, optional
        ``"tight"`` crops to what is drawn; ``"standard"`` keeps the whole figure. By default
        rcParams ``savefig.bbox`` (see :func:`save_options` for the rule).
    close : bool, default True
        Close the figure after saving (pyplot keeps every figure until closed).

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> import attnformat, tempfile, pathlib
    >>> from attnformat.viewer import heatmap, save_figure
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "map.svg"
    >>> save_figure(heatmap(attnformat.example_path("dense"), layer=0, head=0), out).exists()
    True
    """
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise AttnFormatError(f"{path}: cannot save a plot as {suffix or 'a file without suffix'!r}; use .png, .svg or .pdf")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = figure_of(drawn)
    options = save_options(dpi, bbox_inches)
    if isinstance(options["bbox_inches"], str) and options["bbox_inches"] == "standard":
        options["bbox_inches"] = figure.bbox_inches  # the whole canvas, whatever rcParams say
    with matplotlib.rc_context(SAVE_RC):
        figure.savefig(path, format=suffix, **options)
    if close:
        close_figure(figure)
    return path
