"""The PyTorch Geometric adapter against the layers' own return_attention_weights=True."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapter_checks import assert_valid
from torch_geometric.nn import GATConv, GATv2Conv, MessagePassing, TransformerConv
from torch_geometric.utils import softmax as edge_softmax

import attnformat
from attnformat.adapters import UnsupportedModelError
from attnformat.adapters import pyg

NODES = 6
EDGES = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 2, 4], [1, 2, 3, 4, 5, 0, 3, 5, 1]])


def _graph(seed=0, channels=4):
    torch.manual_seed(seed)
    return torch.randn(NODES, channels), EDGES


@pytest.mark.parametrize("layer_class", [GATConv, GATv2Conv])
def test_gat_layers_match_return_attention_weights_including_self_loops(tmp_path, layer_class):
    x, edge_index = _graph()
    conv = layer_class(4, 3, heads=2).eval()
    with torch.no_grad():
        expected_output, (expected_edges, expected_alpha) = conv(x, edge_index, return_attention_weights=True)
    path = tmp_path / "gat.attn.zarr"
    with torch.no_grad(), pyg.capture(conv, path, tokens={"gat": {"node_labels": [f"sensor {i}" for i in range(NODES)]}}):
        output = conv(x, edge_index)
    assert torch.equal(output, expected_output)
    assert_valid(path)
    site = attnformat.open(path)["gat"]
    assert site.attrs["layout"] == "edge" and site.attrs["self_loops_added"] == 1 and site.attrs["edge_node_dim"] == "node"
    np.testing.assert_array_equal(site["source"].values, expected_edges[0].numpy())
    np.testing.assert_array_equal(site["target"].values, expected_edges[1].numpy())
    assert int((site["source"].values == site["target"].values).sum()) == NODES  # one added self-loop per node
    assert site["weights"].dims == ("layer", "head", "edge")
    np.testing.assert_allclose(site["weights"].sel(layer=0).values, expected_alpha.numpy().T, rtol=1e-6, atol=1e-7)
    assert site["node_label"].values.tolist()[0] == "sensor 0"


def test_transformer_conv_and_a_two_layer_model(tmp_path):
    x, edge_index = _graph(1)
    model = torch.nn.ModuleDict({"first": TransformerConv(4, 4, heads=2, concat=False), "second": TransformerConv(4, 4, heads=2)}).eval()

    with torch.no_grad():
        hidden, (edges_1, alpha_1) = model["first"](x, edge_index, return_attention_weights=True)
        expected_output, (_, alpha_2) = model["second"](hidden, edge_index, return_attention_weights=True)

    def run():
        return model["second"](model["first"](x, edge_index), edge_index)

    path = tmp_path / "transformer.attn.zarr"
    names = {"first": "graph/transformer", "second": "graph/transformer"}
    with torch.no_grad(), pyg.capture(model, path, site_names=names) as capture:
        output = run()
    assert torch.equal(output, expected_output)
    assert capture.sites == {"first": ("graph/transformer", 0), "second": ("graph/transformer", 1)}
    assert_valid(path)
    site = attnformat.open(path)["graph/transformer"]
    assert site.attrs["self_loops_added"] == 0
    np.testing.assert_array_equal(site["source"].values, edges_1[0].numpy())
    np.testing.assert_allclose(site["weights"].sel(layer=0).values, alpha_1.numpy().T, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(site["weights"].sel(layer=1).values, alpha_2.numpy().T, rtol=1e-6, atol=1e-7)


class AdditiveAttention(MessagePassing):
    """A SPIN-like layer: additive attention computed inside message(), over edges along ``node_dim``."""

    def __init__(self, channels, node_dim=-2):
        super().__init__(aggr="add", node_dim=node_dim)
        self.query, self.key = torch.nn.Linear(channels, channels), torch.nn.Linear(channels, channels)
        self.score = torch.nn.Linear(channels, 1)
        self.last_alpha = None

    def forward(self, x, edge_index, return_attention_weights=False):
        out = self.propagate(edge_index, x=x)
        return (out, self.last_alpha) if return_attention_weights else out

    def message(self, x_i, x_j, index, size_i):
        logits = self.score(torch.tanh(self.query(x_i) + self.key(x_j)))
        alpha = edge_softmax(logits, index, num_nodes=size_i, dim=self.node_dim)
        self.last_alpha = alpha
        return alpha * x_j


def test_generic_message_passing_capture_restores_the_original_method(tmp_path):
    x, edge_index = _graph(2)
    layer = AdditiveAttention(4).eval()
    with torch.no_grad():
        expected_output, expected_alpha = layer(x, edge_index, return_attention_weights=True)
    path = tmp_path / "additive.attn.zarr"
    with torch.no_grad(), pyg.capture(layer, path, modules=AdditiveAttention, weights=lambda module, kwargs, out: module.last_alpha):
        assert "message" in vars(layer)  # wrapped on this instance only
        assert AdditiveAttention.message.__qualname__ == "AdditiveAttention.message"
        output = layer(x, edge_index)
    assert torch.equal(output, expected_output)
    assert "message" not in vars(layer) and layer.message.__func__ is AdditiveAttention.message
    assert_valid(path)
    site = attnformat.open(path)["graph_attention"]
    np.testing.assert_allclose(site["weights"].sel(layer=0).values, expected_alpha[:, 0].numpy(), rtol=1e-6, atol=1e-7)
    # restored even when the forward pass fails
    with pytest.raises(ValueError, match="boom"):
        with pyg.capture(layer, tmp_path / "crash.attn.zarr", modules=[layer], weights=_explode):
            layer(x, edge_index)
    assert "message" not in vars(layer) and layer.message.__func__ is AdditiveAttention.message
    tree = attnformat.open(tmp_path / "crash.attn.zarr")
    assert tree.attrs["completeness"] == "incomplete"


def _explode(module, kwargs, out):
    raise ValueError("boom")


class SpatioTemporal(torch.nn.Module):
    """SPIN's shape: spatial attention on graph edges at every time step, temporal attention over time-step edges."""

    def __init__(self, channels, steps, max_distance):
        super().__init__()
        self.spatial = AdditiveAttention(channels, node_dim=-2)  # x: [batch, time, node, channels]
        self.temporal = AdditiveAttention(channels, node_dim=-2)  # x: [batch, node, time, channels]
        self.temporal_edges = pyg.temporal_edge_index(steps, max_distance=max_distance)

    def forward(self, x, edge_index, return_attention_weights=False):
        h, spatial = self.spatial(x, edge_index, True)
        h, temporal = self.temporal(h.transpose(1, 2), self.temporal_edges, True)
        h = h.transpose(1, 2)
        return (h, spatial, temporal) if return_attention_weights else h


