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
            "dims": {k: int(v) for k, v in dataset.sizes.items()},
            "attrs": {k: _as_json(v) for k, v in node.attrs.items()},
            "variables": variables,
        }
    return {"source": source_of(tree), "groups": groups}


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
