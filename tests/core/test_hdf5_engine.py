"""The HDF5 engine: hostile files refused, damage named, one-map reads identical to the tree.

Hostile files are crafted with h5py from a valid attnformat file, adding one hostile object to
its site; the ground truth for values is h5py's own reading of the file.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import xarray as xr

import attnformat
from attnformat.engines.common import Location
from attnformat.engines.hdf5 import CHUNK_TRAILERS_ATTR, TEXT_CHECKSUM_ATTR, Hdf5Engine
from attnformat.errors import AttnFormatError, BrokenStoreError, WriteFailedError
from attnformat.examples import build

SITE = "encoder/self"


@pytest.fixture()
def dense(tmp_path):
    """A valid HDF5 attention file (the dense example)."""
    return attnformat.save(build("dense"), tmp_path / "dense.h5")


def _refused(path, rule_id: str, node: str) -> BrokenStoreError:
    with pytest.raises(BrokenStoreError) as caught:
        attnformat.open(path)
    assert caught.value.rule_id == rule_id
    assert node in caught.value.location
    assert str(path) in str(caught.value) and f"[{rule_id}]" in str(caught.value)
    assert "\n" not in str(caught.value)
    return caught.value


def test_external_storage_is_refused_before_its_file_is_read(dense, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(36, dtype="float32").tobytes())
    with h5py.File(dense, "a") as h5file:
        h5file[SITE].create_dataset("leak", shape=(36,), dtype="float32", external=[(str(secret), 0, 144)])
    with h5py.File(dense, "r") as h5file:  # the ground truth: libhdf5 would read the other file
        assert h5file[SITE]["leak"][5] == 5
    error = _refused(dense, "ATTN-STORE-004", "/encoder/self/leak")
    assert "secret.bin" in str(error)


def test_virtual_dataset_is_refused(dense, tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5file:
        h5file["data"] = np.arange(6, dtype="float32")
    layout = h5py.VirtualLayout(shape=(6,), dtype="float32")
    layout[:] = h5py.VirtualSource(str(other), "data", shape=(6,))
    with h5py.File(dense, "a") as h5file:
        h5file[SITE].create_virtual_dataset("mapped", layout)
    _refused(dense, "ATTN-STORE-004", "/encoder/self/mapped")


def test_external_link_is_refused(dense, tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5file:
        h5file["data"] = np.arange(6, dtype="float32")
    with h5py.File(dense, "a") as h5file:
        h5file[SITE]["linked"] = h5py.ExternalLink(str(other), "/data")
    error = _refused(dense, "ATTN-STORE-004", "/encoder/self/linked")
    assert "external link" in str(error)


def test_soft_link_is_refused(dense):
    with h5py.File(dense, "a") as h5file:
        h5file[SITE]["alias"] = h5py.SoftLink("/encoder/self/weights")
    error = _refused(dense, "ATTN-STORE-004", "/encoder/self/alias")
    assert "soft link" in str(error)


def test_hard_link_cycle_is_refused_instead_of_walked_forever(dense):
    with h5py.File(dense, "a") as h5file:
        h5file[SITE]["loop"] = h5file["encoder"]
    error = _refused(dense, "ATTN-STORE-004", "/encoder/self/loop")
    assert "/encoder" in str(error)


def test_filter_that_would_load_a_plugin_is_refused(dense):
    # 47000 is registered to no filter, so no plugin (netCDF4 ships some and points HDF5 at them
    # when imported) can answer for it in any process.
    with h5py.File(dense, "a") as h5file:
        h5file[SITE].create_dataset("packed", shape=(4, 4), dtype="float32", chunks=(4, 4), compression=47000, allow_unknown_filter=True)
    with h5py.File(dense, "r") as h5file:  # the ground truth: the dataset names filter 47000
        plist = h5file[SITE]["packed"].id.get_create_plist()
        assert [plist.get_filter(index)[0] for index in range(plist.get_nfilters())] == [47000]
    error = _refused(dense, "ATTN-STORE-004", "/encoder/self/packed")
    assert "47000" in str(error)


def test_declared_sizes_over_the_bounds_are_refused(dense):
    from attnformat.conventions import MAX_CHUNK_BYTES

    side = int((MAX_CHUNK_BYTES // 4) ** 0.5) + 2  # one float32 chunk just over the bound
    with h5py.File(dense, "a") as h5file:
        h5file[SITE].create_dataset("huge", shape=(side, side), dtype="float32", chunks=(side, side))
    error = _refused(dense, "ATTN-STORE-006", "/encoder/self/huge")
    assert "MAX_CHUNK_BYTES" in str(error)


def test_every_numeric_array_is_written_with_a_checksum(dense):
    with h5py.File(dense, "r") as h5file:
        numeric = [h5file[SITE][name] for name in h5file[SITE] if h5file[SITE][name].dtype.kind in "iuf" and h5file[SITE][name].chunks]
        assert {"weights", "logits", "layer", "head"} <= {dataset.name.rsplit("/", 1)[-1] for dataset in numeric}
        assert all(dataset.fletcher32 and dataset.compression == "gzip" and dataset.shuffle for dataset in numeric)


def _flip_in_chunk(path, variable: str, grid: tuple[int, ...]) -> None:
    with h5py.File(path, "r") as h5file:
        dataset = h5file[variable]
        info = dataset.id.get_chunk_info_by_coord(tuple(index * size for index, size in zip(grid, dataset.chunks)))
    with open(path, "r+b") as handle:
        handle.seek(info.byte_offset + info.size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x10]))


def test_a_flipped_bit_in_a_chunk_is_a_named_checksum_error_on_every_road(dense, tmp_path):
    with h5py.File(dense, "r") as h5file:
        chunks = h5file[SITE]["weights"].chunks
        original = h5file[SITE]["weights"][()]
    damaged_grid = (0,) * 4
    _flip_in_chunk(dense, f"{SITE}/weights", damaged_grid)
    with h5py.File(dense, "r") as h5file, pytest.raises(OSError):  # libhdf5 itself sees the damage
        h5file[SITE]["weights"][()]

    tree = attnformat.open(dense)  # metadata is intact: opening works, reading the chunk does not
    with pytest.raises(BrokenStoreError) as caught:
        tree[SITE]["weights"].values
    assert caught.value.rule_id == "ATTN-STORE-005"
    message = str(caught.value)
    assert str(dense) in message and "/encoder/self/weights" in message and str(damaged_grid) in message

    with pytest.raises(BrokenStoreError, match=r"ATTN-STORE-005"):
        attnformat.read_map(dense, SITE, layer=0, head=0)
    with pytest.raises(BrokenStoreError, match=r"ATTN-STORE-005"):
        attnformat.convert(dense, tmp_path / "copy.h5")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dense.h5"]  # no partial copy left
    if chunks[0] * chunks[1] < original.shape[0] * original.shape[1]:  # other chunks still read
        last = attnformat.read_map(dense, SITE, layer=original.shape[0] - 1, head=original.shape[1] - 1)
        np.testing.assert_array_equal(last.values, original[-1, -1])


@pytest.mark.parametrize(
    ("name", "site", "variable", "selection"),
    [
        ("dense", "encoder/self", "weights", {"layer": 1, "head": 2}),
        ("dense", "encoder/self", "logits", {"layer": 0}),
        ("padded-batch", "encoder/self", "weights", {"sample": 1, "layer": 0}),
        ("steps", "trunk/iga", "bias", {"step": 200, "layer": 1, "head": 0}),
        ("edge-time", "temporal", "weights", {"node": 3}),
        ("image", "encoder/self", "weights", {"layer": 0}),
    ],
)
def test_read_map_is_identical_to_selecting_from_the_tree_and_to_h5py(tmp_path, name, site, variable, selection):
    path = attnformat.save(build(name), tmp_path / f"{name}.h5")
    fast = Hdf5Engine().read_map(Location.of(path), site, variable, selection)
    assert fast is not None
    # Independent ground truth: xarray's own h5netcdf reading of the same file.
    with xr.open_datatree(path, engine="h5netcdf") as reference:
        expected = reference[site].to_dataset(inherit=False)[variable].sel(selection).load()
        expected = expected.assign_coords({k: c.astype(object) for k, c in expected.coords.items() if c.dtype.kind == "U"})
    for coord in expected.coords.values():  # storage bookkeeping the engine checks and hides
        coord.attrs.pop(TEXT_CHECKSUM_ATTR, None)
        coord.attrs.pop(CHUNK_TRAILERS_ATTR, None)
    expected.attrs.pop(CHUNK_TRAILERS_ATTR, None)
    xr.testing.assert_identical(fast, expected)
    xr.testing.assert_identical(fast, attnformat.open(path)[site].to_dataset(inherit=False)[variable].sel(selection).load())
    with h5py.File(path, "r") as h5file:
        dataset = h5file[site][variable]
        dims = [h5file[refs[-1]].name.rsplit("/", 1)[-1] for refs in dataset.attrs["DIMENSION_LIST"]]
        key = tuple(_h5py_position(h5file[site], dim, selection[dim]) if dim in selection else slice(None) for dim in dims)
        np.testing.assert_array_equal(fast.values, dataset[key])


def _h5py_position(group, dim: str, label) -> int:
    """Where ``label`` is along ``dim``, from the netCDF dimension's own values when it has them."""
    scale = group.get(dim)
    is_variable = scale is not None and not bytes(scale.attrs.get("NAME", b"")).startswith(b"This is a netCDF dimension")
    return int(np.flatnonzero(scale[()] == label)[0]) if is_variable else int(label)


