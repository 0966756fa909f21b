"""A report of a whole file: every plot its content supports, an ``index.html`` that shows them, a
markdown summary (like seed 003's analysis report) and the statistics as JSON.

File names come from site paths and labels, which the file's writer chose: they are reduced to
``[A-Za-z0-9._-]`` so that a label such as ``../x`` cannot leave the output directory. Every text
from the file is escaped for where it goes (:mod:`attnformat.text`): HTML-escaped in the page, so
that a label such as ``<s>`` cannot break it; markdown-escaped in ``summary.md``, so that a
description holding a newline cannot open a heading or load a remote image there.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import xarray as xr
from tqdm.auto import tqdm

from attnformat.engines import Location
from attnformat.errors import AttnFormatError
from attnformat.reading import source_of
from attnformat.text import for_html, for_markdown, markdown_code, markdown_fence
from attnformat.viewer import catalog
from attnformat.viewer.output import close_figure, save_figure
from attnformat.viewer.selection import labels_of, open_source, site_name, sites_of
from attnformat.viewer.statistics import format_summary, statistics_summary, top_pairs

#: At most this many plots of one kind per site (e.g. one per layer, per time step, per node).
MAX_PER_KIND = 8
REPORT_DPI = 90
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_name(text: str, *, max_length: int = 100) -> str:
    """A file name made of ``[A-Za-z0-9._-]`` only, never starting with a dot, never empty.

    Examples
    --------
    >>> safe_file_name("../x"), safe_file_name("<s>"), safe_file_name("encoder/self-heatmap")
    ('x', 's', 'encoder_self-heatmap')
    """
    name = _UNSAFE.sub("_", str(text))
    name = re.sub(r"\.{2,}", "_", name)  # no ".." anywhere, even where it is harmless
    name = re.sub(r"_{2,}", "_", name).strip("._-")
    return name[:max_length].rstrip("._-") or "plot"


@dataclass
class ReportItem:
    """One plot of the report: where it goes, what it shows, and how to draw it."""

    section: str
    caption: str
    stem: str
    draw: Callable
    file: str = ""
    error: str = ""


@dataclass
class _Plan:
    items: list = field(default_factory=list)
    stems: dict = field(default_factory=dict)

    def add(self, section, caption, stem_parts, draw):
        stem = "-".join(safe_file_name(p) for p in stem_parts if str(p))
        count = self.stems.get(stem, 0)
        self.stems[stem] = count + 1
        if count:
            stem = f"{stem}-{count + 1}"
        self.items.append(ReportItem(section, caption, stem, draw))


def _values(site, dim) -> list:
    if dim not in site.sizes:
        return [None]
    values = site.coords[dim].values.tolist() if dim in site.coords else list(range(site.sizes[dim]))
    return values[:MAX_PER_KIND]


def _plan_site(plan: _Plan, tree, site) -> None:
    name = site_name(site)
    kinds = catalog.PLOT_KINDS
    applies = {kind: entry.applies(site) for kind, entry in kinds.items() if entry.scope == "site"}
    layers = _values(site, "layer")
    main = catalog.main_variable(site)
    if main is None:
        return
    main_dims = site[main].dims
    signed = [v for v in ("logits", "bias") if v in site.data_vars and v != main]
    step = site.coords["step"].values[-1].item() if "step" in main_dims and "step" in site.coords else None

    def add(kind, caption, parts, **options):
        plan.add(name, caption, [name, kind, *parts], lambda: catalog.plot(tree, kind, site=name, **options))

    if applies["heatmap"]:
        for layer in layers:
            add("heatmap", f"layer {layer}: {main}, mean over heads", [f"layer{layer}"], layer=layer, step=step, variable=main)
            for variable in signed:
                add("heatmap", f"layer {layer}: {variable}, mean over heads", [variable, f"layer{layer}"],
                    layer=layer, step=step, variable=variable)
        for sample in _values(site, "sample")[1:]:
            add("heatmap", f"sample {sample}, layer {layers[0]}", [f"sample{sample}"], sample=sample, layer=layers[0],
                variable=main)
    if applies["head-grid"]:
        for layer in layers:
            add("head-grid", f"layer {layer}: every head", [f"layer{layer}"], layer=layer, step=step, variable=main)
    if applies["step-comparison"]:
        for layer in layers:
            add("step-comparison", f"layer {layer}: every training step, mean over heads", [f"layer{layer}"], layer=layer,
                variable=main)
    if applies["layer-comparison"] and len(layers) > 1:
        add("layer-comparison", "every layer, mean over heads", [], step=step, variable=main)
    if applies["group-map"]:
        variable = "logits" if "logits" in site.data_vars else "weights"
        for layer in layers:
            add("group-map", f"layer {layer}: {variable} per group, mean over heads", [f"layer{layer}"],
                layer=layer, variable=variable)
            if applies["head-grid"]:
                add("head-grid", f"layer {layer}: {variable} per group, every head", ["groups", f"layer{layer}"],
                    layer=layer, variable=variable, by_group=True, origin="lower")
            add("group-bars", f"layer {layer}: last query group's {variable} per key group, per head",
                [f"layer{layer}"], layer=layer, variable=variable)
    if applies["top-edges"]:
        for time in _values(site, "time") if "time" in main_dims else [None]:
            for layer in layers:
                add("top-edges", f"layer {layer}, time {time}: top 20 edges" if time is not None else f"layer {layer}: top 20 edges",
                    [f"layer{layer}", f"time{time}" if time is not None else ""], layer=layer, time=time)
    if applies["temporal"]:
        for node in _values(site, "node"):
            label = labels_of(site, "node")[_values(site, "node").index(node)] if "node" in site.sizes else node
            add("temporal", f"node {label}: time x time attention", ["node", label], node=node)
    if applies["node-link"]:
        for layer in layers:
            add("node-link", f"layer {layer}: graph, mean over heads", [f"layer{layer}"], layer=layer)
    if applies["attention-vs-distance"]:
        for layer in layers:
            for kind, caption in (("pairwise-overview", "logits, bias, weights, distance"),
                                  ("attention-vs-distance", "attention vs distance, local/global"),
                                  ("distance-statistics", "attention and bias vs distance"),
                                  ("query-profiles", "query profiles")):
                if applies[kind]:
                    add(kind, f"layer {layer}, head 0{f', step {step}' if step is not None else ''}: {caption}",
                        [f"layer{layer}", f"step{step}" if step is not None else ""], layer=layer, step=step)
    if applies["image-overlay"]:
        query_label = labels_of(site, "query")[0]
        for layer in layers:
            add("image-overlay", f"layer {layer}: query {query_label} over the image, mean over heads",
                [f"layer{layer}", "query", query_label], layer=layer)
            add("image-grid", f"layer {layer}: query {query_label}, every head", ["heads", f"layer{layer}"], layer=layer, over="head")
        add("image-grid", f"query {query_label}, every layer, mean over heads", ["layers"], over="layer")
    if applies["stats"]:
        add("stats", "max, mean and entropy per map, by layer", [], variable=main)
    if applies["top-pairs"]:
        add("top-pairs", f"layer {layers[0]}: top 10 query -> key pairs, mean over heads", [f"layer{layers[0]}"],
            layer=layers[0], step=step, variable=main)
    if applies["rollout"] and len(layers) > 1:
        add("rollout", "attention rollout over every layer", [], step=step)


def plan_report(source) -> list[ReportItem]:
    """Every plot the file's content supports, in the order the report shows them (nothing drawn).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer.report import plan_report
    >>> [item.stem for item in plan_report(attnformat.example_path("encoder-decoder"))][:2]
    ['flow-layer0', 'flow-layer1']
    """
    tree = open_source(source)
    plan = _Plan()
    if catalog.PLOT_KINDS["flow"].applies(tree):
        for layer in _values(sites_of(tree)[0], "layer"):
            plan.add("encoder -> decoder", f"layer {layer}: encoder self, decoder self, cross", ["flow", f"layer{layer}"],
                     lambda layer=layer: catalog.plot(tree, "flow", layer=layer))
    for site in sites_of(tree):
        _plan_site(plan, tree, site)
    return plan.items


def _render(item: ReportItem, out_dir: Path, dpi: int) -> None:
    try:
        drawn = item.draw()
    except AttnFormatError as error:  # noted in the report; the other plots still get drawn
        item.error = str(error)
        return
    try:
        item.file = save_figure(drawn, out_dir / f"{item.stem}.png", dpi=dpi, close=False).name
    finally:
        close_figure(drawn)


def _top_pairs_rows(tree) -> dict:
    rows = {}
    for site in sites_of(tree):
        if "weights" in site.data_vars and site.attrs.get("layout") == "dense":
            try:
                rows[site_name(site)] = top_pairs(site, k=5)
            except AttnFormatError:
                continue
    return rows


def findings(summary: dict, quote: Callable[[str], str] = str) -> list[str]:
    """Short observations per site from the statistics: the most focused and most spread heads,
    the strongest sink, and the local/global ratio (seed 003's report lists such findings).

    ``quote`` is applied to the site names (which come from the file), e.g.
    :func:`attnformat.text.for_markdown` for a markdown page.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import statistics_summary
    >>> findings(statistics_summary(attnformat.example_path("frames")))[0].startswith("blocks: most focused head")
    True
    """
    lines = []
    for name, entries in summary["sites"].items():
        site = quote(name)
        heads = [(entry["layer"], head) for entry in entries for head in entry.get("heads", [])]
        measured = [(layer, head) for layer, head in heads if head["entropy"] is not None]
        if measured:
            focused = min(measured, key=lambda pair: pair[1]["entropy"])
            spread = max(measured, key=lambda pair: pair[1]["entropy"])
            lines.append(f"{site}: most focused head is layer {focused[0]} head {focused[1]['head']} "
                         f"(entropy {focused[1]['entropy']:.3f}), most spread layer {spread[0]} head {spread[1]['head']} "
                         f"(entropy {spread[1]['entropy']:.3f})")
        sinks = [(layer, head) for layer, head in heads if head["sink_score"] is not None]
        if sinks:
            layer, head = max(sinks, key=lambda pair: pair[1]["sink_score"])
            lines.append(f"{site}: strongest attention sink on the first key is layer {layer} head {head['head']} "
                         f"(sink score {head['sink_score']:.3f})")
        ratios = [entry["local_global_ratio"] for entry in entries if entry.get("local_global_ratio") is not None]
        if ratios:
            lines.append(f"{site}: local/global attention ratio per layer from {min(ratios):.2f} to {max(ratios):.2f}")
    return lines


def _write_markdown(path: Path, source: str, tree, items, summary, pairs) -> None:
    # Everything from the file goes through for_markdown (or into a code span or block that it
    # cannot close), so that no label, name or description becomes a heading, link, image or tag.
    title = os.path.basename(source.rstrip("/")) or source
    lines = [f"# Attention report: {for_markdown(title)}", "", f"- source: {markdown_code(source)}"]
    for key in ("model_name", "model_framework", "description"):
        if key in tree.root.attrs:
            lines.append(f"- {key}: {for_markdown(tree.root.attrs[key])}")
    drawn = [i for i in items if i.file]
    lines += [f"- plots: {len(drawn)}" + (f" ({len(items) - len(drawn)} not drawn)" if len(drawn) < len(items) else ""), "",
              "## Statistics per site and layer", "", markdown_fence(format_summary(summary)), ""]
    observed = findings(summary, quote=for_markdown)
    if observed:
        lines += ["## Findings", ""] + [f"- {line}" for line in observed] + [""]
    for site, rows in pairs.items():
        lines += [f"## Top query -> key pairs: {for_markdown(site)} (first layer, mean over heads)", "",
                  "| query | key | weight |", "|---|---|---|"]
        lines += [f"| {for_markdown(r['query_label'])} | {for_markdown(r['key_label'])} | {r['value']:.4f} |" for r in rows]
        lines.append("")
    lines += ["## Plots", ""]
    for item in items:
        if item.file:  # file names are safe_file_name()s: [A-Za-z0-9._-] only
            lines.append(f"- **{for_markdown(item.section)}**: {for_markdown(item.caption)}: [{item.file}]({item.file})")
        else:
            lines.append(f"- **{for_markdown(item.section)}**: {for_markdown(item.caption)}: not drawn ({for_markdown(item.error)})")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_html(path: Path, source: str, items, pairs) -> None:
    escape = for_html
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>Attention report: {escape(source)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}figure{display:inline-block;margin:1em;"
             "vertical-align:top;max-width:680px}img{max-width:100%;border:1px solid #ddd}figcaption{font-size:90%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}</style></head><body>",
             f"<h1>Attention report</h1><p>Source: <code>{escape(source)}</code>. "
             "<a href=\"summary.md\">Summary (markdown)</a>, <a href=\"stats.json\">statistics (JSON)</a>.</p>"]
    for site, rows in pairs.items():
        parts.append(f"<h3>Top pairs: {escape(site)}</h3><table><tr><th>query</th><th>key</th><th>weight</th></tr>")
        parts += [f"<tr><td>{escape(r['query_label'])}</td><td>{escape(r['key_label'])}</td><td>{r['value']:.4f}</td></tr>"
                  for r in rows]
        parts.append("</table>")
    section = None
    for item in items:
        if item.section != section:
            section = item.section
            parts.append(f"<h2>{escape(section)}</h2>")
        if item.file:
            parts.append(f"<figure><img src=\"{escape(item.file)}\" alt=\"{escape(item.caption)}\" "
                         f"loading=\"lazy\"><figcaption>{escape(item.caption)}</figcaption></figure>")
        else:
            parts.append(f"<p>Not drawn: {escape(item.caption)}: {escape(item.error)}</p>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def report(source, out_dir, *, progress: bool = True, dpi: int = REPORT_DPI, storage_options=None) -> Path:
    """Render every plot a file supports into ``out_dir`` with ``index.html``, ``summary.md`` and ``stats.json``.

    Parameters
    ----------
    source
        Path or tree.
    out_dir
        Directory to write into (created if needed).
    progress
        Show a progress bar (tqdm) on stderr.
    dpi
        Resolution of the PNG files.
    storage_options
        fsspec options for a URL, as for :func:`attnformat.open`.

    Returns
    -------
    pathlib.Path
        The path of ``index.html``.

    Examples
    --------
    >>> import attnformat, tempfile
    >>> from attnformat.viewer import report
    >>> report(attnformat.example_path("frames"), tempfile.mkdtemp(), progress=False).name
    'index.html'
    """
    if storage_options is not None and not isinstance(source, xr.DataTree):
        source = Location.of(source, storage_options)
    tree = open_source(source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = plan_report(tree)
    for item in tqdm(items, desc="attnformat report", unit="plot", disable=not progress):
        _render(item, out_dir, dpi)
    summary = statistics_summary(tree)
    (out_dir / "stats.json").write_text(json.dumps(summary, indent=2, allow_nan=False), encoding="utf-8")
    pairs = _top_pairs_rows(tree)
    name = source_of(tree)
    _write_markdown(out_dir / "summary.md", name, tree, items, summary, pairs)
    index = out_dir / "index.html"
    _write_html(index, name, items, pairs)
    return index


__all__ = ["ReportItem", "findings", "plan_report", "report", "safe_file_name"]
