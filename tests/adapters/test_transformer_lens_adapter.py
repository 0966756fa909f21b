"""The TransformerLens adapter against TransformerLens's own run_with_cache patterns, value by value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapter_checks import assert_valid
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.model_bridge import TransformerBridge
from transformers import GPT2Config, GPT2LMHeadModel

import attnformat
from attnformat.adapters import CaptureStateError, UnsupportedModelError
from attnformat.adapters import transformer_lens as lens


def _tiny(tokenizer=None, **overrides):
    torch.manual_seed(0)
    settings = {"n_layers": 2, "d_model": 16, "n_ctx": 32, "d_head": 8, "n_heads": 2, "d_vocab": 40, "act_fn": "gelu", "seed": 0}
    settings.update(overrides)
    return HookedTransformer(HookedTransformerConfig(**settings), tokenizer=tokenizer, default_padding_side="right").eval()


def test_hooked_transformer_patterns_match_run_with_cache(tmp_path):
    model = _tiny()
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    path = tmp_path / "lens.attn.zarr"
    with lens.capture(model, path, tokens={"positions": np.arange(9)}) as session, torch.no_grad():
        logits = model(ids)
    with torch.no_grad():
        assert torch.equal(logits, model(ids))  # the hooks changed nothing
    assert_valid(path)  # includes: causal, no weight on later keys
    site = attnformat.open(path)["decoder/self"]
    assert dict(site["weights"].sizes) == {"sample": 2, "layer": 2, "head": 2, "query": 9, "key": 9}
    assert site.attrs["causal"] == 1 and site.attrs["attention_type"] == "self"
    for layer in range(2):
        np.testing.assert_allclose(site["weights"].sel(layer=layer).values, cache["pattern", layer].numpy(), rtol=1e-6, atol=1e-7)
    for layer, name in session.hooks.items():  # removed on exit, nothing else touched
        assert not model.hook_dict[name].fwd_hooks
    assert attnformat.open(path).attrs["model_framework"].startswith("transformer_lens")


def test_run_with_cache_inside_the_block_keeps_the_capture_and_user_hooks(tmp_path):
    model = _tiny()
    calls = []
    model.add_hook("blocks.1.attn.hook_pattern", lambda pattern, hook: calls.append(hook.name), is_permanent=True)
    ids = torch.randint(0, 40, (1, 5))
    path = tmp_path / "cached.attn.zarr"
    with lens.capture(model, path), torch.no_grad():
        _, cache = model.run_with_cache(ids)  # resets temporary hooks when done: the capture's are permanent
    assert calls == ["blocks.1.attn.hook_pattern"]
    assert len(model.hook_dict["blocks.1.attn.hook_pattern"].fwd_hooks) == 1  # the user's hook is still there
    site = attnformat.open(path)["decoder/self"]
    np.testing.assert_allclose(site["weights"].sel(layer=1).values, cache["pattern", 1].numpy(), rtol=1e-6, atol=1e-7)


def test_export_text_labels_with_to_str_tokens_and_masks_padding(tmp_path, tokenizer):
    model = _tiny(tokenizer=tokenizer, d_vocab=tokenizer.vocab_size)
    texts = ["the cat sat on the mat", "hello"]
    path = lens.export_text(model, texts, tmp_path / "texts.attn.zarr")
    ids = model.to_tokens(texts)
    mask = (ids != tokenizer.pad_token_id)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, attention_mask=mask.long())
    assert_valid(path)
    site = attnformat.open(path)["decoder/self"]
    for sample in range(2):
        assert site["query_label"].values[sample].tolist() == model.to_str_tokens(ids[sample])
        assert site["key_token"].values[sample].tolist() == tokenizer.convert_ids_to_tokens(ids[sample])
    np.testing.assert_array_equal(site["key_mask"].values, mask.numpy())
    assert not site["key_mask"].values[1].all()
    for layer in range(2):
        np.testing.assert_allclose(site["weights"].sel(layer=layer).values, cache["pattern", layer].numpy(), rtol=1e-6, atol=1e-7)


def test_transformer_bridge_patterns_match_run_with_cache(tmp_path, tokenizer):
    torch.manual_seed(1)
    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                               bos_token_id=101, eos_token_id=102)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    bridge = TransformerBridge.boot_transformers(str(model_dir), device="cpu")
    ids = torch.tensor([[101, 1996, 4937, 2938, 102]])
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
    path = tmp_path / "bridge.attn.zarr"
    with lens.capture(bridge, path, tokens={"labels": bridge.to_str_tokens(ids)}), torch.no_grad():
        bridge(ids)
    assert_valid(path)
    site = attnformat.open(path)["decoder/self"]
    assert site["query_label"].values.tolist() == ["[CLS]", "the", "cat", "sat", "[SEP]"]
    for layer in range(2):
        np.testing.assert_allclose(site["weights"].sel(layer=layer).values, cache[f"blocks.{layer}.attn.hook_pattern"].numpy(),
                                   rtol=1e-6, atol=1e-7)


def test_errors(tmp_path):
    with pytest.raises(UnsupportedModelError, match="hook_pattern"):
        lens.capture(torch.nn.Linear(2, 2), tmp_path / "x.attn.zarr")
    model = _tiny()
    with pytest.raises(UnsupportedModelError, match="no tokenizer"):
        lens.export_text(model, "text", tmp_path / "y.attn.zarr")
    with pytest.raises(CaptureStateError, match="ran twice"):
        with lens.capture(model, tmp_path / "z.attn.zarr"), torch.no_grad():
            model(torch.tensor([[1, 2]]))
            model(torch.tensor([[1, 2]]))
    assert not any(model.hook_dict[name].fwd_hooks for name in lens.find_pattern_hooks(model).values())


def test_keep_top_k_statistics_and_head_mean_match_reference_reductions(tmp_path):
    from attnformat.adapters.keep import Keep
    from attnformat.reductions import row_statistics, top_k

    model = _tiny()
    ids = torch.randint(0, 40, (1, 8))
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    path = tmp_path / "kept.attn.zarr"
    with lens.capture(model, path, keep=Keep(dense=False, top_k=3, statistics=["entropy", "sink_weight"], head_mean=True)), torch.no_grad():
        model(ids)
    assert_valid(path)
    tree = attnformat.open(path)
    assert attnformat.site_paths(tree) == ["decoder/self_mean", "decoder/self_stats", "decoder/self_topk"]
    assert all(tree[site].attrs["describes"] == "decoder/self" for site in attnformat.site_paths(tree))
    for layer in range(2):
        pattern = cache["pattern", layer].numpy()
        kept, key_index, omitted = top_k(pattern, 3, key_mask=np.tril(np.ones((8, 8), bool)))  # later keys are not available
        np.testing.assert_allclose(tree["decoder/self_topk"]["weights"].sel(layer=layer).values, kept, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(tree["decoder/self_topk"]["key_index"].sel(layer=layer).values, key_index)
        np.testing.assert_allclose(tree["decoder/self_topk"]["omitted_weight"].sel(layer=layer).values, omitted, rtol=1e-5, atol=1e-6)
        reference = row_statistics(pattern)
        for name in ("entropy", "sink_weight"):
            np.testing.assert_allclose(tree["decoder/self_stats"][name].sel(layer=layer).values, reference[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tree["decoder/self_mean"]["weights"].sel(layer=layer).values, pattern.mean(axis=1), rtol=1e-6, atol=1e-7)
