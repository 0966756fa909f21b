"""Cost of capturing attention during ``generate()``, measured side by side in one run (a script, not a test).

A randomly initialised Llama-style model (grouped-query attention, rotary embeddings, SDPA)
generates 64 new tokens greedily after a prompt, three ways, interleaved run by run so that a
slower minute on a shared machine hits all of them:

- ``plain``: ``model.generate(...)``;
- ``statistics + top-k``: the same inside ``huggingface.capture(model, path, keep=Keep(dense=False,
  top_k=32, statistics=True))`` -- every layer, head and row, written to a Zarr file;
- ``dense``: every dense map (for reference; not a target).

Reported: the median wall time of each, the capture/plain ratio (target <= 1.5 for statistics +
top-k), the file sizes, and a check that the captured run generated the same tokens.

Usage: ``python benchmarks/bench_generation.py [--new-tokens 64] [--prompt 128] [--repeats 5]
[--layers 8] [--hidden 512] [--heads 8] [--key-heads 2] [--threads N] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.key_heads,
                         max_position_embeddings=args.prompt + args.new_tokens + 8, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--key-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from attnformat.adapters import huggingface
    from attnformat.adapters.keep import Keep

    model = _model(args)
    prompt = torch.randint(3, args.vocab, (1, args.prompt))
    settings = {"max_new_tokens": args.new_tokens, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    cases = {
        "plain": None,
        "statistics + top-k": Keep(dense=False, top_k=args.top_k, statistics=True),
        "dense": Keep(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-generation-"))
    times: dict[str, list[float]] = {name: [] for name in cases}
    sizes: dict[str, int] = {}
    reference = model.generate(prompt, **settings)  # warm-up (and the tokens every run must reproduce)
    with huggingface.capture(model, workdir / "warm-up.attn.zarr", keep=cases["statistics + top-k"]):
        model.generate(prompt, **{**settings, "max_new_tokens": 2})  # first use imports the storage engine: not timed
    same = True
    try:
        for repeat in range(args.repeats):
            for name, keep in cases.items():
                path = workdir / f"{name.replace(' ', '').replace('+', '_')}-{repeat}.attn.zarr"
                start = time.perf_counter()
                if keep is None:
                    sequences = model.generate(prompt, **settings)
                else:
                    with huggingface.capture(model, path, keep=keep):
                        sequences = model.generate(prompt, **settings)
                times[name].append(time.perf_counter() - start)
                same = same and torch.equal(sequences, reference)
                if keep is not None:
                    sizes[name] = _size(path)
                    shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    results = {
        "model": f"Llama-style, {args.layers} layers x {args.heads} heads ({args.key_heads} key heads), hidden {args.hidden}, vocab {args.vocab}",
        "prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "median_seconds": medians,
        "ratio_to_plain": {name: medians[name] / medians["plain"] for name in cases if name != "plain"},
        "file_bytes": sizes, "same_tokens": same,
    }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{results['model']}; prompt {args.prompt} tokens + {args.new_tokens} new, greedy; median of {args.repeats} runs, "
              f"{results['threads']} threads")
        for name in cases:
            ratio = "" if name == "plain" else f"  {results['ratio_to_plain'][name]:.2f}x plain"
            size = f"  file {sizes[name] / 2**20:.2f} MiB" if name in sizes else ""
            print(f"  {name:<20} {medians[name]:7.3f} s{ratio}{size}")
        target = results["ratio_to_plain"]["statistics + top-k"]
        print(f"statistics + top-{args.top_k} capture / plain generate: {target:.2f}x (target <= 1.5): {'met' if target <= 1.5 else 'NOT met'}")
        print(f"captured runs generated the same tokens as plain runs: {same}")
    return results


if __name__ == "__main__":
    main()
