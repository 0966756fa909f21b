"""The Hugging Face adapter against the model's own output_attentions, value by value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapter_checks import assert_valid, read
from transformers import BartConfig, BartForConditionalGeneration, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration, ViTConfig, ViTModel

import attnformat
from attnformat.adapters import UnsupportedModelError
from attnformat.adapters import huggingface as hf

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Attention please."]


def _reference(model, **inputs):
    """The model's own eager output_attentions (the model is switched to eager for this call only)."""
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation(implementation)


def test_minilm_batch_of_two_texts_matches_output_attentions(tmp_path, minilm):
    model, tokenizer = minilm
    path = hf.export_text(model, tokenizer, TEXTS, tmp_path / "minilm.attn.zarr")
    encoded = tokenizer(TEXTS, return_tensors="pt", padding=True)
    expected = _reference(model, **encoded).attentions
    assert_valid(path)
    site = attnformat.open(path)["encoder/self"]
    assert dict(site["weights"].sizes) == {"sample": 2, "layer": 6, "head": 12, "query": encoded["input_ids"].shape[1], "key": encoded["input_ids"].shape[1]}
    assert site.attrs["causal"] == 0 and site.attrs["attention_type"] == "self"
    for layer in range(6):
        np.testing.assert_allclose(site["weights"].sel(layer=layer).values, expected[layer].numpy(), rtol=1e-5, atol=1e-6)
    mask = encoded["attention_mask"].bool().numpy()
    assert not mask[1].all()  # the second text is padded
    np.testing.assert_array_equal(site["query_mask"].values, mask)
    np.testing.assert_array_equal(site["key_mask"].values, mask)
    for sample in range(2):
        assert site["query_token"].values[sample].tolist() == tokenizer.convert_ids_to_tokens(encoded["input_ids"][sample])
    assert attnformat.open(path).attrs["model_framework"].startswith("transformers")


def test_decoder_only_gpt2_is_causal(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=101, eos_token_id=102, attn_implementation="eager")
    model = GPT2LMHeadModel(config).eval()
    path = hf.export_text(model, tokenizer, TEXTS, tmp_path / "gpt2.attn.zarr")
    encoded = tokenizer(TEXTS, return_tensors="pt", padding=True)
    expected = _reference(model, input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).attentions
    assert_valid(path)  # includes: no weight on future keys
    site = attnformat.open(path)["decoder/self"]
    assert site.attrs["causal"] == 1
    for layer in range(2):
        np.testing.assert_allclose(site["weights"].sel(layer=layer).values, expected[layer].numpy(), rtol=1e-5, atol=1e-6)
    assert site["query_position"].values.tolist() == list(range(encoded["input_ids"].shape[1]))


def _seq2seq_models(vocab_size):
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=2,
                                             pad_token_id=0, decoder_start_token_id=0, attn_implementation="eager"))
    bart = BartForConditionalGeneration(BartConfig(vocab_size=vocab_size, d_model=16, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2,
                                                   decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                                                   pad_token_id=0, bos_token_id=101, eos_token_id=102, decoder_start_token_id=102, attn_implementation="eager"))
    return {"t5": t5.eval(), "bart": bart.eval()}


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoder_self_and_cross_attention(tmp_path, tokenizer, name):
    model = _seq2seq_models(tokenizer.vocab_size)[name]
    encoded = tokenizer(TEXTS, return_tensors="pt", padding=True)
    decoder_ids = torch.tensor([[102, 7592, 2088, 999, 0], [102, 2023, 0, 0, 0]])
    decoder_mask = (decoder_ids != 0).long()
    decoder_mask[:, 0] = 1
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "decoder_input_ids": decoder_ids, "decoder_attention_mask": decoder_mask}
    expected = _reference(model, **inputs)
    path = tmp_path / f"{name}.attn.zarr"
    with hf.capture(model, path), torch.no_grad():
        model(**inputs)
    tree = attnformat.open(path)
    assert attnformat.site_paths(tree) == ["decoder/cross", "decoder/self", "encoder/self"]
    cross = tree["decoder/cross"]
    assert cross.attrs["attention_type"] == "cross" and cross.attrs["key_site"] == "encoder/self"
    assert dict(cross["weights"].sizes) == {"sample": 2, "layer": 3, "head": 2, "query": 5, "key": encoded["input_ids"].shape[1]}
    assert tree["decoder/self"].attrs["causal"] == 1 and tree["encoder/self"].attrs["causal"] == 0
    for site, reference in (("encoder/self", expected.encoder_attentions), ("decoder/self", expected.decoder_attentions), ("decoder/cross", expected.cross_attentions)):
        assert tree[site]["weights"].sizes["layer"] == len(reference)
        for layer, weights in enumerate(reference):
            np.testing.assert_allclose(read(path, site, layer=layer), weights.numpy(), rtol=1e-5, atol=1e-6)
    report = attnformat.validate(path)
    assert report.ok, report.format()


