"""The report drawn by several processes: the same files as one process draws, statistics equal to
numpy's, a failing or crashing plot noted while the others draw, and the one-rendering PNG writer."""

from __future__ import annotations

import json
import multiprocessing
import os
import re

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

import attnformat
from attnformat.engines import Location
from attnformat.errors import AttnFormatError
from attnformat.viewer.report import (
    _draw_and_save,
    _Drawing,
    _pool,
    findings,
    plan_report,
    report,
    save_png,
)
from attnformat.viewer.selection import open_source

LABELS = ["[CLS]", "the", "cat", "sat", "[SEP]"]


class _NoBar:
    def __init__(self):
        self.count = 0

    def update(self, n=1):
        self.count += n


def _logits() -> np.ndarray:
    rng = np.random.default_rng(9)
    logits = rng.normal(scale=2.0, size=(2, 2, 5, 5))
    logits[..., 0] += 1.5  # a sink on the first key
    return logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small conforming file and the weights written into it."""
    # Imported here, not at the top: helper processes import this module for its draw functions,
    # and there "conftest" may name another folder's conftest.
    from conftest import dense_tree

    tree = dense_tree(_logits(), labels=LABELS)
    weights = tree["encoder/self"]["weights"].values.astype(np.float64)
    path = attnformat.save(tree, tmp_path_factory.mktemp("tiny") / "tiny.zarr")
    return path, weights


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA"))


def _same_outputs(one, two) -> None:
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    pngs = [name for name in names if name.endswith(".png")]
    assert len(pngs) >= 8
    for name in pngs:
        a, b = _pixels(one / name), _pixels(two / name)
        assert a.shape == b.shape, name
        assert np.array_equal(a, b), name
    return pngs


def test_a_helper_process_draws_the_same_pixels_as_this_one(tiny, tmp_path):
    path, _ = tiny
    tree = open_source(path)
    serial_items, helper_items = plan_report(tree), plan_report(tree)
    (tmp_path / "serial").mkdir()
    (tmp_path / "helper").mkdir()
    _Drawing(tree, serial_items, tmp_path / "serial", 60, _NoBar()).run(None, 0, None, lambda: None)
    bar = _NoBar()
    drawing = _Drawing(tree, helper_items, tmp_path / "helper", 60, bar, steal=False)  # every plot by the helper
    drawing.run(_pool(1, Location.of(path)), 1, Location.of(path), lambda: None)
    assert bar.count == len(helper_items)
    assert [(i.stem, i.file, i.error) for i in serial_items] == [(i.stem, i.file, i.error) for i in helper_items]
    assert all(item.file == f"{item.stem}.png" for item in helper_items)
    _same_outputs(tmp_path / "serial", tmp_path / "helper")


def test_report_with_two_workers_writes_what_one_writes(tiny, tmp_path):
    path, _ = tiny
    one = report(path, tmp_path / "one", progress=False, workers=1).parent
    two = report(path, tmp_path / "two", progress=False, workers=2).parent
    pngs = _same_outputs(one, two)
    assert {"encoder_self-heatmap-layer0.png", "encoder_self-head-grid-layer1.png", "encoder_self-stats.png"} <= set(pngs)
    for name in ("stats.json", "summary.md", "index.html"):
        assert (one / name).read_text() == (two / name).read_text(), name
    page = (two / "index.html").read_text()
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == sorted(pngs)
    assert "Not drawn" not in page


def test_statistics_findings_and_locality_match_numpy(tiny, tmp_path):
    path, weights = tiny
    out = report(path, tmp_path / "out", progress=False, workers=2).parent
    stats = json.loads((out / "stats.json").read_text())
    entries = stats["sites"]["encoder/self"]
    positions = np.arange(5)
    local = np.abs(positions[:, None] - positions[None, :]) <= 2  # the token window the file supports
    ratios = []
    for layer, entry in enumerate(entries):
        values = weights[layer]
        assert entry["layer"] == layer
        assert entry["mean"] == pytest.approx(values.mean(), abs=1e-6)
        assert entry["max"] == pytest.approx(values.max(), abs=1e-6)
        assert entry["min"] == pytest.approx(values.min(), abs=1e-6)
        ratio = values[:, local].mean() / values[:, ~local].mean()
        assert entry["local_global_ratio"] == pytest.approx(ratio, rel=1e-5)
        ratios.append(ratio)
    description = stats["locality"]["encoder/self"]["description"]
    assert "+/-2" in description
    summary = (out / "summary.md").read_text()
    line = next(line for line in summary.splitlines() if "local/global attention ratio" in line)
    assert f"from {min(ratios):.2f} to {max(ratios):.2f}" in line
    assert "(local: token window +/-2" in line
    entropy = -(weights * np.log(weights)).sum(axis=-1).mean(axis=-1)  # per layer and head
    layer, head = np.unravel_index(np.argmin(entropy), entropy.shape)
    assert f"most focused head is layer {layer} head {head} (entropy {entropy[layer, head]:.3f})" in summary


def test_findings_say_what_local_meant_only_when_known():
    entry = {"layer": 0, "local_global_ratio": 2.5, "heads": []}
    without = {"sites": {"a|b": [entry]}}
    assert findings(without) == ["a|b: local/global attention ratio per layer from 2.50 to 2.50"]
    known = {"sites": {"a|b": [entry]}, "locality": {"a|b": {"description": "pairwise 'distance' < 8 angstrom"}}}
    assert findings(known, quote=lambda text: text.replace("|", "\\|")) == [
        "a\\|b: local/global attention ratio per layer from 2.50 to 2.50 (local: pairwise 'distance' < 8 angstrom)"]


# -- failures in helper processes ------------------------------------------------------------------


def _flaky_draw(tree, kind, options, path, dpi):
    """Rollout is refused by the file; top-pairs kills the helper process drawing it."""
    if kind == "rollout":
        raise AttnFormatError("rollout refused by this test")
    if kind == "top-pairs" and multiprocessing.parent_process() is not None:
        os._exit(3)
    return _draw_and_save(tree, kind, options, path, dpi)


def _broken_draw(tree, kind, options, path, dpi):
    if kind == "stats":
        raise RuntimeError("a bug in a plot function")
    return _draw_and_save(tree, kind, options, path, dpi)


def test_a_refused_plot_and_a_dead_helper_are_noted_and_the_rest_drawn(tiny, tmp_path):
    path, _ = tiny
    tree = open_source(path)
    items = plan_report(tree)
    bar = _NoBar()
    drawing = _Drawing(tree, items, tmp_path, 60, bar, draw=_flaky_draw, steal=False)
    drawing.run(_pool(1, Location.of(path)), 1, Location.of(path), lambda: None)
    by_kind = {item.kind: item for item in items}
    assert by_kind["rollout"].error == "rollout refused by this test" and not by_kind["rollout"].file
    assert "the process drawing this plot stopped" in by_kind["top-pairs"].error and not by_kind["top-pairs"].file
    others = [item for item in items if item.kind not in ("rollout", "top-pairs")]
    assert others and all(item.file and not item.error and (tmp_path / item.file).is_file() for item in others)
    assert bar.count == len(items)


def test_an_unexpected_error_in_a_helper_is_raised_here(tiny, tmp_path):
    path, _ = tiny
    tree = open_source(path)
    drawing = _Drawing(tree, plan_report(tree), tmp_path, 60, _NoBar(), draw=_broken_draw, steal=False)
    with pytest.raises(RuntimeError, match="a bug in a plot function"):
        drawing.run(_pool(1, Location.of(path)), 1, Location.of(path), lambda: None)


# -- options ----------------------------------------------------------------------------------------


def test_progress_bar_only_on_a_terminal_unless_asked(tiny, tmp_path, capsys):
    path, _ = tiny
    report(path, tmp_path / "quiet", workers=1)  # stderr is not a terminal here
    assert "attnformat report" not in capsys.readouterr().err
    report(path, tmp_path / "loud", workers=1, progress=True)
    assert "attnformat report" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [0, -2, 1.5, True])
def test_workers_must_be_a_positive_whole_number(tiny, tmp_path, workers):
    with pytest.raises(AttnFormatError, match="workers must be a whole number"):
        report(tiny[0], tmp_path, workers=workers)


def test_a_tree_is_drawn_by_this_process_as_given(tiny, tmp_path):
    path, _ = tiny
    tree = attnformat.open(path)
    tree["encoder/self"].attrs["description"] = "changed in memory"
    index = report(tree, tmp_path / "out", progress=False, workers=2)
    assert "Not drawn" not in index.read_text()
    assert (tmp_path / "out" / "encoder_self-heatmap-layer0.png").is_file()


# -- one rendering per PNG ------------------------------------------------------------------------------


def _figure():
    figure, ax = plt.subplots(figsize=(3, 2), layout="constrained")
    image = ax.imshow(np.arange(12.0).reshape(3, 4), cmap="viridis")
    ax.set_title("weights")
    figure.colorbar(image, ax=ax, label="weights (softmax)")
    return figure


def test_save_png_is_the_pixels_savefig_draws(tmp_path):
    # Fresh figures each time: constrained layout run a second time on one figure moves things a little.
    with matplotlib.rc_context({"savefig.bbox": "standard"}):
        save_png(_figure(), tmp_path / "ours.png", dpi=72)
    _figure().savefig(tmp_path / "savefig.png", dpi=72)
    ours, theirs = _pixels(tmp_path / "ours.png"), _pixels(tmp_path / "savefig.png")
    assert ours.shape == theirs.shape == (144, 216, 4)
    assert np.array_equal(ours, theirs)
    with Image.open(tmp_path / "ours.png") as image:
        assert image.mode == "RGB" and round(image.info["dpi"][0]) == 72


def test_tight_png_is_what_is_drawn_plus_the_pad(tmp_path):
    _figure().savefig(tmp_path / "full.png", dpi=72)
    full = _pixels(tmp_path / "full.png")
    drawn = np.any(full != full[0, 0], axis=-1)
    rows, cols = np.flatnonzero(drawn.any(axis=1)), np.flatnonzero(drawn.any(axis=0))
    pad = round(matplotlib.rcParams["savefig.pad_inches"] * 72)
    with matplotlib.rc_context({"savefig.bbox": "tight"}):
        save_png(_figure(), tmp_path / "tight.png", dpi=72)
    tight = _pixels(tmp_path / "tight.png")
    top, left = rows[0] - pad, cols[0] - pad
    expected = np.empty((rows[-1] + 1 + pad - top, cols[-1] + 1 + pad - left, 4), dtype=np.uint8)
    expected[...] = full[0, 0]
    inside = full[max(top, 0):rows[-1] + 1 + pad, max(left, 0):cols[-1] + 1 + pad]
    expected[max(-top, 0):max(-top, 0) + inside.shape[0], max(-left, 0):max(-left, 0) + inside.shape[1]] = inside
    assert tight.shape == expected.shape
    assert np.array_equal(tight, expected)


def test_transparent_figures_go_through_savefig(tmp_path):
    figure = _figure()
    with matplotlib.rc_context({"savefig.transparent": True, "savefig.bbox": "standard"}):
        save_png(figure, tmp_path / "clear.png", dpi=50)
    pixels = _pixels(tmp_path / "clear.png")
    assert pixels[0, 0, 3] == 0  # the background stays transparent, as savefig writes it


# -- how helper processes start ---------------------------------------------------------------------


def _modules_missing_in_helper() -> list:
    """Run in a helper before it draws anything: the modules a plot needs that it must still import."""
    import sys

    from attnformat.viewer.report import _preload_modules

    return sorted(set(_preload_modules()) - set(sys.modules))


def _helper_start_method() -> str:
    return multiprocessing.current_process()._start_method


def test_helpers_fork_from_a_server_that_imported_every_plot_module(tiny):
    from multiprocessing import forkserver

    from attnformat.viewer import catalog

    before = list(forkserver._forkserver._preload_modules)
    pool = _pool(1, Location.of(tiny[0]))
    try:
        assert pool.submit(_helper_start_method).result(timeout=120) == "forkserver"
        assert pool.submit(_modules_missing_in_helper).result(timeout=120) == []
    finally:
        pool.shutdown(wait=True)
    # every plot kind's module is among those the server imports (the catalog imports them lazily)
    from attnformat.viewer.report import _preload_modules

    wanted = {f"attnformat.viewer.{entry.target.partition(':')[0]}" for entry in catalog.PLOT_KINDS.values()
              if isinstance(entry.target, str)}
    assert wanted and wanted <= set(_preload_modules())
    # the interpreter's own forkserver (the caller's) keeps its preload list
    assert forkserver._forkserver._preload_modules == before


_UNGUARDED = """
import warnings, sys
warnings.simplefilter("always")
import matplotlib
matplotlib.use("Agg")
from attnformat.viewer.report import report
index = report({path!r}, {out!r}, progress=False, workers=2)
print("INDEX", index)
"""


def test_a_script_without_the_main_guard_warns_and_still_writes_every_plot(tiny, tmp_path):
    import subprocess
    import sys

    path, _ = tiny
    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED.format(path=str(path), out=str(tmp_path / "out")))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MPLBACKEND": "Agg"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "helper processes cannot start" in done.stderr
    page = (tmp_path / "out" / "index.html").read_text()
    assert "Not drawn" not in page
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    serial = report(path, tmp_path / "serial", progress=False, workers=1).parent
    _same_outputs(serial, tmp_path / "out")
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == pngs
