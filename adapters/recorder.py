"""Log attention from custom code (a model's forward, a training loop) into an attention file.

The :class:`Recorder` is the adapter for attention that no framework adapter knows: a protein
model's invariant Gaussian attention with its geometric bias, a video model's frame attention,
anything that has the weights (or logits) in hand. Each :meth:`Recorder.log` call writes one
map, one layer or one step straight to disk; a site is declared on its first log, from the shape
of what is logged, and grows along ``step`` (and along ``layer``, ``head``... when new labels
appear). The framework adapters write through a Recorder too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from attnformat.adapters.arrays import to_numpy
from attnformat.adapters.errors import CaptureShapeError
from attnformat.conventions import ATTENTION_DIMS as ALL_ATTENTION_DIMS
from attnformat.conventions import INTEGER_VARIABLES, LAYOUTS, STATISTICS, canonical_dims
from attnformat.encoding import MIN_MAP_CHUNK_ELEMENTS
from attnformat.errors import AttnFormatError, WriterError
from attnformat.writer import SiteWriter, Writer, _aligned

MAP_DIMS = {"dense": ("query", "key"), "edge": ("edge",), "topk": ("query", "rank"), "statistics": ("query",)}
#: The variables log() takes, per layout.
_LAYOUT_VARIABLES = {
    "dense": ("weights", "logits", "bias"), "edge": ("weights", "logits", "bias"),
    "topk": ("weights", "key_index", "omitted_weight"), "statistics": STATISTICS,
}
_TOKEN_DIMS = ("query", "key")
#: How many leading axes a logged array may have without ``dims``, and what they are.
_GUESSED_LEADING_DIMS = ("sample", "head")
_DESCRIPTION_KEYS = frozenset({
    "layout", "labels", "query_labels", "key_labels", "groups", "query_groups", "key_groups",
    "mask", "query_mask", "key_mask", "positions", "query_positions", "key_positions",
    "source", "target", "edge_node_dim", "nodes", "node_labels", "times", "layers", "heads",
    "samples", "attrs", "coords", "tokens", "query_tokens", "key_tokens", "generation_steps",
    "query_generation_steps", "key_generation_steps",
})
#: Description keys that are per-token coordinates (their ``query_``/``key_`` forms included).
_TOKEN_KEYS = ("labels", "groups", "mask", "positions", "tokens", "generation_steps")


@dataclass(frozen=True)
class _Batch:
    """The samples block in force: samples [offset, offset + batch) of ``total``, token dims
    padded to ``lengths``: site name (or ``"*"``: every site) -> {token dim: length}."""

    offset: int
    total: int
    lengths: dict


class Recorder:
    """Write attention maps to a file as they are produced, one ``log`` call at a time.

    Parameters
    ----------
    destination
        Path of the file to write (``.zarr``, ``.zarr.zip``, ``.h5``, ``.nc``), or an open
        :class:`attnformat.Writer` to write into (the recorder then leaves closing it to you).
    every
        Log interval in training steps; :meth:`should_log` answers ``step % every == 0``.
    model_name, model_framework, model_adapter, description, attrs, overwrite
        Passed to :class:`attnformat.Writer`.
    dtype
        Storage dtype of the attention variables (float32 by default; float16 halves the file).
    background
        Let each map be compressed and stored while the model computes the next layer
        (:class:`attnformat.Writer`'s ``write_behind``): at most one write is in flight, so memory
        holds one extra layer. Errors of a write still in flight are raised by the next ``log``
        or by ``close``.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib, attnformat
    >>> from attnformat.adapters import Recorder
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "iga.attn.zarr"
    >>> logits = np.random.default_rng(0).normal(size=(2, 5, 5))
    >>> with Recorder(out, model_name="toy-iga", every=100) as rec:
    ...     for step in range(0, 300):
    ...         if rec.should_log(step):
    ...             for layer in range(2):
    ...                 rec.log("trunk/iga", step=step, layer=layer, logits=logits,
    ...                         weights=attnformat.examples.softmax(logits))
    >>> attnformat.open(out)["trunk/iga"]["weights"].sizes["step"]
    3
    """

    def __init__(
        self,
        destination: str | os.PathLike | Writer,
        *,
        every: int = 1,
        model_name: str | None = None,
        model_framework: str | None = None,
        model_adapter: str = "attnformat.adapters.recorder",
        description: str | None = None,
        attrs: Mapping | None = None,
        overwrite: bool = False,
        dtype: str = "float32",
        background: bool = False,
    ):
        if every < 1:
            raise AttnFormatError(f"every must be a positive number of steps, not {every}")
        if isinstance(destination, Writer):
            self.writer, self._owns_writer = destination, False
        else:
            self.writer = Writer(destination, model_name=model_name, model_framework=model_framework, model_adapter=model_adapter,
                                 description=description, attrs=attrs, overwrite=overwrite, write_behind=background)
            self._owns_writer = True
        self.every = int(every)
        self.dtype = dtype
        self.sites: dict[str, SiteWriter] = {}
        self._descriptions: dict[str, dict] = {}
        self._pending_variables: dict[str, list[tuple]] = {}
        self._selected: dict[str, set[str]] = {}
        self._batch: _Batch | None = None
        self._masked: dict[str, set] = {}  # site -> batch offsets whose automatic masks are written
        self._auto_masks: dict[str, tuple[str, ...]] = {}  # site -> mask coordinates the recorder keeps
        self._coordinate_rows: dict[str, dict[str, int]] = {}  # site -> per-sample coordinate -> samples per chunk
        self._held: dict[tuple[str, str], list] = {}  # (site, coordinate) -> [(first sample, values)] not yet written

    @property
    def path(self):
        """Where the file will be once closed.

        Examples
        --------
        >>> import tempfile, pathlib
        >>> Recorder(pathlib.Path(tempfile.mkdtemp()) / "run.attn.zarr").path.name
        'run.attn.zarr'
        """
        return self.writer.path

    @property
    def in_samples(self) -> bool:
        """True inside a :meth:`samples` block (logs with a ``sample`` axis go to the batch's samples).

        Examples
        --------
        >>> import tempfile, pathlib
        >>> rec = Recorder(pathlib.Path(tempfile.mkdtemp()) / "x.zarr")
        >>> with rec.samples(0, total=2):
        ...     rec.in_samples
        True
        >>> rec.in_samples
        False
        """
        return self._batch is not None

    def should_log(self, step: int) -> bool:
        """True on the steps to log: every ``every`` steps, starting at step 0.

        Examples
        --------
        >>> import tempfile, pathlib
        >>> rec = Recorder(pathlib.Path(tempfile.mkdtemp()) / "x.zarr", every=50)
        >>> [rec.should_log(s) for s in (0, 49, 50)]
        [True, False, True]
        """
        return int(step) % self.every == 0

    # -- declaring ---------------------------------------------------------------------------
    def describe(self, site: str, **description) -> None:
        """Say what a site's tokens are before its first :meth:`log` (which declares it).

        Keywords (all optional): ``layout`` (``"dense"``, ``"edge"``, ``"topk"`` or
        ``"statistics"``); token coordinates ``labels``, ``groups``, ``mask``, ``positions``,
        ``tokens`` (the tokenizer's raw pieces, ``query_token``/``key_token``) and
        ``generation_steps`` (-1 for prompt tokens, t for the token generation step t produced)
        for both query and key of a self-attention site, or their ``query_``/``key_`` forms,
        each on (token,) or (sample, token); ``layers``, ``heads``, ``samples``: every label up
        front (otherwise a dimension grows as new labels are logged); for edge sites ``source``
        and ``target`` (0-based node indices per edge), ``edge_node_dim`` (``"node"`` or
        ``"time"``), ``nodes`` or ``times`` (how many) and ``node_labels``; ``attrs`` (site
        attributes such as ``causal``, ``attention_type``, ``key_site``, ``patch_grid``, and for
        top-k and statistics sites ``top_k``, ``key_count``, ``local_window``, ``describes``);
        ``coords`` (any other coordinate, as ``{name: (dims, values)}``).

        Inside :meth:`samples`, per-sample coordinates (on (sample, token)) may be given again
        for every batch, also after the site's first log: they are written at the batch's
        samples. Anything else must be the same as in the first description.

        Examples
        --------
        >>> import numpy as np, tempfile, pathlib
        >>> rec = Recorder(pathlib.Path(tempfile.mkdtemp()) / "x.zarr")
        >>> rec.describe("frames", groups=[0, 0, 1, 1], attrs={"group_kind": "frame"})
        >>> rec.log("frames", layer=0, weights=np.full((2, 4, 4), 0.25))
        >>> rec.sites["frames"].sizes
        {'layer': 1, 'head': 2, 'query': 4, 'key': 4}
        """
        site = site.strip("/")
        unknown = set(description) - _DESCRIPTION_KEYS
        if unknown:
            raise AttnFormatError(f"site {site!r}: unknown description keys {sorted(unknown)}; known: {sorted(_DESCRIPTION_KEYS)}")
        if description.get("layout", "dense") not in LAYOUTS:
            raise AttnFormatError(f"{self.path}:{site}: layout must be one of {LAYOUTS}, not {description['layout']!r}")
        if site in self.sites:
            if self._batch is None:
                raise AttnFormatError(f"{self.path}:{site}: the site is already declared (by its first log); describe it before logging")
            self._describe_batch(site, description)
            return
        self._descriptions.setdefault(site, {}).update(description)

    def _describe_batch(self, site: str, description: dict) -> None:
        """A later batch's description of a declared site: write its per-sample coordinates at
        the batch's samples; everything else must repeat the first description."""
        writer, first = self.sites[site], self._descriptions.get(site, {})
        per_sample = _per_sample_coords(description)
        for key, value in description.items():
            if key in per_sample["keys"]:
                continue
            if key == "attrs" and key in first:
                # key_count may follow the batch's key length: it becomes the padded length anyway
                first_attrs, attrs = ({k: v for k, v in a.items() if k != "key_count"} for a in (first[key], value))
                if _same(first_attrs, attrs):
                    self._descriptions[site]["attrs"] = {**first[key], **({"key_count": value["key_count"]} if "key_count" in value else {})}
                    continue
            if key in first and _same_tokens(key, first[key], value, lambda name, dims, v: self._padded_coordinate(site, name, dims, v)):
                continue  # a (token,) coordinate that pads to the same values (positions 0..n-1, say)
            if key not in first or not _same(first[key], value):
                raise AttnFormatError(f"{self.path}:{site}: {key}= differs from the site's first description; inside samples() only "
                                      f"per-sample coordinates (on (sample, token)) may change from batch to batch")
        for name, (dims, values) in per_sample["coords"].items():
            if name not in writer.coord_dims:
                raise AttnFormatError(f"{self.path}:{site}: {name} was not described for the first batch, so the site has no such "
                                      f"coordinate; describe every per-sample coordinate from the first batch on")
            padded = self._padded_coordinate(site, name, dims, values)
            self._write_coordinate(site, writer, name, padded, slice(self._batch.offset, self._batch.offset + padded.shape[0]))
            if name in self._auto_masks.get(site, ()):
                self._masked.setdefault(site, set()).add((name, self._batch.offset))

    @contextlib.contextmanager
    def samples(self, offset: int, *, total: int, length: int | Mapping[str, int] | None = None) -> Iterator[Recorder]:
        """Write one batch of a run over ``total`` samples into one file, at samples ``offset`` on.

        Inside the block, every :meth:`log` whose arrays have a ``sample`` axis (named by
        ``dims``, or guessed as for any log) writes its ``b`` samples at samples
        ``[offset, offset + b)`` of a site sized ``total`` samples, and :meth:`describe` writes
        per-sample coordinates (on (sample, token)) there too, also for a site already declared
        by an earlier batch. With ``length``, the token dimensions are padded to that length:
        an int pads ``query`` and ``key`` of every site, ``{"query": 64, "key": 128}`` each
        dimension, and a mapping by site (``{"encoder/self": 128, "decoder/self": 32,
        "decoder/cross": (32, 128)}``: an int, a (query, key) pair or such a mapping each) pads
        each site; a site not listed follows the site its ``describes`` attribute names, or is
        not padded. Padded cells
        of dense weights and biases are 0 (logits NaN), padded rows of top-k and statistics
        variables hold their fill (NaN, -1: no row), padded labels are ``""``, and the masks
        (``query_mask``, ``key_mask``, written by the recorder when not described) say false
        there. The ``key_count`` of top-k and statistics sites is then the padded key length.
        Memory holds one batch: nothing is kept between blocks.

        Examples
        --------
        >>> import numpy as np, tempfile, pathlib, attnformat
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "many.attn.zarr"
        >>> texts = [["a", "b"], ["c", "d", "e"], ["f"]]
        >>> with Recorder(out) as rec:
        ...     for offset in range(0, 3, 2):
        ...         batch = texts[offset:offset + 2]
        ...         n = max(map(len, batch))
        ...         labels = [t + [""] * (n - len(t)) for t in batch]
        ...         mask = [[i < len(t) for i in range(n)] for t in batch]
        ...         weights = np.stack([np.where(m, 1.0 / sum(m), 0.0)[None, :].repeat(n, 0) for m in mask])
        ...         with rec.samples(offset, total=3, length=4):
        ...             rec.describe("self", labels=labels, mask=mask)
        ...             rec.log("self", layer=0, weights=weights[:, None], dims=("sample", "head", "query", "key"))
        >>> site = attnformat.open(out)["self"]
        >>> site["weights"].sizes["sample"], site["key_label"].values[1].tolist(), site["key_mask"].values[2].tolist()
        (3, ['c', 'd', 'e', ''], [True, False, False, False])
        """
        if self._batch is not None:
            raise AttnFormatError(f"{self.path}: samples() blocks do not nest")
        offset, total = int(offset), int(total)
        if total < 1 or not 0 <= offset < total:
            raise AttnFormatError(f"{self.path}: samples({offset}, total={total}): the offset must lie in [0, total)")
        if length is None:
            lengths = {}
        elif isinstance(length, Mapping) and not set(length) <= set(_TOKEN_DIMS):
            lengths = {str(site).strip("/"): _token_lengths(value, self.path) for site, value in length.items()}
        else:
            lengths = {"*": _token_lengths(length, self.path)}
        self._batch = _Batch(offset, total, lengths)
        try:
            yield self
        finally:
            self._batch = None

    def _lengths(self, site: str) -> dict:
        """The token lengths a site is padded to in the current samples block ({} for none)."""
        if self._batch is None:
            return {}
        table = self._batch.lengths
        if "*" in table:
            return table["*"]
        if site in table:
            return table[site]
        described = (self._descriptions.get(site, {}).get("attrs") or {}).get("describes")
        if described is None and site in self.sites:
            described = self.sites[site].attrs.get("describes")
        return table.get(str(described).strip("/"), {}) if described is not None else {}

    def _padded_coordinate(self, site: str, name: str, dims: tuple, values: np.ndarray) -> np.ndarray:
        """A token coordinate padded along its token dimension to the batch's length."""
        token = dims[-1]
        length = self._lengths(site).get(token)
        if length is None or token not in _TOKEN_DIMS or values.shape[-1] == length:
            return values
        if values.shape[-1] > length:
            raise CaptureShapeError(f"{self.path}: {name} has {values.shape[-1]} tokens, more than the length {length} given to samples()")
        pad = _pad_value(name, values.dtype)
        widths = [(0, 0)] * (values.ndim - 1) + [(0, length - values.shape[-1])]
        if name.endswith("_position"):  # padded tokens continue the index order
            padded = np.pad(values, widths)
            padded[..., values.shape[-1]:] = np.arange(values.shape[-1], length)
            return padded
        return np.pad(values, widths, constant_values=pad)

    def add_pairwise(self, site: str, name: str, values, *, units: str, dims: Sequence[str] = ("query", "key"), long_name: str | None = None) -> None:
        """Attach a pairwise quantity (distances, contacts) to a site, for plots against attention.

        ``values`` ends in (query, key) and may have leading dims of the site (``sample``).
        May be called before the site's first log; it is written when the site is declared.

        Examples
        --------
        >>> import numpy as np, tempfile, pathlib
        >>> rec = Recorder(pathlib.Path(tempfile.mkdtemp()) / "x.zarr")
        >>> rec.add_pairwise("iga", "distance", np.ones((3, 3)), units="angstrom")
        >>> rec.log("iga", weights=np.full((3, 3), 1 / 3))
        >>> sorted(rec.sites["iga"].dims)
        ['distance', 'weights']
        """
        attrs = {"role": "pairwise", "units": units}
        if long_name:
            attrs["long_name"] = long_name
        self.add_variable(site, name, values, dims, attrs=attrs)

    def add_image(self, site: str, image, *, dims: Sequence[str] | None = None, long_name: str | None = None) -> None:
        """Attach the input image of a vision model, for attention overlays.

        ``image`` is (image_row, image_col), (image_row, image_col, channel) or
        (sample, image_row, image_col, channel); pass ``dims`` when the shape is ambiguous.

        Examples
        --------
        >>> import numpy as np, tempfile, pathlib
        >>> rec = Recorder(pathlib.Path(tempfile.mkdtemp()) / "x.zarr")
        >>> rec.add_image("vit", np.zeros((28, 28)))
        >>> rec.log("vit", weights=np.full((5, 5), 0.2))
        >>> rec.sites["vit"].dims["image"]
        ('image_row', 'image_col')
        """
        image = to_numpy(image, dtype=None)
        if image.dtype.kind == "f":
            image = image.astype(np.float32)
        if dims is None:
            guesses = {2: ("image_row", "image_col"), 3: ("image_row", "image_col", "channel"), 4: ("sample", "image_row", "image_col", "channel")}
            if image.ndim not in guesses:
                raise AttnFormatError(f"site {site!r}: an image has 2 to 4 dimensions, not shape {image.shape}")
            dims = guesses[image.ndim]
        attrs = {"role": "image"}
        if long_name:
            attrs["long_name"] = long_name
        self.add_variable(site, "image", image, dims, attrs=attrs)

    def add_variable(self, site: str, name: str, values, dims: Sequence[str], *, attrs: Mapping) -> None:
        """Attach any other variable with a ``role`` attribute (written when the site is declared).

        Examples
        --------
        >>> import numpy as np, tempfile, pathlib
        >>> rec = Recorder(pathlib.Path(tempfile.mkdtemp()) / "x.zarr")
        >>> rec.add_variable("frames", "sink_score", np.zeros(4), ("key",), attrs={"role": "per_key"})
        """
        site = site.strip("/")
        values = to_numpy(values, dtype=None)
        entry = (name, values, tuple(dims), dict(attrs))
        if site in self.sites:
            self._add_now(site, *entry)
        else:
            self._pending_variables.setdefault(site, []).append(entry)

    def _add_now(self, site, name, values, dims, attrs):
        try:
            self.sites[site].add_variable(name, values, dims, attrs=attrs)
        except AttnFormatError as error:
            raise CaptureShapeError(f"{error} (while attaching {name!r} to site {site!r})") from None

    # -- logging -----------------------------------------------------------------------------
    def log(
        self,
        site: str,
        *,
        weights=None,
        logits=None,
        bias=None,
        key_index=None,
        omitted_weight=None,
        entropy=None,
        max_weight=None,
        sink_weight=None,
        local_weight=None,
        top_key=None,
        step: int | None = None,
        sample: int | None = None,
        layer: int | None = None,
        head: int | None = None,
        time: int | None = None,
        node: int | None = None,
        dims: Sequence[str] | None = None,
    ) -> None:
        """Write the weights (and/or logits, bias), the top-k or the statistics of one map, head, layer or step.

        Dense sites take ``weights``, ``logits``, ``bias``: the last axes of each array are
        (query, key), or (edge,) for edge sites. Top-k sites (``describe(site, layout="topk")``,
        or a log with ``key_index``) take ``weights`` and ``key_index`` ending in (query, rank)
        and ``omitted_weight`` ending in (query,): ``dims`` are those of ``weights``, and
        ``omitted_weight``'s are the same without ``rank``. Statistics sites (``layout=
        "statistics"``, or a log with only statistics) take ``entropy``, ``max_weight``,
        ``sink_weight``, ``local_weight`` and ``top_key``, each ending in (query,). Leading axes
        are the dimensions not selected by ``step``, ``sample``, ``layer``, ``head``, ``time``,
        ``node``: without ``dims``, one leading axis is ``head`` and two are (``sample``,
        ``head``); pass ``dims`` (the dimensions of the arrays) otherwise. ``bias`` may drop
        leading axes (a bias shared by heads). Numpy arrays and torch tensors are accepted
        (detached, moved to the CPU, bfloat16/float16 widened to float32); ``key_index`` and
        ``top_key`` are stored as int32 (-1: no key).

        The first log of a site declares it from these shapes; later logs must match them, and
        a mismatch raises :class:`CaptureShapeError` naming the site and the layer. Inside
        :meth:`samples`, arrays with a ``sample`` axis are written at the batch's samples.

        Examples
        --------
        >>> import numpy as np, tempfile, pathlib, attnformat
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "x.attn.zarr"
        >>> weights = np.full((4, 6, 6), 1 / 6)
        >>> with Recorder(out) as rec:
        ...     rec.log("blocks", layer=3, weights=weights)
        ...     rec.describe("blocks_topk", layout="topk", attrs={"key_count": 6, "describes": "blocks"})
        ...     kept, index, omitted = attnformat.reductions.top_k(weights, 2)
        ...     rec.log("blocks_topk", layer=3, weights=kept, key_index=index, omitted_weight=omitted)
        >>> tree = attnformat.open(out)
        >>> tree["blocks"]["weights"].dims, tree["blocks_topk"]["key_index"].dims
        (('layer', 'head', 'query', 'key'), ('layer', 'head', 'query', 'rank'))
        """
        site = site.strip("/")
        given = {name: value for name, value in (
            ("weights", weights), ("logits", logits), ("bias", bias), ("key_index", key_index), ("omitted_weight", omitted_weight),
            ("entropy", entropy), ("max_weight", max_weight), ("sink_weight", sink_weight), ("local_weight", local_weight),
            ("top_key", top_key)) if value is not None}
        if not given:
            raise AttnFormatError(f"{self.path}:{site}: log() needs weights, logits or bias (dense, edge), weights, key_index and "
                                  f"omitted_weight (topk), or statistics ({', '.join(STATISTICS)})")
        layout = self._layout_of(site, given)
        wrong = [name for name in given if name not in _LAYOUT_VARIABLES[layout]]
        if wrong:
            raise AttnFormatError(f"{self.path}:{site}: a {layout} site takes {', '.join(_LAYOUT_VARIABLES[layout])}, not {', '.join(wrong)}")
        target = np.float16 if np.dtype(self.dtype) == np.float16 else np.float32
        arrays = {name: _integer_array(value) if name in INTEGER_VARIABLES else to_numpy(value, dtype=target) for name, value in given.items()}
        selection = {dim: label for dim, label in (("step", step), ("sample", sample), ("layer", layer), ("head", head), ("time", time), ("node", node)) if label is not None}
        selection = {dim: int(label) if isinstance(label, (int, np.integer)) or hasattr(label, "item") else label for dim, label in selection.items()}
        writer = self.sites.get(site)
        reference_name = next(name for name in _LAYOUT_VARIABLES[layout] if name in arrays)
        if dims is not None:
            dims, arrays = _in_canonical_order(tuple(dims), arrays)
            value_dims = dims
        elif writer is not None and reference_name in writer.dims:
            value_dims = tuple(d for d in writer.dims[reference_name] if d not in selection)
        else:
            value_dims = self._guessed_dims(site, layout, reference_name, arrays[reference_name], selection)
        map_dims = MAP_DIMS[layout]
        reference = arrays[reference_name]
        where = _where(self.path, site, selection)
        if (value_dims[-len(map_dims):] != map_dims or len(value_dims) != reference.ndim or set(value_dims) & set(selection)):
            raise CaptureShapeError(f"{where}: dims {value_dims} do not fit {reference_name} of shape {reference.shape} "
                                    f"(a {layout} site's arrays end in {map_dims}; selected dims {tuple(selection)} cannot repeat)")
        span, lengths = None, {}
        if self._batch is not None and "sample" in value_dims:
            count = reference.shape[value_dims.index("sample")]
            if self._batch.offset + count > self._batch.total:
                raise CaptureShapeError(f"{where}: {count} samples at offset {self._batch.offset} go past total={self._batch.total}")
            span = slice(self._batch.offset, self._batch.offset + count)
            lengths = {dim: reference.shape[value_dims.index(dim)] for dim in _TOKEN_DIMS if dim in value_dims}
            arrays = {name: self._padded(site, layout, name, values, _dims_of(layout, name, value_dims, values)) for name, values in arrays.items()}
        if writer is None:
            keepbits = {name: bits for name, bits in ((name, _mantissa_bits(value)) for name, value in given.items()
                                                      if name not in INTEGER_VARIABLES) if bits is not None}
            self.writer.flush()  # creating arrays while a write is in flight is not something to race
            writer = self._declare(site, layout, arrays, reference_name, selection, value_dims, keepbits, span)
        for name, values in arrays.items():
            self._write(site, writer, name, values, selection, span)
        if span is not None:
            self._write_auto_masks(site, writer, span, lengths)

    def _layout_of(self, site: str, given: dict) -> str:
        """The site's layout: declared, described, or told by the variables logged."""
        if site in self.sites:
            return self.sites[site].attrs["layout"]
        described = self._descriptions.get(site, {}).get("layout")
        if described is not None:
            return described
        if "key_index" in given or "omitted_weight" in given:
            return "topk"
        if set(given) <= set(STATISTICS):
            return "statistics"
        return "dense"

    def _guessed_dims(self, site, layout, reference_name, reference, selection) -> tuple:
        map_dims = MAP_DIMS[layout]
        leading = reference.ndim - len(map_dims)
        candidates = [d for d in _GUESSED_LEADING_DIMS if d not in selection]
        if leading < 0 or leading > len(candidates):
            raise CaptureShapeError(
                f"{_where(self.path, site, selection)}: {reference_name} has shape {reference.shape}; expected {map_dims} after at most "
                f"{len(candidates)} leading axes {tuple(candidates)}; pass dims=... to name its axes")
        return tuple(candidates[len(candidates) - leading:]) + map_dims

    def _padded(self, site: str, layout: str, name: str, values: np.ndarray, dims: tuple) -> np.ndarray:
        """An array of one batch padded along its token dimensions to the batch's lengths."""
        widths, pad = [], False
        lengths = self._lengths(site)
        for dim, size in zip(dims, values.shape):
            length = lengths.get(dim)
            if length is not None and size > length:
                raise CaptureShapeError(f"{self.path}: {name} has {size} along {dim}, more than the length {length} given to samples()")
            widths.append((0, length - size) if length is not None else (0, 0))
            pad = pad or (length is not None and size < length)
        if not pad:
            return values
        if name in INTEGER_VARIABLES:
            fill = INTEGER_VARIABLES[name][1]
        elif layout in ("dense", "edge") and name != "logits":
            fill = 0.0  # like a padded batch: padding takes and gives no weight
        else:
            fill = np.nan  # logits of padding are no scores; a padded top-k or statistics row is no row
        return np.pad(values, widths, constant_values=fill)

    def _declare(self, site: str, layout: str, arrays: dict, reference_name: str, selection: dict, value_dims: tuple, keepbits: dict,
                 span: slice | None) -> SiteWriter:
        description = dict(self._descriptions.get(site, {}))
        reference = arrays[reference_name]
        where = _where(self.path, site, selection)
        sizes: dict[str, int] = dict(zip(value_dims, reference.shape))
        coords: dict = {}
        chunks: dict = {}
        for dim, label in selection.items():
            if dim == "step":
                sizes["step"] = 0
                continue
            declared = description.get(dim + "s") if dim in ("sample", "layer", "head") else None  # "times"/"nodes" are counts
            labels = list(declared) if declared is not None else [label]
            sizes[dim] = len(labels)
            coords[dim] = np.asarray(labels)
        if span is not None:
            sizes["sample"] = self._batch.total
            if description.get("samples") is not None and len(description["samples"]) != self._batch.total:
                raise CaptureShapeError(f"{where}: samples= names {len(description['samples'])} samples, but samples() says total={self._batch.total}")
        for dim in ("layer", "head", "sample"):
            if dim in sizes and dim not in coords and description.get(dim + "s") is not None:
                coords[dim] = np.asarray(list(description[dim + "s"]))
        attrs = {"attention_type": "self", "causal": 0}
        if layout == "edge":
            node_dim = description.get("edge_node_dim", "node")
            attrs.update(edge_node_dim=node_dim, self_loops_added=0)
            source, target = description.get("source"), description.get("target")
            if source is None or target is None:
                raise AttnFormatError(f"{where}: an edge site needs source= and target= (per-edge node indices); give them with describe()")
            source, target = (to_numpy(v, dtype=np.int64).reshape(-1) for v in (source, target))
            if source.size != sizes["edge"] or target.size != sizes["edge"]:
                raise CaptureShapeError(f"{where}: {sizes['edge']} edges logged, but source/target describe {source.size}/{target.size}")
            coords["source"], coords["target"] = ("edge", source), ("edge", target)
            count = description.get("times" if node_dim == "time" else "nodes")
            if count is None and node_dim == "node" and description.get("node_labels") is not None:
                count = len(description["node_labels"])
            if count is None:
                count = int(max(source.max(initial=-1), target.max(initial=-1))) + 1
            if node_dim in sizes and sizes[node_dim] != count:
                raise CaptureShapeError(f"{where}: edge_node_dim {node_dim!r} is also an axis of the logged values")
            sizes[node_dim] = int(count)
        if description.get("node_labels") is not None:
            coords["node_label"] = ("node", np.asarray(list(description["node_labels"]), dtype=object))
        token_coords = {**_token_coords(description), **(description.get("coords") or {})}
        for name, spec in token_coords.items():
            coord_dims, values = _coordinate_spec(name, spec)
            if self._batch is not None and coord_dims and coord_dims[-1] in _TOKEN_DIMS:
                values = self._padded_coordinate(site, name, coord_dims, values)
            if span is not None and coord_dims and coord_dims[0] == "sample":
                values, chunks[name] = self._whole_samples(site, name, coord_dims, values)
            coords[name] = (coord_dims, values)
            if coord_dims and coord_dims[-1] in _TOKEN_DIMS and layout in ("topk", "statistics"):
                sizes.setdefault(coord_dims[-1], values.shape[-1])  # the key dimension of the key coordinates
        automatic = []
        if span is not None:
            for dim, length in self._lengths(site).items():
                if dim in sizes or (dim == "key" and layout in ("topk", "statistics")):
                    sizes[dim] = length
                    name = f"{dim}_mask"
                    if name not in coords:
                        coords[name] = (("sample", dim), np.zeros((self._batch.total, length), bool))
                        chunks[name] = self._coordinate_chunks(length, span.stop - span.start)
                        automatic.append(name)
        attrs.update(description.get("attrs") or {})
        if layout in ("topk", "statistics") and span is not None and "key" in self._lengths(site):
            attrs["key_count"] = self._lengths(site)["key"]  # the padded keys are keys too (masked ones)
        variables = {}
        value_dim_set = set(selection) | set(value_dims)
        for name, values in arrays.items():
            if name == "bias" and reference_name != "bias":
                trailing = value_dims[len(value_dims) - values.ndim:] if values.ndim <= len(value_dims) else None
                if trailing is None:
                    raise CaptureShapeError(f"{where}: bias has shape {values.shape}, more axes than {reference_name} {reference.shape}")
                variables[name] = tuple(selection) + tuple(trailing)
            elif name == "omitted_weight":
                variables[name] = tuple(value_dim_set - {"rank"})
            else:
                variables[name] = tuple(value_dim_set)
        try:
            writer = self.writer.create_site(site, sizes=sizes, layout=layout, variables=variables, dtype=self.dtype, coords=coords, attrs=attrs,
                                              keepbits=keepbits, chunks=chunks)
        except AttnFormatError as error:
            raise CaptureShapeError(f"{error} (declaring site {site!r} from its first log)") from None
        self.sites[site] = writer
        self._selected[site] = set(selection)
        self._coordinate_rows[site] = {name: int(shape[0]) for name, shape in chunks.items()}
        if automatic:
            self._auto_masks[site] = tuple(automatic)
        for entry in self._pending_variables.pop(site, []):
            self._add_now(site, *entry)
        return writer

    def _coordinate_chunks(self, length: int, width: int) -> tuple[int, int]:
        """Chunks of a per-sample coordinate written ``width`` samples at a time: about a quarter
        of the smallest map chunk (a few hundred files for 10,000 samples), as whole batches or
        parts of one, so that no chunk boundary falls inside a batch."""
        rows = self._batch.total if self._batch.total * length <= MIN_MAP_CHUNK_ELEMENTS // 4 else max(1, MIN_MAP_CHUNK_ELEMENTS // 4 // length)
        return (min(self._batch.total, _aligned(rows, width)), length)

    def _whole_samples(self, site: str, name: str, dims: tuple, values: np.ndarray):
        """The first batch's per-sample coordinate placed in an array of every sample (padding
        elsewhere, overwritten batch by batch), and its chunk shape."""
        total, offset = self._batch.total, self._batch.offset
        if values.shape[0] + offset > total:
            raise CaptureShapeError(f"{self.path}: {name} describes {values.shape[0]} samples at offset {offset}, past total={total}")
        whole = np.empty((total,) + values.shape[1:], dtype=values.dtype)
        whole[...] = np.arange(values.shape[-1]) if name.endswith("_position") else _pad_value(name, values.dtype)
        whole[offset:offset + values.shape[0]] = values
        length = values.shape[-1] if values.ndim > 1 else 1
        chunks = self._coordinate_chunks(length, values.shape[0])
        return whole, chunks[:values.ndim] if values.ndim > 1 else (chunks[0],)

    def _write_auto_masks(self, site: str, writer: SiteWriter, span: slice, lengths: dict) -> None:
        """The masks the recorder keeps for its own padding: true on the batch's tokens."""
        for name in self._auto_masks.get(site, ()):
            done = self._masked.setdefault(site, set())
            if (name, span.start) in done:
                continue
            dim = name.removesuffix("_mask")
            total = writer.sizes[dim]
            real = lengths.get(dim)
            if real is None:  # a top-k or statistics site has no key axis: its keys are its key_count
                real = int((self._descriptions.get(site, {}).get("attrs") or {}).get("key_count", lengths.get("query", total)))
            mask = np.zeros((span.stop - span.start, total), bool)
            mask[:, :min(real, total)] = True
            self._write_coordinate(site, writer, name, mask, span)
            done.add((name, span.start))

    def _write_coordinate(self, site: str, writer: SiteWriter, name: str, values: np.ndarray, span: slice) -> None:
        """Write a batch's rows of a per-sample coordinate, held until they fill whole chunks.

        A coordinate's chunk holds several batches (:meth:`_coordinate_chunks`, so that 10,000
        samples make a few hundred files, not thousands): written batch by batch, every write
        read, decoded, changed and encoded that chunk again (about 11 ms a batch per coordinate,
        measured, six coordinates a site). Held here (a chunk's labels and masks: kilobytes) and
        written when the rows reach a chunk's end, each chunk is written once, whole. Rows that
        do not follow the held ones (batches out of order) write what is held first; closing the
        recorder writes the rest.
        """
        rows = self._coordinate_rows.get(site, {}).get(name)
        if rows is None:
            writer.write_coordinate(name, values, sample=span)
            return
        key = (site, name)
        held = self._held.setdefault(key, [])
        if held and held[-1][0] + len(held[-1][1]) != span.start:
            self._write_held(key)
            held = self._held.setdefault(key, [])
        held.append((span.start, values))
        if span.stop % rows == 0 or span.stop >= writer.sizes["sample"]:
            self._write_held(key)

    def _write_held(self, key: tuple[str, str]) -> None:
        held = self._held.pop(key, [])
        if held:
            site, name = key
            start = held[0][0]
            values = np.concatenate([values for _, values in held]) if len(held) > 1 else held[0][1]
            self.sites[site].write_coordinate(name, values, sample=slice(start, start + len(values)))

    def _write(self, site: str, writer: SiteWriter, name: str, values: np.ndarray, selection: dict, span: slice | None = None) -> None:
        where = _where(self.path, site, selection)
        if name not in writer.dims:
            raise CaptureShapeError(f"{where}: {name} was not logged on the site's first log, so the site has no {name!r} variable; "
                                    f"log every variable ({', '.join(writer.dims)}) from the first call on")
        variable_dims = writer.dims[name]
        picked = {dim: label for dim, label in selection.items() if dim in variable_dims}
        if set(selection) != self._selected[site]:
            raise CaptureShapeError(f"{where}: select the same dimensions {tuple(self._selected[site])} on every log of the site "
                                    f"(its first log selected those); this log selects {tuple(selection)}")
        for dim, label in picked.items():
            if dim != "step" and label not in writer.labels.get(dim, []):
                try:
                    writer.append_label(dim, label)
                except WriterError as error:
                    raise CaptureShapeError(f"{where}: cannot add {dim}={label!r} ({error}); declare every label up front "
                                            f"with describe(..., {dim}s=[...])") from error
        if span is not None and "sample" in variable_dims:
            picked["sample"] = span
        expected = tuple((span.stop - span.start) if d == "sample" and span is not None else writer.sizes[d]
                         for d in variable_dims if d not in picked or (d == "sample" and span is not None))
        if values.shape != expected and name == "bias":
            try:
                values = np.broadcast_to(values, expected)
            except ValueError:
                pass
        if values.shape != expected:
            free = tuple(d for d in variable_dims if d not in picked or d == "sample" and span is not None)
            raise CaptureShapeError(f"{where}: {name} has shape {values.shape}, but the site was declared with {expected} for "
                                    f"{free} on its first log; log the same shape each time or use another site name")
        writer.write(name, values, **picked)

    # -- closing -----------------------------------------------------------------------------
    def close(self, *, complete: bool = True):
        """Finish the file (when the recorder opened it) and return its path.

        Waits for a write still in flight; if it failed, the file is closed incomplete and the
        error is raised.

        Examples
        --------
        >>> import numpy as np, tempfile, pathlib, attnformat
        >>> rec = Recorder(pathlib.Path(tempfile.mkdtemp()) / "x.attn.zarr")
        >>> rec.log("self", weights=np.full((2, 2), 0.5))
        >>> attnformat.is_complete(attnformat.open(rec.close()))
        True
        """
        try:
            for key in list(self._held):
                self._write_held(key)
        except BaseException:
            self._held.clear()
            if self._owns_writer:
                self.writer.close(complete=False)
            raise
        if self._owns_writer:
            return self.writer.close(complete=complete)
        self.writer.flush()
        return self.writer.path

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(complete=exc_type is None)


def _in_canonical_order(dims: tuple, arrays: dict) -> tuple[tuple, dict]:
    """Transpose arrays given with ``dims`` in another order into the spec's canonical order
    (``omitted_weight`` has the dims without ``rank``)."""
    unknown = [d for d in dims if d not in ALL_ATTENTION_DIMS]
    if unknown:
        raise CaptureShapeError(f"dims {dims}: {unknown} are not attention dimensions {ALL_ATTENTION_DIMS}")
    ordered = canonical_dims(dims)
    if ordered == dims:
        return dims, arrays
    transposed = {}
    for name, values in arrays.items():
        own = tuple(d for d in dims if d != "rank") if name == "omitted_weight" else dims
        if values.ndim == len(own):
            values = values.transpose([own.index(d) for d in ordered if d in own])
        transposed[name] = values
    return ordered, transposed


def _dims_of(layout: str, name: str, value_dims: tuple, values: np.ndarray) -> tuple:
    """The dimensions of one logged array, given those of the site's reference array."""
    if name == "omitted_weight":
        return tuple(d for d in value_dims if d != "rank")
    return value_dims[len(value_dims) - values.ndim:] if values.ndim <= len(value_dims) else value_dims


def _integer_array(values) -> np.ndarray:
    """An index array as int32; NaN (no key) becomes -1."""
    array = to_numpy(values, dtype=None)
    if array.dtype.kind == "f":
        array = np.where(np.isnan(array), -1, array)
    return array.astype(np.int32)


def _coordinate_spec(name: str, spec) -> tuple[tuple, np.ndarray]:
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], (str, tuple)) and not isinstance(spec[1], str):
        dims = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])
        return dims, np.asarray(spec[1])
    return (name,), np.asarray(spec)


