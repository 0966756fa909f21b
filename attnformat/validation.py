"""Checking a file or tree against the spec: every broken rule, with its id and location.

Metadata checks read attributes, dimensions and coordinates only. Value checks stream the
attention variables in blocks of whole rows of at most ``BLOCK_ELEMENTS`` elements, so that
validating a file holds a bounded amount of it in memory. For a file on disk, only the chunks its
storage actually holds are read (the engine lists them): the work is proportional to what the
file stores, never to the sizes it declares, so a few kilobytes that declare a huge array cannot
make validation allocate gigabytes or loop for hours. Damage the engine finds while reading
(ATTN-STORE-*) becomes a finding, like any other broken rule.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import jsonschema
import numpy as np
import xarray as xr

from attnformat.conventions import (
    ATTENTION_DIMS,
    FORMAT_VERSION,
    ATTENTION_VARIABLES,
    AUXILIARY_DIMS,
    EDGE_COORDS,
    GENERATION_STEP_COORDS,
    GROUP_COORDS,
    STATISTICS,
    TOKEN_COORDS,
    TOPK_VARIABLES,
    LABEL_COORDS,
    LEADING_DIMS,
    MASK_COORDS,
    PATCH_COORDS,
    POSITION_COORDS,
    ROOT_COMPLETENESS,
    ROW_SUM_TOLERANCE,
    is_site,
)
from attnformat.engines import Location, engine_for
from attnformat.errors import AttnFormatError, BrokenStoreError, SelectionError
from attnformat.rules import DAMAGE_RULES, RULES
from attnformat.text import for_terminal

# Values this close to 0 count as zero weight (masking with -1e9 or -inf underflows to exactly 0,
# but some kernels leave denormals).
ZERO_TOLERANCE = 1e-6
# Weights may overshoot [0, 1] by rounding this much.
RANGE_TOLERANCE = 1e-6
#: Value checks read blocks of at most this many elements (32 MiB as float64): whole rows of as
#: many maps as fit, or a strip of one row when a single row is longer than this.
BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Finding:
    """One broken rule: its id, ``"error"`` (MUST) or ``"warning"`` (SHOULD), where, and what.

    Examples
    --------
    >>> Finding("ATTN-SITE-001", "error", "/encoder/self", "layout is 'sparse'").format()
    "ERROR   ATTN-SITE-001   /encoder/self: layout is 'sparse'"
    """

    rule_id: str
    level: str
    location: str
    message: str

    def format(self) -> str:
        """One line: ``ERROR ATTN-SITE-001 /encoder/self: ...``; names from the file are shown
        with control characters escaped, so that the line is safe to print on a terminal."""
        return f"{self.level.upper():7} {self.rule_id:15} {for_terminal(self.location)}: {for_terminal(self.message)}"


@dataclass
class ValidationReport:
    """Every finding for one file or tree. ``ok`` is True when no MUST rule is broken.

    Examples
    --------
    >>> report = ValidationReport("x.zarr")
    >>> report.add("ATTN-ROOT-007", "/", "no 'model_name' attribute")
    >>> report.ok, report.damaged, [f.level for f in report.findings], report.to_dict()["ok"]
    (True, False, ['warning'], True)
    """

    source: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        """Findings of MUST rules."""
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        """Findings of SHOULD rules."""
        return [f for f in self.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        """True when the file conforms (warnings allowed)."""
        return not self.errors

    @property
    def damaged(self) -> bool:
        """True when an error is of a damage rule (ATTN-STORE-003..007): the file is damaged or
        hostile, not merely written against the spec (``attnformat validate`` exits 2)."""
        return any(f.rule_id in DAMAGE_RULES for f in self.errors)

    @property
    def rule_ids(self) -> set[str]:
        """The ids of every rule with a finding."""
        return {f.rule_id for f in self.findings}

    def add(self, rule_id: str, location: str, message: str) -> None:
        """Record that ``rule_id`` is broken at ``location``."""
        level = "error" if RULES[rule_id].level == "MUST" else "warning"
        self.findings.append(Finding(rule_id, level, location or "/", message))

    def format(self) -> str:
        """The report as text, one finding a line, then a verdict line."""
        lines = [f.format() for f in self.findings]
        verdict = "conforms" if self.ok else "does NOT conform"
        version = ".".join(FORMAT_VERSION.split(".")[:2])
        lines.append(f"{for_terminal(self.source)}: {verdict} to attnformat {version} ({len(self.errors)} errors, {len(self.warnings)} warnings)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The report as JSON-ready data."""
        return {"source": self.source, "ok": self.ok, "damaged": self.damaged, "findings": [asdict(f) for f in self.findings]}


def validate(
    source: str | os.PathLike | Location | xr.DataTree,
    *,
    check_values: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    scheduler=None,
    progress: bool | None = None,
) -> ValidationReport:
    """Check a file (or an in-memory tree) against every rule of the spec.

    Parameters
    ----------
    source
        A path or URL attnformat can open (or a :class:`attnformat.engines.Location`), or an
        :class:`xarray.DataTree`.
    check_values
        Also check values (ranges, row sums, causal and padding zeros), in blocks of whole rows,
        reading only the chunks the file stores.
    storage_options
        fsspec options for a URL (credentials, ``endpoint_url``...), as for :func:`attnformat.open`.
    scheduler
        Where the value checks run, as a dask graph over blocks of stored chunks: ``"threads"``
        (default: every local core), ``"processes"``, ``"synchronous"``, a
        ``dask.distributed.Client`` or a scheduler address (see :mod:`attnformat.compute`). The
        findings are the same whichever runs them.
    progress
        Progress bar on stderr for long value checks; by default only when stderr is a terminal.

    Returns
    -------
    ValidationReport
        ``report.ok`` is True when no MUST rule is broken; ``report.findings`` lists each broken
        rule with its id, location and message.

    Raises
    ------
    attnformat.errors.UnreadableFileError
        If ``source`` is a path that cannot be opened at all. Damage and hostility the storage
        finds (:class:`attnformat.errors.BrokenStoreError`, ATTN-STORE-*) are findings instead,
        whether found on opening or while reading values; ``report.damaged`` says so.

    Examples
    --------
    >>> import attnformat
    >>> report = attnformat.validate(attnformat.example_path("dense"))
    >>> report.ok, report.findings
    (True, [])
    """
    from attnformat.reading import open as open_tree, source_of
    from attnformat.verdicts import remember_conforming, version_of

    version = None
    if isinstance(source, xr.DataTree):
        tree, name = source, source_of(source)
    else:
        name = str(source)
        # Taken before opening, so that a passing verdict is remembered only for what was checked.
        version = version_of(source) if storage_options is None else None
        try:
            tree = open_tree(source, storage_options=storage_options)
        except BrokenStoreError as error:
            report = ValidationReport(name)
            report.add(error.rule_id, error.location, str(error))
            return report
    report = ValidationReport(name)
    storage = _Storage.of(tree)
    _check_root(tree, report)
    for node in tree.subtree:
        if is_site(node.attrs):
            try:
                _check_site(node, report, check_values, storage, _Schedule(scheduler, progress))
            except BrokenStoreError as error:  # damage found while reading: a finding, not a crash
                finding = Finding(error.rule_id, "error", error.location or "/", str(error))
                if finding not in report.findings:  # one damaged node can break several sites
                    report.add(error.rule_id, error.location, str(error))
    if check_values and storage is not None:
        _check_every_chunk(tree, report, storage, _Schedule(scheduler, progress))
    if report.ok and version is not None and version_of(source) == version:
        remember_conforming(version)  # the viewer's direct road may now skip these checks
    return report


