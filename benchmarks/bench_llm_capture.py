"""Capture on the model's own kernel at LLM scale, measured side by side in one run (a script, not a test).

Case 1 — a random GPT-2-style model, 12 layers x 12 heads (hidden 264: 256 rounded up to a
multiple of 12 heads, as GPT-2 requires), one 4096-token sequence, CPU, SDPA:
  - plain SDPA forward (alternated with the captures, twice; minima are compared, as the machine
    may be shared);
  - capture of statistics for every layer and head + top-32 per row (``Keep(dense=False, top_k=32,
    statistics=True)``): wall-time ratio, peak extra memory (resident memory sampled every
    millisecond by a thread, above the plain forward's peak; torch's allocations are invisible to
    tracemalloc) against one dense layer's float32 weights, file size against the dense float32
    size of every layer. Targets: <= 2x, <= 0.5 layer, <= 5%.
  - dense capture of 2 chosen layers (``Keep(layers=[0, 11])``): wall-time ratio. Target <= 1.5x.
  - both captures again with ``kernel="replace"`` (the tap returns the attention output computed
    from the blocks it reduces; the model's SDPA kernel does not run on the captured layers),
    in the same alternation: ``replace_reduced_ratio``, ``replace_dense2_ratio``, and the largest
    difference of the last hidden state from the plain forward's;
  - statistics + top-32 with ``kernel="replace"`` reduced by torch's operators instead of the
    compiled kernel (``ATTNFORMAT_FUSED=0``; :mod:`attnformat.adapters.fused`), in the same
    alternation: ``replace_reduced_torch_operators_ratio``.
Case 2 — 32 layers x 32 heads, 8192 tokens, tiny hidden size (64): statistics + top-32 capture
of every layer (peak RSS, time, file size; target peak RSS <= 4 GB) side by side with a row loop
over one layer in the style of attention_saver (one query row at a time; our own code), both
timed on the same query/key states inside the tap, and the plain forward.

Each case runs in a fresh subprocess so that one case's allocations cannot hide another's.

Usage: ``python benchmarks/bench_llm_capture.py [--quick] [--threads N] [--big-layers N] [--skip-big]``
(``--quick``: 1024 and 2048 tokens, 8 layers in case 2; for development).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOP_K = 32


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the process's resident memory every millisecond while the block runs."""

    def __enter__(self):
        self.start = _rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._began = time.perf_counter()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._began
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _model(layers: int, heads: int, hidden: int, tokens: int):
    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=1000, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=tokens, attn_implementation="sdpa")
    model = GPT2Model(config).eval()
    ids = torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(1))
    return model, ids


def _plain(model, ids) -> PeakRSS:
    import torch

    with PeakRSS() as measured, torch.no_grad():
        measured.output = model(ids).last_hidden_state
    return measured


def _capture(model, ids, keep, directory, name, kernel: str = "keep", compiled: bool = True) -> tuple[PeakRSS, int]:
    """One capture; ``compiled=False`` reduces with torch's operators instead of the compiled kernel."""
    import torch

    from attnformat.adapters import huggingface as hf

    path = Path(directory) / f"{name}.attn.zarr"
    os.environ["ATTNFORMAT_FUSED"] = "1" if compiled else "0"
    try:
        with PeakRSS() as measured:
            with hf.capture(model, path, keep=keep, kernel=kernel), torch.no_grad():
                measured.output = model(ids).last_hidden_state
    finally:
        os.environ.pop("ATTNFORMAT_FUSED")
    return measured, _size(path)


def _warm_up(model, ids, directory) -> None:
    """Load kernels, the storage engine and the writer once (one-time import costs are not capture costs)."""
    from attnformat.adapters.keep import Keep

    _plain(model, ids[:, :64])
    _capture(model, ids[:, :64], Keep(top_k=TOP_K, statistics=True), directory, "warm-up")
    _capture(model, ids[:, :64], Keep(top_k=TOP_K, statistics=True), directory, "warm-up-replace", kernel="replace")
    _capture(model, ids[:, :64], Keep(top_k=TOP_K, statistics=True), directory, "warm-up-torch", kernel="replace", compiled=False)


