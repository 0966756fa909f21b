"""Export the attention of image and audio models from files: ViT, CLIP (two towers) and Whisper.

:func:`export_image` reads pictures (Pillow), runs the model's own image processor and writes the
vision tower's attention over its patch grid (CLS token first, ``query_patch_row``/``_col``
coordinates, ``patch_grid`` and ``patch_size`` attributes) with the processed image for overlays;
for CLIP it also writes the text tower's attention when texts are given (sites ``vision/self``
and ``text/self``). :func:`export_audio` reads ``.wav`` files (the standard library's ``wave``;
resampled with numpy to the feature extractor's rate), runs Whisper's feature extractor and
writes ``encoder/self`` (one token per 20 ms of audio, labelled by time), ``decoder/self`` and
``decoder/cross`` for given transcripts or for a greedy transcription. Both capture through
:func:`attnformat.adapters.huggingface.capture`, so ``keep=`` applies, and both back the
``attnformat export image`` and ``attnformat export audio`` commands (:func:`run_export_image`,
:func:`run_export_audio`).
"""

from __future__ import annotations

import json
import os
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from attnformat.adapters.errors import UnsupportedModelError
from attnformat.adapters.tokens import patch_tokens, token_description
from attnformat.errors import AttnFormatError

#: Sample widths ``wave`` hands back, as numpy dtypes (8-bit WAV is unsigned, the others signed).
_WAV_DTYPES = {1: np.uint8, 2: np.int16, 4: np.int32}


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a PCM ``.wav`` file: ``(mono float32 signal in [-1, 1], sample rate)``.

    8-, 16-, 24- and 32-bit integer PCM are read; several channels are averaged to one.

    Examples
    --------
    >>> import wave, tempfile, pathlib, numpy as np
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "tone.wav"
    >>> with wave.open(str(path), "wb") as out:
    ...     out.setnchannels(1); out.setsampwidth(2); out.setframerate(8000)
    ...     out.writeframes((np.array([0, 16384, -32768]) ).astype("<i2").tobytes())
    >>> signal, rate = read_wav(path)
    >>> signal.tolist(), rate
    ([0.0, 0.5, -1.0], 8000)
    """
    try:
        with wave.open(str(path), "rb") as source:
            channels, width, rate = source.getnchannels(), source.getsampwidth(), source.getframerate()
            frames = source.readframes(source.getnframes())
    except (wave.Error, EOFError) as error:
        raise AttnFormatError(f"{path}: not a PCM .wav file the wave module can read ({error})") from None
    if width == 3:  # 24-bit: widen each little-endian sample to 32 bits
        raw = np.frombuffer(frames, dtype=np.uint8).reshape(-1, 3)
        samples = (raw[:, 0].astype(np.int32) << 8 | raw[:, 1].astype(np.int32) << 16 | raw[:, 2].astype(np.int32) << 24) >> 8
        scale = 2.0 ** 23
    elif width in _WAV_DTYPES:
        samples = np.frombuffer(frames, dtype=np.dtype(_WAV_DTYPES[width]).newbyteorder("<")).astype(np.int64)
        if width == 1:
            samples = samples - 128
        scale = 2.0 ** (8 * width - 1)
    else:
        raise AttnFormatError(f"{path}: {8 * width}-bit samples are not supported (8, 16, 24 or 32-bit PCM)")
    signal = (samples.astype(np.float64) / scale).reshape(-1, channels).mean(axis=1)
    return signal.astype(np.float32), int(rate)


def resample(signal, rate: int, target_rate: int) -> np.ndarray:
    """Resample a 1-d signal to ``target_rate`` (band-limited: FFT, no frequencies above the new Nyquist).

    Examples
    --------
    >>> import numpy as np
    >>> tone = np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)
    >>> out = resample(tone, 8000, 16000)
    >>> out.shape, bool(np.allclose(out[::2], tone, atol=1e-6))
    ((16000,), True)
    """
    signal = np.asarray(signal, dtype=np.float64)
    if rate == target_rate or signal.size == 0:
        return signal.astype(np.float32)
    count = max(1, int(round(signal.size * target_rate / rate)))
    spectrum = np.fft.rfft(signal)
    bins = count // 2 + 1
    kept = np.zeros(bins, dtype=complex)
    kept[:min(bins, spectrum.size)] = spectrum[:bins]
    if count < signal.size and count % 2 == 0:  # the new Nyquist bin holds the two-sided energy once
        kept[-1] = kept[-1].real
    return (np.fft.irfft(kept, count) * (count / signal.size)).astype(np.float32)


def model_kind(model_dir: str | os.PathLike) -> str:
    """What a local model directory takes as input: ``"image"``, ``"audio"`` or ``"text"``.

    Read from the processor files saved with the model (``preprocessor_config.json``,
    ``processor_config.json``): an image processor means ``"image"`` (CLIP included, whose
    processor also holds a tokenizer), an audio feature extractor (one with a sampling rate)
    ``"audio"``, neither ``"text"``. Nothing is imported or loaded, so a command can choose
    its export before loading the model.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from transformers import ViTImageProcessor
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> model_kind(folder)
    'text'
    >>> _ = ViTImageProcessor().save_pretrained(folder)
    >>> model_kind(folder)
    'image'
    """
    settings = []
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise AttnFormatError(f"{path}: not a readable JSON processor configuration ({error})") from None
            if isinstance(loaded, dict):
                settings.append(loaded)
                settings += [value for value in loaded.values() if isinstance(value, dict)]
    if any("image_processor_type" in entry or "image_mean" in entry for entry in settings):
        return "image"
    if any("sampling_rate" in entry for entry in settings):
        return "audio"
    return "text"


def load_media_model(model_dir: str | os.PathLike, *, attn_implementation: str | None = None):
    """Load a local image or audio model directory offline, in eval mode: ``(model, processor)``.

    Encoder-decoder configs (Whisper) load as speech sequence-to-sequence models, anything else
    as the base model (``ViTModel``, ``CLIPModel``); the processor is ``AutoProcessor``'s
    (an image processor, or a processor holding one and a tokenizer or feature extractor).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from transformers import ViTConfig, ViTModel, ViTImageProcessor
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
    ...                    intermediate_size=16)).save_pretrained(folder)
    >>> _ = ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    >>> model, processor = load_media_model(folder)
    >>> type(model).__name__, hasattr(processor, "image_mean")
    ('ViTModel', True)
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForSpeechSeq2Seq, AutoProcessor
    from transformers.utils import logging as hf_logging

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UnsupportedModelError(f"{model_dir}: not a local Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    loader = AutoModelForSpeechSeq2Seq if getattr(config, "is_encoder_decoder", False) else AutoModel
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a local load takes a second; its progress bar is only noise
    try:
        options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        model = loader.from_pretrained(model_dir, local_files_only=True, **options).eval()
        try:
            processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, TypeError) as error:
            raise UnsupportedModelError(f"{model_dir}: no image processor or feature extractor saved with the model ({error})") from None
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and tokenizer.pad_token is None:  # padding a batch of texts needs one
        tokenizer.pad_token = tokenizer.eos_token
    return model, processor


