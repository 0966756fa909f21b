"""Picking what a plot shows: a site, one map (or a stack of maps), reductions and display pooling.

Everything here works on lazy trees: selectors become integer positions first, the chosen slice
is read with one ``.values`` call, and only then are heads, layers or samples averaged. Nothing in
this module draws, so every plot's data can be tested without a figure.

One plot of a path takes a direct road when it can. Measured with ``python -X importtime``,
opening a tree costs ~0.8 s of imports (xarray and pandas) before anything is read, and checking
the file against the spec's metadata rules (:func:`attnformat.validate` without value checks, as
:func:`open_source` does) needs that tree: a fresh process plotting one small map spent more than
twice as long as a script loading the map from a ``.npy``. So, decided: :func:`select` given a path
first asks the file's engine for a direct reader (:func:`attnformat.engines.direct.open_direct`:
the screened consolidated metadata and checked chunk reads, no xarray, no zarr-python) and uses
it when

- the file is *sealed* (every array has a chunk manifest, so its root metadata document pins the
  CRC-32C of every chunk it stores; files attnformat wrote since format 1.1 are), and
- this version of the file (the SHA-256 of that root document) has passed the metadata rules
  before, in this or an earlier process, under the same validator code. Verdicts are remembered
  as empty files named by a hash in :func:`attnformat.verdicts.verdict_directory` (like matplotlib's font cache); a
  file that was rewritten, a validator that changed, or a file never validated take the general
  road, which validates (and remembers a passing verdict).

The direct road screens the whole store as :func:`attnformat.open` does, and checks every chunk it
reads as every road does (links refused, chunk manifest, CRC-32C, size bounds); what it draws is
the same, value for value, label for label (tests check both roads against the arrays read with
zarr). Anything unusual (a URL, a zip, HDF5, an unsealed file, a layout the direct reader does
not know, a selector that names nothing, damage) takes the general road, so errors and messages
are the general road's own. Set ``ATTNFORMAT_CACHE_DIR=none`` to validate before every plot.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np

from attnformat import resolving
from attnformat.conventions import ATTENTION_VARIABLES, LABEL_COORDS, MASK_COORDS, POSITION_COORDS, ROOT_COMPLETENESS, is_site
from attnformat.engines import Location
from attnformat.errors import AttnFormatError, NonConformingError, SelectionError, UnreadableFileError
from attnformat.verdicts import may_read_directly, remember_conforming, version_of

#: Dimensions a selector can fix or reduce (the leading dimensions of the spec).
SELECTABLE_DIMS = ("step", "sample", "layer", "head", "time", "node")
#: Selector values that reduce a dimension instead of picking one element of it.
REDUCTIONS = ("mean", "max")
#: Maps wider than this are block-pooled before drawing (a screen has no more pixels anyway).
DISPLAY_SIZE = 1024
#: Slices to reduce that are larger than this many elements are read one map at a time.
_STREAM_ELEMENTS = 1 << 25
#: Site attributes that bound a temporal window (the spec's example, and the seeds' argument name).
WINDOW_ATTRS = ("max_temporal_distance", "max_distance")


def _is_tree(source) -> bool:
    # xarray is imported only by roads that build trees: an object cannot be a DataTree unless it is.
    xarray = sys.modules.get("xarray")
    return xarray is not None and isinstance(source, xarray.DataTree)


def open_source(source, storage_options=None):
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
    if _is_tree(source):
        return source
    if isinstance(source, (str, os.PathLike, Location)):
        from attnformat.reading import open as open_tree
        from attnformat.validation import validate

        source = Location.of(source, storage_options)
        version = version_of(source)  # before opening: the verdict must be about what was validated
        try:
            tree = open_tree(source)
        except UnreadableFileError:  # a missing path raises again below; a broken store gets a report
            tree = None
        # Validating the opened tree (not the path) opens the file once instead of twice.
        report = validate(source if tree is None else tree, check_values=False)
        if not report.ok:
            raise NonConformingError(report.format(), report)
        if version is not None and tree is not None and version_of(source) == version:
            remember_conforming(version)
        return tree
    raise TypeError(f"expected a path or an xarray.DataTree, not {type(source).__name__}")


def resolve_site(source, site: str | None = None, storage_options=None):
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
    from attnformat.reading import get_site

    if storage_options is not None and not _is_tree(source):
        # A Location carries the options through open_source's opening and validation.
        source = Location.of(source, storage_options)
    tree = open_source(source)
    if site is None and is_site(tree.attrs):
        return tree
    if site is not None and is_site(tree.attrs) and tree.path.strip("/") == str(site).strip("/"):
        return tree
    return get_site(tree.root if is_site(tree.attrs) else tree, site)


#: What figures call a site of each reduced layout.
_LAYOUT_NAMES = {"topk": "top-k", "statistics": "statistics"}


def site_of_layout(source, site: str | None, layout: str):
    """The site :func:`resolve_site` finds, refused unless its layout is ``layout``.

    Parameters
    ----------
    source : str, os.PathLike or xarray.DataTree
        The file or an opened tree.
    site : str, optional
        Site path; the only site when the file has one.
    layout : {"topk", "statistics"}
        The layout the site must have.

    Returns
    -------
    xarray.DataTree
        The site's group.

    Raises
    ------
    attnformat.SelectionError
        When the site has another layout (naming it and the file).

    Examples
    --------
    >>> import attnformat
    >>> site_of_layout(attnformat.example_path("statistics"), None, "statistics").name
    'self_stats'
    """
    node = resolve_site(source, site)
    if _view(node).attrs.get("layout") != layout:
        raise SelectionError(f"site {site_name(node)} of {_view(node).source} is a {node.attrs.get('layout')!r} site, "
                             f"not a {_LAYOUT_NAMES[layout]} site (layout {layout!r})")
    return node


def site_name(site) -> str:
    """A site's path without the leading slash, as messages and titles show it.

    Examples
    --------
    >>> import attnformat
    >>> site_name(resolve_site(attnformat.example_path("steps")))
    'trunk/iga'
    """
    if isinstance(site, _SiteView):
        return site.name
    return site.path.strip("/")


# -- sites, from a tree or read directly ------------------------------------------------------------


class _SiteView:
    """What :func:`select` and its helpers need of a site: its names, sizes and coordinates, and
    reads of one slice of a variable. Two kinds: a tree's site group, or a site read directly."""

    name: str
    source: str
    attrs: dict
    sizes: dict
    data_vars: list
    coords: list

    def dims(self, name: str) -> tuple[str, ...]:
        raise NotImplementedError

    def values(self, name: str) -> np.ndarray:
        """A coordinate's values."""
        raise NotImplementedError

    def read(self, variable: str, positions: dict) -> np.ndarray:
        """``variable`` with the dimensions in ``positions`` fixed (integers), the others whole."""
        raise NotImplementedError

    def dtype(self, variable: str) -> np.dtype:
        raise NotImplementedError


