"""Attention against a pairwise quantity (seed 002: C-alpha distances, geometric bias).

Logits in the file include the bias, so the logits before the bias are ``logits - bias``. Every map
is compared with its own pairwise values: a distance stored per sample (or step, or layer) is
selected with the same selectors as the weights, and reducing over a dimension the distance has
(``sample="mean"``) is refused, since no single distance would then belong to the averaged map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.patches import Patch

from attnformat.errors import SelectionError
from attnformat.viewer.colors import BAR_COLOR, color_scale
from attnformat.viewer.docs import documented, register
from attnformat.viewer.heatmaps import draw_map
from attnformat.viewer.output import (
    MAX_FIGSIZE,
    TICK_FONTSIZE,
    TITLE_FONTSIZE,
    MapPanel,
    axes_or_new,
    grid,
    layout_maps,
    new_figure,
)
from attnformat.viewer.selection import REDUCTIONS, Selection, position, resolve_site, select, site_name
from attnformat.viewer.statistics import DEFAULT_THRESHOLD

LOCAL_COLOR = "#DE8F05"
GLOBAL_COLOR = BAR_COLOR
#: Colour of the attention curve in query profiles and of the bias curve in distance profiles.
ATTENTION_COLOR = "#029E73"
#: Overview panels, in seed 002's order; keys of ``scales`` in :func:`pairwise_overview`.
OVERVIEW_PANELS = ("logits_before_bias", "bias", "logits", "weights", "pairwise")
# Width (inches) a per-panel colorbar with its tick labels and label takes beside its panel.
_COLORBAR_WIDTH = 1.1

register(
    pairwise_selectors="""
        layer, sample, step : int or str, optional
            Which map: a label or a position; unset, the first. A reduction (``"mean"``) over a
            dimension the pairwise variable has is refused (each map needs its own distances).
        head : int, str or {"mean", "max"}, default 0
            Head 0 by default (seed 002 looks at one head at a time; ignored without heads).
    """,
    pairwise_data="""
        data : PairwiseData, optional
            Already prepared data (from :func:`pairwise_data`); the selection arguments are then ignored.
    """,
    overview_color="""
        cmap, vmin, vmax, center : optional
            Colour options of the three signed panels (logits before bias, bias, logits) and of the
            scatter's bias colours, used as given (see :func:`attnformat.viewer.colors.color_scale`);
            given limits make those panels share them.
        scale : {"auto", "symmetric", "one-sided"}, default "auto"
            How signed limits are completed from the data; "auto" is one-sided for all-negative or
            all-positive data (seed 002's ``Blues_r`` bias) and symmetric about 0 otherwise.
    """,
)


def pairwise_variable(site, name: str | None = None) -> str:
    """Name of the pairwise auxiliary to plot against: ``name``, else ``distance``, else the first with ``role="pairwise"``.

    Parameters
    ----------
    site : xarray.DataTree
        The site group.
    name : str, optional
        The variable wanted (checked to exist and to be pairwise).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import resolve_site
    >>> pairwise_variable(resolve_site(attnformat.example_path("steps")))
    'distance'
    """
    pairwise = [n for n, v in site.data_vars.items() if v.attrs.get("role") == "pairwise"]
    if name is not None:
        if name not in pairwise:
            raise SelectionError(f"pairwise variable {name!r} not in file {site.root.encoding.get('source', '')}, site "
                                 f"{site_name(site)}; pairwise variables: {', '.join(pairwise) or '(none)'}")
        return name
    if not pairwise:
        raise SelectionError(f"site {site_name(site)} of {site.root.encoding.get('source', 'the tree')} holds no pairwise "
                             f"variable (role='pairwise', e.g. a distance matrix); variables: {', '.join(site.data_vars)}")
    return "distance" if "distance" in pairwise else pairwise[0]


def _with_units(label: str, units: str) -> str:
    return f"{label} [{units}]" if units else label


@dataclass
class PairwiseData:
    """One map of weights (and logits and bias when stored) with the matching pairwise values."""

    weights: Selection
    pairwise: np.ndarray
    pairwise_name: str
    units: str
    threshold: float
    logits: np.ndarray | None = None
    bias: np.ndarray | None = None
    logits_units: str = ""
    bias_units: str = ""

    @property
    def logits_before_bias(self) -> np.ndarray | None:
        """``logits - bias``: what the scores were before the additive bias."""
        if self.logits is None or self.bias is None:
            return None
        return self.logits - self.bias

    @property
    def local(self) -> np.ndarray:
        """True where the pairwise value is below the threshold (the neighbourhood)."""
        with np.errstate(invalid="ignore"):
            return self.pairwise < self.threshold

    @property
    def far(self) -> np.ndarray:
        """True where the pairwise value is at or beyond the threshold (NaN distances are neither)."""
        with np.errstate(invalid="ignore"):
            return self.pairwise >= self.threshold

    def local_global(self) -> tuple[float, float, float]:
        """``(local mean, global mean, local/global ratio)`` of the weights (NaN when a side is empty)."""
        weights = np.asarray(self.weights.values, dtype=np.float64)
        valid = np.isfinite(weights)
        local = weights[valid & self.local]
        far = weights[valid & self.far]
        local_mean = float(local.mean()) if local.size else float("nan")
        global_mean = float(far.mean()) if far.size else float("nan")
        ratio = local_mean / global_mean if far.size and local.size and global_mean != 0 else float("nan")
        return local_mean, global_mean, ratio

    @property
    def label(self) -> str:
        """``distance (angstrom)``."""
        return f"{self.pairwise_name} ({self.units})" if self.units else self.pairwise_name

    def threshold_text(self) -> str:
        """``8 angstrom``."""
        return f"{self.threshold:g} {self.units}".strip()

    def logits_label(self, what: str = "logits") -> str:
        """Colorbar label of a logits panel, with units when the file gives them."""
        normalization = self.weights.attrs.get("normalization", "other")
        base = f"{what} (pre-{normalization})" if normalization != "other" else what
        return _with_units(base, self.logits_units)

    @property
    def bias_label(self) -> str:
        """``bias (additive)``, with units when the file gives them."""
        return _with_units("bias (additive)", self.bias_units)


@documented
def pairwise_data(source, *, site=None, pairwise=None, threshold: float = DEFAULT_THRESHOLD, layer=None, head=0,
                  sample=None, step=None) -> PairwiseData:
    """Select one map of weights, logits and bias with the pairwise values it is compared with.

    Unlike most plots, ``head`` defaults to head 0 (seed 002 looks at one head at a time). The
    pairwise variable is selected with the same selectors along every dimension it shares with the
    weights (a distance per sample gives the chosen sample's distances).

    Parameters
    ----------
    $source
    $site
    $pairwise_name
    $locality_threshold
    $pairwise_selectors

    Raises
    ------
    attnformat.SelectionError
        When the site has no pairwise variable, or a reduction would average over maps whose
        pairwise values differ.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import pairwise_data
    >>> data = pairwise_data(attnformat.example_path("steps"), step=200)
    >>> data.pairwise.shape, data.label, data.logits_before_bias.shape
    ((10, 10), 'distance (angstrom)', (10, 10))
    """
    site_node = resolve_site(source, site)
    name = pairwise_variable(site_node, pairwise)
    if head == 0 and "head" not in site_node["weights"].dims:
        head = None  # the default head 0 on a site without heads
    selectors = dict(layer=layer, head=head, sample=sample, step=step)
    pairwise_dims = site_node[name].dims
    weights_dims = site_node["weights"].dims
    extra = [d for d in pairwise_dims[:-2] if d not in weights_dims]
    if pairwise_dims[-2:] != ("query", "key") or extra:
        raise SelectionError(f"{site_node.root.encoding.get('source', 'the tree')}, site {site_name(site_node)}: pairwise "
                             f"{name!r} has dimensions {pairwise_dims}; it must end in (query, key) and have no "
                             f"dimension the weights lack")
    reduced = [d for d in pairwise_dims[:-2] if isinstance(selectors.get(d), str) and selectors[d] in REDUCTIONS]
    if reduced:
        raise SelectionError(f"{site_node.root.encoding.get('source', 'the tree')}, site {site_name(site_node)}: cannot "
                             f"take the {selectors[reduced[0]]} over {reduced[0]}: {name!r} differs along it, so no "
                             f"single {name} belongs to the reduced map; choose one {reduced[0]}")
    weights = select(site_node, "weights", drop_padding=False, **selectors)

    def matching(variable):
        # The same selectors (so the same defaults) along the dimensions the variable has.
        dims = site_node[variable].dims
        return select(site_node, variable, drop_padding=False, **{d: v for d, v in selectors.items() if d in dims}).values

    variables = site_node.data_vars
    return PairwiseData(
        weights=weights, pairwise=np.asarray(matching(name), dtype=np.float64), pairwise_name=name,
        units=str(site_node[name].attrs.get("units", "")), threshold=float(threshold),
        logits=np.asarray(matching("logits"), dtype=np.float64) if "logits" in variables else None,
        bias=np.asarray(matching("bias"), dtype=np.float64) if "bias" in variables else None,
        logits_units=str(variables["logits"].attrs.get("units", "")) if "logits" in variables else "",
        bias_units=str(variables["bias"].attrs.get("units", "")) if "bias" in variables else "",
    )


def _prepared(data, source, **arguments) -> PairwiseData:
    return data if data is not None else pairwise_data(source, **arguments)


@documented
def attention_vs_distance(source, *, site=None, pairwise=None, threshold: float = DEFAULT_THRESHOLD, layer=None, head=0,
                          sample=None, step=None, color_by_bias: bool = False, cmap=None, vmin=None, vmax=None,
                          center=None, scale: str = "auto", colorbar: bool = True, ax=None, figsize=None, title=None,
                          data: PairwiseData | None = None):
    """Scatter of attention weight against the pairwise value, split into local and global at ``threshold``.

    Each point is one (query, key) pair at (pairwise value, weight). Without ``color_by_bias`` the
    first collection holds the local pairs (below ``threshold``), the second the global ones; the
    title gives both means and their ratio (seed 002's health check: local/global of about 2-5).
    With ``color_by_bias`` one collection holds every pair coloured by its bias, with a colorbar.

    Parameters
    ----------
    $source
    $site
    $pairwise_name
    $locality_threshold
    $pairwise_selectors
    color_by_bias : bool, default False
        Colour the points by the bias (seed 002's sixth overview panel); needs a ``bias`` variable.
    $overview_color
    $colorbar
    $ax
    $figsize
    $title
    $pairwise_data

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import attention_vs_distance
    >>> ax = attention_vs_distance(attnformat.example_path("steps"), step=100)
    >>> len(ax.collections)
    2
    """
    data = _prepared(data, source, site=site, pairwise=pairwise, threshold=threshold, layer=layer, head=head,
                     sample=sample, step=step)
    ax = axes_or_new(ax, figsize)
    weights = np.asarray(data.weights.values, dtype=np.float64)
    local, far = data.local, data.far
    if color_by_bias:
        if data.bias is None:
            raise SelectionError(f"site {data.weights.site} of {data.weights.source} stores no bias to colour by")
        colormap, norm = color_scale(data.bias, variable="bias", cmap=cmap, vmin=vmin, vmax=vmax, center=center, scale=scale)
        points = ax.scatter(data.pairwise.ravel(), weights.ravel(), c=data.bias.ravel(), cmap=colormap, norm=norm, s=12,
                            edgecolors="0.4", linewidths=0.3)
        if colorbar:
            ax.figure.colorbar(points, ax=ax, label=data.bias_label)
    else:
        ax.scatter(data.pairwise[local], weights[local], s=10, color=LOCAL_COLOR, label=f"local (< {data.threshold_text()})")
        ax.scatter(data.pairwise[far], weights[far], s=10, color=GLOBAL_COLOR, alpha=0.6, label="global")
        ax.legend(fontsize=8)
    ax.axvline(data.threshold, color="black", linestyle=":", linewidth=1)
    local_mean, global_mean, ratio = data.local_global()
    ax.set_xlabel(data.label)
    ax.set_ylabel(data.weights.normalization)
    ax.set_title(f"{data.weights.title()}\nlocal mean {local_mean:.4f}, global mean {global_mean:.4f}, "
                 f"local/global {ratio:.2f}" if title is None else title, fontsize=TITLE_FONTSIZE)
    return ax


def binned_means(x, y, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of ``y`` in equal-width bins of ``x``: ``(bin centres, means, counts)``; empty bins are NaN.

    Parameters
    ----------
    x, y : array_like
        Paired values (NaN pairs are left out).
    bins : int, default 10
        Number of equal-width bins between the smallest and largest ``x``.

    Examples
    --------
    >>> centres, means, counts = binned_means([0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 5.0, 7.0], bins=2)
    >>> centres.tolist(), means.tolist(), counts.tolist()
    ([0.75, 2.25], [2.0, 6.0], [2, 2])
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    valid = np.isfinite(x) & np.isfinite(y)
    x, y = x[valid], y[valid]
    if x.size == 0:
        return np.array([]), np.array([]), np.array([], dtype=int)
    edges = np.linspace(x.min(), x.max() if x.max() > x.min() else x.min() + 1.0, bins + 1)
    which = np.clip(np.digitize(x, edges) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    sums = np.bincount(which, weights=y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return (edges[:-1] + edges[1:]) / 2, means, counts


@documented
def distance_profile(source, *, site=None, pairwise=None, variable="weights", bins: int = 10,
                     threshold: float = DEFAULT_THRESHOLD, layer=None, head=0, sample=None, step=None, ax=None,
                     figsize=None, title=None, data: PairwiseData | None = None):
    """Binned mean attention (or bias, or logits) against the pairwise value: does attention decay with distance?

    Parameters
    ----------
    $source
    $site
    $pairwise_name
    variable : {"weights", "bias", "logits"}, default "weights"
        What to average per bin.
    bins : int, default 10
        Equal-width bins of the pairwise value.
    $locality_threshold
    $pairwise_selectors
    $ax
    $figsize
    $title
    $pairwise_data

    Returns
    -------
    matplotlib.axes.Axes
        ``ax.lines[0]`` holds the bin centres and means (see :func:`binned_means`).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import distance_profile
    >>> ax = distance_profile(attnformat.example_path("steps"), bins=5)
    >>> len(ax.lines[0].get_xdata())
    5
    """
    data = _prepared(data, source, site=site, pairwise=pairwise, threshold=threshold, layer=layer, head=head,
                     sample=sample, step=step)
    values = {"weights": np.asarray(data.weights.values, dtype=np.float64), "bias": data.bias, "logits": data.logits}.get(variable)
    if values is None:
        raise SelectionError(f"variable {variable!r} not in file {data.weights.source}, site {data.weights.site}")
    centres, means, _ = binned_means(data.pairwise, values, bins)
    ax = axes_or_new(ax, figsize)
    ax.plot(centres, means, "o-", color=BAR_COLOR if variable == "weights" else ATTENTION_COLOR)
    ax.axvline(data.threshold, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel(data.label)
    units = {"weights": "", "bias": data.bias_units, "logits": data.logits_units}[variable]
    ax.set_ylabel(_with_units(f"mean {variable}", units))
    ax.set_title(f"{data.weights.title()}\nmean {variable} in {bins} {data.pairwise_name} bins" if title is None else title,
                 fontsize=TITLE_FONTSIZE)
    ax.grid(True, alpha=0.3)
    return ax


@documented
def local_global_histogram(data: PairwiseData, ax=None, *, figsize=None, title=None):
    """Histograms of local and global weights (seed 002's "local vs global distribution").

    Parameters
    ----------
    data : PairwiseData
        Prepared data (:func:`pairwise_data`).
    $ax
    $figsize
    $title

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import pairwise_data
    >>> ax = local_global_histogram(pairwise_data(attnformat.example_path("steps")))
    >>> [text.get_text() for text in ax.get_legend().get_texts()]
    ['local (< 8 angstrom)', 'global']
    """
    ax = axes_or_new(ax, figsize)
    weights = np.asarray(data.weights.values, dtype=np.float64)
    valid = np.isfinite(weights)
    ax.hist(weights[valid & data.local], bins=20, alpha=0.6, color=LOCAL_COLOR, label=f"local (< {data.threshold_text()})", density=True)
    ax.hist(weights[valid & data.far], bins=20, alpha=0.6, color=GLOBAL_COLOR, label="global", density=True)
    local_mean, global_mean, ratio = data.local_global()
    ax.set_xlabel(data.weights.normalization)
    ax.set_ylabel("density")
    ax.set_title(f"local {local_mean:.4f} vs global {global_mean:.4f} (ratio {ratio:.2f})" if title is None else title,
                 fontsize=TITLE_FONTSIZE)
    ax.legend(fontsize=8)
    return ax


@documented
def distance_statistics(source, *, site=None, pairwise=None, bins: int = 10, threshold: float = DEFAULT_THRESHOLD,
                        layer=None, head=0, sample=None, step=None, figsize=None, title=None):
    """Seed 002's 1x3 statistics: mean attention vs distance, bias vs distance, local vs global histograms.

    Parameters
    ----------
    $source
    $site
    $pairwise_name
    bins : int, default 10
        Equal-width bins of the pairwise value.
    $locality_threshold
    $pairwise_selectors
    $figsize
    $title

    Returns
    -------
    matplotlib.figure.Figure
        Three Axes (two without a bias): weights per bin, bias per bin, histograms.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import distance_statistics
    >>> len(distance_statistics(attnformat.example_path("steps")).axes)
    3
    """
    data = pairwise_data(source, site=site, pairwise=pairwise, threshold=threshold, layer=layer, head=head, sample=sample, step=step)
    panels = 3 if data.bias is not None else 2
    figure, axes = grid(panels, ncols=panels, panel_size=(4.6, 4.0), figsize=figsize)
    distance_profile(None, data=data, bins=bins, ax=axes[0], title=f"average attention vs {data.pairwise_name}")
    if data.bias is not None:
        distance_profile(None, data=data, variable="bias", bins=bins, ax=axes[1], title=f"bias vs {data.pairwise_name}")
    local_global_histogram(data, ax=axes[-1])
    figure.suptitle(data.weights.title() if title is None else title, fontsize=10)
    return figure


@documented
def pairwise_overview(source, *, site=None, pairwise=None, threshold: float = DEFAULT_THRESHOLD, layer=None, head=0,
                      sample=None, step=None, cmap=None, vmin=None, vmax=None, center=None, scale: str = "auto",
                      scales: dict | None = None, figsize=None, title=None):
    """Seed 002's 2x3 overview: logits before bias, bias, logits, weights, the pairwise matrix, and
    weights against it coloured by bias.

    Every panel has its own colorbar, labelled with what it shows (and units where the file gives
    them): ``logits (pre-softmax)``, ``bias (additive)``, ``weights (softmax)``, ``distance
    (angstrom)``. Signed panels use :func:`attnformat.viewer.colors.color_scale`'s rule: symmetric
    about 0 when the data have both signs, one-sided (``Blues_r`` for an all-negative bias) when
    not. Colour options given by the user win: ``cmap``/``vmin``/``vmax``/``center``/``scale``
    apply to the signed panels and the scatter; ``scales`` sets any panel's options.

    Parameters
    ----------
    $source
    $site
    $pairwise_name
    $locality_threshold
    $pairwise_selectors
    $overview_color
    scales : dict, optional
        Per panel, keyword options of :func:`~attnformat.viewer.colors.color_scale` (``cmap``,
        ``vmin``, ``vmax``, ``center``, ``scale``, ``log``), keyed by ``"logits_before_bias"``,
        ``"bias"``, ``"logits"``, ``"weights"`` or ``"pairwise"``; they override the options above.
        The scatter's colours follow the ``"bias"`` panel.
    $figsize
    $title

    Returns
    -------
    matplotlib.figure.Figure
        Six panels in reading order, then their six colorbars.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import pairwise_overview
    >>> figure = pairwise_overview(attnformat.example_path("steps"), step=300)
    >>> [ax.get_title().split(":")[0] for ax in figure.axes[:3]]
    ['logits before bias (logits - bias)', 'bias (additive)', 'logits (after bias)']
    >>> figure.axes[7].get_ylabel()
    'bias (additive)'
    """
    data = pairwise_data(source, site=site, pairwise=pairwise, threshold=threshold, layer=layer, head=head, sample=sample, step=step)
    if data.logits is None or data.bias is None:
        raise SelectionError(f"the overview needs logits and bias; site {data.weights.site} of {data.weights.source} "
                             f"holds: weights{', logits' if data.logits is not None else ''}{', bias' if data.bias is not None else ''}")
    unknown = sorted(set(scales or {}) - set(OVERVIEW_PANELS))
    if unknown:
        raise SelectionError(f"no overview panel {', '.join(unknown)}; panels: {', '.join(OVERVIEW_PANELS)}")
    signed = {k: v for k, v in dict(cmap=cmap, vmin=vmin, vmax=vmax, center=center, scale=scale).items() if v is not None}
    options = {"logits_before_bias": dict(signed, variable="logits"), "bias": dict(signed, variable="bias"),
               "logits": dict(signed, variable="logits"), "weights": {"variable": "weights"},
               "pairwise": {"variable": "pairwise", "cmap": "viridis_r", "diverging": False}}
    for panel, given in (scales or {}).items():
        options[panel].update(given)
    query_labels, key_labels = data.weights.query_labels, data.weights.key_labels
    rows, cols = np.shape(data.pairwise)
    heading = data.weights.title() if title is None else title
    map_panels = [MapPanel(rows, cols, tuple(query_labels), tuple(key_labels), title="panel")] * 5
    map_panels.append(MapPanel(rows, cols, (), (), title="panel"))
    # Each panel has its own colorbar: the maps get what is left beside three colorbars.
    bars = 3 * _COLORBAR_WIDTH
    given = None if figsize is None else (max(1.0, float(figsize[0]) - bars), float(figsize[1]))
    layout = layout_maps(map_panels, ncols=3, figsize=given, colorbar=False, suptitle=heading)
    if figsize is None and layout.figsize[0] + bars > MAX_FIGSIZE[0]:  # stay within the largest default size
        layout = layout_maps(map_panels, ncols=3, figsize=(MAX_FIGSIZE[0] - bars, layout.figsize[1]), colorbar=False,
                             suptitle=heading)
    figure = new_figure(figsize if figsize is not None else (layout.figsize[0] + bars, layout.figsize[1]))
    axes = [figure.add_subplot(2, 3, i + 1) for i in range(6)]
    steps = layout.steps(rows, cols)
    panels = [
        ("logits before bias (logits - bias)", data.logits_before_bias, "logits_before_bias", data.logits_label("logits before bias")),
        ("bias (additive)", data.bias, "bias", data.bias_label),
        ("logits (after bias)", data.logits, "logits", data.logits_label()),
        (data.weights.normalization, np.asarray(data.weights.values, dtype=np.float64), "weights", data.weights.normalization),
        (data.label, data.pairwise, "pairwise", data.label),
    ]
    for ax, (panel_title, values, name, label) in zip(axes, panels):
        colormap, norm = color_scale(values, **options[name])
        image = draw_map(ax, values, cmap=colormap, norm=norm, title=panel_title, query_labels=query_labels,
                         key_labels=key_labels, steps=steps)
        figure.colorbar(image, ax=ax, label=label)
    bias_options = {k: v for k, v in options["bias"].items() if k in ("cmap", "vmin", "vmax", "center", "scale")}
    attention_vs_distance(None, data=data, color_by_bias=True, ax=axes[5], title=f"weights vs {data.pairwise_name}, coloured by bias",
                          **bias_options)
    figure.suptitle(heading, fontsize=11)
    return figure


@documented
def query_profiles(source, *, site=None, pairwise=None, queries=None, count: int = 4,
                   threshold: float = DEFAULT_THRESHOLD, layer=None, head=0, sample=None, step=None, ncols: int = 2,
                   figsize=None, title=None):
    """Attention of a few queries over all keys, with the bias and the neighbourhood (< threshold) shaded.

    ``queries`` are labels or positions; by default ``count`` evenly spaced queries (seed 002's 4).

    Parameters
    ----------
    $source
    $site
    $pairwise_name
    queries : list of int or str, optional
        Queries to draw (labels or positions).
    count : int, default 4
        How many evenly spaced queries when ``queries`` is None.
    $locality_threshold
    $pairwise_selectors
    ncols : int, default 2
        Panels per row.
    $figsize
    $title

    Returns
    -------
    matplotlib.figure.Figure
        One Axes per query (plus a twin Axes for the bias when the site stores one).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import query_profiles
    >>> figure = query_profiles(attnformat.example_path("steps"), queries=["R2", 7])
    >>> [ax.get_title() for ax in figure.axes[:2]]
    ['query R2', 'query R7']
    """
    site_node = resolve_site(source, site)
    data = pairwise_data(site_node, pairwise=pairwise, threshold=threshold, layer=layer, head=head, sample=sample, step=step)
    weights = np.asarray(data.weights.values, dtype=np.float64)
    if queries is None:
        rows = sorted(set(np.linspace(0, weights.shape[0] - 1, min(count, weights.shape[0])).round().astype(int).tolist()))
    else:
        rows = [position(site_node, "query", q, sample=data.weights.positions.get("sample")) for q in queries]
    figure, axes = grid(len(rows), ncols=min(len(rows), ncols), panel_size=(5.0, 3.4), figsize=figsize)
    keys = np.arange(weights.shape[1])
    for ax, row in zip(axes, rows):
        ax.fill_between(keys, weights[row], color=ATTENTION_COLOR, alpha=0.5, label="attention")
        ax.plot(keys, weights[row], color=ATTENTION_COLOR, linewidth=1)
        near = data.local[row]
        for key in np.flatnonzero(near):
            ax.axvspan(key - 0.5, key + 0.5, color=LOCAL_COLOR, alpha=0.15, linewidth=0)
        ax.axvline(row, color="#D55E00", linestyle="--", linewidth=1, label="query position")
        ax.set_title(f"query {data.weights.query_labels[row]}", fontsize=TITLE_FONTSIZE)
        ax.set_xlabel(f"key (shaded: {data.pairwise_name} < {data.threshold_text()})")
        ax.set_ylabel(data.weights.normalization, fontsize=8)
        handles = ax.get_legend_handles_labels()[0]
        if data.bias is not None:
            twin = ax.twinx()
            twin.plot(keys, data.bias[row], linestyle="--", color=BAR_COLOR, label="bias")
            twin.set_ylabel(data.bias_label, fontsize=8)
            handles += twin.get_legend_handles_labels()[0]
        if row == rows[0]:
            handles.append(Patch(color=LOCAL_COLOR, alpha=0.3, label=f"neighbourhood (< {data.threshold_text()})"))
            ax.legend(handles=handles, fontsize=TICK_FONTSIZE, loc="upper right")
    figure.suptitle(f"{data.weights.title()} | query profiles" if title is None else title, fontsize=10)
    return figure