def export_image(
    model,
    processor,
    images,
    destination: str | os.PathLike,
    *,
    texts: str | Sequence[str] | None = None,
    keep=None,
    eager: bool = False,
    kernel: str = "keep",
    model_name: str | None = None,
    description: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Run a vision transformer (ViT) or CLIP on images and write its attention over the patch grid.

    Parameters
    ----------
    model
        A ``transformers`` ViT-style model (one token per patch, CLS-like tokens first) or a
        ``CLIPModel``.
    processor
        The model's image processor, or a processor holding one (``CLIPProcessor``).
    images
        Image files, PIL images or (row, col, channel) arrays; one or a list (one sample each).
    destination
        The file to write.
    texts
        CLIP only: texts for the text tower (site ``text/self``, causal, labelled tokens).
        Without texts only the vision tower runs.
    keep, eager, kernel
        What to store (:class:`~attnformat.adapters.keep.Keep`), whether to switch the model
        to eager attention instead of tapping its kernel, and whether the tap keeps the model's
        kernel or replaces it, as in :func:`attnformat.adapters.huggingface.capture`.
    model_name, description, overwrite
        Passed to the file.

    Returns
    -------
    pathlib.Path
        The file written. Its vision site (``encoder/self`` for ViT, ``vision/self`` for CLIP;
        without dense maps its first reduced site, ``..._topk`` say) holds an ``image``
        variable: the processed input, un-normalized to [0, 1], channels last, exactly the
        pixels the model saw (after resizing and cropping).

    Examples
    --------
    >>> import tempfile, pathlib, numpy as np, attnformat
    >>> from transformers import ViTConfig, ViTModel, ViTImageProcessor
    >>> model = ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
    ...                            intermediate_size=16)).eval()
    >>> picture = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    >>> out = export_image(model, ViTImageProcessor(size={"height": 16, "width": 16}), picture,
    ...                    pathlib.Path(tempfile.mkdtemp()) / "vit.attn.zarr")
    >>> site = attnformat.open(out)["encoder/self"]
    >>> site.attrs["patch_grid"], dict(site["image"].sizes)
    ([4, 4], {'sample': 1, 'image_row': 16, 'image_col': 16, 'channel': 3})
    """
    import torch

    from attnformat.adapters import huggingface

    pictures = [_as_picture(image) for image in (images if isinstance(images, (list, tuple)) else [images])]
    if not pictures:
        raise AttnFormatError("export_image: no images given")
    image_processor = getattr(processor, "image_processor", processor)
    pixel_values = image_processor(images=pictures, return_tensors="pt")["pixel_values"]
    vision, config = _vision_tower(model)
    two_towers = vision is not model
    vision_site = "vision/self" if two_towers else "encoder/self"
    patch = _pair(config.patch_size)
    grid = [pixel_values.shape[-2] // patch[0], pixel_values.shape[-1] // patch[1]]
    with torch.no_grad():
        token_count = int(vision.embeddings(pixel_values).shape[1])
    specials = token_count - grid[0] * grid[1]
    if specials < 0:
        raise UnsupportedModelError(f"{type(model).__name__}: {token_count} tokens for a {grid[0]}x{grid[1]} patch grid; only models "
                                    f"with one token per patch (plus CLS-like tokens first) are supported")
    tokens = {vision_site: patch_tokens(grid, patch, specials)}
    inputs = {"pixel_values": pixel_values}
    if texts is not None:
        if not two_towers:
            raise UnsupportedModelError(f"{type(model).__name__} has no text tower; texts= applies to CLIP-style models")
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise UnsupportedModelError(f"{type(processor).__name__} holds no tokenizer for the texts")
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
        inputs.update(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
        tokens["text/self"] = {**token_description(tokenizer, encoded["input_ids"], encoded["attention_mask"]),
                               "positions": np.arange(encoded["input_ids"].shape[1])}
    shown = _shown_image(image_processor, pixel_values)
    what = f"{len(pictures)} image(s)" + (f" and {len(texts)} text(s)" if texts is not None else "")
    session = huggingface.capture(model, destination, tokens=tokens, keep=keep, eager=eager, kernel=kernel, model_name=model_name, overwrite=overwrite,
                                  description=description or f"Attention of {type(model).__name__} on {what}.")
    sites = {site for site, _ in session.sites.values()}
    if vision_site not in sites:
        raise UnsupportedModelError(f"{type(model).__name__}: the capture found no {vision_site!r} site (sites: {sorted(sites)})")
    with session:
        session.recorder.add_image(_image_site(vision_site, keep, sites), shown, dims=("sample", "image_row", "image_col", "channel"),
                                   long_name="input image")
        with torch.no_grad():
            if two_towers and texts is None:
                model.get_image_features(pixel_values=pixel_values)
            else:
                model(**inputs)
    return Path(session.path)


def export_audio(
    model,
    processor,
    audio,
    destination: str | os.PathLike,
    *,
    transcripts: str | Sequence[str] | None = None,
    max_new_tokens: int = 20,
    keep=None,
    eager: bool = False,
    kernel: str = "keep",
    model_name: str | None = None,
    description: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Run Whisper on audio and write encoder, decoder and cross attention.

    Parameters
    ----------
    model
        A ``WhisperForConditionalGeneration`` (or another speech encoder-decoder that takes
        ``input_features``).
    processor
        Its processor (feature extractor + tokenizer).
    audio
        ``.wav`` files, or ``(signal, rate)`` pairs, or 1-d arrays at the feature extractor's
        rate; one or a list (one sample each). Other rates are resampled (:func:`resample`).
        The feature extractor pads or truncates each signal to its chunk length (30 s for
        Whisper): the encoder attends over the whole chunk, padding included, so no token is
        masked.
    transcripts
        The decoder's text, one per audio (teacher forcing: the decoder reads the tokenizer's
        encoding of it, Whisper's prefix tokens and end token included). Without transcripts
        the model transcribes greedily (at most ``max_new_tokens`` tokens after the prefix)
        and the attention is that of one forward pass over what it wrote, which equals the
        attention during generation.
    keep, eager, kernel, model_name, description, overwrite
        As in :func:`export_image`.

    Returns
    -------
    pathlib.Path
        The file written: ``encoder/self`` (tokens labelled by their start time, ``"0.02s"``;
        attribute ``seconds_per_token``), ``decoder/self`` (causal) and ``decoder/cross``
        (keys: the encoder's tokens).

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib, attnformat
    >>> from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperFeatureExtractor
    >>> config = WhisperConfig(vocab_size=60, num_mel_bins=8, encoder_layers=1, decoder_layers=1, d_model=8,
    ...                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
    ...                        max_source_positions=50, max_target_positions=16, pad_token_id=50, bos_token_id=50,
    ...                        eos_token_id=50, decoder_start_token_id=51)
    >>> model = WhisperForConditionalGeneration(config).eval()
    >>> features = WhisperFeatureExtractor(feature_size=8, chunk_length=1)
    >>> out = export_audio(model, features, np.zeros(8000, dtype=np.float32), pathlib.Path(tempfile.mkdtemp()) / "w.attn.zarr",
    ...                    max_new_tokens=3)
    >>> tree = attnformat.open(out)
    >>> tree["encoder/self"]["query_label"].values[:3].tolist(), tree["decoder/cross"]["weights"].sizes["key"]
    (['0.00s', '0.02s', '0.04s'], 50)
    """
    import torch

    from attnformat.adapters import huggingface

    extractor = getattr(processor, "feature_extractor", processor)
    tokenizer = getattr(processor, "tokenizer", None)
    rate = int(extractor.sampling_rate)
    signals = [_as_signal(item, rate) for item in (audio if isinstance(audio, (list, tuple)) and not _is_pair(audio) else [audio])]
    if not signals:
        raise AttnFormatError("export_audio: no audio given")
    features = extractor(signals, sampling_rate=rate, return_tensors="pt")["input_features"]
    if transcripts is not None:
        transcripts = [transcripts] if isinstance(transcripts, str) else list(transcripts)
        if len(transcripts) != len(signals):
            raise AttnFormatError(f"export_audio: {len(signals)} audio input(s) but {len(transcripts)} transcript(s); give one each")
        if tokenizer is None:
            raise UnsupportedModelError(f"{type(processor).__name__} holds no tokenizer for the transcripts")
        encoded = tokenizer(transcripts, return_tensors="pt", padding=True)
        decoder_ids, decoder_mask = encoded["input_ids"], encoded["attention_mask"].bool()
    else:
        decoder_ids, decoder_mask = _greedy_transcription(model, tokenizer, features, max_new_tokens)
    encoder_length = _encoder_length(model, features.shape[-1])
    seconds_per_token = features.shape[-1] * extractor.hop_length / rate / encoder_length
    frame_labels = [f"{index * seconds_per_token:.2f}s" for index in range(encoder_length)]
    if tokenizer is not None:
        query_side = token_description(tokenizer, decoder_ids, decoder_mask, side="query")
        decoder_tokens = token_description(tokenizer, decoder_ids, decoder_mask)
    else:
        query_side = {"query_mask": decoder_mask.numpy()}
        decoder_tokens = {"mask": decoder_mask.numpy()}
    tokens = {
        "encoder/self": {"labels": frame_labels, "positions": np.arange(encoder_length), "attrs": {"seconds_per_token": seconds_per_token}},
        "decoder/self": {**decoder_tokens, "positions": np.arange(decoder_ids.shape[1])},
        "decoder/cross": {**query_side, "key_labels": frame_labels},
    }
    session = huggingface.capture(model, destination, tokens=tokens, keep=keep, eager=eager, kernel=kernel, model_name=model_name, overwrite=overwrite,
                                  description=description or f"Attention of {type(model).__name__} on {len(signals)} audio input(s).")
    with session, torch.no_grad():
        model(input_features=features, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask.long())
    return Path(session.path)