class _TreeSite(_SiteView):
    def __init__(self, node):
        from attnformat.reading import source_of

        self.node = node
        self.name = node.path.strip("/")
        self.source = source_of(node)
        self.attrs = node.attrs
        self.sizes = dict(node.sizes)
        self.data_vars = list(node.data_vars)
        self.coords = node.coords

    def dims(self, name):
        return tuple(self.node.coords[name].dims if name in self.node.coords else self.node[name].dims)

    def values(self, name):
        return self.node.coords[name].values

    def read(self, variable, positions):
        return np.asarray(self.node[variable].isel(positions).values)

    def dtype(self, variable):
        return self.node[variable].dtype


class _NotDirect(Exception):
    """The direct reader cannot show this site exactly as the tree would: take the general road."""


class _DirectSite(_SiteView):
    """A site of a file read directly (:func:`attnformat.engines.direct.open_direct`), with the
    names, attributes and coordinates the tree road would give it."""

    def __init__(self, store, path: str):
        self.store = store
        self.name = path
        self.source = store.text
        attrs = dict(store.groups[path])
        coordinate_names = set(str(attrs.pop("coordinates", "")).split())
        arrays = {}
        for member in store.members(path):
            array = store.array(f"{path}/{member}")
            if array is None:
                raise _NotDirect(member)
            arrays[member] = array
            coordinate_names.update(array.coordinate_names)
        coordinate_names.update(name for name, array in arrays.items() if array.dims == (name,))
        sizes = {}
        for array in arrays.values():
            for dim, size in zip(array.dims, array.shape):
                if sizes.setdefault(dim, size) != size:
                    raise _NotDirect(dim)  # the tree road refuses it [ATTN-STORE-002]
        ancestors = ["", *("/".join(path.split("/")[:depth]) for depth in range(1, path.count("/") + 1))]
        if any(store.members(ancestor) for ancestor in ancestors):
            raise _NotDirect(path)  # coordinates inherited from a parent group: the tree knows how
        self.arrays = arrays
        self.attrs = attrs
        self.sizes = sizes
        self.coords = [name for name in arrays if name in coordinate_names]
        self.data_vars = [name for name in arrays if name not in coordinate_names]
        self._complete = store.groups[""].get(ROOT_COMPLETENESS) == "complete"
        self._values = {}

    def dims(self, name):
        return self.arrays[name].dims

    def values(self, name):
        if name not in self._values:
            self._values[name] = self.store.read(self.arrays[name])
        return self._values[name]

    def read(self, variable, positions):
        array = self.arrays[variable]
        selection = tuple(positions.get(dim, slice(None)) for dim in array.dims)
        # In a file that says it is complete, a missing chunk of an attention variable is damage.
        required = self._complete and variable in ATTENTION_VARIABLES
        return self.store.read(array, selection, chunks_required=required)

    def dtype(self, variable):
        return self.arrays[variable].dtype.newbyteorder("=")


