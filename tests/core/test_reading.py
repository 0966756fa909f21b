"""Opening is lazy and read-only, and bad paths give clear errors."""

from __future__ import annotations

import numpy as np
import pytest

import attnformat
from attnformat.examples import build


def test_reading_one_head_touches_only_its_chunk(tmp_path):
    tree = build("dense")
    path = attnformat.save(tree, tmp_path / "dense.zarr")
    chunk_dir = path / "encoder" / "self" / "weights" / "c"
    for chunk in chunk_dir.rglob("*"):
        if chunk.is_file() and chunk.relative_to(chunk_dir).parts[:2] != ("1", "2"):
            chunk.write_bytes(b"not a chunk")  # any read of another head would now fail
    opened = attnformat.open(path)
    np.testing.assert_array_equal(opened["encoder/self"]["weights"].sel(layer=1, head=2).values, tree["encoder/self"]["weights"].values[1, 2])
    with pytest.raises(Exception):
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
