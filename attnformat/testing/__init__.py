"""Tools for testing attnformat and the code around it: a shipped kit of hostile and damaged files.

:mod:`attnformat.testing.corruption` builds deterministic variants of every example file in
every storage (bit flips, truncations, swapped and deleted chunks, fuzzed metadata, pickle
smuggling, references outside the file, zip bombs, HDF5 header damage), runs the command line on
each in a forked child with a timeout and a memory bound, and classifies what went wrong. It
also kills streaming writers at random points and checks that no acknowledged map is lost. The
test suite runs a bounded sample; ``benchmarks/bench_corruption.py`` runs the full campaign.
"""

from attnformat.testing.corruption import (
    CLASSES,
    COMMANDS,
    FAILURE_TYPES,
    STORAGES,
    CampaignResult,
    Failure,
    Variant,
    format_report,
    make_variants,
    run_campaign,
    run_writer_checks,
    variant_by_name,
)

__all__ = [
    "CLASSES",
    "COMMANDS",
    "FAILURE_TYPES",
    "STORAGES",
    "CampaignResult",
    "Failure",
    "Variant",
    "format_report",
    "make_variants",
    "run_campaign",
    "run_writer_checks",
    "variant_by_name",
]
