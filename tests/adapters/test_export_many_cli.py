"""``attnformat export hf --file``: texts from a file or stdin, batched, one file; exit codes; progress bar.

Stored weights are checked against the same model's eager ``output_attentions`` of each text run
alone (no batch, no padding).
"""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch
from adapter_checks import assert_valid
from transformers import BartConfig, BartForConditionalGeneration

import attnformat
from attnformat.cli import main

TEXTS = ["The cat sat on the mat.", "Hi", "Attention shows which words a model looks at.", "Short one.", "Five"]


def _alone(model, tokenizer, text, max_length=None):
    encoded = tokenizer([text], return_tensors="pt", truncation=max_length is not None, max_length=max_length)
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the framework's own weights
    try:
        with torch.no_grad():
            output = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    return encoded["input_ids"].shape[1], [layer[0].numpy() for layer in output.attentions]


def _assert_samples_match(path, minilm, texts, max_length=None):
    model, tokenizer = minilm
    site = attnformat.open(path)["encoder/self"]
    weights = site["weights"].transpose("sample", "layer", "head", "query", "key").values
    assert weights.shape[0] == len(texts)
    for sample, text in enumerate(texts):
        count, expected = _alone(model, tokenizer, text, max_length)
        for layer in (0, len(expected) - 1):
            np.testing.assert_allclose(weights[sample, layer, :, :count, :count], expected[layer], rtol=1e-5, atol=1e-6)
        assert site["key_mask"].values[sample].sum() == count


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal (to see the progress bar appear)."""

    def isatty(self):
        return True


def test_file_of_texts_in_batches(tmp_path, minilm_dir, minilm, capsys):
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n\n")
    out = tmp_path / "many.attn.zarr"
    assert main(["export", "hf", str(minilm_dir), "--file", str(source), "--batch-size", "2", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.out and "encoder/self: sample=5, layer=6, head=12" in captured.out and "conforms" in captured.out
    assert captured.err == ""  # not a terminal: no progress bar
    assert_valid(out)
    _assert_samples_match(out, minilm, TEXTS)


def test_stdin_with_max_length_states_the_truncation(tmp_path, minilm_dir, minilm, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(TEXTS).encode())))
    out = tmp_path / "stdin.attn.zarr.zip"
    assert main(["export", "hf", str(minilm_dir), "--file", "-", "--batch-size", "3", "--max-length", "5", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "truncated 2 of 5 texts to --max-length 5 tokens" in printed and printed.index("wrote") < printed.index("truncated")
    attrs = attnformat.open(out).attrs
    assert attrs["truncated_texts"] == 2 and attrs["max_length"] == 5
    _assert_samples_match(out, minilm, TEXTS, max_length=5)


def test_jsonl_with_targets_on_an_encoder_decoder_model(tmp_path, tokenizer, capsys):
    torch.manual_seed(0)
    config = BartConfig(vocab_size=tokenizer.vocab_size, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                        decoder_start_token_id=tokenizer.sep_token_id)
    folder = tmp_path / "tiny-bart"
    BartForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    pairs = [("the cat sat", "le chat"), ("a dog barks loudly", "un chien"), ("hello", "bonjour tout le monde")]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"text": text, "target": target}) + "\n" for text, target in pairs))
    out = tmp_path / "bart.attn.zarr"
    assert main(["export", "hf", str(folder), "--file", str(source), "--batch-size", "2", "-o", str(out), "-q"]) == 0
    assert_valid(out)
    model = BartForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    cross = attnformat.open(out)["decoder/cross"]["weights"].transpose("sample", "layer", "head", "query", "key").values
    for sample, (text, target) in enumerate(pairs):
        encoded = tokenizer([text], return_tensors="pt")
        labels = tokenizer(text_target=[target], return_tensors="pt")["input_ids"]
        decoder_ids = torch.cat([torch.tensor([[config.decoder_start_token_id]]), labels[:, :-1]], dim=1)
        with torch.no_grad():
            expected = model(**encoded, decoder_input_ids=decoder_ids, output_attentions=True).cross_attentions
        m, n = decoder_ids.shape[1], encoded["input_ids"].shape[1]
        np.testing.assert_allclose(cross[sample, 1, :, :m, :n], expected[1][0].numpy(), rtol=1e-5, atol=1e-6)
    # --max-length cuts texts and targets alike and counts each
    cut = tmp_path / "cut.attn.zarr"
    assert main(["export", "hf", str(folder), "--file", str(source), "--max-length", "4", "-o", str(cut)]) == 0
    attrs = attnformat.open(cut).attrs
    long_texts = sum(len(tokenizer(text)["input_ids"]) > 4 for text, _ in pairs)
    long_targets = sum(len(tokenizer(text_target=target)["input_ids"]) > 4 for _, target in pairs)
    assert (attrs["truncated_texts"], attrs["truncated_targets"]) == (long_texts, long_targets) == (2, 2)
    assert "truncated 2 of 3 texts and 2 of 3 targets to --max-length 4 tokens" in capsys.readouterr().out
    assert_valid(cut)
    # a seq2seq model without targets in the file is a clear error
    plain = tmp_path / "plain.txt"
    plain.write_text("no target here\n")
    assert main(["export", "hf", str(folder), "--file", str(plain), "-o", str(tmp_path / "no.attn.zarr")]) == 2


@pytest.mark.parametrize(("content", "message"), [
    (None, "missing.txt: No such file"),
    (b"", "no texts"),
    (b'{"text": "fine"}\nnot json\n', "line 2: not valid JSON"),
])
def test_bad_input_files_exit_2_with_one_line(tmp_path, minilm_dir, capsys, content, message):
    source = tmp_path / ("missing.txt" if content is None else "texts.jsonl")
    if content is not None:
        source.write_bytes(content)
    out = tmp_path / "x.attn.zarr"
    assert main(["export", "hf", str(minilm_dir), "--file", str(source), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_usage_errors_exit_2(tmp_path, minilm_dir, capsys):
    source = tmp_path / "texts.txt"
    source.write_text("one\n")
    out = str(tmp_path / "x.attn.zarr")
    assert main(["export", "hf", str(minilm_dir), "--file", str(source), "--batch-size", "0", "-o", out]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert main(["export", "hf", str(minilm_dir), "--file", str(source), "--text", "both", "-o", out]) == 2
    assert "not allowed with" in capsys.readouterr().err
    assert main(["export", "hf", str(minilm_dir), "--file", str(source), "--target", "t", "-o", out]) == 2
    assert "JSON Lines" in capsys.readouterr().err
    assert main(["export", "hf", str(minilm_dir), "--text", "a", "--text", "b", "--target", "t", "-o", out]) == 2
    assert "one target per text" in capsys.readouterr().err
    assert main(["export", "hf", str(minilm_dir), "-o", out]) == 2  # no texts at all
    assert "--text" in capsys.readouterr().err


def test_progress_bar_on_a_terminal_and_quiet_with_q(tmp_path, minilm_dir, monkeypatch, capsys):
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS))
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["export", "hf", str(minilm_dir), "--file", str(source), "--batch-size", "2", "-o", str(tmp_path / "a.attn.zarr")]) == 0
    assert "5/5" in terminal.getvalue() and "text" in terminal.getvalue()
    assert "wrote" in capsys.readouterr().out
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert main(["export", "hf", str(minilm_dir), "--file", str(source), "-q", "-o", str(tmp_path / "b.attn.zarr")]) == 0
    assert quiet.getvalue() == "" and capsys.readouterr().out == ""
    assert attnformat.open(tmp_path / "b.attn.zarr")["encoder/self"]["weights"].sizes["sample"] == 5


def test_storage_choices_pass_through_to_the_capture(tmp_path, minilm_dir, minilm, capsys):
    from attnformat import reductions

    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS[:3]))
    out = tmp_path / "kept.attn.zarr"
    assert main(["export", "hf", str(minilm_dir), "--file", str(source), "--batch-size", "2", "--top-k", "2", "--statistics",
                 "--local-window", "1", "--dense-layers", "5", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "encoder/self_topk:" in printed and "topk k=2" in printed and "encoder/self_stats:" in printed
    assert_valid(out)
    tree = attnformat.open(out)
    assert tree["encoder/self"]["layer"].values.tolist() == [5]
    assert tree["encoder/self_stats"].attrs["local_window"] == 1
    dense = tree["encoder/self"]["weights"].transpose("sample", "layer", "head", "query", "key").values
    order = ("sample", "layer", "head", "query", "rank")
    kept = tree["encoder/self_topk"]["weights"].transpose(*order).values
    for sample, text in enumerate(TEXTS[:3]):
        count, expected = _alone(*minilm, text)
        np.testing.assert_allclose(dense[sample, 0, :, :count, :count], expected[5], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(kept[sample, 2, :, :count], reductions.top_k(expected[2], 2)[0], rtol=1e-5, atol=1e-6)
    # eager attention instead of the model's kernel: the same weights
    eager = tmp_path / "eager.attn.zarr"
    assert main(["export", "hf", str(minilm_dir), "--file", str(source), "--eager", "-q", "-o", str(eager)]) == 0
    _assert_samples_match(eager, minilm, TEXTS[:3])
    # the capture's blocks standing in for the model's kernel: the same weights (to rounding)
    replaced = tmp_path / "replaced.attn.zarr"
    assert main(["export", "hf", str(minilm_dir), "--file", str(source), "--kernel", "replace", "-q", "-o", str(replaced)]) == 0
    _assert_samples_match(replaced, minilm, TEXTS[:3])
    assert main(["export", "hf", str(minilm_dir), "--file", str(source), "--kernel", "fused", "-o", str(tmp_path / "x.attn.zarr")]) == 2
    assert "--kernel" in capsys.readouterr().err
    assert main(["export", "hf", str(minilm_dir), "--file", str(source), "--local-window", "2", "-o", str(tmp_path / "x.attn.zarr")]) == 2
    assert "add --statistics" in capsys.readouterr().err
    assert main(["export", "hf", str(minilm_dir), "--file", str(source), "--dense-layers", "1,x", "-o", str(tmp_path / "x.attn.zarr")]) == 2


def test_an_image_model_directory_points_to_export_image(tmp_path, capsys):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path / "tiny-vit"
    ViTModel(ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=16)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    assert main(["export", "hf", str(folder), "--text", "hi", "-o", str(tmp_path / "x.attn.zarr")]) == 2
    assert "an image model, not a text model; use `attnformat export image MODEL_DIR IMAGE... -o OUT`" in capsys.readouterr().err
