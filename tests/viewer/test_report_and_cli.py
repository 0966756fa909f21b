"""The report (index.html, summary, safe names), the plot/report/stats commands, and running without torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import attnformat
from attnformat.cli import main
from attnformat.viewer import report
from attnformat.viewer.report import safe_file_name


def _hostile_image_file(tmp_path: Path) -> Path:
    tree = attnformat.examples.build("image")
    site = tree["encoder/self"].to_dataset()
    labels = site["query_label"].values.copy()
    labels[0], labels[1], labels[2], labels[3] = "../x", "<s>", "a\"b<script>", "a | b"
    site = site.assign_coords(query_label=("query", labels), key_label=("key", labels))
    tree["encoder/self"] = site
    path = tmp_path / "input" / "hostile.zarr"
    attnformat.save(tree, path)
    return path


def test_report_renders_everything_and_links_every_image(example, tmp_path):
    index = report(example("encoder-decoder"), tmp_path / "out", progress=False)
    out = index.parent
    assert index == out / "index.html"
    page = index.read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert sorted(sources) == pngs and len(pngs) > 20
    assert all((out / s).is_file() for s in sources)
    assert "Not drawn" not in page
    assert {"flow-layer0.png", "decoder_cross-heatmap-layer0.png", "encoder_self-head-grid-layer1.png"} <= set(pngs)
    summary = (out / "summary.md").read_text()
    assert "## Statistics per site and layer" in summary and "cross_attention" in summary
    assert "## Findings" in summary and "encoder/self: most focused head is layer" in summary
    assert json.loads((out / "stats.json").read_text())["sites"]["decoder/cross"][0]["type"] == "cross_attention"


def test_report_progress_bar_goes_to_stderr(example, tmp_path, capsys):
    report(example("frames"), tmp_path / "out", progress=True)
    assert "attnformat report" in capsys.readouterr().err


def test_hostile_labels_stay_inside_the_directory_and_are_escaped(tmp_path):
    path = _hostile_image_file(tmp_path)
    out = tmp_path / "out"
    index = report(path, out, progress=False)
    written = {p.resolve() for p in tmp_path.rglob("*") if p.is_file()}
    assert all(out.resolve() in p.parents or (tmp_path / "input").resolve() in p.parents for p in written)
    names = [p.name for p in out.iterdir()]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) and not n.startswith(".") for n in names)
    assert "encoder_self-image-overlay-layer0-query-x.png" in names  # derived from the label "../x"
    page = index.read_text()
    assert "<s>" not in page and "<script>" not in page
    assert "&lt;s&gt;" in page or "../x" in page
    for source in re.findall(r'src="([^"]+)"', page):
        assert (out / source).is_file() and "/" not in source
    summary = (out / "summary.md").read_text()
    assert "<s>" not in summary and "<script>" not in summary
    table = [line for line in summary.splitlines() if line.startswith("| ") and "weight" not in line]
    assert table and all(line.count(" | ") == 2 for line in table)  # labels cannot add table columns
    from attnformat.text import for_markdown

    assert for_markdown("a | <b>") == "a \\| \\<b\\>"
    assert safe_file_name("../../etc/passwd") == "etc_passwd"
    assert safe_file_name("...") == "plot"


def test_plot_command_every_format(example, tmp_path, capsys):
    for suffix in ("png", "svg", "pdf"):
        target = tmp_path / f"grid.{suffix}"
        assert main(["plot", str(example("frames")), "head-grid", "--variable", "logits", "--by-group",
                     "--origin", "lower", "-o", str(target)]) == 0
        assert target.stat().st_size > 1000
    svg = (tmp_path / "grid.svg").read_text()
    assert ">head 3</text>" in svg
    assert main(["plot", str(example("steps")), "query-profiles", "--query", "R1", "--query", "5", "--step", "200",
                 "-o", str(tmp_path / "q.png")]) == 0
    assert main(["plot", str(example("image")), "image-overlay", "--query", "[CLS]", "--layer", "1", "--head", "max",
                 "-o", str(tmp_path / "o.png")]) == 0


def test_plot_help_lists_kinds_and_selectors(capsys):
    assert main(["plot", "--help"]) == 0
    text = capsys.readouterr().out
    for word in ("heatmap", "head-grid", "group-bars", "top-edges", "pairwise-overview", "image-overlay", "rollout",
                 "--layer", "--head", "--sample", "--step", "--time", "--node", "--query"):
        assert word in text


@pytest.mark.parametrize(("arguments", "message"), [
    (["heatmap", "--layer", "99"], r"layer 99 not in file .*dense.zarr, site encoder/self; layers: 0, 1"),
    (["heatmap", "--site", "decoder/self"], r"no attention site 'decoder/self'; sites: encoder/self"),
    (["image-overlay", "--query", "nope"], r"no key_patch_row"),
    (["top-pairs", "--query", "x"], r"takes one --query|does not take query"),
    (["nonsense"], r"no plot kind 'nonsense'; kinds: heatmap, head-grid"),
    (["heatmap", "--k", "3"], r"does not take k"),
])
def test_bad_selectors_exit_2_with_a_message(example, tmp_path, capsys, arguments, message):
    code = main(["plot", str(example("dense")), arguments[0], *arguments[1:], "-o", str(tmp_path / "x.png")])
    error = capsys.readouterr().err
    assert code == 2
    assert re.search(message, error) and "Traceback" not in error


def test_unknown_label_exits_2(example, tmp_path, capsys):
    code = main(["plot", str(example("image")), "image-overlay", "--query", "no such token", "-o", str(tmp_path / "x.png")])
    error = capsys.readouterr().err
    assert code == 2 and "query no such token not in file" in error and "[CLS]" in error


def test_nonconforming_file_gets_the_validator_message(tmp_path, capsys):
    tree = attnformat.examples.build("dense")
    tree["encoder/self"].attrs["normalization"] = "bogus"
    path = tmp_path / "bad.zarr"
    tree.to_zarr(path)
    for command in (["plot", str(path), "heatmap", "-o", str(tmp_path / "x.png")], ["report", str(path), "-o", str(tmp_path / "r")],
                    ["stats", str(path)]):
        code = main(command)
        error = capsys.readouterr().err
        assert code == 1 and "does NOT conform" in error and "normalization" in error and "Traceback" not in error
    assert not (tmp_path / "x.png").exists()


def test_stats_command_json(example, capsys):
    assert main(["stats", str(example("encoder-decoder")), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    entry = summary["sites"]["encoder/self"][1]
    weights = attnformat.open(example("encoder-decoder"))["encoder/self"]["weights"].sel(layer=1).values
    assert entry["layer"] == 1 and entry["type"] == "self_attention" and entry["shape"] == [2, 7, 7]
    assert entry["mean"] == pytest.approx(float(weights.mean()), abs=1e-6)
    assert main(["stats", str(example("dense"))]) == 0
    assert "encoder/self" in capsys.readouterr().out


def test_report_command(example, tmp_path, capsys):
    assert main(["report", str(example("edge-time")), "-o", str(tmp_path / "r"), "--no-progress"]) == 0
    assert (tmp_path / "r" / "index.html").is_file()
    assert (tmp_path / "r" / "temporal-temporal-node-4.png").is_file()


_BLOCK_TORCH = textwrap.dedent("""
    import sys, importlib.abc
    BLOCKED = ("torch", "transformers", "torch_geometric")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked: {name}")
            return None
    sys.meta_path.insert(0, Block())
    try:
        import torch
    except ImportError:
        pass
    else:
        raise SystemExit("torch still importable")
    import matplotlib
    matplotlib.use("Agg")
    import attnformat
    import attnformat.viewer as viewer
    from attnformat.examples import EXAMPLES
    drawn = set()
    for name in EXAMPLES:
        tree = attnformat.open(attnformat.example_path(name))
        for kind, entry in viewer.PLOT_KINDS.items():
            if kind in drawn:  # every kind once is enough here; test_every_kind covers every example
                continue
            if entry.scope == "file":
                if entry.applies(tree):
                    viewer.plot(tree, kind); drawn.add(kind)
                continue
            for site in viewer.sites_of(tree):
                if entry.applies(site) and kind not in drawn:
                    viewer.save_figure(viewer.plot(tree, kind, site=site.path.strip("/")), sys.argv[1] + f"/{kind}.png", dpi=30)
                    drawn.add(kind)
    assert drawn == set(viewer.PLOT_KINDS), set(viewer.PLOT_KINDS) - drawn
    index = viewer.report(attnformat.example_path("frames"), sys.argv[1] + "/report", progress=False)
    assert index.is_file()
    assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
    print("ok", len(drawn))
