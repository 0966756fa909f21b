"""The Zarr screen refuses hostile stores before zarr or numcodecs parses them, whatever road the
file takes (directory, zip, URL) and however its metadata is spelled; files attnformat and zarr
write pass it.

The pickle payload of the ATTN-STORE-003 fixture touches a marker file when unpickled; every
crafted store below is first shown to really reach numcodecs' Pickle.decode when handed to zarr
directly (so each bypass is real), then shown to be refused by the screen without reaching it.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import stat
import threading
import tracemalloc
import zipfile
from pathlib import Path

import numcodecs.pickles
import numpy as np
import pytest
import zarr

import attnformat
from attnformat.engines import zarr_screen
from attnformat.engines.common import Location
from attnformat.errors import BrokenStoreError
from attnformat.examples import build

FIXTURE = Path(__file__).resolve().parents[2] / "spec" / "conformance" / "invalid" / "ATTN-STORE-003.zarr"
MARKER = "attnformat-pickle-executed"
METADATA = (".zarray", ".zgroup", ".zattrs", ".zmetadata", "zarr.json")


@pytest.fixture
def pickle_calls(tmp_path, monkeypatch):
    """Every call of numcodecs' Pickle.decode (recorded, never run); the marker's folder is the cwd.

    zarr 3.1 no longer resolves any pickle codec by itself (older releases read Zarr v2 object
    arrays through one); a plugin that registers one makes it reachable again, and is what this
    fixture installs for the duration of the test, so that each bypass below is shown to be real.
    """
    from zarr.abc.codec import BytesBytesCodec

    class PicklePlugin(BytesBytesCodec):
        is_fixed_size = False

        @classmethod
        def from_dict(cls, data):
            return cls()

        def to_dict(self):
            return {"name": "numcodecs.pickle"}

        async def _decode_single(self, chunk_bytes, chunk_spec):
            decoded = numcodecs.pickles.Pickle().decode(chunk_bytes.as_numpy_array())
            return chunk_spec.prototype.buffer.from_bytes(np.asarray(decoded, dtype="float64").tobytes())

        async def _encode_single(self, chunk_bytes, chunk_spec):
            raise NotImplementedError

        def compute_encoded_size(self, input_byte_length, chunk_spec):
            raise NotImplementedError

    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(numcodecs.pickles.Pickle, "decode", lambda self, buf, out=None: calls.append(bytes(buf)) or np.zeros(1))
    zarr.registry.register_codec("numcodecs.pickle", PicklePlugin)
    try:
        yield calls
    finally:
        getattr(zarr.registry, "__codec_registries").pop("numcodecs.pickle", None)
    assert not (tmp_path / MARKER).exists()


def _rewrite_metadata(store: Path, change) -> None:
    for file in store.rglob("*"):
        if file.is_file() and file.name in METADATA:
            file.write_bytes(change(file.read_bytes()))


ENCODINGS = {"utf16-le": "utf-16-le", "utf16-be": "utf-16-be", "utf16-bom": "utf-16", "utf32-le": "utf-32-le", "utf32-bom": "utf-32"}


def _disguise(store: Path, variant: str) -> None:
    if variant == "escaped":
        _rewrite_metadata(store, lambda raw: raw.replace(b'pickle"', b'pick\\u006ce"'))
    elif variant in ENCODINGS:
        _rewrite_metadata(store, lambda raw: raw.decode("utf-8").encode(ENCODINGS[variant]))


def _crafted(tmp_path: Path, variant: str) -> Path:
    """A Zarr v3 store whose array encoder/<group>/note goes through a pickle codec, its chunk the
    fixture's payload, the codec's name hidden in one way (consolidated unless the group is "c")."""
    store = tmp_path / f"{variant}.zarr"
    group = "c" if variant == "group-named-c" else "self"
    root = zarr.open_group(store, mode="w")
    root.create_group("encoder").create_group(group).create_array("note", shape=(1,), dtype="float64", compressors=None, fill_value=0.0)[:] = [1.0]
    document = store / "encoder" / group / "note" / "zarr.json"
    metadata = json.loads(document.read_text())
    metadata["codecs"].append({"name": "numcodecs.pickle"})
    document.write_text(json.dumps(metadata))
    (store / "encoder" / group / "note" / "c" / "0").write_bytes((FIXTURE / "encoder/self/note/0").read_bytes())
    if group != "c":
        zarr.consolidate_metadata(store)
    _disguise(store, variant)
    return store


def _crafted_v2(tmp_path: Path, variant: str) -> Path:
    """A copy of the Zarr v2 fixture (pickle filter on an object array), disguised the same ways."""
    store = tmp_path / f"{variant}-v2.zarr"
    shutil.copytree(FIXTURE, store)
    if variant == "group-named-c":
        (store / ".zmetadata").unlink()
        (store / "encoder" / "self").rename(store / "encoder" / "c")
    _disguise(store, variant)
    return store


BYPASSES = ["escaped", *ENCODINGS, "group-named-c"]


@pytest.mark.parametrize("variant", BYPASSES)
def test_each_crafted_store_really_reaches_pickle_in_zarr(tmp_path, pickle_calls, variant):
    # Ground truth for the tests below: zarr itself parses the disguised metadata and unpickles.
    store = _crafted(tmp_path, variant)
    group = zarr.open_group(store, mode="r")
    assert [name for name, _ in group.members(max_depth=None)][-1].endswith("/note")
    group["encoder/c/note" if variant == "group-named-c" else "encoder/self/note"][...]
    assert pickle_calls


@pytest.mark.parametrize("variant", BYPASSES)
def test_pickle_is_refused_however_the_metadata_spells_it(tmp_path, pickle_calls, variant):
    for store in (_crafted(tmp_path, variant), _crafted_v2(tmp_path, variant)):
        with pytest.raises(BrokenStoreError, match=r"uses a pickle codec \[ATTN-STORE-003\]") as caught:
            zarr_screen.screen_zarr(store)
        assert caught.value.rule_id == "ATTN-STORE-003"
        assert caught.value.location.endswith("/note")
        with pytest.raises(attnformat.UnreadableFileError, match="ATTN-STORE-003"):
            attnformat.open(store)
    assert pickle_calls == []


@pytest.mark.parametrize("variant", ["escaped", "utf16-bom", "group-named-c"])
def test_pickle_is_refused_inside_a_zip(tmp_path, pickle_calls, variant):
    store = _crafted(tmp_path, variant)
    archive = tmp_path / f"{variant}.zarr.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for file in sorted(p for p in store.rglob("*") if p.is_file()):
            bundle.write(file, file.relative_to(store).as_posix())
    with pytest.raises(BrokenStoreError, match=r"ATTN-STORE-003") as caught:
        zarr_screen.screen_zarr(archive)
    assert caught.value.rule_id == "ATTN-STORE-003"
    with pytest.raises(attnformat.UnreadableFileError, match="ATTN-STORE-003"):
        attnformat.open(archive)
    assert pickle_calls == []


def test_case_variants_and_any_name_containing_pickle_are_refused():
    for codecs in ([{"name": "Pickle"}], ["numcodecs.pickle"], [{"name": "sharding_indexed", "configuration": {"chunk_shape": [1], "codecs": [{"name": "numcodecs.PICKLE"}]}}]):
        document = {"zarr_format": 3, "node_type": "array", "shape": [1], "data_type": "string",
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1]}}, "codecs": codecs}
        with pytest.raises(BrokenStoreError, match="ATTN-STORE-003"):
            zarr_screen.screen_document(json.dumps(document).encode(), "x/zarr.json", "run.zarr")
    # A user's attributes are text, never codecs: saying "pickle" there is fine.
    zarr_screen.screen_document(b'{"zarr_format": 3, "node_type": "group", "attributes": {"note": "no pickle"}}', "zarr.json", "run.zarr")


@pytest.fixture
def http_server(tmp_path):
    """``(base URL, folder)`` of a file server on 127.0.0.1, stopped when the test ends."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("variant", ["escaped", "utf16-le", "group-named-c"])
