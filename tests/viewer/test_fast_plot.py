"""One plot of a path takes the direct road (no tree, no zarr-python) once the file's version has
passed the metadata rules, and draws exactly what the tree road draws; pairs that are no edge are
absent (NaN, with a note), never zeros."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
import zarr

import attnformat
from attnformat.engines import zarr_manifest
from attnformat.examples import _root, build
from attnformat.testing.figures import colorbars, drawn_values, mappables, overlapping_labels
from attnformat.viewer import densify_edges, heatmap, select
from attnformat.viewer import selection as selection_module


@pytest.fixture(autouse=True)
def _private_verdicts(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNFORMAT_CACHE_DIR", str(tmp_path / "cache"))


def _truth(path, array):
    """An array of the file, read by zarr-python itself."""
    values = zarr.open_array(path / array, mode="r")[...]
    return values.astype(object) if values.dtype.kind in "TU" else values


def _remembered(path) -> bool:
    """A passing verdict is remembered for this version of the file (attnformat.verdicts)."""
    from attnformat.verdicts import known_conforming, version_of

    version = version_of(path)
    return version is not None and known_conforming(version)


def _direct(path, site=None) -> bool:
    """One plot of this file takes the direct road."""
    return selection_module._direct_site(path, site) is not None


def _figure_facts(ax):
    figure = ax.figure
    image = mappables(figure)[0]
    (colorbar,) = colorbars(figure)
    return {
        "values": drawn_values(image),
        "title": ax.get_title(),
        "xticks": [t.get_text() for t in ax.get_xticklabels()],
        "yticks": [t.get_text() for t in ax.get_yticklabels()],
        "xlabel": ax.get_xlabel(),
        "ylabel": ax.get_ylabel(),
        "limits": (colorbar.norm.vmin, colorbar.norm.vmax),
        "colorbar": colorbar.ax.get_ylabel(),
        "size": tuple(figure.get_size_inches()),
    }


def test_save_and_validate_remember_what_they_checked(tmp_path):
    path = attnformat.save(build("dense"), tmp_path / "dense.zarr")
    assert _remembered(path)  # save validated the tree it wrote
    shutil.rmtree(tmp_path / "cache")
    assert not _remembered(path)
    assert attnformat.validate(path).ok
    assert _remembered(path)  # so did validate


def test_the_first_plot_of_an_unchecked_file_reads_directly_and_draws_what_the_tree_draws(tmp_path):
    path = attnformat.save(build("dense"), tmp_path / "dense.zarr")
    shutil.rmtree(tmp_path / "cache")  # a file received from elsewhere: never checked here
    assert not _remembered(path)
    # its metadata rules are checked on the consolidated JSON (attnformat.metadata_rules): no tree
    assert _direct(path)
    first = _figure_facts(heatmap(path, layer=1, head=2))
    assert not _remembered(path)  # no verdict about the values was reached, so none is kept
    direct = _figure_facts(heatmap(path, layer=1, head=2))
    tree = _figure_facts(heatmap(attnformat.open(path), layer=1, head=2))
    weights = _truth(path, "encoder/self/weights")[1, 2]
    labels = list(_truth(path, "encoder/self/query_label"))
    for facts in (first, direct, tree):
        np.testing.assert_array_equal(facts["values"], weights)
        assert facts["yticks"] == labels and facts["xticks"] == list(_truth(path, "encoder/self/key_label"))
        assert facts["title"] == "encoder/self | layer 1 | head 2 | weights (softmax)"
        assert facts["limits"] == (float(weights.min()), float(weights.max()))
    for key in first:
        if key == "values":
            continue
        assert direct[key] == tree[key] == first[key], key


CASES = {
    "dense": ({}, [{"layer": 1, "head": 2}, {"layer": 0}, {"head": "max", "layer": "mean"}, {"layer": 1, "head": 0, "keep": ("head",)}]),
    "padded-batch": ({}, [{"sample": 1, "layer": 0}, {"sample": 0, "head": 1}, {"sample": 1, "drop_padding": False}]),
    "steps": ({"site": "trunk/iga"}, [{"step": 200, "layer": 1, "head": 0}, {"variable": "bias", "step": "mean", "layer": 1},
                                      {"keep": ("step",), "layer": 0, "head": 1}]),
    "edge-time": ({"site": "temporal"}, [{"node": 3}, {"node": 1, "layer": "max"}, {"node": 2, "densify": False}]),
    "frames": ({}, [{"variable": "logits", "head": 3}, {"keep": ("head",)}]),
    "image": ({}, [{"layer": 0, "head": 1}]),
}


@pytest.mark.parametrize("name", CASES)
def test_every_selection_is_the_same_on_both_roads(tmp_path, name):
    path = attnformat.save(build(name), tmp_path / f"{name}.zarr")
    fixed, selections = CASES[name]
    select(path, **fixed, **selections[0])  # validates where the direct road cannot tell, and remembers the verdict
    assert _direct(path, fixed.get("site"))
    tree = attnformat.open(path)
    for chosen in selections:
        options = {**fixed, **chosen}
        variable = options.pop("variable", "weights")
        direct = select(path, variable, **options)
        general = select(tree, variable, **options)
        np.testing.assert_array_equal(direct.values, general.values)
        assert direct.values.dtype == general.values.dtype
        for field in ("dims", "variable", "site", "source", "attrs", "described", "positions", "query_labels", "key_labels",
                      "kept", "missing_note"):
            assert getattr(direct, field) == getattr(general, field), (field, options)
        for field in ("query_index", "key_index"):
            np.testing.assert_array_equal(getattr(direct, field), getattr(general, field))
        assert direct.title() == general.title()


def test_the_values_are_the_files_on_both_roads(tmp_path):
    path = attnformat.save(build("steps"), tmp_path / "steps.zarr")
    select(path, site="trunk/iga")
    bias = _truth(path, "trunk/iga/bias")
    steps = list(_truth(path, "trunk/iga/step"))
    for source in (path, attnformat.open(path)):
        chosen = select(source, "bias", site="trunk/iga", step=steps[1], layer=1, head=0)
        np.testing.assert_array_equal(chosen.values, bias[1, 1, 0])
        mean = select(source, "bias", site="trunk/iga", step="mean", layer=0, head=1)
        np.testing.assert_allclose(mean.values, np.nanmean(bias[:, 0, 1], axis=0), rtol=1e-6)


def test_a_nonconforming_file_is_refused_every_time(tmp_path):
    tree = build("dense")
    tree["encoder/self"].attrs["normalization"] = "bogus"
    path = tmp_path / "bad.zarr"
    tree.to_zarr(path)
    zarr_manifest.seal(path)  # sealed like attnformat's own files: only the rule is broken
    for _ in range(2):
        with pytest.raises(attnformat.NonConformingError, match="ATTN-SITE-002"):
            heatmap(path)
        assert not _remembered(path) and not _direct(path)


def test_a_rewritten_file_is_validated_again(tmp_path, monkeypatch):
    # an edge file: its rules are not checked on the raw JSON, so its first plot validates the tree
    path = attnformat.save(build("edge"), tmp_path / "edge.zarr")
    shutil.rmtree(tmp_path / "cache")  # forget that save checked it
    calls = []
    from attnformat import validation

    original = validation.validate
    monkeypatch.setattr(validation, "validate", lambda *a, **k: calls.append(1) or original(*a, **k))
    select(path)
    select(path)
    assert len(calls) == 1
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"]["description"] = "edited after the first plot"
    (path / "zarr.json").write_text(json.dumps(root))
    select(path)
    assert len(calls) == 2


def test_without_a_cache_every_plot_validates(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNFORMAT_CACHE_DIR", "none")
    path = attnformat.save(build("dense"), tmp_path / "dense.zarr")
    select(path)
    assert not _remembered(path)  # nothing kept, and the plot is right all the same
    np.testing.assert_array_equal(select(path, layer=1, head=2).values, _truth(path, "encoder/self/weights")[1, 2])


def test_an_unsealed_file_takes_the_tree_road(tmp_path):
    path = tmp_path / "plain.zarr"
    build("dense").to_zarr(path)  # written by xarray alone: no chunk manifest
    np.testing.assert_array_equal(select(path, layer=0, head=1).values, _truth(path, "encoder/self/weights")[0, 1])
    assert not _direct(path)


def test_damage_found_on_the_direct_road_is_the_tree_roads_error(tmp_path):
    path = attnformat.save(build("dense"), tmp_path / "dense.zarr")
    select(path)
    chunk = path / "encoder/self/weights/c/0/0/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x04
    chunk.write_bytes(bytes(data))
    with pytest.raises(attnformat.UnreadableFileError, match=r"weights/c/0/0/0/0.*\[ATTN-STORE-005\]"):
        heatmap(path, layer=0, head=0)


def test_a_selector_naming_nothing_gets_the_general_message(tmp_path):
    path = attnformat.save(build("dense"), tmp_path / "dense.zarr")
    select(path)
    with pytest.raises(attnformat.SelectionError, match=r"layer 99 not in file .*dense\.zarr, site encoder/self"):
        select(path, layer=99)
    with pytest.raises(TypeError, match="unknown selector 'row'"):
        select(path, row=1)


def test_the_command_line_draws_the_same_png_on_both_roads(tmp_path, monkeypatch):
    import matplotlib.image

    from attnformat.cli import main

    path = attnformat.save(build("padded-batch"), tmp_path / "padded.zarr")
    arguments = ["plot", str(path), "heatmap", "--sample", "1", "--head", "1"]
    with monkeypatch.context() as patch:  # the general road: open the tree and validate it
        patch.setattr(selection_module, "_direct_site", lambda *args, **kwargs: None)
        assert main([*arguments, "-o", str(tmp_path / "first.png")]) == 0
    assert _direct(path)
    assert main([*arguments, "-o", str(tmp_path / "direct.png")]) == 0
    first, direct = (matplotlib.image.imread(tmp_path / name) for name in ("first.png", "direct.png"))
    assert first.shape == direct.shape and np.array_equal(first, direct)


def test_a_fresh_process_plots_without_zarr_or_a_tree(tmp_path):
    path = attnformat.save(build("dense"), tmp_path / "dense.zarr")
    select(path)  # remembered in this test's cache folder, which the child shares
    script = (
        "import sys\n"
        "from attnformat.viewer import heatmap\n"
        f"heatmap({str(path)!r}, layer=0, head=0).figure.savefig({str(tmp_path / 'x.png')!r})\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    baseline = "import attnformat.engines, sys; print(' '.join(sorted(sys.modules)))"
    env = {**os.environ, "MPLBACKEND": "Agg"}

    def modules(code):
        return set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env).stdout.split())

    plotted = modules(script)
    assert (tmp_path / "x.png").stat().st_size > 0
    assert not plotted & {"zarr", "attnformat.reading", "attnformat.validation", "attnformat.engines.zarr",
                          "attnformat.viewer.report", "attnformat.viewer.statistics"}
    # xarray only as far as the engines package itself imports it (its type annotations)
    assert "xarray" not in plotted - modules(baseline)


# -- absent pairs of densified edges ----------------------------------------------------------------


def _window_file(tmp_path, max_distance=2):
    """A temporal edge site over 5 time steps with a window of ``max_distance`` (causal)."""
    times = 5
    source, target = zip(*[(s, t) for t in range(times) for s in range(times) if 0 <= t - s <= max_distance])
    source, target = np.array(source), np.array(target)
    rng = np.random.default_rng(5)
    scores = rng.random((1, 2, len(source)))
    weights = np.empty_like(scores)
    for t in range(times):  # softmax over each target's incoming edges
        incoming = target == t
        weights[..., incoming] = scores[..., incoming] / scores[..., incoming].sum(-1, keepdims=True)
    site = xr.Dataset(
        {"weights": (("layer", "node", "edge"), weights.astype(np.float32))},
        coords={"layer": [0], "source": ("edge", source), "target": ("edge", target), "time": np.arange(times)},
        attrs={"layout": "edge", "normalization": "softmax", "normalized_dim": "key", "edge_node_dim": "time",
               "attention_type": "self", "causal": 1, "max_temporal_distance": max_distance},
    )
    tree = xr.DataTree.from_dict({"/": _root("windowed temporal attention"), "/temporal": site})
    return attnformat.save(tree, tmp_path / "window.zarr"), weights, source, target


def test_pairs_outside_the_window_are_absent_not_zero(tmp_path):
    path, weights, source, target = _window_file(tmp_path)
    expected = np.full((5, 5), np.nan)
    expected[target, source] = weights[0, 1]
    first = select(path, node=1)  # the tree road (validating), then the direct one
    direct = select(path, node=1)
    for chosen in (first, direct, select(attnformat.open(path), node=1)):
        np.testing.assert_array_equal(chosen.values, expected.astype(np.float32))
        assert chosen.missing_note == "absent: not an edge (outside the temporal window, max_temporal_distance=2)"
        assert np.isnan(chosen.values[0, 4]) and chosen.values[4, 2] > 0  # 4 steps apart: no edge; 2 apart: an edge
    ax = heatmap(path, node=1)
    np.testing.assert_array_equal(drawn_values(mappables(ax.figure)[0]), expected.astype(np.float32))
    colorbar = colorbars(ax.figure)[0]
    finite = expected[np.isfinite(expected)]
    assert (colorbar.norm.vmin, colorbar.norm.vmax) == pytest.approx((finite.min(), finite.max()))
    assert not overlapping_labels(ax.figure)


def test_a_site_without_a_window_says_only_that_a_pair_is_no_edge(tmp_path):
    path = attnformat.save(build("edge"), tmp_path / "edge.zarr")
    chosen = select(path)
    assert chosen.missing_note == "absent: not an edge"
    source, target = _truth(path, "gat/source"), _truth(path, "gat/target")
    mask = np.zeros(chosen.values.shape, bool)
    mask[target, source] = True
    assert np.isnan(chosen.values[~mask]).all() and np.isfinite(chosen.values[mask]).all()


def test_densify_edges_fills_absent_pairs_with_nan():
    dense = densify_edges(np.array([[0.25, 0.75]]), np.array([0, 1]), np.array([1, 1]), 2)
    np.testing.assert_array_equal(dense, [[[np.nan, np.nan], [0.25, 0.75]]])
    assert densify_edges(np.array([0.5]), np.array([0]), np.array([0]), 2, fill=0.0).tolist() == [[0.5, 0.0], [0.0, 0.0]]