def case_gpt2(tokens: int, repeats: int = 2) -> dict:
    import torch

    from attnformat.adapters.keep import Keep

    layers, heads = 12, 12
    model, ids = _model(layers, heads, 264, tokens)
    dense_layer = heads * tokens * tokens * 4
    reduced_keep, dense_keep = Keep(dense=False, top_k=TOP_K, statistics=True), Keep(layers=[0, layers - 1])
    plain, reduced, dense, replace_reduced, replace_dense, torch_reduced = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as directory:
        _warm_up(model, ids, directory)
        # Alternated and repeated: on a shared machine the minimum of each is the comparable figure.
        for repeat in range(repeats):
            plain.append(_plain(model, ids))
            reduced.append(_capture(model, ids, reduced_keep, directory, f"reduced-{repeat}"))
            replace_reduced.append(_capture(model, ids, reduced_keep, directory, f"replace-reduced-{repeat}", kernel="replace"))
            torch_reduced.append(_capture(model, ids, reduced_keep, directory, f"torch-reduced-{repeat}", kernel="replace", compiled=False))
            dense.append(_capture(model, ids, dense_keep, directory, f"dense2-{repeat}"))
            replace_dense.append(_capture(model, ids, dense_keep, directory, f"replace-dense2-{repeat}", kernel="replace"))
        plain.append(_plain(model, ids))
    reference = plain[0].output
    replace_difference = max(float((r.output - reference).abs().max()) for r, _ in replace_reduced + replace_dense)
    keep_difference = max(float((r.output - reference).abs().max()) for r, _ in reduced + dense)
    plain_seconds = min(p.seconds for p in plain)
    plain_peak = max(p.peak for p in plain)
    reduced_seconds, reduced_size = min(r.seconds for r, _ in reduced), reduced[0][1]
    reduced_peak = max(r.peak for r, _ in reduced)
    reduced_above_start = max(r.peak - r.start for r, _ in reduced)
    dense_seconds, dense_size = min(d.seconds for d, _ in dense), dense[0][1]
    return {
        "case": f"GPT-2 style {layers}x{heads}, {tokens} tokens", "threads": torch.get_num_threads(), "repeats": repeats,
        "plain_seconds": [round(p.seconds, 2) for p in plain],
        "reduced_seconds": [round(r.seconds, 2) for r, _ in reduced], "reduced_ratio": round(reduced_seconds / plain_seconds, 2),
        "reduced_extra_memory_MB": round(max(0, reduced_peak - plain_peak) / 2**20, 1),
        "reduced_peak_above_start_MB": round(reduced_above_start / 2**20, 1),
        "dense_layer_MB": round(dense_layer / 2**20, 1),
        "reduced_extra_memory_vs_dense_layer": round(max(0, reduced_peak - plain_peak) / dense_layer, 3),
        "reduced_file_MB": round(reduced_size / 2**20, 2), "dense_float32_file_MB": round(layers * dense_layer / 2**20, 1),
        "reduced_file_vs_dense": round(reduced_size / (layers * dense_layer), 4),
        "dense2_seconds": [round(d.seconds, 2) for d, _ in dense], "dense2_ratio": round(dense_seconds / plain_seconds, 2),
        "dense2_file_MB": round(dense_size / 2**20, 1),
        "replace_reduced_seconds": [round(r.seconds, 2) for r, _ in replace_reduced],
        "replace_reduced_ratio": round(min(r.seconds for r, _ in replace_reduced) / plain_seconds, 2),
        "replace_reduced_torch_operators_seconds": [round(r.seconds, 2) for r, _ in torch_reduced],
        "replace_reduced_torch_operators_ratio": round(min(r.seconds for r, _ in torch_reduced) / plain_seconds, 2),
        "replace_dense2_seconds": [round(d.seconds, 2) for d, _ in replace_dense],
        "replace_dense2_ratio": round(min(d.seconds for d, _ in replace_dense) / plain_seconds, 2),
        "replace_max_abs_difference_of_last_hidden_state": replace_difference,
        "keep_max_abs_difference_of_last_hidden_state": keep_difference,
    }


