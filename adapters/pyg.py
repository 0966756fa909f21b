"""Capture attention on graph edges from PyTorch Geometric models (GAT, GATv2, TransformerConv, any MessagePassing).

Attention in a message-passing layer is one weight per edge (and head), computed inside the
layer and handed to ``message``. While the ``with`` block runs, each captured layer's
``message`` method is wrapped on that instance only (the seed tools replaced it by hand; here
it is put back on exit, also after an exception) and a ``propagate`` pre-hook notes the edges
the layer really used, including the self-loops GAT layers add. Each call writes one layer's
weights to an edge-layout site: ``source``/``target`` per edge (key node -> query node),
``self_loops_added`` when the layer adds self-loops.

Spatio-temporal models (SPIN-style) are covered by ``leading_dims``: weights shaped
[sample, time, edge, head] give a spatial site with a ``time`` dimension; temporal attention
over time-step edges (from :func:`temporal_edge_index`) gives a site whose edges join time steps
(``edge_node_dim="time"``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch_geometric.nn import MessagePassing
from torch_geometric.nn.conv import GATConv, GATv2Conv, TransformerConv

from attnformat.adapters.arrays import to_numpy
from attnformat.adapters.errors import CaptureShapeError, CaptureStateError, UnsupportedModelError
from attnformat.adapters.recorder import Recorder
from attnformat.adapters.sessions import HookSession, layer_numbers, site_names_from_paths


def _message_argument(name: str) -> Callable:
    def extract(module, message_kwargs, message_output):
        return message_kwargs[name]

    extract.__doc__ = f"the message argument {name!r}"
    return extract


def _module_attribute(name: str) -> Callable:
    def extract(module, message_kwargs, message_output):
        return getattr(module, name)

    extract.__doc__ = f"the attribute {name!r} message() sets"
    return extract


#: Where each known layer keeps its attention weights while ``message`` runs.
KNOWN_LAYERS: dict[type, Callable] = {
    GATConv: _message_argument("alpha"),
    GATv2Conv: _message_argument("alpha"),
    TransformerConv: _module_attribute("_alpha"),
}
_SUPPORTED = ", ".join(cls.__name__ for cls in KNOWN_LAYERS) + " (or any MessagePassing layer given weights=...)"


def temporal_edge_index(steps: int, *, max_distance: int | None = None, causal: bool = False) -> torch.Tensor:
    """Edges between time steps for temporal attention: ``[2, E]``, source (key step) -> target (query step).

    Every step attends to every step (itself included), to those at most ``max_distance``
    away, and with ``causal`` only to earlier steps. Edges are sorted by target.

    Examples
    --------
    >>> temporal_edge_index(3, causal=True).tolist()
    [[0, 0, 1, 0, 1, 2], [0, 1, 1, 2, 2, 2]]
    """
    pairs = [(source, target) for target in range(steps) for source in range(steps)
             if (max_distance is None or abs(target - source) <= max_distance) and (not causal or source <= target)]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T.contiguous()


def find_attention_layers(model: torch.nn.Module, modules=None) -> dict[str, MessagePassing]:
    """The message-passing layers to capture, by module path.

    ``modules`` is None (every known attention layer: GATConv, GATv2Conv, TransformerConv and
    their subclasses), a MessagePassing class (all its instances), or a list of module paths or
    module instances.

    Examples
    --------
    >>> from torch_geometric.nn import GATConv
    >>> import torch
    >>> model = torch.nn.ModuleList([GATConv(4, 4, heads=2, concat=False), GATConv(4, 2)])
    >>> list(find_attention_layers(model))
    ['0', '1']
    """
    named = {name: module for name, module in model.named_modules() if isinstance(module, MessagePassing)}
    if modules is None:
        return {name: m for name, m in named.items() if isinstance(m, tuple(KNOWN_LAYERS))}
    if isinstance(modules, type):
        return {name: m for name, m in named.items() if isinstance(m, modules)}
    chosen = {}
    for item in modules:
        if isinstance(item, str):
            if item not in named:
                raise UnsupportedModelError(f"{type(model).__name__} has no MessagePassing layer at {item!r}; layers: {sorted(named)}")
            chosen[item] = named[item]
        else:
            path = next((name for name, m in named.items() if m is item), None)
            if path is None:
                raise UnsupportedModelError(f"{type(item).__name__} is not a MessagePassing layer of {type(model).__name__}")
            chosen[path] = item
    return chosen


def capture(
    model: torch.nn.Module,
    destination: str | os.PathLike | Recorder,
    *,
    modules=None,
    weights: str | Callable | None = None,
    site_names: Mapping[str, str] | Callable[[str], str] | None = None,
    leading_dims: Sequence[str] | Mapping[str, Sequence[str]] = (),
    tokens: Mapping[str, Mapping] | None = None,
    repeat_dim: Mapping[str, str] | None = None,
    model_name: str | None = None,
    description: str | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
) -> MessagePassingCapture:
    """Capture per-edge attention weights of graph layers during a ``with`` block.

    Parameters
    ----------
    model
        A module holding PyTorch Geometric ``MessagePassing`` layers (or one layer).
    destination
        Path of the attention file, or a :class:`~attnformat.adapters.Recorder`.
    modules
        Which layers: None for every GATConv/GATv2Conv/TransformerConv, a MessagePassing
        subclass, or a list of module paths or instances.
    weights
        How to read the weights in ``message``: the name of a ``message`` argument
        (``"alpha"``), or ``function(module, message_kwargs, message_output) -> tensor`` for
        layers that compute their weights inside ``message``. Needed for layers not in
        :data:`KNOWN_LAYERS`.
    site_names
        Rename sites (module path or derived name -> site name), as in the torch adapter.
    leading_dims
        Names of the weights' axes before the edge axis (``("sample", "time")`` for spatial
        attention computed for every time step), for all sites or per site.
    tokens
        Per site, keywords of :meth:`~attnformat.adapters.Recorder.describe`: ``node_labels``,
        ``nodes``, ``edge_node_dim`` (``"time"`` for temporal attention), ``times``, ``attrs``
        (``causal``, ``max_temporal_distance``...).
    repeat_dim
        Per site, a dimension that counts repeated calls of the same layer in one block
        (``{"spatial": "time"}`` when a model runs a layer once per time step); otherwise a
        layer called twice is an error.

    Examples
    --------
    >>> import torch, tempfile, pathlib, attnformat
    >>> from torch_geometric.nn import GATConv
    >>> conv = GATConv(4, 3, heads=2).eval()
    >>> x, edge_index = torch.randn(5, 4), torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "gat.attn.zarr"
    >>> with capture(conv, out):
    ...     _ = conv(x, edge_index)
    >>> site = attnformat.open(out)["gat"]
    >>> site["weights"].sizes["edge"], site.attrs["self_loops_added"]
    (9, 1)
    """
    layers = find_attention_layers(model, modules)
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no graph attention layer found. Supported: {_SUPPORTED}. For other attention code, "
            f"log the weights yourself with attnformat.adapters.Recorder (layout='edge')")
    extractors = {}
    for path, layer in layers.items():
        if weights is None:
            known = next((extract for cls, extract in KNOWN_LAYERS.items() if isinstance(layer, cls)), None)
            if known is None:
                raise UnsupportedModelError(f"{path or type(layer).__name__}: {type(layer).__name__} is not a known attention layer "
                                            f"({_SUPPORTED}); pass weights='<message argument>' or weights=function(module, kwargs, output)")
            extractors[path] = known
        else:
            extractors[path] = _message_argument(weights) if isinstance(weights, str) else weights
    options = {"model_name": model_name or type(model).__name__, "model_framework": f"torch_geometric {_pyg_version()}",
               "model_adapter": "attnformat.adapters.pyg", "description": description, "overwrite": overwrite, "dtype": dtype}
    default_name = "gat" if len(layers) == 1 and isinstance(next(iter(layers.values())), (GATConv, GATv2Conv)) else "graph_attention"
    names = site_names_from_paths(layers, site_names, default=default_name)
    return MessagePassingCapture(layers, extractors, names, destination, leading_dims=leading_dims, tokens=tokens,
                                 repeat_dim=repeat_dim, recorder_options=options)


class MessagePassingCapture(HookSession):
    """The context manager :func:`capture` returns; ``sites`` maps module paths to (site, layer).

    Examples
    --------
    >>> import tempfile, pathlib, torch
    >>> from torch_geometric.nn import GATConv
    >>> model = torch.nn.ModuleList([GATConv(4, 4), GATConv(4, 4)])
    >>> capture(model, pathlib.Path(tempfile.mkdtemp()) / "x.attn.zarr", site_names=lambda path: "gat").sites
    {'0': ('gat', 0), '1': ('gat', 1)}
    """

    def __init__(self, layers, extractors, names, destination, *, leading_dims, tokens, repeat_dim, recorder_options):
        super().__init__(destination, recorder_options=recorder_options)
        self.layers, self.extractors = layers, extractors
        numbers = layer_numbers(names)
        self.sites = {path: (names[path], numbers[path]) for path in layers}
        self.layer_counts = {site: sum(1 for s, _ in self.sites.values() if s == site) for site, _ in self.sites.values()}
        self.leading_dims = dict(leading_dims) if isinstance(leading_dims, Mapping) else {site: tuple(leading_dims) for site, _ in self.sites.values()}
        self.tokens = {site.strip("/"): dict(kw) for site, kw in (tokens or {}).items()}
        self.repeat_dim = dict(repeat_dim or {})
        self._edges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._calls: dict[str, int] = {}
        self._site_edges: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _install(self):
        for path, layer in self.layers.items():
            yield layer.register_propagate_forward_pre_hook(self._edges_hook_for(path))
            yield _MessageWrapper(layer, self._message_hook_for(path))

    def _edges_hook_for(self, path: str):
        layer = self.layers[path]

        def hook(module, inputs):
            edge_index = inputs[0]
            self._edges[path] = _coo(edge_index, flow=getattr(layer, "flow", "source_to_target"), where=f"{self.path}:{self.sites[path][0]}")

        return hook

    def _message_hook_for(self, path: str):
        site, layer_number = self.sites[path]
        extract = self.extractors[path]

        def record(module, message_kwargs, message_output):
            call = self._calls.get(path, 0)
            self._calls[path] = call + 1
            dim = self.repeat_dim.get(site)
            if call and dim is None:
                raise CaptureStateError(f"{self.path}:{site} [layer={layer_number}]: layer {path!r} ran twice in one capture; capture "
                                        f"one forward pass per file, or pass repeat_dim={{{site!r}: 'time'}} if it runs once per time step")
            values = extract(module, message_kwargs, message_output)
            if values is None:
                raise UnsupportedModelError(f"{self.path}:{site} [layer={layer_number}]: the weights extractor returned None in message()")
            selection = {"layer": layer_number}
            if dim is not None:
                selection[dim] = call
            self._log(path, site, to_numpy(values), selection, module)

        return record

    def _log(self, path: str, site: str, values: np.ndarray, selection: dict, module) -> None:
        """Write one call's [leading..., edge, head?] weights as a layer of an edge site."""
        where = f"{self.path}:{site} [" + ", ".join(f"{k}={v}" for k, v in selection.items()) + "]"
        if path not in self._edges:
            raise UnsupportedModelError(f"{where}: message() ran without propagate(); only layers that call self.propagate() are supported")
        source, target = self._edges[path]
        leading = tuple(self.leading_dims.get(site, ()))
        edge_axis = len(leading)
        if values.ndim <= edge_axis or values.shape[edge_axis] != source.size:
            raise CaptureShapeError(f"{where}: weights of shape {values.shape} should have {source.size} edges (as propagate() used) "
                                    f"on axis {edge_axis}, after the leading axes {leading}; name the axes before the edge axis "
                                    f"with leading_dims={{{site!r}: (...)}}")
        trailing = values.shape[edge_axis + 1:]
        if len(trailing) > 1:
            raise CaptureShapeError(f"{where}: weights of shape {values.shape} have more than one axis (heads) after the edges")
        if trailing == (1,):
            values, trailing = values[..., 0], ()
        dims = leading + ("edge",) + (("head",) if trailing else ())  # the recorder puts them in canonical order
        known = self._site_edges.get(site)
        if known is None:
            self._site_edges[site] = (source, target)
            description = dict(self.tokens.get(site, {}))
            attrs = {"attention_type": "self", "causal": 0, "self_loops_added": int(bool(getattr(module, "add_self_loops", False))),
                     "module_class": type(module).__name__, **description.pop("attrs", {})}
            description.update(layout="edge", source=source, target=target, attrs=attrs)
            description.setdefault("layers", list(range(self.layer_counts[site])))
            self.recorder.describe(site, **description)
        elif not (np.array_equal(known[0], source) and np.array_equal(known[1], target)):
            raise CaptureShapeError(f"{where}: the edges differ from those of the site's first layer; one site holds one graph: give "
                                    f"this layer its own site with site_names={{{path!r}: '{site}_{selection['layer']}'}}")
        self.recorder.log(site, weights=values, dims=dims, **selection)


