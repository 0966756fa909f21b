"""The spec's metadata rules on a file's consolidated metadata as plain data, for the one-map road.

Why this exists: :func:`attnformat.validate` checks a file as an xarray tree, and importing
xarray, zarr and jsonschema costs a fresh process more than drawing one map does (measured: the
first plot of a file never checked on the machine took 4.0 s against 1.5 s for a plain ``.npy``
script). The direct road (:func:`attnformat.engines.direct.open_direct`) already holds the root
document's consolidated metadata, parsed and screened as data; :func:`passes_metadata_rules`
checks the metadata rules on it with plain Python and numpy.

Decision: sound, not complete. It answers True only for files whose every metadata rule it can
check here and that break none of them at MUST level: sites of the ``dense`` layout holding
``weights``, ``logits`` and ``bias`` with the spec's coordinates. Anything else (edge, top-k or
statistics sites, variables with a role, image patches, a schema keyword it does not know, any
finding at all) answers False, and the caller takes the general road, which validates the whole
tree and reports each broken rule with its id and the exit code, exactly as before.

What is not checked here, on purpose: the value rules (rows summing to 1, weights in [0, 1], masks
and causality respected, the ATTN-TOPK/STAT value rules). Drawing one map does not need them, and
checking them means reading every map of the file. The chunks a plot reads are checked as on every
road (manifest, CRC-32C, size); ``attnformat validate`` checks all of them and every value.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from itertools import product

import numpy as np

from attnformat.conventions import (
    ATTENTION_DIMS,
    ATTENTION_VARIABLES,
    GENERATION_STEP_COORDS,
    GROUP_COORDS,
    LABEL_COORDS,
    ROOT_COMPLETENESS,
    MASK_COORDS,
    PATCH_COORDS,
    POSITION_COORDS,
    TOKEN_COORDS,
    is_site,
)

#: Chunk grids larger than this are left to the general road's ATTN-STORE-007 check.
_MAX_LISTED_CHUNKS = 1 << 20
#: Annotations a schema may carry; they never make an instance invalid.
_ANNOTATIONS = ("$schema", "$id", "title", "description", "x-rule-id", "$comment", "examples")


class _Unsupported(Exception):
    """A schema keyword this module does not evaluate: the general road decides."""


@lru_cache(maxsize=None)
def _schema(name: str) -> dict:
    text = resources.files("attnformat.schemas").joinpath(f"{name}.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def _equal(left, right) -> bool:
    """JSON equality: ``true`` is not ``1``, ``1.0`` is ``1`` (as JSON Schema compares)."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(_equal(a, b) for a, b in zip(left, right))
    return left == right


def _is_type(value, name: str) -> bool:
    if name == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    kinds = {"string": str, "boolean": bool, "array": list, "object": dict, "null": type(None)}
    if name not in kinds:
        raise _Unsupported(name)
    return isinstance(value, kinds[name])