def _encoder_length(model, frames: int) -> int:
    """Encoder tokens for ``frames`` feature frames: what the encoder's 1-d convolutions leave (Whisper: half)."""
    from torch import nn

    length = int(frames)
    for conv in model.get_encoder().modules():
        if isinstance(conv, nn.Conv1d):
            length = (length + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
    return length


def _greedy_transcription(model, tokenizer, features, max_new_tokens: int):
    """Greedy decoding from Whisper's prefix tokens: ``(ids, mask)``, tokens after the end token are padding."""
    import torch

    config = model.config
    prefix = list(getattr(tokenizer, "prefix_tokens", None) or []) if tokenizer is not None else []
    if not prefix or prefix[0] != config.decoder_start_token_id:
        prefix = [config.decoder_start_token_id]
    eos, pad = config.eos_token_id, config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    ids = torch.tensor([prefix] * features.shape[0])
    done = torch.zeros(features.shape[0], dtype=torch.bool)
    with torch.no_grad():
        encoder_states = model.get_encoder()(features)
        for _ in range(max_new_tokens):
            logits = model(encoder_outputs=encoder_states, decoder_input_ids=ids).logits[:, -1]
            chosen = logits.argmax(-1).masked_fill(done, pad)
            ids = torch.cat([ids, chosen[:, None]], dim=1)
            done |= chosen == eos
            if bool(done.all()):
                break
    ended = torch.cumsum((ids == eos).long(), dim=1)
    mask = (ended == 0) | ((ended == 1) & (ids == eos))  # up to and including the first end token
    mask[:, :len(prefix)] = True
    return ids, mask


def _vision_tower(model):
    """``(module with .embeddings, its config)``: the model itself (ViT) or its vision tower (CLIP)."""
    tower = getattr(model, "vision_model", None)
    if tower is not None and hasattr(model, "text_model"):
        return tower, tower.config
    for candidate in (model, getattr(model, "vit", None)):
        if candidate is not None and hasattr(candidate, "embeddings"):
            return candidate, model.config
    raise UnsupportedModelError(f"{type(model).__name__}: export_image supports ViT-style models and CLIP (a module with "
                                f"`embeddings`); for other vision models use attnformat.adapters.huggingface.capture")


def _image_site(site: str, keep, sites) -> str:
    """The site that holds the input image: the dense site when one is kept, else the first reduced site written."""
    from attnformat.adapters.keep import keeps_by_site
    from attnformat.adapters.kernel import derived_site_names

    chosen = keeps_by_site(keep, sorted(sites))[site]
    names = derived_site_names(site)
    if chosen.dense and (chosen.layers is None or len(chosen.layers)):
        return names["dense"]
    if chosen.top_k:
        return names["topk"]
    return names["statistics"] if chosen.statistic_names else names["head_mean"]


def _shown_image(image_processor, pixel_values) -> np.ndarray:
    """The pixels the model saw, un-normalized to [0, 1], (sample, row, col, channel)."""
    values = pixel_values.detach().cpu().numpy().astype(np.float64).transpose(0, 2, 3, 1)
    if getattr(image_processor, "do_normalize", False):
        channels = values.shape[-1]
        mean = np.broadcast_to(np.asarray(image_processor.image_mean, dtype=np.float64).reshape(-1), (channels,))
        std = np.broadcast_to(np.asarray(image_processor.image_std, dtype=np.float64).reshape(-1), (channels,))
        values = values * std + mean
    return np.clip(values, 0.0, 1.0).astype(np.float32)


def _as_picture(image):
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except OSError as error:
            raise AttnFormatError(f"{image}: not an image Pillow can read ({error})") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype.kind == "f":
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def _is_pair(value) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and np.ndim(value[0]) == 1 and np.ndim(value[1]) == 0


def _as_signal(item, rate: int) -> np.ndarray:
    if isinstance(item, (str, os.PathLike)):
        signal, source_rate = read_wav(item)
    elif _is_pair(item):
        signal, source_rate = np.asarray(item[0], dtype=np.float32), int(item[1])
    else:
        signal, source_rate = np.asarray(item, dtype=np.float32), rate
    if signal.ndim != 1:
        raise AttnFormatError(f"export_audio: a signal is 1-d (mono), not shape {signal.shape}")
    return resample(signal, source_rate, rate)


def _pair(value):
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value), int(value))