def _view(site) -> _SiteView:
    return site if isinstance(site, _SiteView) else _TreeSite(site)


def _direct_site(source, site: str | None) -> _DirectSite | None:
    """The site read directly, when the direct road applies (see the module docstring), else None."""
    if _is_tree(source) or not isinstance(source, (str, os.PathLike, Location)):
        return None
    from attnformat.engines.direct import open_direct

    store = open_direct(source)
    if store is None or not may_read_directly(store):
        return None
    sites = [path for path, attrs in store.groups.items() if path and is_site(attrs)]
    if site is None:
        if len(sites) != 1:
            return None
        site = sites[0]
    site = str(site).strip("/")
    if site not in sites:
        return None
    try:
        return _DirectSite(store, site)
    except _NotDirect:
        return None


# -- labels and positions -------------------------------------------------------------------------------


def labels_of(site, dim: str, sample: int | None = None) -> list[str]:
    """Display labels along ``query``, ``key`` or ``node``: the label coordinate, else positions.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import labels_of, resolve_site
    >>> labels_of(resolve_site(attnformat.example_path("dense")), "query")[:3]
    ['[CLS]', 'the', 'cat']
    """
    view = _view(site)
    name = LABEL_COORDS.get(dim)
    if name and name in view.coords:
        return [str(v) for v in _of_sample(view, name, sample)]
    if dim in view.coords:
        return [str(v) for v in view.values(dim)]
    if dim == "key" and "key" not in view.sizes:  # a top-k or statistics site without key coordinates
        return [str(i) for i in range(key_count(view))]
    return [str(i) for i in range(view.sizes[dim])]


def _of_sample(view: _SiteView, name: str, sample: int | None):
    """The values of coordinate ``name``; of one sample (the first when None) when they vary by sample."""
    values = view.values(name)
    if "sample" in view.dims(name):
        values = np.take(values, sample or 0, axis=view.dims(name).index("sample"))
    return values


def first_generated(site, dim: str = "query", sample: int | None = None, index=None) -> int | None:
    """Position of the first generated token along ``query`` or ``key`` (``*_generation_step`` >= 0), or None.

    ``index`` lists the positions drawn (after padding is dropped): the result is then a position
    among them. Figures draw a line there, between the prompt and the generated tokens.

    Examples
    --------
    >>> import attnformat
    >>> first_generated(resolve_site(attnformat.example_path("generation")))
    3
    >>> first_generated(resolve_site(attnformat.example_path("dense"))) is None
    True
    """
    from attnformat.conventions import GENERATION_STEP_COORDS

    view = _view(site)
    name = GENERATION_STEP_COORDS[dim]
    if name not in view.coords:
        return None
    steps = np.asarray(_of_sample(view, name, sample)).reshape(-1)
    if index is not None:
        steps = steps[np.asarray(index, dtype=np.int64)]
    generated = np.flatnonzero(steps >= 0)
    return int(generated[0]) if generated.size and generated[0] > 0 else None


def selector_list(value) -> list:
    """Selectors given one by itself or several at once, as a list.

    Parameters
    ----------
    value : str, bytes, int, iterable or None
        One label or position, several, or None (none: the caller's default).

    Returns
    -------
    list

    Examples
    --------
    >>> selector_list("cat"), selector_list(3), selector_list((0, "dog")), selector_list(None)
    (['cat'], [3], [0, 'dog'], [])
    """
    if value is None:
        return []
    if isinstance(value, (str, bytes, int, np.integer)):
        return [value]
    return list(value)


def position(site, dim: str, value, *, sample: int | None = None) -> int:
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
    view = _view(site)
    if dim not in view.sizes:
        raise SelectionError(
            f"{dim} {value!r} not in file {view.source}, site {view.name}: it has no {dim} dimension; "
            f"dimensions: {', '.join(view.sizes)}")
    label_name = LABEL_COORDS.get(dim)
    labels = labels_of(view, dim, sample) if label_name and label_name in view.coords else None
    return resolving.position(dim, value, size=view.sizes[dim], index=view.values(dim) if dim in view.coords else None,
                              labels=labels, where=f"file {view.source}, site {view.name}")


def _reduce(values: np.ndarray, axes: tuple[int, ...], how: str) -> np.ndarray:
    if not axes:
        return values
    if how == "mean" and values.size and np.issubdtype(values.dtype, np.floating) and not np.isnan(values).any():
        # Without NaN, nanmean is this mean (the same sums of the same array; its count is the
        # same for every cell, and a float32 sum divided by it rounds alike in float32 or float64),
        # minus a NaN-free copy of the array and a count per cell: about half the CPU of pooling
        # a 12-head 2048^2 grid for display (measured).
        return np.mean(values, axis=axes)
    with warnings.catch_warnings():
        # All-NaN slices (maps not captured) are expected and stay NaN.
        warnings.simplefilter("ignore", RuntimeWarning)
        return (np.nanmax if how == "max" else np.nanmean)(values, axis=axes)


