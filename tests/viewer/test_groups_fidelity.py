"""Seed 004's group bars, sink scores and frame statistics, group maps and rollout, checked against numpy.

Every file here is written with :class:`attnformat.Writer` from arrays kept by the test; the
expected numbers are the seed's own formulas applied with numpy to those arrays (never the
viewer's output), and the figures are checked for what they draw, their limits, titles and labels.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

import attnformat
from attnformat.errors import SelectionError
from attnformat.examples import softmax
from attnformat.testing.figures import colorbars, drawn_values, overlapping_labels
from attnformat.viewer.colors import BAR_COLOR
from attnformat.viewer.groups import (
    format_frame_statistics,
    frame_statistics,
    group_bars,
    group_map,
    query_block_profiles,
    sink_score,
    tick_plan,
)
from attnformat.viewer.rollout import attention_rollout, rollout_map, rollout_matrices

HEADS, FRAMES, PER_FRAME = 6, 19, 2
#: Block-causal video model: frame 0 alone, then blocks of three frames (1-3, ..., 16-18).
BLOCKS = [[0]] + [list(range(start, start + 3)) for start in range(1, FRAMES, 3)]
MODALITIES = ["text"] * 4 + ["robot0_eef_pos_past_traj"] * 3 + ["robot0_eef_pos_past_traj_delta"] * 3


def _block_of(frame: int) -> int:
    return next(i for i, block in enumerate(BLOCKS) if frame in block)


def _block_causal(frames_of_queries, frames_of_keys) -> np.ndarray:
    """True where a query may see a key: the key's block is not after the query's."""
    query_blocks = np.array([_block_of(f) for f in frames_of_queries])
    key_blocks = np.array([_block_of(f) for f in frames_of_keys])
    return key_blocks[None, :] <= query_blocks[:, None]


def _write(path, sizes, arrays, coords, attrs, layers):
    with attnformat.Writer(path, model_name="test-video") as writer:
        site = writer.create_site("blocks", sizes=sizes, variables=tuple(arrays), coords=coords, attrs=attrs)
        for position, layer in enumerate(layers):
            for name, values in arrays.items():
                site.write(name, values[position], layer=layer)
    return path


@pytest.fixture(scope="module")
def token_video(tmp_path_factory):
    """Token-level logits and weights of two layers (labelled 2 and 3), 2 tokens per frame, block causal."""
    rng = np.random.default_rng(40)
    frames = np.repeat(np.arange(FRAMES), PER_FRAME)
    tokens = frames.size
    logits = rng.normal(size=(2, HEADS, tokens, tokens))
    logits[..., frames == 0] += rng.uniform(-1, 6, size=(2, HEADS, 1, 1))  # sinks on frame 0
    logits = np.where(_block_causal(frames, frames), logits, -np.inf)
    weights = softmax(logits)
    labels = [f"f{f}t{i % PER_FRAME}" for i, f in enumerate(frames)]
    path = _write(
        tmp_path_factory.mktemp("token") / "video.zarr",
        {"layer": 2, "head": HEADS, "query": tokens, "key": tokens},
        {"logits": logits.astype(np.float32), "weights": weights.astype(np.float32)},
        {"layer": [2, 3], "head": np.arange(HEADS), "query_group": ("query", frames), "key_group": ("key", frames),
         "query_label": ("query", labels), "key_label": ("key", labels)},
        {"attention_type": "self", "causal": 1, "group_kind": "frame"}, [2, 3])
    return path, {"logits": logits.astype(np.float32).astype(np.float64),
                  "weights": weights.astype(np.float32).astype(np.float64), "frames": frames}


def _frame_file(path, *, with_groups: bool):
    rng = np.random.default_rng(41)
    frames = np.arange(FRAMES)
    logits = rng.normal(size=(1, 12, FRAMES, FRAMES))
    logits[..., 0] += rng.uniform(-1, 7, size=(1, 12, 1))
    logits = np.where(_block_causal(frames, frames), logits, -np.inf)
    coords = {"layer": [3], "head": np.arange(12),
              "query_label": ("query", [f"frame {i}" for i in frames]), "key_label": ("key", [f"frame {i}" for i in frames])}
    if with_groups:
        coords |= {"query_group": ("query", frames), "key_group": ("key", frames)}
    attrs = {"attention_type": "self", "causal": 1, **({"group_kind": "frame"} if with_groups else {})}
    _write(path, {"layer": 1, "head": 12, "query": FRAMES, "key": FRAMES}, {"logits": logits.astype(np.float32)},
           coords, attrs, [3])
    return path, logits[0].astype(np.float32).astype(np.float64)


@pytest.fixture(scope="module")
def frame_video(tmp_path_factory):
    """Seed 004's own arrays: frame x frame logits of layer 3, 12 heads, 19 frames, block causal."""
    return _frame_file(tmp_path_factory.mktemp("frames") / "frames.zarr", with_groups=True)


