"""The command line: exit codes, messages that name the file and rule, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr

import attnformat
from attnformat.cli import main

INVALID = Path(__file__).resolve().parents[2] / "spec" / "conformance" / "invalid"


def test_info_text_and_json(capsys):
    path = attnformat.example_path("steps")
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "group /trunk/iga  [attention site]" in text
    assert "weights(step=3, layer=2, head=2, query=10, key=10) float32" in text
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["groups"]["/trunk/iga"]["variables"]["distance"]["attrs"]["units"] == "angstrom"


def test_validate_exit_codes_and_rule_ids(capsys, tmp_path):
    assert main(["validate", str(attnformat.example_path("dense"))]) == 0
    assert "conforms" in capsys.readouterr().out
    assert main(["validate", str(INVALID / "ATTN-VAL-002.zarr")]) == 1
    out = capsys.readouterr().out
    assert "ATTN-VAL-002" in out and "ATTN-VAL-002.zarr" in out and "does NOT conform" in out
    assert main(["validate", str(INVALID / "ATTN-EDGE-003.zarr"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and {f["rule_id"] for f in report["findings"]} == {"ATTN-EDGE-003"}
    assert main(["validate", str(tmp_path / "missing.zarr")]) == 2
    assert "missing.zarr: no such file or directory" in capsys.readouterr().err


def test_convert_and_dry_run(capsys, tmp_path):
    source = attnformat.example_path("image")
    assert main(["convert", str(source), str(tmp_path / "image.h5"), "--dry-run"]) == 0
    assert not (tmp_path / "image.h5").exists()
    assert main(["convert", str(source), str(tmp_path / "image.h5")]) == 0
    xr.testing.assert_identical(attnformat.open(tmp_path / "image.h5"), attnformat.open(source))
    assert main(["convert", str(source), str(tmp_path / "image.h5")]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["validate"],
        ["info", "{tmp}/garbage.h5"],
        ["info", "{tmp}/garbage.zarr.zip"],
        ["validate", "{tmp}/empty.zarr"],
        ["convert", "{tmp}/garbage.h5", "{tmp}/out.zarr"],
        ["convert", "{example}", "{tmp}/out.pickle"],
        ["no-such-command"],
    ],
)
def test_bad_input_exits_2_without_a_traceback(tmp_path, argv):
    (tmp_path / "garbage.h5").write_bytes(b"\x89HDF\r\n\x1a\ngarbage")
    (tmp_path / "garbage.zarr.zip").write_bytes(b"PK\x03\x04garbage")
    (tmp_path / "empty.zarr").mkdir()
    argv = [a.format(tmp=tmp_path, example=attnformat.example_path("dense")) for a in argv]
    result = subprocess.run([sys.executable, "-m", "attnformat", *argv], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip()


def test_version():
    result = subprocess.run([sys.executable, "-m", "attnformat", "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.strip() == f"attnformat {attnformat.__version__} (format {attnformat.FORMAT_VERSION})"
