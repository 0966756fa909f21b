"""``serve``: the page in server mode and ``/api/map`` windows, checked against the file's own arrays.

Ground truth is read with zarr itself (``zarr.open_group``), not through attnformat; decoded
values must be within the stated ``max_error`` of it. Every server listens on 127.0.0.1 and is
closed by the test that started it.
"""

from __future__ import annotations

import base64
import gzip
import json
import math
import re
import shutil
import threading
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import attnformat
from attnformat.viewer.explorer.server import serve

SITE = "encoder/self"


def _tree(weights: np.ndarray, *, mask=None, labels=None) -> xr.DataTree:
    dims = ("sample", "layer", "head", "query", "key")
    samples, layers, heads, rows, cols = weights.shape
    coords = {"layer": np.arange(layers), "head": np.arange(heads)}
    if labels is not None:
        coords["query_label"] = (("sample", "query"), labels)
        coords["key_label"] = (("sample", "key"), labels)
    if mask is not None:
        coords["query_mask"] = (("sample", "query"), mask)
        coords["key_mask"] = (("sample", "key"), mask)
    site = xr.Dataset({"weights": (dims, weights)}, coords=coords,
                      attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key",
                             "attention_type": "self", "causal": 0})
    root = xr.Dataset(attrs={"attnformat": "attnformat", "attnformat_version": "1.2.0", "producer": "test",
                             "completeness": "complete", "model_framework": "numpy",
                             "model_name": "random"})
    return xr.DataTree.from_dict({"/": root, f"/{SITE}": site})


def _softmax_rows(rng, shape) -> np.ndarray:
    values = rng.random(shape).astype(np.float32) ** 4
    return values / values.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A padded batch (2 samples x 3 layers x 2 heads x 100 x 100 tokens) as Zarr and HDF5."""
    rng = np.random.default_rng(11)
    weights = _softmax_rows(rng, (2, 3, 2, 100, 100))
    mask = np.ones((2, 100), bool)
    mask[1, 80:] = False  # the second text is 80 tokens long
    weights[1] = 0.0
    weights[1, ..., :80, :80] = _softmax_rows(rng, (3, 2, 80, 80))  # padding queries attend nowhere
    labels = np.array([[f"t{s}_{i}" for i in range(100)] for s in range(2)], dtype=object)
    folder = tmp_path_factory.mktemp("served")
    paths = {}
    for suffix in (".zarr", ".h5", ".zarr.zip"):
        paths[suffix] = folder / f"batch.attn{suffix}"
        attnformat.save(_tree(weights, mask=mask, labels=labels), paths[suffix])
    return paths, mask


def _truth(path: Path) -> np.ndarray:
    """The stored weights, read with zarr (not attnformat)."""
    return np.asarray(zarr.open_group(str(path), mode="r")[f"{SITE}/weights"][...])


def _get(url: str):
    """(status, content type, parsed JSON or text) of a GET; errors too."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            status, kind, body = response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        status, kind, body = error.code, error.headers["Content-Type"], error.read()
    if kind == "application/json":
        return status, kind, json.loads(body)
    return status, kind, body.decode()


def _decode(answer: dict) -> np.ndarray:
    raw = base64.b64decode(answer["q"])
    if answer.get("compression") == "deflate":
        raw = zlib.decompress(raw)
    codes = np.frombuffer(raw, np.uint8).reshape(answer["rows"], answer["cols"])
    return np.where(codes == 255, np.nan, answer["offset"] + answer["scale"] * codes.astype(np.float64))


def _assert_close(decoded: np.ndarray, expected: np.ndarray, max_error: float) -> None:
    assert decoded.shape == expected.shape
    assert np.array_equal(np.isnan(decoded), np.isnan(expected))
    present = ~np.isnan(expected)
    assert np.abs(decoded[present] - expected[present]).max(initial=0) <= max_error * (1 + 1e-9) + 1e-12