@pytest.fixture(scope="module")
def modality_file(tmp_path_factory):
    rng = np.random.default_rng(42)
    tokens = len(MODALITIES)
    weights = softmax(rng.normal(scale=2, size=(1, 8, tokens, tokens)))
    labels = [f"{group}_{i}" for i, group in enumerate(MODALITIES)]
    path = _write(tmp_path_factory.mktemp("modalities") / "seq2seq.zarr",
                  {"layer": 1, "head": 8, "query": tokens, "key": tokens}, {"weights": weights.astype(np.float32)},
                  {"layer": [0], "head": np.arange(8), "query_group": ("query", MODALITIES), "key_group": ("key", MODALITIES),
                   "query_label": ("query", labels), "key_label": ("key", labels)},
                  {"attention_type": "self", "causal": 0, "group_kind": "modality"}, [0])
    return path, weights[0].astype(np.float32).astype(np.float64)


def _heights(ax) -> np.ndarray:
    return np.array([patch.get_height() for patch in ax.patches])


def _seed_block_means(values: np.ndarray, frames: np.ndarray, query_frames, how: str = "mean") -> np.ndarray:
    """(head, key frame): per query token of the block, the mean (or sum) over each key frame's
    tokens of the finite values; then the mean over the block's query tokens."""
    rows = values[:, np.isin(frames, query_frames)]
    finite = np.where(np.isfinite(rows), rows, np.nan)
    per_frame = []
    for frame in range(FRAMES):
        columns = finite[..., frames == frame]
        per_frame.append(np.nansum(columns, axis=-1) if how == "sum" else np.nanmean(columns, axis=-1))
    return np.nanmean(np.stack(per_frame, axis=-1), axis=1)


# --- the query block -----------------------------------------------------------------------------------

def test_default_block_is_the_last_block_of_a_block_causal_mask(token_video):
    path, truth = token_video
    figure = group_bars(path, variable="logits", layer=3)
    expected = _seed_block_means(truth["logits"][1], truth["frames"], [16, 17, 18])
    assert figure._suptitle.get_text().splitlines()[-1] == "Query: frames [16, 17, 18]"
    assert len(figure.axes) == HEADS
    for head, ax in enumerate(figure.axes):
        np.testing.assert_allclose(_heights(ax), expected[head], rtol=1e-5)
        profile = expected[head]
        assert ax.get_title() == f"H{head} (sink={profile[0] - profile[1:-1].mean():.2f})"
        assert ax.patches[0].get_facecolor()[:3] == pytest.approx(tuple(int(BAR_COLOR[i:i + 2], 16) / 255 for i in (1, 3, 5)))


def test_every_way_to_name_the_block_gives_the_same_bars(token_video):
    path, truth = token_video
    tree = attnformat.open(path)
    reference = query_block_profiles(tree, variable="logits", layer=3, last=3)[1]
    np.testing.assert_allclose(reference, _seed_block_means(truth["logits"][1], truth["frames"], [16, 17, 18]), rtol=1e-5)
    for block in ({"query_groups": [16, 17, 18]}, {"query_groups": ["16", "17", "18"]},
                  {"query_groups": slice(-3, None)}, {"queries": [f"f{f}t{i}" for f in (16, 17, 18) for i in range(PER_FRAME)]}):
        chosen, profiles = query_block_profiles(tree, variable="logits", layer=3, **block)
        np.testing.assert_array_equal(profiles, reference)
    chosen, one = query_block_profiles(tree, variable="logits", layer=3, last=1)
    assert chosen.described["query"] == "frames [18]"
    np.testing.assert_allclose(one, _seed_block_means(truth["logits"][1], truth["frames"], [18]), rtol=1e-5)


