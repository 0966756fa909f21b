"""The viewer on the spec's invalid fixtures: the validator's message for broken files, never a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

import attnformat
from attnformat.cli import main
from attnformat.viewer import heatmap

INVALID = sorted((Path(__file__).resolve().parents[2] / "spec" / "conformance" / "invalid").glob("*.zarr"))


def test_fixtures_are_there():
    assert len(INVALID) > 20


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_fixture_gets_the_validators_message_or_a_clear_error(path, tmp_path, capsys):
    metadata_report = attnformat.validate(path, check_values=False)
    if not metadata_report.ok:
        with pytest.raises(attnformat.NonConformingError) as caught:
            heatmap(path)
        assert str(caught.value) == metadata_report.format()
        for command in (["plot", str(path), "heatmap", "-o", str(tmp_path / "x.png")], ["report", str(path), "-o", str(tmp_path / "r")]):
            assert main(command) == 1
            error = capsys.readouterr().err
            assert metadata_report.errors[0].rule_id in error and "Traceback" not in error
    else:
        # Value rules (ATTN-VAL-*) are checked by `attnformat validate`, not before every plot: the
        # viewer draws such files, or stops with one of attnformat's errors, never a crash.
        code = main(["report", str(path), "-o", str(tmp_path / "r"), "--no-progress"])
        error = capsys.readouterr().err
        assert code in (0, 1, 2) and "Traceback" not in error and "unexpected" not in error
