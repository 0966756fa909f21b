"""Errors the adapters raise; all derive from :class:`attnformat.errors.AttnFormatError`."""

from __future__ import annotations

from attnformat.errors import AttnFormatError, WriterError


class UnsupportedModelError(AttnFormatError, TypeError):
    """The model (or module) holds no attention this adapter knows how to capture.

    The message says what the adapter supports and points to
    :class:`attnformat.adapters.Recorder` for custom attention code.
    """


class CaptureShapeError(WriterError):
    """Values logged for a site do not fit the shape the site was declared with (the message names site and layer)."""


class CaptureStateError(AttnFormatError, RuntimeError):
    """A capture was used outside its ``with`` block, or entered twice."""
