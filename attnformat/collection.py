"""Many attention files as one: a directory or glob of captures opened as one lazy tree.

A sweep writes one file per prompt, per checkpoint or per rank; :func:`open_many` joins them
along a dimension without reading any map:

* ``dim="sample"``: different inputs (one file per prompt or per rank). Files are concatenated
  along ``sample`` (a file without a ``sample`` dimension is one sample). Samples of different
  lengths are padded to the longest with the spec's padding convention (section 7): maps read
  NaN where a sample has no token, ``query_mask``/``key_mask`` on ``(sample, query|key)`` say
  which tokens are real, and per-token coordinates become per-sample ones (labels padded with
  ``""``, integers with -1). Samples are renumbered ``0..N-1``; ``source_file`` says where each
  came from.
* ``dim="step"``: the same input at several checkpoints. Files are ordered by step (their own
  ``step`` coordinate, or ``coords``, or the last integer in each file name) and concatenated;
  steps must strictly increase [ATTN-COORD-001]. Tokens must agree.
* ``dim="run"`` or any other name: a new outer dimension (runs, seeds, models with the same
  tokens), whose coordinate is each file's name (or ``coords``). Tokens must agree. Such a
  dimension is not an attention dimension: the tree is for computing on (statistics, diffs,
  xarray reductions), not for saving as one attnformat file.

Every file is opened with :func:`attnformat.open` (screened and checked exactly as one file
is). Files must agree on everything but the joined dimension: the same sites, layouts, site
attributes, variables and their dimensions, and the same labels of every other leading dimension
(``layer``, ``head``...). The first file that differs is named in a one-line
:class:`~attnformat.errors.CollectionError` saying what differs. Padding is only done along
``sample``: along ``step`` or a run dimension different token counts mean different inputs and
are refused.

Values stay in the files: each joined variable is a lazy array over the files' own lazy variables
(read through each file's engine, checked as one file's reads are), so selecting one sample reads
one file, and ``chunks=`` gives dask arrays in whole stored chunks for computing in parallel.
Memory holds the metadata and small coordinates of every file and one open directory descriptor
per ``.zarr`` file (see ``benchmarks/bench_collection.py`` for 2,000 files).
"""

from __future__ import annotations

import glob as globbing
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

from attnformat.conventions import LEADING_DIMS, ROOT_COMPLETENESS, is_site
from attnformat.errors import CollectionError, UnreadableFileError

#: Suffixes of the files a directory is searched for.
FILE_SUFFIXES = (".zarr", ".zarr.zip", ".h5", ".nc")
#: The dimensions padded along ``sample`` when samples differ in length.
TOKEN_DIMS = ("query", "key")
#: Site attributes that follow the token counts (and are the largest one after padding).
_SIZE_ATTRS = {"key_count": "key"}


def collection_paths(source) -> list[str]:
    """The files a collection is made of: a list as given, a directory's attention files, or a glob.

    A directory lists its entries ending in ``.zarr``, ``.zarr.zip``, ``.h5`` or ``.nc``
    (partial stores ``*.partial.zarr`` left by a running writer are left out), sorted by name; a
    glob pattern is expanded and sorted the same way. URLs are taken as given (in a list).

    Parameters
    ----------
    source
        A directory, a glob pattern (``"runs/*.zarr"``), one path, or a sequence of paths.

    Returns
    -------
    list of str

    Examples
    --------
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("b.zarr", "a.h5", "notes.txt"):
    ...     _ = (folder / name).write_text("")
    >>> [pathlib.Path(p).name for p in collection_paths(folder)]
    ['a.h5', 'b.zarr']
    """
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if "://" in text:
            return [text]
        if os.path.isdir(text) and not _is_attention_file(text):
            names = sorted(os.listdir(text))
            return [os.path.join(text, name) for name in names if _is_attention_file(name)]
        if globbing.has_magic(text):
            found = sorted(path for path in globbing.glob(text) if _is_attention_file(path))
            if not found:
                raise UnreadableFileError(f"{text}: no attention file matches")
            return found
        return [text]
    paths = [os.fspath(path) if not hasattr(path, "text") else path for path in source]
    return paths


