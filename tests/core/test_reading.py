"""Opening is lazy and read-only, and bad paths give clear errors."""

from __future__ import annotations

import numpy as np
import pytest

import attnformat
from attnformat.examples import build


def test_reading_one_head_touches_only_its_chunk(tmp_path):
    # Maps of 256 x 256 are large enough to be one chunk each (small maps are grouped).
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 256, 256)).astype("float32")
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    path = tmp_path / "big.zarr"
    with attnformat.Writer(path, model_name="toy", model_framework="numpy") as writer:
        site = writer.create_site("encoder/self", sizes={"layer": 2, "head": 3, "query": 256, "key": 256}, attrs={"attention_type": "self", "causal": 0})
        site.write("weights", weights)
    chunk_dir = path / "encoder" / "self" / "weights" / "c"
    for chunk in chunk_dir.rglob("*"):
        if chunk.is_file() and chunk.relative_to(chunk_dir).parts[:2] != ("1", "2"):
            chunk.write_bytes(b"not a chunk")  # any read of another head would now fail
    opened = attnformat.open(path)
    np.testing.assert_array_equal(opened["encoder/self"]["weights"].sel(layer=1, head=2).values, weights[1, 2])
    with pytest.raises(attnformat.UnreadableFileError, match=r"weights/c/0/0/0/0.*\[ATTN-STORE-005\]"):
        opened["encoder/self"]["weights"].sel(layer=0, head=0).values


def test_open_is_lazy_for_attention_variables(tmp_path):
    path = attnformat.save(build("steps"), tmp_path / "steps.zarr")
    weights = attnformat.open(path)["trunk/iga"].to_dataset(inherit=False).variables["weights"]
    assert not isinstance(weights._data, np.ndarray)


@pytest.mark.parametrize("content", [b"", b"hello", b"PK\x03\x04garbage", b"\x89HDF\r\n\x1a\nbroken"])
def test_garbage_files_raise_unreadable_file_error_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.h5"
    path.write_bytes(content)
    with pytest.raises(attnformat.UnreadableFileError, match="bad.h5"):
        attnformat.open(path)


def test_missing_and_unknown_paths(tmp_path):
    with pytest.raises(attnformat.UnreadableFileError, match="no such file"):
        attnformat.open(tmp_path / "missing.zarr")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(attnformat.UnreadableFileError, match="notes.txt"):
        attnformat.open(tmp_path / "notes.txt")
    with pytest.raises(attnformat.UnsupportedFormatError, match="cannot tell the storage"):
        attnformat.save(build("dense"), tmp_path / "out.pickle")


def test_site_selection_lists_what_exists():
    tree = attnformat.open(attnformat.example_path("encoder-decoder"))
    with pytest.raises(attnformat.SelectionError, match="sites: decoder/cross, decoder/self, encoder/self"):
        attnformat.get_site(tree, "encoder/cross")
    assert attnformat.get_site(tree, "decoder/cross").attrs["key_site"] == "encoder/self"


def test_save_refuses_nonconforming_trees_and_existing_paths(tmp_path):
    tree = build("dense")
    tree.attrs = {**tree.attrs, "completeness": "maybe"}
    with pytest.raises(attnformat.NonConformingError, match="ATTN-ROOT-004"):
        attnformat.save(tree, tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()
    attnformat.save(build("dense"), tmp_path / "y.zarr")
    with pytest.raises(attnformat.AttnFormatError, match="already exists"):
        attnformat.save(build("dense"), tmp_path / "y.zarr")


def test_a_store_with_a_pickle_codec_is_refused_before_anything_is_decoded(tmp_path, monkeypatch):
    import shutil
    import zipfile
    from pathlib import Path

    fixture = Path(__file__).resolve().parents[2] / "spec" / "conformance" / "invalid" / "ATTN-STORE-003.zarr"
    monkeypatch.chdir(tmp_path)  # the payload would leave a marker file here if ever unpickled
    archive = tmp_path / "pickled.zarr.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for file in sorted(p for p in fixture.rglob("*") if p.is_file()):
            bundle.write(file, file.relative_to(fixture).as_posix())
    for path in (fixture, archive):
        with pytest.raises(attnformat.UnreadableFileError, match=r"/encoder/self/note uses a pickle codec \[ATTN-STORE-003\]"):
            attnformat.open(path)
        with pytest.raises(attnformat.UnreadableFileError, match="ATTN-STORE-003"):
            attnformat.read_map(path, "encoder/self", layer=0)
        assert [f.rule_id for f in attnformat.validate(path).errors] == ["ATTN-STORE-003"]
    copy = tmp_path / "copy.zarr"
    shutil.copytree(fixture, copy)
    (copy / ".zmetadata").unlink()  # without consolidated metadata the per-array file is caught
    with pytest.raises(attnformat.UnreadableFileError, match="ATTN-STORE-003"):
        attnformat.open(copy)
    assert not (tmp_path / "attnformat-pickle-executed").exists()


def test_open_reads_zarr_and_hdf5_over_http(tmp_path):
    import functools
    import http.server
    import threading

    import xarray as xr

    tree = build("encoder-decoder")
    attnformat.save(tree, tmp_path / "served.zarr")
    attnformat.save(tree, tmp_path / "served.nc")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for name in ("served.zarr", "served.nc"):
            remote = attnformat.open(f"{base}/{name}")
            xr.testing.assert_identical(remote, tree)
            assert attnformat.source_of(remote) == f"{base}/{name}"
        with pytest.raises(attnformat.UnreadableFileError, match="missing.zarr"):
            attnformat.open(f"{base}/missing.zarr")
    finally:
        server.shutdown()
        thread.join()


def test_a_lazily_opened_tree_refuses_to_be_pickled():
    """Its arrays read through a directory pinned by this process' file descriptor: in another
    process that path would name something else, so the tree says so instead of travelling."""
    import pickle

    tree = attnformat.open(attnformat.example_path("dense"))
    with pytest.raises(attnformat.AttnFormatError, match=r"encoder/self/\w+: a lazily opened attention array cannot be sent"):
        pickle.dumps(tree)
    loaded = tree["encoder/self"].to_dataset().load()  # values read first travel fine
    assert pickle.loads(pickle.dumps(loaded))["weights"].equals(loaded["weights"])