class _MessageWrapper:
    """Wraps one layer's ``message`` on the instance; ``remove()`` puts the original back."""

    def __init__(self, layer: MessagePassing, record: Callable):
        self.layer = layer
        self._had_own = "message" in vars(layer)
        self._own = vars(layer).get("message")
        original = layer.message

        def message(*args, **kwargs):
            output = original(*args, **kwargs)
            record(layer, kwargs, output)
            return output

        message.__wrapped__ = original
        layer.message = message

    def remove(self) -> None:
        if self._had_own:
            self.layer.message = self._own
        else:
            vars(self.layer).pop("message", None)


def _coo(edge_index, *, flow: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) node indices of the edges propagate() was given."""
    if isinstance(edge_index, torch.Tensor) and not edge_index.is_sparse and edge_index.dim() == 2 and edge_index.shape[0] == 2:
        rows = edge_index.detach().cpu().long()
        first, second = rows[0].numpy().copy(), rows[1].numpy().copy()
        return (first, second) if flow == "source_to_target" else (second, first)
    raise UnsupportedModelError(f"{where}: propagate() got a {type(edge_index).__name__}; attention capture needs edge_index as a "
                                f"[2, num_edges] tensor (sparse adjacency runs the fused path, which never calls message())")


def _pyg_version() -> str:
    import torch_geometric

    return torch_geometric.__version__
