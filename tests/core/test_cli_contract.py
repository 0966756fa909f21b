"""The command line's contract: commands registered without importing what they need, the exit
codes the README states (0 ok, 1 nonconforming, 2 damaged/unreadable input, bad usage or a failed
write, 3 missing optional package, 4 a bug), one line naming the file, ``--storage-option``."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
import zarr

import attnformat
from attnformat.cli import COMMANDS, main
from attnformat.errors import MissingDependencyError

ROOT = Path(__file__).resolve().parents[2]
INVALID = ROOT / "spec" / "conformance" / "invalid"
# What `attnformat --version` and `attnformat validate` must leave unimported.
HEAVY = ("matplotlib", "PIL", "attnformat.viewer", "attnformat.adapters", "torch", "transformers", "torch_geometric",
         "tensorstore")


def _imported_by(*argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime -m attnformat ARGV`` and return the result and every module it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "attnformat", *argv], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    modules = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "attnformat.cli" in modules  # the parse found the imports
    return result, modules


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


# --- registration without imports -------------------------------------------------------------


def test_version_imports_nothing_heavy():
    result, modules = _imported_by("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"attnformat {attnformat.__version__} (format {attnformat.FORMAT_VERSION})"
    assert _heavy(modules) == []


@pytest.mark.parametrize("command", ["validate", "info", "convert"])
def test_reading_commands_import_nothing_heavy(command, tmp_path):
    path = attnformat.example_path("dense")
    argv = {"validate": ["validate", str(path)], "info": ["info", str(path)],
            "convert": ["convert", str(path), str(tmp_path / "copy.zarr.zip")]}[command]
    result, modules = _imported_by(*argv)
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(path if command != "convert" else tmp_path / "copy.zarr.zip") in result.stdout
    assert _heavy(modules) == []


def test_main_help_lists_every_command_without_importing_them():
    result, modules = _imported_by("--help")
    assert result.returncode == 0
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ") and line.split()}
    assert set(COMMANDS) <= listed
    for name, entry in COMMANDS.items():
        assert " ".join(entry.help.split()[:3]) in " ".join(result.stdout.split())
    assert _heavy(modules) == [] and "attnformat.cli.core" not in modules


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_listed_command_is_provided_by_its_module(name, capsys):
    assert main([name, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: attnformat {name}")
    reads_a_file = name in ("info", "validate", "convert", "plot", "report", "stats", "view", "serve", "diff")
    assert ("--storage-option" in text) == reads_a_file


# --- exit 3: a missing optional package -------------------------------------------------------

_WITHOUT = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # what `import name` meets when the package is not installed
sys.argv = ["attnformat", *sys.argv[2:]]
from attnformat.cli import main
raise SystemExit(main())
"""


