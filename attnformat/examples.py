"""Small example files, one per layout the spec describes.

They are the spec's normative examples (``spec/examples/<name>.zarr`` holds each one as written by
:func:`attnformat.save`; a test rebuilds them and checks the committed stores still match), the
inputs of the viewer's tests, and something to try the CLI on. Values are made with a seeded
random generator, so every build is identical.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr

from attnformat._version import __version__
from attnformat.conventions import FORMAT_NAME, FORMAT_VERSION

EXAMPLES = ("dense", "padded-batch", "encoder-decoder", "edge", "edge-time", "steps", "image", "frames",
            "topk", "statistics", "head-mean", "generation")


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax that maps rows of -inf to zeros.

    Examples
    --------
    >>> softmax(np.array([0.0, 0.0])).tolist()
    [0.5, 0.5]
    """
    logits = np.asarray(logits, dtype=np.float64)
    finite_max = np.max(np.where(np.isfinite(logits), logits, -np.inf), axis=axis, keepdims=True)
    finite_max = np.where(np.isfinite(finite_max), finite_max, 0.0)
    exponentials = np.exp(logits - finite_max)
    totals = exponentials.sum(axis=axis, keepdims=True)
    return np.divide(exponentials, totals, out=np.zeros_like(exponentials), where=totals > 0)


def _root(description: str, **model) -> xr.Dataset:
    attrs = {
        "attnformat": FORMAT_NAME,
        "attnformat_version": FORMAT_VERSION,
        "producer": f"attnformat {__version__} examples",
        "completeness": "complete",
        "model_framework": "numpy",
        "description": description,
        **model,
    }
    return xr.Dataset(attrs=attrs)


def _dense_site(rng, sizes: dict, *, attrs: dict, logits_scale=2.0, causal=False, with_logits=True) -> xr.Dataset:
    dims = tuple(sizes)
    logits = rng.normal(scale=logits_scale, size=tuple(sizes.values()))
    if causal:
        future = np.triu(np.ones((sizes["query"], sizes["key"]), bool), k=1)
        logits = np.where(future, -np.inf, logits)
    weights = softmax(logits).astype(np.float32)
    data = {"weights": (dims, weights)}
    if with_logits:
        data["logits"] = (dims, logits.astype(np.float32))
    coords = {dim: np.arange(sizes[dim]) for dim in ("layer", "head") if dim in sizes}
    return xr.Dataset(data, coords=coords, attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", **attrs})


def _tokens(words):
    return np.array(words, dtype=object)


def build(name: str) -> xr.DataTree:
    """Build one example tree in memory.

    Examples
    --------
    >>> tree = build("dense")
    >>> tree["encoder/self"]["weights"].dims
    ('layer', 'head', 'query', 'key')
    """
    if name not in EXAMPLES:
        raise KeyError(f"no example {name!r}; examples: {', '.join(EXAMPLES)}")
    rng = np.random.default_rng(EXAMPLES.index(name))
    return globals()["_build_" + name.replace("-", "_")](rng)


def _build_dense(rng) -> xr.DataTree:
    words = ["[CLS]", "the", "cat", "sat", "down", "[SEP]"]
    site = _dense_site(rng, {"layer": 2, "head": 3, "query": 6, "key": 6}, attrs={"attention_type": "self", "causal": 0})
    site = site.assign_coords(
        query_label=("query", _tokens(words)), key_label=("key", _tokens(words)),
        query_position=("query", np.arange(6)), key_position=("key", np.arange(6)),
    )
    return xr.DataTree.from_dict({"/": _root("Encoder self-attention of a tiny BERT-like model.", model_name="toy-bert"), "/encoder/self": site})


def _build_padded_batch(rng) -> xr.DataTree:
    texts = [["[CLS]", "hello", "world", "again", "[SEP]"], ["[CLS]", "hi", "[SEP]", "[PAD]", "[PAD]"]]
    real = np.array([[True] * 5, [True, True, True, False, False]])
    sizes = {"sample": 2, "layer": 1, "head": 2, "query": 5, "key": 5}
    logits = rng.normal(scale=2.0, size=tuple(sizes.values()))
    logits = np.where(real[:, None, None, None, :], logits, -np.inf)
    weights = softmax(logits) * real[:, None, None, :, None]  # padding queries attend nowhere
    site = xr.Dataset(
        {"weights": (tuple(sizes), weights.astype(np.float32))},
        coords={
            "layer": [0], "head": [0, 1],
            "query_label": (("sample", "query"), _tokens(texts)), "key_label": (("sample", "key"), _tokens(texts)),
            "query_mask": (("sample", "query"), real), "key_mask": (("sample", "key"), real),
        },
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0},
    )
    return xr.DataTree.from_dict({"/": _root("Two texts of different lengths in one batch, with padding masks.", model_name="toy-bert"), "/encoder/self": site})