def _is_attention_file(name: str) -> bool:
    name = os.fspath(name).rstrip("/")
    return name.endswith(FILE_SUFFIXES) and not name.endswith(".partial.zarr")


def open_many(
    source,
    *,
    dim: str = "sample",
    coords: Sequence | None = None,
    chunks: Mapping | None = None,
    storage_options: Mapping | None = None,
) -> xr.DataTree:
    """Open many attention files as one lazy :class:`xarray.DataTree`, joined along ``dim``.

    Parameters
    ----------
    source
        A directory (its ``.zarr``, ``.zarr.zip``, ``.h5`` and ``.nc`` entries), a glob pattern
        (``"runs/*.zarr"``), or a sequence of paths or URLs, in the order to join them.
    dim : str, default "sample"
        ``"sample"`` (different inputs: concatenated, shorter samples padded and masked),
        ``"step"`` (checkpoints of one input: concatenated in step order) or a new dimension's
        name such as ``"run"`` (same inputs, outer dimension labelled by file name).
    coords : sequence, optional
        One label per file for the joined dimension: steps for ``dim="step"`` (when the files
        have no ``step`` of their own), run names for a new dimension. Not used for ``sample``.
    chunks : mapping or str, optional
        Make the joined variables dask arrays, as ``attnformat.open(chunks=...)`` does for one
        file (``"auto"``, ``"stored"`` or ``{dim: size}``), in whole stored chunks and file by file
        along the joined dimension. By default they are lazy arrays without dask, like one file's:
        a selection reads the files it covers, nothing else.
    storage_options : mapping, optional
        fsspec options for URLs, as for :func:`attnformat.open`.

    Returns
    -------
    xarray.DataTree
        Root attributes of the first file (those every file shares), ``completeness``
        ``"complete"`` only if every file is; ``encoding["sources"]`` lists the files.

    Raises
    ------
    attnformat.errors.CollectionError
        If the files disagree (the message names the first file that differs and what differs).
    attnformat.errors.UnreadableFileError
        If a file cannot be opened (as :func:`attnformat.open`), or nothing matches.

    Examples
    --------
    >>> import shutil, tempfile, pathlib, attnformat
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> for prompt in range(3):
    ...     _ = shutil.copytree(attnformat.example_path("dense"), folder / f"prompt{prompt}.zarr")
    >>> tree = open_many(folder, dim="sample")
    >>> tree["encoder/self"]["weights"].sizes["sample"], list(tree["encoder/self"]["source_file"].values)
    (3, ['prompt0.zarr', 'prompt1.zarr', 'prompt2.zarr'])
    >>> runs = open_many(sorted(folder.glob("*.zarr")), dim="run", coords=["a", "b", "c"])
    >>> float(runs["encoder/self"]["weights"].sel(run="b", layer=0, head=0).sum(["key"]).mean())
    1.0
    """
    from attnformat.reading import open as open_file

    paths = collection_paths(source)
    if not paths:
        raise UnreadableFileError(f"{source}: no attention file (.zarr, .zarr.zip, .h5, .nc) found")
    if not isinstance(dim, str) or not dim.isidentifier():
        raise CollectionError(f"dim must be a dimension name such as 'sample', 'step' or 'run', not {dim!r}")
    if dim in LEADING_DIMS and dim not in ("sample", "step"):
        raise CollectionError(f"cannot join files along {dim!r}: join along 'sample', 'step' or a new dimension such as 'run'")
    if coords is not None and len(coords) != len(paths):
        raise CollectionError(f"coords has {len(coords)} labels for {len(paths)} files")
    if coords is not None and dim == "sample":
        raise CollectionError("coords is not used with dim='sample' (samples are numbered 0..N-1; source_file names each one's file)")
    _make_room_for(paths)
    opener = _opener(open_file, storage_options)
    files = [_File.open(path, opener) for path in paths]
    names = [_display_name(path) for path in paths]
    labels = _labels(dim, files, names, coords)
    if dim == "step":
        order = sorted(range(len(files)), key=lambda i: labels[i][0])
        files, names, labels = [files[i] for i in order], [names[i] for i in order], [labels[i] for i in order]
        _check_steps(files, labels)
    first = files[0]
    for other in files[1:]:
        _check_same_sites(first, other)
    datasets = {}
    for site in first.sites:
        datasets["/" + site] = _join_site(site, [f.sites[site] for f in files], files, names, labels, dim, coords is not None)
    for group, attrs in first.groups.items():
        datasets.setdefault(group, xr.Dataset(attrs=attrs))
    datasets["/"] = xr.Dataset(attrs=_root_attrs([f.root_attrs for f in files]))
    tree = xr.DataTree.from_dict(datasets)
    encoding = {"source": _collection_text(files), "sources": [f.source for f in files], "collection_dim": dim}
    tree.encoding = encoding
    if chunks is not None:
        tree = _chunked(tree, chunks)
        tree.encoding = encoding
    return tree


