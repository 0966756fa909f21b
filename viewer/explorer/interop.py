"""A file's maps as bertviz and CircuitsVis take them, for people who already use those tools.

Both functions return keyword arguments, so the call is one line::

    from bertviz import head_view, model_view
    head_view(**to_bertviz("bert.attn.zarr", tensors="torch"), html_action="return")

    import circuitsvis as cv
    cv.attention.attention_patterns(**to_circuitsvis("bert.attn.zarr", layer=3))
    cv.attention.attention_heads(**to_circuitsvis("bert.attn.zarr", layer=3), mask_upper_tri=False)

What they hold is read through the viewer's own preparer (:func:`attnformat.viewer.select`): one
sample (and step), padding left out, the file's token labels, top-k sites densified. Both tools
draw numbers only, so absent cells (causal upper triangle not computed, pairs a top-k site did
not keep, maps not captured: NaN in the file) become 0 (nothing drawn). Neither tool reads a
signed variable sensibly; they get ``weights`` unless told otherwise.

bertviz works on torch tensors (it stacks them with ``torch.stack``): ``tensors="torch"`` returns
``torch.Tensor`` objects, importing torch only then (the viewer never imports torch by itself);
the default ``"numpy"`` returns arrays (``torch.from_numpy(a)`` each, to hand them over yourself).
CircuitsVis takes numpy arrays as they are.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from attnformat.errors import SelectionError

__all__ = ["to_bertviz", "to_circuitsvis"]

TENSOR_KINDS = ("numpy", "torch")


def to_bertviz(
    source,
    *,
    site: str | None = None,
    sample=None,
    step=None,
    variable: str = "weights",
    layers: Sequence[int] | None = None,
    tensors: str = "numpy",
    storage_options: Mapping[str, Any] | None = None,
) -> dict:
    """Keyword arguments for bertviz's ``head_view`` and ``model_view``, from a file.

    A self-attention site gives ``{"attention": (layer maps...), "tokens": [...]}``. A
    cross-attention site (``attention_type="cross"`` with a ``key_site``), or a file whose only
    cross site is that, gives bertviz's encoder-decoder form: ``encoder_attention``,
    ``decoder_attention``, ``cross_attention``, ``encoder_tokens``, ``decoder_tokens``; the
    encoder is the cross site's ``key_site`` and the decoder the self-attention site in the same
    group as the cross site. Every layer map is ``(1, heads, query, key)``, as bertviz expects
    from ``output_attentions``; absent cells (NaN) are 0.

    Parameters
    ----------
    source
        Path or URL of an attention file, or an opened tree.
    site
        The site to export; may be omitted when the file has one site, or one cross site.
    sample
        Which sample (text) of the batch, as the viewer's selectors take it (a label, or an
        integer matching the ``sample`` coordinate); default: the first.
    step
        Which training step (its label, e.g. ``200``), for files with a ``step`` dimension;
        default: the first.
    variable
        The variable to export (``"weights"``: bertviz draws probabilities).
    layers
        Positions of the layers to export (default: all).
    tensors
        ``"numpy"`` (default) or ``"torch"`` (imports torch now; bertviz needs torch tensors).
    storage_options
        fsspec options for a URL.

    Returns
    -------
    dict
        Keyword arguments: ``head_view(**result)`` or ``model_view(**result)``.

    Raises
    ------
    attnformat.SelectionError
        The file has several sites and none was named, or a selector names nothing.

    Examples
    --------
    >>> import attnformat
    >>> kwargs = to_bertviz(attnformat.example_path("dense"))
    >>> sorted(kwargs), len(kwargs["attention"]), kwargs["attention"][0].shape
    (['attention', 'tokens'], 2, (1, 3, 6, 6))
    >>> kwargs = to_bertviz(attnformat.example_path("encoder-decoder"))
    >>> sorted(kwargs)[:2], kwargs["cross_attention"][0].shape[-2:] == (len(kwargs["decoder_tokens"]), len(kwargs["encoder_tokens"]))
    (['cross_attention', 'decoder_attention'], True)
    """
    if tensors not in TENSOR_KINDS:
        raise ValueError(f"tensors must be one of {', '.join(TENSOR_KINDS)}, not {tensors!r}")
    tree = _open(source, storage_options)
    node = _chosen_site(tree, site)
    convert = _tensor_maker(tensors)
    options = dict(sample=sample, step=step, variable=variable, layers=layers)
    if node.attrs.get("attention_type") != "cross":
        maps, query, _ = _layer_maps(node, **options)
        return {"attention": tuple(convert(m) for m in maps), "tokens": query}
    encoder = _key_site(tree, node)
    decoder = _decoder_site(tree, node)
    cross, decoder_tokens, encoder_tokens = _layer_maps(node, **options)
    encoder_maps, _, _ = _layer_maps(encoder, **options)
    decoder_maps, _, _ = _layer_maps(decoder, **options)
    return {
        "encoder_attention": tuple(convert(m) for m in encoder_maps),
        "decoder_attention": tuple(convert(m) for m in decoder_maps),
        "cross_attention": tuple(convert(m) for m in cross),
        "encoder_tokens": encoder_tokens,
        "decoder_tokens": decoder_tokens,
    }


def to_circuitsvis(
    source,
    *,
    site: str | None = None,
    layer=0,
    sample=None,
    step=None,
    heads: Sequence[int] | None = None,
    variable: str = "weights",
    storage_options: Mapping[str, Any] | None = None,
) -> dict:
    """Keyword arguments for CircuitsVis's ``attention_patterns`` and ``attention_heads``, from a file.

    ``{"tokens": [...], "attention": array (heads, destination, source)}`` for one layer of a
    self-attention site: CircuitsVis shows one token list on both sides, so cross-attention is
    refused. Absent cells (NaN) are 0. ``attention_heads`` masks the upper triangle unless told
    otherwise; for a bidirectional site pass ``mask_upper_tri=False`` (the site's ``causal``
    attribute says which it is).

    Parameters
    ----------
    source
        Path or URL of an attention file, or an opened tree.
    site
        The site; may be omitted when the file has one site.
    layer
        The layer (a label or position, as the viewer's selectors take it).
    sample
        Which sample (text) of the batch (as in :func:`to_bertviz`); default: the first.
    step
        Which training step (its label), for files with a ``step`` dimension; default: the first.
    heads
        Positions of the heads to export (default: all).
    variable
        The variable to export (``"weights"``).
    storage_options
        fsspec options for a URL.

    Returns
    -------
    dict
        ``attention_patterns(**result)``, ``attention_heads(**result)``.

    Raises
    ------
    attnformat.SelectionError
        A cross-attention site, several sites and none named, or a selector naming nothing.

    Examples
    --------
    >>> import attnformat
    >>> kwargs = to_circuitsvis(attnformat.example_path("dense"), layer=1)
    >>> kwargs["attention"].shape, kwargs["tokens"][:2]
    ((3, 6, 6), ['[CLS]', 'the'])
    """
    from attnformat.viewer.selection import select

    node = _chosen_site(_open(source, storage_options), site)
    if node.attrs.get("attention_type") == "cross":
        raise SelectionError(f"site {node.path.strip('/')} is cross-attention: CircuitsVis shows one token list on both "
                             "sides; use to_bertviz, whose head_view draws encoder-decoder attention")
    selectors = _selectors(node, variable, sample=sample, step=step)
    chosen = select(node, variable, keep=_keep_head(node, variable), layer=layer, **selectors)
    values = _heads_first(chosen)
    if heads is not None:
        values = values[np.asarray(heads, dtype=np.int64)]
    return {"tokens": list(chosen.query_labels), "attention": _absent_as_zero(values)}


# -- reading ------------------------------------------------------------------------------------


def _open(source, storage_options):
    from attnformat.viewer.selection import open_source

    return open_source(source, storage_options)


def _chosen_site(tree, site):
    from attnformat.reading import get_site, site_paths

    if site is not None or len(site_paths(tree.root)) == 1:
        return get_site(tree.root, site)
    crosses = [path for path in site_paths(tree.root)
               if tree.root[path].attrs.get("attention_type") == "cross" and tree.root[path].attrs.get("key_site")]
    if len(crosses) == 1:
        return tree.root[crosses[0]]
    return get_site(tree.root, None)  # raises, listing the sites


def _key_site(tree, cross):
    from attnformat.reading import get_site

    return get_site(tree.root, str(cross.attrs["key_site"]))


def _decoder_site(tree, cross):
    from attnformat.reading import site_paths

    group = cross.path.strip("/").rpartition("/")[0]
    found = [path for path in site_paths(tree.root)
             if path.rpartition("/")[0] == group and tree.root[path].attrs.get("attention_type", "self") == "self"
             and path != str(cross.attrs.get("key_site", "")).strip("/")]
    if len(found) != 1:
        raise SelectionError(f"site {cross.path.strip('/')}: bertviz's encoder-decoder view needs the decoder's "
                             f"self-attention site next to it; found {len(found)} in group {group or '/'}")
    return tree.root[found[0]]


def _selectors(node, variable: str, *, sample, step) -> dict:
    dims = node[variable].dims if variable in node.data_vars else ()
    # Unset, select() takes the first element (by position, whatever its label).
    given = {"sample": sample, "step": step}
    return {dim: value for dim, value in given.items() if dim in dims and value is not None}


def _keep_head(node, variable: str) -> tuple:
    return ("head",) if variable in node.data_vars and "head" in node[variable].dims else ()


def _heads_first(chosen) -> np.ndarray:
    """(heads, query, key) from a selection; a site storing the head mean gives one 'head'."""
    values = np.asarray(chosen.values, dtype=np.float32)
    if chosen.dims[:1] != ("head",):
        values = values[None]
    if values.ndim != 3:
        raise SelectionError(f"site {chosen.site}: {chosen.variable} is not a query x key map per head "
                             f"(dimensions {', '.join(chosen.dims)})")
    return values


def _layer_maps(node, *, sample, step, variable, layers):
    from attnformat.viewer.selection import select

    if variable not in node.data_vars or "layer" not in node[variable].dims:
        raise SelectionError(f"site {node.path.strip('/')}: no variable {variable!r} with a layer dimension")
    count = node[variable].sizes["layer"]
    positions = range(count) if layers is None else [int(layer) for layer in layers]
    selectors = _selectors(node, variable, sample=sample, step=step)
    keep = _keep_head(node, variable)
    maps, query, key = [], [], []
    for position in positions:
        if not -count <= position < count:
            raise SelectionError(f"site {node.path.strip('/')}: layer position {position} is out of range ({count} layers)")
        # Positions, not labels: select takes integers as labels of a labelled dimension.
        label = node[variable]["layer"].values[position] if "layer" in node[variable].coords else position
        chosen = select(node, variable, keep=keep, layer=label, **selectors)
        maps.append(_absent_as_zero(_heads_first(chosen))[None])
        query, key = list(chosen.query_labels), list(chosen.key_labels)
    return maps, query, key


def _absent_as_zero(values: np.ndarray) -> np.ndarray:
    return np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def _tensor_maker(tensors: str):
    if tensors == "numpy":
        return lambda values: values
    # Imported here, on request only: the viewer itself never imports an ML framework.
    try:
        torch = importlib.import_module("torch")
    except ImportError as error:
        from attnformat.errors import MissingDependencyError

        raise MissingDependencyError("tensors='torch' needs torch (pip install torch); or pass tensors='numpy' "
                                     "and convert with torch.from_numpy") from error
    return torch.from_numpy

