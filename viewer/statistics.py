"""Numbers about attention: per layer and head mean, std, min, max, entropy, sink score, local/global
ratio; box plots across samples; the top-k query-key pairs; the JSON that seed 001 saved.

Statistics stream the file: one layer's heads at a time, one map at a time when a layer is large,
and blocks of query rows when one map is large. Every partial result (counts, means, sums of
squared deviations, column sums) merges exactly, so blocks give the same numbers as a whole read.

"Local" means what the file supports, and every output says which definition was used
(:func:`locality`): a pairwise variable below a threshold (seed 002's 8 angstrom), adjacency on an
image's patch grid, nothing for graph edges without a distance, or a token window for sequences.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import textwrap
import threading
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from attnformat.conventions import PATCH_COORDS, ROW_SUM_TOLERANCE
from attnformat.engines import Location
from attnformat.errors import AttnFormatError, SelectionError
from attnformat.text import for_terminal
from attnformat.viewer.colors import BAR_COLOR
from attnformat.viewer.docs import documented, register
from attnformat.viewer.output import axes_or_new, grid
from attnformat.viewer.selection import (
    SELECTABLE_DIMS,
    _integer_coord,
    labels_of,
    node_labels,
    position,
    positions_along,
    real_tokens,
    resolve_site,
    select,
    selector_list,
    site_name,
    sites_of,
)

if TYPE_CHECKING:  # xarray is imported where a Dataset is built: plotting one map never needs it
    import xarray as xr

STATISTICS = ("mean", "std", "min", "max", "entropy", "sink_score", "local_mean", "global_mean", "local_global_ratio")
#: Counts that come with the statistics (values per map, local and global pairs per map), so that
#: means over several maps can be pooled exactly (seed 002's ratio is of pooled means).
COUNTS = ("count", "local_count", "global_count")
#: Token window for sequences: keys this many positions or fewer from the query are local.
LOCAL_WINDOW = 2
#: Seed 002's neighbourhood: pairs closer than 8 (in the pairwise variable's units) are local.
DEFAULT_THRESHOLD = 8.0
#: Patch grids: patches at Chebyshev distance <= this on the grid are local (1: the 8-neighbourhood).
PATCH_RADIUS = 1
LOCALITY_KINDS = ("distance", "patch_grid", "graph", "token_window", "none")
# One read holds at most this many elements (128 MiB of float64).
_BLOCK_ELEMENTS = 1 << 24
#: The most maps one statistics call summarises (a table of this many rows is ~0.5 GB).
MAX_STATISTICS_MAPS = 10_000_000
# Statistics whose spread across maps is below this (relative) are constant: float32 rounding of a
# softmax mean is ~1e-8 relative; real differences between heads are far larger.
_CONSTANT_RELATIVE = 1e-6

register(
    locality_threshold="""
        threshold : float, default 8.0
            Pairs whose pairwise variable (a distance) is below this, in the variable's own units,
            are local (seed 002: 8 angstrom); statistics use it when locality comes from a
            pairwise variable (see :func:`attnformat.viewer.statistics.locality`).
    """,
    locality_radius="""
        radius : int, default 1
            Patch grids: key patches within this Chebyshev distance of the query patch are local
            (1: the patch and its 8 neighbours); tokens that are no patch ([CLS]) are left out.
    """,
    locality_window="""
        window : int, default 2
            Sequences without a distance or patch grid: keys within this many positions of the
            query are local (the token window +/-2).
    """,
    pairwise_name="""
        pairwise : str, optional
            The pairwise variable (``role="pairwise"``) that defines locality or is plotted
            against; by default ``distance``, else the first pairwise variable.
    """,
    stats_queries="""
        queries : int, str or list of them, optional
            Restrict the statistics to these query rows (labels such as ``"[CLS]"`` or
            positions), seed 003's CLS-only statistics; outputs then say "query [CLS] only".
            For edge sites, the target nodes. All queries by default.
    """,
    pairs_k="""
        k : int, default 10
            How many pairs.
    """,
)


def _source_of(tree) -> str:
    # attnformat.reading.source_of, without importing the reader (and xarray) to plot one map.
    return str(tree.root.encoding.get("source", "<in-memory tree>"))


def _nan_stat(function, values, axis):
    with np.errstate(invalid="ignore", divide="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return function(values, axis=axis)


def row_entropy(weights: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over rows of ``-sum p log p`` along ``axis`` (rows that are all zero or NaN are skipped).

    Parameters
    ----------
    weights : numpy.ndarray
        Weights with rows along ``axis``; the result reduces ``axis`` and the row axis before it.
    axis : int, default -1
        The axis each distribution lies along.

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


# -- what "local" means ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Locality:
    """Which key/query pairs count as local for a site, and the sentence that says so.

    ``kind`` is one of :data:`LOCALITY_KINDS`; ``description`` is what outputs print (e.g.
    ``"pairwise 'distance' < 8 angstrom, per sample"``).
    """

    kind: str
    description: str
    variable: str | None = None
    units: str = ""
    threshold: float | None = None
    radius: int | None = None
    window: int | None = None
    per: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        """The JSON form: kind and description, plus the parameters of that kind."""
        entry = {"kind": self.kind, "description": self.description}
        if self.kind == "distance":
            entry.update(variable=self.variable, units=self.units, threshold=self.threshold, per=list(self.per))
        elif self.kind == "patch_grid":
            entry.update(radius=self.radius)
        elif self.kind == "token_window":
            entry.update(window=self.window)
        return entry


def _pairwise_names(site) -> list[str]:
    return [n for n, v in site.data_vars.items() if v.attrs.get("role") == "pairwise"]


def _pairwise_problem(site, name: str, variable: str) -> str | None:
    """Why the pairwise variable cannot give each map its own distances, or None when it can."""
    pairwise = site[name]
    if pairwise.dims[-2:] != ("query", "key"):
        return f"pairwise {name!r} does not end in (query, key)"
    attention = site[variable]
    extra = [d for d in pairwise.dims[:-2] if d not in attention.dims]
    if extra:
        return f"pairwise {name!r} has dimensions {', '.join(extra)} that {variable} has not"
    if site.attrs.get("layout") == "edge":
        nodes = len(node_labels(site))
        if pairwise.sizes["query"] != nodes or pairwise.sizes["key"] != nodes:
            return f"pairwise {name!r} is {pairwise.sizes['query']}x{pairwise.sizes['key']}, the graph has {nodes} nodes"
    return None


def _patch_coords(site, dim: str, sample: int | None):
    names = PATCH_COORDS[dim]
    if not all(name in site.coords for name in names):
        return None
    return [_integer_coord(site, name, sample) for name in names]


def _self_square(site) -> bool:
    return (site.attrs.get("attention_type", "self") == "self" and "query" in site.sizes and "key" in site.sizes
            and site.sizes["query"] == site.sizes["key"])


@documented
def locality(source, *, site=None, variable: str = "weights", pairwise: str | None = None,
             threshold: float = DEFAULT_THRESHOLD, radius: int = PATCH_RADIUS, window: int = LOCAL_WINDOW) -> Locality:
    """Which pairs count as local for a site, by what the file supports, in this order.

    1. ``distance``: a pairwise variable (``role="pairwise"``, ``distance`` preferred), local where
       it is below ``threshold`` in its own ``units``. Leading dimensions it has (``sample``,
       ``step``, ``layer``...) are matched with the map's, so each map uses its own distances; NaN
       distances are neither local nor global. For an edge site, a ``(query, key)`` pairwise
       variable over the graph's nodes gives each edge the value at (target, source).
    2. ``graph``: an edge site without such a variable. Local/global is not defined there: every
       edge already joins graph neighbours; the ratio is left empty.
    3. ``patch_grid``: image sites (``key_patch_row``/``key_patch_col``): key patches within
       Chebyshev distance ``radius`` of the query patch on the grid are local (radius 1: the patch
       and its 8 neighbours). Tokens that are no patch (``-1``: [CLS], registers) are neither.
    4. ``token_window``: self-attention over one token sequence: ``|query - key position| <= window``
       (``query_position``/``key_position`` when stored, else the token index).
    5. ``none``: anything else (cross-attention between two token sets, patch keys for queries
       without patch positions); the ratio is left empty.

    Parameters
    ----------
    $source
    $site
    variable : str, default "weights"
        The attention variable the locality is for (its dimensions must cover the distance's).
    $pairwise_name
    $locality_threshold
    $locality_radius
    $locality_window
    Returns
    -------
    Locality
        ``kind``, ``description`` and the parameters used; ``as_dict()`` is the JSON form.

    Raises
    ------
    attnformat.SelectionError
        When ``pairwise`` names a variable the site lacks or one that cannot be aligned with the maps.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer.statistics import locality
    >>> locality(attnformat.example_path("steps")).description
    "pairwise 'distance' < 8 angstrom"
    >>> locality(attnformat.example_path("image")).kind, locality(attnformat.example_path("dense")).description
    ('patch_grid', 'token window +/-2 (|query - key position| <= 2)')
    """
    site_node = resolve_site(source, site)
    edge = site_node.attrs.get("layout") == "edge"
    names = _pairwise_names(site_node)
    if pairwise is not None and pairwise not in names:
        raise SelectionError(f"pairwise variable {pairwise!r} not in file {_source_of(site_node)}, site "
                             f"{site_name(site_node)}; pairwise variables: {', '.join(names) or '(none)'}")
    chosen = pairwise or ("distance" if "distance" in names else names[0] if names else None)
    unusable = None
    if chosen is not None and variable in site_node.data_vars:
        unusable = _pairwise_problem(site_node, chosen, variable)
        if unusable is None:
            units = str(site_node[chosen].attrs.get("units", ""))
            per = tuple(d for d in site_node[chosen].dims[:-2])
            text = f"pairwise {chosen!r} < {threshold:g} {units}".rstrip()
            if per:
                text += f", per {', '.join(per)}"
            if edge:
                text += " (at each edge's target, source)"
            return Locality("distance", text, variable=chosen, units=units, threshold=float(threshold), per=per)
        if pairwise is not None:
            raise SelectionError(f"{_source_of(site_node)}, site {site_name(site_node)}: {unusable}; "
                                 f"it cannot give each map its own distances")
    why = f" ({unusable})" if unusable else ""
    if edge:
        return Locality("graph", "not defined for graph edges without a pairwise distance: every edge already "
                                 "joins graph neighbours" + why)
    if "key_patch_row" in site_node.coords and "key_patch_col" in site_node.coords:
        if _patch_coords(site_node, "query", None) is None and not _self_square(site_node):
            return Locality("none", "not defined: keys are image patches but queries have no patch positions" + why)
        rows, cols = site_node.attrs.get("patch_grid", (None, None))
        shape = f"{int(rows)}x{int(cols)} " if rows is not None else ""
        neighbours = "the patch and its 8 neighbours" if radius == 1 else f"Chebyshev distance <= {radius}"
        return Locality("patch_grid", f"patch grid {shape}adjacency: {neighbours}; non-patch tokens ([CLS]) left out" + why,
                        radius=int(radius))
    if _self_square(site_node):
        return Locality("token_window", f"token window +/-{window} (|query - key position| <= {window})" + why,
                        window=int(window))
    return Locality("none", "not defined: cross-attention between two token sets, and no pairwise distance" + why)


class _LocalPairs:
    """Local and eligible masks for the maps being read, cached while the inputs stay the same."""

    #: Mask pairs kept per instance: the blocks of rows one map is read in (usually one).
    KEPT = 8

    def __init__(self, site, array, info: Locality, inner: list[str]):
        self.site, self.array, self.info, self.inner = site, array, info, inner
        # Shared by the tasks of one statistics call that run in this process (threads): every
        # map of a site has the same masks, which took 0.05 s to build for a 2048^2 map, once per
        # task (measured: 3.5 s of a 26 s statistics pass over 144 maps). The lock keeps two
        # threads from seeing a half-made entry.
        self._found: dict = {}
        self._lock = threading.Lock()

    def masks(self, chosen: dict, rows) -> tuple[np.ndarray, np.ndarray] | None:
        """``(local, eligible)`` broadcastable to the block ``(*inner, rows, key)`` (or ``(*inner, edge)``)."""
        kind = self.info.kind
        if kind in ("graph", "none"):
            return None
        sample = chosen.get("sample")
        if kind == "distance":
            pairwise = self.site[self.info.variable]
            fixed = {d: chosen[d] for d in pairwise.dims[:-2] if d in chosen}
            key = (tuple(sorted(fixed.items())), _rows_key(rows))
        else:
            key = (sample, _rows_key(rows))
        with self._lock:
            found = self._found.get(key)
        if found is None:
            found = _Masks(self._compute(chosen, rows))
            with self._lock:
                if len(self._found) >= self.KEPT:
                    self._found.clear()
                found = self._found.setdefault(key, found)
        return found

    @classmethod
    def shared(cls, where, site, array, info: Locality, inner: list[str]) -> _LocalPairs:
        """The instance for these arguments kept on ``where`` (a :class:`~attnformat.compute.NodeRef`
        that every task of one call shares in this process), made on first use."""
        return _kept_on(where, "_local_pairs", (array.name, repr(info), tuple(inner)), lambda: cls(site, array, info, inner))

    def _compute(self, chosen, rows):
        kind, sample = self.info.kind, chosen.get("sample")
        edge = self.site.attrs.get("layout") == "edge"
        if kind == "distance":
            pairwise = self.site[self.info.variable]
            pairwise = pairwise.isel({d: chosen[d] for d in pairwise.dims[:-2] if d in chosen})
            kept = [d for d in self.inner if d in pairwise.dims]
            pairwise = pairwise.transpose(*kept, "query", "key")
            if not edge:
                pairwise = pairwise.isel(query=rows)
            values = np.asarray(pairwise.values, dtype=np.float64)
            if edge:
                values = values[..., self.site.coords["target"].values, self.site.coords["source"].values]
                values = values[..., rows]
            for axis, dim in enumerate(self.inner):  # a distance shared by every head
                if dim not in kept:
                    values = np.expand_dims(values, axis)
            with np.errstate(invalid="ignore"):
                return values < self.info.threshold, np.isfinite(values)
        if kind == "patch_grid":
            key_rows, key_cols = _patch_coords(self.site, "key", sample)
            query = _patch_coords(self.site, "query", sample) or (key_rows, key_cols)
            query_rows, query_cols = query[0][rows], query[1][rows]
            distance = np.maximum(np.abs(query_rows[:, None] - key_rows[None, :]), np.abs(query_cols[:, None] - key_cols[None, :]))
            eligible = ((query_rows >= 0) & (query_cols >= 0))[:, None] & ((key_rows >= 0) & (key_cols >= 0))[None, :]
            return distance <= self.info.radius, eligible
        query_positions = positions_along(self.site, "query", sample)[rows]
        key_positions = positions_along(self.site, "key", sample)
        local = np.abs(query_positions[:, None] - key_positions[None, :]) <= self.info.window
        return local, np.ones_like(local)


_SHARED_LOCK = threading.Lock()


def _kept_on(where, name: str, key, make):
    """``make()``, kept on ``where`` under ``name`` and ``key`` and made on first use.

    ``where`` is the call's :class:`~attnformat.compute.NodeRef`: every task of one statistics
    call that runs in this process holds the same one, so what is kept there is shared by the
    call's threads and freed with the call. Kept in its instance dictionary (``vars``).
    """
    with _SHARED_LOCK:
        kept = vars(where).setdefault(name, {})
        if key not in kept:
            kept[key] = make()
        return kept[key]


class _Masks(tuple):
    """``(local, eligible)`` masks, keeping the float vectors of their local and global cells that
    :func:`_masked_sums` multiplies maps by (converting a 2048^2 mask to float64 for each map cost
    more than the product itself, measured)."""

    def vectors(self, near: np.ndarray, far: np.ndarray, dtype) -> tuple:
        """``(near, far)`` (the 2-D masks made from these) as flat vectors of ``dtype``, with their cell counts."""
        key = ("vectors", np.dtype(dtype).str)
        found = self.__dict__.get(key)
        if found is None:
            found = tuple((mask.reshape(-1).astype(dtype), int(np.count_nonzero(mask))) for mask in (near, far))
            self.__dict__[key] = found
        return found


class _Scratch:
    """Float64 arrays each thread of one statistics call reuses from block to block.

    Why: a 2048^2 block widened to float64, and its scratch copy, were new 32 MB arrays for every
    map, and a new array is paged in afresh: 58 ms and 24 ms of CPU per map, against 5 and 6 ms
    into arrays already paged in (measured), about 10 s of a 144-map statistics pass. Kept on
    the call's :class:`~attnformat.compute.NodeRef` (:meth:`shared`), so freed with it.
    """

    def __init__(self):
        self._arrays: dict = {}

    def array(self, name: str, shape: tuple) -> np.ndarray:
        """This thread's float64 array ``name`` of ``shape`` (contents undefined)."""
        key = (threading.get_ident(), name)
        size = math.prod(shape)
        found = self._arrays.get(key)
        if found is None or found.size < size:
            found = self._arrays[key] = np.empty(size, dtype=np.float64)
        return found[:size].reshape(shape)

    @classmethod
    def shared(cls, where) -> _Scratch:
        """The instance kept on ``where`` (every task of one call holds the same one in this process)."""
        return _kept_on(where, "_statistics_scratch", None, cls)


def _rows_key(rows):
    return (rows.start, rows.stop) if isinstance(rows, slice) else tuple(np.asarray(rows).tolist())


# -- which query rows -----------------------------------------------------------------------------


def query_rows(site, queries, sample: int | None = None) -> np.ndarray | None:
    """Positions of the chosen query rows (dense) or target nodes (edge sites), or None for all.

    Parameters
    ----------
    site : xarray.DataTree
        The site group.
    queries : int, str or list of them, optional
        Labels or positions; None means every query.
    sample : int, optional
        The sample whose labels apply (labels may differ between samples).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import resolve_site
    >>> query_rows(resolve_site(attnformat.example_path("image")), "[CLS]").tolist()
    [0]
    """
    wanted = selector_list(queries)
    if not wanted:
        return None
    if site.attrs.get("layout") == "edge":
        labels = node_labels(site)
        found = []
        for value in wanted:
            if isinstance(value, str) and value in labels:
                found.append(labels.index(value))
            elif isinstance(value, (int, np.integer)) and -len(labels) <= int(value) < len(labels):
                found.append(int(value) % len(labels))
            else:
                raise SelectionError(f"query node {value!r} not in file {_source_of(site)}, site {site_name(site)}; "
                                     f"nodes: {', '.join(labels[:20])}")
        return np.array(sorted(set(found)), dtype=np.int64)
    found = [position(site, "query", value, sample=sample) for value in wanted]
    return np.array(sorted(set(found)), dtype=np.int64)


def queries_text(site, queries) -> str:
    """How outputs name the rows the statistics cover: ``"all queries"`` or ``"query [CLS] only"``.

    Parameters
    ----------
    site : xarray.DataTree
        The site group.
    queries : int, str or list of them, optional
        As for :func:`attention_statistics`.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import resolve_site
    >>> site = resolve_site(attnformat.example_path("image"))
    >>> queries_text(site, None), queries_text(site, 0), queries_text(site, ["[CLS]", 1])
    ('all queries', 'query [CLS] only', 'queries [CLS], patch (0,0) only')
    """
    rows = query_rows(site, queries)
    if rows is None:
        return "all queries"
    labels = node_labels(site) if site.attrs.get("layout") == "edge" else labels_of(site, "query")
    names = [labels[row] for row in rows]
    shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    if site.attrs.get("layout") == "edge":
        noun = "target node" if len(names) == 1 else "target nodes"
    else:
        noun = "query" if len(names) == 1 else "queries"
    return f"{noun} {shown} only"


# -- per-map statistics, streamed -----------------------------------------------------------------


@dataclass
class _Partials:
    """Mergeable per-map partial results over blocks of query rows (arrays over the inner dims)."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    low: np.ndarray
    high: np.ndarray
    entropy_sum: np.ndarray          # normalized over keys: sum of row entropies ...
    entropy_rows: np.ndarray         # ... over this many live rows
    column_terms: np.ndarray | None  # normalized over queries: per key column, sum of -p log p
    column_mass: np.ndarray | None
    column_sum: np.ndarray
    column_count: np.ndarray
    local_sum: np.ndarray
    local_count: np.ndarray
    global_sum: np.ndarray
    global_count: np.ndarray
    extra: dict = field(default_factory=dict)

    def merge(self, other: _Partials) -> _Partials:
        count = self.count + other.count
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = other.mean - self.mean
            share = np.where(count > 0, other.count / np.maximum(count, 1), 0.0)
            mean = np.where(self.count == 0, other.mean, np.where(other.count == 0, self.mean, self.mean + delta * share))
            m2 = np.where(self.count == 0, other.m2, np.where(other.count == 0, self.m2,
                                                               self.m2 + other.m2 + delta * delta * self.count * share))

        def add(a, b):
            return None if a is None else a + b

        return _Partials(count, mean, m2, np.fmin(self.low, other.low), np.fmax(self.high, other.high),
                         self.entropy_sum + other.entropy_sum, self.entropy_rows + other.entropy_rows,
                         add(self.column_terms, other.column_terms), add(self.column_mass, other.column_mass),
                         self.column_sum + other.column_sum, self.column_count + other.column_count,
                         self.local_sum + other.local_sum, self.local_count + other.local_count,
                         self.global_sum + other.global_sum, self.global_count + other.global_count)


def _dense_partials(block: np.ndarray, masks, normalized_axis: int, complete: bool | None = None,
                    scratch: _Scratch | None = None) -> _Partials:
    """Partials of a block ``(*inner, rows, key)`` whose excluded cells are NaN (``complete``: the
    caller knows there are none)."""
    if block.size and (complete if complete is not None else not np.isnan(block).any()):
        return _complete_partials(block, masks, normalized_axis, scratch)
    axes = (-2, -1)
    valid = ~np.isnan(block)
    zeros = np.where(valid, block, 0.0)
    count = valid.sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = zeros.sum(axis=axes) / count
        m2 = np.where(valid, np.square(block - np.expand_dims(mean, axes)), 0.0).sum(axis=axes)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(block > 0, -block * np.log(block), 0.0)
    mass = np.abs(zeros)
    if normalized_axis == -1:
        live = mass.sum(axis=-1) > 0
        entropy_sum = np.where(live, terms.sum(axis=-1), 0.0).sum(axis=-1)
        entropy_rows = live.sum(axis=-1)
        column_terms = column_mass = None
    else:
        entropy_sum = np.zeros(block.shape[:-2])
        entropy_rows = np.zeros(block.shape[:-2], dtype=np.int64)
        column_terms, column_mass = terms.sum(axis=-2), mass.sum(axis=-2)
    shape = block.shape[:-2]
    local_sum, local_count = np.zeros(shape), np.zeros(shape, dtype=np.int64)
    global_sum, global_count = np.zeros(shape), np.zeros(shape, dtype=np.int64)
    if masks is not None:
        local, eligible = masks
        near = valid & local & eligible
        far = valid & ~local & eligible
        local_sum, local_count = np.where(near, block, 0.0).sum(axis=axes), near.sum(axis=axes)
        global_sum, global_count = np.where(far, block, 0.0).sum(axis=axes), far.sum(axis=axes)
    return _Partials(count, np.where(count > 0, mean, 0.0), m2, _nan_stat(np.nanmin, block, axes),
                     _nan_stat(np.nanmax, block, axes), entropy_sum, entropy_rows, column_terms, column_mass,
                     zeros.sum(axis=-2), valid.sum(axis=-2), local_sum, local_count, global_sum, global_count)


def _complete_partials(block: np.ndarray, masks, normalized_axis: int, buffers: _Scratch | None = None) -> _Partials:
    """:func:`_dense_partials` of a block without NaN (nothing excluded: the usual case), in about a
    third of the passes over memory: no validity masks, one scratch buffer reused for the squared
    deviations and the entropy terms, local and global sums as dot products with the masks. The
    statistics are the same (sums in another order differ in the last bits at most)."""
    axes = (-2, -1)
    shape = block.shape[:-2]
    rows, keys = block.shape[-2:]
    count = np.full(shape, rows * keys, dtype=np.int64)
    total = block.sum(axis=axes)
    mean = total / max(1, rows * keys)
    scratch = np.subtract(block, np.expand_dims(mean, axes), out=buffers.array("scratch", block.shape) if buffers else None)
    np.square(scratch, out=scratch)
    m2 = scratch.sum(axis=axes)
    low, high = block.min(axis=axes), block.max(axis=axes)
    if low.size and low.min() >= 0:  # weights: p log p with log(max(p, tiny)); 0 * log(tiny) is 0
        np.maximum(block, np.finfo(block.dtype).tiny, out=scratch)
        np.log(scratch, out=scratch)
    else:  # signed values (logits): the terms of positive cells only
        scratch.fill(0.0)
        np.log(block, out=scratch, where=block > 0)
    scratch *= block  # p log p; the entropy terms are its negation, taken on the sums below
    if normalized_axis == -1:
        live = np.any(block, axis=-1)  # a row with any weight (finite values: |p| summing above 0)
        entropy_sum = -np.where(live, scratch.sum(axis=-1), 0.0).sum(axis=-1)
        entropy_rows = live.sum(axis=-1)
        column_terms = column_mass = None
    else:
        entropy_sum = np.zeros(shape)
        entropy_rows = np.zeros(shape, dtype=np.int64)
        column_terms, column_mass = -scratch.sum(axis=-2), np.abs(block).sum(axis=-2)
    del scratch
    local_sum, local_count = np.zeros(shape), np.zeros(shape, dtype=np.int64)
    global_sum, global_count = np.zeros(shape), np.zeros(shape, dtype=np.int64)
    if masks is not None:
        local, eligible = masks
        near = np.broadcast_to(local & eligible, block.shape[-local.ndim:] if local.ndim <= 2 else local.shape)
        far = np.broadcast_to(~local & eligible, near.shape)
        vectors = masks.vectors(near, far, block.dtype) if isinstance(masks, _Masks) and near.ndim == 2 else (None, None)
        local_sum, local_count = _masked_sums(block, near, vectors[0])
        global_sum, global_count = _masked_sums(block, far, vectors[1])
    return _Partials(count, mean, m2, low, high, entropy_sum, entropy_rows,
                     column_terms, column_mass, block.sum(axis=-2), np.full(shape + (keys,), rows, dtype=np.int64),
                     local_sum, local_count, global_sum, global_count)


def _masked_sums(block: np.ndarray, mask: np.ndarray, vector: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per map of ``block`` (``(*inner, rows, key)``): the sum and count of the cells ``mask`` picks
    (``vector``: the 2-D mask as a flat vector of the block's type and its count, when kept already)."""
    shape = block.shape[:-2]
    if mask.ndim == 2:  # one mask for every map: a matrix-vector product over the flattened maps
        flat = block.reshape(-1, mask.size)
        weights, picked = vector if vector is not None else (mask.reshape(-1).astype(block.dtype), int(np.count_nonzero(mask)))
        # einsum's own loop, not BLAS (``@``): OpenBLAS ran this product on every core and its
        # threads then spun waiting for more work, about 10 ms of CPU per call against 5 ms
        # (measured; the statistics of a 12 x 12 x 2048^2 file: 20-25 s of CPU against 15 s with
        # one BLAS thread). The same products summed; BLAS's order already depended on its threads.
        sums = np.einsum("mc,c->m", flat, weights).reshape(shape)
        return sums, np.full(shape, picked, dtype=np.int64)
    mask = np.broadcast_to(mask, block.shape)
    return np.where(mask, block, 0.0).sum(axis=(-2, -1)), mask.sum(axis=(-2, -1))


def _finish_dense(partials: _Partials) -> dict:
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = {
            "count": partials.count,
            "mean": np.where(partials.count > 0, partials.mean, np.nan),
            "std": np.where(partials.count > 0, np.sqrt(partials.m2 / np.maximum(partials.count, 1)), np.nan),
            "min": partials.low, "max": partials.high,
        }
        if partials.column_terms is None:
            stats["entropy"] = np.where(partials.entropy_rows > 0, partials.entropy_sum / np.maximum(partials.entropy_rows, 1), np.nan)
        else:
            columns = np.where(partials.column_mass > 0, partials.column_terms, np.nan)
            stats["entropy"] = _nan_stat(np.nanmean, columns, -1)
        profile = np.where(partials.column_count > 0, partials.column_sum / np.maximum(partials.column_count, 1), np.nan)
    middle = _nan_stat(np.nanmean, profile[..., 1:-1], -1) if profile.shape[-1] >= 3 else np.full(profile.shape[:-1], np.nan)
    stats["sink_score"] = profile[..., 0] - middle
    stats.update(_local_global(partials.local_sum, partials.local_count, partials.global_sum, partials.global_count))
    return stats


def _local_global(local_sum, local_count, global_sum, global_count) -> dict:
    with np.errstate(invalid="ignore", divide="ignore"):
        local_mean = np.where(local_count > 0, local_sum / np.maximum(local_count, 1), np.nan)
        global_mean = np.where(global_count > 0, global_sum / np.maximum(global_count, 1), np.nan)
        ratio = np.where((local_count > 0) & (global_count > 0), local_mean / global_mean, np.nan)
    return {"local_mean": local_mean, "global_mean": global_mean, "local_global_ratio": ratio,
            "local_count": local_count, "global_count": global_count}


def _edge_stats(block: np.ndarray, target: np.ndarray, masks) -> dict:
    """Statistics of maps ``(*inner, edge)``; the entropy is the mean over targets of each target's."""
    axis = -1
    valid = ~np.isnan(block)
    stats = {
        "count": valid.sum(axis=axis),
        "mean": _nan_stat(np.nanmean, block, axis), "std": _nan_stat(np.nanstd, block, axis),
        "min": _nan_stat(np.nanmin, block, axis), "max": _nan_stat(np.nanmax, block, axis),
    }
    flat = block.reshape(-1, block.shape[-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(flat > 0, -flat * np.log(flat), 0.0)
    groups = np.unique(target)
    entropy = np.array([np.mean(np.bincount(target, weights=np.nan_to_num(row))[groups]) if groups.size else np.nan
                        for row in terms])
    stats["entropy"] = entropy.reshape(block.shape[:-1])
    stats["sink_score"] = np.full(block.shape[:-1], np.nan)
    shape = block.shape[:-1]
    if masks is None:
        zeros, counts = np.zeros(shape), np.zeros(shape, dtype=np.int64)
        stats.update(_local_global(zeros, counts, zeros, counts))
    else:
        local, eligible = masks
        near, far = valid & local & eligible, valid & ~local & eligible
        stats.update(_local_global(np.where(near, block, 0.0).sum(axis), near.sum(axis),
                                   np.where(far, block, 0.0).sum(axis), far.sum(axis)))
    return stats


def _excluded_as_nan(site, block: np.ndarray, sample, rows) -> np.ndarray:
    """Non-finite values (NaN not captured, -inf masked logits) and padding become NaN."""
    if not np.isfinite(block).all():
        block = np.where(np.isfinite(block), block, np.nan)
    for dim, axis in (("query", -2), ("key", -1)):
        keep = real_tokens(site, dim, sample)
        if keep is None:
            continue
        if dim == "query":
            keep = keep[rows]
        shape = [1] * block.ndim
        shape[axis] = keep.size
        block = np.where(keep.reshape(shape), block, np.nan)
    return block


def _expected_mean(site, array, sample, rows, edge_targets=None) -> float | None:
    """The mean per map that normalization forces (softmax/sparsemax rows sum to 1), or None."""
    attrs = site.attrs
    if array.name != "weights" or attrs.get("normalization") not in ("softmax", "sparsemax"):
        return None
    if edge_targets is not None:
        if attrs.get("normalized_dim", "key") != "key" or edge_targets.size == 0:
            return None
        return float(np.unique(edge_targets).size) / edge_targets.size
    keys = real_tokens(site, "key", sample)
    queries = real_tokens(site, "query", sample)
    if attrs.get("normalized_dim", "key") == "key":
        return 1.0 / (keys.sum() if keys is not None else site.sizes["key"])
    if rows is not None:
        return None  # columns sum to 1 only over every query
    return 1.0 / (queries.sum() if queries is not None else site.sizes["query"])


def _constant_reason(site, edge: bool) -> str:
    if edge:
        return f"{site.attrs.get('normalization')} over each target's edges"
    if site.attrs.get("normalized_dim", "key") == "key":
        return f"{site.attrs.get('normalization')} rows sum to 1"
    return f"{site.attrs.get('normalization')} columns sum to 1"


@documented
def attention_statistics(source, *, site=None, variable: str = "weights", threshold: float = DEFAULT_THRESHOLD,
                         queries=None, pairwise: str | None = None, radius: int = PATCH_RADIUS,
                         window: int = LOCAL_WINDOW, scheduler=None, progress: bool | None = None) -> xr.Dataset:
    """Per-map statistics of one site: a Dataset with one variable per statistic over the leading dims.

    ``mean``, ``std``, ``min``, ``max`` are over the map's values; ``entropy`` is the mean row
    entropy (over keys; over queries for ``normalized_dim="query"``); ``sink_score`` the mean
    attention on the first key minus that on the middle keys; ``local_mean``, ``global_mean`` and
    ``local_global_ratio`` compare local and other pairs, local as :func:`locality` decides (the
    Dataset's ``locality`` attribute says which definition; NaN where it is not defined).
    ``count``, ``local_count`` and ``global_count`` are the values behind each mean, so that means
    over several maps can be pooled. Padding (``query_mask``/``key_mask``), NaN (not captured) and
    +/-inf (masked logits) are left out.

    Parameters
    ----------
    $source
    $site
    variable : str, default "weights"
        The attention variable to summarise.
    $locality_threshold
    $stats_queries
    $pairwise_name
    $locality_radius
    $locality_window
    scheduler : str or distributed.Client, optional
        Where the maps are computed, as a dask graph over the stored chunks: ``"threads"``
        (default: every local core), ``"processes"``, ``"synchronous"``, a
        ``dask.distributed.Client`` or a scheduler address (see :mod:`attnformat.compute`).
    progress : bool, optional
        Progress bar on stderr; by default only when stderr is a terminal.

    Returns
    -------
    xarray.Dataset
        Attributes: ``site``, ``variable``, ``locality`` (description), ``locality_kind``,
        ``queries`` (e.g. ``"query [CLS] only"``), and ``constant_mean``/``constant_mean_text``
        when normalization fixes the mean of every map.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import attention_statistics
    >>> stats = attention_statistics(attnformat.example_path("dense"))
    >>> stats["entropy"].dims, round(float(stats["max"].max()), 3) <= 1.0
    (('layer', 'head'), True)
    >>> stats.attrs["locality"]
    'token window +/-2 (|query - key position| <= 2)'
    """
    site_node = resolve_site(source, site)
    return _statistics(site_node, variable, locality(site_node, variable=variable, pairwise=pairwise, threshold=threshold,
                                                     radius=radius, window=window), queries, scheduler, progress)


#: Per-map statistics kept while :func:`reusing_statistics` is active: ``{key: (site node, statistics)}``.
_REUSED: dict | None = None


@contextlib.contextmanager
def reusing_statistics():
    """Within this block, per-map statistics of a site are computed once and given again to the
    next call for the same site node, variable and locality (over all queries).

    Why: a report computes them for its summary and again for its box plots
    (:func:`statistics_boxplots`), the same numbers from every map of the site (about 2.4 s of CPU
    each time for 4 layers x 12 heads x 1024 tokens, measured). The report keeps them only while
    it runs, and only for the tree it opened; any scheduler gives the same numbers.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import attention_statistics
    >>> tree = attnformat.open(attnformat.example_path("dense"))
    >>> with reusing_statistics():
    ...     attention_statistics(tree) is attention_statistics(tree)
    True
    >>> attention_statistics(tree) is attention_statistics(tree)
    False
    """
    global _REUSED
    previous, _REUSED = _REUSED, {}
    try:
        yield
    finally:
        _REUSED = previous


def _statistics(site_node, variable: str, info: Locality, queries, scheduler=None, progress=None) -> xr.Dataset:
    reused = _REUSED
    if reused is None or queries is not None:  # chosen queries: computed each time, as asked
        return _computed_statistics(site_node, variable, info, queries, scheduler, progress)
    key = (id(site_node), variable, info)
    found = reused.get(key)
    if found is not None and found[0] is site_node:  # the node is held, so its id is not reused
        return found[1]
    stats = _computed_statistics(site_node, variable, info, queries, scheduler, progress)
    reused[key] = (site_node, stats)
    return stats


def _computed_statistics(site_node, variable: str, info: Locality, queries, scheduler=None, progress=None) -> xr.Dataset:
    if site_node.attrs.get("layout") in REDUCED_LAYOUTS:
        layout = site_node.attrs.get("layout")
        raise SelectionError(
            f"file {_source_of(site_node)}, site {site_name(site_node)} is a {layout!r} site: its maps are not stored "
            f"whole, so per-map statistics cannot be computed; statistics_summary reports what it stores"
            + (" (plot kinds statistics-overview, statistics-profile, top-key)" if layout == "statistics"
               else " (plot kinds topk-heatmap, row-profile)"))
    if variable not in site_node.data_vars:
        raise SelectionError(f"variable {variable!r} not in file {_source_of(site_node)}, site {site_name(site_node)}; "
                             f"variables: {', '.join(site_node.data_vars)}")
    array = site_node[variable]
    leading = [d for d in array.dims if d in SELECTABLE_DIMS]
    edge = "edge" in array.dims
    map_size = array.sizes["edge"] if edge else array.sizes["query"] * array.sizes["key"]
    inner = [d for d in ("head",) if d in leading and map_size * array.sizes[d] <= _BLOCK_ELEMENTS]
    outer = [d for d in leading if d not in inner]
    normalized_axis = -2 if site_node.attrs.get("normalized_dim") == "query" else -1
    maps = math.prod(array.sizes[d] for d in outer + inner)
    if maps > MAX_STATISTICS_MAPS:
        # A file can declare any number of maps in a few bytes; the per-map table would be
        # allocated (and the maps read) before anything is found missing.
        raise AttnFormatError(
            f"{_source_of(site_node)}: site {site_name(site_node)} declares {maps:,} maps of {variable}; statistics "
            f"are computed for at most {MAX_STATISTICS_MAPS:,} at a time [ATTN-STORE-006]; select fewer (e.g. one sample)"
        )
    names = STATISTICS + COUNTS
    results = {name: np.full([array.sizes[d] for d in outer + inner], np.nan) for name in names}
    expected = set()
    for index, stats, expect in _map_statistics(site_node, variable, info, queries, outer, inner, normalized_axis,
                                                scheduler, progress):
        expected.add(expect)
        for name in names:
            results[name][index] = stats[name]
    import xarray as xr  # imported on use: plotting one map never needs it

    dims = tuple(outer + inner)
    coords = {d: site_node.coords[d].values for d in dims if d in site_node.coords}
    dataset = xr.Dataset({name: (dims, values) for name, values in results.items()}, coords=coords)
    dataset.attrs.update(site=site_name(site_node), variable=variable, locality=info.description,
                         locality_kind=info.kind, queries=queries_text(site_node, queries))
    if len(expected) == 1 and None not in expected:
        value = expected.pop()
        tolerance = ROW_SUM_TOLERANCE.get(array.dtype.name, 1e-3) * value
        means = dataset["mean"].values
        finite = means[np.isfinite(means)]
        if finite.size and np.all(np.abs(finite - value) <= tolerance):
            dataset.attrs.update(constant_mean=value, constant_mean_text=f"{_fraction(value)} for every map "
                                                                          f"({_constant_reason(site_node, edge)})")
    return dataset.transpose(*leading)


def _map_statistics(site_node, variable, info, queries, outer, inner, normalized_axis, scheduler, progress):
    """``(index, statistics, expected mean)`` of every map (or set of inner maps), computed as a dask
    graph: one task per block of outer positions, blocks made of whole stored chunks
    (:func:`attnformat.compute.plan_chunks`), each task streaming its maps as the serial code did."""
    from attnformat import compute

    compute.check_portable(site_node, scheduler)
    array = site_node[variable]
    stored = compute.stored_chunk_shape(array.variable) or tuple(array.shape)
    stored_of = dict(zip(array.dims, stored))
    dims = tuple(outer) + tuple(d for d in array.dims if d not in outer)
    shape = tuple(array.sizes[d] for d in dims)
    wanted = {d: ("auto" if d in outer else -1) for d in dims}
    plan = compute.plan_chunks(dims, shape, tuple(stored_of[d] for d in dims), array.dtype.itemsize, wanted,
                               target_bytes=compute.TASK_BYTES)
    where = compute.NodeRef(site_node)
    tasks = [compute.delayed(_statistics_task, where, variable, info, queries, outer, inner, normalized_axis,
                             [(block.start, block.stop) for block in region[:len(outer)]])
             for region in compute.regions(plan)]
    for found in compute.run(tasks, scheduler=scheduler, progress=progress):
        yield from found


def _statistics_task(where, variable, info, queries, outer, inner, normalized_axis, spans) -> list:
    """The statistics of the maps at the outer positions in ``spans`` (one task of the graph)."""
    site_node = where.node()
    array = site_node[variable]
    edge = "edge" in array.dims
    inner_size = math.prod(array.sizes[d] for d in inner)
    pairs = _LocalPairs.shared(where, site_node, array, info, inner)
    rows_by_sample = {}
    found = []
    for index in itertools.product(*(range(start, stop) for start, stop in spans)):
        chosen = dict(zip(outer, index))
        sample = chosen.get("sample")
        if sample not in rows_by_sample:
            rows_by_sample[sample] = query_rows(site_node, queries, sample)
        rows = rows_by_sample[sample]
        selected = array.isel(chosen).transpose(*inner, ...)
        if edge:
            block = np.asarray(selected.values, dtype=np.float64)
            targets = site_node.coords["target"].values
            keep = slice(None) if rows is None else np.flatnonzero(np.isin(targets, rows))
            block = np.where(np.isfinite(block[..., keep]), block[..., keep], np.nan)
            stats = _edge_stats(block, targets[keep], pairs.masks(chosen, keep))
            expect = _expected_mean(site_node, array, sample, rows, edge_targets=targets[keep])
        else:
            stats = _finish_dense(_stream_rows(site_node, selected, chosen, rows, pairs, inner_size, normalized_axis,
                                               _Scratch.shared(where)))
            expect = _expected_mean(site_node, array, sample, rows)
        found.append((index, stats, expect))
    return found


def _stream_rows(site_node, selected, chosen, rows, pairs, inner_size, normalized_axis,
                 scratch: _Scratch | None = None) -> _Partials:
    """Partials of one set of maps, read in blocks of query rows of bounded size."""
    keys = selected.sizes["key"]
    positions = np.arange(selected.sizes["query"]) if rows is None else rows
    step = max(1, _BLOCK_ELEMENTS // max(1, inner_size * keys))
    total = None
    for start in range(0, positions.size, step):
        if rows is None:
            part = slice(start, min(start + step, positions.size))
        else:
            part = positions[start:start + step]
        values = selected.isel(query=part).values
        if scratch is None:
            block = np.asarray(values, dtype=np.float64)
        else:  # widened into this thread's block buffer (the same float64 values as a new array)
            block = scratch.array("block", values.shape)
            np.copyto(block, values, casting="unsafe")
        excluded = _excluded_as_nan(site_node, block, chosen.get("sample"), part)
        # The same array back: every value was finite and nothing is padding, so nothing is NaN.
        complete = True if excluded is block else None
        partials = _dense_partials(excluded, pairs.masks(chosen, part), normalized_axis, complete, scratch)
        total = partials if total is None else total.merge(partials)
    if total is None:  # no query rows at all
        block = np.full(tuple(selected.sizes[d] for d in selected.dims[:-2]) + (0, keys), np.nan)
        total = _dense_partials(block, None, normalized_axis)
    return total


def _fraction(value: float) -> str:
    """``= 1/17`` for a value that is a simple fraction, else ``= 0.0588``."""
    fraction = Fraction(value).limit_denominator(100_000)
    if fraction.denominator > 1 and abs(float(fraction) - value) <= 1e-12 * abs(value):
        return f"= {fraction.numerator}/{fraction.denominator} = {value:.4g}"
    return f"= {value:.6g}"


def constant_statistics(stats: xr.Dataset) -> dict[str, dict]:
    """Statistics that are the same for every map: fixed by normalization, or numerically constant.

    A softmax's mean per map is 1/n_keys by construction (its rows sum to 1); a causal model's
    max per map is 1 (its first row has one key). Drawn as boxes, such a statistic shows only
    rounding noise; :func:`statistics_boxplots` draws it as a labelled constant instead.

    Parameters
    ----------
    stats : xarray.Dataset
        The result of :func:`attention_statistics`.

    Returns
    -------
    dict
        ``{statistic: {"value": float, "text": "= 1/17 = 0.05882 for every map (softmax rows sum to 1)"}}``.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import attention_statistics
    >>> constant_statistics(attention_statistics(attnformat.example_path("image")))["mean"]["text"]
    '= 1/17 = 0.05882 for every map (softmax rows sum to 1)'
    """
    found = {}
    if "constant_mean" in stats.attrs:
        found["mean"] = {"value": float(stats.attrs["constant_mean"]), "text": stats.attrs["constant_mean_text"]}
    for name in STATISTICS:
        if name in found or name not in stats:
            continue
        values = stats[name].values
        finite = values[np.isfinite(values)]
        if finite.size < 2:
            continue
        low, high = float(finite.min()), float(finite.max())
        scale = max(abs(low), abs(high))
        if high - low <= _CONSTANT_RELATIVE * scale:
            value = float(np.median(finite))
            found[name] = {"value": value, "text": f"{_fraction(value)} for every map"}
    return found


# -- summaries ------------------------------------------------------------------------------------


def _arrays(stats: xr.Dataset) -> dict:
    """``{name: (dims, values)}`` of every variable of ``stats``, for :func:`_take`, :func:`_pooled`
    and :func:`_averaged`.

    Why not ``stats.isel(layer=..., head=...)`` per head: xarray's indexing costs about a
    millisecond a call, and a summary of 6 layers of 12 heads made 78 of them, about a third of
    the summary's time (measured); numpy takes the same values at a fraction of that.
    """
    return {name: (variable.dims, variable.values) for name, variable in stats.data_vars.items()}


def _take(arrays: dict, dim: str, index: int) -> dict:
    """``arrays`` at position ``index`` of ``dim`` (what ``isel`` selects), the dimension dropped."""
    return {name: ((tuple(d for d in dims if d != dim), np.take(values, index, axis=dims.index(dim))) if dim in dims
                   else (dims, values)) for name, (dims, values) in arrays.items()}


def _pooled(arrays: dict) -> dict:
    """Moments over every map of ``arrays`` (:func:`_arrays`) together (exact: per-map counts, means and stds merge)."""
    count = arrays["count"][1].astype(np.float64).ravel()
    mean = arrays["mean"][1].ravel()
    std = arrays["std"][1].ravel()
    live = (count > 0) & np.isfinite(mean)
    if not live.any():
        return {"mean": None, "std": None, "min": None, "max": None}
    total = count[live].sum()
    pooled_mean = float((count[live] * mean[live]).sum() / total)
    m2 = (count[live] * np.square(std[live])).sum() + (count[live] * np.square(mean[live] - pooled_mean)).sum()
    return {"mean": _json_number(pooled_mean), "std": _json_number(math.sqrt(max(m2 / total, 0.0))),
            "min": _json_number(_nan_stat(np.nanmin, arrays["min"][1], None)),
            "max": _json_number(_nan_stat(np.nanmax, arrays["max"][1], None))}


def _averaged(arrays: dict, *, everything: bool = False) -> dict:
    """Map statistics of ``arrays`` (:func:`_arrays`) over the remaining dimensions: entropy and
    sink score averaged over maps; local and global means pooled over every local (global) pair
    of every map, and the ratio of those pooled means (seed 002: mean attention within 8 angstrom
    over mean attention beyond)."""
    averaged = {name: _json_number(_nan_stat(np.nanmean, arrays[name][1], None)) for name in ("entropy", "sink_score")}
    if everything:
        averaged.update(_pooled(arrays))
    local_count, global_count = arrays["local_count"][1], arrays["global_count"][1]
    local_sum = np.nansum(np.where(local_count > 0, arrays["local_mean"][1] * local_count, 0.0))
    global_sum = np.nansum(np.where(global_count > 0, arrays["global_mean"][1] * global_count, 0.0))
    local_pairs, global_pairs = np.nansum(local_count), np.nansum(global_count)
    local = local_sum / local_pairs if local_pairs > 0 else None
    far = global_sum / global_pairs if global_pairs > 0 else None
    averaged["local_mean"], averaged["global_mean"] = _json_number(local), _json_number(far)
    averaged["local_global_ratio"] = _json_number(local / far) if local is not None and far else None
    return averaged


def _json_number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


@documented
def statistics_summary(source, *, variable: str = "weights", threshold: float = DEFAULT_THRESHOLD, queries=None,
                       pairwise: str | None = None, radius: int = PATCH_RADIUS, window: int = LOCAL_WINDOW,
                       storage_options=None, scheduler=None, progress: bool | None = None) -> dict:
    """Per site and layer: layer, type, mean, std, min, max, shape (seed 001's JSON), plus entropy,
    sink score, local and global mean attention and their ratio (seed 002's printout), and the same
    per head; with, per site, what "local" meant and which statistics are constant.

    The structure::

        {"source": "run.zarr",
         "queries": "all queries",                       # or "query [CLS] only"
         "sites": {"encoder/self": [                     # one entry per layer
             {"layer": 0, "type": "self_attention", "mean": ..., "std": ..., "min": ..., "max": ...,
              "shape": [2, 12, 17, 17], "entropy": ..., "sink_score": ..., "local_mean": ...,
              "global_mean": ..., "local_global_ratio": ...,
              "heads": [{"head": 0, "mean": ..., ..., "local_global_ratio": ...}, ...]}, ...]},
         "locality": {"encoder/self": {"kind": "patch_grid", "description": "patch grid 4x4 ...", ...}},
         "constants": {"encoder/self": {"mean": {"value": 0.0588, "text": "= 1/17 ... for every map ..."}}}}

    ``mean``/``std``/``min``/``max`` are over every value of the layer (of the chosen query rows);
    ``local_mean``/``global_mean`` pool every local/global pair of the layer's maps and the ratio is
    theirs (seed 002's ``local_attn / global_attn``); ``entropy`` and ``sink_score`` average the maps.

    Parameters
    ----------
    $source
    variable : str, default "weights"
        The attention variable to summarise.
    $locality_threshold
    $stats_queries
    pairwise : str, optional
        The pairwise variable that defines locality in the sites that have it (by default
        ``distance``, else the first); sites without it use what they support.
    $locality_radius
    $locality_window
    storage_options : dict, optional
        fsspec options for a URL, as for :func:`attnformat.open`.
    scheduler : str or distributed.Client, optional
        Where the maps are computed, as a dask graph over the stored chunks in bounded memory:
        ``"threads"`` (default: every local core), ``"processes"``, ``"synchronous"``, a
        ``dask.distributed.Client`` or a scheduler address such as ``"tcp://host:8786"`` (see
        :mod:`attnformat.compute`). Every scheduler gives the same numbers.
    progress : bool, optional
        Progress bar on stderr; by default only when stderr is a terminal.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import statistics_summary
    >>> summary = statistics_summary(attnformat.example_path("encoder-decoder"))
    >>> entry = summary["sites"]["decoder/cross"][0]
    >>> entry["layer"], entry["type"], entry["shape"]
    (0, 'cross_attention', [2, 5, 7])
    >>> summary["locality"]["decoder/cross"]["kind"], summary["locality"]["decoder/self"]["kind"]
    ('none', 'token_window')
    """
    if storage_options is not None and isinstance(source, (str, os.PathLike, Location)):
        source = Location.of(source, storage_options)
    sites = sites_of(source)
    summary = {"source": str(sites[0].root.encoding.get("source", "<in-memory tree>")) if sites else "",
               "queries": "all queries", "sites": {}, "locality": {}, "constants": {}}
    for site_node in sites:
        layout = site_node.attrs.get("layout")
        if layout in REDUCED_LAYOUTS:
            # What a reduced site stores is reported as stored: a statistics site's own statistics, a
            # top-k site's exact figures (kept weights, omitted mass); nothing is recomputed or guessed.
            name = site_name(site_node)
            summarise = _stored_statistics_entries if layout == "statistics" else _topk_entries
            summary["sites"][name], summary["locality"][name] = summarise(site_node, queries, scheduler, progress)
            summary["constants"][name] = {}
            summary.setdefault("layouts", {})[name] = layout
            if queries is not None:
                summary["queries"] = queries_text(site_node, queries)
            continue
        if variable not in site_node.data_vars:
            continue
        name = site_name(site_node)
        summary.setdefault("layouts", {})[name] = layout
        array = site_node[variable]
        names = _pairwise_names(site_node)
        info = locality(site_node, variable=variable, pairwise=pairwise if pairwise in names else None,
                        threshold=threshold, radius=radius, window=window)
        stats = _statistics(site_node, variable, info, queries, scheduler, progress)
        summary["queries"] = stats.attrs["queries"] if queries is not None else "all queries"
        kind = f"{site_node.attrs.get('attention_type', 'self')}_attention"
        layers = site_node.coords["layer"].values if "layer" in site_node.coords else [None]
        sizes = dict(array.sizes)
        rows = query_rows(site_node, queries)
        if rows is not None:  # the shape of what was summarised: the chosen rows (or their edges)
            if "edge" in sizes:
                sizes["edge"] = int(np.isin(site_node.coords["target"].values, rows).sum())
            else:
                sizes["query"] = int(rows.size)
        shape = [int(sizes[d]) for d in array.dims if d != "layer"]
        entries = []
        arrays = _arrays(stats)
        for layer_position, layer in enumerate(layers):
            layer_arrays = _take(arrays, "layer", layer_position) if "layer" in stats.dims else arrays
            entry = {"layer": None if layer is None else int(layer), "type": kind, **_pooled(layer_arrays),
                     "shape": list(shape)}
            entry.update(_averaged(layer_arrays))
            if "head" in stats.dims:
                heads = stats.coords["head"].values if "head" in stats.coords else range(stats.sizes["head"])
                entry["heads"] = [{"head": int(head), **_averaged(_take(layer_arrays, "head", i), everything=True)}
                                  for i, head in enumerate(heads)]
            entries.append(entry)
        summary["sites"][name] = entries
        summary["locality"][name] = info.as_dict()
        summary["constants"][name] = constant_statistics(stats)
    return summary


# -- reduced sites: what they store ----------------------------------------------------------------

#: Layouts whose maps are not stored whole (spec 1.2.0): summarised from what they store.
REDUCED_LAYOUTS = ("topk", "statistics")
#: Keys of a dense entry that a reduced site cannot give (they are None there), so that every entry
#: of a summary has the same keys.
_DENSE_KEYS = ("mean", "std", "min", "max", "entropy", "sink_score", "local_mean", "global_mean", "local_global_ratio")


def _layer_positions(site_node) -> list:
    if "layer" not in site_node.sizes:
        return [(None, None)]
    labels = site_node.coords["layer"].values if "layer" in site_node.coords else range(site_node.sizes["layer"])
    return [(position_, int(label)) for position_, label in enumerate(labels)]


def _head_labels(site_node) -> list:
    return [int(h) for h in (site_node.coords["head"].values if "head" in site_node.coords else range(site_node.sizes["head"]))]


def _rows_mask(site_node, queries, sample=None) -> np.ndarray:
    """Which query rows count: the chosen ones, and only real tokens (not padding)."""
    keep = np.ones(site_node.sizes["query"], dtype=bool)
    rows = query_rows(site_node, queries, sample)
    if rows is not None:
        keep[:] = False
        keep[rows] = True
    real = real_tokens(site_node, "query", sample)
    return keep if real is None else keep & real


def _masked_rows(values: np.ndarray, dims, site_node, queries) -> np.ndarray:
    """``values`` (dims ending in ``query``) with rows that do not count set to NaN (per sample when needed)."""
    values = np.array(values, dtype=np.float64)
    dims = list(dims)
    per_sample = "sample" in dims and any("sample" in site_node.coords[name].dims for name in ("query_mask", "query_label")
                                          if name in site_node.coords)
    if per_sample:  # a view with sample first and query last: writing to it writes to values
        moved = np.moveaxis(values, [dims.index("sample"), dims.index("query")], [0, -1])
        for sample in range(moved.shape[0]):
            moved[sample][..., ~_rows_mask(site_node, queries, sample)] = np.nan
    else:
        np.moveaxis(values, dims.index("query"), -1)[..., ~_rows_mask(site_node, queries)] = np.nan
    return values


def _mean(values) -> float | None:
    return _json_number(_nan_stat(np.nanmean, values, None)) if np.size(values) else None


def _stored_statistics_entries(site_node, queries, scheduler=None, progress=None) -> tuple[list, dict]:
    """Per layer (and head): the stored statistics averaged over the rows that count; a layer per task."""
    entries = _per_layer(site_node, _stored_statistics_layer, queries, scheduler, progress)
    window = site_node.attrs.get("local_window")
    if "local_weight" in site_node.data_vars and window is not None:
        info = {"kind": "token_window", "window": int(window),
                "description": f"stored local_weight: |query - key position| <= {int(window)} (as captured)"}
    else:
        info = {"kind": "none", "description": "no local_weight stored"}
    return entries, info


def _stored_statistics_layer(site_node, layer_position, layer, queries) -> dict:
    kind = f"{site_node.attrs.get('attention_type', 'self')}_attention"
    stored = [name for name in ("entropy", "max_weight", "sink_weight", "local_weight", "top_key")
              if name in site_node.data_vars]
    per_name = {}
    for name in stored:
        array = site_node[name]
        if layer_position is not None and "layer" in array.dims:
            array = array.isel(layer=layer_position)
        values = np.asarray(array.values)
        if name == "top_key":
            values = np.where(values < 0, np.nan, values.astype(np.float64))
        per_name[name] = (_masked_rows(values, array.dims, site_node, queries), array.dims)

    def averaged(select_head=None):
        entry = {}
        for name, (values, dims) in per_name.items():
            if select_head is not None and "head" in dims:
                values = np.take(values, select_head, axis=list(dims).index("head"))
            if name == "top_key":
                finite = values[np.isfinite(values)]
                entry["top_key_first"] = _json_number(np.mean(finite == 0)) if finite.size else None
                continue
            entry[name] = _mean(values)
            if name == "max_weight":
                entry["max"] = _json_number(_nan_stat(np.nanmax, values, None)) if np.isfinite(values).any() else None
        first = next(iter(per_name.values()), (np.zeros(0), ()))[0]
        entry["rows"] = int(np.isfinite(first).sum())
        return entry

    entry = {"layer": layer, "type": kind, "layout": "statistics", **dict.fromkeys(_DENSE_KEYS), **averaged()}
    dims = site_node[stored[0]].dims if stored else ()
    entry["shape"] = [int(site_node.sizes[d]) for d in dims if d != "layer"]
    if stored and "head" in dims:
        entry["heads"] = [{"head": head, **dict.fromkeys(_DENSE_KEYS), **averaged(index)}
                          for index, head in enumerate(_head_labels(site_node))]
    return entry


def _per_layer(site_node, function, queries, scheduler, progress) -> list:
    """``function(site, layer_position, layer, queries)`` for every layer, one dask task each."""
    from attnformat import compute

    compute.check_portable(site_node, scheduler)
    where = compute.NodeRef(site_node)
    tasks = [compute.delayed(_layer_task, where, function, position, layer, queries)
             for position, layer in _layer_positions(site_node)]
    return compute.run(tasks, scheduler=scheduler, progress=progress)


def _layer_task(where, function, layer_position, layer, queries):
    return function(where.node(), layer_position, layer, queries)


def _topk_entries(site_node, queries, scheduler=None, progress=None) -> tuple[list, dict]:
    """Per layer (and head): the exact figures of the kept weights; a layer per task (rows x k each)."""
    entries = _per_layer(site_node, _topk_layer, queries, scheduler, progress)
    info = {"kind": "none", "description": "not computed for top-k sites: weights outside the top k are not stored"}
    return entries, info


def _topk_layer(site_node, layer_position, layer, queries) -> dict:
    kind = f"{site_node.attrs.get('attention_type', 'self')}_attention"
    top_k = int(site_node.attrs.get("top_k", site_node.sizes.get("rank", 0)))
    keys = site_node.attrs.get("key_count", site_node.sizes.get("key"))
    weights = site_node["weights"]
    omitted = site_node["omitted_weight"] if "omitted_weight" in site_node.data_vars else None
    if layer_position is not None and "layer" in weights.dims:
        weights = weights.isel(layer=layer_position)
        omitted = omitted.isel(layer=layer_position) if omitted is not None and "layer" in omitted.dims else omitted
    kept = np.asarray(weights.values, dtype=np.float64)
    row_dims = weights.dims[:-1]
    first = _masked_rows(kept[..., 0], row_dims, site_node, queries)
    kept_sum = _masked_rows(np.where(np.isnan(kept), 0.0, kept).sum(axis=-1), row_dims, site_node, queries)
    kept_sum = np.where(np.isnan(first), np.nan, kept_sum)  # rows not captured have no kept mass
    left = None if omitted is None else _masked_rows(np.asarray(omitted.values), omitted.dims, site_node, queries)

    def averaged(select_head=None):
        pick = (lambda a: a) if select_head is None or "head" not in row_dims else (
            lambda a: np.take(a, select_head, axis=list(row_dims).index("head")))
        top, mass = pick(first), pick(kept_sum)
        return {"max": _json_number(_nan_stat(np.nanmax, top, None)) if np.isfinite(top).any() else None,
                "max_weight": _mean(top), "kept_weight": _mean(mass),
                "omitted_weight": None if left is None else _mean(pick(left)),
                "omitted_weight_max": None if left is None or not np.isfinite(pick(left)).any()
                else _json_number(_nan_stat(np.nanmax, pick(left), None)),
                "rows": int(np.isfinite(top).sum())}

    entry = {"layer": layer, "type": kind, "layout": "topk", "top_k": top_k,
             "key_count": None if keys is None else int(keys), **dict.fromkeys(_DENSE_KEYS), **averaged(),
             "shape": [int(site_node.sizes[d]) for d in site_node["weights"].dims if d != "layer"]}
    if "head" in row_dims:
        entry["heads"] = [{"head": head, **dict.fromkeys(_DENSE_KEYS), **averaged(index)}
                          for index, head in enumerate(_head_labels(site_node))]
    return entry


def _reduced_lines(summary: dict) -> list[str]:
    def cell(value, width=9, digits=4):
        return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    def statistics_cells(entry) -> str:
        return (f"{cell(entry.get('entropy'))} {cell(entry.get('max_weight'))} {cell(entry.get('sink_weight'))} "
                f"{cell(entry.get('local_weight'))} {cell(entry.get('top_key_first'))} {entry['rows']:>7}")

    def topk_cells(entry) -> str:
        ratio = f"{entry['top_k']}/{entry['key_count'] if entry['key_count'] is not None else '?'}"
        return (f"{ratio:>9} {cell(entry.get('max'))} {cell(entry.get('max_weight'))} {cell(entry.get('kept_weight'))} "
                f"{cell(entry.get('omitted_weight'))} {cell(entry.get('omitted_weight_max'))} {entry['rows']:>7}")

    tables = (
        ("statistics", "stored per-row statistics (mean over captured rows; entropy in nats):",
         f"{'entropy':>9} {'max_w':>9} {'sink_w':>9} {'local_w':>9} {'top=key0':>9} {'rows':>7}", statistics_cells),
        ("topk", "top-k sites (kept weights, exact; omitted mass as stored):",
         f"{'k/keys':>9} {'max':>9} {'max_w':>9} {'kept':>9} {'omitted':>9} {'omit_max':>9} {'rows':>7}", topk_cells),
    )
    layouts = summary.get("layouts", {})
    lines = []
    for wanted, heading, columns, cells in tables:
        names = [name for name, layout in layouts.items() if layout == wanted and name in summary["sites"]]
        if names:
            lines.append(heading)
            lines.append(f"{'site':22} {'layer':>5} {columns}")
            for name in names:
                for entry in summary["sites"][name]:
                    layer = entry["layer"] if entry["layer"] is not None else "-"
                    lines.append(f"{for_terminal(name):22} {layer:>5} {cells(entry)}")
    return lines


def format_summary(summary: dict) -> str:
    """The summary as a text table, one line per site and layer, then what "local" meant per site;
    safe to print on a terminal (names and descriptions come from the file: control characters in
    them are shown escaped).

    Parameters
    ----------
    summary : dict
        The result of :func:`statistics_summary`.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import format_summary, statistics_summary
    >>> lines = format_summary(statistics_summary(attnformat.example_path("dense"))).splitlines()
    >>> print(lines[1])
    site          layer  type               mean      std      min      max  entropy     sink  loc/glob  shape
    >>> print(lines[-1])
    loc/glob of encoder/self: token window +/-2 (|query - key position| <= 2)
    """
    reduced = {name for name, layout in summary.get("layouts", {}).items() if layout in REDUCED_LAYOUTS}
    lines = [for_terminal(summary["source"])]
    if set(summary["sites"]) - reduced or not summary["sites"]:
        lines.append(f"{'site':13} {'layer':>5}  {'type':15} {'mean':>8} {'std':>8} {'min':>8} {'max':>8} "
                     f"{'entropy':>8} {'sink':>8} {'loc/glob':>9}  shape")

    def cell(value, width=8):
        return f"{value:>{width}.4f}" if value is not None else f"{'-':>{width}}"

    for name, entries in summary["sites"].items():
        if name in reduced:
            continue  # listed in their own tables below
        for entry in entries:
            lines.append(f"{for_terminal(name):13} {entry['layer'] if entry['layer'] is not None else '-':>5}  "
                         f"{for_terminal(entry['type']):15} "
                         f"{cell(entry['mean'])} {cell(entry['std'])} {cell(entry['min'])} {cell(entry['max'])} "
                         f"{cell(entry['entropy'])} {cell(entry['sink_score'])} {cell(entry['local_global_ratio'], 9)}  "
                         f"{entry['shape']}")
    lines += _reduced_lines(summary)
    if summary.get("queries", "all queries") != "all queries":
        lines.append(f"statistics of {for_terminal(summary['queries'])}")
    for name, constants in summary.get("constants", {}).items():
        for statistic, constant in constants.items():
            lines.append(f"{statistic} of {for_terminal(name)}: {for_terminal(constant['text'])}")
    for name, info in summary.get("locality", {}).items():
        lines.append(f"loc/glob of {for_terminal(name)}: {for_terminal(info['description'])}")
    return "\n".join(lines)


# -- box plots --------------------------------------------------------------------------------------


def boxplot_data(stats: xr.Dataset, statistic: str) -> tuple[list[str], list[np.ndarray]]:
    """Per layer, the finite values of one statistic over every other dimension (samples, heads, steps).

    Parameters
    ----------
    stats : xarray.Dataset
        The result of :func:`attention_statistics`.
    statistic : str
        One of its variables (``"max"``, ``"entropy"``...).

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
    for position_ in range(values.sizes["layer"]):
        flat = values.isel(layer=position_).values.ravel()
        groups.append(flat[np.isfinite(flat)])
    return names, groups


_LOCAL_STATISTICS = ("local_mean", "global_mean", "local_global_ratio", "local_count", "global_count")
_STATISTIC_NAMES = {"sink_score": "sink score", "local_global_ratio": "local/global ratio", "local_mean": "local mean",
                    "global_mean": "global mean"}


def _draw_constant(ax, layers: list[str], constant: dict, label: str) -> None:
    value = constant["value"]
    positions = np.arange(1, len(layers) + 1)
    ax.plot(positions, np.full(positions.size, value), linestyle="-", marker="o", color=BAR_COLOR, label=label)
    half = abs(value) * 0.5 or 1.0
    ax.set_ylim(value - half, value + half)
    ax.set_xlim(0.5, len(layers) + 0.5)
    ax.set_xticks(positions, layers)
    ax.text(0.5, 0.9, constant["text"].replace(" for every", "\nfor every"), transform=ax.transAxes, ha="center",
            va="top", fontsize=8, wrap=True)


def _thin_labels(ax, count: int, axis: str = "x") -> None:
    """Label every n-th category when the Axes is too small for one label each (at a user-given
    size): layers along x need ~14 points a label, bars along y ~10."""
    if axis == "x":
        room, pitch, labels = ax.get_position().width * ax.figure.get_figwidth() * 72, 14, ax.get_xticklabels()
    else:
        room, pitch, labels = ax.get_position().height * ax.figure.get_figheight() * 72, 10, ax.get_yticklabels()
    fits = max(1, int(room // pitch))
    if count > fits:
        every = math.ceil(count / fits)
        for index, label in enumerate(labels):
            label.set_visible(index % every == 0)


@documented
def statistics_boxplots(source, *, site=None, statistics=None, variable="weights", queries=None,
                        threshold: float = DEFAULT_THRESHOLD, pairwise: str | None = None, radius: int = PATCH_RADIUS,
                        window: int = LOCAL_WINDOW, ncols: int | None = None, figsize=None, title=None):
    """Box plots per layer of per-map statistics across samples and heads (seed 003's statistics figure).

    ``statistics`` defaults to max, mean and entropy for weights (entropy means nothing for
    logits, which get max, mean and std). A statistic that is the same for every map (the mean of
    a softmax is 1/n_keys by construction) is drawn as a labelled constant line, not as boxes of
    rounding noise; :func:`constant_statistics` decides. Y axes never use an offset.

    Parameters
    ----------
    $source
    $site
    statistics : sequence of str, optional
        Statistics to draw, one panel each (see :func:`attention_statistics`).
    variable : str, default "weights"
        The attention variable.
    $stats_queries
    $locality_threshold
    $pairwise_name
    $locality_radius
    $locality_window
    ncols : int, optional
        Panels per row; all in one row by default.
    $figsize
    $title

    Returns
    -------
    matplotlib.figure.Figure
        One Axes per statistic; box ``i`` holds every map's value in layer ``i``.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import statistics_boxplots
    >>> [ax.get_title() for ax in statistics_boxplots(attnformat.example_path("image")).axes]
    ['max per map', 'mean per map (constant)', 'entropy per map']
    """
    stats = attention_statistics(resolve_site(source, site), variable=variable, queries=queries, threshold=threshold,
                                 pairwise=pairwise, radius=radius, window=window)
    statistics = list(statistics or (("max", "mean", "entropy") if variable == "weights" else ("max", "mean", "std")))
    constants = constant_statistics(stats)
    layers = boxplot_data(stats, statistics[0])[0] if statistics else []
    columns = ncols or len(statistics)
    panel_width = max(3.6, 0.35 * len(layers) + 1.6)  # room for every layer's tick label
    figure, axes = grid(len(statistics), ncols=columns, panel_size=(panel_width, 3.6), figsize=figsize)
    for ax, statistic in zip(axes, statistics):
        name = _STATISTIC_NAMES.get(statistic, statistic)
        layers, groups = boxplot_data(stats, statistic)
        local = statistic in _LOCAL_STATISTICS
        if statistic in constants:
            _draw_constant(ax, layers, constants[statistic], name)
            ax.set_title(f"{name} per map (constant)", fontsize=10)
        elif not any(group.size for group in groups):
            # Nothing to draw (locality not defined, or no finite value): say why instead of an empty frame.
            reason = stats.attrs["locality"] if local else "no finite value in any map"
            ax.text(0.5, 0.5, textwrap.fill(reason, 40), transform=ax.transAxes, ha="center", va="center", fontsize=8)
            ax.set_xticks(np.arange(1, len(layers) + 1), layers)
            ax.set_xlim(0.5, len(layers) + 0.5)
            ax.set_yticks([])
            ax.set_title(f"{name} per map (none)", fontsize=10)
            local = False
        else:
            ax.boxplot(groups, tick_labels=layers, patch_artist=True, boxprops={"facecolor": BAR_COLOR, "alpha": 0.5})
            ax.set_title(f"{name} per map", fontsize=10)
        ax.yaxis.get_major_formatter().set_useOffset(False)
        # Which pairs were local changes what the ratio means: the panel says it.
        ax.set_xlabel("layer" + (f"\nlocal: {textwrap.fill(stats.attrs['locality'], 48)}" if local else ""),
                      fontsize=None if not local else 8)
        ax.set_ylabel(name)
        ax.grid(True, axis="y", alpha=0.3)
        _thin_labels(ax, len(layers), "x")
    counted = [d for d in stats.dims if d != "layer"]
    heading = f"{stats.attrs['site']} | {variable} | distribution over {', '.join(counted) or 'maps'}"
    if stats.attrs["queries"] != "all queries":
        heading += f" | {stats.attrs['queries']}"
    figure.suptitle(heading if title is None else title, fontsize=10)
    return figure


# -- top pairs ------------------------------------------------------------------------------------


@documented
def top_pairs(source, *, site=None, k: int = 10, variable="weights", layer=None, head=None, sample=None, step=None,
              time=None, node=None) -> list[dict]:
    """The ``k`` query-key pairs with the largest values (head mean by default, as in seed 001).

    Parameters
    ----------
    $source
    $site
    $pairs_k
    $variable
    $selectors

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


@documented
def top_pairs_plot(source, *, site=None, k: int = 10, variable="weights", layer=None, head=None, sample=None, step=None,
                   time=None, node=None, ax=None, figsize=None, title=None):
    """Horizontal bars of the top-k query -> key pairs, largest on top.

    Parameters
    ----------
    $source
    $site
    $pairs_k
    $variable
    $selectors
    $ax
    $figsize
    $title

    Returns
    -------
    matplotlib.axes.Axes
        Bar ``i`` (from the top) is pair ``i``; its width is the value.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import top_pairs_plot
    >>> len(top_pairs_plot(attnformat.example_path("dense"), k=4).patches)
    4
    """
    chosen = select(source, variable, site=site, layer=layer, head=head, sample=sample, step=step, time=time, node=node)
    pairs = _pairs_of(chosen, k)
    ax = axes_or_new(ax, figsize=figsize or (6.4, max(3.0, 0.22 * len(pairs) + 1.6)))
    positions = np.arange(len(pairs))[::-1]
    ax.barh(positions, [p["value"] for p in pairs], color=BAR_COLOR)
    ax.set_yticks(positions, [f"{p['query_label']} -> {p['key_label']}" for p in pairs], fontsize=8)
    _thin_labels(ax, len(pairs), "y")
    ax.set_xlabel(chosen.normalization)
    ax.set_ylabel("query -> key")
    ax.set_title(f"{chosen.title()} | top {len(pairs)} pairs" if title is None else title, fontsize=9)
    return ax