def test_pickle_is_refused_over_http(tmp_path, pickle_calls, http_server, variant):
    base, folder = http_server
    store = _crafted(tmp_path, variant)
    shutil.copytree(store, folder / store.name)
    url = f"{base}/{store.name}"
    with pytest.raises(BrokenStoreError, match="ATTN-STORE-003") as caught:
        zarr_screen.screen_zarr(url)
    assert caught.value.rule_id == "ATTN-STORE-003"
    with pytest.raises(attnformat.UnreadableFileError, match="ATTN-STORE-003"):
        attnformat.open(url)
    assert pickle_calls == []


def test_files_attnformat_and_zarr_write_pass_the_screen(tmp_path, http_server):
    base, folder = http_server
    tree = build("encoder-decoder")
    for name, options in (("v3.zarr", {}), ("v2.zarr", {"zarr_format": 2}), ("v3.zarr.zip", {})):
        path = attnformat.save(tree, folder / name, **options)
        zarr_screen.screen_zarr(path)
        if not name.endswith(".zip"):
            zarr_screen.screen_zarr(f"{base}/{name}")
    plain = zarr.open_group(folder / "plain.zarr", mode="w")  # no consolidated metadata
    plain.create_group("c").create_array("note", shape=(2,), dtype=str)
    zarr_screen.screen_zarr(folder / "plain.zarr")
    zarr_screen.screen_zarr(f"{base}/plain.zarr")


