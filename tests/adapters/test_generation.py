"""generate() inside huggingface.capture, against the eager attentions of ONE forward over the final sequences.

Every captured row is compared value by value with the same model's eager ``output_attentions``
on the returned sequences (same mask, same position ids as ``generate`` used); top-k and
statistics sites with attnformat.reductions (numpy) applied to those eager weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapter_checks import assert_valid
from generation_fixtures import byte_level_bpe, sentencepiece
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration, WhisperConfig,
                          WhisperForConditionalGeneration)

import attnformat
from attnformat import reductions
from attnformat.adapters import CaptureStateError, UnsupportedModelError
from attnformat.adapters import huggingface as hf
from attnformat.adapters.keep import Keep

PROMPTS = ["The cat sat on", "Hello world! café is"]
ATOL = 1e-5


def _gpt2(tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, attn_implementation="sdpa")
    return GPT2LMHeadModel(config).eval()


def _llama(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def _left_padded(tokenizer, prompts=PROMPTS):
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True)


def _eager(model, **inputs):
    """The framework's ground truth: eager attention with output_attentions=True, one forward pass."""
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation(implementation)


def _decoder_only_reference(model, sequences, prompt_mask):
    """Eager attentions over the returned sequences, with the mask and position ids generate() used."""
    mask = torch.cat([prompt_mask, torch.ones(sequences.shape[0], sequences.shape[1] - prompt_mask.shape[1], dtype=prompt_mask.dtype)], dim=1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    attentions = _eager(model, input_ids=sequences, attention_mask=mask, position_ids=positions).attentions
    return [a.double().numpy() for a in attentions], mask.bool().numpy()


def _check_dense(site, expected, query_valid, *, layers=None, heads=None, rows=None):
    """Dense weights equal the eager ones on every captured row; the last row (never computed) is NaN; padding rows 0."""
    weights = site["weights"].values  # (sample, layer, head, query, key)
    layers = range(len(expected)) if layers is None else layers
    rows = np.arange(expected[0].shape[2]) if rows is None else np.asarray(rows)
    last = expected[0].shape[2] - 1
    for index, layer in enumerate(layers):
        reference = expected[layer] if heads is None else expected[layer][:, heads]
        reference = reference[:, :, rows]
        got = weights[:, index]
        for sample in range(got.shape[0]):
            captured = query_valid[sample][rows] & (rows != last)
            np.testing.assert_allclose(got[sample][:, captured], reference[sample][:, captured], atol=ATOL, rtol=0)
            assert (got[sample][:, ~query_valid[sample][rows]] == 0).all()
            assert np.isnan(got[sample][:, rows == last]).all()


def _key_mask(key_valid, queries, keys, causal):
    mask = np.broadcast_to(key_valid[:, None, None, :], (key_valid.shape[0], 1, queries, keys))
    if causal:
        mask = mask & np.tril(np.ones((queries, keys), bool))
    return mask


def _unambiguous(values, gap=1e-4):
    """Ranks whose weight differs from its neighbours by more than rounding: their key index is well defined."""
    filled = np.nan_to_num(values, nan=-1.0)
    before = np.abs(np.diff(filled, axis=-1, prepend=np.inf))
    after = np.abs(np.diff(filled, axis=-1, append=-np.inf))
    return (before > gap) & (after > gap) & ~np.isnan(values)


def _check_reductions(tree, site, expected, query_valid, key_valid, *, causal, top_k=None, local_window=None, head_mean=False):
    """Top-k, statistics and head means equal attnformat.reductions (numpy) of the eager weights, on every captured row.

    Rows of padding queries and the last row of a generated sequence (never computed) hold NaN.
    """
    queries, keys = expected[0].shape[2], expected[0].shape[3]
    captured = query_valid.copy()
    captured[:, -1] = False
    mask = _key_mask(key_valid, queries, keys, causal)
    paths = attnformat.site_paths(tree)
    for layer, reference in enumerate(expected):
        rows = np.broadcast_to(captured[:, None, :], reference.shape[:3])
        if top_k:
            topk = tree[f"{site}_topk"]
            assert topk.attrs["top_k"] == top_k and topk.attrs["key_count"] == keys and topk.attrs["describes"] == site
            kept, index, omitted = reductions.top_k(reference, top_k, key_mask=mask)
            got_kept = topk["weights"].values[:, layer]
            np.testing.assert_allclose(got_kept[rows], kept[rows], atol=ATOL, rtol=0)
            np.testing.assert_allclose(topk["omitted_weight"].values[:, layer][rows], omitted[rows], atol=ATOL, rtol=0)
            sure = _unambiguous(kept) & rows[..., None]
            np.testing.assert_array_equal(topk["key_index"].values[:, layer][sure], index[sure])
            assert (topk["key_index"].values[:, layer][~rows] == -1).all() and np.isnan(got_kept[~rows]).all()
        if f"{site}_stats" in paths:
            stats = tree[f"{site}_stats"]
            expected_stats = reductions.row_statistics(reference, local_window=local_window, key_mask=mask)
            for name in ("entropy", "max_weight", "sink_weight") + (("local_weight",) if local_window is not None else ()):
                np.testing.assert_allclose(stats[name].values[:, layer][rows], expected_stats[name][rows], atol=ATOL, rtol=0, err_msg=name)
                assert np.isnan(stats[name].values[:, layer][~rows]).all()
            top = np.sort(reference, axis=-1)
            clear = (top[..., -1] - top[..., -2] > 1e-4) & rows
            np.testing.assert_array_equal(stats["top_key"].values[:, layer][clear], expected_stats["top_key"][clear])
            if local_window is not None:
                assert stats.attrs["local_window"] == local_window
            else:
                assert "local_weight" not in stats
        if head_mean:
            mean = tree[f"{site}_mean"]
            assert mean.attrs["head_reduction"] == "mean" and "head" not in mean["weights"].dims
            np.testing.assert_allclose(mean["weights"].values[:, layer][captured], reference.mean(1)[captured], atol=ATOL, rtol=0)


def _check_tokens(site, tokenizer, ids, prompt_length):
    """Labels read as the decoded text, raw pieces are the tokenizer's, generation steps number the new tokens."""
    for sample, row in enumerate(ids):
        assert "".join(site["query_label"].values[sample]) == tokenizer.decode(row, skip_special_tokens=False)
        assert site["query_token"].values[sample].tolist() == tokenizer.convert_ids_to_tokens(row)
        assert site["key_token"].values[sample].tolist() == tokenizer.convert_ids_to_tokens(row)
    steps = site["query_generation_step"].values
    assert steps.tolist() == [-1] * prompt_length + list(range(len(ids[0]) - prompt_length))
    assert site["key_generation_step"].values.tolist() == steps.tolist()


@pytest.mark.parametrize("eager", [False, True], ids=["tap", "eager"])
def test_gpt2_greedy_left_padded_prompts(tmp_path, eager):
    tokenizer = byte_level_bpe()
    model = _gpt2(tokenizer)
    prompts = _left_padded(tokenizer)
    assert not prompts["attention_mask"][0].all() or not prompts["attention_mask"][1].all()  # one prompt is padded
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": None}
    plain = model.generate(**prompts, **settings)
    path = tmp_path / "gpt2.attn.zarr"
    keep = Keep(top_k=3, statistics=True, head_mean=True, local_window=2)
    with hf.capture(model, path, tokenizer=tokenizer, keep=keep, eager=eager):
        sequences = model.generate(**prompts, **settings)
    assert torch.equal(sequences, plain)  # the capture does not change what the model generates
    assert model.config._attn_implementation == "sdpa" and "generate" not in vars(model)
    assert_valid(path)
    tree = attnformat.open(path)
    assert attnformat.site_paths(tree) == ["decoder/self", "decoder/self_mean", "decoder/self_stats", "decoder/self_topk"]
    expected, mask = _decoder_only_reference(model, sequences, prompts["attention_mask"])
    site = tree["decoder/self"]
    total = sequences.shape[1]
    assert dict(site["weights"].sizes) == {"sample": 2, "layer": 2, "head": 2, "query": total, "key": total}
    assert site.attrs["causal"] == 1 and site.attrs["describes"] == "decoder/self"
    np.testing.assert_array_equal(site["query_mask"].values, mask)
    np.testing.assert_array_equal(site["key_mask"].values, mask)
    assert site["query_position"].values.tolist() == list(range(total))
    _check_dense(site, expected, mask)
    _check_tokens(site, tokenizer, sequences.tolist(), prompts["input_ids"].shape[1])
    assert site["query_label"].values[0][-6:].tolist() == [tokenizer.decode(sequences[0, : i + 1])[len(tokenizer.decode(sequences[0, :i])):]
                                                          for i in range(total - 6, total)]
    _check_reductions(tree, "decoder/self", expected, mask, mask, causal=True, top_k=3, local_window=2, head_mean=True)
    for derived in ("decoder/self_topk", "decoder/self_stats", "decoder/self_mean"):
        assert tree[derived]["query_label"].values.tolist() == site["query_label"].values.tolist()
        assert tree[derived]["key_generation_step"].values.tolist() == site["key_generation_step"].values.tolist()


def test_llama_sampling_two_sequences_per_prompt_with_a_dense_selection(tmp_path):
    tokenizer = sentencepiece(byte_fallback=True)
    model = _llama(tokenizer)
    prompts = _left_padded(tokenizer, ["The cat 猫 sat", "Hello"])
    settings = {"max_new_tokens": 7, "do_sample": True, "top_k": 0, "num_return_sequences": 2, "eos_token_id": None,
                "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(123)
    plain = model.generate(**prompts, **settings)
    path = tmp_path / "llama.attn.zarr"
    keep = Keep(layers=[1], heads=[0, 3], top_k=4, statistics=["entropy", "max_weight", "sink_weight", "top_key"])
    torch.manual_seed(123)
    with hf.capture(model, path, tokenizer=tokenizer, keep=keep):
        sequences = model.generate(**prompts, **settings)
    assert torch.equal(sequences, plain) and sequences.shape[0] == 4
    assert_valid(path)
    tree = attnformat.open(path)
    prompt_mask = prompts["attention_mask"].repeat_interleave(2, dim=0)  # generate's order: prompt 0's sequences first
    expected, mask = _decoder_only_reference(model, sequences, prompt_mask)
    site = tree["decoder/self"]
    assert site["weights"].sizes["sample"] == 4 and site["layer"].values.tolist() == [1] and site["head"].values.tolist() == [0, 3]
    _check_dense(site, expected, mask, layers=[1], heads=[0, 3])
    _check_tokens(site, tokenizer, sequences.tolist(), prompts["input_ids"].shape[1])
    _check_reductions(tree, "decoder/self", expected, mask, mask, causal=True, top_k=4)
    assert tree["decoder/self_topk"]["weights"].sizes["head"] == 4  # reductions cover every head and layer
    assert sorted(tree["decoder/self_stats"].data_vars) == ["entropy", "max_weight", "sink_weight", "top_key"]
    sink = tree["decoder/self_stats"]["sink_weight"].values
    first_key = mask.argmax(-1)  # the sink is each sequence's first real token, after the left padding
    assert first_key.tolist() != [0, 0, 0, 0]
    for sample in range(4):
        row = np.flatnonzero(mask[sample])[2]
        for layer in range(2):
            np.testing.assert_allclose(sink[sample, layer, :, row], expected[layer][sample, :, row, first_key[sample]], atol=ATOL, rtol=0)


def test_dense_rows_selection_keeps_the_chosen_rows_with_their_positions(tmp_path):
    tokenizer = byte_level_bpe()
    model = _gpt2(tokenizer)
    prompts = tokenizer(["The cat sat on the mat."], return_tensors="pt")
    path = tmp_path / "rows.attn.zarr"
    with hf.capture(model, path, tokenizer=tokenizer, keep=Keep(rows=slice(-5, None))):
        sequences = model.generate(**prompts, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    assert_valid(path)
    site = attnformat.open(path)["decoder/self"]
    total = sequences.shape[1]
    assert site["query_position"].values.tolist() == list(range(total - 5, total))
    assert site["query_generation_step"].values.tolist() == [0, 1, 2, 3, 4] and site["weights"].sizes["key"] == total
    expected, mask = _decoder_only_reference(model, sequences, prompts["attention_mask"])
    _check_dense(site, expected, mask, rows=range(total - 5, total))


def test_t5_encoder_decoder_generate_grows_decoder_self_and_cross(tmp_path):
    tokenizer = sentencepiece(byte_fallback=False)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                                                num_heads=2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                                decoder_start_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")).eval()
    tokenizer.padding_side = "right"
    inputs = tokenizer(["The cat sat on the mat.", "Hello world!"], return_tensors="pt", padding=True)
    path = tmp_path / "t5.attn.zarr"
    keep = Keep(top_k=2, statistics=True)
    with hf.capture(model, path, tokenizer=tokenizer, keep=keep):
        torch.manual_seed(7)
        sequences = model.generate(**inputs, max_new_tokens=5, do_sample=True, num_return_sequences=2, eos_token_id=None)
    assert_valid(path)
    tree = attnformat.open(path)
    assert {"encoder/self", "decoder/self", "decoder/cross", "decoder/cross_topk", "decoder/cross_stats"} <= set(attnformat.site_paths(tree))
    encoder_ids = inputs["input_ids"].repeat_interleave(2, dim=0)
    encoder_mask = inputs["attention_mask"].repeat_interleave(2, dim=0)
    expected = _eager(model, input_ids=encoder_ids, attention_mask=encoder_mask, decoder_input_ids=sequences)
    decoder_valid = np.ones(sequences.shape, bool)
    encoder_valid = encoder_mask.bool().numpy()
    encoder_self = [a.double().numpy() for a in expected.encoder_attentions]
    decoder_self = [a.double().numpy() for a in expected.decoder_attentions]
    cross = [a.double().numpy() for a in expected.cross_attentions]
    for layer, reference in enumerate(encoder_self):  # the encoder ran once per prompt; repeated per returned sequence
        got = tree["encoder/self"]["weights"].values[:, layer]
        for sample in range(4):
            rows = encoder_valid[sample]
            np.testing.assert_allclose(got[sample][:, rows], reference[sample][:, rows], atol=ATOL, rtol=0)
    _check_dense(tree["decoder/self"], decoder_self, decoder_valid)
    _check_dense(tree["decoder/cross"], cross, decoder_valid)
    _check_reductions(tree, "decoder/cross", cross, decoder_valid, encoder_valid, causal=False, top_k=2)
    _check_reductions(tree, "decoder/self", decoder_self, decoder_valid, decoder_valid, causal=True, top_k=2, local_window=8)
    crossing = tree["decoder/cross"]
    assert crossing.attrs["key_site"] == "encoder/self" and crossing.attrs["attention_type"] == "cross"
    np.testing.assert_array_equal(crossing["key_mask"].values, encoder_valid)
    assert "local_weight" not in tree["decoder/cross_stats"]
    for sample in range(4):
        assert "".join(crossing["key_label"].values[sample]) == tokenizer.decode(encoder_ids[sample], skip_special_tokens=False)
        assert "".join(crossing["query_label"].values[sample]) == tokenizer.decode(sequences[sample], skip_special_tokens=False)
    assert crossing["query_generation_step"].values.tolist() == [-1, 0, 1, 2, 3, 4]  # the start token is the decoder's prompt


def test_whisper_generate_without_a_tokenizer(tmp_path):
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=8, max_target_positions=32,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None,
                           suppress_tokens=None, attn_implementation="sdpa")
    model = WhisperForConditionalGeneration(config).eval()
    features = torch.randn(2, 8, 16)
    path = tmp_path / "whisper.attn.zarr"
    with hf.capture(model, path, keep=Keep(top_k=3, statistics=True)):
        generated = model.generate(input_features=features, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert_valid(path)
    tree = attnformat.open(path)
    decoder_ids = torch.cat([torch.full((2, 1), config.decoder_start_token_id), generated], dim=1)  # Whisper returns the new tokens only
    expected = _eager(model, input_features=features, decoder_input_ids=decoder_ids)
    valid = np.ones(decoder_ids.shape, bool)
    _check_dense(tree["decoder/self"], [a.double().numpy() for a in expected.decoder_attentions], valid)
    _check_dense(tree["decoder/cross"], [a.double().numpy() for a in expected.cross_attentions], valid)
    for layer, reference in enumerate(expected.encoder_attentions):
        np.testing.assert_allclose(tree["encoder/self"]["weights"].values[:, layer], reference.numpy(), atol=ATOL, rtol=0)
    _check_reductions(tree, "decoder/cross", [a.double().numpy() for a in expected.cross_attentions], valid, np.ones((2, 8), bool),
                      causal=False, top_k=3)
    assert tree["decoder/self"]["query_generation_step"].values.tolist() == [-1, 0, 1, 2, 3]
    assert "query_label" not in tree["decoder/self"].coords  # no tokenizer, no labels


def test_beam_search_a_second_generate_and_a_forward_before_generate_raise(tmp_path):
    tokenizer = byte_level_bpe()
    model = _gpt2(tokenizer)
    prompt = tokenizer(["The cat"], return_tensors="pt")
    settings = {"max_new_tokens": 2, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": None}
    with pytest.raises(UnsupportedModelError, match="num_beams=2"):
        with hf.capture(model, tmp_path / "beams.attn.zarr", tokenizer=tokenizer):
            model.generate(**prompt, num_beams=2, **settings)
    assert "generate" not in vars(model)
    with pytest.raises(CaptureStateError, match="twice"):
        with hf.capture(model, tmp_path / "twice.attn.zarr", tokenizer=tokenizer):
            model.generate(**prompt, **settings)
            model.generate(**prompt, **settings)
    assert attnformat.open(tmp_path / "twice.attn.zarr").attrs["completeness"] == "incomplete"
    with pytest.raises(CaptureStateError, match="already written"):
        with hf.capture(model, tmp_path / "mixed.attn.zarr", tokenizer=tokenizer), torch.no_grad():
            model(**prompt)
            model.generate(**prompt, **settings)
    assert "generate" not in vars(model)
    with hf.capture(model, tmp_path / "ok.attn.zarr"):
        pass
    assert model.generate(**prompt, **settings).shape == (1, prompt["input_ids"].shape[1] + 2)


def test_a_sequence_that_finished_early_keeps_the_pad_tokens_generate_appended(tmp_path):
    tokenizer = byte_level_bpe()
    model = _gpt2(tokenizer)
    prompts = _left_padded(tokenizer)
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    free = model.generate(**prompts, **settings, eos_token_id=None)
    stop = int(free[0, prompts["input_ids"].shape[1] + 1])  # sample 0's second new token ends it...
    assert stop not in free[1, prompts["input_ids"].shape[1]:].tolist()  # ...while sample 1 runs on
    path = tmp_path / "eos.attn.zarr"
    with hf.capture(model, path, tokenizer=tokenizer, keep=Keep(top_k=2)):
        sequences = model.generate(**prompts, **settings, eos_token_id=stop)
    assert sequences[0, -1] == tokenizer.pad_token_id  # generate() padded the finished sequence
    assert_valid(path)
    tree = attnformat.open(path)
    expected, mask = _decoder_only_reference(model, sequences, prompts["attention_mask"])
    _check_dense(tree["decoder/self"], expected, mask)
    _check_reductions(tree, "decoder/self", expected, mask, mask, causal=True, top_k=2)
    assert tree["decoder/self"]["query_label"].values[0][-1] == tokenizer.pad_token
