"""Readable token labels and raw pieces against the tokenizer's own decode, for four tokenizer families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from generation_fixtures import TEXTS, byte_level_bpe, sentencepiece

from attnformat.adapters import tokens


@pytest.fixture(scope="module")
def tokenizers(tokenizer):
    return {"byte-level BPE": byte_level_bpe(), "sentencepiece byte fallback": sentencepiece(True),
            "sentencepiece": sentencepiece(False), "WordPiece (MiniLM)": tokenizer}


@pytest.mark.parametrize("family", ["byte-level BPE", "sentencepiece byte fallback", "sentencepiece", "WordPiece (MiniLM)"])
def test_labels_join_to_the_decoded_text_and_pieces_are_the_raw_tokens(tokenizers, family):
    tokenizer = tokenizers[family]
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id]
        labels = tokens.readable_labels(tokenizer, ids)
        assert labels.shape == (len(ids),) and labels.dtype == object
        assert "".join(labels) == tokenizer.decode(ids, skip_special_tokens=False)
        assert all("\ufffd" not in label for label in labels)
        np.testing.assert_array_equal(tokens.raw_pieces(tokenizer, ids), np.array(tokenizer.convert_ids_to_tokens(ids), dtype=object))
        for token, label in zip(tokenizer.convert_ids_to_tokens(ids), labels):
            if token in tokenizer.all_special_tokens:
                assert label.strip() == token  # special tokens read as themselves


def test_byte_level_pieces_read_as_text():
    tokenizer = byte_level_bpe()
    ids = tokenizer(" cat sat\ttabs")["input_ids"]
    pieces = tokens.raw_pieces(tokenizer, ids).tolist()
    labels = tokens.readable_labels(tokenizer, ids).tolist()
    assert any(piece.startswith("Ġ") for piece in pieces)
    for piece, label in zip(pieces, labels):
        assert "Ġ" not in label and "ĉ" not in label
        if piece.startswith("Ġ"):
            assert label == " " + piece[1:].replace("ĉ", "\t")


def test_a_character_spelled_in_bytes_is_carried_by_its_last_byte():
    tokenizer = sentencepiece(byte_fallback=True)
    ids = tokenizer("The cat 猫 sat")["input_ids"]
    pieces = tokens.raw_pieces(tokenizer, ids).tolist()
    labels = tokens.readable_labels(tokenizer, ids).tolist()
    start = pieces.index("<0xE7>")  # 猫 = E7 8C AB
    assert pieces[start:start + 3] == ["<0xE7>", "<0x8C>", "<0xAB>"]
    assert labels[start:start + 3] == ["", "", "猫"]
    assert labels[0] == "The" and labels[1] == " cat"  # the first piece loses its space, as in decode
    byte_level = byte_level_bpe()
    ids = byte_level("x 猫 y")["input_ids"]  # not in the training texts: three byte tokens
    pieces = tokens.raw_pieces(byte_level, ids).tolist()
    labels = tokens.readable_labels(byte_level, ids).tolist()
    assert pieces == ["x", "Ġ", "ç", "Į", "«", "Ġ", "y"]
    assert labels == ["x", " ", "", "", "猫", " ", "y"]


def test_batches_keep_their_shape_and_padding_reads_as_the_pad_token(tokenizer):
    encoded = tokenizer(["The cat's hat.", "Hi"], padding=True, return_tensors="pt")
    labels = tokens.readable_labels(tokenizer, encoded["input_ids"])
    assert labels.shape == tuple(encoded["input_ids"].shape)
    for row, ids in zip(labels, encoded["input_ids"].tolist()):
        assert "".join(row) == tokenizer.decode(ids, skip_special_tokens=False)
    assert labels[1].tolist()[:3] == ["[CLS]", " hi", " [SEP]"] and set(labels[1, 3:]) == {" [PAD]"}


def test_token_description_for_self_and_cross_sites_is_written_by_the_recorder(tmp_path, tokenizer):
    import attnformat
    from attnformat.adapters import Recorder

    encoded = tokenizer(["The cat's hat", "Hi"], padding=True, return_tensors="pt")
    description = tokens.token_description(tokenizer, encoded["input_ids"], encoded["attention_mask"])
    assert set(description) == {"labels", "tokens", "mask"}
    query = tokens.token_description(tokenizer, encoded["input_ids"][:, :3], side="query")
    key = tokens.token_description(tokenizer, encoded["input_ids"], encoded["attention_mask"], side="key")
    assert set(query) == {"query_labels", "query_tokens"} and set(key) == {"key_labels", "key_tokens", "key_mask"}
    length = encoded["input_ids"].shape[1]
    with Recorder(tmp_path / "tokens.attn.zarr") as recorder:
        recorder.describe("encoder/self", **description)
        recorder.log("encoder/self", weights=np.full((2, 1, length, length), 1 / length), dims=("sample", "head", "query", "key"))
        recorder.describe("decoder/cross", **query, **key)
        recorder.log("decoder/cross", weights=np.full((2, 1, 3, length), 1 / length), dims=("sample", "head", "query", "key"))
    tree = attnformat.open(recorder.path)
    site = tree["encoder/self"]
    for sample, ids in enumerate(encoded["input_ids"].tolist()):
        assert site["query_token"].values[sample].tolist() == tokenizer.convert_ids_to_tokens(ids)
        assert "".join(site["key_label"].values[sample]) == tokenizer.decode(ids, skip_special_tokens=False)
    np.testing.assert_array_equal(site["key_mask"].values, encoded["attention_mask"].bool().numpy())
    assert tree["decoder/cross"]["query_label"].values[0].tolist() == ["[CLS]", " the", " cat"]
    assert tree["decoder/cross"]["key_token"].values[0].tolist() == tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    with pytest.raises(ValueError, match="side"):
        tokens.token_description(tokenizer, [1, 2], side="value")
    with pytest.raises(ValueError, match="mask"):
        tokens.token_description(tokenizer, [1, 2], mask=[True])


def test_ids_outside_the_vocabulary_and_bad_input(tokenizer):
    ids = [101, tokenizer.vocab_size + 5, 102]
    assert tokens.raw_pieces(tokenizer, ids).tolist()[1] == f"<id {tokenizer.vocab_size + 5}>"
    assert "".join(tokens.readable_labels(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=False)
    with pytest.raises(ValueError, match="integers"):
        tokens.readable_labels(tokenizer, torch.zeros(2, 2, 2, dtype=torch.long))
    assert tokens.readable_labels(tokenizer, []).shape == (0,)