# -- ATTN-STORE-004: nothing in a directory may lead outside it --


def _saved(tmp_path) -> Path:
    return attnformat.save(build("dense"), tmp_path / "dense.zarr")


def _a_chunk(store: Path) -> Path:
    return next(p for p in sorted((store / "encoder/self/weights/c").rglob("*")) if p.is_file())


def test_a_symlinked_chunk_is_refused(tmp_path):
    store = _saved(tmp_path)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    chunk = _a_chunk(store)
    chunk.unlink()
    chunk.symlink_to(outside)
    with pytest.raises(BrokenStoreError, match=r"is a symbolic link \[ATTN-STORE-004\]") as caught:
        zarr_screen.screen_zarr(store)
    assert caught.value.rule_id == "ATTN-STORE-004"


def test_a_symlinked_folder_is_refused_and_the_top_may_be_a_link(tmp_path):
    store = _saved(tmp_path)
    link = tmp_path / "link.zarr"
    link.symlink_to(store)
    zarr_screen.screen_zarr(link)  # the user chose this link
    elsewhere = tmp_path / "elsewhere"
    (store / "encoder/self/weights/c").rename(elsewhere)
    (store / "encoder/self/weights/c").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(BrokenStoreError, match="ATTN-STORE-004"):
        zarr_screen.screen_zarr(link)


def test_a_fifo_chunk_is_refused_without_blocking(tmp_path):
    store = _saved(tmp_path)
    chunk = _a_chunk(store)
    chunk.unlink()
    os.mkfifo(chunk)
    with pytest.raises(BrokenStoreError, match=r"is a FIFO \[ATTN-STORE-004\]"):
        zarr_screen.screen_zarr(store)
    with pytest.raises(BrokenStoreError, match="ATTN-STORE-004"):
        zarr_screen.open_regular_file(chunk)  # opening it would block without O_NONBLOCK


