"""The hostile-file campaign's children are bounded relative to the process they fork from.

A pytest worker that has loaded torch, numba's LLVM and a few thread pools maps more than the
campaign's 4 GB address-space bound before any child runs; a child bounded absolutely could not
start a thread (zarr starts its event-loop thread on first use) and waited forever.
"""

from __future__ import annotations

import mmap
import threading

from attnformat.testing import corruption


def _starts_a_thread() -> int:
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    return 0


def test_a_child_of_a_process_mapping_more_than_the_bound_can_start_threads(tmp_path):
    # Address space only (never touched): the forking process now maps more than the bound.
    reserve = mmap.mmap(-1, corruption.ADDRESS_SPACE_LIMIT + (1 << 30), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        run = corruption._run_one("thread", _starts_a_thread, tmp_path, timeout=60)
    finally:
        reserve.close()
    assert not run.timed_out and run.exit_code == 0, run.stderr


def test_a_runaway_child_is_still_stopped_by_the_bound(tmp_path):
    def runaway() -> int:
        try:
            bytearray(corruption.ADDRESS_SPACE_LIMIT + (1 << 30))
        except MemoryError:
            return 3
        return 0

    run = corruption._run_one("runaway", runaway, tmp_path, timeout=60)
    assert run.exit_code == 3
