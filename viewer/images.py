"""Attention over image patches, drawn on the stored input image (seed 003: ViT on MNIST).

Every figure here shows its colour scale: one colorbar shared by all panels of a figure (so a
uniform layer looks uniform next to a peaked one), or one per panel when ``per_panel=True``. The
attention drawn over the image uses the same colormap and norm as the plain patch panels, so the
colorbar reads for both; the image itself is drawn in grey (or its own colours) and has no scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from matplotlib.cm import ScalarMappable

from attnformat.errors import SelectionError
from attnformat.viewer.colors import color_scale, is_diverging, labelled_colorbar
from attnformat.viewer.docs import documented, register
from attnformat.viewer.heatmaps import colorbar_label, mark_not_captured
from attnformat.viewer.output import new_figure, text_width
from attnformat.viewer.selection import Selection, labels_of, position, resolve_site, select, site_name

#: Default colormap of unsigned attention over an image (seed 003's red-high / blue-low heat map).
OVERLAY_CMAP = "jet"
#: Side of one image panel, in inches, when the figure sizes itself.
PANEL_INCHES = 2.6
#: Panels per row of an image grid unless ``ncols`` is given.
DEFAULT_IMAGE_COLUMNS = 6

register(
    image_query="""
        query : int or str, default 0
            The query whose attention over the patches is drawn: a label (``"[CLS]"``) or a
            position; by default the first token (the CLS token of a ViT).
    """,
    image_alpha="""
        alpha : float, default 0.5
            Opacity of the attention drawn over the image (0 shows only the image, 1 only the attention).
    """,
    image_cmap="""
        cmap : str or matplotlib.colors.Colormap, optional
            Colormap of the attention, used as given; by default ``jet`` for weights (seed 003) and
            the signed rule of :func:`attnformat.viewer.colors.color_scale` for logits and biases.
        vmin, vmax : float, optional
            Colour limits, used exactly; see :func:`attnformat.viewer.colors.color_scale` for the
            rule when one or neither is given.
        log : bool, default False
            Logarithmic colour scale (values <= 0 are drawn as missing).
        center : float, optional
            Centre of a signed scale (default 0 for logits and biases).
    """,
    image_selectors="""
        layer, head, sample, step, time, node : int, str or {"mean", "max"}, optional
            Which map: a label or a position along each dimension the site has; ``"mean"`` or
            ``"max"`` reduce over it (the title says which). ``head`` defaults to the mean over
            heads; ``sample`` also picks the image drawn under the attention.
    """,
    image_per_panel="""
        per_panel : bool, default False
            Give every panel its own colour scale and its own colorbar. By default all panels share
            one scale and one colorbar, so panels can be compared by colour.
    """,
    image_overlay_row="""
        overlay : bool, default True
            Add a row of panels with the attention drawn over the stored image (when the site has one).
    """,
    image_ncols="""
        ncols : int, optional
            Panels per row; by default all panels in one row, up to 6 per row.
    """,
)


def image_variable(site) -> str | None:
    """Name of the site's input image (``role="image"``), or None.

    Parameters
    ----------
    site : xarray.DataTree
        One site's group.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import resolve_site
    >>> image_variable(resolve_site(attnformat.example_path("image")))
    'image'
    """
    names = [n for n, v in site.data_vars.items() if v.attrs.get("role") == "image"]
    return names[0] if names else None


def has_patches(site) -> bool:
    """True when keys carry patch positions (``key_patch_row``/``key_patch_col``).

    Parameters
    ----------
    site : xarray.DataTree
        One site's group.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import resolve_site
    >>> has_patches(resolve_site(attnformat.example_path("image"))), has_patches(resolve_site(attnformat.example_path("dense")))
    (True, False)
    """
    return "key_patch_row" in site.coords and "key_patch_col" in site.coords


@dataclass
class PatchAttention:
    """One query's attention over the patch grid, and the image it is drawn on.

    ``patches[r, c]`` is the stored value of the query's row at the key whose
    ``key_patch_row``/``key_patch_col`` are ``(r, c)``; patches no key covers are NaN.
    """

    selection: Selection
    query: int
    query_label: str
    patches: np.ndarray
    image: np.ndarray | None

    @property
    def label(self) -> str:
        """What the colours mean: ``weights (softmax), [CLS] -> patches``."""
        return f"{colorbar_label(self.selection)}, {self.query_label} -> patches"

    def upsampled(self) -> np.ndarray:
        """The patch grid stretched to the image's size (each patch covers its pixels), or as is."""
        if self.image is None:
            return self.patches
        return upsample(self.patches, self.image.shape[:2])


