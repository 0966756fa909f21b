"""Files behind URLs: S3 (a moto server on 127.0.0.1) and HTTP (a local file server) read like
local files, through the same engines, for open, read_map, validate, convert, the viewer and the
command line; a missing optional package says what to install."""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
import zarr

import attnformat
from attnformat.engines import Location
from attnformat.engines.remote import list_keys, open_file, open_zip, read_bytes, zarr_store
from attnformat.errors import BrokenStoreError, MissingDependencyError, UnreadableFileError
from attnformat.examples import build

SUFFIXES = (".zarr", ".zarr.zip", ".h5")
PICKLE_FIXTURE = Path(__file__).resolve().parents[2] / "spec" / "conformance" / "invalid" / "ATTN-STORE-003.zarr"


@pytest.fixture(scope="module")
def local_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote-sources")
    tree = build("encoder-decoder")
    return {suffix: attnformat.save(tree, folder / f"run{suffix}") for suffix in SUFFIXES}


@pytest.fixture(scope="module")
def s3_files(local_files, s3_put):
    return {suffix: s3_put(path, f"remote/run{suffix}") for suffix, path in local_files.items()}


@pytest.fixture(scope="module")
def http_files(local_files, http_root):
    base, folder = http_root
    (folder / "remote").mkdir()
    for suffix, path in local_files.items():
        copy = shutil.copytree if path.is_dir() else shutil.copyfile
        copy(path, folder / "remote" / path.name)
    return {suffix: f"{base}/remote/run{suffix}" for suffix in local_files}


@pytest.fixture
def s3_options(s3_storage_options):
    return s3_storage_options


def stored_weights(path: Path, site: str) -> np.ndarray:
    """The weights of ``site`` as the storage library itself reads them from the local file."""
    if path.suffix == ".h5":
        with h5py.File(path, "r") as file:
            return file[f"{site}/weights"][...]
    store = zarr.storage.ZipStore(path, mode="r") if path.name.endswith(".zip") else zarr.storage.LocalStore(path, read_only=True)
    try:
        return zarr.open_group(store, mode="r")[f"{site}/weights"][...]
    finally:
        store.close()


def dtypes(tree: xr.DataTree) -> dict:
    return {(node.path, name): variable.dtype for node in tree.subtree for name, variable in node.dataset.variables.items()}


def assert_same_as_local(remote: xr.DataTree, local_path: Path) -> None:
    local = attnformat.open(local_path)
    xr.testing.assert_identical(remote, local)
    assert dtypes(remote) == dtypes(local)
    for site in ("encoder/self", "decoder/cross"):
        np.testing.assert_array_equal(remote[site]["weights"].values, stored_weights(local_path, site))


# -- S3 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_s3_open_with_endpoint_option_gives_the_local_tree(suffix, local_files, s3_files, s3_options):
    url = s3_files[suffix]
    remote = attnformat.open(url, storage_options=s3_options)
    assert_same_as_local(remote, local_files[suffix])
    assert attnformat.source_of(remote) == url  # the double slash of s3:// survives
    assert remote.encoding["location"] == Location(url)
    assert remote.encoding["location"].storage_options == s3_options


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_s3_endpoint_from_the_standard_environment_variables(variable, local_files, s3_files, s3_endpoint, monkeypatch):
    monkeypatch.setenv(variable, s3_endpoint)
    credentials = {"key": "testing", "secret": "testing"}  # no endpoint: the variable names it
    for suffix in SUFFIXES:
        assert_same_as_local(attnformat.open(s3_files[suffix], storage_options=credentials), local_files[suffix])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_s3_read_map(suffix, local_files, s3_files, s3_options):
    head = attnformat.read_map(s3_files[suffix], "decoder/cross", layer=1, head=0, storage_options=s3_options)
    np.testing.assert_array_equal(head.values, stored_weights(local_files[suffix], "decoder/cross")[1, 0])
    xr.testing.assert_identical(head, attnformat.read_map(local_files[suffix], "decoder/cross", layer=1, head=0))
    assert head.dims == ("query", "key")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_s3_validate(suffix, s3_files, s3_options):
    report = attnformat.validate(s3_files[suffix], storage_options=s3_options)
    assert report.ok and report.findings == [], report.format()
    assert report.source == s3_files[suffix]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_s3_convert_to_local(suffix, local_files, s3_files, s3_options, tmp_path):
    destination = tmp_path / "copy.zarr"
    attnformat.convert(s3_files[suffix], destination, storage_options=s3_options)
    copied = attnformat.open(destination)
    xr.testing.assert_identical(copied, attnformat.open(local_files[suffix]))
    np.testing.assert_array_equal(stored_weights(destination, "encoder/self"), stored_weights(local_files[suffix], "encoder/self"))