def valid_instance(instance, schema: dict) -> bool:
    """Whether ``instance`` (plain JSON data) is valid against ``schema``, for the keywords the
    spec's attribute schemas use; raises :class:`_Unsupported` for any other keyword.

    Parameters
    ----------
    instance : object
        Parsed JSON (dicts, lists, strings, numbers, booleans, None).
    schema : dict
        A JSON Schema (draft 2020-12) using ``type``, ``const``, ``enum``, ``pattern``,
        ``minLength``, ``minimum``, ``maximum``, ``exclusiveMinimum``, ``items``, ``minItems``,
        ``maxItems``, ``properties``, ``required``, ``allOf`` and ``if``/``then``/``else``.

    Examples
    --------
    >>> valid_instance({"causal": 1}, {"properties": {"causal": {"type": "integer", "enum": [0, 1]}}})
    True
    >>> valid_instance({"causal": True}, {"properties": {"causal": {"type": "integer", "enum": [0, 1]}}})
    False
    """
    for keyword, expected in schema.items():
        if keyword in _ANNOTATIONS or keyword in ("then", "else"):
            continue
        if keyword == "type":
            names = expected if isinstance(expected, list) else [expected]
            if not any(_is_type(instance, name) for name in names):
                return False
        elif keyword == "const":
            if not _equal(instance, expected):
                return False
        elif keyword == "enum":
            if not any(_equal(instance, option) for option in expected):
                return False
        elif keyword == "pattern":
            if isinstance(instance, str) and re.search(expected, instance) is None:
                return False
        elif keyword == "minLength":
            if isinstance(instance, str) and len(instance) < expected:
                return False
        elif keyword in ("minimum", "maximum", "exclusiveMinimum"):
            if _is_type(instance, "number"):
                if keyword == "minimum" and instance < expected or keyword == "maximum" and instance > expected:
                    return False
                if keyword == "exclusiveMinimum" and instance <= expected:
                    return False
        elif keyword == "items":
            if isinstance(instance, list) and not all(valid_instance(item, expected) for item in instance):
                return False
        elif keyword in ("minItems", "maxItems"):
            if isinstance(instance, list) and (len(instance) < expected if keyword == "minItems" else len(instance) > expected):
                return False
        elif keyword == "properties":
            if isinstance(instance, dict) and not all(valid_instance(instance[key], sub) for key, sub in expected.items()
                                                      if key in instance):
                return False
        elif keyword == "required":
            if isinstance(instance, dict) and not all(key in instance for key in expected):
                return False
        elif keyword == "allOf":
            if not all(valid_instance(instance, sub) for sub in expected):
                return False
        elif keyword == "if":
            branch = schema.get("then") if valid_instance(instance, expected) else schema.get("else")
            if branch is not None and not valid_instance(instance, branch):
                return False
        else:
            raise _Unsupported(keyword)
    return True


def _coordinate_names(arrays: dict) -> set:
    """What xarray makes coordinates of a group's arrays: arrays named after their one dimension,
    and the names each array lists in its ``coordinates`` attribute."""
    names = {name for name, array in arrays.items() if array.dims == (name,)}
    for array in arrays.values():
        names.update(array.coordinate_names)
    return names & set(arrays)


def _coordinates_conform(store, arrays: dict, dims: dict) -> bool:
    """ATTN-COORD-001 to 006 for the coordinates present (reading the few small ones whose values
    the rules constrain)."""
    def on_token_dims(array, dim):
        return array.dims in ((dim,), ("sample", dim))

    if "step" in dims:
        step = arrays.get("step")
        if step is None or step.dims != ("step",) or step.dtype.kind not in "iu":
            return False
        values = np.asarray(store.read(step), dtype=np.int64)
        if values.size > 1 and not np.all(np.diff(values) > 0):
            return False
    for name in ("layer", "head"):
        if name in arrays:
            if arrays[name].dtype.kind not in "iu":
                return False
            values = np.sort(np.asarray(store.read(arrays[name])).ravel())  # (np.unique imports numpy.ma)
            if np.any(values[1:] == values[:-1]):
                return False
    checks = [(LABEL_COORDS, "OUT"), (TOKEN_COORDS, "OUT"), (POSITION_COORDS, "iu"), (GROUP_COORDS, "iuOUT"),
              (GENERATION_STEP_COORDS, "iu")]
    for coordinates, kinds in checks:
        for dim, name in coordinates.items():
            array = arrays.get(name)
            if array is not None and (array.dtype.kind not in kinds or not on_token_dims(array, dim)):
                return False
    for dim, name in MASK_COORDS.items():
        array = arrays.get(name)
        if array is not None and (array.dtype != bool or not on_token_dims(array, dim)):
            return False
    for name in GENERATION_STEP_COORDS.values():
        if name in arrays and np.any(store.read(arrays[name]) < -1):
            return False
    return True


