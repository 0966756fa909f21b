"""Attention rollout across layers (Abnar & Zuidema, 2020): how much each output token draws on each input token.

For each layer the heads are averaged, the identity is added for the residual connection
(``0.5 * A + 0.5 * I``), rows are renormalised to sum to 1, and the layers' matrices are multiplied
from the first layer up: ``R = A_L ... A_2 A_1``.
"""

from __future__ import annotations

import numpy as np

from attnformat.errors import SelectionError
from attnformat.viewer.colors import color_scale
from attnformat.viewer.docs import documented, register
from attnformat.viewer.groups import draw_one_map
from attnformat.viewer.selection import Selection, resolve_site, select

register(
    rollout_selectors="""
        sample, step, time, node : int or str, optional
            Which sample, training step, time step or node, when the site has them (the first by default).
        head : int, str or {"mean", "max"}, default "mean"
            Heads are averaged per layer (the paper's choice); ``"max"`` takes their maximum, an
            integer or label rolls out one head.
    """,
    residual="""
        residual : bool, default True
            Add the identity for the residual connection (``0.5 * A + 0.5 * I``, renormalised);
            without it the raw layer maps are multiplied.
    """,
)


def rollout_matrices(layers: np.ndarray, *, residual: bool = True) -> np.ndarray:
    """Roll out a ``(layer, query, key)`` stack of head-averaged weights into one ``(query, key)`` matrix.

    NaN (maps not captured) count as 0; a row that sums to 0 stays 0.

    Parameters
    ----------
    layers : numpy.ndarray
        ``(layer, query, key)`` weights, first layer first, with as many queries as keys.
    residual : bool, default True
        Add the identity before renormalising (the residual connection).

    Examples
    --------
    >>> layer = np.array([[0.5, 0.5], [0.0, 1.0]])
    >>> rollout_matrices(np.stack([layer, layer])).tolist()
    [[0.5625, 0.4375], [0.0, 1.0]]
    """
    layers = np.asarray(layers)
    size = layers.shape[-1]
    result = None
    for layer in layers:
        # One float64 copy per layer, changed in place: the same values as the textbook steps
        # (NaN to 0, + I, divide each row by its sum), without a new 2048^2 array per step.
        weights = np.nan_to_num(np.array(layer, dtype=np.float64), copy=False)
        if residual:
            # (A + I) renormalised is the paper's 0.5 * A + 0.5 * I when rows of A sum to 1.
            # Adding 0.0 everywhere, then 1.0 on the diagonal, is exactly A + I (a -0.0 becomes 0.0 too).
            weights += 0.0
            weights.flat[::size + 1] += 1.0
        totals = weights.sum(axis=-1, keepdims=True)
        np.divide(weights, totals, out=weights, where=totals > 0)
        weights[~(totals[:, 0] > 0)] = 0.0  # a row that sums to 0 (or less) stays 0
        result = _first_factor(weights) if result is None else weights @ result
    return np.eye(size) if result is None else result


def _first_factor(weights: np.ndarray) -> np.ndarray:
    """``weights @ I`` (the first layer times the identity the product starts from), without the
    matrix product where that is exact: for finite, non-negative weights each entry of ``W @ I`` is
    ``w * 1`` plus zeros, which is ``w + 0.0``. Why: at 2048 tokens that product cost a second of
    CPU per layer (measured), once per layer since each layer's factor is built alone."""
    if weights.size and np.isfinite(weights).all() and weights.min() >= 0:
        return np.add(weights, 0.0, out=weights)
    return weights @ np.eye(weights.shape[-1])