@dataclass
class TopkDetail:
    """What a densified top-k map knows besides its exact values (see :func:`select`).

    Arrays have the selection's dimensions (``lower``, ``partial``) or those without ``key``
    (``omitted``, ``captured``, per query row). ``lower`` is the kept part of each pair: equal to the
    exact value where every reduced map kept the pair, and where only some did, the mean (or max)
    with the maps that did not keep it counted as 0, a lower bound. ``partial`` marks those pairs.
    ``omitted`` is each row's omitted mass (reduced like the weights: exact, since every map states
    its own); ``captured`` marks rows that at least one map captured. ``maps`` is how many maps
    were reduced (1 without a reduction).
    """

    top_k: int
    key_count: int
    lower: np.ndarray
    partial: np.ndarray
    omitted: np.ndarray | None
    captured: np.ndarray
    maps: int = 1
    reduction: str = ""

    def note(self) -> str:
        """``not kept (top 4 of 10 keys per row)``: what a map's not-kept cells are."""
        return f"not kept (top {self.top_k} of {self.key_count} keys per row)"


@dataclass
class Selection:
    """The values a plot draws and everything its title and axes need to say what they are.

    ``values`` has the dimensions in ``dims``: the kept ones (e.g. ``head`` for a grid) followed by
    ``query, key`` (dense, or densified edges) or ``edge``. ``described`` maps every selectable
    dimension to what was chosen (``"0"``, ``"mean of 12"``). ``missing_note`` says what NaN cells
    mean when it is not "not captured": for densified edges, pairs that are no edge
    (``"absent: not an edge"``, with the temporal window when the site states one).
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
    missing_note: str | None = None
    topk: TopkDetail | None = None

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
           densify: bool = True, rows=None, **selectors) -> Selection:
    """Select (and reduce) the values of one attention variable, reading only the chosen slice.

    A path is read directly, without building a tree, when the file allows it (see the module
    docstring); the result is the same either way.

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
        pairs that are no edge are NaN (absent, never a real 0) and ``missing_note`` says so.
        Top-k sites (``layout="topk"``) are densified the same way: ``values`` is ``(query, key)``
        with NaN where a pair was not kept, and ``topk`` (:class:`TopkDetail`) holds the omitted
        mass per row and, for reductions, the pairs only some maps kept.
    rows : sequence of int, optional
        Only these query rows (positions along ``query``), in this order; a top-k site densifies
        only them. All rows by default.
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
    options = dict(variable=variable, keep=keep, drop_padding=drop_padding, densify=densify, selectors=selectors,
                   rows=None if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1))
    direct = _direct_site(source, site)
    if direct is not None:
        try:
            return _select(direct, **options)
        except AttnFormatError:
            pass  # a selector naming nothing, or damage: the general road says it in its own words
    return _select(_TreeSite(resolve_site(source, site)), **options)


