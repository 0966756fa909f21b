"""Log attention from custom code (a model's forward, a training loop) into an attention file.

The :class:`Recorder` is the adapter for attention that no framework adapter knows: a protein
model's invariant Gaussian attention with its geometric bias, a video model's frame attention,
anything that has the weights (or logits) in hand. Each :meth:`Recorder.log` call writes one
map, one layer or one step straight to disk; a site is declared on its first log, from the shape
of what is logged, and grows along ``step`` (and along ``layer``, ``head``... when new labels
appear). The framework adapters write through a Recorder too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from attnformat.adapters.arrays import to_numpy
from attnformat.adapters.errors import CaptureShapeError
from attnformat.conventions import ATTENTION_DIMS as ALL_ATTENTION_DIMS
from attnformat.conventions import canonical_dims
from attnformat.errors import AttnFormatError, WriterError
from attnformat.writer import SiteWriter, Writer

MAP_DIMS = {"dense": ("query", "key"), "edge": ("edge",)}
#: How many leading axes a logged array may have without ``dims``, and what they are.
_GUESSED_LEADING_DIMS = ("sample", "head")
_DESCRIPTION_KEYS = frozenset({
    "layout", "labels", "query_labels", "key_labels", "groups", "query_groups", "key_groups",
    "mask", "query_mask", "key_mask", "positions", "query_positions", "key_positions",
    "source", "target", "edge_node_dim", "nodes", "node_labels", "times", "layers", "heads",
    "samples", "attrs", "coords",
})


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

        Keywords (all optional): ``layout`` (``"dense"`` or ``"edge"``); token coordinates
        ``labels``, ``groups``, ``mask``, ``positions`` (for both query and key of a
        self-attention site) or their ``query_``/``key_`` forms, each on (token,) or
        (sample, token); ``layers``, ``heads``, ``samples``: every label up front (otherwise a
        dimension grows as new labels are logged); for edge sites ``source`` and ``target``
        (0-based node indices per edge), ``edge_node_dim`` (``"node"`` or ``"time"``), ``nodes``
        or ``times`` (how many) and ``node_labels``; ``attrs`` (site attributes such as
        ``causal``, ``attention_type``, ``key_site``, ``patch_grid``); ``coords`` (any other
        coordinate, as ``{name: (dims, values)}``).

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
        if site in self.sites:
            raise AttnFormatError(f"{self.path}:{site}: the site is already declared (by its first log); describe it before logging")
        self._descriptions.setdefault(site, {}).update(description)

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
        step: int | None = None,
        sample: int | None = None,
        layer: int | None = None,
        head: int | None = None,
        time: int | None = None,
        node: int | None = None,
        dims: Sequence[str] | None = None,
    ) -> None:
        """Write the weights (and/or logits, bias) of one map, head, layer or step.

        The last axes of each array are (query, key), or (edge,) for edge sites. Leading axes
        are the dimensions not selected by ``step``, ``sample``, ``layer``, ``head``, ``time``,
        ``node``: without ``dims``, one leading axis is ``head`` and two are
        (``sample``, ``head``); pass ``dims`` (the dimensions of ``weights``) otherwise. ``bias``
        may drop leading axes (a bias shared by heads). Numpy arrays and torch tensors are
        accepted (detached, moved to the CPU, bfloat16/float16 widened to float32).

        The first log of a site declares it from these shapes; later logs must match them, and
        a mismatch raises :class:`CaptureShapeError` naming the site and the layer.

        Examples
        --------
        >>> import numpy as np, tempfile, pathlib, attnformat
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "x.attn.zarr"
        >>> with Recorder(out) as rec:
        ...     rec.log("blocks", layer=3, weights=np.full((4, 6, 6), 1 / 6))
        >>> attnformat.open(out)["blocks"]["weights"].dims
        ('layer', 'head', 'query', 'key')
        """
        site = site.strip("/")
        given = {name: value for name, value in (("weights", weights), ("logits", logits), ("bias", bias)) if value is not None}
        target = np.float16 if np.dtype(self.dtype) == np.float16 else np.float32
        arrays = {name: to_numpy(value, dtype=target) for name, value in given.items()}
        if not arrays:
            raise AttnFormatError(f"{self.path}:{site}: log() needs weights, logits or bias")
        selection = {dim: label for dim, label in (("step", step), ("sample", sample), ("layer", layer), ("head", head), ("time", time), ("node", node)) if label is not None}
        selection = {dim: int(label) if isinstance(label, (int, np.integer)) or hasattr(label, "item") else label for dim, label in selection.items()}
        if dims is not None:
            dims, arrays = _in_canonical_order(tuple(dims), arrays)
        writer = self.sites.get(site)
        if writer is None:
            keepbits = {name: bits for name, bits in ((name, _mantissa_bits(value)) for name, value in given.items()) if bits is not None}
            self.writer.flush()  # creating arrays while a write is in flight is not something to race
            writer = self._declare(site, arrays, selection, dims, keepbits)
        for name, values in arrays.items():
            self._write(site, writer, name, values, selection)

    def _declare(self, site: str, arrays: dict, selection: dict, dims, keepbits: dict) -> SiteWriter:
        description = dict(self._descriptions.get(site, {}))
        layout = description.get("layout", "dense")
        map_dims = MAP_DIMS.get(layout)
        if map_dims is None:
            raise AttnFormatError(f"{self.path}:{site}: layout must be 'dense' or 'edge', not {layout!r}")
        reference_name = next(name for name in ("weights", "logits", "bias") if name in arrays)
        reference = arrays[reference_name]
        where = _where(self.path, site, selection)
        if dims is None:
            leading = reference.ndim - len(map_dims)
            candidates = [d for d in _GUESSED_LEADING_DIMS if d not in selection]
            if leading < 0 or leading > len(candidates):
                raise CaptureShapeError(
                    f"{where}: {reference_name} has shape {reference.shape}; expected {map_dims} after at most "
                    f"{len(candidates)} leading axes {tuple(candidates)}; pass dims=... to name its axes")
            value_dims = tuple(candidates[len(candidates) - leading:]) + map_dims
        else:
            value_dims = tuple(dims)
            if value_dims[-len(map_dims):] != map_dims or len(value_dims) != reference.ndim or set(value_dims) & set(selection):
                raise CaptureShapeError(f"{where}: dims {value_dims} do not fit {reference_name} of shape {reference.shape} "
                                        f"(a {layout} site's arrays end in {map_dims}; selected dims {tuple(selection)} cannot repeat)")
        sizes: dict[str, int] = dict(zip(value_dims, reference.shape))
        coords: dict = {}
        for dim, label in selection.items():
            if dim == "step":
                sizes["step"] = 0
                continue
            declared = description.get(dim + "s") if dim in ("sample", "layer", "head") else None  # "times"/"nodes" are counts
            labels = list(declared) if declared is not None else [label]
            sizes[dim] = len(labels)
            coords[dim] = np.asarray(labels)
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
        coords.update(_token_coords(description))
        coords.update(description.get("coords") or {})
        attrs.update(description.get("attrs") or {})
        value_dim_set = set(selection) | set(value_dims)
        variables = {}
        for name, values in arrays.items():
            if name == "bias" and reference_name != "bias":
                trailing = value_dims[len(value_dims) - values.ndim:] if values.ndim <= len(value_dims) else None
                if trailing is None:
                    raise CaptureShapeError(f"{where}: bias has shape {values.shape}, more axes than {reference_name} {reference.shape}")
                variables[name] = tuple(selection) + tuple(trailing)
            else:
                variables[name] = tuple(value_dim_set)
        try:
            writer = self.writer.create_site(site, sizes=sizes, layout=layout, variables=variables, dtype=self.dtype, coords=coords, attrs=attrs,
                                              keepbits=keepbits)
        except AttnFormatError as error:
            raise CaptureShapeError(f"{error} (declaring site {site!r} from its first log)") from None
        self.sites[site] = writer
        self._selected[site] = set(selection)
        for entry in self._pending_variables.pop(site, []):
            self._add_now(site, *entry)
        return writer

    def _write(self, site: str, writer: SiteWriter, name: str, values: np.ndarray, selection: dict) -> None:
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
        expected = tuple(writer.sizes[d] for d in variable_dims if d not in picked)
        if values.shape != expected and name == "bias":
            try:
                values = np.broadcast_to(values, expected)
            except ValueError:
                pass
        if values.shape != expected:
            free = tuple(d for d in variable_dims if d not in picked)
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
        if self._owns_writer:
            return self.writer.close(complete=complete)
        self.writer.flush()
        return self.writer.path

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(complete=exc_type is None)


def _in_canonical_order(dims: tuple, arrays: dict) -> tuple[tuple, dict]:
    """Transpose arrays given with ``dims`` in another order into the spec's canonical order."""
    unknown = [d for d in dims if d not in ALL_ATTENTION_DIMS]
    if unknown:
        raise CaptureShapeError(f"dims {dims}: {unknown} are not attention dimensions {ALL_ATTENTION_DIMS}")
    ordered = canonical_dims(dims)
    if ordered == dims:
        return dims, arrays
    permutation = [dims.index(d) for d in ordered]
    return ordered, {name: values.transpose(permutation) if values.ndim == len(dims) else values for name, values in arrays.items()}


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
    for stem, suffix, kind in (("labels", "label", object), ("groups", "group", None), ("mask", "mask", bool), ("positions", "position", np.int64)):
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
