"""export_texts / read_texts: many texts, batch by batch, into one file; checked against each text run ALONE.

Ground truth is the same model's eager ``output_attentions`` for one text at a time (no padding,
no batch), so a batch's padding, the file's padding to the longest text and the offset of each
batch are all checked against what the framework computes without them.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from adapter_checks import assert_valid
from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

import attnformat
from attnformat.adapters.batching import TextInputError, export_texts, read_texts
from attnformat.adapters.errors import UnsupportedModelError

TEXTS = [
    "The cat sat on the mat.",
    "Hi",
    "Attention shows which words a model looks at, token by token.",
    "Short one.",
    "A fifth text of middling length here.",
    "Six",
    "Seven texts make batches of three end with a single text.",
]


@contextlib.contextmanager
def _eager(model):
    """The model with eager attention for the block (the framework's own weights), then as it was."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def _alone(model, tokenizer, text, max_length=None):
    """(token ids, per-layer (head, query, key) weights) of ``text`` run by itself."""
    encoded = tokenizer([text], return_tensors="pt", truncation=max_length is not None, max_length=max_length)
    with torch.no_grad(), _eager(model) as eager:
        output = eager(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], output_attentions=True)
    return encoded["input_ids"][0].tolist(), [layer[0].numpy() for layer in output.attentions]


def _check_against_alone(path, site_name, model, tokenizer, texts, max_length=None):
    site = attnformat.open(path)[site_name]
    weights = site["weights"].transpose("sample", "layer", "head", "query", "key").values
    longest = weights.shape[-1]
    assert weights.shape[0] == len(texts)
    for sample, text in enumerate(texts):
        ids, expected = _alone(model, tokenizer, text, max_length)
        count = len(ids)
        for layer, reference in enumerate(expected):
            np.testing.assert_allclose(weights[sample, layer, :, :count, :count], reference, rtol=1e-5, atol=1e-6)
            assert not np.any(weights[sample, layer, :, :count, count:])  # real rows give padded keys nothing
        assert site["query_mask"].values[sample].tolist() == [True] * count + [False] * (longest - count)
        assert site["key_mask"].values[sample].tolist() == site["query_mask"].values[sample].tolist()
        pieces = site["query_token"].values[sample].tolist()
        assert pieces == tokenizer.convert_ids_to_tokens(ids) + [tokenizer.pad_token] * (longest - count)
        assert "".join(site["query_label"].values[sample, :count]) == tokenizer.decode(ids)
    return site


@pytest.mark.parametrize("batch_size", [1, 3, 4, 32])
def test_every_sample_equals_its_text_run_alone(tmp_path, minilm, batch_size):
    model, tokenizer = minilm
    out = export_texts(model, tokenizer, TEXTS, tmp_path / "many.attn.zarr", batch_size=batch_size, progress=False)
    assert_valid(out)
    longest = max(len(tokenizer(text)["input_ids"]) for text in TEXTS)
    site = _check_against_alone(out, "encoder/self", model, tokenizer, TEXTS)
    assert site["weights"].sizes["query"] == site["weights"].sizes["key"] == longest
    attrs = attnformat.open(out).attrs
    assert attrs["batch_size"] == batch_size and "truncated_texts" not in attrs


def test_max_length_truncates_like_the_tokenizer_and_says_how_many(tmp_path, minilm):
    model, tokenizer = minilm
    max_length = 6
    out = export_texts(model, tokenizer, TEXTS, tmp_path / "cut.attn.zarr", batch_size=3, max_length=max_length, progress=False)
    assert_valid(out)
    full_lengths = [len(tokenizer(text)["input_ids"]) for text in TEXTS]
    attrs = attnformat.open(out).attrs
    assert attrs["max_length"] == max_length
    assert attrs["truncated_texts"] == sum(length > max_length for length in full_lengths) == 4
    site = _check_against_alone(out, "encoder/self", model, tokenizer, TEXTS, max_length=max_length)
    assert site["weights"].sizes["query"] == max_length


