"""Checks on drawn Matplotlib figures: overlapping labels, colour limits, colorbars, drawn values.

Why this exists: a figure can hold exactly the right numbers and still be unreadable (tick labels
drawn over each other) or misleading (a colour scale that is not shown, or not the one asked for).
These functions read what Matplotlib actually laid out, after a draw, so tests of the viewer (and
of any code that draws attention) can assert on the figure a user would see.

>>> import matplotlib
>>> matplotlib.use("Agg")
>>> import matplotlib.pyplot as plt
>>> figure, ax = plt.subplots(figsize=(2, 2))
>>> _ = ax.set_xticks(range(30), [f"token {i}" for i in range(30)])
>>> len(overlapping_labels(figure)) > 0
True
"""

from __future__ import annotations

import itertools

import numpy as np


def _renderer(figure):
    figure.canvas.draw()
    return figure.canvas.get_renderer()


def visible_texts(figure) -> list:
    """Every visible, non-empty text artist of ``figure`` that takes part in layout checks.

    Tick labels, axis labels, titles, suptitle, legend and colorbar texts; ``Axes.text`` annotations
    are included too.

    Parameters
    ----------
    figure : matplotlib.figure.Figure
        A figure (it is drawn once to lay the texts out).

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> figure, ax = plt.subplots()
    >>> _ = ax.set_title("a title")
    >>> "a title" in [t.get_text() for t in visible_texts(figure)]
    True
    """
    from matplotlib.text import Text

    _renderer(figure)
    texts = []
    # Only Text artists: a legend's TextArea wraps a Text of its own and would count it twice.
    for artist in figure.findobj(lambda a: isinstance(a, Text)):
        if not artist.get_visible() or not str(artist.get_text()).strip():
            continue
        axes = getattr(artist, "axes", None)
        if axes is not None and not axes.get_visible():
            continue
        texts.append(artist)
    return texts


def _tick_labels(ax) -> list:
    labels = []
    for axis in (ax.xaxis, ax.yaxis):
        # Only ticks inside the view are drawn; Matplotlib keeps the others invisible-by-clipping.
        low, high = sorted(axis.get_view_interval())
        for tick in axis.get_major_ticks() + axis.get_minor_ticks():
            if not (low - 1e-9 <= tick.get_loc() <= high + 1e-9):
                continue
            for label in (tick.label1, tick.label2):
                if label.get_visible() and str(label.get_text()).strip():
                    labels.append(label)
    return labels


def overlapping_labels(figure, *, tolerance: float = 0.5) -> list[tuple[str, str]]:
    """Pairs of tick labels of the same Axes whose drawn boxes overlap (by more than ``tolerance`` pixels).

    Parameters
    ----------
    figure : matplotlib.figure.Figure
        A figure; it is drawn once so that the boxes are the real ones.
    tolerance : float, default 0.5
        Overlaps of at most this many pixels in either direction are ignored (antialiasing).

    Returns
    -------
    list of (str, str)
        The texts of each overlapping pair; empty when no labels overlap.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> figure, ax = plt.subplots(figsize=(4, 3))
    >>> _ = ax.set_xticks(range(3), ["a", "b", "c"])
    >>> overlapping_labels(figure)
    []
    """
    renderer = _renderer(figure)
    pairs = []
    for ax in figure.axes:
        pairs += _overlapping(_tick_labels(ax), renderer, tolerance)
    return pairs


def _overlapping(texts, renderer, tolerance: float) -> list[tuple[str, str]]:
    boxes = [(text.get_text(), text.get_window_extent(renderer)) for text in texts]
    pairs = []
    for (text_a, a), (text_b, b) in itertools.combinations(boxes, 2):
        width = min(a.x1, b.x1) - max(a.x0, b.x0)
        height = min(a.y1, b.y1) - max(a.y0, b.y0)
        if width > tolerance and height > tolerance:
            pairs.append((text_a, text_b))
    return pairs


def overlapping_texts(figure, *, tolerance: float = 0.5) -> list[tuple[str, str]]:
    """Pairs of any visible texts (titles, axis labels, tick labels, colorbar labels) that overlap.

    Stricter than :func:`overlapping_labels`: a title drawn over the tick labels of the panel above
    counts too.

    Parameters
    ----------
    figure : matplotlib.figure.Figure
        A figure; it is drawn once.
    tolerance : float, default 0.5
        Overlaps of at most this many pixels are ignored.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> figure, ax = plt.subplots()
    >>> _ = ax.set_title("title"); _ = ax.set_xlabel("x")
    >>> overlapping_texts(figure)
    []
    """
    renderer = _renderer(figure)
    # Matplotlib keeps the labels of ticks outside an axis' view visible but never draws them.
    every_tick_label, drawn_tick_labels = set(), set()
    for ax in figure.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                every_tick_label |= {id(tick.label1), id(tick.label2)}
        drawn_tick_labels |= {id(label) for label in _tick_labels(ax)}
    texts = [t for t in visible_texts(figure) if id(t) not in every_tick_label or id(t) in drawn_tick_labels]
    return _overlapping(texts, renderer, tolerance)


def colorbars(figure) -> list:
    """The colorbars of ``figure`` (``matplotlib.colorbar.Colorbar`` objects), in drawing order.

    Parameters
    ----------
    figure : matplotlib.figure.Figure
        Any figure.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> figure, ax = plt.subplots()
    >>> _ = figure.colorbar(ax.imshow([[0.0, 1.0]]), ax=ax)
    >>> [(c.norm.vmin, c.norm.vmax) for c in colorbars(figure)]
    [(0.0, 1.0)]
    """
    found = []
    for ax in figure.axes:
        colorbar = getattr(ax, "_colorbar", None)
        if colorbar is not None and colorbar not in found:
            found.append(colorbar)
    return found


def mappables(figure) -> list:
    """Every colour-mapped artist drawn on the figure's Axes (images, meshes, scatter collections).

    Parameters
    ----------
    figure : matplotlib.figure.Figure
        Any figure.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> figure, ax = plt.subplots()
    >>> _ = ax.imshow([[1.0, 2.0]])
    >>> [m.get_array().tolist() for m in mappables(figure)]
    [[[1.0, 2.0]]]
    """
    found = []
    for ax in figure.axes:
        if getattr(ax, "_colorbar", None) is not None:
            continue
        for artist in list(ax.images) + list(ax.collections):
            if artist.get_array() is not None:
                found.append(artist)
    return found


def drawn_values(artist) -> np.ndarray:
    """The values a colour-mapped artist draws, as floats with masked cells as NaN.

    Parameters
    ----------
    artist : matplotlib.cm.ScalarMappable
        An image, mesh or collection with an array.

    Examples
    --------
    >>> import matplotlib.pyplot as plt, numpy as np
    >>> figure, ax = plt.subplots()
    >>> drawn_values(ax.imshow(np.ma.masked_invalid([[1.0, np.nan]]))).tolist()
    [[1.0, nan]]
    """
    values = np.ma.asarray(artist.get_array()).astype(np.float64)
    return values.filled(np.nan)