def _pad_value(name: str, dtype: np.dtype):
    """What a padded token holds in a coordinate: not a token (false, "", -1, NaN)."""
    if dtype == bool:
        return False
    if dtype.kind in "OUST":
        return ""
    if dtype.kind in "iu":
        return -1
    return np.nan


def _token_lengths(value, where) -> dict:
    """{"query": n, "key": m} from an int, a (query, key) pair or such a mapping."""
    if isinstance(value, Mapping):
        lengths = {str(dim): value[dim] for dim in value}
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        lengths = dict(zip(_TOKEN_DIMS, value))
    else:
        lengths = dict.fromkeys(_TOKEN_DIMS, value)
    if any(dim not in _TOKEN_DIMS for dim in lengths) or not all(isinstance(n, (int, np.integer)) and n >= 1 for n in lengths.values()):
        raise AttnFormatError(f"{where}: length pads the token dimensions {_TOKEN_DIMS} to positive integer lengths, not {value!r}")
    return {dim: int(n) for dim, n in lengths.items()}


def _same_tokens(key, first, second, pad) -> bool:
    """Whether two (token,) values of a description key pad to the same coordinate."""
    stem = key.removeprefix("query_").removeprefix("key_")
    if stem not in _TOKEN_KEYS:
        return False
    try:
        coords = [_token_coords({key: value}) for value in (first, second)]
    except (ValueError, TypeError):
        return False
    if coords[0].keys() != coords[1].keys():
        return False
    for name in coords[0]:
        (dims, a), (_, b) = coords[0][name], coords[1][name]
        if len(dims) != 1:
            return False
        a, b = pad(name, dims, a), pad(name, dims, b)
        if a.shape != b.shape or not np.array_equal(a, b):
            return False
    return True


