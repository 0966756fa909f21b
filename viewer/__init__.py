"""Plots of attention files, drawn from the file alone (no model, no torch).

Every plot is a function taking a path, a tree or a site group plus selectors (``layer``,
``head``, ``sample``, ``step``, ``time``, ``node``, ``query``: a label or an index; ``"mean"`` or
``"max"`` to reduce) and an optional ``ax``; it returns the Axes, or the Figure for grids. The
data each plot draws comes from a preparer that can be called (and tested) without drawing.

>>> import attnformat
>>> from attnformat.viewer import heatmap
>>> heatmap(attnformat.example_path("dense"), layer=0, head=2).get_title()
'encoder/self | layer 0 | head 2 | weights (softmax)'
"""

from attnformat.viewer.catalog import PLOT_KINDS, PlotKind, main_variable, plot
from attnformat.viewer.colors import color_scale
from attnformat.viewer.edges import node_link, top_edges, top_edges_data
from attnformat.viewer.grids import attention_flow, flow_sites, head_grid, layer_comparison, step_comparison
from attnformat.viewer.groups import (
    aggregate_to_groups,
    group_bars,
    group_map,
    group_order,
    group_selection,
    query_block_profiles,
    sink_score,
)
from attnformat.viewer.heatmaps import heatmap, temporal_matrix
from attnformat.viewer.images import image_attention_grid, image_overlay, patch_attention, upsample
from attnformat.viewer.output import save_figure
from attnformat.viewer.pairwise import (
    PairwiseData,
    attention_vs_distance,
    binned_means,
    distance_profile,
    distance_statistics,
    pairwise_data,
    pairwise_overview,
    query_profiles,
)
from attnformat.viewer.report import report
from attnformat.viewer.rollout import attention_rollout, rollout_map, rollout_matrices
from attnformat.viewer.selection import (
    Selection,
    block_pool,
    densify_edges,
    labels_of,
    open_source,
    pool_for_display,
    position,
    resolve_site,
    select,
    sites_of,
)
from attnformat.viewer.statistics import (
    attention_statistics,
    boxplot_data,
    format_summary,
    row_entropy,
    statistics_boxplots,
    statistics_summary,
    top_pairs,
    top_pairs_plot,
)

__all__ = [
    "PLOT_KINDS",
    "PairwiseData",
    "PlotKind",
    "Selection",
    "aggregate_to_groups",
    "attention_flow",
    "attention_rollout",
    "attention_statistics",
    "attention_vs_distance",
    "binned_means",
    "block_pool",
    "boxplot_data",
    "color_scale",
    "densify_edges",
    "distance_profile",
    "distance_statistics",
    "flow_sites",
    "format_summary",
    "group_bars",
    "group_map",
    "group_order",
    "group_selection",
    "head_grid",
    "heatmap",
    "image_attention_grid",
    "image_overlay",
    "labels_of",
    "layer_comparison",
    "main_variable",
    "node_link",
    "open_source",
    "pairwise_data",
    "pairwise_overview",
    "patch_attention",
    "plot",
    "pool_for_display",
    "position",
    "query_block_profiles",
    "query_profiles",
    "report",
    "resolve_site",
    "rollout_map",
    "rollout_matrices",
    "row_entropy",
    "save_figure",
    "select",
    "sink_score",
    "sites_of",
    "statistics_boxplots",
    "statistics_summary",
    "step_comparison",
    "temporal_matrix",
    "top_edges",
    "top_edges_data",
    "top_pairs",
    "top_pairs_plot",
    "upsample",
]
