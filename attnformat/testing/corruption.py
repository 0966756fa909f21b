"""Hostile and damaged attention files, and a harness that runs the command line on each.

A *variant* is one example file (:data:`attnformat.examples.EXAMPLES`) in one storage
(:data:`STORAGES`) with one mutation applied: a bit flip in a chunk, a truncated metadata
document, a pickle codec spelled ``"pick\\u006ce"``, a chunk that is a symbolic link to a file
outside the store, a zip entry that inflates to a gigabyte... Each variant says what must happen
(its *expectation*): ``"refuse"`` (every command exits 2), ``"detect"`` (``validate`` and
``convert`` exit 2, ``info`` may succeed), ``"reject"`` (nonconforming or unreadable: exit 1 or
2), ``"tolerant"`` (exit 0, 1 or 2, but values that read back must equal the original's) or
``"pristine"`` (an unmodified control: everything exits 0).

:func:`run_campaign` forks one child per command from a parent that imported attnformat once
(a fork costs milliseconds, a new interpreter a second), bounds each child's time and address
space, measures its peak memory with :func:`os.wait4`, and classifies every run into the
:data:`FAILURE_TYPES`. Variants are deterministic: a variant's name and the seed fix every
choice, so ``variant_by_name(name, seed)`` rebuilds exactly the file that failed.

Only the standard library, numpy, h5py and zipfile are used to build the files, so that the
kit checks attnformat's own reading against independent ground truth.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STORAGES = ("zarr3", "zarr2", "zip", "h5")
SUFFIXES = {"zarr3": ".zarr", "zarr2": ".zarr", "zip": ".zarr.zip", "h5": ".h5"}
ATTENTION_VARIABLES = ("weights", "logits", "bias")
METADATA_NAMES = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")
SECRET_TOKEN = "ATTNFORMAT-SECRET-7f3a9c"
MARKER_NAME = "PICKLE-EXECUTED"
MEMORY_LIMIT_BYTES = 1 << 30  # a run over this peak resident size is a failure
ADDRESS_SPACE_LIMIT = 4 << 30  # beyond what a child inherits: keeps a runaway child from taking the machine down
UNCAUGHT_EXIT = 70  # the child's own code when something escaped attnformat.cli.main

COMMANDS = {
    "info": ("info", "{source}"),
    "validate": ("validate", "{source}"),
    "validate-json": ("validate", "--json", "{source}"),
    "convert-zarr": ("convert", "{source}", "{out}/converted.zarr"),
    "convert-h5": ("convert", "{source}", "{out}/converted.h5"),
}
_ALL = frozenset({0, 1, 2})
EXPECTATIONS = {
    "pristine": dict.fromkeys(COMMANDS, frozenset({0})),
    "refuse": dict.fromkeys(COMMANDS, frozenset({2})),
    "detect": {**dict.fromkeys(COMMANDS, frozenset({2})), "info": frozenset({0, 2})},
    "reject": {**dict.fromkeys(COMMANDS, frozenset({1, 2})), "info": _ALL},
    "tolerant": dict.fromkeys(COMMANDS, _ALL),
}
FAILURE_TYPES = (
    "traceback", "wrong exit code", "hang", "memory over 1 GB", "silent corruption", "data lost",
    "pickle executed", "message quality", "API error type",
)
# Failure types that must be zero for the issue to be done (message quality and API error types
# are reported too, for routing).
ZERO_TYPES = FAILURE_TYPES[:7]


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------
@dataclass
class MutationContext:
    """What a mutation may use: its random generator and a scratch folder outside the store."""

    rng: random.Random
    scratch: Path
    secret: Path
    marker: Path


@dataclass(frozen=True)
class Kind:
    """One way of damaging a file: the class it belongs to, where it applies, what must happen."""

    name: str
    klass: str
    storages: tuple[str, ...]
    expect: str
    mutate: Callable[[Path, str, MutationContext], str | None]
    weight: int = 1  # variants per (example, storage) in the full campaign, before scaling


@dataclass(frozen=True)
class Variant:
    """One damaged or crafted file: ``name`` is ``example/storage/kind/index``.

    Examples
    --------
    >>> variant = variant_by_name("dense/zarr3/chunk-bitflip/0")
    >>> variant.klass, variant.expect
    ('bitflip', 'detect')
    """

    name: str
    example: str
    storage: str
    kind: str
    index: int
    klass: str
    expect: str
    seed: int = 0

    @property
    def file_name(self) -> str:
        """The file name the variant is written under (``dense.zarr``, ``dense.h5``...)."""
        return self.example + SUFFIXES[self.storage]


@dataclass
class Failure:
    """One thing that went wrong with one variant (or writer scenario)."""

    type: str
    variant: str
    klass: str
    command: str
    exit_code: int | None
    detail: str
    stderr: str = ""
    description: str = ""

    def line(self) -> str:
        """One line for the report."""
        code = "" if self.exit_code is None else f" exit {self.exit_code}"
        first = self.stderr.strip().splitlines()[0][:200] if self.stderr.strip() else ""
        text = f"[{self.type}] {self.variant} ({self.description}) {self.command}{code}: {self.detail}"
        return text + (f" | stderr: {first}" if first else "")


@dataclass
class CampaignResult:
    """Counts and failures of a campaign run."""

    inputs: int = 0
    runs: int = 0
    skipped: int = 0
    seconds: float = 0.0
    seed: int = 0
    failures: list[Failure] = field(default_factory=list)
    by_class: dict[str, int] = field(default_factory=dict)
    writer_scenarios: int = 0
    not_run: int = 0

    def count(self, failure_type: str) -> int:
        """Number of distinct variants with at least one failure of this type."""
        return len({f.variant for f in self.failures if f.type == failure_type})

    def failing(self, types: Iterable[str] = ZERO_TYPES) -> list[Failure]:
        """The failures of the given types."""
        types = set(types)
        return [f for f in self.failures if f.type in types]


# -- storage access -----------------------------------------------------------------------------
class _Entries:
    """The files of a Zarr directory store or the entries of a ``.zarr.zip``, by key."""

    def __init__(self, path: Path, storage: str):
        self.path, self.storage = path, storage
        self.zipped = storage == "zip"
        self.data: dict[str, bytes] = {}
        if self.zipped:
            with zipfile.ZipFile(path) as archive:
                self.data = {info.filename: archive.read(info) for info in archive.infolist() if not info.is_dir()}

    def keys(self) -> list[str]:
        if self.zipped:
            return sorted(self.data)
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file() and not p.is_symlink())

    def read(self, key: str) -> bytes:
        return self.data[key] if self.zipped else (self.path / key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        if self.zipped:
            self.data[key] = data
        else:
            target = self.path / key
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink():
                target.unlink()
            target.write_bytes(data)

    def delete(self, key: str) -> None:
        if self.zipped:
            del self.data[key]
        else:
            (self.path / key).unlink()

    def file(self, key: str) -> Path:
        return self.path / key

    def save(self) -> None:
        if self.zipped:
            with zipfile.ZipFile(self.path, "w", zipfile.ZIP_STORED) as archive:
                for key, data in self.data.items():
                    archive.writestr(key, data)

    # -- what the keys are ----------------------------------------------------------------------
    @property
    def v2(self) -> bool:
        return self.storage == "zarr2"

    def is_metadata(self, key: str) -> bool:
        return key.rsplit("/", 1)[-1] in METADATA_NAMES

    def array_of(self, key: str) -> str | None:
        if self.is_metadata(key):
            return None
        if self.v2:
            return key.rsplit("/", 1)[0] if "/" in key else None
        if key.endswith("/c"):
            return key[:-2]
        head, separator, _ = key.partition("/c/")
        return head if separator else None

    def chunks(self, which: str = "any") -> list[str]:
        found = []
        for key in self.keys():
            array = self.array_of(key)
            if array is None:
                continue
            base = array.rsplit("/", 1)[-1]
            if which == "attention" and base not in ATTENTION_VARIABLES:
                continue
            if which == "label" and not base.endswith("_label"):
                continue
            if which == "coordinate" and base in ATTENTION_VARIABLES:
                continue
            found.append(key)
        return found

    def metadata(self) -> list[str]:
        return [key for key in self.keys() if self.is_metadata(key)]

    def arrays(self, which: str = "any") -> list[str]:
        return sorted({self.array_of(key) for key in self.chunks(which)})

    # -- metadata documents ---------------------------------------------------------------------
    def _doc_key(self, node: str, kind: str) -> str:
        prefix = f"{node}/" if node else ""
        if not self.v2:
            return prefix + "zarr.json"
        return prefix + (".zarray" if kind == "array" else ".zattrs")

    def edit_array(self, array: str, edit: Callable[[dict], None]) -> None:
        """Apply ``edit`` to an array's metadata and to its copy in the consolidated metadata."""
        key = self._doc_key(array, "array")
        document = json.loads(self.read(key))
        edit(document)
        self.write(key, json.dumps(document).encode())
        self._edit_consolidated(key, array, edit)

    def edit_attributes(self, node: str, edit: Callable[[dict], None]) -> None:
        """Apply ``edit`` to a node's attributes (and their consolidated copy)."""
        if self.v2:
            key = self._doc_key(node, "attrs")
            document = json.loads(self.read(key)) if key in self.keys() else {}
            edit(document)
            self.write(key, json.dumps(document).encode())
            self._edit_consolidated(key, node, edit)
        else:
            def edit_document(document):
                document.setdefault("attributes", {})
                edit(document["attributes"])

            key = self._doc_key(node, "attrs")
            document = json.loads(self.read(key))
            edit_document(document)
            self.write(key, json.dumps(document).encode())
            if node:
                self._edit_consolidated(key, node, edit_document)

    def _edit_consolidated(self, key: str, node: str, edit: Callable[[dict], None]) -> None:
        if self.v2:
            if ".zmetadata" in self.keys():
                consolidated = json.loads(self.read(".zmetadata"))
                if key in consolidated["metadata"]:
                    edit(consolidated["metadata"][key])
                    self.write(".zmetadata", json.dumps(consolidated).encode())
            return
        root = json.loads(self.read("zarr.json"))
        inline = (root.get("consolidated_metadata") or {}).get("metadata") or {}
        if node in inline:
            edit(inline[node])
            self.write("zarr.json", json.dumps(root).encode())

    def add_node(self, node: str, document: dict, attrs: dict | None = None) -> None:
        """Add a group or array document (v3 ``zarr.json``; v2 ``.zgroup``/``.zarray`` + ``.zattrs``),
        consolidated as well."""
        if self.v2:
            name = ".zarray" if "shape" in document else ".zgroup"
            self.write(f"{node}/{name}", json.dumps(document).encode())
            self.write(f"{node}/.zattrs", json.dumps(attrs or {}).encode())
            if ".zmetadata" in self.keys():
                consolidated = json.loads(self.read(".zmetadata"))
                consolidated["metadata"][f"{node}/{name}"] = document
                consolidated["metadata"][f"{node}/.zattrs"] = attrs or {}
                self.write(".zmetadata", json.dumps(consolidated).encode())
            return
        document = {**document, "attributes": attrs or {}}
        self.write(f"{node}/zarr.json", json.dumps(document).encode())
        root = json.loads(self.read("zarr.json"))
        if root.get("consolidated_metadata"):
            root["consolidated_metadata"]["metadata"][node] = document
            self.write("zarr.json", json.dumps(root).encode())


