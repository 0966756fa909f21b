"""Figures and files: new Axes or grids of Axes, and saving to PNG, SVG (text kept as text) or PDF."""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

from attnformat.errors import AttnFormatError

#: Output formats by suffix.
FORMATS = ("png", "svg", "pdf")
#: Matplotlib settings for saved files. ``svg.fonttype: none`` keeps labels as ``<text>``
#: elements that stay editable in a vector editor (seed 004).
SAVE_RC = {"svg.fonttype": "none", "pdf.fonttype": 42, "savefig.bbox": "tight"}


def _pyplot():
    # Imported late so that importing the viewer never picks a GUI backend as a side effect.
    import matplotlib.pyplot as plt

    return plt


def axes_or_new(ax=None, figsize=(6.4, 5.2)):
    """``ax`` itself, or the Axes of a new figure.

    Examples
    --------
    >>> ax = axes_or_new()
    >>> axes_or_new(ax) is ax
    True
    """
    if ax is not None:
        return ax
    figure = _pyplot().figure(figsize=figsize)
    return figure.add_subplot()


def grid(count: int, *, ncols: int = 4, panel_size=(3.6, 3.2), figure=None):
    """A figure with ``count`` Axes in rows of ``ncols`` (no empty Axes left over).

    Returns ``(figure, list_of_axes)``.

    Examples
    --------
    >>> figure, axes = grid(6, ncols=4)
    >>> len(axes), axes[5].get_subplotspec().rowspan.start
    (6, 1)
    """
    ncols = max(1, min(ncols, count))
    nrows = math.ceil(count / ncols)
    if figure is None:
        figure = _pyplot().figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    axes = [figure.add_subplot(nrows, ncols, i + 1) for i in range(count)]
    return figure, axes


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


def save_figure(drawn, path: str | os.PathLike, *, dpi: int = 150, close: bool = True) -> Path:
    """Save an Axes' or a Figure's figure; the suffix picks PNG, SVG (text as ``<text>``) or PDF.

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
    with matplotlib.rc_context(SAVE_RC):
        figure.savefig(path, format=suffix, dpi=dpi)
    if close:
        close_figure(figure)
    return path
