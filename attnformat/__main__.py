"""``python -m attnformat`` runs the command line.

Run from a source checkout (the working directory is the checkout, so Python finds its
``attnformat/`` folder first, even when a wheel is installed), the package is the checkout's
``attnformat/`` alone: pyproject's ``package-dir`` maps ``viewer/``, ``adapters/`` and
``spec/schemas/`` under ``attnformat`` only when a distribution is built or installed in
editable mode. :func:`use_checkout_subpackages` makes them importable the same way here, so every
command works whichever copy Python picked. (The layout that would make this unnecessary, every
subpackage under one ``src/attnformat/`` folder, is a move of the whole tree.)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import attnformat


def use_checkout_subpackages(package=attnformat) -> list[str]:
    """Add the checkout's folders that hold mapped subpackages to ``package.__path__``.

    Does nothing for an installed or editable package (its subpackages are already found) and
    outside a checkout. The folders come from ``[tool.setuptools.package-dir]`` in the
    checkout's pyproject.toml, so a subpackage mapped there is found here too; a mapped folder
    is used only when its name is the subpackage's name (Python finds ``attnformat.viewer`` as
    a folder ``viewer`` in one of ``attnformat.__path__``).

    Parameters
    ----------
    package
        The imported ``attnformat`` package.

    Returns
    -------
    list of str
        The folders added (empty when nothing was needed).

    Examples
    --------
    >>> use_checkout_subpackages()  # an installed (or editable) attnformat needs nothing
    []
    """
    root = Path(package.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or importlib.util.find_spec(f"{package.__name__}.viewer") is not None:
        return []
    import tomllib

    mapping = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("tool", {}).get("setuptools", {}).get("package-dir", {})
    added = []
    for name, folder in mapping.items():
        parent, _, child = name.rpartition(".")
        location = (root / folder).resolve()
        if parent == package.__name__ and location.name == child and (location / "__init__.py").is_file():
            if str(location.parent) not in package.__path__ and str(location.parent) not in added:
                added.append(str(location.parent))
    package.__path__.extend(added)
    return added


if __name__ == "__main__":
    use_checkout_subpackages()

    from attnformat.cli import main

    sys.exit(main())
