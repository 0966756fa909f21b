"""The PyTorch adapter: every nn.MultiheadAttention, per head, against PyTorch's own need_weights=True weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapter_checks import assert_valid, read
from torch import nn

import attnformat
from attnformat.adapters import UnsupportedModelError
from attnformat.adapters import torch as torch_adapter

D_MODEL, HEADS = 16, 4


def _record_attention_inputs(model):
    """Test-side ground truth: remember each MultiheadAttention call's inputs, then ask PyTorch for its weights."""
    calls = {}
    handles = [module.register_forward_pre_hook(lambda m, a, k, name=name: calls.setdefault(name, (m, a, k)) and None, with_kwargs=True)
               for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)]
    return calls, handles


def _reference_weights(calls):
    weights = {}
    with torch.no_grad():
        for name, (module, args, kwargs) in calls.items():
            kwargs = {**kwargs, "need_weights": True, "average_attn_weights": False}
            weights[name] = module(*args, **kwargs)[1].numpy()
    return weights


def _ground_truth(model, run):
    calls, handles = _record_attention_inputs(model)
    try:
        with torch.no_grad():
            output = run()
    finally:
        for handle in handles:
            handle.remove()
    return output, _reference_weights(calls)


def _hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture()
def encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, dim_feedforward=32, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=3)


def test_transformer_encoder_per_head_weights_with_padding(tmp_path, encoder):
    encoder.eval()
    x = torch.randn(2, 7, D_MODEL)
    padding = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])
    torch.backends.mha.set_fastpath_enabled(False)  # ground truth from the standard path, which calls the modules
    try:
        _, expected = _ground_truth(encoder, lambda: encoder(x, src_key_padding_mask=padding))
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    path = tmp_path / "encoder.attn.zarr"
    with torch.no_grad(), torch_adapter.capture(encoder, path, site_names={"self_attn": "encoder/self"}):
        encoder(x, src_key_padding_mask=padding)  # inference with padding: the fused fast path on nested tensors runs
    assert_valid(path)
    site = attnformat.open(path)["encoder/self"]
    assert site["weights"].dims == ("sample", "layer", "head", "query", "key")
    assert site.attrs["attention_type"] == "self" and site.attrs["causal"] == 0
    real = ~padding.numpy()
    for layer in range(3):
        stored = site["weights"].sel(layer=layer).values
        reference = expected[f"layers.{layer}.self_attn"]
        for sample in range(2):  # padding queries hold whatever the path left there; real queries must match
            np.testing.assert_allclose(stored[sample][:, real[sample]], reference[sample][:, real[sample]], rtol=0, atol=2e-6)
    np.testing.assert_array_equal(site["key_mask"].values, ~padding.numpy())


def test_outputs_are_bit_identical_with_and_without_capture(tmp_path, encoder):
    x = torch.randn(2, 7, D_MODEL)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    encoder.train()  # dropout active: same seed, same draws, so outputs must match to the bit
    torch.manual_seed(1)
    plain = encoder(x, mask=causal, is_causal=True)
    torch.manual_seed(1)
    with torch_adapter.capture(encoder, tmp_path / "train.attn.zarr"):
        captured = encoder(x, mask=causal, is_causal=True)
    assert torch.equal(plain, captured)
    captured.sum().backward()  # the graph is intact
    assert attnformat.open(tmp_path / "train.attn.zarr")["self_attn"].attrs["causal"] == 1
    encoder.eval()
    padding = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    with torch.no_grad():
        fast = encoder(x, src_key_padding_mask=padding)  # the fused fast path (nested tensors)
        with torch_adapter.capture(encoder, tmp_path / "eval.attn.zarr"):
            captured = encoder(x, src_key_padding_mask=padding)
    assert torch.equal(fast, captured)
    weights = attnformat.open(tmp_path / "eval.attn.zarr")["self_attn"]["weights"].values
    assert np.isfinite(weights).all() and weights.shape == (2, 3, HEADS, 7, 7)


