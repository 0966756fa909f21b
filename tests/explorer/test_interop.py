"""``to_bertviz`` and ``to_circuitsvis`` fed to the real bertviz and CircuitsVis functions.

Each tool's own function must accept what we return, and what it embeds in its page (the params
JSON bertviz writes into its script, the props CircuitsVis renders) must equal the file's arrays,
read with zarr itself (padding left out, absent cells 0). Nothing here touches the network:
``html_action="return"`` and CircuitsVis's ``local_src`` only build strings.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import zarr

import attnformat
from attnformat.viewer.explorer.interop import to_bertviz, to_circuitsvis


def _stored(name: str, array: str) -> np.ndarray:
    return np.asarray(zarr.open_group(str(attnformat.example_path(name)), mode="r")[array][...], dtype=np.float64)


def _labels(name: str, array: str) -> list[str]:
    return [str(v) for v in np.asarray(zarr.open_group(str(attnformat.example_path(name)), mode="r")[array][...]).reshape(-1)]


def _bertviz_params(html: str) -> dict:
    """The params bertviz writes into its page's script (``const params = {...};``)."""
    return json.loads(re.search(r"const params = (\{.*?\}); //", html).group(1))


def _circuitsvis_props(rendered) -> dict:
    """The props CircuitsVis renders its element with (the third argument of ``CircuitsVis.render``)."""
    text = rendered.local_src
    start = text.index("{", text.index("CircuitsVis.render("))
    props, _ = json.JSONDecoder().raw_decode(text[start:])
    return props


def test_bertviz_head_and_model_view_take_a_self_attention_file():
    import torch
    from bertviz import head_view, model_view

    kwargs = to_bertviz(attnformat.example_path("dense"), tensors="torch")
    assert all(isinstance(layer, torch.Tensor) for layer in kwargs["attention"])
    truth = _stored("dense", "encoder/self/weights")  # (layer, head, query, key)
    tokens = _labels("dense", "encoder/self/query_label")
    assert kwargs["tokens"] == tokens
    for view in (head_view, model_view):
        params = _bertviz_params(view(**kwargs, html_action="return").data)
        shown = np.asarray(params["attention"][0]["attn"])  # bertviz squeezed the batch: (layer, head, q, k)
        np.testing.assert_allclose(shown, truth, rtol=1e-6)
        assert params["attention"][0]["left_text"] == tokens


def test_bertviz_numpy_arrays_are_what_bertviz_wants_after_from_numpy():
    import torch
    from bertviz import head_view

    kwargs = to_bertviz(attnformat.example_path("dense"))
    assert all(isinstance(layer, np.ndarray) and layer.shape == (1, 3, 6, 6) for layer in kwargs["attention"])
    converted = {**kwargs, "attention": tuple(torch.from_numpy(layer) for layer in kwargs["attention"])}
    params = _bertviz_params(head_view(**converted, html_action="return").data)
    np.testing.assert_allclose(np.asarray(params["attention"][0]["attn"]), _stored("dense", "encoder/self/weights"), rtol=1e-6)


def test_bertviz_encoder_decoder_form_from_a_cross_attention_site():
    from bertviz import head_view

    kwargs = to_bertviz(attnformat.example_path("encoder-decoder"), tensors="torch")
    params = _bertviz_params(head_view(**kwargs, html_action="return").data)
    shown = {entry["name"]: entry for entry in params["attention"]}
    assert sorted(shown) == ["Cross", "Decoder", "Encoder"]
    for name, site in (("Encoder", "encoder/self"), ("Decoder", "decoder/self"), ("Cross", "decoder/cross")):
        truth = np.nan_to_num(_stored("encoder-decoder", f"{site}/weights"), nan=0.0)
        np.testing.assert_allclose(np.asarray(shown[name]["attn"]), truth, rtol=1e-6)
    assert shown["Cross"]["left_text"] == _labels("encoder-decoder", "decoder/cross/query_label")
    assert shown["Cross"]["right_text"] == _labels("encoder-decoder", "encoder/self/key_label")


def test_bertviz_leaves_padding_out_of_each_sample():
    from bertviz import head_view

    kwargs = to_bertviz(attnformat.example_path("padded-batch"), sample=1, tensors="torch")
    assert kwargs["tokens"] == ["[CLS]", "hi", "[SEP]"]
    params = _bertviz_params(head_view(**kwargs, html_action="return").data)
    truth = _stored("padded-batch", "encoder/self/weights")[1][..., :3, :3]
    np.testing.assert_allclose(np.asarray(params["attention"][0]["attn"]), truth, rtol=1e-6)


def test_circuitsvis_patterns_and_heads_take_one_layer():
    import circuitsvis as cv

    kwargs = to_circuitsvis(attnformat.example_path("dense"), layer=1)
    truth = _stored("dense", "encoder/self/weights")[1]  # (head, query, key)
    for function in (cv.attention.attention_patterns, cv.attention.attention_heads):
        props = _circuitsvis_props(function(**kwargs))
        assert props["tokens"] == _labels("dense", "encoder/self/query_label")
        np.testing.assert_allclose(np.asarray(props["attention"]), truth, rtol=1e-6)
    props = _circuitsvis_props(cv.attention.attention_heads(**kwargs, mask_upper_tri=False))
    assert props["maskUpperTri"] is False


def test_circuitsvis_causal_not_computed_cells_are_zero():
    import circuitsvis as cv

    kwargs = to_circuitsvis(attnformat.example_path("encoder-decoder"), site="decoder/self", layer=0, heads=[1])
    truth = _stored("encoder-decoder", "decoder/self/weights")[0, 1:2]
    props = _circuitsvis_props(cv.attention.attention_patterns(**kwargs))
    np.testing.assert_allclose(np.asarray(props["attention"]), np.nan_to_num(truth, nan=0.0), rtol=1e-6)


def test_cross_attention_is_refused_for_circuitsvis():
    with pytest.raises(attnformat.SelectionError, match="cross-attention"):
        to_circuitsvis(attnformat.example_path("encoder-decoder"), site="decoder/cross")


def test_the_viewer_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, attnformat; from attnformat.viewer.explorer import interop; "
            "interop.to_bertviz(attnformat.example_path('dense')); interop.to_circuitsvis(attnformat.example_path('dense')); "
            "print('torch' in sys.modules)")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "False"
