"""What the explorer's other views draw besides the maps: the page's per-site ``extras``.

:func:`site_extras` is called by :func:`attnformat.viewer.explorer.payload.build_payload` for every
site and returns a dict of (each only when the site has it):

* ``summary``: one number per layer x head for the overview (mean row entropy in nats, sink score
  = mean weight on the row's first available key, mean row maximum), computed from the file's
  rows, chunk by chunk; statistics sites use their stored per-row statistics instead, top-k sites
  their kept weights (the row maximum is exact: it is always kept) and omitted mass;
* ``patches``: a ViT site's patch grid, each key's grid cell, the stored image as a small PNG and
  the attention rollout over all layers (``rollout``, Q x K per embedded sample and step);
* ``edges``: an edge site's nodes, ``source``/``target`` and its values per layer (rows: heads);
* ``topk``: a top-k site's kept weights, their key indices and the omitted mass of every row;
* ``statistics``: a statistics site's stored per-row statistics.

Float arrays are quantized with :func:`attnformat.viewer.explorer.payload.encode_map` (8 bits,
``max_error`` stated per array); integers travel as base64 little-endian ``int16``/``int32``
(:func:`encode_ints`). Sizes, for Q query rows, H heads, k kept keys, E edges, per embedded
(sample, step, layer): ``summary`` ~10 bytes per statistic per head; ``edges`` 4/3 x T x H x E
bytes, T the site's time steps (or nodes) when its values have them (+ ~150 bytes of scale and
offset per layer and variable); ``topk`` 4/3 x Q x (3k + 1) bytes per head (1 byte
per weight, 2 per key index, 1 per omitted mass); ``statistics`` 4/3 x Q x (4 + 2) bytes per
head; ``patches`` 2 small ints per key plus the PNG (~0.7 kB for a 28 x 28 image).

Budgets: a summary reads at most :data:`SUMMARY_MAX_ELEMENTS` map elements (beyond, the first rows
of every map, and it says so); edges, top-k rows and statistics are embedded layer by layer up to
:data:`EXTRAS_MAX_BYTES` of text (``embedded.left_out`` lists the others, which a served page asks
for with :func:`layer_extras`).

Nothing here draws; the numbers can be checked against the file's own arrays with numpy
(``tests/explorer/test_extras.py`` does).
"""

from __future__ import annotations

import base64
import math
import struct
import zlib

import numpy as np

from attnformat.conventions import LABEL_COORDS, MASK_COORDS, PATCH_COORDS, STATISTICS

__all__ = ["site_extras", "layer_head_summary", "layer_extras", "EXTRAS_MAX_BYTES", "encode_ints", "png_base64", "SUMMARY_MAX_ELEMENTS", "SERVER_SUMMARY_ELEMENTS"]

#: The most map elements one site's summary reads (per call); beyond it only the first rows of every
#: map are summarised and the summary says how many (``rows_used``). 2**26 float32 = 256 MiB read.
SUMMARY_MAX_ELEMENTS = 1 << 26
#: A server page (``mode="server"``) summarises a site while building the page only below this many
#: map elements; a larger site's summary is ``{"deferred": true}`` and is asked for on its own.
SERVER_SUMMARY_ELEMENTS = 1 << 24
#: Base64 text the per-layer extras of one site (edges, top-k rows, stored statistics) may take in a
#: page; layers beyond it are left out (``embedded.left_out``) and a served page asks for them.
EXTRAS_MAX_BYTES = 4_000_000
#: The same for a served page (it asks for the other layers when they are shown).
SERVER_EXTRAS_MAX_BYTES = 200_000
#: Rows read at a time when a summary streams a large map (whole rows: row statistics are exact).
_BLOCK_ELEMENTS = 1 << 22
#: ViT sites whose rollout would read more map elements than this (all layers and heads of the
#: embedded samples) carry no rollout.
ROLLOUT_MAX_ELEMENTS = 1 << 25
#: A served page carries the image (and rollout) of this many of its listed samples.
SERVER_IMAGE_SAMPLES = 8
#: Stored images wider or taller than this are subsampled (every n-th pixel) before encoding.
IMAGE_MAX_SIDE = 256
#: Leading dimensions the page's state does not select: folded into rows (summary) or chosen in a view.
_EXTRA_DIMS = ("time", "node")
#: What each summary statistic is, as the overview's legend says it.
SUMMARY_LABELS = {
    "entropy": "mean row entropy [nats]",
    "sink": "sink score: mean weight on the first key",
    "max": "mean row maximum weight",
    "local": "mean local weight (stored)",
    "omitted": "mean omitted mass per row (not kept)",
}


# -- small encoders ---------------------------------------------------------------------------------