def test_transformer_decoder_self_and_cross_attention(tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(D_MODEL, HEADS, dim_feedforward=32, batch_first=True)
    decoder = nn.TransformerDecoder(layer, num_layers=2).eval()
    target, memory = torch.randn(2, 5, D_MODEL), torch.randn(2, 6, D_MODEL)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    plain, expected = _ground_truth(decoder, lambda: decoder(target, memory, tgt_mask=causal))
    path = tmp_path / "decoder.attn.zarr"
    with torch.no_grad(), torch_adapter.capture(decoder, path) as capture:
        captured = decoder(target, memory, tgt_mask=causal)
    assert torch.equal(plain, captured)
    assert capture.sites["layers.1.multihead_attn"] == ("multihead_attn", 1)
    assert_valid(path)
    tree = attnformat.open(path)
    assert tree["self_attn"].attrs["causal"] == 1 and tree["self_attn"].attrs["attention_type"] == "self"
    assert tree["multihead_attn"].attrs["attention_type"] == "cross"
    assert dict(tree["multihead_attn"]["weights"].sizes) == {"sample": 2, "layer": 2, "head": HEADS, "query": 5, "key": 6}
    for layer in range(2):
        np.testing.assert_allclose(read(path, "self_attn", layer=layer), expected[f"layers.{layer}.self_attn"], atol=1e-7)
        np.testing.assert_allclose(read(path, "multihead_attn", layer=layer), expected[f"layers.{layer}.multihead_attn"], atol=1e-7)


def test_nn_transformer_unbatched(tmp_path):
    torch.manual_seed(0)
    model = nn.Transformer(D_MODEL, HEADS, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32).eval()
    source, target = torch.randn(6, D_MODEL), torch.randn(4, D_MODEL)
    plain, expected = _ground_truth(model, lambda: model(source, target))
    path = tmp_path / "transformer.attn.zarr"
    names = {"decoder/multihead_attn": "decoder/cross"}
    with torch.no_grad(), torch_adapter.capture(model, path, site_names=names):
        captured = model(source, target)
    assert torch.equal(plain, captured)
    assert_valid(path)
    tree = attnformat.open(path)
    assert attnformat.site_paths(tree) == ["decoder/cross", "decoder/self_attn", "encoder/self_attn"]
    assert tree["decoder/cross"].attrs["key_site"] == "encoder/self_attn"
    np.testing.assert_allclose(read(path, "decoder/cross", layer=1, sample=0), expected["decoder.layers.1.multihead_attn"], atol=1e-7)
    np.testing.assert_allclose(read(path, "encoder/self_attn", layer=0, sample=0), expected["encoder.layers.0.self_attn"], atol=1e-7)


class _Block(nn.Module):
    def __init__(self, cross: bool):
        super().__init__()
        self.self_attention = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True) if cross else None
        self.mlp = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x, memory=None, causal_mask=None):
        x = x + self.self_attention(x, x, x, attn_mask=causal_mask, need_weights=False)[0]
        if self.cross_attention is not None:
            x = x + self.cross_attention(x, memory, memory)[0]
        return x + self.mlp(x)


class MultimodalSeq2Seq(nn.Module):
    """Seed 001's shape: encoder and decoder over dicts of token groups (modalities)."""

    def __init__(self, layers=2):
        super().__init__()
        self.encoder = nn.ModuleList(_Block(cross=False) for _ in range(layers))
        self.decoder = nn.ModuleList(_Block(cross=True) for _ in range(layers))

    def forward(self, enc: dict, dec: dict):
        x = torch.cat(list(enc.values()), dim=1)
        for block in self.encoder:
            x = block(x)
        y = torch.cat(list(dec.values()), dim=1)
        causal = nn.Transformer.generate_square_subsequent_mask(y.shape[1])
        for block in self.decoder:
            y = block(y, x, causal)
        return y