def _chunked(tree: xr.DataTree, chunks) -> xr.DataTree:
    """The joined tree with dask arrays aligned with the files' stored chunks (attnformat.compute)."""
    try:
        from attnformat.compute import chunked
    except ImportError:  # without the compute module: dask's own chunking of the lazy arrays
        return tree.map_over_datasets(lambda ds: ds.chunk(dict(chunks)) if ds.data_vars else ds)
    return chunked(tree, chunks)


def _make_room_for(paths) -> None:
    """Raise the soft limit of open descriptors if the files need more than it allows.

    Each open ``.zarr`` directory keeps one descriptor (its pin, so that a writer replacing it
    never mixes versions under a reader); 2,000 files need 2,000 descriptors, above the usual
    soft limit of 1,024 but below the usual hard limit.
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = len(paths) + 256  # and the descriptors everything else uses
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    limit = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    except (ValueError, OSError):
        limit = soft
    if limit < needed:
        raise CollectionError(f"{len(paths)} files need about {needed} open file descriptors, but this process may open {limit} "
                              "(ulimit -n); raise the limit or open fewer files at once")


def _opener(open_file, storage_options):
    # Files are opened lazily without dask: the joined arrays read each file's part through its
    # own lazy variables (one read per file a selection touches, never a graph per map).
    def opener(path):
        return open_file(path, storage_options=storage_options)

    return opener


class _File:
    """What one file contributes: its sites' datasets (dask-backed), groups and root attributes."""

    __slots__ = ("source", "sites", "groups", "root_attrs")

    def __init__(self, source, sites, groups, root_attrs):
        self.source, self.sites, self.groups, self.root_attrs = source, sites, groups, root_attrs

    @classmethod
    def open(cls, path, opener) -> _File:
        tree = opener(path)
        source = str(tree.encoding.get("source", path))
        sites, groups = {}, {}
        for node in tree.subtree:
            key = node.path.lstrip("/")
            if not key:
                continue
            if is_site(node.attrs):
                sites[key] = node.to_dataset(inherit=False)
            elif not any(key.startswith(s + "/") for s in sites):
                groups[node.path] = dict(node.attrs)
        return cls(source, sites, groups, dict(tree.attrs))


def _display_name(path) -> str:
    text = str(getattr(path, "text", path)).rstrip("/")
    return text.rsplit("/", 1)[-1]


def _labels(dim: str, files, names, coords) -> list:
    """Each file's labels along ``dim`` (a list per file)."""
    if dim == "sample":
        return [[None] * _count(f, "sample") for f in files]
    if dim == "step":
        with_steps = [_file_steps(f) for f in files]
        if all(steps is not None for steps in with_steps):
            if coords is not None:
                raise CollectionError(f"{files[0].source}: the files hold their own steps; coords= gives the steps of files without a step dimension")
            return with_steps
        if any(steps is not None for steps in with_steps):
            i = next(i for i, s in enumerate(with_steps) if (s is None) != (with_steps[0] is None))
            raise CollectionError(f"{files[i].source}: {'has' if with_steps[i] is not None else 'has no'} step dimension, "
                                  f"unlike {files[0].source}; all files need their own steps, or none and coords=")
        if coords is None:
            numbers = [re.findall(r"\d+", name) for name in names]
            missing = next((i for i, n in enumerate(numbers) if not n), None)
            if missing is not None:
                raise CollectionError(f"{files[missing].source}: no step dimension and no number in the file name; "
                                      "give coords=[step of each file]")
            coords = [int(n[-1]) for n in numbers]
        return [[int(c)] for c in coords]
    return [[c] for c in (coords if coords is not None else names)]


