"""Text from a file never drives a terminal or a page: hostile labels, names and descriptions are
shown escaped by ``info``, ``validate``, ``stats`` and the report (summary.md and index.html)."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
import xarray as xr
from markdown_it import MarkdownIt

import attnformat
from attnformat.examples import build
from attnformat.summary import describe, format_description
from attnformat.text import for_html, for_markdown, for_terminal, markdown_code, markdown_fence

MARKDOWN_INJECTION = "\n# Owned\n![x](http://evil/x.png)"
HTML_INJECTION = "<img src=x onerror=alert(1)>"
TERMINAL_INJECTION = "\x1b[2J\x1b]0;title\x07"
HOSTILE = [MARKDOWN_INJECTION, HTML_INJECTION, TERMINAL_INJECTION, "a\u202eb\rc", "`` ``` <b>|x|</b> www.evil.com a@b.c"]
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202e]")


def _render_markdown(text: str) -> str:
    """HTML from a CommonMark renderer (raw HTML allowed, as GitHub and most viewers allow tags)."""
    return MarkdownIt("commonmark").enable("table").render(text)


def _hostile_tree() -> xr.DataTree:
    tree = build("dense")
    site = tree["encoder/self"].to_dataset(inherit=False)
    labels = np.array([*HOSTILE, "[SEP]"], dtype=object)
    site = site.assign_coords(query_label=("query", labels), key_label=("key", labels))
    site.attrs["note\x1b[31m"] = TERMINAL_INJECTION
    root = tree.to_dataset(inherit=False)
    root.attrs.update(description=MARKDOWN_INJECTION, model_name=HTML_INJECTION)
    return xr.DataTree.from_dict({"/": root, f"/encoder/{TERMINAL_INJECTION}": site, f"/encoder/{HTML_INJECTION}": site})


@pytest.mark.parametrize("text", HOSTILE)
def test_for_terminal_shows_every_control_character_and_keeps_the_rest(text):
    shown = for_terminal(text)
    assert not CONTROL.search(shown)
    # Reading the escapes back gives the original text: nothing was dropped.
    assert shown.encode("latin-1", "backslashreplace").decode("unicode_escape") == text


@pytest.mark.parametrize("text", HOSTILE)
def test_for_markdown_renders_as_the_text_itself_and_nothing_else(text):
    rendered = _render_markdown(f"- label: {for_markdown(text)}\n\n{for_markdown(text)}\n\n| {for_markdown(text)} |\n|---|\n")
    assert not re.search(r"<(h[1-6]|img|a|b|code|em|strong)\b", rendered), rendered
    assert "<table>" in rendered and rendered.count("<td>") == 0 and rendered.count("<th>") == 1  # one cell, not split
    visible = html.unescape(re.sub(r"<[^>]+>", "", rendered))
    assert for_terminal(text) in visible  # shown as written (controls as escapes)


def test_bare_urls_are_not_left_for_autolinking():
    escaped = for_markdown("see http://evil/x.png and www.evil.com")
    assert "://" not in escaped.replace("\\://", "") and "www." not in escaped


def test_code_spans_and_fences_cannot_be_closed_from_inside():
    text = "``` x ` y ``"
    rendered = _render_markdown(f"a {markdown_code(text)} b")
    assert html.unescape(re.search(r"<code>(.*)</code>", rendered).group(1)) == text
    block = _render_markdown(markdown_fence("```\n# Owned\n![x](http://evil/x.png)"))
    assert "<h1>" not in block and "<img" not in block and block.count("<pre>") == 1


def test_for_html_escapes_tags_and_controls():
    assert for_html(HTML_INJECTION + TERMINAL_INJECTION) == "&lt;img src=x onerror=alert(1)&gt;\\x1b[2J\\x1b]0;title\\x07"


def test_info_prints_no_control_characters():
    text = format_description(describe(_hostile_tree()))
    assert not CONTROL.search(text.replace("\n", ""))
    assert "group /encoder/\\x1b[2J\\x1b]0;title\\x07  [attention site]" in text
    assert ":note\\x1b[31m = " in text


def test_validate_prints_no_control_characters():
    tree = _hostile_tree()
    tree[f"encoder/{TERMINAL_INJECTION}"].attrs["layout"] = "sparse"
    report = attnformat.validate(tree)
    assert any(f.rule_id == "ATTN-SITE-001" for f in report.errors)
    text = report.format()
    assert not CONTROL.search(text.replace("\n", ""))
    assert "/encoder/\\x1b[2J\\x1b]0;title\\x07: " in text


def test_stats_prints_no_control_characters():
    from attnformat.viewer import format_summary, statistics_summary

    tree = _hostile_tree()
    tree[f"encoder/{TERMINAL_INJECTION}"].attrs["attention_type"] = "self\x1b[2J"
    summary = statistics_summary(tree)
    assert TERMINAL_INJECTION.join(["encoder/", ""]) in summary["sites"]  # the data keeps the name
    text = format_summary(summary)
    assert not CONTROL.search(text.replace("\n", ""))
    assert "encoder/\\x1b[2J\\x1b]0;title\\x07" in text and "self\\x1b[2J_attention" in text


def test_report_pages_show_hostile_text_as_text(tmp_path):
    from attnformat.viewer import report

    index = report(_hostile_tree(), tmp_path, progress=False, dpi=20)
    markdown = (tmp_path / "summary.md").read_text(encoding="utf-8")
    page = index.read_text(encoding="utf-8")
    for text in (markdown, page):
        assert not CONTROL.search(text.replace("\n", ""))
    rendered = _render_markdown(markdown)
    headings = re.findall(r"<h[1-6]>(.*?)</h[1-6]>", rendered)
    assert headings[0].startswith("Attention report") and not any("Owned" == h.strip() for h in headings)
    assert not re.search(r"<img|<a href=\"http|onerror=alert\(1\)>", rendered.replace("&lt;img src=x onerror=alert(1)&gt;", ""))
    images = re.findall(r"<img src=\"([^\"]+)\"", page)
    assert images and all(re.fullmatch(r"[A-Za-z0-9._-]+\.png", src) for src in images)
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    visible = html.unescape(re.sub(r"<[^>]+>", "", rendered))
    assert "# Owned" in visible and "![x](http://evil/x.png)" in visible  # shown, not interpreted
