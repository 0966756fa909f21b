"""The kernel tap against each model's own eager output_attentions, value by value.

Every model runs on SDPA (Gemma-2, which has no SDPA path with logit softcapping, on eager)
while the capture recomputes weights from the query and key each attention call receives; the
reference is the same model switched to eager attention, with ``output_attentions=True``, and
the top-k and statistics sites are compared with the numpy reductions of those eager weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapter_checks import assert_valid
from transformers import (BartConfig, BartForConditionalGeneration, BertConfig, BertModel, CLIPConfig, CLIPModel, Gemma2Config,
                          Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, T5Config, T5ForConditionalGeneration, ViTConfig, ViTModel, WhisperConfig,
                          WhisperForConditionalGeneration)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import attnformat
from attnformat import reductions
from attnformat.adapters import CaptureStateError, UnsupportedModelError
from attnformat.adapters import huggingface as hf
from attnformat.adapters.keep import Keep

VOCAB = 100
TOP_K = 3
WINDOW = 2
# A block budget of a few rows, so every call is recomputed in several blocks.
SMALL_BLOCKS = 2 * 4 * 3 * 12 * 4


def _inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 10), generator=generator)
    right_padded = torch.ones(2, 10, dtype=torch.long)
    right_padded[1, 7:] = 0
    left_padded = torch.ones(2, 10, dtype=torch.long)
    left_padded[1, :3] = 0
    return ids, right_padded, left_padded


def build(name):
    """A random tiny model of each family, on SDPA where it has it, and its inputs."""
    torch.manual_seed(0)
    ids, right_padded, left_padded = _inputs()
    if name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, attn_implementation="sdpa"))
        inputs = {"input_ids": ids, "attention_mask": left_padded}
    elif name == "llama":  # grouped-query attention (4 query heads, 2 key heads) with rotary embeddings
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, attn_implementation="sdpa"))
        inputs = {"input_ids": ids}
    elif name == "mistral":  # a sliding window (4) shorter than the sequence (10)
        model = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, sliding_window=4, attn_implementation="sdpa"))
        inputs = {"input_ids": ids}
    elif name == "gemma2":  # logit softcapping; layer 0 sliding (window 4), layer 1 global
        model = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, head_dim=8, sliding_window=4, attn_logit_softcapping=0.5,
                                               attn_implementation="eager"))
        inputs = {"input_ids": ids}
    elif name == "bert":  # a padded batch
        model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                     attn_implementation="sdpa"))
        inputs = {"input_ids": ids, "attention_mask": right_padded}
    elif name == "t5":  # relative position bias added inside the attention call
        model = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
                                                    pad_token_id=0, decoder_start_token_id=0, attn_implementation="sdpa"))
        inputs = {"input_ids": ids, "attention_mask": right_padded, "decoder_input_ids": ids[:, :6], "decoder_attention_mask": right_padded[:, :6]}
    elif name == "bart":
        model = BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                                                        pad_token_id=0, attn_implementation="sdpa"))
        decoder_mask = torch.ones(2, 6, dtype=torch.long)
        decoder_mask[1, 4:] = 0
        inputs = {"input_ids": ids, "attention_mask": right_padded, "decoder_input_ids": ids[:, :6], "decoder_attention_mask": decoder_mask}
    elif name == "vit":
        model = ViTModel(ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32, attn_implementation="sdpa"))
        inputs = {"pixel_values": torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))}
    elif name == "whisper":
        model = WhisperForConditionalGeneration(WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=2,
                                                              encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                                              decoder_ffn_dim=32, max_source_positions=8, max_target_positions=32, pad_token_id=0,
                                                              decoder_start_token_id=1, attn_implementation="sdpa"))
        inputs = {"input_features": torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(3)), "decoder_input_ids": ids[:, :5]}
    elif name == "clip":
        config = CLIPConfig(text_config={"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                         "num_attention_heads": 2, "max_position_embeddings": 32},
                            vision_config={"image_size": 16, "patch_size": 4, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                           "num_attention_heads": 2}, attn_implementation="sdpa")
        model = CLIPModel(config)
        inputs = {"input_ids": ids, "attention_mask": right_padded, "pixel_values": torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))}
    return model.eval(), inputs


MODELS = ["gpt2", "llama", "mistral", "gemma2", "bert", "t5", "bart", "vit", "whisper", "clip"]
SITES = {
    "gpt2": {"decoder/self"}, "llama": {"decoder/self"}, "mistral": {"decoder/self"}, "gemma2": {"decoder/self"},
    "bert": {"encoder/self"}, "vit": {"encoder/self"}, "clip": {"text/self", "vision/self"},
    "t5": {"encoder/self", "decoder/self", "decoder/cross"}, "bart": {"encoder/self", "decoder/self", "decoder/cross"},
    "whisper": {"encoder/self", "decoder/self", "decoder/cross"},
}


def eager_weights(model, inputs) -> dict[str, np.ndarray]:
    """{module path: weights} from the model's own eager attention with output_attentions=True."""
    modules = hf.find_attention_modules(model)
    named = dict(model.named_modules())
    found = {}
    handles = [named[path].register_forward_hook(lambda module, args, output, path=path: found.__setitem__(path, output[modules[path][1]]))
               for path in modules]
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation(implementation)
        for handle in handles:
            handle.remove()
    return {path: weights.numpy().astype(np.float64) for path, weights in found.items()}


