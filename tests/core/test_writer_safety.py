"""Writers never lose or delete data: crashed partials are kept, one writer per destination,
replacement is atomic for readers, a full disk fails clearly, bad names are refused, every chunk
carries a checksum, TensorStore is optional. Ground truth is zarr's (and the OS's) own view."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

import attnformat
from attnformat.engines.placement import move_into_place, pin_directory
from attnformat.errors import StoreLockedError
from attnformat.examples import softmax

SITE_ATTRS = {"attention_type": "self", "causal": 0}


def _run(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], capture_output=True, text=True, timeout=120)


def _completeness(store) -> str:
    return json.loads((store / "zarr.json").read_text())["attributes"]["completeness"]


# -- a crashed run's partial store is kept -------------------------------------------------------
def test_a_crashed_partial_is_kept_unless_overwrite_is_asked(tmp_path):
    path = tmp_path / "run.zarr"
    result = _run("""
        import os, sys, numpy as np, attnformat
        writer = attnformat.Writer(sys.argv[1])
        site = writer.create_site("self", sizes={"layer": 2, "query": 2, "key": 2})
        site.write("weights", np.full((2, 2), 0.5), layer=0)
        os._exit(9)
    """, path)
    assert result.returncode == 9, result.stderr
    partial = tmp_path / "run.zarr.partial.zarr"
    with pytest.raises(attnformat.WriterError, match=r"attnformat\.open.*overwrite=True"):
        attnformat.Writer(path)
    np.testing.assert_array_equal(zarr.open_array(partial / "self/weights")[0], np.full((2, 2), 0.5))  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.zarr.partial.zarr"]  # no lock file left behind
    with attnformat.Writer(path, overwrite=True) as writer:
        writer.create_site("self", sizes={"query": 2, "key": 2}).write("weights", np.eye(2))
    assert _completeness(path) == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.zarr"]


# -- one writer per destination ------------------------------------------------------------------
def test_a_second_writer_fails_and_the_first_one_writes_every_layer(tmp_path):
    path = tmp_path / "run.zarr"
    weights = softmax(np.random.default_rng(0).normal(size=(12, 2, 4, 4))).astype(np.float32)
    first = attnformat.Writer(path)
    site = first.create_site("self", sizes={"layer": 12, "head": 2, "query": 4, "key": 4}, attrs=SITE_ATTRS)
    for layer in range(6):
        site.write("weights", weights[layer], layer=layer)
    with pytest.raises(StoreLockedError, match=rf"run\.zarr\.lock held by pid {os.getpid()}"):
        attnformat.Writer(path, overwrite=True)
    for layer in range(6, 12):
        site.write("weights", weights[layer], layer=layer)
    first.close()
    assert _completeness(path) == "complete"
    np.testing.assert_array_equal(zarr.open_array(path / "self/weights")[...], weights)
    attnformat.Writer(path, overwrite=True).close()  # the lock went with the first writer


def test_the_lock_names_the_holder_and_dies_with_it(tmp_path):
    path = tmp_path / "run.zarr"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, attnformat
        writer = attnformat.Writer(sys.argv[1])
        print("ready", flush=True)
        sys.stdin.read()
    """), str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match=rf"held by pid {holder.pid}"):
            attnformat.Writer(path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdin.close()
        holder.stdout.close()
    # The dead writer's lock is gone; its partial store is kept until someone asks to replace it.
    with pytest.raises(attnformat.WriterError, match="earlier writer left"):
        attnformat.Writer(path)
    attnformat.Writer(path, overwrite=True).close()
    assert _completeness(path) == "complete"


# -- replacement is atomic for readers -----------------------------------------------------------
_READER = """
    import os, sys, time, numpy as np, zarr
    from attnformat.engines.placement import pin_directory
    path, stop = sys.argv[1], sys.argv[2]
    reads = torn = errors = 0
    seen = set()
    while not os.path.exists(stop) and reads < 5000:
        try:
            descriptor, pinned = pin_directory(path)
        except FileNotFoundError:
            errors += 1
            continue
        try:
            values = zarr.open_array(pinned + "/weights", mode="r")[...]
            reads += 1
            distinct = np.unique(values)
            if distinct.size != 1 or np.isnan(distinct).any():
                torn += 1
            else:
                seen.add(float(distinct[0]))
        except Exception as error:
            errors += 1
        finally:
            os.close(descriptor)
    print(reads, torn, errors, len(seen))
"""


def _version(directory, value: float) -> None:
    array = zarr.create_array(directory / "weights", shape=(16, 64, 64), chunks=(1, 64, 64), dtype="float32", fill_value=np.nan)
    array[...] = np.full((16, 64, 64), value, np.float32)


def test_readers_see_the_old_directory_or_the_new_one_never_a_mix(tmp_path):
    path = tmp_path / "run.zarr"
    _version(path, 0.0)
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_READER), str(path), str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        for value in range(1, 41):
            staged = tmp_path / f".run.zarr.{value}"
            _version(staged, float(value))
            move_into_place(staged, path)
    finally:
        stop.touch()
        output, _ = reader.communicate(timeout=60)
    reads, torn, errors, versions = map(int, output.split())
    assert reads > 0 and torn == 0 and errors == 0, output
    assert versions >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.zarr", "stop"]  # every old copy removed
    assert np.unique(zarr.open_array(path / "weights")[...]).tolist() == [40.0]


