"""Colour scales: the user's limits first, then the data's; diverging around 0 only when the data have both signs.

The rule (stated once here, in :func:`color_scale`, and referred to by every plot's docstring):

* Limits the user gives are used exactly, always.
* Weights (and any variable without a sign) are drawn from their smallest to their largest value.
* Signed variables (``logits``, ``bias``, or any variable given a ``center``) are drawn on a
  diverging scale with white at the centre when they have values on both sides of it, and on a
  one-sided sequential scale from their smallest to their largest value when they do not (seed
  002's all-negative geometric bias, drawn ``Blues_r``).

Nothing here raises for NaN, +/-inf, empty or constant data: such values are left out of the
limits and drawn in :data:`MISSING_COLOR`.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Colormap, LogNorm, Normalize, TwoSlopeNorm

from attnformat.errors import AttnFormatError

#: Variables whose sign means something (a diverging scale centred at 0 by default).
SIGNED_VARIABLES = ("logits", "bias")
SEQUENTIAL_CMAP = "viridis"
DIVERGING_CMAP = "RdBu_r"
#: One-sided scales for signed data that lie below / above the centre. They are the two halves'
#: hues of :data:`DIVERGING_CMAP` (blue below, red above), darkest furthest from the centre, so a
#: colour means the same sign in every figure; ``Blues_r`` is seed 002's own fix.
BELOW_CENTER_CMAP = "Blues_r"
ABOVE_CENTER_CMAP = "Reds"
#: Values of ``scale``.
SCALES = ("auto", "symmetric", "one-sided")
#: Colour of NaN (not captured) and +/-inf (masked) cells.
MISSING_COLOR = "#d9d9d9"
#: First colour of seaborn's "colorblind" palette, which seed 004 uses for its bars.
BAR_COLOR = "#0173B2"


def is_diverging(variable: str, center: float | None = None) -> bool:
    """True when a variable is signed (drawn around a centre) by default.

    Parameters
    ----------
    variable : str
        Name of the variable (``weights``, ``logits``, ``bias`` ...).
    center : float, optional
        A centre given by the user makes any variable signed.

    Examples
    --------
    >>> is_diverging("logits"), is_diverging("weights"), is_diverging("weights", center=0.5)
    (True, False, True)
    """
    return center is not None or variable in SIGNED_VARIABLES


def finite_range(values) -> tuple[float, float] | None:
    """``(min, max)`` of the finite values, or None when there are none.

    Parameters
    ----------
    values : array_like
        Any shape; NaN and +/-inf are left out.

    Examples
    --------
    >>> finite_range(np.array([np.nan, -np.inf, -2.0, 3.0]))
    (-2.0, 3.0)
    >>> finite_range([]) is None
    True
    """
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    return float(finite.min()), float(finite.max())


def _checked_limit(name: str, value) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        raise AttnFormatError(f"colour limit {name}={value} is not a finite number")
    return value


def _widened(low: float, high: float, *, signed: bool) -> tuple[float, float]:
    """Limits for data without spread (one value): centred on it, so it draws in the middle colour."""
    if high > low:
        return low, high
    if low == 0.0:
        return (-1.0, 1.0) if signed else (0.0, 1.0)
    spread = 0.05 * abs(low)
    return low - spread, low + spread


def _other_limit(given: float, data_extreme: float | None, *, upper: bool) -> float:
    """The missing limit: the data's extreme on its side, or a unit step when the data lie beyond the given one."""
    if data_extreme is not None and (data_extreme > given if upper else data_extreme < given):
        return data_extreme
    step = abs(given) or 1.0
    return given + step if upper else given - step


def _side_cmap(low: float, high: float, center: float) -> str:
    if low < center < high:
        return DIVERGING_CMAP
    return BELOW_CENTER_CMAP if high <= center else ABOVE_CENTER_CMAP


def _log_scale(values, vmin, vmax) -> Normalize:
    if vmin is not None and vmin <= 0:
        raise AttnFormatError(f"a logarithmic colour scale needs vmin > 0, got vmin={vmin}")
    if vmax is not None and vmax <= 0:
        raise AttnFormatError(f"a logarithmic colour scale needs vmax > 0, got vmax={vmax}")
    values = np.asarray(values, dtype=np.float64)
    positive = values[np.isfinite(values) & (values > 0)]
    low = vmin if vmin is not None else (float(positive.min()) if positive.size else None)
    high = vmax if vmax is not None else (float(positive.max()) if positive.size else None)
    if low is None and high is None:
        low, high = 1e-6, 1.0
    elif low is None:
        low = high / 10.0
    elif high is None or high <= low:
        high = low * 10.0
    return LogNorm(vmin=low, vmax=high)


