"""The explorer inline in Jupyter: the same self-contained page, in an ``<iframe srcdoc>``.

``explore(path)`` as a cell's last line shows the interactive page (token, matrix, overview...
views) right in the notebook, offline: the page carries its scripts, styles and data, so nothing
is fetched, and it runs in a sandboxed frame (``sandbox="allow-scripts"``: its scripts run, but
in an origin of their own, so a label in the file can never reach the notebook, its kernel or
its cookies). The whole page is one HTML attribute, escaped with :func:`html.escape`.

Why an iframe and not a widget: a widget needs ipywidgets and a running kernel to show anything;
the iframe is plain HTML, so it also shows in a saved notebook, in nbviewer-like renderers that
run trusted output, and in VS Code, and it is exactly the page ``attnformat view`` writes.

The viewer's static figures show once per cell as well (see :mod:`attnformat.viewer.display`).
"""

from __future__ import annotations

import html
import os
from pathlib import Path

__all__ = ["Explorer", "explore"]

#: Height of the frame in the notebook, in CSS pixels (the page scrolls inside it).
DEFAULT_HEIGHT = 640


class Explorer:
    """The explorer page of one file, shown inline by Jupyter (``_repr_html_``) or saved.

    Parameters
    ----------
    payload : dict
        What :func:`attnformat.viewer.explorer.build_payload` returned (embedded mode).
    title : str, optional
        The page's title (default: the payload's).
    height : int
        Height of the frame in the notebook, in CSS pixels.

    Examples
    --------
    >>> import attnformat
    >>> explorer = explore(attnformat.example_path("dense"))
    >>> explorer._repr_html_().startswith("<iframe"), explorer.page.startswith("<!DOCTYPE html>")
    (True, True)
    """

    def __init__(self, payload: dict, *, title: str | None = None, height: int = DEFAULT_HEIGHT):
        self.payload = payload
        self.title = title
        self.height = int(height)
        self._page: str | None = None

    @property
    def page(self) -> str:
        """The self-contained HTML page (what ``attnformat view`` writes)."""
        if self._page is None:
            from attnformat.viewer.explorer.page import render_page

            self._page = render_page(self.payload, title=self.title)
        return self._page

    def _repr_html_(self) -> str:
        title = html.escape(str(self.title or self.payload.get("title") or "attention explorer"), quote=True)
        # srcdoc holds the page as an attribute value: escaping &, <, >, " and ' keeps all of it
        # inside the attribute, whatever the labels in it say.
        return (f'<iframe srcdoc="{html.escape(self.page, quote=True)}" title="{title}" '
                f'sandbox="allow-scripts" style="width: 100%; height: {self.height}px; border: 1px solid #ddd;" '
                f'loading="eager"></iframe>')

    def save(self, path: str | os.PathLike) -> Path:
        """Write the page to ``path`` (one HTML file that opens offline in any browser).

        Examples
        --------
        >>> import attnformat, tempfile, pathlib
        >>> out = explore(attnformat.example_path("dense")).save(pathlib.Path(tempfile.mkdtemp()) / "dense.html")
        >>> out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
        True
        """
        path = Path(path)
        path.write_text(self.page, encoding="utf-8")
        return path

    def __repr__(self) -> str:
        sites = self.payload.get("sites", [])
        maps = sum(len(site.get("maps") or {}) for site in sites)
        return (f"<Explorer of {self.payload.get('source', '?')}: {len(sites)} site(s), {maps} map(s) embedded, "
                f"{len(self.page.encode('utf-8')) / 1e6:.2f} MB page>")


def explore(source, *, title: str | None = None, height: int = DEFAULT_HEIGHT, **build_options) -> Explorer:
    """The interactive explorer of a file, for Jupyter: the cell's value shows the page inline.

    Parameters
    ----------
    source
        A path or URL attnformat can open, or an opened tree.
    title : str, optional
        The page's title (default: the file's name).
    height : int
        Height of the frame in the notebook, in CSS pixels.
    **build_options
        Passed to :func:`attnformat.viewer.explorer.build_payload` (``sites``, ``samples``,
        ``layers``, ``heads``, ``max_bytes``, ``storage_options``...).

    Returns
    -------
    Explorer
        Displays inline in Jupyter; ``.save(path)`` writes the page; ``.page`` is its HTML.

    Examples
    --------
    >>> import attnformat
    >>> explorer = explore(attnformat.example_path("padded-batch"), samples=[0, 1], height=400)
    >>> 'height: 400px' in explorer._repr_html_()
    True
    """
    from attnformat.viewer.explorer.payload import build_payload

    payload = build_payload(source, title=title, **build_options)
    return Explorer(payload, title=title, height=height)
