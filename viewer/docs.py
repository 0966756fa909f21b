"""Parameter documentation written once and filled into every plot function's docstring.

Why this exists: thirty plot functions share the same selectors, colour options and figure options.
Written out in each docstring they drift apart (one says ``head`` defaults to the mean, another
forgets ``"max"``). A docstring names a shared entry on a line of its own, ``$name``; the
:func:`documented` decorator replaces that line by the entry, indented like the marker line. A
module with parameters of its own registers them with :func:`register` next to its functions.

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

_MARKER = re.compile(r"^(?P<indent>[ \t]*)\$(?P<name>[A-Za-z_][A-Za-z0-9_]*)[ \t]*$", re.MULTILINE)


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
    """
    if not docstring:
        return docstring

    def entry(match: re.Match) -> str:
        name = match.group("name")
        if name not in PARAMETERS:
            raise KeyError(f"no shared parameter documentation named {name!r} (see attnformat.viewer.docs)")
        return textwrap.indent(PARAMETERS[name], match.group("indent"))

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
            Figure size in inches; by default the figure sizes itself to its panels and labels.
    """,
    title="""
        title : str, optional
            Figure (or Axes) title; the default names the site, the selection and the variable.
    """,
    ncols="""
        ncols : int, default 4
            Panels per row.
    """,
)
