"""Other implementations read our files: TensorStore reads the Zarr v3 arrays, zarr-python with
numcodecs the Zarr v2 ones (TensorStore's v2 driver has no CRC32C checksum), netCDF-C the HDF5
files."""

from __future__ import annotations

import netCDF4
import numpy as np
import pytest
import tensorstore

import attnformat
from attnformat.examples import build


@pytest.mark.parametrize(("name", "site"), [("dense", "encoder/self"), ("steps", "trunk/iga"), ("edge-time", "spatial")])
def test_tensorstore_reads_weights(tmp_path, name, site):
    tree = build(name)
    path = attnformat.save(tree, tmp_path / f"{name}.zarr")
    store = tensorstore.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / site / "weights")}}, read=True).result()
    np.testing.assert_array_equal(store.read().result(), tree[site]["weights"].values)
    assert tuple(store.domain.labels) == tree[site]["weights"].dims


@pytest.mark.parametrize(("name", "site"), [("dense", "encoder/self"), ("steps", "trunk/iga"), ("edge-time", "spatial")])
def test_zarr_python_reads_zarr_v2_weights_and_verifies_their_checksums(tmp_path, name, site):
    import zarr

    tree = build(name)
    path = attnformat.save(tree, tmp_path / f"{name}.zarr", zarr_format=2)
    array = zarr.open_array(path / site / "weights", mode="r")
    np.testing.assert_array_equal(array[...], tree[site]["weights"].values)
    assert array.attrs["_ARRAY_DIMENSIONS"] == list(tree[site]["weights"].dims)
    chunk = next(p for p in (path / site / "weights").iterdir() if p.name[0].isdigit())
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0x10
    chunk.write_bytes(bytes(damaged))
    with pytest.raises(Exception, match="(?i)checksum"):
        zarr.open_array(path / site / "weights", mode="r")[...]


def test_tensorstore_reads_one_head_without_the_rest(tmp_path):
    tree = build("dense")
    path = attnformat.save(tree, tmp_path / "dense.zarr")
    store = tensorstore.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "encoder/self/weights")}}, read=True).result()
    np.testing.assert_array_equal(store[1, 2].read().result(), tree["encoder/self"]["weights"].values[1, 2])


@pytest.mark.parametrize("name", ["encoder-decoder", "steps", "padded-batch", "edge"])
def test_netcdf_c_reads_hdf5_files(tmp_path, name):
    tree = build(name)
    path = attnformat.save(tree, tmp_path / f"{name}.nc")
    with netCDF4.Dataset(path) as root:
        assert root.getncattr("attnformat_version") == attnformat.FORMAT_VERSION
        for site in attnformat.site_paths(tree):
            group = root
            for part in site.split("/"):
                group = group.groups[part]
            variable = group.variables["weights"]
            assert variable.dimensions == tree[site]["weights"].dims
            np.testing.assert_array_equal(np.asarray(variable[:]), tree[site]["weights"].values)
            assert group.getncattr("layout") == tree[site].attrs["layout"]
            if "query_label" in group.variables:
                np.testing.assert_array_equal(np.asarray(group.variables["query_label"][:]), tree[site]["query_label"].values)
