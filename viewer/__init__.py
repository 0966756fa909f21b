"""Plots of attention files, drawn from the file alone (no model, no torch)."""

from attnformat.viewer.colors import color_scale
from attnformat.viewer.grids import attention_flow, flow_sites, head_grid, layer_comparison
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
from attnformat.viewer.output import save_figure
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
