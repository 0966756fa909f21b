"""A call's row blocks shared between threads (adapters.reductions.reduce_call with torch threads > 1).

Each thread runs whole blocks with torch single-threaded; the captured values must still equal the
model's eager ``output_attentions`` and, with ``kernel="replace"``, the model's outputs must equal
its own SDPA forward. torch's thread count must come back afterwards, on error too.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_kernel_capture import SMALL_BLOCKS, TOP_K, WINDOW, _main_output, build, eager_weights

import attnformat
from attnformat import reductions
from attnformat.adapters import huggingface as hf
from attnformat.adapters.keep import Keep
from attnformat.adapters.kernel import AttentionCall
from attnformat.adapters.reductions import reduce_call


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _threads_used(monkeypatch) -> set:
    """Record which threads compute blocks. The first block waits (up to 2 s, once) for a second
    thread to start one, so that a fast thread cannot take every block of a tiny call alone."""
    used = set()
    original = AttentionCall.block_logits
    second = threading.Event()
    waited = []

    def recording(self, rows, **kwargs):
        used.add(threading.get_ident())
        if len(used) > 1:
            second.set()
        elif not waited:
            waited.append(True)
            second.wait(2)
        return original(self, rows, **kwargs)

    monkeypatch.setattr(AttentionCall, "block_logits", recording)
    return used


@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2"])
def test_blocks_on_two_threads_equal_eager_and_the_sdpa_forward(tmp_path, monkeypatch, two_threads, reduction_path, name):
    model, inputs = build(name)
    if name == "gpt2":  # right padding: left-padded rows see no key, where SDPA and eager differ
        inputs = {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}
        inputs["attention_mask"][1, 8:] = 0
    with torch.no_grad():
        plain = _main_output(model(**inputs))
    used = _threads_used(monkeypatch)
    keep = Keep(top_k=TOP_K, statistics=True, head_mean=True, local_window=WINDOW)
    path = tmp_path / f"{name}.attn.zarr"
    with hf.capture(model, path, keep=keep, block_bytes=SMALL_BLOCKS, kernel="replace") as session, torch.no_grad():
        replaced = _main_output(model(**inputs))
    assert session.tap.fallbacks == {}
    assert len(used) == 2, "the blocks ran on one thread"
    assert torch.get_num_threads() == 2
    torch.testing.assert_close(replaced, plain, rtol=1e-5, atol=1e-5)
    expected = eager_weights(model, inputs)
    tree = attnformat.open(path)
    for module_path, (site, layer) in session.sites.items():
        reference = expected[module_path]
        real_rows = reference.max(-1) > reference.min(-1)
        np.testing.assert_allclose(tree[site]["weights"].sel(layer=layer).values, reference, rtol=1e-5, atol=1e-5)
        kept, key_index, _ = reductions.top_k(reference, TOP_K, key_mask=reference > 0)
        topk = tree[f"{site}_topk"]
        np.testing.assert_allclose(topk["weights"].sel(layer=layer).values, kept, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(topk["key_index"].sel(layer=layer).values[real_rows], key_index[real_rows])
        statistics = reductions.row_statistics(reference, local_window=WINDOW, key_mask=reference > 0)
        for statistic in ("entropy", "max_weight", "local_weight"):
            np.testing.assert_allclose(tree[f"{site}_stats"][statistic].sel(layer=layer).values[real_rows],
                                       statistics[statistic][real_rows], rtol=1e-5, atol=1e-5, err_msg=statistic)


def test_one_thread_or_switched_off_keeps_blocks_on_the_calling_thread(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    query, key = torch.randn(1, 2, 64, 8, generator=generator), torch.randn(1, 2, 64, 8, generator=generator)
    keep = Keep(dense=True, top_k=4, statistics=True)
    results = {}
    before = torch.get_num_threads()
    try:
        for threads, switch in ((1, "1"), (2, "0"), (2, "1")):
            torch.set_num_threads(threads)
            monkeypatch.setenv("ATTNFORMAT_BLOCK_THREADS", switch)
            used = _threads_used(monkeypatch)
            call = AttentionCall.from_tensors(query, key, is_causal=True)
            results[threads, switch] = reduce_call(call, keep, dense=True, budget_bytes=2 * 8 * 64 * 4)
            monkeypatch.undo()
            assert (len(used) > 1) == ((threads, switch) == (2, "1"))
    finally:
        torch.set_num_threads(before)
    expected = torch.softmax((query @ key.transpose(-1, -2)) * 8 ** -0.5 + torch.full((64, 64), -torch.inf).triu(1), -1)
    for result in results.values():
        np.testing.assert_allclose(result["weights"], expected.numpy(), rtol=1e-5, atol=1e-6)
        for name in results[1, "1"]:
            np.testing.assert_array_equal(result[name], results[1, "1"][name], err_msg=name)


def test_thread_count_comes_back_when_a_block_fails(monkeypatch, two_threads):
    original = AttentionCall.block_logits
    seen = []

    def failing(self, rows, **kwargs):
        seen.append(rows)
        if len(seen) == 3:
            raise RuntimeError("block failed")
        return original(self, rows, **kwargs)

    monkeypatch.setattr(AttentionCall, "block_logits", failing)
    call = AttentionCall.from_tensors(torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8), is_causal=True)
    budget = 2 * 32 * 4  # one row per block: 32 blocks
    with pytest.raises(RuntimeError, match="block failed"):
        reduce_call(call, Keep(dense=False, top_k=2), dense=False, budget_bytes=budget)
    assert torch.get_num_threads() == 2
    assert len(seen) < len(call.row_slices(budget)) - 8  # the other thread stopped soon after the failure