def _build_encoder_decoder(rng) -> xr.DataTree:
    enc_groups = ["text"] * 3 + ["robot0_eef_pos"] + ["agentview_image"] * 3
    dec_groups = ["text"] * 2 + ["robot0_eef_pos_past_traj"] * 3
    enc_labels = [f"{g}:{i}" for i, g in enumerate(enc_groups)]
    dec_labels = [f"{g}:{i}" for i, g in enumerate(dec_groups)]
    layers = {"layer": 2, "head": 2}
    encoder = _dense_site(rng, {**layers, "query": 7, "key": 7}, attrs={"attention_type": "self", "causal": 0}).assign_coords(
        query_label=("query", _tokens(enc_labels)), key_label=("key", _tokens(enc_labels)),
        query_group=("query", _tokens(enc_groups)), key_group=("key", _tokens(enc_groups)))
    decoder = _dense_site(rng, {**layers, "query": 5, "key": 5}, attrs={"attention_type": "self", "causal": 1}, causal=True).assign_coords(
        query_label=("query", _tokens(dec_labels)), key_label=("key", _tokens(dec_labels)),
        query_group=("query", _tokens(dec_groups)), key_group=("key", _tokens(dec_groups)))
    cross = _dense_site(rng, {**layers, "query": 5, "key": 7}, attrs={"attention_type": "cross", "causal": 0, "key_site": "encoder/self"}).assign_coords(
        query_label=("query", _tokens(dec_labels)), key_label=("key", _tokens(enc_labels)),
        query_group=("query", _tokens(dec_groups)), key_group=("key", _tokens(enc_groups)))
    return xr.DataTree.from_dict({
        "/": _root("Encoder-decoder transformer over multimodal token groups.", model_name="toy-seq2seq"),
        "/encoder/self": encoder, "/decoder/self": decoder, "/decoder/cross": cross,
    })


def _graph(rng, nodes: int, extra_edges: int):
    pairs = {(i, (i + 1) % nodes) for i in range(nodes)} | {((i + 1) % nodes, i) for i in range(nodes)}
    while len(pairs) < 2 * nodes + extra_edges:
        source, target = rng.integers(0, nodes, 2)
        if source != target:
            pairs.add((int(source), int(target)))
    pairs |= {(i, i) for i in range(nodes)}  # self-loops, as GATConv adds them
    source, target = np.array(sorted(pairs, key=lambda p: (p[1], p[0]))).T
    return source, target


def _edge_softmax(rng, leading: tuple, target: np.ndarray, groups: int) -> np.ndarray:
    weights = np.exp(rng.normal(size=leading + target.shape))
    flat = weights.reshape(-1, target.size)
    for row in flat:
        row /= np.bincount(target, weights=row, minlength=groups)[target]
    return flat.reshape(weights.shape).astype(np.float32)


def _build_edge(rng) -> xr.DataTree:
    nodes = 6
    source, target = _graph(rng, nodes, 4)
    weights = _edge_softmax(rng, (2, 2), target, nodes)
    angle = np.linspace(0, 2 * np.pi, nodes, endpoint=False)
    site = xr.Dataset(
        {"weights": (("layer", "head", "edge"), weights)},
        coords={
            "layer": [0, 1], "head": [0, 1], "source": ("edge", source), "target": ("edge", target),
            "node_label": ("node", _tokens([f"sensor {i}" for i in range(nodes)])),
            "node_x": ("node", np.cos(angle)), "node_y": ("node", np.sin(angle)),
        },
        attrs={"layout": "edge", "edge_node_dim": "node", "normalization": "softmax", "normalized_dim": "key",
               "attention_type": "self", "causal": 0, "self_loops_added": 1},
    )
    return xr.DataTree.from_dict({"/": _root("Graph attention (GAT-style) on a 6-node graph with self-loops.", model_name="toy-gat"), "/gat": site})


