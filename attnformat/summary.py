"""A file's table of contents, in the spirit of ``ncdump -h``: groups, dimensions, variables, attributes."""

from __future__ import annotations

import xarray as xr

from attnformat.conventions import is_site
from attnformat.reading import source_of
from attnformat.text import for_terminal
from attnformat.validation import _as_json


def describe(tree: xr.DataTree) -> dict:
    """Return the structure of a tree as JSON-ready data, reading no variable values.

    Examples
    --------
    >>> import attnformat
    >>> info = describe(attnformat.open(attnformat.example_path("dense")))
    >>> info["groups"]["/encoder/self"]["variables"]["weights"]["dims"]
    ['layer', 'head', 'query', 'key']
    """
    groups = {}
    for node in tree.subtree:
        dataset = node.to_dataset(inherit=False)
        variables = {}
        for name, variable in dataset.variables.items():
            variables[name] = {
                "dims": list(variable.dims),
                "shape": list(variable.shape),
                "dtype": str(variable.dtype),
                "coordinate": name in dataset.coords,
                "attrs": {k: _as_json(v) for k, v in variable.attrs.items()},
            }
        groups[node.path] = {
            "site": is_site(node.attrs),
            "summary": site_summary(node.attrs, dataset) if is_site(node.attrs) else None,
            "dims": {k: int(v) for k, v in dataset.sizes.items()},
            "attrs": {k: _as_json(v) for k, v in node.attrs.items()},
            "variables": variables,
        }
    return {"source": source_of(tree), "groups": groups}


def site_summary(attrs, dataset: xr.Dataset) -> str:
    """One line saying what a site keeps, from its attributes and variable names (no values read).

    Examples
    --------
    >>> import attnformat
    >>> tree = attnformat.open(attnformat.example_path("topk"))
    >>> site_summary(tree["decoder/self_topk"].attrs, tree["decoder/self_topk"].to_dataset())
    'topk: the 3 largest of 8 weights per row, with key indices and the mass left out; describes decoder/self'
    >>> tree = attnformat.open(attnformat.example_path("statistics"))
    >>> site_summary(tree["decoder/self_stats"].attrs, tree["decoder/self_stats"].to_dataset())
    'statistics of rows over 8 keys: entropy, max_weight, sink_weight, local_weight (window 2), top_key; describes decoder/self'
    """
    attrs = {key: _as_json(value) for key, value in attrs.items()}
    layout = attrs.get("layout")
    if layout == "topk":
        omitted = ", with key indices and the mass left out" if "omitted_weight" in dataset.data_vars else ", with key indices"
        text = f"topk: the {attrs.get('top_k', '?')} largest of {attrs.get('key_count', '?')} weights per row{omitted}"
    elif layout == "statistics":
        from attnformat.conventions import STATISTICS

        names = [f"{name} (window {attrs.get('local_window', '?')})" if name == "local_weight" else name
                 for name in STATISTICS if name in dataset.data_vars]
        text = f"statistics of rows over {attrs.get('key_count', '?')} keys: {', '.join(names) or 'none'}"
    else:
        variables = [name for name in ("weights", "logits", "bias") if name in dataset.data_vars]
        text = f"{layout}: {', '.join(variables) or 'no attention variables'}"
        if attrs.get("head_reduction") == "mean":
            text += ", mean over heads"
    if isinstance(attrs.get("describes"), str):
        text += f"; describes {attrs['describes']}"
    return text


def format_description(info: dict) -> str:
    """Render :func:`describe`'s output as indented text, safe to print on a terminal.

    Group, variable, dimension and attribute names and values come from the file; control
    characters in them are shown as escapes (:func:`attnformat.text.for_terminal`).

    Examples
    --------
    >>> import attnformat
    >>> text = format_description(describe(attnformat.open(attnformat.example_path("dense"))))
    >>> "weights(layer=2, head=3, query=6, key=6) float32" in text
    True
    """
    # Names and values come from the file: each is shown through for_terminal (values through
    # repr, which escapes the same characters), so that no escape sequence reaches the terminal.
    lines = [for_terminal(info["source"])]
    for path, group in info["groups"].items():
        depth = 0 if path == "/" else path.count("/")
        pad = "  " * depth
        kind = "  [attention site]" if group["site"] else ""
        if group["site"] and group.get("summary"):
            kind += f" {for_terminal(group['summary'])}"
        lines.append(f"{pad}group {for_terminal(path)}{kind}")
        for key, value in group["attrs"].items():
            lines.append(f"{pad}  :{for_terminal(key)} = {for_terminal(repr(value))}")
        for name, variable in group["variables"].items():
            shape = ", ".join(f"{for_terminal(d)}={s}" for d, s in zip(variable["dims"], variable["shape"]))
            marker = "coord " if variable["coordinate"] else ""
            lines.append(f"{pad}  {marker}{for_terminal(name)}({shape}) {for_terminal(variable['dtype'])}")
            for key, value in variable["attrs"].items():
                lines.append(f"{pad}    {for_terminal(name)}:{for_terminal(key)} = {for_terminal(repr(value))}")
    return "\n".join(lines)
