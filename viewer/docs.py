"""Parameter documentation written once and filled into every plot function's docstring.

Why this exists: thirty plot functions share the same selectors, colour options and figure options.
Written out in each docstring they drift apart (one says ``head`` defaults to the mean, another
forgets ``"max"``). A docstring names a shared entry on a line of its own, ``$name``; the
:func:`documented` decorator replaces that line by the entry, indented like the marker line.
``$name(a, b)`` fills the entry with the parameter names on its first line replaced by ``a, b``:
``$selectors(layer, head)`` documents only the selectors a function takes. A module with
parameters of its own registers them with :func:`register` next to its functions.

>>> @documented
... def f(source, *, layer=None):
...     '''Example.
...
...     Parameters
...     ----------
...     $source
...     '''
>>> print(f.__doc__.splitlines()[4].strip())
source : str, os.PathLike, xarray.DataTree or site group
"""

from __future__ import annotations

import re
import textwrap

#: Shared entries: ``name -> numpydoc text`` (first line the parameter names, then the description
#: indented by four spaces).
PARAMETERS: dict[str, str] = {}

_MARKER = re.compile(r"^(?P<indent>[ \t]*)\$(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                     r"(?:\((?P<names>[A-Za-z0-9_, ]*)\))?[ \t]*$", re.MULTILINE)
#: Any ``$name`` left in a docstring after filling (the parameter-docs test looks for these).
UNFILLED = re.compile(r"\$[A-Za-z_][A-Za-z0-9_]*")


def register(**entries: str) -> None:
    """Add shared parameter entries (``name="text"``); later entries replace earlier ones.

    Parameters
    ----------
    **entries
        ``name`` is the marker used in docstrings (``$name``); the text is a numpydoc entry whose
        first line names the parameter(s) and whose following lines describe it.

    Examples
    --------
    >>> register(demo_option="demo_option : int\\n    An option only this example has.")
    >>> "demo_option" in PARAMETERS
    True
    """
    for name, text in entries.items():
        PARAMETERS[name] = textwrap.dedent(text).strip("\n")


def fill(docstring: str | None) -> str | None:
    """``docstring`` with every ``$name`` line replaced by the shared entry (unknown names raise).

    Parameters
    ----------
    docstring
        A docstring with marker lines.

    Examples
    --------
    >>> print(fill("    $ax"))
        ax : matplotlib.axes.Axes, optional
            Axes to draw on; a new figure (sized by ``figsize``) when None.
    >>> print(fill("$selectors(layer, head)").splitlines()[0])
    layer, head : int, str or {"mean", "max"}, optional
    """
    if not docstring:
        return docstring

    def entry(match: re.Match) -> str:
        name = match.group("name")
        if name not in PARAMETERS:
            raise KeyError(f"no shared parameter documentation named {name!r} (see attnformat.viewer.docs)")
        text = PARAMETERS[name]
        if match.group("names") is not None:
            names = ", ".join(n.strip() for n in match.group("names").split(",") if n.strip())
            first, _, rest = text.partition("\n")
            kind = first.partition(" : ")[2]
            text = f"{names} : {kind}" + (f"\n{rest}" if rest else "") if kind else names + (f"\n{rest}" if rest else "")
        return textwrap.indent(text, match.group("indent"))

    return _MARKER.sub(entry, docstring)


def documented(function):
    """Decorator: fill the shared parameter entries into ``function.__doc__``.

    Parameters
    ----------
    function
        Any function whose docstring uses ``$name`` marker lines.

    Examples
    --------
    >>> @documented
    ... def g(ax=None):
    ...     '''Draw.
    ...
    ...     Parameters
    ...     ----------
    ...     $ax
    ...     '''
    >>> "Axes to draw on" in g.__doc__
    True
    """
    function.__doc__ = fill(function.__doc__)
    return function


register(
    source="""
        source : str, os.PathLike, xarray.DataTree or site group
            The file (path or URL), an opened tree, or one site's group.
    """,
    site="""
        site : str, optional
            Site path (``"encoder/self"``) when the file holds several; the first site otherwise.
    """,
    variable="""
        variable : str, default "weights"
            ``weights`` (sequential scale from 0), ``logits`` or ``bias`` (signed: diverging scale).
    """,
    selectors="""
        layer, head, sample, step, time, node : int, str or {"mean", "max"}, optional
            Which map: a label or a position along each dimension the site has; ``"mean"`` or
            ``"max"`` reduce over it. ``head`` defaults to the mean over heads; every other
            dimension a site has must be chosen when it has more than one value.
    """,
    color="""
        cmap : str or matplotlib.colors.Colormap, optional
            Colormap; defaults to ``viridis`` for weights and ``RdBu_r`` for signed variables.
        vmin, vmax : float, optional
            Colour limits. Given limits always win over the data's range; see
            :func:`attnformat.viewer.colors.color_scale` for the rule when one or neither is given.
        log : bool, default False
            Logarithmic colour scale (values <= 0 are drawn as missing).
        center : float, optional
            Centre of a diverging scale (default 0 for signed variables).
    """,
    color_limits="""
        cmap : str or matplotlib.colors.Colormap, optional
            Colormap; defaults to ``viridis``.
        vmin, vmax : float, optional
            Colour limits. Given limits always win over the data's range; see
            :func:`attnformat.viewer.colors.color_scale` for the rule when one or neither is given.
    """,
    origin="""
        origin : {"upper", "lower"}, default "upper"
            ``"upper"`` puts the first query at the top, ``"lower"`` at the bottom.
    """,
    pooling="""
        max_size : int, default 1024
            Maps with more rows or columns than this are block-pooled for display; the title says so.
        pool : {"mean", "max"}, default "mean"
            How blocks are pooled.
    """,
    annotate="""
        annotate : bool, optional
            Write each cell's value in it; by default when every cell is at least 0.35 inch wide.
    """,
    colorbar="""
        colorbar : bool, default True
            Draw a colorbar labelled with what the colours mean.
    """,
    ax="""
        ax : matplotlib.axes.Axes, optional
            Axes to draw on; a new figure (sized by ``figsize``) when None.
    """,
    figsize="""
        figsize : (float, float), optional
            Figure size in inches, used as given. By default the figure sizes itself so that every
            tick label fits (about 0.13 inch per token label, room for the longest label), up to
            :data:`attnformat.viewer.output.MAX_FIGSIZE`; when the labels do not fit (a larger map,
            or a smaller ``figsize``) every k-th label is shown and the axis label says so.
    """,
    title="""
        title : str, optional
            Figure (or Axes) title; the default names the site, the selection and the variable.
    """,
    ncols="""
        ncols : int, default 4
            Panels per row (fewer when there are fewer panels).
    """,
    aggregate="""
        aggregate : {"mean", "sum", "max"}, optional
            How token pairs are combined into group pairs: ``sum`` over a key group's tokens (the
            attention mass it receives, the default for weights normalised over keys), ``mean`` (the
            default for logits and biases) or ``max``.
    """,
)