def _count(f: _File, dim: str) -> int:
    sizes = {ds.sizes.get(dim, 1) for ds in f.sites.values()}
    if len(sizes) > 1:
        raise CollectionError(f"{f.source}: its sites have different numbers of {dim}s ({sorted(sizes)}); cannot join them")
    return sizes.pop() if sizes else 1


def _file_steps(f: _File):
    steps = [tuple(ds["step"].values.tolist()) for ds in f.sites.values() if "step" in ds.dims]
    if not steps:
        return None
    if len(set(steps)) > 1:
        raise CollectionError(f"{f.source}: its sites hold different steps; cannot join them along step")
    return list(steps[0])


def _check_steps(files, labels) -> None:
    previous = None
    for f, steps in zip(files, labels):
        for step in steps:
            if previous is not None and step <= previous:
                raise CollectionError(f"{f.source}: step {step} repeats or comes out of order after step {previous}; "
                                      "steps must strictly increase [ATTN-COORD-001]")
            previous = step


def _check_same_sites(first: _File, other: _File) -> None:
    if sorted(first.sites) != sorted(other.sites):
        missing = sorted(set(first.sites) - set(other.sites))
        extra = sorted(set(other.sites) - set(first.sites))
        what = f"lacks site(s) {', '.join(missing)}" if missing else f"has extra site(s) {', '.join(extra)}"
        raise CollectionError(f"{other.source}: {what} that {first.source} {'has' if missing else 'lacks'}")


def _join_site(site: str, datasets: list[xr.Dataset], files, names, labels, dim: str, labels_given: bool) -> xr.Dataset:
    reference, source0 = datasets[0], files[0].source
    pad = dim == "sample" and any(ds.sizes.get(d) != reference.sizes.get(d) for ds in datasets for d in TOKEN_DIMS)
    sizes = {d: max(ds.sizes.get(d, 0) for ds in datasets) for d in TOKEN_DIMS if d in reference.dims}
    attrs = dict(reference.attrs)
    token_names = [n for n, c in reference.coords.items() if set(c.dims) & set(TOKEN_DIMS)]
    for ds, f in zip(datasets[1:], files[1:]):
        _check_agreement(site, reference, ds, source0, f.source, dim, pad, token_names)
    if pad:
        for name, size_dim in _SIZE_ATTRS.items():
            if name in attrs:
                attrs[name] = sizes[size_dim]
    counts = [len(file_labels) for file_labels in labels]
    total = sum(counts)
    variables = {}
    for name, variable in reference.data_vars.items():
        own = [d for d in variable.dims if d != dim]
        joined_dims = tuple(_dim_order(own + [dim], dim))
        shape = tuple(total if d == dim else sizes.get(d, variable.sizes[d]) if pad else variable.sizes[d] for d in joined_dims)
        parts = [ds[name].variable for ds in datasets]
        data = _JoinedArray(parts, joined_dims, dim, counts, shape, variable.dtype)
        encoding = {}
        preferred = variable.encoding.get("preferred_chunks")
        if preferred:
            # dask chunk plans (attnformat.compute) follow these: file boundaries along the joined dimension
            per_file = counts[0] if len(set(counts)) == 1 else 1
            encoding["preferred_chunks"] = {d: (per_file if d == dim else shape[i] if d in sizes and pad else preferred.get(d, shape[i]))
                                            for i, d in enumerate(joined_dims)}
        variables[name] = xr.Variable(joined_dims, indexing.LazilyIndexedArray(data), dict(variable.attrs), encoding=encoding)
    coords = {n: c.variable for n, c in reference.coords.items() if n not in token_names and n != dim and dim not in c.dims}
    if dim == "sample":
        coords["sample"] = xr.Variable(("sample",), np.arange(total, dtype=np.int64))
    else:
        values = np.asarray([label for file_labels in labels for label in file_labels], dtype=np.int64 if dim == "step" else None)
        coords[dim] = xr.Variable((dim,), values.astype(object) if values.dtype.kind == "U" else values)
    for name, coord in reference.coords.items():
        if dim in coord.dims and name != dim and name not in token_names:
            coords[name] = _joined_coordinate(name, [ds for ds in datasets], dim, files)
    if dim in ("sample", "step") or labels_given:
        coords["source_file"] = xr.Variable((dim,), np.array([n for n, c in zip(names, counts) for _ in range(c)], dtype=object))
    coords.update(_token_coords(datasets, token_names, dim, sizes, pad))
    return xr.Dataset(variables, coords, attrs=attrs)


