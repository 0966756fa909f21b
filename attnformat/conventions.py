"""Normative names of the attnformat spec, in one place.

The spec (``spec/attnformat-spec.md``) is the contract; this module holds the same names as
Python constants so that the writer, the reader, the validator and the viewer never spell a
name twice.
"""

from __future__ import annotations

FORMAT_NAME = "attnformat"
FORMAT_VERSION = "1.2.0"

#: Canonical order of the attention dimensions. Attention variables use a subset, in this order.
ATTENTION_DIMS = ("step", "sample", "layer", "head", "time", "node", "query", "key", "edge", "rank")
#: Dimensions that index copies of a map rather than positions inside it.
LEADING_DIMS = ("step", "sample", "layer", "head", "time", "node")
#: Auxiliary dimensions allowed on non-attention variables.
AUXILIARY_DIMS = ("image_row", "image_col", "channel")

ATTENTION_VARIABLES = ("weights", "logits", "bias")
LAYOUTS = ("dense", "edge", "topk", "statistics")
NORMALIZATIONS = ("softmax", "sparsemax", "sigmoid", "other")
NORMALIZED_DIMS = ("key", "query")
ROLES = ("pairwise", "image", "per_query", "per_key", "auxiliary")
LOSSY_METHODS = ("bitround", "quantize")
COMPLETENESS = ("complete", "incomplete")

#: Variables of a top-k site (spec section "Top-k layout"): the kept weights and their key
#: indices on (..., query, rank), the mass left out on (..., query).
TOPK_VARIABLES = ("weights", "key_index", "omitted_weight")
#: Variables of a statistics site, each on (..., query), at least one present.
STATISTICS = ("entropy", "max_weight", "sink_weight", "local_weight", "top_key")
#: Storage dtype and fill value of the normative integer variables: -1 means "no key" (a rank
#: beyond the row's available keys, a row not captured). Float variables take the site's float
#: dtype and NaN.
INTEGER_VARIABLES = {"key_index": ("int32", -1), "top_key": ("int32", -1)}
#: The one head reduction a site may declare (``head_reduction``): the mean over heads.
HEAD_REDUCTIONS = ("mean",)

#: Root attributes.
ROOT_FORMAT = "attnformat"
ROOT_VERSION = "attnformat_version"
ROOT_PRODUCER = "producer"
ROOT_COMPLETENESS = "completeness"
ROOT_MODEL_ATTRS = ("model_name", "model_framework", "model_adapter", "description")

#: Per-token coordinates, by the dimension they label.
LABEL_COORDS = {"query": "query_label", "key": "key_label", "node": "node_label"}
POSITION_COORDS = {"query": "query_position", "key": "key_position"}
GROUP_COORDS = {"query": "query_group", "key": "key_group"}
MASK_COORDS = {"query": "query_mask", "key": "key_mask"}
#: Generation (spec section "Coordinates"): the tokenizer's raw piece of each token, and the
#: generation step that produced it (-1 for prompt tokens).
TOKEN_COORDS = {"query": "query_token", "key": "key_token"}
GENERATION_STEP_COORDS = {"query": "query_generation_step", "key": "key_generation_step"}
PATCH_COORDS = {"query": ("query_patch_row", "query_patch_col"), "key": ("key_patch_row", "key_patch_col")}
EDGE_COORDS = ("source", "target")

#: Maps up to this many elements (4 MiB of float32) are one chunk, one read per map; larger maps
#: are cut into strips of whole rows of at most this many elements, which readers decode side by
#: side, each straight into its place in the result.
MAX_MAP_CHUNK_ELEMENTS = 1024 * 1024
#: Smaller maps are grouped into chunks of at least this many elements (256 KiB of float32).
#: Below ~64 KiB per chunk, per-file overhead (a 4 KiB filesystem block, an inode, a task per
#: chunk for dask) dominates; above ~1 MiB, reading one small head decodes more than it needs.
MIN_MAP_CHUNK_ELEMENTS = 64 * 1024

