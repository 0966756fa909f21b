"""Every public docstring example runs (the modules are imported by their real names, so the
adapters and the viewer are tested as ``attnformat.adapters`` and ``attnformat.viewer``)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import sys

import pytest

import attnformat


def _modules():
    names = []
    # attnformat.adapters and attnformat.viewer live in their own folders (package-dir mapping),
    # so they are walked on their own.
    for package_name in ("attnformat", "attnformat.adapters", "attnformat.viewer"):
        package = importlib.import_module(package_name)
        names.append(package_name)
        names += [info.name for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}.")]
    return sorted(set(names) - {"attnformat.__main__"})


@pytest.mark.parametrize("module_name", _modules())
def test_docstring_examples(module_name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(module_name)
    # doctest.testmod, one docstring at a time: figures an example leaves open (as a user's session
    # would) are closed after each docstring, so a module with many plotting examples does not pile
    # up figures (matplotlib warns past 20).
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    for test in doctest.DocTestFinder().find(module, module.__name__):
        try:
            runner.run(test)
        finally:
            if "matplotlib.pyplot" in sys.modules:
                sys.modules["matplotlib.pyplot"].close("all")
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {module_name}"