def test_bad_blocks_are_refused_naming_what_exists(token_video):
    path, _ = token_video
    tree = attnformat.open(path)
    with pytest.raises(TypeError, match="at most one of query_groups, last and queries"):
        query_block_profiles(tree, variable="logits", layer=3, last=3, query_groups=[18])
    with pytest.raises(SelectionError, match="has 19 query frames"):
        query_block_profiles(tree, variable="logits", layer=3, last=0)
    with pytest.raises(SelectionError, match="query group 25 not in .*query groups: 0, 1, 2"):
        group_bars(tree, variable="logits", layer=3, query_groups=[25])


def test_weights_bars_are_the_mass_a_key_frame_receives(token_video):
    path, truth = token_video
    # Frame 5 is in block 4-6: frames 7-18 are masked, so they receive nothing.
    figure = group_bars(path, layer=2, query_groups=[5])
    expected = _seed_block_means(truth["weights"][0], truth["frames"], [5], how="sum")
    assert np.all(expected[:, 7:] == 0) and np.allclose(expected.sum(axis=1), 1.0, atol=1e-5)
    for head, ax in enumerate(figure.axes):
        np.testing.assert_allclose(_heights(ax), expected[head], rtol=1e-5, atol=1e-7)
        assert ax.get_ylabel() == "weights (softmax)"
    assert figure._suptitle.get_text().splitlines()[-1] == "Query: frames [5]"


def test_frame_level_logits_bars_like_seed_004(frame_video):
    path, logits = frame_video
    figure = group_bars(path, variable="logits", layer=3)  # default: the causal mask's last block
    expected = logits[:, 16:19].mean(axis=1)  # seed 004's last_block_frame_attention: all visible
    assert figure._suptitle.get_text().splitlines()[-1] == "Query: frames [16, 17, 18]"
    for head, ax in enumerate(figure.axes):
        np.testing.assert_allclose(_heights(ax), expected[head], rtol=1e-5)
        first, middle = expected[head][0], expected[head][1:-1].mean()
        assert ax.get_title() == f"H{head} (sink={first - middle:.2f})"
        assert ax.get_ylabel() == "logits (pre-softmax)"
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(FRAMES)]
        low, high = ax.get_ylim()
        assert low <= min(expected[head].min(), 0) and high >= expected[head].max()
        assert ax.yaxis.get_visible() and any(t.get_text() for t in ax.get_yticklabels())
    assert overlapping_labels(figure) == []


def test_frame_level_file_without_group_coordinates(tmp_path):
    path, logits = _frame_file(tmp_path / "plain.zarr", with_groups=False)
    figure = group_bars(path, variable="logits", last=3)
    assert figure._suptitle.get_text().splitlines()[-1] == "Query: tokens [frame 16, frame 17, frame 18]"
    for head, ax in enumerate(figure.axes):
        np.testing.assert_allclose(_heights(ax), logits[head, 16:19].mean(axis=0), rtol=1e-5)
    stats = frame_statistics(path, last=3)
    assert float(stats["diagonal_mean"]) == pytest.approx(np.diagonal(logits, axis1=1, axis2=2).mean(), rel=1e-6)
    assert overlapping_labels(figure) == []


# --- seed 004's statistics ----------------------------------------------------------------------------

