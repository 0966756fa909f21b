"""Attention over image patches, drawn on the stored input image (seed 003: ViT on MNIST)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attnformat.errors import SelectionError
from attnformat.viewer.colors import color_scale
from attnformat.viewer.output import axes_or_new, grid
from attnformat.viewer.selection import Selection, labels_of, position, resolve_site, select, site_name

OVERLAY_CMAP = "jet"


def image_variable(site) -> str | None:
    """Name of the site's input image (``role="image"``), or None.

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
    """One query's attention over the patch grid, and the image it is drawn on."""

    selection: Selection
    query: int
    query_label: str
    patches: np.ndarray
    image: np.ndarray | None

    def upsampled(self) -> np.ndarray:
        """The patch grid stretched to the image's size (each patch covers its pixels), or as is."""
        if self.image is None:
            return self.patches
        return upsample(self.patches, self.image.shape[:2])


def upsample(patches: np.ndarray, shape) -> np.ndarray:
    """Nearest-patch upsampling of a ``(rows, cols)`` grid to ``shape`` pixels.

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


def patch_attention(source, *, site=None, query=0, variable="weights", layer=None, head=None, sample=None,
                    step=None) -> PatchAttention:
    """One query's attention (default the first token, CLS) placed on the key patch grid.

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
    selectors = dict(layer=layer, head=head, sample=sample, step=step)
    chosen = select(site_node, variable, drop_padding=False, **selectors)
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


def draw_patch_attention(data: PatchAttention, ax=None, *, overlay: bool = True, alpha: float = 0.5, cmap=OVERLAY_CMAP,
                         title: str | None = None, colorbar: bool = True):
    """Draw prepared patch attention: the image in grey with the upsampled attention on top.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import patch_attention
    >>> ax = draw_patch_attention(patch_attention(attnformat.example_path("image")), overlay=False)
    >>> ax.images[0].get_array().shape
    (4, 4)
    """
    ax = axes_or_new(ax)
    colormap, norm = color_scale(data.patches, cmap=cmap)
    if overlay and data.image is not None:
        ax.imshow(data.image, cmap="gray" if data.image.ndim == 2 else None, interpolation="nearest")
        attention = ax.imshow(np.ma.masked_invalid(data.upsampled()), cmap=colormap, norm=norm, alpha=alpha, interpolation="nearest")
    else:
        attention = ax.imshow(np.ma.masked_invalid(data.patches), cmap=colormap, norm=norm, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if title is not None else data.selection.title(), fontsize=9)
    if colorbar:
        ax.figure.colorbar(attention, ax=ax, label=data.selection.normalization, shrink=0.8)
    return ax


def image_overlay(source, *, site=None, query=0, variable="weights", layer=None, head=None, sample=None, step=None,
                  alpha: float = 0.5, cmap=OVERLAY_CMAP, ax=None):
    """A query's attention over the patches, upsampled onto the stored image (seed 003's overlay).

    ``ax.images[0]`` is the image, ``ax.images[1]`` the attention (one value per patch, stretched
    over the patch's pixels).

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import image_overlay
    >>> ax = image_overlay(attnformat.example_path("image"), layer=0, head=1)
    >>> len(ax.images)
    2
    """
    data = patch_attention(source, site=site, query=query, variable=variable, layer=layer, head=head, sample=sample, step=step)
    return draw_patch_attention(data, ax, alpha=alpha, cmap=cmap, title=f"{data.selection.title()} | over the image")


def image_attention_grid(source, *, over: str = "head", site=None, query=0, variable="weights", layer=None, head=None,
                         sample=None, step=None, alpha: float = 0.5, cmap=OVERLAY_CMAP):
    """Per head (of one layer) or per layer (one head or the mean): the patch attention on top, the
    overlay on the image below (seed 003's attention-pattern, head and layer figures).

    Returns
    -------
    matplotlib.figure.Figure
        ``2 x n`` image Axes (pure attention row, overlay row), then their colorbars.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer import image_attention_grid
    >>> figure = image_attention_grid(attnformat.example_path("image"), over="layer")
    >>> [ax.get_title() for ax in figure.axes[:2]]
    ['layer 0', 'layer 1']
    """
    if over not in ("head", "layer"):
        raise SelectionError(f"image grids go over 'head' or 'layer', not {over!r}")
    site_node = resolve_site(source, site)
    names = [str(v) for v in site_node.coords[over].values] if over in site_node.coords else \
        [str(i) for i in range(site_node.sizes[over])]
    panels = []
    for name in names:
        selectors = dict(layer=layer, head=head, sample=sample, step=step)
        selectors[over] = int(name) if name.lstrip("-").isdigit() else name
        panels.append(patch_attention(site_node, query=query, variable=variable, **selectors))
    figure, axes = grid(2 * len(names), ncols=len(names), panel_size=(3.0, 3.0))
    for index, (name, data) in enumerate(zip(names, panels)):
        draw_patch_attention(data, axes[index], overlay=False, cmap=cmap, title=f"{over} {name}", colorbar=False)
        draw_patch_attention(data, axes[len(names) + index], alpha=alpha, cmap=cmap, title=f"{over} {name} on the image",
                             colorbar=False)
    first = panels[0].selection
    figure.suptitle(f"{first.title(skip=(over,))} | every {over}", fontsize=10)
    return figure
