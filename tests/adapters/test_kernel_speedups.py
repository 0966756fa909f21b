"""The capture's fast paths: ``kernel="replace"`` (the tap returns the attention output itself) and reused buffers.

With ``kernel="replace"`` the tap computes ``softmax(QK^T) V`` from the blocks it reduces instead
of letting the model's SDPA kernel run: the model's outputs must equal the default mode's (to
float32 rounding) and the captured values must still equal eager ``output_attentions``. Calls it
cannot stand in for (dropout, gradients, layers the keep writes nothing of) run the kernel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapter_checks import assert_valid
from test_kernel_capture import SMALL_BLOCKS, TOP_K, WINDOW, _main_output, build, eager_weights
from transformers import GPT2Config, GPT2Model

import attnformat
from attnformat import reductions
from attnformat.adapters import huggingface as hf
from attnformat.adapters.keep import Keep
from attnformat.adapters.kernel import AttentionCall, CallWriter, KernelTap
from attnformat.adapters.reductions import reduce_call

REPLACED = ["gpt2", "llama", "mistral", "bert"]


def _inputs_for(name, inputs):
    if name == "gpt2":  # right padding: every query row sees a key (left-padded rows see none: SDPA and eager differ there)
        mask = torch.ones_like(inputs["attention_mask"])
        mask[1, 8:] = 0
        return {**inputs, "attention_mask": mask}
    return inputs


def _hidden(output):
    return output.hidden_states[-1] if getattr(output, "hidden_states", None) is not None else output.last_hidden_state


@pytest.mark.parametrize("keep", [Keep(top_k=TOP_K, statistics=True, head_mean=True, local_window=WINDOW),
                                  Keep(dense=False, statistics=["entropy", "top_key"]), Keep(dense=False, top_k=TOP_K)],
                         ids=["dense-topk-stats-mean", "stats-no-topk", "topk-only"])
@pytest.mark.parametrize("name", REPLACED)
def test_replace_gives_the_same_outputs_and_the_same_captured_values(tmp_path, name, keep):
    model, inputs = build(name)
    inputs = _inputs_for(name, inputs)
    paths = {mode: tmp_path / f"{name}-{mode}.attn.zarr" for mode in ("keep", "replace")}
    outputs, sessions = {}, {}
    for mode, path in paths.items():
        with hf.capture(model, path, keep=keep, block_bytes=SMALL_BLOCKS, kernel=mode) as session, torch.no_grad():
            outputs[mode] = model(**inputs, output_hidden_states=True)
        sessions[mode] = session
    assert sessions["replace"].tap.fallbacks == {}  # every call was replaced
    for mode in ("keep", "replace"):
        assert sessions[mode].tap.replace is (mode == "replace")
    torch.testing.assert_close(_hidden(outputs["replace"]), _hidden(outputs["keep"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_main_output(outputs["replace"]), _main_output(outputs["keep"]), rtol=1e-5, atol=1e-5)
    # The captured values still equal the model's eager output_attentions.
    expected = eager_weights(model, inputs)
    assert_valid(paths["replace"])
    tree = attnformat.open(paths["replace"])
    for module_path, (site, layer) in sessions["replace"].sites.items():
        reference = expected[module_path]
        real_rows = reference.max(-1) > reference.min(-1)
        where = f"{name} {site} layer {layer}"
        if keep.dense:
            np.testing.assert_allclose(tree[site]["weights"].sel(layer=layer).values, reference, rtol=1e-5, atol=1e-5, err_msg=where)
            np.testing.assert_allclose(tree[f"{site}_mean"]["weights"].sel(layer=layer).values, reference.mean(1), rtol=1e-5, atol=1e-5)
        if keep.top_k:
            kept, key_index, omitted = reductions.top_k(reference, TOP_K, key_mask=reference > 0)
            topk = tree[f"{site}_topk"]
            np.testing.assert_allclose(topk["weights"].sel(layer=layer).values, kept, rtol=1e-5, atol=1e-5, err_msg=where)
            np.testing.assert_allclose(topk["omitted_weight"].sel(layer=layer).values, omitted, rtol=1e-5, atol=1e-5, err_msg=where)
            np.testing.assert_array_equal(topk["key_index"].sel(layer=layer).values[real_rows], key_index[real_rows], err_msg=where)
        if keep.statistic_names:
            statistics = reductions.row_statistics(reference, local_window=WINDOW, key_mask=reference > 0)
            for statistic in keep.statistic_names:
                got = tree[f"{site}_stats"][statistic].sel(layer=layer).values
                if statistic == "top_key":
                    np.testing.assert_array_equal(got[real_rows], statistics[statistic][real_rows], err_msg=f"{where} {statistic}")
                elif statistic != "sink_weight":  # the reference's sink is its first nonzero key, the capture's the mask's
                    np.testing.assert_allclose(got[real_rows], statistics[statistic][real_rows], rtol=1e-5, atol=1e-5,
                                               err_msg=f"{where} {statistic}")
    # Both modes wrote the same values.
    other = attnformat.open(paths["keep"])
    for site in tree:
        for variable in tree[site].data_vars:
            np.testing.assert_allclose(tree[site][variable].values, other[site][variable].values, rtol=1e-6, atol=1e-7,
                                       err_msg=f"{site}/{variable}")


def test_replace_leaves_layers_without_output_to_the_kernel(tmp_path):
    model, inputs = build("llama")
    with torch.no_grad():
        plain = _main_output(model(**inputs))
    # Dense layer 1 only: layer 0 is neither dense nor reduced, so the writer computes nothing there.
    with hf.capture(model, tmp_path / "one.attn.zarr", keep=Keep(layers=[1]), kernel="replace") as session, torch.no_grad():
        replaced = _main_output(model(**inputs))
    assert session.tap.fallbacks == {"the handler did not compute the output": 1}
    torch.testing.assert_close(replaced, plain, rtol=1e-5, atol=1e-5)


def test_replace_falls_back_to_the_kernel_with_dropout_and_gradients(tmp_path):
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, attn_pdrop=0.0, attn_implementation="sdpa"))
    ids = torch.tensor([[1, 2, 3, 4]])
    model.train()  # dropout probability 0, but training mode: the tap does not stand in
    with pytest.warns(UserWarning, match="training mode"):
        with hf.capture(model, tmp_path / "train.attn.zarr", keep=Keep(dense=False, top_k=2), kernel="replace") as session:
            output = model(ids).last_hidden_state
    assert session.tap.fallbacks == {"dropout": 1}
    model.eval()
    with hf.capture(model, tmp_path / "grad.attn.zarr", keep=Keep(dense=False, top_k=2), kernel="replace") as session:
        output = model(ids).last_hidden_state  # gradients wanted: the kernel runs (the tap computes without them)
    assert session.tap.fallbacks == {"gradients": 1}
    output.sum().backward()
    assert model.h[0].attn.c_attn.weight.grad is not None


def test_kernel_option_is_checked():
    model, _ = build("gpt2")
    with pytest.raises(attnformat.AttnFormatError, match="kernel must be"):
        hf.capture(model, "x.attn.zarr", kernel="fast")


def test_add_output_equals_sdpa_with_grouped_heads_window_and_mask():
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 5)
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False
    mask[1, :, :2, 0] = True  # rows 0-1 of sample 1 keep key 0
    repeated_key, repeated_value = key.repeat_interleave(2, 1), value.repeat_interleave(2, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(query, repeated_key, repeated_value, attn_mask=mask).transpose(1, 2)
    for budget in (1, None):
        call = AttentionCall.from_tensors(query, key, attn_mask=mask, block_bytes=budget)
        call.value = value
        reduce_call(call, Keep(dense=False, statistics=["entropy"]), dense=False)
        torch.testing.assert_close(call.output(), expected, rtol=1e-5, atol=1e-6)
    window = AttentionCall.from_tensors(query, key, is_causal=True, sliding_window=3, block_bytes=1)
    window.value = value
    reduce_call(window, Keep(), dense=True)
    band = torch.ones(7, 7, dtype=torch.bool).tril() & ~torch.ones(7, 7, dtype=torch.bool).tril(-3)
    expected = torch.nn.functional.scaled_dot_product_attention(query, repeated_key, repeated_value, attn_mask=band).transpose(1, 2)
    torch.testing.assert_close(window.output(), expected, rtol=1e-5, atol=1e-6)


def test_tap_without_replace_never_asks_for_the_output():
    model, inputs = build("gpt2")
    seen = []
    with KernelTap(model, {"transformer.h.0.attn": ("decoder/self", 0)}, lambda call: seen.append(call.wants_output)), torch.no_grad():
        model(**inputs)
    assert seen == [False]


def test_dense_buffer_is_reused_and_fully_rewritten(tmp_path):
    """A reused dense buffer holds the previous layer's weights: the next layer must overwrite every cell."""
    from attnformat.adapters import Recorder

    torch.manual_seed(0)
    path = tmp_path / "reuse.attn.zarr"
    calls = []
    with Recorder(path) as recorder:
        writer = CallWriter(recorder, {"self": Keep()}, layer_counts={"self": 2}, block_bytes=64)
        for layer, causal in ((0, False), (1, True)):  # a full layer, then a causal one (keys past each row must be 0)
            call = AttentionCall.from_tensors(torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), is_causal=causal, site="self", layer=layer,
                                              block_bytes=64)
            calls.append(call)
            writer.write(call)
        assert writer._dense_buffer is not None
    site = attnformat.open(path)["self"]
    for layer, call in enumerate(calls):
        np.testing.assert_allclose(site["weights"].sel(layer=layer).values, call.weights(slice(None)).numpy(), rtol=1e-6, atol=1e-7)
    assert float(np.abs(np.triu(site["weights"].sel(layer=1).values[0, 0], 1)).max()) == 0.0