def _flip_bits(data: bytes, rng: random.Random, count: int, start: int = 0, stop: int | None = None) -> tuple[bytes, list[int]]:
    buffer = bytearray(data)
    stop = len(buffer) if stop is None else stop
    bits = sorted(rng.sample(range(start * 8, stop * 8), min(count, (stop - start) * 8)))
    for bit in bits:
        buffer[bit // 8] ^= 1 << (bit % 8)
    return bytes(buffer), bits


def _choose(rng: random.Random, items: Sequence, what: str):
    if not items:
        raise _NotApplicable(f"no {what}")
    return items[rng.randrange(len(items))]


class _NotApplicable(Exception):
    """The mutation does not apply to this example (no such chunk, no equal-sized pair...)."""


def _evil_pickle(marker: Path) -> bytes:
    # Unpickling calls open(marker, "a"), which creates the marker file: proof that code ran.
    class _Payload:
        def __reduce__(self):
            return (open, (str(marker), "a"))

    return pickle.dumps(_Payload(), protocol=2)


# -- mutations on Zarr directory and zip stores ---------------------------------------------------
def _zarr(mutation):
    """Wrap a mutation of ``_Entries`` so that the store is loaded and saved around it."""

    def run(path: Path, storage: str, context: MutationContext) -> str | None:
        entries = _Entries(path, storage)
        detail = mutation(entries, context)
        entries.save()
        return detail

    run.__name__ = mutation.__name__
    return run


def _chunk_flip(count_range):
    def mutate(entries, context):
        key = _choose(context.rng, entries.chunks(), "chunk")
        data = entries.read(key)
        if not data:
            raise _NotApplicable("empty chunk")
        flipped, bits = _flip_bits(data, context.rng, context.rng.randint(*count_range))
        entries.write(key, flipped)
        return f"flipped bits {bits} of chunk {key}"
    return _zarr(mutate)


@_zarr
def _chunk_truncate(entries, context):
    key = _choose(context.rng, entries.chunks(), "chunk")
    data = entries.read(key)
    size = context.rng.randrange(len(data)) if data else 0
    entries.write(key, data[:size])
    return f"truncated chunk {key} from {len(data)} to {size} bytes"


@_zarr
def _chunk_swap(entries, context):
    pairs = []
    for array in entries.arrays("attention"):
        keys = [k for k in entries.chunks() if entries.array_of(k) == array]
        pairs += [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:] if entries.read(a) != entries.read(b)]
    # Between maps of two variables of the same shape (weights and logits) too.
    arrays = entries.arrays("attention")
    for i, first in enumerate(arrays):
        for second in arrays[i + 1:]:
            if first.rsplit("/", 1)[0] == second.rsplit("/", 1)[0]:
                for key in entries.chunks():
                    if entries.array_of(key) == first:
                        other = second + key[len(first):]
                        if other in entries.keys() and entries.read(other) != entries.read(key):
                            pairs.append((key, other))
    first, second = _choose(context.rng, pairs, "pair of distinct chunks")
    a, b = entries.read(first), entries.read(second)
    entries.write(first, b)
    entries.write(second, a)
    return f"swapped chunks {first} and {second}"


def _chunk_delete(which):
    def mutate(entries, context):
        key = _choose(context.rng, entries.chunks(which), f"{which} chunk")
        entries.delete(key)
        return f"deleted chunk {key}"
    return _zarr(mutate)


@_zarr
def _label_flip(entries, context):
    key = _choose(context.rng, entries.chunks("label"), "label chunk")
    data = bytearray(entries.read(key))
    letters = [i for i, byte in enumerate(data) if 65 <= byte <= 90 or 97 <= byte <= 122]
    position = _choose(context.rng, letters, "letter in a label chunk")
    data[position] ^= 0x20  # upper <-> lower case: still a valid label, a different one
    entries.write(key, bytes(data))
    return f"changed the case of byte {position} of label chunk {key}"


def _metadata_flip(count_range):
    def mutate(entries, context):
        key = _choose(context.rng, entries.metadata(), "metadata document")
        flipped, bits = _flip_bits(entries.read(key), context.rng, context.rng.randint(*count_range))
        entries.write(key, flipped)
        return f"flipped bits {bits} of {key}"
    return _zarr(mutate)


@_zarr
def _metadata_truncate(entries, context):
    key = _choose(context.rng, entries.metadata(), "metadata document")
    data = entries.read(key)
    size = context.rng.randrange(len(data.rstrip()))
    entries.write(key, data[:size])
    return f"truncated {key} from {len(data)} to {size} bytes"


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _chunk_shape(document: dict) -> list:
    if "chunks" in document:
        return document["chunks"]
    return document["chunk_grid"]["configuration"]["chunk_shape"]


def _json_edit(describe: str, edit, which: str = "attention"):
    """A mutation that edits one array's metadata (node document and consolidated copy alike)."""

    def mutate(entries, context):
        array = _choose(context.rng, entries.arrays(which), f"{which} array")
        dim = [None]

        def apply(document):
            if dim[0] is None:
                dim[0] = context.rng.randrange(max(1, len(document.get("shape", [0]))))
            edit(document, dim[0], context.rng)

        entries.edit_array(array, apply)
        return f"{describe} in {array} (dimension {dim[0]})"
    return _zarr(mutate)


def _set_shape(value):
    def edit(document, dim, rng):
        document["shape"][dim] = value(rng) if callable(value) else value
    return edit


def _set_chunk(value):
    def edit(document, dim, rng):
        _chunk_shape(document)[dim] = value(rng) if callable(value) else value
    return edit


_WRONG_TYPES = (
    ("shape", "six"), ("shape", None), ("shape", [1.5, 2]), ("shape", {}), ("chunk", "x"),
    ("dtype", 7), ("dtype", "float33"), ("codecs", {}), ("codecs", [42]), ("fill_value", [1, 2]),
    ("zarr_format", "3"), ("node_type", "arry"), ("dimension_names", 5), ("compressor", [7]),
)


def _wrong_type(document, dim, rng):
    field_name, value = _WRONG_TYPES[rng.randrange(len(_WRONG_TYPES))]
    v2 = "chunks" in document
    if field_name == "chunk":
        if v2:
            document["chunks"] = value
        else:
            document["chunk_grid"]["configuration"]["chunk_shape"] = value
    elif field_name == "dtype":
        document["dtype" if v2 else "data_type"] = value
    elif field_name in ("codecs", "compressor"):
        document["compressor" if v2 else "codecs"] = value
    elif field_name == "node_type" and v2:
        document["order"] = "Q"
    elif field_name == "dimension_names" and v2:
        document["dtype"] = "<f999"
    else:
        document[field_name] = value
    document.setdefault("_fuzzed", field_name)


def _many_dims(document, dim, rng):
    count = 33 + rng.randrange(20)
    document["shape"] = [1] * count
    if "chunks" in document:
        document["chunks"] = [1] * count
    else:
        document["chunk_grid"]["configuration"]["chunk_shape"] = [1] * count
        document["dimension_names"] = [f"d{i}" for i in range(count)]


@_zarr
def _json_attribute_type(entries, context):
    choices = [
        ("", "completeness", 7), ("", "attnformat_version", 1.0), ("", "attnformat", ["attnformat"]),
    ]
    sites = sorted({array.rsplit("/", 1)[0] for array in entries.arrays("attention")})
    choices += [(site, name, value) for site in sites for name, value in (("layout", ["dense"]), ("normalized_dim", {"a": 1}), ("causal", "maybe"))]
    node, name, value = _choose(context.rng, choices, "attribute")

    def edit(attrs):
        attrs[name] = value

    entries.edit_attributes(node, edit)
    return f"attribute {name!r} of {node or '/'} set to {value!r}"


def _raw_json_edit(entries, key: str, placeholder_value: str, replacement: str, edit: Callable[[dict], None]) -> None:
    """Edit a JSON document with ``edit`` (which stores a placeholder), then splice ``replacement``
    into the text in its place (for values json.dumps cannot write: deep nesting, escapes)."""
    document = json.loads(entries.read(key))
    edit(document)
    text = json.dumps(document).replace(json.dumps(placeholder_value), replacement)
    entries.write(key, text.encode())


@_zarr
def _json_deep_nesting(entries, context):
    depth = context.rng.choice((20_000, 100_000, 1_000_000))
    where = context.rng.choice(("root attributes", "array codecs"))
    placeholder = "__DEEP__"
    if where == "root attributes" or entries.v2:
        key = ".zattrs" if entries.v2 else "zarr.json"

        def edit(document):
            (document if entries.v2 else document.setdefault("attributes", {}))["nested"] = placeholder
        _raw_json_edit(entries, key, placeholder, _deep(depth), edit)
        if entries.v2:
            _raw_json_edit(entries, ".zmetadata", placeholder, _deep(depth), lambda d: d["metadata"][".zattrs"].__setitem__("nested", placeholder))
        return f"{depth}-deep nested list in the root attributes"
    array = _choose(context.rng, entries.arrays("attention"), "attention array")

    def edit_array(document):
        document["codecs"][-1].setdefault("configuration", {})["nested"] = placeholder
    _raw_json_edit(entries, f"{array}/zarr.json", placeholder, _deep(depth), edit_array)
    _raw_json_edit(entries, "zarr.json", placeholder, _deep(depth), lambda d: edit_array(d["consolidated_metadata"]["metadata"][array]))
    return f"{depth}-deep nested list in the codecs of {array}"


@_zarr
def _json_huge_document(entries, context):
    size = (17 << 20) + context.rng.randrange(1 << 20)
    node = context.rng.choice(["", *sorted({a.rsplit("/", 1)[0] for a in entries.arrays("attention")})])

    def edit(attrs):
        attrs["padding"] = "x" * size
    entries.edit_attributes(node, edit)
    return f"{size}-byte attribute in the metadata of {node or '/'}"


@_zarr
def _json_deep_groups(entries, context):
    depth = 65 + context.rng.randrange(200)
    node = ""
    for _ in range(depth):
        node = f"{node}/g" if node else "g"
        entries.add_node(node, {"zarr_format": 2} if entries.v2 else {"zarr_format": 3, "node_type": "group"})
    return f"{depth} nested groups"


@_zarr
def _json_inconsistent_consolidated(entries, context):
    array = _choose(context.rng, entries.arrays(), "array")
    key = entries._doc_key(array, "array")
    dim = [0]

    def edit(document):
        dim[0] = context.rng.randrange(len(document["shape"]) or 1)
        if document["shape"]:
            document["shape"][dim[0]] += 1 + context.rng.randrange(3)
    entries._edit_consolidated(key, array, edit)
    return f"consolidated shape of {array} (dimension {dim[0]}) differs from its own document"


# -- pickle smuggling ------------------------------------------------------------------------------
_PICKLE_V2_SPELLINGS = ("pickle", "Pickle", "PICKLE", "pick\\u006ce", "\\u0070ickle")
_PICKLE_V3_SPELLINGS = ("numcodecs.pickle", "numcodecs.Pickle", "numcodecs.pick\\u006ce", "pickle", "Pickle")


