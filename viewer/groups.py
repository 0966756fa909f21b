"""Token groups (frames, modalities): group x group maps, per-head bars of a query block, sink scores.

Groups come from the ``query_group``/``key_group`` coordinates, in order of first appearance (the
spec's rule), so frame 0 comes first even when the file lists tokens in another order. A site
without group coordinates (a file that stores frame-level maps directly) is treated as one group
per token, labelled with the token labels, so the same plots and statistics apply to it.

Seed 004's numbers are one call: :func:`frame_statistics` returns the diagonal mean and the
first-column mean of the frame x frame map and, per head, the first, middle, last bar and the sink
score of a query block; :func:`format_frame_statistics` prints them the seed's way.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import xarray as xr

from attnformat.errors import AttnFormatError, SelectionError
from attnformat.viewer.colors import BAR_COLOR, color_scale
from attnformat.viewer.docs import documented, register
from attnformat.viewer.heatmaps import _compact_heatmap, colorbar_label, draw_map, has_missing_cells, map_panel, missing_handles
from attnformat.viewer.output import (
    MAX_FIGSIZE,
    SUPTITLE_FONTSIZE,
    TICK_FONTSIZE,
    TITLE_FONTSIZE,
    grid,
    label_pitch,
    layout_maps,
    longest_label,
    new_figure,
    text_width,
    thinned_label,
    tick_step,
)
from attnformat.viewer.selection import _reduce, labels_of, position, resolve_site, select, site_name

AGGREGATIONS = ("mean", "sum", "max")

register(
    group_selectors="""
        layer, sample, step : int, str or {"mean", "max"}, optional
            Which layer, sample and training step: a label or a position; ``"mean"`` or ``"max"``
            reduce over the dimension. Unset, the first element is taken.
    """,
    query_block="""
        query_groups : label, list of labels or slice, optional
            The query block: group labels (``[16, 17, 18]`` or ``["text"]``, matched by value or by
            text) or a slice over the groups in order (``slice(-3, None)``: the last three).
        last : int, optional
            The last ``last`` query groups (``last=3`` is seed 004's block of frames 16-18 of 19).
        queries : list of int or str, optional
            Query tokens by label or position instead of groups.

            At most one of ``query_groups``, ``last`` and ``queries`` is given. Default: the last
            block of a causal site, i.e. the trailing query groups that see exactly the same keys as
            the last query (a block-causal video model's last block of frames, found from the masked
            ``-inf``/NaN logits or zero weights); the last group alone when the site is not causal or
            its mask shows no blocks.
    """,
    by_group="""
        by_group : bool, default True
            Bars per key group (``True``) or per key token (``False``).
    """,
)


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


def has_groups(site: xr.DataTree) -> bool:
    """True when a site has ``query_group`` and ``key_group`` coordinates.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import resolve_site
    >>> has_groups(resolve_site(attnformat.example_path("frames"))), has_groups(resolve_site(attnformat.example_path("dense")))
    (True, False)
    """
    return "query_group" in site.coords and "key_group" in site.coords


@dataclass(frozen=True)
class _Groups:
    """The groups along ``query`` or ``key``: each token's group, the groups in order, their labels."""

    of_token: np.ndarray
    order: list
    labels: list

    @classmethod
    def of(cls, site, dim, sample):
        if has_groups(site):
            groups = token_groups(site, dim, sample)
            order = group_order(groups)
            return cls(groups, order, [str(g) for g in order])
        # No groups in the file: every token is its own group (frame-level maps stored directly).
        labels = labels_of(site, dim, sample)
        return cls(np.arange(len(labels)), list(range(len(labels))), labels)

    def members(self, group) -> np.ndarray:
        return self.of_token == group


def default_aggregation(variable: str, attrs) -> str:
    """``sum`` over key tokens for weights normalised over keys (the attention mass a group receives),
    ``mean`` for logits and biases, whose sums mean nothing.

    Examples
    --------
    >>> default_aggregation("weights", {"normalized_dim": "key"}), default_aggregation("logits", {})
    ('sum', 'mean')
    """
    return "sum" if variable == "weights" and attrs.get("normalized_dim", "key") == "key" else "mean"


def _check_aggregation(how: str) -> None:
    if how not in AGGREGATIONS:
        raise AttnFormatError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, not {how!r}")


def _over_key_tokens(block: np.ndarray, how: str) -> np.ndarray:
    """Reduce the last axis (a key group's tokens); all-missing stays NaN, also for sums."""
    if how == "sum":
        with np.errstate(invalid="ignore"):
            total = np.nansum(block, axis=-1)
        return np.where(np.isnan(block).all(axis=-1), np.nan, total)
    return _reduce(block, (-1,), how)


def aggregate_to_groups(values: np.ndarray, query_groups, key_groups, how: str = "mean") -> tuple[np.ndarray, list, list]:
    """Reduce ``(..., query, key)`` to ``(..., query group, key group)``.

    ``mean`` averages every token pair of a block; ``sum`` adds over the key tokens of a group and
    averages over its query tokens; ``max`` takes the block maximum. NaN entries are left out.

    Examples
    --------
    >>> values = np.array([[0.5, 0.25, 0.25], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    >>> aggregate_to_groups(values, [0, 0, 1], [0, 1, 1], "sum")[0].tolist()
    [[0.5, 0.5], [1.0, 0.0]]
    """
    _check_aggregation(how)
    query_groups, key_groups = np.asarray(query_groups), np.asarray(key_groups)
    query_order, key_order = group_order(query_groups), group_order(key_groups)
    rows = []
    for query_group in query_order:
        block_rows = values[..., query_groups == query_group, :]
        columns = []
        for key_group in key_order:
            block = block_rows[..., key_groups == key_group]
            if how == "sum":
                columns.append(_reduce(_over_key_tokens(block, "sum"), (-1,), "mean"))
            else:
                columns.append(_reduce(block, (-2, -1), how))
        rows.append(np.stack(columns, axis=-1))
    return np.stack(rows, axis=-2), query_order, key_order


def group_kind(attrs, grouped: bool = True) -> str:
    """What a site's groups are (``frame``, ``modality``...), from ``group_kind``; ``group`` otherwise
    (``token`` for a site without group coordinates, ``grouped=False``).

    Examples
    --------
    >>> group_kind({"group_kind": "frame"}), group_kind({}), group_kind({}, grouped=False)
    ('frame', 'group', 'token')
    """
    return str(attrs.get("group_kind", "group" if grouped else "token"))


def plural(word: str) -> str:
    """English plural of a group kind, for titles (``frame`` -> ``frames``, ``modality`` -> ``modalities``).

    Examples
    --------
    >>> plural("frame"), plural("modality"), plural("patches")
    ('frames', 'modalities', 'patches')
    """
    if word.endswith("s"):
        return word
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _masked_as_missing(chosen) -> np.ndarray:
    # -inf logits mark masked pairs (causal, padding): averaging them in would make whole blocks
    # -inf, so they count as missing, like NaN.
    if chosen.variable == "weights":
        return chosen.values
    return np.where(np.isfinite(chosen.values), chosen.values, np.nan)


def group_selection(source, *, site=None, variable="weights", aggregate=None, keep=(), **selectors):
    """A :class:`Selection` whose map is aggregated to query groups x key groups.

    A site without group coordinates keeps its map (one group per token).

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
    _check_aggregation(how)
    kind = group_kind(chosen.attrs, has_groups(site_node))
    if has_groups(site_node):
        query_groups = token_groups(site_node, "query", sample)
        key_groups = token_groups(site_node, "key", sample)
        masked = chosen.variable != "weights" and bool(np.isneginf(chosen.values).any())
        chosen.values, query_order, key_order = aggregate_to_groups(_masked_as_missing(chosen), query_groups, key_groups, how)
        if masked:
            # NaN group pairs here are pairs the mask hides from every query of the group.
            chosen.missing_note = "masked"
        chosen.query_labels = [str(g) for g in query_order]
        chosen.key_labels = [str(g) for g in key_order]
        chosen.described["tokens"] = f"{how} per {kind}"
    else:
        chosen.values = _masked_as_missing(chosen)
    return chosen


# --- labels that fit -------------------------------------------------------------------------------
# Bars are sized with the same arithmetic as the maps (attnformat.viewer.output): one label pitch
# per rotated label, the estimated width of the longest label when horizontal.


def tick_plan(labels, axis_length: float, *, fontsize: float = TICK_FONTSIZE, rotatable: bool = True) -> tuple[int, int]:
    """``(rotation, step)`` so that ``labels`` along an axis of ``axis_length`` inches do not overlap.

    Horizontal labels when they fit side by side; otherwise rotated by 90 degrees (x axis only,
    ``rotatable=True``); every ``step``-th label when even those do not fit.

    Examples
    --------
    >>> tick_plan([str(i) for i in range(19)], 3.2), tick_plan([str(i) for i in range(19)], 2.8)
    ((0, 1), (90, 1))
    >>> tick_plan(["robot0_eef_pos_past_traj_delta"] * 3, 3.0)
    (90, 1)
    >>> tick_plan([str(i) for i in range(64)], 2.0, rotatable=False)
    (0, 5)
    """
    count = len(labels)
    if count == 0:
        return 0, 1
    if rotatable and longest_label(labels, fontsize) + label_pitch(fontsize) / 3 <= axis_length / count:
        return 0, 1
    return (90 if rotatable else 0), tick_step(count, axis_length, fontsize)


def set_ticks(ax, axis: str, labels, axis_length: float, *, fontsize: float = TICK_FONTSIZE) -> int:
    """Label the positions ``0..n-1`` of ``axis`` (``"x"`` or ``"y"``) so that no two labels overlap;
    returns the step (1: every label shown).

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> ax = plt.figure().add_subplot()
    >>> set_ticks(ax, "x", [str(i) for i in range(40)], 2.0)
    3
    >>> [t.get_text() for t in ax.get_xticklabels()][:3]
    ['0', '3', '6']
    """
    labels = [str(label) for label in labels]
    rotation, step = tick_plan(labels, axis_length, fontsize=fontsize, rotatable=axis == "x")
    positions = list(range(0, len(labels), step))
    shown = [labels[i] for i in positions]
    if axis == "x":
        ax.set_xticks(positions, shown, rotation=rotation, fontsize=fontsize)
    else:
        ax.set_yticks(positions, shown, fontsize=fontsize)
    return step


def wrap_title(text: str, width: float, fontsize: float) -> str:
    """Break a ``" | "``-separated title into lines no wider than ``width`` inches.

    Examples
    --------
    >>> print(wrap_title("site | layer 3 | head 0 | logits (pre-softmax)", 1.5, 10))
    site | layer 3
    head 0
    logits (pre-softmax)
    """
    lines = []
    for paragraph in text.split("\n"):
        current = ""
        for part in paragraph.split(" | "):
            candidate = f"{current} | {part}" if current else part
            if current and text_width(candidate, fontsize) > width:
                lines.append(current)
                current = part
            else:
                current = candidate
        lines.append(current)
    return "\n".join(lines)


def draw_one_map(chosen, *, cmap, norm, origin, xlabel, ylabel, title, colorbar, ax, figsize, colorbar_text=None,
                 compact: bool = False):
    """Draw a prepared one-map :class:`Selection` the way :func:`~attnformat.viewer.heatmaps.heatmap`
    does: a figure sized to its labels (or ``figsize``), thinned labels, a labelled colorbar and a
    legend for absent cells. ``colorbar_text`` replaces the colorbar's label (what the values are).
    Returns the Axes. ``compact`` (with ``ax`` None and no absent cell) draws the same map, labels,
    title and colorbar on one canvas Axes placed by arithmetic, as ``heatmap(..., compact=True)``
    does, and returns that canvas: no constrained layout and no Matplotlib ticks to measure, which
    were about half the CPU time of a report's 128-token rollout (measured).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import color_scale, select
    >>> chosen = select(attnformat.example_path("dense"), layer=0)
    >>> cmap, norm = color_scale(chosen.values)
    >>> draw_one_map(chosen, cmap=cmap, norm=norm, origin="upper", xlabel="key", ylabel="query", title="t",
    ...              colorbar=True, ax=None, figsize=None).get_title()
    't'
    """
    missing = has_missing_cells(chosen.values)
    steps = None
    if ax is None:
        layout = layout_maps([map_panel(chosen, title=title)], ncols=1, figsize=figsize, colorbar=colorbar,
                             legend=missing)
        size = layout.figsize
        overflow = text_width(title or "", TITLE_FONTSIZE) + 0.2 - layout.panel[0]
        if figsize is None and overflow > 0:
            # A title is centred on its Axes, not on the figure: widen the figure by what the title
            # needs beyond the panel, or it runs off the left edge.
            size = (round(size[0] + overflow, 2), size[1])
        steps = layout.steps(*np.shape(chosen.values)[-2:])
        if compact and not missing:
            # The panel takes the width added for the title, as constrained layout gives it to the Axes;
            # the labels keep the steps of the unwidened panel, as on the default figure.
            wider = dataclasses.replace(layout, figsize=size, panel=(layout.panel[0] + size[0] - layout.figsize[0],
                                                                     layout.panel[1]))
            return _compact_heatmap(chosen, wider, title=title, cmap=cmap, norm=norm, origin=origin, colorbar=colorbar,
                                    axis_labels=(xlabel, ylabel), label=colorbar_text or colorbar_label(chosen),
                                    mark_limits=False, steps=steps)
        ax = new_figure(size).add_subplot()
    image = draw_map(ax, chosen.values, cmap=cmap, norm=norm, query_labels=chosen.query_labels,
                     key_labels=chosen.key_labels, origin=origin, xlabel=xlabel, ylabel=ylabel, title=title, steps=steps)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=colorbar_text or colorbar_label(chosen))
    if missing:
        ax.legend(handles=missing_handles(chosen), loc="upper left", bbox_to_anchor=(1.0, -0.02),
                  fontsize=TICK_FONTSIZE + 1, frameon=False, handlelength=1.2, borderaxespad=0.0)
    return ax


@documented
def group_map(source, *, site=None, variable="weights", aggregate=None, layer=None, head=None, sample=None,
              step=None, cmap=None, vmin=None, vmax=None, log: bool = False, center=None, origin="upper",
              colorbar=True, ax=None, figsize=None, title=None):
    """Group x group heatmap (frame x frame, modality x modality) of one head or the mean over heads.

    Group pairs no query of the group sees (a causal mask) are absent, drawn in the missing colour
    and named in a legend, never as a value.

    Parameters
    ----------
    $source
    $site
    $variable
    $aggregate
    $selectors(layer, head, sample, step)
    $color
    $origin
    $colorbar
    $ax
    $heatmap_figsize
    $heatmap_title

    Returns
    -------
    matplotlib.axes.Axes

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
    cmap, norm = color_scale(chosen.values, variable=variable, cmap=cmap, vmin=vmin, vmax=vmax, log=log, center=center)
    kind = group_kind(chosen.attrs, "tokens" in chosen.described)
    label = colorbar_label(chosen) + (f", {chosen.described['tokens']}" if "tokens" in chosen.described else "")
    return draw_one_map(chosen, cmap=cmap, norm=norm, origin=origin, xlabel=f"key {kind}", ylabel=f"query {kind}",
                        title=chosen.title() if title is None else title, colorbar=colorbar, ax=ax, figsize=figsize,
                        colorbar_text=label)


def sink_score(profile) -> float:
    """First value minus the mean of the middle ones (all but first and last), as in seed 004:
    ``head[0] - head[1:-1].mean()``. NaN (a key the block does not see) is left out of the mean.

    Examples
    --------
    >>> sink_score([7.0, 1.0, 2.0, 3.0, 9.0])
    5.0
    """
    profile = np.asarray(profile, dtype=np.float64)
    if profile.size < 3:
        return float("nan")
    middle = profile[1:-1]
    if np.isnan(middle).all():
        return float("nan")
    return float(profile[0] - np.nanmean(middle))


@dataclass(frozen=True)
class QueryBlock:
    """The query tokens a block profile averages over, and how to say which they are.

    ``rows`` are query positions; ``labels`` the query groups (or tokens) of the block; ``kind``
    what they are (``frame``, ``modality``, ``token``); ``rule`` how the block was chosen.
    """

    rows: np.ndarray
    labels: list
    kind: str
    rule: str

    @property
    def text(self) -> str:
        """``frames [16, 17, 18]``: the block as seed 004's figure names it."""
        return f"{plural(self.kind)} [{', '.join(self.labels)}]"


def _visible_keys(chosen) -> np.ndarray:
    """``(query, key)``: which keys each query sees in any head (finite logits, non-zero weights)."""
    values = np.asarray(chosen.values, dtype=np.float64)
    seen = np.isfinite(values) & ((values != 0) if chosen.variable == "weights" else True)
    return seen.reshape((-1,) + seen.shape[-2:]).any(axis=0)


def _last_causal_block(groups: _Groups, seen: np.ndarray) -> tuple[list, str]:
    last = seen[-1]
    block = []
    for group in reversed(groups.order):
        if not (seen[groups.members(group)] == last).all():
            break
        block.append(group)
    if 0 < len(block) < len(groups.order):
        return block[::-1], "last block of the causal mask"
    # Every query sees the same keys: no blocks in the mask, so the last group alone.
    return [groups.order[-1]], "last group (the mask shows no blocks)"


def _matches(wanted, group, label) -> bool:
    return str(wanted) == str(label) or str(wanted) == str(group)


def query_block(site_node, chosen, *, query_groups=None, last=None, queries=None) -> QueryBlock:
    """The query block of :func:`query_block_profiles` (see there for the rules).

    ``chosen`` is the :class:`Selection` of the site's map (its values give the causal mask).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import resolve_site, select
    >>> site = resolve_site(attnformat.example_path("frames"))
    >>> query_block(site, select(site, "logits", keep=("head",)), last=2).text
    'frames [3, 4]'
    """
    given = [name for name, value in (("query_groups", query_groups), ("last", last), ("queries", queries))
             if value is not None]
    if len(given) > 1:
        raise TypeError(f"give at most one of query_groups, last and queries, not {' and '.join(given)}")
    sample = chosen.positions.get("sample")
    if queries is not None:
        queries = [queries] if isinstance(queries, (str, int, np.integer)) else list(queries)
        rows = np.array([position(site_node, "query", q, sample=sample) for q in queries], dtype=int)
        token_labels = labels_of(site_node, "query", sample)
        return QueryBlock(rows, [token_labels[r] for r in rows], "query token", "given queries")
    groups = _Groups.of(site_node, "query", sample)
    kind = group_kind(chosen.attrs, has_groups(site_node))
    where = f"file {chosen.source}, site {chosen.site}"
    if last is not None:
        if not isinstance(last, (int, np.integer)) or not 1 <= last <= len(groups.order):
            raise SelectionError(f"last={last!r}: {where} has {len(groups.order)} query {plural(kind)}; "
                                 f"give 1 to {len(groups.order)}")
        wanted, rule = groups.order[-int(last):], f"last {int(last)} {plural(kind)}"
    elif isinstance(query_groups, slice):
        wanted, rule = groups.order[query_groups], "given slice"
        if not wanted:
            raise SelectionError(f"query groups {query_groups} select nothing in {where}; "
                                 f"query groups: {', '.join(groups.labels)}")
    elif query_groups is not None:
        requested = [query_groups] if isinstance(query_groups, (str, int, np.integer)) else list(query_groups)
        wanted = []
        for value in requested:
            found = [g for g, label in zip(groups.order, groups.labels) if _matches(value, g, label)]
            if not found:
                raise SelectionError(f"query group {value} not in {where}; query groups: {', '.join(groups.labels)}")
            wanted.append(found[0])
        rule = "given groups"
    elif int(chosen.attrs.get("causal", 0) or 0) == 1:
        wanted, rule = _last_causal_block(groups, _visible_keys(chosen))
    else:
        wanted, rule = [groups.order[-1]], f"last {kind}"
    chosen_groups = set(map(str, wanted))
    rows = np.flatnonzero([str(g) in chosen_groups for g in groups.of_token])
    labels = [label for g, label in zip(groups.order, groups.labels) if str(g) in chosen_groups]
    return QueryBlock(rows, labels, kind, rule)


@documented
def query_block_profiles(source, *, site=None, variable="weights", query_groups=None, last=None, queries=None,
                         by_group=True, aggregate=None, layer=None, sample=None, step=None):
    """Per-head attention of a query block over key groups or keys (the bars of seed 004's figure 2).

    A bar is the mean over the block's query tokens of what each query gives the key group (the
    ``aggregate`` over the group's key tokens), i.e. for frame-level maps the mean over the block's
    query frames of the value at each key frame: seed 004's ``last_block_frame_attention``. Queries
    that do not see a key (masked ``-inf``, NaN) are left out of that key's mean.

    Parameters
    ----------
    $source
    $site
    $variable
    $query_block
    $by_group
    $aggregate
    $group_selectors

    Returns
    -------
    (Selection, numpy.ndarray)
        The selection (``query_labels`` are the block's groups, ``described["query"]`` says which,
        ``key_labels`` the bars) and the ``(head, key group or key)`` profiles.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import query_block_profiles
    >>> chosen, profiles = query_block_profiles(attnformat.example_path("frames"), variable="logits", last=3)
    >>> profiles.shape, chosen.described["query"]
    ((4, 5), 'frames [2, 3, 4]')
    """
    site_node = resolve_site(source, site)
    chosen = select(site_node, variable, keep=("head",), drop_padding=False, layer=layer, sample=sample, step=step)
    block = query_block(site_node, chosen, query_groups=query_groups, last=last, queries=queries)
    rows = _masked_as_missing(chosen)[..., block.rows, :]
    sample_position = chosen.positions.get("sample")
    if by_group:
        how = aggregate or default_aggregation(variable, chosen.attrs)
        _check_aggregation(how)
        keys = _Groups.of(site_node, "key", sample_position)
        per_query = np.stack([_over_key_tokens(rows[..., keys.members(g)], how) for g in keys.order], axis=-1)
        chosen.key_labels = keys.labels
        if has_groups(site_node):
            chosen.described["tokens"] = f"{how} per {group_kind(chosen.attrs)}"
    else:
        per_query = rows
        chosen.key_labels = labels_of(site_node, "key", sample_position)
    values = _reduce(per_query, (-2,), "mean")
    chosen.described["query"] = block.text
    chosen.query_block = block  # like heatmaps' missing_note: an extra the Selection carries for its plots
    chosen.query_labels = block.labels
    chosen.query_index = block.rows
    chosen.values = values
    chosen.dims = ("head", "key") if values.ndim == 2 else ("key",)
    return chosen, values


def _head_labels(chosen, count: int) -> list:
    return chosen.kept.get("head", [str(i) for i in range(count)])


def _head_title(head) -> str:
    return f"H{head}"


register(
    bar_limits="""
        vmin, vmax : float, optional
            Limits of every panel's y axis (the bars' value scale); by default each panel spans its
            own bars and 0, like seed 004. Given limits are used exactly.
    """,
    sharey="""
        sharey : bool, default False
            One y scale for every head (compare heights across panels).
    """,
    bar_color="""
        color : color, optional
            Bar colour; seaborn's first "colorblind" colour (seed 004's ``BAR_COLOR``) by default.
    """,
)


def _bar_layout(keys: int, key_labels, ncols: int, panels: int, figsize) -> tuple[tuple[float, float], float]:
    """Panel size (inches) and the x-axis length ticks are planned for.

    By default a panel is wide enough for every key label side by side (or rotated) and the
    figure stays within :data:`~attnformat.viewer.output.MAX_FIGSIZE`; a given ``figsize`` wins.
    """
    columns = max(1, min(ncols, panels))
    rows = math.ceil(panels / columns)
    if figsize is not None:
        panel_width = figsize[0] / columns
    else:
        panel_width = min(max(3.4, 1.05 + keys * 0.17), 6.0, max(2.2, MAX_FIGSIZE[0] / columns))
    # Room left of the bars for the y tick labels and the y label, and a small right margin.
    axis_length = max(panel_width - 1.05, 0.5)
    rotation, _ = tick_plan(key_labels, axis_length)
    height = 2.6 + (longest_label(key_labels) if rotation else 0.0)
    if figsize is None:
        height = min(height, max(1.8 + (longest_label(key_labels) if rotation else 0.0), MAX_FIGSIZE[1] / rows))
    return (panel_width, height), axis_length


@documented
def group_bars(source, *, site=None, variable="weights", query_groups=None, last=None, queries=None, by_group=True,
               aggregate=None, layer=None, sample=None, step=None, vmin=None, vmax=None, sharey: bool = False,
               color=None, ncols=4, figsize=None, title=None):
    """Per-head bar charts of a query block's attention over key groups (or keys), sink score in each title.

    Seed 004's figure 2: each panel is titled ``H{head} (sink={score:.2f})``, where the score is
    ``head[0] - head[1:-1].mean()`` over the panel's bars (:func:`sink_score`); bars are drawn in
    seed 004's colour with a black line through their tops. The bar heights are
    :func:`query_block_profiles`. The figure says which queries the bars average over, the seed's
    way (``Query: frames [16, 17, 18]``), on the suptitle's last line, or, when ``title`` is given
    (it is used as the suptitle exactly), as the figure's x label.

    Parameters
    ----------
    $source
    $site
    $variable
    $query_block
    $by_group
    $aggregate
    $group_selectors
    $bar_limits
    $sharey
    $bar_color
    $ncols
    $figsize
    $title

    Returns
    -------
    matplotlib.figure.Figure
        One Axes per head.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import group_bars
    >>> figure = group_bars(attnformat.example_path("frames"), variable="logits", last=3)
    >>> figure.axes[0].get_title(), figure._suptitle.get_text().splitlines()[-1]
    ('H0 (sink=4.18)', 'Query: frames [2, 3, 4]')
    """
    chosen, profiles = query_block_profiles(source, site=site, variable=variable, query_groups=query_groups, last=last,
                                            queries=queries, by_group=by_group, aggregate=aggregate, layer=layer,
                                            sample=sample, step=step)
    profiles = profiles.reshape((-1, profiles.shape[-1]))
    heads = _head_labels(chosen, profiles.shape[0])
    positions = np.arange(profiles.shape[-1])
    panel_size, axis_length = _bar_layout(len(positions), chosen.key_labels, ncols, len(heads), figsize)
    figure, axes = grid(len(heads), ncols=ncols, panel_size=panel_size, figsize=figsize)
    if sharey:
        for ax in axes[1:]:
            ax.sharey(axes[0])
    kind = group_kind(chosen.attrs, "tokens" in chosen.described) if by_group else "token"
    ylabel = chosen.normalization
    for ax, head, profile in zip(axes, heads, profiles):
        ax.bar(positions, profile, alpha=0.85, width=0.8, color=color or BAR_COLOR)
        ax.plot(positions, profile, "o-", color="black", linewidth=1, markersize=2)
        ax.set_title(f"{_head_title(head)} (sink={sink_score(profile):.2f})", fontsize=10, fontweight="bold")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(axis="y", labelsize=TICK_FONTSIZE)
        step_shown = set_ticks(ax, "x", chosen.key_labels, axis_length)
        # A thinned axis says so, as the maps do.
        ax.set_xlabel(thinned_label(f"key {kind}", step_shown), fontsize=8)
        ax.set_xlim(-0.6, len(positions) - 0.4)
        if vmin is not None or vmax is not None:
            ax.set_ylim(bottom=vmin, top=vmax)
        ax.grid(True, alpha=0.3)
    query_line = f"Query: {chosen.described['query']}"
    if title is None:
        width = figure.get_figwidth() * 0.95
        figure.suptitle(wrap_title(chosen.title(skip=("head", "query")) + " | per-head attention", width, SUPTITLE_FONTSIZE)
                        + "\n" + query_line, fontsize=SUPTITLE_FONTSIZE)
    else:
        figure.suptitle(title, fontsize=SUPTITLE_FONTSIZE)
        figure.supxlabel(query_line, fontsize=9)
    return figure


@documented
def frame_statistics(source, *, site=None, variable=None, query_groups=None, last=None, queries=None,
                     aggregate=None, layer=None, sample=None, step=None) -> xr.Dataset:
    """Seed 004's statistics in one call: diagonal and first-column means of the group x group map,
    and per head the first, middle and last bar and the sink score of a query block.

    With ``M`` the ``(head, query group, key group)`` map (:func:`group_selection` per head; the
    stored map itself for a frame-level site) and ``P`` the block profiles
    (:func:`query_block_profiles`):

    * ``diagonal_mean = np.diagonal(M, axis1=1, axis2=2).mean()`` (self-attention strength);
    * ``first_column_mean = M[:, :, 0].mean()`` (sink strength);
    * per head ``first = P[h, 0]``, ``middle = P[h, 1:-1].mean()``, ``last = P[h, -1]``,
      ``sink = first - middle``.

    Means leave out NaN (pairs not captured, or masked): on a fully captured map they are the
    seed's plain means.

    Parameters
    ----------
    $source
    $site
    variable : str, optional
        The variable; by default ``logits`` (what seed 004 used) when the site has them, else ``weights``.
    $query_block
    $aggregate
    $group_selectors

    Returns
    -------
    xarray.Dataset
        Scalars ``diagonal_mean`` and ``first_column_mean``; ``first``, ``middle``, ``last``,
        ``sink`` on ``head``; ``profile`` on ``(head, key_group)``. Attributes: ``site``,
        ``source``, ``variable``, ``selection`` (layer, sample, step), ``query_block``
        (``"frames [16, 17, 18]"``), ``query_rule`` (how the block was chosen: ``"last block of
        the causal mask"``, ``"last 3 frames"``, ``"given groups"``...), ``aggregate`` and
        ``normalization``.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer.groups import frame_statistics
    >>> stats = frame_statistics(attnformat.example_path("frames"), last=3)
    >>> round(float(stats["first_column_mean"]), 3), stats.attrs["query_block"]
    (-1.633, 'frames [2, 3, 4]')
    >>> stats["sink"].sel(head=0).round(3).item()
    4.179
    """
    site_node = resolve_site(source, site)  # opened once, shared by both selections
    if variable is None:
        variable = "logits" if "logits" in site_node.data_vars else "weights"
    chosen, profiles = query_block_profiles(site_node, variable=variable, query_groups=query_groups, last=last,
                                            queries=queries, aggregate=aggregate, layer=layer, sample=sample, step=step)
    mapped = group_selection(site_node, variable=variable, aggregate=aggregate, keep=("head",), layer=layer,
                             sample=sample, step=step)
    frame_map = np.asarray(mapped.values, dtype=np.float64)
    frame_map = frame_map.reshape((-1,) + frame_map.shape[-2:])
    profiles = np.asarray(profiles, dtype=np.float64).reshape((-1, profiles.shape[-1]))
    head_values = (site_node.coords["head"].values if "head" in site_node.coords and "head" in chosen.kept
                   else np.arange(profiles.shape[0]))
    with np.errstate(invalid="ignore"):
        diagonal = _reduce(np.diagonal(frame_map, axis1=1, axis2=2), (0, 1), "mean")
        first_column = _reduce(frame_map[:, :, 0], (0, 1), "mean")
        middle = _reduce(profiles[:, 1:-1], (1,), "mean") if profiles.shape[-1] >= 3 else np.full(len(profiles), np.nan)
    first, final = profiles[:, 0], profiles[:, -1]
    return xr.Dataset(
        {"diagonal_mean": ((), float(diagonal)), "first_column_mean": ((), float(first_column)),
         "first": ("head", first), "middle": ("head", middle), "last": ("head", final), "sink": ("head", first - middle),
         "profile": (("head", "key_group"), profiles)},
        coords={"head": head_values, "key_group": chosen.key_labels},
        attrs={"site": chosen.site, "source": chosen.source, "variable": variable,
               "selection": chosen.describe(skip=("head", "query", "tokens")), "query_block": chosen.described["query"],
               "query_rule": chosen.query_block.rule,
               "aggregate": aggregate or default_aggregation(variable, chosen.attrs),
               "normalization": chosen.normalization},
    )


def format_frame_statistics(stats: xr.Dataset) -> str:
    """The lines seed 004 printed: the two means, then ``H 0: first=..., mid=..., last=..., sink=+...``.

    Parameters
    ----------
    stats : xarray.Dataset
        What :func:`frame_statistics` returned.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer.groups import frame_statistics
    >>> print(format_frame_statistics(frame_statistics(attnformat.example_path("frames"), last=3)))
    blocks | layer 3 | logits (pre-softmax)
    diagonal mean: -2.853
    first-column mean: -1.633
    Query: frames [2, 3, 4]
    H 0: first=0.964, mid=-3.215, last=-2.988, sink=+4.179
    H 1: first=-2.652, mid=-3.074, last=-2.952, sink=+0.422
    H 2: first=-1.176, mid=-2.939, last=-2.992, sink=+1.763
    H 3: first=-3.538, mid=-3.009, last=-3.368, sink=-0.529
    """
    header = " | ".join(part for part in (stats.attrs.get("site"), stats.attrs.get("selection"),
                                           stats.attrs.get("normalization")) if part)
    lines = [header,
             f"diagonal mean: {float(stats['diagonal_mean']):.3f}",
             f"first-column mean: {float(stats['first_column_mean']):.3f}",
             f"Query: {stats.attrs.get('query_block', '')}"]
    for index, head in enumerate(stats["head"].values):
        name = f"H{int(head):2d}" if isinstance(head, (int, np.integer)) else f"H{head}"
        first, middle, final, sink = (float(stats[v].values[index]) for v in ("first", "middle", "last", "sink"))
        lines.append(f"{name}: first={first:.3f}, mid={middle:.3f}, last={final:.3f}, sink={sink:+.3f}")
    return "\n".join(lines)