def test_frame_statistics_match_the_seed_formulas(frame_video):
    path, full_frame_attn = frame_video
    stats = frame_statistics(path, layer=3, query_groups=[16, 17, 18])
    last_block_attn = full_frame_attn[:, 16:19].mean(axis=1)
    assert float(stats["diagonal_mean"]) == pytest.approx(np.diagonal(full_frame_attn, axis1=1, axis2=2).mean(), rel=1e-6)
    assert float(stats["first_column_mean"]) == pytest.approx(full_frame_attn[:, :, 0].mean(), rel=1e-6)
    lines = []
    for h in range(12):
        head = last_block_attn[h]
        first, middle, last = head[0], head[1:-1].mean(), head[-1]
        sink = first - middle
        assert float(stats["first"].sel(head=h)) == pytest.approx(first, rel=1e-5)
        assert float(stats["middle"].sel(head=h)) == pytest.approx(middle, rel=1e-5, abs=1e-6)
        assert float(stats["last"].sel(head=h)) == pytest.approx(last, rel=1e-5)
        assert float(stats["sink"].sel(head=h)) == pytest.approx(sink, rel=1e-5)
        assert sink_score(head) == pytest.approx(sink, rel=1e-12)
        lines.append(f"H{h:2d}: first={first:.3f}, mid={middle:.3f}, last={last:.3f}, sink={sink:+.3f}")
    text = format_frame_statistics(stats)
    assert text.splitlines()[-12:] == lines
    assert "Query: frames [16, 17, 18]" in text
    assert f"diagonal mean: {np.diagonal(full_frame_attn, axis1=1, axis2=2).mean():.3f}" in text


def test_frame_statistics_of_weights_only_files_use_the_weights(modality_file):
    path, weights = modality_file
    groups = np.array(MODALITIES)
    names = ["text", "robot0_eef_pos_past_traj", "robot0_eef_pos_past_traj_delta"]
    # Weights normalised over keys: a group pair is the mass the key group receives, mean over queries.
    frame_map = np.array([[[weights[h][np.ix_(groups == q, groups == k)].sum(axis=1).mean() for k in names] for q in names]
                          for h in range(8)])
    stats = frame_statistics(path, last=1)
    assert stats.attrs["variable"] == "weights" and stats.attrs["aggregate"] == "sum"
    assert float(stats["diagonal_mean"]) == pytest.approx(np.diagonal(frame_map, axis1=1, axis2=2).mean(), rel=1e-6)
    assert float(stats["first_column_mean"]) == pytest.approx(frame_map[:, :, 0].mean(), rel=1e-6)
    np.testing.assert_allclose(stats["last"].values, frame_map[:, -1, -1], rtol=1e-5)
    assert [str(v) for v in stats["key_group"].values] == names


def test_frame_statistics_of_token_level_logits(token_video):
    path, truth = token_video
    logits, frames = truth["logits"][1], truth["frames"]
    finite = np.where(np.isfinite(logits), logits, np.nan)
    frame_map = np.array([[[np.nanmean(finite[h][np.ix_(frames == q, frames == k)]) if np.isfinite(finite[h][np.ix_(frames == q, frames == k)]).any() else np.nan
                            for k in range(FRAMES)] for q in range(FRAMES)] for h in range(HEADS)])
    stats = frame_statistics(path, layer=3)
    assert float(stats["diagonal_mean"]) == pytest.approx(np.diagonal(frame_map, axis1=1, axis2=2).mean(), rel=1e-6)
    assert float(stats["first_column_mean"]) == pytest.approx(frame_map[:, :, 0].mean(), rel=1e-6)
    profile = _seed_block_means(logits, frames, [16, 17, 18])
    np.testing.assert_allclose(stats["sink"].values, profile[:, 0] - profile[:, 1:-1].mean(axis=1), rtol=1e-5)
    assert stats.attrs["query_block"] == "frames [16, 17, 18]" and stats.attrs["selection"] == "layer 3"
    assert stats.attrs["query_rule"] == "last block of the causal mask"


# --- figure rules ---------------------------------------------------------------------------------------

