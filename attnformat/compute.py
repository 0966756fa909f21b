"""Whole-file computations as dask graphs over the stored chunks: bounded memory, every local
core, or a ``dask.distributed`` cluster.

Three pieces, used by :func:`attnformat.open` (``chunks=``), the statistics
(:func:`attnformat.viewer.statistics.statistics_summary`, ``attnformat stats``), the validator's
value checks (:func:`attnformat.validate`, ``attnformat validate``), head means
(:func:`head_mean`) and the rollout over layers (:func:`attnformat.viewer.rollout.attention_rollout`):

* **Chunk plans** (:func:`plan_chunks`): dask chunks are whole multiples of the chunks the file
  stores (never a stored chunk cut in two, so that no chunk is decoded twice), merged up to a
  target size so that the task count stays sane. Plain xarray + dask on a file of many small maps
  makes one task per stored chunk and per operation (14,400 tasks for 45 MB); merged to dask's
  ``array.chunk-size`` (128 MiB by default) the same file is one task per variable.
* **Node references** (:class:`NodeRef`): a task names the file and the group it reads, and opens
  the file in the process it runs in (once per process). Every read goes through the engine's
  checked road (CRC-32C, decoded sizes, links refused, missing chunks of a complete file are
  damage): nothing here decodes a chunk itself.
* **Schedulers** (:func:`run`): ``scheduler=`` takes ``"threads"`` (the default),
  ``"processes"``, ``"synchronous"``, a ``dask.distributed.Client`` or a scheduler address
  (``"tcp://10.0.0.5:8786"``; connecting gives up after :data:`CONNECT_TIMEOUT` seconds with one
  line saying so). Threads are the default because what a task does releases the GIL: Blosc and
  zstd decompression and numpy's reductions over blocks of millions of values run outside it,
  and a task's result (per-map partial sums) needs no copy back. Measured with
  ``benchmarks/bench_scale.py`` on a shared 2-core machine: ``stats`` of the 12 x 12 x 2048^2 file
  took 20.7 s with threads and 26.7 s with processes (load 1.5), 24.8 s and 26.3 s (load 4.7);
  of a 4 x 4 x 1024^2 file, 2.0 s and 20.0 s: processes pay for starting workers, importing xarray
  and zarr in each and opening the file again there. A progress bar (dask's) is drawn on stderr for
  work that lasts more than a second when stderr is a terminal (``progress=True/False`` forces it).

Errors raised in a task (a damaged chunk: :class:`~attnformat.errors.BrokenStoreError`) reach the
caller as the same class with the same message, rule id and location, whichever process raised it.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from itertools import product
from typing import Any

import numpy as np

from attnformat.errors import AttnFormatError, MissingDependencyError

#: Seconds to wait for a dask.distributed scheduler named by address before giving up.
CONNECT_TIMEOUT = 5.0
#: Names ``scheduler=`` accepts besides a Client or an address.
LOCAL_SCHEDULERS = ("threads", "processes", "synchronous")
_ALIASES = {"threading": "threads", "threaded": "threads", "multiprocessing": "processes", "sync": "synchronous",
            "single-threaded": "synchronous"}
#: Stored bytes one task of attnformat's own graphs reads (statistics, value checks): whole stored
#: chunks up to this much, so that a 2-core machine gets a few tasks per core and a task's working
#: memory (float64 copies and temporaries, about 10x the float32 bytes it reads at a time) stays far
#: below a gigabyte. Tasks stream their region in smaller blocks where a map is large.
TASK_BYTES = 32 << 20


# -- chunk plans ------------------------------------------------------------------------------------


def _default_target() -> int:
    import dask

    from dask.utils import parse_bytes

    return int(parse_bytes(dask.config.get("array.chunk-size", "128MiB")))


def plan_chunks(dims: tuple[str, ...], shape: tuple[int, ...], stored: tuple[int, ...], itemsize: int,
                chunks: str | Mapping[str, Any] = "auto", target_bytes: int | None = None) -> tuple[tuple[int, ...], ...]:
    """Dask chunks for one variable, in whole multiples of its stored chunks.

    Parameters
    ----------
    dims, shape
        The variable's dimension names and sizes.
    stored
        The shape of one stored chunk (a shard for sharded Zarr arrays).
    itemsize
        Bytes per element (for the size target).
    chunks
        ``"auto"``: stored chunks merged, from the last dimension outwards, up to ``target_bytes``;
        ``"stored"`` or ``{}``: one dask chunk per stored chunk; a dict ``{dim: n}`` with ``n``
        a number of elements (rounded to the nearest multiple of the stored chunk, at least one),
        ``-1`` or ``None`` (the whole dimension) or ``"auto"`` (merged up to the target); dims not
        named keep the stored chunk.
    target_bytes
        Size a merged chunk may reach; dask's ``array.chunk-size`` (128 MiB) by default.

    Returns
    -------
    tuple of tuple of int
        Dask's normalized chunks: per dimension, the chunk lengths.

    Examples
    --------
    >>> dims, shape = ("layer", "head", "query", "key"), (12, 12, 2048, 2048)
    >>> [c[:2] for c in plan_chunks(dims, shape, (1, 1, 2048, 2048), 4)]
    [(1, 1), (6, 6), (2048,), (2048,)]
    >>> plan_chunks(dims, shape, (1, 1, 2048, 2048), 4, "stored")[1][:3]
    (1, 1, 1)
    >>> plan_chunks(("head", "query", "key"), (4, 6, 6), (2, 6, 6), 4, {"head": 3})
    ((4,), (6,), (6,))
    """
    if chunks is None:
        raise ValueError("chunks=None means no dask arrays; there is no plan to make")
    stored = tuple(max(1, min(int(c), int(s))) if s else 1 for c, s in zip(stored, shape))
    if isinstance(chunks, str):
        if chunks not in ("auto", "stored"):
            raise AttnFormatError(f"chunks={chunks!r}: use 'auto', 'stored', {{}} or a dict of dimension: size")
        wanted = dict.fromkeys(dims, "auto" if chunks == "auto" else "stored")
    elif isinstance(chunks, Mapping):
        # Dims this variable does not have are ignored: one dict serves every variable of a file.
        wanted = {dim: chunks.get(dim, "stored") for dim in dims}
    else:
        raise AttnFormatError(f"chunks={chunks!r}: use 'auto', 'stored', {{}}, None or a dict of dimension: size")
    sizes = list(stored)
    for position, (dim, size) in enumerate(zip(dims, shape)):
        value = wanted[dim]
        if value in (-1, None):
            sizes[position] = max(1, size)
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            if value <= 0:
                raise AttnFormatError(f"chunks: {dim}={value}: a chunk size is a positive number of elements (or -1 for the whole dimension)")
            multiple = max(1, round(int(value) / stored[position]))
            sizes[position] = min(max(1, size), multiple * stored[position])
        elif value not in ("auto", "stored"):
            raise AttnFormatError(f"chunks: {dim}={value!r}: use a number of elements, -1, 'auto' or 'stored'")
    target = _default_target() if target_bytes is None else int(target_bytes)
    for position in reversed(range(len(dims))):
        if wanted[dims[position]] != "auto":
            continue
        count = math.ceil(shape[position] / sizes[position]) if shape[position] else 1
        if count == 1:
            continue  # already whole: merging goes on along the next dimension out
        chunk_bytes = math.prod(sizes) * itemsize
        factor = min(count, max(1, target // max(1, chunk_bytes)))
        if factor <= 1:
            break  # dims further out would only be merged across chunks this one has not filled
        pieces = math.ceil(count / factor)
        sizes[position] = min(max(1, shape[position]), math.ceil(count / pieces) * sizes[position])
        if math.ceil(shape[position] / sizes[position]) > 1:
            break
    return tuple(_lengths(size, chunk) for size, chunk in zip(shape, sizes))


def _lengths(size: int, chunk: int) -> tuple[int, ...]:
    if size == 0:
        return (0,)
    return tuple(min(chunk, size - start) for start in range(0, size, chunk))


def regions(chunks: tuple[tuple[int, ...], ...]) -> list[tuple[slice, ...]]:
    """Every block of a chunk plan as a tuple of slices, in C order.

    Examples
    --------
    >>> regions(((2, 1), (3,)))
    [(slice(0, 2, None), slice(0, 3, None)), (slice(2, 3, None), slice(0, 3, None))]
    """
    bounds = []
    for lengths in chunks:
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(int).tolist()
        bounds.append([slice(a, b) for a, b in zip(starts[:-1], starts[1:])])
    return list(product(*bounds))


def stored_chunk_shape(variable) -> tuple[int, ...] | None:
    """The stored chunk shape of a variable of an opened file (its ``preferred_chunks``), or None.

    Examples
    --------
    >>> import attnformat
    >>> stored_chunk_shape(attnformat.open(attnformat.example_path("dense"))["encoder/self"].variables["weights"])
    (2, 3, 6, 6)
    """
    preferred = variable.encoding.get("preferred_chunks")
    if not preferred:
        return None
    return tuple(int(preferred.get(dim, size) or size) for dim, size in zip(variable.dims, variable.shape))


# -- dask-backed trees --------------------------------------------------------------------------------


class _ChunkSource:
    """What ``dask.array.from_array`` reads one variable through: the lazy variable of the opened
    tree in this process, the file reopened by path in any other (a worker of a cluster)."""

    def __init__(self, variable, where: NodeRef, name: str):
        self.shape, self.dtype, self.ndim = tuple(variable.shape), variable.dtype, variable.ndim
        self.where, self.name = where, name
        self._variable = variable

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_variable"] = None
        state["where"] = self.where  # NodeRef pickles by path (or refuses for in-memory trees)
        return state

    def __getitem__(self, key):
        variable = self._variable
        if variable is None:
            variable = self._variable = self.where.node().variables[self.name]
        return np.asarray(variable[key].values)


def chunked(tree, chunks: str | Mapping[str, Any] = "auto", *, target_bytes: int | None = None):
    """The tree with its stored variables backed by dask arrays aligned with the stored chunks.

    Variables the engine reads lazily (everything but small coordinates) become dask arrays whose
    chunks :func:`plan_chunks` makes; indexes and in-memory coordinates stay numpy. Each dask
    chunk is read with one call to the engine's checked road, in whichever process computes it.

    Parameters
    ----------
    tree
        A tree from :func:`attnformat.open` (without ``chunks``).
    chunks
        As for :func:`plan_chunks`.
    target_bytes
        The merge target for ``"auto"`` (dask's ``array.chunk-size`` by default).

    Examples
    --------
    >>> import attnformat
    >>> tree = chunked(attnformat.open(attnformat.example_path("dense")))
    >>> tree["encoder/self"]["weights"].chunks
    ((2,), (3,), (6,), (6,))
    """
    import dask.array as da
    import xarray as xr

    datasets = {}
    token = uuid.uuid4().hex[:12]
    for node in tree.subtree:
        dataset = node.to_dataset(inherit=False)
        reference = NodeRef(node)
        replaced = {}
        for name, variable in dataset.variables.items():
            stored = stored_chunk_shape(variable)
            if stored is None or name in dataset.indexes or variable.ndim == 0:
                continue
            plan = plan_chunks(variable.dims, variable.shape, stored, variable.dtype.itemsize, chunks, target_bytes)
            source = _ChunkSource(variable, reference, name)
            data = da.from_array(source, chunks=plan, name=f"attnformat-{token}-{node.path}/{name}", lock=False,
                                 asarray=False, fancy=False, meta=np.empty((0,) * variable.ndim, dtype=variable.dtype))
            replaced[name] = xr.Variable(variable.dims, data, variable.attrs, encoding=dict(variable.encoding))
        datasets[node.path] = dataset.assign(replaced) if replaced else dataset
    result = xr.DataTree.from_dict(datasets)
    result.encoding = dict(tree.encoding)
    result.set_close(tree.close)
    return result


# -- finding a node in any process --------------------------------------------------------------------

_OPENED: dict = {}
_OPENED_LOCK = threading.Lock()


def _stamp(location) -> tuple:
    """What changes when a local file is replaced or rewritten (a new store moved into place has a
    new inode): a worker that kept the old version open opens the new one. URLs: nothing cheap."""
    if location.is_url:
        return ()
    try:
        status = os.stat(location.path)
    except OSError:
        return ()
    return status.st_ino, status.st_mtime_ns, status.st_size


def _opened(location):
    """The tree of ``location`` opened once per process (tasks of one computation share it)."""
    key = (location.text, repr(sorted(dict(location.storage_options).items())), _stamp(location))
    with _OPENED_LOCK:
        tree = _OPENED.get(key)
        if tree is None:
            for old in [k for k in _OPENED if k[:2] == key[:2]]:  # an older version of this file
                _OPENED.pop(old).close()
            from attnformat.reading import open as open_tree

            if len(_OPENED) >= 8:  # a long-lived worker sees many files: keep the last few open
                _OPENED.pop(next(iter(_OPENED))).close()
            tree = _OPENED[key] = open_tree(location)
        return tree


class NodeRef:
    """A group of an opened file that a task can find in whichever process runs it.

    In the process that opened the file it is the node itself; pickled (for worker processes or a
    cluster), it is the file's location and the group's path, and the file is opened again there
    (screened and checked like any open). An in-memory tree has no location: it is computed in
    this process only (``threads`` or ``synchronous``).

    Examples
    --------
    >>> import attnformat, pickle
    >>> tree = attnformat.open(attnformat.example_path("dense"))
    >>> pickle.loads(pickle.dumps(NodeRef(tree["encoder/self"]))).node().sizes["head"]
    3
    """

    def __init__(self, node):
        self.path = node.path
        self.location = node.root.encoding.get("location")
        self._node = node

    @property
    def portable(self) -> bool:
        """True when another process can open this node (the tree came from a file)."""
        return self.location is not None

    def __getstate__(self):
        if self.location is None:
            raise AttnFormatError(f"{self.path}: a tree that is not one file (built in memory, or joined from several "
                                  "files) can be computed with scheduler='threads' or 'synchronous' only; save it to a "
                                  "file for other processes or a cluster")
        return {"path": self.path, "location": self.location, "_node": None}

    def node(self):
        """The node, opening the file in this process if needed."""
        if self._node is None:
            self._node = _opened(self.location)[self.path]
        return self._node


# -- schedulers -----------------------------------------------------------------------------------------


class _Failure:
    """An attnformat error raised in a task, carried back as a value: exceptions with required
    constructor arguments (``BrokenStoreError(message, rule_id, location)``) do not survive
    pickling by themselves."""

    def __init__(self, error: AttnFormatError):
        self.error = error

    def __reduce__(self):
        error = self.error
        return _rebuild_failure, (type(error), error.args, dict(error.__dict__))


def _rebuild_failure(cls, args, state) -> _Failure:
    # Built without __init__ (whose required arguments are not in ``args``), through the __new__ of
    # the built-in base that lays the object out (OSError's for UnreadableFileError and kin).
    base = OSError if issubclass(cls, OSError) else BaseException
    error = base.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return _Failure(error)


def task(function: Callable) -> Callable:
    """Wrap a task function so that attnformat errors reach the caller intact from any process.

    Examples
    --------
    >>> from attnformat.errors import BrokenStoreError
    >>> def broken():
    ...     raise BrokenStoreError("run.zarr: chunk 0.0 is damaged", "ATTN-STORE-005", "/w")
    >>> try:
    ...     unwrap([task(broken)()])
    ... except BrokenStoreError as error:
    ...     print(error.rule_id, error.location)
    ATTN-STORE-005 /w
    """
    return _TaskFunction(function)


class _TaskFunction:
    """A picklable task wrapper (closures are not, with the standard pickle)."""

    def __init__(self, function: Callable):
        self.function = function
        self.__name__ = getattr(function, "__name__", "task")

    def __call__(self, *args, **kwargs):
        try:
            return self.function(*args, **kwargs)
        except AttnFormatError as error:
            return _Failure(error)


def unwrap(results: Iterable) -> list:
    """Results of :func:`task` functions, raising the first attnformat error one of them met."""
    results = list(results)
    for result in results:
        if isinstance(result, _Failure):
            raise result.error
    return results


def scheduler_name(scheduler) -> str:
    """What a ``scheduler=`` value means, for messages and checks: a local scheduler's name or
    ``"distributed"``.

    Examples
    --------
    >>> scheduler_name(None), scheduler_name("sync"), scheduler_name("tcp://127.0.0.1:8786")
    ('threads', 'synchronous', 'distributed')
    """
    if scheduler is None:
        return "threads"
    if isinstance(scheduler, str):
        name = _ALIASES.get(scheduler, scheduler)
        if name in LOCAL_SCHEDULERS:
            return name
        if "://" in name or ":" in name:
            return "distributed"
        raise AttnFormatError(f"scheduler {scheduler!r}: use threads, processes, synchronous, "
                              "or a dask.distributed scheduler address such as tcp://HOST:8786")
    if hasattr(scheduler, "compute") and hasattr(scheduler, "gather"):
        return "distributed"
    raise AttnFormatError(f"scheduler={scheduler!r}: use 'threads', 'processes', 'synchronous', a "
                          "dask.distributed Client or a scheduler address")


def connect(address: str, timeout: float = CONNECT_TIMEOUT):
    """A ``dask.distributed.Client`` for a scheduler address; gives up after ``timeout`` seconds.

    Parameters
    ----------
    address
        ``tcp://HOST:PORT`` (or ``HOST:PORT``).
    timeout
        Seconds to wait for the scheduler.

    Raises
    ------
    attnformat.errors.AttnFormatError
        When the scheduler does not answer in time (one line naming the address).
    attnformat.errors.MissingDependencyError
        When ``dask.distributed`` is not installed.

    Examples
    --------
    >>> try:
    ...     connect("tcp://127.0.0.1:1", timeout=0.5)
    ... except AttnFormatError as error:
    ...     print(str(error).split(":")[0])
    cannot reach the dask scheduler at tcp
    """
    try:
        from distributed import Client
    except ImportError as error:
        raise MissingDependencyError("a dask.distributed scheduler address needs the 'distributed' package", "cluster") from error
    import dask

    try:
        with dask.config.set({"distributed.comm.timeouts.connect": f"{timeout}s"}):
            return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise AttnFormatError(f"cannot reach the dask scheduler at {address} within {timeout:g} s ({problem})") from error


def progress_wanted(progress: bool | None) -> bool:
    """``progress=None``: a bar only when stderr is a terminal.

    Examples
    --------
    >>> progress_wanted(False), progress_wanted(True)
    (False, True)
    """
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


def portable(scheduler) -> bool:
    """True when ``scheduler`` runs tasks in other processes (their arguments are pickled).

    Examples
    --------
    >>> portable("threads"), portable("processes")
    (False, True)
    """
    return scheduler_name(scheduler) in ("processes", "distributed")


def run(tasks: list, *, scheduler=None, progress: bool | None = None, workers: int | None = None) -> list:
    """Compute dask objects (``dask.delayed`` tasks, dask arrays) with the chosen scheduler.

    Parameters
    ----------
    tasks
        What to compute; results come back in the same order.
    scheduler
        ``"threads"`` (default: every core), ``"processes"``, ``"synchronous"``, a
        ``dask.distributed.Client`` or a scheduler address.
    progress
        Draw a progress bar on stderr (None: when stderr is a terminal; shown for work longer
        than a second).
    workers
        Threads or processes of a local scheduler (default: every CPU).

    Returns
    -------
    list
        The computed values, attnformat errors re-raised (:func:`unwrap`).

    Examples
    --------
    >>> import dask
    >>> run([dask.delayed(sum)([1, 2]), dask.delayed(max)(3, 4)], scheduler="synchronous")
    [3, 4]
    """
    import dask

    name = scheduler_name(scheduler)
    if not tasks:
        return []
    if name == "distributed":
        client = connect(scheduler) if isinstance(scheduler, str) else scheduler
        try:
            futures = client.compute(list(tasks))
            if progress_wanted(progress):
                from distributed import progress as distributed_progress

                distributed_progress(futures, notebook=False)
                print(file=sys.stderr)
            return unwrap(client.gather(futures))
        finally:
            if isinstance(scheduler, str):
                client.close()
    bar = nullcontext()
    if progress_wanted(progress):
        from dask.diagnostics import ProgressBar

        bar = ProgressBar(minimum=1.0, out=sys.stderr)
    options = {"scheduler": name}
    if name == "processes":
        options["num_workers"] = workers or os.cpu_count() or 1
    if name != "threads":
        with bar:
            return unwrap(dask.compute(*tasks, **options))
    # A pool of our own for each computation: dask's threaded scheduler caches its pools per
    # thread, and a child forked after one was made (a fork-based worker pool, a test harness)
    # would hand its tasks to threads that do not exist in the child and wait forever.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1, thread_name_prefix="attnformat-compute") as pool:
        with bar:
            return unwrap(dask.compute(*tasks, scheduler="threads", pool=pool))


def delayed(function: Callable, *args, **kwargs):
    """A ``dask.delayed`` call of ``function`` wrapped by :func:`task` (impure: always run).

    Examples
    --------
    >>> run([delayed(pow, 2, 5)], scheduler="synchronous")
    [32]
    """
    import dask

    return dask.delayed(task(function), pure=False)(*args, **kwargs)


def check_portable(node, scheduler) -> None:
    """Raise at once (not in a worker) when an in-memory tree is sent to other processes.

    Examples
    --------
    >>> import xarray as xr
    >>> check_portable(xr.DataTree(), "threads")
    """
    if portable(scheduler) and node.root.encoding.get("location") is None:
        raise AttnFormatError("a tree that is not one file (built in memory, or joined from several files) can be "
                              "computed with scheduler='threads' or 'synchronous' only; save it to a file for other "
                              "processes or a cluster")


def batches(items: list, weight: Callable[[Any], int], budget: int) -> list[list]:
    """Consecutive items grouped so that each group weighs about ``budget`` (one item at least).

    Examples
    --------
    >>> batches([1, 1, 1, 5, 1], weight=lambda x: x, budget=2)
    [[1, 1], [1], [5], [1]]
    """
    groups, current, total = [], [], 0
    for item in items:
        size = weight(item)
        if current and total + size > budget:
            groups.append(current)
            current, total = [], 0
        current.append(item)
        total += size
    if current:
        groups.append(current)
    return groups


# -- head means -----------------------------------------------------------------------------------------


def _head_mean_block(where: NodeRef, name: str, region: dict) -> np.ndarray:
    variable = where.node().variables[name]
    values = np.asarray(variable.isel(region).values, dtype=np.float64)
    axis = variable.dims.index("head")
    with np.errstate(invalid="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(values, axis=axis)


def head_mean(node, variable: str = "weights", *, scheduler=None, progress: bool | None = None) -> np.ndarray:
    """The mean over heads of a site's variable (NaN, not captured, left out), chunk by chunk.

    Each task reads whole stored chunks covering every head of a block of the other dimensions,
    so memory holds a few blocks, never the variable.

    Parameters
    ----------
    node
        A site of a tree from :func:`attnformat.open`.
    variable
        The variable to average (it must have a ``head`` dimension).
    scheduler, progress
        As for :func:`run`.

    Returns
    -------
    numpy.ndarray
        float64, the variable's dims without ``head``.

    Examples
    --------
    >>> import attnformat
    >>> site = attnformat.open(attnformat.example_path("dense"))["encoder/self"]
    >>> mean = head_mean(site, scheduler="synchronous")
    >>> mean.shape, bool(abs(mean[0].sum(axis=-1) - 1).max() < 1e-6)
    ((2, 6, 6), True)
    """
    check_portable(node, scheduler)
    source = node.variables[variable]
    if "head" not in source.dims:
        raise AttnFormatError(f"{node.path}/{variable} has no head dimension to average over")
    stored = stored_chunk_shape(source) or tuple(source.shape)
    wanted = {dim: ("auto" if dim != "head" else -1) for dim in source.dims}
    plan = plan_chunks(source.dims, source.shape, stored, 8, wanted, target_bytes=TASK_BYTES)
    where = NodeRef(node)
    blocks = regions(plan)
    tasks = [delayed(_head_mean_block, where, variable, dict(zip(source.dims, block))) for block in blocks]
    result = np.empty([size for dim, size in zip(source.dims, source.shape) if dim != "head"])
    axis = source.dims.index("head")
    for block, values in zip(blocks, run(tasks, scheduler=scheduler, progress=progress)):
        result[block[:axis] + block[axis + 1:]] = values
    return result
