"""Object storage end to end, against a moto S3 server on 127.0.0.1 (tests/conftest.py starts and
stops it): write to s3://, open, validate, stats, one plot, a comparison of two remote files and
the report, reading in place. What is read is counted on the server: moto's request recorder logs
every request (method, key, Range header), so the tests assert which stored chunks were fetched and
how often, never timings."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import requests
import xarray as xr
import zarr

import attnformat
from attnformat.engines import Location
from attnformat.engines.remote import save_to_url, upload
from attnformat.errors import AttnFormatError

BUCKET = "attnformat-test"
SAMPLES, LAYERS, HEADS, TOKENS = 2, 2, 3, 256  # 256 x 256 maps: one stored chunk per map


def _tree(seed: int, layers: int = LAYERS) -> xr.DataTree:
    """A conforming one-site tree whose values are known (the ground truth of every read)."""
    rng = np.random.default_rng(seed)
    weights = rng.random((SAMPLES, layers, HEADS, TOKENS, TOKENS)) ** 4
    weights /= weights.sum(-1, keepdims=True)
    labels = np.array([[f"t{i}" for i in range(TOKENS)]] * SAMPLES, dtype=object)
    site = xr.Dataset(
        {"weights": (("sample", "layer", "head", "query", "key"), weights.astype(np.float32))},
        coords={"layer": np.arange(layers), "head": np.arange(HEADS), "query_label": (("sample", "query"), labels),
                "key_label": (("sample", "key"), labels)},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self",
               "causal": 0})
    root = {"attnformat": "attnformat", "attnformat_version": attnformat.FORMAT_VERSION, "producer": "test", "model_name": "toy", "model_framework": "numpy",
            "completeness": "complete"}
    return xr.DataTree.from_dict({"/": xr.Dataset(attrs=root), "/encoder/self": site})


@pytest.fixture(scope="module")
def trees():
    # "big" (12 MB) is for single-file stores, read in blocks of 1 MiB: large enough that reading
    # one map is visibly a fraction of the file.
    return {"a": _tree(1), "b": _tree(2), "big": _tree(3, layers=8)}


@pytest.fixture(scope="module")
def remote(trees, s3_storage_options):
    """``{name: url}``: trees written to S3 as .zarr (a, b), .zarr.zip and .h5 (a, big)."""
    urls = {}
    for name, suffix in (("a", ".zarr"), ("b", ".zarr"), ("a", ".zarr.zip"), ("a", ".h5"), ("big", ".zarr.zip"),
                         ("big", ".h5")):
        url = f"s3://{BUCKET}/end-to-end/{name}{suffix}"
        save_to_url(trees[name], Location.of(url, s3_storage_options), overwrite=True)
        urls[f"{name}{suffix}"] = url
    return urls


class Requests:
    """The requests the S3 server received inside a :func:`recorded` block."""

    def __init__(self, entries: list[dict]):
        self.entries = entries
        self.garbled = 0

    def keys(self, method: str = "GET", under: str = "") -> Counter:
        """How many ``method`` requests each key received (keys relative to the bucket)."""
        counted = Counter()
        for entry in self.entries:
            path = unquote(urlparse(entry["url"]).path).lstrip("/")
            if entry["method"] == method and path.startswith(f"{BUCKET}/{under}"):
                counted[path[len(BUCKET) + 1:]] += 1
        return counted

    def get_bytes(self, key: str, size: int) -> int:
        """Bytes the server sent for GETs of ``key`` (a Range header, or the whole object of ``size``)."""
        total = 0
        for entry in self.entries:
            if entry["method"] != "GET" or unquote(urlparse(entry["url"]).path).lstrip("/") != f"{BUCKET}/{key}":
                continue
            headers = {name.lower(): value for name, value in entry["headers"].items()}
            wanted = headers.get("range")
            if wanted:
                first, _, last = wanted.removeprefix("bytes=").partition("-")
                total += min(int(last), size - 1) - int(first) + 1
            else:
                total += size
        return total

    def puts(self) -> list[str]:
        return [unquote(urlparse(e["url"]).path).lstrip("/")[len(BUCKET) + 1:] for e in self.entries if e["method"] == "PUT"]


@pytest.fixture
def recorded(s3_endpoint, tmp_path, monkeypatch):
    """``with recorded() as log:`` records the server's requests into ``log.entries``."""

    @contextlib.contextmanager
    def record():
        monkeypatch.chdir(tmp_path)  # moto writes its recording into the working directory
        requests.post(f"{s3_endpoint}/moto-api/recorder/reset-recording", timeout=30)
        requests.post(f"{s3_endpoint}/moto-api/recorder/start-recording", timeout=30)
        log = Requests([])
        try:
            yield log
        finally:
            requests.post(f"{s3_endpoint}/moto-api/recorder/stop-recording", timeout=30)
            text = requests.get(f"{s3_endpoint}/moto-api/recorder/download-recording", timeout=30).text
            for line in text.splitlines():
                # The server's threads append to one file: uploads logged with their (large) bodies
                # can interleave, leaving a line that is not one request. Those are left out;
                # reads (no body) are single short lines.
                try:
                    log.entries.append(json.loads(line))
                except ValueError:
                    log.garbled += 1

    return record