# -- command line -----------------------------------------------------------------------------
def add_image_parser(frameworks, help: str = "image files through a local ViT or CLIP model directory"):  # noqa: A002
    """Add ``attnformat export image MODEL_DIR IMAGE... -o OUT`` to the ``export`` subparsers.

    Examples
    --------
    >>> import argparse
    >>> frameworks = argparse.ArgumentParser().add_subparsers()
    >>> args = add_image_parser(frameworks).parse_args(["model", "a.png", "-o", "a.attn.zarr", "--text", "a cat"])
    >>> args.images, args.text, args.run.__name__
    (['a.png'], ['a cat'], 'run_export_image')
    """
    parser = frameworks.add_parser(
        "image", help=help,
        description="Read the images, run the model's image processor and the model once (offline) and write the vision "
                    "tower's attention over its patch grid, with the processed image for overlays. CLIP models also "
                    "write the text tower's attention for --text.")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="folder with config.json, the image processor's config and weights")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files (one sample each)")
    parser.add_argument("--text", action="append", help="CLIP: a text for the text tower; repeat for several")
    _add_output_options(parser, run_export_image)
    return parser


def add_audio_parser(frameworks, help: str = "WAV files through a local Whisper model directory"):  # noqa: A002
    """Add ``attnformat export audio MODEL_DIR WAV... -o OUT`` to the ``export`` subparsers.

    Examples
    --------
    >>> import argparse
    >>> frameworks = argparse.ArgumentParser().add_subparsers()
    >>> args = add_audio_parser(frameworks).parse_args(["model", "a.wav", "-o", "a.attn.zarr"])
    >>> args.wavs, args.transcript, args.max_new_tokens
    (['a.wav'], None, 20)
    """
    parser = frameworks.add_parser(
        "audio", help=help,
        description="Read the WAV files (resampled to the model's rate), run the model offline on a given transcript "
                    "(--transcript, one per file) or on its own greedy transcription, and write encoder, decoder and "
                    "cross attention.")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="folder with config.json, the processor's files and weights")
    parser.add_argument("wavs", metavar="WAV", nargs="+", help="PCM .wav files (one sample each)")
    parser.add_argument("--transcript", action="append", help="decoder text, one per WAV (otherwise: greedy transcription)")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="tokens to transcribe without --transcript (default 20)")
    _add_output_options(parser, run_export_audio)
    return parser