def _set_pickle_v2(entries, array, spelling, where, marker, encoding="utf-8"):
    placeholder = "__PICKLE_ID__"
    # zarr-python 3 refuses an object dtype with a pickle object codec, but decodes a numeric
    # array through whatever filters and compressor it declares: both are tried.
    numeric = array.rsplit("/", 1)[-1] in ATTENTION_VARIABLES

    def edit(document):
        if not numeric:
            document["dtype"] = "|O"
        if where == "compressor":
            document["compressor"] = {"id": placeholder}
            document["filters"] = None
        else:
            document["filters"] = [{"id": placeholder, "protocol": 2}]
            document["compressor"] = None

    for key, path in ((f"{array}/.zarray", None), (".zmetadata", f"{array}/.zarray")):
        if key not in entries.keys():
            continue
        document = json.loads(entries.read(key))
        edit(document if path is None else document["metadata"][path])
        text = json.dumps(document).replace(json.dumps(placeholder), f'"{spelling}"')
        data = text.encode(encoding) if encoding == "utf-8" else (b"\xff\xfe" if encoding == "utf-16-le+bom" else b"") + text.encode(encoding.replace("+bom", ""))
        entries.write(key, data)
    for key in [k for k in entries.chunks() if entries.array_of(k) == array]:
        entries.write(key, _evil_pickle(marker))


@_zarr
def _pickle_v2_codec(entries, context):
    array = _choose(context.rng, entries.arrays("attention") if context.rng.random() < 0.7 else entries.arrays("label"), "array")
    spelling = context.rng.choice(_PICKLE_V2_SPELLINGS)
    where = context.rng.choice(("filters", "compressor"))
    _set_pickle_v2(entries, array, spelling, where, context.marker)
    return f"{where} {spelling!r} on {array}, chunks replaced by a pickle that creates a marker file"


@_zarr
def _pickle_v2_utf16(entries, context):
    array = _choose(context.rng, entries.arrays("attention"), "attention array")
    encoding = context.rng.choice(("utf-16-le", "utf-16-be", "utf-16-le+bom"))
    _set_pickle_v2(entries, array, "pickle", "filters", context.marker, encoding)
    return f"pickle filter on {array}, .zarray and .zmetadata encoded as {encoding}"


@_zarr
def _pickle_v2_c_group(entries, context):
    site = _choose(context.rng, sorted({a.rsplit("/", 1)[0] for a in entries.arrays("attention")}), "site")
    group = f"{site}/c"
    entries.add_node(group, {"zarr_format": 2})
    array = f"{group}/payload"
    entries.add_node(array, {"zarr_format": 2, "shape": [1], "chunks": [1], "dtype": "<f4", "fill_value": None, "order": "C",
                             "filters": [{"id": "pickle"}], "compressor": None, "dimension_separator": "."},
                     {"_ARRAY_DIMENSIONS": ["payload_dim"]})
    entries.write(f"{array}/0", _evil_pickle(context.marker))
    return f"v2 group folder named 'c' in {site} holding an array with a pickle filter"


def _pickle_v3(sharded: bool):
    def mutate(entries, context):
        array = _choose(context.rng, entries.arrays("attention") if context.rng.random() < 0.7 else entries.arrays("label"), "array")
        spelling = context.rng.choice(_PICKLE_V3_SPELLINGS)
        placeholder = "__PICKLE_NAME__"
        document = json.loads(entries.read(f"{array}/zarr.json"))
        codec = {"name": placeholder, "configuration": {"protocol": 2}}
        if sharded:
            shape = document["chunk_grid"]["configuration"]["chunk_shape"]
            codecs = [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": shape, "codecs": [codec],
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                "index_location": "end"}}]
        else:
            codecs = [codec]
        encoding = context.rng.choice(("utf-8", "utf-8", "utf-16-le", "utf-16-be"))

        def edit(doc):
            doc["codecs"] = codecs

        for key, path in ((f"{array}/zarr.json", None), ("zarr.json", array)):
            doc = json.loads(entries.read(key))
            edit(doc if path is None else doc["consolidated_metadata"]["metadata"][path])
            text = json.dumps(doc).replace(json.dumps(placeholder), f'"{spelling}"')
            entries.write(key, text.encode(encoding))
        for key in [k for k in entries.chunks() if entries.array_of(k) == array]:
            entries.write(key, _evil_pickle(context.marker))
        return f"codec {spelling!r}{' inside sharding_indexed' if sharded else ''} on {array} ({encoding}), chunks replaced by a pickle"
    return _zarr(mutate)


# -- references outside the store (directory stores only) ------------------------------------------
def _symlink(target_kind: str):
    def mutate(path: Path, storage: str, context: MutationContext) -> str:
        entries = _Entries(path, storage)
        rng = context.rng
        if target_kind == "metadata":
            key = _choose(rng, [k for k in entries.metadata() if "/" in k], "node metadata")
            outside = context.scratch / "outside-metadata.json"
            shutil.copyfile(entries.file(key), outside)
            entries.file(key).unlink()
            os.symlink(outside, entries.file(key))
            return f"{key} is a symlink to a copy outside the store"
        if target_kind == "directory":
            array = _choose(rng, entries.arrays("attention"), "attention array")
            outside = context.scratch / "outside-array"
            shutil.move(str(entries.file(array)), outside)
            os.symlink(outside, entries.file(array), target_is_directory=True)
            return f"array directory {array} is a symlink to a directory outside the store"
        key = _choose(rng, entries.chunks("attention"), "attention chunk")
        chunk = entries.file(key)
        if target_kind == "secret":
            target = context.secret
        elif target_kind == "copy":
            siblings = [k for k in entries.chunks("attention") if entries.read(k) != entries.read(key)]
            same_array = [k for k in siblings if entries.array_of(k) == entries.array_of(key)]
            other = _choose(rng, same_array or siblings, "different attention chunk")
            target = context.scratch / "outside-chunk"
            shutil.copyfile(entries.file(other), target)
        elif target_kind == "fifo":
            target = context.scratch / "outside-fifo"
            os.mkfifo(target)
        elif target_kind == "fifo-in-place":
            chunk.unlink()
            os.mkfifo(chunk)
            return f"chunk {key} is a FIFO"
        elif target_kind == "devzero":
            target = Path("/dev/zero")
        else:
            raise ValueError(target_kind)
        chunk.unlink()
        os.symlink(target, chunk)
        return f"chunk {key} is a symlink to {target_kind} {target}"
    return mutate


# -- whole files -------------------------------------------------------------------------------------
def _file_truncate(path: Path, storage: str, context: MutationContext) -> str:
    size = path.stat().st_size
    keep = context.rng.randrange(size)
    with open(path, "r+b") as handle:
        handle.truncate(keep)
    return f"file truncated from {size} to {keep} bytes"


def _file_flip(count_range):
    def mutate(path: Path, storage: str, context: MutationContext) -> str:
        data, bits = _flip_bits(path.read_bytes(), context.rng, context.rng.randint(*count_range))
        path.write_bytes(data)
        return f"flipped file bits {bits}"
    return mutate


# -- zip bombs ---------------------------------------------------------------------------------------
def _patch_zip_sizes(path: Path, name: str, *, compressed: int | None, uncompressed: int | None) -> None:
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
        start = archive.start_dir
    local = info.header_offset
    if compressed is not None:
        struct.pack_into("<I", data, local + 18, compressed)
    if uncompressed is not None:
        struct.pack_into("<I", data, local + 22, uncompressed)
    position = start
    while data[position:position + 4] == b"PK\x01\x02":
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, position + 28)
        if bytes(data[position + 46:position + 46 + name_length]).decode() == name:
            if compressed is not None:
                struct.pack_into("<I", data, position + 20, compressed)
            if uncompressed is not None:
                struct.pack_into("<I", data, position + 24, uncompressed)
        position += 46 + name_length + extra_length + comment_length
    path.write_bytes(bytes(data))


def _zip_declared(target: str):
    def mutate(path: Path, storage: str, context: MutationContext) -> str:
        entries = _Entries(path, storage)
        key = "zarr.json" if target == "metadata" else _choose(context.rng, entries.chunks("attention"), "attention chunk")
        both = context.rng.random() < 0.5
        size = (2 << 30) + context.rng.randrange(1 << 20)
        size = min(size, 0xFFFFFFFE)
        _patch_zip_sizes(path, key, compressed=size if both else None, uncompressed=size)
        return f"zip entry {key} declares {size} bytes{' (compressed and uncompressed)' if both else ''}"
    return mutate


def _zip_ratio(target: str):
    def mutate(path: Path, storage: str, context: MutationContext) -> str:
        entries = _Entries(path, storage)
        key = "zarr.json" if target == "metadata" else _choose(context.rng, entries.chunks("attention"), "attention chunk")
        megabytes = context.rng.choice((200, 400, 1100)) if target == "chunk" else context.rng.choice((20, 200))
        head = entries.read(key) if target == "metadata" else b""
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            for name, data in entries.data.items():
                if name != key:
                    archive.writestr(name, data)
                    continue
                info = zipfile.ZipInfo(name)
                info.compress_type = zipfile.ZIP_DEFLATED
                with archive.open(info, "w", force_zip64=True) as entry:
                    entry.write(head)
                    filler = (b" " if target == "metadata" else b"\0") * (1 << 20)
                    for _ in range(megabytes):
                        entry.write(filler)
        return f"zip entry {key} inflates to {megabytes} MiB (deflate ratio ~1000)"
    return mutate


# -- HDF5 --------------------------------------------------------------------------------------------
def _h5_layout(path: Path):
    """Byte ranges of chunk data, contiguous data and object headers of every dataset and group."""
    import h5py

    chunks, contiguous, headers = [], [], []
    with h5py.File(path, "r") as handle:
        def visit(name, obj):
            info = h5py.h5o.get_info(obj.id)
            headers.append((name, info.addr, max(16, info.hdr.space.total)))
            if isinstance(obj, h5py.Dataset):
                if obj.chunks:
                    for i in range(obj.id.get_num_chunks()):
                        chunk = obj.id.get_chunk_info(i)
                        chunks.append((name, chunk.byte_offset, chunk.size))
                else:
                    offset = obj.id.get_offset()
                    if offset is not None:
                        contiguous.append((name, offset, obj.id.get_storage_size()))
        handle.visititems(visit)
    return chunks, contiguous, headers


def _h5_chunk_flip(count_range):
    def mutate(path: Path, storage: str, context: MutationContext) -> str:
        chunks, _, _ = _h5_layout(path)
        name, offset, size = _choose(context.rng, chunks, "chunk")
        data, bits = _flip_bits(path.read_bytes(), context.rng, context.rng.randint(*count_range), offset, offset + size)
        path.write_bytes(data)
        return f"flipped bits {[b - offset * 8 for b in bits]} of a chunk of {name} at byte {offset}"
    return mutate


def _h5_chunk_truncate(path: Path, storage: str, context: MutationContext) -> str:
    # A chunk cannot shrink in place: its tail is overwritten with zeros instead (what a torn write leaves).
    chunks, _, _ = _h5_layout(path)
    name, offset, size = _choose(context.rng, chunks, "chunk")
    keep = context.rng.randrange(size)
    data = bytearray(path.read_bytes())
    data[offset + keep:offset + size] = bytes(size - keep)
    path.write_bytes(bytes(data))
    return f"zeroed a chunk of {name} after byte {keep} of {size}"


