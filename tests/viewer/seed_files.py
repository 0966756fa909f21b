"""Files shaped like what the five seed tools extract, with the arrays kept for ground truth.

Each builder returns ``(path, truth)``: the file written with :func:`attnformat.save` and a dict of
the numpy arrays that went into it, so a test can compute the seed's own number or figure with
numpy and compare it with what the viewer drew. Sizes follow the seeds' documentation.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

import attnformat
from attnformat.examples import _root, softmax


def _obj(values):
    return np.array(list(values), dtype=object)


def graph_model(path, rng=None):
    """Seed 000 (SPIN): spatial attention on graph edges per time step, temporal attention over
    time-step edges within ``max_distance`` steps, per node."""
    rng = rng or np.random.default_rng(0)
    nodes, steps, max_distance, layers = 12, 10, 2, 2
    pairs = sorted({(i, (i + d) % nodes) for i in range(nodes) for d in (1, 2, nodes - 1)} | {(i, i) for i in range(nodes)},
                   key=lambda p: (p[1], p[0]))
    source, target = np.array(pairs).T
    spatial = np.exp(rng.normal(size=(1, layers, steps, source.size)))
    spatial /= np.stack([np.bincount(target, weights=row, minlength=nodes)[target]
                         for row in spatial.reshape(-1, source.size)]).reshape(spatial.shape)
    t_pairs = [(s, t) for t in range(steps) for s in range(steps) if abs(s - t) <= max_distance]
    t_source, t_target = np.array(t_pairs).T
    temporal = np.exp(rng.normal(size=(1, layers, nodes, t_source.size)))
    temporal /= np.stack([np.bincount(t_target, weights=row, minlength=steps)[t_target]
                          for row in temporal.reshape(-1, t_source.size)]).reshape(temporal.shape)
    common = {"normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0}
    spatial_site = xr.Dataset(
        {"weights": (("sample", "layer", "time", "edge"), spatial.astype(np.float32))},
        coords={"layer": np.arange(layers), "time": np.arange(steps), "source": ("edge", source), "target": ("edge", target),
                "node": np.arange(nodes), "node_label": ("node", _obj(f"sensor_{i}" for i in range(nodes)))},
        attrs={"layout": "edge", "edge_node_dim": "node", "self_loops_added": 1, **common})
    temporal_site = xr.Dataset(
        {"weights": (("sample", "layer", "node", "edge"), temporal.astype(np.float32))},
        coords={"layer": np.arange(layers), "node": np.arange(nodes), "time": np.arange(steps),
                "source": ("edge", t_source), "target": ("edge", t_target)},
        attrs={"layout": "edge", "edge_node_dim": "time", "max_temporal_distance": max_distance, **common})
    tree = xr.DataTree.from_dict({"/": _root("SPIN-like graph model", model_name="seed-000"),
                                  "/spatial": spatial_site, "/temporal": temporal_site})
    attnformat.save(tree, path)
    return path, {"spatial": spatial, "source": source, "target": target, "temporal": temporal,
                  "t_source": t_source, "t_target": t_target, "steps": steps, "nodes": nodes,
                  "max_distance": max_distance}


ENCODER_GROUPS = ["text"] * 10 + ["robot0_eef_pos"] + ["agentview_image"] * 9 + ["agentview_depth"] * 9
DECODER_GROUPS = ["text"] * 10 + ["robot0_eef_pos_past_traj"] * 10 + ["robot0_eef_pos_past_traj_delta"] * 9


def _group_labels(groups):
    counts: dict = {}
    labels = []
    for group in groups:
        labels.append(f"{group}_{counts.get(group, 0)}")
        counts[group] = counts.get(group, 0) + 1
    return labels


def encoder_decoder(path, rng=None):
    """Seed 001: encoder self, decoder (causal) self and cross attention, 3 layers x 8 heads over
    29 multimodal tokens each side, with token groups."""
    rng = rng or np.random.default_rng(1)
    layers, heads, n = 3, 8, 29
    enc_labels, dec_labels = _group_labels(ENCODER_GROUPS), _group_labels(DECODER_GROUPS)
    encoder = softmax(rng.normal(scale=2, size=(layers, heads, n, n))).astype(np.float32)
    causal = np.where(np.triu(np.ones((n, n), bool), 1), -np.inf, rng.normal(scale=2, size=(layers, heads, n, n)))
    decoder = softmax(causal).astype(np.float32)
    cross = softmax(rng.normal(scale=2, size=(layers, heads, n, n))).astype(np.float32)
    dims = ("layer", "head", "query", "key")
    base = {"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "group_kind": "modality"}

    def site(values, q_labels, k_labels, q_groups, k_groups, **attrs):
        return xr.Dataset({"weights": (dims, values)},
                          coords={"layer": np.arange(layers), "head": np.arange(heads),
                                  "query_label": ("query", _obj(q_labels)), "key_label": ("key", _obj(k_labels)),
                                  "query_group": ("query", _obj(q_groups)), "key_group": ("key", _obj(k_groups))},
                          attrs={**base, **attrs})

    tree = xr.DataTree.from_dict({
        "/": _root("encoder-decoder over multimodal tokens", model_name="seed-001"),
        "/encoder/self": site(encoder, enc_labels, enc_labels, ENCODER_GROUPS, ENCODER_GROUPS, attention_type="self", causal=0),
        "/decoder/self": site(decoder, dec_labels, dec_labels, DECODER_GROUPS, DECODER_GROUPS, attention_type="self", causal=1),
        "/decoder/cross": site(cross, dec_labels, enc_labels, DECODER_GROUPS, ENCODER_GROUPS, attention_type="cross",
                               causal=0, key_site="encoder/self"),
    })
    attnformat.save(tree, path)
    return path, {"encoder": encoder, "decoder": decoder, "cross": cross, "enc_labels": enc_labels, "dec_labels": dec_labels}


def protein_model(path, rng=None):
    """Seed 002: logits before (scalar q.k), geometric bias (all negative), logits after, weights,
    C-alpha distances per sample (angstrom), snapshotted at training steps."""
    rng = rng or np.random.default_rng(2)
    steps, samples, layers, heads, n = (100, 200), 3, 2, 2, 40
    coords = rng.normal(scale=3.8, size=(samples, n, 3)).cumsum(axis=1) / 1.5
    distance = np.linalg.norm(coords[:, :, None] - coords[:, None], axis=-1)
    shape = (len(steps), samples, layers, heads, n, n)
    scalar = rng.normal(size=shape)
    gamma = rng.uniform(0.5, 2.0, size=(len(steps), 1, layers, heads, 1, 1))
    bias = -gamma * np.log1p(np.exp(4.0 - distance))[None, :, None, None] - 0.3
    logits = scalar + bias
    weights = softmax(logits)
    dims = ("step", "sample", "layer", "head", "query", "key")
    labels = _obj(f"R{i}" for i in range(n))
    site = xr.Dataset(
        {"weights": (dims, weights.astype(np.float32)), "logits": (dims, logits.astype(np.float32)),
         "bias": (dims, bias.astype(np.float32)),
         "distance": (("sample", "query", "key"), distance.astype(np.float32),
                      {"role": "pairwise", "units": "angstrom", "long_name": "C-alpha distance"})},
        coords={"step": np.array(steps, np.int64), "layer": np.arange(layers), "head": np.arange(heads),
                "query_label": ("query", labels), "key_label": ("key", labels)},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0})
    tree = xr.DataTree.from_dict({"/": _root("IGA-like protein model", model_name="seed-002"), "/trunk/iga": site})
    attnformat.save(tree, path)
    return path, {"weights": weights.astype(np.float32), "logits": logits.astype(np.float32),
                  "bias": bias.astype(np.float32), "distance": distance.astype(np.float32), "steps": steps}


def vit_digits(path, rng=None):
    """Seed 003: a ViT on 28x28 digits, 7x7 patches (4x4 grid) plus CLS, 6 layers x 4 heads, 5 samples."""
    from sklearn.datasets import load_digits

    rng = rng or np.random.default_rng(3)
    samples, layers, heads, grid, patch = 5, 6, 4, 4, 7
    digits = load_digits().images[:samples]  # 8x8, upsampled to 28x28 like MNIST
    images = np.stack([np.kron(d, np.ones((4, 4)))[2:30, 2:30] for d in digits]).astype(np.float32) / 16
    tokens = 1 + grid * grid
    logits = rng.normal(scale=1.5, size=(samples, layers, heads, tokens, tokens))
    logits[:, 3] = 0.0  # a uniform layer: every weight 1/17
    weights = softmax(logits).astype(np.float32)
    rows = np.concatenate([[-1], np.repeat(np.arange(grid), grid)])
    cols = np.concatenate([[-1], np.tile(np.arange(grid), grid)])
    labels = _obj(["[CLS]"] + [f"patch_{r}_{c}" for r, c in zip(rows[1:], cols[1:])])
    site = xr.Dataset(
        {"weights": (("sample", "layer", "head", "query", "key"), weights),
         "image": (("sample", "image_row", "image_col"), images, {"role": "image"})},
        coords={"layer": np.arange(layers), "head": np.arange(heads), "query_label": ("query", labels), "key_label": ("key", labels),
                "query_patch_row": ("query", rows), "query_patch_col": ("query", cols),
                "key_patch_row": ("key", rows), "key_patch_col": ("key", cols)},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0,
               "patch_grid": [grid, grid], "patch_size": [patch, patch]})
    tree = xr.DataTree.from_dict({"/": _root("ViT on digits", model_name="seed-003"), "/encoder/self": site})
    attnformat.save(tree, path)
    return path, {"weights": weights, "images": images, "grid": grid, "patch": patch}


def video_frames(path, rng=None):
    """Seed 004: layer 3 of a video model, 12 heads, frame x frame logits over 19 frames (block
    causal), stored as a frame-level site."""
    rng = rng or np.random.default_rng(4)
    heads, frames = 12, 19
    logits = rng.normal(size=(1, heads, frames, frames))
    logits[..., 0] += rng.uniform(-1, 7, size=(1, heads, 1))  # sinks on the first frame
    # Block causal: frame 0 alone, then blocks of three frames ([1, 2, 3], ..., [16, 17, 18]); a
    # frame sees every frame of its own block and of earlier blocks, the future is not computed.
    block = np.concatenate([[0], 1 + np.arange(frames - 1) // 3])
    logits = np.where(block[None, :] > block[:, None], np.nan, logits)
    labels = _obj(f"frame {i}" for i in range(frames))
    site = xr.Dataset(
        {"logits": (("layer", "head", "query", "key"), logits.astype(np.float32))},
        coords={"layer": [3], "head": np.arange(heads), "query_label": ("query", labels), "key_label": ("key", labels),
                "query_group": ("query", np.arange(frames)), "key_group": ("key", np.arange(frames))},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 1, "group_kind": "frame"})
    tree = xr.DataTree.from_dict({"/": _root("video model, frame-level logits", model_name="seed-004"), "/blocks": site})
    attnformat.save(tree, path)
    return path, {"logits": logits.astype(np.float32), "frames": frames, "heads": heads, "block": block}
