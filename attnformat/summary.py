"""A file's table of contents, in the spirit of ``ncdump -h``: groups, dimensions, variables, attributes."""

from __future__ import annotations

import xarray as xr

from attnformat.conventions import is_site
from attnformat.reading import source_of
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
    """Render :func:`describe`'s output as indented text.

    Examples
    --------
    >>> import attnformat
    >>> text = format_description(describe(attnformat.open(attnformat.example_path("dense"))))
    >>> "weights(layer=2, head=3, query=6, key=6) float32" in text
    True
    """
    lines = [f"{info['source']}"]
    for path, group in info["groups"].items():
        depth = 0 if path == "/" else path.count("/")
        pad = "  " * depth
        kind = "  [attention site]" if group["site"] else ""
        lines.append(f"{pad}group {path}{kind}")
        for key, value in group["attrs"].items():
            lines.append(f"{pad}  :{key} = {value!r}")
        for name, variable in group["variables"].items():
            shape = ", ".join(f"{d}={s}" for d, s in zip(variable["dims"], variable["shape"]))
            marker = "coord " if variable["coordinate"] else ""
            lines.append(f"{pad}  {marker}{name}({shape}) {variable['dtype']}")
            for key, value in variable["attrs"].items():
                lines.append(f"{pad}    {name}:{key} = {value!r}")
    return "\n".join(lines)