def _joined_coordinate(name, datasets, dim, files) -> xr.Variable:
    """A coordinate along the joined dimension (per-sample ids, say): the files' values end to end."""
    blocks = []
    for ds, f in zip(datasets, files):
        if name not in ds.coords or dim not in ds[name].dims:
            raise CollectionError(f"{f.source}: has no coordinate {name!r} along {dim!r}, unlike the first file")
        blocks.append(ds[name].values)
    axis = datasets[0][name].dims.index(dim)
    return xr.Variable(datasets[0][name].dims, np.concatenate(blocks, axis=axis), dict(datasets[0][name].attrs))


class _JoinedArray(BackendArray):
    """One variable of many files, joined along ``dim`` (and padded along the token dimensions),
    read lazily: a selection reads the part of each file it covers, nothing else.

    Files keep their own chunks and checks: each part is read through the file's own lazy variable
    (the engine's checked road). Positions a file does not have (padding) read as the fill value.
    """

    def __init__(self, parts, dims, dim, counts, shape, dtype):
        self.parts, self.dims, self.dim, self.counts = parts, tuple(dims), dim, counts
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.fill = _fill(self.dtype)

    def __getitem__(self, key):
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC, self._read)

    def _read(self, key) -> np.ndarray:
        wanted = []  # per axis: the positions asked for, and whether the axis is dropped (an integer)
        for part, size in zip(key, self.shape):
            if isinstance(part, slice):
                wanted.append((np.arange(*part.indices(size)), False))
            else:
                wanted.append((np.array([int(part) % size]), True))
        out = np.full([len(positions) for positions, _ in wanted], self.fill, dtype=self.dtype)
        axis = self.dims.index(self.dim)
        along = wanted[axis][0]
        if not along.size:
            return out.squeeze(axis=tuple(i for i, (_, is_int) in enumerate(wanted) if is_int))
        # only the files the positions fall in (a lookup, not a pass over every file: one map of
        # 2,000 files is read as fast as one map of 2)
        first = int(np.searchsorted(self.offsets, along.min(), side="right")) - 1
        last = int(np.searchsorted(self.offsets, along.max(), side="right")) - 1
        for index in range(first, last + 1):
            part, offset, count = self.parts[index], self.offsets[index], self.counts[index]
            inside = np.flatnonzero((along >= offset) & (along < offset + count))
            if not inside.size:
                continue
            has_dim = self.dim in part.dims
            local_key, out_key = [], []
            for i, d in enumerate(self.dims):
                positions = wanted[i][0]
                if d == self.dim:
                    out_key.append(inside)
                    if has_dim:
                        local_key.append(_compact(along[inside] - offset))
                    continue
                kept = np.flatnonzero(positions < part.sizes[d])  # beyond a shorter file: padding
                if not kept.size:
                    break
                out_key.append(kept)
                local_key.append(_compact(positions[kept]))
            else:
                block = np.asarray(part[tuple(local_key)].values)
                if not has_dim:
                    block = np.expand_dims(block, axis)
                out[np.ix_(*out_key)] = block
        dropped = tuple(i for i, (_, is_int) in enumerate(wanted) if is_int)
        return out.squeeze(axis=dropped) if dropped else out


def _compact(positions: np.ndarray):
    """Positions as a slice when they are evenly spaced and increasing (a basic read), else as they are."""
    if positions.size == 1:
        return slice(int(positions[0]), int(positions[0]) + 1)
    steps = np.diff(positions)
    if positions.size and steps[0] > 0 and (steps == steps[0]).all():
        return slice(int(positions[0]), int(positions[-1]) + 1, int(steps[0]))
    return positions