@documented
def attention_rollout(source, *, site=None, sample=None, step=None, time=None, node=None, head="mean",
                      residual: bool = True, scheduler=None, progress: bool | None = None) -> Selection:
    """Rollout of a self-attention site's weights over all its layers, as a :class:`Selection`.

    Computed as a dask graph: one task per layer reads that layer's maps and reduces its heads
    (in parallel), and a chain of tasks multiplies the layers' matrices in order, so that memory
    holds a few ``(query, key)`` matrices, never every layer at once.

    Parameters
    ----------
    $source
    $site
    $rollout_selectors
    $residual
    scheduler : str or distributed.Client, optional
        ``"threads"`` (default), ``"processes"``, ``"synchronous"``, a ``dask.distributed.Client``
        or a scheduler address (see :mod:`attnformat.compute`).
    progress : bool, optional
        Progress bar on stderr; by default only when stderr is a terminal.

    Returns
    -------
    Selection
        ``values`` is the ``(query, key)`` rollout; ``described["layer"]`` names the layers rolled out.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import attention_rollout
    >>> rolled = attention_rollout(attnformat.example_path("dense"))
    >>> rolled.values.shape, bool(np.allclose(rolled.values.sum(axis=1), 1.0))
    ((6, 6), True)
    """
    selectors = {"head": head, "sample": sample, "step": step, "time": time, "node": node}
    site_node = resolve_site(source, site)
    layers = site_node.coords["layer"].values.tolist() if "layer" in site_node.coords and "layer" in site_node.dims else None
    if layers is None or len(layers) < 2:
        chosen = select(site_node, "weights", keep=("layer",), **selectors)
    else:  # the first layer's selection carries the labels and attributes; the graph does the rest
        chosen = select(site_node, "weights", layer=layers[0], **selectors)
    if chosen.values.shape[-1] != chosen.values.shape[-2] or chosen.attrs.get("attention_type", "self") != "self":
        raise SelectionError(f"rollout needs self-attention with as many queries as keys; site {chosen.site} of "
                             f"{chosen.source} is {chosen.attrs.get('attention_type')} with {chosen.values.shape[-2:]} maps")
    if chosen.attrs.get("normalized_dim", "key") != "key":
        raise SelectionError(f"rollout needs weights normalised over keys; site {chosen.site} of {chosen.source} "
                             f"normalises over {chosen.attrs.get('normalized_dim')}")
    if layers is None or len(layers) < 2:
        stack = chosen.values if "layer" in chosen.dims else chosen.values[None]
        chosen.values = rollout_matrices(stack, residual=residual)
        layers = chosen.kept.get("layer", ["0"])
    else:
        chosen.values = _rolled_out(site_node, layers, selectors, residual, scheduler, progress)
        layers = [str(layer) for layer in layers]
        chosen.kept["layer"] = layers
    chosen.dims = ("query", "key")
    chosen.described["layer"] = f"rollout {layers[0]}..{layers[-1]}" if len(layers) > 1 else f"rollout {layers[0]}"
    return chosen


def _rolled_out(site_node, layers: list, selectors: dict, residual: bool, scheduler, progress) -> np.ndarray:
    """``A_L ... A_1`` as a chain of dask tasks: layer matrices in parallel, products in order."""
    from attnformat import compute

    compute.check_portable(site_node, scheduler)
    where = compute.NodeRef(site_node)
    product = None
    for layer in layers:
        matrix = compute.delayed(_layer_matrix, where, layer, selectors, residual)
        product = matrix if product is None else compute.delayed(_times, matrix, product)
    return compute.run([product], scheduler=scheduler, progress=progress)[0]


def _layer_matrix(where, layer, selectors: dict, residual: bool) -> np.ndarray:
    """One layer's rollout factor: its heads reduced, the residual added, rows renormalised."""
    values = select(where.node(), "weights", layer=layer, **selectors).values
    return rollout_matrices(values[None], residual=residual)


def _times(matrix: np.ndarray, product) -> np.ndarray:
    return matrix @ product


@documented
def rollout_map(source, *, site=None, sample=None, step=None, time=None, node=None, head="mean", residual: bool = True,
                cmap=None, vmin=None, vmax=None, log: bool = False, origin="upper", colorbar: bool = True, ax=None,
                figsize=None, title=None, compact: bool = False):
    """Heatmap of the attention rollout (rows: output tokens, columns: input tokens).

    The colour scale is sequential from the smallest to the largest rolled-out value (rows sum to
    1), or the given limits; the colorbar says whether the residual was added.

    Parameters
    ----------
    $source
    $site
    $rollout_selectors
    $residual
    cmap : str or matplotlib.colors.Colormap, optional
        Colormap (``viridis`` by default).
    vmin, vmax : float, optional
        Colour limits, used exactly when given; by default the smallest to the largest value.
    log : bool, default False
        Logarithmic colour scale (rolled-out attention spans decades).
    $origin
    $colorbar
    $ax
    $heatmap_figsize
    $heatmap_title
    $heatmap_compact

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import rollout_map
    >>> ax = rollout_map(attnformat.example_path("dense"))
    >>> ax.get_title()
    'encoder/self | layer rollout 0..1 | head mean of 3 | rolled-out attention (rollout with residual)'
    """
    chosen = attention_rollout(source, site=site, sample=sample, step=step, time=time, node=node, head=head, residual=residual)
    cmap, norm = color_scale(chosen.values, cmap=cmap, vmin=vmin, vmax=vmax, log=log)
    how = "rollout with residual" if residual else "rollout"
    # The colorbar says what the colours are: the rolled-out attention, not one layer's weights.
    chosen.variable = f"rolled-out attention ({how})"
    return draw_one_map(chosen, cmap=cmap, norm=norm, origin=origin, xlabel="input token (key)",
                        ylabel="output token (query)", title=chosen.title() if title is None else title,
                        colorbar=colorbar, ax=ax, figsize=figsize, compact=compact)