def _build_edge_time(rng) -> xr.DataTree:
    nodes, steps = 5, 4
    source, target = _graph(rng, nodes, 2)
    spatial = xr.Dataset(
        {"weights": (("sample", "layer", "time", "edge"), _edge_softmax(rng, (1, 1, steps), target, nodes))},
        coords={"layer": [0], "time": np.arange(steps), "source": ("edge", source), "target": ("edge", target),
                "node_label": ("node", _tokens([f"n{i}" for i in range(nodes)]))},
        attrs={"layout": "edge", "edge_node_dim": "node", "normalization": "softmax", "normalized_dim": "key",
               "attention_type": "self", "causal": 0, "self_loops_added": 0},
    ).assign_coords(node=np.arange(nodes))
    # Temporal attention: each spatial node attends over time steps; edges join time steps.
    t_source, t_target = np.array([(s, t) for t in range(steps) for s in range(steps)]).T
    temporal = xr.Dataset(
        {"weights": (("sample", "layer", "node", "edge"), _edge_softmax(rng, (1, 1, nodes), t_target, steps))},
        coords={"layer": [0], "node": np.arange(nodes), "time": np.arange(steps), "source": ("edge", t_source), "target": ("edge", t_target)},
        attrs={"layout": "edge", "edge_node_dim": "time", "normalization": "softmax", "normalized_dim": "key",
               "attention_type": "self", "causal": 0, "max_temporal_distance": -1},
    )
    return xr.DataTree.from_dict({
        "/": _root("Spatio-temporal graph model (SPIN-style): spatial attention on graph edges per time step, temporal attention over time-step edges.", model_name="toy-spin"),
        "/spatial": spatial, "/temporal": temporal,
    })


def _build_steps(rng) -> xr.DataTree:
    residues, steps = 10, (100, 200, 300)
    coords = rng.normal(scale=6.0, size=(residues, 3)).cumsum(axis=0) / 2
    distance = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    sizes = (len(steps), 2, 2, residues, residues)
    scalar = rng.normal(size=sizes) - 1.0
    gamma = np.array([0.5, 1.0, 1.5])[:, None, None, None, None]
    bias = -gamma * np.log1p(np.exp(4.0 - distance))[None, None, None]  # all negative: high overlap is most negative
    bias = np.broadcast_to(bias, sizes)
    logits = scalar + bias
    dims = ("step", "layer", "head", "query", "key")
    labels = _tokens([f"R{i}" for i in range(residues)])
    site = xr.Dataset(
        {
            "weights": (dims, softmax(logits).astype(np.float32)),
            "logits": (dims, logits.astype(np.float32)),
            "bias": (dims, bias.astype(np.float32)),
            "distance": (("query", "key"), distance.astype(np.float32), {"role": "pairwise", "units": "angstrom", "long_name": "C-alpha distance"}),
        },
        coords={"step": np.array(steps, dtype=np.int64), "layer": [0, 1], "head": [0, 1], "query_label": ("query", labels), "key_label": ("key", labels)},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0},
    )
    return xr.DataTree.from_dict({"/": _root("Protein model (IGA-style): logits, geometric bias, weights and C-alpha distances, every 100 training steps.", model_name="toy-iga"), "/trunk/iga": site})


def _build_image(rng) -> xr.DataTree:
    grid, patch = 4, 7
    yy, xx = np.mgrid[0:28, 0:28]
    image = np.exp(-(((yy - 14) / 6.0) ** 2 + ((xx - 14) / 3.0) ** 2)).astype(np.float32)  # a blob "1"
    tokens = 1 + grid * grid
    site = _dense_site(rng, {"layer": 2, "head": 2, "query": tokens, "key": tokens}, attrs={"attention_type": "self", "causal": 0, "patch_grid": [grid, grid], "patch_size": [patch, patch]}, with_logits=False)
    rows = np.concatenate([[-1], np.repeat(np.arange(grid), grid)])
    cols = np.concatenate([[-1], np.tile(np.arange(grid), grid)])
    labels = _tokens(["[CLS]"] + [f"patch ({r},{c})" for r, c in zip(rows[1:], cols[1:])])
    site = site.assign_coords(query_label=("query", labels), key_label=("key", labels),
                              query_patch_row=("query", rows), query_patch_col=("query", cols),
                              key_patch_row=("key", rows), key_patch_col=("key", cols))
    site["image"] = xr.DataArray(image, dims=("image_row", "image_col"), attrs={"role": "image", "long_name": "input image (MNIST-like, 28x28)"})
    return xr.DataTree.from_dict({"/": _root("ViT on a 28x28 image with 7x7 patches and a CLS token.", model_name="toy-vit"), "/encoder/self": site})