def test_s3_viewer_resolves_a_site(local_files, s3_files, s3_options):
    from attnformat.viewer import resolve_site

    site = resolve_site(s3_files[".zarr"], "decoder/cross", storage_options=s3_options)
    assert site.path == "/decoder/cross"
    np.testing.assert_array_equal(site["weights"].values, stored_weights(local_files[".zarr"], "decoder/cross"))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_s3_command_line_takes_storage_options(suffix, s3_files, s3_options, capsys):
    from attnformat.cli import main

    options = [word for key, value in s3_options.items() for word in ("--storage-option", f"{key}={value}")]
    assert main(["validate", s3_files[suffix], *options]) == 0
    assert s3_files[suffix] in capsys.readouterr().out


def test_s3_pickle_codec_is_refused_before_decoding(s3_put, s3_options, tmp_path, monkeypatch):
    url = s3_put(PICKLE_FIXTURE, "hostile/pickled.zarr")
    monkeypatch.chdir(tmp_path)  # the payload would leave a marker file here if ever unpickled
    with pytest.raises(BrokenStoreError, match=r"ATTN-STORE-003"):
        attnformat.open(url, storage_options=s3_options)
    report = attnformat.validate(url, storage_options=s3_options)
    assert [finding.rule_id for finding in report.errors] == ["ATTN-STORE-003"]
    assert not (tmp_path / "attnformat-pickle-executed").exists()


def test_s3_missing_object_names_the_url(s3_files, s3_options):
    missing = s3_files[".zarr"].replace("run.zarr", "missing.zarr")
    with pytest.raises(UnreadableFileError, match=r"s3://attnformat-test/remote/missing\.zarr"):
        attnformat.open(missing, storage_options=s3_options)
    with pytest.raises(UnreadableFileError, match=r"s3://attnformat-test/remote/missing\.h5"):
        attnformat.open(missing.replace(".zarr", ".h5"), storage_options=s3_options)


# -- HTTP -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_http_open_gives_the_local_tree(suffix, local_files, http_files):
    remote = attnformat.open(http_files[suffix])
    assert_same_as_local(remote, local_files[suffix])
    # Labels are Python strings (object) on every road, not fixed-width <U over HTTP.
    assert remote["decoder/cross"].coords["key_label"].dtype == object
    assert attnformat.source_of(remote) == http_files[suffix]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_http_read_map_and_validate(suffix, local_files, http_files):
    head = attnformat.read_map(http_files[suffix], "encoder/self", layer=0, head=1)
    np.testing.assert_array_equal(head.values, stored_weights(local_files[suffix], "encoder/self")[0, 1])
    assert head.coords["query_label"].dtype == object
    report = attnformat.validate(http_files[suffix])
    assert report.ok and report.findings == [], report.format()


def test_http_pickle_codec_is_refused(http_root, tmp_path, monkeypatch):
    base, folder = http_root
    shutil.copytree(PICKLE_FIXTURE, folder / "pickled.zarr")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BrokenStoreError, match=r"ATTN-STORE-003"):
        attnformat.open(f"{base}/pickled.zarr")
    assert not (tmp_path / "attnformat-pickle-executed").exists()


def test_http_missing_file_names_the_url(http_root):
    base, _ = http_root
    for name in ("missing.zarr", "missing.zarr.zip", "missing.h5"):
        with pytest.raises(UnreadableFileError, match=f"{base}/{name}"):
            attnformat.open(f"{base}/{name}")


# -- missing optional packages ------------------------------------------------------------------


def test_missing_s3fs_says_what_to_install(s3_files, monkeypatch, capsys):
    import fsspec.registry

    # Pretend s3fs is not installed: fsspec imports it afresh and finds nothing.
    monkeypatch.setitem(sys.modules, "s3fs", None)
    for protocol in ("s3", "s3a"):
        monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, protocol, raising=False)
    with pytest.raises(MissingDependencyError, match=r"attnformat\[remote\]") as caught:
        attnformat.open(s3_files[".zarr"])
    assert caught.value.extra == "remote"
    from attnformat.cli import main

    assert main(["info", s3_files[".zarr.zip"]]) == 3
    assert "pip install 'attnformat[remote]'" in capsys.readouterr().err


