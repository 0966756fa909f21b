"""Layer x head maps: one value per layer and head, drawn as a small table of coloured cells.

:func:`attnformat.viewer.compare.jsd_grid` (how much each head changed) and
:func:`attnformat.viewer.row_statistics.statistics_overview` (a stored statistic per head) draw
the same kind of map; its size, tick thinning, cell texts and colorbar are worked out here once.
"""

from __future__ import annotations

import math

import numpy as np

from attnformat.viewer.colors import labelled_colorbar, masked
from attnformat.viewer.heatmaps import fit_title
from attnformat.viewer.output import (
    TICK_FONTSIZE,
    TITLE_FONTSIZE,
    label_pitch,
    longest_label,
    text_width,
    thinned_label,
    tick_step,
)


def layer_head_figsize(layers, heads, title: str, colorbar_lines) -> tuple[float, float]:
    """Default figure size of a layer x head map: room for its cells, tick labels, title and colorbar label.

    Parameters
    ----------
    layers, heads : list of str
        The row (layer) and column (head) tick labels.
    title : str
        The Axes title (the figure is at least as wide).
    colorbar_lines : sequence of str
        The lines of the colorbar's label, which runs along it: the figure is at least as tall
        as the longest.

    Returns
    -------
    tuple of float
        ``(width, height)`` in inches, at most 20 x 16.

    Examples
    --------
    >>> width, height = layer_head_figsize([str(layer) for layer in range(12)], [str(head) for head in range(12)],
    ...                                    "entropy", ["entropy [nats]"])
    >>> round(width, 2), round(height, 2)
    (8.12, 6.92)
    """
    n_layers, n_heads = len(layers), len(heads)
    cell = 0.45 if n_layers * n_heads <= 256 else max(label_pitch(), 6.0 / max(n_layers, n_heads))
    width = n_heads * cell + longest_label(layers) + 2.6
    height = n_layers * cell + longest_label(heads) + 1.4
    width = max(width, text_width(title, TITLE_FONTSIZE) + 0.5, 4.0)
    label_height = max(text_width(line, 10.0) for line in colorbar_lines) + 0.8
    return min(20.0, width), min(16.0, max(3.0, height, label_height))


def draw_layer_head_map(ax, values, layers, heads, *, cmap, norm, annotate, cell_text, colorbar: bool,
                        colorbar_label: str, title: str, fit: bool = False):
    """Draw ``values`` (layer, head) on ``ax``: thinned tick labels, cell texts when they fit, colorbar, title.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Where to draw (its size decides the tick thinning and whether cell texts fit).
    values : numpy.ndarray
        (layer, head) values; NaN cells are drawn in the missing colour.
    layers, heads : list of str
        Tick labels of the rows and columns.
    cmap, norm
        The colour scale (:func:`attnformat.viewer.colors.color_scale`).
    annotate : bool or None
        Write each finite value in its cell; None: when a cell is at least 0.35 x 0.2 inches.
    cell_text : callable
        The text of a cell's value.
    colorbar : bool
        Draw a colorbar labelled ``colorbar_label``.
    colorbar_label : str
        The colorbar's label.
    title : str
        The Axes title.
    fit : bool, default False
        Set a title wider than the map smaller (:func:`attnformat.viewer.heatmaps.fit_title`).

    Returns
    -------
    matplotlib.image.AxesImage
        The drawn map (``ax.images[0]``).

    Examples
    --------
    >>> import numpy as np
    >>> from attnformat.viewer.colors import color_scale
    >>> from attnformat.viewer.output import axes_or_new
    >>> values = np.array([[0.1, 0.5], [np.nan, 0.9]])
    >>> cmap, norm = color_scale(values, cmap="magma_r", diverging=False)
    >>> ax = axes_or_new(None, figsize=(4, 3))
    >>> image = draw_layer_head_map(ax, values, ["0", "1"], ["0", "1"], cmap=cmap, norm=norm, annotate=True,
    ...                             cell_text=lambda value: f"{value:.1f}", colorbar=False, colorbar_label="",
    ...                             title="changes")
    >>> [text.get_text() for text in ax.texts], ax.get_xlabel()
    (['0.1', '0.5', '0.9'], 'head')
    """
    n_layers, n_heads = values.shape
    figure_width, figure_height = ax.figure.get_size_inches()
    image = ax.imshow(masked(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    box = ax.get_position()
    head_step = tick_step(n_heads, box.width * figure_width * 0.85)
    layer_step = tick_step(n_layers, box.height * figure_height * 0.85)
    ax.set_xticks(range(0, n_heads, head_step), heads[::head_step], fontsize=TICK_FONTSIZE)
    ax.set_yticks(range(0, n_layers, layer_step), layers[::layer_step], fontsize=TICK_FONTSIZE)
    ax.set_xlabel(thinned_label("head", head_step))
    ax.set_ylabel(thinned_label("layer", layer_step))
    cell_width = box.width * figure_width / max(n_heads, 1)
    if annotate is None:
        annotate = cell_width >= 0.35 and box.height * figure_height / max(n_layers, 1) >= 0.2
    if annotate:
        for (row, column), value in np.ndenumerate(values):
            if math.isfinite(value):
                ax.text(column, row, cell_text(value), ha="center", va="center", fontsize=min(7.0, 72 * cell_width / 4.5),
                        color=_annotation_color(cmap(norm(value))))
    if colorbar:
        labelled_colorbar(image, ax=ax, label=colorbar_label, values=values)
    ax.set_title(title, fontsize=TITLE_FONTSIZE)
    if fit:
        # The map's width before the colorbar took its share of the Axes.
        fit_title(ax, box.width * figure_width)
    return image


def _annotation_color(rgba) -> str:
    """Black text on a light cell, white on a dark one (perceived luminance of the cell's colour)."""
    red, green, blue = rgba[:3]
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