# -- bounds of ATTN-STORE-006 -------------------------------------------------------------------
# A file is hostile until screened: readers check every size it declares against these bounds
# before allocating anything, so that a few kilobytes of crafted metadata cannot make a reader
# allocate gigabytes, inflate a zip bomb, or walk a graph without end. Each bound is far above
# what any real attention capture needs (see the spec's rationale for ATTN-STORE-006).

#: One metadata document (``zarr.json``, ``.zarray``, ``.zattrs``, consolidated metadata, one
#: HDF5 attribute): real files hold a few kilobytes, the largest label lists a few megabytes.
MAX_METADATA_DOCUMENT_BYTES = 16 * 1024 * 1024
#: All metadata documents of one file together: bounds what the screen reads and parses.
MAX_METADATA_TOTAL_BYTES = 64 * 1024 * 1024
#: Dimensions of one array: attention uses at most 10 (ATTENTION_DIMS) plus auxiliary ones, and
#: numpy itself stops at 64; a bound keeps shape products and chunk grids small to compute.
MAX_DIMENSIONS = 32
#: Decoded bytes of one chunk: the writer's chunks hold at most 4 MiB (MAX_MAP_CHUNK_ELEMENTS of
#: float32); 256 MiB leaves room for other writers and is what a reader may allocate per chunk.
MAX_CHUNK_BYTES = 256 * 1024 * 1024
#: Inflated size over compressed size of one zip entry. Deflate cannot exceed 1032:1 (so every
#: deflated entry, even of zeros, passes); a bzip2 or LZMA entry claiming more is a bomb. Not
#: applied to chunks: zstd shrinks a chunk of zeros 10,000-fold, and a chunk's decoded size is
#: already held to exactly its declared size (ATTN-STORE-005) and to MAX_CHUNK_BYTES.
MAX_COMPRESSION_RATIO = 1100
#: Inflated bytes of one zip entry (a metadata document, a chunk or a shard of chunks): entries
#: are also held to the size their zip header declares, which a bomb understates.
MAX_ZIP_ENTRY_BYTES = 1024 * 1024 * 1024
#: Nesting of groups: trees are a root, a few model parts and the sites; 64 stops a deep or
#: cyclic (HDF5 hard-link) hierarchy from exhausting the stack or looping.
MAX_GROUP_DEPTH = 64
#: Groups plus arrays in one file: a large model has a few thousand sites; a bound keeps listing
#: and screening a store bounded in time.
MAX_NODES = 100_000

#: The bounds above by name, for messages and the spec's table.
LIMITS = {
    "MAX_METADATA_DOCUMENT_BYTES": MAX_METADATA_DOCUMENT_BYTES,
    "MAX_METADATA_TOTAL_BYTES": MAX_METADATA_TOTAL_BYTES,
    "MAX_DIMENSIONS": MAX_DIMENSIONS,
    "MAX_CHUNK_BYTES": MAX_CHUNK_BYTES,
    "MAX_COMPRESSION_RATIO": MAX_COMPRESSION_RATIO,
    "MAX_ZIP_ENTRY_BYTES": MAX_ZIP_ENTRY_BYTES,
    "MAX_GROUP_DEPTH": MAX_GROUP_DEPTH,
    "MAX_NODES": MAX_NODES,
}

#: Row sums of softmax weights must be within this of 1 (float16 data gets the looser one).
ROW_SUM_TOLERANCE = {"float16": 1e-2, "float32": 1e-3, "float64": 1e-6}


def is_site(attrs) -> bool:
    """Return True if a group's attributes mark it as an attention site.

    Examples
    --------
    >>> is_site({"layout": "dense"})
    True
    >>> is_site({})
    False
    """
    return "layout" in attrs


def canonical_dims(dims) -> tuple[str, ...]:
    """Sort attention dimension names into the canonical order.

    Examples
    --------
    >>> canonical_dims(("key", "head", "query", "layer"))
    ('layer', 'head', 'query', 'key')
    """
    unknown = [d for d in dims if d not in ATTENTION_DIMS]
    if unknown:
        raise ValueError(f"not attention dimensions: {unknown}; allowed: {ATTENTION_DIMS}")
    return tuple(sorted(dims, key=ATTENTION_DIMS.index))