def _row_loop(call, top_k: int, window: int = 8) -> dict:
    """attention_saver's approach, written here: one query row at a time, in Python."""
    import numpy as np
    import torch

    heads, queries = call.heads, call.query_count
    query = call._query[0].float()
    key = torch.repeat_interleave(call._key[0].float(), heads // call.key_heads, dim=0)
    out = {name: np.zeros((heads, queries), np.float32) for name in ("entropy", "max_weight", "sink_weight", "local_weight")}
    out["top_key"] = np.zeros((heads, queries), np.int32)
    kept = np.full((heads, queries, top_k), np.nan, np.float32)
    index = np.full((heads, queries, top_k), -1, np.int32)
    for row in range(queries):
        visible = row + 1 if call.causal else call.key_count
        scores = torch.bmm(query[:, row:row + 1], key[:, :visible].transpose(1, 2))[:, 0] * call.scaling
        weights = torch.softmax(scores, dim=-1)
        out["entropy"][:, row] = -(weights * torch.log(weights.clamp_min(1e-30))).sum(-1).numpy()
        out["max_weight"][:, row], top = (t.numpy() for t in weights.max(-1))
        out["top_key"][:, row] = top
        out["sink_weight"][:, row] = weights[:, 0].numpy()
        out["local_weight"][:, row] = weights[:, max(0, row - window):row + window + 1].sum(-1).numpy()
        values, keys = torch.topk(weights, min(top_k, visible), dim=-1)
        kept[:, row, :values.shape[-1]] = values.numpy()
        index[:, row, :keys.shape[-1]] = keys.numpy()
    return out


def case_big(tokens: int, layers: int) -> dict:
    import torch

    from attnformat.adapters.kernel import KernelTap
    from attnformat.adapters.keep import Keep
    from attnformat.adapters.reductions import reduce_call

    heads = 32
    model, ids = _model(layers, heads, 64, tokens)
    keep = Keep(dense=False, top_k=TOP_K, statistics=True)
    with tempfile.TemporaryDirectory() as directory:
        _warm_up(model, ids, directory)
        plain = _plain(model, ids)
        reduced, reduced_size = _capture(model, ids, keep, directory, "big")
    # Side by side on the same call (layer 0's query and key states): our blocks vs a row loop.
    timings = {}

    def both(call):
        began = time.perf_counter()
        reduce_call(call, keep, dense=False)
        timings["blocks"] = time.perf_counter() - began
        began = time.perf_counter()
        _row_loop(call, TOP_K)
        timings["row_loop"] = time.perf_counter() - began

    with KernelTap(model, {"h.0.attn": ("decoder/self", 0)}, both), torch.no_grad():
        model(ids)
    return {
        "case": f"GPT-2 style {layers}x{heads}, hidden 64, {tokens} tokens", "threads": torch.get_num_threads(),
        "plain_seconds": round(plain.seconds, 2), "capture_seconds": round(reduced.seconds, 2),
        "capture_ratio": round(reduced.seconds / plain.seconds, 2),
        "capture_peak_rss_MB": round(reduced.peak / 2**20, 1), "capture_extra_rss_MB": round(max(0, reduced.peak - plain.peak) / 2**20, 1),
        "file_MB": round(reduced_size / 2**20, 2),
        "dense_float32_file_MB": round(layers * heads * tokens * tokens * 4 / 2**20, 1),
        "one_layer_blocks_seconds": round(timings["blocks"], 2), "one_layer_row_loop_seconds": round(timings["row_loop"], 2),
        "row_loop_vs_blocks": round(timings["row_loop"] / timings["blocks"], 1),
        "row_loop_all_layers_estimate_seconds": round(timings["row_loop"] * layers, 1),
    }


def _run_case(argv: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"case {argv} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (development)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--big-layers", type=int, default=None,
                        help="layers of case 2 (default 32; fewer to fit a time budget: the capture streams layer by layer, "
                             "so time and file size scale with layers and peak memory does not)")
    parser.add_argument("--skip-big", action="store_true", help="run case 1 only")
    parser.add_argument("--case", choices=["gpt2", "big"], help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        result = case_gpt2(args.tokens) if args.case == "gpt2" else case_big(args.tokens, args.layers)
        print(json.dumps(result))
        return 0
    threads = ["--threads", str(args.threads)] if args.threads else []
    gpt2_tokens, big_tokens, big_layers = (1024, 2048, 8) if args.quick else (4096, 8192, 32)
    big_layers = args.big_layers or big_layers
    gpt2 = _run_case(["--case", "gpt2", "--tokens", str(gpt2_tokens), *threads])
    print(json.dumps(gpt2, indent=1))
    print(f"\n{gpt2['case']}: statistics + top-{TOP_K} capture {gpt2['reduced_ratio']}x the plain SDPA forward "
          f"(target <= 2), peak extra memory {gpt2['reduced_extra_memory_vs_dense_layer']} of one dense layer (<= 0.5), "
          f"file {100 * gpt2['reduced_file_vs_dense']:.2f}% of dense float32 (<= 5%); dense capture of 2 layers "
          f"{gpt2['dense2_ratio']}x (<= 1.5); with kernel=\"replace\": statistics + top-{TOP_K} {gpt2['replace_reduced_ratio']}x, "
          f"dense 2 layers {gpt2['replace_dense2_ratio']}x (last hidden state within "
          f"{gpt2['replace_max_abs_difference_of_last_hidden_state']:.1e} of the plain forward's); the same statistics + top-{TOP_K} "
          f"reduced with torch's operators instead of the compiled kernel: {gpt2['replace_reduced_torch_operators_ratio']}x")
    if args.skip_big:
        return 0
    big = _run_case(["--case", "big", "--tokens", str(big_tokens), "--layers", str(big_layers), *threads])
    print(json.dumps(big, indent=1))
    print(f"\n{big['case']}: statistics + top-{TOP_K} capture in {big['capture_seconds']} s ({big['capture_ratio']}x plain), "
          f"peak RSS {big['capture_peak_rss_MB'] / 1024:.2f} GB (<= 4), file {big['file_MB']} MB (dense float32 would be "
          f"{big['dense_float32_file_MB'] / 1024:.0f} GB); one layer: blocks {big['one_layer_blocks_seconds']} s vs row loop "
          f"{big['one_layer_row_loop_seconds']} s ({big['row_loop_vs_blocks']}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