def test_read_map_leaves_cf_encoded_files_to_the_tree_road(dense):
    with h5py.File(dense, "a") as h5file:
        h5file[SITE]["weights"].attrs["scale_factor"] = 2.0
    assert Hdf5Engine().read_map(Location.of(dense), SITE, "weights", {"layer": 0, "head": 0}) is None
    # ...which decodes it as xarray does
    with h5py.File(dense, "r") as h5file:
        raw = h5file[SITE]["weights"][0, 0]
    np.testing.assert_allclose(attnformat.read_map(dense, SITE, layer=0, head=0).values, raw * 2.0)


def test_stored_chunks_lists_what_the_chunk_index_holds(dense):
    engine = Hdf5Engine()
    with h5py.File(dense, "r") as h5file:
        dataset = h5file[SITE]["weights"]
        expected_shape = dataset.chunks
        expected = sorted(
            tuple(offset // size for offset, size in zip(dataset.id.get_chunk_info(index).chunk_offset, dataset.chunks))
            for index in range(dataset.id.get_num_chunks())
        )
    shape, stored = engine.stored_chunks(Location.of(dense), f"{SITE}/weights")
    assert shape == expected_shape and stored == expected and len(stored) > 0
    with h5py.File(dense, "a") as h5file:  # declared but never written: nothing stored
        h5file[SITE].create_dataset("empty", shape=(4, 4), chunks=(2, 2), dtype="float32")
    assert engine.stored_chunks(Location.of(dense), f"{SITE}/empty") == ((2, 2), [])


def test_url_gives_the_same_tree_and_dtypes_as_the_local_path(dense, http_root):
    base, folder = http_root
    shutil.copy(dense, folder / "engine-dense.h5")
    local = attnformat.open(dense)
    remote = attnformat.open(f"{base}/engine-dense.h5")
    xr.testing.assert_identical(remote, local)
    for node in remote.subtree:
        for name, variable in node.dataset.variables.items():
            assert variable.dtype == local[node.path].dataset.variables[name].dtype
    assert remote[SITE]["query_label"].dtype == object
    with h5py.File(dense, "r") as h5file:
        np.testing.assert_array_equal(remote[SITE]["weights"].values, h5file[SITE]["weights"][()])


def test_a_failed_write_is_a_clean_error_and_leaves_nothing(tmp_path):
    # A file-size limit makes writes fail like a full disk (EFBIG instead of ENOSPC). Before, h5py
    # released a half-closed file after the failure and the process segfaulted.
    program = textwrap.dedent(
        f"""
        import resource, signal, sys
        import numpy as np, xarray as xr, attnformat
        from attnformat.errors import WriteFailedError
        tree = attnformat.examples.build("dense")
        site = tree["encoder/self"].to_dataset(inherit=False)
        rng = np.random.default_rng(0)
        noise = rng.random((2, 3, 200, 200)).astype("float32")
        big = xr.Dataset({{"weights": (("layer", "head", "query", "key"), noise / noise.sum(-1, keepdims=True), site.weights.attrs)}},
                         coords={{"layer": site["layer"].values, "head": site["head"].values}}, attrs=site.attrs)
        tree = xr.DataTree.from_dict({{"/": tree.to_dataset(), "encoder/self": big}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            attnformat.save(tree, {str(tmp_path / "out.h5")!r}, check="none")
        except WriteFailedError as error:
            print("WriteFailedError", error)
        """
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("WriteFailedError") and "out.h5" in result.stdout
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_hdf5_engine_write_failure_raises_write_failed_error(tmp_path):
    with pytest.raises(WriteFailedError, match="missing"):
        Hdf5Engine().write_tree(build("dense"), tmp_path / "missing" / "x.h5", {}, 3)


_FLIP_PROGRAM = """
import json, sys
import numpy as np, xarray as xr, attnformat
from attnformat.engines import hdf5_screen
from attnformat.errors import AttnFormatError
hdf5_screen.STALL_SECONDS = 2.0
source, variants = sys.argv[1], json.loads(sys.argv[2])

def load(path):
    tree = attnformat.open(path)
    try:
        return {node.path: node.to_dataset(inherit=False).load() for node in tree.subtree}
    finally:
        tree.close()

reference = load(source)
data = open(source, "rb").read()
for offset, bit in variants:
    damaged = bytearray(data)
    damaged[offset] ^= 1 << bit
    path = f"{source}.{offset}.{bit}.h5"
    open(path, "wb").write(damaged)
    try:
        got = load(path)
        same = got.keys() == reference.keys() and all(got[key].identical(reference[key]) for key in reference)
        outcome = "correct" if same else "changed"
    except AttnFormatError as error:
        outcome = "refused " + str(getattr(error, "rule_id", ""))
    except BaseException as error:
        outcome = f"raw {type(error).__name__}: {error}"
    print(json.dumps([offset, bit, outcome]), flush=True)
"""


def _global_heap(data: bytes) -> tuple[int, int]:
    """``(start, end)`` of the file's global heap collection (labels and string attributes)."""
    start = data.index(b"GCOL")
    return start, start + int.from_bytes(data[start + 8 : start + 16], "little")


def _heap_parse_spins(data: bytes) -> bool:
    """True if libhdf5's parse of the global heap would never end: the loop of ``H5HG``
    deserialization, mirrored. Each object header is an index (2 bytes), a reference count (2),
    4 reserved bytes and a length (8); the parser moves to the next header by the object's
    aligned length, or, for index 0 (free space), by the bare length, which may be 0."""
    start, end = _global_heap(data)
    cursor = start + 16
    for _ in range(10_000):
        if cursor + 16 > end:
            return False
        index = int.from_bytes(data[cursor : cursor + 2], "little")
        size = int.from_bytes(data[cursor + 8 : cursor + 16], "little")
        step = 16 + (size + 7) // 8 * 8 if index else size
        if step == 0:
            return True
        cursor += step
    return False


def _spinning_flips(path, count: int) -> list[tuple[int, int]]:
    """Single-bit flips of heap object lengths that make libhdf5's heap parser spin forever."""
    data = path.read_bytes()
    start, end = _global_heap(data)
    found, cursor = [], start + 16
    while cursor + 16 <= end and len(found) < count:
        index = int.from_bytes(data[cursor : cursor + 2], "little")
        size = int.from_bytes(data[cursor + 8 : cursor + 16], "little")
        if index == 0:
            break
        for offset, bit in itertools.product(range(cursor + 8, cursor + 11), range(8)):
            damaged = bytearray(data)
            damaged[offset] ^= 1 << bit
            if _heap_parse_spins(bytes(damaged)):
                found.append((offset, bit))
                break
        cursor += 16 + (size + 7) // 8 * 8
    return found


def test_flipped_bits_give_correct_values_or_an_attnformat_error_never_a_hang(dense):
    size = dense.stat().st_size
    spinning = _spinning_flips(dense, 2)
    assert spinning, "a flip that makes libhdf5 spin exists in this file's heap (it hung every command before)"
    with h5py.File(dense, "r") as h5file:
        weights = h5file[SITE]["weights"]
        chunk = weights.id.get_chunk_info(0)
        header = h5py.h5o.get_info(weights.id).addr
    in_chunk = (chunk.byte_offset + chunk.size // 3, 4)
    variants = list(spinning) + [in_chunk, (header + 40, 2), (header + 7, 0)]  # chunk data, object header
    variants += [(offset, offset % 8) for offset in range(5, min(size, 3000), 307)]  # superblock, root group, heap
    result = subprocess.run(
        [sys.executable, "-c", _FLIP_PROGRAM, str(dense), json.dumps(variants)], capture_output=True, text=True, timeout=150
    )
    assert result.returncode == 0, result.stderr[-2000:]
    outcomes = {(offset, bit): outcome for offset, bit, outcome in map(json.loads, result.stdout.splitlines())}
    assert len(outcomes) == len(set(variants))
    for (offset, bit), outcome in outcomes.items():
        # A flipped letter of a label or string attribute is the one change HDF5 cannot see.
        allowed = outcome == "correct" or outcome.startswith("refused") or (outcome == "changed" and _is_label_text(dense, offset))
        assert allowed, (offset, bit, outcome)
    assert [outcomes[flip] for flip in spinning] == ["refused ATTN-STORE-006"] * len(spinning)
    assert outcomes[in_chunk] == "refused ATTN-STORE-005"


def _is_label_text(path, offset: int) -> bool:
    """True if ``offset`` lies in the text of a global heap object (strings carry no checksum in
    HDF5: a flipped letter in a label or a string attribute reads back as another letter)."""
    data = path.read_bytes()
    start, end = _global_heap(data)
    cursor = start + 16
    while cursor + 16 <= end:
        index = int.from_bytes(data[cursor : cursor + 2], "little")
        size = int.from_bytes(data[cursor + 8 : cursor + 16], "little")
        if index == 0:
            return False
        if cursor + 16 <= offset < cursor + 16 + size:
            return True
        cursor += 16 + (size + 7) // 8 * 8
    return False


def test_a_complete_file_missing_a_chunk_is_refused(dense):
    # Rebuild the weights as an array whose first map alone is stored, dimension scales attached
    # as netCDF does, in a file whose root still says "complete".
    with h5py.File(dense, "a") as h5file:
        site = h5file[SITE]
        old = site["weights"]
        values, attrs, scales = old[()], {k: v for k, v in old.attrs.items() if k not in ("DIMENSION_LIST", "_Netcdf4Coordinates")}, [old.dims[i][0].name for i in range(old.ndim)]
        for index, scale in enumerate(scales):
            old.dims[index].detach_scale(h5file[scale])
        del site["weights"]
        weights = site.create_dataset("weights", shape=values.shape, dtype=values.dtype, chunks=(1, 1) + values.shape[2:], fillvalue=np.nan)
        weights[0, 0] = values[0, 0]
        for index, scale in enumerate(scales):
            weights.dims[index].attach_scale(h5file[scale])
        for key, value in attrs.items():
            weights.attrs[key] = value
        assert h5file.attrs["completeness"] == "complete" and weights.id.get_num_chunks() == 1
    error = _refused(dense, "ATTN-STORE-007", "/encoder/self/weights")
    assert f"1 of its {values.shape[0] * values.shape[1]} chunks" in str(error)


def test_a_chunk_hidden_by_a_damaged_index_is_refused(dense):
    # Version-1 B-tree keys (no checksum) hold one offset more than the array has dimensions,
    # always 0; a flipped bit there hides the chunk from reads, which then see fill values (NaN)
    # without any error, while the chunk listing still shows it.
    with h5py.File(dense, "r") as h5file:
        weights = h5file[SITE]["weights"]
        address, rank = weights.id.get_chunk_info(0).byte_offset, weights.ndim
    data = bytearray(dense.read_bytes())
    child = 24 + 8 + (rank + 1) * 8  # node header, then the first key (size, filter mask, offsets)
    node = next(
        node for node in range(len(data)) if data.startswith(b"TREE", node) and int.from_bytes(data[node + child : node + child + 8], "little") == address
    )
    data[node + child - 5] ^= 0x40
    dense.write_bytes(bytes(data))
    with h5py.File(dense, "r") as h5file:  # the ground truth: libhdf5 reads fill values, no error
        assert np.isnan(h5file[SITE]["weights"][0, 0]).all()
    error = _refused(dense, "ATTN-STORE-005", "/encoder/self/weights")
    assert "reads cannot find" in str(error)


def test_a_flipped_letter_of_a_label_is_caught_by_the_text_checksum(tmp_path):
    # HDF5 keeps text in global heaps, which no HDF5 checksum covers; the engine stores a CRC-32
    # of every string variable and checks it on both read roads.

    good = attnformat.save(build("dense"), tmp_path / "good.h5")
    xr.testing.assert_identical(attnformat.open(good), attnformat.open(attnformat.example_path("dense")))
    path = attnformat.save(build("dense"), tmp_path / "flipped.h5")
    data = bytearray(path.read_bytes())
    start = data.find(b"[CLS]")
    while start > 0:
        data[start + 1] ^= 0x02  # "[CLS]" -> "[ALS]": still valid UTF-8, still a plausible label
        start = data.find(b"[CLS]", start + 1)
    path.write_bytes(bytes(data))
    with h5py.File(path) as h5file:  # the ground truth: h5py reads the other letter silently
        assert h5file["encoder/self/query_label"].asstr()[0] == "[ALS]"
    with pytest.raises(attnformat.UnreadableFileError, match=r"query_label.*\[ATTN-STORE-005\]"):
        attnformat.read_map(path, "encoder/self", layer=0, head=0)
    with pytest.raises(attnformat.UnreadableFileError, match=r"label.*\[ATTN-STORE-005\]"):
        attnformat.open(path)


def test_chunks_swapped_in_the_file_are_caught_by_their_recorded_trailers(tmp_path):
    # fletcher32 travels with its chunk: a chunk's bytes stored in another chunk's place pass it
    # (h5py, the ground truth, reads them silently). The engine records each chunk's trailer.
    rng = np.random.default_rng(0)
    weights = rng.random((2, 3, 256, 256)).astype("float32")
    weights /= weights.sum(-1, keepdims=True)
    path = tmp_path / "big.h5"
    with attnformat.Writer(path, model_name="toy", model_framework="numpy") as writer:
        site = writer.create_site("encoder/self", sizes={"layer": 2, "head": 3, "query": 256, "key": 256}, attrs={"attention_type": "self", "causal": 0})
        site.write("weights", weights)
    with h5py.File(path, "r+") as h5file:  # chunk (0, 1) gets chunk (0, 0)'s bytes, fletcher32 and all
        dataset = h5file["encoder/self/weights"]
        mask, raw = dataset.id.read_direct_chunk((0, 0, 0, 0))
        dataset.id.write_direct_chunk((0, 1, 0, 0), raw, mask)
    with h5py.File(path, "r") as h5file:  # the ground truth: h5py reads head 1 as head 0, silently
        np.testing.assert_array_equal(h5file["encoder/self/weights"][0, 1], weights[0, 0])
    attnformat.read_map(path, "encoder/self", layer=0, head=0)  # an untouched chunk still reads
    with pytest.raises(attnformat.UnreadableFileError, match=r"another place.*\[ATTN-STORE-005\]"):
        attnformat.read_map(path, "encoder/self", layer=0, head=1)
    with pytest.raises(attnformat.UnreadableFileError, match=r"\[ATTN-STORE-005\]"):
        attnformat.open(path)["encoder/self"]["weights"].values