def _stores_every_chunk(array) -> bool:
    """ATTN-STORE-007 from the chunk manifest of a sealed file, which lists every chunk stored
    (a listed chunk that is missing on disk is damage found when it is read, as on every road)."""
    from attnformat.engines.zarr_manifest import MANIFEST_ATTR

    manifest = array.attributes.get(MANIFEST_ATTR)
    grid = [-(-size // chunk) for size, chunk in zip(array.shape, array.chunk_shape)]
    if not isinstance(manifest, dict) or int(np.prod(grid, dtype=np.int64)) > _MAX_LISTED_CHUNKS:
        return False
    return all(array.chunk_key(coords) in manifest for coords in product(*(range(n) for n in grid)))


def _dense_site_conforms(store, path: str, attrs: dict) -> bool:
    if not valid_instance(attrs, _schema("site-attributes")):
        return False
    if attrs.get("layout") != "dense" or any(name not in attrs for name in ("attention_type", "causal")):
        return False  # other layouts: the general road (ATTN-SITE-008 for the missing attributes)
    parts = path.split("/")
    if any(is_site(store.groups.get("/".join(parts[:end]), {})) for end in range(len(parts))):
        return False  # ATTN-SITE-006: a site inside a site
    arrays = {}
    for name in store.members(path):
        array = store.array(f"{path}/{name}")
        if array is None:
            return False  # an array the direct road does not read: the general road explains
        arrays[name] = array
    dims = {}
    for array in arrays.values():
        for dim, size in zip(array.dims, array.shape):
            if dims.setdefault(dim, size) != size:
                return False  # ATTN-STORE-002
    coordinates = _coordinate_names(arrays)
    variables = {name: array for name, array in arrays.items() if name not in coordinates}
    if any(name not in ATTENTION_VARIABLES for name in variables):
        return False  # variables with a role (pairwise, image...): their rules are the general road's
    if not any(name in variables for name in ("weights", "logits")):
        return False  # ATTN-SITE-005
    if any(name in arrays for pair in PATCH_COORDS.values() for name in pair):
        return False  # image patches (ATTN-IMG-*): the general road
    for name, array in variables.items():
        if any(dim not in ATTENTION_DIMS for dim in array.dims):
            return False  # ATTN-DIM-001
        if list(array.dims) != sorted(array.dims, key=ATTENTION_DIMS.index):
            return False  # ATTN-DIM-002
        if name != "bias" and not ("query" in array.dims and "key" in array.dims
                                   and "edge" not in array.dims and "rank" not in array.dims):
            return False  # ATTN-DIM-003
        if array.dtype.kind != "f":
            return False  # ATTN-VAR-001
        if "head_reduction" in attrs and "head" in array.dims:
            return False  # ATTN-SITE-009
        lossy = {key: value for key, value in array.attrs.items() if key.startswith("lossy_")}
        if lossy and not valid_instance(lossy, _schema("variable-attributes")):
            return False  # ATTN-LOSSY-*
    if store.groups.get("", {}).get(ROOT_COMPLETENESS) == "complete" and not all(
            _stores_every_chunk(array) for array in variables.values()):
        return False  # ATTN-STORE-007
    if "weights" in variables and "logits" in variables and variables["weights"].dims != variables["logits"].dims:
        return False  # ATTN-DIM-004
    if "bias" in variables:
        reference = next(variables[n].dims for n in ("weights", "logits") if n in variables)
        if not set(variables["bias"].dims) <= set(reference):
            return False  # ATTN-DIM-005
    return _coordinates_conform(store, arrays, dims)


def passes_metadata_rules(store) -> bool:
    """True when a file read directly breaks none of the spec's metadata rules; False when it
    breaks one or when this module cannot tell (see the module docstring: the caller then
    validates the tree, which names each broken rule).

    The value rules are not checked: drawing one map does not need them, and ``attnformat
    validate`` reads every value. Nothing is recorded: this is no verdict about the whole file.

    Parameters
    ----------
    store : attnformat.engines.zarr_direct.ZarrDirectory
        The file's direct reader (:func:`attnformat.engines.direct.open_direct`).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.engines.direct import open_direct
    >>> passes_metadata_rules(open_direct(attnformat.example_path("dense")))
    True
    >>> passes_metadata_rules(open_direct(attnformat.example_path("edge")))  # edge sites: the general road
    False
    """
    try:
        groups = store.groups
        root = groups.get("", {})
        if not valid_instance(root, _schema("root-attributes")):
            return False  # ATTN-ROOT-001 to 004
        sites = [path for path, attrs in groups.items() if is_site(attrs)]
        if not sites or "" in sites:
            return False  # ATTN-ROOT-005 (no site), or a root that is a site: the general road
        return all(_dense_site_conforms(store, path, groups[path]) for path in sites)
    except _Unsupported:
        return False