def encode_ints(values) -> dict:
    """Integers as base64 little-endian ``int16`` (or ``int32`` when they do not fit), with the shape.

    Parameters
    ----------
    values : array_like of int
        Any shape; -1 (nothing kept, not captured) survives as -1.

    Returns
    -------
    dict
        ``{"b64": str, "dtype": "int16"|"int32", "shape": [...]}``: 2 (or 4) bytes per value, x 4/3.

    Examples
    --------
    >>> encoded = encode_ints([[0, 5, -1]])
    >>> encoded["dtype"], encoded["shape"], np.frombuffer(base64.b64decode(encoded["b64"]), "<i2").tolist()
    ('int16', [1, 3], [0, 5, -1])
    """
    array = np.asarray(values, dtype=np.int64)
    fits = array.size == 0 or (array.min() >= -32768 and array.max() <= 32767)
    dtype = "<i2" if fits else "<i4"
    return {"b64": base64.b64encode(array.astype(dtype).tobytes()).decode("ascii"),
            "dtype": "int16" if fits else "int32", "shape": list(array.shape)}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_base64(image) -> str:
    """A grey (2-D) or RGB (``(h, w, 3)``) image as a base64 PNG, scaled from its own min..max to 0..255.

    NaN pixels become 0. The PNG is written here (zlib + the PNG chunk layout), so the page needs no
    imaging library.

    Parameters
    ----------
    image : array_like
        ``(rows, cols)`` or ``(rows, cols, 3)`` (or ``(rows, cols, 1)``) values of any range.

    Examples
    --------
    >>> base64.b64decode(png_base64(np.eye(4)))[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
    """
    values = np.asarray(image, dtype=np.float64)
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim == 3 and values.shape[-1] == 4:
        values = values[..., :3]
    if values.ndim not in (2, 3) or (values.ndim == 3 and values.shape[-1] != 3):
        raise ValueError(f"an image is (rows, cols) or (rows, cols, 3), not shape {values.shape}")
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    scaled = np.where(np.isfinite(values), (values - low) / ((high - low) or 1.0), 0.0)
    pixels = np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)
    rows, cols = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0  # PNG colour types: 0 grey, 2 RGB
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(rows))  # filter 0 on every line
    header = struct.pack(">IIBBBBB", cols, rows, 8, colour, 0, 0, 0)
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw, 9))
           + _png_chunk(b"IEND", b""))
    return base64.b64encode(png).decode("ascii")


def _encode_map(values):
    """E1's 8-bit encoding of a 2-D float array (imported on use: the payload imports this module)."""
    from attnformat.viewer.explorer.payload import encode_map

    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"encode a 2-D array, not shape {values.shape}")
    return encode_map(values)


def _number(value) -> float | None:
    """A JSON number with 6 significant digits (the precision the page shows), None for NaN."""
    value = float(value)
    return None if not math.isfinite(value) else float(f"{value:.6g}")


# -- what to embed ----------------------------------------------------------------------------------


def _chosen(options: dict, name: str, node, dim: str) -> list[int]:
    """Positions along ``dim`` the page embeds (options[name], else all); [0] when the site lacks ``dim``."""
    if dim not in node.sizes:
        return [0]
    wanted = options.get(name)
    size = int(node.sizes[dim])
    if wanted is None:
        return list(range(size))
    return [int(p) for p in wanted if 0 <= int(p) < size] or [0]


def _labels(node, dim: str, positions, sample: int = 0) -> list[str]:
    if dim not in node.sizes:
        return ["mean"] if dim == "head" and node.attrs.get("head_reduction") == "mean" else ["all"]
    name = LABEL_COORDS.get(dim)
    if name and name in node.coords:
        coord = node.coords[name]
        values = coord.isel(sample=sample).values if "sample" in coord.dims else coord.values
    elif dim in node.coords:
        values = node.coords[dim].values
    else:
        values = np.arange(node.sizes[dim])
    return [str(values[p]) for p in positions]


def _fix(array, **positions):
    """``array`` with the given dimensions fixed, for those it has."""
    return array.isel({dim: value for dim, value in positions.items() if dim in array.dims and value is not None})


def _real(node, dim: str, sample: int) -> np.ndarray | None:
    """Which query/key positions are real tokens (not padding) for a sample, or None (all)."""
    name = MASK_COORDS[dim]
    if name not in node.coords:
        return None
    mask = node.coords[name]
    if "sample" in mask.dims:
        mask = mask.isel(sample=sample)
    keep = np.asarray(mask.values, dtype=bool).reshape(-1)
    return None if keep.all() else keep


def _key(sample: int, step: int, layer: int | None = None, head: int | None = None) -> str:
    parts = [f"s{sample}", f"t{step}"]
    if layer is not None:
        parts.append(f"l{layer}")
    if head is not None:
        parts.append(f"h{head}")
    return "/".join(parts)