def test_pairs_and_targets_on_an_encoder_decoder_model(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = BartConfig(vocab_size=tokenizer.vocab_size, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                        decoder_start_token_id=tokenizer.sep_token_id)
    model = BartForConditionalGeneration(config).eval()
    pairs = [("the cat sat on the mat", "le chat"), ("a dog", "un chien est assis ici"), ("one", "un")]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"text": text, "target": target}) + "\n" for text, target in pairs))
    read = read_texts(source)
    assert read.targets == [target for _, target in pairs]
    out = export_texts(model, tokenizer, read.texts, tmp_path / "bart.attn.zarr", targets=read.targets, batch_size=2, progress=False)
    assert_valid(out)
    tree = attnformat.open(out)
    assert attnformat.site_paths(tree) == ["decoder/cross", "decoder/self", "encoder/self"]
    layers = ("sample", "layer", "head", "query", "key")
    stored = {name: tree[name]["weights"].transpose(*layers).values for name in ("encoder/self", "decoder/self", "decoder/cross")}
    for sample, (text, target) in enumerate(pairs):
        encoded = tokenizer([text], return_tensors="pt")
        labels = tokenizer(text_target=[target], return_tensors="pt")["input_ids"]
        decoder_ids = torch.cat([torch.tensor([[config.decoder_start_token_id]]), labels[:, :-1]], dim=1)
        with torch.no_grad(), _eager(model) as eager:
            alone = eager(**encoded, decoder_input_ids=decoder_ids, output_attentions=True)
        n, m = encoded["input_ids"].shape[1], decoder_ids.shape[1]
        for layer in range(2):
            np.testing.assert_allclose(stored["encoder/self"][sample, layer, :, :n, :n], alone.encoder_attentions[layer][0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(stored["decoder/self"][sample, layer, :, :m, :m], alone.decoder_attentions[layer][0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(stored["decoder/cross"][sample, layer, :, :m, :n], alone.cross_attentions[layer][0], rtol=1e-5, atol=1e-6)
        assert tree["decoder/self"]["query_token"].values[sample, :m].tolist() == tokenizer.convert_ids_to_tokens(decoder_ids[0])
        assert tree["decoder/cross"]["key_mask"].values[sample].sum() == n
        assert tree["decoder/cross"]["query_mask"].values[sample].sum() == m
    # the same pairs given as (text, target) tuples make the same file
    again = export_texts(model, tokenizer, pairs, tmp_path / "pairs.attn.zarr", batch_size=3, progress=False)
    np.testing.assert_array_equal(attnformat.open(again)["decoder/cross"]["key_mask"].values, tree["decoder/cross"]["key_mask"].values)
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        export_texts(model, tokenizer, ["no target"], tmp_path / "none.attn.zarr", progress=False)


def test_decoder_only_model_is_causal_per_sample(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    model = GPT2LMHeadModel(config).eval()
    texts = TEXTS[:5]
    out = export_texts(model, tokenizer, texts, tmp_path / "gpt2.attn.zarr", batch_size=2, progress=False)
    assert_valid(out)
    site = _check_against_alone(out, "decoder/self", model, tokenizer, texts)
    assert site.attrs["causal"] == 1
    assert site["query_position"].values.tolist() == list(range(site["weights"].sizes["query"]))


def test_too_long_text_without_max_length_fails_before_writing(tmp_path, minilm):
    model, tokenizer = minilm
    out = tmp_path / "long.attn.zarr"
    with pytest.raises(UnsupportedModelError, match=r"text 1 has \d+ tokens, more than the model's 512 positions"):
        export_texts(model, tokenizer, ["fine", "word " * 600], out, progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_arguments_are_clear_errors(tmp_path, minilm):
    model, tokenizer = minilm
    out = tmp_path / "x.attn.zarr"
    with pytest.raises(TextInputError, match="empty"):
        export_texts(model, tokenizer, [], out)
    with pytest.raises(TextInputError, match="text 1 is a int"):
        export_texts(model, tokenizer, ["a", 3], out)
    with pytest.raises(UnsupportedModelError, match="not an encoder-decoder"):
        export_texts(model, tokenizer, [("a", "b")], out)
    with pytest.raises(attnformat.AttnFormatError, match="batch_size"):
        export_texts(model, tokenizer, ["a"], out, batch_size=0)
    assert not out.exists()


def test_progress_bar_only_when_asked_or_on_a_terminal(tmp_path, minilm, capsys):
    model, tokenizer = minilm
    export_texts(model, tokenizer, TEXTS[:3], tmp_path / "quiet.attn.zarr", batch_size=2)  # stderr is not a terminal here
    assert capsys.readouterr().err == ""
    export_texts(model, tokenizer, TEXTS[:3], tmp_path / "bar.attn.zarr", batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "text" in err


def test_read_texts_lines_stdin_and_jsonl(tmp_path):
    plain = tmp_path / "texts.txt"
    plain.write_bytes("\ufeffFirst line\r\n\n   \nSecond, with a {brace}\nThird\n".encode())
    assert read_texts(plain) == read_texts("-", stdin=io.BytesIO(plain.read_bytes()))
    read = read_texts(plain)
    assert read.texts == ["First line", "Second, with a {brace}", "Third"] and read.targets is None and read.lines == [1, 4, 5]
    assert read_texts("-", stdin=io.BytesIO(b'{"text": "x"}\n'), format="jsonl").texts == ["x"]
    assert read_texts("-", stdin=io.BytesIO(b'{"text": "x"}\n')).texts == ['{"text": "x"}']  # stdin: lines unless told


@pytest.mark.parametrize(("content", "message"), [
    (b'{"text": "ok"}\n{"text": "broken\n', "line 2: not valid JSON"),
    (b'{"text": "ok"}\n\n["a list"]\n', "line 3: expected a JSON object"),
    (b'{"txt": "typo"}\n', 'line 1: needs a string "text" field'),
    (b'{"text": 5}\n', 'line 1: needs a string "text" field (it is int)'),
    (b'{"text": "a", "target": "b"}\n{"text": "c"}\n', "line 2: every line needs a \"target\" or none does"),
    (b'{"text": "a", "target": 1}\n', 'line 1: "target" must be a string'),
    (b'{"text": "ok"}\n\xff\xfe bad bytes\n', "line 2: not UTF-8"),
    (b"\n  \n", "no texts"),
])
def test_read_texts_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(TextInputError) as caught:
        read_texts(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_top_k_and_statistics_per_sample_match_the_reference_reductions(tmp_path, minilm):
    from attnformat import reductions
    from attnformat.adapters.keep import Keep

    model, tokenizer = minilm
    texts = [text for text in TEXTS if len(tokenizer(text)["input_ids"]) >= 4][:4]
    keep = Keep(dense=False, top_k=3, statistics=True, local_window=1)
    out = export_texts(model, tokenizer, texts, tmp_path / "kept.attn.zarr", batch_size=3, keep=keep, progress=False)
    assert_valid(out)
    tree = attnformat.open(out)
    assert "encoder/self" not in attnformat.site_paths(tree)
    topk, stats = tree["encoder/self_topk"], tree["encoder/self_stats"]
    assert topk.attrs["describes"] == stats.attrs["describes"] == "encoder/self"
    order = ("sample", "layer", "head", "query", "rank")
    kept, index = topk["weights"].transpose(*order).values, topk["key_index"].transpose(*order).values
    entropy = stats["entropy"].transpose(*order[:-1]).values
    local = stats["local_weight"].transpose(*order[:-1]).values
    for sample, text in enumerate(texts):
        ids, expected = _alone(model, tokenizer, text)
        count = len(ids)
        for layer in (0, 5):
            want_kept, want_index, _ = reductions.top_k(expected[layer], 3)
            np.testing.assert_allclose(kept[sample, layer, :, :count], want_kept, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(index[sample, layer, :, :count], want_index)
            want = reductions.row_statistics(expected[layer], local_window=1)
            np.testing.assert_allclose(entropy[sample, layer, :, :count], want["entropy"], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(local[sample, layer, :, :count], want["local_weight"], rtol=1e-5, atol=1e-6)
        assert topk["query_mask"].values[sample].sum() == count
        assert (index[sample, :, :, :count] < count).all()  # a padded key is never among a real row's largest
