"""Attention over images (issue 9, point 3; seed 003): one visible colour scale per figure (or one
per panel when asked), user options win, and every drawn array is the file's query row placed on
the patch grid by the stored patch coordinates (and copied block by block onto the image)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import attnformat
from attnformat.examples import _root, softmax
from attnformat.testing.figures import colorbars, drawn_values, mappables, overlapping_labels, overlapping_texts
from attnformat.viewer import image_attention_grid, image_overlay, patch_attention
from attnformat.viewer.images import draw_patch_attention, image_grid_data

GRID = (2, 3)  # not square: rows and columns cannot be swapped unnoticed
PATCH = 4
SAMPLES, LAYERS, HEADS = 2, 3, 2
#: Key order of the file: CLS, then the patches in an order that is NOT row-major, so a plain
#: reshape of the row would put values on the wrong patches.
PATCH_ORDER = [(1, 2), (0, 0), (1, 0), (0, 2), (0, 1), (1, 1)]


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return write_vit(tmp_path_factory.mktemp("vit") / "vit.zarr")


def write_vit(path, *, missing_layer=None):
    """A ViT-like file (CLS + 2x3 patches of 4x4 pixels) whose layer 1 is uniform and layer 0 peaked."""
    rng = np.random.default_rng(30)
    tokens = 1 + len(PATCH_ORDER)
    logits = rng.normal(size=(SAMPLES, LAYERS, HEADS, tokens, tokens))
    logits[:, 0, :, 0, 1] += 6.0  # layer 0: CLS looks at patch (1, 2)
    logits[:, 1] = 0.0  # layer 1: uniform, every weight 1/7
    weights = softmax(logits).astype(np.float32)
    if missing_layer is not None:
        weights[:, missing_layer] = np.nan  # never captured
    images = rng.random((SAMPLES, GRID[0] * PATCH, GRID[1] * PATCH)).astype(np.float32)
    rows = np.array([-1] + [r for r, _ in PATCH_ORDER])
    cols = np.array([-1] + [c for _, c in PATCH_ORDER])
    labels = np.array(["[CLS]"] + [f"patch_{r}_{c}" for r, c in PATCH_ORDER], dtype=object)
    site = xr.Dataset(
        {"weights": (("sample", "layer", "head", "query", "key"), weights),
         "logits": (("sample", "layer", "head", "query", "key"), logits.astype(np.float32)),
         "image": (("sample", "image_row", "image_col"), images, {"role": "image"})},
        coords={"layer": np.arange(LAYERS), "head": np.arange(HEADS), "query_label": ("query", labels),
                "key_label": ("key", labels), "query_patch_row": ("query", rows), "query_patch_col": ("query", cols),
                "key_patch_row": ("key", rows), "key_patch_col": ("key", cols)},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self",
               "causal": 0, "patch_grid": list(GRID), "patch_size": [PATCH, PATCH]})
    path = attnformat.save(xr.DataTree.from_dict({"/": _root("tiny ViT"), "/vit": site}), path)
    return path, {"weights": weights, "logits": logits.astype(np.float32), "images": images}


def on_grid(row: np.ndarray) -> np.ndarray:
    """A query row (CLS first) placed on the patch grid by the stored coordinates, computed here."""
    grid = np.full(GRID, np.nan)
    for key, (r, c) in enumerate(PATCH_ORDER, start=1):
        grid[r, c] = row[key]
    return grid


def blocks(grid: np.ndarray) -> np.ndarray:
    """Each patch value copied onto its PATCH x PATCH pixels."""
    return np.kron(grid, np.ones((PATCH, PATCH)))


def attention_artists(figure):
    """The drawn attention (patch grids and overlays), not the grey images under them."""
    return [m for m in mappables(figure) if m.get_cmap().name != "gray"]


def limits(norm):
    return float(norm.vmin), float(norm.vmax)


def test_patch_attention_places_values_by_patch_coordinates(vit):
    path, truth = vit
    data = patch_attention(path, sample=1, layer=2, head=1, query="patch_0_2")
    np.testing.assert_array_equal(data.patches, on_grid(truth["weights"][1, 2, 1, 4]))
    np.testing.assert_array_equal(data.upsampled(), blocks(on_grid(truth["weights"][1, 2, 1, 4])))
    np.testing.assert_array_equal(data.image, truth["images"][1])
    assert data.label == "weights (softmax), patch_0_2 -> patches"


def test_layer_grid_shares_one_scale_and_one_labelled_colorbar(vit):
    path, truth = vit
    figure = image_attention_grid(path, over="layer", sample=1, head=0)
    expected = [on_grid(truth["weights"][1, layer, 0, 0]) for layer in range(LAYERS)]
    shared = (float(np.nanmin(expected)), float(np.nanmax(expected)))
    artists = attention_artists(figure)
    assert len(artists) == 2 * LAYERS  # patch grids, then overlays
    for layer in range(LAYERS):
        np.testing.assert_allclose(drawn_values(artists[layer]), expected[layer], rtol=1e-6)
        np.testing.assert_allclose(drawn_values(artists[LAYERS + layer]), blocks(expected[layer]), rtol=1e-6)
    assert [limits(a.norm) for a in artists] == [pytest.approx(shared)] * len(artists)
    (colorbar,) = colorbars(figure)
    assert limits(colorbar.norm) == pytest.approx(shared)
    assert colorbar.ax.get_ylabel() == "weights (softmax), [CLS] -> patches"
    # The uniform layer is drawn as what it is: 1/7 everywhere, low on the shared scale (not "hot").
    np.testing.assert_allclose(drawn_values(artists[1]), np.full(GRID, 1 / 7), rtol=1e-6)
    assert float(artists[1].norm(1 / 7)) < 0.25
    grey = [m for m in mappables(figure) if m.get_cmap().name == "gray"]
    assert len(grey) == LAYERS and all(np.array_equal(drawn_values(g), truth["images"][1]) for g in grey)
    titles = [ax.get_title() for ax in figure.axes if getattr(ax, "_colorbar", None) is None]
    assert titles == [f"layer {i}" for i in range(LAYERS)] + [f"layer {i} on the image" for i in range(LAYERS)]
    assert "sample 1" in figure._suptitle.get_text() and "head 0" in figure._suptitle.get_text()
    assert overlapping_labels(figure) == [] and overlapping_texts(figure) == []


def test_head_grid_mean_and_per_panel_scales(vit):
    path, truth = vit
    figure = image_attention_grid(path, over="head", layer=0, sample=0, per_panel=True)
    expected = [on_grid(truth["weights"][0, 0, head, 0]) for head in range(HEADS)]
    artists = attention_artists(figure)
    for head in range(HEADS):
        own = (float(np.nanmin(expected[head])), float(np.nanmax(expected[head])))
        for artist in (artists[head], artists[HEADS + head]):  # the patch grid and its overlay share the panel's scale
            assert limits(artist.norm) == pytest.approx(own)
        np.testing.assert_allclose(drawn_values(artists[head]), expected[head], rtol=1e-6)
    bars = colorbars(figure)
    assert len(bars) == 2 * HEADS
    assert sorted(limits(b.norm) for b in bars) == sorted(limits(a.norm) for a in artists)
    assert all(b.ax.get_ylabel() == "weights (softmax)" for b in bars)
    assert "one scale per panel" in figure._suptitle.get_text()
    assert overlapping_texts(figure) == []


def test_grid_over_layers_of_the_head_mean(vit):
    path, truth = vit
    names, panels = image_grid_data(path, over="layer", sample=0, query="patch_1_1")
    assert names == ["0", "1", "2"]
    for layer, data in enumerate(panels):
        mean = truth["weights"][0, layer].mean(axis=0)[6]  # query patch_1_1 is token 6
        np.testing.assert_allclose(data.patches, on_grid(mean), rtol=1e-6)
    figure = image_attention_grid(path, over="layer", sample=0, query="patch_1_1")
    assert "head mean of 2" in figure._suptitle.get_text()


def test_user_options_win_on_the_grid(vit):
    path, truth = vit
    figure = image_attention_grid(path, over="layer", sample=0, head=1, vmin=0.0, vmax=0.5, cmap="magma", alpha=0.3,
                                  figsize=(9.0, 5.0), title="ViT layers", ncols=2)
    assert tuple(figure.get_size_inches()) == (9.0, 5.0)
    assert figure._suptitle.get_text() == "ViT layers"
    artists = attention_artists(figure)
    assert {limits(a.norm) for a in artists} == {(0.0, 0.5)}
    assert {a.get_cmap().name for a in artists} == {"magma"}
    assert [a.get_alpha() for a in artists[LAYERS:]] == [0.3] * LAYERS
    (colorbar,) = colorbars(figure)
    assert limits(colorbar.norm) == (0.0, 0.5)
    peak = max(float(np.nanmax(on_grid(truth["weights"][0, layer, 1, 0]))) for layer in range(LAYERS))
    assert colorbar.extend == ("max" if peak > 0.5 else "neither")
    # Three layers in rows of two: the panels wrap, each with its overlay under it.
    spans = [ax.get_subplotspec().rowspan.start for ax in figure.axes if getattr(ax, "_colorbar", None) is None]
    assert spans == [0, 0, 2, 1, 1, 3]
    no_overlay = image_attention_grid(path, over="layer", sample=0, overlay=False)
    assert len(attention_artists(no_overlay)) == LAYERS and not [m for m in mappables(no_overlay) if m.get_cmap().name == "gray"]


def test_overlay_keeps_the_value_mapping_and_user_options(vit):
    path, truth = vit
    ax = image_overlay(path, sample=1, layer=0, head=1)
    expected = on_grid(truth["weights"][1, 0, 1, 0])
    image, attention = ax.images
    np.testing.assert_array_equal(drawn_values(image), truth["images"][1])
    assert image.get_cmap().name == "gray"
    np.testing.assert_allclose(drawn_values(attention), blocks(expected), rtol=1e-6)
    assert limits(attention.norm) == pytest.approx((float(np.nanmin(expected)), float(np.nanmax(expected))))
    (colorbar,) = colorbars(ax.figure)
    assert limits(colorbar.norm) == limits(attention.norm)
    assert colorbar.ax.get_ylabel() == "weights (softmax), [CLS] -> patches"
    assert overlapping_texts(ax.figure) == []

    ax = image_overlay(path, sample=1, layer=0, head=1, vmin=0.05, vmax=0.2, cmap="viridis", alpha=0.8,
                       figsize=(4.0, 3.0), title="CLS")
    attention = ax.images[1]
    assert limits(attention.norm) == (0.05, 0.2) and attention.get_cmap().name == "viridis" and attention.get_alpha() == 0.8
    assert limits(colorbars(ax.figure)[0].norm) == (0.05, 0.2)
    assert tuple(ax.figure.get_size_inches()) == (4.0, 3.0) and ax.get_title() == "CLS"


def test_signed_values_over_the_image_follow_the_colour_rule(vit):
    path, truth = vit
    ax = image_overlay(path, variable="logits", sample=0, layer=2, head=0)
    expected = on_grid(truth["logits"][0, 2, 0, 0])
    half = float(np.nanmax(np.abs(expected)))
    attention = ax.images[1]
    np.testing.assert_allclose(drawn_values(attention), blocks(expected), rtol=1e-6)
    if np.nanmin(expected) < 0 < np.nanmax(expected):
        assert limits(attention.norm) == pytest.approx((-half, half)) and attention.get_cmap().name == "RdBu_r"
    assert colorbars(ax.figure)[0].ax.get_ylabel().startswith("logits")


def test_drawing_on_a_given_axes_returns_it(vit):
    import matplotlib.pyplot as plt

    path, truth = vit
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 4), layout="constrained")
    data = patch_attention(path, sample=0, layer=0, head=0)
    assert draw_patch_attention(data, left, overlay=False) is left
    assert image_overlay(path, sample=0, layer=0, head=0, ax=right, colorbar=False) is right
    np.testing.assert_allclose(drawn_values(left.images[0]), on_grid(truth["weights"][0, 0, 0, 0]), rtol=1e-6)
    assert len(colorbars(figure)) == 1


def test_a_layer_never_captured_says_so_and_stays_out_of_the_scale(tmp_path):
    path, truth = write_vit(tmp_path / "incomplete.zarr", missing_layer=2)
    figure = image_attention_grid(path, over="layer", sample=0, head=1)
    captured = [on_grid(truth["weights"][0, layer, 1, 0]) for layer in range(2)]
    (colorbar,) = colorbars(figure)
    assert limits(colorbar.norm) == pytest.approx((float(np.nanmin(captured)), float(np.nanmax(captured))))
    panels = [ax for ax in figure.axes if getattr(ax, "_colorbar", None) is None]
    for ax in (panels[2], panels[LAYERS + 2]):
        assert [t.get_text() for t in ax.texts] == ["not captured"]
        assert not ax.images[-1].get_visible()
    assert not panels[0].texts
    assert overlapping_texts(figure) == []
