"""Whichever road a file takes (local Zarr v3 or v2, zip, HDF5; over HTTP; on S3), opening it gives
the same tree: the same groups, attributes, coordinates, dtypes and values as the local Zarr v3
store, which itself holds exactly what was written (checked against zarr's own reading)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import xarray as xr
import zarr

import attnformat
from attnformat.examples import EXAMPLES, build

# road -> (storage it is saved in, where it is read from)
ROADS = {
    "local-zarr-v3": (".zarr", "local"),
    "local-zarr-v2": ("-v2.zarr", "local"),
    "local-zip": (".zarr.zip", "local"),
    "local-hdf5": (".h5", "local"),
    "http-zarr-v3": (".zarr", "http"),
    "http-hdf5": (".h5", "http"),
    "s3-zarr-v3": (".zarr", "s3"),
    "s3-zip": (".zarr.zip", "s3"),
    "s3-hdf5": (".h5", "s3"),
}
STORAGES = sorted({storage for storage, _ in ROADS.values()})


@pytest.fixture(scope="module")
def files(tmp_path_factory, http_root, s3_storage_options, s3_put):
    """road -> example -> (what ``attnformat.open`` takes, storage_options); every file written once."""
    folder = tmp_path_factory.mktemp("roads")
    base, served = http_root
    written = {}
    for name in EXAMPLES:
        tree = build(name)
        for storage in STORAGES:
            path = folder / f"{name}{storage}"
            attnformat.save(tree, path, zarr_format=2 if storage == "-v2.zarr" else 3)
            written[name, storage] = path
    roads = {}
    for road, (storage, where) in ROADS.items():
        roads[road] = {}
        for name in EXAMPLES:
            path = written[name, storage]
            if where == "local":
                roads[road][name] = (path, None)
            elif where == "http":
                target = served / "roads" / path.name
                if not target.exists():
                    target.parent.mkdir(exist_ok=True)
                    (shutil.copytree if path.is_dir() else shutil.copyfile)(path, target)
                roads[road][name] = (f"{base}/roads/{path.name}", None)
            else:
                roads[road][name] = (s3_put(path, f"roads/{path.name}"), s3_storage_options)
    return roads


@pytest.fixture(scope="module")
def references(files):
    """example -> the local Zarr v3 tree, loaded, after checking it against zarr's own reading."""
    loaded = {}
    for name in EXAMPLES:
        path, _ = files["local-zarr-v3"][name]
        tree = attnformat.open(path).load()
        group = zarr.open_group(str(path), mode="r")
        for node in tree.subtree:
            for variable_name, variable in node.dataset.variables.items():
                stored = group[f"{node.path.strip('/')}/{variable_name}".lstrip("/")][...]
                np.testing.assert_array_equal(variable.values, np.asarray(stored).astype(variable.dtype))
        xr.testing.assert_identical(tree, build(name))
        loaded[name] = tree
    return loaded


def dtypes(tree: xr.DataTree) -> dict:
    return {(node.path, name): variable.dtype for node in tree.subtree for name, variable in node.dataset.variables.items()}


@pytest.mark.parametrize("road", ROADS)
@pytest.mark.parametrize("example", EXAMPLES)
def test_every_road_gives_the_same_tree(example, road, files, references):
    source, storage_options = files[road][example]
    opened = attnformat.open(source, storage_options=storage_options)
    assert attnformat.source_of(opened) == str(source)
    loaded = opened.load()
    expected = references[example]
    xr.testing.assert_identical(loaded, expected)
    assert dtypes(loaded) == dtypes(expected)
    for node in expected.subtree:
        for name, variable in node.dataset.variables.items():
            np.testing.assert_array_equal(loaded[node.path].dataset.variables[name].values, variable.values, err_msg=f"{road} {node.path}/{name}")
