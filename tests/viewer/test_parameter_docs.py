"""Every public plot function documents every parameter it takes, and no shared-docs marker is left.

A plot function is a callable exported by ``attnformat.viewer`` (its ``__all__``) that draws: it
takes ``ax``, or its docstring's Returns section (or its return annotation) names a Figure. The
Parameters section is read with numpydoc's parser when numpydoc is installed, else with the small
parser below (the same rules: ``name : type`` lines at the section's indentation, several names
separated by commas).
"""

from __future__ import annotations

import inspect
import re
import textwrap

import pytest

from attnformat import viewer
from attnformat.viewer.docs import PARAMETERS, UNFILLED, documented, fill

_SECTION = re.compile(r"^(?P<title>[A-Z][A-Za-z ]+)\n(?P<rule>-{3,})\s*$", re.MULTILINE)


def sections(docstring: str) -> dict[str, str]:
    """``{section title: body}`` of a numpydoc docstring (the summary is under ``""``)."""
    text = inspect.cleandoc(docstring or "")
    found = {}
    matches = list(_SECTION.finditer(text))
    found[""] = text[: matches[0].start()] if matches else text
    for match, following in zip(matches, matches[1:] + [None]):
        found[match.group("title").strip()] = text[match.end(): following.start() if following else len(text)]
    return found


def documented_names(docstring: str) -> set[str]:
    """Names the Parameters section documents (``*args``/``**kwargs`` without their stars)."""
    try:
        from numpydoc.docscrape import NumpyDocString
    except ImportError:
        body = sections(docstring).get("Parameters", "")
        names = set()
        for line in textwrap.dedent(body.strip("\n")).splitlines():
            if not line.strip() or line.startswith((" ", "\t")):
                continue
            head = line.split(" : ")[0] if " : " in line else line.rstrip(":")
            names |= {name.strip().lstrip("*") for name in head.split(",") if name.strip()}
        return names
    parsed = NumpyDocString(docstring or "")
    return {name.strip().lstrip("*") for parameter in parsed["Parameters"] for name in parameter.name.split(",")}


def draws(function) -> bool:
    if not inspect.isfunction(function):
        return False
    signature = inspect.signature(function)
    if "ax" in signature.parameters:
        return True
    returns = sections(function.__doc__).get("Returns", "")
    annotation = str(signature.return_annotation)
    return "Figure" in returns.strip().split("\n")[0] if returns.strip() else "Figure" in annotation


PLOT_FUNCTIONS = sorted(
    (getattr(viewer, name) for name in viewer.__all__ if draws(getattr(viewer, name))),
    key=lambda f: (f.__module__, f.__name__))
PUBLIC_CALLABLES = sorted(
    (getattr(viewer, name) for name in viewer.__all__ if callable(getattr(viewer, name))),
    key=lambda f: (getattr(f, "__module__", ""), getattr(f, "__name__", "")))


def _id(function) -> str:
    return f"{function.__module__.rpartition('.')[2]}.{function.__name__}"


def test_the_plot_functions_are_found():
    names = {f.__name__ for f in PLOT_FUNCTIONS}
    # A few of each kind the viewer has: axes-level (take ax) and figure-level (return a Figure).
    assert {"heatmap", "temporal_matrix", "head_grid", "layer_comparison", "step_comparison", "attention_flow"} <= names
    assert {"save_figure", "select", "color_scale"}.isdisjoint(names)


@pytest.mark.parametrize("function", PLOT_FUNCTIONS, ids=_id)
def test_every_parameter_is_documented(function):
    parameters = [name for name, p in inspect.signature(function).parameters.items() if name not in ("self", "cls")]
    documented_here = documented_names(function.__doc__)
    missing = [name for name in parameters if name not in documented_here]
    assert "Parameters" in sections(function.__doc__), f"{_id(function)} has no Parameters section"
    assert missing == [], f"{_id(function)} does not document {', '.join(missing)}"


@pytest.mark.parametrize("function", PLOT_FUNCTIONS, ids=_id)
def test_figure_level_functions_take_figsize_and_title(function):
    parameters = inspect.signature(function).parameters
    if "ax" in parameters:
        assert parameters["ax"].default is None, f"{_id(function)}: ax defaults to None"
    else:
        assert {"figsize", "title"} <= set(parameters), f"{_id(function)} returns a Figure but lacks figsize or title"


@pytest.mark.parametrize("function", PUBLIC_CALLABLES, ids=lambda f: getattr(f, "__name__", str(f)))
def test_no_shared_docs_marker_is_left_unfilled(function):
    docstring = inspect.getdoc(function) or ""
    # ``$`` also appears in maths (``$x$``) and shell examples; a marker is a whole ``$name`` token.
    left = [m.group(0) for m in UNFILLED.finditer(docstring) if m.group(0)[1:] in PARAMETERS or
            re.search(rf"^\s*\{m.group(0)}(\(.*\))?\s*$", docstring, re.MULTILINE)]
    assert left == [], f"{getattr(function, '__name__', function)} keeps unfilled markers {left}"


def test_markers_fill_with_the_shared_text_and_selected_names():
    @documented
    def plot(source, *, layer=None, head=None, ax=None):
        """Draw.

        Parameters
        ----------
        $source
        $selectors(layer, head)
        $ax
        """

    assert documented_names(plot.__doc__) == {"source", "layer", "head", "ax"}
    assert PARAMETERS["ax"].splitlines()[1].strip() in plot.__doc__
    with pytest.raises(KeyError, match="no shared parameter documentation named 'nonsense'"):
        fill("    $nonsense")


def test_the_parser_reads_several_names_and_stars():
    docstring = """Summary.

    Parameters
    ----------
    a, b : int
        Two.
    **options
        Passed on.

    Returns
    -------
    matplotlib.figure.Figure
    """
    assert documented_names(docstring) == {"a", "b", "options"}
    assert sections(docstring)["Returns"].strip() == "matplotlib.figure.Figure"
