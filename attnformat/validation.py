"""Checking a file or tree against the spec: every broken rule, with its id and location.

Metadata checks read attributes, dimensions and coordinates only. Value checks (``check_values``)
stream the attention variables one map at a time, so validating a large file never holds more
than one map in memory.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources

import jsonschema
import numpy as np
import xarray as xr

from attnformat.conventions import (
    ATTENTION_DIMS,
    ATTENTION_VARIABLES,
    AUXILIARY_DIMS,
    EDGE_COORDS,
    GROUP_COORDS,
    LABEL_COORDS,
    LEADING_DIMS,
    MASK_COORDS,
    PATCH_COORDS,
    POSITION_COORDS,
    ROW_SUM_TOLERANCE,
    is_site,
)
from attnformat.errors import BrokenStoreError
from attnformat.rules import RULES

# Values this close to 0 count as zero weight (masking with -1e9 or -inf underflows to exactly 0,
# but some kernels leave denormals).
ZERO_TOLERANCE = 1e-6
# Weights may overshoot [0, 1] by rounding this much.
RANGE_TOLERANCE = 1e-6


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
        """One line: ``ERROR ATTN-SITE-001 /encoder/self: ...``."""
        return f"{self.level.upper():7} {self.rule_id:15} {self.location}: {self.message}"


@dataclass
class ValidationReport:
    """Every finding for one file or tree. ``ok`` is True when no MUST rule is broken.

    Examples
    --------
    >>> report = ValidationReport("x.zarr")
    >>> report.add("ATTN-ROOT-007", "/", "no 'model_name' attribute")
    >>> report.ok, [f.level for f in report.findings], report.to_dict()["ok"]
    (True, ['warning'], True)
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
        lines.append(f"{self.source}: {verdict} to attnformat 1.0 ({len(self.errors)} errors, {len(self.warnings)} warnings)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The report as JSON-ready data."""
        return {"source": self.source, "ok": self.ok, "findings": [asdict(f) for f in self.findings]}


def validate(source: str | os.PathLike | xr.DataTree, *, check_values: bool = True) -> ValidationReport:
    """Check a file (or an in-memory tree) against every rule of the spec.

    Parameters
    ----------
    source
        A path attnformat can open, or an :class:`xarray.DataTree`.
    check_values
        Also check values (ranges, row sums, causal and padding zeros), one map at a time.

    Returns
    -------
    ValidationReport
        ``report.ok`` is True when no MUST rule is broken; ``report.findings`` lists each broken
        rule with its id, location and message.

    Raises
    ------
    attnformat.errors.UnreadableFileError
        If ``source`` is a path that cannot be opened at all.

    Examples
    --------
    >>> import attnformat
    >>> report = attnformat.validate(attnformat.example_path("dense"))
    >>> report.ok, report.findings
    (True, [])
    """
    from attnformat.reading import open as open_tree, source_of

    if isinstance(source, xr.DataTree):
        tree, name = source, source_of(source)
    else:
        name = str(source)
        try:
            tree = open_tree(source)
        except BrokenStoreError as error:
            report = ValidationReport(name)
            report.add(error.rule_id, error.location, str(error))
            return report
    report = ValidationReport(name)
    _check_root(tree, report)
    for node in tree.subtree:
        if is_site(node.attrs):
            _check_site(node, report, check_values)
    return report


# -- attributes through the JSON Schemas -------------------------------------------------------


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict:
    """Load one of the spec's JSON Schemas (``root-attributes``, ``site-attributes``, ``variable-attributes``).

    Examples
    --------
    >>> load_schema("site-attributes")["properties"]["layout"]["enum"]
    ['dense', 'edge']
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


# -- sites ----------------------------------------------------------------------------------------


def _check_site(node: xr.DataTree, report: ValidationReport, check_values: bool) -> None:
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
    if not any(name in dataset.data_vars for name in ("weights", "logits")):
        report.add("ATTN-SITE-005", location, "holds neither 'weights' nor 'logits'")
    layout = _as_json(attrs.get("layout"))
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
    _check_other_variables(dataset, location, report)
    for name in dataset.data_vars:
        _check_attributes({k: v for k, v in dataset[name].attrs.items() if k.startswith("lossy_")}, "variable-attributes", f"{location.rstrip('/')}/{name}", report)
    if layout == "edge":
        _check_edges(dataset, attrs, location, report)
    _check_patches(dataset, attrs, location, report)
    if check_values and not any(f.level == "error" and f.location.startswith(location) for f in report.findings):
        _check_values(dataset, attrs, location, report)


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
        if layout == "dense" and not ("query" in dims and "key" in dims and "edge" not in dims):
            report.add("ATTN-DIM-003", location, f"a dense site's {name} needs 'query' and 'key' (and no 'edge'); it has {dims}")
        if layout == "edge" and not ("edge" in dims and "query" not in dims and "key" not in dims):
            report.add("ATTN-DIM-003", location, f"an edge site's {name} needs 'edge' (and no 'query'/'key'); it has {dims}")
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
    for coords, kinds in ((POSITION_COORDS, "iu"), (GROUP_COORDS, "iuOUT")):
        for dim, name in coords.items():
            if name in dataset.variables:
                variable = dataset.variables[name]
                if variable.dtype.kind not in kinds or not on_token_dims(variable, dim):
                    report.add("ATTN-COORD-005", f"{location.rstrip('/')}/{name}", f"has dtype {variable.dtype} on {variable.dims}")


def _check_other_variables(dataset: xr.Dataset, location: str, report: ValidationReport) -> None:
    allowed_roles = load_schema("variable-attributes")["properties"]["role"]["enum"]
    for name, variable in dataset.data_vars.items():
        if name in ATTENTION_VARIABLES:
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
        values = np.asarray(dataset[name].values)
        bad = (values < 0) | (values >= size)
        if bad.any():
            report.add("ATTN-EDGE-003", f"{location.rstrip('/')}/{name}", f"{int(bad.sum())} indices outside [0, {size}) (first: {int(values[bad][0])})")


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
        data = np.asarray(values.values)
        if values.dtype.kind not in "iu" or np.any((data < -1) | (data >= limit)):
            report.add("ATTN-IMG-002", f"{location.rstrip('/')}/{name}", f"must be integers in [-1, {limit})")


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


def _maps(variable: xr.DataArray):
    """Yield (selection, numpy map) one map at a time over the leading dimensions."""
    leading = [d for d in variable.dims if d in LEADING_DIMS]
    for index in itertools.product(*(range(variable.sizes[d]) for d in leading)):
        selection = dict(zip(leading, index))
        yield selection, np.asarray(variable.isel(selection).values, dtype=np.float64)


def _describe(selection: dict, extra: dict | None = None) -> str:
    items = {**selection, **(extra or {})}
    return ", ".join(f"{k}={v}" for k, v in items.items()) or "(whole map)"


def _token_values(dataset, name, selection):
    if name not in dataset.variables:
        return None
    variable = dataset.variables[name]
    if "sample" in variable.dims:
        variable = variable.isel(sample=selection.get("sample", 0))
    return np.asarray(variable.values)


def _check_values(dataset: xr.Dataset, attrs, location: str, report: ValidationReport) -> None:
    normalization = _as_json(attrs.get("normalization"))
    if "weights" not in dataset.data_vars or normalization not in ("softmax", "sparsemax"):
        return
    weights = dataset["weights"]
    where = f"{location.rstrip('/')}/weights"
    layout = _as_json(attrs.get("layout"))
    along = _as_json(attrs.get("normalized_dim", "key"))
    tolerance = _tolerance(weights)
    causal = _as_json(attrs.get("causal")) == 1 and _as_json(attrs.get("attention_type", "self")) == "self" and layout == "dense"
    first = {}
    counts = {"range": 0, "sum": 0, "causal": 0, "mask": 0}
    for selection, values in _maps(weights):
        finite = values[np.isfinite(values)]
        out_of_range = int(np.sum((finite < -RANGE_TOLERANCE) | (finite > 1 + RANGE_TOLERANCE)))
        if out_of_range:
            counts["range"] += out_of_range
            first.setdefault("range", (selection, f"min {finite.min():.4g}, max {finite.max():.4g}"))
        if normalization == "softmax":
            sums, keep = _row_sums(dataset, values, layout, along, selection)
            bad = keep & (np.abs(sums - 1) > tolerance)
            if bad.any():
                counts["sum"] += int(bad.sum())
                first.setdefault("sum", (selection, f"{along} sums range {sums[bad].min():.4g}..{sums[bad].max():.4g}"))
            key_mask = _token_values(dataset, "key_mask", selection)
            if key_mask is not None and layout == "dense":
                masked = values[..., ~key_mask.astype(bool)] if along == "key" else values[~key_mask.astype(bool), ...]
                leaked = int(np.sum(np.abs(np.nan_to_num(masked)) > ZERO_TOLERANCE))
                if leaked:
                    counts["mask"] += leaked
                    first.setdefault("mask", (selection, "padding keys receive weight"))
        if causal:
            q_pos = _token_values(dataset, "query_position", selection)
            k_pos = _token_values(dataset, "key_position", selection)
            q_pos = np.arange(values.shape[-2]) if q_pos is None else q_pos
            k_pos = np.arange(values.shape[-1]) if k_pos is None else k_pos
            future = k_pos[None, :] > q_pos[:, None]
            leaked = int(np.sum(np.abs(np.nan_to_num(values[future])) > ZERO_TOLERANCE))
            if leaked:
                counts["causal"] += leaked
                first.setdefault("causal", (selection, "keys after the query receive weight"))
    messages = {
        "range": ("ATTN-VAL-001", "{n} values outside [0, 1]; first at {at} ({detail})"),
        "sum": ("ATTN-VAL-002", "{n} rows do not sum to 1 (tolerance {tol:g}); first at {at} ({detail})"),
        "causal": ("ATTN-VAL-003", "{n} weights on future keys in causal self-attention; first at {at}"),
        "mask": ("ATTN-VAL-004", "{n} weights on keys whose key_mask is false; first at {at}"),
    }
    for kind, count in counts.items():
        if count:
            rule_id, template = messages[kind]
            selection, detail = first[kind]
            report.add(rule_id, where, template.format(n=count, at=_describe(selection), detail=detail, tol=tolerance))
    if normalization == "softmax" and "logits" in dataset.data_vars and layout == "dense" and along == "key":
        _check_softmax_of_logits(dataset, tolerance, location, report)


def _row_sums(dataset, values, layout, along, selection):
    """Sums over the normalized dimension, and which rows the rule applies to."""
    if layout == "edge":
        target_name = "target" if along == "key" else "source"
        groups = np.asarray(dataset[target_name].values)
        size = int(groups.max()) + 1 if groups.size else 0
        captured = np.isfinite(values)
        sums = np.bincount(groups, weights=np.where(captured, values, 0), minlength=size)
        has_edges = np.bincount(groups, minlength=size) > 0
        all_captured = np.bincount(groups, weights=captured.astype(float), minlength=size) == np.bincount(groups, minlength=size)
        return sums, has_edges & all_captured
    axis = -1 if along == "key" else -2
    sums = np.sum(values, axis=axis)
    keep = np.all(np.isfinite(values), axis=axis)
    row_mask = _token_values(dataset, "query_mask" if along == "key" else "key_mask", selection)
    if row_mask is not None:
        keep &= row_mask.astype(bool)
    return sums, keep


def _check_softmax_of_logits(dataset, tolerance, location, report) -> None:
    for selection, logits in _maps(dataset["logits"]):
        weights = np.asarray(dataset["weights"].isel(selection).values, dtype=np.float64)
        rows = np.all(np.isfinite(weights), axis=-1) & np.any(np.isfinite(logits), axis=-1)
        if not rows.any():
            continue
        shifted = logits[rows] - np.nanmax(np.where(np.isneginf(logits[rows]), np.nan, logits[rows]), axis=-1, keepdims=True)
        expected = np.exp(np.nan_to_num(shifted, nan=-np.inf))
        expected /= expected.sum(axis=-1, keepdims=True)
        difference = float(np.max(np.abs(expected - weights[rows])))
        if difference > tolerance:
            report.add("ATTN-VAL-005", f"{location.rstrip('/')}/logits", f"softmax(logits) differs from weights by up to {difference:.3g} at {_describe(selection)}")
            return
