"""How the viewer's figures show in Jupyter: each exactly once, never as ``<Axes: ...>`` text.

Why figures showed twice: every plot draws on a pyplot figure (so ``plt.savefig``, ``plt.gcf``
and the user's own pyplot habits work), and Jupyter's inline backend shows every open pyplot
figure when a cell ends (``flush_figures``); a cell whose last line was ``head_grid(...)`` also
had its value, the returned Figure, rendered as the cell's result: the same picture twice. A
plot returning an Axes (``heatmap``) had the picture shown once by the backend, and the Axes'
repr, ``<Axes: title=...>``, printed as the cell's result.

Decided: keep the API (Axes or Figure returned, ``ax=None`` means a new pyplot figure) and give
the returned objects a notebook display that knows about the backend. The figures the viewer
makes are :class:`ViewerFigure` (``plt.figure(FigureClass=...)``), whose Axes carry the same
display. Whoever displays one first shows it, and only once:

- the cell's value (``heatmap(...)`` as the last line) or ``display(fig)`` shows the figure (an
  image, through IPython's own formatters and the inline backend's configured formats; an Axes
  shows its figure, not its repr) and closes it in pyplot, so the inline backend, which shows
  the figures still open when the cell ends, does not show it again;
- a figure nobody displayed (``fig = head_grid(...)``) is shown by the backend as before (its
  display goes through the same hook);
- ``fig`` in a later cell shows the picture again, as plain Matplotlib does;
- under an interactive backend (ipympl) the canvas is on the page already: no image is added.

Nothing changes outside IPython: the display hook is only ever called by IPython.
"""

from __future__ import annotations

import functools
import sys

import matplotlib.figure

__all__ = ["ViewerFigure", "display_once"]

#: Interactive notebook backends (substrings of the backend's name): their canvas is on the page.
_WIDGET_BACKENDS = ("ipympl", "widget", "nbagg")


class ViewerFigure(matplotlib.figure.Figure):
    """A Figure (and Axes) shown exactly once in a notebook; elsewhere a plain Figure.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> figure = plt.figure(FigureClass=ViewerFigure)
    >>> ax = figure.add_subplot()
    >>> callable(ax._ipython_display_), isinstance(figure, matplotlib.figure.Figure)
    (True, True)
    >>> plt.close(figure)
    """

    def _ipython_display_(self) -> None:
        display_once(self)

    def add_axes(self, *args, **kwargs):
        return _with_display(super().add_axes(*args, **kwargs))

    def add_subplot(self, *args, **kwargs):
        return _with_display(super().add_subplot(*args, **kwargs))


def _with_display(ax):
    # An instance attribute: IPython looks the method up on the object, so only the viewer's Axes
    # change; a partial (not a bound method) so that a pickled figure unpickles.
    ax._ipython_display_ = functools.partial(display_once, ax)
    return ax


def display_once(drawn) -> None:
    """Show a Figure (or an Axes' figure) in IPython once, whoever asks first: the cell, or pyplot.

    Parameters
    ----------
    drawn : matplotlib.figure.Figure or matplotlib.axes.Axes
        What a plot returned.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> figure = plt.figure(FigureClass=ViewerFigure)
    >>> display_once(figure)  # outside IPython: nothing to do
    >>> plt.close(figure)
    """
    shell = _shell()
    if shell is None:
        return
    figure = drawn
    while not isinstance(figure, matplotlib.figure.Figure):  # an Axes, or a subfigure's: up to the Figure
        figure = figure.figure
    backend = _showing_backend(figure)
    if backend == "widget":
        return  # an interactive canvas (ipympl) is on the page already: an image of it would be a second copy
    _publish(shell, figure)
    if backend == "inline":
        # Shown now: the inline backend, which shows every open pyplot figure when the cell ends
        # (and calls this very display to do so), must not show it again. It would close it then
        # anyway; the Figure stays usable (savefig, display again).
        import matplotlib.pyplot as plt

        plt.close(figure)


def _shell():
    module = sys.modules.get("IPython")
    if module is None:
        return None
    try:
        return module.get_ipython()
    except Exception:  # an IPython that is half imported or torn down
        return None


def _showing_backend(figure) -> str | None:
    """``"inline"`` or ``"widget"`` when pyplot holds the figure open under a notebook backend
    that shows open figures by itself, else None."""
    if "matplotlib.pyplot" not in sys.modules:
        return None
    import matplotlib
    from matplotlib._pylab_helpers import Gcf

    if not any(manager.canvas.figure is figure for manager in Gcf.get_all_fig_managers()):
        return None
    backend = str(matplotlib.get_backend()).lower()
    if "inline" in backend:
        return "inline"
    if any(name in backend for name in _WIDGET_BACKENDS):
        return "widget"
    return None


def _publish(shell, figure) -> None:
    """Show the figure as IPython shows a Figure: every registered format (PNG, SVG, retina...)."""
    from IPython.display import publish_display_data

    data, metadata = {}, {}
    for mime, formatter in shell.display_formatter.formatters.items():
        try:
            found = formatter(figure)
        except Exception:  # a formatter that cannot draw this figure: leave that format out
            continue
        if found is None:
            continue
        if isinstance(found, tuple):
            found, metadata[mime] = found
        data[mime] = found
    if data:
        publish_display_data(data, metadata)