def _h5_chunk_swap(path: Path, storage: str, context: MutationContext) -> str:
    chunks, _, _ = _h5_layout(path)
    data = bytearray(path.read_bytes())
    pairs = [(a, b) for i, a in enumerate(chunks) for b in chunks[i + 1:]
             if a[2] == b[2] and a[0].rsplit("/", 1)[-1] in ATTENTION_VARIABLES and b[0].rsplit("/", 1)[-1] in ATTENTION_VARIABLES
             and data[a[1]:a[1] + a[2]] != data[b[1]:b[1] + b[2]]]
    (name_a, offset_a, size), (name_b, offset_b, _) = _choose(context.rng, pairs, "pair of equal-sized chunks")
    first, second = bytes(data[offset_a:offset_a + size]), bytes(data[offset_b:offset_b + size])
    data[offset_a:offset_a + size], data[offset_b:offset_b + size] = second, first
    path.write_bytes(bytes(data))
    return f"swapped a chunk of {name_a} at {offset_a} with a chunk of {name_b} at {offset_b}"


def _h5_label_flip(path: Path, storage: str, context: MutationContext) -> str:
    import h5py

    labels = set()
    with h5py.File(path, "r") as handle:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and name.rsplit("/", 1)[-1].endswith("_label"):
                for value in np.asarray(obj[()]).ravel():
                    text = value if isinstance(value, bytes) else str(value).encode()
                    if any(65 <= b <= 90 or 97 <= b <= 122 for b in text) and len(text) >= 2:
                        labels.add(text)
        handle.visititems(visit)
    data = bytearray(path.read_bytes())
    spots = []
    for label in sorted(labels):
        start = data.find(label)
        while start >= 0:
            spots += [(label, start + i) for i, b in enumerate(label) if 65 <= b <= 90 or 97 <= b <= 122]
            start = data.find(label, start + 1)
    label, position = _choose(context.rng, spots, "label text in the file")
    data[position] ^= 0x20
    path.write_bytes(bytes(data))
    return f"changed the case of a letter of label {label.decode()!r} at byte {position}"


def _h5_region_flip(region: str, count_range):
    def mutate(path: Path, storage: str, context: MutationContext) -> str:
        size = path.stat().st_size
        chunks, contiguous, headers = _h5_layout(path)
        if region == "superblock":
            start, stop = 0, 96
        elif region == "header":
            name, start, length = _choose(context.rng, headers, "object header")
            stop = min(size, start + length)
        else:
            data_bytes = np.zeros(size, bool)
            for _, offset, length in chunks + contiguous:
                data_bytes[offset:offset + length] = True
            candidates = np.flatnonzero(~data_bytes)
            position = int(candidates[context.rng.randrange(len(candidates))])
            start, stop = position, position + 1
        data, bits = _flip_bits(path.read_bytes(), context.rng, context.rng.randint(*count_range), start, stop)
        path.write_bytes(data)
        return f"flipped file bits {bits} ({region} bytes {start}..{stop})"
    return mutate


def _h5_recreate(handle, name: str, make: Callable) -> None:
    """Replace dataset ``name`` by ``make(group, basename, shape, dtype)``, keeping its attributes
    and dimension scales, so that only its storage changes."""
    old = handle[name]
    shape, dtype = old.shape, old.dtype
    attrs = {k: v for k, v in old.attrs.items() if k not in ("DIMENSION_LIST", "REFERENCE_LIST")}
    scales = [list(old.dims[i].values()) for i in range(old.ndim)]
    for i, dim_scales in enumerate(scales):
        for scale in dim_scales:
            old.dims[i].detach_scale(scale)
    group_name, base = name.rsplit("/", 1)
    group = handle[group_name]
    del group[base]
    new = make(group, base, shape, dtype)
    for key, value in attrs.items():
        new.attrs[key] = value
    for i, dim_scales in enumerate(scales):
        for scale in dim_scales:
            new.dims[i].attach_scale(scale)


def _h5_attention_dataset(handle, rng) -> str:
    import h5py

    names = []
    handle.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and n.rsplit("/", 1)[-1] in ATTENTION_VARIABLES else None)
    return _choose(rng, sorted(names), "attention dataset")


