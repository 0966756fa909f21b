"""The distribution ships every package: a wheel lists its packages explicitly (package-dir maps
adapters/ and viewer/ under attnformat), so a new subpackage must be added there too."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {"attnformat": ROOT / "attnformat", **{name: ROOT / path for name, path in config["package-dir"].items()}}
    found = set()
    for package, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            found.add(".".join((package, *relative)))
    assert found == listed


def test_schemas_are_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-data"]["attnformat.schemas"] == ["*.json"]
    assert sorted(p.name for p in (ROOT / "spec" / "schemas").glob("*.json")) == [
        "root-attributes.schema.json", "site-attributes.schema.json", "variable-attributes.schema.json"]