def color_scale(values, *, variable: str = "weights", cmap=None, vmin=None, vmax=None, log: bool = False,
                center: float | None = None, diverging: bool | None = None,
                scale: str = "auto") -> tuple[Colormap, Normalize]:
    """Colormap and norm for ``values`` (one map, or all the maps that share one colorbar).

    **The rule.** Limits the user gives are used exactly. With both ``vmin`` and ``vmax`` given the
    norm spans exactly them; with one given, that one is kept and the other is the data's extreme
    on the other side (a unit step beyond the given limit when the data do not reach past it).
    Unsigned values (``weights``) without limits span their finite min..max. Signed values
    (``logits``, ``bias``, any variable given a ``center``, or ``diverging=True``) without limits
    follow ``scale``: ``"auto"`` (default) gives a *symmetric* diverging scale
    ``center -/+ max|value - center|`` when the data lie on both sides of the centre, and a
    *one-sided* scale over the data's own min..max when they do not (all-negative or
    all-positive); ``"symmetric"`` always mirrors (with one limit given, the other mirrors it when
    it lies on its own side of the centre); ``"one-sided"`` never mirrors and uses the data's min..max.
    Whenever the final limits lie on both sides of the centre the colours stay centred (a
    :class:`~matplotlib.colors.TwoSlopeNorm`, white at the centre); when both lie on one side the
    norm is a plain :class:`~matplotlib.colors.Normalize` over them. Default colormaps: ``viridis``
    for unsigned values, ``RdBu_r`` for signed limits around the centre, ``Blues_r`` for signed
    limits at or below it (darkest = most negative, seed 002's fix) and ``Reds`` at or above it. A
    colormap given by the user is always used as given. NaN, +/-inf, empty and constant data never
    raise: they are left out of the limits (and drawn in :data:`MISSING_COLOR`); a single value
    draws in the middle colour of a small range around it.

    Parameters
    ----------
    values : array_like
        The data (any shape; NaN and inf are ignored for the limits).
    variable : str, default "weights"
        ``logits`` and ``bias`` are signed by default.
    cmap : str or matplotlib.colors.Colormap, optional
        Colormap, used as given.
    vmin, vmax : float, optional
        Colour limits, used exactly. Both given must satisfy ``vmin < vmax``.
    log : bool, default False
        Logarithmic scale (values <= 0 are drawn as missing; ``vmin`` must then be > 0).
    center : float, optional
        Centre of a signed scale (default 0).
    diverging : bool, optional
        Treat the values as signed (True) or unsigned (False) whatever the variable.
    scale : {"auto", "symmetric", "one-sided"}, default "auto"
        How limits of signed values are completed from the data (see the rule above).

    Returns
    -------
    (matplotlib.colors.Colormap, matplotlib.colors.Normalize)
        The colormap (with NaN drawn in :data:`MISSING_COLOR`) and the norm.

    Raises
    ------
    attnformat.AttnFormatError
        For limits that are not finite, ``vmin >= vmax``, a log scale with ``vmin <= 0`` or an
        unknown ``scale``.

    Examples
    --------
    An all-negative bias gets a one-sided scale over its own range:

    >>> cmap, norm = color_scale(np.array([-5.0, -1.0]), variable="bias")
    >>> cmap.name, norm.vmin, norm.vmax
    ('Blues_r', -5.0, -1.0)

    Logits of both signs are symmetric about 0; limits given by the user always win:

    >>> color_scale(np.array([-2.0, 3.0]), variable="logits")[1].vmin
    -3.0
    >>> norm = color_scale(np.array([-2.0, 3.0]), variable="logits", vmin=-6, vmax=-1)[1]
    >>> type(norm).__name__, norm.vmin, norm.vmax
    ('Normalize', -6.0, -1.0)
    """
    if scale not in SCALES:
        raise AttnFormatError(f"colour scale must be one of {', '.join(SCALES)}, not {scale!r}")
    vmin, vmax = _checked_limit("vmin", vmin), _checked_limit("vmax", vmax)
    if vmin is not None and vmax is not None and not vmin < vmax:
        raise AttnFormatError(f"colour limits must satisfy vmin < vmax, got vmin={vmin}, vmax={vmax}")
    signed = is_diverging(variable, center) if diverging is None else bool(diverging)
    if log:
        norm, name = _log_scale(values, vmin, vmax), SEQUENTIAL_CMAP
    elif not signed:
        limits = finite_range(values)
        if vmin is None and vmax is None:
            low, high = _widened(*limits, signed=False) if limits else (0.0, 1.0)
        elif vmax is None:
            low, high = vmin, _other_limit(vmin, limits and limits[1], upper=True)
        elif vmin is None:
            low, high = _other_limit(vmax, limits and limits[0], upper=False), vmax
        else:
            low, high = vmin, vmax
        norm, name = Normalize(vmin=low, vmax=high), SEQUENTIAL_CMAP
    else:
        center = 0.0 if center is None else float(center)
        low, high = _signed_limits(finite_range(values), vmin, vmax, center, scale)
        norm = TwoSlopeNorm(vcenter=center, vmin=low, vmax=high) if low < center < high else Normalize(vmin=low, vmax=high)
        name = _side_cmap(low, high, center)
    chosen = name if cmap is None else cmap
    colormap = colormaps[chosen] if isinstance(chosen, str) else chosen
    return colormap.with_extremes(bad=MISSING_COLOR), norm