def test_bars_take_figsize_title_ncols_limits_and_colour(frame_video):
    path, logits = frame_video
    figure = group_bars(path, variable="logits", last=3, figsize=(11, 7), title="Layer 3: Per-Head Attention Distribution",
                        ncols=3, vmin=-6, vmax=9, color="tab:red")
    assert tuple(figure.get_size_inches()) == (11, 7)
    assert figure._suptitle.get_text() == "Layer 3: Per-Head Attention Distribution"
    assert figure._supxlabel.get_text() == "Query: frames [16, 17, 18]"
    rows = {round(ax.get_position().y0, 3) for ax in figure.axes}
    columns = {round(ax.get_position().x0, 3) for ax in figure.axes}
    assert (len(rows), len(columns)) == (4, 3)
    for ax in figure.axes:
        assert ax.get_ylim() == (-6, 9)
        assert ax.patches[0].get_facecolor()[:3] == pytest.approx((0xD6 / 255, 0x27 / 255, 0x28 / 255))
    assert overlapping_labels(figure) == []
    shared = group_bars(path, variable="logits", last=3, sharey=True)
    assert len({ax.get_ylim() for ax in shared.axes}) == 1
    assert shared.axes[0].get_ylim()[1] >= np.nanmax(logits[:, 16:19].mean(axis=1))


def test_a_small_figsize_thins_the_frame_labels_and_says_so(frame_video):
    path, logits = frame_video
    figure = group_bars(path, variable="logits", last=3, figsize=(8, 6))
    assert tuple(figure.get_size_inches()) == (8, 6)
    ax = figure.axes[0]
    shown = [t.get_text() for t in ax.get_xticklabels()]
    step = int(shown[1]) - int(shown[0])
    assert step > 1 and shown == [str(i) for i in range(0, FRAMES, step)]
    assert "label)" in ax.get_xlabel() and "every" in ax.get_xlabel()
    np.testing.assert_allclose(_heights(ax), logits[0, 16:19].mean(axis=0), rtol=1e-5)  # every bar is still drawn
    assert overlapping_labels(figure) == []


def test_bars_over_long_modality_names_do_not_overlap(modality_file):
    path, weights = modality_file
    groups = np.array(MODALITIES)
    figure = group_bars(path, last=1)
    names = ["text", "robot0_eef_pos_past_traj", "robot0_eef_pos_past_traj_delta"]
    rows = weights[:, groups == names[-1]]
    expected = np.stack([rows[..., groups == name].sum(axis=-1) for name in names], axis=-1).mean(axis=1)
    for head, ax in enumerate(figure.axes):
        np.testing.assert_allclose(_heights(ax), expected[head], rtol=1e-5)
        assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert figure._suptitle.get_text().splitlines()[-1] == "Query: modalities [robot0_eef_pos_past_traj_delta]"
    assert overlapping_labels(figure) == []


def test_tick_plan_thins_only_when_rotated_labels_do_not_fit():
    assert tick_plan([str(i) for i in range(19)], 3.2) == (0, 1)
    rotation, step = tick_plan(["robot0_eef_pos_past_traj_delta"] * 19, 3.2)
    assert (rotation, step) == (90, 1)
    assert tick_plan([f"t{i}" for i in range(200)], 3.2)[1] > 1


def test_group_map_values_limits_and_labels(token_video, modality_file):
    path, truth = token_video
    logits, frames = truth["logits"][1, 0], truth["frames"]
    ax = group_map(path, variable="logits", layer=3, head=0, vmin=-6, vmax=-1, cmap="Blues_r", origin="lower")
    finite = np.where(np.isfinite(logits), logits, np.nan)
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        expected = np.array([[np.nanmean(finite[np.ix_(frames == q, frames == k)]) for k in range(FRAMES)] for q in range(FRAMES)])
    np.testing.assert_allclose(drawn_values(ax.images[0]), expected, rtol=1e-5)
    assert (ax.images[0].norm.vmin, ax.images[0].norm.vmax) == (-6, -1)
    assert ax.images[0].cmap.name.startswith("Blues_r")
    (colorbar,) = colorbars(ax.figure)
    assert "logits" in colorbar.ax.get_ylabel() and "mean per frame" in colorbar.ax.get_ylabel()
    assert overlapping_labels(ax.figure) == []
    titled = group_map(path, variable="logits", layer=3, figsize=(5, 4), title="frames")
    assert titled.get_title() == "frames" and tuple(titled.figure.get_size_inches()) == (5, 4)
    _, given = plt.subplots()
    assert group_map(path, variable="logits", layer=3, ax=given) is given
    modality = group_map(modality_file[0], layer=0)
    assert [t.get_text() for t in modality.get_xticklabels()] == ["text", "robot0_eef_pos_past_traj", "robot0_eef_pos_past_traj_delta"]
    assert overlapping_labels(modality.figure) == []