def test_a_pinned_reader_keeps_reading_the_version_it_opened(tmp_path):
    path = tmp_path / "run.zarr"
    _version(path, 1.0)
    descriptor, pinned = pin_directory(path)
    try:
        staged = tmp_path / "staged.zarr"
        _version(staged, 2.0)
        move_into_place(staged, path, wait=0.2)  # the reader holds on past the wait: the old copy goes
        assert np.unique(zarr.open_array(path / "weights")[...]).tolist() == [2.0]
        # What the pinned reader sees now is the old version or nothing, never the new one.
        assert not os.path.exists(os.path.join(pinned, "weights", "zarr.json"))
    finally:
        os.close(descriptor)


def test_replacing_a_single_file_keeps_open_readers_on_the_old_one(tmp_path):
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(b"old" * 1000)
    new.write_bytes(b"new" * 1000)
    with open(old, "rb") as reader:
        move_into_place(new, old)
        assert reader.read() == b"old" * 1000
    assert old.read_bytes() == b"new" * 1000 and not new.exists()


# -- a full disk -------------------------------------------------------------------------------
_FULL_DISK = """
    import resource, signal, sys, numpy as np, attnformat
    from attnformat.errors import WriteFailedError
    if sys.argv[2] == "without-tensorstore":
        sys.modules["tensorstore"] = None
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    rng = np.random.default_rng(0)
    try:
        with attnformat.Writer(sys.argv[1], model_name="toy", model_framework="numpy") as writer:
            site = writer.create_site("self", sizes={"layer": 2, "head": 2, "query": 256, "key": 256}, attrs={"attention_type": "self", "causal": 0})
            site.write("weights", np.zeros((2, 256, 256)), layer=0)  # compresses to almost nothing
            site.write("weights", rng.random((2, 256, 256)), layer=1)  # 256 KiB per head: too large
    except WriteFailedError as error:
        print("WriteFailedError", error)
"""


@pytest.mark.parametrize("road", ["with-tensorstore", "without-tensorstore"])
def test_a_full_disk_fails_clearly_and_keeps_what_was_written(tmp_path, road):
    path = tmp_path / "run.zarr"
    result = _run(_FULL_DISK, path, road)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("WriteFailedError"), result.stdout + result.stderr
    assert "run.zarr.partial.zarr" in result.stdout and "layer=1" in result.stdout
    partial = tmp_path / "run.zarr.partial.zarr"
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial.name]  # no temp files, no lock, no "complete" file
    assert _completeness(partial) == "incomplete"
    stored = zarr.open_array(partial / "self/weights")[...]
    np.testing.assert_array_equal(stored[0], np.zeros((2, 256, 256)))
    assert np.isnan(stored[1]).all()
    leftovers = [p for p in partial.rglob("*") if p.is_file() and (p.name.startswith(".") or "lock" in p.name or "tmp" in p.name)]
    assert leftovers == []


def test_a_full_disk_while_packing_a_zip_keeps_the_partial_incomplete(tmp_path):
    # Each chunk fits under the file-size limit, the zip of all of them does not.
    path = tmp_path / "run.zarr.zip"
    result = _run("""
        import resource, signal, sys, numpy as np, attnformat
        from attnformat.errors import WriteFailedError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        rng = np.random.default_rng(0)
        try:
            with attnformat.Writer(sys.argv[1], model_name="toy", model_framework="numpy") as writer:
                for name in ("a", "b", "c2", "d"):
                    site = writer.create_site(name, sizes={"head": 2, "query": 64, "key": 64}, attrs={"attention_type": "self", "causal": 0})
                    site.write("weights", rng.random((2, 64, 64)))
        except WriteFailedError as error:
            print("WriteFailedError", error)
    """, path)
    assert result.stdout.startswith("WriteFailedError"), result.stdout + result.stderr
    assert "run.zarr.zip" in result.stdout
    partial = tmp_path / "run.zarr.zip.partial.zarr"
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial.name]  # no zip, no scratch directory, no lock
    assert _completeness(partial) == "incomplete"
    for name in ("a", "b", "c2", "d"):  # every map is kept
        assert not np.isnan(zarr.open_array(partial / name / "weights")[...]).any()