def _h5_reference(kind: str):
    def mutate(path: Path, storage: str, context: MutationContext) -> str:
        import h5py

        with h5py.File(path, "r+") as handle:
            name = _h5_attention_dataset(handle, context.rng)
            site = name.rsplit("/", 1)[0]
            if kind == "external":
                size = int(np.prod(handle[name].shape)) * handle[name].dtype.itemsize
                context.secret.write_bytes((SECRET_TOKEN.encode() * (size // len(SECRET_TOKEN) + 1))[:size])
                _h5_recreate(handle, name, lambda g, b, s, d: g.create_dataset(b, shape=s, dtype=d, external=[(str(context.secret), 0, h5py.h5f.UNLIMITED)]))
                return f"{name} stored externally in {context.secret}"
            if kind == "virtual":
                source = context.scratch / "secret.h5"
                shape, dtype = handle[name].shape, handle[name].dtype
                with h5py.File(source, "w") as other:
                    other.create_dataset("data", data=np.full(shape, 0.5, dtype))
                layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
                layout[...] = h5py.VirtualSource(str(source), "data", shape=shape)
                _h5_recreate(handle, name, lambda g, b, s, d: g.create_virtual_dataset(b, layout, fillvalue=0))
                return f"{name} is a virtual dataset reading {source}"
            if kind == "external-link":
                source = context.scratch / "secret.h5"
                with h5py.File(source, "w") as other:
                    other.create_dataset("data", data=np.frombuffer(SECRET_TOKEN.encode() * 4, np.uint8))
                handle[f"{site}/leak"] = h5py.ExternalLink(str(source), "/data")
                return f"{site}/leak is an external link to {source}"
            if kind == "soft-link":
                handle[f"{site}/alias"] = h5py.SoftLink(f"/{name}")
                return f"{site}/alias is a soft link to /{name}"
            if kind == "hardlink-cycle":
                ancestor = context.rng.choice(["/", site.rsplit("/", 1)[0] or "/", site])
                handle[f"{site}/loop"] = handle[ancestor]
                return f"{site}/loop is a hard link to {ancestor} (a cycle)"
        raise ValueError(kind)
    return mutate


def _h5_unknown_filter(path: Path, storage: str, context: MutationContext) -> str:
    import h5py

    with h5py.File(path, "r+") as handle:
        name = _h5_attention_dataset(handle, context.rng)
        values = handle[name][()]
        chunks = handle[name].chunks or values.shape
        _h5_recreate(handle, name, lambda g, b, s, d: g.create_dataset(b, data=values, chunks=chunks, compression="lzf"))
    # The pipeline message names filter 32000 (lzf) with its name; point it at an id no one registered.
    data = bytearray(path.read_bytes())
    position = data.find(b"lzf\0")
    if position < 8:
        raise _NotApplicable("no lzf filter message found")
    struct.pack_into("<H", data, position - 8, 32999)
    path.write_bytes(bytes(data))
    return f"{name} uses filter id 32999, which no library registers"


# -- the catalogue -------------------------------------------------------------------------------------
_DIRS = ("zarr3", "zarr2")
_ZARR = ("zarr3", "zarr2", "zip")
_V3 = ("zarr3", "zip")
KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("pristine", "pristine", STORAGES, "pristine", lambda p, s, c: "unmodified", 1),
    Kind("chunk-bitflip", "bitflip", _ZARR, "detect", _chunk_flip((1, 1)), 6),
    Kind("chunk-multiflip", "bitflip", _ZARR, "detect", _chunk_flip((2, 24)), 3),
    Kind("h5-chunk-bitflip", "bitflip", ("h5",), "detect", _h5_chunk_flip((1, 1)), 6),
    Kind("h5-chunk-multiflip", "bitflip", ("h5",), "detect", _h5_chunk_flip((2, 24)), 3),
    Kind("chunk-truncate", "truncation", _ZARR, "detect", _chunk_truncate, 4),
    Kind("h5-chunk-zero-tail", "truncation", ("h5",), "detect", _h5_chunk_truncate, 3),
    Kind("metadata-truncate", "truncation", _ZARR, "refuse", _metadata_truncate, 3),
    Kind("file-truncate", "truncation", ("zip", "h5"), "refuse", _file_truncate, 5),
    Kind("chunk-swap", "swap", _ZARR, "detect", _chunk_swap, 3),
    Kind("h5-chunk-swap", "swap", ("h5",), "detect", _h5_chunk_swap, 2),
    Kind("chunk-delete", "deletion", _ZARR, "detect", _chunk_delete("attention"), 3),
    Kind("coordinate-chunk-delete", "deletion", _ZARR, "tolerant", _chunk_delete("coordinate"), 1),
    Kind("label-flip", "labels", _ZARR, "detect", _label_flip, 2),
    Kind("h5-label-flip", "labels", ("h5",), "detect", _h5_label_flip, 2),
    Kind("metadata-bitflip", "metadata", _ZARR, "tolerant", _metadata_flip((1, 1)), 5),
    Kind("metadata-multiflip", "metadata", _ZARR, "tolerant", _metadata_flip((2, 16)), 2),
    Kind("zip-raw-bitflip", "metadata", ("zip",), "tolerant", _file_flip((1, 4)), 3),
    Kind("h5-metadata-bitflip", "h5header", ("h5",), "tolerant", _h5_region_flip("metadata", (1, 1)), 5),
    Kind("h5-superblock-bitflip", "h5header", ("h5",), "tolerant", _h5_region_flip("superblock", (1, 2)), 3),
    Kind("h5-header-bitflip", "h5header", ("h5",), "tolerant", _h5_region_flip("header", (1, 2)), 4),
    Kind("json-huge-shape", "json", _ZARR, "reject", _json_edit("shape 2**40+", _set_shape(lambda r: 2**40 + r.randrange(1 << 20)), "any"), 1),
    Kind("json-huge-chunk", "json", _ZARR, "refuse", _json_edit("chunk shape 2**40+", _set_chunk(lambda r: 2**40 + r.randrange(1 << 20))), 1),
    Kind("json-negative-shape", "json", _ZARR, "refuse", _json_edit("negative shape", _set_shape(lambda r: -r.randrange(1, 1 << 20)), "any"), 1),
    Kind("json-negative-chunk", "json", _ZARR, "refuse", _json_edit("negative chunk shape", _set_chunk(lambda r: -r.randrange(1, 1 << 20))), 1),
    Kind("json-zero-chunk", "json", _ZARR, "refuse", _json_edit("chunk shape 0", _set_chunk(0), "any"), 1),
    Kind("json-wrong-type", "json", _ZARR, "refuse", _json_edit("wrong-typed field", _wrong_type, "any"), 2),
    Kind("json-many-dims", "json", _ZARR, "refuse", _json_edit("33+ dimensions", _many_dims), 1),
    Kind("json-attribute-type", "json", _ZARR, "reject", _json_attribute_type, 1),
    Kind("json-deep-nesting", "json", _ZARR, "refuse", _json_deep_nesting, 1),
    Kind("json-huge-document", "json", _ZARR, "refuse", _json_huge_document, 0),
    Kind("json-deep-groups", "json", _ZARR, "refuse", _json_deep_groups, 1),
    Kind("json-inconsistent-consolidated", "json", _ZARR, "tolerant", _json_inconsistent_consolidated, 1),
    Kind("pickle-v2-codec", "pickle", ("zarr2",), "refuse", _pickle_v2_codec, 2),
    Kind("pickle-v2-utf16", "pickle", ("zarr2",), "refuse", _pickle_v2_utf16, 1),
    Kind("pickle-v2-c-group", "pickle", ("zarr2",), "refuse", _pickle_v2_c_group, 1),
    Kind("pickle-v3-codec", "pickle", _V3, "refuse", _pickle_v3(False), 1),
    Kind("pickle-v3-sharded", "pickle", _V3, "refuse", _pickle_v3(True), 1),
    Kind("symlink-chunk-secret", "references", _DIRS, "refuse", _symlink("secret"), 1),
    Kind("symlink-chunk-copy", "references", _DIRS, "refuse", _symlink("copy"), 1),
    Kind("symlink-metadata", "references", _DIRS, "refuse", _symlink("metadata"), 1),
    Kind("symlink-directory", "references", _DIRS, "refuse", _symlink("directory"), 1),
    Kind("symlink-fifo", "references", _DIRS, "refuse", _symlink("fifo"), 1),
    Kind("fifo-chunk", "references", _DIRS, "refuse", _symlink("fifo-in-place"), 1),
    Kind("symlink-dev-zero", "references", _DIRS, "refuse", _symlink("devzero"), 1),
    Kind("h5-external-storage", "references", ("h5",), "refuse", _h5_reference("external"), 1),
    Kind("h5-virtual-dataset", "references", ("h5",), "refuse", _h5_reference("virtual"), 1),
    Kind("h5-external-link", "references", ("h5",), "refuse", _h5_reference("external-link"), 1),
    Kind("h5-soft-link", "references", ("h5",), "refuse", _h5_reference("soft-link"), 1),
    Kind("h5-hardlink-cycle", "references", ("h5",), "refuse", _h5_reference("hardlink-cycle"), 1),
    Kind("h5-unknown-filter", "references", ("h5",), "refuse", _h5_unknown_filter, 1),
    Kind("zip-declared-2gib-chunk", "zipbomb", ("zip",), "refuse", _zip_declared("chunk"), 1),
    Kind("zip-declared-2gib-metadata", "zipbomb", ("zip",), "refuse", _zip_declared("metadata"), 1),
    Kind("zip-ratio-chunk", "zipbomb", ("zip",), "detect", _zip_ratio("chunk"), 0),
    Kind("zip-ratio-metadata", "zipbomb", ("zip",), "refuse", _zip_ratio("metadata"), 0),
)}
CLASSES = tuple(dict.fromkeys(kind.klass for kind in KINDS.values())) + ("writer",)
# Expensive kinds (hundreds of MB written) run on a few examples only, whatever the scale.
_SPARSE_KINDS = {"json-huge-document": 2, "zip-ratio-chunk": 3, "zip-ratio-metadata": 2}


def make_variants(
    *,
    examples: Sequence[str] | None = None,
    storages: Sequence[str] = STORAGES,
    classes: Sequence[str] | None = None,
    scale: float = 1.0,
    seed: int = 0,
) -> list[Variant]:
    """The campaign's variants: every kind for every example in every storage it applies to.

    ``scale`` multiplies each kind's count per (example, storage); below 1, kinds are spread
    over the examples so that every kind still runs in every storage at least once.

    Parameters
    ----------
    examples
        Example names (default: all of :data:`attnformat.examples.EXAMPLES`).
    storages
        Storages among :data:`STORAGES`.
    classes
        Only these classes (``"bitflip"``, ``"pickle"``, ...; see :data:`CLASSES`).
    scale
        Variants per kind relative to the full campaign.
    seed
        Fixes every random choice of every variant.

    Examples
    --------
    >>> variants = make_variants(examples=["dense"], storages=["h5"], classes=["references"])
    >>> sorted({v.kind for v in variants})[:2]
    ['h5-external-link', 'h5-external-storage']
    """
    from attnformat.examples import EXAMPLES

    examples = list(examples or EXAMPLES)
    variants = []
    for kind in KINDS.values():
        if classes and kind.klass not in classes:
            continue
        for storage in storages:
            if storage not in kind.storages:
                continue
            if kind.name in _SPARSE_KINDS or kind.weight == 0:
                total = max(1, round(_SPARSE_KINDS.get(kind.name, 1) * min(scale, 1.0)))
                chosen = [(examples[(i * 3 + STORAGES.index(storage)) % len(examples)], i) for i in range(total)]
            else:
                per = kind.weight * scale
                total = max(1, round(per * len(examples)))
                chosen = [(examples[(i + STORAGES.index(storage)) % len(examples)], i // len(examples)) for i in range(total)]
            for example, index in chosen:
                variants.append(_variant(example, storage, kind, index, seed))
    return variants


def _variant(example: str, storage: str, kind: Kind, index: int, seed: int) -> Variant:
    return Variant(f"{example}/{storage}/{kind.name}/{index}", example, storage, kind.name, index, kind.klass, kind.expect, seed)


def variant_by_name(name: str, seed: int = 0) -> Variant:
    """Rebuild a variant from its name (``example/storage/kind/index``), e.g. to reproduce a failure.

    Examples
    --------
    >>> variant_by_name("edge/h5/h5-soft-link/0").expect
    'refuse'
    """
    example, storage, kind, index = name.split("/")
    return _variant(example, storage, KINDS[kind], int(index), seed)


def materialize(variant: Variant, base: Path, folder: Path) -> tuple[Path, str]:
    """Copy the base file into ``folder`` and apply the variant's mutation; return (path, what was done).

    Raises ``_NotApplicable`` when the example has nothing this mutation can change.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / variant.file_name
    if base.is_dir():
        shutil.copytree(base, target, symlinks=True)
    else:
        shutil.copyfile(base, target)
    scratch = folder / "outside"
    scratch.mkdir(exist_ok=True)
    secret = scratch / "secret.txt"
    secret.write_text((SECRET_TOKEN + "\n") * 64)
    context = MutationContext(random.Random(f"{variant.seed}:{variant.name}"), scratch, secret, folder / MARKER_NAME)
    detail = KINDS[variant.kind].mutate(target, variant.storage, context)
    return target, detail or variant.kind


# --------------------------------------------------------------------------------------------
# Running commands in forked children
# --------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What one child did."""

    label: str
    exit_code: int | None
    seconds: float
    max_rss: int  # bytes
    timed_out: bool
    stdout: str
    stderr: str


class _Child:
    def __init__(self, label, pid, started, out_path, err_path, timeout, inherited=0):
        self.label, self.pid, self.started, self.out_path, self.err_path, self.timeout = label, pid, started, out_path, err_path, timeout
        #: Resident bytes the child inherited from this process at the fork: its peak counts them,
        #: but they are the forking process's (a test worker's size depends on the tests it ran).
        self.inherited = inherited
        self.waited = None  # (status, rusage) once reaped


def _fork(label: str, function: Callable[[], int], out_path: Path, err_path: Path, timeout: float, address_limit: int | None) -> _Child:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    inherited = _resident_bytes()
    # The address-space bound counts from what the child inherits: a test worker that loaded torch,
    # numba's LLVM and a few thread pools already maps over 4 GB, and a child bounded absolutely
    # could not even start a thread (its stack and malloc arena fail to map; Thread.start then
    # waits forever for a thread that never ran).
    mapped = _mapped_bytes()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = UNCAUGHT_EXIT
        try:
            os.setpgid(0, 0)
            if address_limit:
                resource.setrlimit(resource.RLIMIT_AS, (mapped + address_limit, mapped + address_limit))
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            for fd, path in ((1, out_path), (2, err_path)):
                handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(handle, fd)
                os.close(handle)
            sys.stdout = open(1, "w", closefd=False, errors="backslashreplace")
            sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")
            os.environ.pop("ATTNFORMAT_DEBUG", None)
            result = function()
            code = int(result or 0)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:  # noqa: BLE001 - whatever escaped is the finding
            with contextlib.suppress(BaseException):
                traceback.print_exc()
            code = UNCAUGHT_EXIT
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    return _Child(label, pid, time.monotonic(), out_path, err_path, timeout, inherited)


def _statm_bytes(field: int) -> int:
    """Field ``field`` of ``/proc/self/statm`` in bytes (0: virtual size, 1: resident size; 0 off Linux)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[field]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _mapped_bytes() -> int:
    """This process's virtual size now."""
    return _statm_bytes(0)


def _resident_bytes() -> int:
    """This process's resident size now."""
    return _statm_bytes(1)


def _read_text(path: Path, limit: int = 1 << 20) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""


def _reap(child: _Child, *, block: bool) -> Run | None:
    timed_out = False
    while True:
        if child.waited is None:
            pid, status, usage = os.wait4(child.pid, 0 if block else os.WNOHANG)
            if pid:
                child.waited = (status, usage)
        if child.waited is not None:
            status, usage = child.waited
            timed_out = timed_out or getattr(child, "killed", False)
            break
        if time.monotonic() - child.started > child.timeout:
            timed_out = child.killed = True
            for kill in (lambda: os.killpg(child.pid, signal.SIGKILL), lambda: os.kill(child.pid, signal.SIGKILL)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill()
            block = True
            continue
        return None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)  # anything the child left running in its group
    code = os.waitstatus_to_exitcode(status)
    return Run(child.label, None if timed_out else code, time.monotonic() - child.started, max(usage.ru_maxrss * 1024 - child.inherited, 0), timed_out,
               _read_text(child.out_path), _read_text(child.err_path))


class _Scheduler:
    """Runs steps of many variants in parallel, up to ``jobs`` children at a time."""

    def __init__(self, jobs: int):
        self.jobs = max(1, jobs)
        self.running: list[tuple[_Child, Callable]] = []

    def submit(self, label, function, folder: Path, timeout: float, callback, address_limit=ADDRESS_SPACE_LIMIT):
        while len(self.running) >= self.jobs:
            self.poll()
        safe = label.replace("/", "_").replace(" ", "_")
        child = _fork(label, function, folder / f"{safe}.out", folder / f"{safe}.err", timeout, address_limit)
        self.running.append((child, callback))

    def poll(self):
        done = False
        for entry in list(self.running):
            child, callback = entry
            run = _reap(child, block=False)
            if run is not None:
                self.running.remove(entry)
                callback(run)
                done = True
        if not done:
            time.sleep(0.003)

    def drain(self):
        while self.running:
            self.poll()


# --------------------------------------------------------------------------------------------
# Values: ground truth and comparison
# --------------------------------------------------------------------------------------------
def read_values(path: Path) -> dict[str, np.ndarray]:
    """Every variable of every node of an attention file, loaded through :func:`attnformat.open`.

    Examples
    --------
    >>> import attnformat
    >>> values = read_values(attnformat.example_path("dense"))
    >>> values["encoder/self/weights"].shape
    (2, 3, 6, 6)
    """
    from attnformat.reading import open as open_tree

    tree = open_tree(path)
    values = {}
    for node in tree.subtree:
        for name, variable in node.dataset.variables.items():
            array = np.asarray(variable.values)
            key = f"{node.path.strip('/')}/{name}".lstrip("/")
            values[key] = array.astype(str) if array.dtype.kind in "OUS" else array
    with contextlib.suppress(Exception):
        tree.close()
    return values


def compare_values(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> str | None:
    """None when every reference variable is present with equal values, else what differs.

    Examples
    --------
    >>> compare_values({"a": np.array([1.0, np.nan])}, {"a": np.array([1.0, np.nan])}) is None
    True
    >>> compare_values({"a": np.array([1.0])}, {"a": np.array([2.0])})
    'a: values differ'
    """
    for key, expected in reference.items():
        if key not in actual:
            return f"{key}: missing"
        got = actual[key]
        if got.shape != expected.shape:
            return f"{key}: shape {got.shape} instead of {expected.shape}"
        if expected.dtype.kind in "US" or got.dtype.kind in "US":
            same = np.array_equal(expected.astype(str), got.astype(str))
        elif expected.dtype.kind in "fc" or got.dtype.kind in "fc":
            try:
                same = np.array_equal(expected, got, equal_nan=True)
            except TypeError:
                same = False
        else:
            same = np.array_equal(expected, got)
        if not same:
            return f"{key}: values differ"
    return None


# --------------------------------------------------------------------------------------------
# The campaign
# --------------------------------------------------------------------------------------------
def tree_values(tree) -> dict[str, np.ndarray]:
    """Every variable of every node of an in-memory tree, keyed like :func:`read_values`.

    Examples
    --------
    >>> from attnformat.examples import build
    >>> tree_values(build("dense"))["encoder/self/key_label"][:2].tolist()
    ['[CLS]', 'the']
    """
    values = {}
    for node in tree.subtree:
        for name, variable in node.dataset.variables.items():
            array = np.asarray(variable.values)
            key = f"{node.path.strip('/')}/{name}".lstrip("/")
            values[key] = array.astype(str) if array.dtype.kind in "OUS" else array
    return values


def _write_without_attnformat(tree, target: Path, storage: str) -> None:
    """Write a base file with xarray alone (when attnformat.save fails, the reading side still
    deserves its hostile files)."""
    if storage == "h5":
        encoding = {}
        for node in tree.subtree:
            for name, variable in node.dataset.data_vars.items():
                if variable.ndim >= 2:
                    chunks = (1,) * (variable.ndim - 2) + variable.shape[-2:]
                    encoding.setdefault(node.path, {})[name] = {"chunksizes": chunks, "compression": "gzip"}
        tree.to_netcdf(target, engine="h5netcdf", invalid_netcdf=True, encoding=encoding)
    elif storage == "zip":
        staged = target.with_name(target.name + ".staged.zarr")
        tree.to_zarr(staged, zarr_format=3, consolidated=True)
        with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
            for path in sorted(staged.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(staged).as_posix())
        shutil.rmtree(staged)
    else:
        tree.to_zarr(target, zarr_format=2 if storage == "zarr2" else 3, consolidated=True)


def _prepare_bases(examples: Sequence[str], storages: Sequence[str], folder: Path, jobs: int) -> tuple[dict, dict, dict]:
    """Write every example in every storage (in children, so the parent never opens a store).

    The ground truth is the in-memory tree each example is built from, not a reading of the file.
    Returns (base paths, reference values, storages that could not be written: reason).
    """
    from attnformat.examples import build
    from attnformat.saving import save

    folder.mkdir(parents=True, exist_ok=True)
    scheduler = _Scheduler(jobs)
    crashed = {}
    for example in examples:
        def write(example=example):
            tree = build(example)
            errors = {}
            for storage in storages:
                target = folder / storage / (example + SUFFIXES[storage])
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
                try:
                    save(tree, target, zarr_format=2 if storage == "zarr2" else 3)
                except Exception as error:  # noqa: BLE001 - reported, and the hostile files still get a base
                    errors[storage] = f"{type(error).__name__}: {str(error)[:500]}"
                    shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
                    _write_without_attnformat(tree, target, storage)
            with open(folder / f"{example}.values.pickle", "wb") as handle:
                pickle.dump({"values": tree_values(tree), "errors": errors}, handle)
            return 0

        def done(run, example=example):
            if run.exit_code != 0:
                crashed[example] = run.stderr.strip()[-2000:] or f"exit {run.exit_code}"
        scheduler.submit(f"base-{example}", write, folder, 300, done, address_limit=None)
    scheduler.drain()
    if crashed:
        raise RuntimeError(f"could not build the example files: {crashed}")
    bases, references, unwritable = {}, {}, {}
    for example in examples:
        with open(folder / f"{example}.values.pickle", "rb") as handle:
            stored = pickle.load(handle)
        for storage in storages:
            bases[example, storage] = folder / storage / (example + SUFFIXES[storage])
            references[example, storage] = stored["values"]
            if storage in stored["errors"]:
                unwritable[example, storage] = stored["errors"][storage]
    return bases, references, unwritable


def _preimport() -> None:
    """Import everything a command may need once, in the parent, so every fork starts warm."""
    import attnformat
    import attnformat.cli
    import attnformat.validation  # noqa: F401
    import h5py  # noqa: F401
    import xarray

    attnformat.cli.build_parser()
    with contextlib.suppress(Exception):
        xarray.backends.list_engines()
    # xarray imports dask (and looks for cupy, sparse...) the first time it wraps an array: do
    # that here, on an in-memory tree, so that no child pays for it.
    with contextlib.suppress(Exception):
        from xarray.namedarray import pycompat

        for module in ("dask", "cupy", "sparse", "cubed", "pint"):
            with contextlib.suppress(Exception):
                pycompat.array_type(module)
        from attnformat.examples import build
        from attnformat.validation import validate

        validate(build("dense"))
    for name in ("zarr", "numcodecs", "h5netcdf", "attnformat.engines.zarr", "attnformat.engines.hdf5", "attnformat.summary"):
        with contextlib.suppress(ImportError):
            __import__(name)


def _cli(argv: list[str]) -> Callable[[], int]:
    def run() -> int:
        from attnformat.cli import main

        return main(argv)
    return run


_BASES: dict = {}  # (examples, storages) -> what _prepare_bases returned, when reused


@dataclass
class _State:
    variant: Variant
    folder: Path
    source: Path | None = None
    description: str = ""
    runs: dict = field(default_factory=dict)
    read: dict = field(default_factory=dict)
    skipped: bool = False
    steps: list = field(default_factory=list)


def run_campaign(
    variants: Sequence[Variant],
    *,
    jobs: int | None = None,
    timeout: float = 20.0,
    workdir: str | os.PathLike | None = None,
    keep: bool = False,
    progress: Callable[[str], None] | None = None,
    commands: Sequence[str] = tuple(COMMANDS),
    reuse_bases: bool = False,
    budget: float | None = None,
) -> CampaignResult:
    """Build each variant, run the command line on it in forked children, classify every run.

    For each variant: ``info``, ``validate``, ``validate --json``, ``convert`` to ``.zarr`` and to
    ``.h5`` (each in its own child, bounded by ``timeout`` seconds and a 4 GiB address space),
    then a child that reads every variable of the variant and of each converted file through
    :func:`attnformat.open` and compares them with the unmodified file's values.

    Parameters
    ----------
    variants
        From :func:`make_variants` or :func:`variant_by_name`.
    jobs
        Children at a time (default: the number of CPUs).
    timeout
        Seconds before a child counts as hung and is killed.
    workdir
        Where files are written (default: a temporary folder, removed unless ``keep``).
    keep
        Keep every variant's files, outputs and converted copies.
    progress
        Called with a line of text now and then.
    commands
        Which of :data:`COMMANDS` to run.
    budget
        Seconds after which no new variant starts (those left are counted in ``not_run``).
    reuse_bases
        Keep the unmodified example files of this process for the next call with the same
        examples and storages (test suites call this once per class).

    Returns
    -------
    CampaignResult

    Examples
    --------
    >>> result = run_campaign([variant_by_name("dense/h5/pristine/0")], commands=["info"])
    >>> result.inputs, result.failures
    (1, [])
    """
    started = time.monotonic()
    jobs = jobs or os.cpu_count() or 1
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="attnformat-campaign-"))
    root.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda text: None)
    examples = sorted({v.example for v in variants})
    storages = [s for s in STORAGES if any(v.storage == s for v in variants)]
    _preimport()
    say(f"writing {len(examples)} examples in {len(storages)} storages")
    cache_key = (tuple(examples), tuple(storages))
    if reuse_bases and cache_key in _BASES:
        bases, references, unwritable = _BASES[cache_key]
    else:
        folder = Path(tempfile.mkdtemp(prefix="attnformat-bases-")) if reuse_bases else root / "bases"
        bases, references, unwritable = _prepare_bases(examples, storages, folder, jobs)
        if reuse_bases:
            _BASES[cache_key] = (bases, references, unwritable)
    result = CampaignResult(seed=variants[0].seed if variants else 0)
    for (example, storage), reason in unwritable.items():
        result.failures.append(Failure("wrong exit code", f"{example}/{storage}/save", "pristine", "save", None,
                                       f"attnformat.save could not write the example (base written with xarray instead): {reason}"))
    scheduler = _Scheduler(jobs)
    states = []
    finished = [0]

    def finish(state: _State):
        _classify(state, references[state.variant.example, state.variant.storage], result)
        finished[0] += 1
        if finished[0] % 25 == 0:
            say(f"{finished[0]}/{len(variants)} variants, {len(result.failing())} failures so far")
        if not keep:
            shutil.rmtree(state.folder, ignore_errors=True)

    def advance(state: _State):
        if not state.steps:
            finish(state)
            return
        label, function, step_timeout, on_done = state.steps.pop(0)

        def callback(run, on_done=on_done):
            on_done(run)
            advance(state)
        scheduler.submit(label, function, state.folder, step_timeout, callback)

    # Shuffled (deterministically), so that a run cut short by its budget still samples every class.
    order = list(variants)
    random.Random(f"{result.seed}:order").shuffle(order)
    for number, variant in enumerate(order):
        if budget is not None and time.monotonic() - started > budget:
            result.not_run = len(variants) - number
            say(f"budget of {budget:.0f} s spent: {result.not_run} variants not run")
            break
        folder = root / "variants" / f"{number:05d}"
        state = _State(variant, folder)
        states.append(state)
        folder.mkdir(parents=True, exist_ok=True)
        base = bases[variant.example, variant.storage]

        def build(variant=variant, base=base, folder=folder):
            try:
                path, detail = materialize(variant, base, folder)
            except _NotApplicable as reason:
                (folder / "variant.json").write_text(json.dumps({"skipped": str(reason)}))
                return 0
            (folder / "variant.json").write_text(json.dumps({"name": variant.name, "path": str(path), "description": detail}))
            return 0

        def built(run, state=state):
            info = {}
            with contextlib.suppress(Exception):
                info = json.loads((state.folder / "variant.json").read_text())
            if run.exit_code != 0 or not info:
                state.skipped = True
                state.description = f"could not build: {run.stderr.strip()[-300:]}"
                state.steps.clear()
                result.failures.append(Failure("traceback", state.variant.name, state.variant.klass, "build", run.exit_code,
                                               "the kit could not build this variant", run.stderr[-2000:], ""))
                return
            if "skipped" in info:
                state.skipped = True
                state.description = info["skipped"]
                state.steps.clear()
                return
            state.source = Path(info["path"])
            state.description = info["description"]
            out = state.folder / "out"
            out.mkdir(exist_ok=True)
            for command in commands:
                argv = [part.format(source=state.source, out=out) for part in COMMANDS[command]]
                state.steps.append((command, _cli(argv), timeout, lambda r, c=command, s=state: s.runs.__setitem__(c, r)))
            state.steps.append(("read", _read_check(state, references[state.variant.example, state.variant.storage]), timeout * 2,
                                lambda r, s=state: s.runs.__setitem__("read", r)))

        state.steps.append(("build", build, 120, built))
        advance(state)
    scheduler.drain()
    result.inputs = sum(1 for s in states if not s.skipped)
    result.skipped = sum(1 for s in states if s.skipped)
    result.runs = sum(len(s.runs) for s in states)
    for state in states:
        if not state.skipped:
            result.by_class[state.variant.klass] = result.by_class.get(state.variant.klass, 0) + 1
    result.seconds = time.monotonic() - started
    if not keep and not workdir:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _read_check(state: _State, reference: dict) -> Callable[[], int]:
    def run() -> int:
        from attnformat.errors import AttnFormatError

        report = {}
        out = state.folder / "out"
        for label, path in (("source", state.source), ("convert-zarr", out / "converted.zarr"), ("convert-h5", out / "converted.h5")):
            if not path.exists():
                report[label] = {"outcome": "absent"}
                continue
            try:
                values = read_values(path)
            except AttnFormatError as error:
                report[label] = {"outcome": "refused", "detail": str(error).splitlines()[0][:300] if str(error) else ""}
                continue
            except Exception as error:  # noqa: BLE001 - a raw exception type is itself a finding
                report[label] = {"outcome": "raw-error", "detail": f"{type(error).__name__}: {str(error)[:300]}"}
                continue
            difference = compare_values(reference, values)
            report[label] = {"outcome": "differs", "detail": difference} if difference else {"outcome": "equal"}
        (state.folder / "read.json").write_text(json.dumps(report))
        return 0
    return run


def _scan_for_secret(folder: Path) -> str | None:
    token = SECRET_TOKEN.encode()
    out = folder / "out"
    if not out.exists():
        return None
    for path in sorted(out.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                if token in handle.read(64 << 20):
                    return str(path.relative_to(folder))
    return None


def _classify(state: _State, reference: dict, result: CampaignResult) -> None:
    variant = state.variant
    if state.skipped:
        return
    expected = EXPECTATIONS[variant.expect]

    def fail(kind, command, run, detail):
        result.failures.append(Failure(kind, variant.name, variant.klass, command, None if run is None else run.exit_code, detail,
                                       "" if run is None else run.stderr, state.description))

    for command, run in state.runs.items():
        text = run.stdout + run.stderr
        if "Traceback (most recent call last)" in text:
            fail("traceback", command, run, "a traceback in the output")
        if run.timed_out:
            fail("hang", command, run, f"killed after {run.seconds:.0f} s")
        if run.max_rss > MEMORY_LIMIT_BYTES or "MemoryError" in text:
            fail("memory over 1 GB", command, run, f"peak {run.max_rss / 2**30:.2f} GiB")
        if command == "read":
            continue
        if not run.timed_out and run.exit_code not in expected[command]:
            allowed = "/".join(str(c) for c in sorted(expected[command]))
            fail("wrong exit code", command, run, f"expected {allowed} ({variant.expect})")
        if run.exit_code == 2 and state.source is not None:
            if command.startswith("validate"):
                # validate prints its report (to stdout): it must at least name the file.
                if state.source.name not in text:
                    fail("message quality", command, run, "the report does not name the file")
            else:
                lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
                if len(lines) != 1 or state.source.name not in run.stderr:
                    fail("message quality", command, run, f"{len(lines)} stderr lines" + ("" if state.source.name in run.stderr else ", file not named"))
    if (state.folder / MARKER_NAME).exists():
        fail("pickle executed", "*", None, f"{MARKER_NAME} was created")
    leak = _scan_for_secret(state.folder)
    outputs = "".join(r.stdout + r.stderr for r in state.runs.values())
    if leak or SECRET_TOKEN in outputs:
        fail("silent corruption", "*", None, f"the secret file's content appears in {leak or 'the output'}")
    read = {}
    with contextlib.suppress(Exception):
        read = json.loads((state.folder / "read.json").read_text())
    validate = state.runs.get("validate")
    validate_code = None if validate is None else validate.exit_code
    source = read.get("source", {})
    if source.get("outcome") == "raw-error":
        fail("API error type", "attnformat.open", None, source.get("detail", ""))
    if source.get("outcome") == "differs" and validate_code == 0:
        fail("silent corruption", "validate", validate, f"exit 0 but attnformat.open reads different values: {source.get('detail')}")
    if variant.expect == "pristine" and source.get("outcome") != "equal":
        fail("silent corruption" if source.get("outcome") == "differs" else "wrong exit code", "attnformat.open", None,
             f"unmodified file: {source.get('outcome')} {source.get('detail', '')}")
    for command in ("convert-zarr", "convert-h5"):
        run = state.runs.get(command)
        outcome = read.get(command, {})
        # Silent only if nothing warned: validate said the source conforms and convert said nothing.
        if run is not None and run.exit_code == 0 and validate_code == 0 and outcome.get("outcome") in ("differs", "refused", "raw-error"):
            kind = "silent corruption" if outcome.get("outcome") == "differs" else "wrong exit code"
            fail(kind, command, run, f"exit 0 but the converted file {outcome.get('outcome')}: {outcome.get('detail', '')}")


# --------------------------------------------------------------------------------------------
# Writers: killed, doubled, and replaced under readers
# --------------------------------------------------------------------------------------------
_WRITER_SIZES = {"layer": 6, "head": 4, "query": 16, "key": 16}


def _map_values(layer: int, head: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * layer + head)
    values = rng.random((_WRITER_SIZES["query"], _WRITER_SIZES["key"]), dtype=np.float32)
    return values / values.sum(axis=-1, keepdims=True)


def _writer_process(destination: Path, ack_path: Path, *, delay: float = 0.0, hold: Path | None = None, close: bool = True) -> Callable[[], int]:
    """A child that streams every (layer, head) map and appends ``layer head`` to ``ack_path``
    (fsync'ed) after each write returns."""

    def run() -> int:
        import attnformat
        from attnformat.errors import AttnFormatError

        try:
            writer = attnformat.Writer(destination, model_name="kill-test")
        except AttnFormatError as error:  # a refusal (lock, crashed partial) is an answer, not a crash
            print(f"{type(error).__name__}: {error}", file=sys.stderr)
            return 2
        site = writer.create_site("encoder/self", sizes=_WRITER_SIZES)
        with open(ack_path, "a") as acks:
            acks.write("started\n")
            acks.flush()
            while hold is not None and not hold.exists():
                time.sleep(0.01)
            for layer in range(_WRITER_SIZES["layer"]):
                for head in range(_WRITER_SIZES["head"]):
                    site.write("weights", _map_values(layer, head), layer=layer, head=head)
                    acks.write(f"{layer} {head}\n")
                    acks.flush()
                    os.fsync(acks.fileno())
                    if delay:
                        time.sleep(delay)
        if close:
            writer.close()
        return 0
    return run


def _acknowledged(ack_path: Path) -> list[tuple[int, int]]:
    pairs = []
    for line in _read_text(ack_path).splitlines():
        parts = line.split()
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            pairs.append((int(parts[0]), int(parts[1])))
    return pairs


def _check_partial(partial: Path, acknowledged: list, report_path: Path) -> Callable[[], int]:
    """A child that opens a killed writer's partial store and checks every acknowledged map."""

    def run() -> int:
        import attnformat

        report = {"problems": []}
        try:
            tree = attnformat.open(partial)
            weights = tree["encoder/self"]["weights"]
            if attnformat.is_complete(tree):
                report["problems"].append("the partial store says complete")
            for layer, head in acknowledged:
                got = np.asarray(weights.sel(layer=layer, head=head).values)
                if not np.array_equal(got, _map_values(layer, head)):
                    report["problems"].append(f"acknowledged map layer={layer} head={head} lost or changed")
                    break
        except Exception as error:  # noqa: BLE001 - anything is a finding here
            report["problems"].append(f"the partial store does not open: {type(error).__name__}: {str(error)[:300]}")
        report_path.write_text(json.dumps(report))
        return 0
    return run


def _run_one(label, function, folder, timeout=60.0, address_limit=ADDRESS_SPACE_LIMIT) -> Run:
    scheduler = _Scheduler(1)
    runs = []
    scheduler.submit(label, function, folder, timeout, runs.append, address_limit)
    scheduler.drain()
    return runs[0]


def _wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def run_writer_checks(*, kills: int = 6, seed: int = 0, workdir: str | os.PathLike | None = None, reader_seconds: float = 3.0,
                      suffixes: Sequence[str] = (".zarr", ".zarr.zip", ".h5")) -> CampaignResult:
    """Kill streaming writers at random points, start second writers, replace files under readers.

    Checks: a writer SIGKILLed after some acknowledged writes leaves a partial store that opens,
    says incomplete and holds every acknowledged map; a second :class:`attnformat.Writer` on a
    destination in use fails; a new Writer does not delete a crashed writer's partial without
    ``overwrite=True``; readers during ``save(overwrite=True)`` never see torn data.

    Parameters
    ----------
    kills
        Number of killed writers (spread over ``suffixes``).
    seed
        Fixes when each writer is killed.
    workdir
        Where files go (default: a temporary folder, removed afterwards).
    reader_seconds
        How long readers race ``save(overwrite=True)``.
    suffixes
        Destination storages.

    Returns
    -------
    CampaignResult
        ``failures`` of type ``"data lost"`` (and tracebacks/hangs of the helpers).

    Examples
    --------
    >>> result = run_writer_checks(kills=1, reader_seconds=0.5, suffixes=[".zarr"])
    >>> result.failures
    []

    Scenarios: each killed writer, two writers at once, readers under ``save(overwrite=True)``
    per suffix, and a second writer on the first crashed partial, which exists only when the
    kill lands after a write returned and before the writer finished (timing decides; the
    seed fixes when the kill is sent, not how fast the writer is):

    >>> result.writer_scenarios in (3, 4)
    True
    """
    _preimport()
    rng = random.Random(f"{seed}:writers")
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="attnformat-writers-"))
    root.mkdir(parents=True, exist_ok=True)
    result = CampaignResult(seed=seed)
    started = time.monotonic()
    total_maps = _WRITER_SIZES["layer"] * _WRITER_SIZES["head"]

    def lost(name, detail, run=None, command="writer"):
        result.failures.append(Failure("data lost", name, "writer", command, None if run is None else run.exit_code, detail,
                                       "" if run is None else run.stderr))

    def check_runs(name, *runs):
        for run in runs:
            if run is not None and "Traceback (most recent call last)" in run.stdout + run.stderr:
                result.failures.append(Failure("traceback", name, "writer", run.label, run.exit_code, "a traceback in the output", run.stderr))
            if run is not None and run.timed_out:
                result.failures.append(Failure("hang", name, "writer", run.label, None, f"killed after {run.seconds:.0f} s", run.stderr))

    # 1. Killed writers.
    for number in range(kills):
        suffix = suffixes[number % len(suffixes)]
        name = f"writer/kill{suffix}/{number}"
        folder = root / f"kill-{number}"
        folder.mkdir(parents=True, exist_ok=True)
        destination = folder / f"run{suffix}"
        ack_path = folder / "acks.txt"
        target_acks = rng.randrange(1, total_maps)
        child = _fork("writer", _writer_process(destination, ack_path, delay=0.002), folder / "writer.out", folder / "writer.err", 60, ADDRESS_SPACE_LIMIT)
        _wait_for(lambda: len(_acknowledged(ack_path)) >= target_acks or _reap_done(child), 30)
        time.sleep(rng.random() * 0.01)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        writer_run = _reap(child, block=True)
        acknowledged = _acknowledged(ack_path)
        partial = destination.with_name(destination.name + ".partial.zarr")
        result.writer_scenarios += 1
        if (writer_run.exit_code == 0 and len(acknowledged) == total_maps) or not acknowledged:
            continue  # finished before the kill, or killed before any write returned: nothing to lose
        if not partial.exists():
            lost(name, f"killed after {len(acknowledged)} acknowledged maps: no partial store {partial.name} left", writer_run)
            continue
        report_path = folder / "partial.json"
        check = _run_one("check-partial", _check_partial(partial, acknowledged, report_path), folder)
        check_runs(name, check)
        report = json.loads(_read_text(report_path) or '{"problems": ["the check did not finish"]}')
        for problem in report["problems"]:
            lost(name, f"killed after {len(acknowledged)} acknowledged maps: {problem}")
        # 2. A new Writer must not delete the crashed partial unless asked.
        if number == 0:
            name = f"writer/keep-partial{suffix}"
            result.writer_scenarios += 1
            second_acks = folder / "acks-second.txt"
            second = _run_one("second-writer", _writer_process(destination, second_acks, close=False), folder, 60)
            check_runs(name, second)
            report_path = folder / "partial-after.json"
            if second.exit_code == 0:
                lost(name, "a new Writer on a destination with a crashed partial went ahead without overwrite=True", second)
            check = _run_one("check-partial-after", _check_partial(partial, acknowledged, report_path), folder)
            report = json.loads(_read_text(report_path) or '{"problems": ["the check did not finish"]}')
            for problem in report["problems"]:
                lost(name, f"after a second Writer: {problem}")
    # 3. Two writers at once: the second must fail with a lock error, the first must finish intact.
    for suffix in suffixes[:1]:
        name = f"writer/two-writers{suffix}"
        result.writer_scenarios += 1
        folder = root / "two-writers"
        folder.mkdir(parents=True, exist_ok=True)
        destination = folder / f"run{suffix}"
        hold = folder / "go"
        first_acks = folder / "acks-first.txt"
        first = _fork("first-writer", _writer_process(destination, first_acks, hold=hold), folder / "first.out", folder / "first.err", 60, ADDRESS_SPACE_LIMIT)
        _wait_for(lambda: "started" in _read_text(first_acks) or _reap_done(first), 30)
        second = _run_one("second-writer", _writer_process(destination, folder / "acks-second.txt"), folder, 60)
        hold.write_text("go")
        first_run = _reap(first, block=True)
        check_runs(name, second, first_run)
        if second.exit_code == 0:
            lost(name, "a second Writer on a destination in use succeeded (no lock)", second)
        elif "lock" not in second.stderr.lower() and "use" not in second.stderr.lower():
            result.failures.append(Failure("message quality", name, "writer", "second-writer", second.exit_code,
                                           "the second writer's error does not say the destination is locked", second.stderr))
        if first_run.exit_code != 0:
            lost(name, "the first writer failed because of the second", first_run)
        else:
            report_path = folder / "final.json"
            every = [(layer, head) for layer in range(_WRITER_SIZES["layer"]) for head in range(_WRITER_SIZES["head"])]
            _run_one("check-final", _check_final(destination, every, report_path), folder)
            for problem in json.loads(_read_text(report_path) or '{"problems": ["the check did not finish"]}')["problems"]:
                lost(name, problem)
    # 4. Readers during save(overwrite=True).
    for suffix in suffixes:
        name = f"writer/replace-under-readers{suffix}"
        result.writer_scenarios += 1
        folder = root / f"replace{suffix.replace('.', '-')}"
        folder.mkdir(parents=True, exist_ok=True)
        destination = folder / f"file{suffix}"
        stop = folder / "stop"
        report_path = folder / "reads.json"
        first = _run_one("first-save", _saver(destination, None, 0), folder, 120)
        check_runs(name, first)
        if first.exit_code != 0:
            lost(name, "could not write the first version", first)
            continue
        saver = _fork("saver", _saver(destination, stop, 1), folder / "saver.out", folder / "saver.err", reader_seconds + 60, ADDRESS_SPACE_LIMIT)
        reader = _fork("reader", _reader(destination, reader_seconds, report_path), folder / "reader.out", folder / "reader.err", reader_seconds + 60, ADDRESS_SPACE_LIMIT)
        reader_run = _reap(reader, block=True)
        stop.write_text("stop")
        saver_run = _reap(saver, block=True)
        check_runs(name, reader_run, saver_run)
        report = json.loads(_read_text(report_path) or '{"torn": ["the reader did not finish"], "reads": 0}')
        for problem in report["torn"][:3]:
            lost(name, f"a reader during save(overwrite=True) saw: {problem} ({len(report['torn'])} of {report['reads']} reads)")
    result.inputs = result.writer_scenarios
    result.seconds = time.monotonic() - started
    if not workdir:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _reap_done(child: _Child) -> bool:
    """True once the child has exited (it is reaped here; :func:`_reap` then reports it)."""
    if child.waited is None:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            child.waited = (status, usage)
    return child.waited is not None