def _dim_order(dims, dim: str):
    from attnformat.conventions import ATTENTION_DIMS

    # A new outer dimension goes first; attention dimensions keep the canonical order.
    def key(d):
        if d == dim and d not in ATTENTION_DIMS:
            return -1
        return ATTENTION_DIMS.index(d) if d in ATTENTION_DIMS else len(ATTENTION_DIMS)

    return sorted(dims, key=key)


def _check_agreement(site, reference, other, source0, source, dim, pad, token_names) -> None:
    where = f"{source}:{site}"
    ignored = set(_SIZE_ATTRS) if pad else set()
    attrs0 = {k: v for k, v in reference.attrs.items() if k not in ignored}
    attrs1 = {k: v for k, v in other.attrs.items() if k not in ignored}
    if not _same(attrs0, attrs1):
        key = next(k for k in sorted(set(attrs0) | set(attrs1)) if not _same(attrs0.get(k), attrs1.get(k)))
        raise CollectionError(f"{where}: site attribute {key!r} is {attrs1.get(key)!r}, but {attrs0.get(key)!r} in {source0}")
    if sorted(reference.data_vars) != sorted(other.data_vars):
        raise CollectionError(f"{where}: variables {sorted(other.data_vars)} differ from {sorted(reference.data_vars)} in {source0}")
    for name, variable in reference.data_vars.items():
        dims0 = tuple(d for d in variable.dims if d != dim)
        dims1 = tuple(d for d in other[name].dims if d != dim)
        if dims0 != dims1:
            raise CollectionError(f"{where}/{name}: dimensions {dims1} differ from {dims0} in {source0}")
        if variable.dtype != other[name].dtype:
            raise CollectionError(f"{where}/{name}: dtype {other[name].dtype} differs from {variable.dtype} in {source0}")
    for d in [*reference.dims, *(d for d in other.dims if d not in reference.dims)]:  # file order: messages are stable
        if d == dim or (pad and d in TOKEN_DIMS):
            continue
        if reference.sizes.get(d) != other.sizes.get(d):
            hint = " (samples of different lengths are padded only when joined along 'sample')" if d in TOKEN_DIMS else ""
            raise CollectionError(f"{where}: dimension {d!r} has size {other.sizes.get(d)}, but {reference.sizes.get(d)} in {source0}{hint}")
        if d in reference.coords and d in reference.indexes and not np.array_equal(reference[d].values, other[d].values):
            raise CollectionError(f"{where}: {d} labels {other[d].values.tolist()} differ from {reference[d].values.tolist()} in {source0}")
    for name, coord in reference.coords.items():
        if name in token_names or name in reference.indexes or dim in coord.dims:
            continue
        if name not in other.coords or not np.array_equal(coord.values, other[name].values):
            raise CollectionError(f"{where}: coordinate {name!r} differs from {source0}")
    if sorted(token_names) != sorted(n for n, c in other.coords.items() if set(c.dims) & set(TOKEN_DIMS)):
        raise CollectionError(f"{where}: token coordinates differ from those of {source0}")
    if dim != "sample":
        for name in token_names:
            if not np.array_equal(reference[name].values, other[name].values):
                raise CollectionError(f"{where}: {name} differs from {source0}; files joined along {dim!r} must hold the same "
                                      "tokens (join different inputs along 'sample')")


def _same(a, b) -> bool:
    try:
        return bool(np.array_equal(np.asarray(a, dtype=object), np.asarray(b, dtype=object))) if a is not None and b is not None else a is b
    except Exception:
        return a == b


def _fill(dtype):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.nan
    if dtype.kind == "b":
        return False
    if dtype.kind in "iu":
        return -1  # "no key" in key_index and top_key
    return ""


