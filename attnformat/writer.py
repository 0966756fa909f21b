"""Streaming writer: declare a site once, then write one layer (or head, sample, step) at a time.

Memory holds what one ``write`` call passes, never the whole model. Values go straight into the
store's chunks. The store is written next to the destination as ``<name>.partial.zarr`` (through
:class:`attnformat.engines.zarr_stream.StreamingStore`, the only part that knows it is Zarr);
:meth:`Writer.close` marks it complete, consolidates its metadata and moves it into place in one
step readers cannot see half-done (or converts it, for ``.zarr.zip`` and ``.h5`` destinations).

Nothing written is ever lost or deleted unasked:

* if the process dies first, the partial store stays: it opens, holds every map written so far,
  reads NaN where nothing was written, and says ``completeness = "incomplete"``; a new ``Writer``
  for the same destination refuses to replace it unless ``overwrite=True``;
* one writer per destination: a second one fails at once with
  :class:`~attnformat.errors.StoreLockedError` (a lock file, ``<name>.lock``, that the operating
  system releases if the holder dies);
* a failed write (a full disk, a file-size limit) raises
  :class:`~attnformat.errors.WriteFailedError` naming the path; the partial store keeps what was
  written, says "incomplete", and is neither moved nor converted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from attnformat._version import __version__
from attnformat.conventions import (
    ATTENTION_DIMS,
    FORMAT_NAME,
    FORMAT_VERSION,
    INTEGER_VARIABLES,
    LAYOUTS,
    LEADING_DIMS,
    STATISTICS,
    TOPK_VARIABLES,
    ROOT_COMPLETENESS,
    ROOT_FORMAT,
    ROOT_PRODUCER,
    ROOT_VERSION,
    canonical_dims,
)
from attnformat.encoding import bitround, is_map, map_chunks
from attnformat.engines import Location, engine_name_for_path
from attnformat.engines.placement import WriterLock, move_into_place
from attnformat.engines.zarr_stream import (
    RegionLedger,
    StreamingStore,
    check_node_path,
    chunk_lengths,
    name_problem,
    reopen_store,
)
from attnformat.errors import AttnFormatError, SelectionError, WriteFailedError, WriterError
from attnformat.resolving import position

PARTIAL_SUFFIX = ".partial.zarr"
_DEFAULT_SITE_ATTRS = {"normalization": "softmax", "normalized_dim": "key"}
#: The dimensions each layout's attention variables need (the map of the layout).
_MAP_DIMS = {"dense": ("query", "key"), "edge": ("edge",), "topk": ("query", "rank"), "statistics": ("query",)}
#: Variables each layout may hold (None: any attention variable).
_LAYOUT_VARIABLES = {"topk": TOPK_VARIABLES, "statistics": STATISTICS}


def variable_dims(layout: str, name: str, declared: Sequence[str]) -> tuple[str, ...]:
    """The dimensions of a normative variable of a ``layout`` site whose dimensions are ``declared``.

    Dense and edge variables use every declared dimension. In a top-k site, ``weights`` and
    ``key_index`` drop ``key`` (which holds the key coordinates only) and ``omitted_weight``
    drops ``rank`` too; statistics drop ``key`` and ``rank``.

    Examples
    --------
    >>> variable_dims("topk", "omitted_weight", ("layer", "head", "query", "key", "rank"))
    ('layer', 'head', 'query')
    >>> variable_dims("statistics", "entropy", ("head", "query", "key"))
    ('head', 'query')
    """
    declared = tuple(declared)
    if layout == "topk":
        dropped = {"key", "rank"} if name == "omitted_weight" else {"key"}
    elif layout == "statistics":
        dropped = {"key", "rank"}
    else:
        dropped = set()
    return tuple(d for d in declared if d not in dropped)


class Writer:
    """Write an attention file incrementally.

    Parameters
    ----------
    path
        Destination: ``.zarr``, ``.zarr.zip``, ``.h5`` or ``.nc``, a local path or a URL (see ``storage_options``).
    model_name, model_framework, model_adapter, description
        Root attributes describing where the attention came from.
    producer
        Who wrote the file; defaults to ``"attnformat <version>"``.
    attrs
        More root attributes (JSON-serializable scalars, strings or lists of them).
    overwrite
        Replace ``path`` at close if it exists (the old file stays until then, and readers see
        the old file or the new one, never a mix), and discard what an earlier writer left in
        ``<path>.partial.zarr`` (without it, such a partial store is an error: it may be all that
        is left of a crashed run).
    zarr_format
        3 (default) or 2.
    storage_options
        fsspec options when ``path`` is a URL (``s3://bucket/run.zarr``): the file is written in a
        local temporary folder and uploaded whole when the writer closes complete.
    write_behind
        Return from :meth:`SiteWriter.write` while the map is still being compressed and
        stored, so that the caller computes the next layer meanwhile (at most one map in
        flight). If the process is killed, that one map may be missing (it reads as NaN); by
        default every ``write`` is on disk when it returns.
    regions
        Declare a store that several processes will fill, each a region (a span of positions) of
        one leading dimension: ``{"sample": 8}`` means regions along ``sample`` on multiples of
        8 positions (the stored chunks along ``sample`` divide 8, so no chunk is shared by two
        regions). This writer only declares: sites, coordinates, steps (``coords={"step":
        [...]}``, fixed in advance when regions are along ``step``); :meth:`close` leaves the
        declared store at ``<path>.partial.zarr`` (incomplete) for the region writers.
    mode
        ``"w"`` (default): a new file. ``"r+"``: write one region of a store declared with
        ``regions`` (``region`` says which); the sites are those declared (``writer.sites``).
    region
        With ``mode="r+"``: ``{dim: slice(start, stop)}``, positions this process writes. It must
        not split a stored chunk nor overlap a region another live process writes or one
        already written (both refused with :class:`~attnformat.errors.WriterError`).
    finalize
        With ``mode="r+"``: when this writer closes and every region is written, seal the store
        (completeness ``"complete"``, chunk manifest, consolidated metadata) and move it into
        place. Without it (or when a region is missing) call :func:`finalize`.

    Several processes
    -----------------
    Two writers of one store must never write the same chunk: both read it, merge their part and
    write it back, and one of them loses what the other wrote (two plain zarr writers of disjoint
    layers of 12 lose 0 to 6 of them, a different number each run). So either each process writes
    its own file and :func:`attnformat.open_many` joins them (simplest; any engine; nothing to
    coordinate), or one store is declared once and each process writes a region of whole chunks
    (one ``.zarr`` result, no joining step; Zarr partial store only, local filesystem with
    ``flock``). A ``torch.distributed`` job (no torch in attnformat; ``rank``/``world`` are the
    job's)::

        per_rank = samples // world                   # regions on multiples of per_rank
        if rank == 0:
            with attnformat.Writer(out, model_name=name, regions={"sample": per_rank}) as w:
                w.create_site("encoder/self", sizes={"sample": samples, "layer": L, "head": H,
                              "query": T, "key": T}, coords=coords)
        torch.distributed.barrier()                  # the layout exists before anyone writes
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        with attnformat.Writer(out, mode="r+", region={"sample": mine}) as w:
            for layer in range(L):
                w.sites["encoder/self"].write("weights", maps[layer], layer=layer)  # (per_rank, H, T, T)
        # the last rank to close seals the file; a rank that died leaves it incomplete and
        # readable (<out>.partial.zarr); rerun that rank's region, or attnformat.finalize(out,
        # allow_incomplete=True)

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib, attnformat
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "run.attn.zarr"
    >>> with attnformat.Writer(out, model_name="toy") as writer:
    ...     site = writer.create_site("encoder/self", sizes={"layer": 2, "head": 2, "query": 3, "key": 3},
    ...                               coords={"query_label": ("query", ["a", "b", "c"]), "key_label": ("key", ["a", "b", "c"])})
    ...     for layer in range(2):
    ...         site.write("weights", np.full((2, 3, 3), 1 / 3), layer=layer)
    >>> attnformat.open(out)["encoder/self"]["weights"].sel(layer=1, head=0).values.sum(axis=-1)
    array([1., 1., 1.], dtype=float32)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        model_name: str | None = None,
        model_framework: str | None = None,
        model_adapter: str | None = None,
        description: str | None = None,
        producer: str | None = None,
        attrs: Mapping | None = None,
        overwrite: bool = False,
        zarr_format: int = 3,
        write_behind: bool = False,
        regions: Mapping[str, int] | None = None,
        mode: str = "w",
        region: Mapping[str, slice] | None = None,
        finalize: bool = True,
        storage_options: Mapping | None = None,
    ):
        location = Location.of(path, storage_options)
        #: Where the finished file is uploaded (a URL), or None for a local file.
        self.remote = location if location.is_url else None
        if self.remote is not None:
            if mode != "w" or regions is not None:
                raise WriterError(f"{location}: region writes need a local filesystem (they coordinate with file locks); "
                                  "write per-process files and upload them, or write regions locally")
            # Written locally (a partial store, sealed at close), then uploaded whole (engines/remote).
            path = Path(tempfile.mkdtemp(prefix="attnformat-writer-")) / location.name
        self.path = Path(path)
        self.write_behind = write_behind
        self.engine_name = engine_name_for_path(self.path)
        self.closed = False
        self._lock = None
        self._claim = None
        self.region: tuple[str, int, int] | None = None
        self.regions: dict[str, int] = {}
        self.store_path = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        if mode not in ("w", "r+"):
            raise WriterError(f"{self.path}: mode must be 'w' (a new file) or 'r+' (a region of a declared store), not {mode!r}")
        if mode == "r+":
            if regions is not None:
                raise WriterError(f"{self.path}: regions= declares a new store (mode='w'); in mode='r+' give region=")
            self._open_region(region, finalize)
            return
        if region is not None:
            raise WriterError(f"{self.path}: region= writes into a declared store: pass mode='r+'")
        self.regions = _checked_regions(self.path, regions)
        if self.path.exists() and not overwrite:
            raise AttnFormatError(f"{self.path}: already exists; pass overwrite=True to replace it")
        if zarr_format not in (2, 3):
            raise WriterError(f"{self.path}: zarr_format must be 2 or 3, not {zarr_format!r}")
        self.overwrite = overwrite
        self.zarr_format = zarr_format
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = WriterLock(self.path)  # before looking at the partial: it may be another writer's
        try:
            if self.store_path.exists():
                if not overwrite:
                    raise WriterError(
                        f"{self.path}: {self.store_path} holds what an earlier writer left (it is readable with "
                        f"attnformat.open({str(self.store_path)!r})); pass overwrite=True to replace it, or move it away"
                    )
                shutil.rmtree(self.store_path)
            if self.regions:
                # No partial store, so nobody writes regions of it: bookkeeping left there is stale.
                shutil.rmtree(_ledger_path(self.path), ignore_errors=True)
            root_attrs = {
                ROOT_FORMAT: FORMAT_NAME,
                ROOT_VERSION: FORMAT_VERSION,
                ROOT_PRODUCER: producer or f"attnformat {__version__}",
                ROOT_COMPLETENESS: "incomplete",
            }
            for key, value in (("model_name", model_name), ("model_framework", model_framework), ("model_adapter", model_adapter), ("description", description)):
                if value is not None:
                    root_attrs[key] = value
            root_attrs.update(dict(attrs or {}))
            self.store = StreamingStore(self.store_path, zarr_format=zarr_format, attrs=root_attrs, write_behind=write_behind)
        except BaseException:
            self._release()
            raise
        self.sites: dict[str, SiteWriter] = {}

    def create_site(
        self,
        name: str,
        *,
        sizes: Mapping[str, int],
        layout: str = "dense",
        variables: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        dtype: str | np.dtype = "float32",
        coords: Mapping | None = None,
        attrs: Mapping | None = None,
        keepbits: Mapping[str, int] | None = None,
        chunks: Mapping[str, Sequence[int]] | None = None,
    ) -> SiteWriter:
        """Declare an attention site: its dimensions, variables, coordinates and attributes.

        ``sizes`` maps each dimension to its length (``step`` may be 0: it grows as steps are
        written). ``layout`` is ``"dense"``, ``"edge"``, ``"topk"`` or ``"statistics"``.
        ``variables`` names the variables to create, or maps a name to its dimensions (a bias
        shared by all heads, say). By default a dense or edge site holds ``weights`` on every
        dimension in ``sizes``; a top-k site holds ``weights`` and ``key_index`` on (...,
        query, rank) and ``omitted_weight`` on (..., query); a statistics site holds the
        statistics named in ``variables`` (``entropy``, ``max_weight``, ``sink_weight``,
        ``local_weight``, ``top_key``) on (..., query). In top-k and statistics sites ``key``
        (when in ``sizes``) is the dimension of the key coordinates only.
        Float variables are stored as ``dtype`` with fill NaN ("not captured"); ``key_index``
        and ``top_key`` as int32 with fill -1 ("no key"); top-k and statistics variables other
        than ``weights`` get ``role = "per_query"``.
        ``coords`` maps a coordinate name to ``(dims, values)``, or a dimension name to values.
        ``attrs`` are the site's attributes (``normalization`` defaults to ``"softmax"`` and
        ``normalized_dim`` to ``"key"``; a top-k site's ``top_k`` defaults to the size of
        ``rank``, and ``key_count`` of top-k and statistics sites to the size of ``key``).
        ``keepbits`` bit-rounds named variables (declared). ``chunks`` gives the chunk shape of
        named coordinates (per-sample labels written batch by batch, say); variables are chunked
        by the writer (see the spec's Storage section).

        Examples
        --------
        >>> import tempfile, pathlib, attnformat
        >>> writer = attnformat.Writer(pathlib.Path(tempfile.mkdtemp()) / "x.zarr")
        >>> site = writer.create_site("self", sizes={"head": 4, "query": 8, "key": 8})
        >>> site.dims["weights"]
        ('head', 'query', 'key')
        >>> topk = writer.create_site("self_topk", layout="topk", sizes={"head": 4, "query": 8, "key": 8, "rank": 2})
        >>> topk.dims["omitted_weight"], str(topk.dtypes["key_index"]), topk.attrs["top_k"], topk.attrs["key_count"]
        (('head', 'query'), 'int32', 2, 8)
        """
        self._check_open()
        if self.region is not None:
            raise WriterError(f"{self.path}: a region writer writes the declared sites ({', '.join(self.sites)}); it declares none")
        name = check_node_path(name, str(self.path))
        if name in self.sites or any(other.startswith(name + "/") or name.startswith(other + "/") for other in self.sites):
            raise WriterError(f"{self.path}: site {name!r} is already declared, or lies inside or around a declared site")
        if layout not in LAYOUTS:
            raise WriterError(f"{self.path}:{name}: layout must be one of {LAYOUTS}, not {layout!r} [ATTN-SITE-001]")
        site_attrs = {**_DEFAULT_SITE_ATTRS, "layout": layout, **dict(attrs or {})}
        _complete_reduced_attrs(f"{self.path}:{name}", layout, dict(sizes), variables, site_attrs)
        self.store.create_group(name, site_attrs)
        site = SiteWriter(self, name, site_attrs, dict(sizes), variables, np.dtype(dtype), dict(coords or {}), dict(keepbits or {}),
                          dict(chunks or {}))
        self.sites[name] = site
        return site

    def close(self, *, complete: bool = True) -> Path:
        """Finish the file: mark it (in)complete, consolidate metadata, move it into place.

        Returns the path of the finished file. Called by the ``with`` block; after an
        exception inside the block the file is closed with ``complete=False``.

        Examples
        --------
        >>> import numpy as np, tempfile, pathlib, attnformat
        >>> writer = attnformat.Writer(pathlib.Path(tempfile.mkdtemp()) / "x.h5")
        >>> writer.create_site("self", sizes={"query": 2, "key": 2}).write("weights", np.full((2, 2), 0.5))
        >>> writer.close().name, attnformat.is_complete(attnformat.open(writer.path))
        ('x.h5', True)
        """
        if self.closed:
            return self.path
        if self.region is not None:
            return self._close_region(complete)
        if self.regions:
            return self._close_declaration(complete)
        self.closed = True
        try:
            if self.store.failed:
                raise WriteFailedError(f"{self.path}: not finished, a write failed; what was written is kept in {self.store_path} (incomplete)")
            try:
                self.flush()
            except WriteFailedError:
                raise  # the partial keeps what was written and says "incomplete"
            except WriterError:
                self._finish(complete=False)
                raise
            self._finish(complete)
            if self.remote is not None:
                from attnformat.engines.remote import upload_finished

                upload_finished(self.path, self.remote, overwrite=self.overwrite)
        finally:
            self.store.close()
            self._release()
        return self.path

    def flush(self) -> None:
        """Wait until every map passed to :meth:`SiteWriter.write` is on disk.

        Only a writer made with ``write_behind=True`` has a write in flight between calls (at
        most one); a failed write is raised here, or by the next ``write``.

        Examples
        --------
        >>> import numpy as np, tempfile, pathlib, attnformat
        >>> writer = attnformat.Writer(pathlib.Path(tempfile.mkdtemp()) / "x.zarr", write_behind=True)
        >>> writer.create_site("self", sizes={"query": 2, "key": 2}).write("weights", np.full((2, 2), 0.5))
        >>> writer.flush()  # the map is on disk now
        """
        self.store.flush()

    def _finish(self, complete: bool) -> None:
        try:
            self.store.finish({ROOT_COMPLETENESS: "complete" if complete else "incomplete"})
            if self.engine_name == "zarr":
                if self.path.exists() and not self.overwrite:
                    raise AttnFormatError(f"{self.path}: appeared while writing; the data is kept in {self.store_path}")
                move_into_place(self.store_path, self.path)
            else:
                from attnformat.saving import convert

                try:
                    convert(self.store_path, self.path, overwrite=self.overwrite, zarr_format=self.zarr_format)
                except OSError as error:
                    if isinstance(error, WriteFailedError):
                        raise
                    raise WriteFailedError(f"{self.path}: writing failed ({error}); the data is kept in {self.store_path}") from error
                shutil.rmtree(self.store_path)
        except BaseException:
            if complete:
                # What stays behind is the partial store, not the finished file: it must not say
                # "complete" (it is whole, but it is not where the caller asked for it).
                try:
                    self.store.finish({ROOT_COMPLETENESS: "incomplete"})
                except WriteFailedError:
                    pass  # the disk refuses even that; the error being raised says what happened
            raise

    # -- several writers ---------------------------------------------------------------------
    def _open_region(self, region, finalize: bool) -> None:
        """Open the declared store ``<path>.partial.zarr`` to write ``region`` (mode "r+")."""
        self.finalize_when_whole = finalize
        if not isinstance(region, Mapping) or len(region) != 1:
            raise WriterError(f"{self.path}: mode='r+' needs region={{dim: slice(start, stop)}} (one dimension), not {region!r}")
        if not self.store_path.is_dir():
            state = "is finished already" if self.path.exists() else "has no declared store"
            raise WriterError(f"{self.path}: {state} ({self.store_path} does not exist); declare it first with "
                              "Writer(path, regions={dim: width}) and close that writer before region writers start")
        ledger = RegionLedger(self.store_path, _ledger_path(self.path))
        declaration = ledger.declaration()
        if declaration is None:
            raise WriterError(f"{self.path}: {self.store_path} has no declared layout (yet): its declaring writer has not closed; "
                              "start region writers after it (a barrier)")
        (dim, span), = region.items()
        size = int(declaration["size"])
        if dim != declaration["dim"]:
            raise WriterError(f"{self.path}: the store is declared for regions along {declaration['dim']!r}, not {dim!r}")
        if not isinstance(span, slice) or span.step not in (None, 1):
            raise WriterError(f"{self.path}: region {dim} must be a slice of positions, not {span!r}")
        start, stop, _ = span.indices(size)
        if stop <= start or (span.stop is not None and span.stop > size):
            raise WriterError(f"{self.path}: region {dim}={_shown(span)} is not a span of positions inside 0..{size - 1}")
        self.ledger, self.declaration = ledger, declaration
        self.overwrite = bool(declaration.get("overwrite", False))
        self.zarr_format = int(declaration.get("zarr_format", 3))
        # Index coordinates (sample, step, layer labels) are the declaring writer's; the rest may be written.
        names = [f"{site}/{name}" for site, record in declaration["sites"].items()
                 for name, dims in {**record["dims"], **record["coord_dims"]}.items() if list(dims) != [name]]
        self.store = reopen_store(self.store_path, names, write_behind=self.write_behind)
        # Two writers of one chunk lose data: a region must consist of whole chunks.
        for name, length in sorted(chunk_lengths(self.store, dim).items()):
            if start % length or (stop % length and stop != size):
                raise WriterError(
                    f"{self.path}: region {dim}={start}:{stop} splits the stored chunks of {name} ({length} {dim} per chunk); "
                    f"two writers of one chunk lose data: use regions on multiples of {length}"
                )
        self._claim = ledger.claim(start, stop)
        self.region = (dim, start, stop)
        self.sites = {name: SiteWriter._reopened(self, name, record) for name, record in declaration["sites"].items()}

    def _close_region(self, complete: bool) -> Path:
        self.closed = True
        try:
            try:
                self.store.flush()
            except BaseException:
                complete = False
                raise
            finally:
                self.store.close()
                if complete and not self.store.failed:
                    self._claim.finish()  # only once every chunk of the region is on disk
                else:
                    self._claim.release()  # the region stays missing: the file stays incomplete
        finally:
            self._claim.release()
        if complete and self.finalize_when_whole:
            self.ledger.seal_once(lambda: _seal_declared(self.path, self.store_path, self.ledger, complete=True))
        return self.path

    def _close_declaration(self, complete: bool) -> Path:
        """Record the declared layout and leave the store for the region writers."""
        self.closed = True
        try:
            if complete and not self.store.failed:
                dim, width = next(iter(self.regions.items()))
                sizes = {name: site.sizes.get(dim) for name, site in self.sites.items()}
                if not sizes:
                    raise WriterError(f"{self.path}: declare at least one site before closing a store declared for regions")
                if len(set(sizes.values())) != 1 or None in sizes.values():
                    raise WriterError(f"{self.path}: every site must have the region dimension {dim!r} with one size; sizes {sizes}")
                self.store.flush()
                RegionLedger(self.store_path, _ledger_path(self.path)).declare({
                    "dim": dim, "width": width, "size": next(iter(sizes.values())), "overwrite": self.overwrite,
                    "zarr_format": self.zarr_format, "sites": {name: site._record() for name, site in self.sites.items()},
                })
        finally:
            self.store.close()
            self._release()
        return self.path

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _check_open(self) -> None:
        if self.closed:
            raise WriterError(f"{self.path}: the writer is closed")

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.region is not None or self.regions:
            self.close(complete=exc_type is None)
            return
        if isinstance(exc, WriteFailedError) and not self.closed:
            # The storage failed: leave the partial as it is (incomplete), let go of the lock, and
            # let the original error say what happened.
            self.closed = True
            self.store.close()
            self._release()
            return
        self.close(complete=exc_type is None)


def _complete_reduced_attrs(where: str, layout: str, sizes: dict, variables, attrs: dict) -> None:
    """Fill in and check the attributes a top-k or statistics site needs [ATTN-TOPK-001, ATTN-STAT-003]."""
    if layout not in ("topk", "statistics"):
        return
    names = list(variables) if variables is not None else list(TOPK_VARIABLES if layout == "topk" else ())
    needed = _MAP_DIMS[layout]
    if any(d not in sizes for d in needed):
        rule = "ATTN-TOPK-001" if layout == "topk" else "ATTN-STAT-001"
        raise WriterError(f"{where}: a {layout} site needs dimensions {needed} in sizes [{rule}]")
    if layout == "topk":
        rank = sizes["rank"]
        attrs.setdefault("top_k", rank)
        if not isinstance(attrs["top_k"], (int, np.integer)) or attrs["top_k"] != rank:
            raise WriterError(f"{where}: top_k is {attrs['top_k']!r}, but the rank dimension has size {rank} [ATTN-TOPK-001]")
    if "key" in sizes:
        attrs.setdefault("key_count", sizes["key"])
    count = attrs.get("key_count")
    if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 1:
        raise WriterError(f"{where}: a {layout} site needs key_count, the number of keys a row ranges over (a positive integer), "
                          f"in attrs or as the size of 'key'; it is {count!r} [ATTN-{'TOPK-001' if layout == 'topk' else 'STAT-002'}]")
    if "key" in sizes and count != sizes["key"]:
        raise WriterError(f"{where}: key_count is {count}, but the key coordinates cover {sizes['key']} keys")
    attrs["key_count"] = int(count)
    if layout == "topk":
        attrs["top_k"] = int(attrs["top_k"])
    if layout == "statistics" and "local_weight" in names:
        window = attrs.get("local_window")
        if not isinstance(window, (int, np.integer)) or isinstance(window, bool) or window < 0:
            raise WriterError(f"{where}: local_weight needs the site attribute local_window (a non-negative integer), "
                              f"not {window!r} [ATTN-STAT-003]")
        attrs["local_window"] = int(window)


class SiteWriter:
    """Writes the variables of one attention site; made by :meth:`Writer.create_site`.

    ``dims`` maps each variable to its dimensions, ``sizes`` each dimension to its current
    length and ``labels`` each leading dimension to its labels so far.

    Examples
    --------
    >>> import tempfile, pathlib, attnformat
    >>> writer = attnformat.Writer(pathlib.Path(tempfile.mkdtemp()) / "x.zarr")
    >>> site = writer.create_site("self", sizes={"layer": 2, "query": 3, "key": 3})
    >>> site.sizes, site.labels
    ({'layer': 2, 'query': 3, 'key': 3}, {'layer': [0, 1]})
    """

    def __init__(self, writer, name, attrs, sizes, variables, dtype, coords, keepbits, chunks=None):
        self.writer, self.name, self.dtype, self.keepbits = writer, name, dtype, keepbits
        self.attrs = dict(attrs)
        self.dtypes: dict[str, np.dtype] = {}  # variable -> storage dtype
        self._coord_chunks = dict(chunks or {})
        self.store: StreamingStore = writer.store
        self.where = f"{writer.path}:{name}"
        self._coordinates_of: dict[str, str] = {}  # variable -> its "coordinates" attribute
        self._group_coordinates = False
        self._fitted: set[str] = set()  # variables whose chunks follow the first write
        unknown = [d for d in sizes if d not in ATTENTION_DIMS]
        if unknown:
            raise WriterError(f"{self.where}: unknown dimensions {unknown}; attention dimensions are {ATTENTION_DIMS} [ATTN-DIM-001]")
        layout = attrs["layout"]
        needed = _MAP_DIMS[layout]
        if any(d not in sizes for d in needed):
            rule = {"topk": "ATTN-TOPK-001", "statistics": "ATTN-STAT-001"}.get(layout, "ATTN-DIM-003")
            raise WriterError(f"{self.where}: a {layout} site needs dimensions {needed} in sizes [{rule}]")
        declared = canonical_dims(sizes)
        self.sizes = {dim: int(sizes[dim]) for dim in declared}
        # Steps grow as they are written, unless processes write regions of steps: then the steps
        # are declared in advance (coords={"step": [...]}), and nothing grows.
        self._regions = dict(writer.regions)
        fixed_steps = "step" in self._regions
        if fixed_steps and "step" in self.sizes and "step" in coords:
            self.sizes["step"] = len(np.atleast_1d(np.asarray(coords["step"])))
        self.growing = {dim for dim in declared if dim in LEADING_DIMS and ((dim == "step" and not fixed_steps) or self.sizes[dim] == 0)}
        for dim in self._regions:
            if dim not in self.sizes or dim in self.growing:
                raise WriterError(f"{self.where}: regions along {dim!r} need {dim!r} in sizes with its full size (it cannot grow)")
        if "step" in self.sizes and not fixed_steps:
            self.sizes["step"] = 0
        self.labels: dict[str, list] = {}
        self.coord_dims: dict[str, tuple[str, ...]] = {}
        self._write_coords(coords)
        if variables is None:
            if layout == "statistics":
                raise WriterError(f"{self.where}: name the statistics to store: variables=({', '.join(map(repr, STATISTICS))}) or some of them [ATTN-STAT-001]")
            variables = TOPK_VARIABLES if layout == "topk" else ("weights",)
        if isinstance(variables, Mapping):
            requested = {var: canonical_dims(dims) if dims else variable_dims(layout, var, declared) for var, dims in variables.items()}
        else:
            requested = {var: variable_dims(layout, var, declared) for var in variables}
        allowed = _LAYOUT_VARIABLES.get(layout)
        if allowed is not None and any(var not in allowed for var in requested):
            rule = "ATTN-TOPK-001" if layout == "topk" else "ATTN-STAT-001"
            raise WriterError(f"{self.where}: a {layout} site holds {', '.join(allowed)}, not {sorted(set(requested) - set(allowed))}; "
                              f"attach other variables with add_variable() [{rule}]")
        self.dims: dict[str, tuple[str, ...]] = {}
        for variable, dims in requested.items():
            attrs = self._lossy_attrs(variable)
            if layout in ("topk", "statistics") and variable != "weights":
                attrs["role"] = "per_query"
            if layout == "statistics" and variable == "entropy":
                attrs["units"] = "nat"
            if variable in INTEGER_VARIABLES and layout in ("topk", "statistics"):
                integer, fill = INTEGER_VARIABLES[variable]
                attrs.pop("lossy_method", None), attrs.pop("lossy_keepbits", None)
                self._create_array(variable, dims, np.dtype(integer), fill_value=fill, attrs=attrs)
                self.dtypes[variable] = np.dtype(integer)
            else:
                self._create_array(variable, dims, self.dtype, fill_value=np.nan, attrs=attrs)
                self.dtypes[variable] = self.dtype
        if self._regions:
            # Chunks are fixed now, so that every chunk lies inside one region (written by one process).
            for variable, dims in self.dims.items():
                shape = tuple(self.sizes[d] for d in dims)
                chunks = self._chunks(dims, shape) if is_map(dims) else shape
                self.store.rechunk(f"{self.name}/{variable}", _region_chunks(dims, chunks, self._regions))
                self._fitted.add(variable)
            if "step" in self._regions:
                steps = self.labels.get("step", [])
                if any(b <= a for a, b in zip(steps, steps[1:])):
                    raise WriterError(f"{self.where}: steps {steps} must strictly increase [ATTN-COORD-001]")

    # -- several writers ---------------------------------------------------------------------
    def _record(self) -> dict:
        """What a region writer needs to know of this site (JSON), kept in the store's declaration."""
        return {
            "dims": {k: list(v) for k, v in self.dims.items()},
            "dtypes": {k: str(v) for k, v in self.dtypes.items()},
            "coord_dims": {k: list(v) for k, v in self.coord_dims.items()},
            "sizes": dict(self.sizes),
            "labels": {k: list(v) for k, v in self.labels.items()},
            "keepbits": {k: int(v) for k, v in self.keepbits.items()},
            "attrs": _jsonable(self.attrs),
        }

    @classmethod
    def _reopened(cls, writer, name: str, record: dict) -> SiteWriter:
        """The site as declared, for a region writer (nothing is created or re-chunked)."""
        site = cls.__new__(cls)
        site.writer, site.name, site.store = writer, name, writer.store
        site.where = f"{writer.path}:{name}"
        site.attrs = dict(record["attrs"])
        site.dims = {k: tuple(v) for k, v in record["dims"].items()}
        site.dtypes = {k: np.dtype(v) for k, v in record["dtypes"].items()}
        site.dtype = next(iter(site.dtypes.values()), np.dtype("float32"))
        site.coord_dims = {k: tuple(v) for k, v in record["coord_dims"].items()}
        site.sizes = {k: int(v) for k, v in record["sizes"].items()}
        site.labels = {k: list(v) for k, v in record["labels"].items()}
        site.keepbits = dict(record["keepbits"])
        site.growing, site._regions = set(), {}
        site._fitted = set(site.dims)
        site._coord_chunks, site._coordinates_of, site._group_coordinates = {}, {}, False
        return site

    def _in_region(self, name: str, dims, selection: dict) -> dict:
        """The selection of a region writer's write, the region added when it names none; refuses
        what a declaring writer or a region writer may not write."""
        if self._regions:
            raise WriterError(f"{self.where}/{name}: this writer only declares the store; write with "
                              f"Writer({str(self.writer.path)!r}, mode='r+', region={{...}}) after closing it")
        if self.writer.region is None:
            return selection
        dim, start, stop = self.writer.region
        if tuple(dims) == (name,):
            raise WriterError(f"{self.where}/{name}: the labels of {name!r} are declared by the declaring writer, not written by regions")
        if dim not in dims:
            raise WriterError(f"{self.where}/{name}: has no {dim!r} dimension, so it lies outside this writer's region {dim}={start}:{stop}")
        if dim not in selection:
            selection = {**selection, dim: slice(start, stop)}
        return selection

    def _check_inside(self, name: str, dims, region) -> None:
        if self.writer.region is None:
            return
        dim, start, stop = self.writer.region
        part = region[list(dims).index(dim)]
        first, last = (part.start, part.stop) if isinstance(part, slice) else (part, part + 1)
        if first < start or last > stop:
            raise WriterError(f"{self.where}/{name}: {dim} {first}:{last} lies outside this writer's region {dim}={start}:{stop}")

    # -- declaration -------------------------------------------------------------------------
    def _write_coords(self, coords: Mapping) -> None:
        for dim in LEADING_DIMS:
            if dim in self.sizes and dim not in coords:
                coords = {**coords, dim: np.arange(self.sizes[dim], dtype=np.int64)}
            if dim in self.sizes and dim != "step" and self.sizes[dim] == 0 and np.asarray(coords[dim]).size == 0:
                coords = {**coords, dim: np.zeros(0, dtype=np.int64)}
        for name, spec in coords.items():
            dims, values = _split_coord_spec(name, spec)
            if name == "step":
                values = values.astype(np.int64)
            expected = tuple(self.sizes.get(d, values.shape[i] if i < values.ndim else -1) for i, d in enumerate(dims))
            if values.shape != expected and not (dims == (name,) and self.sizes.get(name) == 0):
                raise WriterError(f"{self.where}: coordinate {name!r} has shape {values.shape}, but its dimensions {dims} have sizes {expected}")
            for i, dim in enumerate(dims):
                self.sizes.setdefault(dim, values.shape[i])
            if dims == (name,) and name in LEADING_DIMS:
                self.labels[name] = values.tolist()
            self._check_name(name)
            self.coord_dims[name] = dims
            dtype = str if values.dtype.kind in "OUT" else values.dtype
            chunk_shape = tuple(self._coord_chunks.get(name, values.shape)) or None
            if chunk_shape and dims != (name,):  # per-sample labels etc., written by region writers
                chunk_shape = _region_chunks(dims, chunk_shape, self._regions)
            self._new_array(name, values.shape, dims, dtype, fill_value=None, chunks=chunk_shape)
            if values.size:
                self.store.write_all(f"{self.name}/{name}", values)
        if "step" in self.sizes:
            self.labels.setdefault("step", [])

    def _lossy_attrs(self, variable: str) -> dict:
        bits = self.keepbits.get(variable)
        return {"lossy_method": "bitround", "lossy_keepbits": int(bits)} if bits is not None else {}

    def _check_name(self, name) -> None:
        problem = name_problem(name)
        if problem:
            raise WriterError(f"{self.where}: cannot name a variable or coordinate {name!r}: {problem}")

    def _create_array(self, name, dims, dtype, *, fill_value, attrs=None):
        self._check_name(name)
        if name in self.dims or name in self.coord_dims:
            raise WriterError(f"{self.where}: variable {name!r} already exists")
        shape = tuple(self.sizes[d] for d in dims)
        chunks = map_chunks(dims, shape) if is_map(dims) else None
        coordinates = sorted(c for c, cdims in self.coord_dims.items() if set(cdims) <= set(dims) and cdims != (c,))
        attrs = dict(attrs or {})
        if coordinates:
            attrs["coordinates"] = " ".join(coordinates)
        self._coordinates_of[name] = str(attrs.get("coordinates", ""))
        self._new_array(name, shape, dims, dtype, fill_value=fill_value, chunks=chunks, attrs=attrs)
        self.dims[name] = tuple(dims)
        self._attach_loose_coordinates()

    def _attach_loose_coordinates(self) -> None:
        # A coordinate no variable covers (node labels beside edge weights) is listed in the
        # group's own "coordinates" attribute, as xarray does, so readers still see a coordinate.
        covered = {c for name in self.dims for c in self._coordinates_of.get(name, "").split()}
        loose = sorted(c for c, cdims in self.coord_dims.items() if cdims != (c,) and c not in covered)
        if loose:
            self.store.set_attrs(self.name, {"coordinates": " ".join(loose)})
            self._group_coordinates = True
        elif self._group_coordinates:
            self.store.set_attrs(self.name, {}, remove=("coordinates",))
            self._group_coordinates = False

    @staticmethod
    def _chunks(dims, shape, separate=(), widths=None):
        chunks = list(map_chunks(dims, shape, separate))
        # A dimension written a span at a time (a batch of samples): chunks that divide the span,
        # or whole spans, so that a write covers whole chunks and never merges into a chunk an
        # earlier batch wrote.
        for dim, width in (widths or {}).items():
            position = dims.index(dim)
            chunks[position] = _aligned(chunks[position], width)
        # An appendable dimension: chunk it by one step, so appending never rewrites a chunk.
        return tuple(1 if d == "step" else c for d, c in zip(dims, chunks))

    def _new_array(self, name, shape, dims, dtype, *, fill_value, chunks, attrs=None):
        chunk_shape = tuple(max(1, c) for c in (chunks or shape)) or None
        if chunk_shape and "step" in dims:
            chunk_shape = tuple(1 if d == "step" else c for d, c in zip(dims, chunk_shape))
        attrs = dict(attrs or {})
        self.store.create_array(
            f"{self.name}/{name}", shape=shape, dims=dims, dtype=dtype, fill_value=fill_value, chunks=chunk_shape,
            attrs=attrs, bit_rounded="lossy_keepbits" in attrs,
        )

    def add_variable(self, name: str, values, dims: Sequence[str], *, attrs: Mapping | None = None) -> None:
        """Write a whole auxiliary variable at once (distances, an image, scores).

        Its dimensions must be known to the site or new auxiliary ones (``image_row``...); give it
        a ``role`` attribute (``"pairwise"``, ``"image"``, ...) as the spec asks.

        Examples
        --------
        >>> import numpy as np, tempfile, pathlib, attnformat
        >>> writer = attnformat.Writer(pathlib.Path(tempfile.mkdtemp()) / "x.zarr")
        >>> site = writer.create_site("self", sizes={"query": 3, "key": 3})
        >>> site.add_variable("distance", np.ones((3, 3)), ("query", "key"), attrs={"role": "pairwise", "units": "angstrom"})
        """
        if self.writer.region is not None:
            raise WriterError(f"{self.where}/{name}: a region writer writes declared variables only; declare {name!r} in the declaring writer")
        values = np.asarray(values)
        dims = tuple(dims)
        if values.ndim != len(dims):
            raise WriterError(f"{self.where}/{name}: {values.ndim}-d values for dimensions {dims}")
        for dim, size in zip(dims, values.shape):
            if self.sizes.setdefault(dim, size) != size:
                raise WriterError(f"{self.where}/{name}: dimension {dim!r} has size {self.sizes[dim]}, values have {size}")
        dtype = str if values.dtype.kind in "OUT" else values.dtype
        fill = np.nan if values.dtype.kind == "f" else None
        self._create_array(name, dims, dtype, fill_value=fill, attrs=attrs)
        self.store.write_all(f"{self.name}/{name}", values)
        self._fitted.add(name)  # written whole: its chunks stay as declared

    # -- writing -----------------------------------------------------------------------------
    def write(self, variable: str, values, **selection) -> None:
        """Write ``values`` into ``variable`` at the map(s) picked by ``selection``.

        ``selection`` picks one label per leading dimension (``layer=3``, ``head=0``,
        ``step=1200``, ``sample=1``), or a span of positions as a ``slice`` (``sample=slice(64,
        96)``: a batch of 32 samples written at samples 64 to 95, its axis kept in ``values``);
        ``values`` covers every dimension not picked by a label, in canonical order. A ``step``
        label greater than every step so far appends a step. Values are stored as the variable's
        dtype (:attr:`dtypes`).

        Examples
        --------
        >>> import numpy as np, tempfile, pathlib, attnformat
        >>> writer = attnformat.Writer(pathlib.Path(tempfile.mkdtemp()) / "x.zarr")
        >>> site = writer.create_site("self", sizes={"step": 0, "head": 2, "query": 2, "key": 2})
        >>> site.write("weights", np.full((2, 2, 2), 0.5), step=100)
        >>> site.write("weights", np.full((2, 2, 2), 0.5), step=200)
        >>> site.labels["step"]
        [100, 200]
        """
        self.writer._check_open()
        if variable not in self.dims:
            raise WriterError(f"{self.where}: no variable {variable!r}; declared: {', '.join(self.dims)}")
        dims = self.dims[variable]
        selection = self._in_region(variable, dims, selection)
        extra = [d for d in selection if d not in dims]
        if extra:
            raise WriterError(f"{self.where}/{variable}: cannot select {extra}; its dimensions are {dims}")
        spans = {dim: label for dim, label in selection.items() if isinstance(label, slice)}
        for dim in self.growing & (set(selection) - set(spans)):
            if selection[dim] not in self.labels[dim]:
                self.append_label(dim, selection[dim])
        region = []
        for dim in dims:
            if dim in spans:
                region.append(self._span(variable, dim, spans[dim]))
            elif dim in selection:
                region.append(self._position(variable, dim, selection[dim]))
            else:
                region.append(slice(None))
        expected = tuple(part.stop - part.start if dim in spans else self.sizes[dim]
                         for dim, part in zip(dims, region) if dim not in selection or dim in spans)
        values = np.asarray(values)
        if self.dtypes[variable].kind != "f" and values.dtype.kind == "f":
            values = np.where(np.isnan(values), -1, values)  # NaN (no key) is -1 in an index
        values = values.astype(self.dtypes[variable], copy=False)
        where = ", ".join(f"{d}={_shown(selection[d])}" for d in selection)
        if values.shape != expected:
            raise WriterError(
                f"{self.where}/{variable} [{where}]: values have shape {values.shape}, expected {expected} "
                f"for dimensions {tuple(d for d in dims if d not in selection or d in spans)}"
            )
        if variable in self.keepbits and values.dtype.kind == "f":
            values = bitround(values, self.keepbits[variable])
        if variable not in self._fitted and is_map(dims):
            # The first write shows how the caller writes: chunks then hold what one write covers
            # (grouped up to the minimum chunk size), so later writes rarely merge into a chunk.
            separate = tuple(d for d in selection if d not in spans)
            widths = {dim: part.stop - part.start for dim, part in zip(dims, region) if dim in spans}
            self.store.rechunk(f"{self.name}/{variable}", self._chunks(dims, tuple(self.sizes[d] for d in dims), separate=separate, widths=widths))
        self._fitted.add(variable)
        self._check_inside(variable, dims, region)
        self.store.write(f"{self.name}/{variable}", tuple(region), values, f"{self.where}/{variable} [{where}]")

    def write_coordinate(self, name: str, values, **selection) -> None:
        """Write part of a coordinate declared with ``create_site(coords=...)``.

        ``selection`` picks positions as in :meth:`write` (``sample=slice(64, 96)``): a batch's
        labels, masks or positions written where its samples go.

        Examples
        --------
        >>> import numpy as np, tempfile, pathlib, attnformat
        >>> writer = attnformat.Writer(pathlib.Path(tempfile.mkdtemp()) / "x.zarr")
        >>> site = writer.create_site("self", sizes={"sample": 4, "query": 2, "key": 2},
        ...                           coords={"query_mask": (("sample", "query"), np.zeros((4, 2), bool))})
        >>> site.write_coordinate("query_mask", np.ones((2, 2), bool), sample=slice(2, 4))
        """
        self.writer._check_open()
        if name not in self.coord_dims:
            raise WriterError(f"{self.where}: no coordinate {name!r}; declared: {', '.join(self.coord_dims)}")
        dims = self.coord_dims[name]
        selection = self._in_region(name, dims, selection)
        extra = [d for d in selection if d not in dims]
        if extra:
            raise WriterError(f"{self.where}/{name}: cannot select {extra}; its dimensions are {dims}")
        region, expected = [], []
        for dim in dims:
            if dim in selection and isinstance(selection[dim], slice):
                part = self._span(name, dim, selection[dim])
                region.append(part)
                expected.append(part.stop - part.start)
            elif dim in selection:
                region.append(self._position(name, dim, selection[dim]))
            else:
                region.append(slice(None))
                expected.append(self.sizes[dim])
        values = np.asarray(values)
        where = ", ".join(f"{d}={_shown(selection[d])}" for d in selection)
        if values.shape != tuple(expected):
            raise WriterError(f"{self.where}/{name} [{where}]: values have shape {values.shape}, expected {tuple(expected)}")
        if values.dtype.kind in "OUT":
            values = values.astype(object)
        self._check_inside(name, dims, region)
        self.store.write(f"{self.name}/{name}", tuple(region), values, f"{self.where}/{name} [{where}]")

    def _span(self, variable: str, dim: str, span: slice) -> slice:
        """Positions ``[start, stop)`` of a ``slice`` selection, inside the dimension."""
        if dim in self.growing:
            raise WriterError(f"{self.where}/{variable}: {dim} grows label by label; select one {dim} at a time, not {_shown(span)}")
        start, stop, step = span.indices(self.sizes[dim])
        if step != 1 or stop <= start or (span.stop is not None and span.stop > self.sizes[dim]):
            raise WriterError(f"{self.where}/{variable}: {dim}={_shown(span)} is not a span of positions inside 0..{self.sizes[dim] - 1}")
        return slice(start, stop)

    def _position(self, variable: str, dim: str, label) -> int:
        labels = self.labels.get(dim)
        if labels is None:
            raise WriterError(f"{self.where}/{variable}: dimension {dim!r} cannot be selected")
        try:  # the library's one rule for selectors (attnformat.resolving)
            return position(dim, label, size=len(labels), index=np.asarray(labels), where=f"{self.where}/{variable}")
        except SelectionError as error:
            raise WriterError(f"{error}; declare it, or write a growing dimension's next label") from None

    def append_label(self, dim: str, label) -> None:
        """Grow the site by one entry along a leading dimension, labelled ``label``.

        ``step`` grows this way on its own when a new step is written; any other leading
        dimension declared with size 0 (``sizes={"layer": 0, ...}``) grows when a new label is
        written, for code that does not know how many layers it will see. Steps must increase;
        other labels must be new. A dimension that other coordinates depend on (``sample`` with
        per-sample labels) cannot grow.

        Examples
        --------
        >>> import numpy as np, tempfile, pathlib, attnformat
        >>> writer = attnformat.Writer(pathlib.Path(tempfile.mkdtemp()) / "x.zarr")
        >>> site = writer.create_site("self", sizes={"layer": 0, "query": 2, "key": 2})
        >>> for layer in (0, 1, 2):
        ...     site.write("weights", np.full((2, 2), 0.5), layer=layer)
        >>> site.labels["layer"]
        [0, 1, 2]
        """
        labels = self.labels.get(dim)
        dependents = [name for name, dims in self.coord_dims.items() if dim in dims and name != dim]
        if self.writer.region is not None or self._regions:
            raise WriterError(f"{self.where}: dimensions do not grow in a store written by regions; declare every {dim} in advance")
        if labels is None or dim not in LEADING_DIMS or dependents:
            raise WriterError(f"{self.where}: dimension {dim!r} cannot grow" + (f" ({', '.join(dependents)} depend on it)" if dependents else ""))
        if dim == "step":
            label = int(label)
            if labels and label <= labels[-1]:
                raise WriterError(f"{self.where}: step {label} comes after step {labels[-1]}; steps must increase [ATTN-COORD-001]")
        elif label in labels:
            raise WriterError(f"{self.where}: {dim}={label!r} exists already")
        labels.append(label)
        self.sizes[dim] = len(labels)
        for name, dims in [*self.dims.items(), (dim, (dim,))]:
            if dim in dims:
                self.store.resize(f"{self.name}/{name}", tuple(self.sizes[d] for d in dims))
        self.store.write(f"{self.name}/{dim}", (len(labels) - 1,), np.asarray(label), f"{self.where}/{dim} [{dim}={label!r}]")


def _region_chunks(dims, chunks, regions: Mapping[str, int]) -> tuple[int, ...]:
    """``chunks`` with the length along each region dimension a divisor of the region width, so
    that a region of whole widths holds whole chunks.

    Examples
    --------
    >>> _region_chunks(("sample", "query"), (12, 5), {"sample": 4}), _region_chunks(("sample",), (3,), {"sample": 4})
    ((4, 5), (4,))
    """
    chunks = list(chunks)
    for dim, width in regions.items():
        if dim in dims:
            position = list(dims).index(dim)
            chunks[position] = min(_aligned(max(1, chunks[position]), width), width)
    return tuple(chunks)


def _checked_regions(path: Path, regions) -> dict[str, int]:
    if regions is None:
        return {}
    if not isinstance(regions, Mapping) or len(regions) != 1:
        raise WriterError(f"{path}: regions must name one dimension and its region width, e.g. {{'sample': 8}}, not {regions!r}")
    (dim, width), = regions.items()
    if dim not in LEADING_DIMS or not isinstance(width, (int, np.integer)) or isinstance(width, bool) or width < 1:
        raise WriterError(f"{path}: regions={{{dim!r}: {width!r}}}: a leading dimension ({', '.join(LEADING_DIMS)}) and a positive width")
    return {dim: int(width)}


def _ledger_path(path: Path) -> Path:
    """Where the region writers of ``path`` keep their bookkeeping: ``<path>.regions``."""
    return path.with_name(path.name + ".regions")


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _seal_declared(path: Path, store_path: Path, ledger: RegionLedger, *, complete: bool) -> None:
    """Seal a store written by regions (completeness, manifest, consolidated metadata), drop its
    bookkeeping and move (or convert) it into place. Runs under the ledger's lock."""
    declaration = ledger.declaration() or {}
    store = reopen_store(store_path, [])
    store.finish({ROOT_COMPLETENESS: "complete" if complete else "incomplete"})
    overwrite = bool(declaration.get("overwrite", False))
    if path.exists() and not overwrite:
        raise AttnFormatError(f"{path}: appeared while writing; the data is kept in {store_path}")
    ledger.remove()
    if engine_name_for_path(path) == "zarr":
        move_into_place(store_path, path)
        return
    from attnformat.saving import convert

    convert(store_path, path, overwrite=overwrite, zarr_format=int(declaration.get("zarr_format", 3)))
    shutil.rmtree(store_path)


def finalize(path: str | os.PathLike, *, allow_incomplete: bool = False) -> Path:
    """Seal a store that several processes wrote by regions and put it at ``path``.

    Region writers do this themselves when the last region is written (``Writer(...,
    finalize=True)``, the default); call it when they were told not to, or to keep what a run
    that lost a process wrote.

    Parameters
    ----------
    path
        The destination given to the declaring :class:`Writer`.
    allow_incomplete : bool, default False
        Seal even if regions are missing: the file then says ``completeness = "incomplete"`` and
        its missing maps read as NaN. Without it, missing regions are an error naming them.

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib, attnformat
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "run.zarr"
    >>> with attnformat.Writer(out, regions={"sample": 2}) as declaring:
    ...     _ = declaring.create_site("self", sizes={"sample": 4, "query": 2, "key": 2})
    >>> for start in (0, 2):
    ...     with attnformat.Writer(out, mode="r+", region={"sample": slice(start, start + 2)}, finalize=False) as w:
    ...         w.sites["self"].write("weights", np.full((2, 2, 2), 0.5))
    >>> finalize(out).name, attnformat.is_complete(attnformat.open(out))
    ('run.zarr', True)
    """
    path = Path(path)
    store_path = path.with_name(path.name + PARTIAL_SUFFIX)
    ledger = RegionLedger(store_path, _ledger_path(path))
    if not store_path.is_dir() or ledger.declaration() is None:
        raise WriterError(f"{path}: no store declared for regions at {store_path}")
    declaration = ledger.declaration()
    missing = ledger.missing()
    if missing and not allow_incomplete:
        shown = ", ".join(f"{declaration['dim']}={a}:{b}" for a, b in missing)
        raise WriterError(f"{path}: regions {shown} are not written (yet); write them, or pass allow_incomplete=True to keep it marked incomplete")
    try:
        with ledger._locked():
            _seal_declared(path, store_path, ledger, complete=not ledger.missing())
    except FileNotFoundError:
        raise WriterError(f"{path}: sealed meanwhile by a region writer") from None
    return path


def _aligned(chunk: int, width: int) -> int:
    """A chunk length near ``chunk`` for a dimension written ``width`` entries at a time: a
    multiple of ``width`` when ``chunk`` is at least that, else the smallest divisor of ``width``
    from ``chunk`` on.

    Examples
    --------
    >>> _aligned(40, 32), _aligned(100, 32), _aligned(5, 32), _aligned(1, 32)
    (32, 96, 8, 1)
    """
    if chunk >= width:
        return width * (chunk // width)
    return next(d for d in range(max(1, chunk), width + 1) if width % d == 0)


def _shown(label) -> str:
    if isinstance(label, slice):
        return f"{label.start or 0}:{label.stop if label.stop is not None else ''}"
    return str(label)


def _split_coord_spec(name: str, spec) -> tuple[tuple[str, ...], np.ndarray]:
    """``(dims, values)`` from a coordinate given as ``(dims, values)`` or as bare values of ``name``."""
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], (str, tuple)) and not isinstance(spec[1], str):
        dims = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])
        return dims, np.asarray(spec[1])
    return (name,), np.asarray(spec)
