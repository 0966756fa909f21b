"""Checks shared by the adapter tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import numpy as np

import attnformat


def assert_valid(path):
    """The file conforms to the spec (no MUST or SHOULD finding)."""
    report = attnformat.validate(path)
    assert report.ok, report.format()
    assert not report.findings, report.format()


def read(path, site, variable="weights", **selection):
    return np.asarray(attnformat.open(path)[site][variable].sel(selection).values)