def upsample(patches: np.ndarray, shape) -> np.ndarray:
    """Nearest-patch upsampling of a ``(rows, cols)`` grid to ``shape`` pixels (values copied, never interpolated).

    Parameters
    ----------
    patches : numpy.ndarray
        ``(rows, cols)`` values.
    shape : (int, int)
        Pixel rows and columns; pixel ``(i, j)`` takes patch ``(i * rows // shape[0], j * cols // shape[1])``.

    Examples
    --------
    >>> upsample(np.array([[1.0, 2.0], [3.0, 4.0]]), (4, 4))[:, 0].tolist()
    [1.0, 1.0, 3.0, 3.0]
    """
    rows, cols = patches.shape
    row_index = np.arange(shape[0]) * rows // shape[0]
    col_index = np.arange(shape[1]) * cols // shape[1]
    return patches[np.ix_(row_index, col_index)]


def _image(site, selectors) -> np.ndarray | None:
    name = image_variable(site)
    if name is None:
        return None
    image = site[name]
    if "sample" in image.dims:
        sample = selectors.get("sample")
        image = image.isel(sample=position(site, "sample", sample) if sample not in (None, "mean", "max") else 0)
    values = np.asarray(image.values, dtype=np.float64)
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim == 3:  # colour: scale into [0, 1] for imshow
        finite = values[np.isfinite(values)]
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        values = (values - low) / ((high - low) or 1.0)
    return values


@documented
def patch_attention(source, *, site=None, query=0, variable="weights", layer=None, head=None, sample=None,
                    step=None, time=None, node=None) -> PatchAttention:
    """One query's attention (default the first token, CLS) placed on the key patch grid; draws nothing.

    Parameters
    ----------
    $source
    $site
    $image_query
    $variable
    $image_selectors

    Returns
    -------
    PatchAttention
        ``patches`` (the patch grid of the query's row), the selection, the query and the image.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import patch_attention
    >>> chosen = patch_attention(attnformat.example_path("image"), layer=1, head=0)
    >>> chosen.query_label, chosen.patches.shape, chosen.upsampled().shape
    ('[CLS]', (4, 4), (28, 28))
    """
    site_node = resolve_site(source, site)
    if not has_patches(site_node):
        raise SelectionError(f"site {site_name(site_node)} of {site_node.root.encoding.get('source', 'the tree')} has no "
                             f"key_patch_row/key_patch_col coordinates, so its keys cannot be placed on an image")
    selectors = dict(layer=layer, head=head, sample=sample, step=step, time=time, node=node)
    chosen = select(site_node, variable, drop_padding=False, **{d: v for d, v in selectors.items() if v is not None})
    sample_position = chosen.positions.get("sample")
    row = position(site_node, "query", query, sample=sample_position)
    rows_of = site_node.coords["key_patch_row"]
    cols_of = site_node.coords["key_patch_col"]
    if "sample" in rows_of.dims:
        rows_of, cols_of = rows_of.isel(sample=sample_position or 0), cols_of.isel(sample=sample_position or 0)
    patch_rows, patch_cols = np.asarray(rows_of.values), np.asarray(cols_of.values)
    on_grid = (patch_rows >= 0) & (patch_cols >= 0)
    stored_grid = site_node.attrs.get("patch_grid")  # a list from Zarr, a numpy array from HDF5
    shape = (tuple(int(size) for size in stored_grid) if stored_grid is not None
             else (int(patch_rows.max()) + 1, int(patch_cols.max()) + 1))
    patches = np.full(shape, np.nan)
    patches[patch_rows[on_grid], patch_cols[on_grid]] = np.asarray(chosen.values, dtype=np.float64)[row, on_grid]
    label = labels_of(site_node, "query", sample_position)[row]
    chosen.described["query"] = label
    return PatchAttention(selection=chosen, query=row, query_label=label, patches=patches, image=_image(site_node, selectors))