def chunk_keys(url: str, options) -> dict[str, int]:
    """``{key: size}`` of the stored weights chunks, listed with s3fs itself (not through attnformat)."""
    import s3fs

    filesystem = s3fs.S3FileSystem(endpoint_url=options["endpoint_url"], key="testing", secret="testing", skip_instance_cache=True)
    prefix = url.removeprefix("s3://") + "/encoder/self/weights/c/"
    return {name[len(BUCKET) + 1:]: info["size"] for name, info in filesystem.find(prefix, detail=True).items()}


def _weights_from_s3(url: str, options) -> np.ndarray:
    """The weights read from S3 with zarr and s3fs directly (not through attnformat)."""
    import s3fs

    filesystem = s3fs.S3FileSystem(endpoint_url=options["endpoint_url"], key="testing", secret="testing",
                                   skip_instance_cache=True)
    store = zarr.storage.FsspecStore.from_mapper(filesystem.get_mapper(url.removeprefix("s3://")), read_only=True)
    return zarr.open_group(store, mode="r")["encoder/self/weights"][...]


# -- writing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.zarr", "a.zarr.zip", "a.h5"])
def test_written_to_s3_and_read_back_in_place(name, remote, trees, s3_storage_options):
    url = remote[name]
    tree = attnformat.open(url, storage_options=s3_storage_options)
    np.testing.assert_array_equal(tree["encoder/self"]["weights"].values, trees["a"]["encoder/self"]["weights"].values)
    assert list(tree["encoder/self"].coords["query_label"].values[1][:3]) == ["t0", "t1", "t2"]
    report = attnformat.validate(url, storage_options=s3_storage_options)
    assert report.ok and report.findings == [], report.format()
    if name == "a.zarr":  # zarr reading the bucket itself sees the same values
        np.testing.assert_array_equal(_weights_from_s3(url, s3_storage_options), trees["a"]["encoder/self"]["weights"].values)
    if name == "a.zarr.zip":  # a real zip archive, entries at its root
        with attnformat.engines.remote.open_zip(Location.of(url, s3_storage_options)) as archive:
            assert "zarr.json" in archive.namelist() and "encoder/self/weights/zarr.json" in archive.namelist()


def test_existing_url_is_not_replaced_without_overwrite(remote, trees, s3_storage_options, tmp_path):
    location = Location.of(remote["a.h5"], s3_storage_options)
    with pytest.raises(AttnFormatError, match=r"s3://attnformat-test/end-to-end/a\.h5: already exists; pass overwrite=True"):
        save_to_url(trees["b"], location)
    with pytest.raises(AttnFormatError, match="already exists"):
        upload(attnformat.example_path("dense"), Location.of(remote["a.zarr"], s3_storage_options))
    # The refused writes changed nothing.
    again = attnformat.open(location)["encoder/self"]["weights"].values
    np.testing.assert_array_equal(again, trees["a"]["encoder/self"]["weights"].values)


