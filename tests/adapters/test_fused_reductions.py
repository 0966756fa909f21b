"""The compiled softmax/top-k/statistics kernel (attnformat.adapters.fused) against numpy's reference.

The reference is independent of the kernel: a stable sort of the logits (ties: lower key first)
for the top keys, a float64 softmax for the weights, and attnformat.reductions (float64 over
those weights) for the kept weights, the omitted mass and the statistics. Rows are as a capture gives them: masked cells at float32's
minimum, causal rows, rows with fewer visible keys than k, rows that see no key, widths that are
and are not multiples of the kernel's group size, many ties.
"""

from __future__ import annotations

import numpy as np
import pytest

from attnformat import reductions
from attnformat.adapters import fused

MIN = np.finfo(np.float32).min


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(-1, keepdims=True)


def _rows(rows: int, width: int, seed: int, *, ties: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows, width)) * 3
    if ties:
        logits = np.round(logits)  # a handful of distinct values: ties everywhere
    logits = logits.astype(np.float32)
    # Causal rows of a block whose last key is the last row's own position; a few scattered masked keys.
    visible = np.arange(width)[None, :] <= (width - rows + np.arange(rows))[:, None]
    visible &= rng.random((rows, width)) > 0.05
    visible[:, 0] |= True
    logits[~visible] = MIN
    return logits


def _reference_top(logits: np.ndarray, k: int):
    order = np.argsort(-logits.astype(np.float64), axis=-1, kind="stable")[:, :k]
    chosen = np.take_along_axis(logits, order, axis=-1)
    return np.where(chosen > MIN / 2, order, -1)


@pytest.mark.parametrize("width", [1, 5, 31, 32, 33, 100, 1024, 1057, 4096])
@pytest.mark.parametrize("k", [1, 8, 32])
@pytest.mark.parametrize("ties", [False, True])
def test_top_keys_weights_and_statistics_equal_the_reference(width, k, ties):
    rows = min(width, 24)
    logits = _rows(rows, width, seed=width * 7 + k, ties=ties)
    weights = _softmax(logits)
    visible = logits > MIN / 2
    positions = np.arange(width - rows, width)
    window = 3
    written = np.empty_like(logits)
    out = fused.reduce_block(logits, k, weights=written, first_key=5,
                             sink_column=np.argmax(visible, -1), local_low=positions - window, local_high=positions + window + 1)
    np.testing.assert_allclose(written, weights, rtol=1e-5, atol=1e-8)
    unnormalised = np.empty_like(logits)
    scale = fused.reduce_block(logits, k, weights=unnormalised, normalize=False)["scale"]
    np.testing.assert_allclose(unnormalised, np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True)), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(unnormalised * scale[:, None], weights, rtol=1e-5, atol=1e-8)

    index = _reference_top(logits, k)
    width_k = min(k, width)
    np.testing.assert_array_equal(out["key_index"][:, :width_k], np.where(index >= 0, index + 5, -1))
    assert (out["key_index"][:, width_k:] == -1).all()
    kept, _, omitted = reductions.top_k(weights, k, key_mask=visible)
    np.testing.assert_allclose(out["topk_weights"], kept, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["omitted_weight"], omitted, rtol=1e-4, atol=1e-6)

    statistics = reductions.row_statistics(weights, local_window=window, query_positions=positions, key_mask=visible)
    for name in ("entropy", "max_weight", "sink_weight", "local_weight"):
        np.testing.assert_allclose(out[name], statistics[name], rtol=1e-4, atol=2e-5, err_msg=name)
    np.testing.assert_array_equal(out["top_key"], index[:, 0] + 5)


def test_rows_that_see_no_key_are_spread_over_every_key():
    logits = np.full((2, 40), MIN, np.float32)
    weights = np.empty_like(logits)
    out = fused.reduce_block(logits, 4, weights=weights)
    assert out["key_index"].tolist() == [[0, 1, 2, 3]] * 2
    np.testing.assert_allclose(weights, 1 / 40, rtol=1e-6)
    np.testing.assert_allclose(out["topk_weights"], 1 / 40)
    np.testing.assert_allclose(out["omitted_weight"], 1 - 4 / 40, rtol=1e-6)
    np.testing.assert_allclose(out["entropy"], np.log(40), rtol=1e-6)


def test_minus_infinity_and_nan_logits_are_never_top_keys_and_do_not_poison_the_entropy():
    logits = np.array([[0.0, -np.inf, 1.0, -np.inf], [np.nan, 2.0, 1.0, 0.0]], np.float32)
    weights = np.array([_softmax(logits[:1, [0, 2]])[0].tolist()[:1] + [0.0] + _softmax(logits[:1, [0, 2]])[0].tolist()[1:] + [0.0],
                        [0.0, *_softmax(logits[1:, 1:])[0]]], np.float32)
    written = np.empty_like(logits)
    out = fused.reduce_block(logits, 3, weights=written)
    np.testing.assert_allclose(written[0], weights[0], rtol=1e-6)  # -inf keys weigh exactly 0
    assert (written[0, [1, 3]] == 0).all()
    assert out["key_index"][0].tolist() == [2, 0, -1]
    assert out["key_index"][1].tolist() == [1, 2, 3]
    assert np.isfinite(out["entropy"][0])
    np.testing.assert_allclose(out["entropy"][0], reductions.row_statistics(weights[:1])["entropy"][0], rtol=1e-5)