def test_missing_fsspec_says_what_to_install(monkeypatch):
    for name in [name for name in sys.modules if name == "fsspec" or name.startswith("fsspec.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match=r"attnformat\[remote\]"):
        attnformat.open("https://127.0.0.1:9/run.zarr")


# -- the fsspec plumbing the engines use ----------------------------------------------------------


def test_zarr_store_kinds_keep_urls_intact(local_files, s3_files, s3_options):
    assert type(zarr_store(local_files[".zarr"])).__name__ == "LocalStore"
    assert type(zarr_store(local_files[".zarr.zip"])).__name__ == "ZipStore"
    store = zarr_store(Location.of(s3_files[".zarr"], s3_options))
    assert store.read_only and store.path == "attnformat-test/remote/run.zarr"
    np.testing.assert_array_equal(
        zarr.open_group(store, mode="r")["encoder/self/weights"][...], stored_weights(local_files[".zarr"], "encoder/self")
    )


def test_zip_behind_a_url_is_read_in_place_and_closed(local_files, s3_files, s3_options):
    location = Location.of(s3_files[".zarr.zip"], s3_options)
    with open_zip(location) as archive, zipfile.ZipFile(local_files[".zarr.zip"]) as local:
        assert archive.namelist() == local.namelist()
        assert archive.read("zarr.json") == local.read("zarr.json")
    store = zarr_store(location)
    np.testing.assert_array_equal(
        zarr.open_group(store, mode="r")["decoder/self/weights"][...], stored_weights(local_files[".zarr.zip"], "decoder/self")
    )
    handle = store.held[-1]
    store.close()
    assert handle.closed


def test_open_file_reads_the_same_bytes(local_files, s3_files, http_files, s3_options):
    expected = local_files[".h5"].read_bytes()
    for location in (Location.of(s3_files[".h5"], s3_options), Location.of(http_files[".h5"]), Location.of(local_files[".h5"])):
        with open_file(location) as handle:
            handle.seek(len(expected) // 2)
            assert handle.read(100) == expected[len(expected) // 2 : len(expected) // 2 + 100]
    with pytest.raises(UnreadableFileError, match="missing.h5"):
        open_file(Location.of(s3_files[".h5"].replace("run.h5", "missing.h5"), s3_options))


def test_read_bytes_never_returns_more_than_its_limit(local_files, s3_files, http_files, s3_options):
    expected = (local_files[".zarr"] / "zarr.json").read_bytes()
    for location in (Location.of(s3_files[".zarr"], s3_options), Location.of(http_files[".zarr"]), Location.of(local_files[".zarr"])):
        assert read_bytes(location, "zarr.json", len(expected)) == expected
        assert read_bytes(location, "encoder/nothing.json", 100) is None
        with pytest.raises(BrokenStoreError, match=r"zarr\.json holds more than 100 bytes \[ATTN-STORE-006\]") as caught:
            read_bytes(location, "zarr.json", 100)
        assert caught.value.rule_id == "ATTN-STORE-006"


def test_list_keys_matches_the_local_listing(local_files, s3_files, http_files, s3_options):
    local = sorted(p.relative_to(local_files[".zarr"]).as_posix() for p in local_files[".zarr"].rglob("*") if p.is_file())
    under = [key for key in local if key.startswith("decoder/")]
    for location in (Location.of(s3_files[".zarr"], s3_options), Location.of(http_files[".zarr"]), Location.of(local_files[".zarr"])):
        assert sorted(list_keys(location)) == local
        assert sorted(list_keys(location, "decoder")) == under
        with pytest.raises(BrokenStoreError, match=r"ATTN-STORE-006"):
            list_keys(location, limit=3)
    with zipfile.ZipFile(local_files[".zarr.zip"]) as archive:
        assert list_keys(Location.of(s3_files[".zarr.zip"], s3_options)) == archive.namelist()


def test_list_keys_does_not_follow_symbolic_links(tmp_path):
    store = tmp_path / "linked.zarr"
    (store / "a").mkdir(parents=True)
    (store / "zarr.json").write_text("{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("x")
    (store / "a" / "link").symlink_to(tmp_path / "outside")
    (store / "a" / "file-link").symlink_to(tmp_path / "outside" / "secret")
    assert sorted(list_keys(store)) == ["a/file-link", "a/link", "zarr.json"]


def test_read_bytes_never_leaves_the_store(tmp_path):
    import os

    store = tmp_path / "hostile.zarr"
    (store / "a").mkdir(parents=True)
    (tmp_path / "secret").write_text("password")
    (store / "a" / "zarr.json").symlink_to(tmp_path / "secret")
    (store / "linked").symlink_to(tmp_path)
    os.mkfifo(store / "fifo.json")  # opening it for reading would block forever
    for key, named in [("a/zarr.json", "a/zarr.json is a symbolic link"), ("linked/secret", "linked is a symbolic link"),
                       ("fifo.json", "fifo.json is a special file"), ("../secret", "points outside the store")]:
        with pytest.raises(BrokenStoreError, match=named) as caught:
            read_bytes(store, key, 1000)
        assert caught.value.rule_id == "ATTN-STORE-004"
    assert read_bytes(store, "a", 1000) is None  # a folder is not a key
