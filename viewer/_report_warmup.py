"""Imported by the report's fork server, last of what it preloads: draws one small figure there
(:func:`attnformat.viewer.report._warm_up`), so that every helper it forks starts warm.

A module, because a fork server runs nothing but imports before it forks. A failure here costs
only the warm start: the helpers draw as they would otherwise.
"""

from __future__ import annotations

import warnings

try:
    from attnformat.viewer.report import _warm_up

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _warm_up()
except Exception:  # noqa: BLE001 - a cold start is slower, never wrong
    pass
