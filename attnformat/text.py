"""Text from a file, made safe to show: on a terminal, in markdown, in HTML.

Labels, site names, descriptions and attribute values are chosen by whoever wrote the file. Shown
as they are, a label holding an escape sequence can clear the terminal, retitle the window or
hide the lines above it, and a description holding a newline can open a heading or load a remote
image in a markdown report. Every place where such text reaches a terminal or a page passes it
through one of these functions. They make hostile text visible, never remove it: ``"\\x1b[2J"``
is shown as the six characters ``\\x1b[2J``.
"""

from __future__ import annotations

import html
import re

__all__ = ["for_html", "for_markdown", "for_terminal", "markdown_code", "markdown_fence"]

# Characters that move the cursor, end lines or switch direction: control characters (C0, DEL,
# C1), and the Unicode controls that reorder or hide text (bidirectional overrides and isolates,
# line and paragraph separators, zero-width characters).
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Markdown punctuation that opens a construct anywhere in a line: emphasis, code, links and
# images, raw HTML and autolinks, entities, tables, strikethrough, headings, e-mail autolinks.
_MARKDOWN_ANYWHERE = set("\\`*_[]<>&|~#!@")
# Only at the start of a line (or of a list item's text): bullet lists, thematic breaks, setext
# underlines, ordered lists ("1." or "1)").
_MARKDOWN_LEADING = (re.compile(r"^(\s*)([-+=])"), re.compile(r"^(\s*\d+)([.)])"))


def _escape_character(match: re.Match) -> str:
    character = match.group(0)
    if character in _NAMED:
        return _NAMED[character]
    code = ord(character)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _longest_backticks(text: str) -> int:
    """How many backticks ``text`` holds in a row at most: a code span's or block's fence needs more."""
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def for_terminal(text) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``, ``\\n``, ``\\u202e``).

    The result is one line that a terminal prints as it reads: no escape sequence reaches the
    terminal, no line break or carriage return hides what came before, no direction override
    reorders what follows. Printable text, accents and non-Latin scripts are kept.

    Parameters
    ----------
    text
        Anything; non-strings are converted with ``str``.

    Examples
    --------
    >>> print(for_terminal("\\x1b[2J\\x1b]0;title\\x07"))
    \\x1b[2J\\x1b]0;title\\x07
    >>> print(for_terminal("two\\nlines, café"))
    two\\nlines, café
    """
    return _INVISIBLE.sub(_escape_character, str(text))


def for_markdown(text) -> str:
    """``text`` escaped for markdown (CommonMark and GitHub's), to be shown as written.

    Control characters become visible escapes (as :func:`for_terminal`), so the text stays on one
    line and can open no block; markdown punctuation is backslash-escaped, so it becomes no
    heading, list, quote, emphasis, link, image, autolink, table cell or HTML tag. Use it for text
    outside code spans and code blocks (use :func:`markdown_code` and :func:`markdown_fence` there).

    Parameters
    ----------
    text
        Anything; non-strings are converted with ``str``.

    Examples
    --------
    >>> print(for_markdown("\\n# Owned\\n![x](http://evil/x.png)"))
    \\\\n\\# Owned\\\\n\\!\\[x\\](http\\://evil/x.png)
    >>> print(for_markdown("<img src=x onerror=alert(1)>"))
    \\<img src=x onerror=alert(1)\\>
    """
    escaped = "".join("\\" + c if c in _MARKDOWN_ANYWHERE else c for c in for_terminal(text))
    # Bare URLs and www. names are turned into links by GitHub: break their trigger.
    escaped = escaped.replace("://", "\\://")
    escaped = re.sub(r"(?i)(www)\.", r"\1\\.", escaped)
    for leading in _MARKDOWN_LEADING:
        escaped = leading.sub(r"\1\\\2", escaped)
    return escaped


def markdown_code(text) -> str:
    """``text`` as a markdown code span: delimited by more backticks than it holds in a row, so
    that it cannot close the span early. Control characters become visible escapes.

    Parameters
    ----------
    text
        Anything; non-strings are converted with ``str``.

    Examples
    --------
    >>> markdown_code("a`b")
    '`` a`b ``'
    >>> markdown_code("run.zarr")
    '`run.zarr`'
    """
    text = for_terminal(text)
    longest = _longest_backticks(text)
    fence = "`" * (longest + 1)
    padding = " " if longest or text.startswith(" ") or text.endswith(" ") else ""
    return f"{fence}{padding}{text}{padding}{fence}"


def markdown_fence(text: str) -> str:
    """A fenced markdown code block holding ``text`` (several lines), fenced by more backticks than
    any line holds in a row, so that no line of ``text`` can close it.

    Parameters
    ----------
    text
        Lines that are already safe for a terminal (e.g. :func:`for_terminal` applied to every
        name in them); code blocks show them as they are.

    Examples
    --------
    >>> print(markdown_fence("```\\n# not a heading"))
    ````
    ```
    # not a heading
    ````
    """
    longest = _longest_backticks(text)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def for_html(text, *, quote: bool = True) -> str:
    """``text`` escaped for HTML text and attribute values, with control characters made visible.

    Parameters
    ----------
    text
        Anything; non-strings are converted with ``str``.
    quote
        Also escape quotes (needed inside attribute values).

    Examples
    --------
    >>> for_html("<img src=x onerror=alert(1)>")
    '&lt;img src=x onerror=alert(1)&gt;'
    """
    return html.escape(for_terminal(text), quote=quote)