# --- rollout --------------------------------------------------------------------------------------------

def _abnar_zuidema(layer_weights: np.ndarray, residual: bool = True) -> np.ndarray:
    """Abnar & Zuidema (2020): A_hat = 0.5 A + 0.5 I, rows renormalised, R = A_hat_L ... A_hat_1."""
    joint = None
    for attention in layer_weights:
        augmented = 0.5 * attention + 0.5 * np.eye(attention.shape[-1]) if residual else attention
        augmented = augmented / augmented.sum(axis=-1, keepdims=True)
        joint = augmented if joint is None else augmented @ joint
    return joint


def test_rollout_matrices_match_abnar_and_zuidema():
    rng = np.random.default_rng(7)
    layers = softmax(rng.normal(scale=2, size=(4, 9, 9)))
    np.testing.assert_allclose(rollout_matrices(layers), _abnar_zuidema(layers), rtol=1e-12)
    np.testing.assert_allclose(rollout_matrices(layers, residual=False), _abnar_zuidema(layers, residual=False), rtol=1e-12)
    # Order matters: the first layer is applied first (rightmost factor).
    assert not np.allclose(rollout_matrices(layers[::-1]), _abnar_zuidema(layers))
    np.testing.assert_allclose(rollout_matrices(layers).sum(axis=1), 1.0)


def test_rollout_map_of_a_file_and_its_figure_rules(modality_file, tmp_path):
    rng = np.random.default_rng(8)
    tokens = len(MODALITIES) * 3
    weights = softmax(rng.normal(scale=2, size=(3, 4, tokens, tokens)))
    labels = [f"{group}_{i}" for i, group in enumerate(MODALITIES * 3)]
    path = _write(tmp_path / "enc.zarr", {"layer": 3, "head": 4, "query": tokens, "key": tokens},
                  {"weights": weights.astype(np.float32)},
                  {"layer": [0, 1, 2], "head": np.arange(4), "query_label": ("query", labels), "key_label": ("key", labels)},
                  {"attention_type": "self", "causal": 0}, [0, 1, 2])
    expected = _abnar_zuidema(weights.astype(np.float32).astype(np.float64).mean(axis=1))
    np.testing.assert_allclose(attention_rollout(path).values, expected, rtol=1e-6)
    ax = rollout_map(path)
    np.testing.assert_allclose(drawn_values(ax.images[0]), expected, rtol=1e-6)
    (colorbar,) = colorbars(ax.figure)
    assert "rolled-out attention" in colorbar.ax.get_ylabel()
    assert overlapping_labels(ax.figure) == []
    custom = rollout_map(path, vmin=0.0, vmax=0.5, cmap="magma", figsize=(9, 8), title="rollout of the encoder")
    assert (custom.images[0].norm.vmin, custom.images[0].norm.vmax) == (0.0, 0.5)
    assert custom.images[0].cmap.name.startswith("magma")
    assert custom.get_title() == "rollout of the encoder" and tuple(custom.figure.get_size_inches()) == (9, 8)
    _, given = plt.subplots()
    assert rollout_map(path, ax=given, colorbar=False) is given and not colorbars(given.figure)


def test_public_figure_functions_document_every_parameter():
    import inspect

    for function in (group_bars, group_map, query_block_profiles, frame_statistics, rollout_map, attention_rollout):
        doc = function.__doc__
        assert "Parameters\n    ----------" in doc and "$" not in doc.split("Examples")[0]
        documented_text = doc.split("Returns")[0]
        for name in inspect.signature(function).parameters:
            assert name in documented_text, f"{function.__name__} does not document {name}"
