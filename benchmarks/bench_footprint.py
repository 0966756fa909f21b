"""What a reader pays for attnformat: install size, and start-up time of the command line.

1. Install size of ``pip install attnformat`` (no extras): every file pip puts into a fresh
   ``--target`` folder from a wheel built from this checkout plus its dependencies (from pip's
   cache or the registry), in bytes, without the ``.pyc`` files pip would compile afterwards
   (``--no-compile``: they depend on the interpreter, and add about a third); then what the
   ``fast`` extra (TensorStore) adds on top: the distributions ``attnformat[fast]`` resolves to
   beyond the reader's, installed the same way. Before issue 8 TensorStore was a requirement, so
   "reader + fast" is the old reader's size.
2. Start-up of ``python -m attnformat --version`` and ``python -m attnformat validate FILE``
   (the valid ``dense`` conformance fixture), wall time of the whole process, for the wheel of
   this checkout and the wheel of an earlier commit (``--before``, default HEAD; built from
   ``git archive``, nothing in the repository changes; 2a81ffc is the last commit before issue
   8), each installed with ``--no-deps`` into its own folder and run from a neutral folder with
   ``-S`` (the dependencies come from this environment's site-packages, after the wheel). Old and
   new runs alternate; medians of several runs. Also the heavy modules each run imports
   (matplotlib, the viewer, the adapters, torch, TensorStore).

Run: ``python benchmarks/bench_footprint.py [--before REF] [--skip-install] [--rounds N]``. The
install step downloads what pip's cache lacks and takes a minute or two.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("matplotlib", "PIL", "attnformat.viewer", "attnformat.adapters", "torch", "transformers", "tensorstore")


def folder_bytes(folder: Path) -> int:
    """Apparent size of every regular file under folder (what pip wrote)."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def build_wheel(source: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(source)], check=True, capture_output=True)
    (wheel,) = out.glob("attnformat-*.whl")
    return wheel


def checkout_copy(destination: Path) -> Path:
    """The files a wheel is built from (building writes build/ next to them, not into the checkout)."""
    import tomllib

    destination.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, destination / name)
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    for folder in {"attnformat", *folders}:
        shutil.copytree(ROOT / folder, destination / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return destination


def commit_copy(ref: str, destination: Path) -> Path:
    """A commit's files, through git archive (read-only on the repository)."""
    destination.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
    return destination


def pip_install(target: Path, *requirements: str, deps: bool = True) -> None:
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--only-binary", ":all:",
               "--no-compile", "--target", str(target), "-c", str(ROOT / "constraints.txt"), *requirements]
    if not deps:
        command.insert(4, "--no-deps")
    subprocess.run(command, check=True, capture_output=True)


def resolved(requirement: str) -> dict[str, str]:
    """name -> version of everything pip would install for requirement into an empty folder."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--dry-run",
                        "--ignore-installed", "--only-binary", ":all:",
                        "-c", str(ROOT / "constraints.txt"), "--report", str(report), requirement],
                       check=True, capture_output=True)
        installs = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installs}


def install_sizes(wheel: Path, work: Path) -> dict[str, int]:
    reader = work / "reader"
    pip_install(reader, str(wheel))
    # The local wheel by its URL, so that pip never takes a release of the same name from the registry.
    base = resolved(f"attnformat @ {wheel.as_uri()}")
    fast = resolved(f"attnformat[fast] @ {wheel.as_uri()}")
    added = {name: version for name, version in fast.items() if name not in base}
    extra = work / "fast-extra"
    pip_install(extra, *(f"{name}=={version}" for name, version in sorted(added.items())), deps=False)
    return {"reader": folder_bytes(reader), "fast_extra": folder_bytes(extra), "fast_added": sorted(added),
            "reader_distributions": len(base)}


def wheel_only(wheel: Path, target: Path) -> dict[str, str]:
    """The environment that runs the wheel installed alone into target, with this environment's dependencies."""
    pip_install(target, str(wheel), deps=False)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]]), "MPLBACKEND": "Agg"}


def time_command(env: dict[str, str], argv: list[str], cwd: Path) -> tuple[float, list[str]]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-S", "-X", "importtime", "-m", "attnformat", *argv], capture_output=True,
                            text=True, env=env, cwd=cwd)
    elapsed = time.perf_counter() - start
    modules = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted({h for h in HEAVY for m in modules if m == h or m.startswith(h + ".")})
    if result.returncode not in (0, 1):
        raise RuntimeError(f"{argv}: exit {result.returncode}: {result.stderr[-500:]}")
    return elapsed, heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="HEAD", help="commit to compare start-up times with (default HEAD)")
    parser.add_argument("--skip-install", action="store_true", help="only the start-up times")
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="attnformat-footprint-") as scratch:
        work = Path(scratch)
        new_wheel = build_wheel(checkout_copy(work / "new-source"), work / "new-wheel")
        old_source = commit_copy(options.before, work / "old-source")
        old_wheel = build_wheel(old_source, work / "old-wheel")
        if not options.skip_install:
            sizes = install_sizes(new_wheel, work)
            mb = 1e6
            print(f"pip install attnformat (reader, no extras; no .pyc): {sizes['reader'] / mb:.1f} MB in "
                  f"{sizes['reader_distributions']} distributions")
            print(f"  + [fast] ({', '.join(sizes['fast_added'])}): +{sizes['fast_extra'] / mb:.1f} MB "
                  f"-> {(sizes['reader'] + sizes['fast_extra']) / mb:.1f} MB (the reader before issue 8, "
                  "when TensorStore was required)")
        before = options.before
        runs = {before: wheel_only(old_wheel, work / "old-site"), "now": wheel_only(new_wheel, work / "new-site")}
        fixtures = {before: old_source / "spec/conformance/valid/dense.zarr", "now": ROOT / "spec/conformance/valid/dense.zarr"}
        neutral = work / "cwd"
        neutral.mkdir()
        for label, argv in (("--version", ["--version"]), ("validate dense.zarr", ["validate", "{fixture}"])):
            times = {before: [], "now": []}
            heavy = {}
            for _ in range(options.rounds):
                for version in (before, "now"):
                    words = [word.format(fixture=fixtures[version]) for word in argv]
                    elapsed, heavy[version] = time_command(runs[version], words, neutral)
                    times[version].append(elapsed)
            old, new = statistics.median(times[before]), statistics.median(times["now"])
            print(f"python -m attnformat {label}: {before} {old * 1000:.0f} ms (heavy imports: {', '.join(heavy[before]) or 'none'}), "
                  f"now {new * 1000:.0f} ms (heavy imports: {', '.join(heavy['now']) or 'none'}); {old / new:.2f}x")


if __name__ == "__main__":
    main()
