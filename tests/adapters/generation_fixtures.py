"""Tiny tokenizers built offline with the ``tokenizers`` library, for the generation tests."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

TEXTS = ["The cat sat on the mat.", "Hello world! café 我们 naïve", "isn't it?\ttabs and\nnew lines  two spaces"]


def byte_level_bpe():
    """GPT-2 style: byte-level BPE, ``Ġ`` for spaces, a multi-byte character may span tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"])
    tokenizer.train_from_iterator(TEXTS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def sentencepiece(byte_fallback: bool):
    """Llama-2 style (byte fallback, ``<0xE6>`` pieces) or T5 style sentencepiece with ``▁`` for spaces."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)] if byte_fallback else []
    words = ["▁The", "▁the", "▁cat", "▁sat", "▁on", "▁mat", "▁", "▁Hello", "▁world", "▁caf", "é", "s", "'", ".", "!", "?", "a", "c", "t",
             "e", "h", "i", "n", "o", "w", "l", "T", "H", "ï", "v", "我", "们", "\t", "\n", "b", "d", "p", "r", "m", "u", "W", "x", "y", "z"]
    vocab = [(piece, 0.0) for piece in specials + byte_pieces] + [(piece, -float(len(piece))) for piece in words]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=byte_fallback))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    steps = [decoders.Replace("▁", " ")] + ([decoders.ByteFallback(), decoders.Fuse()] if byte_fallback else []) + [decoders.Strip(" ", 1, 0)]
    tokenizer.decoder = decoders.Sequence(steps)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
