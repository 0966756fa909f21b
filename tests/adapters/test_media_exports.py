"""Image and audio exports (ViT, CLIP's two towers, Whisper) through the command line, checked against each
model's own eager ``output_attentions`` on the same processed input, value by value."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
import torch
from adapter_checks import assert_valid
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

import attnformat
from attnformat.adapters import media
from attnformat.cli import main
from attnformat.errors import AttnFormatError


def _byte_symbols():
    """The 256 symbols byte-level BPE vocabularies (GPT-2, CLIP, Whisper) use for bytes."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    symbols, extra = dict(zip(printable, map(chr, printable))), 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte], extra = chr(256 + extra), extra + 1
    return [symbols[byte] for byte in range(256)]


def _bpe_files(folder, vocab):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Tiny random ViT, CLIP and Whisper models saved with their processors (offline, no download)."""
    root = tmp_path_factory.mktemp("media-models")
    torch.manual_seed(0)
    vit = root / "vit"
    ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32)).save_pretrained(vit)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(vit)

    symbols = _byte_symbols()
    vocab = {**{s: i for i, s in enumerate(symbols)}, **{s + "</w>": 256 + i for i, s in enumerate(symbols)}}
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    clip = root / "clip"
    tokenizer = CLIPTokenizer(*_bpe_files(clip / "files", vocab), pad_token="<|endoftext|>")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                  tokenizer=tokenizer).save_pretrained(clip)
    text = dict(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=16, patch_size=4)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(clip)

    whisper = root / "whisper"
    vocab = {s: i for i, s in enumerate(symbols)}
    for special in ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"):
        vocab[special] = len(vocab)
    tokenizer = WhisperTokenizer(*_bpe_files(whisper / "files", vocab))
    extractor = WhisperFeatureExtractor(feature_size=8, sampling_rate=16000, chunk_length=1)
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(whisper)
    WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=len(vocab), num_mel_bins=8, encoder_layers=2, decoder_layers=2, d_model=16, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=50, max_target_positions=32,
        pad_token_id=256, bos_token_id=256, eos_token_id=256, decoder_start_token_id=257)).save_pretrained(whisper)
    return {"vit": vit, "clip": clip, "whisper": whisper}


def _run(argv):
    """``attnformat export image|audio ...``."""
    return main(["export", *argv])


def _pictures(folder, sizes):
    rng = np.random.default_rng(0)
    paths = []
    for index, (height, width) in enumerate(sizes):
        path = folder / f"picture{index}.png"
        Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _eager(model_dir):
    model, processor = media.load_media_model(model_dir, attn_implementation="eager")
    return model, processor


def test_export_image_vit_matches_eager_output_attentions(tmp_path, model_dirs, capsys):
    pictures = _pictures(tmp_path, [(20, 30), (16, 16)])
    out = tmp_path / "vit.attn.zarr"
    assert _run(["image", str(model_dirs["vit"]), *map(str, pictures), "-o", str(out)]) == 0
    assert "encoder/self: sample=2, layer=2, head=2, query=17, key=17" in capsys.readouterr().out
    assert_valid(out)
    model, processor = _eager(model_dirs["vit"])
    pixels = processor(images=[Image.open(p).convert("RGB") for p in pictures], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixels, output_attentions=True).attentions
    site = attnformat.open(out)["encoder/self"]
    for layer in range(2):
        np.testing.assert_allclose(site["weights"].sel(layer=layer).values, expected[layer].numpy(), rtol=1e-5, atol=1e-6)
    assert site.attrs["patch_grid"] == [4, 4] and site.attrs["patch_size"] == [4, 4]
    assert site["query_label"].values[0] == "[CLS]" and site["query_patch_row"].values.tolist()[:6] == [-1, 0, 0, 0, 0, 1]
    shown = pixels.numpy().transpose(0, 2, 3, 1) * np.array(processor.image_std) + np.array(processor.image_mean)
    np.testing.assert_allclose(site["image"].values, np.clip(shown, 0, 1), atol=1e-6)


def test_export_image_clip_writes_two_towers_matching_eager(tmp_path, model_dirs):
    pictures = _pictures(tmp_path, [(24, 18)])
    texts = ["a cat", "two dogs on grass"]
    out = tmp_path / "clip.attn.zarr"
    assert _run(["image", str(model_dirs["clip"]), str(pictures[0]), "--text", texts[0], "--text", texts[1], "-o", str(out)]) == 0
    assert_valid(out)
    model, processor = _eager(model_dirs["clip"])
    inputs = processor(images=[Image.open(pictures[0]).convert("RGB")], text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**inputs, output_attentions=True)
    tree = attnformat.open(out)
    assert attnformat.site_paths(tree) == ["text/self", "vision/self"]
    vision, text = tree["vision/self"], tree["text/self"]
    assert dict(vision["weights"].sizes) == {"sample": 1, "layer": 3, "head": 2, "query": 17, "key": 17}
    assert dict(text["weights"].sizes)["sample"] == 2 and text.attrs["causal"] == 1
    for layer in range(3):
        np.testing.assert_allclose(vision["weights"].sel(layer=layer).values, expected.vision_model_output.attentions[layer].numpy(),
                                   rtol=1e-5, atol=1e-6)
    for layer in range(2):
        np.testing.assert_allclose(text["weights"].sel(layer=layer).values, expected.text_model_output.attentions[layer].numpy(),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(text["key_mask"].values, inputs["attention_mask"].bool().numpy())
    assert "".join(text["query_label"].values[0][text["query_mask"].values[0]]).replace(" ", "") == "<|startoftext|>acat<|endoftext|>"


def test_export_image_clip_without_texts_runs_the_vision_tower_only(tmp_path, model_dirs):
    model, processor = media.load_media_model(model_dirs["clip"])
    picture = (np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8)
    out = media.export_image(model, processor, picture, tmp_path / "vision.attn.zarr")
    assert_valid(out)
    eager, _ = _eager(model_dirs["clip"])
    pixels = processor.image_processor(images=[Image.fromarray(picture)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = eager.vision_model(pixel_values=pixels, output_attentions=True).attentions
    tree = attnformat.open(out)
    assert attnformat.site_paths(tree) == ["vision/self"]
    np.testing.assert_allclose(tree["vision/self"]["weights"].sel(layer=2).values, expected[2].numpy(), rtol=1e-5, atol=1e-6)


def _write_wav(path, signal, rate, width=2, channels=1):
    scaled = np.clip(signal, -1, 1)
    samples = {1: (scaled * 127 + 128).astype(np.uint8), 2: (scaled * 32767).astype("<i2"), 4: (scaled * (2**31 - 1)).astype("<i4")}[width]
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(np.repeat(samples, channels).tobytes())


def test_export_audio_whisper_on_a_transcript_matches_eager(tmp_path, model_dirs, capsys):
    rate = 8000  # the feature extractor wants 16 kHz: the file is resampled
    signal = 0.5 * np.sin(2 * np.pi * 300 * np.arange(rate // 2) / rate)
    wav = tmp_path / "tone.wav"
    _write_wav(wav, signal, rate)
    out = tmp_path / "whisper.attn.zarr"
    assert _run(["audio", str(model_dirs["whisper"]), str(wav), "--transcript", "hello", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "decoder/cross" in printed and "conforms" in printed
    assert_valid(out)
    model, processor = _eager(model_dirs["whisper"])
    read, read_rate = media.read_wav(wav)
    features = processor.feature_extractor([media.resample(read, read_rate, 16000)], sampling_rate=16000, return_tensors="pt")["input_features"]
    ids = processor.tokenizer(["hello"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_features=features, decoder_input_ids=ids, output_attentions=True)
    tree = attnformat.open(out)
    for site, reference in (("encoder/self", expected.encoder_attentions), ("decoder/self", expected.decoder_attentions),
                            ("decoder/cross", expected.cross_attentions)):
        for layer in range(2):
            np.testing.assert_allclose(tree[site]["weights"].sel(layer=layer).values, reference[layer].numpy(), rtol=1e-5, atol=1e-6)
    assert tree["decoder/self"].attrs["causal"] == 1 and tree["decoder/cross"].attrs["attention_type"] == "cross"
    assert tree["encoder/self"]["query_label"].values[:2].tolist() == ["0.00s", "0.02s"]
    assert tree["decoder/self"]["query_token"].values[0].tolist() == processor.tokenizer.convert_ids_to_tokens(ids[0])


def test_export_audio_greedy_transcription_matches_generate_and_eager(tmp_path, model_dirs):
    model, processor = media.load_media_model(model_dirs["whisper"])
    signal = np.random.default_rng(2).normal(scale=0.1, size=16000).astype(np.float32)
    out = media.export_audio(model, processor, [(signal, 16000)], tmp_path / "greedy.attn.zarr", max_new_tokens=4)
    assert_valid(out)
    eager, _ = _eager(model_dirs["whisper"])
    features = processor.feature_extractor([signal], sampling_rate=16000, return_tensors="pt")["input_features"]
    prefix = torch.tensor([processor.tokenizer.prefix_tokens])
    with torch.no_grad():
        new_tokens = eager.generate(input_features=features, decoder_input_ids=prefix, max_new_tokens=4, do_sample=False, num_beams=1)
    generated = torch.cat([prefix, new_tokens], dim=1)  # Whisper's generate returns what follows the prompt
    tree = attnformat.open(out)
    stored = tree["decoder/self"]["query_token"].values[0][tree["decoder/self"]["query_mask"].values[0]].tolist()
    assert stored == processor.tokenizer.convert_ids_to_tokens(generated[0])[:len(stored)]
    ids = generated[:, :len(stored)]
    with torch.no_grad():
        expected = eager(input_features=features, decoder_input_ids=ids, output_attentions=True)
    np.testing.assert_allclose(tree["decoder/cross"]["weights"].sel(layer=1).values[:, :, :len(stored)],
                               expected.cross_attentions[1].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", [1, 2, 4])
def test_read_wav_widths_and_channels(tmp_path, width):
    signal = np.array([0.0, 0.5, -0.5, 0.25])
    path = tmp_path / f"w{width}.wav"
    _write_wav(path, signal, 16000, width=width, channels=2)
    read, rate = media.read_wav(path)
    assert rate == 16000
    np.testing.assert_allclose(read, signal, atol=1 / 127)


def test_errors_name_the_file(tmp_path, model_dirs):
    (tmp_path / "broken.wav").write_bytes(b"not a wav")
    with pytest.raises(AttnFormatError, match="broken.wav"):
        media.read_wav(tmp_path / "broken.wav")

def test_cli_refuses_to_overwrite_and_names_the_file(tmp_path, model_dirs, capsys):
    existing = tmp_path / "exists.attn.zarr"
    existing.mkdir()
    assert _run(["image", str(model_dirs["vit"]), "x.png", "-o", str(existing)]) == 2
    assert "exists.attn.zarr: already exists" in capsys.readouterr().err
    wav = tmp_path / "missing.wav"
    assert _run(["audio", str(model_dirs["whisper"]), str(wav), "-o", str(tmp_path / "a.attn.zarr")]) == 2
    assert "missing.wav" in capsys.readouterr().err


def test_export_image_texts_need_a_text_tower(tmp_path, model_dirs):
    model, processor = media.load_media_model(model_dirs["vit"])
    with pytest.raises(AttnFormatError, match="text tower"):
        media.export_image(model, processor, np.zeros((16, 16, 3), np.uint8), tmp_path / "t.attn.zarr", texts=["a"])


def test_export_image_keep_top_k_matches_reference_reduction_of_eager_weights(tmp_path, model_dirs):
    from attnformat.adapters.keep import Keep
    from attnformat.reductions import top_k

    model, processor = media.load_media_model(model_dirs["vit"])
    picture = (np.random.default_rng(3).random((16, 16, 3)) * 255).astype(np.uint8)
    out = media.export_image(model, processor, picture, tmp_path / "topk.attn.zarr", keep=Keep(dense=False, top_k=4))
    assert_valid(out)
    eager, _ = _eager(model_dirs["vit"])
    pixels = processor(images=[Image.fromarray(picture)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = eager(pixel_values=pixels, output_attentions=True).attentions
    site = attnformat.open(out)["encoder/self_topk"]
    assert site.attrs["describes"] == "encoder/self" and site["key_label"].values[0] == "[CLS]"
    assert dict(site["image"].sizes) == {"sample": 1, "image_row": 16, "image_col": 16, "channel": 3}  # no dense site to hold it
    for layer in range(2):
        kept, key_index, _ = top_k(expected[layer].numpy(), 4)
        np.testing.assert_allclose(site["weights"].sel(layer=layer).values, kept, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(site["key_index"].sel(layer=layer).values, key_index)


def test_model_kind_reads_the_saved_processor_files(model_dirs, minilm_dir):
    assert {name: media.model_kind(path) for name, path in model_dirs.items()} == {"vit": "image", "clip": "image", "whisper": "audio"}
    assert media.model_kind(minilm_dir) == "text"


def test_cli_storage_options_on_audio_match_reference_reductions_of_eager_weights(tmp_path, model_dirs):
    from attnformat.reductions import row_statistics, top_k

    signal = np.random.default_rng(4).normal(scale=0.1, size=16000)
    wav = tmp_path / "noise.wav"
    _write_wav(wav, signal, 16000)
    out = tmp_path / "kept.attn.zarr"
    assert _run(["audio", str(model_dirs["whisper"]), str(wav), "--transcript", "hi", "--top-k", "3", "--statistics",
                 "--local-window", "2", "-o", str(out)]) == 0
    assert_valid(out)
    tree = attnformat.open(out)
    assert "decoder/cross" not in attnformat.site_paths(tree) and "decoder/cross_topk" in attnformat.site_paths(tree)
    model, processor = _eager(model_dirs["whisper"])
    read, _ = media.read_wav(wav)
    features = processor.feature_extractor([read], sampling_rate=16000, return_tensors="pt")["input_features"]
    ids = processor.tokenizer(["hi"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_features=features, decoder_input_ids=ids, output_attentions=True)
    for layer in range(2):
        cross = expected.cross_attentions[layer].numpy()
        kept, key_index, omitted = top_k(cross, 3)
        site = tree["decoder/cross_topk"]
        np.testing.assert_allclose(site["weights"].sel(layer=layer).values, kept, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(site["key_index"].sel(layer=layer).values, key_index)
        np.testing.assert_allclose(site["omitted_weight"].sel(layer=layer).values, omitted, rtol=1e-4, atol=1e-6)
        encoder = expected.encoder_attentions[layer].numpy()
        reference = row_statistics(encoder, local_window=2)
        stats = tree["encoder/self_stats"]
        assert stats.attrs["local_window"] == 2
        for name in ("entropy", "max_weight", "sink_weight", "local_weight"):
            np.testing.assert_allclose(stats[name].sel(layer=layer).values, reference[name], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(stats["top_key"].sel(layer=layer).values, reference["top_key"])
