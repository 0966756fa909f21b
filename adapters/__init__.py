"""Adapters that capture attention from live models and write attention files.

One module per framework, imported only when used, so that ``import attnformat.adapters`` needs
neither torch nor transformers. Each converts tensors to numpy and writes through the core
:class:`attnformat.Writer`, layer by layer:

- :class:`Recorder` (``attnformat.adapters.recorder``): ``log(site, layer=, step=, weights=,
  logits=, bias=)`` from any code (a custom attention module, a training loop).
- ``attnformat.adapters.torch``: ``capture(model, path)`` for every ``nn.MultiheadAttention``.
- ``attnformat.adapters.huggingface``: ``capture(model, path)``, ``export_text``,
  ``export_image`` and ``load_model`` for ``transformers`` models.
- ``attnformat.adapters.pyg``: ``capture(model, path)`` for graph attention on edges
  (GATConv, GATv2Conv, TransformerConv, any MessagePassing layer) and ``temporal_edge_index``.

>>> import attnformat.adapters
>>> attnformat.adapters.Recorder.__name__
'Recorder'
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Recorder": "attnformat.adapters.recorder",
    "to_numpy": "attnformat.adapters.arrays",
    "UnsupportedModelError": "attnformat.adapters.errors",
    "CaptureShapeError": "attnformat.adapters.errors",
    "CaptureStateError": "attnformat.adapters.errors",
}
_SUBMODULES = ("recorder", "arrays", "errors", "torch", "huggingface", "pyg")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"attnformat.adapters.{name}")
    raise AttributeError(f"module 'attnformat.adapters' has no attribute {name!r}")


def __dir__():
    return __all__
