"""Attention against a pairwise quantity (seed 002: C-alpha distances, geometric bias).

Logits in the file include the bias, so the logits before the bias are ``logits - bias``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.patches import Patch

from attnformat.errors import SelectionError
from attnformat.viewer.colors import BAR_COLOR, color_scale
from attnformat.viewer.heatmaps import draw_map
from attnformat.viewer.output import axes_or_new, grid
from attnformat.viewer.selection import Selection, position, resolve_site, select, site_name

#: Seed 002's neighbourhood: residues closer than 8 angstrom are "local".
DEFAULT_THRESHOLD = 8.0
LOCAL_COLOR = "#DE8F05"
GLOBAL_COLOR = BAR_COLOR


def pairwise_variable(site, name: str | None = None) -> str:
    """Name of the pairwise auxiliary to plot against: ``name``, else the first with ``role="pairwise"``.

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

    def local_global(self) -> tuple[float, float, float]:
        """``(local mean, global mean, local/global ratio)`` of the weights (NaN when a side is empty)."""
        weights = np.asarray(self.weights.values, dtype=np.float64)
        valid = np.isfinite(weights) & np.isfinite(self.pairwise)
        local = weights[valid & self.local]
        far = weights[valid & ~self.local]
        local_mean = float(local.mean()) if local.size else float("nan")
        global_mean = float(far.mean()) if far.size else float("nan")
        ratio = local_mean / global_mean if far.size and local.size and global_mean != 0 else float("nan")
        return local_mean, global_mean, ratio

    @property
    def label(self) -> str:
        """``distance (angstrom)``."""
        return f"{self.pairwise_name} ({self.units})" if self.units else self.pairwise_name

    def threshold_text(self) -> str:
        return f"{self.threshold:g} {self.units}".strip()


