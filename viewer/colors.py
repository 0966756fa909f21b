"""Colour scales: sequential for weights, diverging around 0 for logits and biases, logarithmic on request.

The diverging scale is symmetric about its centre, so it never needs ``vmin < vcenter < vmax``
from the data: all-negative biases (seed 002's ``TwoSlopeNorm`` crash), all-positive logits,
NaN and +/-inf all draw, with white at 0 and the colorbar centred.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Colormap, LogNorm, Normalize, TwoSlopeNorm

#: Variables whose sign means something (a diverging scale centred at 0 by default).
SIGNED_VARIABLES = ("logits", "bias")
SEQUENTIAL_CMAP = "viridis"
DIVERGING_CMAP = "RdBu_r"
#: Colour of NaN (not captured) and +/-inf (masked) cells.
MISSING_COLOR = "#d9d9d9"
#: First colour of seaborn's "colorblind" palette, which seed 004 uses for its bars.
BAR_COLOR = "#0173B2"


def is_diverging(variable: str, center: float | None = None) -> bool:
    """True when a variable is drawn on a diverging scale by default.

    Examples
    --------
    >>> is_diverging("logits"), is_diverging("weights")
    (True, False)
    """
    return center is not None or variable in SIGNED_VARIABLES


def finite_range(values) -> tuple[float, float] | None:
    """``(min, max)`` of the finite values, or None when there are none.

    Examples
    --------
    >>> finite_range(np.array([np.nan, -np.inf, -2.0, 3.0]))
    (-2.0, 3.0)
    """
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    return float(finite.min()), float(finite.max())


def color_scale(values, *, variable: str = "weights", cmap=None, vmin=None, vmax=None, log: bool = False,
                center: float | None = None, diverging: bool | None = None) -> tuple[Colormap, Normalize]:
    """Colormap and norm for ``values`` (one map or all maps that share a colorbar).

    Parameters
    ----------
    values
        The data (any shape; NaN and inf are ignored for the limits).
    variable
        ``logits`` and ``bias`` get a diverging scale by default.
    cmap, vmin, vmax
        Override the colormap and limits.
    log
        Logarithmic scale (non-positive values are drawn as missing).
    center
        Centre of a diverging scale (default 0).
    diverging
        Force (True) or refuse (False) a diverging scale.

    Examples
    --------
    >>> cmap, norm = color_scale(np.array([-5.0, -1.0]), variable="bias")
    >>> (norm.vmin, norm.vmax, float(norm(0.0)))
    (-5.0, 5.0, 0.5)
    """
    diverging = is_diverging(variable, center) if diverging is None else diverging
    limits = finite_range(values)
    if log:
        positive = np.asarray(values, dtype=np.float64)
        positive = positive[np.isfinite(positive) & (positive > 0)]
        low = vmin if vmin is not None and vmin > 0 else (float(positive.min()) if positive.size else 1e-6)
        high = vmax if vmax is not None else (float(positive.max()) if positive.size else 1.0)
        norm = LogNorm(vmin=low, vmax=max(high, low * 10) if high <= low else high)
        name = cmap or SEQUENTIAL_CMAP
    elif diverging:
        center = 0.0 if center is None else float(center)
        if vmin is not None and vmax is not None and vmin < center < vmax:
            norm = TwoSlopeNorm(vcenter=center, vmin=vmin, vmax=vmax)
        else:
            candidates = [abs(v - center) for v in ((vmin, vmax) if vmin is not None or vmax is not None else (limits or ()))
                          if v is not None]
            half = max(candidates, default=0.0) or 1.0
            norm = Normalize(vmin=center - half, vmax=center + half)
        name = cmap or DIVERGING_CMAP
    else:
        low = vmin if vmin is not None else (limits[0] if limits else 0.0)
        high = vmax if vmax is not None else (limits[1] if limits else 1.0)
        if high <= low:
            high = low + (abs(low) or 1.0) * 1e-3 if high == low else low + 1.0
        norm = Normalize(vmin=low, vmax=high)
        name = cmap or SEQUENTIAL_CMAP
    colormap = (colormaps[name] if isinstance(name, str) else name).with_extremes(bad=MISSING_COLOR)
    return colormap, norm


def masked(values) -> np.ma.MaskedArray:
    """Values with NaN and +/-inf masked, so they draw in :data:`MISSING_COLOR`.

    Examples
    --------
    >>> masked(np.array([1.0, np.nan, -np.inf])).mask.tolist()
    [False, True, True]
    """
    return np.ma.masked_invalid(np.asarray(values))
