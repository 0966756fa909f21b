"""Every plot kind renders from every example file whose content supports it, and saves as PNG/SVG/PDF."""

from __future__ import annotations

import matplotlib
import pytest

import attnformat
from attnformat.examples import EXAMPLES
from attnformat.viewer import PLOT_KINDS, heatmap, plot, save_figure, sites_of
from attnformat.viewer.output import figure_of


def _cases():
    cases = []
    for name in EXAMPLES:
        tree = attnformat.examples.build(name)
        for kind, entry in PLOT_KINDS.items():
            if entry.scope == "file":
                if entry.applies(tree):
                    cases.append((name, kind, None))
                continue
            for site in sites_of(tree):
                if entry.applies(site):
                    cases.append((name, kind, site.path.strip("/")))
    return cases


CASES = _cases()


def test_every_kind_has_an_example_and_every_layout_is_covered():
    assert {kind for _, kind, _ in CASES} == set(PLOT_KINDS)
    assert {name for name, _, _ in CASES} == set(EXAMPLES)


@pytest.mark.parametrize(("name", "kind", "site"), CASES, ids=[f"{n}-{k}-{s}" for n, k, s in CASES])
def test_kind_renders_with_titles(example, tmp_path, name, kind, site):
    tree = attnformat.open(example(name))
    drawn = plot(tree, kind, **({"site": site} if site else {}))
    figure = figure_of(drawn)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    suptitle = figure._suptitle.get_text() if figure._suptitle else ""
    assert titles or suptitle
    if isinstance(drawn, matplotlib.axes.Axes):
        assert drawn.get_title()
        if site:
            assert drawn.get_title().startswith(site)
    out = save_figure(drawn, tmp_path / f"{kind}.png", dpi=40)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_svg_keeps_labels_as_text_and_pdf_is_written(example, tmp_path):
    ax = heatmap(example("dense"), layer=0, head=0)
    svg = save_figure(ax, tmp_path / "map.svg").read_text()
    assert svg.count("<text") >= 12  # 6 query and 6 key labels at least
    for label in ("[CLS]", "cat", "[SEP]", "encoder/self | layer 0 | head 0 | weights (softmax)"):
        assert f">{label}</text>" in svg
    pdf = save_figure(heatmap(example("dense")), tmp_path / "map.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    with pytest.raises(attnformat.AttnFormatError, match="use .png, .svg or .pdf"):
        save_figure(heatmap(example("dense")), tmp_path / "map.jpeg")
