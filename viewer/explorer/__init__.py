"""The interactive explorer: one self-contained HTML page of a file (``attnformat view``), served
for files of any size (``attnformat serve``), shown inline in Jupyter, and exported to bertviz's
and CircuitsVis's inputs.

Data selection happens in Python (:mod:`.payload`); the page (:mod:`.page`, scripts in
``static/``) only decodes and draws. The server, notebook and interop names are imported when
first used, so ``attnformat view`` loads none of them.
"""

from attnformat.viewer.explorer.page import render_page, write_page
from attnformat.viewer.explorer.payload import build_payload, decode_map, encode_map, pool_map

_LAZY = {
    "serve": "attnformat.viewer.explorer.server",
    "ExplorerServer": "attnformat.viewer.explorer.server",
    "explore": "attnformat.viewer.explorer.notebook",
    "Explorer": "attnformat.viewer.explorer.notebook",
    "to_bertviz": "attnformat.viewer.explorer.interop",
    "to_circuitsvis": "attnformat.viewer.explorer.interop",
}

__all__ = ["build_payload", "decode_map", "encode_map", "pool_map", "render_page", "write_page", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