def test_a_device_file_or_a_socket_is_refused(tmp_path, monkeypatch):
    import socket

    store = _saved(tmp_path)
    chunk = _a_chunk(store)
    chunk.unlink()
    if os.geteuid() == 0:
        os.mknod(chunk, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers
        with pytest.raises(BrokenStoreError, match=r"is a device file \[ATTN-STORE-004\]"):
            zarr_screen.screen_zarr(store)
        chunk.unlink()
    monkeypatch.chdir(chunk.parent)  # a socket's path is limited to ~107 bytes: bind it relatively
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(chunk.name)
        with pytest.raises(BrokenStoreError, match=r"is a socket \[ATTN-STORE-004\]"):
            zarr_screen.screen_zarr(store)


# -- ATTN-STORE-006: declared sizes are bounded before anything is allocated --


def _array_document(**changes) -> dict:
    document = {"zarr_format": 3, "node_type": "array", "shape": [4, 4], "data_type": "float32",
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 2]}},
                "chunk_key_encoding": {"name": "default"}, "fill_value": 0, "codecs": [{"name": "bytes"}]}
    document.update(changes)
    return document


@pytest.mark.parametrize("changes, problem", [
    ({"shape": [1] * 33, "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1] * 33}}}, "33 dimensions"),
    ({"shape": [-4, 4]}, "not a list of non-negative integers"),
    ({"shape": [4.5, 4]}, "not a list of non-negative integers"),
    ({"shape": [1 << 40, 1 << 40]}, "elements, more than 2\\*\\*63"),
    ({"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [0, 2]}}}, "not 2 positive integers"),
    ({"shape": [1 << 20, 1 << 20], "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1 << 14, 1 << 13]}}}, "decodes to 536870912 bytes"),
])
def test_declared_sizes_beyond_the_bounds_are_refused(tmp_path, changes, problem):
    store = tmp_path / "bounds.zarr"
    zarr.open_group(store, mode="w").create_array("x", shape=(4, 4), chunks=(2, 2), dtype="float32")
    (store / "x" / "zarr.json").write_text(json.dumps(_array_document(**changes)))
    with pytest.raises(BrokenStoreError, match=problem + r".*\[ATTN-STORE-006\]") as caught:
        zarr_screen.screen_zarr(store)
    assert caught.value.rule_id == "ATTN-STORE-006"


def test_an_oversized_metadata_document_is_refused_without_reading_it(tmp_path):
    store = _saved(tmp_path)
    with open(store / "encoder" / "zarr.json", "r+b") as handle:
        handle.truncate(zarr_screen.MAX_METADATA_DOCUMENT_BYTES + 1)  # sparse: costs no disk
    tracemalloc.start()
    try:
        with pytest.raises(BrokenStoreError, match="ATTN-STORE-006"):
            zarr_screen.screen_zarr(store)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def _zip_with_declared_size(tmp_path: Path, entry: str, declared: int) -> Path:
    """A zip of a valid store whose ``entry`` claims ``declared`` bytes in the central directory."""
    store = _saved(tmp_path)
    archive = tmp_path / "lying.zarr.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for file in sorted(p for p in store.rglob("*") if p.is_file()):
            bundle.write(file, file.relative_to(store).as_posix())
    raw = bytearray(archive.read_bytes())
    name = entry.encode()
    central = raw.index(b"PK\x01\x02" + b"", raw.index(b"PK\x01\x02"))
    while True:  # find the central directory record of the entry
        length = int.from_bytes(raw[central + 28:central + 30], "little")
        if raw[central + 46:central + 46 + length] == name:
            break
        central = raw.index(b"PK\x01\x02", central + 4)
    raw[central + 24:central + 28] = declared.to_bytes(4, "little")  # uncompressed size
    archive.write_bytes(bytes(raw))
    return archive


def test_a_zip_entry_declaring_2_gib_is_refused_without_inflating_it(tmp_path):
    archive = _zip_with_declared_size(tmp_path, "zarr.json", (2 << 30) - 1)
    assert zipfile.ZipFile(archive).getinfo("zarr.json").file_size == (2 << 30) - 1  # the lie is what zip readers see
    tracemalloc.start()
    try:
        with pytest.raises(BrokenStoreError, match=r"zarr.json declares 2147483647 bytes.*\[ATTN-STORE-006\]"):
            zarr_screen.screen_zarr(archive)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_a_zip_bomb_entry_is_refused(tmp_path):
    store = _saved(tmp_path)
    archive = tmp_path / "bomb.zarr.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for file in sorted(p for p in store.rglob("*") if p.is_file()):
            bundle.write(file, file.relative_to(store).as_posix())
        bundle.writestr(zipfile.ZipInfo("encoder/self/weights/c/9/9/9/9"), b"\0" * (8 << 20), compress_type=zipfile.ZIP_BZIP2)
    info = zipfile.ZipFile(archive).getinfo("encoder/self/weights/c/9/9/9/9")
    assert info.file_size > zarr_screen.MAX_COMPRESSION_RATIO * info.compress_size
    with pytest.raises(BrokenStoreError, match=r"more than 1100 times \[ATTN-STORE-006\]"):
        zarr_screen.screen_zarr(archive)


def test_metadata_that_is_not_json_is_unreadable_not_a_crash(tmp_path):
    store = _saved(tmp_path)
    (store / "encoder" / "zarr.json").write_bytes(b"[" * 100_000)
    with pytest.raises(attnformat.UnreadableFileError, match="encoder/zarr.json is not valid JSON"):
        zarr_screen.screen_zarr(store)


def test_screen_cost_follows_the_store_not_its_declarations(tmp_path):
    # A grid of 2**60 chunks declared, two stored: nothing iterates the grid.
    store = tmp_path / "huge.zarr"
    array = zarr.create_array(store, shape=(1 << 30, 1 << 30), chunks=(1, 1), dtype="int8", fill_value=0)
    array[0, 0] = 1
    array[5, 7] = 1
    zarr_screen.screen_zarr(store)
    assert zarr_screen.stored_chunks(Location.of(store), "") == ((1, 1), [(0, 0), (5, 7)])


def test_a_store_changed_after_screening_is_still_refused_through_the_screened_store(tmp_path, pickle_calls, http_server):
    # A server may answer the screen with clean metadata and zarr, a moment later, with another.
    base, folder = http_server
    clean = attnformat.save(build("dense"), folder / "changing.zarr")
    url = f"{base}/changing.zarr"
    zarr_screen.screen_zarr(url)
    shutil.rmtree(clean)
    shutil.copytree(_crafted(tmp_path, "escaped"), clean)
    plain = zarr.open_group(zarr.storage.FsspecStore.from_url(url, read_only=True), mode="r")
    plain["encoder/self/note"][...]
    assert len(pickle_calls) == 1  # without the wrapper, zarr reaches the pickle codec
    screened = zarr_screen.screened_store(zarr.storage.FsspecStore.from_url(url, read_only=True), url)
    with pytest.raises(BrokenStoreError, match=r"/encoder/self/note uses a pickle codec \[ATTN-STORE-003\]"):
        zarr.open_group(screened, mode="r")
    assert len(pickle_calls) == 1


def test_node_paths_named_like_skipped_keys_are_still_screened():
    pickled = {"zarr_format": 3, "node_type": "array", "shape": [1], "data_type": "float64",
               "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1]}}, "codecs": [{"name": "bytes"}, {"name": "numcodecs.pickle"}]}
    for path in ("attributes", "dimension_names", "x/.zattrs"):
        root = {"zarr_format": 3, "node_type": "group", "attributes": {},
                "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": {path: pickled}}}
        with pytest.raises(BrokenStoreError, match=r"uses a pickle codec \[ATTN-STORE-003\]"):
            zarr_screen.screen_document(json.dumps(root).encode(), "zarr.json", "run.zarr")
    # What zarr reads as attributes stays text: .zattrs documents and their consolidated entries.
    zarr_screen.screen_document(b'{"note": "pickle"}', "x/.zattrs", "run.zarr")
    zarr_screen.screen_document(b'{"metadata": {"x/.zattrs": {"filters": "pickle"}}, "zarr_consolidated_format": 1}', ".zmetadata", "run.zarr")
