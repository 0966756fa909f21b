"""The corruption campaign: hundreds of damaged and crafted variants of every example in every
storage, each run through ``info``, ``validate``, ``validate --json`` and ``convert`` (to .zarr and
to .h5) in a forked child with a timeout and a memory bound, plus killed and competing writers.

Prints: inputs, tracebacks, wrong exit codes, hangs, memory over 1 GB, silent corruptions, data
lost, pickle executed (the issue's target: all zero), then message-quality and API-error counts,
a table per class, and the first failures with the command that reproduces each.

Usage::

    python benchmarks/bench_corruption.py                 # full campaign (~10 min on 2 idle cores)
    python benchmarks/bench_corruption.py --quick         # every kind once per storage (~2 min)
    python benchmarks/bench_corruption.py --only pickle --only references
    python benchmarks/bench_corruption.py --variant dense/zarr3/chunk-bitflip/0 --keep /tmp/repro
    python benchmarks/bench_corruption.py --list-classes

Exit status: 0 when every zero-target count is zero, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from attnformat.testing import corruption


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about one variant per kind and storage")
    parser.add_argument("--scale", type=float, default=None, help="variants per kind relative to the full campaign (default 0.45, --quick 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", action="append", choices=corruption.CLASSES, help="run only this class (repeatable)")
    parser.add_argument("--storage", action="append", choices=corruption.STORAGES, help="only this storage (repeatable)")
    parser.add_argument("--example", action="append", help="only this example (repeatable)")
    parser.add_argument("--variant", action="append", help="run exactly this variant (name from a report; repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds before a command counts as hung")
    parser.add_argument("--budget", type=float, default=None, help="seconds after which no new variant starts (a busy machine)")
    parser.add_argument("--keep", metavar="DIR", help="keep every file, output and converted copy in DIR")
    parser.add_argument("--limit", type=int, default=60, help="failures listed")
    parser.add_argument("--json", metavar="FILE", help="also write every failure as JSON to FILE")
    parser.add_argument("--no-writers", action="store_true", help="skip the killed/competing writer scenarios")
    parser.add_argument("--list-classes", action="store_true")
    args = parser.parse_args(argv)

    if args.list_classes:
        for klass in corruption.CLASSES:
            kinds = [k.name for k in corruption.KINDS.values() if k.klass == klass]
            print(f"{klass:<11} {', '.join(kinds) or 'killed writers, two writers, crashed partials, replacement under readers'}")
        return 0
    started = time.monotonic()
    if args.variant:
        variants = [corruption.variant_by_name(name, args.seed) for name in args.variant]
    else:
        scale = args.scale if args.scale is not None else (0.01 if args.quick else 0.45)
        classes = [c for c in (args.only or corruption.CLASSES) if c != "writer"]
        variants = corruption.make_variants(examples=args.example, storages=args.storage or corruption.STORAGES,
                                            classes=classes, scale=scale, seed=args.seed) if classes else []
    print(f"{len(variants)} variants, {args.jobs} jobs, seed {args.seed}", flush=True)
    result = corruption.CampaignResult(seed=args.seed)
    if variants:
        result = corruption.run_campaign(variants, jobs=args.jobs, timeout=args.timeout, workdir=args.keep, keep=bool(args.keep), budget=args.budget,
                                         progress=lambda text: print(f"  {text}", flush=True))
    if not args.variant and not args.no_writers and (not args.only or "writer" in args.only):
        print("  writer scenarios", flush=True)
        writers = corruption.run_writer_checks(kills=3 if args.quick else 9, seed=args.seed, reader_seconds=2.0 if args.quick else 4.0,
                                               workdir=Path(args.keep) / "writers" if args.keep else None)
        result.failures += writers.failures
        result.writer_scenarios = writers.writer_scenarios
        result.by_class["writer"] = writers.writer_scenarios
    result.seconds = time.monotonic() - started
    script = f"{sys.executable} {os.path.relpath(__file__)}"
    print()
    print(corruption.format_report(result, limit=args.limit, reproduce=script))
    if args.variant and args.keep:
        print()
        for name in args.variant:
            print(f"files of {name} are under {args.keep}/variants/NNNNN/ (its variant.json names it); rerun e.g.:")
            print(f"  attnformat validate {args.keep}/variants/00000/{corruption.variant_by_name(name).file_name}")
    if args.json:
        Path(args.json).write_text(json.dumps([failure.__dict__ for failure in result.failures], indent=1))
    return 0 if not result.failing() else 1


if __name__ == "__main__":
    sys.exit(main())