def _build_frames(rng) -> xr.DataTree:
    frames, per_frame = 5, 3
    tokens = frames * per_frame
    groups = np.repeat(np.arange(frames), per_frame)
    sizes = {"layer": 1, "head": 4, "query": tokens, "key": tokens}
    logits = rng.normal(size=tuple(sizes.values())) - 3.0
    logits[..., :per_frame] += np.array([4.0, 0.5, 2.0, -0.5])[None, :, None, None]  # heads with a sink on frame 0
    site = xr.Dataset(
        {"weights": (tuple(sizes), softmax(logits).astype(np.float32)), "logits": (tuple(sizes), logits.astype(np.float32))},
        coords={"layer": [3], "head": np.arange(4),
                "query_group": ("query", groups), "key_group": ("key", groups),
                "query_label": ("query", _tokens([f"f{g}t{i % per_frame}" for i, g in enumerate(groups)])),
                "key_label": ("key", _tokens([f"f{g}t{i % per_frame}" for i, g in enumerate(groups)]))},
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 0, "group_kind": "frame"},
    )
    return xr.DataTree.from_dict({"/": _root("Video model: token attention with tokens grouped by frame (attention-sink analysis).", model_name="toy-video"), "/blocks": site})


_DECODER_WORDS = ["<s>", "The", " cat", " sat", " on", " the", " warm", " mat"]
_DECODER_PIECES = ["<s>", "The", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġwarm", "Ġmat"]


def _causal_decoder(rng, layers: int = 2, heads: int = 2) -> tuple[np.ndarray, dict]:
    """Causal softmax weights (layer, head, query, key) of an 8-token decoder, and its token coordinates."""
    tokens = len(_DECODER_WORDS)
    logits = rng.normal(scale=2.0, size=(layers, heads, tokens, tokens))
    logits[..., 0] += 2.0  # a sink on the first token, as decoders have
    logits = np.where(np.triu(np.ones((tokens, tokens), bool), k=1), -np.inf, logits)
    coords = {
        "query_label": ("query", _tokens(_DECODER_WORDS)), "key_label": ("key", _tokens(_DECODER_WORDS)),
        "query_position": ("query", np.arange(tokens)), "key_position": ("key", np.arange(tokens)),
    }
    return softmax(logits).astype(np.float32), coords


def _decoder_attrs(**attrs) -> dict:
    return {"normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 1, "describes": "decoder/self", **attrs}


def _build_topk(rng) -> xr.DataTree:
    from attnformat.reductions import top_k

    weights, coords = _causal_decoder(rng)
    k = 3
    kept, index, omitted = top_k(weights, k, key_mask=np.tril(np.ones(weights.shape[-2:], bool)))
    leading = ("layer", "head", "query")
    topk = xr.Dataset(
        {"weights": (leading + ("rank",), kept), "key_index": (leading + ("rank",), index, {"role": "per_query"}),
         "omitted_weight": (leading, omitted, {"role": "per_query"})},
        coords={"layer": [0, 1], "head": [0, 1], **coords},
        attrs={"layout": "topk", **_decoder_attrs(top_k=k, key_count=weights.shape[-1])},
    )
    # The dense maps of one chosen layer, beside the top-k rows of every layer.
    dense = xr.Dataset({"weights": (("layer", "head", "query", "key"), weights[1:])}, coords={"layer": [1], "head": [0, 1], **coords},
                       attrs={"layout": "dense", **_decoder_attrs()})
    return xr.DataTree.from_dict({
        "/": _root("Causal decoder: the 3 largest weights of every query row for every layer and head (top-k layout), and the dense maps of layer 1.", model_name="toy-gpt"),
        "/decoder/self": dense, "/decoder/self_topk": topk,
    })


def _build_statistics(rng) -> xr.DataTree:
    from attnformat.reductions import row_statistics

    weights, coords = _causal_decoder(rng, layers=3, heads=4)
    window = 2
    statistics = row_statistics(weights, local_window=window, key_mask=np.tril(np.ones(weights.shape[-2:], bool)))
    leading = ("layer", "head", "query")
    site = xr.Dataset(
        {name: (leading, values, {"role": "per_query"}) for name, values in statistics.items()},
        coords={"layer": np.arange(3), "head": np.arange(4), **coords},
        attrs={"layout": "statistics", **_decoder_attrs(key_count=weights.shape[-1], local_window=window)},
    )
    site["entropy"].attrs["units"] = "nat"
    return xr.DataTree.from_dict({
        "/": _root("Causal decoder: per-row statistics (entropy, max, sink, local weight, top key) of every layer and head.", model_name="toy-gpt"),
        "/decoder/self_stats": site,
    })


def _build_head_mean(rng) -> xr.DataTree:
    words = ["[CLS]", "a", "small", "dog", "barks", "[SEP]"]
    site = _dense_site(rng, {"layer": 2, "head": 4, "query": 6, "key": 6}, attrs={"attention_type": "self", "causal": 0}, with_logits=False)
    mean = site[["weights"]].mean("head").astype(np.float32).drop_vars("head", errors="ignore")
    mean.attrs = {**site.attrs, "head_reduction": "mean", "describes": "encoder/self"}
    mean = mean.assign_coords(query_label=("query", _tokens(words)), key_label=("key", _tokens(words)))
    return xr.DataTree.from_dict({
        "/": _root("Encoder self-attention averaged over heads: one map per layer.", model_name="toy-bert"),
        "/encoder/self_mean": mean,
    })


def _build_generation(rng) -> xr.DataTree:
    prompt = ["<s>", "The", " cat"]
    prompt_pieces = ["<s>", "The", "Ġcat"]
    generated = [[" sat", " on", " it"], [" ran", " away", "."]]  # two returned sequences (num_return_sequences=2)
    generated_pieces = [["Ġsat", "Ġon", "Ġit"], ["Ġran", "Ġaway", "."]]
    tokens = len(prompt) + 3
    labels = _tokens([prompt + g for g in generated])
    pieces = _tokens([prompt_pieces + g for g in generated_pieces])
    steps = np.array([-1] * len(prompt) + [0, 1, 2])
    sizes = {"sample": 2, "layer": 2, "head": 2, "query": tokens, "key": tokens}
    logits = rng.normal(scale=2.0, size=tuple(sizes.values()))
    logits = np.where(np.triu(np.ones((tokens, tokens), bool), k=1), -np.inf, logits)
    site = xr.Dataset(
        {"weights": (tuple(sizes), softmax(logits).astype(np.float32))},
        coords={
            "layer": [0, 1], "head": [0, 1],
            "query_label": (("sample", "query"), labels), "key_label": (("sample", "key"), labels),
            "query_token": (("sample", "query"), pieces), "key_token": (("sample", "key"), pieces),
            "query_position": ("query", np.arange(tokens)), "key_position": ("key", np.arange(tokens)),
            "query_generation_step": ("query", steps), "key_generation_step": ("key", steps),
        },
        attrs={"layout": "dense", "normalization": "softmax", "normalized_dim": "key", "attention_type": "self", "causal": 1,
               "describes": "decoder/self"},
    )
    return xr.DataTree.from_dict({
        "/": _root("Generation: a 3-token prompt and 3 generated tokens, two returned sequences, as one causal map over prompt + generated tokens.", model_name="toy-gpt"),
        "/decoder/self": site,
    })


def example_path(name: str) -> Path:
    """Path of an example file, written on first use into a per-version cache directory.

    Examples
    --------
    >>> example_path("dense").name
    'dense.zarr'
    """
    # Keyed by the package and the format version: examples written by an older format (without
    # chunk manifests, say) are never served to a newer reader.
    user = os.getuid() if hasattr(os, "getuid") else 0
    default = Path(tempfile.gettempdir()) / f"attnformat-examples-{__version__}-format{FORMAT_VERSION}-{user}"
    cache = Path(os.environ.get("ATTNFORMAT_EXAMPLES_DIR", default))
    path = cache / f"{name}.zarr"
    if not path.exists():
        from attnformat.saving import save  # only when writing: a path that exists costs no writer import

        cache.mkdir(parents=True, exist_ok=True)
        # Written under a private name and renamed into place: processes racing to make the same
        # example each write their own copy, and the first rename wins.
        staged = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}-")) / f"{name}.zarr"
        save(build(name), staged)
        try:
            os.rename(staged, path)
        except OSError:
            if not path.exists():
                raise
        finally:
            shutil.rmtree(staged.parent, ignore_errors=True)
    return path