def test_replace_during_generate_leaves_every_call_to_the_kernel(tmp_path):
    """generate() hands calls to the generation adapter (which computes no output): each runs the kernel, tokens unchanged."""
    from generation_fixtures import byte_level_bpe
    from test_generation import _gpt2, _left_padded

    tokenizer = byte_level_bpe()
    model = _gpt2(tokenizer)
    prompts = _left_padded(tokenizer)
    settings = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": None}
    plain = model.generate(**prompts, **settings)
    with hf.capture(model, tmp_path / "generate.attn.zarr", tokenizer=tokenizer, keep=Keep(dense=False, top_k=2),
                    kernel="replace") as session:
        sequences = model.generate(**prompts, **settings)
    assert torch.equal(sequences, plain)
    assert set(session.tap.fallbacks) == {"the handler did not compute the output"}


def test_replace_with_left_padding_keeps_the_real_positions_exact(tmp_path):
    """Left padding leaves query rows that see no key. What the model's kernel puts there is its own
    business, but no real position may change: their outputs equal the kernel's and their captured
    weights equal eager output_attentions."""
    model, inputs = build("gpt2")  # sample 1 is left-padded by 3 tokens
    real = inputs["attention_mask"].bool()
    keep = Keep(top_k=TOP_K, statistics=True)
    outputs, paths = {}, {}
    for mode in ("keep", "replace"):
        paths[mode] = tmp_path / f"{mode}.attn.zarr"
        with hf.capture(model, paths[mode], keep=keep, block_bytes=SMALL_BLOCKS, kernel=mode) as session, torch.no_grad():
            outputs[mode] = model(**inputs, output_hidden_states=True)
        if mode == "replace":
            assert session.tap.fallbacks == {}
    for keep_state, replace_state in zip(outputs["keep"].hidden_states, outputs["replace"].hidden_states):
        torch.testing.assert_close(replace_state[real], keep_state[real], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(replace_state).all()
    expected = eager_weights(model, inputs)
    tree = attnformat.open(paths["replace"])
    for module_path, (site, layer) in session.sites.items():
        reference = expected[module_path]
        rows = real.numpy()[:, None, :].repeat(reference.shape[1], 1)  # (batch, heads, query)
        np.testing.assert_allclose(tree[site]["weights"].sel(layer=layer).values[rows], reference[rows], rtol=1e-5, atol=1e-5)
        kept, key_index, _ = reductions.top_k(reference, TOP_K, key_mask=reference > 0)
        np.testing.assert_array_equal(tree[f"{site}_topk"]["key_index"].sel(layer=layer).values[rows], key_index[rows])
