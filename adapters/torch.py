"""Capture every ``torch.nn.MultiheadAttention`` of a PyTorch model, per head, layer by layer.

Works inside ``nn.Transformer``, ``nn.TransformerEncoder``/``Decoder`` and any custom model
(an encoder-decoder over multimodal token groups, say). While the ``with`` block runs, a forward
hook on each attention module recomputes that module's per-head weights from the very inputs
the model gave it and writes them to disk at once, so memory holds one layer's weights. The
module's own output is left untouched: the model's outputs are bit-identical with and without
the capture. Hooks are removed on exit, also after an exception.

``nn.TransformerEncoderLayer`` has a fused inference "fast path" that never calls its attention
module; its attention is therefore captured from a hook on the layer itself, which recomputes
the weights from the layer's input (padded back from a nested tensor when the encoder made one).
Nothing is switched off, so the fast path still runs and outputs stay bit-identical.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from attnformat.adapters.arrays import to_numpy
from attnformat.adapters.errors import CaptureStateError, UnsupportedModelError
from attnformat.adapters.module_sessions import ModuleHookSession, recorder_keywords
from attnformat.adapters.recorder import Recorder

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_ENCODER_SIGNATURE = inspect.signature(nn.TransformerEncoder.forward)
_ENCODER_LAYER_SIGNATURE = inspect.signature(nn.TransformerEncoderLayer.forward)
_SUPPORTED = "torch.nn.MultiheadAttention (alone or inside nn.Transformer, nn.TransformerEncoder/Decoder or any model)"


def find_attention_modules(model: nn.Module) -> dict[str, nn.MultiheadAttention]:
    """Every ``nn.MultiheadAttention`` in ``model``, by module path, in model order.

    Examples
    --------
    >>> from torch import nn
    >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2)
    >>> list(find_attention_modules(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)))
    ['layers.0.self_attn', 'layers.1.self_attn']
    """
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)}


def capture(
    model: nn.Module,
    destination: str | os.PathLike | Recorder,
    *,
    site_names: Mapping[str, str] | Callable[[str], str] | None = None,
    tokens: Mapping[str, Mapping] | None = None,
    key_sites: Mapping[str, str] | None = None,
    model_name: str | None = None,
    description: str | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
) -> MultiheadAttentionCapture:
    """Capture the per-head attention weights of every ``nn.MultiheadAttention`` during a ``with`` block.

    Parameters
    ----------
    model
        Any module holding ``nn.MultiheadAttention`` modules.
    destination
        Path of the attention file to write, or a :class:`~attnformat.adapters.Recorder` to
        write into (to share one file between captures).
    site_names
        Rename sites: maps a module path (``"decoder.layers.0.multihead_attn"``) or a derived
        site name (``"decoder/multihead_attn"``) to a site name (``"decoder/cross"``), or is a
        function of the module path. By default the numeric index and the list holding it are
        dropped from the path, and the modules of one site are its layers 0, 1, 2...
    tokens
        Per site, what its tokens are: keywords of :meth:`Recorder.describe` such as ``labels``,
        ``groups`` (modalities, frames), ``query_groups``/``key_groups``. A cross-attention
        site takes its key tokens from its ``key_site`` and its query tokens from the
        self-attention site under the same parent unless given.
    key_sites
        For cross-attention sites, the site whose tokens are the keys; by default the first
        self-attention site whose name contains ``"enc"``.
    model_name, description, overwrite, dtype
        Passed to the file.

    Returns
    -------
    MultiheadAttentionCapture
        A context manager; ``.path`` is the file written.

    Examples
    --------
    >>> import torch, tempfile, pathlib, attnformat
    >>> from torch import nn
    >>> from attnformat.adapters import torch as torch_adapter
    >>> model = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=16).eval()
    >>> source, target = torch.randn(5, 1, 8), torch.randn(3, 1, 8)
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "transformer.attn.zarr"
    >>> with torch_adapter.capture(model, out, site_names={"decoder/multihead_attn": "decoder/cross"}):
    ...     _ = model(source, target)
    >>> attnformat.site_paths(attnformat.open(out))
    ['decoder/cross', 'decoder/self_attn', 'encoder/self_attn']
    """
    modules = find_attention_modules(model)
    if not modules:
        raise UnsupportedModelError(
            f"{type(model).__name__} holds no {_SUPPORTED}. For custom attention code, log the weights yourself with "
            f"attnformat.adapters.Recorder; for Hugging Face models use attnformat.adapters.huggingface, for graph "
            f"attention attnformat.adapters.pyg")
    options = recorder_keywords(model, "attnformat.adapters.torch", model_name=model_name, description=description,
                                overwrite=overwrite, dtype=dtype)
    return MultiheadAttentionCapture(model, modules, destination, site_names=site_names, tokens=tokens, key_sites=key_sites, recorder_options=options)


class MultiheadAttentionCapture(ModuleHookSession):
    """The context manager :func:`capture` returns; ``sites`` maps module paths to (site, layer).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from torch import nn
    >>> session = capture(nn.MultiheadAttention(8, 2), pathlib.Path(tempfile.mkdtemp()) / "x.attn.zarr")
    >>> session.sites
    {'': ('attention', 0)}
    """

    def __init__(self, root, modules, destination, *, site_names, tokens, key_sites, recorder_options):
        super().__init__(modules, destination, site_names=site_names, tokens=tokens, recorder_options=recorder_options)
        self.root = root
        self.key_sites = dict(key_sites or {})
        self._seen: set[str] = set()
        self._self_sites: list[str] = []
        self._encoder_inputs: dict[int, tuple] = {}

    def _install(self):
        for path, module in self.modules.items():
            owner = self._encoder_layer_owning(path, module)
            if owner is None:
                yield module.register_forward_hook(self._hook_for(path), with_kwargs=True)
            else:
                yield owner.register_forward_hook(self._hook_for(path, encoder_layer=owner), with_kwargs=True)
        for encoder in self.root.modules():
            if isinstance(encoder, nn.TransformerEncoder):
                yield encoder.register_forward_pre_hook(self._remember_encoder_input, with_kwargs=True)

    def _encoder_layer_owning(self, path: str, module) -> nn.TransformerEncoderLayer | None:
        """The TransformerEncoderLayer whose ``self_attn`` this is (its fast path skips the module), else None."""
        if "." not in path:
            return None
        parent = self.root.get_submodule(path.rsplit(".", 1)[0])
        return parent if isinstance(parent, nn.TransformerEncoderLayer) and parent.self_attn is module else None

    def _remember_encoder_input(self, encoder, args, kwargs):
        call = _ENCODER_SIGNATURE.bind(encoder, *args, **kwargs)
        src, padding = call.arguments["src"], call.arguments.get("src_key_padding_mask")
        for layer in encoder.layers:
            self._encoder_inputs[id(layer)] = (tuple(src.shape), padding)

    def _hook_for(self, path: str, encoder_layer: nn.TransformerEncoderLayer | None = None):
        site, layer = self.sites[path]
        module = self.modules[path]

        def hook(called, args, kwargs, output):
            if path in self._seen:
                raise CaptureStateError(
                    f"{self.path}:{site} [layer={layer}]: module {path!r} ran twice in one capture (a decoding loop or shared "
                    f"weights?); capture one forward pass per file, or log each call with attnformat.adapters.Recorder(step=...)")
            self._seen.add(path)
            if encoder_layer is None:
                call = _MHA_SIGNATURE.bind(module, *args, **kwargs)
                call.apply_defaults()
                arguments = dict(call.arguments)
                arguments.pop("self")
            else:
                arguments = self._encoder_layer_attention_arguments(encoder_layer, args, kwargs)
            caller_has_them = encoder_layer is None and arguments["need_weights"] and not arguments["average_attn_weights"]
            if caller_has_them and not (module.training and module.dropout > 0) and isinstance(output, tuple) and output[1] is not None:
                weights = _with_sample_axis(to_numpy(output[1]).copy())  # the caller asked for exactly these; copied as the caller owns them
            else:
                weights = _per_head_weights(module, arguments)
            if site not in self.recorder.sites:
                self._describe(site, module, arguments, weights.shape)
            self.recorder.log(site, layer=layer, weights=weights, dims=("sample", "head", "query", "key"))

        return hook

    def _encoder_layer_attention_arguments(self, layer: nn.TransformerEncoderLayer, args, kwargs) -> dict:
        """What the layer's standard path passes to ``self_attn``, rebuilt from the layer's input."""
        call = _ENCODER_LAYER_SIGNATURE.bind(layer, *args, **kwargs)
        call.apply_defaults()
        src, padding = call.arguments["src"], call.arguments["src_key_padding_mask"]
        if src.is_nested:  # the encoder packed the batch; unpack it to the padded shape and mask it had
            shape, padding = self._encoder_inputs[id(layer)]
            src = src.to_padded_tensor(0.0, shape)
        with torch.no_grad():
            x = layer.norm1(src) if layer.norm_first else src
        return {"query": x, "key": x, "value": x, "key_padding_mask": padding, "attn_mask": call.arguments["src_mask"],
                "is_causal": bool(call.arguments["is_causal"])}

    def _describe(self, site: str, module: nn.MultiheadAttention, arguments: dict, shape) -> None:
        query, key = arguments["query"], arguments["key"]
        is_self = query is key or (query.shape == key.shape and query.data_ptr() == key.data_ptr())
        description = dict(self.tokens.get(site, {}))
        attrs = {"attention_type": "self" if is_self else "cross", "causal": int(is_self and _is_causal(arguments, shape)),
                 "module_class": type(module).__name__, **description.pop("attrs", {})}
        key_mask = _key_mask(arguments["key_padding_mask"])
        if key_mask is not None:
            description.setdefault("key_mask", key_mask)
            if is_self:
                description.setdefault("query_mask", key_mask)
        if is_self:
            self._self_sites.append(site)
        else:
            key_site = self.key_sites.get(site) or next((s for s in self._self_sites if "enc" in s), None)
            if key_site:
                attrs.setdefault("key_site", key_site)
                for stem in ("labels", "groups"):
                    source = self.tokens.get(key_site, {})
                    value = source.get(f"query_{stem}", source.get(stem))
                    if value is not None and f"key_{stem}" not in description and stem not in description:
                        description[f"key_{stem}"] = value
            sibling = next((s for s in self._self_sites if s.rsplit("/", 1)[0] == site.rsplit("/", 1)[0]), None)
            for stem in ("labels", "groups"):
                source = self.tokens.get(sibling, {}) if sibling else {}
                value = source.get(f"query_{stem}", source.get(stem))
                if value is not None and f"query_{stem}" not in description and stem not in description:
                    description[f"query_{stem}"] = value
        description["attrs"] = attrs
        description.setdefault("layers", list(range(self.layer_counts[site])))
        self.recorder.describe(site, **description)


def _per_head_weights(module: nn.MultiheadAttention, arguments: dict) -> np.ndarray:
    """(sample, head, query, key) weights of one call, recomputed from the call's own inputs.

    The module runs once more with ``need_weights=True, average_attn_weights=False``; its
    output is discarded, so what the model received is exactly what it computed. Dropout is off
    for the recomputation: the file holds the attention distribution, not one dropout sample.
    """
    was_training = module.training
    try:
        module.training = False
        with torch.no_grad():
            _, weights = module.forward(**{**arguments, "need_weights": True, "average_attn_weights": False})
    finally:
        module.training = was_training
    return _with_sample_axis(to_numpy(weights))


def _with_sample_axis(weights: np.ndarray) -> np.ndarray:
    """Unbatched calls give (head, query, key); the file always has a sample axis."""
    return weights[None] if weights.ndim == 3 else weights


def _key_mask(key_padding_mask) -> np.ndarray | None:
    """True for real keys: PyTorch's padding masks say True (or -inf) where a key is padding."""
    if key_padding_mask is None:
        return None
    mask = key_padding_mask.detach().cpu()
    padding = mask if mask.dtype == torch.bool else torch.isneginf(mask)
    real = ~padding.numpy()
    return real[None] if real.ndim == 1 else real


def _is_causal(arguments: dict, shape) -> bool:
    """Whether this self-attention hides every later key (is_causal, or a triangular attn_mask)."""
    if arguments.get("is_causal"):
        return True
    mask = arguments.get("attn_mask")
    if mask is None:
        return False
    queries, keys = shape[-2], shape[-1]
    if mask.dim() != 2 or mask.shape != (queries, keys) or queries != keys:
        return False
    blocked = mask.detach().cpu()
    blocked = blocked if blocked.dtype == torch.bool else torch.isneginf(blocked)
    return bool(torch.equal(blocked, torch.triu(torch.ones(queries, keys, dtype=torch.bool), diagonal=1)))
