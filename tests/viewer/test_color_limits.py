"""Colour limits (issue 9, point 2): the user's limits always win; signed data get a symmetric scale
only when they have both signs, a one-sided scale otherwise; nothing raises for NaN, inf, empty or
constant data. Checked on the norm color_scale returns and on what heatmaps draw (image norm and
colorbar), against limits computed here with numpy from the arrays written into the file."""

from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np
import pytest
from matplotlib.cm import ScalarMappable

from attnformat.errors import AttnFormatError
from attnformat.testing.figures import colorbars, drawn_values
from attnformat.viewer import heatmap
from attnformat.viewer.colors import color_scale, colorbar_extend, labelled_colorbar

from conftest import dense_tree

RNG = np.random.default_rng(9)
BOTH_SIGNS = RNG.normal(size=(6, 6)) * 3.0
ALL_NEGATIVE = -np.abs(RNG.normal(size=(6, 6))) * 5.0 - 0.3  # seed 002's geometric bias: no value above -0.3
ALL_POSITIVE = np.abs(RNG.normal(size=(6, 6))) * 4.0 + 0.5


def _limits(norm):
    return float(norm.vmin), float(norm.vmax)


def _colorbar_limits(figure):
    (colorbar,) = colorbars(figure)
    low, high = colorbar.ax.get_ylim() if colorbar.orientation == "vertical" else colorbar.ax.get_xlim()
    return (float(colorbar.norm.vmin), float(colorbar.norm.vmax)), (float(low), float(high))


# --- the rule, on color_scale ---------------------------------------------------------------------

@pytest.mark.parametrize("values", [BOTH_SIGNS, ALL_NEGATIVE, ALL_POSITIVE], ids=["both-signs", "negative", "positive"])
@pytest.mark.parametrize("variable", ["logits", "bias", "weights"])
def test_both_limits_given_are_used_exactly(values, variable):
    for vmin, vmax in ((-6.0, -1.0), (-1.0, 3.0), (0.5, 2.0), (-20.0, 20.0)):
        cmap, norm = color_scale(values, variable=variable, vmin=vmin, vmax=vmax)
        assert _limits(norm) == (vmin, vmax)
        if variable != "weights" and vmin < 0.0 < vmax:
            assert isinstance(norm, mcolors.TwoSlopeNorm) and norm.vcenter == 0.0  # white stays at 0
        else:
            assert type(norm) is mcolors.Normalize
        # The norm really maps the given limits to the ends of the colormap.
        assert float(norm(vmin)) == pytest.approx(0.0) and float(norm(vmax)) == pytest.approx(1.0)


def test_signed_limits_on_one_side_of_zero_get_a_one_sided_colormap():
    assert color_scale(BOTH_SIGNS, variable="logits", vmin=-6, vmax=-1)[0].name == "Blues_r"
    assert color_scale(BOTH_SIGNS, variable="logits", vmin=1, vmax=6)[0].name == "Reds"
    assert color_scale(BOTH_SIGNS, variable="logits", vmin=-1, vmax=6)[0].name == "RdBu_r"


def test_signed_data_of_both_signs_are_symmetric_about_zero():
    half = float(np.abs(BOTH_SIGNS).max())
    cmap, norm = color_scale(BOTH_SIGNS, variable="logits")
    assert _limits(norm) == (-half, half) and float(norm(0.0)) == 0.5 and cmap.name == "RdBu_r"
    cmap, norm = color_scale(BOTH_SIGNS + 1.0, variable="weights", center=1.0)  # any centre
    assert _limits(norm) == pytest.approx((1.0 - half, 1.0 + half)) and float(norm(1.0)) == pytest.approx(0.5)


@pytest.mark.parametrize("values, name", [(ALL_NEGATIVE, "Blues_r"), (ALL_POSITIVE, "Reds")], ids=["negative", "positive"])
def test_signed_data_of_one_sign_get_a_one_sided_scale_over_their_range(values, name):
    cmap, norm = color_scale(values, variable="bias")
    assert _limits(norm) == (float(values.min()), float(values.max()))
    assert type(norm) is mcolors.Normalize and cmap.name == name
    # Forcing the old behaviour stays possible; forcing one-sided on data of both signs keeps the data's range.
    half = float(np.abs(values).max())
    assert _limits(color_scale(values, variable="bias", scale="symmetric")[1]) == (-half, half)
    norm = color_scale(BOTH_SIGNS, variable="logits", scale="one-sided")[1]
    assert _limits(norm) == (float(BOTH_SIGNS.min()), float(BOTH_SIGNS.max())) and norm.vcenter == 0.0


