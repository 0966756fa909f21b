"""Picking what a plot shows: a site, one map (or a stack of maps), reductions and display pooling.

Everything here works on lazy trees: selectors become integer positions first, the chosen slice
is read with one ``.values`` call, and only then are heads, layers or samples averaged. Nothing in
this module draws, so every plot's data can be tested without a figure.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from attnformat import resolving
from attnformat.conventions import LABEL_COORDS, MASK_COORDS, is_site
from attnformat.engines import Location
from attnformat.errors import AttnFormatError, NonConformingError, SelectionError, UnreadableFileError
from attnformat.reading import get_site, open as open_tree, site_paths, source_of
from attnformat.validation import validate

#: Dimensions a selector can fix or reduce (the leading dimensions of the spec).
SELECTABLE_DIMS = ("step", "sample", "layer", "head", "time", "node")
#: Selector values that reduce a dimension instead of picking one element of it.
REDUCTIONS = ("mean", "max")
#: Maps wider than this are block-pooled before drawing (a screen has no more pixels anyway).
DISPLAY_SIZE = 1024
#: Slices to reduce that are larger than this many elements are read one map at a time.
_STREAM_ELEMENTS = 1 << 25


def open_source(source, storage_options=None) -> xr.DataTree:
    """Return a tree for a path or a tree; a path is checked against the spec's metadata rules first.

    Parameters
    ----------
    source
        A path or URL attnformat can open, or an :class:`xarray.DataTree` (a whole file or one site).
    storage_options
        fsspec options for a URL (endpoint, credentials...).

    Raises
    ------
    attnformat.NonConformingError
        If the file breaks a MUST rule; the message is the validator's report.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import open_source
    >>> list(open_source(attnformat.example_path("dense")).children)
    ['encoder']
    """
    if isinstance(source, xr.DataTree):
        return source
    if isinstance(source, (str, os.PathLike, Location)):
        source = Location.of(source, storage_options)
        try:
            tree = open_tree(source)
        except UnreadableFileError:  # a missing path raises again below; a broken store gets a report
            tree = None
        # Validating the opened tree (not the path) opens the file once instead of twice.
        report = validate(source if tree is None else tree, check_values=False)
        if not report.ok:
            raise NonConformingError(report.format(), report)
        return tree
    raise TypeError(f"expected a path or an xarray.DataTree, not {type(source).__name__}")


def resolve_site(source, site: str | None = None, storage_options=None) -> xr.DataTree:
    """The site group a plot reads: ``source`` itself when it is a site, else the named (or only) site.

    Parameters
    ----------
    source
        A path or URL attnformat can open, or an :class:`xarray.DataTree` (a file or one site).
    site
        Path of the site; may be omitted when the file has one site.
    storage_options
        fsspec options for a URL (``{"endpoint_url": ...}`` for an S3-compatible server).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import resolve_site
    >>> resolve_site(attnformat.example_path("encoder-decoder"), "decoder/cross").path
    '/decoder/cross'
    """
    if storage_options is not None and not isinstance(source, xr.DataTree):
        # A Location carries the options through open_source's opening and validation.

        source = Location.of(source, storage_options)
    tree = open_source(source)
    if site is None and is_site(tree.attrs):
        return tree
    if site is not None and is_site(tree.attrs) and tree.path.strip("/") == str(site).strip("/"):
        return tree
    return get_site(tree.root if is_site(tree.attrs) else tree, site)


def site_name(site: xr.DataTree) -> str:
    """A site's path without the leading slash, as messages and titles show it.

    Examples
    --------
    >>> import attnformat
    >>> site_name(resolve_site(attnformat.example_path("steps")))
    'trunk/iga'
    """
    return site.path.strip("/")


def labels_of(site: xr.DataTree, dim: str, sample: int | None = None) -> list[str]:
    """Display labels along ``query``, ``key`` or ``node``: the label coordinate, else positions.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import labels_of, resolve_site
    >>> labels_of(resolve_site(attnformat.example_path("dense")), "query")[:3]
    ['[CLS]', 'the', 'cat']
    """
    name = LABEL_COORDS.get(dim)
    if name and name in site.coords:
        labels = site.coords[name]
        if "sample" in labels.dims:
            labels = labels.isel(sample=sample or 0)
        return [str(v) for v in labels.values]
    if dim in site.coords:
        return [str(v) for v in site.coords[dim].values]
    return [str(i) for i in range(site.sizes[dim])]


def position(site: xr.DataTree, dim: str, value, *, sample: int | None = None) -> int:
    """Integer position of a selector along ``dim``.

    Integers match the dimension's coordinate values when it has some (``layer=3`` is the layer
    labelled 3, not the fourth) and positions otherwise; strings match labels (``query="cat"``,
    ``node="sensor 2"``) or string coordinates.

    Raises
    ------
    attnformat.SelectionError
        Naming the file, the site and listing what exists.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import position, resolve_site
    >>> site = resolve_site(attnformat.example_path("dense"))
    >>> position(site, "query", "cat"), position(site, "layer", 1)
    (2, 1)
    """
    if dim not in site.sizes:
        raise SelectionError(
            f"{dim} {value!r} not in file {source_of(site)}, site {site_name(site)}: it has no {dim} dimension; "
            f"dimensions: {', '.join(site.sizes)}")
    label_name = LABEL_COORDS.get(dim)
    labels = labels_of(site, dim, sample) if label_name and label_name in site.coords else None
    return resolving.position(dim, value, size=site.sizes[dim], index=site.coords[dim].values if dim in site.coords else None,
                              labels=labels, where=f"file {source_of(site)}, site {site_name(site)}")


def _reduce(values: np.ndarray, axes: tuple[int, ...], how: str) -> np.ndarray:
    if not axes:
        return values
    with warnings.catch_warnings():
        # All-NaN slices (maps not captured) are expected and stay NaN.
        warnings.simplefilter("ignore", RuntimeWarning)
        return (np.nanmax if how == "max" else np.nanmean)(values, axis=axes)


@dataclass
class Selection:
    """The values a plot draws and everything its title and axes need to say what they are.

    ``values`` has the dimensions in ``dims``: the kept ones (e.g. ``head`` for a grid) followed by
    ``query, key`` (dense, or densified edges) or ``edge``. ``described`` maps every selectable
    dimension to what was chosen (``"0"``, ``"mean of 12"``).
    """

    values: np.ndarray
    dims: tuple[str, ...]
    variable: str
    site: str
    source: str
    attrs: dict
    described: dict = field(default_factory=dict)
    positions: dict = field(default_factory=dict)
    query_labels: list = field(default_factory=list)
    key_labels: list = field(default_factory=list)
    query_index: np.ndarray | None = None
    key_index: np.ndarray | None = None
    kept: dict = field(default_factory=dict)
    pooled: int = 1
    pool: str = ""

    @property
    def normalization(self) -> str:
        """What the values are, in words: ``weights (softmax)``, ``logits (pre-softmax)``."""
        normalization = self.attrs.get("normalization", "other")
        if self.variable == "weights":
            return f"weights ({normalization})"
        if self.variable == "logits":
            return f"logits (pre-{normalization})" if normalization != "other" else "logits"
        if self.variable == "bias":
            return "bias (additive)"
        return self.variable

    def describe(self, *, skip=()) -> str:
        """``layer 0 | head mean of 3``: the selection, one phrase per dimension."""
        return " | ".join(f"{dim} {text}" for dim, text in self.described.items() if dim not in skip)

    def title(self, *, skip=()) -> str:
        """Full title: site, selection, what the values are, and any display pooling."""
        parts = [self.site, self.describe(skip=skip), self.normalization]
        if self.pooled > 1:
            parts.append(f"shown as {self.pooled}x{self.pooled} block {self.pool}")
        if np.size(self.values) and np.isnan(np.asarray(self.values, dtype=np.float64)).all():
            parts.append("not captured (all NaN)")  # an incomplete file: say so rather than show a blank map
        return " | ".join(p for p in parts if p)


def select(source, variable: str = "weights", *, site: str | None = None, keep=(), drop_padding: bool = True,
           densify: bool = True, **selectors) -> Selection:
    """Select (and reduce) the values of one attention variable, reading only the chosen slice.

    Parameters
    ----------
    source
        Path, tree or site group.
    variable
        ``"weights"``, ``"logits"``, ``"bias"`` or any variable of the site.
    site
        Site path when the file has several.
    keep
        Leading dimensions to keep whole (``("head",)`` for a head grid).
    drop_padding
        Leave out tokens whose ``query_mask``/``key_mask`` is False (when one sample is selected).
    densify
        Turn edge-layout values into a ``(query, key)`` matrix (target rows, source columns);
        missing edges are 0 for weights and NaN otherwise.
    **selectors
        ``layer``, ``head``, ``sample``, ``step``, ``time``, ``node``: a label, an index, or
        ``"mean"``/``"max"`` to reduce. Unset, ``head`` is averaged and the others take their first
        element.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import select
    >>> chosen = select(attnformat.example_path("dense"), layer=1, head=2)
    >>> chosen.values.shape, chosen.describe()
    ((6, 6), 'layer 1 | head 2')
    """
    site_node = resolve_site(source, site)
    name = site_name(site_node)
    if variable not in site_node.data_vars:
        raise SelectionError(f"variable {variable!r} not in file {source_of(site_node)}, site {name}; "
                             f"variables: {', '.join(site_node.data_vars)}")
    array = site_node[variable]
    leading = [d for d in array.dims if d in SELECTABLE_DIMS]
    for dim, value in selectors.items():
        if dim not in SELECTABLE_DIMS:
            raise TypeError(f"unknown selector {dim!r}; selectors: {', '.join(SELECTABLE_DIMS)}")
        if value is not None and dim not in leading:
            raise SelectionError(f"{dim} {value} not in file {source_of(site_node)}, site {name}: "
                                 f"{variable} has no {dim} dimension; its dimensions: {', '.join(array.dims)}")
    fixed, reductions, described = {}, {}, {}
    # The sample comes first: per-sample labels and masks depend on it.
    ordered = sorted(leading, key=lambda d: d != "sample")
    for dim in ordered:
        value = selectors.get(dim)
        if dim in keep:
            described[dim] = "all"
            continue
        if value is None:
            value = "mean" if dim == "head" else 0 if dim not in site_node.coords else site_node.coords[dim].values[0]
        if isinstance(value, str) and value in REDUCTIONS:
            reductions[dim] = value
            described[dim] = f"{value} of {site_node.sizes[dim]}"
        else:
            fixed[dim] = position(site_node, dim, value, sample=fixed.get("sample"))
            described[dim] = labels_of(site_node, dim, fixed.get("sample"))[fixed[dim]]
    described = {dim: described[dim] for dim in leading}
    subset = array.isel(fixed)
    values, dims = _read_reduced(subset, reductions)
    sample = fixed.get("sample")
    chosen = Selection(values=values, dims=dims, variable=variable, site=name, source=source_of(site_node),
                       attrs=dict(site_node.attrs), described=described, positions=fixed,
                       kept={d: labels_of(site_node, d, sample) for d in keep if d in dims})
    if "edge" in dims and densify:
        _densify(chosen, site_node)
    elif "query" in dims:
        chosen.query_labels = labels_of(site_node, "query", sample)
        chosen.key_labels = labels_of(site_node, "key", sample)
        chosen.query_index = np.arange(len(chosen.query_labels))
        chosen.key_index = np.arange(len(chosen.key_labels))
        if drop_padding and ("sample" in fixed or "sample" not in site_node.sizes):
            _drop_padding(chosen, site_node, sample)
    return chosen


def _read_reduced(subset: xr.DataArray, reductions: dict) -> tuple[np.ndarray, tuple[str, ...]]:
    """Read a lazy slice and apply the reductions; large slices are read one map at a time."""
    reduced = [d for d in subset.dims if d in reductions]
    dims = tuple(d for d in subset.dims if d not in reductions)
    if not reduced or subset.size <= _STREAM_ELEMENTS or len({reductions[d] for d in reduced}) > 1:
        values = np.asarray(subset.values)
        for how in REDUCTIONS:
            axes = tuple(subset.dims.index(d) for d in reduced if reductions[d] == how)
            if axes:
                values = _reduce(values, axes, how)
                subset = subset.isel({d: 0 for d in reduced if reductions[d] == how}, drop=True)
        return values, dims
    # Averaging 12 heads of a 4096^2 map should not hold all 12 in memory: accumulate map by map.
    total = count = peak = None
    for index in np.ndindex(*(subset.sizes[d] for d in reduced)):
        one = np.asarray(subset.isel(dict(zip(reduced, index))).values, dtype=np.float64)
        finite = ~np.isnan(one)
        total = np.where(finite, one, 0.0) + (0.0 if total is None else total)
        count = finite.astype(np.int64) + (0 if count is None else count)
        peak = one if peak is None else np.fmax(peak, one)
    if reductions[reduced[0]] == "max":
        return peak.astype(subset.dtype, copy=False), dims
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return mean.astype(np.float32 if subset.dtype == np.float32 else np.float64), dims


def _node_dim(site: xr.DataTree) -> str:
    return site.attrs.get("edge_node_dim", "node")


def node_labels(site: xr.DataTree) -> list[str]:
    """Labels of the nodes an edge site's ``source``/``target`` index (``node`` or ``time`` steps).

    Examples
    --------
    >>> import attnformat
    >>> node_labels(resolve_site(attnformat.example_path("edge-time"), "temporal"))
    ['0', '1', '2', '3']
    """
    node_dim = _node_dim(site)
    if node_dim in site.sizes:
        return labels_of(site, node_dim)
    count = int(max(site.coords["source"].values.max(), site.coords["target"].values.max())) + 1
    return [str(i) for i in range(count)]


def densify_edges(values: np.ndarray, source: np.ndarray, target: np.ndarray, nodes: int, *, fill: float = 0.0) -> np.ndarray:
    """Edge values ``(..., edge)`` as ``(..., target, source)`` matrices; absent edges get ``fill``.

    Examples
    --------
    >>> densify_edges(np.array([0.25, 0.75]), np.array([0, 1]), np.array([1, 1]), 2).tolist()
    [[0.0, 0.0], [0.25, 0.75]]
    """
    dense = np.full(values.shape[:-1] + (nodes, nodes), fill, dtype=np.result_type(values.dtype, np.float32))
    dense[..., target, source] = values
    return dense


def _densify(chosen: Selection, site: xr.DataTree) -> None:
    labels = node_labels(site)
    fill = 0.0 if chosen.variable == "weights" else np.nan
    chosen.values = densify_edges(chosen.values, site.coords["source"].values, site.coords["target"].values, len(labels), fill=fill)
    chosen.dims = chosen.dims[:-1] + ("query", "key")
    chosen.query_labels = chosen.key_labels = labels
    chosen.query_index = chosen.key_index = np.arange(len(labels))


def real_tokens(site: xr.DataTree, dim: str, sample: int | None) -> np.ndarray | None:
    """Which tokens along ``query`` or ``key`` are real (not padding), or None when all are.

    Examples
    --------
    >>> import attnformat
    >>> site = attnformat.open(attnformat.example_path("padded-batch"))["encoder/self"]
    >>> real_tokens(site, "key", 1).tolist(), real_tokens(site, "key", 0)
    ([True, True, True, False, False], None)
    """
    name = MASK_COORDS[dim]
    if name not in site.coords:
        return None
    mask = site.coords[name]
    if "sample" in mask.dims:
        mask = mask.isel(sample=sample or 0)
    keep = np.asarray(mask.values, dtype=bool)
    return None if keep.all() else keep


def _drop_padding(chosen: Selection, site: xr.DataTree, sample: int | None) -> None:
    for dim, axis in (("query", -2), ("key", -1)):
        keep = real_tokens(site, dim, sample)
        if keep is None:
            continue
        chosen.values = np.compress(keep, chosen.values, axis=axis)
        if dim == "query":
            chosen.query_labels = [l for l, k in zip(chosen.query_labels, keep) if k]
            chosen.query_index = np.flatnonzero(keep)
        else:
            chosen.key_labels = [l for l, k in zip(chosen.key_labels, keep) if k]
            chosen.key_index = np.flatnonzero(keep)


def block_pool(values: np.ndarray, factor: int, how: str = "mean") -> np.ndarray:
    """Reduce the last two axes by ``factor`` x ``factor`` blocks (NaN-aware mean or max).

    Examples
    --------
    >>> block_pool(np.arange(16.0).reshape(4, 4), 2).tolist()
    [[2.5, 4.5], [10.5, 12.5]]
    """
    if factor <= 1:
        return values
    rows, cols = values.shape[-2:]
    padded_rows, padded_cols = math.ceil(rows / factor) * factor, math.ceil(cols / factor) * factor
    if (padded_rows, padded_cols) != (rows, cols):
        padding = [(0, 0)] * (values.ndim - 2) + [(0, padded_rows - rows), (0, padded_cols - cols)]
        values = np.pad(values.astype(np.float32, copy=False), padding, constant_values=np.nan)
    blocks = values.reshape(values.shape[:-2] + (padded_rows // factor, factor, padded_cols // factor, factor))
    return _reduce(blocks, (-3, -1), how)


def pool_for_display(chosen: Selection, max_size: int = DISPLAY_SIZE, how: str = "mean") -> Selection:
    """Block-pool a selection whose map is wider than ``max_size``; the title then says so.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import pool_for_display, select
    >>> pool_for_display(select(attnformat.example_path("dense")), max_size=3).values.shape
    (3, 3)
    """
    if how not in REDUCTIONS:
        raise AttnFormatError(f"pooling must be one of {', '.join(REDUCTIONS)}, not {how!r}")
    longest = max(chosen.values.shape[-2:])
    if longest <= max_size:
        return chosen
    factor = math.ceil(longest / max_size)
    chosen.values = block_pool(chosen.values, factor, how)
    chosen.pooled, chosen.pool = factor, how
    chosen.query_labels = chosen.query_labels[::factor]
    chosen.key_labels = chosen.key_labels[::factor]
    return chosen


def sites_of(source) -> list[xr.DataTree]:
    """Every site of a file, in tree order.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import sites_of
    >>> [s.path for s in sites_of(attnformat.example_path("encoder-decoder"))]
    ['/decoder/cross', '/decoder/self', '/encoder/self']
    """
    tree = open_source(source)
    root = tree.root if is_site(tree.attrs) else tree
    return [root[path] for path in site_paths(root)]