def test_rows_split_between_threads_give_the_same_result():
    logits = _rows(200, 700, seed=3)
    weights = [np.empty_like(logits), np.empty_like(logits)]
    one = fused.reduce_block(logits, 16, weights=weights[0], threads=1)
    two = fused.reduce_block(logits, 16, weights=weights[1], threads=2)
    for name in one:
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)
    np.testing.assert_array_equal(weights[0], weights[1])


def test_the_exponential_is_within_one_ulp_and_a_half_of_the_exact_value():
    """The kernel's own float32 exp (a polynomial, so that it vectorises) against float64's, on
    every float32 spacing of a dense grid: row maximum 0, so the unnormalised weights are exp(z)."""
    z = np.concatenate([[0.0], -np.logspace(-8, np.log10(87.3), 400_000), np.linspace(-87.3, 0, 300_001)]).astype(np.float32)
    logits = z[None, :]
    weights = np.empty_like(logits)
    fused.reduce_block(logits, 1, weights=weights, normalize=False, entropy=False)
    exact = np.exp(z.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert weights[0, 0] == 1.0
    assert np.abs(weights[0] - exact).max() <= 1e-6
    assert (np.abs(weights[0] - exact) / ulp).max() <= 1.5  # 0.98 measured; the kernel's comment says why not 4
    below = np.array([[0.0, -87.34, -88.0, -100.0, -1e30, MIN, -np.inf]], np.float32)
    out = np.empty_like(below)
    fused.reduce_block(below, 1, weights=out, normalize=False)
    assert out[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_a_row_without_a_finite_logit_gives_nan_weights_as_torch():
    logits = np.array([[np.nan, np.nan], [-np.inf, -np.inf]], np.float32)
    weights = np.zeros_like(logits)
    out = fused.reduce_block(logits, 2, weights=weights)
    assert np.isnan(weights).all() and np.isnan(out["max_weight"]).all()
    assert (out["key_index"] == -1).all()


def test_the_torch_path_is_used_when_the_kernel_is_turned_off(monkeypatch):
    monkeypatch.setenv("ATTNFORMAT_FUSED", "0")
    assert not fused.available()
    monkeypatch.setenv("ATTNFORMAT_FUSED", "1")
    assert fused.available()


def test_a_forked_child_reduces_with_its_own_threads():
    """The parent's thread pool does not survive a fork: the child must not wait on dead threads."""
    import multiprocessing

    logits = _rows(64, 300, seed=5)
    expected = fused.reduce_block(logits, 8, threads=2)["key_index"]
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        got = pool.apply_async(_reduce_in_child, (logits,)).get(timeout=120)
    np.testing.assert_array_equal(got, expected)


def _reduce_in_child(logits):
    return fused.reduce_block(logits, 8, threads=2)["key_index"]


def test_a_cache_written_under_another_module_name_does_not_fail_the_kernel(tmp_path):
    """numba rebuilds a cached kernel by importing the module name it was compiled under; a cache
    written by ``pytest --doctest-modules adapters/fused.py`` (module ``adapters.fused``) made every
    later capture fail with ModuleNotFoundError. The kernel now compiles afresh instead."""
    import subprocess
    import sys
    from pathlib import Path

    source = Path(fused.__file__)
    environment = {**__import__("os").environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    alias = (
        "import importlib.util, sys, numpy as np\n"
        f"spec = importlib.util.spec_from_file_location('another_name_for_fused', {str(source)!r})\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['another_name_for_fused'] = module\n"
        "spec.loader.exec_module(module)\n"
        "print(module.reduce_block(np.zeros((2, 40), np.float32), 4)['key_index'].tolist())\n"
    )
    usual = (
        "import numpy as np\nfrom attnformat.adapters import fused\n"
        "print(fused.reduce_block(np.array([[0, 3, 1, 2]], np.float32), 2)['key_index'].tolist())\n"
    )
    first = subprocess.run([sys.executable, "-c", alias], env=environment, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert any((tmp_path / "cache").rglob("*.nbi")), "the first process wrote no cache: the test would prove nothing"
    second = subprocess.run([sys.executable, "-c", usual], env=environment, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "[[1, 3]]"


@pytest.mark.parametrize("scale", [1e-3, 100.0, 1e4])
def test_peaked_flat_and_windowed_rows_keep_the_reference_top_keys(scale):
    """The top-k bound bisects between group maxima: rows whose logits span a tiny or a huge range,
    and rows whose first keys are masked (a sliding window), must still give the exact top keys."""
    rng = np.random.default_rng(int(scale * 10) % 1000)
    logits = (rng.standard_normal((64, 3000)) * scale).astype(np.float32)
    logits[:32, :1500] = MIN  # a window: the first half masked
    logits[40:, ::7] = logits[40:, :1]  # repeated values: ties across groups
    weights = np.empty_like(logits)
    out = fused.reduce_block(logits, 32, weights=weights)
    np.testing.assert_array_equal(out["key_index"], _reference_top(logits, 32))
    np.testing.assert_allclose(weights, _softmax(logits), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(out["max_weight"], _softmax(logits).max(-1), rtol=1e-5)