# -- names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", "../x", "a//b", "a/", "/", "a/./b", ".zarray", "zarr.json", "c", "a/c", "x/.zattrs", "__x", "a\nb", "tab\t"])
def test_bad_site_names_raise_writer_errors(tmp_path, name):
    writer = attnformat.Writer(tmp_path / "x.zarr")
    with pytest.raises(attnformat.WriterError, match="cannot name a site"):
        writer.create_site(name, sizes={"query": 2, "key": 2})
    writer.close()
    assert list((tmp_path / "x.zarr").iterdir()) == [tmp_path / "x.zarr" / "zarr.json"]  # nothing was created


def test_bad_variable_and_coordinate_names_raise_writer_errors(tmp_path):
    with attnformat.Writer(tmp_path / "x.zarr") as writer:
        with pytest.raises(attnformat.WriterError, match=r"cannot name a variable or coordinate 'zarr\.json'"):
            writer.create_site("a", sizes={"query": 2, "key": 2}, variables=("zarr.json",))
        with pytest.raises(attnformat.WriterError, match=r"cannot name a variable or coordinate '\.zattrs'"):
            writer.create_site("b", sizes={"query": 2, "key": 2}, coords={".zattrs": ("query", [1, 2])})
        site = writer.create_site("d", sizes={"query": 2, "key": 2})
        with pytest.raises(attnformat.WriterError, match="cannot name a variable or coordinate 'a/b'"):
            site.add_variable("a/b", np.ones((2, 2)), ("query", "key"))
        with pytest.raises(attnformat.WriterError, match="inside or around a declared site"):
            writer.create_site("d/e", sizes={"query": 2, "key": 2})
        site.write("weights", np.eye(2))


# -- checksums and both writing roads ------------------------------------------------------------
def _flip_a_bit(chunk) -> None:
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))


@pytest.mark.parametrize("tensorstore", [True, False])
@pytest.mark.parametrize("write_behind", [False, True])
def test_both_roads_write_the_same_checksummed_file(tmp_path, monkeypatch, tensorstore, write_behind):
    if not tensorstore:
        monkeypatch.setitem(sys.modules, "tensorstore", None)
    weights = softmax(np.random.default_rng(4).normal(size=(3, 2, 6, 6))).astype(np.float32)
    weights[2, 1] = np.nan  # a map of fill values is still data: its chunk is stored
    path = tmp_path / "x.zarr"
    with attnformat.Writer(path, write_behind=write_behind) as writer:
        site = writer.create_site("self", sizes={"step": 0, "head": 2, "query": 6, "key": 6}, attrs=SITE_ATTRS)
        for step in range(3):
            site.write("weights", weights[step], step=step * 10)
    array = zarr.open_array(path / "self/weights")
    np.testing.assert_array_equal(array[...], weights)
    assert [codec["name"] for codec in json.loads((path / "self/weights/zarr.json").read_text())["codecs"]] == ["bytes", "blosc", "crc32c"]
    assert (path / "self/weights/c/2/0/0/0").exists()
    _flip_a_bit(path / "self/weights/c/1/0/0/0")
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(path / "self/weights")[1]


def test_zarr_v2_chunks_carry_a_checksum_that_zarr_verifies(tmp_path):
    weights = softmax(np.random.default_rng(5).normal(size=(2, 2, 6, 6))).astype(np.float32)
    path = tmp_path / "v2.zarr"
    with attnformat.Writer(path, zarr_format=2) as writer:
        site = writer.create_site("self", sizes={"layer": 2, "head": 2, "query": 6, "key": 6}, attrs=SITE_ATTRS, keepbits={"weights": 8})
        for layer in range(2):
            site.write("weights", weights[layer], layer=layer)
    metadata = json.loads((path / "self/weights/.zarray").read_text())
    assert metadata["compressor"] == {"id": "crc32c"}
    assert [(f["id"], f["shuffle"]) for f in metadata["filters"]] == [("blosc", 2)]  # bit-shuffle: bit-rounded
    np.testing.assert_allclose(zarr.open_array(path / "self/weights")[...], weights, rtol=2.0**-9)
    _flip_a_bit(path / "self/weights/0.0.0.0")
    with pytest.raises(RuntimeError, match="checksum"):
        zarr.open_array(path / "self/weights")[...]
