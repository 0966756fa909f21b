"""Normative names of the attnformat spec, in one place.

The spec (``spec/attnformat-spec.md``) is the contract; this module holds the same names as
Python constants so that the writer, the reader, the validator and the viewer never spell a
name twice.
"""

from __future__ import annotations

FORMAT_NAME = "attnformat"
FORMAT_VERSION = "1.0.0"

#: Canonical order of the attention dimensions. Attention variables use a subset, in this order.
ATTENTION_DIMS = ("step", "sample", "layer", "head", "time", "node", "query", "key", "edge")
#: Dimensions that index copies of a map rather than positions inside it.
LEADING_DIMS = ("step", "sample", "layer", "head", "time", "node")
#: Auxiliary dimensions allowed on non-attention variables.
AUXILIARY_DIMS = ("image_row", "image_col", "channel")

ATTENTION_VARIABLES = ("weights", "logits", "bias")
LAYOUTS = ("dense", "edge")
NORMALIZATIONS = ("softmax", "sparsemax", "sigmoid", "other")
NORMALIZED_DIMS = ("key", "query")
ROLES = ("pairwise", "image", "per_query", "per_key", "auxiliary")
LOSSY_METHODS = ("bitround", "quantize")
COMPLETENESS = ("complete", "incomplete")

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
PATCH_COORDS = {"query": ("query_patch_row", "query_patch_col"), "key": ("key_patch_row", "key_patch_col")}
EDGE_COORDS = ("source", "target")

#: Maps up to this many elements (4 MiB of float32) are one chunk, one read per map; larger maps
#: are cut into strips of whole rows of at most this many elements, which readers decode side by
#: side, each straight into its place in the result.
MAX_MAP_CHUNK_ELEMENTS = 1024 * 1024

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
