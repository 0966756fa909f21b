"""Plots of attention files, drawn from the file alone (no model, no torch).

Every plot is a function taking a path, a tree or a site group plus selectors (``layer``,
``head``, ``sample``, ``step``, ``time``, ``node``, ``query``: a label or an index; ``"mean"`` or
``"max"`` to reduce) and an optional ``ax``; it returns the Axes, or the Figure for grids. The
data each plot draws comes from a preparer that can be called (and tested) without drawing.

>>> import attnformat
>>> from attnformat.viewer import heatmap
>>> heatmap(attnformat.example_path("dense"), layer=0, head=2).get_title()
'encoder/self | layer 0 | head 2 | weights (softmax)'

Names are imported on first use (:pep:`562`): ``from attnformat.viewer import heatmap`` imports
the heatmap's modules and matplotlib, not the report, the statistics or xarray. To export a new
public name, add one line to :data:`_EXPORTS` (name -> the module of this package defining it);
``__all__`` and ``dir()`` follow from it.
"""

from __future__ import annotations

import importlib
import sys
import types

#: Public name -> the module of ``attnformat.viewer`` that defines it.
_EXPORTS: dict[str, str] = {
    "changed_heads": "compare",
    "diff": "compare",
    "diff_summary": "compare",
    "jsd_grid": "compare",
    "Explorer": "explorer.notebook",
    "explore": "explorer.notebook",
    "serve": "explorer.server",
    "to_bertviz": "explorer.interop",
    "to_circuitsvis": "explorer.interop",
    "write_page": "explorer.page",
    "PLOT_KINDS": "catalog",
    "PlotKind": "catalog",
    "main_variable": "catalog",
    "plot": "catalog",
    "color_scale": "colors",
    "node_link": "edges",
    "node_link_data": "edges",
    "top_edges": "edges",
    "top_edges_data": "edges",
    "attention_flow": "grids",
    "flow_sites": "grids",
    "head_grid": "grids",
    "layer_comparison": "grids",
    "step_comparison": "grids",
    "aggregate_to_groups": "groups",
    "group_bars": "groups",
    "group_map": "groups",
    "group_order": "groups",
    "format_frame_statistics": "groups",
    "frame_statistics": "groups",
    "group_selection": "groups",
    "query_block_profiles": "groups",
    "sink_score": "groups",
    "heatmap": "heatmaps",
    "temporal_matrix": "heatmaps",
    "image_attention_grid": "images",
    "image_grid_data": "images",
    "draw_patch_attention": "images",
    "image_overlay": "images",
    "patch_attention": "images",
    "upsample": "images",
    "save_figure": "output",
    "PairwiseData": "pairwise",
    "attention_vs_distance": "pairwise",
    "binned_means": "pairwise",
    "distance_profile": "pairwise",
    "distance_statistics": "pairwise",
    "pairwise_data": "pairwise",
    "pairwise_overview": "pairwise",
    "query_profiles": "pairwise",
    "report": "report",
    "attention_rollout": "rollout",
    "rollout_map": "rollout",
    "rollout_matrices": "rollout",
    "StatisticsTable": "row_statistics",
    "statistic_label": "row_statistics",
    "statistics_overview": "row_statistics",
    "statistics_profile": "row_statistics",
    "statistics_table": "row_statistics",
    "top_key_plot": "row_statistics",
    "Selection": "selection",
    "block_pool": "selection",
    "densify_edges": "selection",
    "first_generated": "selection",
    "key_count": "selection",
    "TopkDetail": "selection",
    "labels_of": "selection",
    "open_source": "selection",
    "pool_for_display": "selection",
    "position": "selection",
    "resolve_site": "selection",
    "select": "selection",
    "sites_of": "selection",
    "attention_statistics": "statistics",
    "locality": "statistics",
    "constant_statistics": "statistics",
    "boxplot_data": "statistics",
    "format_summary": "statistics",
    "row_entropy": "statistics",
    "statistics_boxplots": "statistics",
    "statistics_summary": "statistics",
    "top_pairs": "statistics",
    "top_pairs_plot": "statistics",
    "RowProfile": "topk",
    "row_profile": "topk",
    "row_profiles": "topk",
    "topk_heatmap": "topk",
    "topk_map": "topk",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """This package, where a public name shadows the submodule of the same name.

    Importing a submodule makes it an attribute of its package; ``report`` is both a submodule
    and the function it defines, and ``attnformat.viewer.report`` has always been the function
    (as when every name was imported eagerly). The import system's assignment of the submodule
    is turned into the assignment of the public object.
    """

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