def test_seed002_all_negative_bias_with_blues_r():
    cmap, norm = color_scale(ALL_NEGATIVE, variable="bias", cmap="Blues_r")
    assert cmap.name == "Blues_r"
    assert _limits(norm) == (float(ALL_NEGATIVE.min()), float(ALL_NEGATIVE.max()))
    assert norm.vmax <= -0.3  # not +/-15.9: no value exceeds -0.3


def test_one_limit_given_keeps_it_and_takes_the_other_from_the_data():
    low, high = float(BOTH_SIGNS.min()), float(BOTH_SIGNS.max())
    norm = color_scale(BOTH_SIGNS, variable="logits", vmin=-2.0)[1]
    assert _limits(norm) == (-2.0, high) and norm.vcenter == 0.0
    norm = color_scale(BOTH_SIGNS, variable="logits", vmax=1.5)[1]
    assert _limits(norm) == (low, 1.5) and norm.vcenter == 0.0
    # A limit that excludes 0: no centre, and nothing symmetric.
    norm = color_scale(BOTH_SIGNS, variable="logits", vmin=0.25)[1]
    assert _limits(norm) == (0.25, high) and type(norm) is mcolors.Normalize
    norm = color_scale(ALL_NEGATIVE, variable="bias", vmax=-1.0)[1]
    assert _limits(norm) == (float(ALL_NEGATIVE.min()), -1.0) and type(norm) is mcolors.Normalize
    norm = color_scale(ALL_NEGATIVE, variable="bias", vmin=-20.0)[1]
    assert _limits(norm) == (-20.0, float(ALL_NEGATIVE.max()))
    # Weights: the same rule without a centre.
    weights = np.abs(BOTH_SIGNS) / np.abs(BOTH_SIGNS).sum()
    assert _limits(color_scale(weights, vmin=0.0)[1]) == (0.0, float(weights.max()))
    assert _limits(color_scale(weights, vmax=0.05)[1]) == (float(weights.min()), 0.05)
    # scale="symmetric" mirrors the one given limit.
    assert _limits(color_scale(BOTH_SIGNS, variable="logits", vmax=2.0, scale="symmetric")[1]) == (-2.0, 2.0)


def test_one_limit_beyond_all_the_data_still_gives_an_increasing_scale():
    norm = color_scale(ALL_NEGATIVE, variable="bias", vmin=1.0)[1]
    assert norm.vmin == 1.0 and norm.vmax > 1.0
    norm = color_scale(ALL_POSITIVE, vmax=0.1)[1]
    assert norm.vmax == 0.1 and norm.vmin < 0.1


def test_user_cmap_is_used_as_given():
    for values in (BOTH_SIGNS, ALL_NEGATIVE, ALL_POSITIVE):
        assert color_scale(values, variable="logits", cmap="Blues_r")[0].name == "Blues_r"
        assert color_scale(values, variable="weights", cmap="magma", vmin=-1, vmax=1)[0].name == "magma"
    custom = mcolors.LinearSegmentedColormap.from_list("mine", ["white", "black"])
    assert color_scale(BOTH_SIGNS, variable="bias", cmap=custom)[0].name == "mine"


@pytest.mark.parametrize("variable", ["weights", "logits"])
@pytest.mark.parametrize("case", ["all-nan", "empty", "inf-only", "constant", "zeros", "nan-and-inf"])
def test_degenerate_data_never_raise_and_give_increasing_finite_limits(variable, case):
    values = {"all-nan": np.full((3, 3), np.nan), "empty": np.zeros((0, 4)), "inf-only": np.array([np.inf, -np.inf]),
              "constant": np.full((3, 3), -2.5 if variable == "logits" else 1 / 17), "zeros": np.zeros((2, 2)),
              "nan-and-inf": np.array([np.nan, np.inf, -np.inf, -3.0, 2.0])}[case]
    for scale in ("auto", "symmetric", "one-sided"):
        cmap, norm = color_scale(values, variable=variable, scale=scale)
        assert np.isfinite([norm.vmin, norm.vmax]).all() and norm.vmin < norm.vmax
    if case == "constant":  # one value: drawn in the middle colour of a range around it
        assert float(color_scale(values, variable=variable)[1](values[0, 0])) == pytest.approx(0.5)
    if case == "nan-and-inf":
        norm = color_scale(values, variable=variable)[1]
        expected = (-3.0, 3.0) if variable == "logits" else (-3.0, 2.0)
        assert _limits(norm) == expected


def test_impossible_limits_are_refused_with_a_message():
    with pytest.raises(AttnFormatError, match="vmin < vmax"):
        color_scale(BOTH_SIGNS, vmin=2.0, vmax=1.0)
    with pytest.raises(AttnFormatError, match="not a finite number"):
        color_scale(BOTH_SIGNS, vmin=np.nan)
    with pytest.raises(AttnFormatError, match="vmin > 0"):
        color_scale(ALL_POSITIVE, log=True, vmin=0.0)
    with pytest.raises(AttnFormatError, match="scale must be one of"):
        color_scale(BOTH_SIGNS, scale="both")


