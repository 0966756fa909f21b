"""What every hook-based capture shares: a recorder to write into, hooks removed on exit, site names.

A capture owns its :class:`~attnformat.adapters.recorder.Recorder` when given a path (and closes
the file on exit, ``incomplete`` after an exception) or borrows one it is given (to put several
captures in one file).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping

from attnformat.adapters.errors import CaptureStateError
from attnformat.adapters.recorder import Recorder

_INDEX = re.compile(r"^\d+$")
#: Names of module lists that say nothing about what they hold; dropped with their index.
_GENERIC_LISTS = frozenset({"layers", "layer", "blocks", "block", "h", "stack", "modules"})


def site_names_from_paths(paths: Iterable[str], overrides: Mapping[str, str] | Callable[[str], str] | None = None,
                          default: str = "attention") -> dict[str, str]:
    """Map module paths to site names: numeric indices (and generic list names) are dropped.

    ``encoder.layers.3.self_attn`` becomes ``encoder/self_attn`` and ``encoder.3.attn``
    ``encoder/attn``, so every layer of a stack lands in one site. Generic list names
    (``layers``, ``blocks``, ``h``...) are dropped unless two stacks would then collide.
    ``overrides`` maps a module path or a derived site name to another name, or is a function of
    the module path.

    Examples
    --------
    >>> site_names_from_paths(["encoder.layers.0.self_attn", "decoder.layers.0.multihead_attn"])
    {'encoder.layers.0.self_attn': 'encoder/self_attn', 'decoder.layers.0.multihead_attn': 'decoder/multihead_attn'}
    >>> site_names_from_paths(["blocks.0.attn"], {"attn": "video/frames"})
    {'blocks.0.attn': 'video/frames'}
    """
    paths = list(paths)

    def short(path: str) -> str:
        parts = path.split(".") if path else []
        kept = [p for i, p in enumerate(parts) if not _INDEX.match(p)
                and not (p in _GENERIC_LISTS and i + 1 < len(parts) and _INDEX.match(parts[i + 1]))]
        return "/".join(kept) or default

    def long(path: str) -> str:
        return "/".join(p for p in (path.split(".") if path else []) if not _INDEX.match(p)) or default

    names = {path: short(path) for path in paths}
    owners: dict[str, set[str]] = {}
    for path, name in names.items():
        owners.setdefault(name, set()).add(long(path))
    names = {path: name if len(owners[name]) == 1 else long(path) for path, name in names.items()}
    if callable(overrides):
        return {path: overrides(path) for path in paths}
    overrides = dict(overrides or {})
    return {path: overrides.get(path, overrides.get(name, name)).strip("/") for path, name in names.items()}


def layer_numbers(site_of: Mapping[str, str]) -> dict[str, int]:
    """Number the modules of each site 0, 1, 2... in model order.

    Examples
    --------
    >>> layer_numbers({"a.0.x": "a/x", "a.1.x": "a/x", "b": "b"})
    {'a.0.x': 0, 'a.1.x': 1, 'b': 0}
    """
    counters: dict[str, int] = {}
    numbers = {}
    for path, site in site_of.items():
        numbers[path] = counters.get(site, 0)
        counters[site] = numbers[path] + 1
    return numbers


class HookSession:
    """Base of the captures: installs hooks on enter, removes them on exit (always), closes the file.

    Subclasses implement ``_install()`` (returning removable handles) and may extend
    ``_restore()``. ``recorder`` is the :class:`Recorder` the hooks write into.

    Examples
    --------
    >>> from attnformat.adapters.torch import MultiheadAttentionCapture
    >>> issubclass(MultiheadAttentionCapture, HookSession)
    True
    """

    def __init__(self, destination, *, recorder_options: Mapping):
        if isinstance(destination, Recorder):
            self.recorder, self._owns_recorder = destination, False
        elif isinstance(destination, (str, os.PathLike)):
            self.recorder, self._owns_recorder = None, True
            self._destination, self._recorder_options = destination, dict(recorder_options)
        else:
            raise TypeError(f"destination must be a path or an attnformat.adapters.Recorder, not {type(destination).__name__}")
        self._handles: list = []
        self.active = False
        self.path = None if self._owns_recorder else destination.path

    def __enter__(self):
        if self.active:
            raise CaptureStateError("this capture is already active; use a new capture(...) for another block")
        if self._owns_recorder:
            self.recorder = Recorder(self._destination, **self._recorder_options)
            self.path = self.recorder.path
        self.active = True
        try:
            # One by one, so that handles installed before a failure halfway through _install are
            # still removed by _restore below.
            self._handles = []
            for handle in self._install():
                self._handles.append(handle)
        except BaseException:
            self._restore()
            if self._owns_recorder:
                self.recorder.close(complete=False)
            raise
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            self._restore()
        finally:
            if self._owns_recorder:
                self.recorder.close(complete=exc_type is None)

    def _install(self):  # pragma: no cover - every capture overrides it
        raise NotImplementedError

    def _restore(self) -> None:
        """Remove every hook; safe to call twice."""
        while self._handles:
            self._handles.pop().remove()
        self.active = False