def _select(view: _SiteView, *, variable: str, keep, drop_padding: bool, densify: bool, selectors: dict,
            rows=None) -> Selection:
    name = view.name
    if variable not in view.data_vars:
        hint = ""
        if view.attrs.get("layout") == "statistics":  # no maps at all: say which plots it has
            hint = " (a statistics site: plot kinds statistics-overview, statistics-profile, top-key)"
        raise SelectionError(f"variable {variable!r} not in file {view.source}, site {name}; "
                             f"variables: {', '.join(view.data_vars)}{hint}")
    array_dims = view.dims(variable)
    leading = [d for d in array_dims if d in SELECTABLE_DIMS]
    # A head-mean site (head_reduction="mean") holds the mean over heads already: head="mean" is that map.
    stored_mean = (selectors.get("head") == "mean" and "head" not in leading
                   and view.attrs.get("head_reduction") == "mean")
    for dim, value in selectors.items():
        if dim not in SELECTABLE_DIMS:
            raise TypeError(f"unknown selector {dim!r}; selectors: {', '.join(SELECTABLE_DIMS)}")
        if dim == "head" and stored_mean:
            continue
        if value is not None and dim not in leading:
            raise SelectionError(f"{dim} {value} not in file {view.source}, site {name}: "
                                 f"{variable} has no {dim} dimension; its dimensions: {', '.join(array_dims)}")
    fixed, reductions, described = {}, {}, {}
    # The sample comes first: per-sample labels and masks depend on it.
    ordered = sorted(leading, key=lambda d: d != "sample")
    for dim in ordered:
        value = selectors.get(dim)
        if dim in keep:
            described[dim] = "all"
            continue
        if value is None:
            value = "mean" if dim == "head" else 0 if dim not in view.coords else view.values(dim)[0]
        if isinstance(value, str) and value in REDUCTIONS:
            reductions[dim] = value
            described[dim] = f"{value} of {view.sizes[dim]}"
        else:
            fixed[dim] = position(view, dim, value, sample=fixed.get("sample"))
            described[dim] = labels_of(view, dim, fixed.get("sample"))[fixed[dim]]
    described = {dim: described[dim] for dim in leading}
    if stored_mean or ("head" not in leading and view.attrs.get("head_reduction") == "mean"):
        described["head"] = "mean (stored)"
    topk = None
    if view.attrs.get("layout") == "topk" and densify and "rank" in array_dims:
        values, dims, topk = _read_topk(view, variable, fixed, reductions, rows)
    else:
        values, dims = _read_reduced(view, variable, fixed, reductions)
        if rows is not None and "query" in dims:
            values = np.take(values, rows, axis=dims.index("query"))
    sample = fixed.get("sample")
    chosen = Selection(values=values, dims=dims, variable=variable, site=name, source=view.source,
                       attrs=dict(view.attrs), described=described, positions=fixed,
                       kept={d: labels_of(view, d, sample) for d in keep if d in dims}, topk=topk)
    if topk is not None:
        note = topk.note()
        if topk.partial.any():  # plots that draw only the values show pairs some maps kept as absent too
            over = " and ".join(f"{dim}s" for dim in reductions) or "maps"
            note = f"not kept by all {topk.maps} {over} of the {topk.reduction} (top {topk.top_k} of {topk.key_count} keys per row)"
        chosen.missing_note = note + ("; row not captured" if not topk.captured.all() else "")
    if "edge" in dims and densify:
        _densify(chosen, view)
    elif "query" in dims:
        chosen.query_labels = labels_of(view, "query", sample)
        chosen.query_index = np.arange(len(chosen.query_labels))
        if rows is not None:
            chosen.query_labels = [chosen.query_labels[row] for row in rows]
            chosen.query_index = rows
        if "key" in dims:  # per-query variables (a statistics site's entropy...) have no key axis
            chosen.key_labels = labels_of(view, "key", sample)
            chosen.key_index = np.arange(len(chosen.key_labels))
        if drop_padding and ("sample" in fixed or "sample" not in view.sizes):
            _drop_padding(chosen, view, sample, rows)
    return chosen


def positions_along(site, dim: str, sample: int | None = None) -> np.ndarray:
    """Token positions along ``query`` or ``key``: the site's position coordinate, else 0, 1, 2...

    A site without a ``key`` dimension (statistics, top-k) counts its keys with :func:`key_count`.

    Parameters
    ----------
    site : xarray.DataTree or xarray.Dataset
        A site group.
    dim : {"query", "key"}
        The dimension.
    sample : int, optional
        The sample, when the position coordinate has a ``sample`` axis (default the first).

    Returns
    -------
    numpy.ndarray
        int64 positions, one per token.

    Examples
    --------
    >>> import attnformat
    >>> tree = attnformat.open(attnformat.example_path("dense"))
    >>> positions_along(tree["encoder/self"], "key").tolist()
    [0, 1, 2, 3, 4, 5]
    """
    name = POSITION_COORDS[dim]
    if name in site.coords:
        return _integer_coord(site, name, sample)
    if dim == "key" and dim not in site.sizes:
        # Asked only here, where it is needed: key_count reads attributes that a site with a key
        # dimension never needs, and that a hostile file can make unreadable.
        return np.arange(key_count(site))
    return np.arange(site.sizes[dim])


def _integer_coord(site, name: str, sample: int | None) -> np.ndarray:
    """Integer coordinate ``name`` of a site group; of one sample (the first when None) when it varies by sample."""
    coord = site.coords[name]
    if "sample" in coord.dims:
        coord = coord.isel(sample=sample or 0)
    return np.asarray(coord.values, dtype=np.int64)


def key_count(site) -> int:
    """The number of keys each row of a top-k or statistics site ranges over: its ``key_count``
    attribute, else the size of its ``key`` dimension.

    Raises
    ------
    attnformat.SelectionError
        When the site states neither [ATTN-TOPK-001].

    Examples
    --------
    >>> key_count({"key_count": 12})
    12
    """
    attrs = site if isinstance(site, dict) else _view(site).attrs
    value = attrs.get("key_count")
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
        return int(value)
    view = None if isinstance(site, dict) else _view(site)
    if view is not None and "key" in view.sizes:
        return int(view.sizes["key"])
    where = f"file {view.source}, site {view.name}" if view is not None else "site"
    raise SelectionError(f"{where}: no positive integer key_count attribute and no key dimension [ATTN-TOPK-001]")


