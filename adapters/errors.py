"""Errors the adapters raise; all derive from :class:`attnformat.errors.AttnFormatError`."""

from __future__ import annotations

from attnformat.errors import AttnFormatError, WriterError


class UnsupportedModelError(AttnFormatError, TypeError):
    """The model (or module) holds no attention this adapter knows how to capture.

    The message says what the adapter supports and points to
    :class:`attnformat.adapters.Recorder` for custom attention code.

    Examples
    --------
    >>> import attnformat
    >>> issubclass(UnsupportedModelError, attnformat.AttnFormatError)
    True
    """


class CaptureShapeError(WriterError):
    """Values logged for a site do not fit the shape the site was declared with (the message names site and layer).

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib, attnformat
    >>> from attnformat.adapters import Recorder
    >>> rec = Recorder(pathlib.Path(tempfile.mkdtemp()) / "x.zarr")
    >>> rec.log("self", layer=0, weights=np.full((2, 3, 3), 1 / 3))
    >>> try:
    ...     rec.log("self", layer=1, weights=np.full((2, 4, 4), 1 / 4))
    ... except attnformat.adapters.CaptureShapeError as error:
    ...     print(str(error).split(": ", 1)[0].rsplit("/", 1)[-1])
    x.zarr:self [layer=1]
    """


class CaptureStateError(AttnFormatError, RuntimeError):
    """A capture was used in a way its ``with`` block does not allow (entered twice, a layer run twice).

    Examples
    --------
    >>> issubclass(CaptureStateError, RuntimeError)
    True
    """