@pytest.mark.parametrize(("missing", "argv", "hint"), [
    ("matplotlib", ["plot", "{example}", "heatmap", "-o", "{tmp}/x.png"], "pip install matplotlib"),
    ("matplotlib", ["stats", "{example}"], "pip install matplotlib"),
    ("torch", ["export", "hf", "{tmp}", "--text", "hi", "-o", "{tmp}/x.zarr"], "pip install 'attnformat[torch]'"),
])
def test_missing_optional_package_exits_3_with_the_install_hint(tmp_path, missing, argv, hint):
    argv = [a.format(example=attnformat.example_path("dense"), tmp=tmp_path) for a in argv]
    result = subprocess.run([sys.executable, "-c", _WITHOUT, missing, *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and missing in lines[0] and hint in lines[0] and argv[0] in lines[0]


def test_reading_validating_and_converting_work_without_tensorstore(tmp_path):
    path = attnformat.example_path("steps")
    for argv in (["validate", str(path)], ["convert", str(path), str(tmp_path / "copy.zarr")], ["info", str(path)]):
        result = subprocess.run([sys.executable, "-c", _WITHOUT, "tensorstore", *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
    # Ground truth: xarray's own reading of the source and of the copy.
    xr.testing.assert_equal(xr.open_datatree(tmp_path / "copy.zarr", engine="zarr").load(),
                            xr.open_datatree(path, engine="zarr").load())


def test_missing_dependency_error_exits_3(monkeypatch, capsys):
    def needs_s3fs(*args, **kwargs):
        raise MissingDependencyError("s3://bucket/run.zarr: reading s3:// URLs needs s3fs", extra="remote")

    monkeypatch.setattr("attnformat.cli.core.open_tree", needs_s3fs)
    assert main(["info", "s3://bucket/run.zarr"]) == 3
    error = capsys.readouterr().err
    assert "s3://bucket/run.zarr" in error and "pip install 'attnformat[remote]'" in error


# --- exit 2: damaged input, one line naming the file ----------------------------------------

def _copy_example(name: str, tmp_path: Path) -> Path:
    target = tmp_path / f"{name}.zarr"
    shutil.copytree(attnformat.example_path(name), target)
    return target


def _weights_chunks(store: Path) -> list[Path]:
    chunks = sorted(p for p in (store / "encoder" / "self" / "weights").rglob("*") if p.is_file() and p.name != "zarr.json")
    assert chunks
    return chunks


def _zip_cut_short(tmp_path):
    path = tmp_path / "dense.zarr.zip"
    attnformat.convert(attnformat.example_path("dense"), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(zipfile.BadZipFile):  # ground truth: the zip library refuses it too
        zipfile.ZipFile(path)
    return path


def _root_metadata_not_utf8(tmp_path):
    path = _copy_example("dense", tmp_path)
    (path / "zarr.json").write_bytes(b'{"zarr_format": 3, "node_type": "group", "attributes": {"title": "\xff\xfe\xfa"}}')
    with pytest.raises(Exception):  # noqa: B017 - which error zarr raises is its business; that it refuses is the truth
        zarr.open_group(path, mode="r")
    return path


def _root_metadata_nested_too_deep(tmp_path):
    path = _copy_example("dense", tmp_path)
    (path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {"x": ' + "[" * 200_000
                                    + "]" * 200_000 + "}}")
    with pytest.raises(RecursionError):
        json.loads((path / "zarr.json").read_text())
    return path


def _weights_chunks_cut_short(tmp_path):
    path = _copy_example("dense", tmp_path)
    for chunk in _weights_chunks(path):
        chunk.write_bytes(chunk.read_bytes()[:7])
    with pytest.raises(Exception):  # noqa: B017 - the storage library cannot decode them either
        zarr.open_array(path / "encoder" / "self" / "weights", mode="r")[...]
    return path


def _weights_chunks_bit_flipped(tmp_path):
    path = _copy_example("dense", tmp_path)
    stored = zarr.open_array(path / "encoder" / "self" / "weights", mode="r")[...]
    for chunk in _weights_chunks(path):
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x10
        chunk.write_bytes(bytes(data))
    try:  # ground truth: what the storage library itself reads now differs, or it refuses
        damaged = zarr.open_array(path / "encoder" / "self" / "weights", mode="r")[...]
    except Exception:  # noqa: BLE001
        damaged = None
    assert damaged is None or not np.array_equal(damaged, stored)
    return path


def _hdf5_cut_short(tmp_path):
    path = tmp_path / "dense.h5"
    attnformat.convert(attnformat.example_path("dense"), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(OSError, match="truncated"):
        h5py.File(path, "r")
    return path


DAMAGED = {
    "zip cut short": (_zip_cut_short, ("info", "validate", "convert", "stats", "plot")),
    "metadata not UTF-8": (_root_metadata_not_utf8, ("info", "validate", "convert", "stats", "plot")),
    "metadata nested too deep": (_root_metadata_nested_too_deep, ("info", "validate", "convert", "stats", "plot")),
    "chunks cut short": (_weights_chunks_cut_short, ("validate", "convert", "stats", "plot")),
    "chunks bit-flipped": (_weights_chunks_bit_flipped, ("validate", "convert", "stats", "plot")),
    "hdf5 cut short": (_hdf5_cut_short, ("info", "validate", "convert", "stats", "plot")),
}


def _argv(command: str, path: Path, tmp_path: Path) -> list[str]:
    return {"info": ["info", str(path)], "validate": ["validate", str(path)],
            "convert": ["convert", str(path), str(tmp_path / "out" / "copy.zarr")],
            "stats": ["stats", str(path)], "plot": ["plot", str(path), "heatmap", "-o", str(tmp_path / "x.png")]}[command]


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_input_exits_2_with_one_line_naming_the_file(case, tmp_path, capsys):
    build, commands = DAMAGED[case]
    path = build(tmp_path)
    (tmp_path / "out").mkdir()
    for command in commands:
        code = main(_argv(command, path, tmp_path))
        captured = capsys.readouterr()
        assert code == 2, (command, captured.err, captured.out[-2000:])
        assert "Traceback" not in captured.err + captured.out
        if command == "validate" and not captured.err:  # the report names the file and the damage rule
            assert str(path) in captured.out and "ATTN-STORE-" in captured.out
            continue
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0], (command, captured.err)
    assert not (tmp_path / "out" / "copy.zarr").exists() and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("rule_id", ["ATTN-STORE-003", "ATTN-STORE-004", "ATTN-STORE-005", "ATTN-STORE-006",
                                     "ATTN-STORE-007"])
def test_validate_exits_2_on_damage_and_json_lists_the_rule(rule_id, capsys):
    path = INVALID / f"{rule_id}.zarr"
    assert main(["validate", str(path), "--json"]) == 2
    captured = capsys.readouterr()
    if captured.out:
        report = json.loads(captured.out)
        assert report["ok"] is False and report["damaged"] is True
        assert rule_id in {finding["rule_id"] for finding in report["findings"]}
    else:  # refused before a report could be made: one line with the file and the rule
        assert str(path) in captured.err and rule_id in captured.err and len(captured.err.strip().splitlines()) == 1


def test_validate_json_includes_warnings(tmp_path, capsys):
    path = _copy_example("dense", tmp_path)
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"]["completeness"] = "incomplete"
    (path / "zarr.json").write_text(json.dumps(root))
    assert xr.open_datatree(path, engine="zarr").attrs["completeness"] == "incomplete"
    assert main(["validate", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["damaged"] is False
    assert [(f["rule_id"], f["level"]) for f in report["findings"]] == [("ATTN-ROOT-008", "warning")]


# --- the second wall: which errors are the file's fault ----------------------------------------

def _garbage_zip(tmp_path):
    (tmp_path / "garbage.zip").write_bytes(b"PK\x03\x04 not really a zip")
    zipfile.ZipFile(tmp_path / "garbage.zip")


def _missing_hdf5_dataset(tmp_path):
    with h5py.File(tmp_path / "small.h5", "w") as handle:
        handle["present"] = np.arange(3)
    with h5py.File(tmp_path / "small.h5", "r") as handle:
        return handle["absent"]  # KeyError raised inside h5py


def _deep_json(tmp_path):
    return json.loads("[" * 200_000 + "]" * 200_000)


def _attribute_bug(tmp_path):
    return None.shape  # type: ignore[attr-defined]


def _key_bug(tmp_path):
    return {}["layer"]


@pytest.mark.parametrize(("raise_it", "code", "words"), [
    (_garbage_zip, 2, ("BadZipFile", "damaged")),
    (_missing_hdf5_dataset, 2, ("KeyError", "damaged")),
    (_deep_json, 2, ("RecursionError",)),
    (_attribute_bug, 4, ("unexpected AttributeError", "please report")),
    (_key_bug, 4, ("unexpected KeyError", "please report")),
])
def test_storage_library_errors_are_damage_and_our_own_are_bugs(monkeypatch, tmp_path, capsys, raise_it, code, words):
    monkeypatch.setattr("attnformat.cli.core.open_tree", lambda *args, **kwargs: raise_it(tmp_path))
    target = tmp_path / "input.zarr"
    assert main(["info", str(target)]) == code
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error
    assert all(word in error for word in words), error
    assert (str(target) in error) == (code == 2)


def test_a_failed_write_exits_2_naming_the_destination(monkeypatch, tmp_path, capsys):
    def full_disk(source, destination, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(destination) / "encoder" / "self" / "weights"))

    monkeypatch.setattr("attnformat.cli.core.convert", full_disk)
    assert main(["convert", str(attnformat.example_path("dense")), str(tmp_path / "copy.h5")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"attnformat: {tmp_path / 'copy.h5'}: writing failed: No space left on device")


def test_terminal_escapes_in_messages_are_shown_escaped(capsys, tmp_path):
    assert main(["info", str(tmp_path / "\x1b[31mred\x1b[0m.zarr")]) == 2
    error = capsys.readouterr().err
    assert "\x1b" not in error and "\\x1b[31mred" in error


# --- exit 2 on a full disk: tmpfs when we may mount one, else a file size limit ------------------

_FULL_DISK_BYTES = 1 << 20


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _mount_tmpfs(folder: Path) -> bool:
    """Mount a 1 MiB tmpfs on folder; False where we may not (not root, or no mount namespace)."""
    return _LIBC.mount(b"tmpfs", str(folder).encode(), b"tmpfs", 0, f"size={_FULL_DISK_BYTES}".encode()) == 0


def _unmount(folder: Path) -> None:
    if _LIBC.umount2(str(folder).encode(), 2) != 0:  # MNT_DETACH: gone even if something still holds a file
        raise OSError(ctypes.get_errno(), f"cannot unmount {folder}")


@pytest.fixture
def small_disk(tmp_path):
    """(folder, preexec_fn): a folder whose disk fills after 1 MiB, or a process limit of 1 MiB per file."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if _mount_tmpfs(folder):
        try:
            yield folder, None
        finally:
            _unmount(folder)
        return

    def limit_file_size():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (_FULL_DISK_BYTES, _FULL_DISK_BYTES))

    yield folder, limit_file_size


@pytest.fixture(scope="module")
def large_source(tmp_path_factory):
    """A conforming 2 MiB file of random (incompressible) weights."""
    path = tmp_path_factory.mktemp("large") / "large.zarr"
    rng = np.random.default_rng(0)
    tokens = np.array([f"t{i}" for i in range(256)], dtype=object)
    with attnformat.Writer(path, model_name="random", model_framework="numpy") as writer:
        site = writer.create_site("encoder/self", sizes={"layer": 2, "head": 4, "query": 256, "key": 256},
                                  coords={"query_label": ("query", tokens), "key_label": ("key", tokens)},
                                  attrs={"attention_type": "self", "causal": 0})
        for layer in range(2):
            logits = rng.normal(size=(4, 256, 256))
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            site.write("weights", (weights / weights.sum(-1, keepdims=True)).astype(np.float32), layer=layer)
    return path


@pytest.mark.parametrize("name", ["copy.h5", "copy.zarr", "copy.zarr.zip"])
def test_convert_onto_a_full_disk_exits_2_and_leaves_nothing(small_disk, large_source, name):
    folder, preexec = small_disk
    destination = folder / name
    result = subprocess.run([sys.executable, "-m", "attnformat", "convert", str(large_source), str(destination)],
                            capture_output=True, text=True, timeout=120, preexec_fn=preexec, cwd=ROOT)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])  # a crash would be negative
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(destination) in lines[0] and "Traceback" not in result.stderr, result.stderr
    left = sorted(folder.iterdir())
    scratch = [p for p in left if p.name.startswith(".") or "tmp" in p.name]
    assert not scratch, (result.stderr, [str(p) for folder in scratch for p in folder.rglob("*")])  # no scratch files
    for kept in left:  # a partial may stay for the user to inspect; it must not claim to be complete
        try:
            tree = attnformat.open(kept)
        except attnformat.UnreadableFileError:
            continue
        assert not attnformat.is_complete(tree), kept


# --- --storage-option: parsed, and passed to every command that reads a file -------------------

def test_storage_options_are_parsed_as_json_when_they_parse(monkeypatch, capsys):
    seen = {}

    def record(source, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr("attnformat.cli.core.open_tree", record)
    with pytest.raises(SystemExit):
        main(["info", "s3://b/run.zarr", "--storage-option", "anon=true", "--storage-option", "profile=dev",
              "--storage-option", 'client_kwargs={"endpoint_url": "http://127.0.0.1:1"}', "--storage-option", "retries=3"])
    assert seen == {"storage_options": {"anon": True, "profile": "dev", "client_kwargs": {"endpoint_url": "http://127.0.0.1:1"},
                                        "retries": 3}}
    assert main(["info", "x.zarr", "--storage-option", "no-equals-sign"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


@pytest.fixture(scope="module")
def s3_copy(s3_put, s3_storage_options):
    """The dense example on the moto S3 server of tests/conftest.py; (url, storage options, local path)."""
    local = attnformat.example_path("dense")
    return s3_put(local, "cli-contract/dense.zarr"), dict(s3_storage_options), local


def _option_arguments(options: dict) -> list[str]:
    return [word for key, value in options.items() for word in ("--storage-option", f"{key}={json.dumps(value)}")]


def test_every_reading_command_takes_storage_options_for_a_url(s3_copy, tmp_path, capsys):
    url, options, local = s3_copy
    given = _option_arguments(options)

    def run(*argv):
        code = main([*argv])
        captured = capsys.readouterr()
        assert code == 0, (argv[:2], captured.err)
        return captured.out

    remote_info, local_info = json.loads(run("info", url, "--json", *given)), json.loads(run("info", str(local), "--json"))
    assert remote_info.pop("source") == url and local_info.pop("source") == str(local)
    assert remote_info == local_info
    assert "conforms" in run("validate", url, *given)
    run("convert", url, str(tmp_path / "copy.h5"), *given)
    xr.testing.assert_equal(xr.open_datatree(tmp_path / "copy.h5", engine="h5netcdf").load(),
                            xr.open_datatree(local, engine="zarr").load())
    remote_stats, local_stats = json.loads(run("stats", url, "--json", *given)), json.loads(run("stats", str(local), "--json"))
    assert remote_stats.pop("source") == url and local_stats.pop("source") == str(local)
    assert remote_stats == local_stats
    run("plot", url, "heatmap", "--layer", "1", "--head", "2", "-o", str(tmp_path / "remote.png"), *given)
    run("plot", str(local), "heatmap", "--layer", "1", "--head", "2", "-o", str(tmp_path / "local.png"))
    import matplotlib.image

    np.testing.assert_array_equal(matplotlib.image.imread(tmp_path / "remote.png"), matplotlib.image.imread(tmp_path / "local.png"))
    run("report", url, "-o", str(tmp_path / "report"), "--no-progress", *given)
    assert (tmp_path / "report" / "index.html").is_file()
    # Options that reach no server: the command fails with exit 2 naming the URL, not a traceback.
    unreachable = {**options, "endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}}
    assert main(["info", url, *_option_arguments(unreachable)]) == 2
    error = capsys.readouterr().err
    assert url in error and len(error.strip().splitlines()) == 1