def _read_topk(view: _SiteView, variable: str, fixed: dict, reductions: dict, rows=None):
    """A top-k slice densified to ``(kept..., query, key)`` and reduced (see :class:`TopkDetail`).

    The sparse arrays are small (k values per row), so the whole slice is read at once; maps are
    densified one reduced index at a time, so that a head mean holds one dense map plus the sums.
    """
    if "key_index" not in view.data_vars:
        raise SelectionError(f"file {view.source}, site {view.name}: top-k site without key_index [ATTN-TOPK-001]")
    dims = [d for d in view.dims(variable) if d not in fixed]
    if dims[-2:] != ["query", "rank"] or tuple(view.dims("key_index")) != tuple(view.dims(variable)):
        raise SelectionError(f"file {view.source}, site {view.name}: top-k {variable} and key_index must have the "
                             f"same dimensions ending (query, rank) [ATTN-TOPK-001]")
    hows = {reductions[d] for d in dims if d in reductions}
    if len(hows) > 1:
        raise SelectionError(f"file {view.source}, site {view.name}: top-k maps are reduced one way at a time; "
                             f"asked for {' and '.join(sorted(hows))}")
    how = hows.pop() if hows else ""
    keys = key_count(view)
    weights = np.asarray(view.read(variable, fixed), dtype=np.float64)
    index = np.asarray(view.read("key_index", fixed))
    omitted = None
    if "omitted_weight" in view.data_vars:
        omitted = np.asarray(view.read("omitted_weight", fixed), dtype=np.float64)
        omitted_dims = [d for d in view.dims("omitted_weight") if d not in fixed]
        if omitted_dims != dims[:-1]:
            omitted = None  # not aligned with the weights: the validator reports it [ATTN-TOPK-004]
    if rows is not None:  # the sparse rows are small: read whole, densify only the chosen ones
        weights, index = np.take(weights, rows, axis=-2), np.take(index, rows, axis=-2)
        omitted = None if omitted is None else np.take(omitted, rows, axis=-1)
    reduced = [d for d in dims[:-2] if d in reductions]
    kept = [d for d in dims[:-2] if d not in reductions]
    order = [dims.index(d) for d in reduced + kept] + [len(dims) - 2, len(dims) - 1]
    maps = int(np.prod([view.sizes[d] for d in reduced], dtype=np.int64))
    kept_shape = tuple(view.sizes[d] for d in kept)
    queries = weights.shape[-2]
    weights = weights.transpose(order).reshape((maps,) + kept_shape + weights.shape[-2:])
    index = index.transpose(order).reshape(weights.shape)
    if omitted is not None:
        omitted = omitted.transpose(order[:-1]).reshape((maps,) + kept_shape + (queries,))
    from attnformat.reductions import densify_topk

    # One dense map at a time (float32 for float32 files): a head mean of 4096-token maps holds
    # that map, the running sum and the counts, not every head.
    dtype = np.float32 if view.dtype(variable) in (np.float16, np.float32) else np.float64

    def dense_map(map_index):
        try:
            return densify_topk(weights[map_index].astype(dtype), index[map_index], keys)
        except ValueError as error:  # an index outside the keys: the file breaks the spec
            raise SelectionError(f"file {view.source}, site {view.name}: {error} [ATTN-TOPK-002]") from None

    captured_count = np.zeros(kept_shape + (queries,), dtype=np.int32)
    for map_index in range(maps):
        captured = ~np.isnan(weights[map_index]).all(axis=-1)
        if omitted is not None:
            captured |= ~np.isnan(omitted[map_index])
        captured_count += captured
    if maps == 1:
        values = lower = dense_map(0)
        partial = np.zeros(values.shape, dtype=bool)
    else:
        lower, kept_count = None, np.zeros(kept_shape + (queries, keys), dtype=np.int32 if maps > 32767 else np.int16)
        for map_index in range(maps):
            dense = dense_map(map_index)
            present = ~np.isnan(dense)
            kept_count += present
            if how == "max":
                lower = dense if lower is None else np.fmax(lower, dense, out=lower)
            else:
                dense[~present] = 0.0
                lower = dense if lower is None else np.add(lower, dense, out=lower)
        captured_maps = captured_count[..., None]
        if how != "max":  # the kept part of the mean: maps that did not keep a pair count as 0
            lower /= np.maximum(captured_maps, 1).astype(dtype)
            lower[kept_count == 0] = np.nan
        exact = (kept_count > 0) & (kept_count == captured_maps)
        partial = (kept_count > 0) & ~exact
        values = np.where(exact, lower, np.nan).astype(dtype, copy=False)
    reduced_omitted = None
    if omitted is not None:
        reduced_omitted = omitted[0] if maps == 1 else _reduce(omitted, (0,), how or "mean")
    detail = TopkDetail(top_k=int(weights.shape[-1]), key_count=keys, lower=lower, partial=partial,
                        omitted=reduced_omitted, captured=captured_count > 0, maps=maps, reduction=how)
    return values, tuple(kept) + ("query", "key"), detail


