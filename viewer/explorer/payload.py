"""What the explorer page shows, selected in Python: the payload.

The page (:mod:`attnformat.viewer.explorer.page`) only draws; everything it draws is chosen and
encoded here, from the file's own labels, masks, groups and attributes (through
:mod:`attnformat.viewer.selection`, the same preparers the static plots use).

Encoding, decided: every map is quantized to 8 bits with its own affine scale,
``value = offset + scale * q`` for ``q`` in 0..254, and ``q = 255`` marks a cell with no value
(NaN: masked, padding, not an edge, not kept by a top-k site, not captured; also ``-inf`` logits).
The largest error is ``scale / 2`` (``max_error``, stated in the payload and in the page), i.e.
1/508 of the map's own range; float16 would double the bytes for precision no screen shows. A map
of ``R x C`` cells is ``R * C`` bytes of codes; the embedded page deflates them (zlib, level 6,
when that saves 10% or more; the browser inflates with its own ``DecompressionStream``) and
writes base64 text. A 128-token map is 16 KiB of codes, ~9 KiB of page for softmax weights
(21.3 KiB without deflate); 6 layers x 12 heads plus the 6 head means of such a file make a
~0.85 MB page (1.83 MB without deflate), under the issue's 2 MB budget either way.

Budget, decided: ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`) bounds the base64 text of the
embedded maps. By default the page embeds, for every site, the first sample, every step, every
layer, every head and the head mean of the default variable (``weights`` when the file has it).
How well the file's maps deflate is measured on its first two maps (with a 25% margin). When
everything does not fit, every map is block-pooled (NaN-aware *mean*, see :func:`pool_map`) to
the same largest side that does fit, so the whole file stays browsable at a coarser level of
detail; the page labels such cells "block of a×b, mean". Only when that side would fall below
:data:`MIN_SIDE`, or the estimate was short, are maps left out (last samples, steps, layers first;
within a layer the head mean before single heads), and ``payload["budget"]["omitted"]`` and the
page say what was left out. ``attnformat serve`` has no budget: it reads each map (or zoomed
window) at full resolution on request.

Reading is lazy: one ``(head, query, key)`` slice per layer for small maps, one map per read for
large ones (more than :data:`_LAYER_READ_ELEMENTS` values per layer); nothing reads a whole file.
"""

from __future__ import annotations

import base64
import importlib
import zlib
import importlib.util
import math
import os
from pathlib import Path

import numpy as np

from attnformat.conventions import ATTENTION_VARIABLES, LABEL_COORDS
from attnformat.errors import AttnFormatError, SelectionError
from attnformat.viewer.selection import (
    absent_note,
    first_generated,
    labels_of,
    node_labels,
    open_source,
    position,
    real_tokens,
    select,
    site_name,
    sites_of,
)

#: Format name and version of the payload (the page refuses others).
PAYLOAD_FORMAT, PAYLOAD_VERSION = "attnformat-explorer", 1
#: Quantization code of a cell without a value.
ABSENT = 255
#: Largest quantization code of a value (0..254: 255 levels).
LEVELS = 254
#: Default bound on the embedded maps' base64 text (bytes of page): a 6 x 12 x 128 file fits whole.
DEFAULT_MAX_BYTES = 4_000_000
#: Maps are never pooled below this side to fit the budget; maps are left out instead.
MIN_SIDE = 64
#: How embedded level-of-detail cells are pooled.
POOL_HOW = "mean"
#: Layers with more values than this are read one head at a time (a 12 x 4096^2 layer is 800 MB).
_LAYER_READ_ELEMENTS = 1 << 24
#: Maps with more cells than this (a 11585^2 map, 1 GiB as float64) are not read to embed: use serve.
MAX_EMBEDDED_CELLS = 1 << 27
#: In server mode, labels are listed for at most this many samples (each is a list per token).
MAX_LISTED_SAMPLES = 64
#: What the payload says about its encoding (shown in the page).
ENCODING = {
    "kind": "uint8-affine",
    "absent": ABSENT,
    "levels": LEVELS + 1,
    "bytes_per_value": 1,
    "text": "base64",
    "compression": "deflate (zlib format) per map when it saves 10% or more; see each map's compression",
    "description": ("each map: 8-bit codes q (row-major, rows = queries), value = offset + scale * q; "
                    "q = 255 means no value (masked, padding, not an edge, not kept, not captured); "
                    "largest error max_error = scale / 2; a map of R x C cells is R*C bytes (before "
                    "deflate), 4*ceil(bytes/3) characters of base64"),
}


# -- one map ------------------------------------------------------------------------------------