def test_spatio_temporal_model_writes_time_and_temporal_edge_sites(tmp_path):
    torch.manual_seed(3)
    batch, steps = 2, 4
    model = SpatioTemporal(4, steps, max_distance=2).eval()
    x = torch.randn(batch, steps, NODES, 4)
    with torch.no_grad():
        expected_output, spatial, temporal = model(x, EDGES, return_attention_weights=True)
    path = tmp_path / "spin.attn.zarr"
    tokens = {"temporal": {"edge_node_dim": "time", "times": steps, "attrs": {"max_temporal_distance": 2, "causal": 0}}}
    dims = {"spatial": ("sample", "time"), "temporal": ("sample", "node")}
    with torch.no_grad(), pyg.capture(model, path, modules=AdditiveAttention, weights=lambda m, kw, out: m.last_alpha, leading_dims=dims, tokens=tokens):
        output = model(x, EDGES)
    assert torch.equal(output, expected_output)
    assert_valid(path)
    tree = attnformat.open(path)
    spatial_site, temporal_site = tree["spatial"], tree["temporal"]
    assert spatial_site["weights"].dims == ("sample", "layer", "time", "edge") and spatial_site.attrs["edge_node_dim"] == "node"
    assert temporal_site["weights"].dims == ("sample", "layer", "node", "edge") and temporal_site.attrs["edge_node_dim"] == "time"
    assert temporal_site.attrs["max_temporal_distance"] == 2 and temporal_site.sizes["time"] == steps
    np.testing.assert_array_equal(temporal_site["source"].values, model.temporal_edges[0].numpy())
    np.testing.assert_allclose(spatial_site["weights"].sel(layer=0).values, spatial[..., 0].numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(temporal_site["weights"].sel(layer=0).values, temporal[..., 0].numpy(), rtol=1e-6, atol=1e-7)
    distances = np.abs(temporal_site["source"].values - temporal_site["target"].values)
    assert distances.max() == 2


def test_temporal_edge_index_options():
    assert pyg.temporal_edge_index(3).shape == (2, 9)
    assert pyg.temporal_edge_index(4, max_distance=1).shape == (2, 10)
    causal = pyg.temporal_edge_index(4, causal=True)
    assert bool((causal[0] <= causal[1]).all()) and causal.shape == (2, 10)


def test_unknown_layers_need_weights_and_missing_layers_are_clear(tmp_path):
    with pytest.raises(UnsupportedModelError, match="weights="):
        pyg.capture(AdditiveAttention(4), tmp_path / "x.attn.zarr", modules=AdditiveAttention)
    with pytest.raises(UnsupportedModelError, match="GATConv.*Recorder"):
        pyg.capture(torch.nn.Linear(2, 2), tmp_path / "y.attn.zarr")


def test_a_layer_run_once_per_time_step_fills_a_time_dimension(tmp_path):
    torch.manual_seed(4)
    conv = GATConv(4, 2, heads=2).eval()
    frames = torch.randn(3, NODES, 4)
    with torch.no_grad():
        expected = [conv(frame, EDGES, return_attention_weights=True)[1][1] for frame in frames]
    path = tmp_path / "per-step.attn.zarr"
    with torch.no_grad(), pyg.capture(conv, path, repeat_dim={"gat": "time"}):
        for frame in frames:
            conv(frame, EDGES)
    assert_valid(path)
    site = attnformat.open(path)["gat"]
    assert site["weights"].dims == ("layer", "head", "time", "edge") and site["time"].values.tolist() == [0, 1, 2]
    for step, alpha in enumerate(expected):
        np.testing.assert_allclose(site["weights"].sel(layer=0, time=step).values, alpha.numpy().T, rtol=1e-6, atol=1e-7)
    with pytest.raises(attnformat.AttnFormatError, match=r"ran twice.*repeat_dim"):
        with pyg.capture(conv, tmp_path / "twice.attn.zarr"):
            conv(frames[0], EDGES)
            conv(frames[1], EDGES)