def _read_reduced(view: _SiteView, variable: str, fixed: dict, reductions: dict) -> tuple[np.ndarray, tuple[str, ...]]:
    """Read a slice and apply the reductions; large slices are read one map at a time."""
    subset_dims = [d for d in view.dims(variable) if d not in fixed]
    reduced = [d for d in subset_dims if d in reductions]
    dims = tuple(d for d in subset_dims if d not in reductions)
    size = math.prod(view.sizes[d] for d in subset_dims)
    if not reduced or size <= _STREAM_ELEMENTS or len({reductions[d] for d in reduced}) > 1:
        values = view.read(variable, fixed)
        remaining = list(subset_dims)
        for how in REDUCTIONS:
            axes = tuple(remaining.index(d) for d in reduced if reductions[d] == how)
            if axes:
                values = _reduce(values, axes, how)
                remaining = [d for d in remaining if not (d in reductions and reductions[d] == how)]
        return values, dims
    # Averaging 12 heads of a 4096^2 map should not hold all 12 in memory: accumulate map by map,
    # also along the dimensions kept whole (a layer comparison of the head mean reads one layer's
    # head at a time; only the reduced maps it returns are held, not the layers' float64 sums).
    dtype = view.dtype(variable)
    kept = [d for d in dims if d in SELECTABLE_DIMS]
    how = reductions[reduced[0]]
    out = np.empty(tuple(view.sizes[d] for d in dims), np.float32 if dtype == np.float32 else np.float64)
    for kept_index in np.ndindex(*(view.sizes[d] for d in kept)):
        chosen = {**fixed, **dict(zip(kept, kept_index))}
        # In place, in float64 (a float32 map is widened exactly by the ufunc): the same sums,
        # maximum and quotients as adding widened copies, without a new float64 map per head
        # (a 12-head mean of 2048^2 maps took 0.86 s of CPU that way, measured; about half now).
        # ``count`` is a map only once a head has a NaN: until then every cell counts each head.
        total = count = peak = None
        whole = 0  # heads without NaN, counted in every cell
        for index in np.ndindex(*(view.sizes[d] for d in reduced)):
            one = np.asarray(view.read(variable, {**chosen, **dict(zip(reduced, index))}))
            if how == "max":
                peak = np.array(one, dtype=np.float64) if peak is None else np.fmax(peak, one, out=peak)
                continue
            if total is None:
                total = np.zeros(one.shape, dtype=np.float64)  # 0.0 + x: as the sum started from 0.0
            missing = np.isnan(one)
            if missing.any():
                np.add(total, one, out=total, where=~missing)  # a NaN cell adds nothing
                count = (0 if count is None else count) + (~missing).astype(np.int64)
            else:
                np.add(total, one, out=total)
                whole += 1
        target = tuple(kept_index[kept.index(d)] if d in kept else slice(None) for d in dims)
        if how == "max":
            out[target] = peak
        elif count is None:  # no NaN anywhere: every cell is the mean of all ``whole`` heads
            out[target] = np.divide(total, whole, out=total)
        else:
            count = count + whole
            with np.errstate(invalid="ignore", divide="ignore"):
                out[target] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return (out.astype(dtype, copy=False) if how == "max" else out), dims


def _node_dim(site) -> str:
    return _view(site).attrs.get("edge_node_dim", "node")


def node_labels(site) -> list[str]:
    """Labels of the nodes an edge site's ``source``/``target`` index (``node`` or ``time`` steps).

    Examples
    --------
    >>> import attnformat
    >>> node_labels(resolve_site(attnformat.example_path("edge-time"), "temporal"))
    ['0', '1', '2', '3']
    """
    view = _view(site)
    node_dim = _node_dim(view)
    if node_dim in view.sizes:
        return labels_of(view, node_dim)
    count = int(max(view.values("source").max(), view.values("target").max())) + 1
    return [str(i) for i in range(count)]


def densify_edges(values: np.ndarray, source: np.ndarray, target: np.ndarray, nodes: int, *, fill: float = np.nan) -> np.ndarray:
    """Edge values ``(..., edge)`` as ``(..., target, source)`` matrices; pairs that are no edge get ``fill``.

    The default fill is NaN: a pair that is not an edge has no attention value at all, which a
    plot must not draw like a real 0 (outside a temporal window, say); statistics skip it.

    Examples
    --------
    >>> densify_edges(np.array([0.25, 0.75]), np.array([0, 1]), np.array([1, 1]), 2).tolist()
    [[nan, nan], [0.25, 0.75]]
    >>> densify_edges(np.array([0.25, 0.75]), np.array([0, 1]), np.array([1, 1]), 2, fill=0.0).tolist()
    [[0.0, 0.0], [0.25, 0.75]]
    """
    dense = np.full(values.shape[:-1] + (nodes, nodes), fill, dtype=np.result_type(values.dtype, np.float32))
    dense[..., target, source] = values
    return dense


