"""Regenerate the conformance fixtures: ``valid/<example>.zarr`` and ``invalid/<RULE-ID>.zarr``.

Valid fixtures are the library's examples written with :func:`attnformat.save`. Each invalid
fixture starts from a valid example and breaks exactly one MUST rule; it is written with plain
xarray (attnformat's own writer refuses nonconforming trees). ``tests/core/test_conformance.py``
checks that the validator reports exactly that rule id for each, and that every MUST rule of the
spec has its fixture.

Run from the repository root (``valid`` rewrites only the valid fixtures, rule ids only those
invalid fixtures)::

    python spec/conformance/make_fixtures.py [valid | ATTN-STORE-004 ...]
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from attnformat import save
from attnformat.conventions import MAX_CHUNK_BYTES
from attnformat.examples import EXAMPLES, build

HERE = Path(__file__).parent
REPOSITORY = HERE.parents[1]


def _with_site(name: str, site: str, change) -> xr.DataTree:
    tree = build(name)
    datasets = {node.path: node.to_dataset(inherit=False) for node in tree.subtree}
    datasets[f"/{site}"] = change(datasets[f"/{site}"])
    return xr.DataTree.from_dict(datasets)


def _with_root_attrs(**attrs) -> xr.DataTree:
    tree = build("dense")
    tree.attrs = {**tree.attrs, **attrs}
    return tree


def _without_attr(name: str, site: str, attr: str) -> xr.DataTree:
    def drop(ds):
        ds.attrs = {k: v for k, v in ds.attrs.items() if k != attr}
        return ds

    return _with_site(name, site, drop)


def _set_attrs(name: str, site: str, **attrs) -> xr.DataTree:
    return _with_site(name, site, lambda ds: ds.assign_attrs(**attrs))


def _edit_weights(name: str, site: str, edit) -> xr.DataTree:
    def change(ds):
        values = ds["weights"].values.copy()
        edit(values)
        ds = ds.drop_vars([v for v in ("logits",) if v in ds])  # keep ATTN-VAL-005 warnings out
        ds["weights"] = ds["weights"].copy(data=values)
        return ds

    return _with_site(name, site, change)


def _move_weight(values, row_index, from_key, to_key):
    row = values[row_index]
    row[to_key] += row[from_key]
    row[from_key] = 0.0


def _nested_site() -> xr.DataTree:
    tree = build("dense")
    datasets = {node.path: node.to_dataset(inherit=False) for node in tree.subtree}
    datasets["/encoder/self/inner"] = datasets["/encoder/self"]
    return xr.DataTree.from_dict(datasets)


def _rename_attention_dim(old: str, new: str):
    def change(ds):
        return ds.assign({name: ds[name].rename({old: new}) for name in ("weights", "logits")})

    return change


def _edit_variable(name: str, site: str, variable: str, edit) -> xr.DataTree:
    def change(ds):
        values = ds[variable].values.copy()
        edit(values)
        ds[variable] = ds[variable].copy(data=values)
        return ds

    return _with_site(name, site, change)


def _swap_ranks(ds):
    """One top-k row with its first two kept weights (and their indices) swapped: increasing."""
    ds = ds.copy()
    for name in ("weights", "key_index"):
        values = ds[name].values.copy()
        values[0, 0, 5, [0, 1]] = values[0, 0, 5, [1, 0]]
        ds[name] = ds[name].copy(data=values)
    return ds


INVALID = {
    "ATTN-ROOT-001": lambda: _with_root_attrs(attnformat="attnfmt"),
    "ATTN-ROOT-002": lambda: _with_root_attrs(attnformat_version="2.0.0"),
    "ATTN-ROOT-003": lambda: _with_root_attrs(producer=""),
    "ATTN-ROOT-004": lambda: _with_root_attrs(completeness="done"),
    "ATTN-ROOT-005": lambda: _without_attr("dense", "encoder/self", "layout"),
    "ATTN-ROOT-006": lambda: _with_root_attrs(model_name=5),
    "ATTN-SITE-001": lambda: _set_attrs("dense", "encoder/self", layout="sparse"),
    "ATTN-SITE-002": lambda: _without_attr("dense", "encoder/self", "normalization"),
    "ATTN-SITE-003": lambda: _without_attr("dense", "encoder/self", "normalized_dim"),
    "ATTN-SITE-004": lambda: _set_attrs("dense", "encoder/self", causal=2),
    "ATTN-SITE-005": lambda: _with_site("dense", "encoder/self", lambda ds: ds.drop_vars(["weights", "logits"])),
    "ATTN-SITE-006": _nested_site,
    "ATTN-SITE-007": lambda: _set_attrs("dense", "encoder/self", attention_type="mutual"),
    "ATTN-DIM-001": lambda: _with_site("dense", "encoder/self", _rename_attention_dim("head", "heads")),
    "ATTN-DIM-002": lambda: _with_site("dense", "encoder/self", lambda ds: ds.transpose("head", "layer", "query", "key")),
    "ATTN-DIM-003": lambda: _with_site("dense", "encoder/self", _rename_attention_dim("key", "edge")),
    "ATTN-DIM-004": lambda: _with_site("dense", "encoder/self", lambda ds: ds.assign(logits=ds["logits"].isel(head=0, drop=True))),
    "ATTN-DIM-005": lambda: _with_site("dense", "encoder/self", lambda ds: ds.assign(bias=(("sample", "query", "key"), np.zeros((1, 6, 6), "float32")))),
    "ATTN-COORD-001": lambda: _with_site("steps", "trunk/iga", lambda ds: ds.assign_coords(step=[100, 300, 200])),
    "ATTN-COORD-002": lambda: _with_site("dense", "encoder/self", lambda ds: ds.assign_coords(layer=[0, 0])),
    "ATTN-COORD-003": lambda: _with_site("dense", "encoder/self", lambda ds: ds.assign_coords(query_label=("query", np.arange(6)))),
    "ATTN-COORD-004": lambda: _with_site("padded-batch", "encoder/self", lambda ds: ds.assign_coords(query_mask=ds["query_mask"].astype("int8"))),
    "ATTN-COORD-005": lambda: _with_site("dense", "encoder/self", lambda ds: ds.assign_coords(query_position=ds["query_position"].astype("float64"))),
    "ATTN-VAR-001": lambda: _with_site("dense", "encoder/self", lambda ds: ds.assign(weights=(ds["weights"] > 0.5).astype("int32")).drop_vars("logits")),
    "ATTN-VAR-002": lambda: _with_site("dense", "encoder/self", lambda ds: ds.assign(extra=(("query",), np.zeros(6)))),
    "ATTN-VAR-003": lambda: _with_site("steps", "trunk/iga", lambda ds: ds.assign(distance=ds["distance"].transpose("key", "query"))),
    "ATTN-VAL-001": lambda: _edit_weights("dense", "encoder/self", lambda w: w[0, 0, 0].__setitem__(slice(0, 2), [1.5, -0.5]) or w[0, 0, 0].__setitem__(slice(2, None), 0.0)),
    "ATTN-VAL-002": lambda: _edit_weights("dense", "encoder/self", lambda w: w[1, 2, 3].__imul__(0.9)),
    "ATTN-VAL-003": lambda: _edit_weights("encoder-decoder", "decoder/self", lambda w: _move_weight(w[0, 0], 1, 0, 3)),
    "ATTN-VAL-004": lambda: _edit_weights("padded-batch", "encoder/self", lambda w: _move_weight(w[1, 0, 0], 0, 0, 4)),
    "ATTN-EDGE-001": lambda: _with_site("edge", "gat", lambda ds: ds.assign_coords(source=ds["source"].astype("float64"))),
    "ATTN-EDGE-002": lambda: _set_attrs("edge", "gat", edge_node_dim="time"),
    "ATTN-EDGE-003": lambda: _with_site("edge", "gat", lambda ds: ds.assign_coords(target=("edge", np.where(np.arange(ds.sizes["edge"]) == 0, 99, ds["target"].values)))),
    "ATTN-IMG-001": lambda: _set_attrs("image", "encoder/self", patch_grid=[4]),
    "ATTN-IMG-002": lambda: _with_site("image", "encoder/self", lambda ds: ds.assign_coords(key_patch_row=ds["key_patch_row"] + 4)),
    "ATTN-SITE-009": lambda: _set_attrs("head-mean", "encoder/self_mean", head_reduction="max"),
    "ATTN-COORD-006": lambda: _edit_variable("generation", "decoder/self", "query_generation_step", lambda v: v.__setitem__(0, -2)),
    "ATTN-TOPK-001": lambda: _with_site("topk", "decoder/self_topk", lambda ds: ds.assign(key_index=ds["key_index"].astype("float64"))),
    "ATTN-TOPK-002": lambda: _edit_variable("topk", "decoder/self_topk", "key_index", lambda v: v[0, 0, 5].__setitem__(1, v[0, 0, 5, 0])),
    "ATTN-TOPK-003": lambda: _with_site("topk", "decoder/self_topk", _swap_ranks),
    "ATTN-TOPK-004": lambda: _edit_variable("topk", "decoder/self_topk", "omitted_weight", lambda v: v[1, 1].__setitem__(6, v[1, 1, 6] + 0.1)),
    "ATTN-STAT-001": lambda: _with_site("statistics", "decoder/self_stats", lambda ds: ds.assign(top_key=ds["top_key"].astype("float32"))),
    "ATTN-STAT-002": lambda: _edit_variable("statistics", "decoder/self_stats", "entropy", lambda v: v[2, 3].__setitem__(7, 5.0)),
    "ATTN-STAT-003": lambda: _without_attr("statistics", "decoder/self_stats", "local_window"),
    "ATTN-LOSSY-001": lambda: _with_site("dense", "encoder/self", lambda ds: ds.assign(weights=ds["weights"].assign_attrs(lossy_method="bitround"))),
}


class _TouchWhenUnpickled:
    """A payload that leaves a file named ``attnformat-pickle-executed`` in the working directory if
    anything ever unpickles it; the tests check that reading the fixture leaves no such file."""

    def __reduce__(self):
        return (Path.touch, (Path("attnformat-pickle-executed"),))


def _write_pickle_fixture(path: Path) -> None:
    import numcodecs

    build("dense").to_zarr(path, mode="w", consolidated=False, zarr_format=2)
    note = path / "encoder" / "self" / "note"
    note.mkdir()
    (note / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [1], "chunks": [1], "dtype": "|O", "compressor": None,
        "fill_value": None, "filters": [{"id": "pickle", "protocol": 5}], "order": "C", "dimension_separator": ".",
    }))
    (note / ".zattrs").write_text(json.dumps({"_ARRAY_DIMENSIONS": ["note"], "role": "auxiliary"}))
    payload = np.empty(1, dtype=object)
    payload[0] = _TouchWhenUnpickled()
    (note / "0").write_bytes(numcodecs.Pickle(protocol=5).encode(payload))
    # zarr-python 3 refuses to parse pickled object arrays at all, so the consolidated metadata is
    # assembled here from the per-node files.
    entries = {
        file.relative_to(path).as_posix(): json.loads(file.read_text())
        for file in sorted(path.rglob(".z*")) if file.name in (".zgroup", ".zattrs", ".zarray")
    }
    (path / ".zmetadata").write_text(json.dumps({"zarr_consolidated_format": 1, "metadata": entries}, indent=2))


def _write_size_mismatch_fixture(path: Path) -> None:
    import zarr

    build("dense").to_zarr(path, mode="w", consolidated=False, zarr_format=3)
    group = zarr.open_group(str(path / "encoder" / "self"), mode="a")
    del group["query_label"]
    labels = group.create_array("query_label", shape=(5,), dtype=str, dimension_names=("query",))
    labels[...] = np.array(["[CLS]", "the", "cat", "sat", "[SEP]"], dtype=object)
    zarr.consolidate_metadata(str(path))


def _write_checksummed(path: Path, chunks=(1, 1, 6, 6)) -> Path:
    """The dense example with weights in one chunk per map, each chunk Blosc-compressed and
    followed by its CRC-32C (what attnformat's writer does); returns the weights array's folder."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    compressors = [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]
    encoding = {"/encoder/self": {"weights": {"chunks": chunks, "compressors": compressors}}}
    build("dense").to_zarr(path, mode="w", consolidated=True, zarr_format=3, encoding=encoding)
    return path / "encoder" / "self" / "weights"


def _write_symlink_fixture(path: Path) -> None:
    # The link is relative and points at the repository's README.md, so that it resolves in any
    # clone (git stores symbolic links as links); readers must refuse it without following it.
    chunk = _write_checksummed(path) / "c" / "0" / "1" / "0" / "0"
    chunk.unlink()
    os.symlink(os.path.relpath(REPOSITORY / "README.md", chunk.parent), chunk)


def _write_flipped_bit_fixture(path: Path) -> None:
    chunk = _write_checksummed(path) / "c" / "1" / "2" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the compressed payload, not the 4 checksum bytes at the end
    chunk.write_bytes(bytes(data))


def _write_oversized_chunk_fixture(path: Path) -> None:
    """The weights array declares chunks of (2, 3, 8192, 8192) float32: 1.5 GiB each, far above
    MAX_CHUNK_BYTES; a reader that trusts it allocates that much before looking at the chunk."""
    weights = _write_checksummed(path, chunks=(2, 3, 6, 6))
    declared = [2, 3, 8192, 8192]
    assert 2 * 3 * 8192 * 8192 * 4 > MAX_CHUNK_BYTES
    documents = [weights / "zarr.json", path / "zarr.json"]
    for document in documents:
        metadata = json.loads(document.read_text())
        array = metadata if document.parent == weights else metadata["consolidated_metadata"]["metadata"]["encoder/self/weights"]
        array["chunk_grid"]["configuration"]["chunk_shape"] = declared
        document.write_text(json.dumps(metadata, indent=2))


def _write_missing_chunk_fixture(path: Path) -> None:
    weights = _write_checksummed(path)
    (weights / "c" / "1" / "1" / "0" / "0").unlink()


def write_invalid(rule_id: str, path: Path) -> None:
    """Write the fixture for one rule with plain xarray (and zarr, for the ATTN-STORE rules)."""
    store_writers = {
        "ATTN-STORE-002": _write_size_mismatch_fixture,
        "ATTN-STORE-003": _write_pickle_fixture,
        "ATTN-STORE-004": _write_symlink_fixture,
        "ATTN-STORE-005": _write_flipped_bit_fixture,
        "ATTN-STORE-006": _write_oversized_chunk_fixture,
        "ATTN-STORE-007": _write_missing_chunk_fixture,
    }
    if rule_id in store_writers:
        store_writers[rule_id](path)
        return
    if rule_id == "ATTN-STORE-001":
        build("dense").to_zarr(path, mode="w", consolidated=False, zarr_format=3)
        metadata_file = path / "encoder" / "self" / "weights" / "zarr.json"
        metadata = json.loads(metadata_file.read_text())
        metadata.pop("dimension_names", None)
        metadata_file.write_text(json.dumps(metadata, indent=2))
        return
    INVALID[rule_id]().to_zarr(path, mode="w", consolidated=True, zarr_format=3)


def main(only: list[str] | None = None) -> None:
    """Rewrite every fixture from scratch, or only those named in ``only`` (``valid``, or rule ids)."""
    warnings.simplefilter("ignore")
    store_rules = [f"ATTN-STORE-{number:03d}" for number in range(1, 8)]
    if only == ["valid"]:
        shutil.rmtree(HERE / "valid", ignore_errors=True)
        (HERE / "valid").mkdir()
        for name in EXAMPLES:
            save(build(name), HERE / "valid" / f"{name}.zarr")
        print(f"wrote {len(EXAMPLES)} valid fixtures under {HERE / 'valid'}")
        return
    if only:
        for rule_id in only:
            path = HERE / "invalid" / f"{rule_id}.zarr"
            if path.is_symlink() or path.is_file():
                path.unlink()
            shutil.rmtree(path, ignore_errors=True)
            write_invalid(rule_id, path)
        print(f"wrote {len(only)} invalid fixtures under {HERE / 'invalid'}")
        return
    for kind in ("valid", "invalid"):
        shutil.rmtree(HERE / kind, ignore_errors=True)
        (HERE / kind).mkdir()
    for name in EXAMPLES:
        save(build(name), HERE / "valid" / f"{name}.zarr")
    for rule_id in [*store_rules, *INVALID]:
        write_invalid(rule_id, HERE / "invalid" / f"{rule_id}.zarr")
    print(f"wrote {len(EXAMPLES)} valid and {len(INVALID) + len(store_rules)} invalid fixtures under {HERE}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
