"""Fixtures for the explorer's tests: one headless Chromium per test process (per xdist worker),
started on first use and closed at the end of the session."""

from __future__ import annotations

import pytest

from browser import Browser


@pytest.fixture(scope="session")
def browser():
    """A :class:`~tests.explorer.browser.Browser` shared by every browser test in this process.

    Fails (never skips) with the install command when chromium or chromedriver is missing."""
    chromium = Browser()
    try:
        yield chromium
    finally:
        chromium.close()