def absent_note(attrs) -> str:
    """What a densified edge map's NaN cells mean, from the site's attributes.

    Examples
    --------
    >>> absent_note({"max_temporal_distance": 2})
    'absent: not an edge (outside the temporal window, max_temporal_distance=2)'
    >>> absent_note({"max_temporal_distance": -1}), absent_note({})
    ('absent: not an edge', 'absent: not an edge')
    """
    for name in WINDOW_ATTRS:
        value = attrs.get(name)
        # A negative or missing bound means no window (the example writes -1).
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and value >= 0:
            return f"absent: not an edge (outside the temporal window, {name}={value:g})"
    return "absent: not an edge"


def _densify(chosen: Selection, view: _SiteView) -> None:
    labels = node_labels(view)
    chosen.values = densify_edges(chosen.values, view.values("source"), view.values("target"), len(labels))
    chosen.dims = chosen.dims[:-1] + ("query", "key")
    chosen.query_labels = chosen.key_labels = labels
    chosen.query_index = chosen.key_index = np.arange(len(labels))
    chosen.missing_note = absent_note(chosen.attrs)


def real_tokens(site, dim: str, sample: int | None) -> np.ndarray | None:
    """Which tokens along ``query`` or ``key`` are real (not padding), or None when all are.

    Examples
    --------
    >>> import attnformat
    >>> site = attnformat.open(attnformat.example_path("padded-batch"))["encoder/self"]
    >>> real_tokens(site, "key", 1).tolist(), real_tokens(site, "key", 0)
    ([True, True, True, False, False], None)
    """
    view = _view(site)
    name = MASK_COORDS[dim]
    if name not in view.coords:
        return None
    keep = np.asarray(_of_sample(view, name, sample), dtype=bool)
    return None if keep.all() else keep


def _drop_padding(chosen: Selection, view: _SiteView, sample: int | None, rows=None) -> None:
    for dim in ("query", "key"):
        if dim not in chosen.dims:
            continue
        keep = real_tokens(view, dim, sample)
        if keep is None:
            continue
        if dim == "query" and rows is not None:
            keep = keep[rows]
        axis = chosen.dims.index(dim) - len(chosen.dims)
        chosen.values = np.compress(keep, chosen.values, axis=axis)
        if chosen.topk is not None:
            detail = chosen.topk
            detail.lower = np.compress(keep, detail.lower, axis=axis)
            detail.partial = np.compress(keep, detail.partial, axis=axis)
            if dim == "query":  # per-row arrays have no key axis: query is their last
                detail.captured = np.compress(keep, detail.captured, axis=-1)
                if detail.omitted is not None:
                    detail.omitted = np.compress(keep, detail.omitted, axis=-1)
        if dim == "query":
            chosen.query_labels = [l for l, k in zip(chosen.query_labels, keep) if k]
            chosen.query_index = np.asarray(chosen.query_index)[keep]
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
    padding = [(0, 0)] * (values.ndim - 2) + [(0, padded_rows - rows), (0, padded_cols - cols)]
    if (how == "mean" and (padded_rows, padded_cols) != (rows, cols) and np.issubdtype(values.dtype, np.floating)
            and values.size and not np.isnan(values).any()):
        # Without NaN in the map, nanmean of the NaN-padded blocks is computed here as nanmean
        # computes it (padding as 0, the same sums, divided by each block's cell count as an
        # integer array), minus the NaN mask, the copy and the per-cell count it makes: about half
        # the CPU of pooling a 12-head 2048^2 grid for display (measured). The same values, bit for bit.
        values = np.pad(values.astype(np.float32, copy=False), padding, constant_values=0.0)
        blocks = values.reshape(values.shape[:-2] + (padded_rows // factor, factor, padded_cols // factor, factor))
        total = np.sum(blocks, axis=(-3, -1))
        heights = np.minimum(factor, rows - np.arange(0, rows, factor))
        widths = np.minimum(factor, cols - np.arange(0, cols, factor))
        return np.true_divide(total, np.outer(heights, widths).astype(np.intp), out=total, casting="unsafe")
    if (padded_rows, padded_cols) != (rows, cols):
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


def sites_of(source) -> list:
    """Every site of a file, in tree order.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import sites_of
    >>> [s.path for s in sites_of(attnformat.example_path("encoder-decoder"))]
    ['/decoder/cross', '/decoder/self', '/encoder/self']
    """
    from attnformat.reading import site_paths

    tree = open_source(source)
    root = tree.root if is_site(tree.attrs) else tree
    return [root[path] for path in site_paths(root)]
