"""Exceptions raised by attnformat.

Every error derives from :class:`AttnFormatError`, which is also a ``ValueError`` so that
callers that already catch ``ValueError`` keep working. Messages name the file, the group or
variable, the spec rule id where one applies, and what to do about it.
"""

from __future__ import annotations


class AttnFormatError(ValueError):
    """Root of every error attnformat raises on purpose."""


class UnreadableFileError(AttnFormatError, OSError):
    """The path does not exist, is not a store attnformat can open, or is damaged."""


class UnsupportedFormatError(UnreadableFileError):
    """The path's suffix names no storage engine attnformat writes (.zarr, .zarr.zip, .h5, .nc)."""


class NonConformingError(AttnFormatError):
    """A tree or file breaks one or more MUST rules of the spec.

    ``report`` holds the :class:`attnformat.validation.ValidationReport` with every finding.
    """

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class WriterError(AttnFormatError):
    """A streaming write was asked to do something its declaration does not allow."""


class CollectionError(AttnFormatError):
    """Files opened as one collection (:func:`attnformat.open_many`) disagree, or cannot be joined as asked."""


class SelectionError(AttnFormatError, KeyError):
    """A selector (group, variable, layer, head, label) names something the file does not hold."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class BrokenStoreError(UnreadableFileError):
    """The store breaks a storage rule (ATTN-STORE-*) that keeps any tree from being built from it.

    ``rule_id`` and ``location`` say which rule and where; the validator reports them as findings.
    """

    def __init__(self, message: str, rule_id: str, location: str = "/"):
        super().__init__(message)
        self.rule_id = rule_id
        self.location = location


class MissingDependencyError(AttnFormatError, ImportError):
    """An optional package that this operation needs is not installed.

    ``extra`` names the attnformat extra that installs it (``pip install 'attnformat[remote]'``);
    the command line exits 3 for this error.
    """

    def __init__(self, message: str, extra: str | None = None):
        hint = f"; install it with: pip install 'attnformat[{extra}]'" if extra else ""
        super().__init__(message + hint)
        self.extra = extra


class StoreLockedError(WriterError):
    """Another writer holds the destination (its lock is taken); nothing was changed."""


class WriteFailedError(AttnFormatError, OSError):
    """Writing failed (a full disk, no permission); the message names the path. Nothing that
    was already written is lost, and no partial file is marked complete."""