def test_log_scale_keeps_user_limits():
    norm = color_scale(ALL_POSITIVE, log=True, vmin=0.1, vmax=100.0)[1]
    assert isinstance(norm, mcolors.LogNorm) and _limits(norm) == (0.1, 100.0)
    norm = color_scale(ALL_POSITIVE, log=True)[1]
    assert _limits(norm) == (float(ALL_POSITIVE.min()), float(ALL_POSITIVE.max()))


def test_colorbar_extend_and_ticks_inside_the_range():
    assert colorbar_extend(BOTH_SIGNS, mcolors.Normalize(-1.0, 1.0)) == "both"
    assert colorbar_extend(ALL_NEGATIVE, mcolors.Normalize(float(ALL_NEGATIVE.min()), 0.0)) == "neither"
    assert colorbar_extend([np.nan], mcolors.Normalize(0, 1)) == "neither"
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots()
    norm = mcolors.Normalize(-5.85, -0.31)
    colorbar = labelled_colorbar(ScalarMappable(norm=norm, cmap="Blues_r"), ax=ax, label="bias (additive)",
                                 values=ALL_NEGATIVE)
    ticks = np.asarray(colorbar.get_ticks())
    assert ticks.size >= 2 and ((ticks >= -5.85) & (ticks <= -0.31)).all()
    assert colorbar.ax.get_ylabel() == "bias (additive)" and colorbar.extend == colorbar_extend(ALL_NEGATIVE, norm)


# --- what heatmaps draw ---------------------------------------------------------------------------

def _tree(logits):
    return dense_tree(logits[None, None].astype(np.float32))


def test_heatmap_user_limits_on_logits_are_the_drawn_and_colorbar_limits():
    tree = _tree(BOTH_SIGNS)
    ax = heatmap(tree, variable="logits", vmin=-6, vmax=-1)
    np.testing.assert_array_equal(drawn_values(ax.images[0]), BOTH_SIGNS.astype(np.float32))
    assert _limits(ax.images[0].norm) == (-6.0, -1.0)
    norm_limits, axis_limits = _colorbar_limits(ax.figure)
    assert norm_limits == (-6.0, -1.0) and axis_limits == pytest.approx((-6.0, -1.0))
    ax = heatmap(tree, variable="logits", vmin=-1.0, vmax=3.0)
    assert isinstance(ax.images[0].norm, mcolors.TwoSlopeNorm) and _limits(ax.images[0].norm) == (-1.0, 3.0)
    assert _colorbar_limits(ax.figure)[1] == pytest.approx((-1.0, 3.0))


def test_heatmap_all_negative_bias_is_one_sided_with_or_without_blues_r():
    data = ALL_NEGATIVE.astype(np.float32)
    expected = (float(data.min()), float(data.max()))
    for cmap in ("Blues_r", None):
        ax = heatmap(_tree(data), variable="logits", cmap=cmap)
        assert _limits(ax.images[0].norm) == expected
        assert ax.images[0].get_cmap().name == "Blues_r"
        norm_limits, axis_limits = _colorbar_limits(ax.figure)
        assert norm_limits == expected and axis_limits == pytest.approx(expected)
        assert max(axis_limits) <= -0.3  # the colorbar does not reach past the data


def test_heatmap_one_given_limit_and_both_signs():
    data = BOTH_SIGNS.astype(np.float32)
    ax = heatmap(_tree(data), variable="logits", vmax=2.0)
    assert _limits(ax.images[0].norm) == (float(data.min()), 2.0)
    assert _colorbar_limits(ax.figure)[0] == (float(data.min()), 2.0)
    half = float(np.abs(data).max())
    ax = heatmap(_tree(data), variable="logits")
    assert _limits(ax.images[0].norm) == (-half, half)


@pytest.mark.parametrize("case", ["all-nan", "constant", "inf"])
def test_heatmap_of_degenerate_logits_draws(case):
    data = {"all-nan": np.full((4, 4), np.nan), "constant": np.full((4, 4), -1.25),
            "inf": np.where(np.eye(4, dtype=bool), -np.inf, -2.0)}[case]
    ax = heatmap(_tree(data), variable="logits")
    ax.figure.canvas.draw()
    norm = ax.images[0].norm
    assert np.isfinite([norm.vmin, norm.vmax]).all() and norm.vmin < norm.vmax
    if case == "inf":  # -inf (masked) is drawn as missing and left out of the limits
        assert np.isnan(drawn_values(ax.images[0])[np.eye(4, dtype=bool)]).all()
        assert float(norm(-2.0)) == pytest.approx(0.5)