def _check_every_chunk(tree: xr.DataTree, report: ValidationReport, storage: _Storage, schedule: _Schedule | None = None) -> None:
    """Read every stored chunk of every other variable once, so that the engine's checks
    (checksums, sizes, the chunk manifest) run on all of them: damage in a bias, an image, a
    distance or a coordinate is a finding too [ATTN-STORE-005/007]. Site weights were read by the
    value checks already. Tasks of a dask graph read batches of stored chunks, one chunk in memory
    at a time each; the first damage in file order is reported per variable."""
    from attnformat import compute

    schedule = schedule or _Schedule()
    for node in tree.subtree:
        site = is_site(node.attrs)
        work = []
        for name, variable in node.to_dataset(inherit=False).variables.items():
            if site and name == "weights":
                continue
            path = f"{node.path.strip('/')}/{name}".lstrip("/")
            try:
                listing = storage.listing(path)
            except BrokenStoreError as error:
                _add_damage(report, error.rule_id, error.location, str(error))
                continue
            if listing is None or len(listing[0]) != variable.ndim:
                work.append((name, [None]))
                continue
            chunk_shape, stored = listing
            regions = [tuple((i * c, (i + 1) * c) for i, c in zip(index, chunk_shape))
                       for index in sorted(_stored_within(stored, _chunk_grid(variable.shape, chunk_shape)))]
            elements = max(1, math.prod(chunk_shape))
            work.extend((name, batch) for batch in compute.batches(regions, lambda _: elements, _TASK_ELEMENTS))
        done = set()
        for (name, _), damage in zip(work, schedule.map(node, _read_chunks_task, work)):
            if damage is not None and name not in done:
                done.add(name)
                _add_damage(report, *damage)


#: Elements one value-check task reads (in blocks of at most BLOCK_ELEMENTS).
_TASK_ELEMENTS = 4 * BLOCK_ELEMENTS


@dataclass
class _Schedule:
    """Where the value checks' dask graphs run (see :func:`attnformat.compute.run`)."""

    scheduler: Any = None
    progress: bool | None = None

    def local(self, node) -> bool:
        """False for an in-memory tree sent to other processes (then it is checked here)."""
        from attnformat import compute

        return not (compute.portable(self.scheduler) and node.root.encoding.get("location") is None)

    def run(self, tasks: list) -> list:
        from attnformat import compute

        return compute.run(tasks, scheduler=self.scheduler, progress=self.progress)

    def map(self, node, function, batches: list, *args) -> list:
        """``function(NodeRef, batch, *args)`` for every batch, as one graph; results in order."""
        from attnformat import compute

        where = compute.NodeRef(node)
        if not self.local(node):
            return [function(where, batch, *args) for batch in batches]
        return self.run([compute.delayed(function, where, batch, *args) for batch in batches])


def _add_damage(report: ValidationReport, rule_id: str, location: str | None, message: str) -> None:
    finding = Finding(rule_id, "error", location or "/", message)
    if finding not in report.findings:
        report.add(rule_id, location, message)


def _read_chunks_task(where, work: tuple) -> tuple | None:
    """Read each region (a stored chunk) of one variable: ``(rule_id, location, message)`` of the
    first damage found (plain values: they cross processes), or None."""
    name, regions = work
    variable = where.node().variables[name]
    for region in regions:
        try:
            if region is None:
                variable.values  # noqa: B018 - reading is the check
            else:
                variable[tuple(slice(start, stop) for start, stop in region)].values  # noqa: B018
        except BrokenStoreError as error:
            return error.rule_id, error.location, str(error)
    return None