def test_zarr_upload_puts_the_root_metadata_last(trees, s3_storage_options, recorded):
    url = f"s3://{BUCKET}/end-to-end/ordered.zarr"
    with recorded() as log:
        save_to_url(trees["b"], Location.of(url, s3_storage_options), overwrite=True)
    puts = [key.removeprefix("end-to-end/ordered.zarr/") for key in log.puts()]
    # The root document is the last request of all (it is uploaded once every other object is in).
    last = log.entries[-1]
    assert last["method"] == "PUT" and unquote(urlparse(last["url"]).path).endswith("/end-to-end/ordered.zarr/zarr.json")
    assert puts.count("zarr.json") == 1
    assert len(puts) + log.garbled >= SAMPLES * LAYERS * HEADS


# -- reading in place --------------------------------------------------------------------------------


def test_stats_read_each_chunk_once(remote, s3_storage_options, recorded):
    from attnformat.viewer.statistics import statistics_summary

    chunks = chunk_keys(remote["a.zarr"], s3_storage_options)
    assert len(chunks) == SAMPLES * LAYERS * HEADS
    with recorded() as log:
        summary = statistics_summary(remote["a.zarr"], storage_options=s3_storage_options)
    fetched = log.keys("GET", under="end-to-end/a.zarr/encoder/self/weights/c/")
    assert fetched == Counter({key: 1 for key in chunks}), fetched
    local = statistics_summary(attnformat.open(remote["a.zarr"], storage_options=s3_storage_options).load())
    assert summary["sites"] == local["sites"]


def test_plot_of_one_head_reads_only_its_chunk(remote, trees, s3_storage_options, recorded):
    from attnformat.viewer import heatmap

    chunks = chunk_keys(remote["a.zarr"], s3_storage_options)
    with recorded() as log:
        ax = heatmap(attnformat.open(remote["a.zarr"], storage_options=s3_storage_options), sample=1, layer=1, head=2)
    fetched = log.keys("GET", under="end-to-end/a.zarr/encoder/self/weights/c/")
    assert fetched == Counter({"end-to-end/a.zarr/encoder/self/weights/c/1/1/2/0/0": 1})
    assert set(fetched) <= set(chunks)
    expected = trees["a"]["encoder/self"]["weights"].values[1, 1, 2]
    np.testing.assert_array_equal(np.ma.filled(ax.images[0].get_array(), np.nan), expected)


@pytest.mark.parametrize("name", ["big.zarr.zip", "big.h5"])
def test_one_map_from_a_single_file_store_fetches_a_fraction_of_it(name, remote, trees, s3_storage_options, recorded):
    import s3fs

    key = remote[name].removeprefix(f"s3://{BUCKET}/")
    size = s3fs.S3FileSystem(endpoint_url=s3_storage_options["endpoint_url"], key="testing", secret="testing",
                             skip_instance_cache=True).size(f"{BUCKET}/{key}")
    with recorded() as log:
        head = attnformat.read_map(remote[name], "encoder/self", sample=1, layer=1, head=2, storage_options=s3_storage_options)
    np.testing.assert_array_equal(head.values, trees["big"]["encoder/self"]["weights"].values[1, 1, 2])
    fetched = log.get_bytes(key, size)
    one_map = TOKENS * TOKENS * 4
    print(f"{name}: one map fetched {fetched} of {size} bytes ({fetched / size:.2f})")
    # The map's chunk and the blocks holding the file's metadata (the engine screens, then opens).
    assert one_map * 0.5 <= fetched < size / 2


def test_diff_of_two_remote_files_reads_each_chunk_once(remote, trees, s3_storage_options, recorded):
    from attnformat.compare import compare

    with recorded() as log:
        result = compare(remote["a.zarr"], remote["b.zarr"], storage_options=s3_storage_options)
    for name in ("a.zarr", "b.zarr"):
        fetched = log.keys("GET", under=f"end-to-end/{name}/encoder/self/weights/c/")
        assert fetched == Counter({key: 1 for key in chunk_keys(remote[name], s3_storage_options)}), (name, fetched)
    a = trees["a"]["encoder/self"]["weights"].values.astype(np.float64)
    b = trees["b"]["encoder/self"]["weights"].values.astype(np.float64)
    dataset = result.dataset()
    np.testing.assert_allclose(dataset["max_abs_diff"].values, np.abs(b - a).max(axis=(0, 3, 4)), rtol=1e-6)
    from scipy.spatial.distance import jensenshannon

    expected = jensenshannon(a[1, 0, 2], b[1, 0, 2], base=2, axis=-1) ** 2
    np.testing.assert_allclose(dataset["jsd"].values[1, 0, 2], expected, rtol=1e-4, atol=1e-7)


