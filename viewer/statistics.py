"""Numbers about attention: per layer and head mean, std, min, max, entropy, sink score, local/global
ratio; box plots across samples; the top-k query-key pairs; the JSON that seed 001 saved.

Statistics stream the file one layer's heads (or one map, for large maps) at a time.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import xarray as xr

from attnformat.engines import Location
from attnformat.errors import AttnFormatError
from attnformat.reading import source_of
from attnformat.text import for_terminal
from attnformat.viewer.colors import BAR_COLOR
from attnformat.viewer.output import axes_or_new, grid
from attnformat.viewer.selection import SELECTABLE_DIMS, real_tokens, resolve_site, select, site_name, sites_of

STATISTICS = ("mean", "std", "min", "max", "entropy", "sink_score", "local_mean", "global_mean", "local_global_ratio")
#: Without a pairwise distance, keys this many positions or fewer from the query count as local.
LOCAL_WINDOW = 2
DEFAULT_THRESHOLD = 8.0
# Read one head at a time when a layer's maps would exceed this many elements.
_BLOCK_ELEMENTS = 1 << 24


def _nan_stat(function, values, axis):
    with np.errstate(invalid="ignore", divide="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return function(values, axis=axis)


def row_entropy(weights: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over rows of ``-sum p log p`` along ``axis`` (rows that are all zero or NaN are skipped).

    Examples
    --------
    >>> float(row_entropy(np.array([[0.5, 0.5], [1.0, 0.0]])).round(4))
    0.3466
    """
    weights = np.asarray(weights, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(weights > 0, -weights * np.log(weights), 0.0)
    entropy = np.sum(np.where(np.isnan(weights), 0.0, terms), axis=axis)
    live = np.nansum(np.abs(weights), axis=axis) > 0
    entropy = np.where(live, entropy, np.nan)
    return _nan_stat(np.nanmean, entropy, -1)


def _local_mask(site, query: int, key: int, threshold: float):
    pairwise = [n for n, v in site.data_vars.items() if v.attrs.get("role") == "pairwise"]
    if pairwise:
        name = "distance" if "distance" in pairwise else pairwise[0]
        values = site[name]
        if set(values.dims) == {"query", "key"}:
            return np.asarray(values.transpose("query", "key").values, dtype=np.float64) < threshold
    if site.attrs.get("attention_type", "self") != "self" or query != key:
        return None
    query_positions = site.coords["query_position"].values if "query_position" in site.coords and site.coords["query_position"].ndim == 1 else np.arange(query)
    key_positions = site.coords["key_position"].values if "key_position" in site.coords and site.coords["key_position"].ndim == 1 else np.arange(key)
    return np.abs(query_positions[:, None] - key_positions[None, :]) <= LOCAL_WINDOW


def _dense_stats(block: np.ndarray, local, normalized_axis: int) -> dict:
    axes = (-2, -1)
    stats = {
        "mean": _nan_stat(np.nanmean, block, axes), "std": _nan_stat(np.nanstd, block, axes),
        "min": _nan_stat(np.nanmin, block, axes), "max": _nan_stat(np.nanmax, block, axes),
        "entropy": row_entropy(block if normalized_axis == -1 else np.swapaxes(block, -1, -2)),
    }
    profile = _nan_stat(np.nanmean, block, -2)
    middle = _nan_stat(np.nanmean, profile[..., 1:-1], -1) if profile.shape[-1] >= 3 else np.full(profile.shape[:-1], np.nan)
    stats["sink_score"] = profile[..., 0] - middle
    if local is not None and local.any() and (~local).any():
        local_mean = _nan_stat(np.nanmean, np.where(local, block, np.nan), axes)
        global_mean = _nan_stat(np.nanmean, np.where(local, np.nan, block), axes)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats["local_global_ratio"] = local_mean / global_mean
        stats["local_mean"], stats["global_mean"] = local_mean, global_mean
    else:
        for name in ("local_mean", "global_mean", "local_global_ratio"):
            stats[name] = np.full(block.shape[:-2], np.nan)
    return stats


def _edge_stats(block: np.ndarray, target: np.ndarray) -> dict:
    axis = -1
    stats = {
        "mean": _nan_stat(np.nanmean, block, axis), "std": _nan_stat(np.nanstd, block, axis),
        "min": _nan_stat(np.nanmin, block, axis), "max": _nan_stat(np.nanmax, block, axis),
    }
    flat = block.reshape(-1, block.shape[-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(flat > 0, -flat * np.log(flat), 0.0)
    entropy = np.array([np.mean(np.bincount(target, weights=np.nan_to_num(row))[np.unique(target)]) for row in terms])
    stats["entropy"] = entropy.reshape(block.shape[:-1])
    for name in ("sink_score", "local_mean", "global_mean", "local_global_ratio"):
        stats[name] = np.full(block.shape[:-1], np.nan)
    return stats


def attention_statistics(source, *, site=None, variable: str = "weights", threshold: float = DEFAULT_THRESHOLD) -> xr.Dataset:
    """Per-map statistics of one site: a Dataset with one variable per statistic over the leading dims.

    ``entropy`` is the mean row entropy (over keys for ``normalized_dim="key"``); ``sink_score`` the
    mean attention on the first key minus that on the middle keys; ``local_global_ratio`` the mean
    attention on local pairs over that on the others, local meaning closer than ``threshold`` in a
    pairwise ``distance`` when the site has one, else within ``LOCAL_WINDOW`` positions (self-attention
    only; NaN otherwise). Padding (``query_mask``/``key_mask``) is left out.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import attention_statistics
    >>> stats = attention_statistics(attnformat.example_path("dense"))
    >>> stats["entropy"].dims, round(float(stats["max"].max()), 3) <= 1.0
    (('layer', 'head'), True)
    """
    return _statistics_and_moments(resolve_site(source, site), variable, threshold)[0]


#: The most maps one statistics call summarises (a table of this many rows is ~0.5 GB).
MAX_STATISTICS_MAPS = 10_000_000


def _statistics_and_moments(site_node, variable: str, threshold: float):
    """The per-map statistics and, from the same reads, exact per-layer sums for mean/std/min/max."""
    array = site_node[variable]
    leading = [d for d in array.dims if d in SELECTABLE_DIMS]
    edge = "edge" in array.dims
    map_size = array.sizes["edge"] if edge else array.sizes["query"] * array.sizes["key"]
    inner = [d for d in ("head",) if d in leading and map_size * array.sizes[d] <= _BLOCK_ELEMENTS]
    outer = [d for d in leading if d not in inner]
    local = None if edge else _local_mask(site_node, array.sizes["query"], array.sizes["key"], threshold)
    normalized_axis = -2 if site_node.attrs.get("normalized_dim") == "query" else -1
    maps = math.prod(array.sizes[d] for d in outer + inner)
    if maps > MAX_STATISTICS_MAPS:
        # A file can declare any number of maps in a few bytes; the per-map table would be
        # allocated (and the maps read) before anything is found missing.
        raise AttnFormatError(
            f"{source_of(site_node)}: site {site_name(site_node)} declares {maps:,} maps of {variable}; statistics "
            f"are computed for at most {MAX_STATISTICS_MAPS:,} at a time [ATTN-STORE-006]; select fewer (e.g. one sample)"
        )
    results = {name: np.full([array.sizes[d] for d in outer + inner], np.nan) for name in STATISTICS}
    moments = {}
    for index in itertools.product(*(range(array.sizes[d]) for d in outer)):
        chosen = dict(zip(outer, index))
        block = np.asarray(array.isel(chosen).transpose(*inner, ...).values, dtype=np.float64)
        if edge:
            stats = _edge_stats(block, site_node.coords["target"].values)
        else:
            block = _mask_padding(site_node, block, chosen.get("sample"))
            stats = _dense_stats(block, local, normalized_axis)
        for name in STATISTICS:
            results[name][index] = stats[name]
        _accumulate(moments.setdefault(chosen.get("layer"), [0, 0.0, 0.0, math.inf, -math.inf]), block)
    dims = tuple(outer + inner)
    coords = {d: site_node.coords[d].values for d in dims if d in site_node.coords}
    dataset = xr.Dataset({name: (dims, values) for name, values in results.items()}, coords=coords)
    dataset.attrs.update(site=site_name(site_node), variable=variable)
    return dataset.transpose(*leading), moments


def _averaged(stats: xr.Dataset, *, everything: bool = False) -> dict:
    """Map statistics averaged over the remaining dimensions; the local/global ratio is the ratio
    of the averaged means, so that one head with almost no global attention cannot dominate it."""
    names = STATISTICS if everything else ("entropy", "sink_score", "local_mean", "global_mean")
    averaged = {name: _json_number(_nan_stat(np.nanmean, stats[name].values, None)) for name in names}
    local, far = averaged.get("local_mean"), averaged.get("global_mean")
    averaged["local_global_ratio"] = _json_number(local / far) if local is not None and far else None
    return averaged


def _accumulate(moments: list, block: np.ndarray) -> None:
    finite = block[np.isfinite(block)]
    if finite.size:
        moments[0] += finite.size
        moments[1] += finite.sum()
        moments[2] += np.square(finite).sum()
        moments[3], moments[4] = min(moments[3], finite.min()), max(moments[4], finite.max())


def _moment_values(moments: list | None) -> dict:
    count, total, squares, low, high = moments or (0, 0.0, 0.0, math.inf, -math.inf)
    if not count:
        return {"mean": None, "std": None, "min": None, "max": None}
    mean = total / count
    return {"mean": _json_number(mean), "std": _json_number(math.sqrt(max(squares / count - mean * mean, 0.0))),
            "min": _json_number(low), "max": _json_number(high)}


def _mask_padding(site, block, sample):
    for dim, axis in (("query", -2), ("key", -1)):
        keep = real_tokens(site, dim, sample)
        if keep is not None:
            shape = [1] * block.ndim
            shape[axis] = keep.size
            block = np.where(keep.reshape(shape), block, np.nan)
    return block


def _json_number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def statistics_summary(source, *, variable: str = "weights", threshold: float = DEFAULT_THRESHOLD,
                       storage_options=None) -> dict:
    """Per site and layer: layer, type, mean, std, min, max, shape (seed 001's JSON), plus entropy,
    sink score, local and global mean attention and their ratio (seed 002's printout), and the same
    per head.

    Parameters
    ----------
    source
        Path, URL or tree.
    variable
        The attention variable to summarise.
    threshold
        Distance below which a pair counts as local (see :func:`attention_statistics`).
    storage_options
        fsspec options for a URL, as for :func:`attnformat.open`.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import statistics_summary
    >>> summary = statistics_summary(attnformat.example_path("encoder-decoder"))
    >>> entry = summary["sites"]["decoder/cross"][0]
    >>> entry["layer"], entry["type"], entry["shape"]
    (0, 'cross_attention', [2, 5, 7])
    """
    if storage_options is not None and not isinstance(source, xr.DataTree):
        source = Location.of(source, storage_options)
    sites = sites_of(source)
    summary = {"source": str(sites[0].root.encoding.get("source", "<in-memory tree>")) if sites else "", "sites": {}}
    for site_node in sites:
        if variable not in site_node.data_vars:
            continue
        array = site_node[variable]
        stats, moments = _statistics_and_moments(site_node, variable, threshold)
        kind = f"{site_node.attrs.get('attention_type', 'self')}_attention"
        layers = site_node.coords["layer"].values if "layer" in site_node.coords else [None]
        entries = []
        for layer_position, layer in enumerate(layers):
            layer_array = array.isel(layer=layer_position) if "layer" in array.dims else array
            layer_stats = stats.isel(layer=layer_position) if "layer" in stats.dims else stats
            values = _moment_values(moments.get(layer_position if "layer" in array.dims else None))
            entry = {"layer": None if layer is None else int(layer), "type": kind, **values,
                     "shape": [int(s) for s in layer_array.shape]}
            entry.update(_averaged(layer_stats))
            if "head" in layer_stats.dims:
                heads = layer_stats.coords["head"].values if "head" in layer_stats.coords else range(layer_stats.sizes["head"])
                entry["heads"] = [{"head": int(head), **_averaged(layer_stats.isel(head=i), everything=True)}
                                  for i, head in enumerate(heads)]
            entries.append(entry)
        summary["sites"][site_name(site_node)] = entries
    return summary


def format_summary(summary: dict) -> str:
    """The summary as a text table, one line per site and layer, safe to print on a terminal (site
    names and attention types come from the file: control characters in them are shown escaped).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import format_summary, statistics_summary
    >>> print(format_summary(statistics_summary(attnformat.example_path("dense"))).splitlines()[1])
    site          layer  type               mean      std      min      max  entropy     sink  loc/glob  shape
    """
    lines = [for_terminal(summary["source"]), f"{'site':13} {'layer':>5}  {'type':15} {'mean':>8} {'std':>8} {'min':>8} {'max':>8} "
                                f"{'entropy':>8} {'sink':>8} {'loc/glob':>9}  shape"]

    def cell(value, width=8):
        return f"{value:>{width}.4f}" if value is not None else f"{'-':>{width}}"

    for name, entries in summary["sites"].items():
        for entry in entries:
            lines.append(f"{for_terminal(name):13} {entry['layer'] if entry['layer'] is not None else '-':>5}  "
                         f"{for_terminal(entry['type']):15} "
                         f"{cell(entry['mean'])} {cell(entry['std'])} {cell(entry['min'])} {cell(entry['max'])} "
                         f"{cell(entry['entropy'])} {cell(entry['sink_score'])} {cell(entry['local_global_ratio'], 9)}  "
                         f"{entry['shape']}")
    return "\n".join(lines)


def boxplot_data(stats: xr.Dataset, statistic: str) -> tuple[list[str], list[np.ndarray]]:
    """Per layer, the finite values of one statistic over every other dimension (samples, heads, steps).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import attention_statistics, boxplot_data
    >>> layers, values = boxplot_data(attention_statistics(attnformat.example_path("dense")), "max")
    >>> layers, [len(v) for v in values]
    (['0', '1'], [3, 3])
    """
    values = stats[statistic]
    if "layer" not in values.dims:
        flat = values.values.ravel()
        return ["all"], [flat[np.isfinite(flat)]]
    names = [str(v) for v in (stats.coords["layer"].values if "layer" in stats.coords else range(stats.sizes["layer"]))]
    groups = []
    for position in range(values.sizes["layer"]):
        flat = values.isel(layer=position).values.ravel()
        groups.append(flat[np.isfinite(flat)])
    return names, groups


def statistics_boxplots(source, *, site=None, statistics=None, variable="weights"):
    """Box plots per layer of per-map statistics across samples and heads (seed 003's statistics figure).

    ``statistics`` defaults to max, mean and entropy for weights (entropy means nothing for
    logits, which get max, mean and std).

    Returns
    -------
    matplotlib.figure.Figure
        One Axes per statistic.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import statistics_boxplots
    >>> [ax.get_title() for ax in statistics_boxplots(attnformat.example_path("image")).axes]
    ['max per map', 'mean per map', 'entropy per map']
    """
    stats = attention_statistics(resolve_site(source, site), variable=variable)
    statistics = statistics or (("max", "mean", "entropy") if variable == "weights" else ("max", "mean", "std"))
    figure, axes = grid(len(statistics), ncols=len(statistics), panel_size=(4.2, 3.6))
    for ax, statistic in zip(axes, statistics):
        layers, groups = boxplot_data(stats, statistic)
        ax.boxplot(groups, tick_labels=layers, patch_artist=True, boxprops={"facecolor": BAR_COLOR, "alpha": 0.5})
        ax.set_xlabel("layer")
        ax.set_ylabel(statistic.replace("_", " "))
        ax.set_title(f"{statistic.replace('_', ' ')} per map", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    counted = [d for d in stats.dims if d != "layer"]
    figure.suptitle(f"{stats.attrs['site']} | {variable} | distribution over {', '.join(counted) or 'maps'}", fontsize=10)
    return figure


def top_pairs(source, *, site=None, k: int = 10, variable="weights", layer=None, head=None, sample=None, step=None,
              time=None, node=None) -> list[dict]:
    """The ``k`` query-key pairs with the largest values (head mean by default, as in seed 001).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import top_pairs
    >>> pairs = top_pairs(attnformat.example_path("dense"), k=2, layer=0, head=0)
    >>> sorted(pairs[0])
    ['key', 'key_label', 'query', 'query_label', 'value']
    """
    chosen = select(source, variable, site=site, layer=layer, head=head, sample=sample, step=step, time=time, node=node)
    return _pairs_of(chosen, k)


def _pairs_of(chosen, k: int) -> list[dict]:
    values = np.asarray(chosen.values, dtype=np.float64)
    flat = np.where(np.isfinite(values), values, -np.inf).ravel()
    order = np.argsort(-flat, kind="stable")[: max(0, min(k, flat.size))]
    pairs = []
    for index in order:
        if not np.isfinite(flat[index]):
            break
        row, column = divmod(int(index), values.shape[1])
        pairs.append({"query": int(chosen.query_index[row]), "key": int(chosen.key_index[column]),
                      "query_label": chosen.query_labels[row], "key_label": chosen.key_labels[column],
                      "value": float(values[row, column])})
    return pairs


def top_pairs_plot(source, *, site=None, k: int = 10, variable="weights", layer=None, head=None, sample=None, step=None,
                   time=None, node=None, ax=None):
    """Horizontal bars of the top-k query -> key pairs, largest on top.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import top_pairs_plot
    >>> len(top_pairs_plot(attnformat.example_path("dense"), k=4).patches)
    4
    """
    chosen = select(source, variable, site=site, layer=layer, head=head, sample=sample, step=step, time=time, node=node)
    pairs = _pairs_of(chosen, k)
    ax = axes_or_new(ax, figsize=(6.4, max(3.0, 0.3 * len(pairs) + 1.5)))
    positions = np.arange(len(pairs))[::-1]
    ax.barh(positions, [p["value"] for p in pairs], color=BAR_COLOR)
    ax.set_yticks(positions, [f"{p['query_label']} -> {p['key_label']}" for p in pairs], fontsize=8)
    ax.set_xlabel(chosen.normalization)
    ax.set_ylabel("query -> key")
    ax.set_title(f"{chosen.title()} | top {len(pairs)} pairs", fontsize=9)
    return ax