def run_export_image(args) -> int:
    """``attnformat export image MODEL_DIR IMAGE... [--text T ...] [--top-k K ...] -o OUT``: 0 when the file conforms, else 1."""
    from attnformat.adapters import cli  # the CLI module imports this one lazily: no cycle at import

    out = cli._output_path(args)
    model, processor = load_media_model(args.model_dir)
    path = export_image(model, processor, list(args.images), out, texts=args.text, keep=cli.keep_from_args(args),
                        eager=args.eager, kernel=args.kernel, model_name=Path(args.model_dir).name, overwrite=args.overwrite)
    return cli._summarize(path)  # exactly as ``export hf`` prints it


def run_export_audio(args) -> int:
    """``attnformat export audio MODEL_DIR WAV... [--transcript T ...] -o OUT``: 0 when the file conforms, else 1."""
    from attnformat.adapters import cli

    out = cli._output_path(args)
    model, processor = load_media_model(args.model_dir)
    path = export_audio(model, processor, list(args.wavs), out, transcripts=args.transcript, max_new_tokens=args.max_new_tokens,
                        keep=cli.keep_from_args(args), eager=args.eager, kernel=args.kernel, model_name=Path(args.model_dir).name,
                        overwrite=args.overwrite)
    return cli._summarize(path)


def _add_output_options(parser, run) -> None:
    """``-o/--out``, ``--overwrite`` and the storage options of ``export hf`` (``--top-k``, ``--eager``...); ``run`` runs it."""
    from attnformat.adapters.cli import add_keep_options  # the CLI module imports this one lazily: no cycle at import

    parser.add_argument("-o", "--out", required=True, help="file to write (.zarr, .zarr.zip, .h5, .nc)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_keep_options(parser)
    parser.set_defaults(run=run)
