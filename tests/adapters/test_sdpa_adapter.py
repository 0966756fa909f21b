"""The SDPA adapter against each model's own eager attention, value by value.

Ground truths: Hugging Face models run with attn_implementation="sdpa" inside the capture and
with "eager" + output_attentions=True outside it (same weights, same inputs); a timm-style ViT
and a custom decoder whose attention modules have a fused (SDPA) path and an eager path that
computes softmax(q k^T * scale + mask) itself, like timm's ``Attention(fused_attn=False)``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from adapter_checks import assert_valid
from torch import nn
from transformers import GPT2Config, GPT2Model, ViTConfig, ViTModel

import attnformat
from attnformat.adapters import CaptureStateError, UnsupportedModelError
from attnformat.adapters import sdpa


class TimmStyleAttention(nn.Module):
    """timm's ViT attention layout: one qkv projection, a fused SDPA path and an eager path that keeps its weights."""

    def __init__(self, dim, heads, fused_attn=True):
        super().__init__()
        self.heads, self.fused_attn = heads, fused_attn
        self.scale = (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
        self.eager_weights = None

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            self.eager_weights = attn
            x = attn @ v
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), TimmStyleAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A timm-style ViT: patch embedding, CLS token, positional embedding, ``blocks.{i}.attn``."""

    def __init__(self, image=16, patch=4, dim=32, depth=2, heads=4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def set_fused(self, fused: bool):
        for block in self.blocks:
            block.attn.fused_attn = fused


class MaskedAttention(nn.Module):
    """Decoder attention with grouped-query heads: SDPA with ``is_causal`` or a mask, or the same computed eagerly."""

    def __init__(self, dim, heads, key_heads, mode):
        super().__init__()
        self.heads, self.key_heads, self.mode, self.fused = heads, key_heads, mode, True
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, heads * self.head_dim)
        self.kv = nn.Linear(dim, 2 * key_heads * self.head_dim)
        self.eager_weights = None

    def forward(self, x, padding):
        batch, tokens, _ = x.shape
        q = self.q(x).reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(batch, tokens, 2, self.key_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
        allowed = causal[None, None] & padding[:, None, None, :]  # (batch, 1, query, key)
        arguments = {"bool": {"attn_mask": allowed}, "causal": {"is_causal": True},
                     "additive": {"attn_mask": torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))}}[self.mode]
        scale = 0.3  # not 1/sqrt(head_dim): the capture must use the scale the call was given
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **arguments)
        else:
            repeated_k = k.repeat_interleave(self.heads // self.key_heads, dim=1)
            repeated_v = v.repeat_interleave(self.heads // self.key_heads, dim=1)
            scores = q @ repeated_k.transpose(-2, -1) * scale
            if self.mode == "causal":
                scores = scores.masked_fill(~causal, float("-inf"))
            else:
                scores = scores.masked_fill(~allowed, float("-inf"))
            self.eager_weights = scores.softmax(dim=-1)
            out = self.eager_weights @ repeated_v
        return out.transpose(1, 2).reshape(batch, tokens, -1)


class TinyDecoder(nn.Module):
    def __init__(self, dim=16, heads=4, key_heads=2):
        super().__init__()
        self.embed = nn.Embedding(30, dim)
        self.layers = nn.ModuleList([MaskedAttention(dim, heads, key_heads, mode) for mode in ("causal", "bool", "additive")])

    def forward(self, ids, padding):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x, padding)
        return x


def _eager_weights(model, modules, *inputs):
    """Each module's weights from its own eager path (``fused_attn``/``fused`` switched off for one forward)."""
    flag = "fused_attn" if hasattr(modules[0], "fused_attn") else "fused"
    for module in modules:
        setattr(module, flag, False)
    try:
        with torch.no_grad():
            model(*inputs)
        return [module.eager_weights.numpy() for module in modules]
    finally:
        for module in modules:
            setattr(module, flag, True)


def test_timm_style_vit_matches_its_eager_path_and_outputs_are_unchanged(tmp_path):
    torch.manual_seed(0)
    model = TinyViT().eval()
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        plain = model(images)
    path = tmp_path / "vit.attn.zarr"
    with sdpa.capture(model, path, site_names={"attn": "encoder/self"}) as session, torch.no_grad():
        captured = model(images)
    assert torch.equal(plain, captured)  # the real kernel ran; the output is the model's own
    assert session.sites == {"blocks.0.attn": ("encoder/self", 0), "blocks.1.attn": ("encoder/self", 1)}
    expected = _eager_weights(model, [block.attn for block in model.blocks], images)
    assert_valid(path)
    site = attnformat.open(path)["encoder/self"]
    assert dict(site["weights"].sizes) == {"sample": 2, "layer": 2, "head": 4, "query": 17, "key": 17}
    assert site.attrs["attention_type"] == "self" and site.attrs["causal"] == 0 and site.attrs["module_class"] == "TimmStyleAttention"
    for layer in range(2):
        np.testing.assert_allclose(site["weights"].sel(layer=layer).values, expected[layer], rtol=1e-5, atol=1e-6)
    assert "key_mask" not in site and "query_mask" not in site


