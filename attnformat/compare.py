"""Comparing two attention files (runs, checkpoints, models on the same tokens) or two steps of one.

Per site, layer and head: the difference maps ``B - A``, the Jensen-Shannon divergence of every
query row, per-head summaries (mean and max JSD, max ``|B - A|``, L1 distance per row) and the heads
that changed most. No matplotlib here: :mod:`attnformat.viewer.compare` draws what this computes.

What is compared, and how (decided here, stated in the README and in every result):

* **JSD in bits.** ``JSD(p, q) = (KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2`` and
  logarithms in base 2, so 0 means the same row and 1 means rows with no key in common. It is the
  *divergence* (``scipy.spatial.distance.jensenshannon(p, q, base=2) ** 2``), not its square root.
  ``0 log 0`` counts as 0, so zeros (a causal map's future keys, sparsemax) need no smoothing.
  Each row is normalised to sum 1 over the keys compared (as scipy does); weights rows already do.
* **Absent is excluded, never 0.** Padding keys (``key_mask`` false in either file) and cells that
  are NaN in either file (not captured, not computed) are left out of the row. Padding query
  rows (``query_mask`` false in either), rows with no finite cell, rows with no mass, and rows
  with a negative weight have no JSD (NaN) and do not count in the means; ``rows`` says how many
  rows each head's summary averages.
* JSD is computed for ``weights`` only (a distribution per row); for ``logits`` and ``bias`` the
  result holds the differences alone (``mean_abs_diff`` ranks the heads).
* **Comparable or refused.** Both sides must hold the same sites, dimensions, sizes, layer/head
  coordinates and token labels; the first difference is named in a one-line
  :class:`~attnformat.errors.AttnFormatError`. ``allow_label_mismatch=True`` compares files whose
  labels differ (a different tokenizer on texts of the same length, say).

Whole files are computed as one dask graph over the stored chunks (``attnformat.open(...,
chunks="stored")``: whole rows, the key dimension is never split), one read per stored chunk of
each file, on the local cores (threads) by default, or on the scheduler ``scheduler=`` names
(processes, or a ``dask.distributed`` client or address). Memory holds a few blocks, not the files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from attnformat import resolving
from attnformat.conventions import LABEL_COORDS, LEADING_DIMS, MASK_COORDS
from attnformat.errors import AttnFormatError, SelectionError

__all__ = ["Comparison", "SUMMARIES", "compare", "difference", "js_divergence"]

#: Logarithm base of the Jensen-Shannon divergence: bits, so values lie in [0, 1].
JSD_BASE = 2
#: Per-head summary variables of a comparison, in the order tables show them.
SUMMARIES = ("mean_jsd", "max_jsd", "max_abs_diff", "mean_abs_diff", "mean_l1", "max_l1", "rows")
#: What each summary means (for tables, JSON and the Dataset's attributes).
SUMMARY_DOCS = {
    "mean_jsd": "mean over compared query rows of the Jensen-Shannon divergence (bits, 0..1)",
    "max_jsd": "largest Jensen-Shannon divergence of one query row (bits, 0..1)",
    "max_abs_diff": "largest |B - A| over compared cells",
    "mean_abs_diff": "mean |B - A| over compared cells",
    "mean_l1": "mean over compared rows of sum over keys of |B - A|",
    "max_l1": "largest sum over keys of |B - A| of one row",
    "rows": "query rows compared (padding and empty rows are excluded)",
}
#: Layouts compared: whole maps, and graph attention (one weight per edge; a row is a target node's
#: incoming edges). Top-k and statistics sites hold no full rows to compare.
COMPARED_LAYOUTS = ("dense", "edge")
# Per-row quantities one pass over a block yields: JSD, L1, max |diff|, sum |diff|, cells compared.
_ROW_STATS = ("jsd", "l1", "max_abs", "sum_abs", "cells")


def js_divergence(p, q, axis: int = -1) -> np.ndarray:
    """Jensen-Shannon divergence in bits between the rows of ``p`` and ``q`` along ``axis``.

    Cells that are NaN (or infinite) in either input are left out of both rows; each row is then
    normalised to sum 1. Rows with no cell left, no mass in either input or a negative value
    give NaN (no divergence), never 0.

    Parameters
    ----------
    p, q : array_like
        Non-negative weights of the same shape.
    axis : int, default -1
        The axis each distribution lies along.

    Returns
    -------
    numpy.ndarray
        ``p``'s shape without ``axis``; values in [0, 1] or NaN.

    Examples
    --------
    >>> js_divergence([[0.5, 0.5], [1.0, 0.0]], [[0.5, 0.5], [0.0, 1.0]]).tolist()
    [0.0, 1.0]
    >>> bool(np.isnan(js_divergence([np.nan, np.nan], [0.5, 0.5])))
    True
    """
    p = np.moveaxis(np.asarray(p, dtype=np.float64), axis, -1)
    q = np.moveaxis(np.asarray(q, dtype=np.float64), axis, -1)
    if p.shape != q.shape:
        raise AttnFormatError(f"js_divergence: shapes differ, {p.shape} vs {q.shape}")
    return _row_stats(p, q)[..., 0]


def _row_stats(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row (last axis = key): JSD(a, b), L1, max |b - a|, sum |b - a|, cells compared.

    One pass over a block of both files gives everything the summaries need. Rows without any
    cell finite in both give NaN for every statistic but ``cells`` (0).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    a = np.where(both, a, 0.0)
    b = np.where(both, b, 0.0)
    cells = both.sum(axis=-1)
    live = cells > 0
    difference = np.abs(b - a)
    l1 = np.where(live, difference.sum(axis=-1), np.nan)
    max_abs = np.where(live, np.max(difference, axis=-1, initial=0.0), np.nan)
    a_mass, b_mass = a.sum(axis=-1, keepdims=True), b.sum(axis=-1, keepdims=True)
    usable = live & (a_mass[..., 0] > 0) & (b_mass[..., 0] > 0) & ~(a < 0).any(axis=-1) & ~(b < 0).any(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = a / a_mass
        r = b / b_mass
        m = (p + r) / 2
        # 0 log 0 = 0: a zero in p (or r) adds nothing, whatever m is.
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum(axis=-1)
        kl_r = np.where(r > 0, r * np.log2(r / m), 0.0).sum(axis=-1)
    jsd = np.where(usable, np.clip((kl_p + kl_r) / 2, 0.0, 1.0), np.nan)
    return np.stack([jsd, l1, max_abs, np.where(live, difference.sum(axis=-1), np.nan), cells.astype(np.float64)], axis=-1)


def _edge_row_stats(a: np.ndarray, b: np.ndarray, target: np.ndarray, nodes: int) -> np.ndarray:
    """:func:`_row_stats` for graph attention: the row of a node is its incoming edges.

    ``a``, ``b``: (..., edge); ``target``: the target node of each edge. Returns (..., node, 5);
    nodes without an incoming edge compared get NaN (and 0 cells).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    target = np.asarray(target)
    order = np.argsort(target, kind="stable")
    a, b, target = a[..., order], b[..., order], target[order]
    out = np.full(a.shape[:-1] + (nodes, len(_ROW_STATS)), np.nan)
    out[..., 4] = 0.0
    if target.size == 0:
        return out
    starts = np.flatnonzero(np.r_[True, target[1:] != target[:-1]])
    rows = target[starts]
    group = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, target.size]))
    both = np.isfinite(a) & np.isfinite(b)
    a, b = np.where(both, a, 0.0), np.where(both, b, 0.0)
    cells = np.add.reduceat(both, starts, axis=-1)
    live = cells > 0
    difference = np.abs(b - a)
    sum_abs = np.add.reduceat(difference, starts, axis=-1)
    max_abs = np.maximum.reduceat(difference, starts, axis=-1)
    a_mass, b_mass = np.add.reduceat(a, starts, axis=-1), np.add.reduceat(b, starts, axis=-1)
    negative = np.add.reduceat((a < 0) | (b < 0), starts, axis=-1) > 0
    usable = live & (a_mass > 0) & (b_mass > 0) & ~negative
    with np.errstate(divide="ignore", invalid="ignore"):
        p = a / a_mass[..., group]
        r = b / b_mass[..., group]
        m = (p + r) / 2
        terms = np.where(p > 0, p * np.log2(p / m), 0.0) + np.where(r > 0, r * np.log2(r / m), 0.0)
    jsd = np.clip(np.add.reduceat(terms, starts, axis=-1) / 2, 0.0, 1.0)
    out[..., rows, 0] = np.where(usable, jsd, np.nan)
    out[..., rows, 1] = np.where(live, sum_abs, np.nan)
    out[..., rows, 2] = np.where(live, max_abs, np.nan)
    out[..., rows, 3] = np.where(live, sum_abs, np.nan)
    out[..., rows, 4] = cells
    return out