def _same(first, second) -> bool:
    if isinstance(first, Mapping) and isinstance(second, Mapping):
        return first.keys() == second.keys() and all(_same(first[k], second[k]) for k in first)
    try:
        return bool(np.array_equal(np.asarray(first, dtype=object), np.asarray(second, dtype=object)))
    except (ValueError, TypeError):
        return first == second


def _per_sample_coords(description: Mapping) -> dict:
    """The per-sample coordinates (on (sample, token) or (sample, ...)) of a description, and
    the description keys they come from."""
    coords, keys = {}, set()
    for name, (dims, values) in _token_coords(description).items():
        if dims[0] == "sample":
            coords[name] = (dims, values)
    for key in description:
        stem = key.removeprefix("query_").removeprefix("key_")
        if stem in _TOKEN_KEYS and np.ndim(to_numpy(description[key], dtype=None)) == 2:
            keys.add(key)
    for name, spec in (description.get("coords") or {}).items():
        dims, values = _coordinate_spec(name, spec)
        if dims and dims[0] == "sample":
            coords[name] = (dims, values)
    if description.get("coords") and all(_coordinate_spec(n, spec)[0][:1] == ("sample",) for n, spec in description["coords"].items()):
        keys.add("coords")
    return {"coords": coords, "keys": keys}