def test_custom_multimodal_encoder_decoder_with_token_groups(tmp_path):
    torch.manual_seed(0)
    model = MultimodalSeq2Seq().eval()
    enc = {"text": torch.randn(2, 4, D_MODEL), "robot0_eef_pos": torch.randn(2, 1, D_MODEL), "agentview_image": torch.randn(2, 3, D_MODEL)}
    dec = {"text": torch.randn(2, 2, D_MODEL), "robot0_eef_pos_past_traj": torch.randn(2, 3, D_MODEL)}
    enc_groups = [name for name, part in enc.items() for _ in range(part.shape[1])]
    dec_groups = [name for name, part in dec.items() for _ in range(part.shape[1])]
    plain, expected = _ground_truth(model, lambda: model(enc, dec))
    path = tmp_path / "seq2seq.attn.zarr"
    names = {"encoder/self_attention": "encoder/self", "decoder/self_attention": "decoder/self", "decoder/cross_attention": "decoder/cross"}
    tokens = {"encoder/self": {"groups": enc_groups}, "decoder/self": {"groups": dec_groups}}
    with torch.no_grad(), torch_adapter.capture(model, path, site_names=names, tokens=tokens):
        captured = model(enc, dec)
    assert torch.equal(plain, captured)
    assert_valid(path)
    tree = attnformat.open(path)
    cross = tree["decoder/cross"]
    assert cross.attrs["attention_type"] == "cross" and cross.attrs["key_site"] == "encoder/self"
    assert cross["query_group"].values.tolist() == dec_groups and cross["key_group"].values.tolist() == enc_groups
    assert tree["decoder/self"].attrs["causal"] == 1 and tree["encoder/self"].attrs["causal"] == 0
    for layer in range(2):
        np.testing.assert_allclose(read(path, "encoder/self", layer=layer), expected[f"encoder.{layer}.self_attention"], atol=1e-7)
        np.testing.assert_allclose(read(path, "decoder/self", layer=layer), expected[f"decoder.{layer}.self_attention"], atol=1e-7)
        np.testing.assert_allclose(read(path, "decoder/cross", layer=layer), expected[f"decoder.{layer}.cross_attention"], atol=1e-7)


def test_hooks_removed_after_the_block_and_after_an_exception(tmp_path, encoder):
    before = _hook_counts(encoder)
    x = torch.randn(1, 3, D_MODEL)
    with torch_adapter.capture(encoder, tmp_path / "ok.attn.zarr"):
        assert _hook_counts(encoder) > before
        encoder(x)
    assert _hook_counts(encoder) == before
    path = tmp_path / "crash.attn.zarr"
    with pytest.raises(KeyboardInterrupt):
        with torch_adapter.capture(encoder, path):
            encoder.layers[2].register_forward_pre_hook(_interrupt)
            encoder(x)
    assert _hook_counts(encoder) == before + 1  # only the test's own interrupting hook is left
    assert torch.backends.mha.get_fastpath_enabled()
    tree = attnformat.open(path)  # readable, marked incomplete, layers 0-1 written, layer 2 NaN
    assert tree.attrs["completeness"] == "incomplete"
    weights = tree["self_attn"]["weights"]
    assert np.isfinite(weights.sel(layer=1).values).all() and np.isnan(weights.sel(layer=2).values).all()


def _interrupt(module, args):
    raise KeyboardInterrupt


def test_a_module_called_twice_is_a_clear_error(tmp_path):
    attention = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
    x = torch.randn(1, 3, D_MODEL)
    with pytest.raises(attnformat.AttnFormatError, match=r"attention \[layer=0\].*ran twice"):
        with torch_adapter.capture(attention, tmp_path / "twice.attn.zarr"):
            attention(x, x, x)
            attention(x, x, x)


def test_unsupported_model_points_to_the_recorder(tmp_path):
    with pytest.raises(UnsupportedModelError, match="nn.MultiheadAttention.*Recorder"):
        torch_adapter.capture(nn.Linear(2, 2), tmp_path / "x.attn.zarr")


def test_weights_the_caller_asked_for_are_stored_as_returned(tmp_path):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True).eval()
    query, memory = torch.randn(2, 3, D_MODEL), torch.randn(2, 5, D_MODEL)
    path = tmp_path / "returned.attn.zarr"
    with torch.no_grad(), torch_adapter.capture(attention, path):
        output, weights = attention(query, memory, memory, average_attn_weights=False)
    assert weights.shape == (2, HEADS, 3, 5)
    np.testing.assert_array_equal(read(path, "attention", layer=0), weights.numpy())
    assert attnformat.open(path)["attention"].attrs["attention_type"] == "cross"


def test_encoder_layer_fast_path_without_padding(tmp_path, encoder):
    encoder.eval()
    x = torch.randn(2, 5, D_MODEL)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _, expected = _ground_truth(encoder, lambda: encoder(x))
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    with torch.no_grad():
        fast = encoder(x)  # eval, no grad, batch_first: every layer runs the fused kernel
        with torch_adapter.capture(encoder, tmp_path / "fast.attn.zarr"):
            captured = encoder(x)
    assert torch.equal(fast, captured)
    for layer in range(3):  # weights recomputed from each layer's real (fast-path) input: equal up to the kernels' rounding
        np.testing.assert_allclose(read(tmp_path / "fast.attn.zarr", "self_attn", layer=layer), expected[f"layers.{layer}.self_attn"], atol=2e-6)