def _token_coords(datasets, token_names, dim, sizes, pad) -> dict:
    """Per-token coordinates of the joined site: as in the files when they agree, else per sample."""
    reference = datasets[0]
    per_sample = pad or any(
        not np.array_equal(reference[name].values, ds[name].values) or "sample" in ds[name].dims
        for ds in datasets[1:] for name in token_names
    )
    if dim != "sample" or not per_sample:
        return {name: reference[name].variable for name in token_names}
    coords = {}
    masks = {f"{d}_mask": d for d in TOKEN_DIMS if d in sizes}
    for name in list(token_names) + [m for m in masks if m not in token_names]:
        token_dim = masks.get(name) or next(d for d in reference[name].dims if d in TOKEN_DIMS)
        blocks = []
        for ds in datasets:
            count, length = ds.sizes.get("sample", 1), ds.sizes[token_dim]
            if name in ds.coords:
                values = ds[name].values
                if "sample" not in ds[name].dims:
                    values = np.broadcast_to(values, (count, length))
            else:  # a mask the file did not need: every token of it is real
                values = np.ones((count, length), dtype=bool)
            filled = np.full((count, sizes[token_dim]), _fill(values.dtype), dtype=values.dtype if values.dtype.kind != "U" else object)
            filled[:, :length] = values
            blocks.append(filled)
        coords[name] = (("sample", token_dim), np.concatenate(blocks, axis=0))
    return coords


def _root_attrs(all_attrs: list[dict]) -> dict:
    first = all_attrs[0]
    shared = {k: v for k, v in first.items() if all(_same(v, a.get(k)) for a in all_attrs[1:])}
    complete = all(a.get(ROOT_COMPLETENESS) == "complete" for a in all_attrs)
    shared[ROOT_COMPLETENESS] = "complete" if complete else "incomplete"
    return shared


def _collection_text(files) -> str:
    if len(files) == 1:
        return files[0].source
    return f"{files[0].source} (+{len(files) - 1} more)"


def collection_statistics(tree: xr.DataTree, **options) -> dict:
    """Statistics of a collection: :func:`attnformat.viewer.statistics_summary` of the whole tree
    when it is joined along ``sample`` or ``step`` (pooled over every map, as for one file), and
    one summary per label when it is joined along a new dimension (``run``).

    Parameters
    ----------
    tree
        A tree made by :func:`open_many`.
    **options
        Passed to :func:`attnformat.viewer.statistics_summary` (``variable``, ``queries``...).

    Returns
    -------
    dict
        For ``sample``/``step``: the summary, plus ``"files"`` (the number of files). For a new
        dimension: ``{"source", "dim", "files", "summaries": {label: summary}}``.

    Examples
    --------
    >>> import shutil, tempfile, pathlib, attnformat
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> for seed in range(2):
    ...     _ = shutil.copytree(attnformat.example_path("dense"), folder / f"seed{seed}.zarr")
    >>> result = collection_statistics(open_many(folder, dim="run"))
    >>> sorted(result["summaries"]), round(result["summaries"]["seed1.zarr"]["sites"]["encoder/self"][0]["mean"], 4)
    (['seed0.zarr', 'seed1.zarr'], 0.1667)
    """
    from attnformat.viewer.statistics import statistics_summary

    dim = tree.root.encoding.get("collection_dim", "sample")
    files = len(tree.root.encoding.get("sources", [])) or 1
    source = str(tree.root.encoding.get("source", "<in-memory tree>"))
    if dim in ("sample", "step"):
        summary = statistics_summary(tree, **options)
        summary["source"], summary["files"] = source, files
        return summary
    labels = next((node[dim].values.tolist() for node in tree.subtree if dim in node.dims), [])
    summaries = {}
    for position, label in enumerate(labels):
        part = tree.isel({dim: position}, missing_dims="ignore")
        summary = statistics_summary(part, **options)
        summary["source"] = f"{source} [{dim}={label}]"
        summaries[str(label)] = summary
    return {"source": source, "dim": dim, "files": files, "summaries": summaries}


def is_collection(tree: xr.DataTree) -> bool:
    """True for a tree made by :func:`open_many`.

    Parameters
    ----------
    tree
        Any tree.

    Examples
    --------
    >>> import attnformat
    >>> is_collection(attnformat.open(attnformat.example_path("dense")))
    False
    """
    return "sources" in tree.root.encoding
