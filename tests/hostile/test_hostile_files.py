"""Hostile and damaged files, every class in every storage: a bounded sample of the corruption
campaign (``benchmarks/bench_corruption.py`` runs the full one).

Each test builds a few variants of two examples per storage with :mod:`attnformat.testing.corruption`,
runs ``info``, ``validate``, ``validate --json`` and ``convert`` (to .zarr and .h5) on each in a
forked child with a timeout and a memory bound, reads the values back and compares them with the
unmodified example, and asserts that nothing went wrong: no traceback, no unexpected exit code,
no hang, no run over 1 GB, no silent corruption, no pickle executed, no data lost.
"""

from __future__ import annotations

import pytest

from attnformat.testing import corruption

EXAMPLES = ("dense", "steps")
FILE_CLASSES = [klass for klass in corruption.CLASSES if klass != "writer"]


def _assert_clean(result: corruption.CampaignResult) -> None:
    failures = result.failing()
    summary = "\n".join(failure.line() for failure in failures[:25])
    assert not failures, f"{len(failures)} failures in {result.inputs} variants:\n{summary}"


@pytest.mark.parametrize("klass", FILE_CLASSES)
def test_hostile_files_are_refused_or_read_exactly(klass, tmp_path):
    variants = corruption.make_variants(examples=EXAMPLES, classes=[klass], scale=0.01, seed=0)
    applicable = {storage for kind in corruption.KINDS.values() if kind.klass == klass for storage in kind.storages}
    assert {v.storage for v in variants} == applicable
    # A hang is a run that never ends: the bound is generous so that a loaded CI machine (these
    # small files take well under a second each when idle) is not mistaken for one.
    result = corruption.run_campaign(variants, jobs=2, timeout=120, workdir=tmp_path, reuse_bases=True)
    assert result.inputs >= 1
    _assert_clean(result)


def test_every_class_is_sampled_in_every_storage_it_applies_to():
    variants = corruption.make_variants(examples=EXAMPLES, scale=0.01, seed=0)
    for kind in corruption.KINDS.values():
        assert {v.storage for v in variants if v.kind == kind.name} == set(kind.storages), kind.name
    for storage in corruption.STORAGES:
        classes = {v.klass for v in variants if v.storage == storage}
        assert {"pristine", "bitflip", "truncation", "swap", "labels"} <= classes, (storage, classes)


def test_killed_and_competing_writers_lose_nothing(tmp_path):
    result = corruption.run_writer_checks(kills=2, seed=0, workdir=tmp_path, reader_seconds=1.0, suffixes=(".zarr", ".h5"))
    assert result.writer_scenarios >= 6
    _assert_clean(result)


def test_the_kit_sees_damage_it_is_shown(tmp_path):
    # The harness itself: a flipped label read back without complaint must count as silent
    # corruption, whatever the library does with it, when checked against the unmodified values.
    reference = {"site/query_label": corruption.np.array(["cat", "sat"])}
    assert corruption.compare_values(reference, {"site/query_label": corruption.np.array(["Cat", "sat"])}) == "site/query_label: values differ"
    assert corruption.compare_values(reference, {"site/query_label": corruption.np.array(["cat", "sat"], dtype=object)}) is None