def _check_final(destination: Path, maps: list, report_path: Path) -> Callable[[], int]:
    def run() -> int:
        import attnformat

        problems = []
        try:
            tree = attnformat.open(destination)
            weights = tree["encoder/self"]["weights"]
            for layer, head in maps:
                if not np.array_equal(np.asarray(weights.sel(layer=layer, head=head).values), _map_values(layer, head)):
                    problems.append(f"map layer={layer} head={head} is missing or wrong in the finished file")
                    break
        except Exception as error:  # noqa: BLE001
            problems.append(f"the finished file does not open: {type(error).__name__}: {str(error)[:300]}")
        report_path.write_text(json.dumps({"problems": problems}))
        return 0
    return run


def _version_tree(version: int):
    import xarray as xr

    from attnformat.examples import build

    tree = build("dense")
    site = tree["encoder/self"].to_dataset()
    for name in ("weights", "logits"):
        site[name] = site[name] * 0 + np.float32(version + 1) / np.float32(6)
    site["weights"] = xr.full_like(site["weights"], 1 / 6)
    site["logits"] = xr.full_like(site["logits"], float(version))
    tree["encoder/self"] = xr.DataTree(site)
    return tree


def _saver(destination: Path, stop: Path | None, start: int) -> Callable[[], int]:
    def run() -> int:
        import attnformat

        trees = [_version_tree(0), _version_tree(1)]
        version = start
        while True:
            attnformat.save(trees[version % 2], destination, overwrite=True, check="none")
            version += 1
            if stop is None or stop.exists():
                return 0
    return run


