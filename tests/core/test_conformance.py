"""The spec, the JSON Schemas, the validator's rules and the fixtures agree one-to-one by rule id."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import xarray as xr

import attnformat
from attnformat.examples import EXAMPLES, build
from attnformat.conventions import LIMITS
from attnformat.rules import RULES
from attnformat.validation import load_schema

SPEC_DIR = Path(__file__).resolve().parents[2] / "spec"
INVALID = SPEC_DIR / "conformance" / "invalid"
VALID = SPEC_DIR / "conformance" / "valid"
MUST_RULES = sorted(rule_id for rule_id, rule in RULES.items() if rule.level == "MUST")


def _spec_text() -> str:
    return (SPEC_DIR / "attnformat-spec.md").read_text(encoding="utf-8")


def test_every_rule_is_stated_in_the_spec_with_its_level():
    text = _spec_text()
    stated = dict(re.findall(r"\*\*(ATTN-[A-Z0-9]+-\d{3})\*\* \((MUST|SHOULD)\)", text))
    assert stated == {rule_id: rule.level for rule_id, rule in RULES.items()}


def test_every_must_rule_has_exactly_one_invalid_fixture_and_nothing_else_does():
    fixtures = sorted(path.name.removesuffix(".zarr") for path in INVALID.iterdir())
    assert fixtures == MUST_RULES


@pytest.mark.parametrize("rule_id", MUST_RULES)
def test_invalid_fixture_breaks_exactly_its_rule(rule_id):
    report = attnformat.validate(INVALID / f"{rule_id}.zarr")
    assert not report.ok
    assert {finding.rule_id for finding in report.errors} == {rule_id}, report.format()
    assert report.damaged == RULES[rule_id].damage  # damage and hostility make `validate` exit 2


def test_the_symlink_fixture_is_a_relative_link_that_resolves_inside_the_repository():
    links = [path for path in (INVALID / "ATTN-STORE-004.zarr").rglob("*") if path.is_symlink()]
    assert len(links) == 1
    target = os.readlink(links[0])
    assert not os.path.isabs(target)
    assert links[0].resolve() == (SPEC_DIR.parent / "README.md").resolve()  # a fresh clone has it too


def test_the_spec_states_every_bound_with_its_value():
    table = dict(re.findall(r"^\| `(MAX_[A-Z_]+)` \| ([^|]+) \|", _spec_text(), flags=re.MULTILINE))
    units = {"MiB": 2**20, "GiB": 2**30}

    def value(text):
        number, _, unit = text.strip().replace(",", "").partition(" ")
        return int(number) * units.get(unit, 1)

    assert {name: value(text) for name, text in table.items()} == LIMITS


@pytest.mark.parametrize("name", EXAMPLES)
def test_valid_fixture_conforms_without_warnings_and_matches_the_example(name):
    path = VALID / f"{name}.zarr"
    report = attnformat.validate(path)
    assert report.ok and report.findings == [], report.format()
    xr.testing.assert_identical(attnformat.open(path), build(name))


def test_schema_rule_ids_are_known_rules():
    def ids(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "x-rule-id":
                    yield value
                else:
                    yield from ids(value)
        elif isinstance(node, list):
            for item in node:
                yield from ids(item)

    used = {rule_id for name in ("root-attributes", "site-attributes", "variable-attributes") for rule_id in ids(load_schema(name))}
    assert used and used <= set(RULES)


def test_spec_schemas_are_the_packaged_schemas():
    for name in ("root-attributes", "site-attributes", "variable-attributes"):
        on_disk = (SPEC_DIR / "schemas" / f"{name}.schema.json").read_text(encoding="utf-8")
        assert load_schema(name) == __import__("json").loads(on_disk)