def encode_map(values: np.ndarray, *, compress: bool = False) -> dict:
    """Quantize a 2-D map to 8 bits with its own scale and offset, as base64 text.

    Parameters
    ----------
    values : numpy.ndarray
        A ``(rows, cols)`` float array (rows are queries). NaN and infinite cells have no value.
    compress : bool, default False
        Deflate the codes (zlib format) before base64 when that makes them smaller; the result
        then says ``"compression": "deflate"`` (the page inflates with the browser's own
        ``DecompressionStream``). Embedded pages compress; ``/api/map`` replies need not.

    Returns
    -------
    dict
        ``q`` (base64 of ``rows * cols`` uint8 codes, row-major), ``rows``, ``cols``, ``scale``,
        ``offset``, ``max_error`` (``scale / 2``), ``min``/``max`` (of the finite values, null when
        none), ``absent`` (how many cells have code 255) and ``compression`` (null or
        ``"deflate"``). ``value = offset + scale * q``.

    Examples
    --------
    >>> import base64
    >>> encoded = encode_map(np.array([[0.0, 0.5], [1.0, np.nan]]))
    >>> list(base64.b64decode(encoded["q"])), encoded["max_error"] == encoded["scale"] / 2
    ([0, 127, 254, 255], True)
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"encode_map takes a 2-D map, not an array of shape {values.shape}")
    finite = np.isfinite(values)
    codes = np.full(values.shape, ABSENT, dtype=np.uint8)
    low = high = None
    scale = offset = 0.0
    # Every cell finite (the usual case): the same operations on the map itself, without the
    # three copies that picking the finite cells makes (a third of encoding a 683^2 map, measured).
    every = finite.all()
    picked = values if every else values[finite]
    if picked.size:
        low, high = float(picked.min()), float(picked.max())
        offset = low
        scale = (high - low) / LEVELS if high > low else 0.0
        quantized = np.clip(np.rint((picked - low) / scale), 0, LEVELS).astype(np.uint8) if scale > 0 else 0
        if every:
            codes[...] = quantized
        else:
            codes[finite] = quantized
    data, compression = codes.tobytes(), None
    if compress:
        deflated = zlib.compress(data, 6)  # level 9 costs ~10x the time for ~8% less
        if len(deflated) < 0.9 * len(data):  # not worth an inflate for less
            data, compression = deflated, "deflate"
    return {
        "q": base64.b64encode(data).decode("ascii"),
        "rows": int(values.shape[0]),
        "cols": int(values.shape[1]),
        "scale": scale,
        "offset": offset,
        "max_error": scale / 2,
        "min": low,
        "max": high,
        "absent": int((~finite).sum()),
        "compression": compression,
    }


def decode_map(encoded: dict) -> np.ndarray:
    """The float map an :func:`encode_map` result stands for (NaN where the code is 255).

    Parameters
    ----------
    encoded : dict
        What :func:`encode_map` (or ``/api/map``) returned; deflated codes are inflated.

    Examples
    --------
    >>> decode_map(encode_map(np.array([[0.0, np.nan]]))).tolist()
    [[0.0, nan]]
    """
    data = base64.b64decode(encoded["q"])
    if encoded.get("compression") == "deflate":
        data = zlib.decompress(data)
    codes = np.frombuffer(data, dtype=np.uint8).reshape(encoded["rows"], encoded["cols"])
    values = encoded["offset"] + encoded["scale"] * codes.astype(np.float64)
    values[codes == ABSENT] = np.nan
    return values


def pool_map(values: np.ndarray, max_side: int):
    """Level of detail: block-average a map so neither side exceeds ``max_side``.

    Blocks are ``pool_q x pool_k`` cells (the last ones may be cut by the map's edge); a block's
    value is the mean of its cells that have a value (NaN-aware), NaN when none has. Mean, not max,
    so that a pooled weights map still sums (per block row) like the map it stands for; the page
    labels pooled cells "block of a×b, mean".

    Parameters
    ----------
    values : numpy.ndarray
        A ``(rows, cols)`` map.
    max_side : int
        The largest side wanted (at least 1).

    Returns
    -------
    tuple
        ``(pooled, pool_q, pool_k)``: the pooled map and the block size along queries and keys
        (1 and 1, and the map itself, when it fits already).

    Examples
    --------
    >>> pooled, pool_q, pool_k = pool_map(np.arange(16.0).reshape(4, 4), 2)
    >>> pooled.tolist(), pool_q, pool_k
    ([[2.5, 4.5], [10.5, 12.5]], 2, 2)
    """
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"pool_map takes a 2-D map, not an array of shape {values.shape}")
    max_side = max(int(max_side), 1)
    rows, cols = values.shape
    pool_q, pool_k = max(math.ceil(rows / max_side), 1), max(math.ceil(cols / max_side), 1)
    if pool_q == 1 and pool_k == 1:
        return values, 1, 1
    row_starts, col_starts = np.arange(0, rows, pool_q), np.arange(0, cols, pool_k)
    present = np.isfinite(values)
    if present.all():
        total = _block_sums(values, pool_q, pool_k, np.float64)
        heights = np.diff(np.append(row_starts, rows)).astype(np.float64)
        widths = np.diff(np.append(col_starts, cols)).astype(np.float64)
        return total / np.outer(heights, widths), pool_q, pool_k
    filled = np.where(present, values, 0.0)
    total = _block_sums(filled, pool_q, pool_k, np.float64)
    count = _block_sums(present, pool_q, pool_k, np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return pooled, pool_q, pool_k


#: Blocks up to this many cells a side are summed by :func:`_block_sums` with strided slices.
_SLICED_POOL = 8


def _block_sums(values: np.ndarray, pool_q: int, pool_k: int, dtype) -> np.ndarray:
    """Sums (in ``dtype``) of the ``pool_q x pool_k`` blocks of a 2-D map, the last ones cut by its edge.

    What ``np.add.reduceat`` over the columns, then over the rows, returns, bit for bit (checked
    for every block size up to :data:`_SLICED_POOL`): along each axis the first cell of a block
    plus the sum of the others taken in order, as numpy's reduction adds a short run. It is done
    here with one strided slice per offset in the block, because ``reduceat`` makes one small
    inner loop per block and row: 57 ms per 2048^2 map in 3 x 3 blocks against 15 ms (measured),
    8.9 s of the 18 s an explorer page of a 12 x 12 x 2048^2 file took. Larger blocks: ``reduceat``.
    """
    if pool_q > _SLICED_POOL or pool_k > _SLICED_POOL:
        rows, cols = values.shape
        by_column = np.add.reduceat(values, np.arange(0, cols, pool_k), axis=1, dtype=dtype)
        return np.add.reduceat(by_column, np.arange(0, rows, pool_q), axis=0)

    def along(array, pool, axis):  # array is ``dtype`` already where axis is 0
        def part(offset):
            return array[offset::pool] if axis == 0 else array[:, offset::pool]

        sums = np.array(part(0), dtype=dtype)
        if pool > 1:
            rest = np.array(part(1), dtype=dtype)
            for offset in range(2, pool):
                more = part(offset)
                cut = rest[:more.shape[0]] if axis == 0 else rest[:, :more.shape[1]]
                np.add(cut, more, out=cut)
            cut = sums[:rest.shape[0]] if axis == 0 else sums[:, :rest.shape[1]]
            np.add(cut, rest, out=cut)
        return sums

    return along(along(values, pool_k, 1), pool_q, 0)


def map_key(variable: str, sample, step, layer, head) -> str:
    """The key of one map in ``site["maps"]``: ``"weights/s0/t0/l3/h5"`` (positions; head may be ``"mean"``).

    Parameters
    ----------
    variable : str
        The variable (``weights``, ``logits``...).
    sample, step, layer : int
        Positions along those dimensions (0 when the site has no such dimension).
    head : int or "mean"
        Position along ``head``, or ``"mean"`` for the head mean (stored or computed).

    Examples
    --------
    >>> map_key("weights", 0, 0, 3, "mean")
    'weights/s0/t0/l3/hmean'
    """
    return f"{variable}/s{sample}/t{step}/l{layer}/h{head}"


# -- sites --------------------------------------------------------------------------------------


def _layout(attrs) -> str:
    layout = str(attrs.get("layout", "dense"))
    return "edges" if layout == "edge" else layout


def map_variables(node) -> list[str]:
    """The variables of a site that are maps the explorer can draw, attention variables first.

    Parameters
    ----------
    node : xarray.DataTree
        A site group.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import resolve_site
    >>> map_variables(resolve_site(attnformat.example_path("steps")))
    ['weights', 'logits', 'bias', 'distance']
    """
    layout = _layout(node.attrs)
    found = []
    for name in node.data_vars:
        dims = tuple(node[name].dims)
        if layout == "statistics":
            continue
        if layout == "edges" and "edge" in dims:
            found.append(name)
        elif layout == "topk" and dims[-2:] == ("query", "rank") and name != "key_index":
            found.append(name)
        elif dims[-2:] == ("query", "key"):
            found.append(name)
    order = {name: i for i, name in enumerate(ATTENTION_VARIABLES)}
    return sorted(found, key=lambda name: order.get(name, len(order)))


def _runs(groups) -> list[dict]:
    """Contiguous runs of equal group values: [{"name", "start", "stop"}]."""
    runs = []
    for index, group in enumerate(np.asarray(groups).reshape(-1).tolist()):
        name = str(group)
        if runs and runs[-1]["name"] == name and runs[-1]["stop"] == index:
            runs[-1]["stop"] = index + 1
        else:
            runs.append({"name": name, "start": index, "stop": index + 1})
    return runs


def _groups(node, sample: int) -> dict:
    """Token groups along query and key (modalities, frames, prompt/generated), from the file."""
    result = {}
    for dim in ("query", "key"):
        name = f"{dim}_group"
        if name in node.coords:
            groups = node.coords[name]
            if "sample" in groups.dims:
                groups = groups.isel(sample=sample)
            result[dim] = _runs(groups.values)
            continue
        first = first_generated(node, dim, sample) if dim in node.sizes else None
        if first is not None:
            size = node.sizes[dim]
            result[dim] = [{"name": "prompt", "start": 0, "stop": first},
                           {"name": "generated", "start": first, "stop": size}]
        else:
            result[dim] = []
    return result


def _coordinate_value(node, dim: str, index: int):
    """What :func:`select` takes to mean position ``index`` of ``dim`` (it matches coordinate values)."""
    if dim in node.coords:
        value = node.coords[dim].values[index]
        return value.item() if isinstance(value, np.generic) else value
    return index


def _positions(node, dim: str, wanted, *, default_all: bool) -> list[int]:
    """Positions along ``dim`` from labels, coordinate values or None (all, or the first)."""
    if dim not in node.sizes:
        return [0]
    if wanted is None:
        return list(range(node.sizes[dim])) if default_all else [0]
    if isinstance(wanted, (str, int, np.integer)):
        wanted = [wanted]
    return [position(node, dim, value) for value in wanted]


def _key_labels(node, tree, sample: int) -> list[str]:
    if "key" not in node.sizes and _layout(node.attrs) not in ("topk", "statistics"):
        return node_labels(node)
    key_site = node.attrs.get("key_site")
    if LABEL_COORDS["key"] not in node.coords and key_site:
        try:
            other = tree.root[str(key_site).strip("/")]
            return labels_of(other, "key", sample)
        except (KeyError, SelectionError):
            pass  # the validator reports a key_site naming nothing; show positions
    return labels_of(node, "key", sample)


def _query_labels(node, sample: int) -> list[str]:
    if _layout(node.attrs) == "edges":
        return node_labels(node)
    return labels_of(node, "query", sample)


def _mask_list(node, dim: str, sample: int):
    if _layout(node.attrs) == "edges":
        return None
    keep = real_tokens(node, dim, sample)
    return None if keep is None else [int(k) for k in keep]


def _signed(variable: str) -> bool:
    return variable in ("logits", "bias")


def _absent_note(node) -> str:
    layout = _layout(node.attrs)
    if layout == "edges":
        return absent_note(node.attrs)
    if layout == "topk":
        return "absent: not kept (top-k site) or not captured"
    return "absent: masked, padding or not captured"


# -- planning what to embed ---------------------------------------------------------------------


class _Plan:
    """The maps one site embeds: per (variable, sample, step, layer), which heads (and the mean)."""

    def __init__(self, node, variables, samples, steps, layers, heads):
        self.node = node
        self.variables, self.samples, self.steps, self.layers = variables, samples, steps, layers
        self.heads = heads  # positions; "mean" added when the site has several heads
        self.has_head = "head" in node.sizes
        self.has_mean = (self.has_head and node.sizes["head"] > 1) or node.attrs.get("head_reduction") == "mean"

    def maps(self):
        """Every (variable, sample, step, layer, head) planned, in priority order (most wanted first)."""
        for variable in self.variables:
            for sample in self.samples:
                for step in self.steps:
                    for layer in self.layers:
                        if self.has_mean:
                            yield variable, sample, step, layer, "mean"
                        if self.has_head:
                            for head in self.heads:
                                yield variable, sample, step, layer, head
                        elif not self.has_mean:  # one map per layer, no head dimension: head 0
                            yield variable, sample, step, layer, 0


def _map_shape(node) -> tuple[int, int]:
    layout = _layout(node.attrs)
    if layout == "edges":
        nodes = len(node_labels(node))
        return nodes, nodes
    from attnformat.viewer.selection import key_count

    return int(node.sizes.get("query", 1)), int(key_count(node) if layout == "topk" else node.sizes.get("key", 1))


def _base64_length(cells: int) -> int:
    return 4 * math.ceil(cells / 3)


# -- reading ------------------------------------------------------------------------------------


def _read_layer(node, variable, sample, step, layer, heads, want_mean) -> dict:
    """The maps of one layer: {head position or "mean": (query, key) float array}, padding as NaN."""
    selectors = {}
    for dim, index in (("sample", sample), ("step", step), ("layer", layer)):
        if dim in node[variable].dims:
            selectors[dim] = _coordinate_value(node, dim, index)
    dims = node[variable].dims
    result = {}
    has_head = "head" in dims
    rows, cols = _map_shape(node)
    dense = _layout(node.attrs) == "dense"
    if not has_head:
        # A head-mean site stores the mean itself (head "mean"); any other site without heads has one map (head 0).
        result["mean" if want_mean else 0] = select(node, variable, drop_padding=False, **selectors).values
        return _mask_padding(node, result, sample)
    count = node.sizes["head"]
    if dense and count * rows * cols <= _LAYER_READ_ELEMENTS and (want_mean or len(heads) > 1):
        stack = np.asarray(select(node, variable, keep=("head",), drop_padding=False, **selectors).values,
                           dtype=np.float64)
        for head in heads:
            result[head] = stack[head]
        if want_mean:
            result["mean"] = _nanmean(stack)
        return _mask_padding(node, result, sample)
    total = counted = None
    whole = 0  # heads whose every cell is finite: counted in every cell, without a count map
    for head in range(count):
        if head not in heads and not (want_mean and dense):
            continue
        one = np.asarray(select(node, variable, drop_padding=False, head=_coordinate_value(node, "head", head),
                                **selectors).values)
        if head in heads:
            result[head] = one
        if want_mean and dense:  # accumulate: never more than one map of a large layer at once
            # In place, in float64 (the ufunc widens a float32 map exactly): the sums of adding
            # widened copies, without two new 2048^2 float64 maps per head (measured: about half
            # of the 5.7 s that reading a 12 x 12 x 2048^2 file's layers took).
            present = np.isfinite(one)
            if total is None:
                total = np.zeros(one.shape, dtype=np.float64)
            if present.all():
                np.add(total, one, out=total)
                whole += 1
            else:
                np.add(total, one, out=total, where=present)
                counted = present.astype(np.int32) if counted is None else np.add(counted, present, out=counted)
    if want_mean and dense:
        if counted is None:  # every cell of every head finite
            result["mean"] = np.divide(total, whole, out=total)
        else:
            counted += whole
            with np.errstate(invalid="ignore", divide="ignore"):
                result["mean"] = np.where(counted > 0, total / np.maximum(counted, 1), np.nan)
    elif want_mean:  # edges and top-k: the selection's own head mean (densified the site's way)
        result["mean"] = select(node, variable, drop_padding=False, head="mean", **selectors).values
    return _mask_padding(node, result, sample)


def _nanmean(stack: np.ndarray) -> np.ndarray:
    present = np.isfinite(stack)
    total = np.where(present, stack, 0.0).sum(axis=0)
    count = present.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def mask_map(node, values: np.ndarray, sample: int, q0: int = 0, k0: int = 0) -> np.ndarray:
    """A map (or a window of one starting at query ``q0``, key ``k0``) with padding cells set to NaN.

    Padding tokens (``query_mask``/``key_mask`` False for that sample) have no value: the page
    draws them as absent (code 255). The embedded page and ``attnformat serve`` both call this.

    Parameters
    ----------
    node : xarray.DataTree
        The site group.
    values : numpy.ndarray
        A ``(query, key)`` map, or the window of one that starts at ``q0``, ``k0``.
    sample : int
        The sample the map belongs to (masks may differ per sample).
    q0, k0 : int
        Where the window starts in the file's query and key positions.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import resolve_site
    >>> site = resolve_site(attnformat.example_path("padded-batch"))
    >>> np.isnan(mask_map(site, np.zeros((5, 5)), 1)).sum(axis=0).tolist()
    [2, 2, 2, 5, 5]
    """
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    if _layout(node.attrs) == "edges":
        return values
    rows, cols = values.shape[-2:]
    query_real = real_tokens(node, "query", sample) if "query" in node.sizes else None
    key_real = real_tokens(node, "key", sample) if "key" in node.sizes else None
    if query_real is None and key_real is None:
        return values
    values = values.copy()  # never write into an array the caller (or xarray's cache) holds
    if query_real is not None:
        values[..., ~query_real[q0:q0 + rows], :] = np.nan
    if key_real is not None:
        values[..., :, ~key_real[k0:k0 + cols]] = np.nan
    return values


def _mask_padding(node, maps: dict, sample: int) -> dict:
    return {name: mask_map(node, values, sample) for name, values in maps.items()}


# -- the payload --------------------------------------------------------------------------------


def _extras_module():
    """E2's extras (summary, patches, edges...), when that module is installed."""
    name = f"{__package__}.extras"
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


def _source_text(source, tree) -> str:
    from attnformat.reading import source_of

    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return source_of(tree)


def build_payload(source, *, sites=None, samples=None, layers=None, heads=None, max_bytes=None,
                  mode="embedded", storage_options=None, variables=None, steps=None, title=None) -> dict:
    """Select and encode what the explorer page shows of a file.

    Parameters
    ----------
    source
        A path or URL attnformat can open, or a tree (:func:`attnformat.open`).
    sites : str or list of str, optional
        Site paths to show (default: every site).
    samples, layers, heads, steps : optional
        Labels, coordinate values or positions to embed (a single value or a list); default: the
        first sample and every step, layer and head. Head means are embedded whenever heads are.
    max_bytes : int, optional
        Bound on the embedded maps' base64 text (default :data:`DEFAULT_MAX_BYTES`); beyond it maps
        are pooled, then left out, as the module docstring says.
    mode : {"embedded", "server"}
        ``"server"`` embeds no maps (the page fetches them from ``/api/map``) and lists every sample
        (up to :data:`MAX_LISTED_SAMPLES`).
    storage_options : dict, optional
        fsspec options for a URL.
    variables : str or list of str, optional
        Variables to embed (default: the site's default variable, ``weights`` when present).
    title : str, optional
        The page's title (default: the file's name).

    Returns
    -------
    dict
        The payload the page's ``af-data`` script holds (see the explorer contract).

    Examples
    --------
    >>> import attnformat
    >>> payload = build_payload(attnformat.example_path("dense"))
    >>> site = payload["sites"][0]
    >>> site["name"], site["variable"], sorted(site["maps"])[:2]
    ('encoder/self', 'weights', ['weights/s0/t0/l0/h0', 'weights/s0/t0/l0/h1'])
    """
    if mode not in ("embedded", "server"):
        raise ValueError(f"mode must be 'embedded' or 'server', not {mode!r}")
    max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
    tree = open_source(source, storage_options)
    nodes = sites_of(tree)
    if sites is not None:
        wanted = [str(s).strip("/") for s in ([sites] if isinstance(sites, str) else sites)]
        by_name = {site_name(node): node for node in nodes}
        missing = [name for name in wanted if name not in by_name]
        if missing:
            raise SelectionError(f"site {missing[0]!r} not in file {_source_text(source, tree)}; "
                                 f"sites: {', '.join(by_name)}")
        nodes = [by_name[name] for name in wanted]
    extras = _extras_module()
    payload_sites, plans = [], []
    for node in nodes:
        site, plan = _describe_site(node, tree, mode=mode, samples=samples, layers=layers, heads=heads,
                                    steps=steps, variables=variables)
        payload_sites.append(site)
        plans.append(plan)
    if variables is not None and mode == "embedded" and not any(site["embedded_variables"] for site in payload_sites):
        listed = [variables] if isinstance(variables, str) else list(variables)
        maps = sorted({v for site in payload_sites for v in site["variables"] if site["layout"] != "statistics"})
        raise SelectionError(f"variable {', '.join(map(repr, listed))} is not a map of any site of file "
                             f"{_source_text(source, tree)}; maps: {', '.join(maps) or 'none'}")
    budget = {"max_bytes": max_bytes, "used_bytes": 0, "maps": 0, "maps_planned": 0, "pooled_to": None,
              "pool": POOL_HOW, "omitted": []}
    if mode == "embedded":
        _embed(payload_sites, plans, budget)
    if extras is not None:
        for node, site, plan in zip(nodes, payload_sites, plans):
            options = {"mode": mode, "samples": site["samples"], "steps": plan.steps if "step" in node.sizes else None,
                       "layers": site["embedded_layers"], "heads": site["embedded_heads"], "max_bytes": max_bytes}
            site["extras"] = extras.site_extras(node, site["name"], options) or {}
    source_text = _source_text(source, tree)
    return {
        "format": PAYLOAD_FORMAT,
        "version": PAYLOAD_VERSION,
        "title": title or Path(str(source_text).rstrip("/")).name,
        "source": source_text,
        "mode": mode,
        "encoding": dict(ENCODING),
        "budget": budget if mode == "embedded" else None,
        "sites": payload_sites,
    }


def _describe_site(node, tree, *, mode, samples, layers, heads, steps, variables):
    """A site's entry of the payload without maps, and the plan of the maps to embed."""
    name = site_name(node)
    layout = _layout(node.attrs)
    found = map_variables(node)
    default = "weights" if "weights" in found else (found[0] if found else (list(node.data_vars) or [None])[0])
    listed = None
    if variables is not None:
        listed = [variables] if isinstance(variables, str) else list(variables)
    embed_variables = [v for v in (listed or [default]) if v in found]
    sample_count = node.sizes.get("sample", 1)
    if mode == "server" and samples is None:
        sample_positions = list(range(min(sample_count, MAX_LISTED_SAMPLES)))
    else:
        sample_positions = _positions(node, "sample", samples, default_all=False)
    step_positions = _positions(node, "step", steps, default_all=True)
    layer_positions = _positions(node, "layer", layers, default_all=True)
    head_positions = _positions(node, "head", heads, default_all=True) if "head" in node.sizes else (
        [] if node.attrs.get("head_reduction") == "mean" else [0])
    dims_of = node[default].dims if default in node.data_vars else tuple(node.sizes)
    # Lists indexed by sample position, as long as the last listed sample needs (not the declared size).
    listed_count = max(sample_positions) + 1 if sample_positions else 0
    query_labels = [None] * listed_count
    key_labels = [None] * listed_count
    query_mask, key_mask = [None] * listed_count, [None] * listed_count
    for sample in sample_positions:
        query_labels[sample] = _query_labels(node, sample) if layout != "statistics" or "query" in node.sizes else []
        key_labels[sample] = _key_labels(node, tree, sample) if layout != "statistics" or "key" in node.sizes else []
        query_mask[sample] = _mask_list(node, "query", sample)
        key_mask[sample] = _mask_list(node, "key", sample)
    # Dimensions the page has no selector for (a spatio-temporal site's time or node) show their first element.
    leading = {dim for v in found for dim in node[v].dims if dim not in ("query", "key", "edge", "rank")}
    fixed = {dim: 0 for dim in ("time", "node") if dim in leading}
    site = {
        "name": name,
        "layout": layout,
        "file_layout": str(node.attrs.get("layout", "dense")),
        "variables": found if layout != "statistics" else list(node.data_vars),
        "variable": default,
        "embedded_variables": embed_variables if mode == "embedded" else found,
        "signed": _signed(default or ""),
        "signed_variables": {v: _signed(v) for v in found},
        "dims": {dim: int(node.sizes[dim]) for dim in dims_of},
        "head_reduction": node.attrs.get("head_reduction"),
        "causal": bool(node.attrs.get("causal", 0)),
        "normalization": str(node.attrs.get("normalization", "other")),
        "query_labels": query_labels,
        "key_labels": key_labels,
        "query_mask": query_mask,
        "key_mask": key_mask,
        "key_site": (str(node.attrs["key_site"]).strip("/") if node.attrs.get("key_site") else None),
        "groups": _groups(node, sample_positions[0] if sample_positions else 0) if layout != "edges"
        else {"query": [], "key": []},
        "steps": ([str(v) for v in labels_of(node, "step")] if "step" in node.sizes else None),
        "layer_labels": labels_of(node, "layer") if "layer" in node.sizes else ["0"],
        "head_labels": labels_of(node, "head") if "head" in node.sizes else
        ([] if node.attrs.get("head_reduction") == "mean" else ["0"]),
        "samples": sample_positions,
        "embedded_layers": layer_positions,
        "embedded_heads": head_positions,
        "fixed": fixed,
        "absent_note": _absent_note(node),
        "maps": {},
        "extras": {},
    }
    plan = _Plan(node, embed_variables, sample_positions, step_positions, layer_positions, head_positions)
    return site, plan


def tree_source(node) -> str:
    """The path a site's file was opened from (for messages).

    Parameters
    ----------
    node : xarray.DataTree
        Any node of an opened file.

    Examples
    --------
    >>> import attnformat
    >>> tree_source(attnformat.open(attnformat.example_path("dense"))).endswith("dense.zarr")
    True
    """
    from attnformat.reading import source_of

    return source_of(node)


def _embed(payload_sites, plans, budget) -> None:
    """Read, pool and encode the planned maps within the budget (see the module docstring)."""
    planned = [(site, plan, key_parts) for site, plan in zip(payload_sites, plans) for key_parts in plan.maps()]
    budget["maps_planned"] = len(planned)
    if not planned:
        return
    for site, plan in zip(payload_sites, plans):
        rows, cols = _map_shape(plan.node)
        if plan.layers and rows * cols > MAX_EMBEDDED_CELLS:
            raise AttnFormatError(
                f"file {tree_source(plan.node)}, site {site['name']}: maps of {rows} x {cols} are too large to "
                f"embed in a page (the limit is {MAX_EMBEDDED_CELLS} cells a map, read whole before pooling); "
                f"use attnformat serve, which reads each window on request")
    # Read layer by layer: group the maps by (site, variable, sample, step, layer), in plan order.
    groups = {}
    for site, plan, (variable, sample, step, layer, head) in planned:
        groups.setdefault((id(site), variable, sample, step, layer), (site, plan, []))[2].append(head)
    reads = {}

    def read(group_key):
        if group_key not in reads:
            site, plan, heads = groups[group_key]
            _, variable, sample, step, layer = group_key
            reads.clear()  # one layer in memory at a time
            reads[group_key] = _read_layer(plan.node, variable, sample, step, layer,
                                           [h for h in heads if h != "mean"], "mean" in heads)
        return reads[group_key]

    # How well this file's maps deflate, from its first layer (with a margin: pooled maps are smoother).
    first = next(iter(groups))
    samples = [v for v in read(first).values() if v.size][:2]
    raw = sum(_base64_length(v.size) for v in samples)
    deflated = sum(len(encode_map(v, compress=True)["q"]) for v in samples)
    ratio = min(1.0, 1.25 * deflated / raw) if raw else 1.0
    max_bytes = budget["max_bytes"]

    def cost(items, side):
        return ratio * sum(_map_cost(plan.node, side) for _, plan, _ in items)

    side = None  # None: full resolution
    longest = max(max(_map_shape(plan.node)) for _, plan, _ in planned)
    if cost(planned, None) > max_bytes:
        side = longest
        while side > MIN_SIDE and cost(planned, side) > max_bytes:
            side = max(MIN_SIDE, int(side * 0.9))
    used, left_out = 0, []
    for site, plan, (variable, sample, step, layer, head) in planned:
        values = read((id(site), variable, sample, step, layer)).get(head)
        if values is None:
            continue
        pool_q = pool_k = 1
        if side is not None:
            values, pool_q, pool_k = pool_map(values, side)
        encoded = encode_map(values, compress=True)
        if used + len(encoded["q"]) > max_bytes:  # the estimate was short: the rest is left out, and said so
            left_out.append((site, plan, (variable, sample, step, layer, head)))
            continue
        encoded["pool_q"], encoded["pool_k"] = pool_q, pool_k
        encoded["pool"] = POOL_HOW if pool_q * pool_k > 1 else None
        site["maps"][map_key(variable, sample, step, layer, head)] = encoded
        if _signed(variable) or (encoded["min"] is not None and encoded["min"] < 0):
            site["signed_variables"][variable] = True
            if variable == site["variable"]:
                site["signed"] = True
        used += len(encoded["q"])
    if left_out:
        budget["omitted"] = _describe_omitted(left_out)
    budget["used_bytes"] = used
    pooled = [max(m["rows"], m["cols"]) for site in payload_sites for m in site["maps"].values()
              if m["pool_q"] * m["pool_k"] > 1]
    budget["pooled_to"] = max(pooled) if pooled else None  # the largest side a pooled map really has
    budget["maps"] = sum(len(site["maps"]) for site in payload_sites)


def _map_cost(node, side) -> int:
    rows, cols = _map_shape(node)
    if side is not None:
        rows, cols = math.ceil(rows / math.ceil(rows / side)), math.ceil(cols / math.ceil(cols / side))
    return _base64_length(rows * cols)


def _describe_omitted(left_out) -> list[str]:
    """Short lines saying which maps were left out: one per (site, variable, sample, step, layer)."""
    lines = {}
    for site, plan, (variable, sample, step, layer, head) in left_out:
        where = [site["name"], variable]
        if "sample" in plan.node.sizes:
            where.append(f"sample {sample}")
        if "step" in plan.node.sizes:
            where.append(f"step {site['steps'][step]}")
        where.append(f"layer {site['layer_labels'][layer]}")
        lines.setdefault(", ".join(where), []).append("mean" if head == "mean" else site["head_labels"][head])
    return [f"{where}: heads {' '.join(heads)}" for where, heads in lines.items()]