def pairwise_data(source, *, site=None, pairwise=None, threshold: float = DEFAULT_THRESHOLD, layer=None, head=0,
                  sample=None, step=None) -> PairwiseData:
    """Select one map of weights, logits and bias with the pairwise values it is compared with.

    Unlike most plots, ``head`` defaults to head 0 (seed 002 looks at one head at a time).

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
    selectors = dict(layer=layer, head=head, sample=sample, step=step)
    weights = select(site_node, "weights", drop_padding=False, **selectors)

    def matching(variable):
        dims = site_node[variable].dims
        return select(site_node, variable, drop_padding=False, **{d: v for d, v in selectors.items() if d in dims}).values

    variables = site_node.data_vars
    return PairwiseData(
        weights=weights, pairwise=np.asarray(matching(name), dtype=np.float64), pairwise_name=name,
        units=str(site_node[name].attrs.get("units", "")), threshold=float(threshold),
        logits=np.asarray(matching("logits"), dtype=np.float64) if "logits" in variables else None,
        bias=np.asarray(matching("bias"), dtype=np.float64) if "bias" in variables else None,
    )


def attention_vs_distance(source, *, site=None, pairwise=None, threshold: float = DEFAULT_THRESHOLD, layer=None, head=0,
                          sample=None, step=None, color_by_bias: bool = False, ax=None, data: PairwiseData | None = None):
    """Scatter of attention weight against the pairwise value, split into local and global at ``threshold``.

    The first collection holds the local pairs, the second the global ones; the title gives both
    means and their ratio (seed 002's health check: local/global of about 2-5).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import attention_vs_distance
    >>> ax = attention_vs_distance(attnformat.example_path("steps"), step=100)
    >>> len(ax.collections)
    2
    """
    data = data or pairwise_data(source, site=site, pairwise=pairwise, threshold=threshold, layer=layer, head=head,
                                 sample=sample, step=step)
    ax = axes_or_new(ax)
    weights = np.asarray(data.weights.values, dtype=np.float64)
    local = data.local
    if color_by_bias and data.bias is not None:
        cmap, norm = color_scale(data.bias, variable="bias")
        points = ax.scatter(data.pairwise.ravel(), weights.ravel(), c=data.bias.ravel(), cmap=cmap, norm=norm, s=12,
                            edgecolors="0.4", linewidths=0.3)
        ax.figure.colorbar(points, ax=ax, label="bias (additive)")
    else:
        ax.scatter(data.pairwise[local], weights[local], s=10, color=LOCAL_COLOR, label=f"local (< {data.threshold_text()})")
        ax.scatter(data.pairwise[~local], weights[~local], s=10, color=GLOBAL_COLOR, alpha=0.6, label="global")
        ax.legend(fontsize=8)
    ax.axvline(data.threshold, color="black", linestyle=":", linewidth=1)
    local_mean, global_mean, ratio = data.local_global()
    ax.set_xlabel(data.label)
    ax.set_ylabel(data.weights.normalization)
    ax.set_title(f"{data.weights.title()}\nlocal mean {local_mean:.4f}, global mean {global_mean:.4f}, "
                 f"local/global {ratio:.2f}", fontsize=9)
    return ax


def binned_means(x, y, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of ``y`` in equal-width bins of ``x``: ``(bin centres, means, counts)``; empty bins are NaN.

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


def distance_profile(source, *, site=None, pairwise=None, variable="weights", bins: int = 10,
                     threshold: float = DEFAULT_THRESHOLD, layer=None, head=0, sample=None, step=None, ax=None,
                     data: PairwiseData | None = None):
    """Binned mean attention (or bias) against the pairwise value: does attention decay with distance?

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import distance_profile
    >>> ax = distance_profile(attnformat.example_path("steps"), bins=5)
    >>> len(ax.lines[0].get_xdata())
    5
    """
    data = data or pairwise_data(source, site=site, pairwise=pairwise, threshold=threshold, layer=layer, head=head,
                                 sample=sample, step=step)
    values = {"weights": np.asarray(data.weights.values, dtype=np.float64), "bias": data.bias, "logits": data.logits}.get(variable)
    if values is None:
        raise SelectionError(f"variable {variable!r} not in file {data.weights.source}, site {data.weights.site}")
    centres, means, _ = binned_means(data.pairwise, values, bins)
    ax = axes_or_new(ax)
    ax.plot(centres, means, "o-", color=BAR_COLOR if variable == "weights" else "#029E73")
    ax.axvline(data.threshold, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel(data.label)
    ax.set_ylabel(f"mean {variable}")
    ax.set_title(f"{data.weights.title()}\nmean {variable} in {bins} {data.pairwise_name} bins", fontsize=9)
    ax.grid(True, alpha=0.3)
    return ax


def local_global_histogram(data: PairwiseData, ax=None):
    """Histograms of local and global weights (seed 002's "local vs global distribution").

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import pairwise_data
    >>> ax = local_global_histogram(pairwise_data(attnformat.example_path("steps")))
    >>> [text.get_text() for text in ax.get_legend().get_texts()]
    ['local (< 8 angstrom)', 'global']
    """
    ax = axes_or_new(ax)
    weights = np.asarray(data.weights.values, dtype=np.float64)
    valid = np.isfinite(weights) & np.isfinite(data.pairwise)
    ax.hist(weights[valid & data.local], bins=20, alpha=0.6, color=LOCAL_COLOR, label=f"local (< {data.threshold_text()})", density=True)
    ax.hist(weights[valid & ~data.local], bins=20, alpha=0.6, color=GLOBAL_COLOR, label="global", density=True)
    local_mean, global_mean, ratio = data.local_global()
    ax.set_xlabel(data.weights.normalization)
    ax.set_ylabel("density")
    ax.set_title(f"local {local_mean:.4f} vs global {global_mean:.4f} (ratio {ratio:.2f})", fontsize=9)
    ax.legend(fontsize=8)
    return ax


def distance_statistics(source, *, site=None, pairwise=None, bins: int = 10, threshold: float = DEFAULT_THRESHOLD,
                        layer=None, head=0, sample=None, step=None):
    """Seed 002's 1x3 statistics: mean attention vs distance, bias vs distance, local vs global histograms.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import distance_statistics
    >>> len(distance_statistics(attnformat.example_path("steps")).axes)
    3
    """
    data = pairwise_data(source, site=site, pairwise=pairwise, threshold=threshold, layer=layer, head=head, sample=sample, step=step)
    panels = 3 if data.bias is not None else 2
    figure, axes = grid(panels, ncols=panels, panel_size=(4.6, 4.0))
    distance_profile(None, data=data, bins=bins, ax=axes[0])
    axes[0].set_title(f"average attention vs {data.pairwise_name}", fontsize=9)  # the suptitle says the rest
    if data.bias is not None:
        distance_profile(None, data=data, variable="bias", bins=bins, ax=axes[1])
        axes[1].set_title(f"bias vs {data.pairwise_name}", fontsize=9)
    local_global_histogram(data, ax=axes[-1])
    figure.suptitle(data.weights.title(), fontsize=10)
    return figure


def pairwise_overview(source, *, site=None, pairwise=None, threshold: float = DEFAULT_THRESHOLD, layer=None, head=0,
                      sample=None, step=None):
    """Seed 002's 2x3 overview: logits before bias, bias, logits, weights, the pairwise matrix, and
    weights against it coloured by bias.

    Needs ``logits`` and ``bias`` in the site. Returns the Figure (6 panels plus 5 colorbars).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import pairwise_overview
    >>> figure = pairwise_overview(attnformat.example_path("steps"), step=300)
    >>> [ax.get_title().split(":")[0] for ax in figure.axes[:3]]
    ['logits before bias (logits - bias)', 'bias (additive)', 'logits (after bias)']
    """
    data = pairwise_data(source, site=site, pairwise=pairwise, threshold=threshold, layer=layer, head=head, sample=sample, step=step)
    if data.logits is None or data.bias is None:
        raise SelectionError(f"the overview needs logits and bias; site {data.weights.site} of {data.weights.source} "
                             f"holds: weights{', logits' if data.logits is not None else ''}{', bias' if data.bias is not None else ''}")
    figure, axes = grid(6, ncols=3, panel_size=(4.6, 4.0))
    labels = dict(query_labels=data.weights.query_labels, key_labels=data.weights.key_labels)
    panels = [
        ("logits before bias (logits - bias)", data.logits_before_bias, "logits"),
        ("bias (additive)", data.bias, "bias"),
        ("logits (after bias)", data.logits, "logits"),
        (data.weights.normalization, np.asarray(data.weights.values), "weights"),
        (data.label, data.pairwise, "pairwise"),
    ]
    for ax, (title, values, variable) in zip(axes, panels):
        cmap, norm = color_scale(values, variable=variable, cmap="viridis_r" if variable == "pairwise" else None)
        image = draw_map(ax, values, cmap=cmap, norm=norm, title=title, **labels)
        figure.colorbar(image, ax=ax)
    attention_vs_distance(None, data=data, color_by_bias=True, ax=axes[5])
    axes[5].set_title(f"weights vs {data.pairwise_name}, coloured by bias", fontsize=9)
    figure.suptitle(data.weights.title(), fontsize=11)
    return figure


def query_profiles(source, *, site=None, pairwise=None, queries=None, count: int = 4,
                   threshold: float = DEFAULT_THRESHOLD, layer=None, head=0, sample=None, step=None):
    """Attention of a few queries over all keys, with the bias and the neighbourhood (< threshold) shaded.

    ``queries`` are labels or positions; by default ``count`` evenly spaced queries (seed 002's 4).

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
    data = pairwise_data(source, site=site, pairwise=pairwise, threshold=threshold, layer=layer, head=head, sample=sample, step=step)
    site_node = resolve_site(source, site) if source is not None else None
    weights = np.asarray(data.weights.values, dtype=np.float64)
    if queries is None:
        rows = sorted(set(np.linspace(0, weights.shape[0] - 1, min(count, weights.shape[0])).round().astype(int).tolist()))
    else:
        rows = [position(site_node, "query", q, sample=data.weights.positions.get("sample")) for q in queries]
    figure, axes = grid(len(rows), ncols=min(len(rows), 2), panel_size=(5.0, 3.4))
    keys = np.arange(weights.shape[1])
    for ax, row in zip(axes, rows):
        ax.fill_between(keys, weights[row], color="#029E73", alpha=0.5, label="attention")
        ax.plot(keys, weights[row], color="#029E73", linewidth=1)
        near = data.local[row]
        for key in np.flatnonzero(near):
            ax.axvspan(key - 0.5, key + 0.5, color=LOCAL_COLOR, alpha=0.15, linewidth=0)
        ax.axvline(row, color="#D55E00", linestyle="--", linewidth=1, label="query position")
        ax.set_title(f"query {data.weights.query_labels[row]}", fontsize=9)
        ax.set_xlabel(f"key (shaded: {data.pairwise_name} < {data.threshold_text()})")
        ax.set_ylabel(data.weights.normalization, fontsize=8)
        handles = ax.get_legend_handles_labels()[0]
        if data.bias is not None:
            twin = ax.twinx()
            twin.plot(keys, data.bias[row], linestyle="--", color=BAR_COLOR, label="bias")
            twin.set_ylabel("bias", fontsize=8)
            handles += twin.get_legend_handles_labels()[0]
        if row == rows[0]:
            handles.append(Patch(color=LOCAL_COLOR, alpha=0.3, label=f"neighbourhood (< {data.threshold_text()})"))
            ax.legend(handles=handles, fontsize=7, loc="upper right")
    figure.suptitle(f"{data.weights.title()} | query profiles", fontsize=10)
    return figure
