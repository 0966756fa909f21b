"""Token groups (frames, modalities): group x group maps, per-head bars of a query block, sink scores.

Groups come from the ``query_group``/``key_group`` coordinates, in order of first appearance (the
spec's rule), so frame 0 comes first even when the file lists tokens in another order.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from attnformat.errors import AttnFormatError, SelectionError
from attnformat.viewer.colors import BAR_COLOR, color_scale
from attnformat.viewer.heatmaps import draw_map
from attnformat.viewer.output import axes_or_new, grid
from attnformat.viewer.selection import _reduce, labels_of, position, resolve_site, select, site_name

AGGREGATIONS = ("mean", "sum", "max")


def group_order(groups) -> list:
    """Distinct groups in order of first appearance.

    Examples
    --------
    >>> group_order(["b", "a", "b", "c"])
    ['b', 'a', 'c']
    """
    seen = {}
    for group in list(groups):
        seen.setdefault(group.item() if isinstance(group, np.generic) else group, None)
    return list(seen)


def token_groups(site: xr.DataTree, dim: str, sample: int | None = None) -> np.ndarray:
    """The group of every ``query`` or ``key`` token; SelectionError when the site has none.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import resolve_site
    >>> token_groups(resolve_site(attnformat.example_path("frames")), "key")[:4].tolist()
    [0, 0, 0, 1]
    """
    name = f"{dim}_group"
    if name not in site.coords:
        raise SelectionError(f"site {site_name(site)} has no {name} coordinate, so tokens cannot be grouped; "
                             f"coordinates: {', '.join(site.coords)}")
    groups = site.coords[name]
    if "sample" in groups.dims:
        groups = groups.isel(sample=sample or 0)
    return np.asarray(groups.values)


def default_aggregation(variable: str, attrs) -> str:
    """``sum`` over key tokens for weights normalised over keys (the attention mass a group receives),
    ``mean`` for logits and biases, whose sums mean nothing.

    Examples
    --------
    >>> default_aggregation("weights", {"normalized_dim": "key"}), default_aggregation("logits", {})
    ('sum', 'mean')
    """
    return "sum" if variable == "weights" and attrs.get("normalized_dim", "key") == "key" else "mean"


def aggregate_to_groups(values: np.ndarray, query_groups, key_groups, how: str = "mean") -> tuple[np.ndarray, list, list]:
    """Reduce ``(..., query, key)`` to ``(..., query group, key group)``.

    ``mean`` averages every token pair of a block; ``sum`` adds over the key tokens of a group and
    averages over its query tokens; ``max`` takes the block maximum.

    Examples
    --------
    >>> values = np.array([[0.5, 0.25, 0.25], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    >>> aggregate_to_groups(values, [0, 0, 1], [0, 1, 1], "sum")[0].tolist()
    [[0.5, 0.5], [1.0, 0.0]]
    """
    if how not in AGGREGATIONS:
        raise AttnFormatError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, not {how!r}")
    query_groups, key_groups = np.asarray(query_groups), np.asarray(key_groups)
    query_order, key_order = group_order(query_groups), group_order(key_groups)
    rows = []
    for query_group in query_order:
        block_rows = values[..., query_groups == query_group, :]
        columns = []
        for key_group in key_order:
            block = block_rows[..., key_groups == key_group]
            if how == "sum":
                with np.errstate(invalid="ignore"):
                    columns.append(_reduce(np.nansum(block, axis=-1), (-1,), "mean"))
            else:
                columns.append(_reduce(block, (-2, -1), how))
        rows.append(np.stack(columns, axis=-1))
    return np.stack(rows, axis=-2), query_order, key_order


def group_selection(source, *, site=None, variable="weights", aggregate=None, keep=(), **selectors):
    """A :class:`Selection` whose map is aggregated to query groups x key groups.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import group_selection
    >>> chosen = group_selection(attnformat.example_path("frames"), variable="logits", head=0)
    >>> chosen.values.shape, chosen.query_labels
    ((5, 5), ['0', '1', '2', '3', '4'])
    """
    site_node = resolve_site(source, site)
    chosen = select(site_node, variable, keep=keep, drop_padding=False, **selectors)
    sample = chosen.positions.get("sample")
    how = aggregate or default_aggregation(variable, chosen.attrs)
    query_groups = token_groups(site_node, "query", sample)
    key_groups = token_groups(site_node, "key", sample)
    chosen.values, query_order, key_order = aggregate_to_groups(_masked_as_missing(chosen), query_groups, key_groups, how)
    chosen.query_labels = [str(g) for g in query_order]
    chosen.key_labels = [str(g) for g in key_order]
    kind = chosen.attrs.get("group_kind", "group")
    chosen.described["tokens"] = f"{how} per {kind}"
    return chosen


def _masked_as_missing(chosen) -> np.ndarray:
    # -inf logits mark masked pairs (causal, padding): averaging them in would make whole blocks
    # -inf, so they count as missing, like NaN.
    if chosen.variable == "weights":
        return chosen.values
    return np.where(np.isfinite(chosen.values), chosen.values, np.nan)


def group_kind(attrs) -> str:
    """What a site's groups are (``frame``, ``modality``...), from ``group_kind``; ``group`` otherwise.

    Examples
    --------
    >>> group_kind({"group_kind": "frame"}), group_kind({})
    ('frame', 'group')
    """
    return str(attrs.get("group_kind", "group"))


def group_map(source, *, site=None, variable="weights", aggregate=None, layer=None, head=None, sample=None,
              step=None, cmap=None, vmin=None, vmax=None, origin="upper", colorbar=True, ax=None):
    """Group x group heatmap (frame x frame, modality x modality) of one head or the mean over heads.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import group_map
    >>> ax = group_map(attnformat.example_path("frames"), variable="logits", head=0, origin="lower")
    >>> ax.get_xlabel(), ax.images[0].get_array().shape
    ('key frame', (5, 5))
    """
    chosen = group_selection(source, site=site, variable=variable, aggregate=aggregate, layer=layer, head=head,
                             sample=sample, step=step)
    cmap, norm = color_scale(chosen.values, variable=variable, cmap=cmap, vmin=vmin, vmax=vmax)
    kind = group_kind(chosen.attrs)
    ax = axes_or_new(ax)
    image = draw_map(ax, chosen.values, cmap=cmap, norm=norm, query_labels=chosen.query_labels,
                     key_labels=chosen.key_labels, origin=origin, xlabel=f"key {kind}", ylabel=f"query {kind}",
                     title=chosen.title())
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=chosen.normalization)
    return ax


def sink_score(profile) -> float:
    """First value minus the mean of the middle ones (all but first and last), as in seed 004.

    Examples
    --------
    >>> sink_score([7.0, 1.0, 2.0, 3.0, 9.0])
    5.0
    """
    profile = np.asarray(profile, dtype=np.float64)
    if profile.size < 3:
        return float("nan")
    with np.errstate(invalid="ignore"):
        return float(profile[0] - np.nanmean(profile[1:-1]))


def query_block_profiles(source, *, site=None, variable="weights", query_groups=None, queries=None, by_group=True,
                         aggregate=None, layer=None, sample=None, step=None):
    """Per-head attention of a query block over keys or key groups (the bars of seed 004's figure 2).

    The block is the tokens of ``query_groups`` (default: the last group, like seed 004's last
    block), or the ``queries`` given as labels or positions. Returns ``(selection, profiles)`` where
    ``profiles`` is ``(head, key or key group)``: the mean over the block's queries.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import query_block_profiles
    >>> chosen, profiles = query_block_profiles(attnformat.example_path("frames"), variable="logits")
    >>> profiles.shape, chosen.described["query"]
    ((4, 5), 'frame 4')
    """
    site_node = resolve_site(source, site)
    chosen = select(site_node, variable, keep=("head",), drop_padding=False, layer=layer, sample=sample, step=step)
    sample_position = chosen.positions.get("sample")
    if queries is not None:
        rows = [position(site_node, "query", q, sample=sample_position) for q in queries]
        described = "tokens " + ", ".join(str(q) for q in queries)
    else:
        groups = token_groups(site_node, "query", sample_position)
        order = group_order(groups)
        wanted = [order[-1]] if query_groups is None else list(query_groups)
        labels = [str(g) for g in order]
        for group in wanted:
            if str(group) not in labels:
                raise SelectionError(f"query group {group} not in file {chosen.source}, site {chosen.site}; "
                                     f"query groups: {', '.join(labels)}")
        wanted_labels = {str(g) for g in wanted}
        rows = [i for i, g in enumerate(groups) if str(g) in wanted_labels]
        described = f"{group_kind(chosen.attrs)} " + ", ".join(str(g) for g in wanted)
    values = _reduce(_masked_as_missing(chosen)[..., rows, :], (-2,), "mean")
    if by_group:
        how = aggregate or default_aggregation(variable, chosen.attrs)
        key_groups = token_groups(site_node, "key", sample_position)
        values = np.stack([
            (np.nansum if how == "sum" else np.nanmax if how == "max" else np.nanmean)(values[..., key_groups == g], axis=-1)
            for g in group_order(key_groups)], axis=-1)
        chosen.key_labels = [str(g) for g in group_order(key_groups)]
        chosen.described["tokens"] = f"{how} per {group_kind(chosen.attrs)}"
    else:
        chosen.key_labels = labels_of(site_node, "key", sample_position)
    chosen.described["query"] = described
    chosen.values = values
    chosen.dims = ("head", "key")
    return chosen, values


def group_bars(source, *, site=None, variable="weights", query_groups=None, queries=None, by_group=True,
               aggregate=None, layer=None, sample=None, step=None, ncols=4):
    """Per-head bar charts of a query block's attention over keys or key groups, sink score in each title.

    Each panel is titled ``H{head} (sink={score:.2f})`` (seed 004), where the score is the first
    bar minus the mean of the middle bars.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import group_bars
    >>> figure = group_bars(attnformat.example_path("frames"), variable="logits")
    >>> figure.axes[0].get_title()
    'H0 (sink=4.17)'
    """
    chosen, profiles = query_block_profiles(source, site=site, variable=variable, query_groups=query_groups,
                                            queries=queries, by_group=by_group, aggregate=aggregate, layer=layer,
                                            sample=sample, step=step)
    heads = chosen.kept.get("head", [str(i) for i in range(profiles.shape[0])])
    figure, axes = grid(len(heads), ncols=ncols, panel_size=(3.4, 2.6))
    positions = np.arange(profiles.shape[-1])
    kind = group_kind(chosen.attrs) if by_group else "token"
    for ax, head, profile in zip(axes, heads, profiles):
        ax.bar(positions, profile, alpha=0.85, width=0.8, color=BAR_COLOR)
        ax.plot(positions, profile, "o-", color="black", linewidth=1, markersize=2)
        ax.set_title(f"H{head} (sink={sink_score(profile):.2f})", fontsize=10, fontweight="bold")
        ax.set_xlabel(f"key {kind}")
        ax.set_ylabel(chosen.normalization, fontsize=8)
        if len(positions) <= 32:
            ax.set_xticks(positions, chosen.key_labels, fontsize=7, rotation=90 if len(positions) > 12 else 0)
        ax.grid(True, alpha=0.3)
    figure.suptitle(f"{chosen.title(skip=('head', 'query'))}\nper-head attention of query {chosen.described['query']}", fontsize=10)
    return figure
