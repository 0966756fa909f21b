"""The report writes the interactive explorer page beside its plots and links it from index.html."""

from __future__ import annotations

import html
import json
import re


import attnformat
from attnformat.viewer import report



def test_report_links_an_explorer_page_of_the_same_file(example, tmp_path):
    path = example("dense")
    index = report(path, tmp_path / "out", progress=False, workers=1)
    page = tmp_path / "out" / "explorer.html"
    assert page.is_file()
    assert '<a href="explorer.html">' in index.read_text(encoding="utf-8")
    text = page.read_text(encoding="utf-8")
    data = re.search(r'<script type="application/json" id="af-data">(.*?)</script>', text, re.S).group(1)
    payload = json.loads(html.unescape(data) if data.lstrip().startswith("&") else data)
    tree = attnformat.open(path)
    assert payload["format"] == "attnformat-explorer"
    assert [site["name"] for site in payload["sites"]] == ["encoder/self"]
    site = payload["sites"][0]
    assert site["key_labels"][0] == [str(v) for v in tree["encoder/self"]["key_label"].values]
