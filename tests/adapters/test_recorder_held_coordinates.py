"""Per-sample coordinates written batch by batch are held until they fill whole chunks; the file
must still hold every batch's labels and masks where its samples go, in any batch order."""

from __future__ import annotations

import numpy as np
import pytest

import attnformat
from attnformat.adapters import Recorder


def _batch(offset: int, size: int, length: int, rng):
    labels = np.array([[f"s{offset + i}t{j}" for j in range(length)] for i in range(size)], dtype=object)
    real = rng.integers(1, length + 1, size=size)
    mask = np.arange(length)[None, :] < real[:, None]
    weights = np.where(mask[:, None, None, :], 1.0 / real[:, None, None, None], 0.0).repeat(length, axis=2)
    return labels, mask, weights.astype(np.float32)


@pytest.mark.parametrize("order", ["in order", "shuffled"])
def test_every_batch_s_labels_and_masks_land_at_its_samples(tmp_path, order):
    total, size, length = 23, 2, 5  # a last, shorter batch; chunks of several batches
    rng = np.random.default_rng(0)
    offsets = list(range(0, total, size))
    if order == "shuffled":
        offsets = [offsets[0]] + list(rng.permutation(offsets[1:]))  # the first batch declares the site
    expected_labels = np.empty((total, length), dtype=object)
    expected_mask = np.zeros((total, length), bool)
    path = tmp_path / "held.attn.zarr"
    with Recorder(path) as recorder:
        for offset in offsets:
            count = min(size, total - offset)
            labels, mask, weights = _batch(offset, count, length, rng)
            expected_labels[offset:offset + count], expected_mask[offset:offset + count] = labels, mask
            with recorder.samples(offset, total=total, length=length):
                recorder.describe("self", labels=labels, mask=mask)
                recorder.log("self", layer=0, weights=weights, dims=("sample", "head", "query", "key"))
    site = attnformat.open(path)["self"]
    np.testing.assert_array_equal(site["query_label"].values, expected_labels)
    np.testing.assert_array_equal(site["key_label"].values, expected_labels)
    np.testing.assert_array_equal(site["query_mask"].values, expected_mask)
    np.testing.assert_array_equal(site["key_mask"].values, expected_mask)


def test_held_rows_are_written_when_the_run_stops_early(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "stopped.attn.zarr"
    with pytest.raises(RuntimeError, match="stop"):
        with Recorder(path) as recorder:
            for offset in (0, 2):
                labels, mask, weights = _batch(offset, 2, 4, rng)
                with recorder.samples(offset, total=40, length=4):
                    recorder.describe("self", labels=labels, mask=mask)
                    recorder.log("self", layer=0, weights=weights, dims=("sample", "head", "query", "key"))
            raise RuntimeError("stop")
    site = attnformat.open(path)["self"]
    assert not attnformat.is_complete(attnformat.open(path))
    # the second batch, held (its chunk of 40 samples was not full) when the run stopped
    assert site["query_label"].values[2:4, 3].tolist() == ["s2t3", "s3t3"]