""")


def test_viewer_works_with_torch_unimportable(tmp_path):
    result = subprocess.run([sys.executable, "-c", _BLOCK_TORCH, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"ok {len(__import__('attnformat.viewer', fromlist=['PLOT_KINDS']).PLOT_KINDS)}"
    assert (tmp_path / "report" / "index.html").is_file()
    assert np.any([p.suffix == ".png" for p in tmp_path.iterdir()])


def test_missing_or_unreadable_input_exits_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not attention")
    for path in (tmp_path / "missing.zarr", tmp_path / "notes.txt"):
        for command in (["plot", str(path), "heatmap", "-o", str(tmp_path / "x.png")], ["report", str(path), "-o", str(tmp_path / "r")]):
            assert main(command) == 2
            error = capsys.readouterr().err
            assert str(path) in error and "Traceback" not in error


def test_report_of_a_logits_only_file(tmp_path):
    from conftest import dense_tree

    logits = np.random.default_rng(5).normal(size=(2, 3, 5, 5)) - 2.0  # all-negative-ish scores, no weights
    path = attnformat.save(dense_tree(logits, with_weights=False, labels=list("abcde")), tmp_path / "scores.zarr")
    index = report(path, tmp_path / "out", progress=False)
    names = {p.name for p in index.parent.glob("*.png")}
    assert {"encoder_self-heatmap-layer0.png", "encoder_self-head-grid-layer1.png", "encoder_self-layer-comparison.png",
            "encoder_self-stats.png", "encoder_self-top-pairs-layer0.png"} <= names
    assert "Not drawn" not in index.read_text()