# -- the layer x head summary -----------------------------------------------------------------------


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Softmax along the last axis over finite entries; NaN/-inf (not computed, masked) get NaN."""
    finite = np.isfinite(logits)
    shifted = np.where(finite, logits, -np.inf)
    top = np.max(shifted, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    exp = np.where(finite, np.exp(shifted - top), 0.0)
    total = exp.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite & (total > 0), exp / total, np.nan)


def _summary_source(node) -> tuple[str | None, str]:
    """The variable the summary is computed from and how it becomes weights."""
    variables = list(node.data_vars)
    if "weights" in variables:
        return "weights", "weights"
    if "logits" in variables and node.attrs.get("normalization") == "softmax":
        return "logits", "softmax of logits (over the keys each row computed)"
    return None, ""


def _row_block_stats(block: np.ndarray, key_keep) -> dict:
    """Per-row entropy, sink and max of a ``(..., rows, key)`` block of weights (NaN rows: not captured).

    The definitions of :func:`attnformat.reductions.row_statistics` (which statistics sites store),
    computed in the block's own float type with float64 sums: a float32 layer is not copied to
    float64 (half the memory traffic on large maps).
    """
    available = ~np.isnan(block)
    if key_keep is not None:
        available &= key_keep
    values = np.where(available, block, 0)
    logs = np.zeros_like(values)
    np.log(values, out=logs, where=values > 0)
    logs *= values
    entropy = -np.sum(logs, axis=-1, dtype=np.float64)
    entropy = np.maximum(entropy, 0.0)  # each term -w ln w >= 0: no -0.0 for a one-hot row
    peak = np.max(np.where(available, block, -np.inf), axis=-1).astype(np.float64)
    first = np.argmax(available, axis=-1)
    sink = np.take_along_axis(values, first[..., None], axis=-1)[..., 0].astype(np.float64)
    has_key = available.any(axis=-1)
    return {name: np.where(has_key, value, np.nan) for name, value in
            {"entropy": entropy, "sink": sink, "max": peak}.items()}


def _dense_layer(array, fixed: dict, heads: list[int] | None, transform: str, rows_used: int, query_keep,
                 key_keep) -> list[dict]:
    """Means over rows of the row statistics of the chosen heads of one layer (one dict per head).

    The heads are read together, in blocks of whole rows (a layer's heads usually share a chunk).
    """
    keys = int(array.sizes["key"])
    selected = _fix(array, **fixed)
    if heads is not None:
        selected = selected.isel(head=heads)
    count = len(heads) if heads is not None else 1
    step = max(1, _BLOCK_ELEMENTS // (keys * count))
    if rows_used * keys * count <= 4 * _BLOCK_ELEMENTS:
        step = rows_used  # one read: blocks that cut a chunk's strip of rows would decode it twice
    sums = {name: np.zeros(count) for name in ("entropy", "sink", "max")}
    counts = {name: np.zeros(count, dtype=np.int64) for name in sums}
    dims = list(selected.dims)
    order = [dims.index(d) for d in ("head", "query", "key") if d in dims]
    for start in range(0, rows_used, step):
        stop = min(rows_used, start + step)
        block = np.asarray(selected.isel(query=slice(start, stop)).values).transpose(order)
        if block.dtype not in (np.float32, np.float64):
            block = block.astype(np.float64)
        block = block.reshape((count,) + block.shape[-2:])
        if transform == "logits":
            block = _softmax_rows(block)
        if query_keep is not None:
            block = np.where(query_keep[start:stop, None], block, np.nan)
        for name, values in _row_block_stats(block, key_keep).items():  # (head, rows)
            finite = np.isfinite(values)
            sums[name] += np.where(finite, values, 0.0).sum(axis=-1)
            counts[name] += finite.sum(axis=-1)
    return [{name: (sums[name][h] / counts[name][h] if counts[name][h] else math.nan) for name in sums}
            for h in range(count)]


def _edge_cell(array, fixed: dict, target: np.ndarray) -> dict:
    """Mean over target nodes of each target's incoming-edge entropy and maximum."""
    values = np.asarray(_fix(array, **fixed).values, dtype=np.float64)
    values = values.reshape(-1, values.shape[-1])  # extra dims (time, node) count as more targets
    groups = np.unique(target)
    entropies, maxima = [], []
    for row in values:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(row > 0, -row * np.log(row), 0.0)
        captured = np.bincount(target, weights=(~np.isnan(row)).astype(np.float64), minlength=groups.max() + 1 if groups.size else 0)
        entropy = np.bincount(target, weights=np.nan_to_num(terms), minlength=captured.size)
        peak = np.full(captured.size, -np.inf)
        np.fmax.at(peak, target, np.where(np.isnan(row), -np.inf, row))
        live = captured[groups] > 0
        entropies.extend(entropy[groups][live])
        maxima.extend(peak[groups][live])
    return {"entropy": float(np.mean(entropies)) if entropies else math.nan,
            "max": float(np.mean(maxima)) if maxima else math.nan}


def _stored_cell(node, names: dict, fixed: dict, query_keep) -> dict:
    """Means over rows of a statistics site's stored per-row statistics (NaN rows left out)."""
    result = {}
    for statistic, stored in names.items():
        values = np.asarray(_fix(node[stored], **fixed).values, dtype=np.float64)
        if query_keep is not None:
            values = np.where(query_keep, values, np.nan)
        finite = values[np.isfinite(values)]
        result[statistic] = float(finite.mean()) if finite.size else math.nan
    return result


def _topk_cell(node, fixed: dict, query_keep) -> dict:
    """A top-k site's exact per-row numbers: the row maximum (always kept) and the omitted mass."""
    kept = np.asarray(_fix(node["weights"], **fixed).values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        peak = np.where(np.isnan(kept).all(axis=-1), np.nan, np.nanmax(np.where(np.isnan(kept), -np.inf, kept), axis=-1))
    result = {"max": peak}
    if "omitted_weight" in node.data_vars:
        result["omitted"] = np.asarray(_fix(node["omitted_weight"], **fixed).values, dtype=np.float64)
    means = {}
    for name, values in result.items():
        values = values.reshape(-1, values.shape[-1]) if values.ndim > 1 else values[None]
        if query_keep is not None:
            values = np.where(query_keep, values, np.nan)
        finite = values[np.isfinite(values)]
        means[name] = float(finite.mean()) if finite.size else math.nan
    return means


def layer_head_summary(site_node, *, samples=None, steps=None, layers=None, heads=None,
                       max_elements: int = SUMMARY_MAX_ELEMENTS) -> dict | None:
    """One number per layer x head and statistic, for every embedded sample and step; None when the site has none.

    Dense sites: from each query row (padding left out, NaN rows not captured left out) the
    entropy ``-sum w ln w`` over its keys (nats), its weight on the first available key (the sink)
    and its largest weight, averaged over rows. A ``time`` or ``node`` dimension shows its first
    element, as the page's maps do (``rows`` says so).
    Sites with logits only (normalization softmax) take the softmax of each row's finite logits.
    When ``maps x rows x keys`` exceeds ``max_elements``, only the first ``rows_used`` query rows of
    every map are read (whole chunks of the first strip) and ``rows`` says so. Edge sites: the
    entropy and maximum of each target node's incoming weights, averaged over targets. Statistics
    sites: the stored ``entropy``, ``sink_weight``, ``max_weight``, ``local_weight`` averaged over
    rows. Top-k sites: the row maximum (exact) and the omitted mass, averaged over rows.

    Parameters
    ----------
    site_node : xarray.DataTree
        One site group (lazy: only the rows summarised are read).
    samples, steps, layers, heads : list of int, optional
        Positions to summarise along each dimension (all by default).
    max_elements : int, default 2**26
        Read budget, in map elements, for the whole call.

    Returns
    -------
    dict or None
        ``{"statistics": [names], "labels": {name: text}, "from": str, "rows": str, "rows_used": int,
        "layers": [labels], "heads": [labels], "layer_index": [int], "head_index": [int],
        "values": {"s<sample>/t<step>": {name: [[value per head] per layer]}}}``; values are JSON
        numbers with 6 significant digits, None where nothing was captured.

    Examples
    --------
    >>> import attnformat
    >>> site = attnformat.open(attnformat.example_path("dense"))["encoder/self"]
    >>> summary = layer_head_summary(site)
    >>> summary["statistics"], len(summary["values"]["s0/t0"]["entropy"]), len(summary["values"]["s0/t0"]["sink"][0])
    (['entropy', 'sink', 'max'], 2, 3)
    """
    node = site_node
    layout = node.attrs.get("layout")
    options = {"samples": samples, "steps": steps, "layers": layers, "heads": heads}
    sample_list = _chosen(options, "samples", node, "sample")
    step_list = _chosen(options, "steps", node, "step")
    layer_list = _chosen(options, "layers", node, "layer")
    head_list = _chosen(options, "heads", node, "head")
    rows_text, rows_used, source = "all query rows", None, ""
    if layout == "statistics":
        stored = {"entropy": "entropy", "sink": "sink_weight", "max": "max_weight", "local": "local_weight"}
        names = {k: v for k, v in stored.items() if v in node.data_vars}
        if not names:
            return None
        source = "stored per-row statistics"

        def cell(fixed, sample):
            return _stored_cell(node, names, fixed, _real(node, "query", sample))
    elif layout == "topk":
        if "weights" not in node.data_vars:
            return None
        names = {"max": "max"} | ({"omitted": "omitted"} if "omitted_weight" in node.data_vars else {})
        source = "kept weights (top-k): the row maximum is always kept"

        def cell(fixed, sample):
            return _topk_cell(node, fixed, _real(node, "query", sample))
    elif layout == "edge":
        variable = "weights" if "weights" in node.data_vars else None
        if variable is None or node.attrs.get("normalized_dim", "key") != "key":
            return None
        names = {"entropy": "entropy", "max": "max"}
        target = np.asarray(node.coords["target"].values, dtype=np.int64)
        source = "weights on edges: per target node, over its incoming edges"
        rows_text = "all target nodes"

        def cell(fixed, sample):
            return _edge_cell(node[variable], fixed, target)
    else:
        variable, source = _summary_source(node)
        if variable is None or "query" not in node[variable].dims or "key" not in node[variable].dims:
            return None
        if node.attrs.get("normalized_dim", "key") != "key":
            return None  # rows are not distributions: entropy and sink of a row mean nothing
        names = {"entropy": "entropy", "sink": "sink", "max": "max"}
        array = node[variable]
        queries, keys = int(array.sizes["query"]), int(array.sizes["key"])
        maps = len(sample_list) * len(step_list) * len(layer_list) * len(head_list)
        rows_used = max(1, min(queries, max_elements // max(1, maps * keys)))
        if rows_used < queries:
            rows_text = f"first {rows_used} of {queries} query rows (read budget {max_elements} elements)"
        transform = "logits" if variable == "logits" else "weights"

        has_head = "head" in array.dims
        layers_done = {}

        def cell(fixed, sample):
            # One read of the chosen heads per layer; the numbers of each head come from it.
            layer_fixed = {d: p for d, p in fixed.items() if d != "head"}
            key = tuple(sorted(layer_fixed.items()))
            if key not in layers_done:
                layers_done.clear()  # one layer at a time in memory
                layers_done[key] = _dense_layer(array, layer_fixed, head_list if has_head else None, transform,
                                                rows_used, _real(node, "query", sample), _real(node, "key", sample))
            return layers_done[key][head_list.index(fixed["head"]) if has_head else 0]

    # Like the page's maps, a time or node dimension the page has no selector for shows its first element.
    variables = [v for v in node.data_vars if node[v].attrs.get("role") != "image"]
    extra_dims = [d for d in _EXTRA_DIMS if any(d in node[v].dims for v in variables)]
    extra_fixed = {d: 0 for d in extra_dims}
    if extra_dims:
        rows_text += "; " + " and ".join(f"{d} {_labels(node, d, [0])[0]}" for d in extra_dims) + " only"
    values = {}
    for sample in sample_list:
        for step in step_list:
            table = {name: [] for name in names}
            for layer in layer_list:
                rows = {name: [] for name in names}
                for head in head_list:
                    fixed = {"sample": sample, "step": step, "layer": layer, "head": head, **extra_fixed}
                    fixed = {d: p for d, p in fixed.items() if d in node.sizes}
                    numbers = cell(fixed, sample)
                    for name in names:
                        rows[name].append(_number(numbers.get(name, math.nan)))
                for name in names:
                    table[name].append(rows[name])
            values[_key(sample, step)] = table
    result = {
        "statistics": list(names), "labels": {name: SUMMARY_LABELS[name] for name in names},
        "from": source, "rows": rows_text,
        "layers": _labels(node, "layer", layer_list), "heads": _labels(node, "head", head_list),
        "layer_index": layer_list, "head_index": head_list, "values": values,
    }
    if rows_used is not None:
        result["rows_used"] = rows_used
    first = values[_key(sample_list[0], step_list[0])]
    result.update({name: first[name] for name in ("entropy", "sink") if name in first})  # the contract's shortcut
    return result


# -- patches, edges, top-k rows, stored statistics ---------------------------------------------------------


def _image_variable(node) -> str | None:
    names = [name for name, array in node.data_vars.items() if array.attrs.get("role") == "image"]
    return names[0] if names else None


def _patch_extras(node, samples: list[int]) -> dict | None:
    row_name, col_name = PATCH_COORDS["key"]
    if row_name not in node.coords or col_name not in node.coords:
        return None
    per_sample = "sample" in node.coords[row_name].dims
    key_rows, key_cols = {}, {}
    for sample in samples if per_sample else [0]:
        rows, cols = node.coords[row_name], node.coords[col_name]
        if per_sample:
            rows, cols = rows.isel(sample=sample), cols.isel(sample=sample)
        key_rows[f"s{sample}"] = [int(v) for v in np.asarray(rows.values).reshape(-1)]
        key_cols[f"s{sample}"] = [int(v) for v in np.asarray(cols.values).reshape(-1)]
    first_rows, first_cols = next(iter(key_rows.values())), next(iter(key_cols.values()))
    stored = node.attrs.get("patch_grid")
    if stored is not None:
        grid = [int(size) for size in np.asarray(stored).reshape(-1)[:2]]
    else:
        grid = [max(first_rows) + 1, max(first_cols) + 1]
    on_grid = [i for i, (r, c) in enumerate(zip(first_rows, first_cols)) if r >= 0 and c >= 0]
    # The default query: the first token that is no patch (a ViT's CLS), else the first token.
    q_row, q_col = PATCH_COORDS["query"]
    default_query = 0
    if q_row in node.coords and q_col in node.coords:
        query_rows = np.asarray(_fix(node.coords[q_row], sample=0).values).reshape(-1)
        off_grid = np.flatnonzero(query_rows < 0)
        default_query = int(off_grid[0]) if off_grid.size else 0
    result = {"grid": grid, "first_patch": on_grid[0] if on_grid else 0, "default_query": default_query,
              "key_row": key_rows, "key_col": key_cols, "image": None, "images": {}, "image_shape": None}
    name = _image_variable(node)
    if name is not None:
        image = node[name]
        for sample in samples if "sample" in image.dims else [0]:
            one = _fix(image, sample=sample)
            order = [d for d in ("image_row", "image_col", "channel") if d in one.dims]
            if len(order) != one.ndim or len(order) < 2:
                continue  # not the spec's (sample?, image_row, image_col, channel?): the validator says so
            values = np.asarray(one.transpose(*order).values, dtype=np.float64)
            if values.ndim == 3 and values.shape[-1] not in (1, 3, 4):
                values = values[..., 0]  # an unusual channel count: the first channel, in grey
            stride = max(1, math.ceil(max(values.shape[:2]) / IMAGE_MAX_SIDE))
            values = values[::stride, ::stride]
            result["images"][f"s{sample}"] = png_base64(values)
            result["image_shape"] = list(values.shape[:2])
        result["image"] = next(iter(result["images"].values()), None)
        result["image_shared"] = "sample" not in image.dims  # one image for every sample (stored as s0)
        result["image_note"] = "the stored image, scaled from its own min..max to grey levels 0..255"
    return result


def _rollout(node, samples: list[int], steps: list[int]) -> dict | None:
    """Attention rollout over every layer (heads averaged, residual added) per embedded sample and step.

    :func:`attnformat.viewer.rollout.rollout_matrices` of the per-layer head means; None when the
    site is not square self-attention over keys, or larger than :data:`ROLLOUT_MAX_ELEMENTS`.
    """
    if "weights" not in node.data_vars or node.attrs.get("attention_type", "self") != "self":
        return None
    array = node["weights"]
    if node.attrs.get("normalized_dim", "key") != "key" or array.sizes.get("query") != array.sizes.get("key"):
        return None
    per_map = math.prod(int(array.sizes[d]) for d in array.dims if d not in ("sample", "step") + _EXTRA_DIMS)
    if per_map * len(samples) * len(steps) > ROLLOUT_MAX_ELEMENTS:
        return None
    from attnformat.viewer.rollout import rollout_matrices

    layers = range(int(array.sizes["layer"])) if "layer" in array.dims else [None]
    result = {}
    for sample in samples:
        for step in steps:
            stack = []
            for layer in layers:
                fixed = {"sample": sample, "step": step, "layer": layer, **{d: 0 for d in _EXTRA_DIMS}}
                one = _fix(array, **fixed)
                values = np.asarray(one.values, dtype=np.float64)
                if "head" in one.dims:
                    present = np.isfinite(values)
                    axis = one.dims.index("head")
                    with np.errstate(invalid="ignore", divide="ignore"):
                        values = np.where(present, values, 0.0).sum(axis=axis) / present.sum(axis=axis)
                stack.append(values)
            result[_key(sample, step)] = _encode_map(rollout_matrices(np.stack(stack)))
    return result


def _edge_variables(node) -> list[str]:
    variables = [v for v in node.data_vars if "edge" in node[v].dims and v in ("weights", "logits", "bias")]
    return variables + [v for v in node.data_vars if "edge" in node[v].dims and v not in variables
                        and node[v].attrs.get("role") not in ("image", "per_query")]


def _edge_layer(node, sample: int, step: int, layer: int, heads: list[int]) -> dict:
    """Every edge variable of one (sample, step, layer): ``{"<variable>/s/t/l": encode_map(rows x edges)}``.

    Rows are ``extra position x heads + head`` (``extra``: the site's time or node dimension, when
    its values have one), columns the edges.
    """
    values = {}
    for variable in _edge_variables(node):
        array = node[variable]
        extra = [d for d in array.dims if d in _EXTRA_DIMS]
        rows = []
        for position in range(int(node.sizes[extra[0]]) if extra else 1):
            for head in heads:
                fixed = {"sample": sample, "step": step, "layer": layer, "head": head}
                if extra:
                    fixed[extra[0]] = position
                one = _fix(array, **fixed)
                for dim in [d for d in one.dims if d != "edge"]:
                    one = one.isel({dim: 0})  # a second extra dimension: its first element
                rows.append(np.asarray(one.values, dtype=np.float64).reshape(-1))
        values[f"{variable}/{_key(sample, step, layer)}"] = _encode_map(np.stack(rows))
    return values


def _topk_layer(node, sample: int, step: int, layer: int, heads: list[int]) -> dict:
    """One (sample, step, layer) of a top-k site: ``{"s/t/l/h": {"weights", "key_index", "omitted"}}`` per head."""
    rows = {}
    for head in heads:
        fixed = {"sample": sample, "step": step, "layer": layer, "head": head}
        fixed.update({d: 0 for d in _EXTRA_DIMS})  # like the page's maps: the first time step or node
        kept = np.asarray(_fix(node["weights"], **fixed).values, dtype=np.float64)
        index = np.asarray(_fix(node["key_index"], **fixed).values, dtype=np.int64)
        entry = {"weights": _encode_map(kept.reshape(-1, kept.shape[-1])), "key_index": encode_ints(index)}
        if "omitted_weight" in node.data_vars:
            omitted = np.asarray(_fix(node["omitted_weight"], **fixed).values, dtype=np.float64)
            entry["omitted"] = _encode_map(omitted.reshape(1, -1))
        rows[_key(sample, step, layer, head)] = entry
    return rows


def _statistics_layer(node, sample: int, step: int, layer: int, heads: list[int]) -> dict:
    """One (sample, step, layer) of a statistics site: ``{"s/t/l/h": {statistic: encoded}}`` per head."""
    stored = [name for name in STATISTICS if name in node.data_vars]
    rows = {}
    for head in heads:
        fixed = {"sample": sample, "step": step, "layer": layer, "head": head}
        fixed.update({d: 0 for d in _EXTRA_DIMS})
        entry = {}
        for name in stored:
            values = np.asarray(_fix(node[name], **fixed).values).reshape(-1)
            entry[name] = (encode_ints(values) if name == "top_key"
                           else _encode_map(values.astype(np.float64).reshape(1, -1)))
        rows[_key(sample, step, layer, head)] = entry
    return rows


_LAYER_PRODUCERS = {"edges": _edge_layer, "topk": _topk_layer, "statistics": _statistics_layer}


def _text_size(value) -> int:
    """Characters of page a (nested) extras value costs, roughly (its base64 and numbers)."""
    if isinstance(value, dict):
        return sum(len(str(k)) + 4 + _text_size(v) for k, v in value.items())
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, (list, tuple)):
        return sum(_text_size(v) + 1 for v in value)
    return 12


def _embed_layers(node, kind: str, options: dict, target: dict) -> dict:
    """Fill ``target`` with the layers the page embeds, within the extras budget; say what was left out."""
    samples = _chosen(options, "samples", node, "sample")
    steps = _chosen(options, "steps", node, "step")
    layers = _chosen(options, "layers", node, "layer")
    heads = _chosen(options, "heads", node, "head")
    budget = int(options.get("extras_max_bytes") or EXTRAS_MAX_BYTES)
    if options.get("mode") == "server":
        budget = min(budget, SERVER_EXTRAS_MAX_BYTES)
    spent, left_out = 0, []
    for sample in samples:
        for step in steps:
            for layer in layers:
                if spent >= budget:
                    left_out.append(_key(sample, step, layer))
                    continue
                produced = _LAYER_PRODUCERS[kind](node, sample, step, layer, heads)
                spent += _text_size(produced)
                target.update(produced)
    return {"bytes": spent, "budget": budget, "left_out": left_out, "head_index": heads}


def layer_extras(site_node, kind: str, *, sample: int = 0, step: int = 0, layer: int = 0, heads=None) -> dict:
    """The per-layer part of a site's ``edges``, ``topk`` or ``statistics`` extras, for one (sample, step, layer).

    A page embeds these layer by layer up to a budget (:data:`EXTRAS_MAX_BYTES`, less for a server
    page); a served page asks for the others (``GET /api/extras``) and merges the answer.

    Parameters
    ----------
    site_node : xarray.DataTree
        An edge, top-k or statistics site.
    kind : {"edges", "topk", "statistics"}
        Which extras.
    sample, step, layer : int, default 0
        Positions along those dimensions (0 when the site lacks one).
    heads : list of int, optional
        Head positions (all by default).

    Returns
    -------
    dict
        ``{"values": {...}}`` for edges (keys ``"<variable>/s<i>/t<i>/l<i>"``), ``{"rows": {...}}``
        for top-k and statistics (keys ``"s<i>/t<i>/l<i>/h<i>"``), as in :func:`site_extras`.

    Examples
    --------
    >>> import attnformat
    >>> site = attnformat.open(attnformat.example_path("topk"))["decoder/self_topk"]
    >>> sorted(layer_extras(site, "topk", layer=1)["rows"])
    ['s0/t0/l1/h0', 's0/t0/l1/h1']
    """
    if kind not in _LAYER_PRODUCERS:
        raise ValueError(f"kind must be one of {', '.join(_LAYER_PRODUCERS)}, not {kind!r}")
    node = site_node
    for dim, value in (("sample", sample), ("step", step), ("layer", layer)):
        size = int(node.sizes.get(dim, 1))
        if not 0 <= int(value) < size:
            raise IndexError(f"{dim} {value} out of range 0..{size - 1}")
    heads = _chosen({"heads": heads}, "heads", node, "head")
    produced = _LAYER_PRODUCERS[kind](node, int(sample), int(step), int(layer), heads)
    return {"values": produced} if kind == "edges" else {"rows": produced}


def _edge_extras(node, options: dict) -> dict | None:
    if "source" not in node.coords or "target" not in node.coords:
        return None
    node_dim = node.attrs.get("edge_node_dim", "node")
    source = np.asarray(node.coords["source"].values, dtype=np.int64)
    target = np.asarray(node.coords["target"].values, dtype=np.int64)
    if node_dim in node.sizes:
        count = int(node.sizes[node_dim])
        labels = _labels(node, node_dim, list(range(count)))
    else:
        count = int(max(source.max(initial=-1), target.max(initial=-1))) + 1
        labels = [str(i) for i in range(count)]
    variables = _edge_variables(node)
    heads = _chosen(options, "heads", node, "head")
    result = {"node_dim": node_dim, "nodes": labels, "source": source.tolist(), "target": target.tolist(),
              "x": None, "y": None, "variables": variables, "heads": _labels(node, "head", heads), "head_index": heads,
              "extra": None, "values": {}}
    if "node_x" in node.coords and "node_y" in node.coords:
        result["x"] = [_number(v) for v in np.asarray(node.coords["node_x"].values, dtype=np.float64)]
        result["y"] = [_number(v) for v in np.asarray(node.coords["node_y"].values, dtype=np.float64)]
    from attnformat.viewer.selection import absent_note

    result["absent"] = absent_note(node.attrs)
    for variable in variables:
        extra = [d for d in node[variable].dims if d in _EXTRA_DIMS]
        if extra:  # a spatial site per time step, a temporal site per node: the view picks one
            result["extra"] = {"dim": extra[0], "labels": _labels(node, extra[0], list(range(int(node.sizes[extra[0]]))))}
    result["embedded"] = _embed_layers(node, "edges", options, result["values"])
    return result


def _topk_extras(node, options: dict) -> dict | None:
    if "weights" not in node.data_vars or "key_index" not in node.data_vars:
        return None
    from attnformat.viewer.selection import key_count

    extra = [d for d in _EXTRA_DIMS if d in node["weights"].dims]
    result = {"top_k": int(node.sizes.get("rank", 0)), "key_count": key_count(node), "rows": {},
              "note": ("first " + " and ".join(extra) + " only") if extra else None,
              "absent": "not kept: below the row's k-th weight (value unknown, never 0)"}
    result["embedded"] = _embed_layers(node, "topk", options, result["rows"])
    return result


def _statistics_extras(node, options: dict) -> dict | None:
    stored = [name for name in STATISTICS if name in node.data_vars]
    if not stored:
        return None
    from attnformat.viewer.selection import key_count

    labels = {name: _statistic_label(name, node.attrs) for name in stored}
    result = {"stored": stored, "labels": labels, "key_count": key_count(node),
              "local_window": int(node.attrs["local_window"]) if "local_window" in node.attrs else None, "rows": {}}
    result["embedded"] = _embed_layers(node, "statistics", options, result["rows"])
    return result


#: What each stored statistic is (viewer/row_statistics.py says the same; importing it loads matplotlib).
_STATISTIC_TEXT = {
    "entropy": "entropy [nats]",
    "max_weight": "max weight [fraction of the row]",
    "sink_weight": "sink weight (first key) [fraction of the row]",
    "local_weight": "local weight [fraction of the row]",
    "top_key": "top key [key index]",
}


def _statistic_label(name: str, attrs) -> str:
    if name == "local_weight" and "local_window" in attrs:
        return f"local weight (|query - key position| <= {int(attrs['local_window'])}) [fraction of the row]"
    return _STATISTIC_TEXT.get(name, name)


def _summary_elements(node, selection: dict) -> int:
    """How many map elements a full summary of the selection reads (dense variables only)."""
    variable, _ = _summary_source(node)
    if variable is None or node.attrs.get("layout") in ("edge", "topk", "statistics"):
        return 0
    array = node[variable]
    count = 1
    for dim in array.dims:
        if dim in _EXTRA_DIMS:
            continue  # shown at its first element only
        name = {"sample": "samples", "step": "steps", "layer": "layers", "head": "heads"}.get(dim)
        count *= len(_chosen(selection, name, node, dim)) if name else int(array.sizes[dim])
    return count


# -- the entry point ------------------------------------------------------------------------------------


def site_extras(site_node, name: str, options: dict | None = None) -> dict:
    """Everything the overview, image, graph, top-k and statistics views of one site draw.

    Parameters
    ----------
    site_node : xarray.DataTree
        The site group (lazy; only what is embedded is read).
    name : str
        The site's path, as the payload names it.
    options : dict, optional
        ``samples``, ``steps``, ``layers``, ``heads``: lists of positions the page embeds (all by
        default); ``mode``: ``"embedded"`` or ``"server"`` (a server page summarises its first
        sample only, defers the summary of a site above :data:`SERVER_SUMMARY_ELEMENTS` to a
        request, and embeds fewer layers of edges, top-k rows and statistics);
        ``summary_max_elements``: the summary's read budget (default :data:`SUMMARY_MAX_ELEMENTS`);
        ``extras_max_bytes``: the per-layer extras' budget (default :data:`EXTRAS_MAX_BYTES`;
        ``embedded.left_out`` lists the layers left out).

    Returns
    -------
    dict
        Any of ``summary``, ``patches``, ``edges``, ``topk``, ``statistics`` (see the module
        docstring for their shapes and sizes).

    Examples
    --------
    >>> import attnformat
    >>> site = attnformat.open(attnformat.example_path("image"))["encoder/self"]
    >>> extras = site_extras(site, "encoder/self", {"layers": [0], "heads": [0, 1]})
    >>> sorted(extras), extras["patches"]["grid"], extras["patches"]["default_query"]
    (['patches', 'summary'], [4, 4], 0)
    """
    options = dict(options or {})
    layout = site_node.attrs.get("layout")
    budget = int(options.get("summary_max_elements", SUMMARY_MAX_ELEMENTS))
    extras: dict = {}
    selection = {key: options.get(key) for key in ("samples", "steps", "layers", "heads")}
    if options.get("mode") == "server":
        # A server page lists many samples: summarise the first here, the others on request.
        selection["samples"] = _chosen(selection, "samples", site_node, "sample")[:1]
    if options.get("mode") == "server" and _summary_elements(site_node, selection) > SERVER_SUMMARY_ELEMENTS:
        summary = {"deferred": True, "reason": "large site: the summary is computed when the overview asks for it",
                   "statistics": [], "values": {}}
    else:
        summary = layer_head_summary(site_node, **selection, max_elements=budget)
    if summary is not None:
        extras["summary"] = summary
    if layout == "edge":
        edges = _edge_extras(site_node, options)
        if edges is not None:
            extras["edges"] = edges
    elif layout == "topk":
        topk = _topk_extras(site_node, options)
        if topk is not None:
            extras["topk"] = topk
    elif layout == "statistics":
        statistics = _statistics_extras(site_node, options)
        if statistics is not None:
            extras["statistics"] = statistics
    else:
        samples = _chosen(options, "samples", site_node, "sample")
        if options.get("mode") == "server":
            samples = samples[:SERVER_IMAGE_SAMPLES]  # a served page lists many samples: images of the first few
        patches = _patch_extras(site_node, samples)
        if patches is not None:
            rollout = _rollout(site_node, samples, _chosen(options, "steps", site_node, "step"))
            if rollout is not None:
                patches["rollout"] = rollout
                patches["rollout_note"] = ("attention rollout over every layer: heads averaged, the identity added for the "
                                           "residual connection, rows renormalised, layers multiplied (Abnar & Zuidema 2020)")
            extras["patches"] = patches
    return extras
