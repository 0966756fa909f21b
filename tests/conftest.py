"""Shared test set-up: example files are built once per session into a temporary folder."""

from __future__ import annotations

import os
import tempfile

import matplotlib

matplotlib.use("Agg")

# Examples land in a per-run folder so tests never depend on files from an earlier run.
os.environ.setdefault("ATTNFORMAT_EXAMPLES_DIR", tempfile.mkdtemp(prefix="attnformat-test-examples-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