def _signed_limits(limits, vmin, vmax, center: float, scale: str) -> tuple[float, float]:
    if vmin is not None and vmax is not None:
        return vmin, vmax
    if vmin is not None:
        if scale == "symmetric" and vmin < center:
            return vmin, 2 * center - vmin
        return vmin, _other_limit(vmin, limits and limits[1], upper=True)
    if vmax is not None:
        if scale == "symmetric" and vmax > center:
            return 2 * center - vmax, vmax
        return _other_limit(vmax, limits and limits[0], upper=False), vmax
    if limits is None:
        return center - 1.0, center + 1.0
    low, high = limits
    straddles = low < center < high
    if scale == "symmetric" or (scale == "auto" and straddles):
        half = max(abs(low - center), abs(high - center)) or 1.0
        return center - half, center + half
    return _widened(low, high, signed=True)


def colorbar_extend(values, norm) -> str:
    """``"neither"``, ``"min"``, ``"max"`` or ``"both"``: which ends of the colorbar get an arrow
    because some finite values lie beyond the norm's limits (user limits clip the data).

    Parameters
    ----------
    values : array_like
        The drawn values.
    norm : matplotlib.colors.Normalize
        The norm they are drawn with.

    Examples
    --------
    >>> colorbar_extend(np.array([-3.0, 0.5]), Normalize(vmin=-1.0, vmax=1.0))
    'min'
    >>> colorbar_extend(np.array([0.0, 0.5]), LogNorm(vmin=0.1, vmax=1.0))
    'neither'
    """
    values = np.asarray(values, dtype=np.float64)
    if isinstance(norm, LogNorm):  # values <= 0 are drawn as missing on a log scale, not clipped
        values = values[values > 0]
    limits = finite_range(values)
    if limits is None:
        return "neither"
    below, above = limits[0] < norm.vmin, limits[1] > norm.vmax
    return {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[(below, above)]


def labelled_colorbar(mappable, *, ax, label: str, values=None, **options):
    """A colorbar that says what the colours mean, shows where limits clip the data, and has no
    tick outside its range.

    Matplotlib keeps the labels of ticks beyond a colorbar's ends as (undrawn) texts; fixing the
    ticks to the ones inside the range keeps them from being measured by layout checks or drawn
    over a neighbouring panel.

    Parameters
    ----------
    mappable : matplotlib.cm.ScalarMappable
        The drawn artist (or a ``ScalarMappable(norm, cmap)`` standing for several).
    ax : matplotlib.axes.Axes or list of Axes
        The Axes the colorbar takes its room from.
    label : str
        What the colours mean (``weights (softmax)``, ``bias (additive)``...).
    values : array_like, optional
        The drawn values; arrows mark the ends beyond which some of them lie (see :func:`colorbar_extend`).
    **options
        Passed to :meth:`matplotlib.figure.Figure.colorbar` (``fraction``, ``shrink``...).

    Returns
    -------
    matplotlib.colorbar.Colorbar

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> from matplotlib.cm import ScalarMappable
    >>> figure, ax = plt.subplots()
    >>> bar = labelled_colorbar(ScalarMappable(Normalize(0.05, 0.62)), ax=ax, label="weights (softmax)")
    >>> [round(float(t), 1) for t in bar.get_ticks()], bar.ax.get_ylabel()
    ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 'weights (softmax)')
    """
    figure = (ax if hasattr(ax, "figure") else np.ravel(np.asarray(ax, dtype=object))[0]).figure
    if values is not None:
        options.setdefault("extend", colorbar_extend(values, mappable.norm))
    colorbar = figure.colorbar(mappable, ax=ax, label=label, **options)
    low, high = sorted((float(mappable.norm.vmin), float(mappable.norm.vmax)))
    tolerance = 1e-9 * max(abs(low), abs(high), 1e-300)
    inside = [t for t in colorbar.get_ticks() if low - tolerance <= t <= high + tolerance]
    colorbar.set_ticks(inside if inside else [low, high])
    return colorbar


def masked(values) -> np.ma.MaskedArray:
    """Values with NaN and +/-inf masked, so they draw in :data:`MISSING_COLOR`.

    Parameters
    ----------
    values : array_like
        Any array.

    Examples
    --------
    >>> masked(np.array([1.0, np.nan, -np.inf])).mask.tolist()
    [False, True, True]
    """
    return np.ma.masked_invalid(np.asarray(values))
