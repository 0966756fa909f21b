"""read_map gives the same labelled map as opening the whole tree, on every storage."""

from __future__ import annotations

import pytest
import xarray as xr

import attnformat
from attnformat.examples import build

CASES = {
    "dense": ("encoder/self", "weights", {"layer": 1, "head": 2}),
    "padded-batch": ("encoder/self", "weights", {"sample": 1, "layer": 0}),
    "steps": ("trunk/iga", "bias", {"step": 200, "layer": 1, "head": 0}),
    "edge-time": ("temporal", "weights", {"node": 3}),
    "frames": ("blocks", "logits", {"head": 3}),
    "image": ("encoder/self", "weights", {"layer": 0}),
}


@pytest.mark.parametrize(("suffix", "zarr_format"), [(".zarr", 3), (".zarr", 2), (".zarr.zip", 3), (".h5", 3)])
@pytest.mark.parametrize("name", CASES)
def test_read_map_equals_selecting_from_the_tree(tmp_path, name, suffix, zarr_format):
    site, variable, selection = CASES[name]
    path = attnformat.save(build(name), tmp_path / f"{name}{suffix}", zarr_format=zarr_format)
    expected = attnformat.open(path)[site].to_dataset(inherit=False)[variable].sel(selection).load()
    xr.testing.assert_identical(attnformat.read_map(path, site, variable, **selection), expected)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_read_map_errors_list_what_exists(tmp_path, suffix):
    path = attnformat.save(build("dense"), tmp_path / f"dense{suffix}")
    with pytest.raises(attnformat.SelectionError, match=r"layer 99 not in file .*dense\..*, site encoder/self; layers: 0, 1"):
        attnformat.read_map(path, "encoder/self", layer=99)
    with pytest.raises(attnformat.SelectionError, match="no dimension 'time'"):
        attnformat.read_map(path, "encoder/self", time=0)
    with pytest.raises(attnformat.SelectionError, match="no attention site 'decoder'"):
        attnformat.read_map(path, "decoder", layer=0)


@pytest.mark.parametrize("suffix", [".zarr", ".zarr.zip", ".h5"])
def test_every_road_resolves_selectors_the_same_way(tmp_path, suffix):
    # One resolver for the whole library: labels, coordinate values and negative positions mean
    # the same on the fast road, the tree road and in the viewer.
    from attnformat.viewer import position, resolve_site

    path = attnformat.save(build("dense"), tmp_path / f"dense{suffix}")
    tree = attnformat.open(path)
    weights = tree["encoder/self"]["weights"]
    by_label = attnformat.read_map(path, "encoder/self", layer=1, head=2, query="cat")
    expected = weights.isel(layer=1, head=2, query=2).values
    assert by_label.dims == ("key",)
    assert (by_label.values == expected).all()
    assert position(resolve_site(path), "query", "cat") == 2


@pytest.mark.parametrize("suffix", [".zarr", ".zarr.zip", ".h5"])
def test_read_map_raises_only_attnformat_errors(tmp_path, suffix):
    path = attnformat.save(build("dense"), tmp_path / f"dense{suffix}")
    for call in (
        lambda: attnformat.read_map(path, "encoder/self", "nope", layer=0),
        lambda: attnformat.read_map(path, "encoder/self", layer="x"),
        lambda: attnformat.read_map(path, "encoder/self", layer=[0]),
        lambda: attnformat.read_map(tmp_path / "missing.zarr", "encoder/self"),
    ):
        with pytest.raises(attnformat.AttnFormatError):
            call()