# -- the result ------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """What :func:`compare` found: one :class:`xarray.Dataset` per site, and the ranking.

    Each site's Dataset holds the per-head summaries (:data:`SUMMARIES`, on the site's ``layer``
    and ``head`` dimensions) and, unless ``rows=False`` was passed, the per-row ``jsd`` and ``l1``
    on the site's leading dimensions and ``query``; with ``maps=True`` also ``difference``
    (``B - A``, lazy, on every dimension). Attributes say what A and B are and the JSD's units.

    Examples
    --------
    >>> import attnformat
    >>> result = compare(attnformat.example_path("steps"), step_a=100, step_b=300)
    >>> result.sites
    ['trunk/iga']
    >>> result.dataset()["mean_jsd"].dims
    ('layer', 'head')
    """

    a: str
    b: str
    variable: str
    datasets: dict[str, xr.Dataset]
    notes: list[str] = field(default_factory=list)

    @property
    def sites(self) -> list[str]:
        """The sites compared, in file order."""
        return list(self.datasets)

    @property
    def rank_by(self) -> str:
        """The summary that ranks heads: ``mean_jsd`` for weights, ``mean_abs_diff`` otherwise."""
        return "mean_jsd" if self.variable == "weights" else "mean_abs_diff"

    def dataset(self, site: str | None = None) -> xr.Dataset:
        """The Dataset of ``site`` (or of the only site compared).

        Parameters
        ----------
        site : str, optional
            A site compared; may be left out when only one was.

        Examples
        --------
        >>> import attnformat
        >>> path = attnformat.example_path("dense")
        >>> float(compare(path, path).dataset()["max_abs_diff"].max())
        0.0
        """
        if site is None:
            if len(self.datasets) != 1:
                raise SelectionError(f"{self.a} vs {self.b}: {len(self.datasets)} sites compared; name one of: {', '.join(self.datasets)}")
            return next(iter(self.datasets.values()))
        key = site.strip("/")
        if key not in self.datasets:
            raise SelectionError(f"{self.a} vs {self.b}: no site {site!r} compared; sites: {', '.join(self.datasets) or '(none)'}")
        return self.datasets[key]

    def heads(self) -> list[dict]:
        """Every head of every site with its summaries, in file order (NaN as None).

        Examples
        --------
        >>> import attnformat
        >>> heads = compare(attnformat.example_path("steps"), step_a=100, step_b=200).heads()
        >>> sorted(heads[0])[:4]
        ['head', 'layer', 'max_abs_diff', 'max_jsd']
        """
        listed = []
        for site, dataset in self.datasets.items():
            dims = [dim for dim in ("layer", "head") if dim in dataset.dims]
            shape = [dataset.sizes[dim] for dim in dims]
            for index in np.ndindex(*shape):
                where = dict(zip(dims, index))
                entry: dict[str, Any] = {"site": site}
                for dim, position in where.items():
                    entry[dim] = _plain(dataset[dim].values[position])
                for name in SUMMARIES:
                    if name in dataset:
                        entry[name] = _plain(dataset[name].values[index] if dims else dataset[name].values)
                listed.append(entry)
        return listed

    def top(self, n: int | None = 10, by: str | None = None) -> list[dict]:
        """The ``n`` heads that changed most (all with ``n=None``), largest ``by`` first.

        Parameters
        ----------
        n : int or None, default 10
            How many heads.
        by : str, optional
            A summary name (:data:`SUMMARIES`); :attr:`rank_by` by default. Heads without a value
            (no row compared) come last.

        Examples
        --------
        >>> import attnformat
        >>> best = compare(attnformat.example_path("steps"), step_a=100, step_b=300).top(2)
        >>> len(best), best[0]["mean_jsd"] >= best[1]["mean_jsd"]
        (2, True)
        """
        by = by or self.rank_by
        if by not in SUMMARIES:
            raise AttnFormatError(f"cannot rank heads by {by!r}; use one of: {', '.join(SUMMARIES)}")
        heads = [head for head in self.heads() if by in head]
        heads.sort(key=lambda head: (head[by] is None, -(head[by] or 0.0)))
        return heads if n is None else heads[: max(int(n), 0)]

    def to_dict(self, top: int | None = 10) -> dict:
        """A JSON-able summary: inputs, units, per site the dimensions and every head, the ranking.

        Parameters
        ----------
        top : int or None, default 10
            How many heads the ``top`` ranking lists (all with None); ``sites`` always lists every head.

        Examples
        --------
        >>> import attnformat, json
        >>> summary = compare(attnformat.example_path("steps"), step_a=100, step_b=300).to_dict()
        >>> summary["jsd"]["units"], len(json.dumps(summary)) > 0
        ('bits', True)
        """
        sites = {}
        for site, dataset in self.datasets.items():
            sites[site] = {
                "dims": {dim: int(size) for dim, size in dataset.attrs["compared_dims"].items()},
                "rows_compared": int(dataset["rows"].sum()),
                "rows_excluded": int(dataset.attrs["rows_total"] - dataset["rows"].sum()),
                "heads": [{k: v for k, v in head.items() if k != "site"} for head in self.heads() if head["site"] == site],
            }
        return {
            "a": self.a,
            "b": self.b,
            "variable": self.variable,
            "difference": "B - A",
            "jsd": {"units": "bits", "base": JSD_BASE, "range": [0, 1],
                    "definition": "Jensen-Shannon divergence (not distance) per query row; padding, "
                                  "NaN and empty rows excluded, never counted as 0"} if self.variable == "weights" else None,
            "summaries": {name: SUMMARY_DOCS[name] for name in SUMMARIES},
            "rank_by": self.rank_by,
            "sites": sites,
            "top": self.top(top),
            "notes": list(self.notes),
        }


def _plain(value):
    """A NumPy scalar as a JSON-able Python value (NaN -> None)."""
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.ndarray):
        return _plain(value[()])
    return value


# -- opening and checking ---------------------------------------------------------------------------


def _open(source, storage_options, *, chunked: bool = False):
    """The tree of ``source``; ``chunked``: dask-backed, one dask chunk per stored chunk.

    One dask chunk per stored chunk (not merged to dask's 128 MiB) keeps a block's float64
    working copies small, and each stored chunk is read once, through the engine's checked road,
    in whichever process (or cluster worker) computes it.
    """
    if isinstance(source, xr.DataTree):
        tree = source.root if source.parent is not None else source
        if chunked and "location" in tree.encoding and not _is_dask(tree):
            from attnformat.compute import chunked as dask_backed

            return dask_backed(tree, "stored")
        return tree
    from attnformat.reading import open as open_tree

    return open_tree(source, storage_options=storage_options, chunks="stored" if chunked else None)


def _is_dask(tree) -> bool:
    return any(variable.chunks is not None for node in tree.subtree for variable in node.dataset.data_vars.values())


def _name(tree) -> str:
    return str(tree.root.encoding.get("source", "<in-memory tree>"))


def _comparable_sites(tree, variable: str) -> tuple[list[str], list[str]]:
    """(dense and edge sites holding ``variable``, notes on the sites left out) in file order."""
    from attnformat.reading import site_paths

    kept, notes = [], []
    for path in site_paths(tree):
        node = tree[path]
        layout = node.attrs.get("layout")
        if layout not in COMPARED_LAYOUTS:
            notes.append(f"{path}: skipped (layout {layout}; dense maps and graph edges are compared)")
        elif variable not in node.data_vars:
            notes.append(f"{path}: skipped (no {variable})")
        else:
            kept.append(path)
    return kept, notes


def _select_step(array: xr.DataArray, step, where: str) -> xr.DataArray:
    if step is None:
        return array
    if "step" not in array.dims:
        raise SelectionError(f"{where}: has no step dimension; step_a/step_b compare steps of a file that has them")
    index = array.coords["step"].values if "step" in array.coords else None
    return array.isel(step=resolving.position("step", step, size=array.sizes["step"], index=index, where=where))


def _first_difference(a: np.ndarray, b: np.ndarray, dims: tuple[str, ...]) -> str | None:
    """Where two label/mask arrays first differ, as ``sample 1, query 4: 'x' vs 'y'``."""
    if a.shape != b.shape:
        return f"shapes {a.shape} vs {b.shape}"
    unequal = np.asarray(a != b)
    if not unequal.any():
        return None
    index = tuple(int(i) for i in np.argwhere(unequal)[0])
    place = ", ".join(f"{dim} {i}" for dim, i in zip(dims, index))
    return f"{place}: {_shown(a[index])} (A) vs {_shown(b[index])} (B)"


def _shown(value) -> str:
    value = value.item() if isinstance(value, np.generic) else value
    return repr(value if not isinstance(value, bytes) else value.decode("utf-8", "replace"))


def _check(where: str, site_a, site_b, a: xr.DataArray, b: xr.DataArray, variable: str, allow_label_mismatch: bool) -> None:
    if a.dims != b.dims or a.shape != b.shape:
        shown = lambda array: ", ".join(f"{d}={s}" for d, s in zip(array.dims, array.shape))  # noqa: E731
        raise AttnFormatError(f"{where}: {variable} dimensions differ: ({shown(a)}) vs ({shown(b)}); only maps of the same shape compare")
    for dim in a.dims:
        if dim in ("query", "key") or dim not in a.coords or dim not in b.coords:
            continue
        problem = _first_difference(np.asarray(a.coords[dim].values), np.asarray(b.coords[dim].values), (dim,))
        if problem:
            raise AttnFormatError(f"{where}: {dim} coordinates differ at {problem}")
    for name in ("source", "target"):  # graph structure: edge-wise comparison needs the same edges
        if name in site_a.coords or name in site_b.coords:
            problem = (_first_difference(np.asarray(site_a.coords[name].values), np.asarray(site_b.coords[name].values), ("edge",))
                       if name in site_a.coords and name in site_b.coords else f"{name} is only in {'A' if name in site_a.coords else 'B'}")
            if problem:
                raise AttnFormatError(f"{where}: the graphs differ: {name} at {problem}; edges are compared one to one")
    if allow_label_mismatch:
        return
    for name in [*(LABEL_COORDS[d] for d in ("query", "key", "node")), *MASK_COORDS.values()]:
        in_a, in_b = name in site_a.coords, name in site_b.coords
        if in_a != in_b:
            raise AttnFormatError(f"{where}: {name} is only in {'A' if in_a else 'B'}; pass allow_label_mismatch=True "
                                  "(--allow-label-mismatch) to compare anyway")
        if not in_a:
            continue
        problem = _first_difference(np.asarray(site_a.coords[name].values), np.asarray(site_b.coords[name].values),
                                    site_a.coords[name].dims)
        if problem:
            raise AttnFormatError(f"{where}: {name} differs first at {problem}; pass allow_label_mismatch=True "
                                  "(--allow-label-mismatch) to compare anyway")


def _keep(site_a, site_b, dim: str) -> xr.DataArray | None:
    """Real (not padding) tokens along ``dim`` in both sites, or None when every token is real."""
    name = MASK_COORDS[dim]
    masks = [site.coords[name].variable.load() for site in (site_a, site_b) if name in site.coords]
    if not masks:
        return None
    keep = xr.DataArray(masks[0].astype(bool))
    for other in masks[1:]:
        keep = keep & xr.DataArray(other.astype(bool))
    return None if bool(keep.all()) else keep


# -- computing ------------------------------------------------------------------------------------


def _block_chunks(array: xr.DataArray) -> dict[str, int]:
    """Blocks for an array that is not dask-backed yet: its stored chunks when it says them
    (``preferred_chunks``), else one map of all heads per block; whole rows always."""
    from attnformat.compute import stored_chunk_shape

    stored = stored_chunk_shape(array.variable)
    if stored is None:
        sizes = {dim: (array.sizes[dim] if dim in ("head", "time", "node", "query", "key", "edge") else 1) for dim in array.dims}
    else:
        sizes = dict(zip(array.dims, stored))
    chunks = {dim: min(max(int(sizes[dim]), 1), array.sizes[dim]) for dim in array.dims if array.sizes[dim]}
    whole = "key" if "key" in array.dims else "edge"
    chunks[whole] = array.sizes[whole]  # a row's divergence needs the whole row
    return chunks


def _lazy(array: xr.DataArray) -> xr.DataArray:
    """``array`` as dask blocks of whole rows (stored chunks never hold part of a row, so this
    only rechunks arrays a caller chunked otherwise); a graph's edges are kept in one block."""
    whole = "key" if "key" in array.dims else "edge"
    if array.chunks is not None:
        return array.chunk({whole: -1}) if len(array.chunks[array.dims.index(whole)]) > 1 else array
    return array.chunk(_block_chunks(array))


def compare(
    a,
    b=None,
    *,
    site: str | None = None,
    variable: str = "weights",
    step_a=None,
    step_b=None,
    allow_label_mismatch: bool = False,
    rows: bool = True,
    maps: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    scheduler=None,
    progress: bool | None = None,
) -> Comparison:
    """Compare two attention files (or two steps of one) per site, layer and head.

    Parameters
    ----------
    a, b : str, os.PathLike or xarray.DataTree
        The two files (paths, URLs or opened trees): the result is about ``B - A``. Without
        ``b``, ``a`` is compared with itself, which is what comparing two steps needs.
    site : str, optional
        Compare this site only (it must be in both); by default every dense site holding
        ``variable``, and both sides must hold the same ones.
    variable : str, default "weights"
        ``weights`` (differences and JSD), ``logits`` or ``bias`` (differences only).
    step_a, step_b : int or label, optional
        Compare step ``step_a`` of A with step ``step_b`` of B (a label of the ``step``
        coordinate, else a position).
    allow_label_mismatch : bool, default False
        Compare even when token labels or padding masks differ (tokens padded in either side
        are then left out); by default the first difference is an error.
    rows : bool, default True
        Keep the per-row ``jsd`` and ``l1`` in the Datasets (the size of the files divided by
        the key length); False keeps the per-head summaries only.
    maps : bool, default False
        Add ``difference`` (``B - A`` on every dimension, lazy: dask) to the Datasets.
    storage_options : mapping, optional
        fsspec options for URLs (both inputs).
    scheduler : optional
        ``"threads"`` (default: every core), ``"processes"``, ``"synchronous"``, a
        ``dask.distributed.Client`` or a scheduler address (``tcp://HOST:8786``).
    progress : bool, optional
        A progress bar on stderr (default: when stderr is a terminal).

    Returns
    -------
    Comparison

    Raises
    ------
    attnformat.AttnFormatError
        If the two are not comparable (sites, dimensions, coordinates or labels differ); the
        message names the first difference.

    Examples
    --------
    >>> import attnformat
    >>> result = compare(attnformat.example_path("steps"), step_a=100, step_b=300)
    >>> top = result.top(1)[0]
    >>> sorted(top)[:3], 0 <= top["mean_jsd"] <= 1
    (['head', 'layer', 'max_abs_diff'], True)
    """
    from attnformat.compute import run

    tree_a = _open(a, storage_options, chunked=True)
    tree_b = tree_a if b is None or b is a else _open(b, storage_options, chunked=True)
    file_a, file_b = _name(tree_a), _name(tree_b)
    name_a = file_a + (f" step {step_a}" if step_a is not None else "")
    name_b = file_b + (f" step {step_b}" if step_b is not None else "")
    where = f"{name_a} vs {name_b}"
    sites_a, notes = _comparable_sites(tree_a, variable)
    sites_b, _ = _comparable_sites(tree_b, variable)
    if site is not None:
        key = site.strip("/")
        for name, tree, sites in (("A", tree_a, sites_a), ("B", tree_b, sites_b)):
            if key not in sites:
                from attnformat.reading import get_site

                get_site(tree, key)  # names the sites there are when it is not a site at all
                raise SelectionError(f"{_name(tree)}: site {key} of {name} is not a dense site holding {variable}")
        chosen = [key]
        notes = []
    else:
        for site_name in sites_a:
            if site_name not in sites_b:
                raise AttnFormatError(f"{where}: site {site_name} (holding {variable}) is in A only; pass site= to compare one site")
        for site_name in sites_b:
            if site_name not in sites_a:
                raise AttnFormatError(f"{where}: site {site_name} (holding {variable}) is in B only; pass site= to compare one site")
        if not sites_a:
            skipped = f" ({'; '.join(notes)})" if notes else ""
            raise SelectionError(f"{name_a}: no dense site holds {variable!r}; nothing to compare{skipped}")
        chosen = sites_a

    plans = []
    for site_name in chosen:
        node_a, node_b = tree_a[site_name], tree_b[site_name]
        here = f"{where}: {site_name}"
        array_a = _select_step(node_a[variable], step_a, f"{file_a}, site {site_name}")
        array_b = _select_step(node_b[variable], step_b, f"{file_b}, site {site_name}")
        _check(here, node_a, node_b, array_a, array_b, variable, allow_label_mismatch)
        lazy_a, lazy_b = _lazy(array_a), _lazy(array_b.drop_vars(list(array_b.coords)))
        lazy_b = lazy_b.assign_coords({name: lazy_a.coords[name] for name in lazy_a.coords if set(lazy_a.coords[name].dims) <= set(lazy_b.dims)})
        key_keep = _keep(node_a, node_b, "key")
        query_keep = _keep(node_a, node_b, "query")
        if key_keep is not None:
            lazy_a, lazy_b = lazy_a.where(key_keep), lazy_b.where(key_keep)
        if "edge" in lazy_a.dims:
            node_dim = node_a.attrs.get("edge_node_dim", "node")
            nodes = node_a.sizes.get(node_dim) or int(np.max(node_a.coords["target"].values, initial=-1)) + 1
            stats = xr.apply_ufunc(
                _edge_row_stats, lazy_a.variable, lazy_b.variable,
                kwargs={"target": np.asarray(node_a.coords["target"].values), "nodes": nodes},
                input_core_dims=[["edge"], ["edge"]], output_core_dims=[[node_dim, "statistic"]],
                dask="parallelized", output_dtypes=[np.float64],
                dask_gufunc_kwargs={"output_sizes": {node_dim: nodes, "statistic": len(_ROW_STATS)}},
            )
        else:
            stats = xr.apply_ufunc(
                _row_stats, lazy_a.variable, lazy_b.variable,
                input_core_dims=[["key"], ["key"]], output_core_dims=[["statistic"]],
                dask="parallelized", output_dtypes=[np.float64],
                dask_gufunc_kwargs={"output_sizes": {"statistic": len(_ROW_STATS)}},
            )
        stats = xr.DataArray(stats, coords={name: lazy_a.coords[name] for name in lazy_a.coords
                                            if not {"key", "edge"} & set(lazy_a.coords[name].dims)})
        if query_keep is not None:
            stats = stats.where(query_keep)
        per_row = {name: stats.isel(statistic=i, drop=True) for i, name in enumerate(_ROW_STATS)}
        head_dims = [dim for dim in ("layer", "head") if dim in stats.dims]
        over = [dim for dim in per_row["jsd"].dims if dim not in head_dims]
        with np.errstate(invalid="ignore", divide="ignore"):
            summaries = {
                "max_abs_diff": per_row["max_abs"].max(over),
                "mean_abs_diff": per_row["sum_abs"].sum(over) / (cells := per_row["cells"].sum(over)).where(cells > 0),
                "mean_l1": per_row["l1"].mean(over),
                "max_l1": per_row["l1"].max(over),
            }
            if variable == "weights":
                summaries = {"mean_jsd": per_row["jsd"].mean(over), "max_jsd": per_row["jsd"].max(over),
                             "rows": per_row["jsd"].count(over), **summaries}
            else:
                summaries["rows"] = per_row["l1"].count(over)
        kept_rows = {}
        if rows:
            if variable == "weights":
                kept_rows["jsd"] = per_row["jsd"].astype(np.float32)
            kept_rows["l1"] = per_row["l1"].astype(np.float32)
        rows_total = int(np.prod([size for d, size in stats.sizes.items() if d != "statistic"]))
        plans.append((site_name, array_a, lazy_a, lazy_b, summaries, kept_rows, rows_total))

    # One computation for every site and output, so that each block of each file is read once;
    # flattened to a list of arrays, which every scheduler (a distributed client too) takes.
    order = [(index, kind, name) for index, (*_, summaries, kept_rows, _) in enumerate(plans)
             for kind, outputs in (("summaries", summaries), ("rows", kept_rows)) for name in outputs]
    arrays = [plans[index][4 if kind == "summaries" else 5][name] for index, kind, name in order]
    values = run(arrays, scheduler=scheduler, progress=progress)
    computed = [({}, {}) for _ in plans]
    for (index, kind, name), value in zip(order, values):
        computed[index][0 if kind == "summaries" else 1][name] = value
    datasets = {}
    for (site_name, array_a, lazy_a, lazy_b, _, _, rows_total), (summaries, kept_rows) in zip(plans, computed):
        variables = {name: summaries[name] for name in SUMMARIES if name in summaries}
        variables.update(kept_rows)
        dataset = xr.Dataset(variables)
        # A scalar coordinate left by a selection (A's step) would mislabel a comparison of two steps.
        dataset = dataset.drop_vars([name for name in dataset.coords if dataset.coords[name].ndim == 0])
        for name in SUMMARIES:
            if name in dataset:
                dataset[name].attrs["description"] = SUMMARY_DOCS[name]
        if "jsd" in dataset:
            dataset["jsd"].attrs.update(units="bits", description="Jensen-Shannon divergence of each query row (NaN: not compared)")
        if "l1" in dataset:
            dataset["l1"].attrs["description"] = "sum over keys of |B - A| of each query row (NaN: not compared)"
        if maps:
            dataset["difference"] = (lazy_b - lazy_a).drop_vars([c for c in lazy_a.coords if c not in lazy_a.dims], errors="ignore")
            dataset["difference"].attrs["description"] = f"{variable} of B minus {variable} of A"
        dataset.attrs.update(a=name_a, b=name_b, site=site_name, variable=variable, difference="B - A",
                             jsd_units="bits" if variable == "weights" else "none", rows_total=rows_total,
                             compared_dims={dim: int(size) for dim, size in array_a.sizes.items()})
        datasets[site_name] = dataset
    return Comparison(name_a, name_b, variable, datasets, notes)


# -- one difference map ------------------------------------------------------------------------------


def difference(a, b=None, *, site: str | None = None, variable: str = "weights", step_a=None, step_b=None,
               allow_label_mismatch: bool = False, storage_options: Mapping[str, Any] | None = None,
               **selectors) -> xr.Dataset:
    """One map of ``B - A`` (and both maps), read with one slice read per file, padding left out.

    Parameters
    ----------
    a, b : str, os.PathLike or xarray.DataTree
        The two files; without ``b``, two steps of ``a`` (``step_a``, ``step_b``).
    site : str, optional
        Site path; the only site holding ``variable`` otherwise.
    variable : str, default "weights"
        The variable compared.
    step_a, step_b : int or label, optional
        Steps of A and B.
    allow_label_mismatch : bool, default False
        Compare even when token labels differ (A's labels are kept).
    storage_options : mapping, optional
        fsspec options for URLs.
    **selectors
        ``layer``, ``head``, ``sample``, ``step``, ``time``, ``node``: a label or a position for
        every leading dimension with more than one value (0 otherwise).

    Returns
    -------
    xarray.Dataset
        ``difference`` (B - A), ``a`` and ``b`` on ``(query, key)`` with ``query_label`` and
        ``key_label``; ``jsd`` (bits) and ``l1`` per query row for weights; attributes name the
        selection.

    Examples
    --------
    >>> import attnformat
    >>> path = attnformat.example_path("steps")
    >>> one = difference(path, step_a=100, step_b=300, layer=1, head=0)
    >>> one["difference"].dims, one.attrs["selection"]
    (('query', 'key'), 'layer 1 | head 0')
    """
    unknown = set(selectors) - set(LEADING_DIMS)
    if unknown:
        raise SelectionError(f"difference: unknown selector(s) {', '.join(sorted(unknown))}; use {', '.join(LEADING_DIMS)}")
    tree_a = _open(a, storage_options)
    tree_b = tree_a if b is None else _open(b, storage_options)
    name_a, name_b = _name(tree_a), _name(tree_b)
    if site is None:
        sites, _ = _comparable_sites(tree_a, variable)
        if len(sites) != 1:
            raise SelectionError(f"{name_a}: {len(sites)} dense sites hold {variable}; name one of: {', '.join(sites) or '(none)'}")
        site = sites[0]
    site = site.strip("/")
    from attnformat.reading import get_site

    node_a, node_b = get_site(tree_a, site), get_site(tree_b, site)
    if variable not in node_a.data_vars or variable not in node_b.data_vars:
        raise SelectionError(f"{name_a if variable not in node_a.data_vars else name_b}: site {site} holds no {variable}")
    array_a = _select_step(node_a[variable], step_a, f"{name_a}, site {site}")
    array_b = _select_step(node_b[variable], step_b, f"{name_b}, site {site}")
    where = f"{name_a} vs {name_b}: {site}"
    _check(where, node_a, node_b, array_a, array_b, variable, allow_label_mismatch)
    positions, shown = {}, []
    for dim in array_a.dims:
        if dim in ("query", "key", "edge"):
            continue
        value = selectors.get(dim)
        if value is None and (dim != "step" or (step_a is None and step_b is None)):
            if array_a.sizes[dim] > 1 and dim not in ("sample",):
                raise SelectionError(f"{where}: choose a {dim} ({dim}=...); the site has {array_a.sizes[dim]}")
            value = 0
        index = array_a.coords[dim].values if dim in array_a.coords else None
        positions[dim] = resolving.position(dim, value, size=array_a.sizes[dim], index=index, where=f"{name_a}, site {site}")
        label = index[positions[dim]] if index is not None else positions[dim]
        shown.append(f"{dim} {_plain(label)}")
    sample = positions.get("sample")
    map_a = np.asarray(array_a.isel(positions).values, dtype=np.float64)
    map_b = np.asarray(array_b.isel(positions).values, dtype=np.float64)
    if "edge" in array_a.dims:
        return _edge_difference(node_a, map_a, map_b, variable, attrs={
            "a": name_a, "b": name_b, "site": site, "variable": variable, "selection": " | ".join(shown),
            "difference": "B - A", "layout": "edge", "step_a": _plain(step_a) if step_a is not None else "",
            "step_b": _plain(step_b) if step_b is not None else ""})
    keep = {}
    for dim in ("query", "key"):
        mask = _keep(node_a, node_b, dim)
        if mask is not None and "sample" in mask.dims:
            mask = mask.isel(sample=sample or 0)
        keep[dim] = np.ones(array_a.sizes[dim], bool) if mask is None else np.asarray(mask.values, bool)
    map_a, map_b = map_a[keep["query"]][:, keep["key"]], map_b[keep["query"]][:, keep["key"]]
    labels = {}
    for dim in ("query", "key"):
        name = LABEL_COORDS[dim]
        if name in node_a.coords:
            values = node_a.coords[name]
            if "sample" in values.dims:
                values = values.isel(sample=sample or 0)
            labels[dim] = [str(v) for v in np.asarray(values.values)[keep[dim]]]
        else:
            labels[dim] = [str(i) for i in np.flatnonzero(keep[dim])]
    coords = {"query_label": ("query", labels["query"]), "key_label": ("key", labels["key"])}
    data = {"difference": (("query", "key"), map_b - map_a), "a": (("query", "key"), map_a), "b": (("query", "key"), map_b)}
    stats = _row_stats(map_a, map_b)
    if variable == "weights":
        data["jsd"] = (("query",), stats[:, 0])
    data["l1"] = (("query",), stats[:, 1])
    result = xr.Dataset(data, coords=coords)
    result.attrs.update(a=name_a, b=name_b, site=site, variable=variable, selection=" | ".join(shown),
                        difference="B - A", layout="dense", step_a=_plain(step_a) if step_a is not None else "",
                        step_b=_plain(step_b) if step_b is not None else "")
    return result


def _edge_difference(node, edges_a: np.ndarray, edges_b: np.ndarray, variable: str, attrs: dict) -> xr.Dataset:
    """One graph's edges as (target node, source node) maps, NaN where there is no edge."""
    node_dim = node.attrs.get("edge_node_dim", "node")
    source = np.asarray(node.coords["source"].values)
    target = np.asarray(node.coords["target"].values)
    nodes = node.sizes.get(node_dim) or int(max(source.max(initial=-1), target.max(initial=-1))) + 1
    maps = []
    for values in (edges_a, edges_b):
        dense = np.full((nodes, nodes), np.nan)
        dense[target, source] = values
        maps.append(dense)
    name = LABEL_COORDS["node"]
    labels = [str(v) for v in node.coords[name].values] if name in node.coords else [str(i) for i in range(nodes)]
    data = {"difference": (("query", "key"), maps[1] - maps[0]), "a": (("query", "key"), maps[0]),
            "b": (("query", "key"), maps[1])}
    stats = _edge_row_stats(edges_a, edges_b, target, nodes)
    if variable == "weights":
        data["jsd"] = (("query",), stats[:, 0])
    data["l1"] = (("query",), stats[:, 1])
    result = xr.Dataset(data, coords={"query_label": ("query", labels), "key_label": ("key", labels)})
    result.attrs.update(attrs)
    return result