def _main_output(output):
    for name in ("logits", "logits_per_image", "last_hidden_state"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise AssertionError(f"no main output in {type(output).__name__}")


def _padding(model_name, site, inputs, batch, keys):
    """The site's key padding mask (batch, keys): True = a real key."""
    mask = inputs.get("attention_mask")
    if mask is None or site in ("vision/self",) or model_name in ("whisper",) and site != "decoder/self":
        return np.ones((batch, keys), bool)
    if site in ("decoder/self",) and "decoder_attention_mask" in inputs:
        return inputs["decoder_attention_mask"].bool().numpy()
    if site == "decoder/self" and model_name in ("whisper",):
        return np.ones((batch, keys), bool)
    return mask.bool().numpy()[:, :keys]


@pytest.mark.parametrize("name", MODELS)
def test_tap_equals_eager_output_attentions_dense_topk_statistics_and_head_mean(tmp_path, name, reduction_path):
    model, inputs = build(name)
    implementation = model.config._attn_implementation
    with torch.no_grad():
        plain = _main_output(model(**inputs)).clone()
    keep = Keep(top_k=TOP_K, statistics=True, head_mean=True, local_window=WINDOW)
    path = tmp_path / f"{name}.attn.zarr"
    # Left padding leaves whole query rows masked (eager spreads them uniformly): the file says they are padding.
    tokens = {"decoder/self": {"mask": inputs["attention_mask"].bool().numpy()}} if name == "gpt2" else None
    with hf.capture(model, path, keep=keep, block_bytes=SMALL_BLOCKS, tokens=tokens) as session, torch.no_grad():
        assert model.config._attn_implementation == implementation  # the model keeps its kernel
        captured = _main_output(model(**inputs))
    assert torch.equal(captured, plain)  # the capture does not change what the model computes
    assert model.config._attn_implementation == implementation
    expected = eager_weights(model, inputs)
    assert_valid(path)
    tree = attnformat.open(path)
    assert {site for site, _ in session.sites.values()} == SITES[name]
    for module_path, (site, layer) in session.sites.items():
        reference = expected[module_path]
        batch, heads, queries, keys = reference.shape
        where = f"{name} {site} layer {layer}"
        dense = tree[site]["weights"].sel(layer=layer).values
        np.testing.assert_allclose(dense, reference, rtol=1e-5, atol=1e-5, err_msg=where)
        np.testing.assert_allclose(tree[f"{site}_mean"]["weights"].sel(layer=layer).values, reference.mean(1), rtol=1e-5, atol=1e-5, err_msg=where)
        assert tree[f"{site}_mean"].attrs["head_reduction"] == "mean" and tree[f"{site}_mean"].attrs["describes"] == site

        topk = tree[f"{site}_topk"]
        assert topk.attrs["describes"] == site and topk.attrs["top_k"] == TOP_K and topk.attrs["key_count"] == keys
        kept, key_index, omitted = reductions.top_k(reference, TOP_K, key_mask=reference > 0)
        np.testing.assert_allclose(topk["weights"].sel(layer=layer).values, kept, rtol=1e-5, atol=1e-5, err_msg=where)
        np.testing.assert_allclose(topk["omitted_weight"].sel(layer=layer).values, omitted, rtol=1e-5, atol=1e-5, err_msg=where)
        # Padding query rows that see no key are spread evenly over every key (ties): which keys are
        # "top" there is arbitrary.
        real_rows = reference.max(-1) > reference.min(-1)
        np.testing.assert_array_equal(topk["key_index"].sel(layer=layer).values[real_rows], key_index[real_rows], err_msg=where)

        statistics = tree[f"{site}_stats"]
        padding = _padding(name, site, inputs, batch, keys)[:, None, None, :]
        cross = site.endswith("cross")
        reference_statistics = reductions.row_statistics(reference, local_window=None if cross else WINDOW, key_mask=padding)
        assert statistics.attrs["describes"] == site and statistics.attrs["key_count"] == keys
        assert ("local_weight" in statistics) is not cross
        for statistic, values in reference_statistics.items():
            got = statistics[statistic].sel(layer=layer).values
            if statistic == "top_key":
                np.testing.assert_array_equal(got[real_rows], values[real_rows], err_msg=f"{where} {statistic}")
            else:  # padding query rows see no key: their statistics mean nothing
                np.testing.assert_allclose(got[real_rows], values[real_rows], rtol=1e-5, atol=1e-5, err_msg=f"{where} {statistic}")


def test_clip_towers_are_two_sites_text_causal_vision_not(tmp_path):
    model, inputs = build("clip")
    path = tmp_path / "clip.attn.zarr"
    with hf.capture(model, path), torch.no_grad():
        model(**inputs)
    tree = attnformat.open(path)
    assert tree["text/self"].attrs["causal"] == 1 and tree["vision/self"].attrs["causal"] == 0
    assert tree["text/self"]["weights"].sizes["query"] == 10 and tree["vision/self"]["weights"].sizes["query"] == 17
    assert_valid(path)  # includes: no weight on future keys of the causal text tower


def test_dense_selection_of_layers_heads_and_rows(tmp_path):
    model, inputs = build("llama")
    path = tmp_path / "selected.attn.zarr"
    with hf.capture(model, path, keep=Keep(layers=[1], heads=[0, 3], rows=[0, 4, 9])), torch.no_grad():
        model(**inputs)
    expected = eager_weights(model, inputs)["model.layers.1.self_attn"]
    site = attnformat.open(path)["decoder/self"]
    assert site["weights"].sizes["layer"] == 1 and site["layer"].values.tolist() == [1]
    assert site["head"].values.tolist() == [0, 3] and site["query_position"].values.tolist() == [0, 4, 9]
    np.testing.assert_allclose(site["weights"].sel(layer=1).values, expected[:, [0, 3]][:, :, [0, 4, 9]], rtol=1e-5, atol=1e-5)
    assert_valid(path)


def test_eager_option_gives_the_same_file_contents_as_the_tap(tmp_path):
    model, inputs = build("gpt2")
    inputs = {"input_ids": inputs["input_ids"]}
    keep = Keep(top_k=TOP_K, statistics=["entropy", "max_weight"])
    tapped, eager = tmp_path / "tap.attn.zarr", tmp_path / "eager.attn.zarr"
    for path, as_eager in ((tapped, False), (eager, True)):
        with hf.capture(model, path, keep=keep, eager=as_eager), torch.no_grad():
            assert model.config._attn_implementation == ("eager" if as_eager else "sdpa")
            model(**inputs)
    assert model.config._attn_implementation == "sdpa"
    a, b = attnformat.open(tapped), attnformat.open(eager)
    for site, variable in (("decoder/self", "weights"), ("decoder/self_topk", "weights"), ("decoder/self_stats", "entropy"),
                           ("decoder/self_stats", "max_weight")):
        np.testing.assert_allclose(a[site][variable].values, b[site][variable].values, rtol=1e-5, atol=1e-5, err_msg=f"{site}/{variable}")


def test_block_budget_does_not_change_the_values(tmp_path):
    model, inputs = build("mistral")
    keep = Keep(top_k=TOP_K, statistics=True)
    files = []
    for budget in (1, None):  # one row per block vs the whole call in one block
        path = tmp_path / f"budget-{budget}.attn.zarr"
        with hf.capture(model, path, keep=keep, block_bytes=budget), torch.no_grad():
            model(**inputs)
        files.append(attnformat.open(path))
    for site in ("decoder/self", "decoder/self_topk", "decoder/self_stats"):
        for variable in files[0][site].data_vars:
            np.testing.assert_allclose(files[0][site][variable].values, files[1][site][variable].values, rtol=1e-6, atol=1e-7)


def test_tap_is_removed_after_the_block_and_after_an_error(tmp_path):
    model, inputs = build("gemma2")  # eager: the tap wraps the model file's eager_attention_forward
    from transformers.models.gemma2 import modeling_gemma2

    sdpa, eager = ALL_ATTENTION_FUNCTIONS["sdpa"], modeling_gemma2.eager_attention_forward
    with pytest.raises(RuntimeError, match="boom"):
        with hf.capture(model, tmp_path / "failed.attn.zarr"), torch.no_grad():
            model(**inputs)
            raise RuntimeError("boom")
    gpt2, gpt2_inputs = build("gpt2")
    with hf.capture(gpt2, tmp_path / "ok.attn.zarr"), torch.no_grad():
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa
        gpt2(**gpt2_inputs)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa and modeling_gemma2.eager_attention_forward is eager
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def test_second_forward_in_one_capture_raises_and_names_generation(tmp_path):
    model, inputs = build("bert")
    with pytest.raises(CaptureStateError, match="ran twice.*generation"):
        with hf.capture(model, tmp_path / "twice.attn.zarr"), torch.no_grad():
            model(**inputs)
            model(**inputs)


def test_module_that_bypasses_the_attention_interface_is_reported(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, reorder_and_upcast_attn=True,
                                       attn_implementation="eager")).eval()
    with pytest.raises(UnsupportedModelError, match="h.0.attn.*eager=True"):
        with hf.capture(model, tmp_path / "bypass.attn.zarr"), torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
    path = tmp_path / "eager.attn.zarr"
    with hf.capture(model, path, eager=True), torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert attnformat.open(path)["decoder/self"]["weights"].sizes["query"] == 3


def test_call_handler_takes_every_call_instead_of_the_writer(tmp_path):
    model, inputs = build("gpt2")
    calls = []
    with hf.capture(model, tmp_path / "handled.attn.zarr") as session, torch.no_grad():
        session.call_handler = lambda call: calls.append((call.module_path, call.call_index, call.query_count, int(call.query_positions[-1])))
        model(**inputs)
        model(**inputs)  # a second pass goes to the handler too: no CaptureStateError
    assert calls == [("transformer.h.0.attn", 0, 10, 9), ("transformer.h.1.attn", 0, 10, 9),
                     ("transformer.h.0.attn", 1, 10, 9), ("transformer.h.1.attn", 1, 10, 9)]