def _scale(values, variable: str, *, cmap, vmin, vmax, log, center):
    """Colormap and norm of attention over an image: seed 003's ``jet`` for unsigned values by default."""
    if cmap is None and not is_diverging(variable, center):
        cmap = OVERLAY_CMAP
    return color_scale(values, variable=variable, cmap=cmap, vmin=vmin, vmax=vmax, log=log, center=center)


def _draw(ax, data: PatchAttention, cmap, norm, *, overlay: bool, alpha: float):
    """Draw the patch grid (or the image and the upsampled attention on it); returns the attention's image."""
    if overlay and data.image is not None:
        ax.imshow(data.image, cmap="gray" if data.image.ndim == 2 else None, interpolation="nearest")
        attention = ax.imshow(np.ma.masked_invalid(data.upsampled()), cmap=cmap, norm=norm, alpha=alpha,
                              interpolation="nearest")
    else:
        attention = ax.imshow(np.ma.masked_invalid(data.patches), cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    return attention


def wrap_title(text: str, width_inches: float, fontsize: float) -> str:
    """``text`` broken at its `` | `` separators into lines that fit ``width_inches`` at ``fontsize`` points.

    Parameters
    ----------
    text : str
        A title whose parts are joined by `` | ``.
    width_inches : float
        Room for one line.
    fontsize : float
        Font size of the title, in points.

    Examples
    --------
    >>> print(wrap_title("encoder/self | layer 1 | head 0 | query [CLS] | weights (softmax)", 2.5, 9))
    encoder/self | layer 1 | head 0
    query [CLS] | weights (softmax)
    """
    per_line = max(12, int(width_inches / text_width("x", fontsize)))
    lines, current = [], ""
    for part in text.split(" | "):
        candidate = f"{current} | {part}" if current else part
        if current and len(candidate) > per_line:
            lines.append(current)
            current = part
        else:
            current = candidate
    return "\n".join(lines + [current])


@documented
def draw_patch_attention(data: PatchAttention, ax=None, *, overlay: bool = True, alpha: float = 0.5, cmap=None,
                         vmin=None, vmax=None, log: bool = False, center=None, colorbar: bool = True,
                         figsize=None, title: str | None = None):
    """Draw prepared patch attention: the patch grid, or the image in grey with the upsampled attention on top.

    Parameters
    ----------
    data : PatchAttention
        From :func:`patch_attention`.
    $ax
    overlay : bool, default True
        Draw over the stored image (when there is one); False draws the patch grid alone.
    $image_alpha
    $image_cmap
    $colorbar
    $figsize
    $title

    Returns
    -------
    matplotlib.axes.Axes
        ``ax.images[-1]`` is the attention (its norm is the colorbar's).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import patch_attention
    >>> ax = draw_patch_attention(patch_attention(attnformat.example_path("image")), overlay=False)
    >>> ax.images[0].get_array().shape
    (4, 4)
    """
    if ax is None:
        ax = new_figure(figsize or (5.6, 4.8)).add_subplot()
    colormap, norm = _scale(data.patches, data.selection.variable, cmap=cmap, vmin=vmin, vmax=vmax, log=log, center=center)
    _draw(ax, data, colormap, norm, overlay=overlay, alpha=alpha)
    suffix = " | over the image" if overlay and data.image is not None else ""
    ax.set_title(title if title is not None else wrap_title(data.selection.title() + suffix, 4.0, 9), fontsize=9)
    if colorbar:
        labelled_colorbar(ScalarMappable(norm=norm, cmap=colormap), ax=ax, values=data.patches, label=data.label)
    return ax


@documented
def image_overlay(source, *, site=None, query=0, variable="weights", layer=None, head=None, sample=None, step=None,
                  time=None, node=None, alpha: float = 0.5, cmap=None, vmin=None, vmax=None, log: bool = False,
                  center=None, colorbar: bool = True, ax=None, figsize=None, title: str | None = None):
    """A query's attention over the patches, upsampled onto the stored image (seed 003's overlay).

    ``ax.images[0]`` is the image (grey), ``ax.images[1]`` the attention: one stored value per
    patch, copied to every pixel of the patch (no interpolation, no rescaling). The colorbar
    shows the attention's scale at full opacity; over the image the colours are blended at ``alpha``.

    Parameters
    ----------
    $source
    $site
    $image_query
    $variable
    $image_selectors
    $image_alpha
    $image_cmap
    $colorbar
    $ax
    $figsize
    $title

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import image_overlay
    >>> ax = image_overlay(attnformat.example_path("image"), layer=0, head=1)
    >>> len(ax.images), ax.figure.axes[1].get_ylabel()
    (2, 'weights (softmax), [CLS] -> patches')
    """
    data = patch_attention(source, site=site, query=query, variable=variable, layer=layer, head=head, sample=sample,
                           step=step, time=time, node=node)
    return draw_patch_attention(data, ax, alpha=alpha, cmap=cmap, vmin=vmin, vmax=vmax, log=log, center=center,
                                colorbar=colorbar, figsize=figsize, title=title)


def image_grid_data(source, *, over: str = "head", site=None, query=0, variable="weights", layer=None, head=None,
                    sample=None, step=None, time=None, node=None) -> tuple[list[str], list[PatchAttention]]:
    """The panels of :func:`image_attention_grid`: ``(names along over, patch attention of each)``; draws nothing.

    Parameters
    ----------
    over : {"head", "layer"}
        One panel per head (of one layer) or per layer (of one head, or the mean over heads).
    source, site, query, variable, layer, head, sample, step, time, node
        As for :func:`image_attention_grid`.

    Examples
    --------
    >>> import attnformat
    >>> names, panels = image_grid_data(attnformat.example_path("image"), over="layer", head=0)
    >>> names, panels[1].patches.shape
    (['0', '1'], (4, 4))
    """
    if over not in ("head", "layer"):
        raise SelectionError(f"image grids go over 'head' or 'layer', not {over!r}")
    site_node = resolve_site(source, site)
    if over not in site_node.sizes:
        raise SelectionError(f"site {site_name(site_node)} of {site_node.root.encoding.get('source', 'the tree')} has no "
                             f"{over} dimension to draw one panel per {over}; dimensions: {', '.join(site_node.sizes)}")
    names = [str(v) for v in site_node.coords[over].values] if over in site_node.coords else \
        [str(i) for i in range(site_node.sizes[over])]
    panels = []
    for index, name in enumerate(names):
        selectors = dict(layer=layer, head=head, sample=sample, step=step, time=time, node=node)
        # A position, not the label: labels need not be unique or numeric.
        selectors[over] = site_node.coords[over].values[index] if over in site_node.coords else index
        panels.append(patch_attention(site_node, query=query, variable=variable, **selectors))
    return names, panels


@documented
def image_attention_grid(source, *, over: str = "head", site=None, query=0, variable="weights", layer=None,
                         head=None, sample=None, step=None, time=None, node=None, overlay: bool = True,
                         per_panel: bool = False, alpha: float = 0.5, cmap=None, vmin=None, vmax=None,
                         log: bool = False, center=None, colorbar: bool = True, ncols: int | None = None,
                         figsize=None, title: str | None = None):
    """Per head (of one layer) or per layer (one head or the mean): the patch attention on top, the
    overlay on the image below (seed 003's attention-pattern, head and layer figures).

    All panels share one colour scale and one colorbar by default, so a uniform head looks
    uniform (pale) next to a peaked one; ``per_panel=True`` scales each head or layer on its own
    and gives each panel its own colorbar. The patch panel and the overlay of one head or layer
    always share a scale.

    Parameters
    ----------
    $source
    over : {"head", "layer"}, default "head"
        One column per head (of ``layer``) or per layer (of ``head``, by default the mean over heads).
    $site
    $image_query
    $variable
    $image_selectors
    $image_overlay_row
    $image_per_panel
    $image_alpha
    $image_cmap
    $colorbar
    $image_ncols
    $figsize
    $title

    Returns
    -------
    matplotlib.figure.Figure
        The patch Axes (one per head or layer), then the overlay Axes, then the colorbar(s).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import image_attention_grid
    >>> figure = image_attention_grid(attnformat.example_path("image"), over="layer")
    >>> [ax.get_title() for ax in figure.axes[:2]], figure.axes[-1].get_ylabel()
    (['layer 0', 'layer 1'], 'weights (softmax), [CLS] -> patches')
    """
    names, panels = image_grid_data(source, over=over, site=site, query=query, variable=variable, layer=layer,
                                    head=head, sample=sample, step=step, time=time, node=node)
    overlay = overlay and panels[0].image is not None
    columns = max(1, min(ncols or DEFAULT_IMAGE_COLUMNS, len(names)))
    chunks = math.ceil(len(names) / columns)
    rows_per_chunk = 2 if overlay else 1
    # Room for the colorbars: one beside every panel, or one for the whole figure.
    colorbar_width = (1.1 * columns if per_panel else 0.9) if colorbar else 0.0
    # Panels are square images under a title line: a little narrower than tall.
    figure = new_figure(figsize or (columns * (PANEL_INCHES - 0.25) + colorbar_width,
                                    chunks * rows_per_chunk * (PANEL_INCHES + 0.35) + 0.6))
    layout = figure.add_gridspec(chunks * rows_per_chunk, columns)
    scale = dict(cmap=cmap, vmin=vmin, vmax=vmax, log=log, center=center)
    shared_values = np.stack([p.patches for p in panels])
    shared = _scale(shared_values, variable, **scale)
    rows = [("", False)] + ([(" on the image", True)] if overlay else [])
    drawn = []
    for offset, (suffix, on_image) in enumerate(rows):
        for index, (name, data) in enumerate(zip(names, panels)):
            chunk, column = divmod(index, columns)
            ax = figure.add_subplot(layout[chunk * rows_per_chunk + offset, column])
            colormap, norm = _scale(data.patches, variable, **scale) if per_panel else shared
            image = _draw(ax, data, colormap, norm, overlay=on_image, alpha=alpha)
            ax.set_title(f"{over} {name}{suffix}", fontsize=9)
            if not np.isfinite(data.patches).any():
                # A step or layer never captured: say so rather than draw a blank (or grey) panel.
                mark_not_captured(ax, image)
            drawn.append((ax, data, image))
    if colorbar and per_panel:
        for ax, data, image in drawn:
            mappable = ScalarMappable(norm=image.norm, cmap=image.cmap)
            labelled_colorbar(mappable, ax=ax, values=data.patches, label=colorbar_label(data.selection), fraction=0.08)
    elif colorbar:
        colormap, norm = shared
        labelled_colorbar(ScalarMappable(norm=norm, cmap=colormap), ax=[ax for ax, _, _ in drawn], values=shared_values,
                          label=panels[0].label, fraction=0.04)
    first = panels[0].selection
    default = f"{first.title(skip=(over,))} | every {over}" + (" | one scale per panel" if per_panel else "")
    figure.suptitle(title if title is not None else wrap_title(default, figure.get_figwidth() - 0.3, 10), fontsize=10)
    return figure
