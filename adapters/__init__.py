"""Adapters that capture attention from live models and write attention files.

One module per framework, imported only when used, so that ``import attnformat.adapters`` needs
neither torch nor transformers. Each converts tensors to numpy and writes through the core
:class:`attnformat.Writer`, layer by layer:

- :class:`Recorder` (``attnformat.adapters.recorder``): ``log(site, layer=, step=, weights=,
  logits=, bias=)`` from any code (a custom attention module, a training loop).
- ``attnformat.adapters.torch``: ``capture(model, path)`` for every ``nn.MultiheadAttention``.
- ``attnformat.adapters.huggingface``: ``capture(model, path, keep=...)``, ``export_text``,
  ``export_image`` and ``load_model`` for ``transformers`` models, on the model's own attention
  kernel (``attnformat.adapters.kernel``: a tap that recomputes weights in blocks of rows).
- :class:`Keep` (``attnformat.adapters.keep``): what a capture keeps — dense maps of selected
  layers/heads/rows, top-k per row, row statistics, head means (torch reductions in
  ``attnformat.adapters.reductions``).
- ``attnformat.adapters.pyg``: ``capture(model, path)`` for graph attention on edges
  (GATConv, GATv2Conv, TransformerConv, any MessagePassing layer) and ``temporal_edge_index``.
- ``attnformat.adapters.generation``: ``model.generate(...)`` inside a Hugging Face capture (one
  causal map over prompt + generated tokens); ``attnformat.adapters.tokens``: readable labels.
- ``attnformat.adapters.batching``: ``export_texts`` (many texts, batch by batch, into one file).
- ``attnformat.adapters.sdpa``: any model computing attention with
  ``torch.nn.functional.scaled_dot_product_attention``.
- ``attnformat.adapters.transformer_lens``: TransformerLens ``hook_pattern``.
- ``attnformat.adapters.media``: images (ViT, CLIP's two towers) and audio (Whisper).

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
    "Keep": "attnformat.adapters.keep",
}
_SUBMODULES = ("recorder", "arrays", "errors", "torch", "huggingface", "pyg", "keep", "kernel", "reductions",
               "generation", "tokens", "batching", "sdpa", "transformer_lens", "media")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"attnformat.adapters.{name}")
    raise AttributeError(f"module 'attnformat.adapters' has no attribute {name!r}")


def __dir__():
    return __all__