@pytest.mark.parametrize("block_bytes", [None, 300])  # 300 bytes: blocks of two query rows
def test_masks_causal_scale_and_grouped_query_heads_match_the_eager_path(tmp_path, block_bytes):
    torch.manual_seed(1)
    model = TinyDecoder().eval()
    ids = torch.randint(0, 30, (2, 7))
    padding = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    path = tmp_path / "decoder.attn.zarr"
    with sdpa.capture(model, path, site_names={"attention": "decoder/self"}, block_bytes=block_bytes), torch.no_grad():
        model(ids, padding)
    expected = _eager_weights(model, list(model.layers), ids, padding)
    assert_valid(path)
    site = attnformat.open(path)["decoder/self"]
    assert dict(site["weights"].sizes) == {"sample": 2, "layer": 3, "head": 4, "query": 7, "key": 7}
    assert site.attrs["causal"] == 1
    for layer in range(3):
        np.testing.assert_allclose(site["weights"].sel(layer=layer).values, expected[layer], rtol=1e-5, atol=1e-6)
    # layer 0 (is_causal, no mask) gives no masks; the first masked call (layer 0 describes the site) has none either
    assert "key_mask" not in site


def test_padding_mask_becomes_key_and_query_masks(tmp_path):
    torch.manual_seed(2)
    model = TinyDecoder()
    model.layers = model.layers[1:]  # the first call now carries the padding mask
    model.eval()
    ids = torch.randint(0, 30, (2, 6))
    padding = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    path = tmp_path / "padded.attn.zarr"
    with sdpa.capture(model, path, site_names={"attention": "decoder/self"}), torch.no_grad():
        model(ids, padding)
    assert_valid(path)
    site = attnformat.open(path)["decoder/self"]
    np.testing.assert_array_equal(site["key_mask"].values, padding.numpy())
    np.testing.assert_array_equal(site["query_mask"].values, padding.numpy())
    expected = _eager_weights(model, list(model.layers), ids, padding)
    np.testing.assert_allclose(site["weights"].sel(layer=1).values, expected[1], rtol=1e-5, atol=1e-6)


def test_hugging_face_vit_on_sdpa_matches_its_eager_output_attentions(tmp_path):
    torch.manual_seed(3)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, attn_implementation="sdpa")
    model = ViTModel(config).eval()
    pixels = torch.rand(1, 3, 16, 16)
    modules = sdpa.find_attention_modules(model, pixel_values=pixels)
    assert list(modules) == [path for path, module in model.named_modules() if type(module).__name__ == "ViTAttention"]
    assert len(modules) == 2
    path = tmp_path / "hf-vit.attn.zarr"
    with sdpa.capture(model, path, modules=modules, site_names=lambda module_path: "encoder/self"), torch.no_grad():
        model(pixel_values=pixels)
    assert model.config._attn_implementation == "sdpa"  # the capture never switched the kernel
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = model(pixel_values=pixels, output_attentions=True).attentions
    assert_valid(path)
    site = attnformat.open(path)["encoder/self"]
    for layer in range(2):
        np.testing.assert_allclose(site["weights"].sel(layer=layer).values, expected[layer].numpy(), rtol=1e-5, atol=1e-6)


def test_hugging_face_gpt2_on_sdpa_with_padding_matches_eager(tmp_path):
    torch.manual_seed(4)
    model = GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32, attn_implementation="sdpa")).eval()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    path = tmp_path / "gpt2.attn.zarr"
    with sdpa.capture(model, path, modules=[GPT2Attention], site_names={"attn": "decoder/self"}), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert_valid(path)
    site = attnformat.open(path)["decoder/self"]
    assert site.attrs["causal"] == 1
    np.testing.assert_array_equal(site["key_mask"].values, mask.bool().numpy())
    for layer in range(2):
        np.testing.assert_allclose(site["weights"].sel(layer=layer).values, expected[layer].numpy(), rtol=1e-5, atol=1e-6)