def test_export_text_with_targets_labels_every_site(tmp_path, tokenizer):
    model = _seq2seq_models(tokenizer.vocab_size)["bart"]
    path = hf.export_text(model, tokenizer, TEXTS, tmp_path / "bart.attn.zarr", targets=["Le renard.", "Attention!"])
    assert_valid(path)
    tree = attnformat.open(path)
    encoder_labels = tree["encoder/self"]["query_token"].values
    decoder_labels = tree["decoder/self"]["query_token"].values
    np.testing.assert_array_equal(tree["decoder/cross"]["key_token"].values, encoder_labels)
    np.testing.assert_array_equal(tree["decoder/cross"]["query_token"].values, decoder_labels)
    np.testing.assert_array_equal(tree["decoder/cross"]["key_label"].values, tree["encoder/self"]["query_label"].values)
    assert decoder_labels[0][0] == tokenizer.convert_ids_to_tokens(model.config.decoder_start_token_id)
    assert tokenizer.convert_ids_to_tokens(tokenizer("Le renard.")["input_ids"])[:-1] == decoder_labels[0][1:len(tokenizer("Le renard.")["input_ids"])].tolist()
    with pytest.raises(UnsupportedModelError, match="targets"):
        hf.export_text(model, tokenizer, TEXTS, tmp_path / "no-targets.attn.zarr")


def test_vit_patch_grid_cls_token_and_image(tmp_path):
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, attn_implementation="eager")
    model = ViTModel(config).eval()
    pixels = torch.rand(2, 3, 32, 32)
    path = hf.export_image(model, pixels, tmp_path / "vit.attn.zarr")
    expected = _reference(model, pixel_values=pixels).attentions
    assert_valid(path)
    site = attnformat.open(path)["encoder/self"]
    assert site.attrs["patch_grid"] == [4, 4] and site.attrs["patch_size"] == [8, 8]
    assert site["query_label"].values[0] == "[CLS]" and site["query_patch_row"].values[0] == -1
    assert site["key_patch_row"].values[1:].tolist() == np.repeat(np.arange(4), 4).tolist()
    assert site["key_patch_col"].values[1:].tolist() == np.tile(np.arange(4), 4).tolist()
    assert site["image"].dims == ("sample", "image_row", "image_col", "channel") and site["image"].attrs["role"] == "image"
    np.testing.assert_array_equal(site["image"].values, pixels.permute(0, 2, 3, 1).numpy())
    for layer in range(2):
        np.testing.assert_allclose(site["weights"].sel(layer=layer).values, expected[layer].numpy(), rtol=1e-5, atol=1e-6)


def test_eager_option_switches_an_sdpa_model_to_eager_for_the_block_and_back(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, attn_implementation="sdpa")).eval()
    encoded = tokenizer(TEXTS, return_tensors="pt", padding=True)
    path = tmp_path / "sdpa.attn.zarr"
    with hf.capture(model, path, eager=True) as capture, torch.no_grad():
        assert model.config._attn_implementation == "eager"
        model(**encoded)
    assert model.config._attn_implementation == "sdpa"
    assert not any(m._forward_hooks for m in model.modules())
    model.set_attn_implementation("eager")
    expected = _reference(model, **encoded).attentions
    np.testing.assert_allclose(read(path, "encoder/self", layer=1), expected[1].numpy(), rtol=1e-5, atol=1e-6)
    assert capture.sites == {"encoder.layer.0.attention.self": ("encoder/self", 0), "encoder.layer.1.attention.self": ("encoder/self", 1)}


def test_failure_mid_forward_leaves_an_incomplete_file_with_the_layers_so_far(tmp_path, minilm):
    model, tokenizer = minilm
    encoded = tokenizer(TEXTS[:1], return_tensors="pt")
    expected = _reference(model, **encoded).attentions
    hooks_before = _hook_count(model)
    handle = model.encoder.layer[3].register_forward_pre_hook(_fail)
    path = tmp_path / "crash.attn.zarr"
    try:
        with pytest.raises(MemoryError):
            with hf.capture(model, path), torch.no_grad():
                model(**encoded)
    finally:
        handle.remove()
    tree = attnformat.open(path)
    assert tree.attrs["completeness"] == "incomplete"
    weights = tree["encoder/self"]["weights"]
    for layer in range(3):
        np.testing.assert_allclose(weights.sel(layer=layer).values, expected[layer].numpy(), rtol=1e-5, atol=1e-6)
    assert np.isnan(weights.sel(layer=3).values).all()
    assert _hook_count(model) == hooks_before


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def _fail(module, args):
    raise MemoryError("simulated out-of-memory in layer 3")


def test_unsupported_model_names_what_is_supported(tmp_path):
    with pytest.raises(UnsupportedModelError, match="BERT.*Recorder"):
        hf.capture(torch.nn.Linear(2, 2), tmp_path / "x.attn.zarr")