def _reader(destination: Path, seconds: float, report_path: Path) -> Callable[[], int]:
    def run() -> int:
        import attnformat

        torn, reads = [], 0
        started = time.monotonic()
        # At least 20 reads however slow the machine is, at most 30 s.
        while (time.monotonic() - started < seconds or reads < 20) and time.monotonic() - started < 30:
            reads += 1
            try:
                tree = attnformat.open(destination)
                logits = np.asarray(tree["encoder/self"]["logits"].values)
                weights = np.asarray(tree["encoder/self"]["weights"].values)
            except Exception as error:  # noqa: BLE001 - a failed read during replacement is a finding too
                torn.append(f"{type(error).__name__}: {str(error)[:200]}")
                continue
            if not (np.all(logits == 0) or np.all(logits == 1)) or not np.allclose(weights, 1 / 6):
                torn.append(f"mixed or fill values (logits {np.unique(logits)[:4].tolist()})")
        report_path.write_text(json.dumps({"torn": torn, "reads": reads}))
        return 0
    return run


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def format_report(result: CampaignResult, *, limit: int = 40, reproduce: str = "python benchmarks/bench_corruption.py") -> str:
    """The campaign's table (counts per failure type and per class) and its first failures.

    Examples
    --------
    >>> print(format_report(CampaignResult(inputs=3, runs=18)).splitlines()[0])
    inputs: 3 variants (18 runs, 0 skipped, 0.0 s)
    """
    lines = [f"inputs: {result.inputs} variants ({result.runs} runs, {result.skipped} skipped, {result.seconds:.1f} s)"]
    if result.not_run:
        lines[0] += f"; {result.not_run} not run (time budget)"
    if result.writer_scenarios:
        lines[0] += f"; writer scenarios: {result.writer_scenarios}"
    width = max(len(t) for t in FAILURE_TYPES)
    for failure_type in FAILURE_TYPES:
        runs = sum(1 for f in result.failures if f.type == failure_type)
        note = "" if failure_type in ZERO_TYPES else "   (reported, not part of the zero target)"
        lines.append(f"  {failure_type:<{width}}  {result.count(failure_type):5d} variants  {runs:5d} runs{note}")
    klasses = [k for k in CLASSES if k in result.by_class or any(f.klass == k for f in result.failures)]
    if klasses:
        lines.append("")
        lines.append("by class (variants failing any zero-target check / variants):")
        for klass in klasses:
            failing = len({f.variant for f in result.failures if f.klass == klass and f.type in ZERO_TYPES})
            total = result.by_class.get(klass, result.writer_scenarios if klass == "writer" else 0)
            kinds = {}
            for failure in result.failures:
                if failure.klass == klass and failure.type in ZERO_TYPES:
                    kinds.setdefault(failure.type, set()).add(failure.variant)
            detail = ", ".join(f"{k}: {len(v)}" for k, v in kinds.items())
            lines.append(f"  {klass:<11} {failing:4d} / {total:<4d} {detail}")
    failing = result.failing(FAILURE_TYPES)
    if failing:
        lines.append("")
        lines.append(f"first {min(limit, len(failing))} of {len(failing)} failures:")
        shown = set()
        for failure in failing:
            if len(shown) >= limit:
                break
            key = (failure.variant, failure.type, failure.command)
            if key in shown:
                continue
            shown.add(key)
            lines.append("  " + failure.line())
            if not failure.variant.startswith("writer/"):
                lines.append(f"      reproduce: {reproduce} --seed {result.seed} --variant {failure.variant} --keep /tmp/attn-repro")
    return "\n".join(lines)