def test_unbatched_3d_calls_store_the_weights_sdpa_applied_to_value(tmp_path):
    class Unbatched(nn.Module):
        """SDPA on (head, L, E) tensors: one sample, no batch axis."""

        def forward(self, q, k, v):
            self.output = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.output

    torch.manual_seed(5)
    model = Unbatched()
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    path = tmp_path / "unbatched.attn.zarr"
    with sdpa.capture(model, path):
        model(q, k, v)
    assert_valid(path)
    weights = attnformat.open(path)["attention"]["weights"].sel(layer=0).values
    assert weights.shape == (1, 3, 4, 4)  # one sample of three heads
    # the kernel's own output is these weights applied to value
    np.testing.assert_allclose(weights[0] @ v.numpy(), model.output.numpy(), rtol=1e-5, atol=1e-6)
    expected = torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(torch.ones(4, 4, dtype=torch.bool).tril().logical_not(), float("-inf")), -1)
    np.testing.assert_allclose(weights[0], expected.numpy(), rtol=1e-6, atol=1e-7)


def test_cross_attention_module_is_a_cross_site(tmp_path):
    class Cross(nn.Module):
        def forward(self, queries, keys):
            return F.scaled_dot_product_attention(queries, keys, keys)

    model = Cross()
    queries, keys = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    path = tmp_path / "cross.attn.zarr"
    with sdpa.capture(model, path, site_names={"attention": "decoder/cross"}, tokens={"decoder/cross": {"key_labels": list("abcde")}}):
        model(queries, keys)
    assert_valid(path)
    site = attnformat.open(path)["decoder/cross"]
    assert site.attrs["attention_type"] == "cross" and site["key_label"].values.tolist() == list("abcde")
    expected = torch.softmax(queries @ keys.transpose(-2, -1) / 2.0, -1)
    np.testing.assert_allclose(site["weights"].sel(layer=0).values, expected.numpy(), rtol=1e-6, atol=1e-7)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(UnsupportedModelError, match="modules="):
        sdpa.capture(nn.Linear(2, 2), tmp_path / "none.attn.zarr")
    with pytest.raises(UnsupportedModelError, match="no module at path"):
        sdpa.capture(nn.Linear(2, 2), tmp_path / "none.attn.zarr", modules=["missing"])
    model = TinyViT(depth=1).eval()
    with pytest.raises(CaptureStateError, match="ran twice"):
        with sdpa.capture(model, tmp_path / "twice.attn.zarr"), torch.no_grad():
            model(torch.rand(1, 3, 16, 16))
            model(torch.rand(1, 3, 16, 16))
    assert not attnformat.is_complete(attnformat.open(tmp_path / "twice.attn.zarr"))
    assert F.scaled_dot_product_attention(*torch.randn(3, 1, 1, 2, 2)).shape == (1, 1, 2, 2)  # nothing left intercepting


def test_calls_outside_the_captured_modules_are_counted_in_a_warning(tmp_path):
    model = TinyViT(depth=1).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sdpa.capture(model, tmp_path / "outside.attn.zarr"), torch.no_grad():
            model(torch.rand(1, 3, 16, 16))
            F.scaled_dot_product_attention(*torch.randn(3, 1, 1, 2, 2))
    assert any("1 scaled_dot_product_attention call(s) ran outside" in str(w.message) for w in caught)


def test_keep_top_k_and_statistics_match_the_reference_reductions_of_eager_weights(tmp_path):
    from attnformat.adapters.keep import Keep
    from attnformat.reductions import row_statistics, top_k

    torch.manual_seed(6)
    model = TinyViT().eval()
    images = torch.rand(1, 3, 16, 16)
    path = tmp_path / "kept.attn.zarr"
    keep = Keep(dense=False, top_k=3, statistics=["entropy", "max_weight", "top_key"])
    with sdpa.capture(model, path, site_names={"attn": "encoder/self"}, keep=keep), torch.no_grad():
        model(images)
    expected = _eager_weights(model, [block.attn for block in model.blocks], images)
    assert_valid(path)
    tree = attnformat.open(path)
    assert attnformat.site_paths(tree) == ["encoder/self_stats", "encoder/self_topk"]
    topk, stats = tree["encoder/self_topk"], tree["encoder/self_stats"]
    assert topk.attrs["describes"] == "encoder/self" and topk.attrs["top_k"] == 3 and topk.attrs["key_count"] == 17
    for layer in range(2):
        kept, key_index, omitted = top_k(expected[layer], 3)
        np.testing.assert_allclose(topk["weights"].sel(layer=layer).values, kept, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(topk["key_index"].sel(layer=layer).values, key_index)
        np.testing.assert_allclose(topk["omitted_weight"].sel(layer=layer).values, omitted, rtol=1e-5, atol=1e-6)
        reference = row_statistics(expected[layer])
        np.testing.assert_allclose(stats["entropy"].sel(layer=layer).values, reference["entropy"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["max_weight"].sel(layer=layer).values, reference["max_weight"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(stats["top_key"].sel(layer=layer).values, reference["top_key"])