def _blocks(values: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """NaN-aware mean of rows x cols blocks, written out cell by cell (the reference pooling)."""
    out = np.full((math.ceil(values.shape[0] / rows), math.ceil(values.shape[1] / cols)), np.nan)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            block = values[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]
            if (~np.isnan(block)).any():
                out[i, j] = np.nanmean(block)
    return out


def test_page_is_served_in_server_mode_without_maps(files):
    paths, _ = files
    with serve(paths[".zarr"]) as server:
        assert server.url.startswith("http://127.0.0.1:")
        status, kind, page = _get(server.url)
        # A browser asks for gzip and gets the same page, smaller.
        with urllib.request.urlopen(urllib.request.Request(server.url, headers={"Accept-Encoding": "gzip"})) as zipped:
            assert zipped.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(zipped.read()).decode() == page
    assert status == 200 and kind == "text/html; charset=utf-8"
    found = re.search(r'<script type="application/json" id="af-data">(.*?)</script>', page, re.S)
    payload = json.loads(found.group(1))
    assert payload["mode"] == "server"
    assert not any(site.get("maps") for site in payload["sites"])
    assert payload["sites"][0]["query_labels"][0][:2] == ["t0_0", "t0_1"]


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_map_windows_equal_the_files_values(files, suffix):
    paths, _ = files
    truth = _truth(paths[".zarr"])
    with serve(paths[suffix]) as server:
        for sample, layer, head, q0, q1, k0, k1 in [(0, 0, 0, 0, 100, 0, 100), (0, 2, 1, 10, 37, 5, 99), (1, 1, 0, 0, 100, 0, 100)]:
            url = f"{server.url}api/map?site={SITE}&variable=weights&sample={sample}&step=0&layer={layer}&head={head}" \
                  f"&q0={q0}&q1={q1}&k0={k0}&k1={k1}&max=512"
            status, _, answer = _get(url)
            assert status == 200, answer
            assert (answer["q0"], answer["q1"], answer["k0"], answer["k1"]) == (q0, q1, k0, k1)
            assert (answer["pool_q"], answer["pool_k"]) == (1, 1)
            expected = truth[sample, layer, head, q0:q1, k0:k1].astype(np.float64)
            if sample == 1:  # padding is absent, not zero
                expected[80 - q0:, :] = np.nan
                expected[:, 80 - k0:] = np.nan
            _assert_close(_decode(answer), expected, answer["max_error"])
        assert answer["max_error"] == pytest.approx(answer["scale"] / 2)


def test_large_windows_are_pooled_and_head_mean_is_the_mean(files):
    paths, _ = files
    truth = _truth(paths[".zarr"]).astype(np.float64)
    with serve(paths[".zarr"]) as server:
        _, _, pooled = _get(f"{server.url}api/map?site={SITE}&sample=0&layer=1&head=1&max=16")
        _, _, window = _get(f"{server.url}api/map?site={SITE}&sample=0&layer=1&head=1&q0=20&q1=60&k0=0&k1=33&max=10")
        _, _, mean = _get(f"{server.url}api/map?site={SITE}&sample=0&layer=2&head=mean&max=512")
    assert (pooled["pool_q"], pooled["pool_k"], pooled["pool"]) == (7, 7, "mean")  # ceil(100 / 16)
    _assert_close(_decode(pooled), _blocks(truth[0, 1, 1], 7, 7), pooled["max_error"])
    assert (window["rows"], window["cols"], window["pool_q"], window["pool_k"]) == (10, 9, 4, 4)
    _assert_close(_decode(window), _blocks(truth[0, 1, 1, 20:60, 0:33], 4, 4), window["max_error"])
    _assert_close(_decode(mean), truth[0, 2].mean(axis=0), mean["max_error"])


@pytest.mark.parametrize("query, status, says", [
    ("site=nowhere&layer=0&head=0", 404, "no attention site 'nowhere'"),
    (f"site={SITE}&variable=nothing", 404, "no variable 'nothing'"),
    (f"site={SITE}&layer=3", 400, "layer=3 is out of range"),
    (f"site={SITE}&layer=one", 400, "layer must be an integer"),
    (f"site={SITE}&q0=50&q1=40", 400, "need 0 <= q0 < q1 <= 100"),
    (f"site={SITE}&k1=101", 400, "need 0 <= k0 < k1 <= 100"),
    (f"site={SITE}&max=0", 400, "max must be between 1"),
    (f"site={SITE}&max=70000", 400, "max must be between 1 and 65536"),
    (f"site={SITE}&colour=red", 400, "no dimension 'colour'"),
    (f"site={SITE}&layer=0&layer=1", 400, "given 2 times"),
])
def test_bad_requests_get_one_line_of_json(files, query, status, says):
    paths, _ = files
    with serve(paths[".zarr"]) as server:
        found, kind, answer = _get(f"{server.url}api/map?{query}")
    assert (found, kind) == (status, "application/json")
    assert list(answer) == ["error"] and says in answer["error"]
    assert "\n" not in answer["error"] and "Traceback" not in answer["error"]


def test_unknown_paths_methods_and_hosts_are_refused(files):
    paths, _ = files
    with serve(paths[".zarr"]) as server:
        status, _, answer = _get(server.url + "etc/passwd")
        assert status == 404 and "no such path" in answer["error"]
        request = urllib.request.Request(server.url + "api/map", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 405
        # A page elsewhere that rebinds its own name to 127.0.0.1 sends its name as the Host.
        request = urllib.request.Request(server.url, headers={"Host": "attacker.example:80"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 403
    with pytest.raises(urllib.error.URLError):  # closed: nothing answers any more
        urllib.request.urlopen(server.url, timeout=5)


def test_concurrent_requests_share_the_opened_file(files):
    paths, _ = files
    truth = _truth(paths[".zarr"]).astype(np.float64)
    failures = []

    def ask(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(10):
            layer, head = int(rng.integers(3)), int(rng.integers(2))
            q0, k0 = int(rng.integers(0, 60)), int(rng.integers(0, 60))
            _, _, answer = _get(f"{server.url}api/map?site={SITE}&sample=0&layer={layer}&head={head}"
                                f"&q0={q0}&q1={q0 + 40}&k0={k0}&k1={k0 + 40}")
            decoded, expected = _decode(answer), truth[0, layer, head, q0:q0 + 40, k0:k0 + 40]
            if not np.abs(decoded - expected).max() <= answer["max_error"] * (1 + 1e-9) + 1e-12:
                failures.append((layer, head, q0, k0))

    with serve(paths[".zarr"]) as server:
        threads = [threading.Thread(target=ask, args=(seed,)) for seed in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


def test_a_map_request_reads_only_the_chunk_holding_that_map(tmp_path):
    """Every chunk of the variable but the one holding layer 27, head 2 is deleted after the server
    opened the file: the request for that map still answers with its values (so nothing else was
    read), and a map of another chunk reports its chunk as missing (so the file really is read at
    request time, chunk by chunk, not at start)."""
    rng = np.random.default_rng(3)
    weights = _softmax_rows(rng, (1, 32, 4, 64, 64))
    path = tmp_path / "many-layers.attn.zarr"
    attnformat.save(_tree(weights), path)
    truth = _truth(path)
    chunk_shape = zarr.open_group(str(path), mode="r")[f"{SITE}/weights"].chunks
    assert chunk_shape[3:] == (64, 64) and chunk_shape[1] < 32  # small maps are grouped, layers are not
    with serve(path) as server:
        chunks = Path(path, SITE, "weights", "c")
        kept = Path(chunks, "0", str(27 // chunk_shape[1]), str(2 // chunk_shape[2]), "0", "0")
        every = [chunk for chunk in chunks.rglob("*") if chunk.is_file()]
        assert kept in every and len(every) == 32 // chunk_shape[1] * 4 // chunk_shape[2] > 1
        for chunk in every:
            if chunk != kept:
                chunk.unlink()
        status, _, answer = _get(f"{server.url}api/map?site={SITE}&layer=27&head=2")
        assert status == 200
        _assert_close(_decode(answer), truth[0, 27, 2].astype(np.float64), answer["max_error"])
        status, _, answer = _get(f"{server.url}api/map?site={SITE}&layer=3&head=0")
    assert status == 500 and "ATTN-STORE-007" in answer["error"] and "\n" not in answer["error"]


@pytest.mark.parametrize("suffix", [".zarr", ".zarr.zip"])
def test_remote_files_take_the_same_road(files, s3_put, s3_storage_options, suffix):
    """Over S3 (a moto server on 127.0.0.1), with requests arriving side by side (a remote zip
    archive is read through one remote file handle: concurrent reads must still not mix)."""
    paths, _ = files
    truth = _truth(paths[".zarr"]).astype(np.float64)
    url = s3_put(paths[suffix], f"explorer/batch.attn{suffix}")
    answers = {}

    def ask(layer: int, head: int) -> None:
        answers[layer, head] = _get(f"{server.url}api/map?site={SITE}&sample=0&layer={layer}&head={head}&q0=3&q1=50")

    with serve(url, storage_options=s3_storage_options) as server:
        status, _, page = _get(server.url)
        assert status == 200 and "af-data" in page
        threads = [threading.Thread(target=ask, args=(layer, head)) for layer in range(3) for head in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(answers) == 6
    for (layer, head), (status, _, answer) in answers.items():
        assert status == 200
        _assert_close(_decode(answer), truth[0, layer, head, 3:50], answer["max_error"])


def test_a_missing_file_fails_before_listening(tmp_path):
    with pytest.raises(attnformat.UnreadableFileError):
        serve(tmp_path / "absent.attn.zarr")


def test_summary_endpoint_answers_once_per_row(files):
    paths, _ = files
    truth = _truth(paths[".zarr"]).astype(np.float64)
    with serve(paths[".zarr"]) as server:
        status, _, first = _get(f"{server.url}api/summary?site={SITE}&sample=0&step=0")
        _, _, again = _get(f"{server.url}api/summary?site={SITE}&sample=0&step=0")
        bad, _, answer = _get(f"{server.url}api/summary?site={SITE}&sample=5")
    assert status == 200 and first == again
    assert bad == 400 and "sample=5 is out of range" in answer["error"]
    # The largest weight per row, averaged over rows, from the file's own values.
    values = first["values"]["s0/t0"]
    name = next(stat for stat in first["statistics"] if "max" in stat)
    assert values[name][1][0] == pytest.approx(truth[0, 1, 0].max(axis=-1).mean(), rel=1e-4)



def test_windows_beyond_the_strip_size_are_read_in_strips_with_the_same_result(files, monkeypatch):
    from attnformat.viewer.explorer import server as server_module

    paths, _ = files
    truth = _truth(paths[".zarr"]).astype(np.float64)
    windows = server_module.MapWindows(attnformat.open(paths[".zarr"]))
    monkeypatch.setattr(server_module, "_STRIP_CELLS", 1000)  # strips of 7 rows: 15 reads
    reads = []
    original = windows._read_one
    monkeypatch.setattr(windows, "_read_one", lambda variable, indexers: reads.append(indexers["query"]) or original(variable, indexers))
    answer = windows.answer({"site": SITE, "sample": "1", "layer": "2", "head": "0", "max": "16"})
    assert len(reads) == 15 and all((r.stop - r.start) % 7 == 0 or r.stop == 100 for r in reads)
    expected = truth[1, 2, 0].copy()
    expected[80:, :] = np.nan
    expected[:, 80:] = np.nan
    _assert_close(_decode(answer), _blocks(expected, 7, 7), answer["max_error"])


def test_extras_endpoint_gives_a_layer_of_edge_weights():
    path = attnformat.example_path("edge")
    truth = np.asarray(zarr.open_group(str(path), mode="r")["gat/weights"][...], dtype=np.float64)  # (layer, head, edge)
    with serve(path) as server:
        status, _, answer = _get(f"{server.url}api/extras?site=gat&kind=edges&layer=1")
        bad, _, refused = _get(f"{server.url}api/extras?site=gat&kind=edges&layer=2")
    assert status == 200
    _assert_close(_decode(answer["values"]["weights/s0/t0/l1"]), truth[1], answer["values"]["weights/s0/t0/l1"]["max_error"])
    assert bad == 400 and "layer 2 out of range" in refused["error"]


def test_http_files_take_the_same_road(files, http_root):
    paths, _ = files
    truth = _truth(paths[".zarr"]).astype(np.float64)
    base, folder = http_root
    shutil.copy(paths[".h5"], folder / "served-batch.attn.h5")
    with serve(f"{base}/served-batch.attn.h5") as server:
        status, _, answer = _get(f"{server.url}api/map?site={SITE}&sample=0&layer=1&head=0&k0=10&k1=20")
    assert status == 200
    _assert_close(_decode(answer), truth[0, 1, 0, :, 10:20], answer["max_error"])


def test_a_row_is_exact_and_oversized_answers_are_refused(files, monkeypatch):
    from attnformat.viewer.explorer import server as server_module

    paths, _ = files
    truth = _truth(paths[".zarr"]).astype(np.float64)
    windows = server_module.MapWindows(attnformat.open(paths[".zarr"]))
    row = windows.answer({"site": SITE, "layer": "1", "head": "1", "q0": "42", "q1": "43", "max": "4096"})
    assert (row["rows"], row["cols"], row["pool_k"]) == (1, 100, 1)  # what a token view hovers: never pooled
    _assert_close(_decode(row), truth[0, 1, 1, 42:43], row["max_error"])
    monkeypatch.setattr(server_module, "MAX_ANSWER_CELLS", 2000)
    with pytest.raises(server_module.RequestError, match="would hold 10000 cells"):
        windows.answer({"site": SITE, "max": "4096"})


def test_a_huge_declared_file_starts_without_reading_maps(tmp_path):
    """12 layers x 12 heads x 4096² tokens declared (9.7 GB of float32), one map stored: the
    server starts (nothing but metadata is read), answers that map pooled (memory holds strips
    of rows, never the file), and says "not captured" (absent) for a map never written."""
    tokens = 4096
    labels = [f"t{i}" for i in range(tokens)]
    path = tmp_path / "huge.attn.zarr"
    writer = attnformat.Writer(path, model_name="synthetic")
    site = writer.create_site(SITE, sizes={"layer": 12, "head": 12, "query": tokens, "key": tokens},
                              coords={"query_label": ("query", labels), "key_label": ("key", labels)},
                              attrs={"attention_type": "self", "causal": 0})
    site.write("weights", np.eye(tokens, dtype=np.float32), layer=5, head=7)  # each token attends to itself
    writer.close(complete=False)
    with serve(path) as server:
        status, _, page = _get(server.url)
        assert status == 200 and len(page) < 2_000_000
        status, _, stored = _get(f"{server.url}api/map?site={SITE}&layer=5&head=7&max=64")
        _, _, missing = _get(f"{server.url}api/map?site={SITE}&layer=11&head=11&q0=4000&q1=4096&max=64")
    assert status == 200 and (stored["rows"], stored["cols"], stored["pool_q"], stored["pool_k"]) == (64, 64, 64, 64)
    _assert_close(_decode(stored), np.eye(64) / 64, stored["max_error"])  # a 64x64 block of the diagonal: 64 ones
    assert (missing["rows"], missing["cols"], missing["absent"]) == (48, 64, 48 * 64)


def test_head_mean_leaves_out_heads_without_a_value():
    """Causal logits: -inf above the diagonal in every head (absent), the mean of the others below."""
    from attnformat.viewer.explorer.server import MapWindows

    path = attnformat.example_path("encoder-decoder")
    logits = np.asarray(zarr.open_group(str(path), mode="r")["decoder/self/logits"][...], dtype=np.float64)
    answer = MapWindows(attnformat.open(path)).answer({"site": "decoder/self", "variable": "logits", "layer": "1",
                                                       "head": "mean"})
    present = np.isfinite(logits[1])  # (head, query, key)
    counted = present.sum(axis=0)
    expected = np.where(counted > 0, np.where(present, logits[1], 0.0).sum(axis=0) / np.maximum(counted, 1), np.nan)
    assert np.isnan(expected).any()  # the upper triangle: no head has a value there
    _assert_close(_decode(answer), expected, answer["max_error"])


def test_exact_rows_carry_the_stored_float32_values(files, monkeypatch):
    from attnformat.viewer.explorer import server as server_module

    paths, _ = files
    truth = _truth(paths[".zarr"])
    with serve(paths[".zarr"]) as server:
        _, _, row = _get(f"{server.url}api/map?site={SITE}&sample=1&layer=2&head=1&q0=7&q1=8&max=4096&exact=1")
    values = np.frombuffer(base64.b64decode(row["f32"]), "<f4")
    expected = truth[1, 2, 1, 7].copy()
    expected[80:] = np.nan  # padding keys of the second text
    np.testing.assert_array_equal(values, expected)  # bit for bit
    monkeypatch.setattr(server_module, "MAX_EXACT_CELLS", 50)
    with pytest.raises(server_module.RequestError, match="exact=1 is for rows"):
        server_module.MapWindows(attnformat.open(paths[".zarr"])).answer({"site": SITE, "q0": "7", "q1": "8", "exact": "1"})


def test_malformed_requests_get_json_too(files):
    import socket

    paths, _ = files
    with serve(paths[".zarr"]) as server:
        for raw in (b"GARBAGE\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n"):
            with socket.create_connection((server.host, server.port), timeout=30) as connection:
                connection.sendall(raw)
                reply = b""
                while chunk := connection.recv(65536):
                    reply += chunk
            if not reply.startswith(b"HTTP/"):  # no version in the request line: an HTTP/0.9 answer, body only
                assert list(json.loads(reply)) == ["error"]
                continue
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.split()[1] in (b"400", b"414", b"501") and b"application/json" in head, head
            assert list(json.loads(body)) == ["error"]


def test_edge_and_topk_sites_are_served_densified_from_the_files_arrays():
    from attnformat.viewer.explorer.server import MapWindows

    path = attnformat.example_path("edge")
    group = zarr.open_group(str(path), mode="r")["gat"]
    weights, source, target = (np.asarray(group[name][...]) for name in ("weights", "source", "target"))
    nodes = group["node_label"].shape[0]
    answer = MapWindows(attnformat.open(path)).answer({"site": "gat", "layer": "1", "head": "0"})
    expected = np.full((nodes, nodes), np.nan)
    expected[target, source] = weights[1, 0]  # rows: the node attending (target), columns: its sources
    _assert_close(_decode(answer), expected, answer["max_error"])

    path = attnformat.example_path("topk")
    group = zarr.open_group(str(path), mode="r")["decoder/self_topk"]
    kept, index = np.asarray(group["weights"][...], dtype=np.float64), np.asarray(group["key_index"][...])
    answer = MapWindows(attnformat.open(path)).answer({"site": "decoder/self_topk", "layer": "1", "head": "1",
                                                       "q0": "2", "q1": "6"})
    expected = np.full((4, answer["cols"]), np.nan)
    for row in range(4):
        valid = index[1, 1, row + 2] >= 0
        expected[row, index[1, 1, row + 2][valid]] = kept[1, 1, row + 2][valid]
    _assert_close(_decode(answer), expected, answer["max_error"])