def _mantissa_bits(values) -> int | None:
    """Mantissa bits of a half-precision input (bfloat16: 7, float16: 10), else None.

    Widened to float32 such values are float32 numbers bit-rounded to that many bits; declaring
    it (``lossy_method="bitround"``) tells readers and the validator how exact the sums can be.
    """
    name = str(getattr(values, "dtype", ""))
    return {"torch.bfloat16": 7, "torch.float16": 10, "float16": 10}.get(name)


def _where(path, site, selection) -> str:
    labels = ", ".join(f"{dim}={label}" for dim, label in selection.items())
    return f"{path}:{site}" + (f" [{labels}]" if labels else "")


def _token_coords(description: Mapping) -> dict:
    """Query/key coordinates from a description; bare ``labels`` etc. serve both query and key."""
    coords = {}
    for stem, suffix, kind in (("labels", "label", object), ("groups", "group", None), ("mask", "mask", bool), ("positions", "position", np.int64),
                               ("tokens", "token", object), ("generation_steps", "generation_step", np.int64)):
        for side in ("query", "key"):
            values = description.get(f"{side}_{stem}", description.get(stem))
            if values is None:
                continue
            array = to_numpy(values, dtype=None)
            if kind is object or array.dtype.kind in "OUS":
                array = np.asarray(array, dtype=object).astype(str).astype(object)
            elif kind is not None:
                array = array.astype(kind)
            token_dims = (side,) if array.ndim == 1 else ("sample", side)
            coords[f"{side}_{suffix}"] = (token_dims, array)
    return coords
