"""What a capture keeps of each attention: dense maps, top-k per row, row statistics, head means.

A :class:`Keep` is declared per capture (or per site) and read by the capture's writer: each
attention site ``X`` becomes up to four sites of the file, all with ``describes = "X"``:
``X`` (dense weights of the selected layers, heads and query rows), ``X_topk`` (for each query
row the ``top_k`` largest weights, their key indices and the mass left out), ``X_stats``
(per-row entropy, max weight, sink weight, local weight, top key for every layer and head) and
``X_mean`` (the mean over heads, dense). The default, ``Keep()``, keeps every dense map, which is
what a capture wrote before keeps existed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from attnformat.errors import AttnFormatError

#: The per-row statistics a ``statistics`` site may hold, in the order they are written.
STATISTICS = ("entropy", "max_weight", "sink_weight", "local_weight", "top_key")
#: The window (in positions either side of the query) used for ``local_weight`` unless one is given.
DEFAULT_LOCAL_WINDOW = 8


@dataclass(frozen=True)
class Keep:
    """What to keep of one attention site (or of every site of a capture).

    Parameters
    ----------
    dense
        Keep dense weights: ``True`` (the layers, heads and rows selected below) or ``False``.
    layers, heads, rows
        The dense selection: layer numbers, head numbers and query rows (indices or a ``slice``);
        ``None`` keeps all. Top-k, statistics and head means always cover every layer, head and
        row, so that nothing outside the dense selection is unknown.
    top_k
        Keep the ``top_k`` largest weights of every row (with key indices and the omitted mass),
        or ``None``. Rows with fewer available keys (early causal rows, padding, sliding windows)
        hold NaN (index -1) in their last ranks.
    statistics
        ``True`` for every statistic, a list of names from :data:`STATISTICS`, or ``False``.
        ``local_weight`` is written only for self-attention (a cross-attention's query and key
        positions are not on one axis).
    head_mean
        Keep the mean over heads of every layer's weights (dense, no ``head`` dimension).
    local_window
        Keys within this many positions of the query count as local (``local_weight``);
        default :data:`DEFAULT_LOCAL_WINDOW` when ``local_weight`` is kept.
    dtype
        Storage dtype of the weights: ``"float32"`` or ``"float16"`` (half the file; about
        three significant digits).

    Examples
    --------
    >>> Keep().dense, Keep().top_k
    (True, None)
    >>> keep = Keep(dense=False, top_k=32, statistics=True)
    >>> keep.statistic_names
    ('entropy', 'max_weight', 'sink_weight', 'local_weight', 'top_key')
    >>> Keep(layers=[0, 3]).keeps_layer(3), Keep(layers=[0, 3]).keeps_layer(1)
    (True, False)
    """

    dense: bool = True
    layers: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    rows: Sequence[int] | slice | None = None
    top_k: int | None = None
    statistics: bool | Sequence[str] = False
    head_mean: bool = False
    local_window: int | None = None
    dtype: str = "float32"
    _names: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.top_k is not None and (isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 1):
            raise AttnFormatError(f"Keep: top_k must be a positive integer or None, not {self.top_k!r}")
        if self.dtype not in ("float32", "float16"):
            raise AttnFormatError(f"Keep: dtype must be 'float32' or 'float16', not {self.dtype!r}")
        if self.statistics is True:
            names = STATISTICS
        elif not self.statistics:
            names = ()
        else:
            names = tuple(self.statistics) if not isinstance(self.statistics, str) else (self.statistics,)
            unknown = [name for name in names if name not in STATISTICS]
            if unknown:
                raise AttnFormatError(f"Keep: unknown statistics {unknown}; known: {list(STATISTICS)}")
            names = tuple(name for name in STATISTICS if name in names)
        if self.local_window is not None and (isinstance(self.local_window, bool) or int(self.local_window) != self.local_window
                                              or self.local_window < 0):
            raise AttnFormatError(f"Keep: local_window must be a non-negative integer, not {self.local_window!r}")
        for name in ("layers", "heads"):
            value = getattr(self, name)
            if value is not None and not all(int(v) == v and v >= 0 for v in value):
                raise AttnFormatError(f"Keep: {name} must be non-negative integers, not {value!r}")
        object.__setattr__(self, "_names", names)
        if self.dense is not True and self.dense is not False:
            raise AttnFormatError(f"Keep: dense must be True or False, not {self.dense!r}")
        if not (self.dense or self.top_k or names or self.head_mean):
            raise AttnFormatError("Keep: nothing to keep; set dense=True, top_k=..., statistics=... or head_mean=True")

    @property
    def statistic_names(self) -> tuple[str, ...]:
        """The statistics kept, in canonical order (empty when none).

        Examples
        --------
        >>> Keep(dense=False, statistics=["top_key", "entropy"]).statistic_names
        ('entropy', 'top_key')
        """
        return self._names

    @property
    def window(self) -> int:
        """The local window used for ``local_weight``.

        Examples
        --------
        >>> Keep(dense=False, statistics=True).window
        8
        """
        return DEFAULT_LOCAL_WINDOW if self.local_window is None else int(self.local_window)

    def keeps_layer(self, layer: int) -> bool:
        """True if ``layer``'s dense weights are kept.

        Examples
        --------
        >>> Keep(dense=False, top_k=4).keeps_layer(0)
        False
        """
        return self.dense and (self.layers is None or layer in self.layers)

    @property
    def needs_rows(self) -> bool:
        """True if anything but dense maps is kept (the tap then reduces every row).

        Examples
        --------
        >>> Keep().needs_rows, Keep(top_k=2).needs_rows
        (False, True)
        """
        return bool(self.top_k or self._names or self.head_mean)


def keeps_by_site(keep: Keep | Mapping[str, Keep] | None, sites: Sequence[str]) -> dict[str, Keep]:
    """One :class:`Keep` per site from ``keep`` (one for all, a mapping by site, or ``None``: dense).

    A mapping may name only some sites; the rest keep everything dense.

    Examples
    --------
    >>> keeps_by_site({"decoder/self": Keep(dense=False, top_k=8)}, ["decoder/self", "decoder/cross"])["decoder/cross"].dense
    True
    """
    if keep is None or isinstance(keep, Keep):
        return {site: keep or Keep() for site in sites}
    if not isinstance(keep, Mapping):
        raise AttnFormatError(f"keep must be a Keep or a mapping of site names to Keep, not {type(keep).__name__}")
    keeps = {str(site).strip("/"): value for site, value in keep.items()}
    unknown = sorted(set(keeps) - set(sites))
    if unknown:
        raise AttnFormatError(f"keep names sites {unknown} that this model does not have; its sites: {sorted(sites)}")
    for site, value in keeps.items():
        if not isinstance(value, Keep):
            raise AttnFormatError(f"keep[{site!r}] must be a Keep, not {type(value).__name__}")
    return {site: keeps.get(site, Keep()) for site in sites}
