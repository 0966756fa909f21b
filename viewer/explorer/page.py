"""The explorer page: one self-contained HTML string, scripts and styles inline, data as JSON.

The page opens from disk with no network: every script and style comes from ``static/`` inside
this package (read with :mod:`importlib.resources`), there is no URL in it, and a
Content-Security-Policy forbids loading anything (``connect-src 'self'`` lets a page served by
``attnformat serve`` ask its own server for maps). The payload (:mod:`.payload`) sits in a
``<script type="application/json" id="af-data">`` element with ``<``, ``>``, ``&``, U+2028 and
U+2029 escaped as ``\\uXXXX``, so no label can end the script element or start markup; the
scripts insert labels with ``textContent`` only.

Script order: ``core.js`` first (it defines ``window.attnExplorer``), then every other
``static/*.js`` in name order; each view registers itself with ``attnExplorer.registerView`` and
the first render waits for ``DOMContentLoaded``, when all of them have run.
"""

from __future__ import annotations

import html
import json
import math
import os
from importlib import resources
from pathlib import Path

from attnformat.errors import WriteFailedError

_STATIC = "static"
#: Nothing may be fetched; inline scripts and styles only; images only from data: (E2's patches).
_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
           "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'")
_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _static_files(suffix: str) -> list[tuple[str, str]]:
    folder = resources.files(__package__).joinpath(_STATIC)
    found = sorted((entry.name, entry.read_text(encoding="utf-8")) for entry in folder.iterdir()
                   if entry.name.endswith(suffix))
    return found


def _scripts() -> list[tuple[str, str]]:
    scripts = _static_files(".js")
    return sorted(scripts, key=lambda item: (item[0] != "core.js", item[0]))


def payload_json(payload: dict) -> str:
    """The payload as JSON safe inside a ``<script>`` element (``<``, ``>``, ``&``, U+2028/9 escaped).

    Parameters
    ----------
    payload : dict
        What :func:`attnformat.viewer.explorer.build_payload` returns (any JSON-able dict).

    Examples
    --------
    >>> payload_json({"label": "</script><b>"})
    '{"label": "\\\\u003c/script\\\\u003e\\\\u003cb\\\\u003e"}'
    """
    try:
        text = json.dumps(payload, ensure_ascii=False, allow_nan=False)
    except ValueError:  # a NaN or infinity somewhere (a statistic of an empty map): JSON has no such number
        text = json.dumps(_finite(payload), ensure_ascii=False, allow_nan=False)
    for raw, escaped in _ESCAPES.items():
        text = text.replace(raw, escaped)
    return text


def _finite(value):
    """``value`` with every NaN or infinite float replaced by None (JSON null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _safe_inline(name: str, text: str, closing: str) -> str:
    # A static file must not end its own element early; ours never do, but say so if one did.
    if closing in text.lower():
        raise ValueError(f"static/{name} contains {closing!r}")
    return text


def render_page(payload: dict, *, title: str | None = None) -> str:
    """One self-contained HTML page showing ``payload`` (see :func:`.payload.build_payload`).

    Parameters
    ----------
    payload : dict
        What :func:`attnformat.viewer.explorer.build_payload` returns.
    title : str, optional
        The page's title (default: the payload's).

    Returns
    -------
    str
        The HTML text: no URL, no external resource; scripts and styles inline.

    Examples
    --------
    >>> import attnformat
    >>> from attnformat.viewer.explorer import build_payload
    >>> page = render_page(build_payload(attnformat.example_path("dense")))
    >>> page.startswith("<!DOCTYPE html>"), "https://" in page
    (True, False)
    """
    title = title or payload.get("title") or "attention"
    styles = "\n".join(_safe_inline(name, text, "</style") for name, text in _static_files(".css"))
    scripts = "\n".join(f"<script>/* {name} */\n{_safe_inline(name, text, '</script')}\n</script>"
                        for name, text in _scripts())
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_POLICY}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta name=\"generator\" content=\"attnformat view\">\n"
        "<link rel=\"icon\" href=\"data:,\">\n"
        f"<title>{html.escape(str(title))}</title>\n<style>\n{styles}\n</style>\n</head>\n<body>\n"
        "<div id=\"af-app\"><noscript>This page needs JavaScript (it runs offline, nothing is fetched)."
        "</noscript></div>\n"
        f"<script type=\"application/json\" id=\"af-data\">{payload_json(payload)}</script>\n"
        f"{scripts}\n</body>\n</html>\n"
    )


def write_page(source, path=None, *, title: str | None = None, **build_options) -> Path:
    """Write the explorer page of a file: one HTML file that opens offline in any browser.

    Parameters
    ----------
    source
        A path or URL attnformat can open, or a tree.
    path : str or path-like, optional
        Where to write (default: the file's name + ``.html`` in the current directory).
    title : str, optional
        The page's title (default: the file's name).
    **build_options
        Passed to :func:`attnformat.viewer.explorer.build_payload` (``sites``, ``samples``,
        ``layers``, ``heads``, ``max_bytes``, ``storage_options``...).

    Returns
    -------
    pathlib.Path
        The page written.

    Examples
    --------
    >>> import attnformat, tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "dense.html"
    >>> write_page(attnformat.example_path("dense"), out).stat().st_size > 10_000
    True
    """
    from attnformat.viewer.explorer.payload import build_payload

    payload = build_payload(source, title=title, **build_options)
    if path is None:
        path = Path.cwd() / (Path(str(payload["source"]).rstrip("/")).name + ".html")
    path = Path(path)
    text = render_page(payload, title=title)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise WriteFailedError(f"cannot write {os.fspath(path)}: {error.strerror or error}") from None
    return path
