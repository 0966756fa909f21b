"""The plot kinds, by the name the command line and the report use, with what each needs from a site.

Each kind names its function as ``"module:function"`` inside this package and imports it when it
is first drawn (or its parameters are asked for): ``attnformat plot FILE heatmap`` imports the
heatmap's modules, not the report's twenty kinds and their dependencies.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

from attnformat.errors import AttnFormatError, SelectionError


def main_variable(site) -> str | None:
    """The variable a site's plots show by default: ``weights``, else ``logits`` (some tools keep only
    the scores, like seed 004), else None.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import resolve_site
    >>> main_variable(resolve_site(attnformat.example_path("frames")))
    'weights'
    """
    return next((name for name in ("weights", "logits") if name in site.data_vars), None)


def _dense(site) -> bool:
    return site.attrs.get("layout") == "dense" and main_variable(site) is not None


def _dense_weights(site) -> bool:
    return site.attrs.get("layout") == "dense" and "weights" in site.data_vars


def _edge(site) -> bool:
    return site.attrs.get("layout") == "edge" and "weights" in site.data_vars


def _has_dim(site, dim) -> bool:
    variable = main_variable(site)
    return variable is not None and dim in site[variable].dims


def _grouped(site) -> bool:
    return _dense(site) and "query_group" in site.coords and "key_group" in site.coords


def _pairwise(site) -> bool:
    return _dense_weights(site) and any(v.attrs.get("role") == "pairwise" for v in site.data_vars.values())


def _topk(site) -> bool:
    return site.attrs.get("layout") == "topk" and "weights" in site.data_vars and "key_index" in site.data_vars


def _statistics(site) -> bool:
    return site.attrs.get("layout") == "statistics" and any(
        name in site.data_vars for name in ("entropy", "max_weight", "sink_weight", "local_weight", "top_key"))


def _layers(site, most: int = 8) -> list:
    """Layer labels of a site (its first ``most``), or [None] without a layer dimension."""
    if "layer" not in site.sizes:
        return [None]
    values = site.coords["layer"].values.tolist() if "layer" in site.coords else list(range(site.sizes["layer"]))
    return values[:most]


def _topk_report(site) -> list:
    items = []
    for layer in _layers(site):
        where = f"layer {layer}: " if layer is not None else ""
        items.append((f"{where}top-{site.attrs.get('top_k', '')} map, mean over heads (not kept: own colour)",
                      [f"layer{layer}" if layer is not None else ""], {"layer": layer}))
    return items


def _row_profile_report(site) -> list:
    layer = _layers(site, 1)[0]
    return [(f"{f'layer {layer}: ' if layer is not None else ''}last row's kept weights and omitted mass, mean over heads",
             [f"layer{layer}" if layer is not None else ""], {"layer": layer})]


def _overview_report(site) -> list:
    drawable = [name for name in ("entropy", "max_weight", "sink_weight", "local_weight") if name in site.data_vars]
    if "top_key" in site.data_vars:
        drawable.append("top_key_offset")
    return [(f"{name.replace('_', ' ')} per layer and head, mean over rows", [name], {"statistic": name})
            for name in drawable]


def _profile_report(site) -> list:
    drawable = [name for name in ("sink_weight", "entropy", "local_weight", "max_weight") if name in site.data_vars]
    return [(f"{name.replace('_', ' ')} per query row, every layer (mean over heads)", [name], {"statistic": name})
            for name in drawable[:2]]


def _top_key_report(site) -> list:
    return [(f"{f'layer {layer}: ' if layer is not None else ''}top key per query row, every head",
             [f"layer{layer}" if layer is not None else ""], {"layer": layer}) for layer in _layers(site, 4)]


def _square_self(site) -> bool:
    return (_dense_weights(site) and site.attrs.get("attention_type", "self") == "self"
            and site.sizes.get("query") == site.sizes.get("key") and _has_dim(site, "layer"))


@dataclass(frozen=True)
class PlotKind:
    """One kind of plot: its function, what it shows, and which sites it applies to.

    ``target`` is the function itself or ``"module:function"`` (a module of
    ``attnformat.viewer``), imported on first use. ``scope`` is ``"site"`` (drawn from one site)
    or ``"file"`` (needs several sites, like the flow). ``reads_path`` says that the function
    draws from a path by itself (reading only what it shows), so the command line hands it the
    path rather than an opened tree. ``report``, when set, says which plots of this kind a report
    draws for a site it applies to: ``report(site)`` returns ``(caption, file-name parts, options)``
    triples (options as :func:`plot` takes them, without ``site``).
    """

    name: str
    target: Callable | str
    help: str
    applies: Callable
    scope: str = "site"
    reads_path: bool = False
    report: Callable | None = None

    @property
    def function(self) -> Callable:
        """The plotting function (imported on first use)."""
        if callable(self.target):
            return self.target
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(f"attnformat.viewer.{module}"), name)

    @property
    def parameters(self) -> list[str]:
        """Keyword parameters the function takes."""
        return [p for p in inspect.signature(self.function).parameters if p not in ("source", "ax", "data")]


def _flow_applies(tree) -> bool:
    from attnformat.viewer.grids import flow_sites

    try:
        flow_sites(tree)
    except AttnFormatError:
        return False
    return True


def _has_patches(site) -> bool:
    from attnformat.viewer.images import has_patches

    return has_patches(site)


PLOT_KINDS: dict[str, PlotKind] = {kind.name: kind for kind in (
    PlotKind("heatmap", "heatmaps:heatmap", "one map (a head or the mean/max over heads); edges are densified",
             lambda s: _dense(s) or _edge(s), reads_path=True),
    PlotKind("head-grid", "grids:head_grid", "every head of a layer on one colour scale (--by-group for frame x frame)",
             lambda s: _has_dim(s, "head") and (_dense(s) or _edge(s) or _topk(s))),
    PlotKind("layer-comparison", "grids:layer_comparison", "one head or the head mean in every layer",
             lambda s: _has_dim(s, "layer") and (_dense(s) or _edge(s) or _topk(s))),
    PlotKind("step-comparison", "grids:step_comparison", "one layer and head at every stored training step",
             lambda s: _has_dim(s, "step") and (_dense(s) or _edge(s))),
    PlotKind("flow", "grids:attention_flow", "encoder self, decoder self and cross-attention side by side", _flow_applies, "file"),
    PlotKind("group-map", "groups:group_map", "group x group map (frames, modalities)", _grouped),
    PlotKind("group-bars", "groups:group_bars", "per-head bars of a query block over key groups, sink score in titles",
             lambda s: _grouped(s) and _has_dim(s, "head")),
    PlotKind("top-edges", "edges:top_edges", "the top-k edges of a time step", _edge),
    PlotKind("temporal", "heatmaps:temporal_matrix", "time x time attention of one node, from temporal edges",
             lambda s: _edge(s) and s.attrs.get("edge_node_dim") == "time"),
    PlotKind("node-link", "edges:node_link", "the graph at its stored node positions, edges by attention",
             lambda s: _edge(s) and "node_x" in s.coords and "node_y" in s.coords),
    PlotKind("pairwise-overview", "pairwise:pairwise_overview", "logits before bias, bias, logits, weights, distance, scatter",
             lambda s: _pairwise(s) and "logits" in s.data_vars and "bias" in s.data_vars),
    PlotKind("attention-vs-distance", "pairwise:attention_vs_distance", "scatter with a local/global split at --threshold", _pairwise),
    PlotKind("distance-profile", "pairwise:distance_profile", "binned mean attention against distance", _pairwise),
    PlotKind("distance-statistics", "pairwise:distance_statistics", "attention and bias against distance, local vs global", _pairwise),
    PlotKind("query-profiles", "pairwise:query_profiles", "a few queries' attention, bias and neighbourhood", _pairwise),
    PlotKind("image-overlay", "images:image_overlay", "a query's (CLS) attention upsampled onto the stored image",
             lambda s: _dense_weights(s) and _has_patches(s)),
    PlotKind("image-grid", "images:image_attention_grid", "patch attention and overlay per head or per layer (--over)",
             lambda s: _dense_weights(s) and _has_patches(s)),
    PlotKind("stats", "statistics:statistics_boxplots", "box plots per layer of max, mean and entropy across samples and heads",
             lambda s: _dense(s) or _edge(s)),
    PlotKind("top-pairs", "statistics:top_pairs_plot", "the top-k query -> key pairs", lambda s: _dense(s) or _edge(s)),
    PlotKind("rollout", "rollout:rollout_map", "attention rollout across layers (Abnar & Zuidema)", _square_self),
    PlotKind("topk-heatmap", "topk:topk_heatmap", "a top-k site's sparse map: kept weights, not-kept pairs in their own colour",
             _topk, report=_topk_report),
    PlotKind("row-profile", "topk:row_profile", "kept weights of chosen query rows (--query) and the mass left out",
             _topk, report=_row_profile_report),
    PlotKind("statistics-overview", "row_statistics:statistics_overview",
             "layer x head map of a stored per-row statistic (--statistic), mean over rows", _statistics,
             report=_overview_report),
    PlotKind("statistics-profile", "row_statistics:statistics_profile",
             "a stored statistic (--statistic) along the query rows, per layer", _statistics, report=_profile_report),
    PlotKind("top-key", "row_statistics:top_key_plot", "each query row's top key per head (--offset: query - key)",
             lambda s: s.attrs.get("layout") == "statistics" and "top_key" in s.data_vars, report=_top_key_report),
)}


def plot(source, kind: str, **options):
    """Draw one plot kind by name with the options it takes (None values are left out).

    Returns the Axes or Figure the kind's function returns.

    Raises
    ------
    attnformat.SelectionError
        For an unknown kind (listing the kinds).
    attnformat.AttnFormatError
        For options the kind does not take.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import plot
    >>> plot(attnformat.example_path("dense"), "heatmap", layer=1, head=0).get_title()
    'encoder/self | layer 1 | head 0 | weights (softmax)'
    """
    if kind not in PLOT_KINDS:
        raise SelectionError(f"no plot kind {kind!r}; kinds: {', '.join(PLOT_KINDS)}")
    entry = PLOT_KINDS[kind]
    options = {name: value for name, value in options.items() if value is not None}
    unknown = sorted(set(options) - set(entry.parameters))
    if unknown:
        raise AttnFormatError(f"plot kind {kind!r} does not take {', '.join(unknown)}; it takes: {', '.join(entry.parameters)}")
    return entry.function(source, **options)
