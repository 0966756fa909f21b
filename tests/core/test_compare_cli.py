"""``attnformat diff``: the table and JSON say what attnformat.compare computes, exit codes as the
README states (0 compared, 2 unreadable, not comparable or bad usage), one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from scipy.spatial.distance import jensenshannon

import attnformat
from attnformat.cli import main


@pytest.fixture(scope="module")
def steps():
    return attnformat.example_path("steps")


def _weights(path, site="trunk/iga"):
    return zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")[f"{site}/weights"][...]


def test_two_steps_table_lists_heads_by_mean_jsd(steps, capsys):
    assert main(["diff", str(steps), "--step-a", "100", "--step-b", "300"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"A: {steps} step 100" and out[1] == f"B: {steps} step 300"
    assert "JSD in bits" in out[2]
    rows = [line.split() for line in out[4:]]
    weights = _weights(steps).astype(np.float64)
    expected = {(l, h): np.mean([jensenshannon(weights[0, l, h, q], weights[2, l, h, q], base=2) ** 2 for q in range(10)])
                for l in range(2) for h in range(2)}
    order = sorted(expected, key=expected.get, reverse=True)
    assert [(int(r[2]), int(r[3])) for r in rows] == order
    for row in rows:
        assert float(row[4]) == pytest.approx(expected[int(row[2]), int(row[3])], abs=5e-5)


def test_json_holds_every_head(steps, capsys):
    assert main(["diff", str(steps), "--step-a", "100", "--step-b", "200", "--json", "--top", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["jsd"]["units"] == "bits" and len(summary["top"]) == 2
    assert len(summary["sites"]["trunk/iga"]["heads"]) == 4
    weights = _weights(steps)
    head = next(h for h in summary["sites"]["trunk/iga"]["heads"] if (h["layer"], h["head"]) == (1, 0))
    assert head["max_abs_diff"] == pytest.approx(float(np.abs(weights[1, 1, 0].astype(float) - weights[0, 1, 0]).max()), rel=1e-6)


def test_output_figure(steps, tmp_path, capsys):
    out = tmp_path / "diff.svg"
    assert main(["diff", str(steps), "--step-a", "100", "--step-b", "300", "-o", str(out), "--layer", "1", "--head", "0"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert "layer 1 | head 0 | B - A" in out.read_text()


def _error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_incomparable_files_exit_2_naming_the_first_difference(tmp_path, capsys):
    dense = attnformat.example_path("dense")
    tree = attnformat.open(dense).load()
    labels = tree["encoder/self"].coords["query_label"].values.copy()
    labels[3] = "dog"
    other = tree.copy()
    other["encoder/self"] = other["encoder/self"].to_dataset().assign_coords(query_label=("query", labels))
    changed = attnformat.save(other, tmp_path / "changed.zarr")
    assert main(["diff", str(dense), str(changed)]) == 2
    message = _error(capsys)
    assert str(changed) in message and "query_label differs first at query 3" in message and "'dog' (B)" in message
    assert main(["diff", str(dense), str(changed), "--allow-label-mismatch"]) == 0


@pytest.mark.parametrize("argv, expected", [
    (["diff", "{steps}"], "needs a second file B"),
    (["diff", "{steps}", "{missing}"], "no such file"),
    (["diff", "{steps}", "{dense}"], "is in A only"),
    (["diff", "{dense}", "--step-a", "1", "--step-b", "2"], "has no step dimension"),
    (["diff", "{steps}", "--step-a", "100", "--step-b", "300", "-o", "{tmp}/x.txt"], "cannot save a plot as 'txt'"),
    (["diff", "{steps}", "{steps}", "--site", "nowhere"], "no attention site 'nowhere'"),
])
def test_bad_usage_and_unreadable_input_exit_2(argv, expected, steps, tmp_path, capsys):
    names = {"steps": steps, "dense": attnformat.example_path("dense"), "missing": tmp_path / "missing.zarr", "tmp": tmp_path}
    assert main([word.format(**names) for word in argv]) == 2
    assert expected in _error(capsys)


def test_scheduler_option(steps, capsys):
    assert main(["diff", str(steps), "--step-a", "100", "--step-b", "300", "--scheduler", "synchronous", "--json"]) == 0
    by_synchronous = json.loads(capsys.readouterr().out)
    assert main(["diff", str(steps), "--step-a", "100", "--step-b", "300", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == by_synchronous
    assert main(["diff", str(steps), "--step-a", "100", "--step-b", "300", "--scheduler", "bogus"]) == 2
    assert "scheduler 'bogus'" in _error(capsys)
