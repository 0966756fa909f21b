"""``--scheduler`` on ``stats``, ``validate`` and ``report``: the same output with every local
scheduler, exit codes as the README says, one line (never a traceback, never a hang) for a bad
name or an address nobody answers at."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

import attnformat
from attnformat.cli import main

INVALID = Path(__file__).resolve().parents[2] / "spec" / "conformance" / "invalid"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed when the block ends: nothing listens there


def test_stats_json_is_the_same_with_every_local_scheduler(capsys):
    path = str(attnformat.example_path("encoder-decoder"))
    outputs = {}
    for scheduler in ("synchronous", "threads"):
        assert main(["stats", path, "--json", "--scheduler", scheduler, "-q"]) == 0
        outputs[scheduler] = json.loads(capsys.readouterr().out)
    assert outputs["synchronous"] == outputs["threads"]
    assert outputs["threads"]["sites"]["decoder/cross"][0]["shape"] == [2, 5, 7]


def test_validate_exit_codes_with_a_scheduler(capsys):
    assert main(["validate", str(attnformat.example_path("dense")), "--scheduler", "synchronous"]) == 0
    assert main(["validate", str(INVALID / "ATTN-VAL-002.zarr"), "--scheduler", "threads", "-q"]) == 1
    assert "ATTN-VAL-002" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["stats", "validate", "report"])
def test_a_bad_scheduler_name_is_one_line_and_exit_2(command, capsys, tmp_path):
    extra = ["-o", str(tmp_path / "out")] if command == "report" else []
    assert main([command, str(attnformat.example_path("dense")), *extra, "--scheduler", "bogus"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "scheduler 'bogus'" in error and "Traceback" not in error


@pytest.mark.parametrize("command", ["stats", "validate"])
def test_an_address_nobody_answers_at_is_one_line_and_exit_2(command, capsys):
    address = f"tcp://127.0.0.1:{_closed_port()}"
    assert main([command, str(attnformat.example_path("dense")), "--scheduler", address]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"cannot reach the dask scheduler at {address}" in error


def test_stats_concat_joins_files_as_one_collection(tmp_path, capsys):
    import shutil

    for name in ("a.zarr", "b.zarr"):
        shutil.copytree(attnformat.example_path("dense"), tmp_path / name)
    assert main(["stats", str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), "--concat", "run", "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    single = attnformat.open(tmp_path / "a.zarr")["encoder/self"]["weights"].values
    assert sorted(result["summaries"]) == ["a.zarr", "b.zarr"]
    for summary in result["summaries"].values():
        assert summary["sites"]["encoder/self"][1]["max"] == pytest.approx(float(single[1].max()), abs=1e-6)
    assert main(["stats", str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")]) == 2
    assert "--concat" in capsys.readouterr().err
