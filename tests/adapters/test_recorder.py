"""The Recorder: custom attention code logs weights, logits, bias and distances, step after step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapter_checks import assert_valid, read

import attnformat
from attnformat.adapters import CaptureShapeError, Recorder
from attnformat.examples import softmax


def _logits(seed, shape):
    return np.random.default_rng(seed).normal(scale=2.0, size=shape).astype(np.float32)


def test_steps_append_every_n_steps_with_logits_bias_and_distances(tmp_path):
    path = tmp_path / "iga.attn.zarr"
    residues, heads = 6, 2
    distance = np.abs(np.subtract.outer(np.arange(residues), np.arange(residues))).astype(np.float32) * 3.8
    bias = -np.log1p(np.exp(4.0 - distance)).astype(np.float32)  # one bias for every head
    logged = {}
    with Recorder(path, model_name="toy-iga", model_framework="numpy", every=100) as rec:
        rec.describe("trunk/iga", labels=[f"R{i}" for i in range(residues)])
        rec.add_pairwise("trunk/iga", "distance", distance, units="angstrom", long_name="C-alpha distance")
        for step in range(250):
            if not rec.should_log(step):
                continue
            for layer in range(2):
                scalar = _logits(step + layer, (heads, residues, residues))
                logits = scalar + bias
                weights = softmax(logits).astype(np.float32)
                logged[step, layer] = (weights, logits)
                rec.log("trunk/iga", step=step, layer=layer, weights=weights, logits=logits, bias=bias)
    assert_valid(path)
    site = attnformat.open(path)["trunk/iga"]
    assert site["step"].values.tolist() == [0, 100, 200]
    assert site["bias"].dims == ("step", "layer", "query", "key")
    assert site["distance"].attrs["units"] == "angstrom"
    np.testing.assert_array_equal(site["distance"].values, distance)
    for (step, layer), (weights, logits) in logged.items():
        np.testing.assert_array_equal(site["weights"].sel(step=step, layer=layer).values, weights)
        np.testing.assert_array_equal(site["logits"].sel(step=step, layer=layer).values, logits)
        np.testing.assert_array_equal(site["bias"].sel(step=step, layer=layer).values, bias)
    assert site["query_label"].values.tolist()[0] == "R0"


def test_torch_tensors_bfloat16_and_float16_are_written_as_float32(tmp_path):
    path = tmp_path / "frames.attn.zarr"
    weights = torch.softmax(torch.randn(4, 6, 6), dim=-1)
    with Recorder(path, model_name="toy-video", model_framework="torch") as rec:
        rec.describe("blocks", groups=np.repeat(np.arange(3), 2), attrs={"group_kind": "frame"})
        rec.log("blocks", layer=0, weights=weights.to(torch.bfloat16).requires_grad_())
        rec.log("half", layer=0, weights=weights.half())
        rec.log("full", layer=0, weights=weights.numpy())
    tree = attnformat.open(path)
    for site, expected, keepbits in (("blocks", weights.to(torch.bfloat16).float(), 7), ("half", weights.half().float(), 10), ("full", weights, None)):
        stored = tree[site]["weights"]
        assert stored.dtype == np.float32
        np.testing.assert_array_equal(stored.sel(layer=0).values, expected.numpy())
        assert stored.attrs.get("lossy_keepbits") == keepbits  # half precision is declared as bit-rounded float32
    assert tree["blocks"]["key_group"].values.tolist() == [0, 0, 1, 1, 2, 2]
    assert tree["blocks"].attrs["group_kind"] == "frame"
    assert_valid(path)


def test_layers_and_heads_grow_as_they_are_logged(tmp_path):
    path = tmp_path / "grow.attn.zarr"
    maps = {(layer, head): softmax(_logits(10 * layer + head, (5, 5))).astype(np.float32) for layer in (0, 1, 2) for head in (0, 1)}
    with Recorder(path, model_name="m", model_framework="numpy") as rec:
        for (layer, head), weights in maps.items():
            rec.log("self", layer=layer, head=head, weights=weights)
    assert_valid(path)
    site = attnformat.open(path)["self"]
    assert site["layer"].values.tolist() == [0, 1, 2] and site["head"].values.tolist() == [0, 1]
    for (layer, head), weights in maps.items():
        np.testing.assert_array_equal(site["weights"].sel(layer=layer, head=head).values, weights)


def test_batch_with_masks_and_sample_dimension(tmp_path):
    path = tmp_path / "batch.attn.zarr"
    mask = np.array([[True, True, True], [True, True, False]])
    logits = np.where(mask[:, None, None, :], _logits(3, (2, 2, 3, 3)), -np.inf)
    weights = softmax(logits).astype(np.float32)
    with Recorder(path, model_name="m", model_framework="numpy") as rec:
        rec.describe("enc", labels=[["a", "b", "c"], ["d", "e", "[PAD]"]], mask=mask)
        rec.log("enc", layer=0, weights=weights, logits=logits)
    assert_valid(path)
    site = attnformat.open(path)["enc"]
    assert site["weights"].dims == ("sample", "layer", "head", "query", "key")
    np.testing.assert_array_equal(site["key_mask"].values, mask)
    np.testing.assert_array_equal(site["logits"].sel(layer=0).values, logits)


def test_edge_layout(tmp_path):
    path = tmp_path / "edges.attn.zarr"
    source, target = np.array([0, 1, 2, 0]), np.array([1, 2, 0, 0])
    weights = np.array([[1.0, 1.0, 0.5, 0.5]], dtype=np.float32)  # per target: node 0 gets two edges
    with Recorder(path, model_name="m", model_framework="numpy") as rec:
        rec.describe("graph", layout="edge", source=source, target=target, node_labels=["a", "b", "c"])
        rec.log("graph", layer=0, weights=weights)
    assert_valid(path)
    site = attnformat.open(path)["graph"]
    assert site.attrs["edge_node_dim"] == "node"
    np.testing.assert_array_equal(site["source"].values, source)


def test_shape_mismatch_names_site_and_layer(tmp_path):
    with Recorder(tmp_path / "bad.attn.zarr") as rec:
        rec.log("trunk/iga", layer=0, weights=np.full((2, 4, 4), 0.25))
        with pytest.raises(CaptureShapeError, match=r"trunk/iga \[layer=1\].*shape \(2, 5, 5\)"):
            rec.log("trunk/iga", layer=1, weights=np.full((2, 5, 5), 0.2))
        with pytest.raises(CaptureShapeError, match="logits was not logged on the site's first log"):
            rec.log("trunk/iga", layer=1, weights=np.full((2, 4, 4), 0.25), logits=np.zeros((2, 4, 4)))


def test_failure_mid_capture_leaves_a_readable_incomplete_file(tmp_path):
    path = tmp_path / "crash.attn.zarr"
    weights = softmax(_logits(0, (2, 4, 4))).astype(np.float32)
    with pytest.raises(RuntimeError, match="out of memory"):
        with Recorder(path, model_name="m", model_framework="numpy") as rec:
            rec.describe("self", layers=[0, 1, 2])
            rec.log("self", layer=0, weights=weights)
            raise RuntimeError("out of memory")
    tree = attnformat.open(path)
    assert tree.attrs["completeness"] == "incomplete"
    assert not attnformat.is_complete(tree)
    np.testing.assert_array_equal(read(path, "self", layer=0), weights)
    assert np.isnan(read(path, "self", layer=2)).all()


def test_background_writes_land_in_order_and_errors_surface(tmp_path):
    path = tmp_path / "background.attn.zarr"
    maps = [softmax(_logits(layer, (3, 8, 8))).astype(np.float32) for layer in range(4)]
    with Recorder(path, model_name="m", model_framework="numpy", background=True) as rec:
        for step in (10, 20):
            for layer, weights in enumerate(maps):
                rec.log("self", step=step, layer=layer, weights=weights * 1.0)
    assert_valid(path)
    for layer, weights in enumerate(maps):
        np.testing.assert_array_equal(read(path, "self", step=20, layer=layer), weights)
    broken = tmp_path / "broken.attn.zarr"
    with pytest.raises(attnformat.WriterError, match="steps must increase"):
        with Recorder(broken, model_name="m", model_framework="numpy", background=True) as rec:
            rec.log("self", step=5, layer=0, weights=maps[0])
            rec.log("self", step=1, layer=0, weights=maps[0])  # steps must increase
    assert attnformat.open(broken).attrs["completeness"] == "incomplete"
    np.testing.assert_array_equal(read(broken, "self", step=5, layer=0), maps[0])  # the write in flight landed


def test_importing_the_adapters_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, attnformat.adapters as a; a.Recorder; a.to_numpy; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_video_frame_attention_with_sink_scores_logged_from_a_custom_module(tmp_path):
    """Seed 004's shape: a custom attention module logs its weights; tokens are grouped by frame."""
    frames, per_frame, heads = 4, 3, 2
    tokens = frames * per_frame

    class FrameAttention(torch.nn.Module):
        def __init__(self, recorder, layer):
            super().__init__()
            self.recorder, self.layer = recorder, layer
            self.query, self.key = torch.nn.Linear(8, 8 * heads), torch.nn.Linear(8, 8 * heads)

        def forward(self, x):
            q = self.query(x).view(tokens, heads, 8).transpose(0, 1)
            k = self.key(x).view(tokens, heads, 8).transpose(0, 1)
            logits = q @ k.transpose(1, 2) / 8 ** 0.5
            weights = logits.softmax(dim=-1)
            self.recorder.log("blocks", layer=self.layer, weights=weights, logits=logits)
            return weights

    path = tmp_path / "video.attn.zarr"
    torch.manual_seed(0)
    x = torch.randn(tokens, 8)
    with Recorder(path, model_name="toy-video", model_framework="torch") as rec:
        rec.describe("blocks", groups=np.repeat(np.arange(frames), per_frame), attrs={"group_kind": "frame"})
        blocks = [FrameAttention(rec, layer) for layer in (0, 1)]
        returned = [block(x) for block in blocks]
        sink = torch.stack(returned).mean(dim=(0, 1, 2))  # mean weight each key receives
        rec.add_variable("blocks", "sink_score", sink, ("key",), attrs={"role": "per_key", "long_name": "mean attention received"})
    assert_valid(path)
    site = attnformat.open(path)["blocks"]
    for layer, weights in enumerate(returned):
        np.testing.assert_array_equal(site["weights"].sel(layer=layer).values, weights.detach().numpy())
    np.testing.assert_allclose(site["sink_score"].values, sink.detach().numpy())
    assert site["query_group"].values.tolist() == np.repeat(np.arange(frames), per_frame).tolist()