# -- attributes through the JSON Schemas -------------------------------------------------------


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict:
    """Load one of the spec's JSON Schemas (``root-attributes``, ``site-attributes``, ``variable-attributes``).

    Examples
    --------
    >>> load_schema("site-attributes")["properties"]["layout"]["enum"]
    ['dense', 'edge', 'topk', 'statistics']
    """
    text = resources.files("attnformat.schemas").joinpath(f"{name}.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def _as_json(value):
    """Attribute values as JSON would hold them (HDF5 hands back numpy scalars and arrays)."""
    if isinstance(value, np.ndarray):
        return [_as_json(v) for v in value.tolist()] if value.ndim else _as_json(value.item())
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _check_attributes(attrs, schema_name: str, location: str, report: ValidationReport) -> None:
    schema = load_schema(schema_name)
    instance = {key: _as_json(value) for key, value in attrs.items()}
    for error in jsonschema.Draft202012Validator(schema).iter_errors(instance):
        rule_id = error.schema.get("x-rule-id") if isinstance(error.schema, dict) else None
        if error.validator == "required":
            missing = re.findall(r"'([^']+)' is a required property", error.message)
            prop = schema["properties"].get(missing[0], {}) if missing else {}
            rule_id = rule_id or prop.get("x-rule-id")
            message = f"missing attribute {missing[0]!r}" if missing else error.message
        else:
            prop_name = error.absolute_path[0] if error.absolute_path else None
            if rule_id is None and prop_name is not None:
                rule_id = schema["properties"].get(prop_name, {}).get("x-rule-id")
            message = f"attribute {prop_name!r}: {error.message}" if prop_name is not None else error.message
        if rule_id:
            report.add(rule_id, location, message)


# -- root -----------------------------------------------------------------------------------------


def _check_root(tree: xr.DataTree, report: ValidationReport) -> None:
    _check_attributes(tree.attrs, "root-attributes", "/", report)
    if not any(is_site(node.attrs) for node in tree.subtree):
        report.add("ATTN-ROOT-005", "/", "no group has a 'layout' attribute, so the file holds no attention site")
    for name in ("model_name", "model_framework"):
        if name not in tree.attrs:
            report.add("ATTN-ROOT-007", "/", f"no {name!r} attribute; say which model the attention came from")
    if _as_json(tree.attrs.get(ROOT_COMPLETENESS)) == "incomplete":
        report.add("ATTN-ROOT-008", "/", "completeness is 'incomplete': its writer did not finish (maps never "
                   "written read as NaN); finish the capture, or keep in mind that parts are missing")


# -- sites ----------------------------------------------------------------------------------------


def _check_site(node: xr.DataTree, report: ValidationReport, check_values: bool, storage: _Storage | None = None,
                schedule: _Schedule | None = None) -> None:
    location = node.path
    attrs = node.attrs
    _check_attributes(attrs, "site-attributes", location, report)
    for parent in node.parents:
        if is_site(parent.attrs):
            report.add("ATTN-SITE-006", location, f"this site lies inside the site {parent.path}")
    for name in ("attention_type", "causal"):
        if name not in attrs:
            report.add("ATTN-SITE-008", location, f"no {name!r} attribute")
    dataset = node.to_dataset(inherit=False)
    attention = [name for name in ATTENTION_VARIABLES if name in dataset.data_vars]
    layout = _as_json(attrs.get("layout"))
    if layout == "topk":
        if "weights" not in dataset.data_vars:
            report.add("ATTN-SITE-005", location, "a topk site holds 'weights' (the kept weights); it has none")
    elif layout == "statistics":
        if not any(name in dataset.data_vars for name in STATISTICS):
            report.add("ATTN-SITE-005", location, f"a statistics site holds at least one of {', '.join(STATISTICS)}; it has none")
    elif not any(name in dataset.data_vars for name in ("weights", "logits")):
        report.add("ATTN-SITE-005", location, "holds neither 'weights' nor 'logits'")
    if layout == "topk":
        attention = [name for name in attention if name == "weights"]
        _check_topk_structure(dataset, attrs, location, report)
    elif layout == "statistics":
        attention = []
        _check_statistics_structure(dataset, attrs, location, report)
    _check_head_reduction(dataset, attrs, layout, location, report)
    for name in attention:
        _check_attention_variable(dataset, name, layout, attrs, f"{location.rstrip('/')}/{name}", report)
    if "weights" in dataset.data_vars and "logits" in dataset.data_vars:
        if dataset["weights"].dims != dataset["logits"].dims:
            report.add("ATTN-DIM-004", location, f"weights has dims {dataset['weights'].dims}, logits {dataset['logits'].dims}")
    if "bias" in dataset.data_vars:
        reference = next((dataset[n].dims for n in ("weights", "logits") if n in dataset.data_vars), None)
        if reference is not None and not set(dataset["bias"].dims) <= set(reference):
            report.add("ATTN-DIM-005", f"{location.rstrip('/')}/bias", f"bias dims {dataset['bias'].dims} are not a subset of {reference}")
    _check_coordinates(dataset, location, report)
    _check_other_variables(dataset, location, report, layout)
    for name in dataset.data_vars:
        _check_attributes({k: v for k, v in dataset[name].attrs.items() if k.startswith("lossy_")}, "variable-attributes", f"{location.rstrip('/')}/{name}", report)
    if layout == "edge":
        _check_edges(dataset, attrs, location, report)
    _check_patches(dataset, attrs, location, report)
    if storage is not None and _as_json(node.root.attrs.get(ROOT_COMPLETENESS)) == "complete":
        _check_stored_chunks(dataset, location, storage, report, _attention_names(layout))
    if check_values and not any(f.level == "error" and f.location.startswith(location) for f in report.findings):
        if layout == "topk":
            _check_topk_values(dataset, attrs, location, report, storage, node, schedule or _Schedule())
        elif layout == "statistics":
            _check_statistics_values(dataset, attrs, location, report, storage, node, schedule or _Schedule())
        else:
            _check_values(dataset, attrs, location, report, storage, node, schedule or _Schedule())


def _check_attention_variable(dataset, name, layout, attrs, location, report) -> None:
    variable = dataset[name]
    dims = variable.dims
    unknown = [d for d in dims if d not in ATTENTION_DIMS]
    if unknown:
        report.add("ATTN-DIM-001", location, f"dimensions {unknown} are not attention dimensions {ATTENTION_DIMS}")
        return
    if list(dims) != sorted(dims, key=ATTENTION_DIMS.index):
        report.add("ATTN-DIM-002", location, f"dimensions {dims} are not in the canonical order {ATTENTION_DIMS}")
    if name != "bias":
        if layout == "dense" and not ("query" in dims and "key" in dims and "edge" not in dims and "rank" not in dims):
            report.add("ATTN-DIM-003", location, f"a dense site's {name} needs 'query' and 'key' (and no 'edge' or 'rank'); it has {dims}")
        if layout == "edge" and not ("edge" in dims and "query" not in dims and "key" not in dims and "rank" not in dims):
            report.add("ATTN-DIM-003", location, f"an edge site's {name} needs 'edge' (and no 'query'/'key'/'rank'); it has {dims}")
    if variable.dtype.kind != "f":
        report.add("ATTN-VAR-001", location, f"dtype is {variable.dtype}; attention values must be floating point")


def _check_coordinates(dataset: xr.Dataset, location: str, report: ValidationReport) -> None:
    if "step" in dataset.dims:
        step = dataset.variables.get("step")
        if step is None or step.dims != ("step",) or step.dtype.kind not in "iu":
            report.add("ATTN-COORD-001", location, "the 'step' dimension needs an integer 'step' coordinate")
        elif step.size > 1 and not np.all(np.diff(np.asarray(step.values, dtype=np.int64)) > 0):
            report.add("ATTN-COORD-001", location, f"'step' values {step.values.tolist()[:10]} do not strictly increase")
    for name in ("layer", "head"):
        if name in dataset.variables:
            values = dataset.variables[name]
            if values.dtype.kind not in "iu":
                report.add("ATTN-COORD-002", f"{location.rstrip('/')}/{name}", f"dtype is {values.dtype}, not integer")
            elif len(np.unique(values.values)) != values.size:
                report.add("ATTN-COORD-002", f"{location.rstrip('/')}/{name}", "has repeated values")

    def on_token_dims(variable, dim):
        return variable.dims in ((dim,), ("sample", dim))

    for dim, name in LABEL_COORDS.items():
        if name in dataset.variables:
            variable = dataset.variables[name]
            if variable.dtype.kind not in "OUT" or not on_token_dims(variable, dim):
                report.add("ATTN-COORD-003", f"{location.rstrip('/')}/{name}", f"must be strings on ({dim},) or (sample, {dim}); is {variable.dtype} on {variable.dims}")
    for dim, name in MASK_COORDS.items():
        if name in dataset.variables:
            variable = dataset.variables[name]
            if variable.dtype != bool or not on_token_dims(variable, dim):
                report.add("ATTN-COORD-004", f"{location.rstrip('/')}/{name}", f"must be boolean on ({dim},) or (sample, {dim}); is {variable.dtype} on {variable.dims}")
    for dim, name in TOKEN_COORDS.items():
        if name in dataset.variables:
            variable = dataset.variables[name]
            if variable.dtype.kind not in "OUT" or not on_token_dims(variable, dim):
                report.add("ATTN-COORD-006", f"{location.rstrip('/')}/{name}", f"must be strings on ({dim},) or (sample, {dim}); is {variable.dtype} on {variable.dims}")
    for dim, name in GENERATION_STEP_COORDS.items():
        if name in dataset.variables:
            variable = dataset.variables[name]
            if variable.dtype.kind not in "iu" or not on_token_dims(variable, dim):
                report.add("ATTN-COORD-006", f"{location.rstrip('/')}/{name}", f"must be integers on ({dim},) or (sample, {dim}); is {variable.dtype} on {variable.dims}")
            elif any(np.any(values < -1) for values in _in_blocks(variable)):
                report.add("ATTN-COORD-006", f"{location.rstrip('/')}/{name}", "holds values below -1 (-1 marks prompt tokens, t >= 0 the token of generation step t)")
    for coords, kinds in ((POSITION_COORDS, "iu"), (GROUP_COORDS, "iuOUT")):
        for dim, name in coords.items():
            if name in dataset.variables:
                variable = dataset.variables[name]
                if variable.dtype.kind not in kinds or not on_token_dims(variable, dim):
                    report.add("ATTN-COORD-005", f"{location.rstrip('/')}/{name}", f"has dtype {variable.dtype} on {variable.dims}")


def _check_other_variables(dataset: xr.Dataset, location: str, report: ValidationReport, layout=None) -> None:
    allowed_roles = load_schema("variable-attributes")["properties"]["role"]["enum"]
    normative = set(ATTENTION_VARIABLES) | set(_attention_names(layout))
    for name, variable in dataset.data_vars.items():
        if name in normative:
            continue
        where = f"{location.rstrip('/')}/{name}"
        role = _as_json(variable.attrs.get("role"))
        if role not in allowed_roles:
            report.add("ATTN-VAR-002", where, f"role is {role!r}; other variables need a role from {allowed_roles}")
            continue
        dims = variable.dims
        if role == "pairwise":
            if dims[-2:] != ("query", "key"):
                report.add("ATTN-VAR-003", where, f"a pairwise variable must end in (query, key); it has {dims}")
            if "units" not in variable.attrs:
                report.add("ATTN-VAR-004", where, "no 'units' attribute")
        if role == "image":
            core = tuple(d for d in dims if d != "sample")
            if core not in (("image_row", "image_col"), ("image_row", "image_col", "channel")) or (dims and "sample" in dims and dims[0] != "sample"):
                report.add("ATTN-VAR-003", where, f"an image needs (sample?, image_row, image_col, channel?); it has {dims}")
        stray = [d for d in dims if d not in ATTENTION_DIMS and d not in AUXILIARY_DIMS]
        if stray and role != "auxiliary":
            report.add("ATTN-VAR-003", where, f"dimensions {stray} are neither attention nor auxiliary dimensions; use role 'auxiliary'")


def _check_edges(dataset: xr.Dataset, attrs, location: str, report: ValidationReport) -> None:
    for name in EDGE_COORDS:
        variable = dataset.variables.get(name)
        if variable is None or variable.dims != ("edge",) or variable.dtype.kind not in "iu":
            report.add("ATTN-EDGE-001", location, f"needs an integer {name!r} coordinate on (edge,)")
            return
    node_dim = _as_json(attrs.get("edge_node_dim"))
    if node_dim not in ("node", "time"):
        return  # the schema already reported it
    used = set().union(*(dataset[n].dims for n in ATTENTION_VARIABLES if n in dataset.data_vars)) if any(n in dataset.data_vars for n in ATTENTION_VARIABLES) else set()
    if node_dim not in dataset.dims or node_dim in used:
        report.add("ATTN-EDGE-002", location, f"edge_node_dim {node_dim!r} must be a dimension of the site that the attention variables do not use")
        return
    size = dataset.sizes[node_dim]
    for name in EDGE_COORDS:
        count, first = 0, None
        for values in _in_blocks(dataset.variables[name]):
            bad = (values < 0) | (values >= size)
            count += int(np.count_nonzero(bad))
            if first is None and count:
                first = int(values[bad][0])
        if count:
            report.add("ATTN-EDGE-003", f"{location.rstrip('/')}/{name}", f"{count} indices outside [0, {size}) (first: {first})")


def _check_patches(dataset: xr.Dataset, attrs, location: str, report: ValidationReport) -> None:
    names = [n for pair in PATCH_COORDS.values() for n in pair if n in dataset.variables]
    if not names:
        return
    if "patch_grid" not in attrs:
        report.add("ATTN-IMG-002", location, "patch coordinates need a 'patch_grid' attribute [rows, cols]")
        return
    grid = _as_json(attrs["patch_grid"])
    if not (isinstance(grid, list) and len(grid) == 2):
        return  # ATTN-IMG-001, reported through the schema
    for name in names:
        values = dataset.variables[name]
        limit = grid[0] if name.endswith("_row") else grid[1]
        if values.dtype.kind not in "iu" or any(np.any((data < -1) | (data >= limit)) for data in _in_blocks(values)):
            report.add("ATTN-IMG-002", f"{location.rstrip('/')}/{name}", f"must be integers in [-1, {limit})")


def _in_blocks(variable: xr.Variable):
    """The values of a coordinate, in blocks of at most ``BLOCK_ELEMENTS`` along its first
    dimension (a long lazy coordinate is never read at once)."""
    if variable.ndim == 0 or variable.size <= BLOCK_ELEMENTS:
        yield np.asarray(variable.values)
        return
    step = max(1, BLOCK_ELEMENTS // max(1, variable.size // variable.shape[0]))
    for start in range(0, variable.shape[0], step):
        yield np.asarray(variable[start:start + step].values)


# -- top-k and statistics layouts, head reductions ---------------------------------------------


def _attention_names(layout) -> tuple[str, ...]:
    """The variables that hold a site's attention (for ATTN-STORE-007 and the role rule)."""
    if layout == "topk":
        return TOPK_VARIABLES
    if layout == "statistics":
        return STATISTICS
    return ATTENTION_VARIABLES


def _is_count(value, minimum: int) -> bool:
    value = _as_json(value)
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_reduced_dims(variable, name: str, tail: tuple, rule: str, where: str, report: ValidationReport) -> bool:
    """A top-k or statistics variable uses the leading dimensions then ``tail``, in canonical order."""
    dims = variable.dims
    allowed = set(LEADING_DIMS) | set(tail)
    if dims[-len(tail):] != tail or any(d not in allowed for d in dims) or list(dims) != sorted(dims, key=ATTENTION_DIMS.index):
        report.add(rule, where, f"{name} must have leading attention dimensions then {tail}, in canonical order; it has {dims}")
        return False
    return True


def _check_topk_structure(dataset: xr.Dataset, attrs, location: str, report: ValidationReport) -> None:
    """ATTN-TOPK-001: weights and key_index on (..., query, rank), omitted_weight on (..., query),
    integer indices, ``top_k`` the size of rank, ``key_count`` a positive integer (the size of
    ``key`` where key coordinates exist). The attribute types are also in the site schema."""
    base = location.rstrip("/")
    for name in ("logits", "bias"):
        if name in dataset.data_vars:
            report.add("ATTN-TOPK-001", f"{base}/{name}", f"a topk site holds weights, key_index and omitted_weight, not {name}")
    if "weights" not in dataset.data_vars:
        return  # ATTN-SITE-005
    weights = dataset["weights"]
    if not _check_reduced_dims(weights, "weights", ("query", "rank"), "ATTN-TOPK-001", f"{base}/weights", report):
        return
    index = dataset.data_vars.get("key_index")
    if index is None:
        report.add("ATTN-TOPK-001", location, "a topk site needs 'key_index' (the key of each kept weight) beside 'weights'")
    elif index.dims != weights.dims or index.dtype.kind not in "iu":
        report.add("ATTN-TOPK-001", f"{base}/key_index", f"must be integers with the dims of weights {weights.dims}; is {index.dtype} on {index.dims}")
    omitted = dataset.data_vars.get("omitted_weight")
    expected = tuple(d for d in weights.dims if d != "rank")
    if omitted is None:
        report.add("ATTN-TOPK-001", location, "a topk site needs 'omitted_weight' (the mass each row leaves out)")
    elif omitted.dims != expected or omitted.dtype.kind != "f":
        report.add("ATTN-TOPK-001", f"{base}/omitted_weight", f"must be floating point on {expected}; is {omitted.dtype} on {omitted.dims}")
    top = _as_json(attrs.get("top_k"))
    if _is_count(top, 1) and top != weights.sizes["rank"]:
        report.add("ATTN-TOPK-001", location, f"top_k is {top}, but the rank dimension has size {weights.sizes['rank']}")
    count = _as_json(attrs.get("key_count"))
    if _is_count(count, 1) and "key" in dataset.dims and dataset.sizes["key"] != count:
        report.add("ATTN-TOPK-001", location, f"key_count is {count}, but the key coordinates cover {dataset.sizes['key']} keys")


def _check_statistics_structure(dataset: xr.Dataset, attrs, location: str, report: ValidationReport) -> None:
    """ATTN-STAT-001 (names, dtypes, dimensions) and ATTN-STAT-003 (``local_window``)."""
    base = location.rstrip("/")
    for name in ATTENTION_VARIABLES:
        if name in dataset.data_vars:
            report.add("ATTN-STAT-001", f"{base}/{name}", f"a statistics site holds statistics ({', '.join(STATISTICS)}), not {name}")
    for name in STATISTICS:
        if name not in dataset.data_vars:
            continue
        variable = dataset[name]
        _check_reduced_dims(variable, name, ("query",), "ATTN-STAT-001", f"{base}/{name}", report)
        kind = "iu" if name == "top_key" else "f"
        if variable.dtype.kind not in kind:
            report.add("ATTN-STAT-001", f"{base}/{name}", f"dtype is {variable.dtype}; {name} must be {'an integer' if kind == 'iu' else 'floating point'}")
    count = _as_json(attrs.get("key_count"))
    if _is_count(count, 1) and "key" in dataset.dims and dataset.sizes["key"] != count:
        report.add("ATTN-STAT-001", location, f"key_count is {count}, but the key coordinates cover {dataset.sizes['key']} keys")
    if "local_weight" in dataset.data_vars and not _is_count(attrs.get("local_window"), 0):
        report.add("ATTN-STAT-003", location, f"local_weight needs the site attribute local_window, a non-negative integer; it is {_as_json(attrs.get('local_window'))!r}")


def _check_head_reduction(dataset: xr.Dataset, attrs, layout, location: str, report: ValidationReport) -> None:
    """ATTN-SITE-009: a site that declares a head reduction has no ``head`` on its attention
    variables (the value itself is checked by the schema)."""
    if "head_reduction" not in attrs:
        return
    with_head = [name for name in _attention_names(layout) if name in dataset.data_vars and "head" in dataset[name].dims]
    if with_head:
        report.add("ATTN-SITE-009", location, f"head_reduction says the heads are reduced, but {', '.join(with_head)} still have a 'head' dimension")


def _block_arrays(dataset, names, dims, region):
    """The values of several variables with dims ``dims`` (or those dims without ``rank``) over one region."""
    arrays = {}
    for name in names:
        variable = dataset[name]
        arrays[name] = np.asarray(variable.isel({d: region[d] for d in variable.dims}).values)
    return arrays


def _query_mask_block(dataset, row_dims, region):
    mask = _token_block(dataset, "query_mask", row_dims, region)
    return None if mask is None else mask.astype(bool)


def _report_tally(tally: _Tally, messages: dict, where: str, report: ValidationReport) -> None:
    """One finding per kind of broken value; ``messages`` maps a kind to (rule id, template, variable)."""
    for kind, count in tally.counts.items():
        if count:
            rule_id, template, variable = messages[kind]
            selection, detail = tally.first[kind]
            report.add(rule_id, f"{where.rstrip('/')}/{variable}", template.format(n=count, at=_describe(selection), detail=detail))


def _key_coordinate_at(dataset, name, dims, region, index):
    """A key coordinate (on (key,) or (sample, key)) at each key index of a top-k block, or None."""
    coordinate = dataset.variables.get(name)
    if coordinate is None or coordinate.dims not in (("key",), ("sample", "key")):
        return None
    if coordinate.dims == ("key",):
        return np.asarray(coordinate.values)[index]
    if "sample" not in dims:
        return np.asarray(coordinate.values)[0][index]
    values = np.asarray(coordinate.isel(sample=region["sample"]).values)
    samples = np.arange(values.shape[0]).reshape([-1 if d == "sample" else 1 for d in dims])
    return values[samples, index]


def _check_topk_values(dataset: xr.Dataset, attrs, location: str, report: ValidationReport, storage: _Storage | None = None,
                       node: xr.DataTree | None = None, schedule: _Schedule | None = None) -> None:
    """ATTN-TOPK-002..004 (and ATTN-VAL-001 on the kept weights), in blocks of whole rows over the
    chunks of ``weights`` the file stores."""
    weights = dataset["weights"]
    index = dataset.get("key_index")
    omitted = dataset.get("omitted_weight")
    count = _as_json(attrs.get("key_count"))
    if index is None or omitted is None or not _is_count(count, 1) or weights.dims[-1] != "rank":
        return  # ATTN-TOPK-001 already said what is missing
    normalization = _as_json(attrs.get("normalization"))
    tolerance = _tolerance(weights)
    where = f"{location.rstrip('/')}/weights"
    listing = storage.listing(where.lstrip("/")) if storage is not None else None
    tally = _Tally(("range", "index", "order", "omitted", "causal", "mask"))
    causal = _as_json(attrs.get("causal")) == 1 and _as_json(attrs.get("attention_type", "self")) == "self"
    from attnformat import compute

    blocks = [block for block in _row_blocks(weights, "rank", listing) if block.complete and len(block.pieces) == 1]
    work = compute.batches(blocks, _block_elements, _TASK_ELEMENTS)
    settings = (count, normalization, tolerance, causal)
    if node is None:
        parts = [_check_topk_blocks(dataset, batch, *settings) for batch in work]
    else:
        parts = (schedule or _Schedule()).map(node, _topk_blocks_task, work, *settings)
    for part in parts:
        tally.merge(part)
    messages = {
        "range": ("ATTN-VAL-001", "{n} kept weights outside [0, 1]; first at {at}", "weights"),
        "index": ("ATTN-TOPK-002", "{n} bad key indices; first at {at} ({detail}): each kept weight needs a key index in [0, key_count), no repeats in a row, and -1 where the weight is NaN", "key_index"),
        "order": ("ATTN-TOPK-003", "{n} rows out of order; first at {at} ({detail}): kept weights do not increase along rank and NaN comes only at the end", "weights"),
        "causal": ("ATTN-VAL-003", "{n} kept weights on keys after the query in causal self-attention; first at {at}", "weights"),
        "mask": ("ATTN-VAL-004", "{n} kept weights on keys whose key_mask is false; first at {at}", "weights"),
        "omitted": ("ATTN-TOPK-004", "{n} rows with a wrong omitted_weight; first at {at} ({detail}): it must lie in [0, 1], equal 1 - sum(kept) and not exceed (key_count - kept) * smallest kept weight, within " + f"{tolerance:g}", "omitted_weight"),
    }
    _report_tally(tally, messages, location, report)


def _topk_blocks_task(where, blocks, *settings) -> _Tally:
    return _check_topk_blocks(where.node().to_dataset(inherit=False), blocks, *settings)


def _check_topk_blocks(dataset, blocks, count, normalization, tolerance, causal) -> _Tally:
    """One task of the top-k value checks: its blocks of whole rows, into a tally of its own."""
    weights = dataset["weights"]
    index = dataset.get("key_index")
    omitted = dataset.get("omitted_weight")
    dims = weights.dims
    row_dims = dims[:-1]
    tally = _Tally(("range", "index", "order", "omitted", "causal", "mask"))
    for block in blocks:  # rows of a top-k site are short: always whole in a chunk, as written
        region = block.region(block.pieces[0])
        starts = block.row_starts()
        kept = np.asarray(weights.isel(region).values, dtype=np.float64)
        keys = np.asarray(index.isel(region).values).astype(np.int64)
        mass = np.asarray(omitted.isel({d: region[d] for d in omitted.dims}).values, dtype=np.float64)
        present = ~np.isnan(kept)
        if normalization in ("softmax", "sparsemax"):
            tally.add("range", present & ((kept < -RANGE_TOLERANCE) | (kept > 1 + RANGE_TOLERANCE)), dims, starts, "kept weights outside [0, 1]")
        # ATTN-TOPK-002: an index in [0, key_count) for each kept weight, -1 elsewhere, no repeats.
        bad_index = (present & ((keys < 0) | (keys >= count))) | (~present & (keys != -1))
        ordered = np.sort(np.where(present, keys, -1 - np.arange(keys.shape[-1])), axis=-1)
        repeated = np.zeros_like(present)
        repeated[..., 1:] = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
        tally.add("index", bad_index | repeated, dims, starts,
                  lambda flat: f"key_index {int(keys.reshape(-1)[flat])} (key_count {count})" if bad_index.reshape(-1)[flat] else "a key index repeated in its row")
        # ATTN-TOPK-003: non-increasing along rank, NaN only after the last kept weight.
        gap = ~present[..., :-1] & present[..., 1:]
        rising = present[..., :-1] & present[..., 1:] & (kept[..., 1:] > kept[..., :-1])
        tally.add("order", gap | rising, dims[:-1] + ("rank",), starts,
                  lambda flat: "a NaN before a kept weight" if gap.reshape(-1)[flat] else "a weight larger than the one before it")
        # ATTN-VAL-003 and ATTN-VAL-004 for the kept pairs: no weight on a future or masked key.
        safe = np.clip(keys, 0, count - 1)
        weighty = present & (keys >= 0) & (keys < count) & (np.abs(np.where(present, kept, 0.0)) > ZERO_TOLERANCE)
        weighty &= _judged_rows(dataset, dims, region)
        if causal:
            key_positions = _key_coordinate_at(dataset, "key_position", dims, region, safe)
            key_positions = safe if key_positions is None else key_positions
            future = key_positions > _positions(dataset, "query_position", "query", dims, region)
            tally.add("causal", weighty & future, dims, starts, "kept weights on keys after the query")
        if normalization == "softmax":
            key_mask = _key_coordinate_at(dataset, "key_mask", dims, region, safe)
            if key_mask is not None:
                tally.add("mask", weighty & ~key_mask.astype(bool), dims, starts, "kept weights on masked keys")
        if normalization != "softmax":
            continue
        # ATTN-TOPK-004: the mass left out, and no omitted key heavier than the lightest kept one.
        captured = present.any(axis=-1) | ~np.isnan(mass)
        row_region = {d: region[d] for d in row_dims}
        query_mask = _query_mask_block(dataset, row_dims, row_region)
        if query_mask is not None:
            captured &= np.broadcast_to(query_mask, captured.shape)
        kept_count = present.sum(axis=-1)
        total = np.nansum(kept, axis=-1)
        smallest = np.min(np.where(present, kept, np.inf), axis=-1)
        with np.errstate(invalid="ignore"):
            bad = captured & (np.isnan(mass) | (mass < -tolerance) | (mass > 1 + tolerance) | (np.abs(mass - (1 - total)) > tolerance)
                              | ((kept_count > 0) & (mass > (count - kept_count) * smallest + tolerance)))
        tally.add("omitted", bad, row_dims, starts,
                  lambda flat: f"omitted_weight {mass.reshape(-1)[flat]:.4g}, kept sum {total.reshape(-1)[flat]:.4g}, smallest kept {smallest.reshape(-1)[flat]:.4g}")
    return tally


def _check_statistics_values(dataset: xr.Dataset, attrs, location: str, report: ValidationReport, storage: _Storage | None = None,
                             node: xr.DataTree | None = None, schedule: _Schedule | None = None) -> None:
    """ATTN-STAT-002: ranges of the statistics, in blocks of whole query rows over stored chunks.

    One dask graph for the site, as the other value checks: tasks of about ``_TASK_ELEMENTS``
    values, each one statistic's blocks, merged in file order (the same findings on any scheduler).
    """
    count = _as_json(attrs.get("key_count"))
    if not _is_count(count, 1):
        return  # the schema reported it
    normalization = _as_json(attrs.get("normalization"))
    normalized = normalization in ("softmax", "sparsemax")
    present = [name for name in STATISTICS if name in dataset.data_vars]
    from attnformat import compute

    work = []
    for name in present:
        where = f"{location.rstrip('/')}/{name}"
        listing = storage.listing(where.lstrip("/")) if storage is not None else None
        blocks = list(_row_blocks(dataset[name], "query", listing))
        work.extend((name, batch) for batch in compute.batches(blocks, _block_elements, _TASK_ELEMENTS))
    settings = (count, normalized, tuple(present))
    if node is None:
        parts = [_check_statistics_blocks(dataset, item, *settings) for item in work]
    else:
        parts = (schedule or _Schedule()).map(node, _statistics_blocks_task, work, *settings)
    tally = _Tally(tuple(present) + ("order",))
    for part in parts:
        tally.merge(part)
    bounds = {
        "entropy": f"[0, ln key_count = {math.log(count):.4g}]",
        "max_weight": f"[1/key_count = {1 / count:.4g}, 1]",
        "sink_weight": "[0, 1]", "local_weight": "[0, 1]", "top_key": f"[-1, {count})",
    }
    messages = {name: ("ATTN-STAT-002", f"{{n}} values of {name} outside {bounds[name]}; first at {{at}} ({{detail}})") for name in present}
    messages["order"] = ("ATTN-STAT-002", "{n} rows whose sink_weight exceeds max_weight; first at {at} ({detail})")
    for kind, count_bad in tally.counts.items():
        if count_bad:
            rule_id, template = messages[kind]
            selection, detail = tally.first[kind]
            name = kind if kind != "order" else "sink_weight"
            report.add(rule_id, f"{location.rstrip('/')}/{name}", template.format(n=count_bad, at=_describe(selection), detail=detail))



def _statistics_blocks_task(where, item, *settings) -> _Tally:
    return _check_statistics_blocks(where.node().to_dataset(inherit=False), item, *settings)


def _check_statistics_blocks(dataset, item, count, normalized, present) -> _Tally:
    """One task of the statistics value checks: one statistic's blocks, into a tally of its own."""
    name, blocks = item
    variable = dataset[name]
    tally = _Tally(tuple(present) + ("order",))
    tolerance = _tolerance(variable) if variable.dtype.kind == "f" else 0.0
    partner = "max_weight" if name == "sink_weight" and "max_weight" in dataset.data_vars and dataset["max_weight"].dims == variable.dims else None
    for block in blocks:
        for piece in block.pieces:
            region = block.region(piece)
            starts = {**block.row_starts(), "query": piece[0]}
            values = np.asarray(variable.isel(region).values)
            if name == "top_key":
                bad = (values < -1) | (values >= count)
                tally.add(name, bad, variable.dims, starts, lambda flat, v=values: f"top_key {int(v.reshape(-1)[flat])}")
                continue
            if not normalized:
                continue
            values = values.astype(np.float64)
            with np.errstate(invalid="ignore"):
                if name == "entropy":
                    bad = (values < -tolerance) | (values > math.log(count) + tolerance)
                else:
                    bad = (values < -tolerance) | (values > 1 + tolerance)
                if name == "max_weight":
                    low = values < 1.0 / count - tolerance
                    query_mask = _query_mask_block(dataset, variable.dims, region)
                    if query_mask is not None:
                        low &= np.broadcast_to(query_mask, low.shape)
                    bad |= low
            bad &= ~np.isnan(values)
            tally.add(name, bad, variable.dims, starts, lambda flat, v=values: f"{name} {v.reshape(-1)[flat]:.4g}")
            if partner is not None:
                peak = np.asarray(dataset[partner].isel(region).values, dtype=np.float64)
                with np.errstate(invalid="ignore"):
                    above = values > peak + tolerance
                tally.add("order", above, variable.dims, starts, lambda flat, v=values, p=peak: f"sink_weight {v.reshape(-1)[flat]:.4g} > max_weight {p.reshape(-1)[flat]:.4g}")
    return tally

# -- storage --------------------------------------------------------------------------------------


@dataclass
class _Storage:
    """Where a tree opened from a file is stored, to ask its engine which chunks an array holds."""

    location: Location
    engine: object
    listings: dict = field(default_factory=dict)

    @classmethod
    def of(cls, tree: xr.DataTree) -> _Storage | None:
        """The storage of a tree opened from a file; None for a tree built in memory."""
        encoding = tree.root.encoding
        location = encoding.get("location")
        if location is None and "source" in encoding:
            location = Location.of(encoding["source"])
        if location is None:
            return None
        try:
            engine = engine_for(location)
        except AttnFormatError:
            return None
        return cls(location, engine)

    def listing(self, variable_path: str):
        """``(chunk_shape, stored chunk indices)`` of one array, or None if the engine cannot list it."""
        if variable_path not in self.listings:
            try:
                chunk_shape, stored = self.engine.stored_chunks(self.location, variable_path)
            except (NotImplementedError, SelectionError):  # the engine cannot list it: read it as declared
                self.listings[variable_path] = None
            else:
                self.listings[variable_path] = (tuple(int(c) for c in chunk_shape), stored)
        return self.listings[variable_path]


def _chunk_grid(shape, chunk_shape) -> tuple[int, ...]:
    """Chunks along each dimension, computed from the declared sizes (never by enumerating)."""
    return tuple(math.ceil(size / max(1, chunk)) for size, chunk in zip(shape, chunk_shape))


def _stored_within(stored, grid) -> set[tuple[int, ...]]:
    """The stored chunk indices that lie inside the array's grid (no duplicates)."""
    return {tuple(int(i) for i in index) for index in stored
            if len(index) == len(grid) and all(0 <= int(i) < g for i, g in zip(index, grid))}


def _first_missing(grid, held: set) -> tuple[int, ...] | None:
    # Among the first len(held) + 1 indices in order, at least one is missing: bounded by what is stored.
    for index in itertools.islice(itertools.product(*(range(g) for g in grid)), len(held) + 1):
        if index not in held:
            return index
    return None


def _check_stored_chunks(dataset: xr.Dataset, location: str, storage: _Storage, report: ValidationReport, names=ATTENTION_VARIABLES) -> None:
    """ATTN-STORE-007: a complete file stores every chunk of every attention variable."""
    for name in names:
        if name not in dataset.data_vars:
            continue
        where = f"{location.rstrip('/')}/{name}"
        listing = storage.listing(where.lstrip("/"))
        if listing is None:
            continue
        variable = dataset[name]
        chunk_shape, stored = listing
        if len(chunk_shape) != variable.ndim:
            continue
        grid = _chunk_grid(variable.shape, chunk_shape)
        declared = math.prod(grid)
        held = _stored_within(stored, grid)
        missing = declared - len(held)
        if missing > 0:
            first = _first_missing(grid, held)
            region = ", ".join(f"{dim}={index * chunk}..{min((index + 1) * chunk, size) - 1}"
                               for dim, index, chunk, size in zip(variable.dims, first, chunk_shape, variable.shape))
            report.add("ATTN-STORE-007", where,
                       f"the file says it is complete, but {missing} of {declared} chunks are not stored "
                       f"(first missing: chunk {'/'.join(map(str, first))}, {region}); the file was cut short or "
                       f"damaged: write it again, or set completeness to 'incomplete' if maps are missing on purpose")


# -- values ---------------------------------------------------------------------------------------


def _tolerance(variable: xr.DataArray) -> float:
    tolerance = ROW_SUM_TOLERANCE.get(variable.dtype.name, 1e-3)
    method = _as_json(variable.attrs.get("lossy_method"))
    if method == "bitround":
        tolerance += 2.0 ** -(int(_as_json(variable.attrs.get("lossy_keepbits", 52))) + 1)
    elif method == "quantize":
        size = variable.sizes.get("key", 1)
        tolerance += size * float(_as_json(variable.attrs.get("lossy_absolute_error", 0)))
    return tolerance


@dataclass
class _RowBlock:
    """Whole rows (along ``axis``) of an array, read in ``pieces`` along the axis.

    ``rows`` holds one (start, stop) per dimension other than ``axis``; ``pieces`` are the
    (start, stop) spans of ``axis`` to read, one piece unless a row is longer than the block size
    or only some of its chunks are stored; ``complete`` says whether the pieces cover the rows.
    """

    dims: tuple
    axis: int
    rows: list
    pieces: list
    complete: bool

    def region(self, piece) -> dict:
        """``{dim: slice}`` of one piece, for ``isel``."""
        spans = list(self.rows)
        spans.insert(self.axis, piece)
        return {dim: slice(start, stop) for dim, (start, stop) in zip(self.dims, spans)}

    def row_starts(self) -> dict:
        """Start of the block along every dimension but the axis."""
        dims = [d for i, d in enumerate(self.dims) if i != self.axis]
        return {dim: start for dim, (start, _) in zip(dims, self.rows)}


def _split_rows(region: list, budget: int):
    """Cut a box of rows ((start, stop) per dimension) into boxes of at most ``budget`` rows."""
    extents = [stop - start for start, stop in region]
    if math.prod(extents) <= budget:
        yield region
        return
    for d in range(len(region)):
        inner = math.prod(extents[d + 1:])
        if inner <= budget:
            step = max(1, budget // inner)
            for outer in itertools.product(*(range(start, stop) for start, stop in region[:d])):
                for start in range(region[d][0], region[d][1], step):
                    yield [(o, o + 1) for o in outer] + [(start, min(start + step, region[d][1]))] + region[d + 1:]
            return


def _pieces(spans: list, budget: int) -> list:
    """Cut spans of the row axis into pieces of at most ``budget`` elements."""
    return [(start, min(start + budget, stop)) for begin, stop in spans for start in range(begin, stop, budget)]


def _row_blocks(variable: xr.DataArray, axis_dim: str, listing):
    """Yield the :class:`_RowBlock` s to read for ``variable``, rows along ``axis_dim``.

    With a ``listing`` (chunk shape, stored chunk indices) only stored chunks are read: chunks are
    grouped by their position off the axis; a group holding every chunk along the axis gives
    complete rows, any other group only its stored pieces. Without one (a tree in memory), the
    whole array is one group. Blocks hold at most ``BLOCK_ELEMENTS`` elements.
    """
    shape, dims = variable.shape, variable.dims
    if 0 in shape:
        return
    axis = dims.index(axis_dim)
    if listing is None:
        chunk_shape, held = shape, {(0,) * len(shape)}
    else:
        chunk_shape, stored = listing
        if len(chunk_shape) != len(shape):
            return
        held = _stored_within(stored, _chunk_grid(shape, chunk_shape))
    groups: dict = {}
    for index in held:
        groups.setdefault(index[:axis] + index[axis + 1:], []).append(index[axis])
    along, length = chunk_shape[axis], shape[axis]
    others = [(chunk, size) for i, (chunk, size) in enumerate(zip(chunk_shape, shape)) if i != axis]
    for key in sorted(groups):
        positions = sorted(groups[key])
        complete = len(positions) == math.ceil(length / max(1, along))
        spans = [(0, length)] if complete else [(i * along, min((i + 1) * along, length)) for i in positions]
        pieces = _pieces(spans, BLOCK_ELEMENTS)
        budget = max(1, BLOCK_ELEMENTS // max(stop - start for start, stop in pieces))
        region = [(i * chunk, min((i + 1) * chunk, size)) for i, (chunk, size) in zip(key, others)]
        for rows in _split_rows(region, budget):
            yield _RowBlock(dims, axis, rows, pieces, complete)


def _read_block(variable: xr.DataArray, region: dict) -> np.ndarray:
    return np.asarray(variable.isel(region).values, dtype=np.float64)


def _token_block(dataset: xr.Dataset, name: str, dims: tuple, region: dict):
    """Values of a per-token coordinate for one block, shaped to broadcast against it (or None).

    A coordinate on (sample, token) follows the block's samples; an array without ``sample`` gets
    the first sample's values.
    """
    if name not in dataset.variables:
        return None
    coordinate = dataset.variables[name]
    if "sample" in coordinate.dims and "sample" not in dims:
        coordinate = coordinate.isel(sample=0)
    if any(d not in dims for d in coordinate.dims):
        return None
    coordinate = coordinate.isel({d: region[d] for d in coordinate.dims})
    order = [d for d in dims if d in coordinate.dims]
    values = np.asarray(coordinate.transpose(*order).values)
    return values.reshape([coordinate.sizes[d] if d in coordinate.dims else 1 for d in dims])


def _positions(dataset, name, dim, dims, region):
    values = _token_block(dataset, name, dims, region)
    if values is not None:
        return values
    span = region[dim]
    return np.arange(span.start, span.stop).reshape([-1 if d == dim else 1 for d in dims])


def _describe(selection: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in selection.items()) or "(whole map)"


def _leading_at(dims: tuple, starts: dict, shape: tuple, flat_index: int) -> dict:
    """The leading-dimension positions of one element of a block (for messages)."""
    index = np.unravel_index(flat_index, shape)
    return {dim: int(starts[dim] + i) for dim, i in zip(dims, index) if dim in LEADING_DIMS}


class _Tally:
    """Counts of each kind of broken value, and where the first of each is."""

    def __init__(self, kinds=("range", "sum", "causal", "mask")):
        self.counts = dict.fromkeys(kinds, 0)
        self.first = {}

    def merge(self, other: _Tally) -> None:
        """Add the counts of a tally of later blocks (the first finding of each kind stays first)."""
        for kind, count in other.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + count
        for kind, first in other.first.items():
            self.first.setdefault(kind, first)

    def add(self, kind: str, bad: np.ndarray, dims: tuple, starts: dict, detail) -> None:
        count = int(np.count_nonzero(bad))
        if not count:
            return
        self.counts[kind] += count
        if kind not in self.first:
            flat = int(np.flatnonzero(bad)[0])
            self.first[kind] = (_leading_at(dims, starts, bad.shape, flat), detail(flat) if callable(detail) else detail)


def _check_values(dataset: xr.Dataset, attrs, location: str, report: ValidationReport, storage: _Storage | None = None,
                  node: xr.DataTree | None = None, schedule: _Schedule | None = None) -> None:
    normalization = _as_json(attrs.get("normalization"))
    if "weights" not in dataset.data_vars or normalization not in ("softmax", "sparsemax"):
        return
    weights = dataset["weights"]
    where = f"{location.rstrip('/')}/weights"
    layout = _as_json(attrs.get("layout"))
    along = _as_json(attrs.get("normalized_dim", "key"))
    if layout == "edge":
        axis_dim = "edge"
    elif along in ("key", "query"):
        axis_dim = along
    else:
        return  # the schema already reported normalized_dim
    if axis_dim not in weights.dims:
        return
    tolerance = _tolerance(weights)
    causal = _as_json(attrs.get("causal")) == 1 and _as_json(attrs.get("attention_type", "self")) == "self" and layout == "dense"
    listing = storage.listing(where.lstrip("/")) if storage is not None else None
    from attnformat import compute

    blocks = list(_row_blocks(weights, axis_dim, listing))
    work = compute.batches(blocks, _block_elements, _TASK_ELEMENTS)
    settings = (normalization, layout, along, causal, tolerance)
    if node is None:  # called on a Dataset alone: checked here, block by block
        tallies = [_check_blocks_of(dataset, batch, *settings) for batch in work]
    else:
        tallies = (schedule or _Schedule()).map(node, _check_blocks_task, work, *settings)
    tally = _Tally()
    for part in tallies:
        tally.merge(part)
    messages = {
        "range": ("ATTN-VAL-001", "{n} values outside [0, 1]; first at {at} ({detail})"),
        "sum": ("ATTN-VAL-002", "{n} rows do not sum to 1 (tolerance {tol:g}); first at {at} ({detail})"),
        "causal": ("ATTN-VAL-003", "{n} weights on future keys in causal self-attention; first at {at}"),
        "mask": ("ATTN-VAL-004", "{n} weights on keys whose key_mask is false; first at {at}"),
    }
    for kind, count in tally.counts.items():
        if count:
            rule_id, template = messages[kind]
            selection, detail = tally.first[kind]
            report.add(rule_id, where, template.format(n=count, at=_describe(selection), detail=detail, tol=tolerance))
    if normalization == "softmax" and "logits" in dataset.data_vars and layout == "dense" and along == "key":
        logits_listing = storage.listing(f"{location.strip('/')}/logits") if storage is not None else None
        _check_softmax_of_logits(dataset, tolerance, location, report, logits_listing, node, schedule)


def _block_elements(block: _RowBlock) -> int:
    rows = math.prod(stop - start for start, stop in block.rows)
    return max(1, rows * sum(stop - start for start, stop in block.pieces))


def _check_blocks_of(dataset, blocks, normalization, layout, along, causal, tolerance) -> _Tally:
    """One task's value checks: its blocks of whole rows, in order, into a tally of its own."""
    weights = dataset["weights"]
    groups = _EdgeGroups(dataset, along) if layout == "edge" else None
    tally = _Tally()
    for block in blocks:
        _check_block(dataset, weights, block, normalization, layout, along, causal, tolerance, groups, tally)
    return tally


def _check_blocks_task(where, blocks, *settings) -> _Tally:
    return _check_blocks_of(where.node().to_dataset(inherit=False), blocks, *settings)


class _EdgeGroups:
    """For the edge layout: the row of each edge (the edges sharing a ``target``, for
    ``along="key"``) as 0..n-1, and the number of edges per row. Worked out on first use, that
    is only when complete rows of stored edges are checked."""

    def __init__(self, dataset: xr.Dataset, along: str):
        self._coordinate = dataset.variables["target" if along == "key" else "source"]
        self._rows = None

    def rows(self):
        if self._rows is None:
            _, inverse, sizes = np.unique(np.asarray(self._coordinate.values), return_inverse=True, return_counts=True)
            self._rows = (inverse.reshape(-1), sizes)
        return self._rows


def _check_block(dataset, weights, block: _RowBlock, normalization, layout, along, causal, tolerance, groups, tally) -> None:
    """Check one block of whole rows, piece by piece, accumulating the row sums over its pieces."""
    dims = weights.dims
    row_dims = tuple(d for i, d in enumerate(dims) if i != block.axis)
    starts = block.row_starts()
    row_shape = tuple(stop - start for start, stop in block.rows)
    sums_by_row = groups is not None and normalization == "softmax" and block.complete
    if sums_by_row:
        inverse, sizes = groups.rows()
        sums = np.zeros(row_shape + (sizes.size,))
        captured = np.zeros(row_shape + (sizes.size,))
    else:
        sums = np.zeros(row_shape)
        captured = np.zeros(row_shape, dtype=np.int64)
    for piece in block.pieces:
        region = block.region(piece)
        values = _read_block(weights, region)
        piece_starts = {**starts, dims[block.axis]: piece[0]}
        finite = np.isfinite(values)
        # NaN means "not captured"; anything else, infinities included, is a value to check.
        present = np.where(np.isnan(values), 0.0, values)
        out_of_range = (present < -RANGE_TOLERANCE) | (present > 1 + RANGE_TOLERANCE)

        def range_detail(flat, values=values):
            leading = tuple(i if d in LEADING_DIMS else slice(None) for d, i in zip(dims, np.unravel_index(flat, values.shape)))
            seen = values[leading][~np.isnan(values[leading])]
            return f"min {seen.min():.4g}, max {seen.max():.4g}"

        tally.add("range", out_of_range, dims, piece_starts, range_detail)
        if normalization == "softmax":
            if groups is not None:
                if not sums_by_row:
                    continue  # edges of rows not wholly stored: exempt, like rows with NaN
                edges = inverse[piece[0]:piece[1]]
                flat_values = np.where(finite, values, 0.0).reshape(-1, values.shape[-1])
                flat_finite = finite.reshape(-1, values.shape[-1])
                offsets = (np.arange(flat_values.shape[0]) * sizes.size)[:, None] + edges[None, :]
                total = flat_values.shape[0] * sizes.size
                sums += np.bincount(offsets.ravel(), weights=flat_values.ravel(), minlength=total).reshape(sums.shape)
                captured += np.bincount(offsets.ravel(), weights=flat_finite.ravel(), minlength=total).reshape(sums.shape)
            else:
                sums += np.sum(np.where(finite, values, 0.0), axis=block.axis)
                captured += np.count_nonzero(finite, axis=block.axis)
            if layout == "dense":
                key_mask = _token_block(dataset, "key_mask", dims, region)
                if key_mask is not None:
                    leaked = ~key_mask.astype(bool) & (np.abs(present) > ZERO_TOLERANCE) & _judged_rows(dataset, dims, region)
                    tally.add("mask", leaked, dims, piece_starts, "padding keys receive weight")
        if causal:
            future = _positions(dataset, "key_position", "key", dims, region) > _positions(dataset, "query_position", "query", dims, region)
            leaked = future & (np.abs(present) > ZERO_TOLERANCE) & _judged_rows(dataset, dims, region)
            tally.add("causal", leaked, dims, piece_starts, "keys after the query receive weight")
    if normalization != "softmax" or not block.complete:
        return  # rows with pieces not stored hold the fill value: not captured, exempt
    if groups is not None:
        keep = (captured == sizes)
        sum_dims = row_dims + ("row",)
    else:
        keep = captured == weights.shape[block.axis]
        mask_name = "query_mask" if along == "key" else "key_mask"
        region = {d: slice(start, stop) for d, (start, stop) in zip(row_dims, block.rows)}
        row_mask = _token_block(dataset, mask_name, row_dims, region)
        if row_mask is not None:
            keep &= row_mask.astype(bool)
        sum_dims = row_dims
    bad = keep & (np.abs(sums - 1) > tolerance)
    tally.add("sum", bad, sum_dims, starts, lambda flat: f"{along} sums range {sums[bad].min():.4g}..{sums[bad].max():.4g}")


def _judged_rows(dataset, dims, region):
    """False on rows whose query is masked (``query_mask`` false): a padded query's row is no
    attention to judge (a left-padded causal row sees no key, and eager kernels spread it over
    every key), so ATTN-VAL-002 to 004 exempt it. True where there is no query mask."""
    if "query" not in dims:
        return True
    mask = _token_block(dataset, "query_mask", dims, region)
    return True if mask is None else mask.astype(bool)


def _check_softmax_of_logits(dataset, tolerance, location, report, listing=None, node=None, schedule=None) -> None:
    """ATTN-VAL-005 (a SHOULD rule): checked on rows that fit one block; the first difference in
    file order is reported (tasks of a dask graph check batches of blocks)."""
    from attnformat import compute

    logits_array, weights_array = dataset["logits"], dataset["weights"]
    if logits_array.dims != weights_array.dims or "key" not in logits_array.dims:
        return
    blocks = [block for block in _row_blocks(logits_array, "key", listing) if block.complete and len(block.pieces) == 1]
    work = compute.batches(blocks, _block_elements, _TASK_ELEMENTS)
    if node is None:
        found = [_first_logits_difference(dataset, batch, tolerance) for batch in work]
    else:
        found = (schedule or _Schedule()).map(node, _logits_task, work, tolerance)
    first = next((item for item in found if item is not None), None)
    if first is not None:
        difference, at = first
        report.add("ATTN-VAL-005", f"{location.rstrip('/')}/logits",
                   f"softmax(logits) differs from weights by up to {difference:.3g} at {_describe(at)}")


def _logits_task(where, blocks, tolerance):
    return _first_logits_difference(where.node().to_dataset(inherit=False), blocks, tolerance)


def _first_logits_difference(dataset, blocks, tolerance) -> tuple[float, dict] | None:
    """``(largest difference, position)`` in the first block of ``blocks`` where softmax(logits)
    and weights differ by more than ``tolerance``; None if none does."""
    logits_array, weights_array = dataset["logits"], dataset["weights"]
    for block in blocks:
        region = block.region(block.pieces[0])
        logits = _read_block(logits_array, region)
        weights = _read_block(weights_array, region)
        rows = np.all(np.isfinite(weights), axis=-1) & np.any(np.isfinite(logits), axis=-1)
        if not rows.any():
            continue
        with np.errstate(invalid="ignore", over="ignore"):
            chosen = logits[rows]
            peak = np.nanmax(np.where(np.isneginf(chosen), np.nan, chosen), axis=-1, keepdims=True)
            expected = np.exp(np.nan_to_num(chosen - peak, nan=-np.inf))
            expected /= expected.sum(axis=-1, keepdims=True)
            differences = np.max(np.abs(expected - weights[rows]), axis=-1)
        over = differences > tolerance
        if over.any():
            row_positions = np.argwhere(rows)[int(np.flatnonzero(over)[0])]
            starts = block.row_starts()
            row_dims = [d for i, d in enumerate(logits_array.dims) if i != block.axis]
            at = {d: int(starts[d] + i) for d, i in zip(row_dims, row_positions) if d in LEADING_DIMS}
            return float(differences[over].max()), at
    return None
