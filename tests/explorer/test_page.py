"""The explorer page as text (no browser; tests/explorer/test_browser_*.py run it in Chromium):
self-contained, no URL, labels only escaped inside the JSON, and ``attnformat view``'s output and
exit codes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import attnformat
from attnformat.cli import main
from attnformat.examples import FORMAT_NAME, FORMAT_VERSION
from attnformat.viewer.explorer import build_payload, render_page, write_page
from attnformat.viewer.explorer.page import payload_json

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = ["<img src=x onerror=alert(1)>", "</script><script>alert(2)</script>", "a&b", "\u2028line", "<!--"]


def _data_of(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="af-data">(.*?)</script>', page, re.S)
    assert match, "no af-data element"
    return json.loads(match.group(1))


def _hostile_file(path):
    tokens = len(HOSTILE) + 1
    labels = np.array(["[CLS]", *HOSTILE], dtype=object)
    weights = np.full((1, 2, tokens, tokens), 1.0 / tokens, dtype=np.float32)
    site = xr.Dataset({"weights": (("layer", "head", "query", "key"), weights)},
                      coords={"layer": [0], "head": [0, 1], "query_label": ("query", labels),
                              "key_label": ("key", labels)},
                      attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key",
                             "attention_type": "self", "causal": 0})
    root = xr.Dataset(attrs={"attnformat": FORMAT_NAME, "attnformat_version": FORMAT_VERSION,
                             "producer": "attnformat tests", "completeness": "complete", "model_framework": "numpy"})
    attnformat.save(xr.DataTree.from_dict({"/": root, "/enc</script>": site}), path)
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return _hostile_file(tmp_path_factory.mktemp("page") / "hostile.zarr")


@pytest.mark.parametrize("name", ["dense", "encoder-decoder", "edge", "image", "statistics"])
def test_page_is_self_contained(name):
    page = render_page(build_payload(attnformat.example_path(name)))
    lowered = page.lower()
    for forbidden in ("http://", "https://", "//cdn", "@import", "<link rel=\"stylesheet\"", "<iframe"):
        assert forbidden not in lowered, forbidden
    assert re.findall(r"url\(\s*['\"]?(?!#)", lowered) == []  # only references inside the page (url(#id))
    # No element loads anything: no src= or href= except the favicon's empty data: URL.
    assert re.findall(r"\ssrc\s*=", page) == []
    assert re.findall(r"\shref\s*=\s*\"([^\"]*)\"", page) == ["data:,"]
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    # core.js first, then the other scripts.
    names = re.findall(r"<script>/\* (\S+\.js) \*/", page)
    assert names[0] == "core.js" and {"token_view.js", "matrix_view.js"} <= set(names)


def test_labels_appear_only_escaped_inside_the_json(hostile):
    page = render_page(build_payload(hostile))
    data = _data_of(page)
    site = data["sites"][0]
    assert site["query_labels"][0][1:] == HOSTILE and site["key_labels"][0][1:] == HOSTILE
    assert site["name"] == "enc</script>"
    for label in HOSTILE:
        assert label not in page
    assert page.count("</script>") == page.count("<script")  # no label closed a script element early
    assert page.count("<img") == 0
    assert "\\u003cimg src=x onerror=alert(1)\\u003e" in page
    assert "\u2028" not in page and "\u2029" not in page


def test_payload_json_escapes_what_html_would_read():
    text = payload_json({"a": "<b>&</b>\u2028\u2029"})
    assert json.loads(text) == {"a": "<b>&</b>\u2028\u2029"}
    assert not set("<>&\u2028\u2029") & set(text)
    assert json.loads(payload_json({"x": [float("nan"), 1.5, {"y": float("inf")}]})) == {"x": [None, 1.5, {"y": None}]}


def test_view_writes_the_page(tmp_path, capsys, monkeypatch):
    path = attnformat.example_path("dense")
    out = tmp_path / "page.html"
    assert main(["view", str(path), "-o", str(out), "--layers", "1", "--max-bytes", "1MB", "--title", "<t>"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "MB" in printed
    page = out.read_text(encoding="utf-8")
    data = _data_of(page)
    assert data["title"] == "<t>" and "<title>&lt;t&gt;</title>" in page
    assert sorted({key.split("/")[3] for key in data["sites"][0]["maps"]}) == ["l1"]
    tree = attnformat.open(path)
    assert data["sites"][0]["query_labels"][0] == [str(v) for v in tree["encoder/self"].coords["query_label"].values]
    # default output: the file's name + .html in the current directory
    monkeypatch.chdir(tmp_path)
    assert main(["view", str(path)]) == 0
    assert (tmp_path / "dense.zarr.html").is_file()


def test_write_page_returns_the_path(tmp_path):
    written = write_page(attnformat.example_path("steps"), tmp_path / "steps.html", max_bytes=100_000)
    assert written == tmp_path / "steps.html" and _data_of(written.read_text(encoding="utf-8"))["sites"][0]["steps"]


def test_view_exit_codes(tmp_path, capsys):
    assert main(["view", str(tmp_path / "missing.zarr"), "-o", str(tmp_path / "x.html")]) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "missing.zarr" in message
    invalid = ROOT / "spec" / "conformance" / "invalid" / "ATTN-DIM-001.zarr"
    assert main(["view", str(invalid), "-o", str(tmp_path / "y.html")]) == 1
    message = capsys.readouterr().err.strip()
    assert "ATTN-DIM-001" in message and message.count("\n") == 0
    assert not (tmp_path / "y.html").exists()
    dense = str(attnformat.example_path("dense"))
    assert main(["view", dense, "--site", "nowhere", "-o", str(tmp_path / "z.html")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["view", str(attnformat.example_path("dense")), "--max-bytes", "lots"]) == 2


def test_serve_command_serves_the_page_until_interrupted():
    import signal
    import subprocess
    import sys
    import urllib.request

    path = attnformat.example_path("dense")
    process = subprocess.Popen([sys.executable, "-m", "attnformat", "serve", str(path), "--port", "0", "--no-browser"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = process.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        page = urllib.request.urlopen(url, timeout=30).read().decode("utf-8")
        data = _data_of(page)
        assert data["mode"] == "server" and all(not site["maps"] for site in data["sites"])
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def test_serve_command_exit_codes(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing.zarr"), "--no-browser", "--port", "0"]) == 2
    assert "missing.zarr" in capsys.readouterr().err
    invalid = ROOT / "spec" / "conformance" / "invalid" / "ATTN-DIM-001.zarr"
    assert main(["serve", str(invalid), "--no-browser", "--port", "0"]) == 1