def test_diff_command_on_s3_urls(remote, s3_storage_options, capsys, tmp_path):
    from attnformat.cli import main

    options = [word for key, value in s3_storage_options.items() for word in ("--storage-option", f"{key}={value}")]
    out = tmp_path / "diff.png"
    assert main(["diff", remote["a.zarr"], remote["b.zarr"], "--top", "2", "-o", str(out), *options]) == 0
    printed = capsys.readouterr().out
    assert f"A: {remote['a.zarr']}" in printed and f"wrote {out}" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["diff", remote["a.zarr"], remote["a.h5"], "--json", *options]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert all(head["max_abs_diff"] == 0.0 for head in summary["sites"]["encoder/self"]["heads"])


def test_report_on_a_remote_file(remote, s3_storage_options, recorded, tmp_path):
    from attnformat.viewer.report import report

    chunks = chunk_keys(remote["a.zarr"], s3_storage_options)
    with recorded() as log:
        index = report(remote["a.zarr"], tmp_path / "report", progress=False, workers=1, storage_options=s3_storage_options)
    assert index.exists() and (tmp_path / "report" / "stats.json").exists()
    fetched = log.keys("GET", under="end-to-end/a.zarr/encoder/self/weights/c/")
    print(f"report: {sum(fetched.values())} chunk GETs for {len(chunks)} chunks, most for one chunk {max(fetched.values())}")
    assert set(fetched) == set(chunks) and max(fetched.values()) == 1  # every chunk, each once: never the file twice


# -- the public writing API on s3:// ------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_save_to_an_s3_url(suffix, trees, s3_storage_options):
    url = f"s3://{BUCKET}/public/saved{suffix}"
    written = attnformat.save(trees["a"], url, storage_options=s3_storage_options, overwrite=True)
    assert str(written) == url
    tree = attnformat.open(url, storage_options=s3_storage_options)
    np.testing.assert_array_equal(tree["encoder/self"]["weights"].values, trees["a"]["encoder/self"]["weights"].values)
    with pytest.raises(AttnFormatError, match="already exists"):
        attnformat.save(trees["b"], url, storage_options=s3_storage_options)


def test_writer_streams_layer_by_layer_to_an_s3_url(trees, s3_storage_options):
    url = f"s3://{BUCKET}/public/streamed.zarr"
    weights = trees["b"]["encoder/self"]["weights"].values
    with attnformat.Writer(url, model_name="toy", storage_options=s3_storage_options, overwrite=True) as writer:
        site = writer.create_site("encoder/self", sizes={"sample": SAMPLES, "layer": LAYERS, "head": HEADS, "query": TOKENS,
                                                          "key": TOKENS})
        for layer in range(LAYERS):
            site.write("weights", weights[:, layer], layer=layer)
    staged = writer.path
    assert not staged.exists()  # the local staging copy is gone once uploaded
    tree = attnformat.open(url, storage_options=s3_storage_options)
    assert attnformat.is_complete(tree)
    np.testing.assert_array_equal(_weights_from_s3(url, s3_storage_options), weights)
    assert attnformat.validate(url, storage_options=s3_storage_options).ok


def test_convert_a_local_file_to_an_s3_url(trees, s3_storage_options, tmp_path, capsys):
    local = attnformat.save(trees["b"], tmp_path / "local.h5")
    url = f"s3://{BUCKET}/public/converted.zarr"
    assert attnformat.convert(local, url, storage_options=s3_storage_options, overwrite=True) == []
    np.testing.assert_array_equal(_weights_from_s3(url, s3_storage_options), trees["b"]["encoder/self"]["weights"].values)
    from attnformat.cli import main

    options = [word for key, value in s3_storage_options.items() for word in ("--storage-option", f"{key}={value}")]
    zipped = f"s3://{BUCKET}/public/converted.zarr.zip"
    assert main(["convert", str(local), zipped, "--overwrite", *options]) == 0
    tree = attnformat.open(zipped, storage_options=s3_storage_options)
    np.testing.assert_array_equal(tree["encoder/self"]["weights"].values, trees["b"]["encoder/self"]["weights"].values)
